//! Micro benchmarks of the server's per-byte and per-frame work (issue 5):
//! the POSIX cksum (the crate's [`Cksum`], beside `crc`'s `Table<16>`, its
//! engine until issue 14's "8.", and `Table<1>`), AES-256-CBC
//! decryption ([`StreamDecryptor`]), and frame parsing
//! (`RequestHeader::decode` + `check` + `Request::parse`).
//!
//! Plain timing loops (no criterion, to keep `cargo clippy --all-targets`
//! cheap): each case runs several iterations and reports the median and the
//! best. Run with `cargo bench --bench micro [-- --quick]`; the figures are
//! printed and written to `target/bench/micro.json`. Under `cargo test` (no
//! `--bench` argument) every case runs once, tiny, as a smoke check.

use std::hint::black_box;
use std::path::Path;
use std::time::{Duration, Instant};

#[path = "../tests/common/mod.rs"]
mod common;

use backupd::crypto::{self, Cksum, StreamDecryptor, StreamEncryptor, AES_KEY_LEN};
use backupd::protocol::{
    encode_frame, Code, NameField, PacketHeader, Request, RequestHeader, REQUEST_HEADER_LEN, VERSION,
};

use common::pseudo_random;

const MIB: usize = 1 << 20;

struct Case {
    name: String,
    unit: &'static str,
    /// Rates, one per iteration (higher is better).
    rates: Vec<f64>,
}

impl Case {
    fn median(&self) -> f64 {
        let mut v = self.rates.clone();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        if n == 0 {
            f64::NAN
        } else if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        }
    }

    fn best(&self) -> f64 {
        self.rates.iter().copied().fold(f64::NAN, f64::max)
    }
}

/// Run `f` (which does `work` units) `iters` times; rate = work / time.
fn measure(name: &str, unit: &'static str, iters: usize, work: f64, mut f: impl FnMut()) -> Case {
    f(); // warm-up: page faults, caches
    let rates = (0..iters)
        .map(|_| {
            let t0 = Instant::now();
            f();
            work / t0.elapsed().max(Duration::from_nanos(1)).as_secs_f64()
        })
        .collect();
    let c = Case { name: name.to_string(), unit, rates };
    println!("  {:<52} median {:>10.1} {:<9} best {:>10.1}", c.name, c.median(), c.unit, c.best());
    c
}

/// Frames as a client sends them: 1029s and small 1028 packets, alternating.
fn frames(n: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let id = [7u8; 16];
    let name = NameField::from_name(b"some-file-name.bin").expect("name");
    for i in 0..n {
        if i % 2 == 0 {
            encode_frame(&id, Code::CrcOk, &[&name.0], &mut out);
        } else {
            let mut payload = Vec::new();
            PacketHeader {
                content_size: 16,
                orig_file_size: 10,
                packet_number: 1,
                total_packets: 1,
                file_name: name.clone(),
            }
            .encode(&mut payload);
            payload.extend_from_slice(&[0xa5; 16]);
            encode_frame(&id, Code::FilePacket, &[&payload], &mut out);
        }
    }
    out
}

/// Parse every frame of `buf` as the server does; returns the frame count.
fn parse_all(buf: &[u8]) -> usize {
    let mut at = 0;
    let mut n = 0;
    while at + REQUEST_HEADER_LEN <= buf.len() {
        let mut h = [0u8; REQUEST_HEADER_LEN];
        h.copy_from_slice(&buf[at..at + REQUEST_HEADER_LEN]);
        let header = RequestHeader::decode(&h);
        let Ok(code) = header.check(16 << 20) else { break };
        let start = at + REQUEST_HEADER_LEN;
        let end = start + header.payload_size as usize;
        let Ok(req) = Request::parse(code, &buf[start..end]) else { break };
        black_box(&req);
        at = end;
        n += 1;
    }
    n
}

/// The sizes of a run: iterations per case and the large buffer's bytes.
struct Sizes {
    iters: usize,
    big: usize,
    /// Frames parsed per iteration.
    frames: usize,
}

fn mb(bytes: usize) -> f64 {
    bytes as f64 / 1e6
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let bench = args.iter().any(|a| a == "--bench");
    let quick = args.iter().any(|a| a == "--quick");
    // Under `cargo test`: one tiny iteration of everything.
    let sizes = match (bench, quick) {
        (false, _) => Sizes { iters: 1, big: MIB, frames: 1000 },
        (true, true) => Sizes { iters: 3, big: 32 * MIB, frames: 200_000 },
        (true, false) => Sizes { iters: 7, big: 256 * MIB, frames: 200_000 },
    };
    println!("backupd micro benchmarks ({} iterations each; median and best)", sizes.iters);
    let data = pseudo_random(sizes.big, 1);
    let mut cases = cksum_cases(&data, &sizes);
    cases.extend(aes_cases(&data, &sizes));
    cases.push(frame_case(&sizes));
    sanity_checks();
    if bench {
        write_json(&cases);
    }
}

/// cksum: a cache-resident 1 MiB buffer many times, and one large buffer,
/// with the crate's [`Cksum`] (crc32fast over bit-reversed bytes) and, in
/// the same run, `crc`'s `Table<16>` (its engine before) and `Table<1>`.
fn cksum_cases(data: &[u8], s: &Sizes) -> Vec<Case> {
    let one = &data[..MIB];
    let reps = s.big / MIB;
    let t16 = crc::Crc::<u32, crc::Table<16>>::new(&crc::CRC_32_CKSUM);
    let hot = |name: &str, f: &mut dyn FnMut(&[u8])| {
        measure(&format!("cksum, {name}, 1 MiB x reps (cache-hot)"), "MB/s", s.iters, mb(s.big), || {
            for _ in 0..reps {
                f(black_box(one));
            }
        })
    };
    let mut ours = Cksum::new();
    let mut d16 = t16.digest();
    let mut cases = vec![
        hot("Cksum (as built)", &mut |b| ours.update(b)),
        hot("crc Table<16> (before)", &mut |b| d16.update(b)),
    ];
    black_box((ours.finalize(), d16.finalize()));
    let buffer = |name: &str, f: &dyn Fn(&[u8]) -> u32| {
        measure(&format!("cksum, {name}, {} MiB buffer", s.big / MIB), "MB/s", s.iters, mb(s.big), || {
            black_box(f(black_box(data)));
        })
    };
    cases.push(buffer("Cksum (as built)", &crypto::cksum));
    cases.push(buffer("crc Table<16> (before)", &|b| t16.checksum(b)));
    let t1 = crc::Crc::<u32, crc::Table<1>>::new(&crc::CRC_32_CKSUM);
    cases.push(buffer("crc Table<1> (for comparison)", &|b| t1.checksum(b)));
    cases
}

/// AES-256-CBC decryption, in place, 1 MiB pieces (the server's packet size
/// in the large scenarios) and 4 KiB pieces; decrypt + cksum (the server's
/// whole per-byte path); encryption (the client's side, for the load
/// generator's cost).
fn aes_cases(data: &[u8], s: &Sizes) -> Vec<Case> {
    let mut cases = Vec::new();
    let key = [0x42u8; AES_KEY_LEN];
    let mut ct = crypto::encrypt_all(&key, data);
    for piece in [MIB, 4096] {
        let label =
            format!("StreamDecryptor, {} pieces, in place", if piece == MIB { "1 MiB" } else { "4 KiB" });
        cases.push(measure(&label, "MB/s", s.iters, mb(ct.len()), || {
            let mut dec = StreamDecryptor::new(&key);
            for p in ct.chunks_mut(piece) {
                dec.update(p, |b| {
                    black_box(b);
                });
            }
            // After the first pass the bytes are no longer the ciphertext; the
            // work is the same, the padding check may fail.
            let _ = black_box(dec.finish(|b| {
                black_box(b);
            }));
        }));
    }
    // Decrypt the whole stream, each piece of plaintext to `sum`.
    let decrypt = |ct: &mut [u8], sum: &mut dyn FnMut(&[u8])| {
        let mut dec = StreamDecryptor::new(&key);
        for p in ct.chunks_mut(MIB) {
            dec.update(p, &mut *sum);
        }
        let _ = dec.finish(sum);
    };
    cases.push(measure(
        "StreamDecryptor + Cksum (as built), 1 MiB pieces",
        "MB/s",
        s.iters,
        mb(ct.len()),
        || {
            let mut c = Cksum::new();
            decrypt(&mut ct, &mut |b| c.update(b));
            black_box(c.finalize());
        },
    ));
    let t16 = crc::Crc::<u32, crc::Table<16>>::new(&crc::CRC_32_CKSUM);
    let label = "StreamDecryptor + crc Table<16> (before), 1 MiB pieces";
    cases.push(measure(label, "MB/s", s.iters, mb(ct.len()), || {
        let mut d = t16.digest();
        decrypt(&mut ct, &mut |b| d.update(b));
        black_box(d.finalize());
    }));
    drop(ct);
    let mut out = Vec::with_capacity(s.big + 16);
    cases.push(measure("StreamEncryptor (client side), 1 MiB pieces", "MB/s", s.iters, mb(s.big), || {
        out.clear();
        let mut enc = StreamEncryptor::new(&key);
        for p in data.chunks(MIB) {
            enc.update(p, &mut out);
        }
        enc.finish(&mut out);
        black_box(&out);
    }));
    cases
}

/// Frame parsing: 1029s and small 1028s, alternating.
fn frame_case(s: &Sizes) -> Case {
    let buf = frames(s.frames);
    assert_eq!(parse_all(&buf), s.frames, "every frame parses");
    let label = "frames: decode+check+parse (1029 and 1028 alternating)";
    measure(label, "frames/s", s.iters, s.frames as f64, || {
        black_box(parse_all(black_box(&buf)));
    })
}

/// The decryptor and cksum agree with the one-shot functions and the
/// reference CRC.
fn sanity_checks() {
    let key = [0x42u8; AES_KEY_LEN];
    let t1 = crc::Crc::<u32, crc::Table<1>>::new(&crc::CRC_32_CKSUM);
    let small = pseudo_random(100_000, 2);
    let mut c = crypto::encrypt_all(&key, &small);
    let mut back = Vec::new();
    let mut dec = StreamDecryptor::new(&key);
    dec.update(&mut c, |b| back.extend_from_slice(b));
    dec.finish(|b| back.extend_from_slice(b)).expect("padding");
    assert_eq!(back, small);
    assert_eq!(crypto::cksum(&small), t1.checksum(&[&small[..], &[0xa0, 0x86, 0x01][..]].concat()));
    assert_eq!(VERSION, 3);
}

/// target/bench/micro.json: every case, its median, best and samples.
fn write_json(cases: &[Case]) {
    let num = |x: f64| {
        if x.is_finite() {
            serde_json::json!((x * 10.0).round() / 10.0)
        } else {
            serde_json::Value::Null
        }
    };
    let cases: Vec<serde_json::Value> = cases
        .iter()
        .map(|c| {
            serde_json::json!({
                "name": c.name,
                "unit": c.unit,
                "median": num(c.median()),
                "best": num(c.best()),
                "samples": c.rates.iter().map(|r| num(*r)).collect::<Vec<_>>(),
            })
        })
        .collect();
    let text = serde_json::to_string_pretty(&serde_json::json!({ "cases": cases })).unwrap_or_default();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    if std::fs::create_dir_all(&dir).is_ok() && std::fs::write(dir.join("micro.json"), text + "\n").is_ok() {
        println!("figures: {}", dir.join("micro.json").display());
    }
}
