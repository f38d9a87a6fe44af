//! The model's checks of a file packet: swallowed after an ended upload,
//! refused with one 1607, or admitted (its content then streams to the worker).

use backupd::crypto::ciphertext_len;
use backupd::protocol::{normalize_path, ClientId, NameField, PacketHeader, Response};
use backupd::server::fuzzing::Incoming;
use backupd::worker::{Job, PacketJob, UploadId};

use super::model::{MConn, MUpload};
use super::reader::Streaming;
use super::{clone_discard, discards_only, is_packet_job, packet_jobs, sorted, Sim};

impl Sim<'_> {
    /// One 1028 through `handle_frame`, checked against the model.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn on_packet(
        &mut self,
        s: usize,
        hid: ClientId,
        ph: PacketHeader,
        content_len: u64,
        conforming: bool,
        replies: Vec<Response>,
        jobs: &[Job],
    ) {
        if self.swallowed(s, &ph, content_len, &replies, jobs) {
            return;
        }
        let m = &self.slots[s].model;
        let receiving = match &m.upload {
            MUpload::Receiving { id, field, total, next, conforming, .. } => {
                Some((*id, field.clone(), *total, *next, *conforming))
            }
            _ => None,
        };
        let pjobs = packet_jobs(jobs);
        let others: Vec<Job> = jobs.iter().filter(|j| !is_packet_job(j)).map(clone_discard).collect();
        let seen = Seen {
            ph: &ph,
            content_len,
            conforming,
            session: m.session.filter(|(id, _)| *id == hid).map(|(id, _)| id),
            name: normalize_path(ph.file_name.bytes()).ok().map(|p| p.as_str().to_string()),
            receiving,
            discards: discards_only(&others),
        };
        if replies.is_empty() {
            self.on_admitted(s, seen, &pjobs);
        } else {
            self.on_refused(s, &seen, replies, &pjobs);
        }
    }

    /// After an ended upload: a refused one swallows every later packet of it
    /// (of its name field and total, or of the upload in progress it
    /// abandoned; any number but 1, which is new: no input here reaches the
    /// 65,536 packets a wrapped counter needs), a received one only its empty
    /// chunk n+1 of n. Any other packet ends the swallowing. True when this
    /// packet was swallowed.
    fn swallowed(
        &mut self,
        s: usize,
        ph: &PacketHeader,
        content_len: u64,
        replies: &[Response],
        jobs: &[Job],
    ) -> bool {
        let (k, n) = (ph.packet_number, ph.total_packets);
        let slot = &mut self.slots[s];
        let m = &mut slot.model;
        let MUpload::Ended { field, next, total, refused, abandoned } = &m.upload else { return false };
        let named = |f: &NameField, t: u16| f.bytes() == ph.file_name.bytes() && n == t;
        let own = named(field, *total);
        let of_refused =
            *refused && k != 1 && (own || abandoned.as_deref().is_some_and(|(f, t)| named(f, *t)));
        let same = own && k == *next;
        let trailer = !*refused
            && k == n.wrapping_add(1)
            && ph.orig_file_size == 0
            && (content_len == 0 || content_len == 16);
        // A chunk of its own after a received upload: a per-chunk upload
        // ended too early (its total wrapped); it and the rest are swallowed.
        let chunk_after = !*refused
            && k == n.wrapping_add(1)
            && !trailer
            && content_len > 0
            && content_len == ciphertext_len(u64::from(ph.orig_file_size));
        if !(of_refused || (same && (trailer || chunk_after))) {
            m.upload = MUpload::Idle;
            return false;
        }
        assert!(replies.is_empty() && jobs.is_empty(), "a swallowed packet was answered or sent on");
        assert_eq!(slot.proto.incoming(), Some(Incoming::Drain { len: content_len }));
        let refused = *refused || chunk_after;
        // A refused upload keeps its names (its later packets may carry
        // either); a received one that swallowed its trailer goes on by number.
        m.upload = if of_refused {
            m.upload.clone()
        } else {
            MUpload::Ended {
                field: field.clone(),
                next: k.wrapping_add(1),
                total: n,
                refused,
                abandoned: None,
            }
        };
        self.stats.packets_skipped += u32::from(refused);
        self.stats.trailers += u32::from(!refused);
        true
    }

    /// Refused: one 1607, the upload in progress dropped, the rest of this one skipped.
    fn on_refused(&mut self, s: usize, seen: &Seen<'_>, replies: Vec<Response>, pjobs: &[&PacketJob]) {
        let max_file_size = self.max_file_size;
        let (k, n) = (seen.ph.packet_number, seen.ph.total_packets);
        let slot = &mut self.slots[s];
        let m = &mut slot.model;
        assert_eq!(replies, vec![Response::GeneralError], "a refused packet");
        assert!(pjobs.is_empty(), "a refused packet went to the worker");
        assert!(!seen.must_accept(max_file_size), "packet {k}/{n} follows the rules but was refused");
        assert_eq!(
            slot.proto.incoming(),
            Some(Incoming::Drain { len: seen.content_len }),
            "refused content is dropped"
        );
        let mut expected: Vec<UploadId> = seen.receiving.iter().map(|r| r.0).collect();
        // A packet 1 that passes the session, numbering, name and size checks
        // replaces a staged copy of its name even if its sizes are then refused
        // (the client has started that file over).
        let starts = seen.session.is_some() && k == 1 && u64::from(seen.ph.orig_file_size) <= max_file_size;
        if let (Some(name), true) = (&seen.name, starts) {
            expected.extend(drop_staged(m, name));
        }
        assert_eq!(seen.discards, sorted(expected), "a refused packet drops the upload in progress");
        let abandoned = match &m.upload {
            MUpload::Receiving { field, total, .. }
                if k != 1 && (field.bytes() != seen.ph.file_name.bytes() || *total != n) =>
            {
                Some(Box::new((field.clone(), *total)))
            }
            _ => None,
        };
        m.upload = MUpload::Ended {
            field: seen.ph.file_name.clone(),
            next: k.wrapping_add(1),
            total: n,
            refused: true,
            abandoned,
        };
        self.stats.packets_refused += 1;
    }

    /// Admitted: a packet 1 starts an upload (dropping the one in progress and
    /// a staged copy of its name), any other continues the one in progress.
    fn on_admitted(&mut self, s: usize, seen: Seen<'_>, pjobs: &[&PacketJob]) {
        let max_file_size = self.max_file_size;
        let (ph, content_len) = (seen.ph, seen.content_len);
        let (k, n) = (ph.packet_number, ph.total_packets);
        let slot = &mut self.slots[s];
        let m = &mut slot.model;
        assert!(seen.session.is_some(), "a packet admitted without this connection's session key");
        let (prev_chunk, prev_pending) = match &m.upload {
            MUpload::Receiving { chunk, pending, .. } => (*chunk, *pending),
            _ => (None, false),
        };
        // The upload the state machine streams this packet's content to.
        let Some(upload) = slot.proto.current_upload() else {
            panic!("packet {k}/{n} admitted with no upload in the state machine")
        };
        if k == 1 {
            let Some(name) = &seen.name else { panic!("a packet 1 with a bad file name was accepted") };
            assert!(
                u64::from(ph.orig_file_size) <= max_file_size,
                "a file over --max-file-size was accepted"
            );
            assert!(!self.ledger.contains_key(&upload), "upload id {upload} reused");
            let mut expected: Vec<UploadId> = seen.receiving.iter().map(|r| r.0).collect();
            expected.extend(drop_staged(m, name));
            assert_eq!(
                seen.discards,
                sorted(expected),
                "a new upload drops the previous one and the staged copy"
            );
            let (field, conforming) = (ph.file_name.clone(), seen.conforming);
            let (chunk, pending) = (None, false);
            m.upload =
                MUpload::Receiving { id: upload, field, total: n, next: 2, conforming, chunk, pending };
        } else {
            assert!(seen.discards.is_empty());
            let Some((id, field, total, next, was)) = seen.receiving else {
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
                conforming: was && seen.conforming,
                chunk: None,
                pending: false,
            };
        }
        // No input here sends a file big enough to wrap its counter: a packet
        // numbered as the total ends the upload, or is refused; with
        // per-chunk encryption a full chunk numbered as the total leaves the
        // end pending, and the empty chunk after it ends the upload.
        let orig = ph.orig_file_size;
        let whole_here = content_len > 0 && content_len == ciphertext_len(u64::from(orig));
        let chunk = match (k == 1, whole_here) {
            (true, true) => Some(orig),
            (false, true) => prev_chunk,
            (_, false) => None,
        };
        let mut ends = k == n || (k == 1 && n == 0 && orig == 0 && content_len == 16);
        // (Only within the upload: a packet 1 starts a new one, whose end is not pending.)
        ends |= k != 1 && prev_pending && whole_here && orig == 0;
        let pending = ends && k != 1 && orig > 0 && chunk == Some(orig);
        ends &= !pending;
        if let MUpload::Receiving { chunk: c, pending: p, .. } = &mut m.upload {
            (*c, *p) = (chunk, pending);
        }
        slot.streaming = Some(Streaming { upload, k, n, first: true, ends });
        if content_len == 0 {
            // An empty packet goes to the worker at once, as one empty piece.
            assert_eq!(slot.proto.incoming(), None);
            assert!(pjobs.len() == 1, "an empty packet makes one packet job");
            self.check_piece(s, pjobs.first().copied(), &[], true);
        } else {
            assert!(pjobs.is_empty(), "content went to the worker before it was read");
            assert_eq!(slot.proto.incoming(), Some(Incoming::Stream { len: content_len }));
        }
    }
}

/// What the model knew of a packet when `handle_frame` took it.
struct Seen<'p> {
    ph: &'p PacketHeader,
    content_len: u64,
    /// The generator built it to follow the packet conventions.
    conforming: bool,
    /// This connection's session id, if the packet carries it.
    session: Option<ClientId>,
    /// The path its file name stands for, if the name is valid.
    name: Option<String>,
    /// The upload in progress: id, name field, total, next number, and
    /// whether all its packets so far were conforming.
    receiving: Option<(UploadId, NameField, u16, u16, bool)>,
    /// The uploads of the Discard jobs it made, sorted.
    discards: Vec<UploadId>,
}

impl Seen<'_> {
    /// When the packet must be accepted: the rules the model knows, and sizes
    /// that the generator built to follow the packet conventions.
    fn must_accept(&self, max_file_size: u64) -> bool {
        let ph = self.ph;
        let (k, n) = (ph.packet_number, ph.total_packets);
        self.session.is_some()
            && self.conforming
            && if k == 1 {
                self.name.is_some() && u64::from(ph.orig_file_size) <= max_file_size
            } else {
                self.receiving
                    .as_ref()
                    .is_some_and(|(_, f, t, nx, c)| *c && *f == ph.file_name && *t == n && *nx == k)
            }
    }
}

/// A packet 1 replaces the staged copy of its file: it leaves the staged
/// list, and is discarded unless a 1030 already discarded it.
fn drop_staged(m: &mut MConn, name: &str) -> Option<UploadId> {
    let i = m.staged.iter().position(|f| f.name == name)?;
    let old = m.staged.remove(i).expect("index");
    (!old.retried).then_some(old.upload)
}
