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
    normalize_path, validate_file_name, Code, HeaderError, NameError, NameField, NormalizedPath,
    PacketHeader, PayloadError, Request, RequestHeader, Response, ResponseHeader, MAX_FILE_NAME,
    MAX_PATH_LEN, NAME_FIELD_LEN, PACKET_HEADER_LEN, REQUEST_HEADER_LEN, RESPONSE_HEADER_LEN,
};
use backupd::server::connection::Receiving;
use backupd::server::{plan_packet, wraps_to_one};

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
    ("session", session),
    ("path_normalize", path_normalize),
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
    packets: u64,
    /// Some stream took more than one packet.
    spanned: bool,
}

/// Packets between two packets that carry the same u16 number.
const WRAP: u64 = 1 << 16;

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
    let field = NameField::from_name(name.as_bytes()).expect("a valid file name fits its field");
    Receiving::new(upload, name.to_string(), field, total, Instant::now())
}

/// Target 3: `plan_packet` driven by arbitrary packet sequences, with the
/// numbering and name checks of the server's `on_packet` in front of it
/// (numbers wrap past 65,535). An operation may also fast-forward an open
/// stream by 65,536 or more one-byte packets, so that counters wrap.
/// Invariants: the ciphertext accepted never exceeds what the streams begun
/// allow; plain_total is the sum of the streams' sizes and never exceeds the
/// limit; a stream ends exactly when its ciphertext is complete, with the
/// size its packets announced; the upload ends exactly at the packet numbered
/// as the total (mod 2^16) that leaves no stream open, or at a packet 1 of 0
/// carrying an empty file; a packet numbered as the total with a stream open
/// is accepted only when 65,535 more packets can follow; a stream spanning
/// packets excludes per-packet streams.
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
    /// Files of more than 65,535 packets (their counters wrapped).
    pub wrapped: u32,
    /// Empty files sent as packet 1 of 0.
    pub empty_file: u32,
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
        if mode >> 6 == 3 {
            if let Some(m) = model.as_mut() {
                fast_forward(m, small);
            }
            continue;
        }
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
            (_, 0 | 1) => small % 6,
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
        let wrapped = model.as_ref().is_some_and(|m| wraps_to_one(&m.recv, &ph, content_len));
        if wrapped {
            let m = model.as_ref().expect("wrapped");
            assert!(m.packets >= WRAP - 1 && (m.open.is_some() || content_len == 0), "a false wrap");
        }
        if ph.packet_number == 1 && !wrapped {
            model = None;
            let Ok(path) = normalize_path(ph.file_name.bytes()) else { continue };
            if u64::from(ph.orig_file_size) > max_file_size {
                continue;
            }
            uploads += 1;
            let name = path.as_str().to_string();
            let recv = Receiving::new(
                u64::from(uploads),
                name,
                ph.file_name.clone(),
                ph.total_packets,
                Instant::now(),
            );
            model = Some(Model {
                recv,
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
                assert_eq!(m.recv, before, "a refused packet changed the upload's state");
                stats.refused += 1;
                model = None;
                continue;
            }
        };
        let numbered_last = ph.packet_number == ph.total_packets;
        m.recv.next = m.recv.next.wrapping_add(1);
        m.packets += 1;
        assert_eq!(m.recv.packets, m.packets);
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
                m.packets == 1 || (content_len == whole && !m.spanned),
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
            assert!(m.packets > 1);
            match m.open {
                None => {
                    assert!(numbered_last, "an empty packet that is not the last was accepted");
                    assert!(content_size == 0 || u64::from(content_size) == before.last_stream_len);
                }
                Some((_, w, _)) => {
                    assert!(!step.last, "a stream left incomplete at the last packet");
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
        // The upload ends by bytes: at the packet numbered as the total that
        // leaves no stream open (or as an empty file in packet 1 of 0); one
        // numbered as the total with a stream open is a wrap, which needs
        // room for 65,535 more packets.
        let empty_file = m.packets == 1 && ph.total_packets == 0 && orig == 0;
        match m.open {
            Some((_, w, got)) => {
                assert!(!step.last, "the upload ended with a stream open");
                assert!(!numbered_last || w - got >= WRAP - 1, "a wrap with {} bytes to come", w - got);
            }
            None => assert_eq!(
                step.last,
                numbered_last || empty_file,
                "packet {k} of {n}",
                k = ph.packet_number,
                n = ph.total_packets
            ),
        }
        let last = step.last;
        if last {
            // A file is complete at its last packet: every stream whole.
            assert!(m.open.is_none());
            assert_eq!(m.accepted, m.allowed);
            assert!(m.streams >= 1);
            stats.files += 1;
            stats.spanning += u32::from(m.spanned);
            stats.per_packet += u32::from(m.streams > 1);
            stats.empty_tail += u32::from(content_len == 0);
            stats.wrapped += u32::from(m.packets >= WRAP);
            stats.empty_file += u32::from(empty_file);
            model = None;
        }
    }
    stats
}

/// As if 65,536 to 131,071 one-byte packets of the open stream had come (the
/// input chooses how many beyond 65,536, and, with its low bit, whether to
/// land just before the packet numbered as the total): allowed only when
/// the stream still has room for 65,535 more, so no packet skipped over
/// could have been refused or have ended the upload.
fn fast_forward(m: &mut Model, small: u16) {
    let Some((_, w, got)) = m.open.as_mut() else { return };
    let to_total = u64::from(m.recv.total.wrapping_sub(m.recv.next));
    let skip = WRAP + if small & 1 == 0 { to_total } else { u64::from(small >> 1) };
    let Some(seg) = m.recv.segment.as_mut() else { panic!("the model has a stream open, plan_packet none") };
    if *w - *got < skip + WRAP - 1 {
        return;
    }
    seg.remaining -= skip;
    *got += skip;
    m.recv.next = m.recv.next.wrapping_add(skip as u16);
    m.recv.packets += skip;
    m.recv.multi_packet_stream = true;
    m.packets += skip;
    m.accepted += skip;
    m.spanned = true;
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

// ---------------------------------------------------------------------------
// 5. The per-connection state machine
// ---------------------------------------------------------------------------
//
// `session` runs the server's protocol state machine (`Core` acting on each
// connection's `Protocol`, see src/server/machine.rs) with no socket and no
// worker thread: two connection slots are fed request bytes the way the loop
// reads them (23 header bytes, the header check, the control payload or a
// packet's fixed fields, `handle_frame`, then a packet's content in pieces
// granted by the budget, `content_piece`), and an in-harness fake worker answers each job in
// FIFO order with the completion the real worker would give, the outcome
// (ok, failed, decryption failure, cksum) chosen by the input. A model of each
// connection, built only from the requests sent and the replies and jobs
// seen, predicts what each step must produce.
//
// Input: one flag byte (--ack-retry, --oaep-hash, --max-packet,
// --max-file-size, --memory-budget, check a session key), then operations, each a selector byte
// and its parameters: well-formed frames (the client's natural next step, or
// any of the 7 codes with chosen fields; packets following the size rules or
// not), raw bytes and lying headers, completion deliveries, closes, stale
// purges. At the end every completion is delivered and both connections close.
//
// Invariants: no panic; every reply is a well-formed response; each request
// gets exactly the replies the rules demand (one for those that require one,
// none for a 1030 without --ack-retry or a swallowed packet), in order; a
// 1604 for a 1029 only after its Commit job completed ok; no Job::Packet
// without this connection's session key (and packet 1 carries that key); the
// budget in use is always exactly the content bytes at the worker plus those
// of granted pieces being read, so it is 0 when nothing is in flight; packets_in_flight
// is the number of this connection's pieces at the worker and `awaiting` is
// set exactly while its reply-bearing job is there (so both return to
// 0/Nothing once completions are delivered); an upload is never discarded or
// committed twice, nor used after; and at the end every upload that got a
// Job::Packet{start} got a Commit or a Discard, or failed at the worker.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use backupd::budget::Piece;
use backupd::config::Config;
use backupd::crypto::{decrypt_session_key, OaepHash};
use backupd::protocol::ClientId;
use backupd::server::connection::{Awaiting, Frame, Incoming, Protocol, Upload};
use backupd::server::{completion_conn, frame_len, Core, Flow, Registry};
use backupd::worker::{Completion, ConnRef, Job, PacketJob, PacketOutcome, UploadId};
use rsa::RsaPrivateKey;

/// `SESSION_TRACE=1`: print each step of the `session` target (to debug a crash input).
fn tracing() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("SESSION_TRACE").is_some())
}

macro_rules! trace {
    ($($arg:tt)*) => {
        if tracing() {
            eprintln!($($arg)*);
        }
    };
}

/// The client key of the `session` target: generated once per process from a
/// fixed seed (so runs are reproducible), 1024 bits like the field's clients.
pub struct ClientKey {
    pub private: RsaPrivateKey,
    /// Its SubjectPublicKeyInfo DER, as a 1026 carries it.
    pub der: Vec<u8>,
}

/// A deterministic generator for the one key generation (xorshift; key
/// quality is irrelevant here).
struct SeededRng(u64);

impl rsa::rand_core::RngCore for SeededRng {
    fn next_u32(&mut self) -> u32 {
        self.next_u64() as u32
    }
    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        for chunk in dest.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rsa::rand_core::Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}

impl rsa::rand_core::CryptoRng for SeededRng {}

pub fn client_key() -> &'static ClientKey {
    static KEY: OnceLock<ClientKey> = OnceLock::new();
    KEY.get_or_init(|| {
        use rsa::pkcs8::EncodePublicKey;
        let private =
            RsaPrivateKey::new(&mut SeededRng(0x0DDB_A11C_0FFE_E5ED), 1024).expect("key generation");
        let der = private.to_public_key().to_public_key_der().expect("DER").into_vec();
        ClientKey { private, der }
    })
}

fn base_config() -> &'static Config {
    static CFG: OnceLock<Config> = OnceLock::new();
    CFG.get_or_init(|| {
        let mut c = Config::defaults();
        // Inputs may register many clients from the one peer address.
        c.registration_rate = 0.0;
        c
    })
}

const CLIENT_NAMES: [&[u8]; 6] = [b"alice", b"bob", b"carol", b"", b"ctl\x01", b"\xff\xfe"];
/// File names as the generator sends them: the third is stored as `d/c.txt`
/// and confirmed under that name (a 1029 carries the normalized path).
const FILE_NAMES: [&[u8]; 8] =
    [b"a.bin", b"b.bin", b"C:\\d\\c.txt", b"../x", b"", b"a/b", b"x\x01y", b"..\\x"];

/// What one run of [`session`] saw (used to pick meaningful seeds).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SessionStats {
    pub registered: u32,
    pub keys_accepted: u32,
    pub reconnected: u32,
    /// 1603 replies.
    pub received: u32,
    /// 1604 replies to 1029.
    pub stored: u32,
    /// 1030 accepted (no reply without --ack-retry).
    pub retried: u32,
    /// 1031 answered 1604.
    pub aborted: u32,
    /// Packets refused by the loop (1607).
    pub packets_refused: u32,
    /// Packets swallowed after a refusal.
    pub packets_skipped: u32,
    /// Empty chunks n+1 of n swallowed after a complete upload.
    pub trailers: u32,
    /// Packets failed at the (fake) worker.
    pub worker_failures: u32,
    /// Framing errors (1607, then close).
    pub framing_errors: u32,
    /// Connections closed with work at the worker or staged files.
    pub busy_closes: u32,
    /// Frames that waited for memory budget.
    pub budget_waits: u32,
    /// Session keys decrypted and compared with packet 1's.
    pub keys_checked: u32,
}

impl SessionStats {
    pub fn add(&mut self, o: &SessionStats) {
        self.registered += o.registered;
        self.keys_accepted += o.keys_accepted;
        self.reconnected += o.reconnected;
        self.received += o.received;
        self.stored += o.stored;
        self.retried += o.retried;
        self.aborted += o.aborted;
        self.packets_refused += o.packets_refused;
        self.packets_skipped += o.packets_skipped;
        self.trailers += o.trailers;
        self.worker_failures += o.worker_failures;
        self.framing_errors += o.framing_errors;
        self.busy_closes += o.busy_closes;
        self.budget_waits += o.budget_waits;
        self.keys_checked += o.keys_checked;
    }
}

/// The model's view of a connection's upload (mirrors `Upload`).
#[derive(Debug, Clone, PartialEq, Eq)]
enum MUpload {
    Idle,
    Receiving {
        id: UploadId,
        field: NameField,
        total: u16,
        next: u16,
        conforming: bool,
    },
    Finishing {
        id: UploadId,
        field: NameField,
        total: u16,
        next: u16,
    },
    /// Refused (every later packet swallowed) or received (only an empty
    /// chunk n+1 of n swallowed).
    Ended {
        field: NameField,
        total: u16,
        next: u16,
        refused: bool,
    },
}

#[derive(Debug, Clone)]
struct MStaged {
    name: String,
    upload: UploadId,
    retried: bool,
}

/// The reply-bearing job this connection waits for.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Owed {
    Nothing,
    Register(ClientId),
    Key(ClientId),
    Commit { name: String, upload: UploadId },
    LastPacket(UploadId),
}

/// The model of one connection, from what was sent and what came back.
struct MConn {
    conn: ConnRef,
    /// The session: its id and, once decrypted, the AES key.
    session: Option<(ClientId, Option<[u8; 32]>)>,
    /// The session key as the 1602/1605 carried it, when the key on file is
    /// ours; decrypted (slow) only when a packet 1 needs it.
    sealed: Option<Vec<u8>>,
    registered: Option<ClientId>,
    upload: MUpload,
    staged: VecDeque<MStaged>,
    owed: Owed,
}

/// How the fake client cuts its current upload (the generator's plan).
#[derive(Debug, Clone)]
struct Plan {
    field: NameField,
    total: u16,
    next: u16,
    /// 0: content_size = packet length; 1: = whole ciphertext (sometimes
    /// with an empty last packet); 2: every packet a complete stream
    /// (sometimes followed by an empty chunk n+1 of n, `trailer`).
    convention: u8,
    trailer: bool,
    orig: u32,
    whole: u64,
    packet: u64,
    sent: u64,
}

enum ReadPhase {
    Header,
    /// A control frame's payload or a file packet's fixed fields.
    Payload(Frame),
    /// An admitted packet's content: a piece once the budget granted it.
    Content {
        remaining: u64,
        piece: Option<Piece>,
        filled: usize,
    },
    /// A refused packet's content, dropped.
    Drain {
        remaining: u64,
    },
}

/// The admitted packet whose content is streaming to the worker.
struct Streaming {
    upload: UploadId,
    k: u16,
    n: u16,
    /// No piece has gone yet.
    first: bool,
    /// The packet ends the upload (numbered as the total, or packet 1 of 0 with an empty file).
    ends: bool,
}

struct Slot {
    proto: Protocol,
    model: MConn,
    inbuf: Vec<u8>,
    pos: usize,
    read: ReadPhase,
    /// Offset in `inbuf` of the frame being read.
    frame_start: usize,
    /// Frames the generator built to follow the packet rules: (start, end).
    conforming: HashSet<(usize, usize)>,
    /// A framing error: the 1607 is queued, nothing more is read.
    closing: bool,
    plan: Option<Plan>,
    streaming: Option<Streaming>,
}

impl Slot {
    fn new(key: usize, serial: u64) -> Slot {
        let conn = ConnRef { key, serial };
        let peer = std::net::SocketAddr::from(([192, 0, 2, 1], 40000 + key as u16));
        Slot {
            proto: Protocol::new(conn, peer),
            model: MConn {
                conn,
                session: None,
                sealed: None,
                registered: None,
                upload: MUpload::Idle,
                staged: VecDeque::new(),
                owed: Owed::Nothing,
            },
            inbuf: Vec::new(),
            pos: 0,
            read: ReadPhase::Header,
            frame_start: 0,
            conforming: HashSet::new(),
            closing: false,
            plan: None,
            streaming: None,
        }
    }

    /// Budget granted to the piece being read.
    fn reserved(&self) -> usize {
        match &self.read {
            ReadPhase::Content { piece: Some(p), .. } => p.len(),
            _ => 0,
        }
    }
}

struct MClient {
    name: String,
    durable: bool,
    /// The key on file (exact DER), if any.
    key: Option<Vec<u8>>,
    /// The connection that sent a key, which alone may send another.
    owner: Option<ConnRef>,
    /// The open connection that got this client's 1600.
    registrant: Option<ConnRef>,
}

/// Where an upload stands, as the loop issued its jobs.
#[derive(Debug, Default, Clone, Copy)]
struct Ledger {
    discarded: bool,
    committed: bool,
}

/// The fake worker's upload state (the real worker's `Upload`).
struct WUpload {
    client: ClientId,
    ciphertext: u64,
    received: bool,
}

struct Sim<'a> {
    input: Input<'a>,
    core: Core<Vec<Job>>,
    slots: Vec<Slot>,
    next_serial: u64,
    oaep: OaepHash,
    /// Decrypt one session key a 1602/1605 carried and compare it with the
    /// key packet 1 takes to the worker (flag 0x80; RSA decryption is slow,
    /// so only once per input).
    check_key: bool,
    ack_retry: bool,
    max_file_size: u64,
    max_payload: u64,
    /// Jobs at the fake worker, in order.
    queue: VecDeque<Job>,
    worker: HashMap<UploadId, WUpload>,
    failed: HashSet<UploadId>,
    ledger: HashMap<UploadId, Ledger>,
    clients: HashMap<ClientId, MClient>,
    /// Client ids in registration order (ids are random: picks go by position).
    order: Vec<ClientId>,
    names: HashMap<String, ClientId>,
    /// Decryption failures per client (the server's token bucket, which does
    /// not refill noticeably during a run).
    decrypt_failures: HashMap<ClientId, u32>,
    stats: SessionStats,
}

/// The server's burst of decryption failures per client (src/server/mod.rs).
const DECRYPT_FAILURE_BURST: u32 = 10;

/// Target 5: the protocol state machine of one server (two connections)
/// driven by arbitrary frame sequences, with a fake worker.
pub fn session(data: &[u8]) {
    session_stats(data);
}

/// [`session`], reporting what it saw.
pub fn session_stats(data: &[u8]) -> SessionStats {
    let mut input = Input::new(data);
    let flags = input.u8();
    let mut cfg = base_config().clone();
    cfg.ack_retry = flags & 1 != 0;
    cfg.oaep_hash = if flags & 2 != 0 { OaepHash::Sha256 } else { OaepHash::Sha1 };
    cfg.max_packet = match (flags >> 2) & 3 {
        0 => 267 + 1024,
        1 => 267 + 64,
        2 => 267 + 4096,
        _ => 267 + 16,
    };
    cfg.max_file_size = match (flags >> 4) & 3 {
        0 | 1 => u64::from(u32::MAX),
        2 => 100,
        _ => 3000,
    };
    // The smallest budget the server accepts (4 KiB: content pieces then
    // wait for each other), or plenty.
    cfg.memory_budget = if flags & 0x40 != 0 { 4096 } else { 1 << 20 };
    let mut sim = Sim {
        input,
        ack_retry: cfg.ack_retry,
        oaep: cfg.oaep_hash,
        check_key: flags & 0x80 != 0,
        max_file_size: cfg.max_file_size,
        max_payload: cfg.max_packet,
        core: Core::new(Arc::new(cfg), Registry::default(), Vec::new(), 1000),
        slots: vec![Slot::new(0, 1), Slot::new(1, 2)],
        next_serial: 3,
        queue: VecDeque::new(),
        worker: HashMap::new(),
        failed: HashSet::new(),
        ledger: HashMap::new(),
        clients: HashMap::new(),
        order: Vec::new(),
        names: HashMap::new(),
        decrypt_failures: HashMap::new(),
        stats: SessionStats::default(),
    };
    let mut ops = 0;
    while !sim.input.is_empty() && ops < 2000 {
        ops += 1;
        sim.step();
        sim.check_global();
    }
    sim.finish();
    sim.stats
}

/// Parse every reply in `out` (which is emptied): each must be a complete,
/// well-formed response that encodes back to the same bytes.
fn take_replies(out: &mut Vec<u8>) -> Vec<Response> {
    let mut replies = Vec::new();
    let mut rest = &out[..];
    while !rest.is_empty() {
        assert!(rest.len() >= RESPONSE_HEADER_LEN, "a truncated reply header: {rest:?}");
        let mut raw = [0u8; RESPONSE_HEADER_LEN];
        raw.copy_from_slice(&rest[..RESPONSE_HEADER_LEN]);
        let h = ResponseHeader::decode(&raw);
        assert_eq!(h.version, 3, "reply version");
        let end = RESPONSE_HEADER_LEN + h.payload_size as usize;
        assert!(rest.len() >= end, "a reply shorter than its header says");
        let r = Response::decode(&h, &rest[RESPONSE_HEADER_LEN..end])
            .unwrap_or_else(|| panic!("malformed reply {:?}", &rest[..end]));
        let mut again = Vec::new();
        r.encode(&mut again);
        assert_eq!(&again[..], &rest[..end], "reply does not encode back to its bytes");
        replies.push(r);
        rest = &rest[end..];
    }
    out.clear();
    replies
}

fn packet_jobs(jobs: &[Job]) -> Vec<&PacketJob> {
    jobs.iter()
        .filter_map(|j| match j {
            Job::Packet(p) => Some(p),
            _ => None,
        })
        .collect()
}

fn is_packet_job(j: &Job) -> bool {
    matches!(j, Job::Packet(_))
}

/// The uploads of Discard jobs (without a failure record), sorted; panics on anything else.
fn discards_only(jobs: &[Job]) -> Vec<UploadId> {
    let mut v: Vec<UploadId> = jobs
        .iter()
        .map(|j| match j {
            Job::Discard { upload, failed: None } => *upload,
            other => panic!("unexpected job {}", job_name(other)),
        })
        .collect();
    v.sort_unstable();
    v
}

fn job_name(j: &Job) -> &'static str {
    match j {
        Job::Register { .. } => "Register",
        Job::SetKey { .. } => "SetKey",
        Job::Touch { .. } => "Touch",
        Job::Packet(_) => "Packet",
        Job::Commit { .. } => "Commit",
        Job::Discard { .. } => "Discard",
        Job::Shutdown => "Shutdown",
    }
}

fn sorted(mut v: Vec<UploadId>) -> Vec<UploadId> {
    v.sort_unstable();
    v
}

fn valid_client_name(n: &NameField) -> Option<&str> {
    n.as_str().filter(|s| !s.is_empty() && s.len() <= 254 && !s.chars().any(char::is_control))
}

impl Sim<'_> {
    // -- the operations ----------------------------------------------------

    fn step(&mut self) {
        let op = self.input.u8();
        let s = usize::from(op >> 7);
        trace!("op {} on slot {s}", op & 0x7f);
        match op & 0x7f {
            0..=47 => self.natural(s),
            48..=71 => {
                let code = ALL_CODES[usize::from(self.input.u8() % 7)];
                self.chosen_frame(s, code);
            }
            72..=85 => {
                let n = usize::from(self.input.u8() % 4) + 1;
                self.deliver(n);
            }
            86..=90 => self.deliver(usize::MAX),
            91..=95 => {
                let n = usize::from(self.input.u8() % 48);
                let bytes = self.input.bytes(n).to_vec();
                self.send_bytes(s, &bytes, false);
            }
            96..=99 => {
                let h = RequestHeader {
                    client_id: self.pick_id(s),
                    version: if self.input.u8().is_multiple_of(4) { self.input.u8() } else { 3 },
                    code: 1024 + u16::from(self.input.u8() % 10),
                    payload_size: match self.input.u8() % 4 {
                        0 => self.input.u32(),
                        1 => 255,
                        2 => u32::from(self.input.u16()),
                        _ => 266,
                    },
                };
                self.send_bytes(s, &h.encode(), false);
            }
            100..=104 => self.close(s),
            105..=107 => {
                let future = self.input.u8().is_multiple_of(2);
                self.purge(s, future);
            }
            _ => self.deliver(1),
        }
    }

    /// What a well-behaved client of this connection would send next.
    fn natural(&mut self, s: usize) {
        let p = self.input.u8();
        if p & 1 == 0 {
            // A client waiting for its reply before sending more.
            self.deliver(usize::MAX);
        }
        let m = &self.slots[s].model;
        let has_session = m.session.is_some();
        let registered = m.registered;
        let staged = m.staged.iter().find(|f| !f.retried).map(|f| f.name.clone());
        if !has_session {
            match registered {
                None if p & 6 == 6 => self.reconnect_frame(s),
                None => self.register_frame(s, (p >> 3) % 3),
                Some(id) => self.key_frame(s, id, 0),
            }
        } else if let (Some(name), 0..=2) = (staged, (p >> 1) % 8) {
            let code = match p >> 5 {
                0..=5 => Code::CrcOk,
                6 => Code::CrcRetry,
                _ => Code::CrcAbort,
            };
            let id = self.session_id(s);
            let field = NameField::from_name(name.as_bytes()).expect("a staged name fits its field");
            self.frame(s, id, code, &field.0, false);
        } else {
            self.packet(s, p >> 3);
        }
    }

    fn session_id(&self, s: usize) -> ClientId {
        self.slots[s].model.session.map(|(id, _)| id).unwrap_or_default()
    }

    fn pick_id(&mut self, s: usize) -> ClientId {
        let m = &self.slots[s].model;
        match self.input.u8() % 8 {
            0..=3 => m.session.map(|(id, _)| id).or(m.registered).unwrap_or_default(),
            4 => self.slots[1 - s].model.session.map(|(id, _)| id).unwrap_or_default(),
            5 => {
                let i = usize::from(self.input.u8());
                self.order.get(i % self.order.len().max(1)).copied().unwrap_or_default()
            }
            6 => [0; 16],
            _ => {
                let mut id = [0u8; 16];
                let b = self.input.bytes(16);
                id[..b.len()].copy_from_slice(b);
                id
            }
        }
    }

    fn client_name_field(&mut self, id: &ClientId) -> NameField {
        let sel = self.input.u8();
        let name: Vec<u8> = match (self.clients.get(id), sel % 8) {
            (Some(c), 0..=5) => c.name.as_bytes().to_vec(),
            (_, 6) => vec![b'n'; 254],
            _ => CLIENT_NAMES[usize::from(sel >> 3) % CLIENT_NAMES.len()].to_vec(),
        };
        NameField::from_name(&name).unwrap_or(NameField([b'x'; NAME_FIELD_LEN]))
    }

    fn register_frame(&mut self, s: usize, which: u8) {
        let name = NameField::from_name(CLIENT_NAMES[usize::from(which)]).expect("fits");
        self.frame(s, [0; 16], Code::Register, &name.0, false);
    }

    fn reconnect_frame(&mut self, s: usize) {
        let ids: Vec<ClientId> =
            self.order.iter().filter(|id| self.clients[*id].key.is_some()).copied().collect();
        let i = usize::from(self.input.u8());
        let id = ids.get(i % ids.len().max(1)).copied().unwrap_or_default();
        let name = self.client_name_field(&id);
        self.frame(s, id, Code::Reconnect, &name.0, false);
    }

    fn key_frame(&mut self, s: usize, id: ClientId, variant: u8) {
        let name = self.client_name_field(&id);
        let der = &client_key().der;
        let mut field = der.clone();
        match variant % 6 {
            0..=2 => {}
            3 => field.extend_from_slice(&[0; 40]),
            4 => {
                let at = usize::from(self.input.u8()) % field.len();
                field[at] ^= 1 << (self.input.u8() % 8);
            }
            _ => {
                let n = 160 + usize::from(self.input.u8());
                field = self.input.bytes(n).to_vec();
                field.resize(n, 0x30);
            }
        }
        self.frame(s, id, Code::PublicKey, &[&name.0[..], &field].concat(), false);
    }

    /// One frame of `code` with fields chosen by the input.
    fn chosen_frame(&mut self, s: usize, code: Code) {
        let id = self.pick_id(s);
        match code {
            Code::Register => {
                let which = self.input.u8() % CLIENT_NAMES.len() as u8;
                self.frame(
                    s,
                    id,
                    code,
                    &NameField::from_name(CLIENT_NAMES[usize::from(which)]).expect("fits").0,
                    false,
                );
            }
            Code::PublicKey => {
                let v = self.input.u8();
                self.key_frame(s, id, v);
            }
            Code::Reconnect => {
                let name = self.client_name_field(&id);
                self.frame(s, id, code, &name.0, false);
            }
            Code::FilePacket => {
                let v = self.input.u8();
                self.packet(s, v);
            }
            _ => {
                let sel = self.input.u8();
                let m = &self.slots[s].model;
                let name: Vec<u8> =
                    match (sel % 4, m.staged.get(usize::from(sel >> 2) % m.staged.len().max(1))) {
                        (0..=2, Some(f)) => f.name.as_bytes().to_vec(),
                        _ => FILE_NAMES[usize::from(sel >> 2) % FILE_NAMES.len()].to_vec(),
                    };
                let field = NameField::from_name(&name).expect("fits");
                self.frame(s, id, code, &field.0, false);
            }
        }
    }

    /// A file packet: the next one of the plan (started when there is none),
    /// or one with fields chosen by the input.
    fn packet(&mut self, s: usize, v: u8) {
        let id = match v % 16 {
            15 => self.pick_id(s),
            _ => self.session_id(s),
        };
        if v % 16 >= 13 {
            return self.wild_packet(s, id);
        }
        if self.slots[s].plan.is_none() || v % 16 == 12 {
            self.new_plan(s);
        }
        let Some(plan) = self.slots[s].plan.as_mut() else { return };
        if plan.next > plan.total {
            // The per-chunk client's empty chunk, numbered n+1 "of n".
            let ph = PacketHeader {
                content_size: 16,
                orig_file_size: 0,
                packet_number: plan.next,
                total_packets: plan.total,
                file_name: plan.field.clone(),
            };
            self.slots[s].plan = None;
            let mut payload = Vec::new();
            ph.encode(&mut payload);
            payload.resize(PACKET_HEADER_LEN + 16, 0xA5);
            return self.frame(s, id, Code::FilePacket, &payload, false);
        }
        let k = plan.next;
        let (content_len, content_size, orig) = match plan.convention {
            2 => {
                // Every packet is a complete stream of its own size; `sent`
                // counts plaintext here, which must stay within --max-file-size.
                let room = self.max_file_size.saturating_sub(plan.sent);
                let orig = u64::from(self.input.u8() % 40).min(room);
                plan.sent += orig;
                let whole = ciphertext_len(orig);
                (whole, whole as u32, orig as u32)
            }
            c => {
                let len = plan.packet.min(plan.whole - plan.sent);
                let size = if c == 0 { len } else { plan.whole };
                (len, size as u32, plan.orig)
            }
        };
        if plan.convention != 2 {
            plan.sent += content_len;
        }
        plan.next += 1;
        let ph = PacketHeader {
            content_size,
            orig_file_size: orig,
            packet_number: k,
            total_packets: plan.total,
            file_name: plan.field.clone(),
        };
        if plan.next > plan.total && !plan.trailer {
            self.slots[s].plan = None;
        }
        let mut payload = Vec::new();
        ph.encode(&mut payload);
        payload.resize(PACKET_HEADER_LEN + content_len as usize, 0xA5);
        self.frame(s, id, Code::FilePacket, &payload, true);
    }

    fn new_plan(&mut self, s: usize) {
        let sel = self.input.u8();
        // Mostly good names; now and then a bad one ("../x", "", "a/b").
        let i = match sel % 16 {
            n @ 13..=15 => usize::from(n) - 10,
            n => usize::from(n % 3),
        };
        let field = NameField::from_name(FILE_NAMES[i]).expect("fits");
        let room = self.max_payload - PACKET_HEADER_LEN as u64;
        let convention = (sel >> 4) % 3;
        let orig = u32::from(self.input.u16() % 9000);
        let whole = ciphertext_len(u64::from(orig));
        let packet = 1 + u64::from(self.input.u16()) % room;
        let tail = sel & 0x80 != 0 && convention == 1;
        let total = match convention {
            2 => 1 + u16::from(self.input.u8() % 5),
            _ => whole.div_ceil(packet) as u16 + u16::from(tail),
        };
        let trailer = sel & 0x80 != 0 && convention == 2;
        self.slots[s].plan =
            Some(Plan { field, total, next: 1, convention, trailer, orig, whole, packet, sent: 0 });
    }

    /// A packet with fields chosen by the input (any of them may break the rules).
    fn wild_packet(&mut self, s: usize, id: ClientId) {
        let m = &self.slots[s].model;
        let (field, next, total) = match &m.upload {
            MUpload::Receiving { field, next, total, .. } => (field.clone(), *next, *total),
            MUpload::Ended { field, next, total, .. } => (field.clone(), *next, *total),
            _ => (NameField::from_name(b"a.bin").expect("fits"), 1, 1),
        };
        let sel = self.input.u8();
        let small = self.input.u16();
        let packet_number = match sel % 4 {
            0 | 1 => next,
            2 => 1,
            _ => small % 6,
        };
        let total_packets = match (sel >> 2) % 4 {
            0 | 1 => total,
            2 => packet_number.max(1),
            _ => small % 5,
        };
        let field = if (sel >> 4).is_multiple_of(4) {
            NameField::from_name(FILE_NAMES[usize::from(small) % FILE_NAMES.len()]).expect("fits")
        } else {
            field
        };
        let orig = u32::from(self.input.u8()) * 3;
        let len =
            usize::from(self.input.u8() % 64).min((self.max_payload - PACKET_HEADER_LEN as u64) as usize);
        let content_size = match sel >> 6 {
            0 => len as u32,
            1 => ciphertext_len(u64::from(orig)) as u32,
            2 => 0,
            _ => self.input.u32(),
        };
        let ph = PacketHeader {
            content_size,
            orig_file_size: orig,
            packet_number,
            total_packets,
            file_name: field,
        };
        let mut payload = Vec::new();
        ph.encode(&mut payload);
        payload.resize(PACKET_HEADER_LEN + len, 0x5A);
        self.frame(s, id, Code::FilePacket, &payload, false);
    }

    fn frame(&mut self, s: usize, id: ClientId, code: Code, payload: &[u8], conforming: bool) {
        let h = RequestHeader {
            client_id: id,
            version: 3,
            code: code.as_u16(),
            payload_size: payload.len() as u32,
        };
        let mut bytes = h.encode().to_vec();
        bytes.extend_from_slice(payload);
        self.send_bytes(s, &bytes, conforming);
    }

    /// The peer sends bytes; the loop reads what it may.
    fn send_bytes(&mut self, s: usize, bytes: &[u8], conforming: bool) {
        let slot = &mut self.slots[s];
        let start = slot.inbuf.len();
        slot.inbuf.extend_from_slice(bytes);
        if conforming {
            slot.conforming.insert((start, slot.inbuf.len()));
        }
        self.pump(s);
    }

    // -- the loop's reading, as `Server::drive` does it -------------------------

    fn pump(&mut self, s: usize) {
        loop {
            let piece_size = self.core.piece_size();
            let slot = &mut self.slots[s];
            if slot.closing || !slot.proto.may_read() {
                return;
            }
            let avail = slot.inbuf.len() - slot.pos;
            match &mut slot.read {
                ReadPhase::Header => {
                    if avail < REQUEST_HEADER_LEN {
                        return;
                    }
                    let mut raw = [0u8; REQUEST_HEADER_LEN];
                    raw.copy_from_slice(&slot.inbuf[slot.pos..slot.pos + REQUEST_HEADER_LEN]);
                    slot.frame_start = slot.pos;
                    slot.pos += REQUEST_HEADER_LEN;
                    let h = RequestHeader::decode(&raw);
                    match self.core.check_header(&mut slot.proto, &h) {
                        None => {
                            assert!(h.check(self.max_payload as u32).is_err());
                            let replies = take_replies(&mut slot.proto.out);
                            assert_eq!(replies, vec![Response::GeneralError], "framing error");
                            assert!(self.core.jobs.is_empty());
                            slot.closing = true;
                            self.stats.framing_errors += 1;
                            return;
                        }
                        Some(code) => {
                            assert_eq!(code.as_u16(), h.code);
                            let payload = vec![0; frame_len(code, &h)];
                            slot.read = ReadPhase::Payload(Frame { header: h, code, payload, filled: 0 });
                        }
                    }
                }
                ReadPhase::Payload(f) => {
                    let n = avail.min(f.payload.len() - f.filled);
                    f.payload[f.filled..f.filled + n].copy_from_slice(&slot.inbuf[slot.pos..slot.pos + n]);
                    f.filled += n;
                    slot.pos += n;
                    if f.filled < f.payload.len() {
                        return;
                    }
                    let ReadPhase::Payload(f) = std::mem::replace(&mut slot.read, ReadPhase::Header) else {
                        unreachable!()
                    };
                    let end = slot.frame_start + REQUEST_HEADER_LEN + f.header.payload_size as usize;
                    let conforming = slot.conforming.remove(&(slot.frame_start, end));
                    self.handle(s, f, conforming);
                    let slot = &mut self.slots[s];
                    match slot.proto.incoming.take() {
                        _ if slot.closing => {}
                        None => {}
                        Some(Incoming::Stream { len }) => {
                            assert!(slot.streaming.is_some(), "content streams for no admitted packet");
                            slot.read = ReadPhase::Content { remaining: len, piece: None, filled: 0 };
                        }
                        Some(Incoming::Drain { len }) => slot.read = ReadPhase::Drain { remaining: len },
                    }
                }
                ReadPhase::Drain { remaining } => {
                    let n = (avail as u64).min(*remaining);
                    slot.pos += n as usize;
                    *remaining -= n;
                    if *remaining > 0 {
                        return;
                    }
                    slot.read = ReadPhase::Header;
                }
                ReadPhase::Content { remaining, piece, filled } => {
                    if piece.is_none() {
                        let len = (*remaining).min(piece_size as u64) as usize;
                        let Some(granted) = self.core.grant_piece(len) else {
                            let other = self.slots[1 - s].reserved();
                            assert!(
                                self.queue.iter().any(is_packet_job) || other > 0,
                                "a piece waits for budget ({} of {} used) with nothing in flight",
                                self.core.budget.used(),
                                self.core.budget.limit()
                            );
                            self.stats.budget_waits += 1;
                            return;
                        };
                        *piece = Some(granted);
                    }
                    let Some(p) = piece.as_mut() else { unreachable!() };
                    let n = avail.min(p.len() - *filled);
                    p.bytes[*filled..*filled + n].copy_from_slice(&slot.inbuf[slot.pos..slot.pos + n]);
                    *filled += n;
                    slot.pos += n;
                    if *filled < p.len() {
                        return;
                    }
                    let Some(p) = piece.take() else { unreachable!() };
                    *remaining -= p.len() as u64;
                    *filled = 0;
                    let last = *remaining == 0;
                    if last {
                        slot.read = ReadPhase::Header;
                    }
                    self.on_piece(s, p, last);
                }
            }
        }
    }

    /// A piece of an admitted packet's content was read: it goes to the
    /// worker with the packet's flags, unless the upload failed meanwhile.
    fn on_piece(&mut self, s: usize, piece: Piece, last: bool) {
        let bytes = piece.bytes.clone();
        let slot = &mut self.slots[s];
        self.core.content_piece(&mut slot.proto, piece, last);
        let jobs = std::mem::take(&mut self.core.jobs);
        assert!(take_replies(&mut slot.proto.out).is_empty(), "content is not answered");
        assert!(jobs.len() <= 1 && jobs.iter().all(is_packet_job), "a piece makes one packet job at most");
        self.check_piece(s, packet_jobs(&jobs).first().copied(), &bytes, last);
        self.enqueue(jobs);
    }

    /// The jobs of one piece, against the model.
    fn check_piece(&mut self, s: usize, job: Option<&PacketJob>, bytes: &[u8], last: bool) {
        let slot = &mut self.slots[s];
        let x = slot.streaming.as_mut().expect("a piece of no admitted packet");
        let m = &mut slot.model;
        let current = matches!(&m.upload, MUpload::Receiving { id, .. } if *id == x.upload);
        let (first, k, n, upload, ends) = (x.first, x.k, x.n, x.upload, x.ends);
        x.first = false;
        if last {
            slot.streaming = None;
        }
        if !current {
            assert!(job.is_none(), "content of a failed upload went to the worker");
            return;
        }
        let Some(p) = job else { panic!("a piece of packet {k}/{n} did not go to the worker") };
        assert_eq!((p.conn, p.upload), (m.conn, upload));
        assert_eq!(&p.content.bytes[..], bytes, "the content goes to the worker as it came");
        assert_eq!(p.last, last && ends, "only the last piece of the last packet ends the upload");
        assert!(!p.new_segment || first, "only a packet's first piece starts a CBC stream");
        assert!(p.end_segment.is_none() || last, "only a packet's last piece ends a CBC stream");
        if first && k == 1 {
            let start = p.start.as_ref().expect("packet 1 starts the upload");
            self.check_start(s, start);
        } else {
            assert!(p.start.is_none(), "only packet 1's first piece opens the upload");
        }
        let m = &mut self.slots[s].model;
        if p.last {
            let MUpload::Receiving { id, field, total, next, .. } = m.upload.clone() else { unreachable!() };
            m.upload = MUpload::Finishing { id, field, total, next };
            m.owed = Owed::LastPacket(id);
        }
    }

    /// Packet 1's first piece carries this connection's session key.
    fn check_start(&mut self, s: usize, start: &backupd::worker::StartUpload) {
        let oaep = self.oaep;
        let slot = &mut self.slots[s];
        let m = &mut slot.model;
        let Some((sid, skey)) = m.session else {
            panic!("a Job::Packet without this connection's session key")
        };
        let proto_session = slot.proto.session.as_ref().expect("the state machine has the session");
        assert_eq!(proto_session.id, sid);
        assert_eq!(start.client, sid);
        assert_eq!(start.key, proto_session.key, "packet 1 carries this connection's session key");
        let key = match (skey, m.sealed.take()) {
            (Some(k), _) => Some(k),
            (None, Some(ct)) if self.check_key => {
                self.check_key = false;
                self.stats.keys_checked += 1;
                Some(
                    decrypt_session_key(&client_key().private, &ct, oaep)
                        .expect("the session key decrypts with the client's key"),
                )
            }
            (None, _) => None,
        };
        if let Some(key) = key {
            assert_eq!(start.key, key, "packet 1 carries the key the client was sent");
            m.session = Some((sid, Some(key)));
        }
    }

    /// One complete frame through `handle_frame`, checked against the model.
    fn handle(&mut self, s: usize, f: Frame, conforming: bool) {
        let payload = f.payload.clone();
        let f_payload_size = f.header.payload_size;
        let hid = f.header.client_id;
        let parsed = Request::parse(f.code, &payload);
        let slot = &mut self.slots[s];
        trace!("  slot {s} handles {:?} (conforming {conforming}): model {:?}", parsed, slot.model.upload);
        let flow = self.core.handle_frame(&mut slot.proto, f);
        let replies = take_replies(&mut slot.proto.out);
        let jobs = std::mem::take(&mut self.core.jobs);
        trace!("    -> {replies:?}, jobs {:?}", jobs.iter().map(job_name).collect::<Vec<_>>());
        let req = match parsed {
            Ok(r) => r,
            Err(_) => {
                assert_eq!(flow, Flow::Close);
                assert_eq!(replies, vec![Response::GeneralError]);
                assert!(jobs.is_empty());
                slot.closing = true;
                self.stats.framing_errors += 1;
                return;
            }
        };
        assert_eq!(flow, Flow::Continue);
        match req {
            Request::FilePacket(ph) => {
                let content_len = u64::from(f_payload_size).saturating_sub(PACKET_HEADER_LEN as u64);
                self.on_packet(s, hid, ph, content_len, conforming, replies, &jobs)
            }
            other => {
                // Any other request ends the swallowing of an ended upload.
                let m = &mut self.slots[s].model;
                if matches!(m.upload, MUpload::Ended { .. }) {
                    m.upload = MUpload::Idle;
                }
                match other {
                    Request::Register { name } => self.on_register(s, name, replies, &jobs),
                    Request::PublicKey { name, key } => {
                        self.on_public_key(s, hid, name, &key, replies, &jobs)
                    }
                    Request::Reconnect { name } => self.on_reconnect(s, hid, name, replies, &jobs),
                    Request::CrcOk { name } => self.on_crc(s, hid, name, Code::CrcOk, replies, &jobs),
                    Request::CrcRetry { name } => self.on_crc(s, hid, name, Code::CrcRetry, replies, &jobs),
                    Request::CrcAbort { name } => self.on_crc(s, hid, name, Code::CrcAbort, replies, &jobs),
                    Request::FilePacket(_) => unreachable!(),
                }
            }
        }
        self.enqueue(jobs);
    }

    /// Jobs go to the fake worker, after the ledger checks of the loop's side.
    fn enqueue(&mut self, jobs: Vec<Job>) {
        for j in jobs {
            match &j {
                Job::Packet(p) => {
                    let l = self.ledger.entry(p.upload).or_default();
                    assert!(!l.discarded && !l.committed, "a packet for upload {} after its end", p.upload);
                }
                Job::Discard { upload, failed } => {
                    let l = self.ledger.get_mut(upload).expect("a discard of an upload never started");
                    // A 1031 after a 1030 discards again: that one records the failure.
                    let record_only = failed.is_some() && l.discarded;
                    assert!(
                        record_only || (!l.discarded && !l.committed),
                        "upload {upload} discarded twice or after its commit"
                    );
                    l.discarded = true;
                }
                Job::Commit { upload, .. } => {
                    let l = self.ledger.get_mut(upload).expect("a commit of an upload never started");
                    assert!(
                        !l.discarded && !l.committed,
                        "upload {upload} committed twice or after its discard"
                    );
                    l.committed = true;
                }
                Job::Shutdown => panic!("the state machine sent Shutdown"),
                _ => {}
            }
            self.queue.push_back(j);
        }
    }

    // -- the model, request by request ------------------------------------

    fn on_register(&mut self, s: usize, name: NameField, replies: Vec<Response>, jobs: &[Job]) {
        let m = &mut self.slots[s].model;
        match valid_client_name(&name) {
            None => {
                assert_eq!(replies, vec![Response::GeneralError], "invalid client name {}", name.display());
                assert!(jobs.is_empty());
            }
            Some(n) if self.names.contains_key(n) => {
                assert!(jobs.is_empty());
                let id = self.names[n];
                // A client with no key, none on its way and no open registration
                // connection may register again (issue 8).
                let resumable = self.clients.get(&id).is_some_and(|c| {
                    c.durable && c.key.is_none() && c.owner.is_none() && c.registrant.is_none()
                });
                if resumable {
                    assert_eq!(
                        replies,
                        vec![Response::RegistrationOk { id }],
                        "name {n:?} resumes its registration"
                    );
                    m.registered = Some(id);
                    let conn = m.conn;
                    self.set_registrant(conn, id);
                    self.stats.registered += 1;
                } else {
                    assert_eq!(replies, vec![Response::RegistrationFailed], "name {n:?} is taken");
                }
            }
            Some(n) => {
                assert!(replies.is_empty(), "1025 answered before the database: {replies:?}");
                let [Job::Register { conn, id, name: jn }] = jobs else {
                    panic!("1025 of a free name: no Register job")
                };
                assert_eq!((*conn, jn.as_str()), (m.conn, n));
                assert!(*id != [0; 16] && !self.clients.contains_key(id), "a new id must be fresh");
                self.clients.insert(
                    *id,
                    MClient { name: n.to_string(), durable: false, key: None, owner: None, registrant: None },
                );
                self.order.push(*id);
                self.names.insert(n.to_string(), *id);
                m.owed = Owed::Register(*id);
            }
        }
    }

    /// `conn` got client `id`'s 1600: the one connection that may send its
    /// first key (a connection is the registrant of one client at most).
    fn set_registrant(&mut self, conn: ConnRef, id: ClientId) {
        for c in self.clients.values_mut().filter(|c| c.registrant == Some(conn)) {
            c.registrant = None;
        }
        if let Some(c) = self.clients.get_mut(&id) {
            c.registrant = Some(conn);
        }
    }

    fn on_public_key(
        &mut self,
        s: usize,
        hid: ClientId,
        name: NameField,
        field: &[u8],
        replies: Vec<Response>,
        jobs: &[Job],
    ) {
        let m = &mut self.slots[s].model;
        let known = self.clients.get(&hid).filter(|c| c.durable && name.as_str() == Some(c.name.as_str()));
        // Only the connection that registered the id sets its key, and once one
        // has sent a key only that one may send another (issue 8).
        let owner_ok = known.is_some_and(|c| match c.owner {
            Some(o) => o == m.conn,
            None => c.key.is_none(),
        });
        let parsed = parse_public_key(field).ok();
        let accept = m.registered == Some(hid) && owner_ok && parsed.is_some();
        if let (true, Some(c)) = (accept, self.clients.get_mut(&hid)) {
            c.owner = Some(m.conn);
        }
        if !accept {
            assert_eq!(replies, vec![Response::GeneralError], "1026 that must be refused");
            assert!(jobs.is_empty());
            return;
        }
        assert!(replies.is_empty(), "1026 answered before the database: {replies:?}");
        let [Job::SetKey { conn, id, der }] = jobs else { panic!("1026 accepted without a SetKey job") };
        let exact = parsed.map(|(_, d)| d).unwrap_or_default();
        assert_eq!((*conn, *id, der), (m.conn, hid, &exact));
        m.owed = Owed::Key(hid);
    }

    fn on_reconnect(
        &mut self,
        s: usize,
        hid: ClientId,
        name: NameField,
        replies: Vec<Response>,
        jobs: &[Job],
    ) {
        let known = self
            .clients
            .get(&hid)
            .filter(|c| c.durable && name.as_str() == Some(c.name.as_str()))
            .and_then(|c| c.key.clone());
        let too_many_failures = self.decrypt_failures.get(&hid).is_some_and(|n| *n >= DECRYPT_FAILURE_BURST);
        let Some(der) = known.filter(|_| !too_many_failures) else {
            assert_eq!(replies, vec![Response::ReconnectDenied { id: hid }]);
            assert!(jobs.is_empty());
            return;
        };
        let [Response::ReconnectOk { id, encrypted_key }] = &replies[..] else {
            panic!("1027 of a known client with a key: {replies:?}")
        };
        assert_eq!(*id, hid);
        let key = self.session_key(&der, encrypted_key);
        let touches = jobs.iter().filter(|j| matches!(j, Job::Touch { id } if *id == hid)).count();
        assert_eq!(touches, 1, "a reconnect records the client's last contact once");
        let rest: Vec<UploadId> = discards_only(
            &jobs.iter().filter(|j| !matches!(j, Job::Touch { .. })).map(clone_discard).collect::<Vec<_>>(),
        );
        self.open_session(s, hid, key, rest);
        self.stats.reconnected += 1;
    }

    /// The session key of a 1602/1605 (encrypted), to be checked, when the key on file is ours.
    fn session_key(&self, der: &[u8], encrypted: &[u8]) -> Option<Vec<u8>> {
        (self.check_key && der == client_key().der.as_slice()).then(|| encrypted.to_vec())
    }

    /// A 1602 or 1605: the new session replaces the old one; files staged under
    /// another id and an upload in progress are discarded (`discards`, seen).
    fn open_session(&mut self, s: usize, id: ClientId, sealed: Option<Vec<u8>>, discards: Vec<UploadId>) {
        let ledger = &self.ledger;
        let m = &mut self.slots[s].model;
        let mut expected = Vec::new();
        if m.session.is_some_and(|(old, _)| old != id) {
            expected.extend(m.staged.drain(..).filter(|f| !f.retried).map(|f| f.upload));
        }
        // An upload is discarded only if some of its content reached the worker.
        if let MUpload::Receiving { id: u, .. } = m.upload {
            expected.extend(ledger.contains_key(&u).then_some(u));
        }
        assert!(!matches!(m.upload, MUpload::Finishing { .. }), "a new session while the last packet is out");
        m.upload = MUpload::Idle;
        m.session = Some((id, None));
        m.sealed = sealed;
        assert_eq!(discards, sorted(expected), "discards of a new session");
        assert!(self.slots[s].proto.session.as_ref().is_some_and(|x| x.id == id));
    }

    fn on_crc(
        &mut self,
        s: usize,
        hid: ClientId,
        name: NameField,
        code: Code,
        replies: Vec<Response>,
        jobs: &[Job],
    ) {
        let ack_retry = self.ack_retry;
        let m = &mut self.slots[s].model;
        // Matched by the path the name stands for (the staged name is normalized).
        let path = normalize_path(name.bytes()).ok();
        let idx = path.and_then(|n| m.staged.iter().position(|f| f.name == n.as_str()));
        let (Some(idx), true) = (idx, m.session.is_some_and(|(id, _)| id == hid)) else {
            assert_eq!(replies, vec![Response::GeneralError], "{code:?} without a session or a staged file");
            assert!(jobs.is_empty());
            return;
        };
        let f = m.staged[idx].clone();
        match code {
            Code::CrcOk if f.retried => {
                assert_eq!(replies, vec![Response::GeneralError], "1029 after 1030");
                assert!(jobs.is_empty());
            }
            Code::CrcOk => {
                assert!(replies.is_empty(), "1029 answered before the commit: {replies:?}");
                let [Job::Commit { conn, upload, client, name: n }] = jobs else {
                    panic!("1029 without a Commit job")
                };
                assert_eq!((*conn, *upload, *client, n), (m.conn, f.upload, hid, &f.name));
                m.staged.remove(idx);
                m.owed = Owed::Commit { name: f.name, upload: f.upload };
            }
            Code::CrcRetry => {
                let want = if ack_retry { vec![Response::Ack { id: hid }] } else { vec![] };
                assert_eq!(replies, want, "1030 (--ack-retry {ack_retry})");
                let expected = if f.retried { vec![] } else { vec![f.upload] };
                assert_eq!(discards_only(jobs), expected);
                m.staged[idx].retried = true;
                self.stats.retried += 1;
            }
            _ => {
                assert_eq!(replies, vec![Response::Ack { id: hid }], "1031");
                let [Job::Discard { upload, failed: Some((client, n)) }] = jobs else {
                    panic!("1031 without a Discard recording the failure")
                };
                assert_eq!((*upload, *client, n), (f.upload, hid, &f.name));
                m.staged.remove(idx);
                self.stats.aborted += 1;
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    #[allow(clippy::too_many_arguments)]
    fn on_packet(
        &mut self,
        s: usize,
        hid: ClientId,
        ph: PacketHeader,
        content_len: u64,
        conforming: bool,
        replies: Vec<Response>,
        jobs: &[Job],
    ) {
        let max_file_size = self.max_file_size;
        let slot = &mut self.slots[s];
        let m = &mut slot.model;
        let (k, n) = (ph.packet_number, ph.total_packets);
        if let MUpload::Ended { field, next, total, refused } = &m.upload {
            // A refused upload: every later packet (a packet 1 is new: no input
            // here reaches the 65,536 packets a wrapped counter needs). A
            // received one: only its empty chunk n+1 of n.
            let same = field.bytes() == ph.file_name.bytes() && k == *next && n == *total;
            let trailer = !*refused
                && k == n.wrapping_add(1)
                && ph.orig_file_size == 0
                && (content_len == 0 || content_len == 16);
            if same && ((*refused && k != 1) || trailer) {
                assert!(replies.is_empty() && jobs.is_empty(), "a swallowed packet was answered or sent on");
                assert_eq!(slot.proto.incoming, Some(Incoming::Drain { len: content_len }));
                let (field, refused) = (field.clone(), *refused);
                m.upload = MUpload::Ended { field, next: k.wrapping_add(1), total: n, refused };
                self.stats.packets_skipped += u32::from(refused);
                self.stats.trailers += u32::from(!refused);
                return;
            }
            m.upload = MUpload::Idle;
        }
        let session = m.session.filter(|(id, _)| *id == hid);
        let name = normalize_path(ph.file_name.bytes()).ok().map(|p| p.as_str().to_string());
        let receiving = match &m.upload {
            MUpload::Receiving { id, field, total, next, conforming } => {
                Some((*id, field.clone(), *total, *next, *conforming))
            }
            _ => None,
        };
        // When the packet must be accepted: the rules the model knows, and sizes
        // that the generator built to follow the packet conventions.
        let must_accept = session.is_some()
            && conforming
            && if k == 1 {
                name.is_some() && u64::from(ph.orig_file_size) <= max_file_size
            } else {
                receiving
                    .as_ref()
                    .is_some_and(|(_, f, t, nx, c)| *c && *f == ph.file_name && *t == n && *nx == k)
            };
        let pjobs = packet_jobs(jobs);
        let others: Vec<Job> = jobs.iter().filter(|j| !is_packet_job(j)).map(clone_discard).collect();
        let discards = discards_only(&others);
        if !replies.is_empty() {
            // Refused: one 1607, the upload in progress dropped, the rest of this one skipped.
            assert_eq!(replies, vec![Response::GeneralError], "a refused packet");
            assert!(pjobs.is_empty(), "a refused packet went to the worker");
            assert!(!must_accept, "packet {k}/{n} follows the rules but was refused");
            assert_eq!(
                slot.proto.incoming,
                Some(Incoming::Drain { len: content_len }),
                "refused content is dropped"
            );
            let mut expected: Vec<UploadId> = receiving.iter().map(|r| r.0).collect();
            // A packet 1 that passes the session, numbering, name and size checks
            // replaces a staged copy of its name even if its sizes are then refused
            // (the client has started that file over).
            let starts = session.is_some() && k == 1 && u64::from(ph.orig_file_size) <= max_file_size;
            if let (Some(name), true) = (&name, starts) {
                if let Some(i) = m.staged.iter().position(|f| f.name == *name) {
                    let old = m.staged.remove(i).expect("index");
                    if !old.retried {
                        expected.push(old.upload);
                    }
                }
            }
            assert_eq!(discards, sorted(expected), "a refused packet drops the upload in progress");
            m.upload = MUpload::Ended {
                field: ph.file_name.clone(),
                next: k.wrapping_add(1),
                total: n,
                refused: true,
            };
            self.stats.packets_refused += 1;
            return;
        }
        let Some((sid, _)) = session else {
            panic!("a packet admitted without this connection's session key")
        };
        // The upload the state machine streams this packet's content to.
        let upload = match &slot.proto.upload {
            Upload::Receiving(r) => r.upload,
            Upload::Finishing { upload, .. } => *upload,
            _ => panic!("packet {k}/{n} admitted with no upload in the state machine"),
        };
        if k == 1 {
            let Some(name) = name else { panic!("a packet 1 with a bad file name was accepted") };
            assert!(
                u64::from(ph.orig_file_size) <= max_file_size,
                "a file over --max-file-size was accepted"
            );
            assert!(!self.ledger.contains_key(&upload), "upload id {upload} reused");
            let mut expected: Vec<UploadId> = receiving.iter().map(|r| r.0).collect();
            if let Some(i) = m.staged.iter().position(|f| f.name == name) {
                let old = m.staged.remove(i).expect("index");
                if !old.retried {
                    expected.push(old.upload);
                }
            }
            assert_eq!(discards, sorted(expected), "a new upload drops the previous one and the staged copy");
            m.upload =
                MUpload::Receiving { id: upload, field: ph.file_name.clone(), total: n, next: 2, conforming };
        } else {
            assert!(discards.is_empty());
            let Some((id, field, total, next, was)) = receiving else {
                panic!("packet {k} with no upload in progress")
            };
            assert_eq!(
                (upload, &field, total, next),
                (id, &ph.file_name, n, k),
                "packet out of sequence accepted"
            );
            m.upload = MUpload::Receiving {
                id,
                field,
                total,
                next: next.wrapping_add(1),
                conforming: was && conforming,
            };
        }
        let _ = sid;
        // No input here sends a file big enough to wrap its counter: a packet
        // numbered as the total ends the upload, or is refused.
        let ends = k == n || (k == 1 && n == 0 && ph.orig_file_size == 0 && content_len == 16);
        slot.streaming = Some(Streaming { upload, k, n, first: true, ends });
        if content_len == 0 {
            // An empty packet goes to the worker at once, as one empty piece.
            assert_eq!(slot.proto.incoming, None);
            assert!(pjobs.len() == 1, "an empty packet makes one packet job");
            self.check_piece(s, pjobs.first().copied(), &[], true);
        } else {
            assert!(pjobs.is_empty(), "content went to the worker before it was read");
            assert_eq!(slot.proto.incoming, Some(Incoming::Stream { len: content_len }));
        }
    }

    // -- the fake worker ---------------------------------------------------------

    /// Process up to `n` jobs in order and hand their completions to the loop.
    fn deliver(&mut self, n: usize) {
        for _ in 0..n {
            let Some(job) = self.queue.pop_front() else { return };
            if let Some(done) = self.work(job) {
                self.complete(done);
            }
            self.check_global();
        }
    }

    /// What the real worker answers (src/worker/mod.rs), the outcome chosen by the input.
    fn work(&mut self, job: Job) -> Option<Completion> {
        let fail = |input: &mut Input<'_>| input.u8() % 8 == 7;
        match job {
            Job::Register { conn, id, name: _ } => {
                Some(Completion::Registered { conn, id, ok: !fail(&mut self.input) })
            }
            Job::SetKey { conn, id, der } => {
                Some(Completion::KeySaved { conn, id, ok: !fail(&mut self.input), der })
            }
            Job::Touch { .. } => None,
            Job::Packet(p) => {
                let content = p.content.len() as u64;
                if let Some(start) = &p.start {
                    assert!(!self.worker.contains_key(&p.upload));
                    self.worker
                        .insert(p.upload, WUpload { client: start.client, ciphertext: 0, received: false });
                }
                let outcome = match self.worker.get_mut(&p.upload) {
                    None => {
                        assert!(
                            self.failed.contains(&p.upload),
                            "a packet of upload {} the worker never had",
                            p.upload
                        );
                        PacketOutcome::Ignored
                    }
                    Some(u) => {
                        assert!(!u.received, "a packet after the last one reached the worker");
                        u.ciphertext += content;
                        if fail(&mut self.input) {
                            self.worker.remove(&p.upload);
                            self.failed.insert(p.upload);
                            PacketOutcome::Failed("decryption failed".into())
                        } else if p.last {
                            u.received = true;
                            let cksum = self.input.u32();
                            PacketOutcome::Received {
                                cksum,
                                ciphertext_len: u.ciphertext,
                                plain_len: u.ciphertext.saturating_sub(1),
                            }
                        } else {
                            PacketOutcome::Accepted
                        }
                    }
                };
                Some(Completion::Packet {
                    conn: p.conn,
                    upload: p.upload,
                    buffer: p.content,
                    last: p.last,
                    outcome,
                })
            }
            Job::Commit { conn, upload, client, name: _ } => {
                let u = self.worker.remove(&upload);
                assert!(
                    u.is_some_and(|u| u.client == client && u.received),
                    "a commit of upload {upload}, which is not staged for this client"
                );
                let usage = Default::default();
                Some(Completion::Committed { conn, upload, ok: !fail(&mut self.input), client, usage })
            }
            Job::Discard { upload, failed: _ } => {
                self.worker.remove(&upload);
                None
            }
            Job::Shutdown => unreachable!(),
        }
    }

    /// A completion reaches the loop: its connection, if still open, is
    /// checked against the model and read on.
    fn complete(&mut self, done: Completion) {
        let conn = completion_conn(&done);
        // The registry follows the database whether or not the connection is open.
        match &done {
            Completion::Registered { conn, id, ok } => {
                if *ok {
                    if let Some(c) = self.clients.get_mut(id) {
                        c.durable = true;
                    }
                    if self.slots[conn.key].model.conn == *conn {
                        self.set_registrant(*conn, *id);
                    }
                } else if let Some(c) = self.clients.remove(id) {
                    self.names.remove(&c.name);
                    self.order.retain(|x| x != id);
                }
            }
            Completion::KeySaved { id, ok: true, der, .. } => {
                if let Some(c) = self.clients.get_mut(id) {
                    c.key = Some(der.clone());
                }
            }
            Completion::KeySaved { conn, id, ok: false, .. } => {
                if let Some(c) =
                    self.clients.get_mut(id).filter(|c| c.owner == Some(*conn) && c.key.is_none())
                {
                    c.owner = None;
                }
            }
            _ => {}
        }
        let live = self.slots[conn.key].model.conn == conn;
        let summary = match &done {
            Completion::Packet { upload, last, outcome, .. } => Some((*upload, *last, outcome.clone())),
            _ => None,
        };
        let kind = match &done {
            Completion::Registered { id, ok, .. } => (0, *id, *ok),
            Completion::KeySaved { id, ok, .. } => (1, *id, *ok),
            Completion::Packet { .. } => (2, [0; 16], true),
            Completion::Committed { ok, .. } => (3, [0; 16], *ok),
        };
        let slot = &mut self.slots[conn.key];
        trace!("  completion {kind:?} {summary:?} for {conn:?} (live {live})");
        let flow = self.core.on_completion(live.then_some(&mut slot.proto), done);
        let jobs = std::mem::take(&mut self.core.jobs);
        if !live {
            assert_eq!(flow, Flow::Continue, "a completion for a closed connection");
            assert!(jobs.is_empty(), "a completion for a closed connection issued jobs");
            return;
        }
        assert_eq!(flow, Flow::Resume);
        let replies = take_replies(&mut slot.proto.out);
        let m = &mut slot.model;
        match kind {
            (0, id, ok) => {
                assert_eq!(m.owed, Owed::Register(id));
                m.owed = Owed::Nothing;
                assert!(jobs.is_empty());
                if ok {
                    assert_eq!(replies, vec![Response::RegistrationOk { id }]);
                    m.registered = Some(id);
                    self.stats.registered += 1;
                } else {
                    assert_eq!(replies, vec![Response::GeneralError]);
                }
            }
            (1, id, ok) => {
                assert_eq!(m.owed, Owed::Key(id));
                m.owed = Owed::Nothing;
                if ok {
                    let [Response::KeyAccepted { id: rid, encrypted_key }] = &replies[..] else {
                        panic!("a saved key not answered 1602: {replies:?}")
                    };
                    assert_eq!(*rid, id);
                    let der = self.clients.get(&id).and_then(|c| c.key.clone()).expect("the key is on file");
                    let key = self.session_key(&der, encrypted_key);
                    self.open_session(conn.key, id, key, discards_only(&jobs));
                    self.stats.keys_accepted += 1;
                } else {
                    assert_eq!(replies, vec![Response::GeneralError]);
                    assert!(jobs.is_empty());
                }
            }
            (3, _, ok) => {
                let Owed::Commit { .. } = m.owed else { panic!("a commit completion nobody waits for") };
                m.owed = Owed::Nothing;
                assert!(jobs.is_empty());
                if ok {
                    let (sid, _) = m.session.expect("a commit needs a session");
                    assert_eq!(replies, vec![Response::Ack { id: sid }], "1029 committed: 1604");
                    self.stats.stored += 1;
                } else {
                    assert_eq!(replies, vec![Response::GeneralError], "1029 not committed: 1607");
                }
            }
            _ => {
                let (upload, last, outcome) = summary.expect("a packet completion");
                if last {
                    assert_eq!(m.owed, Owed::LastPacket(upload), "the last packet's outcome is awaited");
                }
                match outcome {
                    PacketOutcome::Accepted => {
                        assert!(replies.is_empty() && jobs.is_empty());
                    }
                    PacketOutcome::Received { cksum, ciphertext_len, .. } => {
                        let MUpload::Finishing { id, field, total, next } = m.upload.clone() else {
                            panic!("a file received while the model has no upload finishing")
                        };
                        assert_eq!(id, upload);
                        let (sid, _) = m.session.expect("an upload needs a session");
                        assert_eq!(
                            replies,
                            vec![Response::FileReceived {
                                id: sid,
                                content_size: ciphertext_len as u32,
                                file_name: field.0,
                                cksum
                            }]
                        );
                        let name =
                            normalize_path(field.bytes()).expect("accepted at packet 1").as_str().to_string();
                        m.staged.push_back(MStaged { name, upload, retried: false });
                        let mut expected = vec![];
                        if m.staged.len() > 16 {
                            let old = m.staged.pop_front().expect("non-empty");
                            if !old.retried {
                                expected.push(old.upload);
                            }
                        }
                        assert_eq!(discards_only(&jobs), expected);
                        m.upload = MUpload::Ended { field, total, next, refused: false };
                        m.owed = Owed::Nothing;
                        self.stats.received += 1;
                    }
                    PacketOutcome::Failed(why) => {
                        // Decryption failures cost the client a token each (issue 8:
                        // forged ciphertext); past 10, the session ends and files
                        // staged under it are dropped.
                        let mut expected = Vec::new();
                        if let (true, Some((sid, _))) = (why.starts_with("decryption failed"), m.session) {
                            let n = self.decrypt_failures.entry(sid).or_insert(0);
                            *n += 1;
                            if *n > DECRYPT_FAILURE_BURST {
                                m.session = None;
                                m.sealed = None;
                                expected.extend(m.staged.drain(..).filter(|f| !f.retried).map(|f| f.upload));
                            }
                        }
                        assert_eq!(
                            discards_only(&jobs),
                            sorted(expected),
                            "discards of a decryption failure"
                        );
                        assert_eq!(
                            slot.proto.session.is_some(),
                            m.session.is_some(),
                            "session after a failure"
                        );
                        self.stats.worker_failures += 1;
                        let current = match &m.upload {
                            MUpload::Receiving { id, field, total, next, .. }
                            | MUpload::Finishing { id, field, total, next }
                                if *id == upload =>
                            {
                                let (field, total, next) = (field.clone(), *total, *next);
                                m.upload = MUpload::Ended { field, total, next, refused: true };
                                true
                            }
                            _ => false,
                        };
                        let want = if current { vec![Response::GeneralError] } else { vec![] };
                        assert_eq!(replies, want, "a failed upload is answered once, if it is current");
                        if last {
                            m.owed = Owed::Nothing;
                        }
                    }
                    PacketOutcome::Ignored => {
                        assert!(replies.is_empty() && jobs.is_empty());
                        if last {
                            m.owed = Owed::Nothing;
                            if matches!(&m.upload, MUpload::Finishing { id, .. } if *id == upload) {
                                m.upload = MUpload::Idle;
                            }
                        }
                    }
                }
            }
        }
        self.enqueue(jobs);
        self.pump(conn.key);
    }

    // -- closes, purges, the end -------------------------------------------------

    /// The connection closes (EOF, error, deadline): its uploads are discarded
    /// and a new connection takes the slot.
    fn close(&mut self, s: usize) {
        trace!("  close slot {s}");
        let serial = self.next_serial;
        self.next_serial += 1;
        let old = std::mem::replace(&mut self.slots[s], Slot::new(s, serial));
        self.core.closed(&old.proto);
        for c in self.clients.values_mut().filter(|c| c.registrant == Some(old.model.conn)) {
            c.registrant = None;
        }
        let jobs = std::mem::take(&mut self.core.jobs);
        let m = &old.model;
        let mut expected: Vec<UploadId> = m.staged.iter().filter(|f| !f.retried).map(|f| f.upload).collect();
        if let MUpload::Receiving { id, .. } | MUpload::Finishing { id, .. } = m.upload {
            // Not when the close came while packet 1's first piece was being read.
            expected.extend(self.ledger.contains_key(&id).then_some(id));
        }
        assert_eq!(discards_only(&jobs), sorted(expected), "a close discards the connection's uploads");
        if !expected_is_quiet(m) {
            self.stats.busy_closes += 1;
        }
        // A piece being read returns its grant as the old slot is dropped.
        drop(old);
        self.enqueue(jobs);
    }

    /// The stale-upload deadline, now (nothing is stale) or a day later (everything is).
    fn purge(&mut self, s: usize, future: bool) {
        let now = Instant::now() + if future { Duration::from_secs(86_400) } else { Duration::ZERO };
        let slot = &mut self.slots[s];
        self.core.purge_stale(&mut slot.proto, now);
        let jobs = std::mem::take(&mut self.core.jobs);
        assert!(take_replies(&mut slot.proto.out).is_empty());
        let m = &mut slot.model;
        let mut expected = Vec::new();
        if future {
            expected.extend(m.staged.drain(..).filter(|f| !f.retried).map(|f| f.upload));
            if let MUpload::Receiving { id, .. } = m.upload {
                expected.extend(self.ledger.contains_key(&id).then_some(id));
                m.upload = MUpload::Idle;
            }
        }
        assert_eq!(discards_only(&jobs), sorted(expected), "stale purge");
        self.enqueue(jobs);
    }

    /// Invariants that hold between any two steps.
    fn check_global(&self) {
        let at_worker: usize = self
            .queue
            .iter()
            .map(|j| match j {
                Job::Packet(p) => p.content.len(),
                _ => 0,
            })
            .sum();
        let held: usize = self.slots.iter().map(Slot::reserved).sum();
        assert_eq!(self.core.budget.used(), at_worker + held, "budget in use vs content bytes held");
        for slot in &self.slots {
            let (p, m) = (&slot.proto, &slot.model);
            let mine = |j: &&Job| match j {
                Job::Packet(x) => x.conn == m.conn,
                _ => false,
            };
            assert_eq!(p.packets_in_flight, self.queue.iter().filter(mine).count(), "packets_in_flight");
            assert_eq!(p.awaiting == Awaiting::Nothing, m.owed == Owed::Nothing, "awaiting vs the model");
            let waited = match &m.owed {
                Owed::Nothing => true,
                Owed::Register(id) => self
                    .queue
                    .iter()
                    .any(|j| matches!(j, Job::Register { conn, id: x, .. } if *conn == m.conn && x == id)),
                Owed::Key(id) => self
                    .queue
                    .iter()
                    .any(|j| matches!(j, Job::SetKey { conn, id: x, .. } if *conn == m.conn && x == id)),
                Owed::Commit { upload, .. } => {
                    self.queue.iter().any(|j| matches!(j, Job::Commit { upload: u, .. } if u == upload))
                }
                Owed::LastPacket(u) => {
                    self.queue.iter().any(|j| matches!(j, Job::Packet(x) if x.upload == *u && x.last))
                }
            };
            assert!(waited, "the connection waits for a reply no job will bring: {:?}", m.owed);
        }
    }

    fn finish(&mut self) {
        // Every completion delivered (a delivery may read frames still buffered).
        for _ in 0..100_000 {
            if self.queue.is_empty() {
                break;
            }
            self.deliver(1);
        }
        assert!(self.queue.is_empty());
        for slot in &self.slots {
            assert!(slot.proto.awaiting == Awaiting::Nothing, "awaiting after every completion");
            assert_eq!(slot.proto.packets_in_flight, 0);
        }
        assert_eq!(self.core.budget.used(), self.slots.iter().map(Slot::reserved).sum::<usize>());
        self.close(0);
        self.close(1);
        self.deliver(usize::MAX);
        self.check_global();
        assert_eq!(self.core.budget.used(), 0, "budget left in use with nothing in flight");
        assert!(
            self.worker.is_empty(),
            "uploads left at the worker: {:?}",
            self.worker.keys().collect::<Vec<_>>()
        );
        for (u, l) in &self.ledger {
            assert!(l.discarded || l.committed || self.failed.contains(u), "upload {u} never ended");
        }
    }
}

/// A Discard or Touch job, copied (jobs are not `Clone`: packets own buffers).
fn clone_discard(j: &Job) -> Job {
    match j {
        Job::Discard { upload, failed } => Job::Discard { upload: *upload, failed: failed.clone() },
        Job::Touch { id } => Job::Touch { id: *id },
        other => panic!("unexpected job {}", job_name(other)),
    }
}

fn expected_is_quiet(m: &MConn) -> bool {
    m.owed == Owed::Nothing
        && matches!(m.upload, MUpload::Idle | MUpload::Ended { .. })
        && m.staged.iter().all(|f| f.retried)
}

// ---------------------------------------------------------------------------
// 6. Path normalization
// ---------------------------------------------------------------------------
//
// Input: the bytes of a file name field before its NUL, as a client sends a
// path (issue 10: `/home/u/a.txt`, `C:\Users\a.txt`, `docs/a.txt`).
//
// Invariants: no panic; invalid UTF-8 is refused; an input with a `.` or `..`
// component (split on either separator) is always refused; an accepted path
// has the shape `check_normalized_path` demands, was made from the input only
// by dropping leading roots and drive prefixes and empty components (and
// `stripped` says whether a root or drive was dropped); normalizing it again
// gives it back unchanged.

/// Leading roots or drive prefixes: `/`, `\`, `C:` in any repetition.
fn starts_like_root(s: &str) -> bool {
    let b = s.as_bytes();
    b.first().is_some_and(|&c| c == b'/' || c == b'\\')
        || (b.len() >= 2 && b[0].is_ascii_alphabetic() && b[1] == b':')
}

/// Only drive prefixes (`C:D:`), or nothing.
fn only_drives(s: &str) -> bool {
    s.as_bytes().chunks(2).all(|c| c.len() == 2 && c[0].is_ascii_alphabetic() && c[1] == b':')
}

/// The shape of every accepted path, checked without the module's helpers.
pub fn check_normalized_path(p: &NormalizedPath) {
    let s = p.as_str();
    assert!(!s.is_empty() && s.len() <= MAX_PATH_LEN, "{s:?}");
    assert!(!s.starts_with('/') && !s.contains('\\'), "{s:?}");
    assert!(!starts_like_root(s), "a root or drive left at the start: {s:?}");
    assert!(!s.chars().any(char::is_control), "a control character (or NUL) in {s:?}");
    let bidi = |c: char| ('\u{202A}'..='\u{202E}').contains(&c) || ('\u{2066}'..='\u{2069}').contains(&c);
    assert!(!s.chars().any(bidi), "a bidi control in {s:?}");
    let comps: Vec<&str> = p.components().collect();
    assert_eq!(comps, s.split('/').collect::<Vec<_>>());
    for c in &comps {
        assert!(!c.is_empty() && c.len() <= MAX_FILE_NAME, "component {c:?} of {s:?}");
        assert!(*c != "." && *c != "..", "a dot component in {s:?}");
        assert_eq!(validate_file_name(c.as_bytes()), Ok(*c));
    }
    // Joined under files/<id>/, only ordinary components follow the base: it
    // cannot climb out of it, lexically.
    let base = Path::new("files/0123456789abcdef0123456789abcdef");
    let joined = base.join(s);
    let below = joined.strip_prefix(base).expect("the join stays under the base");
    let kinds: Vec<Component<'_>> = below.components().collect();
    assert_eq!(kinds.len(), comps.len(), "{s:?}");
    assert!(kinds.iter().all(|k| matches!(k, Component::Normal(_))), "{s:?}: {kinds:?}");
}

/// Target 6: see above.
pub fn path_normalize(data: &[u8]) {
    let result = normalize_path(data);
    let Ok(text) = std::str::from_utf8(data) else {
        assert_eq!(result, Err(NameError::NotUtf8));
        return;
    };
    let input: Vec<&str> = text.split(['/', '\\']).filter(|c| !c.is_empty()).collect();
    if input.iter().any(|c| *c == "." || *c == "..") {
        assert!(result.is_err(), "a dot component accepted: {text:?} -> {result:?}");
    }
    let p = match result {
        Ok(p) => p,
        Err(e) => {
            let _ = e.to_string();
            return;
        }
    };
    check_normalized_path(&p);
    assert_eq!(p.stripped(), starts_like_root(text), "{text:?}");
    // The output is the input's last components; what went before them was
    // drive prefixes (the roots and empty components are not in `input`).
    let out: Vec<&str> = p.components().collect();
    let cut = input.len().checked_sub(out.len()).expect("no component added");
    assert_eq!(out[1..], input[cut + 1..], "{text:?}");
    let dropped = input[cut].strip_suffix(out[0]).expect("the first component is kept whole");
    assert!(input[..cut].iter().all(|c| only_drives(c)) && only_drives(dropped), "{text:?}");
    let again = normalize_path(p.as_str().as_bytes()).expect("a normalized path is accepted again");
    assert_eq!(again.as_str(), p.as_str());
    assert!(!again.stripped());
}
