//! Protocol logic: what each complete request does to its connection, the
//! client registry and the worker, and what each worker completion answers.
//!
//! Refusals that leave the framing intact (1601, 1606, 1607 for a bad name,
//! an unknown id or a bad packet) keep the connection open; each is logged
//! once with the peer and the reason.

use std::time::Instant;

use crate::crypto::{ciphertext_len, encrypt_session_key, parse_public_key, random_aes_key};
use crate::protocol::{id_hex, NameField, Request, Response, PACKET_HEADER_LEN};
use crate::worker::storage::validate_file_name;
use crate::worker::{Completion, Job, PacketJob, PacketOutcome, StartUpload};

use super::connection::{Awaiting, Frame, Receiving, Segment, Session, StagedFile, Upload, MAX_STAGED};
use super::{ClientEntry, Server};

/// Longest client name accepted at registration (the field holds 254 bytes + NUL).
const MAX_CLIENT_NAME: usize = 254;

impl Server {
    fn reply(&mut self, key: usize, r: Response) {
        if let Some(c) = self.conns.get_mut(key) {
            r.encode(&mut c.out);
        }
    }

    /// Refuse a request whose framing was fine: 1607, one log line, keep the connection.
    fn refuse(&mut self, key: usize, why: &str) {
        if let Some(c) = self.conns.get(key) {
            log::warn!("{}: refused: {why}", c.tag());
        }
        self.reply(key, Response::GeneralError);
    }

    fn send_job(&mut self, job: Job) {
        if self.jobs.send(job).is_err() {
            log::error!("worker thread is gone; cannot continue");
            std::process::exit(1);
        }
    }

    pub(super) fn handle_frame(&mut self, key: usize, mut f: Frame) {
        let parsed = Request::parse(f.code, &f.payload);
        let req = match parsed {
            Ok(r) => r,
            Err(e) => {
                self.release(f.payload);
                self.refuse_and_close(key, &e.to_string());
                return;
            }
        };
        let hid = f.header.client_id;
        match req {
            Request::FilePacket(ph) => {
                let payload = std::mem::take(&mut f.payload);
                self.on_packet(key, hid, ph, payload);
            }
            other => {
                self.release(std::mem::take(&mut f.payload));
                // Any request other than a file packet ends the skipping of a refused upload.
                if let Some(c) = self.conns.get_mut(key) {
                    if matches!(c.upload, Upload::Skipping { .. }) {
                        c.upload = Upload::Idle;
                    }
                }
                match other {
                    Request::Register { name } => self.on_register(key, name),
                    Request::PublicKey { name, key: der } => self.on_public_key(key, hid, name, der),
                    Request::Reconnect { name } => self.on_reconnect(key, hid, name),
                    Request::CrcOk { name } => self.on_crc(key, hid, name, CrcKind::Ok),
                    Request::CrcRetry { name } => self.on_crc(key, hid, name, CrcKind::Retry),
                    Request::CrcAbort { name } => self.on_crc(key, hid, name, CrcKind::Abort),
                    Request::FilePacket(_) => {}
                }
            }
        }
    }

    /// Return a small frame's payload buffer and its budget.
    fn release(&mut self, buf: Vec<u8>) {
        self.budget.used -= buf.len();
        self.recycle(buf);
    }

    fn on_register(&mut self, key: usize, name: NameField) {
        let Some(n) = name.as_str().filter(|n| valid_client_name(n)) else {
            self.refuse(key, &format!("register: invalid client name {:?}", name.display()));
            return;
        };
        if self.registry.by_name.contains_key(n) {
            if let Some(c) = self.conns.get(key) {
                log::info!("{}: register: name {n:?} is taken", c.tag());
            }
            self.reply(key, Response::RegistrationFailed);
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
        self.registry.by_id.insert(id, ClientEntry { name: n.to_string(), key: None, pending: true });
        let c = &mut self.conns[key];
        c.awaiting = Awaiting::Register;
        c.client_label = Some(n.to_string());
        let conn = c.conn_ref(key);
        self.send_job(Job::Register { conn, id, name: n.to_string() });
    }

    /// The registered, durable client named by a request, if its id and name agree.
    fn known_client(&self, id: &[u8; 16], name: &NameField) -> Option<&ClientEntry> {
        let e = self.registry.by_id.get(id)?;
        (!e.pending && name.as_str() == Some(e.name.as_str())).then_some(e)
    }

    fn on_public_key(&mut self, key: usize, id: [u8; 16], name: NameField, der: Vec<u8>) {
        let Some(entry) = self.known_client(&id, &name) else {
            self.refuse(
                key,
                &format!("public key: unknown id {} or wrong name {:?}", id_hex(&id), name.display()),
            );
            return;
        };
        // Ids and names travel in clear: replacing a key already on file would
        // let anyone who saw them take the client over. Only the connection that
        // registered the id, or one that proved the current key by reconnecting,
        // may set it again.
        let has_key = entry.key.is_some();
        let c = &self.conns[key];
        let entitled = c.registered_id == Some(id) || c.session.as_ref().is_some_and(|s| s.id == id);
        if has_key && !entitled {
            self.refuse(
                key,
                &format!(
                    "public key: client {} already has a key; reconnect (1027) to replace it",
                    id_hex(&id)
                ),
            );
            return;
        }
        let (public, exact) = match parse_public_key(&der) {
            Ok(k) => k,
            Err(e) => {
                self.refuse(key, &format!("public key: {e}"));
                return;
            }
        };
        let aes = random_aes_key();
        let encrypted_key = match encrypt_session_key(&public, &aes, self.cfg.oaep_hash) {
            Ok(k) => k,
            Err(e) => {
                self.refuse(key, &format!("public key: cannot encrypt to it: {e}"));
                return;
            }
        };
        let label = self.registry.by_id.get(&id).map(|e| e.name.clone()).unwrap_or_default();
        let c = &mut self.conns[key];
        c.client_label = Some(label.clone());
        c.awaiting = Awaiting::Key { encrypted_key, key: aes, name: label, public };
        let conn = c.conn_ref(key);
        self.send_job(Job::SetKey { conn, id, der: exact });
    }

    fn on_reconnect(&mut self, key: usize, id: [u8; 16], name: NameField) {
        let found = self.known_client(&id, &name).and_then(|e| e.key.clone().map(|k| (e.name.clone(), k)));
        let Some((label, public)) = found else {
            if let Some(c) = self.conns.get(key) {
                log::info!(
                    "{}: reconnect denied: id {} with name {:?} is unknown or has no key",
                    c.tag(),
                    id_hex(&id),
                    name.display()
                );
            }
            self.reply(key, Response::ReconnectDenied { id });
            return;
        };
        let aes = random_aes_key();
        match encrypt_session_key(&public, &aes, self.cfg.oaep_hash) {
            Ok(encrypted_key) => {
                self.open_session(key, id, label.clone(), aes);
                if let Some(c) = self.conns.get(key) {
                    log::info!("{}: reconnected", c.tag());
                }
                self.reply(key, Response::ReconnectOk { id, encrypted_key });
                self.send_job(Job::Touch { id });
            }
            Err(e) => self.refuse(key, &format!("reconnect: cannot encrypt to the stored key: {e}")),
        }
    }

    /// Install a new session key on the connection. An upload in progress
    /// under the old key cannot continue: it is dropped.
    fn open_session(&mut self, key: usize, id: [u8; 16], name: String, aes: [u8; 32]) {
        let Some(c) = self.conns.get_mut(key) else { return };
        c.client_label = Some(name.clone());
        // Files staged under another identity cannot be confirmed by this one.
        let switched = c.session.as_ref().is_some_and(|s| s.id != id);
        let dropped: Vec<u64> = if switched {
            c.staged.drain(..).filter(|s| !s.retried).map(|s| s.upload).collect()
        } else {
            Vec::new()
        };
        c.session = Some(Session { id, name, key: aes });
        for upload in dropped {
            self.send_job(Job::Discard { upload, failed: None });
        }
        let Some(c) = self.conns.get_mut(key) else { return };
        if let Upload::Receiving(r) = std::mem::replace(&mut c.upload, Upload::Idle) {
            self.send_job(Job::Discard { upload: r.upload, failed: None });
        }
    }

    fn on_crc(&mut self, key: usize, id: [u8; 16], name: NameField, kind: CrcKind) {
        let Some(c) = self.conns.get_mut(key) else { return };
        let what = kind.code();
        let client = match &c.session {
            Some(s) if s.id == id => s.id,
            _ => {
                self.refuse(key, &format!("{what} without a session key for id {}", id_hex(&id)));
                return;
            }
        };
        let Some(idx) = name.as_str().and_then(|n| c.staged_index(n)) else {
            self.refuse(
                key,
                &format!("{what} for {:?}, which this connection has not uploaded", name.display()),
            );
            return;
        };
        let conn = c.conn_ref(key);
        let now = Instant::now();
        let s = &mut c.staged[idx];
        s.touched = now;
        let (upload, retried, fname) = (s.upload, s.retried, s.name.clone());
        match kind {
            CrcKind::Ok if retried => {
                self.refuse(key, &format!("1029 for {fname:?} after 1030: the file was discarded"));
            }
            CrcKind::Ok => {
                c.staged.remove(idx);
                c.awaiting = Awaiting::Commit { name: fname.clone() };
                self.send_job(Job::Commit { conn, upload, client, name: fname });
            }
            CrcKind::Retry => {
                s.retried = true;
                log::info!("{}: cksum mismatch reported for {fname:?}; awaiting resend", c.tag());
                if !retried {
                    self.send_job(Job::Discard { upload, failed: None });
                }
                if self.cfg.ack_retry {
                    self.reply(key, Response::Ack { id });
                }
            }
            CrcKind::Abort => {
                c.staged.remove(idx);
                log::warn!("{}: client gave up on {fname:?} (cksum mismatch); not stored", c.tag());
                self.send_job(Job::Discard { upload, failed: Some((client, fname)) });
                self.reply(key, Response::Ack { id });
            }
        }
    }

    fn on_packet(&mut self, key: usize, id: [u8; 16], ph: crate::protocol::PacketHeader, payload: Vec<u8>) {
        let content_len = (payload.len() - PACKET_HEADER_LEN) as u64;
        let now = Instant::now();
        let Some(c) = self.conns.get_mut(key) else { return };

        // Swallow the rest of an upload that was already refused.
        if let Upload::Skipping { name_field, next, total } = &c.upload {
            if *name_field == ph.file_name
                && ph.packet_number == *next
                && ph.total_packets == *total
                && *next > 1
            {
                let done = *next == *total;
                c.upload = if done {
                    Upload::Idle
                } else {
                    Upload::Skipping { name_field: name_field.clone(), next: next + 1, total: *total }
                };
                self.release(payload);
                return;
            }
            c.upload = Upload::Idle;
        }

        let (session_id, session_key) = match &c.session {
            Some(s) if s.id == id => (s.id, s.key),
            _ => {
                let why =
                    format!("file packet without a session key for id {} on this connection", id_hex(&id));
                return self.refuse_packet(key, &ph, payload, &why);
            }
        };
        if ph.total_packets == 0 || ph.packet_number == 0 || ph.packet_number > ph.total_packets {
            let why = format!("packet {} of {} is out of range", ph.packet_number, ph.total_packets);
            return self.refuse_packet(key, &ph, payload, &why);
        }

        let mut start = None;
        if ph.packet_number == 1 {
            // A new upload; one in progress is abandoned (clients restart from packet 1).
            if let Upload::Receiving(r) = std::mem::replace(&mut c.upload, Upload::Idle) {
                self.send_job(Job::Discard { upload: r.upload, failed: None });
            }
            let Some(c) = self.conns.get_mut(key) else { return };
            let name = match validate_file_name(ph.file_name.bytes()) {
                Ok(n) => n.to_string(),
                Err(e) => {
                    let why = format!("file name {:?}: {e}", ph.file_name.display());
                    return self.refuse_packet(key, &ph, payload, &why);
                }
            };
            if ph.orig_file_size as u64 > self.cfg.max_file_size {
                let why = format!(
                    "file of {} bytes exceeds the {}-byte limit",
                    ph.orig_file_size, self.cfg.max_file_size
                );
                return self.refuse_packet(key, &ph, payload, &why);
            }
            // A new upload of a staged name replaces the staged copy.
            if let Some(i) = c.staged_index(&name) {
                if let Some(old) = c.staged.remove(i) {
                    if !old.retried {
                        self.send_job(Job::Discard { upload: old.upload, failed: None });
                    }
                }
            }
            let upload = self.next_upload;
            self.next_upload += 1;
            start = Some(StartUpload { client: session_id, key: session_key });
            let Some(c) = self.conns.get_mut(key) else { return };
            c.upload = Upload::Receiving(Receiving {
                upload,
                name,
                name_field: ph.file_name.clone(),
                total: ph.total_packets,
                next: 1,
                segment: None,
                last_stream_len: 0,
                plain_total: 0,
                multi_packet_stream: false,
                touched: now,
            });
        }

        let Some(c) = self.conns.get_mut(key) else { return };
        let Upload::Receiving(r) = &mut c.upload else {
            let why = format!(
                "packet {} of {:?} with no upload in progress",
                ph.packet_number,
                ph.file_name.display()
            );
            return self.refuse_packet(key, &ph, payload, &why);
        };
        if r.name_field.bytes() != ph.file_name.bytes()
            || r.total != ph.total_packets
            || r.next != ph.packet_number
        {
            let why = format!(
                "packet {}/{} of {:?} does not follow packet {}/{} of {:?}",
                ph.packet_number,
                ph.total_packets,
                ph.file_name.display(),
                r.next.saturating_sub(1),
                r.total,
                r.name_field.display()
            );
            return self.refuse_packet(key, &ph, payload, &why);
        }
        let step = match plan_packet(r, &ph, content_len, self.cfg.max_file_size) {
            Ok(s) => s,
            Err(why) => return self.refuse_packet(key, &ph, payload, &why),
        };
        r.touched = now;
        // Saturating: after packet 65535 of 65535 there is no next packet (and `+=` would overflow).
        r.next = r.next.saturating_add(1);
        let upload = r.upload;
        let last = ph.packet_number == ph.total_packets;
        if last {
            let (name, name_field) = (r.name.clone(), r.name_field.clone());
            c.upload = Upload::Finishing { upload, name, name_field };
            c.awaiting = Awaiting::LastPacket;
        }
        c.packets_in_flight += 1;
        let conn = c.conn_ref(key);
        self.send_job(Job::Packet(PacketJob {
            conn,
            upload,
            payload,
            start,
            new_segment: step.new_segment,
            end_segment: step.end_segment,
            last,
        }));
    }

    /// Refuse a file packet: 1607 once, drop the upload, skip its remaining packets.
    fn refuse_packet(&mut self, key: usize, ph: &crate::protocol::PacketHeader, payload: Vec<u8>, why: &str) {
        self.release(payload);
        let Some(c) = self.conns.get_mut(key) else { return };
        if let Upload::Receiving(r) = std::mem::replace(&mut c.upload, Upload::Idle) {
            self.send_job(Job::Discard { upload: r.upload, failed: None });
        }
        let Some(c) = self.conns.get_mut(key) else { return };
        if ph.packet_number >= 1 && ph.packet_number < ph.total_packets {
            c.upload = Upload::Skipping {
                name_field: ph.file_name.clone(),
                next: ph.packet_number + 1,
                total: ph.total_packets,
            };
        }
        self.refuse(key, why);
    }

    pub(super) fn on_completion(&mut self, done: Completion) {
        match done {
            Completion::Packet { conn, upload, buffer, last, outcome } => {
                self.budget.used -= buffer.len();
                self.recycle(buffer);
                let Some(c) = self.conns.get_mut(conn.key).filter(|c| c.serial == conn.serial) else {
                    return;
                };
                c.packets_in_flight -= 1;
                match outcome {
                    PacketOutcome::Accepted => {}
                    PacketOutcome::Received { cksum, ciphertext_len, plain_len } => {
                        if let Upload::Finishing { upload: u, name, name_field } =
                            std::mem::replace(&mut c.upload, Upload::Idle)
                        {
                            if u == upload {
                                c.awaiting = Awaiting::Nothing;
                                let id = c.session.as_ref().map(|s| s.id).unwrap_or_default();
                                log::info!("{}: received {name:?} ({plain_len} bytes, cksum {cksum}); awaiting confirmation", c.tag());
                                c.staged.push_back(StagedFile {
                                    name,
                                    upload,
                                    retried: false,
                                    touched: Instant::now(),
                                });
                                if c.staged.len() > MAX_STAGED {
                                    if let Some(old) = c.staged.pop_front() {
                                        if !old.retried {
                                            self.send_job(Job::Discard { upload: old.upload, failed: None });
                                        }
                                    }
                                }
                                self.reply(
                                    conn.key,
                                    Response::FileReceived {
                                        id,
                                        content_size: ciphertext_len as u32,
                                        file_name: name_field.0,
                                        cksum,
                                    },
                                );
                            }
                        }
                    }
                    PacketOutcome::Failed(why) => {
                        // Only the connection's current upload is answered: one the
                        // loop already refused has had its 1607, and one abandoned
                        // (new packet 1, new session key) gets no reply.
                        let current = match &c.upload {
                            Upload::Receiving(r) if r.upload == upload => {
                                let (name_field, next, total) = (r.name_field.clone(), r.next, r.total);
                                c.upload = Upload::Skipping { name_field, next, total };
                                true
                            }
                            Upload::Finishing { upload: u, .. } if *u == upload => {
                                c.upload = Upload::Idle;
                                true
                            }
                            _ => false,
                        };
                        if last && c.awaiting == Awaiting::LastPacket {
                            c.awaiting = Awaiting::Nothing;
                        }
                        if current {
                            self.refuse(conn.key, &format!("upload failed: {why}"));
                        } else {
                            log::info!("{}: an abandoned or already refused upload failed: {why}", c.tag());
                        }
                    }
                    PacketOutcome::Ignored => {
                        if last && c.awaiting == Awaiting::LastPacket {
                            c.awaiting = Awaiting::Nothing;
                            if matches!(&c.upload, Upload::Finishing { upload: u, .. } if *u == upload) {
                                c.upload = Upload::Idle;
                            }
                        }
                    }
                }
                self.resume(conn.key, conn.serial);
            }
            Completion::Registered { conn, id, ok } => {
                if !ok {
                    if let Some(e) = self.registry.by_id.remove(&id) {
                        self.registry.by_name.remove(&e.name);
                    }
                } else if let Some(e) = self.registry.by_id.get_mut(&id) {
                    e.pending = false;
                }
                let Some(c) = self.conns.get_mut(conn.key).filter(|c| c.serial == conn.serial) else {
                    return;
                };
                c.awaiting = Awaiting::Nothing;
                if ok {
                    c.registered_id = Some(id);
                    log::info!("{}: registered as {}", c.tag(), id_hex(&id));
                    self.reply(conn.key, Response::RegistrationOk { id });
                } else {
                    self.refuse(conn.key, "registration could not be saved");
                }
                self.resume(conn.key, conn.serial);
            }
            Completion::KeySaved { conn, id, ok, der } => {
                let Some(c) = self.conns.get_mut(conn.key).filter(|c| c.serial == conn.serial) else {
                    // The connection is gone but the key is on file: a reconnect
                    // must encrypt to it, as it will after a restart.
                    if let (true, Some(e), Ok((k, _))) =
                        (ok, self.registry.by_id.get_mut(&id), parse_public_key(&der))
                    {
                        e.key = Some(k);
                    }
                    return;
                };
                let Awaiting::Key { encrypted_key, key, name, public } =
                    std::mem::replace(&mut c.awaiting, Awaiting::Nothing)
                else {
                    return;
                };
                if ok {
                    // The key on file is what a later reconnect encrypts to.
                    if let Some(e) = self.registry.by_id.get_mut(&id) {
                        e.key = Some(public);
                    }
                    self.open_session(conn.key, id, name, key);
                    if let Some(c) = self.conns.get(conn.key) {
                        log::info!("{}: public key received; session key sent", c.tag());
                    }
                    self.reply(conn.key, Response::KeyAccepted { id, encrypted_key });
                } else {
                    self.refuse(conn.key, "public key could not be saved");
                }
                self.resume(conn.key, conn.serial);
            }
            Completion::Committed { conn, upload: _, ok } => {
                let Some(c) = self.conns.get_mut(conn.key).filter(|c| c.serial == conn.serial) else {
                    return;
                };
                let Awaiting::Commit { name } = std::mem::replace(&mut c.awaiting, Awaiting::Nothing) else {
                    return;
                };
                let id = c.session.as_ref().map(|s| s.id).unwrap_or_default();
                if ok {
                    log::info!("{}: {name:?} verified and stored", c.tag());
                    self.reply(conn.key, Response::Ack { id });
                } else {
                    self.refuse(conn.key, &format!("{name:?} could not be stored; upload it again"));
                }
                self.resume(conn.key, conn.serial);
            }
        }
    }

    /// A connection's wait ended: flush its replies and read on.
    fn resume(&mut self, key: usize, serial: u64) {
        self.drive(key, serial);
    }

    /// Drop transfers untouched for the stale-upload timeout.
    pub(super) fn purge_stale(&mut self, key: usize, serial: u64, now: Instant) {
        let limit = self.cfg.stale_upload_timeout;
        let Some(c) = self.conns.get_mut(key).filter(|c| c.serial == serial) else { return };
        let mut drop_uploads = Vec::new();
        if let Upload::Receiving(r) = &c.upload {
            if now.duration_since(r.touched) > limit {
                drop_uploads.push(r.upload);
                c.upload = Upload::Idle;
            }
        }
        c.staged.retain(|s| {
            let keep = now.duration_since(s.touched) <= limit;
            if !keep && !s.retried {
                drop_uploads.push(s.upload);
            }
            keep
        });
        if !drop_uploads.is_empty() {
            log::info!("{}: discarded {} transfer(s) untouched for {limit:?}", c.tag(), drop_uploads.len());
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

/// What the worker must do with a packet's CBC streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PacketStep {
    pub new_segment: bool,
    pub end_segment: Option<u64>,
}

/// Check one packet against the upload's sizes and decide its CBC steps.
/// See docs/PROTOCOL.md ("How backupd reads file packets") for the rules.
pub fn plan_packet(
    r: &mut Receiving,
    ph: &crate::protocol::PacketHeader,
    content_len: u64,
    max_file_size: u64,
) -> Result<PacketStep, String> {
    let last = ph.packet_number == ph.total_packets;
    let orig = ph.orig_file_size;
    let step = match r.segment {
        Some(mut seg) => {
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
            r.multi_packet_stream = true;
            if seg.remaining == 0 {
                r.segment = None;
                r.last_stream_len = seg.whole;
                PacketStep { new_segment: false, end_segment: Some(orig as u64) }
            } else {
                r.segment = Some(seg);
                PacketStep { new_segment: false, end_segment: None }
            }
        }
        None if content_len == 0 && ph.packet_number > 1 => {
            // The empty last packet of clients that count the whole ciphertext in content_size.
            if !last {
                return Err("empty packet before the last one".into());
            }
            if ph.content_size as u64 != r.last_stream_len && ph.content_size != 0 {
                return Err(format!("empty last packet with content_size {}", ph.content_size));
            }
            PacketStep { new_segment: false, end_segment: None }
        }
        None => {
            // A new CBC stream starts with this packet.
            let whole = ciphertext_len(orig as u64);
            if whole > u32::MAX as u64 {
                return Err(format!(
                    "a ciphertext of {whole} bytes does not fit the 32-bit size of the 1603 reply"
                ));
            }
            if ph.packet_number > 1 && (r.multi_packet_stream || content_len != whole) {
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
            r.plain_total += orig as u64;
            if r.plain_total > max_file_size {
                return Err(format!("file exceeds the {max_file_size}-byte limit"));
            }
            if content_len == whole {
                r.last_stream_len = whole;
                PacketStep { new_segment: true, end_segment: Some(orig as u64) }
            } else {
                r.segment = Some(Segment { orig, whole, remaining: whole - content_len });
                PacketStep { new_segment: true, end_segment: None }
            }
        }
    };
    if last && r.segment.is_some() {
        return Err("last packet arrived before the file's ciphertext was complete".into());
    }
    Ok(step)
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rsa::pkcs8::EncodePublicKey;

    use super::*;
    use crate::server::tests::{add_connection, test_config};

    /// The key a 1026 put on file must be the one a later 1027 encrypts to,
    /// even when the connection that sent the 1026 closed before the worker
    /// saved it: the registry in memory must follow the database.
    #[test]
    fn key_saved_after_its_connection_closed_still_reaches_the_registry() {
        let dir = tempfile::tempdir().unwrap();
        let mut server = Server::bind(test_config(dir.path()), "127.0.0.1:0".parse().unwrap()).unwrap();
        let id = [7u8; 16];
        server.registry.by_name.insert("kim".into(), id);
        server.registry.by_id.insert(id, ClientEntry { name: "kim".into(), key: None, pending: false });

        let (key, serial, _client) = add_connection(&mut server);

        let private = rsa::RsaPrivateKey::new(&mut rand::rngs::OsRng, 1024).unwrap();
        let der = private.to_public_key().to_public_key_der().unwrap().into_vec();
        server.on_public_key(key, id, NameField::from_name(b"kim").unwrap(), der);
        assert!(server.conns[key].awaiting != Awaiting::Nothing, "the key goes to the worker first");
        server.close(key, serial, Some("peer went away"));
        let done = server.done.recv_timeout(Duration::from_secs(10)).expect("the worker answers");
        assert!(matches!(done, Completion::KeySaved { ok: true, .. }));
        server.on_completion(done);
        assert_eq!(
            server.registry.by_id[&id].key.as_ref(),
            Some(&private.to_public_key()),
            "the database has the new key; a reconnect must encrypt to it"
        );
    }
}
