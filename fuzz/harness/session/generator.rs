//! What the fake client sends: the operations of the input.

use backupd::crypto::ciphertext_len;
use backupd::protocol::{
    ClientId, Code, NameField, PacketHeader, RequestHeader, NAME_FIELD_LEN, PACKET_HEADER_LEN,
};

use super::super::payload_parsers::ALL_CODES;
use super::key::client_key;
use super::model::MUpload;
use super::{tracing, Sim};

const CLIENT_NAMES: [&[u8]; 6] = [b"alice", b"bob", b"carol", b"", b"ctl\x01", b"\xff\xfe"];
/// File names as the generator sends them: the third is stored as `d/c.txt`
/// and confirmed under that name (a 1029 carries the normalized path).
const FILE_NAMES: [&[u8]; 8] =
    [b"a.bin", b"b.bin", b"C:\\d\\c.txt", b"../x", b"", b"a/b", b"x\x01y", b"..\\x"];

/// How the fake client cuts its current upload (the generator's plan).
#[derive(Debug, Clone)]
pub(super) struct Plan {
    field: NameField,
    total: u16,
    next: u16,
    /// 0: content_size = packet length; 1: = whole ciphertext (sometimes
    /// with an empty last packet); 2: every packet a complete stream
    /// (sometimes followed by an empty chunk n+1 of n, `trailer`).
    convention: u8,
    trailer: bool,
    orig: u32,
    whole: u64,
    packet: u64,
    sent: u64,
}

impl Sim<'_> {
    /// One operation, chosen by the input's selector byte.
    pub(super) fn step(&mut self) {
        let op = self.input.u8();
        let s = usize::from(op >> 7);
        trace!("op {} on slot {s}", op & 0x7f);
        match op & 0x7f {
            0..=47 => self.natural(s),
            48..=71 => {
                let code = ALL_CODES[usize::from(self.input.u8() % 7)];
                self.chosen_frame(s, code);
            }
            72..=85 => {
                let n = usize::from(self.input.u8() % 4) + 1;
                self.deliver(n);
            }
            86..=90 => self.deliver(usize::MAX),
            91..=95 => {
                let n = usize::from(self.input.u8() % 48);
                let bytes = self.input.bytes(n).to_vec();
                self.send_bytes(s, &bytes, false);
            }
            96..=99 => {
                let h = RequestHeader {
                    client_id: self.pick_id(s),
                    version: if self.input.u8().is_multiple_of(4) { self.input.u8() } else { 3 },
                    code: 1024 + u16::from(self.input.u8() % 10),
                    payload_size: match self.input.u8() % 4 {
                        0 => self.input.u32(),
                        1 => 255,
                        2 => u32::from(self.input.u16()),
                        _ => 266,
                    },
                };
                self.send_bytes(s, &h.encode(), false);
            }
            100..=104 => self.close(s),
            105..=107 => {
                let future = self.input.u8().is_multiple_of(2);
                self.purge(s, future);
            }
            _ => self.deliver(1),
        }
    }

    /// What a well-behaved client of this connection would send next.
    fn natural(&mut self, s: usize) {
        let p = self.input.u8();
        if p & 1 == 0 {
            // A client waiting for its reply before sending more.
            self.deliver(usize::MAX);
        }
        let m = &self.slots[s].model;
        let has_session = m.session.is_some();
        let registered = m.registered;
        let staged = m.staged.iter().find(|f| !f.retried).map(|f| f.name.clone());
        if !has_session {
            match registered {
                None if p & 6 == 6 => self.reconnect_frame(s),
                None => self.register_frame(s, (p >> 3) % 3),
                Some(id) => self.key_frame(s, id, 0),
            }
        } else if let (Some(name), 0..=2) = (staged, (p >> 1) % 8) {
            let code = match p >> 5 {
                0..=5 => Code::CrcOk,
                6 => Code::CrcRetry,
                _ => Code::CrcAbort,
            };
            let id = self.session_id(s);
            let field = NameField::from_name(name.as_bytes()).expect("a staged name fits its field");
            self.frame(s, id, code, &field.0, false);
        } else {
            self.packet(s, p >> 3);
        }
    }

    fn session_id(&self, s: usize) -> ClientId {
        self.slots[s].model.session.map(|(id, _)| id).unwrap_or_default()
    }

    fn pick_id(&mut self, s: usize) -> ClientId {
        let m = &self.slots[s].model;
        match self.input.u8() % 8 {
            0..=3 => m.session.map(|(id, _)| id).or(m.registered).unwrap_or_default(),
            4 => self.slots[1 - s].model.session.map(|(id, _)| id).unwrap_or_default(),
            5 => {
                let i = usize::from(self.input.u8());
                self.order.get(i % self.order.len().max(1)).copied().unwrap_or_default()
            }
            6 => [0; 16],
            _ => {
                let mut id = [0u8; 16];
                let b = self.input.bytes(16);
                id[..b.len()].copy_from_slice(b);
                id
            }
        }
    }

    fn client_name_field(&mut self, id: &ClientId) -> NameField {
        let sel = self.input.u8();
        let name: Vec<u8> = match (self.clients.get(id), sel % 8) {
            (Some(c), 0..=5) => c.name.as_bytes().to_vec(),
            (_, 6) => vec![b'n'; 254],
            _ => CLIENT_NAMES[usize::from(sel >> 3) % CLIENT_NAMES.len()].to_vec(),
        };
        NameField::from_name(&name).unwrap_or(NameField([b'x'; NAME_FIELD_LEN]))
    }

    fn register_frame(&mut self, s: usize, which: u8) {
        let name = NameField::from_name(CLIENT_NAMES[usize::from(which)]).expect("fits");
        self.frame(s, [0; 16], Code::Register, &name.0, false);
    }

    fn reconnect_frame(&mut self, s: usize) {
        let ids: Vec<ClientId> =
            self.order.iter().filter(|id| self.clients[*id].key.is_some()).copied().collect();
        let i = usize::from(self.input.u8());
        let id = ids.get(i % ids.len().max(1)).copied().unwrap_or_default();
        let name = self.client_name_field(&id);
        self.frame(s, id, Code::Reconnect, &name.0, false);
    }

    fn key_frame(&mut self, s: usize, id: ClientId, variant: u8) {
        let name = self.client_name_field(&id);
        let der = &client_key().der;
        let mut field = der.clone();
        match variant % 6 {
            0..=2 => {}
            3 => field.extend_from_slice(&[0; 40]),
            4 => {
                let at = usize::from(self.input.u8()) % field.len();
                field[at] ^= 1 << (self.input.u8() % 8);
            }
            _ => {
                let n = 160 + usize::from(self.input.u8());
                field = self.input.bytes(n).to_vec();
                field.resize(n, 0x30);
            }
        }
        self.frame(s, id, Code::PublicKey, &[&name.0[..], &field].concat(), false);
    }

    /// One frame of `code` with fields chosen by the input.
    fn chosen_frame(&mut self, s: usize, code: Code) {
        let id = self.pick_id(s);
        match code {
            Code::Register => {
                let which = self.input.u8() % CLIENT_NAMES.len() as u8;
                self.frame(
                    s,
                    id,
                    code,
                    &NameField::from_name(CLIENT_NAMES[usize::from(which)]).expect("fits").0,
                    false,
                );
            }
            Code::PublicKey => {
                let v = self.input.u8();
                self.key_frame(s, id, v);
            }
            Code::Reconnect => {
                let name = self.client_name_field(&id);
                self.frame(s, id, code, &name.0, false);
            }
            Code::FilePacket => {
                let v = self.input.u8();
                self.packet(s, v);
            }
            _ => {
                let sel = self.input.u8();
                let m = &self.slots[s].model;
                let name: Vec<u8> =
                    match (sel % 4, m.staged.get(usize::from(sel >> 2) % m.staged.len().max(1))) {
                        (0..=2, Some(f)) => f.name.as_bytes().to_vec(),
                        _ => FILE_NAMES[usize::from(sel >> 2) % FILE_NAMES.len()].to_vec(),
                    };
                let field = NameField::from_name(&name).expect("fits");
                self.frame(s, id, code, &field.0, false);
            }
        }
    }

    /// A file packet: the next one of the plan (started when there is none),
    /// or one with fields chosen by the input.
    fn packet(&mut self, s: usize, v: u8) {
        let id = match v % 16 {
            15 => self.pick_id(s),
            _ => self.session_id(s),
        };
        if v % 16 >= 13 {
            return self.wild_packet(s, id);
        }
        if self.slots[s].plan.is_none() || v % 16 == 12 {
            self.new_plan(s);
        }
        let Some(plan) = self.slots[s].plan.as_mut() else { return };
        if plan.next > plan.total {
            // The per-chunk client's empty chunk, numbered n+1 "of n".
            let ph = PacketHeader {
                content_size: 16,
                orig_file_size: 0,
                packet_number: plan.next,
                total_packets: plan.total,
                file_name: plan.field.clone(),
            };
            self.slots[s].plan = None;
            let mut payload = Vec::new();
            ph.encode(&mut payload);
            payload.resize(PACKET_HEADER_LEN + 16, 0xA5);
            return self.frame(s, id, Code::FilePacket, &payload, false);
        }
        let k = plan.next;
        let (content_len, content_size, orig) = match plan.convention {
            2 => {
                // Every packet is a complete stream of its own size; `sent`
                // counts plaintext here, which must stay within --max-file-size.
                let room = self.max_file_size.saturating_sub(plan.sent);
                let orig = u64::from(self.input.u8() % 40).min(room);
                plan.sent += orig;
                let whole = ciphertext_len(orig);
                (whole, whole as u32, orig as u32)
            }
            c => {
                let len = plan.packet.min(plan.whole - plan.sent);
                let size = if c == 0 { len } else { plan.whole };
                (len, size as u32, plan.orig)
            }
        };
        if plan.convention != 2 {
            plan.sent += content_len;
        }
        plan.next += 1;
        let ph = PacketHeader {
            content_size,
            orig_file_size: orig,
            packet_number: k,
            total_packets: plan.total,
            file_name: plan.field.clone(),
        };
        if plan.next > plan.total && !plan.trailer {
            self.slots[s].plan = None;
        }
        let mut payload = Vec::new();
        ph.encode(&mut payload);
        payload.resize(PACKET_HEADER_LEN + content_len as usize, 0xA5);
        self.frame(s, id, Code::FilePacket, &payload, true);
    }

    fn new_plan(&mut self, s: usize) {
        let sel = self.input.u8();
        // Mostly good names; now and then a bad one ("../x", "", "a/b").
        let i = match sel % 16 {
            n @ 13..=15 => usize::from(n) - 10,
            n => usize::from(n % 3),
        };
        let field = NameField::from_name(FILE_NAMES[i]).expect("fits");
        let room = self.max_payload - PACKET_HEADER_LEN as u64;
        let convention = (sel >> 4) % 3;
        let orig = u32::from(self.input.u16() % 9000);
        let whole = ciphertext_len(u64::from(orig));
        let packet = 1 + u64::from(self.input.u16()) % room;
        let tail = sel & 0x80 != 0 && convention == 1;
        let total = match convention {
            2 => 1 + u16::from(self.input.u8() % 5),
            _ => whole.div_ceil(packet) as u16 + u16::from(tail),
        };
        let trailer = sel & 0x80 != 0 && convention == 2;
        self.slots[s].plan =
            Some(Plan { field, total, next: 1, convention, trailer, orig, whole, packet, sent: 0 });
    }

    /// A packet with fields chosen by the input (any of them may break the rules).
    fn wild_packet(&mut self, s: usize, id: ClientId) {
        let m = &self.slots[s].model;
        let (field, next, total) = match &m.upload {
            MUpload::Receiving { field, next, total, .. } => (field.clone(), *next, *total),
            MUpload::Ended { field, next, total, .. } => (field.clone(), *next, *total),
            _ => (NameField::from_name(b"a.bin").expect("fits"), 1, 1),
        };
        let sel = self.input.u8();
        let small = self.input.u16();
        let packet_number = match sel % 4 {
            0 | 1 => next,
            2 => 1,
            _ => small % 6,
        };
        let total_packets = match (sel >> 2) % 4 {
            0 | 1 => total,
            2 => packet_number.max(1),
            _ => small % 5,
        };
        let field = if (sel >> 4).is_multiple_of(4) {
            NameField::from_name(FILE_NAMES[usize::from(small) % FILE_NAMES.len()]).expect("fits")
        } else {
            field
        };
        let orig = u32::from(self.input.u8()) * 3;
        let len =
            usize::from(self.input.u8() % 64).min((self.max_payload - PACKET_HEADER_LEN as u64) as usize);
        let content_size = match sel >> 6 {
            0 => len as u32,
            1 => ciphertext_len(u64::from(orig)) as u32,
            2 => 0,
            _ => self.input.u32(),
        };
        let ph = PacketHeader {
            content_size,
            orig_file_size: orig,
            packet_number,
            total_packets,
            file_name: field,
        };
        let mut payload = Vec::new();
        ph.encode(&mut payload);
        payload.resize(PACKET_HEADER_LEN + len, 0x5A);
        self.frame(s, id, Code::FilePacket, &payload, false);
    }

    fn frame(&mut self, s: usize, id: ClientId, code: Code, payload: &[u8], conforming: bool) {
        let h = RequestHeader {
            client_id: id,
            version: 3,
            code: code.as_u16(),
            payload_size: payload.len() as u32,
        };
        let mut bytes = h.encode().to_vec();
        bytes.extend_from_slice(payload);
        self.send_bytes(s, &bytes, conforming);
    }

    /// The peer sends bytes; the loop reads what it may.
    fn send_bytes(&mut self, s: usize, bytes: &[u8], conforming: bool) {
        let slot = &mut self.slots[s];
        let start = slot.inbuf.len();
        slot.inbuf.extend_from_slice(bytes);
        if conforming {
            slot.conforming.insert((start, slot.inbuf.len()));
        }
        self.pump(s);
    }
}
