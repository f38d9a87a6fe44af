//! Target 5: the per-connection state machine.
//!
//! `session` runs the server's protocol state machine (`Core` acting on each
//! connection's `Protocol`, see src/server/machine.rs) with no socket and no
//! worker thread: two connection slots are fed request bytes the way the loop
//! reads them (23 header bytes, the header check, the control payload or a
//! packet's fixed fields, `handle_frame`, then a packet's content in pieces
//! granted by the budget, `content_piece`), and an in-harness fake worker answers each job in
//! FIFO order with the completion the real worker would give, the outcome
//! (ok, failed, decryption failure, cksum) chosen by the input. A model of each
//! connection, built only from the requests sent and the replies and jobs
//! seen, predicts what each step must produce.
//!
//! Input: one flag byte (--ack-retry, --oaep-hash, --max-packet,
//! --max-file-size, --memory-budget, check a session key), then operations, each a selector byte
//! and its parameters: well-formed frames (the client's natural next step, or
//! any of the 7 codes with chosen fields; packets following the size rules or
//! not), raw bytes and lying headers, completion deliveries, closes, stale
//! purges. At the end every completion is delivered and both connections close.
//!
//! Invariants: no panic; every reply is a well-formed response; each request
//! gets exactly the replies the rules demand (one for those that require one,
//! none for a 1030 without --ack-retry or a swallowed packet), in order; a
//! 1604 for a 1029 only after its Commit job completed ok; no Job::Packet
//! without this connection's session key (and packet 1 carries that key); the
//! budget in use is always exactly the content bytes at the worker plus those
//! of granted pieces being read, so it is 0 when nothing is in flight; packets_in_flight
//! is the number of this connection's pieces at the worker and `awaiting` is
//! set exactly while its reply-bearing job is there (so both return to
//! 0/Nothing once completions are delivered); an upload is never discarded or
//! committed twice, nor used after; and at the end every upload that got a
//! Job::Packet{start} got a Commit or a Discard, or failed at the worker.
//!
//! The simulator is here ([`session_stats`], the closes, purges and the
//! invariants between steps); its generator (what the fake client sends) in
//! `generator`; the loop's reading in `reader`; the model and its checks,
//! request by request, in `model` and `packets`; the fake worker in `worker`;
//! the client's RSA key in `key`.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use backupd::config::Config;
use backupd::crypto::OaepHash;
use backupd::protocol::{ClientId, NameField, Response, ResponseHeader, RESPONSE_HEADER_LEN};
use backupd::server::fuzzing::{Core, Registry};
use backupd::worker::{Job, PacketJob, UploadId};

use self::model::{expected_is_quiet, Ledger, MClient, MUpload, Owed};
use self::reader::Slot;
use self::worker::WUpload;
use super::Input;

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

mod generator;
mod key;
mod model;
mod packets;
mod reader;
mod worker;

pub use self::key::{client_key, ClientKey};

fn base_config() -> &'static Config {
    static CFG: OnceLock<Config> = OnceLock::new();
    CFG.get_or_init(|| {
        let mut c = Config::defaults();
        // Inputs may register many clients from the one peer address.
        c.registration_rate = 0.0;
        c
    })
}

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
    /// Decryption failures per client and bucket (the server's token
    /// buckets, which do not refill noticeably during a run): the one peer
    /// address's own once the client proved itself from it (`true`), else
    /// the one all unproven addresses share.
    decrypt_failures: HashMap<(ClientId, bool), u32>,
    /// Clients proven from the peer address (src/server/admission.rs,
    /// `DecryptFailures`): their key was set here, or a session here had
    /// `TRUST_AFTER_UPLOADS` uploads decrypt in a row.
    trusted: HashSet<ClientId>,
    stats: SessionStats,
}

/// The server's burst of decryption failures per client and bucket
/// (src/server/admission.rs).
const DECRYPT_FAILURE_BURST: u32 = 10;
/// Uploads in a row that prove a client's address (src/server/admission.rs).
const TRUST_AFTER_UPLOADS: u32 = 2;

impl Sim<'_> {
    /// The bucket the peer address's decryption failures for `id` take from.
    fn failure_bucket(&self, id: ClientId) -> (ClientId, bool) {
        (id, self.trusted.contains(&id))
    }
}

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
        trusted: HashSet::new(),
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
fn take_replies(out: Vec<u8>) -> Vec<Response> {
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

/// A Discard or Touch job, copied (jobs are not `Clone`: packets own buffers).
fn clone_discard(j: &Job) -> Job {
    match j {
        Job::Discard { upload, failed } => Job::Discard { upload: *upload, failed: failed.clone() },
        Job::Touch { id } => Job::Touch { id: *id },
        other => panic!("unexpected job {}", job_name(other)),
    }
}

impl Sim<'_> {
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
        let jobs = self.core.take_jobs();
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
        let jobs = self.core.take_jobs();
        assert!(take_replies(slot.proto.take_output()).is_empty());
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
        assert_eq!(self.core.budget().used(), at_worker + held, "budget in use vs content bytes held");
        for slot in &self.slots {
            let (p, m) = (&slot.proto, &slot.model);
            let mine = |j: &&Job| match j {
                Job::Packet(x) => x.conn == m.conn,
                _ => false,
            };
            assert_eq!(p.packets_in_flight(), self.queue.iter().filter(mine).count(), "packets_in_flight");
            assert_eq!(!p.awaits_reply(), m.owed == Owed::Nothing, "awaiting vs the model");
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
            assert!(!slot.proto.awaits_reply(), "awaiting after every completion");
            assert_eq!(slot.proto.packets_in_flight(), 0);
        }
        assert_eq!(self.core.budget().used(), self.slots.iter().map(Slot::reserved).sum::<usize>());
        self.close(0);
        self.close(1);
        self.deliver(usize::MAX);
        self.check_global();
        assert_eq!(self.core.budget().used(), 0, "budget left in use with nothing in flight");
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
