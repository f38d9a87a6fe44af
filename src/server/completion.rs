//! The state machine's side of the worker's completions: a packet
//! processed (an upload received or failed), a registration or a key saved,
//! a file committed; each updates the registry and answers the connection,
//! if it is still open. A completion ends the wait it answers
//! (`Protocol::end_wait`) and moves the upload on by value; one that the
//! connection's state does not expect is refused (1607, one log line, close:
//! `Protocol::out_of_state`), the state kept as it was.

use std::time::Instant;

use log::Level;

use crate::crypto::parse_public_key;
use crate::logging::Esc;
use crate::metrics::Unstored;
use crate::peer_log;
use crate::protocol::{id_hex, ClientId, Response};
use crate::worker::{Completion, ConnRef, Job, PacketOutcome, Reclaimed, UploadError, Usage};

use super::state::{Awaiting, Finishing, PendingKey, Protocol, StagedFile, MAX_STAGED};
use super::{Core, Flow, JobSink};

impl<J: JobSink> Core<J> {
    /// A worker completion. `p` is its connection, None if that has closed
    /// since (the registry and the budget are updated all the same).
    pub fn on_completion(&mut self, p: Option<&mut Protocol>, done: Completion) -> Flow {
        match done {
            Completion::Packet { conn: _, upload, buffer, last, outcome } => {
                self.recycle(buffer.into_buffer());
                let Some(p) = p else { return Flow::Continue };
                self.on_packet_done(p, upload, last, outcome)
            }
            Completion::Registered { conn: _, id, ok, reclaimed } => self.on_registered(p, id, ok, reclaimed),
            Completion::KeySaved { conn, id, ok, der } => self.on_key_saved(p, conn, id, ok, &der),
            Completion::Committed { conn: _, upload: _, ok, client, usage } => {
                self.on_committed(p, ok, client, usage)
            }
        }
    }

    /// A content piece of `p` is done at the worker; `last`: the upload's
    /// last, whose outcome `p` awaits.
    fn on_packet_done(&mut self, p: &mut Protocol, upload: u64, last: bool, outcome: PacketOutcome) -> Flow {
        let Some(in_flight) = p.packets_in_flight.checked_sub(1) else {
            return p.out_of_state("a packet completion with no packet at the worker");
        };
        p.packets_in_flight = in_flight;
        if last && p.end_wait(|a| if a == Awaiting::LastPacket { Ok(()) } else { Err(a) }).is_none() {
            return p.out_of_state("the outcome of an upload's last packet");
        }
        match outcome {
            PacketOutcome::Accepted => Flow::Resume,
            PacketOutcome::Received { cksum, ciphertext_len, plain_len } => {
                self.packet_received(p, upload, cksum, ciphertext_len, plain_len)
            }
            PacketOutcome::Failed(err) => {
                self.packet_failed(p, upload, &err);
                Flow::Resume
            }
            PacketOutcome::Ignored => {
                if last {
                    p.advance_upload(|u| u.last_ignored(upload));
                }
                Flow::Resume
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
    ) -> Flow {
        let Some(Finishing { name, name_field, .. }) = p.advance_upload(|u| u.received(upload)) else {
            return p.out_of_state("a received upload that is not the one finishing");
        };
        let id = p.session.as_ref().map(|s| s.id).unwrap_or_default();
        self.decrypted(p);
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
        Flow::Resume
    }

    /// A packet failed at the worker (decryption, write): the upload ends.
    fn packet_failed(&mut self, p: &mut Protocol, upload: u64, err: &UploadError) {
        // Only the connection's current upload is answered: one the
        // loop already refused has had its 1607, and one abandoned
        // (new packet 1, new session key) gets no reply.
        let current = p.advance_upload(|u| u.failed(upload));
        if err.is_decryption() {
            self.decryption_failed(p);
        }
        if current {
            self.metrics.unstored(Unstored::Failed);
            p.refuse(&format!("upload failed: {err}"));
        } else {
            log::info!("{}: an abandoned or already refused upload failed: {err}", p.tag());
        }
    }

    /// A registration is saved (or not): the 1600, or a refusal (1601 when
    /// the registration it was to reclaim at `--max-clients` stores something).
    fn on_registered(
        &mut self,
        p: Option<&mut Protocol>,
        id: ClientId,
        ok: bool,
        reclaimed: Option<Reclaimed>,
    ) -> Flow {
        if !ok {
            self.registry.remove(&id);
        } else if let Some(e) = self.registry.by_id.get_mut(&id) {
            e.pending = false;
        }
        let kept = self.after_reclaim(p.as_deref(), &id, reclaimed);
        self.metrics.clients.set(self.registry.by_id.len() as i64);
        let Some(p) = p else { return Flow::Continue };
        if p.end_wait(|a| if a == Awaiting::Register { Ok(()) } else { Err(a) }).is_none() {
            return p.out_of_state("a registration saved");
        }
        if ok {
            self.set_registrant(p, id);
            peer_log!(Level::Info, p.peer.ip(), "{}: registered as {}", p.tag(), id_hex(&id));
            p.reply(Response::RegistrationOk { id });
        } else if kept {
            self.refuse_at_max_clients(p);
        } else {
            p.refuse("registration could not be saved");
        }
        Flow::Resume
    }

    /// The registration reclaimed for client `new` at `--max-clients` is
    /// gone (one log line), or back as it was; true when the worker kept it
    /// because it stores something (it is never picked again).
    fn after_reclaim(&mut self, p: Option<&Protocol>, new: &ClientId, reclaimed: Option<Reclaimed>) -> bool {
        let (old, kept) = match reclaimed {
            None => return false,
            Some(Reclaimed::Removed(old)) => {
                if let Some(e) = self.registry.remove(&old) {
                    self.metrics.forget_client(&e.name);
                    let msg = format!(
                        "register: --max-clients ({}) reached: reclaimed client {} \"{}\" (the oldest registration \
                         that never sent its key and stores nothing; its row is deleted), {} registered in its place",
                        self.cfg.max_clients,
                        id_hex(&old),
                        Esc(&e.name),
                        id_hex(new)
                    );
                    match p {
                        Some(p) => peer_log!(Level::Warn, p.peer.ip(), "{}: {msg}", p.tag()),
                        None => log::warn!("{msg}"),
                    }
                }
                return false;
            }
            Some(Reclaimed::Kept(old)) => (old, true),
            Some(Reclaimed::Unchanged(old)) => (old, false),
        };
        if let Some(e) = self.registry.by_id.get_mut(&old) {
            e.pending = false;
        }
        if kept {
            self.registry.keep(&old);
        }
        kept
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
            if let (true, Ok((k, _))) = (ok, parse_public_key(der)) {
                self.registry.key_saved(&id, k);
            }
            return Flow::Continue;
        };
        let awaited = p.end_wait(|a| match a {
            Awaiting::Key(k) => Ok(k),
            other => Err(other),
        });
        let Some(PendingKey { encrypted_key, key, name, public }) = awaited.map(|k| *k) else {
            return p.out_of_state("a public key saved");
        };
        if ok {
            // The key on file is what a later reconnect encrypts to.
            self.registry.key_saved(&id, public);
            self.open_session(p, id, name, key);
            // The connection that set the key is the client's own.
            self.decrypt_failures.trust(id, p.peer.ip());
            p.logged_in = Some(Instant::now());
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
        let awaited = p.end_wait(|a| match a {
            Awaiting::Commit { name } => Ok(name),
            other => Err(other),
        });
        let Some(name) = awaited else {
            return p.out_of_state("a commit done");
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
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::budget::Piece;
    use crate::config::Config;
    use crate::protocol::Response;
    use crate::server::Registry;

    fn core() -> Core<Vec<Job>> {
        Core::new(Arc::new(Config::defaults()), Registry::default(), Vec::new(), 1)
    }

    fn protocol() -> Protocol {
        Protocol::new(ConnRef { key: 0, serial: 1 }, "192.0.2.1:4000".parse().unwrap())
    }

    fn replies(p: &mut Protocol) -> Vec<Response> {
        Response::decode_all(&std::mem::take(&mut p.out)).expect("well-formed replies")
    }

    /// A completion the connection's state does not expect is refused (1607,
    /// close) and leaves the state as it was: nothing is reset silently.
    #[test]
    fn unexpected_completions_are_refused_not_reset() {
        let mut core = core();
        let conn = ConnRef { key: 0, serial: 1 };
        // A commit done while no commit is awaited.
        let mut p = protocol();
        p.wait_for(Awaiting::Register);
        let done =
            Completion::Committed { conn, upload: 7, ok: true, client: [1; 16], usage: Usage::default() };
        assert_eq!(core.on_completion(Some(&mut p), done), Flow::Close);
        assert_eq!(replies(&mut p), vec![Response::GeneralError]);
        assert!(p.awaits_reply(), "the awaited registration is kept");
        // The last packet's outcome for an upload that is not the one finishing.
        let mut p = protocol();
        p.wait_for(Awaiting::LastPacket);
        p.packets_in_flight = 1;
        let outcome = PacketOutcome::Received { cksum: 1, ciphertext_len: 16, plain_len: 3 };
        let done = Completion::Packet { conn, upload: 7, buffer: Piece::empty(), last: true, outcome };
        assert_eq!(core.on_completion(Some(&mut p), done), Flow::Close);
        assert_eq!(replies(&mut p), vec![Response::GeneralError]);
        assert!(p.staged.is_empty(), "nothing staged for an upload that was not finishing");
        // A packet completion with no packet at the worker.
        let mut p = protocol();
        let done = Completion::Packet {
            conn,
            upload: 7,
            buffer: Piece::empty(),
            last: false,
            outcome: PacketOutcome::Accepted,
        };
        assert_eq!(core.on_completion(Some(&mut p), done), Flow::Close);
        assert_eq!(replies(&mut p), vec![Response::GeneralError]);
        assert!(core.jobs.is_empty());
    }
}
