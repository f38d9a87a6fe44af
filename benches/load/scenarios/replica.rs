//! Scenario 5: replica mode (issue 13, docs/SCALING.md). The small-file
//! workload of scenario 1 and one large file, first on a server without S3,
//! then on one that replicates every verified file to a local single-node
//! Garage: the throughput with replication off and on, and the replication
//! lag (from the last 1604 of a round to an empty queue, read from the
//! metrics file).
//!
//! Skipped, with a line that says why, when the server binary was built
//! without the `s3` feature (`make bench` builds `target/release/backupd-s3`
//! beside the default binary) or when there is no Garage (`make garage`).

use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use backupd::crypto::AES_KEY_LEN;
use rsa::RsaPrivateKey;

use super::small::{small_clients, timed_round};
use super::{Ctx, Totals};
use crate::cli::Opts;
use crate::clients::{new_client, BigFile};
use crate::garage::Garage;
use crate::json::{Obj as _, J};
use crate::machine::cmd_out;
use crate::report::{line, mb_s, Samples};
use crate::server::{run_server_args, Server};
use crate::support::{metric, s3_flags, write_credentials, S3Conf};
use crate::{Res, MIB};

/// How long a queue may take to drain before the scenario gives up.
const DRAIN_LIMIT: Duration = Duration::from_secs(600);

/// The server binary with the `s3` feature: `--server-bin` if it has the
/// S3 flags, else `backupd-s3` beside it.
fn s3_binary(o: &Opts) -> Result<PathBuf, String> {
    let has_s3 = |p: &Path| {
        p.is_file()
            && cmd_out(&p.display().to_string(), &["--help"]).is_some_and(|h| h.contains("--s3-endpoint"))
    };
    let beside = o.server_bin.with_file_name("backupd-s3");
    for p in [o.server_bin.clone(), beside.clone()] {
        if has_s3(&p) {
            return Ok(p);
        }
    }
    Err(format!(
        "neither {} nor {} has the s3 feature (cargo build --release --features s3, then copy the binary to {})",
        o.server_bin.display(),
        beside.display(),
        beside.display()
    ))
}

/// One mode's figures.
#[derive(Default)]
struct ModeRun {
    small_rate: Samples,
    large_mb_s: Option<f64>,
    /// Seconds from each round's last 1604 to an empty queue (replication on).
    lag: Samples,
    errors: Vec<String>,
    files: usize,
    exit_ok: bool,
}

pub(crate) fn run(o: &Opts, dir: &Path, key: &RsaPrivateKey, run_tag: &str, t: &mut Totals) -> Res<J> {
    println!(
        "\n== scenario 5: replica mode, S3 off vs on ({} clients x {} B, {} files/round, {} rounds; one {} MiB file) ==",
        o.small_clients, o.small_size, o.small_count, o.rounds, o.multi_mib
    );
    let mut j = J::obj();
    let skip = |why: String, j: &mut J| {
        line("skipped", &why);
        j.set("skipped", why);
    };
    if o.target.is_some() {
        skip("--target: the scenario starts its own servers".into(), &mut j);
        return Ok(j);
    }
    if o.confinement.is_some() {
        skip("runs in the first (unconfined) set only: Garage would share the one core".into(), &mut j);
        return Ok(j);
    }
    let bin = match s3_binary(o) {
        Ok(b) => b,
        Err(e) => {
            skip(e, &mut j);
            return Ok(j);
        }
    };
    let garage = match Garage::try_start() {
        Ok(g) => g,
        Err(e) => {
            skip(format!("Garage: {e}"), &mut j);
            return Ok(j);
        }
    };
    line("store", format!("single-node Garage at {} (same machine, same 2 cores)", garage.endpoint()));
    let mut modes = Vec::new();
    for on in [false, true] {
        let label = if on { "on" } else { "off" };
        let data_dir = dir.join(format!("data-{}-replica-{label}", std::process::id()));
        let r = run_mode(o, &bin, &data_dir, key, run_tag, on.then_some(&garage));
        let _ = std::fs::remove_dir_all(&data_dir);
        modes.push((label, r?));
    }
    let (off, on) = (&modes[0].1, &modes[1].1);
    let ratio = on.small_rate.median() / off.small_rate.median().max(1e-9);
    line("small files/s, S3 off", off.small_rate.show("files/s"));
    line("small files/s, S3 replica", format!("{}  ({ratio:.2}x of off)", on.small_rate.show("files/s")));
    let show_mb = |m: Option<f64>| m.map_or("-".into(), |v| format!("{v:.0} MB/s"));
    line("large file, S3 off / replica", format!("{} / {}", show_mb(off.large_mb_s), show_mb(on.large_mb_s)));
    line(
        "replication lag (last 1604 -> queue 0)",
        format!("median {:.2} s, max {:.2} s over {} drains", on.lag.median(), max(&on.lag), on.lag.0.len()),
    );
    for (label, m) in &modes {
        if !m.errors.is_empty() {
            line(&format!("ERRORS ({label})"), format!("{} (first: {})", m.errors.len(), m.errors[0]));
        }
        t.ok &= m.errors.is_empty() && m.exit_ok;
        let mut mj = J::obj();
        mj.set("small_files_per_s", m.small_rate.json());
        mj.set("large_file_mb_s", m.large_mb_s);
        mj.set("replication_lag_s", m.lag.json());
        mj.set("files_ok", m.files);
        mj.set("errors", m.errors.len());
        mj.set("first_errors", m.errors.iter().take(5).cloned().collect::<Vec<_>>());
        mj.set("server_exit_ok", m.exit_ok);
        j.set(label, mj);
    }
    j.set("small_ratio_on_to_off", ratio);
    j.set("server_bin", bin.display().to_string());
    Ok(j)
}

fn max(s: &Samples) -> f64 {
    s.0.iter().copied().fold(f64::NAN, f64::max)
}

/// One server (replication off, or on to `garage`): the small-file rounds,
/// each followed (replication on) by the wait for an empty queue, then one
/// large file and its drain.
fn run_mode(
    o: &Opts,
    bin: &Path,
    data_dir: &Path,
    key: &RsaPrivateKey,
    run_tag: &str,
    garage: Option<&Garage>,
) -> Res<ModeRun> {
    let _ = std::fs::remove_dir_all(data_dir);
    let side = data_dir.with_extension("s3");
    std::fs::create_dir_all(&side).map_err(|e| format!("{}: {e}", side.display()))?;
    let prom = side.join("backupd.prom");
    let mut args = run_server_args(o, "replica");
    if let Some(g) = garage {
        let conf = S3Conf::new(g.endpoint(), &g.bucket, "replica", &format!("bench-{}", std::process::id()));
        write_credentials(&side.join("s3.credentials"), &g.bucket.key_id, &g.bucket.secret);
        args.extend(s3_flags(&conf, &side).into_iter().map(|s| s.to_string_lossy().into_owned()));
        args.extend([
            "--metrics-file".into(),
            prom.display().to_string(),
            "--metrics-interval".into(),
            "100ms".into(),
        ]);
    }
    let mut server = Server::start(bin, data_dir, &args, None)?;
    let label = if garage.is_some() { "replica-on" } else { "replica-off" };
    let ctx = Ctx { addr: server.addr, server: Some(&server), key, run_tag: run_tag.to_string() };
    let mut m = ModeRun::default();
    let mut clients = small_clients(o, &ctx, label)?;
    let mut confirmed = 0usize;
    for round in 1..=o.rounds {
        let (r, fps) = timed_round(o, &mut clients, label, round);
        m.small_rate.0.push(fps);
        confirmed += r.ok;
        m.errors.extend(r.errors);
        if garage.is_some() {
            m.lag.0.push(drain(&prom, confirmed, &mut m.errors));
        }
    }
    drop(clients);
    // One large file (1 MiB packets), and its copy to the store.
    match new_client(ctx.addr, &format!("{run_tag}-{label}-large"), key) {
        Ok(mut c) => {
            let k = c.aes_key().copied().unwrap_or([0; AES_KEY_LEN]);
            let mut f = BigFile::new(&k, o.multi_mib, 5);
            let t0 = Instant::now();
            match f.upload(&mut c, &format!("{label}-large.bin")) {
                Ok(_) => {
                    m.large_mb_s = Some(mb_s(o.multi_mib * MIB, t0.elapsed()));
                    confirmed += 1;
                    if garage.is_some() {
                        m.lag.0.push(drain(&prom, confirmed, &mut m.errors));
                    }
                }
                Err(e) => m.errors.push(e),
            }
        }
        Err(e) => m.errors.push(e),
    }
    m.files = confirmed;
    let (code, _) = server.stop();
    m.exit_ok = code == Some(0);
    if !m.exit_ok {
        println!("  UNEXPECTED: server log tail:\n{}", server.log_tail());
    }
    let _ = std::fs::remove_dir_all(&side);
    Ok(m)
}

/// Seconds until the metrics show `files` uploaded and an empty queue.
fn drain(prom: &Path, files: usize, errors: &mut Vec<String>) -> f64 {
    let t0 = Instant::now();
    while t0.elapsed() < DRAIN_LIMIT {
        let text = std::fs::read_to_string(prom).unwrap_or_default();
        if metric(&text, "backupd_s3_queue_depth") == Some(0.0)
            && metric(&text, "backupd_s3_uploaded_total").is_some_and(|n| n >= files as f64)
        {
            return t0.elapsed().as_secs_f64();
        }
        thread::sleep(Duration::from_millis(20));
    }
    errors.push(format!("the S3 queue did not drain to {files} uploads within {DRAIN_LIMIT:?}"));
    f64::NAN
}
