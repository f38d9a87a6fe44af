//! Target 3: the packet-sequence validator (`plan_packet` behind the
//! numbering and name checks of the server's `on_packet`).

use std::time::Instant;

use backupd::crypto::ciphertext_len;
use backupd::protocol::{normalize_path, NameField, PacketHeader, NAME_FIELD_LEN};
use backupd::server::fuzzing::{plan_packet, wraps_to_one, PacketStep, Receiving};

use super::Input;

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
    /// Per-chunk so far (every packet a whole stream of its own): packet 1's orig.
    chunk: Option<u32>,
    /// The last packet was a full chunk numbered as the total: the end waits
    /// for what follows (the empty chunk n+1 ends it; a non-empty one means
    /// the count goes on).
    pending: bool,
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
        let op = choose_packet(model.as_ref(), mode, raw_size, small, sel);
        admit(&mut model, &op, max_file_size, &mut uploads);
        let Some(m) = model.as_mut() else { continue };
        let before = m.recv.clone();
        let step = match plan_packet(&mut m.recv, &op.ph, op.content_len, max_file_size) {
            Ok(s) => s,
            Err(why) => {
                assert!(!why.is_empty());
                assert_eq!(m.recv, before, "a refused packet changed the upload's state");
                stats.refused += 1;
                model = None;
                continue;
            }
        };
        let numbered_last = op.ph.packet_number == op.ph.total_packets;
        let first = m.packets == 0;
        advance(m, &op, &before, step, numbered_last);
        check_totals(m, max_file_size);
        let empty_file = check_end(m, &op, step, numbered_last, first);
        if step.last {
            count_file(&mut stats, m, &op, empty_file);
            model = None;
        }
    }
    stats
}

/// One packet as the input chose it, with the lengths it implies.
struct Op {
    ph: PacketHeader,
    /// The plaintext size its header announces, and that size's ciphertext length.
    orig: u32,
    whole: u64,
    /// The content bytes that follow its fixed fields.
    content_len: u64,
}

/// The packet of one operation: numbering, sizes and name mostly what the
/// server expects, sometimes not.
fn choose_packet(model: Option<&Model>, mode: u8, raw_size: u32, small: u16, sel: u8) -> Op {
    let open = model.and_then(|m| m.open);
    let expected_next = model.map(|m| m.recv.next()).unwrap_or(1);
    let total_now = model.map(|m| m.recv.total());

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
    let last_len = model.map(|m| m.recv.last_stream_len()).unwrap_or(0);
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
    Op { ph, orig, whole, content_len }
}

/// The checks of `on_packet` before `plan_packet`: a packet 1 (not a wrap)
/// starts a new upload, if its name and size pass; a packet that is not the
/// upload's next (by name, total and number) ends it. `model` is left None
/// when the packet goes no further.
fn admit(model: &mut Option<Model>, op: &Op, max_file_size: u64, uploads: &mut u32) {
    let ph = &op.ph;
    let wrapped = model.as_ref().is_some_and(|m| wraps_to_one(&m.recv, ph, op.content_len));
    if wrapped {
        let m = model.as_ref().expect("wrapped");
        let chunk_goes_on = m.chunk.is_some() && op.content_len > 0;
        assert!(
            m.packets >= WRAP - 1 && (m.open.is_some() || op.content_len == 0 || chunk_goes_on),
            "a false wrap"
        );
    }
    if ph.packet_number == 1 && !wrapped {
        *model = None;
        let Ok(path) = normalize_path(ph.file_name.bytes()) else { return };
        if u64::from(ph.orig_file_size) > max_file_size {
            return;
        }
        *uploads += 1;
        let name = path.as_str().to_string();
        let recv =
            Receiving::new(u64::from(*uploads), name, ph.file_name.clone(), ph.total_packets, Instant::now());
        *model = Some(Model {
            recv,
            allowed: 0,
            accepted: 0,
            plain: 0,
            open: None,
            streams: 0,
            packets: 0,
            spanned: false,
            chunk: None,
            pending: false,
        });
    }
    let next_of_upload = |m: &Model| {
        m.recv.name_field().bytes() == ph.file_name.bytes()
            && m.recv.total() == ph.total_packets
            && m.recv.next() == ph.packet_number
    };
    if model.as_ref().is_some_and(|m| !next_of_upload(m)) {
        *model = None;
    }
}

/// An accepted packet, step by step against the model: its content_size
/// follows a legal convention, a stream begins only where one may, and a
/// stream ends exactly when its ciphertext is complete.
fn advance(m: &mut Model, op: &Op, before: &Receiving, step: PacketStep, numbered_last: bool) {
    let Op { ref ph, orig, whole, content_len } = *op;
    let content_size = ph.content_size;
    m.packets += 1;
    assert_eq!(m.recv.packets(), m.packets);
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
                assert!(content_size == 0 || u64::from(content_size) == before.last_stream_len());
            }
            Some((_, w, _)) => {
                assert!(!step.last, "a stream left incomplete at the last packet");
                assert!(content_size == 0 || u64::from(content_size) == w);
            }
        }
    } else {
        assert!(m.open.is_some(), "content accepted outside any stream");
    }
    advance_stream(m, orig, content_len, step);
}

/// The open stream takes the packet's content; it ends exactly when its
/// ciphertext is complete.
fn advance_stream(m: &mut Model, orig: u32, content_len: u64, step: PacketStep) {
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
            assert_eq!(m.recv.last_stream_len(), *w, "the stream just completed is the last one");
            m.open = None;
        } else {
            assert_eq!(step.end_segment, None, "stream ended at {got} of {w} bytes");
        }
    }
}

/// What holds after every accepted packet: the server's view matches the
/// model's, no more ciphertext than the streams allow, sizes within the limit.
fn check_totals(m: &Model, max_file_size: u64) {
    assert_eq!(m.recv.open_stream(), m.open);
    assert!(m.accepted <= m.allowed, "{} ciphertext bytes accepted, {} allowed", m.accepted, m.allowed);
    assert_eq!(m.recv.plain_total(), m.plain);
    assert!(m.plain <= max_file_size);
    if m.spanned {
        assert_eq!(m.streams, 1, "a spanning stream mixed with per-packet streams");
    }
}

/// The upload ends by bytes: at the packet numbered as the total that
/// leaves no stream open (or as an empty file in packet 1 of 0); one
/// numbered as the total with a stream open is a wrap, which needs room for
/// 65,535 more packets. Returns whether this is an empty file's packet.
///
/// Per-chunk uploads (every packet a whole stream of its own, all of packet
/// 1's size): a full chunk numbered as the total (not packet 1) leaves the
/// end pending instead; the empty chunk that follows ends the file.
fn check_end(m: &mut Model, op: &Op, step: PacketStep, numbered_last: bool, first: bool) -> bool {
    let ph = &op.ph;
    let empty_file = m.packets == 1 && ph.total_packets == 0 && op.orig == 0;
    let whole_here = step.new_segment && step.end_segment.is_some();
    let chunk = match (first, whole_here) {
        (true, true) => Some(op.orig),
        (false, true) => m.chunk,
        _ => None,
    };
    let was_pending = std::mem::replace(&mut m.pending, false);
    m.chunk = chunk;
    match m.open {
        Some((_, w, got)) => {
            assert!(!step.last, "the upload ended with a stream open");
            assert!(!numbered_last || w - got >= WRAP - 1, "a wrap with {} bytes to come", w - got);
        }
        None => {
            let ends = numbered_last || empty_file || (was_pending && whole_here && op.orig == 0);
            let pending = ends && !first && op.orig > 0 && chunk == Some(op.orig) && !m.spanned;
            m.pending = pending;
            assert_eq!(
                step.last,
                ends && !pending,
                "packet {k} of {n} (pending before: {was_pending}, now: {pending})",
                k = ph.packet_number,
                n = ph.total_packets
            );
        }
    }
    empty_file
}

/// A file is complete at its last packet: every stream whole. Counted.
fn count_file(stats: &mut SequenceStats, m: &Model, op: &Op, empty_file: bool) {
    assert!(m.open.is_none());
    assert_eq!(m.accepted, m.allowed);
    assert!(m.streams >= 1);
    stats.files += 1;
    stats.spanning += u32::from(m.spanned);
    stats.per_packet += u32::from(m.streams > 1);
    stats.empty_tail += u32::from(op.content_len == 0);
    stats.wrapped += u32::from(m.packets >= WRAP);
    stats.empty_file += u32::from(empty_file);
}

/// As if 65,536 to 131,071 one-byte packets of the open stream had come (the
/// input chooses how many beyond 65,536, and, with its low bit, whether to
/// land just before the packet numbered as the total): allowed only when
/// the stream still has room for 65,535 more, so no packet skipped over
/// could have been refused or have ended the upload.
fn fast_forward(m: &mut Model, small: u16) {
    let Some((_, w, got)) = m.open.as_mut() else { return };
    let to_total = u64::from(m.recv.total().wrapping_sub(m.recv.next()));
    let skip = WRAP + if small & 1 == 0 { to_total } else { u64::from(small >> 1) };
    assert!(m.recv.open_stream().is_some(), "the model has a stream open, plan_packet none");
    if *w - *got < skip + WRAP - 1 {
        return;
    }
    assert!(m.recv.fast_forward(skip), "the stream has room for the packets skipped");
    *got += skip;
    m.packets += skip;
    m.accepted += skip;
    m.spanned = true;
}
