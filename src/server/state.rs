//! Where one connection stands in the protocol ([`Protocol`]), with no I/O:
//! its session, its upload ([`Upload`]), the files it has staged, and the
//! reply-bearing job it waits for ([`Awaiting`]).
//!
//! The states are enums moved by value (the way rustls moves between its
//! `Expect*` states): a transition takes the current state and returns the
//! next one, and every state is matched explicitly, so none is dropped by
//! omission. [`transition`] is the one place a state leaves its field; a
//! completion that finds the connection in a state that does not expect it
//! is refused with a 1607 and one log line (`machine.rs`,
//! `Core::out_of_state`), never reset silently. The fields are private to
//! the server; the fuzz harness reads what it checks through the methods of
//! `fuzzing.rs` (cargo feature `fuzzing`).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::protocol::{ClientId, NameField};
use crate::worker::{ConnRef, UploadId};

use super::sequence::{Ended, EndedHow};

/// Move a state out of `slot` by value through `step`, which returns the
/// next state. `vacant` holds the place while `step` runs and is never
/// observed: `step` cannot finish without giving the next state.
pub(super) fn transition<S, T>(slot: &mut S, vacant: S, step: impl FnOnce(S) -> (S, T)) -> T {
    let (next, out) = step(std::mem::replace(slot, vacant));
    *slot = next;
    out
}

/// The session a 1602/1605 opened: it belongs to this connection only.
pub(super) struct Session {
    pub(super) id: ClientId,
    pub(super) name: String,
    pub(super) key: [u8; 32],
    /// Uploads of this session that decrypted, with no failure between
    /// (see `admission::TRUST_AFTER_UPLOADS`).
    pub(super) decrypted: u32,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.key = [0; 32];
    }
}

/// What the protocol logic decided about a file packet's content (see
/// [`Protocol::take_incoming`]); the loop reads it accordingly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Incoming {
    /// Read it and hand it to the worker, piece by piece.
    Stream { len: u64 },
    /// Read it and drop it (the packet was refused).
    Drain { len: u64 },
}

/// How a CBC stream is being received (see docs/PROTOCOL.md, "file packets").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receiving {
    pub(super) upload: UploadId,
    /// The normalized path the file is stored under.
    pub(super) name: String,
    pub(super) name_field: NameField,
    pub(super) total: u16,
    /// The number the next packet must carry (wraps past 65,535).
    pub(super) next: u16,
    /// Packets accepted so far.
    pub(super) packets: u64,
    /// Content of it went to the worker (which then has its temp file).
    pub(super) started: bool,
    /// The open CBC stream, if any: its orig_file_size, its whole ciphertext
    /// length and the ciphertext bytes it still expects.
    pub(super) segment: Option<Segment>,
    /// The ciphertext length of the last completed stream (for the empty
    /// trailing packet of clients that put the whole length in content_size).
    pub(super) last_stream_len: u64,
    /// Plaintext bytes of all streams begun so far.
    pub(super) plain_total: u64,
    /// Ciphertext bytes of all streams begun so far (whole stream lengths):
    /// the 1603 reports it in 32 bits, so it may not exceed u32::MAX.
    pub(super) ciphertext_total: u64,
    /// Some stream spanned more than one packet: per-packet encryption is then ruled out.
    pub(super) multi_packet_stream: bool,
    /// The data directory's free space as measured when packet 1 came (None:
    /// unknown): what the upload's later streams are checked against, since
    /// later measures count what it wrote itself.
    pub(super) free_at_open: Option<u64>,
    /// Per-chunk encryption so far (every packet a whole CBC stream of its
    /// own): the plaintext size of packet 1's chunk. None otherwise.
    pub(super) chunk: Option<u32>,
    /// The last packet was a full chunk numbered as the total: the file is
    /// complete if nothing of it follows, or with the empty chunk that
    /// per-chunk clients send next; a non-empty chunk next means the u16
    /// counter wrapped and the upload goes on (see `sequence.rs`).
    pub(super) end_pending: bool,
    /// A per-chunk upload whose count went on past a full chunk numbered as
    /// the total: only a client with more than 65,535 chunks does that, and
    /// it sends them back to back; one that stops is refused (`sequence.rs`).
    pub(super) past_total: bool,
    pub(super) touched: Instant,
}

impl Receiving {
    /// The state of a new upload, at its packet 1.
    pub fn new(upload: UploadId, name: String, name_field: NameField, total: u16, now: Instant) -> Receiving {
        Receiving {
            upload,
            name,
            name_field,
            total,
            next: 1,
            packets: 0,
            started: false,
            segment: None,
            last_stream_len: 0,
            plain_total: 0,
            ciphertext_total: 0,
            multi_packet_stream: false,
            free_at_open: None,
            chunk: None,
            end_pending: false,
            past_total: false,
            touched: now,
        }
    }
}

/// The CBC stream of an upload that is still open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Segment {
    pub(super) orig: u32,
    pub(super) whole: u64,
    pub(super) remaining: u64,
}

/// An upload whose last packet went to the worker; its outcome is awaited.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Finishing {
    pub(super) upload: UploadId,
    /// The normalized path the file is stored under.
    pub(super) name: String,
    pub(super) name_field: NameField,
    pub(super) total: u16,
    /// The number a packet after the last would carry.
    pub(super) next: u16,
}

impl From<Receiving> for Finishing {
    fn from(r: Receiving) -> Finishing {
        Finishing { upload: r.upload, name: r.name, name_field: r.name_field, total: r.total, next: r.next }
    }
}

/// The upload side of a connection. Its transitions take it by value and
/// return the next state (through [`Protocol::advance_upload`] or
/// [`Protocol::advance_upload_with`]). The states are boxed so that a move
/// is a pointer's (a file name field alone is 255 bytes): one allocation per
/// upload and per end of one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Upload {
    Idle,
    Receiving(Box<Receiving>),
    /// The last packet went to the worker; its outcome is awaited.
    Finishing(Box<Finishing>),
    /// An upload ended (refused, or received): later packets of it are
    /// swallowed silently (see [`Ended::swallow`]), so that a client sending
    /// them back to back gets exactly one 1607, or none after its 1603.
    Ended(Box<Ended>),
}

impl Upload {
    /// What the state is, for a log line.
    pub(super) fn describe(&self) -> &'static str {
        match self {
            Upload::Idle => "no upload",
            Upload::Receiving(_) => "an upload in progress",
            Upload::Finishing(_) => "an upload's last packet at the worker",
            Upload::Ended(_) => "an ended upload",
        }
    }

    /// A request other than a file packet ends the swallowing of an ended upload.
    pub(super) fn end_swallowing(self) -> (Upload, ()) {
        match self {
            Upload::Ended(_) => (Upload::Idle, ()),
            other => (other, ()),
        }
    }

    /// A new session key: an upload in progress cannot go on under it and is
    /// handed back to be dropped. One whose last packet is at the worker
    /// stays: its outcome ends it.
    pub(super) fn new_session(self) -> (Upload, Option<Receiving>) {
        match self {
            Upload::Receiving(r) => (Upload::Idle, Some(*r)),
            Upload::Idle | Upload::Ended(_) => (Upload::Idle, None),
            Upload::Finishing(f) => (Upload::Finishing(f), None),
        }
    }

    /// A piece of upload `id`'s content goes to the worker (`ends`: the
    /// upload's last piece, after which its outcome is awaited). False, and
    /// the state unchanged, when `id` is no longer the upload in progress
    /// (it failed at the worker meanwhile): the piece is dropped.
    pub(super) fn piece_sent(self, id: UploadId, ends: bool) -> (Upload, bool) {
        match self {
            Upload::Receiving(mut r) if r.upload == id => {
                r.started = true;
                let next = if ends { Upload::Finishing(Box::new((*r).into())) } else { Upload::Receiving(r) };
                (next, true)
            }
            other => (other, false),
        }
    }

    /// The worker staged upload `id` whole: it ends as received (its empty
    /// chunk n+1 of n, if one follows, is swallowed). The finished upload,
    /// or None and the state unchanged when `id` is not the one finishing.
    pub(super) fn received(self, id: UploadId) -> (Upload, Option<Finishing>) {
        match self {
            Upload::Finishing(f) if f.upload == id => {
                let how = EndedHow::Complete;
                let e = Ended {
                    name_field: f.name_field.clone(),
                    total: f.total,
                    abandoned: None,
                    next: f.next,
                    how,
                };
                (Upload::Ended(Box::new(e)), Some(*f))
            }
            other => (other, None),
        }
    }

    /// Upload `id` failed at the worker: if it is the current one it ends
    /// (its later packets are swallowed) and true is returned.
    pub(super) fn failed(self, id: UploadId) -> (Upload, bool) {
        match self {
            Upload::Receiving(r) if r.upload == id => (Upload::Ended(Box::new(Ended::failed(&r))), true),
            Upload::Finishing(f) if f.upload == id => {
                let how = EndedHow::Refused { remaining: 0, seen: 0, chunks: false };
                let Finishing { name_field, total, next, .. } = *f;
                (Upload::Ended(Box::new(Ended { name_field, total, abandoned: None, next, how })), true)
            }
            other => (other, false),
        }
    }

    /// The worker ignored the last piece of upload `id` (it had failed or
    /// was discarded): if it was finishing, nothing is left of it.
    pub(super) fn last_ignored(self, id: UploadId) -> (Upload, ()) {
        match self {
            Upload::Finishing(f) if f.upload == id => (Upload::Idle, ()),
            other => (other, ()),
        }
    }

    /// The upload in progress, untouched for `limit` at `now`, is dropped
    /// and handed back.
    pub(super) fn expire(self, now: Instant, limit: Duration) -> (Upload, Option<Receiving>) {
        match self {
            Upload::Receiving(r) if now.duration_since(r.touched) > limit => (Upload::Idle, Some(*r)),
            other => (other, None),
        }
    }
}

/// A file that reached 1603 (or was then retried), keyed by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct StagedFile {
    pub(super) name: String,
    pub(super) upload: UploadId,
    /// 1030 was received: the staged copy is gone, a resend is expected.
    pub(super) retried: bool,
    pub(super) touched: Instant,
}

/// At most this many staged files per connection; the oldest is dropped beyond it.
pub(super) const MAX_STAGED: usize = 16;

/// A 1026 whose key is at the worker: what its 1602 will carry.
#[derive(Clone, PartialEq, Eq)]
pub(super) struct PendingKey {
    pub(super) encrypted_key: Vec<u8>,
    pub(super) key: [u8; 32],
    pub(super) name: String,
    pub(super) public: rsa::RsaPublicKey,
}

/// A reply-bearing job is at the worker; its completion sends the reply.
/// (No `Debug`: a variant holds a session key, which must never be logged.)
#[derive(Clone, PartialEq, Eq)]
pub(super) enum Awaiting {
    Nothing,
    Register,
    Key(Box<PendingKey>),
    Commit {
        name: String,
    },
    /// Waiting for the outcome of the upload's last packet.
    LastPacket,
}

impl Awaiting {
    /// What is awaited, for a log line.
    pub(super) fn describe(&self) -> &'static str {
        match self {
            Awaiting::Nothing => "no reply awaited",
            Awaiting::Register => "a registration awaited",
            Awaiting::Key(_) => "a key awaited",
            Awaiting::Commit { .. } => "a commit awaited",
            Awaiting::LastPacket => "the last packet's outcome awaited",
        }
    }
}

/// One connection's place in the protocol: everything the state machine of
/// `machine.rs` reads and changes, and nothing about sockets, so that it can
/// run without one (the fuzz target `session` drives it with bytes).
pub struct Protocol {
    /// Names the connection in jobs and completions (slab key + unique serial).
    pub(super) conn: ConnRef,
    pub(super) peer: SocketAddr,
    /// Encoded replies not yet written (the loop writes from `Connection`'s position).
    pub(super) out: Vec<u8>,
    pub(super) session: Option<Session>,
    /// The id this connection registered (1600), which may send its first key.
    pub(super) registered_id: Option<ClientId>,
    /// The client named by the last request that carried a known id (for log lines).
    pub(super) client_label: Option<String>,
    pub(super) upload: Upload,
    pub(super) staged: VecDeque<StagedFile>,
    awaiting: Awaiting,
    /// Content pieces handed to the worker and not yet completed.
    pub(super) packets_in_flight: usize,
    /// Set by a file packet's fixed fields: what to do with its content.
    pub(super) incoming: Option<Incoming>,
    /// The packet whose content is streaming: the worker flags of its pieces.
    pub(super) streaming: Option<PacketStream>,
    /// When this connection last made upload progress: content received, or
    /// a 1603/1604 sent. Requests that cost nothing (register, reconnect) do
    /// not count: this decides who is evicted when the table is full.
    pub(super) last_progress: Option<Instant>,
    /// When this connection last registered (a 1025 past the rate limit)
    /// or had its key saved (1602): steps a client takes once, rate-limited
    /// per address, which keep its slot for a while against connections
    /// that only reconnect (see `admission::eviction_rank`).
    pub(super) logged_in: Option<Instant>,
}

/// The content of one admitted file packet on its way to the worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct PacketStream {
    pub(super) upload: UploadId,
    /// No piece has gone yet (the first carries `new_segment`, and `start` on packet 1).
    pub(super) first: bool,
    /// The first piece is the upload's first (packet 1): it opens the temp file.
    pub(super) opens_upload: bool,
    pub(super) new_segment: bool,
    pub(super) end_segment: Option<u64>,
    /// The upload's last packet.
    pub(super) last_packet: bool,
}

impl Protocol {
    pub fn new(conn: ConnRef, peer: SocketAddr) -> Protocol {
        Protocol {
            conn,
            peer,
            out: Vec::new(),
            session: None,
            registered_id: None,
            client_label: None,
            upload: Upload::Idle,
            staged: VecDeque::new(),
            awaiting: Awaiting::Nothing,
            packets_in_flight: 0,
            incoming: None,
            streaming: None,
            last_progress: None,
            logged_in: None,
        }
    }

    /// "peer name" or "peer" for log lines.
    pub(super) fn tag(&self) -> String {
        match &self.client_label {
            Some(l) => format!("{} {}", self.peer, crate::logging::Esc(l)),
            None => self.peer.to_string(),
        }
    }

    /// May the loop parse this connection's next request? Not while a reply
    /// is owed by the worker (replies leave in request order) nor with
    /// `PIPELINE_DEPTH` packets at the worker.
    pub fn may_read(&self) -> bool {
        !self.awaits_reply() && self.packets_in_flight < super::PIPELINE_DEPTH
    }

    /// A reply-bearing job of this connection is at the worker.
    pub fn awaits_reply(&self) -> bool {
        self.awaiting != Awaiting::Nothing
    }

    /// What is awaited, for a log line.
    pub(super) fn awaited(&self) -> &'static str {
        self.awaiting.describe()
    }

    /// Nothing at the worker and no transfer that a close would lose.
    pub(super) fn is_idle(&self) -> bool {
        !self.awaits_reply()
            && self.packets_in_flight == 0
            && matches!(self.upload, Upload::Idle | Upload::Ended(_))
            && self.staged.iter().all(|s| s.retried)
    }

    /// An upload in progress or a staged file untouched for `limit` at `now`.
    pub(super) fn has_stale(&self, now: Instant, limit: Duration) -> bool {
        let stale_upload =
            matches!(&self.upload, Upload::Receiving(r) if now.duration_since(r.touched) > limit);
        stale_upload || self.staged.iter().any(|s| now.duration_since(s.touched) > limit)
    }

    /// The upload's end has been pending (a full chunk numbered as the
    /// total, see `sequence.rs`) with nothing of it since for `grace` at `now`.
    pub(super) fn end_overdue(&self, now: Instant, grace: Duration) -> bool {
        matches!(&self.upload, Upload::Receiving(r) if r.end_pending && now.duration_since(r.touched) > grace)
            && self.streaming.is_none()
            && !self.awaits_reply()
    }

    /// A per-chunk upload went on past its total (see `Receiving::past_total`)
    /// and nothing of it came for `grace` at `now`, with nothing of it at the
    /// worker.
    pub(super) fn past_total_overdue(&self, now: Instant, grace: Duration) -> bool {
        matches!(&self.upload, Upload::Receiving(r) if r.past_total && now.duration_since(r.touched) > grace)
            && self.streaming.is_none()
            && self.packets_in_flight == 0
            && !self.awaits_reply()
    }

    /// Find a staged file by name.
    pub(super) fn staged_index(&self, name: &str) -> Option<usize> {
        self.staged.iter().position(|s| s.name == name)
    }

    /// What to do with the content of the file packet just handled, once.
    pub fn take_incoming(&mut self) -> Option<Incoming> {
        self.incoming.take()
    }

    /// Move the upload to its next state: `step` takes it by value and
    /// returns the next one.
    pub(super) fn advance_upload<T>(&mut self, step: impl FnOnce(Upload) -> (Upload, T)) -> T {
        self.advance_upload_with(&mut (), |_, _, upload| step(upload))
    }

    /// [`Protocol::advance_upload`] for a transition that also needs `cx`
    /// (the core) and the rest of the protocol state: `step` gets them with
    /// the upload by value and returns the next state. As in [`transition`],
    /// `self.upload` holds `Idle` while `step` runs, which `step` must not
    /// read (it reads the state it was given).
    pub(super) fn advance_upload_with<C, T>(
        &mut self,
        cx: &mut C,
        step: impl FnOnce(&mut C, &mut Protocol, Upload) -> (Upload, T),
    ) -> T {
        let current = std::mem::replace(&mut self.upload, Upload::Idle);
        let (next, out) = step(cx, self, current);
        self.upload = next;
        out
    }

    /// A reply-bearing job goes to the worker: its reply is awaited. Only
    /// with nothing awaited: the loop reads no request meanwhile.
    pub(super) fn wait_for(&mut self, what: Awaiting) {
        debug_assert!(self.awaiting == Awaiting::Nothing, "two replies awaited at once");
        self.awaiting = what;
    }

    /// End the wait for a reply-bearing job: `pick` takes what is awaited by
    /// value and gives back its content when it is what the completion
    /// expects. Otherwise the state stays as it was and None is returned (the
    /// caller refuses: see `Core::out_of_state`).
    pub(super) fn end_wait<T>(&mut self, pick: impl FnOnce(Awaiting) -> Result<T, Awaiting>) -> Option<T> {
        transition(&mut self.awaiting, Awaiting::Nothing, |a| match pick(a) {
            Ok(t) => (Awaiting::Nothing, Some(t)),
            Err(kept) => (kept, None),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn receiving(upload: UploadId) -> Receiving {
        let field = NameField::from_name(b"f").unwrap();
        Receiving::new(upload, "f".into(), field, 2, Instant::now())
    }

    /// Each transition matches every state: what it does not concern comes
    /// back unchanged, and an upload whose last packet is at the worker is
    /// ended only by that packet's outcome.
    #[test]
    fn transitions_keep_the_states_they_do_not_concern() {
        let finishing = Upload::Finishing(Box::new(receiving(5).into()));
        assert_eq!(finishing.clone().new_session(), (finishing.clone(), None));
        assert_eq!(finishing.clone().end_swallowing(), (finishing.clone(), ()));
        assert_eq!(finishing.clone().piece_sent(5, true), (finishing.clone(), false));
        assert_eq!(finishing.clone().received(6), (finishing.clone(), None));
        assert_eq!(finishing.clone().failed(6), (finishing.clone(), false));
        assert_eq!(finishing.clone().last_ignored(6), (finishing.clone(), ()));
        let later = Instant::now() + Duration::from_secs(3600);
        assert_eq!(finishing.clone().expire(later, Duration::ZERO), (finishing.clone(), None));
        assert!(matches!(finishing.clone().received(5), (Upload::Ended(_), Some(f)) if f.upload == 5));

        let r = Upload::Receiving(Box::new(receiving(3)));
        assert_eq!(r.clone().received(3), (r.clone(), None), "received only once finishing");
        assert!(matches!(r.clone().piece_sent(3, true), (Upload::Finishing(f), true) if f.upload == 3));
        assert!(matches!(r.clone().piece_sent(3, false), (Upload::Receiving(x), true) if x.started));
        assert_eq!(r.clone().piece_sent(4, false), (r.clone(), false), "another upload's piece is dropped");
        assert!(matches!(r.clone().new_session(), (Upload::Idle, Some(x)) if x.upload == 3));
        assert!(matches!(r.clone().failed(3), (Upload::Ended(_), true)));
        assert_eq!(r.clone().expire(Instant::now(), Duration::from_secs(60)), (r.clone(), None));
        assert!(matches!(r.expire(later, Duration::ZERO), (Upload::Idle, Some(_))));
    }

    /// A wait ends only for what is awaited; otherwise the state is kept.
    #[test]
    fn a_wait_ends_only_for_what_is_awaited() {
        let mut p = Protocol::new(ConnRef { key: 0, serial: 1 }, "192.0.2.1:1".parse().unwrap());
        p.wait_for(Awaiting::Commit { name: "a".into() });
        assert_eq!(p.end_wait(|a| if a == Awaiting::Register { Ok(()) } else { Err(a) }), None);
        assert!(p.awaits_reply());
        let name = p.end_wait(|a| match a {
            Awaiting::Commit { name } => Ok(name),
            other => Err(other),
        });
        assert_eq!(name.as_deref(), Some("a"));
        assert!(!p.awaits_reply());
    }
}
