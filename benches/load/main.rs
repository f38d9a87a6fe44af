//! `make bench`: the load generator of issue 5.
//!
//! Drives the release `backupd` binary (or, with `--target HOST:PORT`, any
//! running protocol-v3 server) through the crate's client library, measures
//! this machine's limits in the same run, and prints every server figure next
//! to the limit that bounds it. Every figure also goes to
//! `target/bench/results.json`. See docs/PERFORMANCE.md.
//!
//! Run: `cargo bench --bench load -- [--quick] [--scenario small,large,idle,attack,replica,limits] ...`
//! (`--help` lists the flags). Under `cargo test` (no `--bench` argument) only
//! the harness's own self-checks run.
//!
//! The load side is kept cheap, since it shares the cores with the server:
//! every payload is encrypted once per session and sent from reused buffers.
//! Large files are built so that they cost one 1 MiB buffer whatever their
//! size: the ciphertext is chosen first (one random 1 MiB period repeated,
//! plus a final block made to decrypt to a full padding block) and the
//! plaintext it decrypts to, which is periodic too, is only checksummed. Each
//! packet frame is then the same buffer with its packet number patched.
//!
//! The modules, one concern each:
//!
//! * [`cli`]: the flags (`--help`);
//! * [`limits`] and [`machine`]: the machine's limits, measured in the same
//!   run, and its description;
//! * [`server`]: the started `backupd` process; [`usage`]: the memory and CPU
//!   time it (and the rest of the machine) uses, from /proc;
//! * [`clients`]: client set-up and the cheap large-file payloads;
//! * [`scenarios`]: one module per scenario; [`garage`], [`bucket`] and
//!   [`support`] (from tests/s3/) give scenario 5 its store and S3 flags;
//! * [`report`] and [`json`]: the figures on stdout and in `results.json`;
//!   [`figure`]: the same run drawn in `report.svg`;
//! * [`confine`]: the server on one core and 256 MB (`--confined`);
//! * [`run`]: the run from start to end.

#[path = "../../tests/common/mod.rs"]
mod common;
// The S3 test support (Garage, the bucket reader, the S3 flags) for scenario 5.
#[path = "../../tests/s3/bucket.rs"]
mod bucket;
#[path = "../../tests/s3/garage.rs"]
mod garage;
#[path = "../../tests/s3/support.rs"]
mod support;

mod cli;
mod clients;
mod confine;
mod figure;
mod json;
mod limits;
mod machine;
mod report;
mod run;
mod scenarios;
mod server;
mod usage;

use backupd::crypto::{Cksum, StreamDecryptor, AES_KEY_LEN};
use backupd::protocol::{Code, PacketHeader, RequestHeader, PACKET_HEADER_LEN, REQUEST_HEADER_LEN};

use cli::{parse_opts, parse_scenarios, Scn};
use clients::BigFile;
use json::{Obj as _, J};
use report::percentile;
use server::hides_info;

type Res<T> = Result<T, String>;

const MIB: u64 = 1 << 20;
/// Packet size of the large scenarios, and the period of their ciphertext.
const PERIOD: usize = 1 << 20;
/// Offset of the packet_number field in a 1028 frame.
const PACKET_NUMBER_AT: usize = REQUEST_HEADER_LEN + 8;

// ---------------------------------------------------------------------------
// Self-checks (cargo test)
// ---------------------------------------------------------------------------

fn self_check() {
    // The periodic large file decrypts, as one stream, to a plaintext of
    // the announced size with the announced cksum.
    let key = [0x17u8; AES_KEY_LEN];
    for mib in [1u64, 3] {
        let mut f = BigFile::new(&key, mib, 5);
        f.address(&[1; 16], "x.bin").expect("address");
        assert_eq!(f.packets() as u64, mib + 1);
        let mut dec = StreamDecryptor::new(&key);
        let mut ck = Cksum::new();
        for _ in 0..mib {
            let mut piece = f.frame[REQUEST_HEADER_LEN + PACKET_HEADER_LEN..].to_vec();
            dec.update(&mut piece, |p| ck.update(p));
        }
        let mut last = f.last[REQUEST_HEADER_LEN + PACKET_HEADER_LEN..].to_vec();
        assert_eq!(last.len(), 16);
        dec.update(&mut last, |p| ck.update(p));
        dec.finish(|p| ck.update(p)).expect("valid padding");
        assert_eq!(ck.len(), f.orig());
        assert_eq!(ck.finalize(), f.cksum);
        // The frames parse as the server would read them.
        let h: [u8; REQUEST_HEADER_LEN] = f.last[..REQUEST_HEADER_LEN].try_into().expect("header");
        let h = RequestHeader::decode(&h);
        assert_eq!(h.check(16 << 20), Ok(Code::FilePacket));
        assert_eq!(h.payload_size as usize, f.last.len() - REQUEST_HEADER_LEN);
        let ph = PacketHeader::decode(&f.last[REQUEST_HEADER_LEN..]).expect("packet header");
        assert_eq!((ph.packet_number, ph.total_packets, ph.content_size), (f.packets(), f.packets(), 16));
        assert_eq!(ph.file_name.bytes(), b"x.bin");
    }
    // Percentiles are nearest-rank.
    let v: Vec<u32> = (1..=100).collect();
    assert_eq!((percentile(&v, 50.0), percentile(&v, 99.0), percentile(&v, 100.0)), (50, 99, 100));
    assert_eq!(percentile(&[7], 99.0), 7);
    // JSON escaping and numbers.
    let mut o = J::obj();
    o.set("a\"b", "x\ny\u{1}");
    o.set("n", vec![1.5f64, 2.0, f64::NAN, 1.0 / 3.0]);
    o.set("k", 7u32);
    let s = json::render(&o);
    assert_eq!(
        serde_json::from_str::<J>(&s).ok(),
        Some(serde_json::json!({"a\"b": "x\ny\u{1}", "n": [1.5, 2, null, 0.3333], "k": 7}))
    );
    assert!(s.find("\"n\"") < s.find("\"k\""), "keys in the order set: {s}");
    // Flags.
    let args: Vec<String> = ["--quick", "--scenario", "small,idle", "--large-mib=64", "--bench"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let o = parse_opts(&args).expect("flags");
    assert!(o.quick);
    assert_eq!(o.scenarios, vec![Scn::Small, Scn::Idle]);
    assert_eq!(o.large_mib, 64);
    assert_eq!(parse_scenarios("attack").expect("attack"), vec![Scn::Attack]);
    assert!(parse_scenarios("all").expect("all").contains(&Scn::Attack));
    scenarios::attack::self_check();
    assert!(parse_opts(&["--large-mib".to_string(), "5000".to_string()]).is_err());
    assert!(parse_opts(&["--nope".to_string()]).is_err());
    assert!(hides_info(&["--log-level".to_string(), "WARN".to_string()]));
    assert!(hides_info(&["--log-level=error".to_string()]));
    assert!(!hides_info(&["--log-level=debug".to_string()]));
    assert!(!hides_info(&[]));
    figure_self_check();
}

/// report.svg is drawn from a run's figures: curves, bars and their names.
fn figure_self_check() {
    let lat = |scale: f64| {
        let mut l = J::obj();
        l.set("percentiles_ms", (0..=100).map(|p| scale * (1.0 + f64::from(p) / 10.0)).collect::<Vec<f64>>());
        l
    };
    let mut small = J::obj();
    small.set("latency_total", lat(1.0));
    small.set("files_per_s", serde_json::json!({"median": 5000.0}));
    let mut scen = J::obj();
    scen.set("small", small.clone());
    let mut top = J::obj();
    top.set("mode", "quick");
    top.set("scenarios", scen.clone());
    let mut confined = J::obj();
    small.set("latency_total", lat(3.0));
    scen.set("small", small);
    confined.set("scenarios", scen);
    top.set("confined", confined);
    let limits =
        limits::Limits { syncfs16_db: Some(8000.0), seq_write_behind: Some(2000.0), ..Default::default() };
    let dir = tempfile::tempdir().expect("tempdir");
    let path = figure::write_figure(dir.path(), &top, &limits).expect("report.svg");
    let svg = std::fs::read_to_string(path).expect("read report.svg");
    assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(200)]);
    for text in [
        "scenario 1, small files",
        "scenario 1, small files (1 core, 256 MB)",
        "limit: 16/syncfs + SQLite",
        "5000",
        "8000",
    ] {
        assert!(svg.contains(text), "report.svg lacks {text:?}");
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if !args.iter().any(|a| a == "--bench") {
        // `cargo test --all-targets` runs this binary without `--bench`.
        self_check();
        println!(
            "load: self-checks passed; run the benchmark with `make bench` or `cargo bench --bench load`"
        );
        return;
    }
    let opts = match parse_opts(&args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("load: {e}");
            std::process::exit(2);
        }
    };
    match run::run(&opts) {
        Ok(true) => {}
        Ok(false) => {
            eprintln!("load: some uploads failed or the server did not stop cleanly (see above)");
            std::process::exit(1);
        }
        Err(e) => {
            eprintln!("load: {e}");
            std::process::exit(1);
        }
    }
}
