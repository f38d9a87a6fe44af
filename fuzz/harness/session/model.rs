//! The model of each connection and client, and its checks of the
//! control requests.

use std::collections::VecDeque;

use backupd::crypto::parse_public_key;
use backupd::protocol::{normalize_path, ClientId, Code, NameField, Response};
use backupd::worker::{ConnRef, Job, UploadId};

use super::key::client_key;
use super::{clone_discard, discards_only, sorted, valid_client_name, Sim, DECRYPT_FAILURE_BURST};

/// The model's view of a connection's upload (mirrors `Upload`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum MUpload {
    Idle,
    Receiving {
        id: UploadId,
        field: NameField,
        total: u16,
        next: u16,
        conforming: bool,
        /// Every packet so far a whole CBC stream of its own: packet 1's plaintext size.
        chunk: Option<u32>,
        /// The last packet was a full chunk numbered as the total: the end waits.
        pending: bool,
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
        /// Refused by a packet that did not follow the upload in progress:
        /// that upload's name field and total, whose packets are swallowed too.
        abandoned: Option<Box<(NameField, u16)>>,
    },
}

#[derive(Debug, Clone)]
pub(super) struct MStaged {
    pub(super) name: String,
    pub(super) upload: UploadId,
    pub(super) retried: bool,
}

/// The reply-bearing job this connection waits for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Owed {
    Nothing,
    Register(ClientId),
    Key(ClientId),
    Commit { name: String, upload: UploadId },
    LastPacket(UploadId),
}

/// The model of one connection, from what was sent and what came back.
pub(super) struct MConn {
    pub(super) conn: ConnRef,
    /// The session: its id and, once decrypted, the AES key.
    pub(super) session: Option<(ClientId, Option<[u8; 32]>)>,
    /// The session key as the 1602/1605 carried it, when the key on file is
    /// ours; decrypted (slow) only when a packet 1 needs it.
    pub(super) sealed: Option<Vec<u8>>,
    pub(super) registered: Option<ClientId>,
    pub(super) upload: MUpload,
    pub(super) staged: VecDeque<MStaged>,
    pub(super) owed: Owed,
    /// Uploads of the session that decrypted, with no failure between.
    pub(super) decrypted: u32,
}

pub(super) struct MClient {
    pub(super) name: String,
    pub(super) durable: bool,
    /// The key on file (exact DER), if any.
    pub(super) key: Option<Vec<u8>>,
    /// The connection that sent a key, which alone may send another.
    pub(super) owner: Option<ConnRef>,
    /// The open connection that got this client's 1600.
    pub(super) registrant: Option<ConnRef>,
}

/// Where an upload stands, as the loop issued its jobs.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Ledger {
    pub(super) discarded: bool,
    pub(super) committed: bool,
}

pub(super) fn expected_is_quiet(m: &MConn) -> bool {
    m.owed == Owed::Nothing
        && matches!(m.upload, MUpload::Idle | MUpload::Ended { .. })
        && m.staged.iter().all(|f| f.retried)
}

impl Sim<'_> {
    pub(super) fn on_register(&mut self, s: usize, name: NameField, replies: Vec<Response>, jobs: &[Job]) {
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
                let [Job::Register { conn, id, name: jn, reclaim }] = jobs else {
                    panic!("1025 of a free name: no Register job")
                };
                assert_eq!(*reclaim, None, "nothing is reclaimed below --max-clients");
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
    pub(super) fn set_registrant(&mut self, conn: ConnRef, id: ClientId) {
        for c in self.clients.values_mut().filter(|c| c.registrant == Some(conn)) {
            c.registrant = None;
        }
        if let Some(c) = self.clients.get_mut(&id) {
            c.registrant = Some(conn);
        }
    }

    pub(super) fn on_public_key(
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

    pub(super) fn on_reconnect(
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
        let too_many_failures =
            self.decrypt_failures.get(&self.failure_bucket(hid)).is_some_and(|n| *n >= DECRYPT_FAILURE_BURST);
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
    pub(super) fn session_key(&self, der: &[u8], encrypted: &[u8]) -> Option<Vec<u8>> {
        (self.check_key && der == client_key().der.as_slice()).then(|| encrypted.to_vec())
    }

    /// A 1602 or 1605: the new session replaces the old one; files staged under
    /// another id and an upload in progress are discarded (`discards`, seen).
    pub(super) fn open_session(
        &mut self,
        s: usize,
        id: ClientId,
        sealed: Option<Vec<u8>>,
        discards: Vec<UploadId>,
    ) {
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
        m.decrypted = 0;
        m.sealed = sealed;
        assert_eq!(discards, sorted(expected), "discards of a new session");
        assert!(self.slots[s].proto.session().is_some_and(|(x, _)| x == id));
    }

    pub(super) fn on_crc(
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
}
