//! The file packet path of the state machine: a packet's fixed fields
//! checked against the connection's upload (a packet 1 opens one, within the
//! client's limits), its content handed to the worker piece by piece, and
//! refusals that swallow the rest of a refused upload. Each step takes the
//! connection's `Upload` by value and returns the next one.

use std::time::Instant;

use log::Level;

use crate::budget::Piece;
use crate::logging::Esc;
use crate::metrics::Unstored;
use crate::peer_log;
use crate::protocol::{id_hex, normalize_path, ClientId, PacketHeader};
use crate::worker::{Job, PacketJob, StartUpload};

use super::sequence::{plan_packet, wraps_to_one, Ended};
use super::state::{Awaiting, Incoming, PacketStream, Protocol, Receiving, Upload};
use super::{Core, JobSink};

/// A file packet's fixed fields as the state machine takes them: the
/// client id of its header, the fields, its content's length and when it came.
struct Arrival<'a> {
    id: ClientId,
    ph: &'a PacketHeader,
    content_len: u64,
    now: Instant,
}

impl<J: JobSink> Core<J> {
    /// A file packet's fixed fields: check them against the upload and decide
    /// what happens to its `content_len` content bytes (`p.incoming`).
    pub(super) fn on_packet(&mut self, p: &mut Protocol, id: ClientId, ph: PacketHeader, content_len: u64) {
        let a = Arrival { id, ph: &ph, content_len, now: Instant::now() };
        let admitted = p.advance_upload_with(self, |core, p, upload| core.admit_packet(p, upload, &a));
        let Some(stream) = admitted else { return };
        p.streaming = Some(stream);
        if content_len == 0 {
            self.content_piece(p, Piece::empty(), true);
        } else {
            p.incoming = Some(Incoming::Stream { len: content_len });
        }
    }

    /// The upload's next state after a packet's fixed fields, and the packet's
    /// stream to the worker if it is admitted (None: swallowed or refused,
    /// its content drained).
    fn admit_packet(
        &mut self,
        p: &mut Protocol,
        upload: Upload,
        a: &Arrival,
    ) -> (Upload, Option<PacketStream>) {
        let (ph, content_len) = (a.ph, a.content_len);
        let upload = match upload {
            // A later packet of an upload that ended (refused, or received) is
            // swallowed: read and dropped, no reply, no log line.
            Upload::Ended(mut e) => {
                if e.swallow(ph, content_len) {
                    p.incoming = Some(Incoming::Drain { len: content_len });
                    return (Upload::Ended(e), None);
                }
                Upload::Idle
            }
            other => other,
        };
        if p.session.as_ref().is_none_or(|s| s.id != a.id) {
            let why =
                format!("file packet without a session key for id {} on this connection", id_hex(&a.id));
            return (self.refuse_packet(p, upload, a, &why), None);
        }
        // Packet numbers wrap past 65,535: a packet 1 may be the next packet
        // of the upload in progress, when the bytes show it goes on.
        let wrapped = matches!(&upload, Upload::Receiving(r) if wraps_to_one(r, ph, content_len));
        let opens_upload = ph.packet_number == 1 && !wrapped;
        let opened = match (opens_upload, upload) {
            // A new upload; one in progress is abandoned (clients restart from packet 1).
            (true, Upload::Receiving(r)) => self.open_upload(p, Some(r), a),
            (true, Upload::Idle | Upload::Ended(_)) => self.open_upload(p, None, a),
            (false, Upload::Receiving(r)) => Ok(r),
            // No request is read while an upload's last packet is at the
            // worker; were one read, that upload would stay until its outcome.
            (_, Upload::Finishing(f)) => {
                let why = format!(
                    "packet {} of \"{}\" while the last packet of \"{}\" is at the worker",
                    ph.packet_number,
                    ph.file_name.display(),
                    Esc(&f.name)
                );
                return (self.refuse_packet(p, Upload::Finishing(f), a, &why), None);
            }
            (false, other) => {
                let why = format!(
                    "packet {} of \"{}\" with no upload in progress",
                    ph.packet_number,
                    ph.file_name.display()
                );
                return (self.refuse_packet(p, other, a, &why), None);
            }
        };
        let mut r = match opened {
            Ok(r) => r,
            Err(refused) => return (refused, None),
        };
        // A later packet that begins a CBC stream (per-chunk encryption)
        // announces more plaintext: the client's limits are checked again.
        let begins_stream = r.packets > 0 && r.segment.is_none() && content_len > 0;
        let more = Announced {
            total: r.plain_total.saturating_add(ph.orig_file_size as u64),
            free: r.free_at_open,
            new_file: false,
        };
        let over = if begins_stream { self.over_limit_with(a.id, more) } else { None };
        let checked = follows(&r, ph).and_then(|()| over.map_or(Ok(()), Err));
        let step = match checked.and_then(|()| plan_packet(&mut r, ph, content_len, self.cfg.max_file_size)) {
            Ok(s) => s,
            Err(why) => return (self.refuse_packet(p, Upload::Receiving(r), a, &why), None),
        };
        r.touched = a.now;
        let stream = PacketStream {
            upload: r.upload,
            first: true,
            opens_upload,
            new_segment: step.new_segment,
            end_segment: step.end_segment,
            last_packet: step.last,
        };
        (Upload::Receiving(r), Some(stream))
    }

    /// A packet 1 opens an upload, abandoning `in_progress`: its name, size
    /// and the client's limits are checked, and a staged copy of the same
    /// name is replaced. The new upload, or the state a refusal leaves.
    fn open_upload(
        &mut self,
        p: &mut Protocol,
        in_progress: Option<Box<Receiving>>,
        a: &Arrival,
    ) -> Result<Box<Receiving>, Upload> {
        let ph = a.ph;
        if let Some(r) = in_progress {
            self.drop_upload(&r);
        }
        let refusal = match normalize_path(ph.file_name.bytes()) {
            Err(e) => Err(format!("file name \"{}\": {e}", ph.file_name.display())),
            Ok(_) if ph.orig_file_size as u64 > self.cfg.max_file_size => Err(format!(
                "file of {} bytes exceeds the {}-byte limit",
                ph.orig_file_size, self.cfg.max_file_size
            )),
            Ok(path) => match self.over_limit(a.id, ph.orig_file_size as u64) {
                Some(why) => Err(why),
                None => Ok(path),
            },
        };
        let path = match refusal {
            Ok(path) => path,
            Err(why) => return Err(self.refuse_packet(p, Upload::Idle, a, &why)),
        };
        if path.stripped() {
            peer_log!(
                Level::Info,
                p.peer.ip(),
                "{}: \"{}\" is stored as \"{}\" (leading root or drive removed)",
                p.tag(),
                ph.file_name.display(),
                Esc(path.as_str())
            );
        }
        let name = path.as_str().to_string();
        // A new upload of a staged name replaces the staged copy.
        if let Some(i) = p.staged_index(&name) {
            if let Some(old) = p.staged.remove(i) {
                if !old.retried {
                    self.send_job(Job::Discard { upload: old.upload, failed: None });
                }
            }
        }
        let upload = self.next_upload;
        self.next_upload += 1;
        let mut r = Receiving::new(upload, name, ph.file_name.clone(), ph.total_packets, a.now);
        r.free_at_open = self.metrics.free_bytes();
        Ok(Box::new(r))
    }

    /// Why a new upload of `announced` bytes (packet 1's `orig_file_size`)
    /// by client `id` must be refused, if it must: it would take the client
    /// over `--quota` or `--quota-files`, or leave less than `--min-free` on
    /// the data directory's filesystem. Nothing is reserved: the figures are
    /// what is stored now (uploads in flight do not count until committed),
    /// and the upload counts as a new file even if it replaces one (whose
    /// copy is kept as a version until pruned). See docs/OPERATIONS.md,
    /// "Quotas and free space".
    pub(super) fn over_limit(&self, id: [u8; 16], announced: u64) -> Option<String> {
        let free = self.metrics.free_bytes();
        self.over_limit_with(id, Announced { total: announced, free, new_file: true })
    }

    /// [`Core::over_limit`] for what an upload announces so far: its
    /// streams' plaintext in all (`total`, against `--quota`, and against
    /// `--min-free` with the free space as it was when the upload opened:
    /// `free`), and whether it is the file's first (`--quota-files`). A
    /// client that encrypts each chunk on its own announces one chunk at a
    /// time: each is checked as it begins.
    fn over_limit_with(&self, id: [u8; 16], a: Announced) -> Option<String> {
        let cfg = &self.cfg;
        let entry = self.registry.by_id.get(&id)?;
        let used = entry.usage;
        let announced = a.total;
        if cfg.quota > 0 && used.bytes.saturating_add(announced) > cfg.quota {
            return Some(format!(
                "client \"{}\" would exceed --quota {} bytes: it stores {} bytes and the file announces {announced}",
                Esc(&entry.name),
                cfg.quota,
                used.bytes
            ));
        }
        if a.new_file && cfg.quota_files > 0 && used.files >= cfg.quota_files {
            return Some(format!(
                "client \"{}\" would exceed --quota-files {}: it stores {} files (current and versions)",
                Esc(&entry.name),
                cfg.quota_files,
                used.files
            ));
        }
        if cfg.min_free > 0 {
            if let Some(free) = a.free {
                if announced.saturating_add(cfg.min_free) > free {
                    return Some(format!(
                        "the data directory's filesystem would go below --min-free {} bytes: {free} bytes free, \
                         the file announces {announced}",
                        cfg.min_free
                    ));
                }
            }
        }
        None
    }

    /// A per-chunk upload whose last packet was a full chunk numbered as
    /// the total, with nothing of it since (no empty chunk, no wrapped
    /// count going on): it ends there, as if an empty last packet came.
    pub(super) fn finish_pending_end(&mut self, p: &mut Protocol) {
        let upload = match &mut p.upload {
            Upload::Receiving(r) if r.end_pending && p.streaming.is_none() => {
                r.end_pending = false;
                r.upload
            }
            _ => return,
        };
        p.streaming = Some(PacketStream {
            upload,
            first: false,
            opens_upload: false,
            new_segment: false,
            end_segment: None,
            last_packet: true,
        });
        self.content_piece(p, Piece::empty(), true);
    }

    /// A per-chunk upload went on past its total and then stopped (see
    /// `Protocol::past_total_overdue`): a client that counted more chunks
    /// than it announced and waits for its 1603. It gets one 1607 (and its
    /// later packets, should they come, are swallowed) instead of waiting
    /// for the idle timeout.
    pub(super) fn refuse_stopped_past_total(&mut self, p: &mut Protocol) {
        let r = match std::mem::replace(&mut p.upload, Upload::Idle) {
            Upload::Receiving(r) if r.past_total => r,
            other => {
                p.upload = other;
                return;
            }
        };
        self.drop_upload(&r);
        self.metrics.unstored(Unstored::Refused);
        let why = format!(
            "\"{}\": {} packets, past the total of {} it announced, then none for a second",
            r.name_field.display(),
            r.packets,
            r.total
        );
        p.upload = Upload::Ended(Box::new(Ended::failed(&r)));
        p.refuse(&why);
    }

    /// A piece of the streaming packet's content has been read (`last`: the
    /// packet's last piece): it goes to the worker with its grant.
    pub fn content_piece(&mut self, p: &mut Protocol, piece: Piece, last: bool) {
        let Some(s) = p.streaming.as_mut() else { return };
        let stream = *s;
        s.first = false;
        if last {
            p.streaming = None;
        }
        let last_of_upload = last && stream.last_packet;
        // The upload failed at the worker meanwhile (its 1607 is sent): the
        // rest of this packet's content is dropped, not sent.
        if !p.advance_upload(|u| u.piece_sent(stream.upload, last_of_upload)) {
            return;
        }
        let start = match (&p.session, stream.first && stream.opens_upload) {
            (Some(s), true) => Some(StartUpload { client: s.id, key: s.key }),
            _ => None,
        };
        if last_of_upload {
            p.wait_for(Awaiting::LastPacket);
        }
        p.packets_in_flight += 1;
        self.send_job(Job::Packet(PacketJob {
            conn: p.conn,
            upload: stream.upload,
            content: piece,
            start,
            new_segment: stream.first && stream.new_segment,
            end_segment: if last { stream.end_segment } else { None },
            last: last_of_upload,
        }));
    }

    /// Refuse a file packet: 1607 once, drop the upload, swallow its later
    /// packets; its content is read and dropped. The upload's next state.
    fn refuse_packet(&mut self, p: &mut Protocol, upload: Upload, a: &Arrival, why: &str) -> Upload {
        let (ph, content_len) = (a.ph, a.content_len);
        p.incoming = Some(Incoming::Drain { len: content_len });
        self.metrics.unstored(Unstored::Refused);
        let next = match upload {
            Upload::Receiving(r) => {
                self.drop_upload(&r);
                Upload::Ended(Box::new(Ended::refused(Some(&r), ph, content_len)))
            }
            Upload::Idle | Upload::Ended(_) => Upload::Ended(Box::new(Ended::refused(None, ph, content_len))),
            // Its last packet is at the worker and no request is read
            // meanwhile; if one were, that upload's outcome still ends it.
            Upload::Finishing(f) => Upload::Finishing(f),
        };
        p.refuse(why);
        next
    }
}

/// Plaintext an upload announces, for [`Core::over_limit_with`].
#[derive(Clone, Copy)]
struct Announced {
    total: u64,
    free: Option<u64>,
    new_file: bool,
}

/// Does the packet follow the upload in progress (same name and total, the
/// next number)? Why not, if it does not.
fn follows(r: &Receiving, ph: &PacketHeader) -> Result<(), String> {
    if r.name_field.bytes() == ph.file_name.bytes()
        && r.total == ph.total_packets
        && r.next == ph.packet_number
    {
        return Ok(());
    }
    Err(format!(
        "packet {}/{} of \"{}\" does not follow packet {}/{} of \"{}\"",
        ph.packet_number,
        ph.total_packets,
        ph.file_name.display(),
        r.next.wrapping_sub(1),
        r.total,
        r.name_field.display()
    ))
}
