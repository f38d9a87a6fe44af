//! The loop's reading, as `Server::drive` does it: headers, payloads,
//! content pieces granted by the budget, and the jobs they make.

use std::collections::{HashSet, VecDeque};

use backupd::budget::Piece;
use backupd::crypto::decrypt_session_key;
use backupd::protocol::{Code, Request, RequestHeader, Response, PACKET_HEADER_LEN, REQUEST_HEADER_LEN};
use backupd::server::fuzzing::{Flow, Frame, Incoming, Protocol};
use backupd::worker::{ConnRef, Job, PacketJob, UploadId};

use super::generator::Plan;
use super::key::client_key;
use super::model::{MConn, MUpload, Owed};
use super::{is_packet_job, job_name, packet_jobs, take_replies, tracing, Sim};

enum ReadPhase {
    Header,
    /// A control frame's payload or a file packet's fixed fields.
    Payload(Frame),
    /// An admitted packet's content: a piece once the budget granted it.
    Content {
        remaining: u64,
        piece: Option<Piece>,
        filled: usize,
    },
    /// A refused packet's content, dropped.
    Drain {
        remaining: u64,
    },
}

/// The admitted packet whose content is streaming to the worker.
pub(super) struct Streaming {
    pub(super) upload: UploadId,
    pub(super) k: u16,
    pub(super) n: u16,
    /// No piece has gone yet.
    pub(super) first: bool,
    /// The packet ends the upload (numbered as the total, or packet 1 of 0 with an empty file).
    pub(super) ends: bool,
}

pub(super) struct Slot {
    pub(super) proto: Protocol,
    pub(super) model: MConn,
    pub(super) inbuf: Vec<u8>,
    pos: usize,
    read: ReadPhase,
    /// Offset in `inbuf` of the frame being read.
    frame_start: usize,
    /// Frames the generator built to follow the packet rules: (start, end).
    pub(super) conforming: HashSet<(usize, usize)>,
    /// A framing error: the 1607 is queued, nothing more is read.
    closing: bool,
    pub(super) plan: Option<Plan>,
    pub(super) streaming: Option<Streaming>,
}

impl Slot {
    pub(super) fn new(key: usize, serial: u64) -> Slot {
        let conn = ConnRef { key, serial };
        let peer = std::net::SocketAddr::from(([192, 0, 2, 1], 40000 + key as u16));
        Slot {
            proto: Protocol::new(conn, peer),
            model: MConn {
                conn,
                session: None,
                sealed: None,
                registered: None,
                upload: MUpload::Idle,
                staged: VecDeque::new(),
                owed: Owed::Nothing,
                decrypted: 0,
            },
            inbuf: Vec::new(),
            pos: 0,
            read: ReadPhase::Header,
            frame_start: 0,
            conforming: HashSet::new(),
            closing: false,
            plan: None,
            streaming: None,
        }
    }

    /// Budget granted to the piece being read.
    pub(super) fn reserved(&self) -> usize {
        match &self.read {
            ReadPhase::Content { piece: Some(p), .. } => p.len(),
            _ => 0,
        }
    }
}

impl Sim<'_> {
    /// Read what the connection may: frame by frame, as far as the bytes the
    /// peer sent and the budget allow.
    pub(super) fn pump(&mut self, s: usize) {
        loop {
            let piece_size = self.core.piece_size();
            let slot = &self.slots[s];
            if slot.closing || !slot.proto.may_read() {
                return;
            }
            let more = match slot.read {
                ReadPhase::Header => self.read_header(s),
                ReadPhase::Payload(_) => self.read_payload(s),
                ReadPhase::Drain { .. } => self.read_drain(s),
                ReadPhase::Content { .. } => self.read_content(s, piece_size),
            };
            if !more {
                return;
            }
        }
    }

    /// A request header and its check; false when there is no more to read.
    fn read_header(&mut self, s: usize) -> bool {
        let slot = &mut self.slots[s];
        let avail = slot.inbuf.len() - slot.pos;
        if avail < REQUEST_HEADER_LEN {
            return false;
        }
        let mut raw = [0u8; REQUEST_HEADER_LEN];
        raw.copy_from_slice(&slot.inbuf[slot.pos..slot.pos + REQUEST_HEADER_LEN]);
        slot.frame_start = slot.pos;
        slot.pos += REQUEST_HEADER_LEN;
        let h = RequestHeader::decode(&raw);
        match self.core.check_header(&mut slot.proto, &h) {
            None => {
                assert!(h.check(self.max_payload as u32).is_err());
                let replies = take_replies(slot.proto.take_output());
                assert_eq!(replies, vec![Response::GeneralError], "framing error");
                assert!(self.core.take_jobs().is_empty());
                slot.closing = true;
                self.stats.framing_errors += 1;
                false
            }
            Some(code) => {
                assert_eq!(code.as_u16(), h.code);
                slot.read = ReadPhase::Payload(Frame::new(h, code));
                true
            }
        }
    }

    /// A control frame's payload or a packet's fixed fields; once complete,
    /// the frame is handled and what follows it (content or nothing) is set up.
    fn read_payload(&mut self, s: usize) -> bool {
        let slot = &mut self.slots[s];
        let ReadPhase::Payload(f) = &mut slot.read else { unreachable!() };
        slot.pos += f.fill(&slot.inbuf[slot.pos..]);
        if !f.is_complete() {
            return false;
        }
        let ReadPhase::Payload(f) = std::mem::replace(&mut slot.read, ReadPhase::Header) else {
            unreachable!()
        };
        let end = slot.frame_start + REQUEST_HEADER_LEN + f.header().payload_size as usize;
        let conforming = slot.conforming.remove(&(slot.frame_start, end));
        self.handle(s, f, conforming);
        let slot = &mut self.slots[s];
        match slot.proto.take_incoming() {
            _ if slot.closing => {}
            None => {}
            Some(Incoming::Stream { len }) => {
                assert!(slot.streaming.is_some(), "content streams for no admitted packet");
                slot.read = ReadPhase::Content { remaining: len, piece: None, filled: 0 };
            }
            Some(Incoming::Drain { len }) => slot.read = ReadPhase::Drain { remaining: len },
        }
        true
    }

    /// A refused packet's content, dropped.
    fn read_drain(&mut self, s: usize) -> bool {
        let slot = &mut self.slots[s];
        let avail = slot.inbuf.len() - slot.pos;
        let ReadPhase::Drain { remaining } = &mut slot.read else { unreachable!() };
        let n = (avail as u64).min(*remaining);
        slot.pos += n as usize;
        *remaining -= n;
        if *remaining > 0 {
            return false;
        }
        slot.read = ReadPhase::Header;
        true
    }

    /// An admitted packet's content: a piece once the budget grants it, to
    /// the worker once read.
    fn read_content(&mut self, s: usize, piece_size: usize) -> bool {
        let slot = &mut self.slots[s];
        let avail = slot.inbuf.len() - slot.pos;
        let ReadPhase::Content { remaining, piece, filled } = &mut slot.read else { unreachable!() };
        if piece.is_none() {
            let len = (*remaining).min(piece_size as u64) as usize;
            let Some(granted) = self.core.grant_piece(len) else {
                let other = self.slots[1 - s].reserved();
                assert!(
                    self.queue.iter().any(is_packet_job) || other > 0,
                    "a piece waits for budget ({} of {} used) with nothing in flight",
                    self.core.budget().used(),
                    self.core.budget().limit()
                );
                self.stats.budget_waits += 1;
                return false;
            };
            *piece = Some(granted);
        }
        let Some(p) = piece.as_mut() else { unreachable!() };
        let n = avail.min(p.len() - *filled);
        p.bytes[*filled..*filled + n].copy_from_slice(&slot.inbuf[slot.pos..slot.pos + n]);
        *filled += n;
        slot.pos += n;
        if *filled < p.len() {
            return false;
        }
        let Some(p) = piece.take() else { unreachable!() };
        *remaining -= p.len() as u64;
        *filled = 0;
        let last = *remaining == 0;
        if last {
            slot.read = ReadPhase::Header;
        }
        self.on_piece(s, p, last);
        true
    }

    /// A piece of an admitted packet's content was read: it goes to the
    /// worker with the packet's flags, unless the upload failed meanwhile.
    fn on_piece(&mut self, s: usize, piece: Piece, last: bool) {
        let bytes = piece.bytes.clone();
        let slot = &mut self.slots[s];
        self.core.content_piece(&mut slot.proto, piece, last);
        let jobs = self.core.take_jobs();
        assert!(take_replies(slot.proto.take_output()).is_empty(), "content is not answered");
        assert!(jobs.len() <= 1 && jobs.iter().all(is_packet_job), "a piece makes one packet job at most");
        self.check_piece(s, packet_jobs(&jobs).first().copied(), &bytes, last);
        self.enqueue(jobs);
    }

    /// The jobs of one piece, against the model.
    pub(super) fn check_piece(&mut self, s: usize, job: Option<&PacketJob>, bytes: &[u8], last: bool) {
        let slot = &mut self.slots[s];
        let x = slot.streaming.as_mut().expect("a piece of no admitted packet");
        let m = &mut slot.model;
        let current = matches!(&m.upload, MUpload::Receiving { id, .. } if *id == x.upload);
        let (first, k, n, upload, ends) = (x.first, x.k, x.n, x.upload, x.ends);
        x.first = false;
        if last {
            slot.streaming = None;
        }
        if !current {
            assert!(job.is_none(), "content of a failed upload went to the worker");
            return;
        }
        let Some(p) = job else { panic!("a piece of packet {k}/{n} did not go to the worker") };
        assert_eq!((p.conn, p.upload), (m.conn, upload));
        assert_eq!(&p.content.bytes[..], bytes, "the content goes to the worker as it came");
        assert_eq!(p.last, last && ends, "only the last piece of the last packet ends the upload");
        assert!(!p.new_segment || first, "only a packet's first piece starts a CBC stream");
        assert!(p.end_segment.is_none() || last, "only a packet's last piece ends a CBC stream");
        if first && k == 1 {
            let start = p.start.as_ref().expect("packet 1 starts the upload");
            self.check_start(s, start);
        } else {
            assert!(p.start.is_none(), "only packet 1's first piece opens the upload");
        }
        let m = &mut self.slots[s].model;
        if p.last {
            let MUpload::Receiving { id, field, total, next, .. } = m.upload.clone() else { unreachable!() };
            m.upload = MUpload::Finishing { id, field, total, next };
            m.owed = Owed::LastPacket(id);
        }
    }

    /// Packet 1's first piece carries this connection's session key.
    fn check_start(&mut self, s: usize, start: &backupd::worker::StartUpload) {
        let oaep = self.oaep;
        let slot = &mut self.slots[s];
        let m = &mut slot.model;
        let Some((sid, skey)) = m.session else {
            panic!("a Job::Packet without this connection's session key")
        };
        let (proto_id, proto_key) = slot.proto.session().expect("the state machine has the session");
        assert_eq!(proto_id, sid);
        assert_eq!(start.client, sid);
        assert_eq!(start.key, proto_key, "packet 1 carries this connection's session key");
        let key = match (skey, m.sealed.take()) {
            (Some(k), _) => Some(k),
            (None, Some(ct)) if self.check_key => {
                self.check_key = false;
                self.stats.keys_checked += 1;
                Some(
                    decrypt_session_key(&client_key().private, &ct, oaep)
                        .expect("the session key decrypts with the client's key"),
                )
            }
            (None, _) => None,
        };
        if let Some(key) = key {
            assert_eq!(start.key, key, "packet 1 carries the key the client was sent");
            m.session = Some((sid, Some(key)));
        }
    }

    /// One complete frame through `handle_frame`, checked against the model.
    fn handle(&mut self, s: usize, f: Frame, conforming: bool) {
        let f_payload_size = f.header().payload_size;
        let hid = f.header().client_id;
        let parsed = Request::parse(f.code(), f.payload());
        let slot = &mut self.slots[s];
        trace!("  slot {s} handles {:?} (conforming {conforming}): model {:?}", parsed, slot.model.upload);
        let flow = self.core.handle_frame(&mut slot.proto, f);
        let replies = take_replies(slot.proto.take_output());
        let jobs = self.core.take_jobs();
        trace!("    -> {replies:?}, jobs {:?}", jobs.iter().map(job_name).collect::<Vec<_>>());
        let req = match parsed {
            Ok(r) => r,
            Err(_) => {
                assert_eq!(flow, Flow::Close);
                assert_eq!(replies, vec![Response::GeneralError]);
                assert!(jobs.is_empty());
                slot.closing = true;
                self.stats.framing_errors += 1;
                return;
            }
        };
        assert_eq!(flow, Flow::Continue);
        match req {
            Request::FilePacket(ph) => {
                let content_len = u64::from(f_payload_size).saturating_sub(PACKET_HEADER_LEN as u64);
                self.on_packet(s, hid, ph, content_len, conforming, replies, &jobs)
            }
            other => {
                // Any other request ends the swallowing of an ended upload.
                let m = &mut self.slots[s].model;
                if matches!(m.upload, MUpload::Ended { .. }) {
                    m.upload = MUpload::Idle;
                }
                match other {
                    Request::Register { name } => self.on_register(s, name, replies, &jobs),
                    Request::PublicKey { name, key } => {
                        self.on_public_key(s, hid, name, &key, replies, &jobs)
                    }
                    Request::Reconnect { name } => self.on_reconnect(s, hid, name, replies, &jobs),
                    Request::CrcOk { name } => self.on_crc(s, hid, name, Code::CrcOk, replies, &jobs),
                    Request::CrcRetry { name } => self.on_crc(s, hid, name, Code::CrcRetry, replies, &jobs),
                    Request::CrcAbort { name } => self.on_crc(s, hid, name, Code::CrcAbort, replies, &jobs),
                    Request::FilePacket(_) => unreachable!(),
                }
            }
        }
        self.enqueue(jobs);
    }

    /// Jobs go to the fake worker, after the ledger checks of the loop's side.
    pub(super) fn enqueue(&mut self, jobs: Vec<Job>) {
        for j in jobs {
            match &j {
                Job::Packet(p) => {
                    let l = self.ledger.entry(p.upload).or_default();
                    assert!(!l.discarded && !l.committed, "a packet for upload {} after its end", p.upload);
                }
                Job::Discard { upload, failed } => {
                    let l = self.ledger.get_mut(upload).expect("a discard of an upload never started");
                    // A 1031 after a 1030 discards again: that one records the failure.
                    let record_only = failed.is_some() && l.discarded;
                    assert!(
                        record_only || (!l.discarded && !l.committed),
                        "upload {upload} discarded twice or after its commit"
                    );
                    l.discarded = true;
                }
                Job::Commit { upload, .. } => {
                    let l = self.ledger.get_mut(upload).expect("a commit of an upload never started");
                    assert!(
                        !l.discarded && !l.committed,
                        "upload {upload} committed twice or after its discard"
                    );
                    l.committed = true;
                }
                Job::Shutdown => panic!("the state machine sent Shutdown"),
                _ => {}
            }
            self.queue.push_back(j);
        }
    }
}
