//! The file packet path of the state machine: a packet's fixed fields
//! checked against the connection's upload (a packet 1 opens one, within the
//! client's limits), its content handed to the worker piece by piece, and
//! refusals that swallow the rest of a refused upload.

use std::time::Instant;

use log::Level;

use crate::budget::Piece;
use crate::logging::Esc;
use crate::metrics::Unstored;
use crate::peer_log;
use crate::protocol::{id_hex, normalize_path, PacketHeader};
use crate::worker::{Job, PacketJob, StartUpload};

use super::connection::{Awaiting, Incoming, PacketStream, Protocol, Receiving, Upload};
use super::sequence::{plan_packet, wraps_to_one, Ended};
use super::{Core, JobSink};

impl<J: JobSink> Core<J> {
    /// A file packet's fixed fields: check them against the upload and decide
    /// what happens to its `content_len` content bytes (`p.incoming`).
    pub(super) fn on_packet(&mut self, p: &mut Protocol, id: [u8; 16], ph: PacketHeader, content_len: u64) {
        let now = Instant::now();

        // A later packet of an upload that ended (refused, or received) is
        // swallowed: read and dropped, no reply, no log line.
        if let Upload::Ended(e) = &mut p.upload {
            if e.swallow(&ph, content_len) {
                p.incoming = Some(Incoming::Drain { len: content_len });
                return;
            }
            p.upload = Upload::Idle;
        }

        if p.session.as_ref().is_none_or(|s| s.id != id) {
            let why = format!("file packet without a session key for id {} on this connection", id_hex(&id));
            return self.refuse_packet(p, &ph, content_len, &why);
        }

        // Packet numbers wrap past 65,535: a packet 1 may be the next packet
        // of the upload in progress, when the bytes show it goes on.
        let wrapped = matches!(&p.upload, Upload::Receiving(r) if wraps_to_one(r, &ph, content_len));
        let opens_upload = ph.packet_number == 1 && !wrapped;
        if opens_upload && !self.open_upload(p, id, &ph, content_len, now) {
            return;
        }

        let Upload::Receiving(r) = &mut p.upload else {
            let why = format!(
                "packet {} of \"{}\" with no upload in progress",
                ph.packet_number,
                ph.file_name.display()
            );
            return self.refuse_packet(p, &ph, content_len, &why);
        };
        if r.name_field.bytes() != ph.file_name.bytes()
            || r.total != ph.total_packets
            || r.next != ph.packet_number
        {
            let why = format!(
                "packet {}/{} of \"{}\" does not follow packet {}/{} of \"{}\"",
                ph.packet_number,
                ph.total_packets,
                ph.file_name.display(),
                r.next.wrapping_sub(1),
                r.total,
                r.name_field.display()
            );
            return self.refuse_packet(p, &ph, content_len, &why);
        }
        let step = match plan_packet(r, &ph, content_len, self.cfg.max_file_size) {
            Ok(s) => s,
            Err(why) => return self.refuse_packet(p, &ph, content_len, &why),
        };
        r.touched = now;
        r.next = r.next.wrapping_add(1);
        p.streaming = Some(PacketStream {
            upload: r.upload,
            first: true,
            opens_upload,
            new_segment: step.new_segment,
            end_segment: step.end_segment,
            last_packet: step.last,
        });
        if content_len == 0 {
            self.content_piece(p, Piece::empty(), true);
        } else {
            p.incoming = Some(Incoming::Stream { len: content_len });
        }
    }

    /// A packet 1 opens an upload (abandoning the one in progress): its name,
    /// size and the client's limits are checked, and a staged copy of the same
    /// name is replaced. False when it was refused.
    fn open_upload(
        &mut self,
        p: &mut Protocol,
        id: [u8; 16],
        ph: &PacketHeader,
        content_len: u64,
        now: Instant,
    ) -> bool {
        // A new upload; one in progress is abandoned (clients restart from packet 1).
        if let Upload::Receiving(r) = std::mem::replace(&mut p.upload, Upload::Idle) {
            self.drop_upload(&r);
        }
        let path = match normalize_path(ph.file_name.bytes()) {
            Ok(path) => path,
            Err(e) => {
                let why = format!("file name \"{}\": {e}", ph.file_name.display());
                self.refuse_packet(p, ph, content_len, &why);
                return false;
            }
        };
        if ph.orig_file_size as u64 > self.cfg.max_file_size {
            let why = format!(
                "file of {} bytes exceeds the {}-byte limit",
                ph.orig_file_size, self.cfg.max_file_size
            );
            self.refuse_packet(p, ph, content_len, &why);
            return false;
        }
        if let Some(why) = self.over_limit(id, ph.orig_file_size as u64) {
            self.refuse_packet(p, ph, content_len, &why);
            return false;
        }
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
        p.upload =
            Upload::Receiving(Receiving::new(upload, name, ph.file_name.clone(), ph.total_packets, now));
        true
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
        let cfg = &self.cfg;
        let entry = self.registry.by_id.get(&id)?;
        let used = entry.usage;
        if cfg.quota > 0 && used.bytes.saturating_add(announced) > cfg.quota {
            return Some(format!(
                "client \"{}\" would exceed --quota {} bytes: it stores {} bytes and the file announces {announced}",
                Esc(&entry.name),
                cfg.quota,
                used.bytes
            ));
        }
        if cfg.quota_files > 0 && used.files >= cfg.quota_files {
            return Some(format!(
                "client \"{}\" would exceed --quota-files {}: it stores {} files (current and versions)",
                Esc(&entry.name),
                cfg.quota_files,
                used.files
            ));
        }
        if cfg.min_free > 0 {
            if let Some(free) = self.metrics.free_bytes() {
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

    /// A piece of the streaming packet's content has been read (`last`: the
    /// packet's last piece): it goes to the worker with its grant.
    pub fn content_piece(&mut self, p: &mut Protocol, piece: Piece, last: bool) {
        let Some(s) = p.streaming.as_mut() else { return };
        let stream = *s;
        s.first = false;
        if last {
            p.streaming = None;
        }
        // The upload failed at the worker meanwhile (its 1607 is sent): the
        // rest of this packet's content is dropped, not sent.
        let current = matches!(&p.upload, Upload::Receiving(r) if r.upload == stream.upload);
        if !current {
            return;
        }
        let start = match (&p.session, stream.first && stream.opens_upload) {
            (Some(s), true) => Some(StartUpload { client: s.id, key: s.key }),
            _ => None,
        };
        if let Upload::Receiving(r) = &mut p.upload {
            r.started = true;
        }
        let last_of_upload = last && stream.last_packet;
        if last_of_upload {
            if let Upload::Receiving(r) = std::mem::replace(&mut p.upload, Upload::Idle) {
                p.upload = Upload::Finishing {
                    upload: r.upload,
                    name: r.name,
                    name_field: r.name_field,
                    total: r.total,
                    next: r.next,
                };
            }
            p.awaiting = Awaiting::LastPacket;
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
    /// packets; its content is read and dropped.
    fn refuse_packet(&mut self, p: &mut Protocol, ph: &PacketHeader, content_len: u64, why: &str) {
        p.incoming = Some(Incoming::Drain { len: content_len });
        self.metrics.unstored(Unstored::Refused);
        let dropped = match std::mem::replace(&mut p.upload, Upload::Idle) {
            Upload::Receiving(r) => Some(r),
            _ => None,
        };
        if let Some(r) = &dropped {
            self.drop_upload(r);
        }
        p.upload = Upload::Ended(Ended::refused(dropped.as_ref(), ph, content_len));
        p.refuse(why);
    }
}
