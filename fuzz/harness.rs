//! The bodies of the fuzz targets, shared by the cargo-fuzz targets
//! (`fuzz/fuzz_targets/*.rs`, which include this file with `#[path]`) and by
//! `tests/fuzz_regressions.rs`, which runs them over the committed corpus and
//! over random inputs from a fixed seed in every `cargo test`.
//!
//! Each target takes arbitrary bytes and panics on a broken invariant; a
//! target that returns has found nothing. Nothing here touches a socket, a
//! file or the clock.

#![allow(dead_code)]

use std::path::{Component, Path};
use std::time::Instant;

use backupd::crypto::{ciphertext_len, encrypt_all, parse_public_key, StreamDecryptor, AES_KEY_LEN};
use backupd::protocol::{
    Code, HeaderError, NameField, PacketHeader, PayloadError, Request, RequestHeader, Response,
    ResponseHeader, NAME_FIELD_LEN, PACKET_HEADER_LEN, REQUEST_HEADER_LEN, RESPONSE_HEADER_LEN,
};
use backupd::server::connection::Receiving;
use backupd::server::plan_packet;
use backupd::worker::storage::{validate_file_name, MAX_FILE_NAME};

/// The server's default `--max-packet` (16 MiB).
pub const MAX_PACKET: u32 = 16 << 20;

/// A fuzz target: arbitrary bytes in, a panic on a broken invariant.
pub type Target = fn(&[u8]);

/// Every target, by the name of its cargo-fuzz binary and corpus folder.
pub const TARGETS: &[(&str, Target)] = &[
    ("frame_decoder", frame_decoder),
    ("payload_parsers", payload_parsers),
    ("packet_sequence", packet_sequence),
    ("stream_decrypt", stream_decrypt),
];

/// Reads fixed-size values from the fuzz input; zeros once it is used up.
pub struct Input<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Input { data, pos: 0 }
    }

    pub fn is_empty(&self) -> bool {
        self.pos >= self.data.len()
    }

    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let start = self.pos.min(self.data.len());
        let end = start.saturating_add(n).min(self.data.len());
        self.pos = end;
        &self.data[start..end]
    }

    fn fixed<const N: usize>(&mut self) -> [u8; N] {
        let mut b = [0u8; N];
        let got = self.bytes(N);
        b[..got.len()].copy_from_slice(got);
        b
    }

    pub fn u8(&mut self) -> u8 {
        self.fixed::<1>()[0]
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.fixed())
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.fixed())
    }

    pub fn rest(&mut self) -> &'a [u8] {
        self.bytes(usize::MAX)
    }
}

// ---------------------------------------------------------------------------
// 1. Frame decoder
// ---------------------------------------------------------------------------

/// The payload bounds of PROTOCOL.md, written out independently of
/// `Code::payload_bounds`: `None` for an unknown code.
fn expected_bounds(code: u16, max_packet: u32) -> Option<(u32, u32)> {
    match code {
        1025 | 1027 | 1029 | 1030 | 1031 => Some((255, 255)),
        1026 => Some((255 + 160, 255 + 2048)),
        1028 => Some((267, max_packet)),
        _ => None,
    }
}

/// Check a header as the server does and compare with the protocol's rules.
fn check_header(h: &RequestHeader, max_packet: u32) -> Result<Code, HeaderError> {
    let checked = h.check(max_packet);
    let legal = h.version == 3
        && expected_bounds(h.code, max_packet).is_some_and(|(lo, hi)| (lo..=hi).contains(&h.payload_size));
    assert_eq!(checked.is_ok(), legal, "check({h:?}, {max_packet}) = {checked:?}");
    match &checked {
        Ok(code) => assert_eq!(code.as_u16(), h.code),
        Err(HeaderError::BadVersion(v)) => assert_eq!(*v, h.version),
        Err(HeaderError::UnknownCode(c)) => {
            assert_eq!(*c, h.code);
            assert_eq!(h.version, 3, "the version is checked first");
        }
        Err(HeaderError::PayloadTooSmall { code, size, min }) => {
            assert_eq!((*code, *size), (h.code, h.payload_size));
            assert!(size < min);
        }
        Err(HeaderError::PayloadTooLarge { code, size, max }) => {
            assert_eq!((*code, *size), (h.code, h.payload_size));
            assert!(size > max);
        }
    }
    checked
}

/// Parse a complete payload of a checked frame and check what came out.
/// Returns false when the server would close the connection (malformed field).
fn parse_payload(code: Code, payload: &[u8]) -> bool {
    let name_at = if code == Code::FilePacket { 12 } else { 0 };
    let field = &payload[name_at..name_at + NAME_FIELD_LEN];
    let terminated = field.contains(&0);
    let parsed = Request::parse(code, payload);
    let req = match parsed {
        Ok(r) => r,
        Err(e) => {
            // Sizes were checked from the header: only the name field can be bad.
            assert_eq!(e, PayloadError::UnterminatedName, "{code:?} payload of {}", payload.len());
            assert!(!terminated);
            return false;
        }
    };
    assert!(terminated, "{code:?}: a name field without NUL was accepted");
    let name = match &req {
        Request::Register { name }
        | Request::Reconnect { name }
        | Request::CrcOk { name }
        | Request::CrcRetry { name }
        | Request::CrcAbort { name } => {
            assert_eq!(payload.len(), NAME_FIELD_LEN);
            name.clone()
        }
        Request::PublicKey { name, key } => {
            assert_eq!(&key[..], &payload[NAME_FIELD_LEN..]);
            check_public_key(key);
            name.clone()
        }
        Request::FilePacket(ph) => {
            let mut again = Vec::new();
            ph.encode(&mut again);
            assert_eq!(&again[..], &payload[..PACKET_HEADER_LEN]);
            assert_eq!(ph.packet_number, u16::from_le_bytes([payload[8], payload[9]]));
            ph.file_name.clone()
        }
    };
    let expected_code = match &req {
        Request::Register { .. } => Code::Register,
        Request::PublicKey { .. } => Code::PublicKey,
        Request::Reconnect { .. } => Code::Reconnect,
        Request::FilePacket(_) => Code::FilePacket,
        Request::CrcOk { .. } => Code::CrcOk,
        Request::CrcRetry { .. } => Code::CrcRetry,
        Request::CrcAbort { .. } => Code::CrcAbort,
    };
    assert_eq!(expected_code, code);
    assert_eq!(&name.0[..], field);
    check_name_field(&name);
    true
}

/// Target 1: a byte stream read frame by frame exactly as a connection reads
/// it: 23 header bytes, the header check, exactly `payload_size` bytes, the
/// payload parse; a framing error ends the stream (the server closes).
pub fn frame_decoder(data: &[u8]) {
    let mut rest = data;
    while rest.len() >= REQUEST_HEADER_LEN {
        let mut raw = [0u8; REQUEST_HEADER_LEN];
        raw.copy_from_slice(&rest[..REQUEST_HEADER_LEN]);
        rest = &rest[REQUEST_HEADER_LEN..];
        let h = RequestHeader::decode(&raw);
        assert_eq!(h.encode(), raw, "header round trip");
        // A small configured bound must judge the same header consistently.
        let _ = check_header(&h, PACKET_HEADER_LEN as u32 + 64);
        let Ok(code) = check_header(&h, MAX_PACKET) else { return };
        let size = h.payload_size as usize;
        if rest.len() < size {
            // The server waits for the rest of the frame. For coverage, also
            // parse the rest as the payload of the same header with the size
            // corrected (when that size is legal for the code).
            let fixed = RequestHeader { payload_size: rest.len() as u32, ..h };
            if let Ok(c) = check_header(&fixed, MAX_PACKET) {
                parse_payload(c, rest);
            }
            return;
        }
        let (payload, tail) = rest.split_at(size);
        rest = tail;
        if !parse_payload(code, payload) {
            return;
        }
    }
}

// ---------------------------------------------------------------------------
// 2. Payload parsers
// ---------------------------------------------------------------------------

const ALL_CODES: [Code; 7] = [
    Code::Register,
    Code::PublicKey,
    Code::Reconnect,
    Code::FilePacket,
    Code::CrcOk,
    Code::CrcRetry,
    Code::CrcAbort,
];

/// The name rules every stored file name must satisfy.
fn check_file_name(raw: &[u8]) {
    match validate_file_name(raw) {
        Ok(s) => {
            assert_eq!(s.as_bytes(), raw);
            assert!(!s.is_empty() && s.len() <= MAX_FILE_NAME);
            assert!(!s.contains(['/', '\\', '\0']));
            assert!(!s.chars().any(char::is_control));
            // Joined to a directory, the name is exactly one ordinary component.
            let comps: Vec<Component<'_>> = Path::new(s).components().collect();
            assert_eq!(comps, vec![Component::Normal(s.as_ref())], "{s:?}");
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
}

fn check_name_field(name: &NameField) {
    let b = name.bytes();
    assert!(b.len() < NAME_FIELD_LEN && !b.contains(&0));
    assert_eq!(name.0[b.len()], 0);
    if let Some(s) = name.as_str() {
        assert_eq!(s.as_bytes(), b);
    }
    let shown = name.display();
    assert!(shown.len() <= 64 * 10 + 3, "display is bounded");
    assert!(!shown.chars().any(char::is_control), "display escapes control characters: {shown:?}");
    check_file_name(b);
}

/// A public key field: never panics; an accepted key is well formed.
fn check_public_key(field: &[u8]) {
    if let Ok((key, der)) = parse_public_key(field) {
        assert!(!der.is_empty() && der.len() <= field.len());
        assert_eq!(&field[..der.len()], &der[..]);
        assert!(field[der.len()..].iter().all(|&b| b == 0), "only zero padding may follow the key");
        let bits = rsa::traits::PublicKeyParts::n(&key).bits();
        assert!((1024..=4096).contains(&bits), "{bits}-bit key accepted");
        let (again, der2) = parse_public_key(&der).expect("the exact DER parses again");
        assert_eq!((again, der2), (key, der));
    }
}

/// Target 2: every payload parser on payloads of any size (no header check
/// first), plus the packet header, public key, file name and response decoders.
pub fn payload_parsers(data: &[u8]) {
    let mut input = Input::new(data);
    let which = input.u8();
    let payload = input.rest();
    match which % 12 {
        n @ 0..=6 => {
            let code = ALL_CODES[n as usize];
            let min = code.payload_bounds(MAX_PACKET).0 as usize;
            let min_fields = if code == Code::FilePacket { PACKET_HEADER_LEN } else { NAME_FIELD_LEN };
            assert!(min >= min_fields, "{code:?}: bound {min} below its fixed fields");
            match Request::parse(code, payload) {
                Err(PayloadError::WrongSize) => assert!(payload.len() < min_fields),
                Err(PayloadError::UnterminatedName) => assert!(payload.len() >= min_fields),
                Ok(_) => {
                    assert!(payload.len() >= min_fields);
                    // Within the header's bounds the full frame checks apply.
                    let (lo, hi) = expected_bounds(code.as_u16(), MAX_PACKET).unwrap_or((0, 0));
                    if (lo as usize..=hi as usize).contains(&payload.len()) {
                        assert!(parse_payload(code, payload));
                    }
                }
            }
        }
        7 => match PacketHeader::decode(payload) {
            Ok(ph) => {
                let mut again = Vec::new();
                ph.encode(&mut again);
                assert_eq!(&again[..], &payload[..PACKET_HEADER_LEN]);
                check_name_field(&ph.file_name);
            }
            Err(e) => {
                assert!(payload.len() < PACKET_HEADER_LEN || (e == PayloadError::UnterminatedName), "{e:?}")
            }
        },
        8 => check_public_key(payload),
        9 => check_file_name(payload),
        10 => {
            if let Some(f) = NameField::from_name(payload) {
                assert_eq!(f.bytes(), payload);
                check_name_field(&f);
            } else {
                assert!(payload.len() >= NAME_FIELD_LEN || payload.contains(&0));
            }
        }
        _ => {
            let mut raw = [0u8; RESPONSE_HEADER_LEN];
            let head = &payload[..payload.len().min(RESPONSE_HEADER_LEN)];
            raw[..head.len()].copy_from_slice(head);
            let body = &payload[head.len()..];
            let h = ResponseHeader::decode(&raw);
            if let Some(r) = Response::decode(&h, body) {
                assert_eq!(r.code() as u16, h.code);
                let mut enc = Vec::new();
                r.encode(&mut enc);
                let mut eh = [0u8; RESPONSE_HEADER_LEN];
                eh.copy_from_slice(&enc[..RESPONSE_HEADER_LEN]);
                let again = Response::decode(&ResponseHeader::decode(&eh), &enc[RESPONSE_HEADER_LEN..]);
                assert_eq!(again.as_ref(), Some(&r));
            }
        }
    }
}

// ---------------------------------------------------------------------------
// 3. Packet-sequence validator
// ---------------------------------------------------------------------------

/// The CBC streams of the upload under way, as the fuzzer's model sees them.
struct Model {
    recv: Receiving,
    /// Sum of `ciphertext_len(orig)` over the streams begun.
    allowed: u64,
    /// Ciphertext bytes accepted.
    accepted: u64,
    /// Plaintext sizes of the streams begun.
    plain: u64,
    /// The open stream: its orig, whole ciphertext length and bytes received.
    open: Option<(u32, u64, u64)>,
    streams: u32,
    packets: u32,
    /// Some stream took more than one packet.
    spanned: bool,
}

fn packet_name(sel: u8) -> NameField {
    let name: &[u8] = match sel % 8 {
        0..=4 => b"a.bin",
        5 => b"b.bin",
        6 => b"../x",
        _ => b"",
    };
    NameField::from_name(name).unwrap_or(NameField([0; NAME_FIELD_LEN]))
}

/// The upload state the server creates at packet 1 of a file named `name`.
pub fn new_receiving(upload: u64, name: &str, total: u16) -> Receiving {
    Receiving {
        upload,
        name: name.to_string(),
        name_field: NameField::from_name(name.as_bytes()).expect("a valid file name fits its field"),
        total,
        next: 1,
        segment: None,
        last_stream_len: 0,
        plain_total: 0,
        multi_packet_stream: false,
        touched: Instant::now(),
    }
}

/// Target 3: `plan_packet` driven by arbitrary packet sequences, with the
/// numbering and name checks of the server's `on_packet` in front of it.
/// Invariants: the ciphertext accepted never exceeds what the streams begun
/// allow; plain_total is the sum of the streams' sizes and never exceeds the
/// limit; a stream ends exactly when its ciphertext is complete, with the
/// size its packets announced; a file is complete at its last packet; a
/// stream spanning packets excludes per-packet streams.
pub fn packet_sequence(data: &[u8]) {
    packet_sequence_stats(data);
}

/// What one run of [`packet_sequence`] saw (used to pick meaningful seeds).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SequenceStats {
    /// Files whose last packet was accepted.
    pub files: u32,
    /// ... of which one CBC stream spanned several packets (conventions 1 and 2).
    pub spanning: u32,
    /// ... of which several single-packet streams (convention 3).
    pub per_packet: u32,
    /// ... of which ended with an empty packet (convention 2).
    pub empty_tail: u32,
    /// Packets `plan_packet` refused.
    pub refused: u32,
}

/// [`packet_sequence`], reporting what it saw.
pub fn packet_sequence_stats(data: &[u8]) -> SequenceStats {
    let mut stats = SequenceStats::default();
    let mut input = Input::new(data);
    let max_file_size = match input.u8() % 4 {
        0 => u64::from(u32::MAX),
        1 => u64::from(input.u16()),
        2 => 4000,
        _ => u64::from(input.u32()),
    };
    let mut model: Option<Model> = None;
    let mut uploads = 0u32;
    while !input.is_empty() {
        let mode = input.u8();
        let raw_size = input.u32();
        let small = input.u16();
        let sel = input.u8();
        let open = model.as_ref().and_then(|m| m.open);
        let expected_next = model.as_ref().map(|m| m.recv.next).unwrap_or(1);
        let total_now = model.as_ref().map(|m| m.recv.total);

        // Packet numbering: mostly what the server expects, sometimes not.
        let packet_number = match mode & 3 {
            0 | 1 => expected_next,
            2 => 1,
            _ => small % 8,
        };
        let total_packets = match (total_now, (mode >> 2) & 3) {
            (Some(t), 0..=2) if packet_number != 1 || mode & 3 == 0 => t,
            (_, 0 | 1) => (small % 6) + 1,
            (_, 2) => packet_number.max(1),
            _ => small,
        };
        // Sizes: the open stream's orig or a new one.
        let orig = match (open, (mode >> 4) & 3) {
            (Some((o, _, _)), 0..=2) => o,
            (_, 0 | 1) => u32::from(small % 100),
            (_, 2) => u32::from(small),
            _ => raw_size,
        };
        let whole = ciphertext_len(u64::from(orig));
        let remaining = open.map(|(_, w, got)| w - got).unwrap_or(whole);
        let content_len = match sel % 8 {
            0 | 1 => remaining,
            2 => whole,
            3 => 0,
            4 => remaining.min(u64::from(small % 48)),
            5 => remaining + 1,
            6 => u64::from(small),
            _ => remaining.saturating_sub(1),
        };
        let last_len = model.as_ref().map(|m| m.recv.last_stream_len).unwrap_or(0);
        let content_size = match (sel >> 3) % 6 {
            0 | 1 => content_len as u32,
            2 => open.map(|(_, w, _)| w).unwrap_or(whole) as u32,
            3 => last_len as u32,
            4 => 0,
            _ => raw_size,
        };
        let ph = PacketHeader {
            content_size,
            orig_file_size: orig,
            packet_number,
            total_packets,
            file_name: packet_name(sel >> 5),
        };

        // The checks of `on_packet` before `plan_packet`.
        if ph.total_packets == 0 || ph.packet_number == 0 || ph.packet_number > ph.total_packets {
            model = None;
            continue;
        }
        if ph.packet_number == 1 {
            model = None;
            let Ok(name) = validate_file_name(ph.file_name.bytes()) else { continue };
            if u64::from(ph.orig_file_size) > max_file_size {
                continue;
            }
            uploads += 1;
            model = Some(Model {
                recv: new_receiving(u64::from(uploads), name, ph.total_packets),
                allowed: 0,
                accepted: 0,
                plain: 0,
                open: None,
                streams: 0,
                packets: 0,
                spanned: false,
            });
        }
        let Some(m) = model.as_mut() else { continue };
        if m.recv.name_field.bytes() != ph.file_name.bytes()
            || m.recv.total != ph.total_packets
            || m.recv.next != ph.packet_number
        {
            model = None;
            continue;
        }
        let before = m.recv.clone();
        let step = match plan_packet(&mut m.recv, &ph, content_len, max_file_size) {
            Ok(s) => s,
            Err(why) => {
                assert!(!why.is_empty());
                stats.refused += 1;
                model = None;
                continue;
            }
        };
        let last = ph.packet_number == ph.total_packets;
        m.recv.next = m.recv.next.saturating_add(1);
        m.packets += 1;
        m.accepted += content_len;

        // content_size is one of the two legal conventions (or 0 on an empty tail).
        let stream_whole = if step.new_segment { whole } else { m.open.map(|(_, w, _)| w).unwrap_or(0) };
        if content_len > 0 {
            assert!(
                u64::from(content_size) == content_len || u64::from(content_size) == stream_whole,
                "content_size {content_size} for {content_len} bytes of a {stream_whole}-byte stream"
            );
        }
        if step.new_segment {
            assert!(m.open.is_none(), "a stream began inside another");
            assert!(content_len > 0, "an empty packet began a stream");
            assert!(
                ph.packet_number == 1 || (content_len == whole && !m.spanned),
                "stream begun at packet {} with {content_len} of {whole} bytes",
                ph.packet_number
            );
            m.streams += 1;
            m.allowed += whole;
            m.plain += u64::from(orig);
            m.open = Some((orig, whole, 0));
        } else if content_len == 0 {
            // An empty packet changes nothing. After the last stream it must be
            // the file's last packet (the trailing packet of convention 2);
            // inside a stream it is accepted as a no-op (it cannot be the last).
            assert_eq!(step.end_segment, None);
            assert!(ph.packet_number > 1);
            match m.open {
                None => {
                    assert!(last, "an empty packet that is not the last was accepted");
                    assert!(content_size == 0 || u64::from(content_size) == before.last_stream_len);
                }
                Some((_, w, _)) => {
                    assert!(!last, "a stream left incomplete at the last packet");
                    assert!(content_size == 0 || u64::from(content_size) == w);
                }
            }
        } else {
            assert!(m.open.is_some(), "content accepted outside any stream");
        }
        if let Some((o, w, got)) = m.open.as_mut() {
            assert_eq!(*o, orig, "orig_file_size changed inside a stream");
            if !step.new_segment {
                m.spanned = true;
            }
            *got += content_len;
            assert!(*got <= *w, "a stream took {got} of {w} bytes");
            // The stream ends exactly when its ciphertext is complete.
            if *got == *w {
                assert_eq!(step.end_segment, Some(u64::from(*o)));
                m.recv.last_stream_len = *w;
                m.open = None;
            } else {
                assert_eq!(step.end_segment, None, "stream ended at {got} of {w} bytes");
            }
        }
        assert_eq!(m.recv.segment.map(|s| (s.orig, s.whole, s.whole - s.remaining)), m.open);
        assert!(m.accepted <= m.allowed, "{} ciphertext bytes accepted, {} allowed", m.accepted, m.allowed);
        assert_eq!(m.recv.plain_total, m.plain);
        assert!(m.plain <= max_file_size);
        if m.spanned {
            assert_eq!(m.streams, 1, "a spanning stream mixed with per-packet streams");
        }
        if last {
            // A file is complete at its last packet: every stream whole.
            assert!(m.open.is_none());
            assert_eq!(m.accepted, m.allowed);
            assert!(m.streams >= 1);
            stats.files += 1;
            stats.spanning += u32::from(m.spanned);
            stats.per_packet += u32::from(m.streams > 1);
            stats.empty_tail += u32::from(content_len == 0);
            model = None;
        }
    }
    stats
}

// ---------------------------------------------------------------------------
// 4. Streaming decryption
// ---------------------------------------------------------------------------

fn decrypt_pieces(
    key: &[u8; AES_KEY_LEN],
    ct: &[u8],
    cuts: &[usize],
) -> Result<Vec<u8>, backupd::crypto::PaddingError> {
    let mut buf = ct.to_vec();
    let mut dec = StreamDecryptor::new(key);
    let mut out = Vec::new();
    let mut prev = 0;
    for &cut in cuts.iter().chain(std::iter::once(&ct.len())) {
        let cut = cut.clamp(prev, ct.len());
        dec.update(&mut buf[prev..cut], |p| out.extend_from_slice(p));
        prev = cut;
    }
    assert_eq!(dec.ciphertext_seen(), ct.len() as u64);
    assert!(out.len() <= ct.len());
    dec.finish(|p| out.extend_from_slice(p))?;
    Ok(out)
}

/// Target 4: `StreamDecryptor` over arbitrary ciphertext (or the encryption of
/// arbitrary plaintext, possibly damaged) cut at arbitrary points never panics;
/// every split gives the same result as one piece; a success is the exact
/// inverse of `encrypt_all` and has a matching length.
pub fn stream_decrypt(data: &[u8]) {
    let mut input = Input::new(data);
    let mode = input.u8();
    let mut key = [0u8; AES_KEY_LEN];
    key[0] = input.u8();
    key[31] = input.u8();
    let ncuts = usize::from(input.u8() % 9);
    let mut cuts: Vec<usize> = (0..ncuts).map(|_| usize::from(input.u16())).collect();
    let body = input.rest();

    let (ct, plain) = if mode & 1 == 0 {
        (body.to_vec(), None)
    } else {
        let mut ct = encrypt_all(&key, body);
        assert_eq!(ct.len() as u64, ciphertext_len(body.len() as u64));
        let damage = mode >> 1;
        match damage % 4 {
            0 => return check_decrypt(&key, &ct, &mut cuts, Some(body)),
            1 => {
                let at = usize::from(damage) * 7 % ct.len();
                ct[at] ^= 1 << (damage % 8);
            }
            2 => ct.truncate(ct.len() - 1 - usize::from(damage) % 16),
            _ => ct.extend_from_slice(&[damage; 16][..1 + usize::from(damage) % 16]),
        }
        (ct, None)
    };
    check_decrypt(&key, &ct, &mut cuts, plain);
}

fn check_decrypt(key: &[u8; AES_KEY_LEN], ct: &[u8], cuts: &mut [usize], plain: Option<&[u8]>) {
    if !ct.is_empty() {
        for c in cuts.iter_mut() {
            *c %= ct.len() + 1;
        }
    }
    cuts.sort_unstable();
    let whole = decrypt_pieces(key, ct, &[]);
    let split = decrypt_pieces(key, ct, cuts);
    assert_eq!(split, whole, "split at {cuts:?} differs from one piece");
    match whole {
        Ok(out) => {
            assert!(!ct.is_empty() && ct.len().is_multiple_of(16));
            assert!(out.len() < ct.len() && out.len() + 16 >= ct.len(), "{} from {}", out.len(), ct.len());
            assert_eq!(ciphertext_len(out.len() as u64), ct.len() as u64);
            assert_eq!(encrypt_all(key, &out), ct, "decryption is not the inverse of encryption");
            if let Some(p) = plain {
                assert_eq!(&out[..], p);
            }
        }
        Err(_) => assert!(plain.is_none(), "the encryption of {} bytes did not decrypt", ct.len()),
    }
}
