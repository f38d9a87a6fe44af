//! The fuzz targets of `fuzz/` (bodies in `fuzz/harness/`) run as ordinary
//! tests, so that `cargo test` exercises them on stable Rust without
//! cargo-fuzz: over the committed seed corpus, over mutations of it and over
//! random inputs, all from fixed seeds. Every crash a fuzzer finds becomes a
//! named `regression_*` test here.
//!
//! The seed corpus (fuzz/corpus/<target>/) is written by
//! `make fuzz-corpus` (`cargo test --test fuzz_regressions -- --ignored --exact write_seed_corpus`).

mod common;

#[path = "../fuzz/harness/mod.rs"]
mod harness;

use std::path::{Path, PathBuf};

use backupd::client::{ContentSizeField, UploadOptions};
use backupd::crypto::encrypt_all;
use backupd::protocol::{Code, PacketHeader, Response, NAME_FIELD_LEN};
use common::*;
use harness::{packet_sequence_stats, session_stats, SequenceStats, SessionStats, TARGETS};

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz").join("corpus").join(target)
}

fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(corpus_dir(target))
        .map(|rd| {
            rd.flatten()
                .map(|e| (e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).unwrap()))
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

/// A small xorshift generator: the same inputs on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// One to four random edits of `input`: bit flips, byte changes, inserts,
/// deletions, truncation, duplication of a slice.
fn mutate(rng: &mut Rng, input: &[u8]) -> Vec<u8> {
    let mut v = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(v.len() + 1);
        match rng.below(6) {
            0 if at < v.len() => v[at] ^= 1 << rng.below(8),
            1 if at < v.len() => v[at] = rng.next() as u8,
            2 => v.insert(at, rng.next() as u8),
            3 if at < v.len() => {
                v.remove(at);
            }
            4 => v.truncate(at),
            _ => {
                let end = (at + rng.below(32)).min(v.len());
                let piece = v[at..end].to_vec();
                let to = rng.below(v.len() + 1);
                v.splice(to..to, piece);
            }
        }
    }
    v
}

#[test]
fn seed_corpus_is_committed_and_passes() {
    for (target, run) in TARGETS {
        let files = corpus(target);
        assert!(files.len() >= 3, "fuzz/corpus/{target} holds {} seeds", files.len());
        for (name, data) in &files {
            assert!(data.len() <= 8192, "seed {target}/{name} is {} bytes", data.len());
            run(data);
        }
    }
}

#[test]
fn packet_sequence_seeds_reach_every_convention() {
    let mut total = SequenceStats::default();
    for (_, data) in corpus("packet_sequence") {
        let s = packet_sequence_stats(&data);
        total.files += s.files;
        total.spanning += s.spanning;
        total.per_packet += s.per_packet;
        total.empty_tail += s.empty_tail;
        total.refused += s.refused;
        total.wrapped += s.wrapped;
        total.empty_file += s.empty_file;
    }
    assert!(
        total.spanning > 0
            && total.per_packet > 0
            && total.empty_tail > 0
            && total.refused > 0
            && total.wrapped > 0
            && total.empty_file > 0,
        "{total:?}"
    );
}

#[test]
fn session_seeds_reach_every_outcome() {
    let mut total = SessionStats::default();
    for (_, data) in corpus("session") {
        total.add(&session_stats(&data));
    }
    let s = total;
    let counts = [
        s.registered,
        s.keys_accepted,
        s.reconnected,
        s.received,
        s.stored,
        s.retried,
        s.aborted,
        s.packets_refused,
        s.packets_skipped,
        s.trailers,
        s.worker_failures,
        s.framing_errors,
        s.busy_closes,
        s.budget_waits,
        s.keys_checked,
    ];
    assert!(counts.iter().all(|&n| n > 0), "{total:?}");
}

/// Every target over mutations of its seeds and over random bytes.
#[test]
fn targets_survive_mutated_and_random_inputs() {
    const ROUNDS: usize = 1500;
    for (i, (target, run)) in TARGETS.iter().enumerate() {
        let seeds = corpus(target);
        let mut rng = Rng(0x5EED_0000 + i as u64);
        for round in 0..ROUNDS {
            let input = if round % 4 == 3 || seeds.is_empty() {
                let len = rng.below(600);
                pseudo_random(len, rng.next())
            } else {
                let pick = rng.below(seeds.len());
                mutate(&mut rng, &seeds[pick].1)
            };
            run(&input);
        }
    }
}

// ---------------------------------------------------------------------------
// Regressions: one named test per crash found.
// ---------------------------------------------------------------------------

/// Found by `payload_parsers` (a harness bug, kept as a contract): a name-only
/// request parses from a payload longer than its 255-byte field; the size is
/// the header's business (`RequestHeader::check` refuses it before parsing).
#[test]
fn regression_name_request_with_trailing_bytes() {
    let mut input = vec![0u8]; // selector 0: Request::parse(Code::Register, ..)
    input.extend_from_slice(&name_field_raw(b"alice"));
    input.extend_from_slice(&[0x30; 12]);
    harness::payload_parsers(&input);
    let parsed = backupd::protocol::Request::parse(Code::Register, &input[1..]).unwrap();
    assert!(matches!(parsed, backupd::protocol::Request::Register { name } if name.bytes() == b"alice"));
}

/// Found by reading `plan_packet` against the worker: convention 2 with a
/// ciphertext that is a multiple of the packet size ends with an empty packet
/// after the stream is complete; the worker refused it ("packet outside a CBC
/// stream"), so such uploads got 1607 instead of 1603.
#[test]
fn regression_whole_file_convention_empty_last_packet() {
    let server = TestServer::start(&[]);
    let (mut c, id) = server.registered_client("alice");
    let data = pseudo_random(2040, 1); // ciphertext 2048 = 2 * 1024: packets 1024, 1024, 0
    let opts =
        UploadOptions { packet_size: 1024, content_size: ContentSizeField::WholeFile, ..Default::default() };
    let up = c.upload_bytes("a.bin", &data, &opts).unwrap();
    assert!(up.cksum_matches(), "{up:?}");
    assert_eq!(up.content_size, 2048);
    c.crc_ok("a.bin").unwrap();
    assert_eq!(std::fs::read(server.stored_path(&id, "a.bin")).unwrap(), data);
}

/// Found by reading the packet numbering of `on_packet`: after packet 65535
/// of 65535 the next expected number overflowed a u16, which panicked the
/// event loop (and killed the server) in builds with overflow checks.
#[test]
fn regression_65535_packets_do_not_overflow() {
    let server = TestServer::start(&[]);
    let (mut c, id) = server.registered_client("alice");
    // Convention 3 with one-byte chunks: 65534 chunks + the empty one = 65535 packets.
    let data = pseudo_random(65_534, 2);
    let opts = UploadOptions {
        packet_size: 1,
        content_size: ContentSizeField::PerPacketEncrypted,
        ..Default::default()
    };
    let up = c.upload_bytes("many.bin", &data, &opts).unwrap();
    assert!(up.cksum_matches(), "{up:?}");
    assert_eq!(up.content_size, 65_535 * 16);
    c.crc_ok("many.bin").unwrap();
    assert_eq!(std::fs::read(server.stored_path(&id, "many.bin")).unwrap(), data);
}

/// Feed one complete frame to the state machine as the loop does (a packet's
/// fixed fields only); returns the flow and the replies it queued.
fn feed(
    core: &mut backupd::server::fuzzing::Core<Vec<backupd::worker::Job>>,
    p: &mut backupd::server::fuzzing::Protocol,
    frame_bytes: &[u8],
) -> (backupd::server::fuzzing::Flow, Vec<Response>) {
    use backupd::protocol::{RequestHeader, REQUEST_HEADER_LEN};
    let mut raw = [0u8; REQUEST_HEADER_LEN];
    raw.copy_from_slice(&frame_bytes[..REQUEST_HEADER_LEN]);
    let header = RequestHeader::decode(&raw);
    let code = core.check_header(p, &header).expect("a well-formed header");
    // The frame is the control payload or the packet's fixed fields; a
    // packet's content is then dropped here (this helper checks the replies).
    let mut frame = backupd::server::fuzzing::Frame::new(header, code);
    frame.fill(&frame_bytes[REQUEST_HEADER_LEN..]);
    assert!(frame.is_complete());
    let flow = core.handle_frame(p, frame);
    let replies = Response::decode_all(&p.take_output()).expect("well-formed replies");
    (flow, replies)
}

/// Found by `session`: a packet 1 refused for its sizes (after the session,
/// numbering, name and size checks had passed) made the loop send a Discard
/// for the upload id it had just allocated, which no packet had ever taken to
/// the worker: a job for nothing, and a discard of an upload never started.
#[test]
fn regression_refused_packet_1_discards_no_upload_it_never_started() {
    use backupd::server::fuzzing::{Core, Flow, Protocol, Registry};
    use backupd::worker::{ConnRef, Job};
    let id = [9u8; 16];
    let mut registry = Registry::default();
    registry.insert_client(id, "alice", Some(test_key().to_public_key()));
    let cfg = std::sync::Arc::new(backupd::config::Config::defaults());
    let mut core = Core::new(cfg, registry, Vec::<Job>::new(), 1);
    let mut p = Protocol::new(ConnRef { key: 0, serial: 1 }, "192.0.2.1:4000".parse().unwrap());

    let (flow, replies) = feed(&mut core, &mut p, &frame(&id, Code::Reconnect, &[&name_field_raw(b"alice")]));
    assert_eq!(flow, Flow::Continue);
    assert!(matches!(replies[..], [Response::ReconnectOk { .. }]), "{replies:?}");
    assert!(matches!(core.take_jobs()[..], [Job::Touch { .. }]));

    // Packet 1 of 2, 32 bytes of a 20-byte file's ciphertext, content_size 999:
    // neither convention, so refused.
    let packet = packet_frame(&id, 999, 20, 1, 2, &name_field_raw(b"a.bin"), &[0u8; 32]);
    let (flow, replies) = feed(&mut core, &mut p, &packet);
    assert_eq!((flow, replies), (Flow::Continue, vec![Response::GeneralError]));
    let jobs = core.take_jobs();
    assert!(jobs.is_empty(), "jobs: {} (no packet of this upload reached the worker)", jobs.len());
    assert_eq!(core.budget().used(), 0);
}

// ---------------------------------------------------------------------------
// The seed corpus generator.
// ---------------------------------------------------------------------------

fn write_seeds(target: &str, seeds: &[(&str, Vec<u8>)]) {
    let dir = corpus_dir(target);
    std::fs::create_dir_all(&dir).unwrap();
    for (name, data) in seeds {
        std::fs::write(dir.join(name), data).unwrap();
    }
}

fn public_key_ders() -> (Vec<u8>, Vec<u8>) {
    use rsa::pkcs8::EncodePublicKey;
    let der65537 = test_key().to_public_key().to_public_key_der().unwrap().into_vec();
    let k17 =
        rsa::RsaPrivateKey::new_with_exp(&mut rand::rngs::OsRng, 1024, &rsa::BigUint::from(17u32)).unwrap();
    let der17 = k17.to_public_key().to_public_key_der().unwrap().into_vec();
    assert_eq!((der65537.len(), der17.len()), (162, 160));
    (der65537, der17)
}

/// The bytes of a whole client session as one stream of frames.
fn session_stream(der: &[u8]) -> Vec<u8> {
    let id = [7u8; 16];
    let name = name_field_raw(b"alice");
    let file = name_field_raw(b"a.txt");
    let key = [1u8; 32];
    let mut s = frame(&[0; 16], Code::Register, &[&name]);
    s.extend(frame(&id, Code::PublicKey, &[&name, der]));
    for p in packet_frames(&id, &key, &file, b"hello, fuzzer: forty bytes of plaintext", 16) {
        s.extend(p);
    }
    s.extend(frame(&id, Code::CrcRetry, &[&file]));
    s.extend(frame(&id, Code::CrcAbort, &[&file]));
    s.extend(frame(&id, Code::CrcOk, &[&file]));
    s.extend(frame(&id, Code::Reconnect, &[&name]));
    s
}

/// A packet_sequence input that reaches at least what `want` asks, found by a
/// seeded search (the harness decodes its input into packets).
fn find_sequence(seed: u64, want: impl Fn(&SequenceStats) -> bool) -> Vec<u8> {
    let mut rng = Rng(seed);
    for _ in 0..2_000_000 {
        let len = 1 + 8 * (1 + rng.below(6));
        let mut input = pseudo_random(len, rng.next());
        input[0] = 0; // max_file_size: u32::MAX
        if want(&packet_sequence_stats(&input)) {
            return input;
        }
    }
    panic!("no input found for seed {seed}");
}

/// A `session` input with the given flag byte that reaches at least what
/// `want` asks, found by a seeded search.
fn find_session(flags: u8, seed: u64, want: impl Fn(&SessionStats) -> bool) -> Vec<u8> {
    let mut rng = Rng(seed);
    for _ in 0..200_000 {
        let len = 32 + rng.below(480);
        let mut input = pseudo_random(len, rng.next());
        input[0] = flags;
        if want(&session_stats(&input)) {
            return input;
        }
    }
    panic!("no session input found for seed {seed}");
}

/// Flag bits (see `harness::session`): 1 --ack-retry, 2 OAEP SHA-256, 0x0c
/// --max-packet (0: 267+1024, 4: 267+64, 8: 267+4096), 0x30 --max-file-size
/// (0x20: 100, 0x30: 3000), 0x40 the smallest memory budget, 0x80 decrypt a
/// session key (slow).
fn session_seeds() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("store_key_checked", find_session(0x80, 11, |s| s.stored > 0 && s.keys_checked > 0)),
        ("retry_then_abort", find_session(0x00, 12, |s| s.retried > 0 && s.aborted > 0)),
        (
            "ack_retry_sha256_key_checked",
            find_session(0x83, 13, |s| s.retried > 0 && s.stored > 0 && s.keys_checked > 0),
        ),
        ("skip_after_failure", find_session(0x00, 14, |s| s.packets_skipped > 0 && s.worker_failures > 0)),
        ("trailer_after_received", find_session(0x00, 19, |s| s.trailers > 0 && s.stored > 0)),
        ("budget_wait", find_session(0x40, 15, |s| s.budget_waits > 0 && s.received > 0)),
        ("small_limits", find_session(0x34, 16, |s| s.packets_refused > 0 && s.received > 0)),
        (
            "busy_close_reconnect",
            find_session(0x00, 17, |s| s.busy_closes > 0 && s.reconnected > 0 && s.received > 0),
        ),
        ("framing_error", find_session(0x00, 18, |s| s.framing_errors > 0 && s.keys_accepted > 0)),
    ]
}

#[test]
#[ignore = "writes fuzz/corpus/packet_sequence: `make fuzz-corpus`, when its input format changes"]
fn write_sequence_seed_corpus() {
    write_seeds(
        "packet_sequence",
        &[
            ("spanning", find_sequence(1, |s| s.spanning > 0 && s.empty_tail == 0)),
            ("per_packet", find_sequence(2, |s| s.per_packet > 0)),
            ("empty_tail", find_sequence(3, |s| s.empty_tail > 0 && s.spanning > 0)),
            ("refused", find_sequence(4, |s| s.refused > 1 && s.files > 0)),
            ("wrapped", find_sequence(5, |s| s.wrapped > 0)),
            ("empty_file", find_sequence(6, |s| s.empty_file > 0)),
        ],
    );
}

#[test]
#[ignore = "writes fuzz/corpus/session: `make fuzz-corpus`, when the session input format changes"]
fn write_session_seed_corpus() {
    write_seeds("session", &session_seeds());
}

/// File paths as clients send them (the bytes before the name field's NUL).
fn path_seeds() -> Vec<(&'static str, Vec<u8>)> {
    [
        ("unix_absolute", "/home/user/docs/report.pdf"),
        ("relative", "docs/2026/report.pdf"),
        ("windows_drive", "C:\\Users\\me\\cv.docx"),
        ("drive_relative", "d:notes.txt"),
        ("unc", "\\\\server\\share\\f.txt"),
        ("empty_components", "a//b\\\\c\\"),
        ("traversal", "../../secret.txt"),
        ("hidden_dot", "a/./b"),
        ("windows_traversal", "C:..\\x"),
        ("root_only", "/"),
        ("bidi", "invoice\u{202E}fdp.exe"),
        ("utf8", "caf\u{e9}/\u{e9}t\u{e9}.txt"),
    ]
    .into_iter()
    .map(|(name, path)| (name, path.as_bytes().to_vec()))
    .chain([("not_utf8", b"dir/\xff\xfe.txt".to_vec()), ("control", b"dir/a\tb".to_vec())])
    .collect()
}

#[test]
#[ignore = "writes fuzz/corpus/path_normalize: `make fuzz-corpus`, when the path rules change"]
fn write_path_seed_corpus() {
    write_seeds("path_normalize", &path_seeds());
}

#[test]
fn path_seeds_reach_every_outcome() {
    use backupd::protocol::{normalize_path, NameError};
    let results: Vec<_> = corpus("path_normalize").iter().map(|(_, data)| normalize_path(data)).collect();
    assert!(results.iter().any(|r| r.as_ref().is_ok_and(|p| p.stripped())));
    assert!(results.iter().any(|r| r.as_ref().is_ok_and(|p| !p.stripped())));
    for e in [NameError::Dots, NameError::Empty, NameError::Bidi, NameError::NotUtf8, NameError::Control] {
        assert!(results.contains(&Err(e.clone())), "no seed is refused with {e:?}");
    }
}

#[test]
#[ignore = "writes fuzz/corpus: `make fuzz-corpus`, when the harness input formats change"]
fn write_seed_corpus() {
    write_session_seed_corpus();
    write_path_seed_corpus();
    let (der65537, der17) = public_key_ders();
    let id = [7u8; 16];
    let file = name_field_raw(b"a.txt");

    let mut padded = der17.clone();
    padded.extend_from_slice(&[0u8; 40]);
    let mut unterminated = frame(&id, Code::CrcOk, &[&[b'x'; NAME_FIELD_LEN]]);
    unterminated.truncate(23 + NAME_FIELD_LEN);
    write_seeds(
        "frame_decoder",
        &[
            ("session_e65537", session_stream(&der65537)),
            ("session_e17_padded", session_stream(&padded)),
            ("bad_version", raw_header(&id, 2, 1025, 255)),
            ("unknown_code", raw_header(&id, 3, 1099, 255)),
            ("oversized_packet", raw_header(&id, 3, 1028, u32::MAX)),
            ("unterminated_name", unterminated),
            ("packet_bad_name", packet_frame(&id, 16, 3, 1, 1, &name_field_raw(b"../x"), &[0u8; 16])),
        ],
    );

    let with = |sel: u8, body: &[u8]| -> Vec<u8> {
        let mut v = vec![sel];
        v.extend_from_slice(body);
        v
    };
    let mut packet = Vec::new();
    PacketHeader {
        content_size: 32,
        orig_file_size: 20,
        packet_number: 1,
        total_packets: 2,
        file_name: backupd::protocol::NameField::from_name(b"a.txt").unwrap(),
    }
    .encode(&mut packet);
    packet.extend_from_slice(&[0xAB; 16]);
    let mut key_payload = name_field_raw(b"alice").to_vec();
    key_payload.extend_from_slice(&der65537);
    let mut response = Vec::new();
    Response::FileReceived { id, content_size: 48, file_name: file, cksum: 0xDEAD_BEEF }
        .encode(&mut response);
    write_seeds(
        "payload_parsers",
        &[
            ("register", with(0, &name_field_raw(b"alice"))),
            ("public_key", with(1, &key_payload)),
            ("file_packet", with(3, &packet)),
            ("crc_abort_unterminated", with(6, &[b'y'; NAME_FIELD_LEN])),
            ("packet_header", with(7, &packet)),
            ("key_e17", with(8, &der17)),
            ("key_e17_padded", with(8, &padded)),
            ("file_name_traversal", with(9, b"..\\x")),
            ("file_name_utf8", with(9, "caf\u{e9}.txt".as_bytes())),
            ("name_field", with(10, b"a\x01b")),
            ("response_1603", with(11, &response)),
        ],
    );

    write_sequence_seed_corpus();

    // stream_decrypt: mode, key[0], key[31], cut count, cuts (u16 each), body.
    let decrypt_input = |mode: u8, cuts: &[u16], body: &[u8]| -> Vec<u8> {
        let mut v = vec![mode, 9, 200, cuts.len() as u8];
        for c in cuts {
            v.extend_from_slice(&c.to_le_bytes());
        }
        v.extend_from_slice(body);
        v
    };
    let plain = b"streaming decryption seed plaintext, 47 bytes.";
    let mut key = [0u8; 32];
    key[0] = 9;
    key[31] = 200;
    write_seeds(
        "stream_decrypt",
        &[
            ("plain_whole", decrypt_input(1, &[], plain)),
            ("plain_cut", decrypt_input(1, &[1, 17, 31, 32], plain)),
            ("flipped", decrypt_input(3, &[5], plain)),
            ("truncated", decrypt_input(5, &[16], plain)),
            ("extended", decrypt_input(7, &[3, 40], plain)),
            ("raw_ciphertext", decrypt_input(0, &[16, 33], &encrypt_all(&key, plain))),
        ],
    );
}
