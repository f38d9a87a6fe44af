//! Property tests (issue 4): codec round trips, the POSIX cksum against a
//! bitwise reference, streaming decryption over arbitrary splits, and the
//! packet-sequence validator against every packet plan the client library
//! makes, and file path normalization (issue 10) against its invariants and a
//! model. Case counts are kept moderate so that the file runs in seconds.

use std::ops::Range;

use backupd::client::{ContentSizeField, PacketPlan};
use backupd::crypto::{cksum, encrypt_all, Cksum, StreamDecryptor, StreamEncryptor};
use backupd::protocol::{
    normalize_path, Code, NameError, NameField, PacketHeader, Request, RequestHeader, Response,
    ResponseHeader, NAME_FIELD_LEN, PACKET_HEADER_LEN, REQUEST_HEADER_LEN, RESPONSE_HEADER_LEN,
};
use backupd::server::fuzzing::{plan_packet, PacketStep};
use proptest::collection::vec;
use proptest::prelude::*;

#[path = "../fuzz/harness/mod.rs"]
mod harness;

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig { cases, ..ProptestConfig::default() }
}

fn name_bytes() -> impl Strategy<Value = Vec<u8>> {
    vec(1u8..=255, 0..NAME_FIELD_LEN)
}

fn raw_field() -> impl Strategy<Value = [u8; NAME_FIELD_LEN]> {
    vec(any::<u8>(), NAME_FIELD_LEN).prop_map(|v| {
        let mut f = [0u8; NAME_FIELD_LEN];
        f.copy_from_slice(&v);
        f
    })
}

// ---------------------------------------------------------------------------
// Codec round trips
// ---------------------------------------------------------------------------

fn response() -> impl Strategy<Value = Response> {
    let id = any::<[u8; 16]>();
    let key = vec(any::<u8>(), 1..600);
    prop_oneof![
        id.prop_map(|id| Response::RegistrationOk { id }),
        Just(Response::RegistrationFailed),
        (id, key.clone()).prop_map(|(id, encrypted_key)| Response::KeyAccepted { id, encrypted_key }),
        (id, any::<u32>(), raw_field(), any::<u32>()).prop_map(|(id, content_size, file_name, cksum)| {
            Response::FileReceived { id, content_size, file_name, cksum }
        }),
        id.prop_map(|id| Response::Ack { id }),
        (id, key).prop_map(|(id, encrypted_key)| Response::ReconnectOk { id, encrypted_key }),
        id.prop_map(|id| Response::ReconnectDenied { id }),
        Just(Response::GeneralError),
    ]
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn request_header_round_trips(id in any::<[u8; 16]>(), version: u8, code: u16, size: u32) {
        let h = RequestHeader { client_id: id, version, code, payload_size: size };
        let bytes = h.encode();
        prop_assert_eq!(bytes.len(), REQUEST_HEADER_LEN);
        prop_assert_eq!(&bytes[..16], &id[..]);
        prop_assert_eq!(bytes[16], version);
        prop_assert_eq!(&bytes[17..19], &code.to_le_bytes()[..]);
        prop_assert_eq!(&bytes[19..], &size.to_le_bytes()[..]);
        prop_assert_eq!(RequestHeader::decode(&bytes), h);
    }

    #[test]
    fn request_header_bytes_round_trip(raw in any::<[u8; REQUEST_HEADER_LEN]>()) {
        prop_assert_eq!(RequestHeader::decode(&raw).encode(), raw);
    }

    #[test]
    fn packet_header_round_trips(
        content_size: u32, orig_file_size: u32, packet_number: u16, total_packets: u16,
        name in name_bytes(), content in vec(any::<u8>(), 0..64),
    ) {
        let ph = PacketHeader {
            content_size, orig_file_size, packet_number, total_packets,
            file_name: NameField::from_name(&name).unwrap(),
        };
        let mut buf = Vec::new();
        ph.encode(&mut buf);
        prop_assert_eq!(buf.len(), PACKET_HEADER_LEN);
        prop_assert_eq!(&buf[..4], &content_size.to_le_bytes()[..]);
        prop_assert_eq!(&buf[4..8], &orig_file_size.to_le_bytes()[..]);
        prop_assert_eq!(&buf[8..10], &packet_number.to_le_bytes()[..]);
        prop_assert_eq!(&buf[10..12], &total_packets.to_le_bytes()[..]);
        buf.extend_from_slice(&content);
        prop_assert_eq!(PacketHeader::decode(&buf), Ok(ph.clone()));
        prop_assert_eq!(Request::parse(Code::FilePacket, &buf), Ok(Request::FilePacket(ph)));
    }

    #[test]
    fn response_round_trips(r in response()) {
        let mut buf = vec![0xEE; 3]; // encoding appends
        r.encode(&mut buf);
        let enc = &buf[3..];
        let mut h = [0u8; RESPONSE_HEADER_LEN];
        h.copy_from_slice(&enc[..RESPONSE_HEADER_LEN]);
        let header = ResponseHeader::decode(&h);
        prop_assert_eq!(header.version, 3);
        prop_assert_eq!(header.code, r.code() as u16);
        prop_assert_eq!(header.payload_size as usize, enc.len() - RESPONSE_HEADER_LEN);
        prop_assert_eq!(Response::decode(&header, &enc[RESPONSE_HEADER_LEN..]), Some(r));
    }

    #[test]
    fn name_field_round_trips(name in name_bytes()) {
        let f = NameField::from_name(&name).unwrap();
        prop_assert_eq!(f.bytes(), &name[..]);
        prop_assert!(f.0[name.len()..].iter().all(|&b| b == 0));
        prop_assert_eq!(f.as_str(), std::str::from_utf8(&name).ok());
        for code in [Code::Register, Code::Reconnect, Code::CrcOk, Code::CrcRetry, Code::CrcAbort] {
            let parsed = Request::parse(code, &f.0).unwrap();
            let got = match parsed {
                Request::Register { name } | Request::Reconnect { name } | Request::CrcOk { name }
                | Request::CrcRetry { name } | Request::CrcAbort { name } => name,
                other => return Err(TestCaseError::fail(format!("{other:?}"))),
            };
            prop_assert_eq!(&got, &f);
        }
    }

    #[test]
    fn name_field_raw_is_cut_at_first_nul(raw in raw_field(), nul in 0..NAME_FIELD_LEN) {
        let mut raw = raw;
        raw[nul] = 0;
        let first = raw.iter().position(|&b| b == 0).unwrap();
        let parsed = Request::parse(Code::CrcOk, &raw).unwrap();
        let Request::CrcOk { name } = parsed else { unreachable!() };
        prop_assert_eq!(name.bytes(), &raw[..first]);
        prop_assert_eq!(&name.0[..], &raw[..]);
    }

    #[test]
    fn name_field_refuses_what_cannot_be_terminated(name in vec(any::<u8>(), 0..400)) {
        let ok = name.len() < NAME_FIELD_LEN && !name.contains(&0);
        prop_assert_eq!(NameField::from_name(&name).is_some(), ok);
    }
}

// ---------------------------------------------------------------------------
// cksum against a bitwise reference
// ---------------------------------------------------------------------------

/// The POSIX cksum of PROTOCOL.md, one bit at a time: CRC-32 with polynomial
/// 0x04C11DB7, MSB first, initial value 0, over the bytes and then the length
/// (least significant byte first, while the remaining length is not 0),
/// inverted at the end.
fn reference_cksum(data: &[u8]) -> u32 {
    fn feed(crc: &mut u32, byte: u8) {
        *crc ^= u32::from(byte) << 24;
        for _ in 0..8 {
            *crc = if *crc & 0x8000_0000 != 0 { (*crc << 1) ^ 0x04C1_1DB7 } else { *crc << 1 };
        }
    }
    let mut crc = 0u32;
    for &b in data {
        feed(&mut crc, b);
    }
    let mut len = data.len() as u64;
    while len != 0 {
        feed(&mut crc, len as u8);
        len >>= 8;
    }
    !crc
}

#[test]
fn reference_cksum_known_values() {
    // `printf '' | cksum` and `printf '123456789' | cksum` (GNU coreutils).
    assert_eq!(reference_cksum(b""), 4_294_967_295);
    assert_eq!(reference_cksum(b"123456789"), 930_766_865);
    // Three length bytes.
    let big: Vec<u8> = (0..70_000u32).map(|i| (i * 7 + i / 256) as u8).collect();
    assert_eq!(cksum(&big), reference_cksum(&big));
}

proptest! {
    #![proptest_config(config(192))]

    #[test]
    fn cksum_matches_reference(data in vec(any::<u8>(), 0..2000), cuts in vec(any::<usize>(), 0..6)) {
        let expected = reference_cksum(&data);
        prop_assert_eq!(cksum(&data), expected);
        let mut c = Cksum::new();
        for r in pieces(&cuts, data.len()) {
            c.update(&data[r]);
        }
        prop_assert_eq!(c.finalize(), expected);
    }
}

// ---------------------------------------------------------------------------
// Streaming encryption and decryption over arbitrary splits
// ---------------------------------------------------------------------------

/// `0..len` cut into consecutive ranges at arbitrary points (`raw`, reduced
/// modulo `len + 1`); empty ranges included.
fn pieces(raw: &[usize], len: usize) -> Vec<Range<usize>> {
    let mut cuts: Vec<usize> = raw.iter().map(|c| c % (len + 1)).collect();
    cuts.sort_unstable();
    cuts.push(len);
    let mut prev = 0;
    cuts.into_iter()
        .map(|cut| {
            let r = prev..cut;
            prev = cut;
            r
        })
        .collect()
}

fn decrypt_at(key: &[u8; 32], ct: &[u8], cuts: &[usize]) -> Option<Vec<u8>> {
    let mut buf = ct.to_vec();
    let mut dec = StreamDecryptor::new(key);
    let mut out = Vec::new();
    for r in pieces(cuts, ct.len()) {
        dec.update(&mut buf[r], |p| out.extend_from_slice(p));
    }
    dec.finish(|p| out.extend_from_slice(p)).ok()?;
    Some(out)
}

proptest! {
    #![proptest_config(config(192))]

    #[test]
    fn streaming_decrypt_over_any_split_equals_whole(
        key in any::<[u8; 32]>(),
        plain in vec(any::<u8>(), 0..3000),
        enc_cuts in vec(any::<usize>(), 0..8),
        dec_cuts in vec(any::<usize>(), 0..8),
    ) {
        let whole = encrypt_all(&key, &plain);
        prop_assert_eq!(whole.len(), (plain.len() / 16 + 1) * 16);
        // The encryptor fed in arbitrary pieces gives the same ciphertext.
        let mut enc = StreamEncryptor::new(&key);
        let mut ct = Vec::new();
        for r in pieces(&enc_cuts, plain.len()) {
            enc.update(&plain[r], &mut ct);
        }
        enc.finish(&mut ct);
        prop_assert_eq!(&ct, &whole);
        // Decryption in one piece and at arbitrary cuts gives the plaintext.
        prop_assert_eq!(decrypt_at(&key, &whole, &[]), Some(plain.clone()));
        prop_assert_eq!(decrypt_at(&key, &whole, &dec_cuts), Some(plain.clone()));
    }

    #[test]
    fn streaming_decrypt_over_packet_splits(
        key in any::<[u8; 32]>(),
        plain in vec(any::<u8>(), 0..3000),
        packet_size in 1usize..700,
    ) {
        // The cuts a client makes when it sends `packet_size`-byte packets.
        let ct = encrypt_all(&key, &plain);
        let cuts: Vec<usize> = (1..).map(|i| i * packet_size).take_while(|&c| c < ct.len()).collect();
        prop_assert_eq!(decrypt_at(&key, &ct, &cuts), decrypt_at(&key, &ct, &[]));
        prop_assert_eq!(decrypt_at(&key, &ct, &cuts), Some(plain.clone()));
    }
}

// ---------------------------------------------------------------------------
// plan_packet against the client library's packet plans
// ---------------------------------------------------------------------------

const CONVENTIONS: [ContentSizeField; 3] =
    [ContentSizeField::ThisPacket, ContentSizeField::WholeFile, ContentSizeField::PerPacketEncrypted];

/// Feed every packet of `plan` to `plan_packet` as the server does; return the
/// steps (or the first refusal, with its packet number).
fn run_plan(plan: &PacketPlan, max_file_size: u64) -> Result<Vec<PacketStep>, String> {
    let mut r = harness::new_receiving(1, "f.bin", plan.total_packets);
    let mut steps = Vec::new();
    let count = plan.packets().count();
    for (i, spec) in plan.packets().enumerate() {
        assert_eq!(spec.number, r.next());
        let ph = PacketHeader {
            content_size: spec.content_size_field,
            orig_file_size: spec.orig_file_size_field,
            packet_number: spec.number,
            total_packets: plan.total_packets,
            file_name: r.name_field().clone(),
        };
        let step = plan_packet(&mut r, &ph, spec.content_len, max_file_size)
            .map_err(|e| format!("packet {}: {e}", spec.number))?;
        assert_eq!(step.last, i + 1 == count, "packet {} of {count} ends the upload", spec.number);
        steps.push(step);
    }
    assert!(r.open_stream().is_none());
    assert_eq!(r.plain_total(), plan.orig_size);
    Ok(steps)
}

/// The content bytes of all packets of `plan` for `data`.
fn wire(key: &[u8; 32], plan: &PacketPlan, data: &[u8]) -> Vec<u8> {
    if plan.convention != ContentSizeField::PerPacketEncrypted {
        return encrypt_all(key, data);
    }
    let p = plan.packet_size as usize;
    let mut chunks: Vec<&[u8]> = data.chunks(p).collect();
    if data.len().is_multiple_of(p) {
        chunks.push(&[]);
    }
    chunks.iter().flat_map(|c| encrypt_all(key, c)).collect()
}

/// What the worker does with the steps: one decryptor per CBC stream, each
/// stream's plaintext exactly as long as announced. Returns the file.
fn apply_steps(key: &[u8; 32], plan: &PacketPlan, steps: &[PacketStep], mut wire: Vec<u8>) -> Vec<u8> {
    let mut dec: Option<StreamDecryptor> = None;
    let mut out = Vec::new();
    let mut start = 0;
    for (spec, step) in plan.packets().zip(steps) {
        if step.new_segment {
            assert!(dec.is_none(), "packet {}: a stream began inside another", spec.number);
            dec = Some(StreamDecryptor::new(key));
            start = out.len();
        }
        let content = &mut wire[spec.offset as usize..(spec.offset + spec.content_len) as usize];
        match dec.as_mut() {
            Some(d) => d.update(content, |p| out.extend_from_slice(p)),
            None => assert!(content.is_empty(), "packet {}: content outside a stream", spec.number),
        }
        if let Some(expected) = step.end_segment {
            let d = dec.take().expect("a stream to end");
            d.finish(|p| out.extend_from_slice(p)).expect("valid padding");
            assert_eq!((out.len() - start) as u64, expected, "packet {}", spec.number);
        }
    }
    assert!(dec.is_none(), "the file ended inside a stream");
    out
}

proptest! {
    #![proptest_config(config(160))]

    /// Small files, real encryption: every convention is accepted and the
    /// worker's view of the steps rebuilds the file exactly.
    #[test]
    fn plan_packet_accepts_client_plans_and_rebuilds_the_file(
        data in vec(any::<u8>(), 0..3000),
        packet_size in 1usize..800,
        conv in 0usize..3,
        key in any::<[u8; 32]>(),
    ) {
        let plan = PacketPlan::new(data.len() as u64, packet_size, CONVENTIONS[conv]).unwrap();
        let steps = run_plan(&plan, u64::from(u32::MAX)).map_err(TestCaseError::fail)?;
        let bytes = wire(&key, &plan, &data);
        prop_assert_eq!(bytes.len() as u64, plan.wire_bytes);
        prop_assert_eq!(apply_steps(&key, &plan, &steps, bytes), data);
    }

    /// Arbitrary sizes up to the protocol's 4 GiB (no data): every plan is accepted,
    /// its streams cover the file, and a limit below the file's size refuses it.
    #[test]
    fn plan_packet_accepts_plans_of_any_size(
        orig in 0u64..=u64::from(u32::MAX) - 16,
        packets in 1u64..1500,
        conv in 0usize..3,
    ) {
        let convention = CONVENTIONS[conv];
        let ct = (orig / 16 + 1) * 16;
        // A packet size that needs about `packets` packets.
        let packet_size = match convention {
            ContentSizeField::PerPacketEncrypted => (orig / packets).max(1),
            _ => ct.div_ceil(packets),
        } as usize;
        let Ok(plan) = PacketPlan::new(orig, packet_size, convention) else {
            // Only convention 3 can exceed 4 GiB of ciphertext here (16 bytes of padding per chunk).
            prop_assert_eq!(convention, ContentSizeField::PerPacketEncrypted);
            return Ok(());
        };
        let steps = run_plan(&plan, u64::from(u32::MAX)).map_err(TestCaseError::fail)?;
        let announced: u64 = steps.iter().filter_map(|s| s.end_segment).sum();
        prop_assert_eq!(announced, orig);
        let streams = steps.iter().filter(|s| s.new_segment).count();
        let ends = steps.iter().filter(|s| s.end_segment.is_some()).count();
        prop_assert_eq!(streams, ends);
        if convention != ContentSizeField::PerPacketEncrypted {
            prop_assert_eq!(streams, 1);
        }
        if orig > 0 {
            prop_assert!(run_plan(&plan, orig - 1).is_err());
        }
        prop_assert!(run_plan(&plan, orig).is_ok());
    }
}

// ---------------------------------------------------------------------------
// File path normalization (issue 10)
// ---------------------------------------------------------------------------

// `harness::path_normalize` asserts the invariants: invalid UTF-8 and any `.`
// or `..` component are refused; an accepted path has no `.`, `..` or empty
// component, no leading `/`, no `\`, no control character or NUL, stays under
// `files/<id>/` when joined to it, and normalizes to itself.

/// What clients put in a path: roots, drives, dots, odd but legal names.
const PATH_PREFIXES: [&str; 8] = ["", "/", "//", "\\", "\\\\", "C:", "C:\\", "d:/"];
const PATH_PARTS: [&str; 11] = ["", ".", "..", "a", "b c", "C:", "z:", ".x", "\u{e9}t\u{e9}", "x:y", "a.."];
const PATH_SEPARATORS: [&str; 4] = ["/", "\\", "//", "\\/"];

/// A drive prefix at the start of `c` (`C:`).
fn starts_with_drive(c: &str) -> bool {
    let b = c.as_bytes();
    b.len() >= 2 && b[0].is_ascii_alphabetic() && b[1] == b':'
}

/// The rules over whole components: `(path, stripped)` or the error.
fn path_model(built: &str) -> Result<(String, bool), NameError> {
    let mut comps: Vec<&str> = built.split(['/', '\\']).filter(|c| !c.is_empty()).collect();
    // Leading drives go: whole components, or the start of the first one.
    while comps.first().is_some_and(|c| starts_with_drive(c)) {
        comps[0] = &comps[0][2..];
        if comps[0].is_empty() {
            comps.remove(0);
        }
    }
    if comps.iter().any(|c| *c == "." || *c == "..") {
        return Err(NameError::Dots);
    }
    if comps.is_empty() {
        return Err(NameError::Empty);
    }
    let stripped = built.starts_with(['/', '\\']) || starts_with_drive(built);
    Ok((comps.join("/"), stripped))
}

fn built_path() -> impl Strategy<Value = (usize, Vec<(usize, usize)>)> {
    (0..PATH_PREFIXES.len(), vec((0..PATH_PARTS.len(), 0..PATH_SEPARATORS.len()), 0..8))
}

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn path_normalization_holds_for_any_bytes(raw in vec(any::<u8>(), 0..300)) {
        harness::path_normalize(&raw);
    }

    #[test]
    fn path_normalization_holds_for_path_like_strings(s in "[ab./\\\\:Cé\u{202E}\n]{0,40}") {
        harness::path_normalize(s.as_bytes());
    }

    /// Paths built from roots, drives, dots and separators, against the model.
    #[test]
    fn path_normalization_matches_the_model((prefix, parts) in built_path()) {
        let mut built = PATH_PREFIXES[prefix].to_string();
        for (i, (part, sep)) in parts.iter().enumerate() {
            if i > 0 {
                built.push_str(PATH_SEPARATORS[*sep]);
            }
            built.push_str(PATH_PARTS[*part]);
        }
        harness::path_normalize(built.as_bytes());
        let got = normalize_path(built.as_bytes()).map(|p| (p.as_str().to_string(), p.stripped()));
        prop_assert_eq!(got, path_model(&built), "{:?}", built);
    }
}
