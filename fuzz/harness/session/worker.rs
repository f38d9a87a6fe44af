//! The fake worker: each job answered in FIFO order with the completion
//! the real worker would give, the outcome chosen by the input.

use backupd::protocol::{normalize_path, ClientId, Response};
use backupd::server::fuzzing::Flow;
use backupd::worker::{Completion, Job, PacketOutcome, UploadError, UploadId};

use super::super::Input;
use super::model::{MStaged, MUpload, Owed};
use super::{discards_only, sorted, take_replies, tracing, Sim, DECRYPT_FAILURE_BURST, TRUST_AFTER_UPLOADS};

/// What the model checks of a packet completion's outcome (outcomes are
/// not `Clone`: a failure may carry an I/O error).
#[derive(Debug, Clone, Copy)]
enum Outcome {
    Accepted,
    Received { cksum: u32, ciphertext_len: u64 },
    Failed { decryption: bool },
    Ignored,
}

impl From<&PacketOutcome> for Outcome {
    fn from(o: &PacketOutcome) -> Outcome {
        match o {
            PacketOutcome::Accepted => Outcome::Accepted,
            PacketOutcome::Received { cksum, ciphertext_len, .. } => {
                Outcome::Received { cksum: *cksum, ciphertext_len: *ciphertext_len }
            }
            PacketOutcome::Failed(e) => Outcome::Failed { decryption: e.is_decryption() },
            PacketOutcome::Ignored => Outcome::Ignored,
        }
    }
}

/// The fake worker's upload state (the real worker's `Upload`).
pub(super) struct WUpload {
    client: ClientId,
    ciphertext: u64,
    received: bool,
}

impl Sim<'_> {
    /// Process up to `n` jobs in order and hand their completions to the loop.
    pub(super) fn deliver(&mut self, n: usize) {
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
            Job::Register { conn, id, .. } => {
                Some(Completion::Registered { conn, id, ok: !fail(&mut self.input), reclaimed: None })
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
                            PacketOutcome::Failed(UploadError::Decryption)
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
        let conn = done.conn();
        self.follow_registry(&done);
        let live = self.slots[conn.key].model.conn == conn;
        let summary = match &done {
            Completion::Packet { upload, last, outcome, .. } => {
                Some((*upload, *last, Outcome::from(outcome)))
            }
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
        let jobs = self.core.take_jobs();
        if !live {
            assert_eq!(flow, Flow::Continue, "a completion for a closed connection");
            assert!(jobs.is_empty(), "a completion for a closed connection issued jobs");
            return;
        }
        assert_eq!(flow, Flow::Resume);
        let replies = take_replies(slot.proto.take_output());
        match kind {
            (0, id, ok) => self.registered(conn.key, id, ok, replies, &jobs),
            (1, id, ok) => self.key_saved(conn.key, id, ok, replies, &jobs),
            (3, _, ok) => self.committed(conn.key, ok, replies, &jobs),
            _ => {
                let (upload, last, outcome) = summary.expect("a packet completion");
                self.packet_done(conn.key, upload, last, outcome, replies, &jobs);
            }
        }
        self.enqueue(jobs);
        self.pump(conn.key);
    }

    /// The registry follows the database whether or not the connection is open.
    fn follow_registry(&mut self, done: &Completion) {
        match done {
            Completion::Registered { conn, id, ok, .. } => {
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
    }

    /// A Register job's completion: 1600, or 1607 when the database failed.
    fn registered(&mut self, s: usize, id: ClientId, ok: bool, replies: Vec<Response>, jobs: &[Job]) {
        let m = &mut self.slots[s].model;
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

    /// A SetKey job's completion: 1602 and a new session, or 1607.
    fn key_saved(&mut self, s: usize, id: ClientId, ok: bool, replies: Vec<Response>, jobs: &[Job]) {
        let m = &mut self.slots[s].model;
        assert_eq!(m.owed, Owed::Key(id));
        m.owed = Owed::Nothing;
        if ok {
            let [Response::KeyAccepted { id: rid, encrypted_key }] = &replies[..] else {
                panic!("a saved key not answered 1602: {replies:?}")
            };
            assert_eq!(*rid, id);
            let der = self.clients.get(&id).and_then(|c| c.key.clone()).expect("the key is on file");
            let key = self.session_key(&der, encrypted_key);
            self.open_session(s, id, key, discards_only(jobs));
            self.trusted.insert(id);
            self.stats.keys_accepted += 1;
        } else {
            assert_eq!(replies, vec![Response::GeneralError]);
            assert!(jobs.is_empty());
        }
    }

    /// A Commit job's completion: 1604 for the 1029, or 1607.
    fn committed(&mut self, s: usize, ok: bool, replies: Vec<Response>, jobs: &[Job]) {
        let m = &mut self.slots[s].model;
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

    /// A packet job's completion, by its outcome.
    fn packet_done(
        &mut self,
        s: usize,
        upload: UploadId,
        last: bool,
        outcome: Outcome,
        replies: Vec<Response>,
        jobs: &[Job],
    ) {
        let m = &mut self.slots[s].model;
        if last {
            assert_eq!(m.owed, Owed::LastPacket(upload), "the last packet's outcome is awaited");
        }
        match outcome {
            Outcome::Accepted => {
                assert!(replies.is_empty() && jobs.is_empty());
            }
            Outcome::Received { cksum, ciphertext_len } => {
                self.file_received(s, upload, cksum, ciphertext_len, replies, jobs);
            }
            Outcome::Failed { decryption } => self.packet_failed(s, upload, last, decryption, replies, jobs),
            Outcome::Ignored => {
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

    /// The last packet's completion: 1603, the file staged (the oldest of
    /// more than 16 dropped).
    fn file_received(
        &mut self,
        s: usize,
        upload: UploadId,
        cksum: u32,
        ciphertext_len: u64,
        replies: Vec<Response>,
        jobs: &[Job],
    ) {
        let m = &mut self.slots[s].model;
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
        let name = normalize_path(field.bytes()).expect("accepted at packet 1").as_str().to_string();
        m.decrypted += 1;
        if m.decrypted == TRUST_AFTER_UPLOADS {
            self.trusted.insert(sid);
        }
        let m = &mut self.slots[s].model;
        m.staged.push_back(MStaged { name, upload, retried: false });
        let mut expected = vec![];
        if m.staged.len() > 16 {
            let old = m.staged.pop_front().expect("non-empty");
            if !old.retried {
                expected.push(old.upload);
            }
        }
        assert_eq!(discards_only(jobs), expected);
        m.upload = MUpload::Ended { field, total, next, refused: false, abandoned: None };
        m.owed = Owed::Nothing;
        self.stats.received += 1;
    }

    /// A packet failed at the worker. Decryption failures cost the client a
    /// token each (issue 8: forged ciphertext); past 10, the session ends and
    /// files staged under it are dropped.
    fn packet_failed(
        &mut self,
        s: usize,
        upload: UploadId,
        last: bool,
        decryption: bool,
        replies: Vec<Response>,
        jobs: &[Job],
    ) {
        let slot = &mut self.slots[s];
        let m = &mut slot.model;
        let mut expected = Vec::new();
        if let (true, Some((sid, _))) = (decryption, m.session) {
            m.decrypted = 0;
            let bucket = (sid, self.trusted.contains(&sid));
            let n = self.decrypt_failures.entry(bucket).or_insert(0);
            *n += 1;
            if *n > DECRYPT_FAILURE_BURST {
                m.session = None;
                m.sealed = None;
                expected.extend(m.staged.drain(..).filter(|f| !f.retried).map(|f| f.upload));
            }
        }
        assert_eq!(discards_only(jobs), sorted(expected), "discards of a decryption failure");
        assert_eq!(slot.proto.session().is_some(), m.session.is_some(), "session after a failure");
        self.stats.worker_failures += 1;
        let current = match &m.upload {
            MUpload::Receiving { id, field, total, next, .. }
            | MUpload::Finishing { id, field, total, next }
                if *id == upload =>
            {
                let (field, total, next) = (field.clone(), *total, *next);
                m.upload = MUpload::Ended { field, total, next, refused: true, abandoned: None };
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
}
