//! Protocol logic: what each complete request does to its connection's
//! [`Protocol`] (`state.rs`), the client registry and the worker, and what
//! each worker completion answers. No sockets here: [`Core`]'s methods take the
//! connection's protocol state and return a [`Flow`] telling the loop what
//! to do next, so the fuzz target `session` can drive them with bytes.
//!
//! Refusals that leave the framing intact (1601, 1606, 1607 for a bad name,
//! an unknown id or a bad packet) keep the connection open; each is logged
//! once with the peer and the reason.

use std::time::Instant;

use log::Level;

use crate::crypto::{encrypt_session_key, parse_public_key, random_aes_key};
use crate::logging::Esc;
use crate::metrics::Unstored;
use crate::peer_log;
use crate::protocol::{
    id_hex, normalize_path, Code, HeaderError, NameField, Request, RequestHeader, Response, PACKET_HEADER_LEN,
};
use crate::worker::Job;

use super::admission::TRUST_AFTER_UPLOADS;
use super::connection::Frame;
use super::state::{Awaiting, PendingKey, Protocol, Receiving, Session, Upload};
use super::{ClientEntry, Core, JobSink};

/// Longest client name accepted at registration (the field holds 254 bytes + NUL).
const MAX_CLIENT_NAME: usize = 254;

/// What the loop must do with a connection once the state machine has run.
#[must_use]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Go on as before (any reply is queued in `Protocol::out`).
    Continue,
    /// A wait for the worker ended: flush the replies and read on.
    Resume,
    /// The framing can no longer be trusted: a 1607 is queued; flush it, then close.
    Close,
}

impl Protocol {
    pub(super) fn reply(&mut self, r: Response) {
        r.encode(&mut self.out);
    }

    /// Refuse a request whose framing was fine: 1607, one log line (rate-limited
    /// per peer address), keep the connection.
    pub(super) fn refuse(&mut self, why: &str) {
        peer_log!(Level::Warn, self.peer.ip(), "{}: refused: {why}", self.tag());
        self.reply(Response::GeneralError);
    }

    /// Answer 1607 before a close: the framing can no longer be trusted.
    fn refuse_and_close(&mut self, why: &str) -> Flow {
        peer_log!(Level::Warn, self.peer.ip(), "{}: protocol error, closing: {why}", self.tag());
        self.reply(Response::GeneralError);
        Flow::Close
    }

    /// A worker completion that this connection's state does not expect
    /// (the loop and the worker disagree about it): the state is kept as it
    /// is, not reset; 1607, one log line, and the connection closes.
    #[cold]
    #[inline(never)]
    pub(super) fn out_of_state(&mut self, what: &str) -> Flow {
        let (awaited, upload) = (self.awaited(), self.upload.describe());
        peer_log!(
            Level::Error,
            self.peer.ip(),
            "{}: internal error, closing: {what} with {awaited} and {upload}",
            self.tag()
        );
        self.reply(Response::GeneralError);
        Flow::Close
    }
}

/// The payload length to read as a frame after a checked header: a
/// control frame's whole payload, or only a file packet's fixed fields
/// (its content is read afterwards, piece by piece, see [`Incoming`]).
pub fn frame_len(code: Code, h: &RequestHeader) -> usize {
    match code {
        Code::FilePacket => PACKET_HEADER_LEN,
        _ => h.payload_size as usize,
    }
}

impl<J: JobSink> Core<J> {
    pub(super) fn send_job(&mut self, job: Job) {
        self.metrics.worker_queue.inc();
        if !self.jobs.send(job) {
            log::error!("worker thread is gone; cannot continue");
            crate::logging::flush(std::time::Duration::from_secs(1));
            std::process::exit(1);
        }
    }

    /// Check a complete request header (version, code, size bound). On a
    /// framing error the 1607 is queued and None returned: the loop closes.
    pub fn check_header(&self, p: &mut Protocol, h: &RequestHeader) -> Option<Code> {
        match h.check(self.cfg.max_packet as u32) {
            Ok(code) => Some(code),
            Err(e) => {
                // A file packet over the bound is most often a client that
                // sends a whole file in one packet: say which setting bounds it.
                let hint = match e {
                    HeaderError::PayloadTooLarge { code, .. } if code == Code::FilePacket.as_u16() => {
                        " (--max-packet; a client that sends a file in one packet needs it above the file's size)"
                    }
                    _ => "",
                };
                let _ = p.refuse_and_close(&format!("{e}{hint}"));
                None
            }
        }
    }

    /// Handle one complete frame (a control frame, or a file packet's fixed
    /// fields, after which `p.incoming` says what to do with the content).
    pub fn handle_frame(&mut self, p: &mut Protocol, f: Frame) -> Flow {
        self.metrics.request(f.header.code);
        let req = match Request::parse(f.code, &f.payload) {
            Ok(r) => r,
            Err(e) => return p.refuse_and_close(&e.to_string()),
        };
        let hid = f.header.client_id;
        match req {
            Request::FilePacket(ph) => {
                let content_len = (f.header.payload_size as u64).saturating_sub(PACKET_HEADER_LEN as u64);
                self.on_packet(p, hid, ph, content_len);
            }
            other => {
                // Any request other than a file packet ends the swallowing of an ended upload.
                p.advance_upload(Upload::end_swallowing);
                match other {
                    Request::Register { name } => self.on_register(p, name),
                    Request::PublicKey { name, key: der } => self.on_public_key(p, hid, name, der),
                    Request::Reconnect { name } => self.on_reconnect(p, hid, name),
                    Request::CrcOk { name } => self.on_crc(p, hid, name, CrcKind::Ok),
                    Request::CrcRetry { name } => self.on_crc(p, hid, name, CrcKind::Retry),
                    Request::CrcAbort { name } => self.on_crc(p, hid, name, CrcKind::Abort),
                    Request::FilePacket(_) => {}
                }
            }
        }
        Flow::Continue
    }

    fn on_register(&mut self, p: &mut Protocol, name: NameField) {
        let Some(n) = name.as_str().filter(|n| valid_client_name(n)) else {
            p.refuse(&format!("register: invalid client name \"{}\"", name.display()));
            return;
        };
        let existing = self.registry.by_name.get(n).copied();
        // A client that has no key, none on its way and no registration
        // connection open (it closed before its 1026, or an operator reset the
        // key) may be registered again: the registration resumes with its id.
        let resumable =
            existing.filter(|id| self.registry.by_id.get(id).is_some_and(ClientEntry::keyless_idle));
        if existing.is_some() && resumable.is_none() {
            peer_log!(Level::Info, p.peer.ip(), "{}: register: name \"{}\" is taken", p.tag(), Esc(n));
            p.reply(Response::RegistrationFailed);
            return;
        }
        // At --max-clients, a new name takes the place of the oldest
        // registration that never got a key and stores nothing, if any.
        let mut reclaim = None;
        if resumable.is_none() && self.registry.by_id.len() >= self.cfg.max_clients {
            reclaim = self.registry.oldest_reclaimable();
            if reclaim.is_none() {
                self.refuse_at_max_clients(p);
                return;
            }
        }
        if !self.registrations.allow(p.peer.ip(), Instant::now()) {
            peer_log!(
                Level::Warn,
                p.peer.ip(),
                "{}: register: refused, over the rate of registrations from this address",
                p.tag()
            );
            p.reply(Response::RegistrationFailed);
            return;
        }
        // Past the rate limit: this connection is logging in (its slot is
        // kept for the login timeout, see `admission::Steps`).
        p.logged_in = Some(Instant::now());
        if let Some(id) = resumable {
            self.set_registrant(p, id);
            p.client_label = Some(n.to_string());
            peer_log!(
                Level::Info,
                p.peer.ip(),
                "{}: register: client {} has no key; its registration resumes here",
                p.tag(),
                id_hex(&id)
            );
            p.reply(Response::RegistrationOk { id });
            return;
        }
        // Nothing may resume or reconnect as the one reclaimed while its
        // removal is at the worker.
        if let Some(e) = reclaim.and_then(|old| self.registry.by_id.get_mut(&old)) {
            e.pending = true;
        }
        let mut id = [0u8; 16];
        loop {
            rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut id);
            if !self.registry.by_id.contains_key(&id) && id != [0; 16] {
                break;
            }
        }
        let mut entry = ClientEntry::new(n, None, Default::default());
        entry.pending = true;
        self.registry.insert(id, entry);
        p.wait_for(Awaiting::Register);
        p.client_label = Some(n.to_string());
        self.send_job(Job::Register { conn: p.conn, id, name: n.to_string(), reclaim });
    }

    /// 1601 for a new name at `--max-clients` with nothing to reclaim, and
    /// one log line (rate-limited per peer address).
    pub(super) fn refuse_at_max_clients(&mut self, p: &mut Protocol) {
        peer_log!(
            Level::Warn,
            p.peer.ip(),
            "{}: register: refused, --max-clients ({}) reached",
            p.tag(),
            self.cfg.max_clients
        );
        p.reply(Response::RegistrationFailed);
    }

    /// The registered, durable client named by a request, if its id and name agree.
    fn known_client(&self, id: &[u8; 16], name: &NameField) -> Option<&ClientEntry> {
        let e = self.registry.by_id.get(id)?;
        (!e.pending && name.as_str() == Some(e.name.as_str())).then_some(e)
    }

    /// Exposed for the unit tests of the loop.
    pub(super) fn on_public_key(&mut self, p: &mut Protocol, id: [u8; 16], name: NameField, der: Vec<u8>) {
        let Some(entry) = self.known_client(&id, &name) else {
            p.refuse(&format!("public key: unknown id {} or wrong name \"{}\"", id_hex(&id), name.display()));
            return;
        };
        // Ids and names travel in clear, and a 1605 proves nothing about who
        // asked for it: setting or replacing a key from any other connection
        // would let anyone who saw them take the client over. Only the
        // connection that registered the id (1600 on it) sets its key, and once
        // one connection has sent a key, only that one may send another; a key
        // on file from before a restart is replaced only after an operator
        // reset it (`backupd reset-key`). See docs/SECURITY.md.
        let owner_ok = match entry.key_owner {
            Some(owner) => owner == p.conn,
            None => entry.key.is_none(),
        };
        if p.registered_id != Some(id) || !owner_ok {
            p.refuse(&format!(
                "public key: only the connection that registered client {} sets its key",
                id_hex(&id)
            ));
            return;
        }
        let (public, exact) = match parse_public_key(&der) {
            Ok(k) => k,
            Err(e) => {
                p.refuse(&format!("public key: {e}"));
                return;
            }
        };
        if let Some(why) = self.session_key_refusal(p) {
            p.refuse(&format!("public key: {why}"));
            return;
        }
        let aes = random_aes_key();
        let encrypted_key = match encrypt_session_key(&public, &aes, self.cfg.oaep_hash) {
            Ok(k) => k,
            Err(e) => {
                p.refuse(&format!("public key: cannot encrypt to it: {e}"));
                return;
            }
        };
        let label = match self.registry.by_id.get_mut(&id) {
            Some(e) => {
                e.key_owner = Some(p.conn);
                e.name.clone()
            }
            None => String::new(),
        };
        p.client_label = Some(label.clone());
        p.wait_for(Awaiting::Key(Box::new(PendingKey { encrypted_key, key: aes, name: label, public })));
        self.send_job(Job::SetKey { conn: p.conn, id, der: exact });
    }

    fn on_reconnect(&mut self, p: &mut Protocol, id: [u8; 16], name: NameField) {
        if !self.decrypt_failures.may_open_session(id, p.peer.ip(), Instant::now()) {
            peer_log!(
                Level::Error,
                p.peer.ip(),
                "{}: reconnect denied: client {} had too many uploads that failed to decrypt (forged ciphertext?) from addresses it has not proven; try again later",
                p.tag(),
                id_hex(&id)
            );
            p.reply(Response::ReconnectDenied { id });
            return;
        }
        let found = self.known_client(&id, &name).and_then(|e| e.key.clone().map(|k| (e.name.clone(), k)));
        let Some((label, public)) = found else {
            peer_log!(
                Level::Info,
                p.peer.ip(),
                "{}: reconnect denied: id {} with name \"{}\" is unknown or has no key",
                p.tag(),
                id_hex(&id),
                name.display()
            );
            p.reply(Response::ReconnectDenied { id });
            return;
        };
        if let Some(why) = self.session_key_refusal(p) {
            peer_log!(Level::Warn, p.peer.ip(), "{}: reconnect denied: {why}", p.tag());
            p.reply(Response::ReconnectDenied { id });
            return;
        }
        let aes = random_aes_key();
        match encrypt_session_key(&public, &aes, self.cfg.oaep_hash) {
            Ok(encrypted_key) => {
                self.open_session(p, id, label.clone(), aes);
                peer_log!(Level::Info, p.peer.ip(), "{}: reconnected", p.tag());
                p.reply(Response::ReconnectOk { id, encrypted_key });
                self.send_job(Job::Touch { id });
            }
            Err(e) => p.refuse(&format!("reconnect: cannot encrypt to the stored key: {e}")),
        }
    }

    /// Why the peer's address may not be granted one more session key now
    /// (`--session-rate`, `--session-burst`), if it may not.
    fn session_key_refusal(&mut self, p: &Protocol) -> Option<String> {
        let ok = self.session_keys.allow(p.peer.ip(), Instant::now());
        (!ok).then(|| "over the rate of session keys for this address (--session-rate)".to_string())
    }

    /// Install a new session key on the connection. An upload in progress
    /// under the old key cannot continue: it is dropped.
    pub(super) fn open_session(&mut self, p: &mut Protocol, id: [u8; 16], name: String, aes: [u8; 32]) {
        p.client_label = Some(name.clone());
        // Files staged under another identity cannot be confirmed by this one.
        let switched = p.session.as_ref().is_some_and(|s| s.id != id);
        let dropped: Vec<u64> = if switched {
            p.staged.drain(..).filter(|s| !s.retried).map(|s| s.upload).collect()
        } else {
            Vec::new()
        };
        p.session = Some(Session { id, name, key: aes, decrypted: 0 });
        for upload in dropped {
            self.send_job(Job::Discard { upload, failed: None });
        }
        if let Some(r) = p.advance_upload(Upload::new_session) {
            self.drop_upload(&r);
        }
    }

    /// Drop an upload in progress: the worker discards it, if any of its
    /// content reached it (a refused packet 1, or a close while packet 1's
    /// first piece is being read, leaves nothing there).
    pub(super) fn drop_upload(&mut self, r: &Receiving) {
        if r.started {
            self.send_job(Job::Discard { upload: r.upload, failed: None });
        }
    }

    fn on_crc(&mut self, p: &mut Protocol, id: [u8; 16], name: NameField, kind: CrcKind) {
        let what = kind.code();
        let client = match &p.session {
            Some(s) if s.id == id => s.id,
            _ => {
                p.refuse(&format!("{what} without a session key for id {}", id_hex(&id)));
                return;
            }
        };
        // Matched by the path it stands for: `/a/b` in the packets, `a/b` in the 1029.
        let path = normalize_path(name.bytes()).ok();
        let Some(idx) = path.and_then(|n| p.staged_index(n.as_str())) else {
            p.refuse(&format!("{what} for \"{}\", which this connection has not uploaded", name.display()));
            return;
        };
        let conn = p.conn;
        let now = Instant::now();
        let s = &mut p.staged[idx];
        s.touched = now;
        let (upload, retried, fname) = (s.upload, s.retried, s.name.clone());
        match kind {
            CrcKind::Ok if retried => {
                p.refuse(&format!("1029 for \"{}\" after 1030: the file was discarded", Esc(&fname)));
            }
            CrcKind::Ok => {
                p.staged.remove(idx);
                p.wait_for(Awaiting::Commit { name: fname.clone() });
                self.send_job(Job::Commit { conn, upload, client, name: fname });
            }
            CrcKind::Retry => {
                s.retried = true;
                log::info!("{}: cksum mismatch reported for \"{}\"; awaiting resend", p.tag(), Esc(&fname));
                if !retried {
                    self.send_job(Job::Discard { upload, failed: None });
                }
                if self.cfg.ack_retry {
                    p.reply(Response::Ack { id });
                }
            }
            CrcKind::Abort => {
                p.staged.remove(idx);
                log::warn!("{}: client gave up on \"{}\" (cksum mismatch); not stored", p.tag(), Esc(&fname));
                self.metrics.unstored(Unstored::Aborted);
                self.send_job(Job::Discard { upload, failed: Some((client, fname)) });
                p.reply(Response::Ack { id });
            }
        }
    }

    /// An upload of this connection's session decrypted (its 1603 goes out):
    /// after [`TRUST_AFTER_UPLOADS`] in a row, the session's address is one
    /// the client has proven itself from.
    pub(super) fn decrypted(&mut self, p: &mut Protocol) {
        let Some(s) = p.session.as_mut() else { return };
        s.decrypted = s.decrypted.saturating_add(1);
        if s.decrypted == TRUST_AFTER_UPLOADS {
            let id = s.id;
            self.decrypt_failures.trust(id, p.peer.ip());
            log::debug!("{}: client {} proven from this address", p.tag(), id_hex(&id));
        }
    }

    /// An upload of this connection's session did not decrypt. A legitimate
    /// client never sends such an upload, but one who only knows a client's id
    /// and name can reconnect (1027) and send ciphertext it cannot make, which
    /// decrypts to a valid padding about once in 256 tries and would then
    /// replace the client's file. So each failure costs the client one of a
    /// few tokens (`Core::decrypt_failures`, kept apart for the addresses the
    /// client has proven itself from); out of them, the session ends on this
    /// connection (its staged files can no longer be confirmed) and the
    /// client's reconnects from this address's bucket are refused until tokens
    /// come back.
    pub(super) fn decryption_failed(&mut self, p: &mut Protocol) {
        let Some(s) = p.session.as_mut() else { return };
        s.decrypted = 0;
        let id = s.id;
        if self.decrypt_failures.failed(id, p.peer.ip(), Instant::now()) {
            return;
        }
        p.session = None;
        peer_log!(
            Level::Error,
            p.peer.ip(),
            "{}: too many uploads of client {} failed to decrypt (forged ciphertext?); its session on this connection ends",
            p.tag(),
            id_hex(&id)
        );
        for f in p.staged.drain(..) {
            if !f.retried {
                self.send_job(Job::Discard { upload: f.upload, failed: None });
            }
        }
    }

    /// `p` registered client `id` (a 1600 goes out): it is the one
    /// connection that may send the client's first key. A connection is the
    /// registrant of one client at most.
    pub(super) fn set_registrant(&mut self, p: &mut Protocol, id: [u8; 16]) {
        self.release_registrant(p);
        if let Some(e) = self.registry.by_id.get_mut(&id) {
            e.registrant = Some(p.conn);
        }
        p.registered_id = Some(id);
    }

    fn release_registrant(&mut self, p: &Protocol) {
        if let Some(e) = p.registered_id.and_then(|id| self.registry.by_id.get_mut(&id)) {
            if e.registrant == Some(p.conn) {
                e.registrant = None;
            }
        }
    }

    /// The connection has closed: its staged and in-progress uploads are
    /// discarded at the worker.
    pub fn closed(&mut self, p: &Protocol) {
        self.release_registrant(p);
        let mut uploads: Vec<u64> = p.staged.iter().filter(|s| !s.retried).map(|s| s.upload).collect();
        match &p.upload {
            Upload::Receiving(r) if r.started => uploads.push(r.upload),
            Upload::Finishing(f) => uploads.push(f.upload),
            Upload::Receiving(_) | Upload::Idle | Upload::Ended(_) => {}
        }
        for upload in uploads {
            // At shutdown the worker may already be gone: nothing is lost then.
            let _ = self.jobs.send(Job::Discard { upload, failed: None });
        }
    }

    /// Drop transfers untouched for the stale-upload timeout.
    pub fn purge_stale(&mut self, p: &mut Protocol, now: Instant) {
        let limit = self.cfg.stale_upload_timeout;
        let mut drop_uploads = Vec::new();
        if let Some(r) = p.advance_upload(|u| u.expire(now, limit)) {
            if r.started {
                drop_uploads.push(r.upload);
            }
        }
        p.staged.retain(|s| {
            let keep = now.duration_since(s.touched) <= limit;
            if !keep && !s.retried {
                drop_uploads.push(s.upload);
            }
            keep
        });
        if !drop_uploads.is_empty() {
            log::info!("{}: discarded {} transfer(s) untouched for {limit:?}", p.tag(), drop_uploads.len());
        }
        for upload in drop_uploads {
            self.send_job(Job::Discard { upload, failed: None });
        }
    }
}

#[derive(Clone, Copy)]
enum CrcKind {
    Ok,
    Retry,
    Abort,
}

impl CrcKind {
    fn code(self) -> &'static str {
        match self {
            CrcKind::Ok => "1029",
            CrcKind::Retry => "1030",
            CrcKind::Abort => "1031",
        }
    }
}

fn valid_client_name(n: &str) -> bool {
    !n.is_empty() && n.len() <= MAX_CLIENT_NAME && !n.chars().any(|c| c.is_control())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rsa::pkcs8::EncodePublicKey;

    use super::*;
    use crate::server::tests::{add_connection, test_config};
    use crate::server::Server;
    use crate::worker::Completion;

    /// The limits of packet 1: quotas against the registry's usage, and
    /// `--min-free` only once the free space is known (the fuzz harness, with
    /// no worker to measure it, never refuses for it).
    #[test]
    fn over_limit_checks_quotas_and_known_free_space_only() {
        use crate::worker::{Job, Usage};
        let id = [3u8; 16];
        let core_with = |cfg: &crate::config::Config| {
            let mut registry = super::super::Registry::default();
            let usage = Usage { bytes: 900, files: 4 };
            registry.insert(id, ClientEntry::new("q", None, usage));
            Core::new(std::sync::Arc::new(cfg.clone()), registry, Vec::<Job>::new(), 1)
        };
        let mut cfg = crate::config::Config::defaults();
        cfg.min_free = 1 << 40;
        let core = core_with(&cfg);
        assert_eq!(core.over_limit(id, 1 << 30), None, "quotas off, free space unknown");
        core.metrics.free_bytes.store(2 << 40, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(core.over_limit(id, 1 << 30), None);
        let why = core.over_limit(id, (1 << 40) + 1).expect("would go below --min-free");
        assert!(why.contains("--min-free 1099511627776"), "{why}");
        cfg.min_free = 0;
        cfg.quota = 1000;
        cfg.quota_files = 5;
        let core = core_with(&cfg);
        assert_eq!(core.over_limit(id, 100), None, "900 + 100 is the quota, not over it");
        assert!(core.over_limit(id, 101).is_some_and(|w| w.contains("--quota 1000 bytes")));
        assert_eq!(core.over_limit([4u8; 16], 1 << 30), None, "no such client: refused elsewhere");
        cfg.quota_files = 4;
        assert!(core_with(&cfg).over_limit(id, 0).is_some_and(|w| w.contains("--quota-files 4")));
    }

    /// The key a 1026 put on file must be the one a later 1027 encrypts to,
    /// even when the connection that sent the 1026 closed before the worker
    /// saved it: the registry in memory must follow the database.
    #[test]
    fn key_saved_after_its_connection_closed_still_reaches_the_registry() {
        let dir = tempfile::tempdir().unwrap();
        let mut server = Server::bind(test_config(dir.path()), "127.0.0.1:0".parse().unwrap()).unwrap();
        let id = [7u8; 16];
        server.core.registry.insert(id, ClientEntry::new("kim", None, Default::default()));

        let (key, serial, _client) = add_connection(&mut server);

        let private = rsa::RsaPrivateKey::new(&mut rand::rngs::OsRng, 1024).unwrap();
        let der = private.to_public_key().to_public_key_der().unwrap().into_vec();
        let p = &mut server.conns[key].proto;
        p.registered_id = Some(id); // this connection registered kim
        server.core.on_public_key(p, id, NameField::from_name(b"kim").unwrap(), der);
        assert!(server.conns[key].proto.awaits_reply(), "the key goes to the worker first");
        server.close(key, serial, crate::metrics::Closed::Peer, Some("peer went away"));
        let done = server.done.recv_timeout(Duration::from_secs(10)).expect("the worker answers");
        assert!(matches!(done, Completion::KeySaved { ok: true, .. }));
        server.on_completion(done);
        assert_eq!(
            server.core.registry.by_id[&id].key.as_ref(),
            Some(&private.to_public_key()),
            "the database has the new key; a reconnect must encrypt to it"
        );
    }
}
