//! Protocol logic: what each complete request does to its connection's
//! [`Protocol`], the client registry and the worker, and what each worker
//! completion answers. No sockets here: [`Core`]'s methods take the
//! connection's protocol state and return a [`Flow`] telling the loop what
//! to do next, so the fuzz target `session` can drive them with bytes.
//!
//! Refusals that leave the framing intact (1601, 1606, 1607 for a bad name,
//! an unknown id or a bad packet) keep the connection open; each is logged
//! once with the peer and the reason.

use std::time::Instant;

use log::Level;

use crate::budget::Piece;
use crate::crypto::{encrypt_session_key, parse_public_key, random_aes_key};
use crate::logging::Esc;
use crate::metrics::Unstored;
use crate::peer_log;
use crate::protocol::{
    id_hex, normalize_path, ClientId, Code, NameField, PacketHeader, Request, RequestHeader, Response,
    PACKET_HEADER_LEN,
};
use crate::worker::{Completion, ConnRef, Job, PacketJob, PacketOutcome, StartUpload, Usage};

use super::connection::{
    Awaiting, Frame, Incoming, PacketStream, Protocol, Receiving, Session, StagedFile, Upload, MAX_STAGED,
};
use super::sequence::{plan_packet, wraps_to_one, Ended, EndedHow};
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
    fn reply(&mut self, r: Response) {
        r.encode(&mut self.out);
    }

    /// Refuse a request whose framing was fine: 1607, one log line (rate-limited
    /// per peer address), keep the connection.
    fn refuse(&mut self, why: &str) {
        peer_log!(Level::Warn, self.peer.ip(), "{}: refused: {why}", self.tag());
        self.reply(Response::GeneralError);
    }

    /// Answer 1607 before a close: the framing can no longer be trusted.
    fn refuse_and_close(&mut self, why: &str) -> Flow {
        peer_log!(Level::Warn, self.peer.ip(), "{}: protocol error, closing: {why}", self.tag());
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
    fn send_job(&mut self, job: Job) {
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
                let _ = p.refuse_and_close(&e.to_string());
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
                if matches!(p.upload, Upload::Ended(_)) {
                    p.upload = Upload::Idle;
                }
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
        let resumable = existing.filter(|id| {
            self.registry.by_id.get(id).is_some_and(|e| {
                !e.pending && e.key.is_none() && e.key_owner.is_none() && e.registrant.is_none()
            })
        });
        if existing.is_some() && resumable.is_none() {
            peer_log!(Level::Info, p.peer.ip(), "{}: register: name \"{}\" is taken", p.tag(), Esc(n));
            p.reply(Response::RegistrationFailed);
            return;
        }
        if resumable.is_none() && self.registry.by_id.len() >= self.cfg.max_clients {
            peer_log!(
                Level::Warn,
                p.peer.ip(),
                "{}: register: refused, --max-clients ({}) reached",
                p.tag(),
                self.cfg.max_clients
            );
            p.reply(Response::RegistrationFailed);
            return;
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
        let mut id = [0u8; 16];
        loop {
            rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut id);
            if !self.registry.by_id.contains_key(&id) && id != [0; 16] {
                break;
            }
        }
        self.registry.by_name.insert(n.to_string(), id);
        self.registry.by_id.insert(
            id,
            ClientEntry {
                name: n.to_string(),
                key: None,
                key_owner: None,
                registrant: None,
                pending: true,
                usage: Default::default(),
            },
        );
        p.awaiting = Awaiting::Register;
        p.client_label = Some(n.to_string());
        self.send_job(Job::Register { conn: p.conn, id, name: n.to_string() });
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
        p.awaiting = Awaiting::Key { encrypted_key, key: aes, name: label, public };
        self.send_job(Job::SetKey { conn: p.conn, id, der: exact });
    }

    fn on_reconnect(&mut self, p: &mut Protocol, id: [u8; 16], name: NameField) {
        if !self.decrypt_failures.has_token(id, Instant::now()) {
            peer_log!(
                Level::Error,
                p.peer.ip(),
                "{}: reconnect denied: client {} had too many uploads that failed to decrypt (forged ciphertext?); try again later",
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

    /// Install a new session key on the connection. An upload in progress
    /// under the old key cannot continue: it is dropped.
    fn open_session(&mut self, p: &mut Protocol, id: [u8; 16], name: String, aes: [u8; 32]) {
        p.client_label = Some(name.clone());
        // Files staged under another identity cannot be confirmed by this one.
        let switched = p.session.as_ref().is_some_and(|s| s.id != id);
        let dropped: Vec<u64> = if switched {
            p.staged.drain(..).filter(|s| !s.retried).map(|s| s.upload).collect()
        } else {
            Vec::new()
        };
        p.session = Some(Session { id, name, key: aes });
        for upload in dropped {
            self.send_job(Job::Discard { upload, failed: None });
        }
        if let Upload::Receiving(r) = std::mem::replace(&mut p.upload, Upload::Idle) {
            self.drop_upload(&r);
        }
    }

    /// Drop an upload in progress: the worker discards it, if any of its
    /// content reached it (a refused packet 1, or a close while packet 1's
    /// first piece is being read, leaves nothing there).
    fn drop_upload(&mut self, r: &Receiving) {
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
                p.awaiting = Awaiting::Commit { name: fname.clone() };
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

    /// A file packet's fixed fields: check them against the upload and decide
    /// what happens to its `content_len` content bytes (`p.incoming`).
    fn on_packet(&mut self, p: &mut Protocol, id: [u8; 16], ph: PacketHeader, content_len: u64) {
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
    fn over_limit(&self, id: [u8; 16], announced: u64) -> Option<String> {
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

    /// A worker completion. `p` is its connection, None if that has closed
    /// since (the registry and the budget are updated all the same).
    pub fn on_completion(&mut self, p: Option<&mut Protocol>, done: Completion) -> Flow {
        match done {
            Completion::Packet { conn: _, upload, buffer, last, outcome } => {
                self.recycle(buffer.into_buffer());
                let Some(p) = p else { return Flow::Continue };
                p.packets_in_flight -= 1;
                match outcome {
                    PacketOutcome::Accepted => {}
                    PacketOutcome::Received { cksum, ciphertext_len, plain_len } => {
                        self.packet_received(p, upload, cksum, ciphertext_len, plain_len)
                    }
                    PacketOutcome::Failed(why) => self.packet_failed(p, upload, last, &why),
                    PacketOutcome::Ignored => {
                        if last && p.awaiting == Awaiting::LastPacket {
                            p.awaiting = Awaiting::Nothing;
                            if matches!(&p.upload, Upload::Finishing { upload: u, .. } if *u == upload) {
                                p.upload = Upload::Idle;
                            }
                        }
                    }
                }
                Flow::Resume
            }
            Completion::Registered { conn: _, id, ok } => self.on_registered(p, id, ok),
            Completion::KeySaved { conn, id, ok, der } => self.on_key_saved(p, conn, id, ok, &der),
            Completion::Committed { conn: _, upload: _, ok, client, usage } => {
                self.on_committed(p, ok, client, usage)
            }
        }
    }

    /// The last packet of the current upload is at the worker, whole: the
    /// file is staged (awaiting its 1029) and the 1603 goes out.
    fn packet_received(
        &mut self,
        p: &mut Protocol,
        upload: u64,
        cksum: u32,
        ciphertext_len: u64,
        plain_len: u64,
    ) {
        if let Upload::Finishing { upload: u, name, name_field, total, next } =
            std::mem::replace(&mut p.upload, Upload::Idle)
        {
            if u == upload {
                // Its empty chunk n+1 of n, if one follows, is swallowed.
                p.upload = Upload::Ended(Ended {
                    name_field: name_field.clone(),
                    total,
                    next,
                    how: EndedHow::Complete,
                });
                p.awaiting = Awaiting::Nothing;
                let id = p.session.as_ref().map(|s| s.id).unwrap_or_default();
                log::info!(
                    "{}: received \"{}\" ({plain_len} bytes, cksum {cksum}); awaiting confirmation",
                    p.tag(),
                    Esc(&name)
                );
                p.staged.push_back(StagedFile { name, upload, retried: false, touched: Instant::now() });
                if p.staged.len() > MAX_STAGED {
                    if let Some(old) = p.staged.pop_front() {
                        if !old.retried {
                            self.send_job(Job::Discard { upload: old.upload, failed: None });
                        }
                    }
                }
                p.last_progress = Some(Instant::now());
                p.reply(Response::FileReceived {
                    id,
                    // plan_packet refuses uploads whose total exceeds 32 bits.
                    content_size: u32::try_from(ciphertext_len).unwrap_or(u32::MAX),
                    file_name: name_field.0,
                    cksum,
                });
            }
        }
    }

    /// A packet failed at the worker (decryption, write): the upload ends.
    fn packet_failed(&mut self, p: &mut Protocol, upload: u64, last: bool, why: &str) {
        // Only the connection's current upload is answered: one the
        // loop already refused has had its 1607, and one abandoned
        // (new packet 1, new session key) gets no reply.
        let current = match &p.upload {
            Upload::Receiving(r) if r.upload == upload => {
                p.upload = Upload::Ended(Ended::failed(r));
                true
            }
            Upload::Finishing { upload: u, name_field, total, next, .. } if *u == upload => {
                let how = EndedHow::Refused { remaining: 0, seen: 0 };
                let (name_field, total, next) = (name_field.clone(), *total, *next);
                p.upload = Upload::Ended(Ended { name_field, total, next, how });
                true
            }
            _ => false,
        };
        if last && p.awaiting == Awaiting::LastPacket {
            p.awaiting = Awaiting::Nothing;
        }
        if why.starts_with("decryption failed") {
            self.decryption_failed(p);
        }
        if current {
            self.metrics.unstored(Unstored::Failed);
            p.refuse(&format!("upload failed: {why}"));
        } else {
            log::info!("{}: an abandoned or already refused upload failed: {why}", p.tag());
        }
    }

    /// A registration is saved (or not): the 1600, or a refusal.
    fn on_registered(&mut self, p: Option<&mut Protocol>, id: ClientId, ok: bool) -> Flow {
        if !ok {
            if let Some(e) = self.registry.by_id.remove(&id) {
                self.registry.by_name.remove(&e.name);
            }
        } else if let Some(e) = self.registry.by_id.get_mut(&id) {
            e.pending = false;
        }
        self.metrics.clients.set(self.registry.by_id.len() as i64);
        let Some(p) = p else { return Flow::Continue };
        p.awaiting = Awaiting::Nothing;
        if ok {
            self.set_registrant(p, id);
            peer_log!(Level::Info, p.peer.ip(), "{}: registered as {}", p.tag(), id_hex(&id));
            p.reply(Response::RegistrationOk { id });
        } else {
            p.refuse("registration could not be saved");
        }
        Flow::Resume
    }

    /// A public key is saved (or not): the session opens, or a refusal.
    fn on_key_saved(
        &mut self,
        p: Option<&mut Protocol>,
        conn: ConnRef,
        id: ClientId,
        ok: bool,
        der: &[u8],
    ) -> Flow {
        if let Some(e) = self.registry.by_id.get_mut(&id).filter(|e| !ok && e.key_owner == Some(conn)) {
            // Not saved: the claim on the key goes (a key on file keeps its owner).
            if e.key.is_none() {
                e.key_owner = None;
            }
        }
        let Some(p) = p else {
            // The connection is gone but the key is on file: a reconnect
            // must encrypt to it, as it will after a restart.
            if let (true, Some(e), Ok((k, _))) = (ok, self.registry.by_id.get_mut(&id), parse_public_key(der))
            {
                e.key = Some(k);
            }
            return Flow::Continue;
        };
        let Awaiting::Key { encrypted_key, key, name, public } =
            std::mem::replace(&mut p.awaiting, Awaiting::Nothing)
        else {
            return Flow::Continue;
        };
        if ok {
            // The key on file is what a later reconnect encrypts to.
            if let Some(e) = self.registry.by_id.get_mut(&id) {
                e.key = Some(public);
            }
            self.open_session(p, id, name, key);
            log::info!("{}: public key received; session key sent", p.tag());
            p.reply(Response::KeyAccepted { id, encrypted_key });
        } else {
            p.refuse("public key could not be saved");
        }
        Flow::Resume
    }

    /// A file is stored (or not): the client's usage, then the 1604 or a refusal.
    fn on_committed(&mut self, p: Option<&mut Protocol>, ok: bool, client: ClientId, usage: Usage) -> Flow {
        if let Some(e) = self.registry.by_id.get_mut(&client) {
            if e.usage != usage {
                e.usage = usage;
                self.metrics.client_usage(&e.name, usage.bytes, usage.files);
            }
        }
        let Some(p) = p else { return Flow::Continue };
        let Awaiting::Commit { name } = std::mem::replace(&mut p.awaiting, Awaiting::Nothing) else {
            return Flow::Continue;
        };
        let id = p.session.as_ref().map(|s| s.id).unwrap_or_default();
        if ok {
            log::info!("{}: \"{}\" verified and stored", p.tag(), Esc(&name));
            self.metrics.uploads_verified.inc();
            if let Some(s) = &p.session {
                self.metrics.verified_at(&s.name, crate::metrics::now_secs());
            }
            p.last_progress = Some(Instant::now());
            p.reply(Response::Ack { id });
        } else {
            self.metrics.unstored(Unstored::CommitFailed);
            p.refuse(&format!("\"{}\" could not be stored; upload it again", Esc(&name)));
        }
        Flow::Resume
    }

    /// An upload of this connection's session did not decrypt. A legitimate
    /// client never sends such an upload, but one who only knows a client's id
    /// and name can reconnect (1027) and send ciphertext it cannot make, which
    /// decrypts to a valid padding about once in 256 tries and would then
    /// replace the client's file. So each failure costs the client one of a
    /// few tokens (`Core::decrypt_failures`); out of them, the session ends on
    /// this connection (its staged files can no longer be confirmed) and the
    /// client's reconnects are refused until tokens come back.
    fn decryption_failed(&mut self, p: &mut Protocol) {
        let Some(id) = p.session.as_ref().map(|s| s.id) else { return };
        if self.decrypt_failures.allow(id, Instant::now()) {
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
    fn set_registrant(&mut self, p: &mut Protocol, id: [u8; 16]) {
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
            Upload::Finishing { upload, .. } => uploads.push(*upload),
            _ => {}
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
        if let Upload::Receiving(r) = &p.upload {
            if now.duration_since(r.touched) > limit {
                if r.started {
                    drop_uploads.push(r.upload);
                }
                p.upload = Upload::Idle;
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
            let (key, key_owner, registrant) = (None, None, None);
            let entry = ClientEntry { name: "q".into(), key, key_owner, registrant, pending: false, usage };
            registry.by_id.insert(id, entry);
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
        server.core.registry.by_name.insert("kim".into(), id);
        server.core.registry.by_id.insert(
            id,
            ClientEntry {
                name: "kim".into(),
                key: None,
                key_owner: None,
                registrant: None,
                pending: false,
                usage: Default::default(),
            },
        );

        let (key, serial, _client) = add_connection(&mut server);

        let private = rsa::RsaPrivateKey::new(&mut rand::rngs::OsRng, 1024).unwrap();
        let der = private.to_public_key().to_public_key_der().unwrap().into_vec();
        let p = &mut server.conns[key].proto;
        p.registered_id = Some(id); // this connection registered kim
        server.core.on_public_key(p, id, NameField::from_name(b"kim").unwrap(), der);
        assert!(server.conns[key].proto.awaiting != Awaiting::Nothing, "the key goes to the worker first");
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
