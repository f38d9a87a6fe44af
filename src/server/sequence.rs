//! The packet arithmetic of an upload, pure (no I/O, no clock): which CBC
//! streams a packet begins and ends and whether it is the upload's last
//! ([`plan_packet`]), when a packet numbered 1 continues an upload whose u16
//! counter wrapped ([`wraps_to_one`]), and which packets of an upload that
//! ended are swallowed silently ([`Ended`]). See docs/PROTOCOL.md, "How
//! backupd reads file packets" and "Clients in the field".
//!
//! Packet numbers and totals are u16 fields: a client with more than 65,535
//! packets sends them modulo 65,536. So the numbers only ever say "the next
//! one" (`next` wraps), and a packet numbered as the total ends the upload
//! only when the bytes agree: when no CBC stream is left open.

use crate::crypto::ciphertext_len;
use crate::protocol::{NameField, PacketHeader};

use super::state::{Receiving, Segment};

/// Packets between two packets that carry the same u16 number.
const WRAP: u64 = 1 << 16;

/// The ciphertext of an encrypted empty chunk: one block of padding.
const EMPTY_CHUNK: u64 = 16;

/// What the worker must do with a packet's CBC streams, and whether the
/// packet ends the upload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PacketStep {
    pub new_segment: bool,
    pub end_segment: Option<u64>,
    /// The upload's last packet: the file is complete with it.
    pub last: bool,
}

/// An upload's stream state, worked on as a copy and stored only when the
/// packet is accepted: a refused packet leaves the upload as it was.
struct Streams {
    segment: Option<Segment>,
    last_stream_len: u64,
    multi_packet_stream: bool,
    ciphertext_total: u64,
    plain_total: u64,
}

/// Check one packet (already known to be the upload's next, by name, total
/// and number) against the upload's sizes and decide its CBC steps; an
/// accepted packet advances `r` (its streams, its count, the number the next
/// packet must carry). On a refusal `r` is unchanged.
pub fn plan_packet(
    r: &mut Receiving,
    ph: &PacketHeader,
    content_len: u64,
    max_file_size: u64,
) -> Result<PacketStep, String> {
    let first = r.packets == 0;
    let mut s = Streams {
        segment: r.segment,
        last_stream_len: r.last_stream_len,
        multi_packet_stream: r.multi_packet_stream,
        ciphertext_total: r.ciphertext_total,
        plain_total: r.plain_total,
    };
    let (new_segment, end_segment) = match s.segment {
        Some(seg) => continue_stream(&mut s, seg, ph, content_len)?,
        None if content_len == 0 && !first => empty_last_packet(&s, ph)?,
        None => start_stream(&mut s, ph, content_len, first, max_file_size)?,
    };
    let mut last = ends_upload(&s, ph, first)?;
    // Per-chunk encryption (convention 3): each packet a whole stream.
    let whole_here = new_segment && end_segment.is_some();
    let chunk = match (first, whole_here) {
        (true, true) => Some(ph.orig_file_size),
        (false, true) => r.chunk,
        (_, false) => None,
    };
    let orig = ph.orig_file_size;
    // After a full chunk numbered as the total, the empty chunk per-chunk
    // clients send next (n+1 "of n") ends the file; a non-empty one goes on.
    if r.end_pending && whole_here && orig == 0 {
        last = true;
    }
    // A full chunk numbered as the total: the file's last, or the point
    // where a count past 65,535 wraps to the total. Decided by what follows
    // (see docs/PROTOCOL.md); never on packet 1 (a single-packet file).
    let end_pending = last && !first && orig > 0 && chunk == Some(orig) && !s.multi_packet_stream;
    if end_pending {
        last = false;
    }
    r.chunk = chunk;
    // The packet after a pending end that does not end the file: the count
    // goes on past the total.
    r.past_total |= r.end_pending && !last;
    r.end_pending = end_pending;
    r.segment = s.segment;
    r.last_stream_len = s.last_stream_len;
    r.multi_packet_stream = s.multi_packet_stream;
    (r.ciphertext_total, r.plain_total) = (s.ciphertext_total, s.plain_total);
    r.packets += 1;
    r.next = r.next.wrapping_add(1);
    Ok(PacketStep { new_segment, end_segment, last })
}

/// A packet inside a stream that spans packets (same file, same sizes): its CBC steps.
fn continue_stream(
    s: &mut Streams,
    mut seg: Segment,
    ph: &PacketHeader,
    content_len: u64,
) -> Result<(bool, Option<u64>), String> {
    let orig = ph.orig_file_size;
    // Inside a stream that spans packets: same file, same sizes.
    if content_len == 0 {
        return Err("empty packet inside the file's ciphertext".into());
    }
    if orig != seg.orig {
        return Err(format!("orig_file_size changed from {} to {orig} within the file", seg.orig));
    }
    if content_len > seg.remaining {
        return Err(format!(
            "packet content of {content_len} bytes exceeds the {} ciphertext bytes still expected",
            seg.remaining
        ));
    }
    check_content_size(ph.content_size, content_len, seg.whole)?;
    seg.remaining -= content_len;
    s.multi_packet_stream = true;
    if seg.remaining == 0 {
        s.segment = None;
        s.last_stream_len = seg.whole;
        Ok((false, Some(orig as u64)))
    } else {
        s.segment = Some(seg);
        Ok((false, None))
    }
}

/// An empty packet after the file's streams: its CBC steps (none).
fn empty_last_packet(s: &Streams, ph: &PacketHeader) -> Result<(bool, Option<u64>), String> {
    let numbered_last = ph.packet_number == ph.total_packets;
    // The empty last packet of clients that count the whole ciphertext in content_size.
    if !numbered_last {
        return Err("empty packet before the last one".into());
    }
    if ph.content_size as u64 != s.last_stream_len && ph.content_size != 0 {
        return Err(format!("empty last packet with content_size {}", ph.content_size));
    }
    Ok((false, None))
}

/// A packet that starts a new CBC stream: its CBC steps.
fn start_stream(
    s: &mut Streams,
    ph: &PacketHeader,
    content_len: u64,
    first: bool,
    max_file_size: u64,
) -> Result<(bool, Option<u64>), String> {
    let orig = ph.orig_file_size;
    // A new CBC stream starts with this packet.
    let whole = ciphertext_len(orig as u64);
    if whole > u32::MAX as u64 {
        return Err(format!("a ciphertext of {whole} bytes does not fit the 32-bit size of the 1603 reply"));
    }
    if !first && (s.multi_packet_stream || content_len != whole) {
        return Err(format!(
            "{content_len} bytes after the file's ciphertext was complete (packet {} of {})",
            ph.packet_number, ph.total_packets
        ));
    }
    if content_len > whole {
        return Err(format!(
            "packet content of {content_len} bytes exceeds the file's ciphertext size {whole}"
        ));
    }
    if content_len == 0 {
        return Err("first packet carries no content".into());
    }
    check_content_size(ph.content_size, content_len, whole)?;
    // Known as soon as the stream starts: refused before any of it is used.
    if s.ciphertext_total + whole > u32::MAX as u64 {
        return Err(format!(
            "the upload's ciphertext would exceed {} bytes, the 32-bit size of the 1603 reply",
            u32::MAX
        ));
    }
    s.ciphertext_total += whole;
    s.plain_total += orig as u64;
    if s.plain_total > max_file_size {
        return Err(format!("file exceeds the {max_file_size}-byte limit"));
    }
    if content_len == whole {
        s.last_stream_len = whole;
        Ok((true, Some(orig as u64)))
    } else {
        s.segment = Some(Segment { orig, whole, remaining: whole - content_len });
        Ok((true, None))
    }
}

/// Whether the packet, its streams planned, ends the upload.
fn ends_upload(s: &Streams, ph: &PacketHeader, first: bool) -> Result<bool, String> {
    let numbered_last = ph.packet_number == ph.total_packets;
    let orig = ph.orig_file_size;
    let last = match s.segment {
        // Numbered as the total with the stream still open: the counter
        // wraps, which needs at least 65,535 more non-empty packets.
        Some(seg) if numbered_last && seg.remaining < WRAP - 1 => {
            return Err("last packet arrived before the file's ciphertext was complete".into());
        }
        Some(_) => false,
        // "Packet 1 of 0" carrying an encrypted empty chunk: an empty file
        // from a client that numbers its trailing empty chunk n+1 of n. Any
        // other whole stream in it would be per-packet encryption counting
        // 65,536 packets or more, which the numbers cannot tell apart from
        // fewer (see docs/PROTOCOL.md).
        None if first && ph.total_packets == 0 => {
            if orig != 0 {
                return Err(format!(
                    "packet 1 of 0 carries a whole stream of {orig} bytes: neither an empty file nor the start of a longer one"
                ));
            }
            true
        }
        None => numbered_last,
    };
    Ok(last)
}

fn check_content_size(field: u32, content_len: u64, whole: u64) -> Result<(), String> {
    if field as u64 == content_len || field as u64 == whole {
        Ok(())
    } else {
        Err(format!(
            "content_size {field} is neither this packet's length {content_len} nor the file's ciphertext length {whole}"
        ))
    }
}

/// Does a packet numbered 1 continue `r` (its counter wrapped past 65,535)
/// rather than start a new upload? Only when it is the next number, with the
/// same name field and total, and the bytes show the upload goes on: a
/// stream is open, or it is the empty last packet after the stream.
pub fn wraps_to_one(r: &Receiving, ph: &PacketHeader, content_len: u64) -> bool {
    // Per-chunk encryption past 65,535 packets: the next chunk.
    let chunk_goes_on = r.chunk.is_some() && r.packets >= WRAP - 1 && content_len > 0;
    r.next == 1
        && ph.packet_number == 1
        && r.name_field.bytes() == ph.file_name.bytes()
        && r.total == ph.total_packets
        && (r.segment.is_some() || content_len == 0 || chunk_goes_on)
}

/// An upload that ended on this connection, and which of its later packets
/// are swallowed: read and dropped with no reply and no log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Ended {
    pub(super) name_field: NameField,
    pub(super) total: u16,
    /// A refused packet that did not follow the upload in progress (another
    /// name field or total): that upload's name field and total, whose later
    /// packets are swallowed too.
    pub(super) abandoned: Option<(NameField, u16)>,
    /// The number its next packet would carry.
    pub(super) next: u16,
    pub(super) how: EndedHow,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum EndedHow {
    /// Refused (one 1607 went): every later packet of it is swallowed, so
    /// that a client sending them back to back reads exactly one 1607. Later
    /// means any number but 1: a duplicate or a gap in the numbers after the
    /// refusal still belongs to the refused upload, and only a packet 1
    /// starts a new one.
    Refused {
        /// Ciphertext bytes its open stream still expected (an upper bound).
        remaining: u64,
        /// Packets of it seen on this connection.
        seen: u64,
        /// Its later packets each carry a whole stream of their own (per-chunk
        /// encryption): past 65,535 of them a packet 1 is the count wrapping.
        chunks: bool,
    },
    /// Received (the 1603 went): only an empty chunk numbered one past the
    /// total, which per-chunk clients send after a file whose size is a
    /// multiple of their chunk size, is swallowed.
    Complete,
}

impl Ended {
    /// The upload `r` (None: none was in progress) is refused at packet `ph`
    /// with `content_len` bytes.
    pub(super) fn refused(r: Option<&Receiving>, ph: &PacketHeader, content_len: u64) -> Ended {
        let own = r.filter(|r| {
            r.name_field.bytes() == ph.file_name.bytes()
                && r.total == ph.total_packets
                && r.next == ph.packet_number
        });
        // A packet 1 starts over on purpose: the upload in progress is not
        // coming back. Any other that names another file or total is a
        // stray in the middle of it, whose rest may follow.
        let abandoned = r
            .filter(|_| ph.packet_number != 1)
            .filter(|r| r.name_field.bytes() != ph.file_name.bytes() || r.total != ph.total_packets)
            .map(|r| (r.name_field.clone(), r.total));
        let stream_left = match own.and_then(|r| r.segment) {
            Some(seg) => seg.remaining,
            None => ciphertext_len(ph.orig_file_size as u64),
        };
        Ended {
            name_field: ph.file_name.clone(),
            total: ph.total_packets,
            abandoned,
            next: ph.packet_number.wrapping_add(1),
            how: EndedHow::Refused {
                remaining: stream_left.saturating_sub(content_len),
                seen: own.map_or(0, |r| r.packets) + 1,
                chunks: own.is_some_and(|r| r.chunk.is_some()),
            },
        }
    }

    /// The upload `r` failed at the worker after the loop admitted its
    /// packets up to `r.next - 1`.
    pub(super) fn failed(r: &Receiving) -> Ended {
        Ended {
            name_field: r.name_field.clone(),
            total: r.total,
            abandoned: None,
            next: r.next,
            how: EndedHow::Refused {
                remaining: r.segment.map_or(0, |s| s.remaining),
                seen: r.packets,
                chunks: r.chunk.is_some(),
            },
        }
    }

    /// Is this packet a later packet of the ended upload? If so it is
    /// swallowed and the state advances past it.
    pub(super) fn swallow(&mut self, ph: &PacketHeader, content_len: u64) -> bool {
        let named = |field: &NameField, total: u16| {
            field.bytes() == ph.file_name.bytes() && total == ph.total_packets
        };
        let own = named(&self.name_field, self.total);
        let ok = match &mut self.how {
            // A packet 1 starts something new, unless the counter wrapped
            // and the bytes show the refused upload goes on.
            EndedHow::Refused { remaining, seen, chunks } => {
                let ours = own || self.abandoned.as_ref().is_some_and(|(f, t)| named(f, *t));
                let goes_on =
                    ours && (ph.packet_number != 1 || (*seen >= WRAP && (*remaining > 0 || *chunks)));
                if goes_on {
                    // A whole stream in this packet alone, after the last one ended.
                    let whole = ciphertext_len(ph.orig_file_size as u64);
                    *chunks |= *remaining == 0 && content_len > 0 && content_len == whole;
                    *remaining = remaining.saturating_sub(content_len);
                    *seen += 1;
                }
                goes_on
            }
            EndedHow::Complete => {
                let n_plus_1 =
                    own && self.next == ph.packet_number && self.next == self.total.wrapping_add(1);
                let empty = ph.orig_file_size == 0 && (content_len == 0 || content_len == EMPTY_CHUNK);
                // A non-empty chunk of its own after the end: a per-chunk
                // upload whose count wrapped to a total of 1 ended at its
                // packet 1 (see docs/PROTOCOL.md). Its 1603 went; the rest
                // of it is swallowed, so the client stays in step.
                let chunk = content_len > 0 && content_len == ciphertext_len(ph.orig_file_size as u64);
                if chunk && !empty {
                    self.how = EndedHow::Refused { remaining: 0, seen: self.next as u64, chunks: true };
                }
                n_plus_1 && (empty || chunk)
            }
        };
        if ok {
            self.next = self.next.wrapping_add(1);
        }
        ok
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    fn field(name: &str) -> NameField {
        NameField::from_name(name.as_bytes()).unwrap()
    }

    fn ph(cs: u64, orig: u64, k: u16, n: u16) -> PacketHeader {
        PacketHeader {
            content_size: cs as u32,
            orig_file_size: orig as u32,
            packet_number: k,
            total_packets: n,
            file_name: field("f"),
        }
    }

    fn receiving(total: u16) -> Receiving {
        Receiving::new(1, "f".into(), field("f"), total, Instant::now())
    }

    /// Feed packets as the session does (numbers checked, `next` wrapping).
    fn feed(r: &mut Receiving, p: &PacketHeader, len: u64) -> Result<PacketStep, String> {
        assert_eq!(p.packet_number, r.next, "the test feeds packets in order");
        plan_packet(r, p, len, u32::MAX as u64)
    }

    #[test]
    fn one_stream_over_packets_ends_when_complete_and_numbered_last() {
        let mut r = receiving(3);
        let s = feed(&mut r, &ph(16, 40, 1, 3), 16).unwrap();
        assert_eq!(s, PacketStep { new_segment: true, end_segment: None, last: false });
        let s = feed(&mut r, &ph(16, 40, 2, 3), 16).unwrap();
        assert_eq!(s, PacketStep { new_segment: false, end_segment: None, last: false });
        let s = feed(&mut r, &ph(16, 40, 3, 3), 16).unwrap();
        assert_eq!(s, PacketStep { new_segment: false, end_segment: Some(40), last: true });
    }

    #[test]
    fn numbered_last_with_a_short_stream_is_refused() {
        let mut r = receiving(2);
        feed(&mut r, &ph(16, 40, 1, 2), 16).unwrap();
        let before = r.clone();
        let e = feed(&mut r, &ph(16, 40, 2, 2), 16).unwrap_err();
        assert!(e.contains("before the file's ciphertext was complete"), "{e}");
        assert_eq!(r, before, "a refused packet leaves the upload as it was");
    }

    #[test]
    fn empty_trailing_packet_of_whole_ciphertext_clients() {
        let mut r = receiving(2);
        let s = feed(&mut r, &ph(48, 40, 1, 2), 48).unwrap();
        assert_eq!(s, PacketStep { new_segment: true, end_segment: Some(40), last: false });
        let s = feed(&mut r, &ph(48, 40, 2, 2), 0).unwrap();
        assert_eq!(s, PacketStep { new_segment: false, end_segment: None, last: true });
        let mut r = receiving(3);
        feed(&mut r, &ph(48, 40, 1, 3), 48).unwrap();
        assert!(feed(&mut r, &ph(48, 40, 2, 3), 0).unwrap_err().contains("before the last"));
    }

    #[test]
    fn per_packet_streams_and_the_empty_file_as_packet_1_of_0() {
        let mut r = receiving(2);
        let s = feed(&mut r, &ph(32, 20, 1, 2), 32).unwrap();
        assert_eq!(s, PacketStep { new_segment: true, end_segment: Some(20), last: false });
        let s = feed(&mut r, &ph(16, 0, 2, 2), 16).unwrap();
        assert_eq!(s, PacketStep { new_segment: true, end_segment: Some(0), last: true });
        // Packet 1 of 0: an encrypted empty chunk is the whole (empty) file.
        let mut r = receiving(0);
        let s = feed(&mut r, &ph(16, 0, 1, 0), 16).unwrap();
        assert_eq!(s, PacketStep { new_segment: true, end_segment: Some(0), last: true });
        // With content it is packet 1 of 65,536 (or more): not the last.
        let mut r = receiving(0);
        let s = feed(&mut r, &ph(1024, 100_000, 1, 0), 1024).unwrap();
        assert!(!s.last);
        let mut r = receiving(0);
        assert!(feed(&mut r, &ph(16, 5, 1, 0), 16).unwrap_err().contains("packet 1 of 0"));
    }

    /// 1 KiB packets of a file whose ciphertext needs more than 65,535 of
    /// them, content_size the whole ciphertext: the numbers wrap, the bytes
    /// decide. Simulated in place: the loop over ~70,000 packets is cheap.
    #[test]
    fn wrapped_counters_end_by_bytes() {
        for extra in [0u64, 1, 1023, 1024, 5000] {
            let orig = 65_536 * 1024 + extra * 1024 + 7 - 16;
            let whole = ciphertext_len(orig);
            let n_packets = whole / 1024 + 1; // the last one is partial or empty
            let total = n_packets as u16; // modulo 65,536
            let mut r = receiving(total);
            let mut sent = 0u64;
            for i in 0..n_packets {
                let k = (i + 1) as u16;
                let len = (whole - sent).min(1024);
                let p = ph(whole, orig, k, total);
                if k == 1 && i > 0 {
                    assert!(wraps_to_one(&r, &p, len), "packet {} continues", i + 1);
                }
                let s = feed(&mut r, &p, len).unwrap_or_else(|e| panic!("packet {}: {e}", i + 1));
                sent += len;
                assert_eq!(s.last, i + 1 == n_packets, "packet {} of {n_packets}", i + 1);
            }
            assert_eq!(sent, whole);
            assert_eq!(r.packets, n_packets);
        }
    }

    /// Per-chunk encryption (convention 3): a full chunk numbered as the
    /// total leaves the end pending; the empty chunk n+1 of n ends the file,
    /// a non-empty one means the count wrapped and the upload goes on, to the
    /// short (or empty) chunk numbered as the total 65,536 packets later.
    #[test]
    fn per_chunk_uploads_end_by_what_follows_a_full_chunk() {
        // 3 chunks of 4,000 and the empty chunk: the end waits for it.
        let mut r = receiving(3);
        for k in 1..=3u16 {
            let s = feed(&mut r, &ph(4016, 4000, k, 3), 4016).unwrap();
            assert!(!s.last, "packet {k}");
        }
        assert!(r.end_pending);
        let s = feed(&mut r, &ph(16, 0, 4, 3), 16).unwrap();
        assert!(s.last && !r.end_pending, "the empty chunk ends it");
        assert!(!r.past_total);
        // A non-empty chunk after the pending end: the count goes on past the total.
        let mut r = receiving(2);
        feed(&mut r, &ph(4016, 4000, 1, 2), 4016).unwrap();
        feed(&mut r, &ph(4016, 4000, 2, 2), 4016).unwrap();
        assert!(r.end_pending && !r.past_total);
        assert!(!feed(&mut r, &ph(16, 5, 3, 2), 16).unwrap().last);
        assert!(r.past_total && !r.end_pending);
        // A short last chunk ends it at once; so does packet 1 of 1 (a single packet).
        let mut r = receiving(2);
        feed(&mut r, &ph(4016, 4000, 1, 2), 4016).unwrap();
        assert!(feed(&mut r, &ph(16, 5, 2, 2), 16).unwrap().last);
        let mut r = receiving(1);
        assert!(feed(&mut r, &ph(4016, 4000, 1, 1), 4016).unwrap().last);
        // One stream over packets (convention 1): numbered as the total, complete: the end.
        let mut r = receiving(2);
        feed(&mut r, &ph(32, 20, 1, 2), 16).unwrap();
        assert!(feed(&mut r, &ph(32, 20, 2, 2), 16).unwrap().last);
        // Wrapped: 65,536 + 3 chunks of 1 byte and a short... every chunk
        // is full here, so the file ends with the empty chunk n+1.
        for (n_chunks, last_len) in [(65_539u64, 1u32), (65_541, 0), (131_075, 1)] {
            let total = n_chunks as u16;
            let mut r = receiving(total);
            let mut pending_seen = 0;
            for i in 0..n_chunks {
                let k = (i + 1) as u16;
                let orig = if i + 1 == n_chunks && last_len == 0 { 0 } else { 1 };
                let len = ciphertext_len(orig);
                let p = ph(len, orig, k, total);
                if k == 1 && i > 0 {
                    assert!(wraps_to_one(&r, &p, len), "packet {} continues", i + 1);
                }
                let s = feed(&mut r, &p, len).unwrap_or_else(|e| panic!("packet {}: {e}", i + 1));
                pending_seen += usize::from(r.end_pending);
                let expect_last = last_len == 0 && i + 1 == n_chunks;
                assert_eq!(s.last, expect_last, "packet {} of {n_chunks}", i + 1);
            }
            if last_len == 1 {
                // The last full chunk numbered as the total: pending; the empty chunk ends it.
                assert!(r.end_pending);
                let s = feed(&mut r, &ph(16, 0, total.wrapping_add(1), total), 16).unwrap();
                assert!(s.last);
            }
            assert!(pending_seen >= 1, "the end was pending at each wrap point");
        }
    }

    #[test]
    fn a_packet_1_after_the_stream_is_a_new_upload() {
        let mut r = receiving(1);
        r.next = 1; // as after 65,536 packets
        r.packets = 65_536;
        assert!(!wraps_to_one(&r, &ph(16, 0, 1, 1), 16), "no stream open: something new");
        assert!(wraps_to_one(&r, &ph(16, 0, 1, 1), 0), "the empty last packet");
        r.segment = Some(Segment { orig: 100_000, whole: 100_016, remaining: 5 });
        assert!(wraps_to_one(&r, &ph(16, 0, 1, 1), 5));
        let mut other = ph(16, 0, 1, 1);
        other.file_name = field("g");
        assert!(!wraps_to_one(&r, &other, 5));
        assert!(!wraps_to_one(&r, &ph(16, 0, 1, 2), 5));
    }

    #[test]
    fn a_refused_upload_swallows_every_later_packet_even_wrapped() {
        // Refused at packet 1 of a 1 KiB-packet upload of ~70 MiB.
        let orig = 70 << 20;
        let whole = ciphertext_len(orig);
        let n = whole / 1024 + 1;
        let total = n as u16;
        let mut e = Ended::refused(None, &ph(whole, orig, 1, total), 1024);
        let mut sent = 1024;
        for i in 1..n {
            let len = (whole - sent).min(1024);
            assert!(e.swallow(&ph(whole, orig, (i + 1) as u16, total), len), "packet {}", i + 1);
            sent += len;
        }
        // Then the client starts over: its packet 1 is something new.
        assert!(!e.swallow(&ph(whole, orig, 1, total), 1024));
        // Another name or another total: not this upload. A gap or a
        // duplicate in the numbers: still this upload.
        let mut e = Ended::refused(None, &ph(16, 40, 1, 3), 16);
        assert!(!e.swallow(&ph(16, 40, 2, 4), 16));
        let mut other = ph(16, 40, 2, 3);
        other.file_name = field("g");
        assert!(!e.swallow(&other, 16));
        assert!(e.swallow(&ph(16, 40, 3, 3), 16), "a gap");
        assert!(e.swallow(&ph(16, 40, 3, 3), 16), "a duplicate");
        assert!(e.swallow(&ph(16, 40, 2, 3), 16), "out of order");
        // Refused at packet 0: a packet 1 that follows is something new.
        let mut e = Ended::refused(None, &ph(1024, 1 << 20, 0, 5), 1024);
        assert!(!e.swallow(&ph(1024, 1 << 20, 1, 5), 1024));
    }

    /// A packet that does not follow the upload in progress (another name
    /// field or total, e.g. a glitch in one packet) is refused once; the
    /// rest of the upload in progress, and more packets like the refused
    /// one, are swallowed, so the client reads one 1607.
    #[test]
    fn a_packet_that_does_not_follow_ends_both_uploads_with_one_refusal() {
        let mut r = receiving(11);
        feed(&mut r, &ph(16, 40, 1, 11), 16).unwrap();
        feed(&mut r, &ph(16, 40, 2, 11), 16).unwrap();
        let mut stray = ph(16, 40, 3, 11);
        stray.file_name = field("g");
        let mut e = Ended::refused(Some(&r), &stray, 16);
        assert_eq!(e.abandoned, Some((field("f"), 11)));
        for k in 4..=11 {
            assert!(e.swallow(&ph(16, 40, k, 11), 16), "packet {k} of the upload in progress");
        }
        let mut more = ph(16, 40, 4, 11);
        more.file_name = field("g");
        assert!(e.swallow(&more, 16), "a later packet like the refused one");
        assert!(!e.swallow(&ph(16, 40, 1, 11), 16), "a packet 1 starts over");
        // The total changed instead of the name.
        let mut r = receiving(11);
        feed(&mut r, &ph(16, 40, 1, 11), 16).unwrap();
        let mut e = Ended::refused(Some(&r), &ph(16, 40, 2, 12), 16);
        assert!(e.swallow(&ph(16, 40, 3, 11), 16));
        assert!(e.swallow(&ph(16, 40, 3, 12), 16));
        assert!(!e.swallow(&ph(16, 40, 3, 13), 16), "neither");
        // A packet of the upload in progress refused for its bytes: no second name.
        let mut r = receiving(3);
        feed(&mut r, &ph(16, 40, 1, 3), 16).unwrap();
        assert_eq!(Ended::refused(Some(&r), &ph(16, 40, 2, 3), 16).abandoned, None);
        // A packet 1 (of another total) starts over on purpose: the upload in
        // progress is not coming back, nothing of it is swallowed.
        assert_eq!(Ended::refused(Some(&r), &ph(16, 40, 1, 5), 16).abandoned, None);
    }

    #[test]
    fn a_failed_upload_swallows_from_where_the_loop_stood() {
        let mut r = receiving(4);
        feed(&mut r, &ph(16, 40, 1, 4), 16).unwrap();
        feed(&mut r, &ph(16, 40, 2, 4), 16).unwrap();
        let mut e = Ended::failed(&r);
        assert!(e.swallow(&ph(16, 40, 3, 4), 16));
        assert!(e.swallow(&ph(0, 40, 4, 4), 0));
        assert!(!e.swallow(&ph(16, 40, 1, 4), 16), "a packet 1 starts over");
        // And the n+1 of n of a per-chunk client, after a failure at its last packet.
        let mut e = Ended {
            name_field: field("f"),
            total: 4,
            abandoned: None,
            next: 5,
            how: EndedHow::Refused { remaining: 0, seen: 4, chunks: false },
        };
        assert!(e.swallow(&ph(16, 0, 5, 4), 16));
    }

    #[test]
    fn a_complete_upload_swallows_only_its_empty_chunk_n_plus_1_of_n() {
        let done =
            Ended { name_field: field("f"), abandoned: None, total: 2, next: 3, how: EndedHow::Complete };
        let mut e = done.clone();
        assert!(e.swallow(&ph(16, 0, 3, 2), 16));
        assert!(!e.swallow(&ph(16, 0, 4, 2), 16), "only one");
        assert!(done.clone().swallow(&ph(0, 0, 3, 2), 0));
        assert!(!done.clone().swallow(&ph(48, 20, 3, 2), 16), "not empty, not a chunk of its own");
        // A chunk of its own: a per-chunk upload ended too early (a total
        // that wrapped to 1): it and the rest of it are swallowed.
        let mut e =
            Ended { name_field: field("f"), abandoned: None, total: 1, next: 2, how: EndedHow::Complete };
        for k in 2..=5u16 {
            assert!(e.swallow(&ph(32, 20, k, 1), 32), "packet {k}");
        }
        assert!(!done.clone().swallow(&ph(16, 0, 1, 2), 16), "not n+1");
        assert!(!done.clone().swallow(&ph(16, 0, 3, 3), 16), "another total");
        // Wrapped: n = 65,535 (mod 65,536), n+1 = 0.
        let mut e = Ended {
            name_field: field("f"),
            abandoned: None,
            total: u16::MAX,
            next: 0,
            how: EndedHow::Complete,
        };
        assert!(e.swallow(&ph(16, 0, 0, u16::MAX), 16));
        // An upload that ended as packet 1 of 0 has no trailer.
        let mut e =
            Ended { name_field: field("f"), abandoned: None, total: 0, next: 2, how: EndedHow::Complete };
        assert!(!e.swallow(&ph(16, 0, 1, 0), 16));
        assert!(!e.swallow(&ph(16, 0, 2, 0), 16));
    }
}
