//! The narrow API through which the fuzz harness (fuzz/harness/, also run
//! by tests/fuzz_regressions.rs) and tests/properties.rs drive the state
//! machine without a socket. Built only with the cargo feature `fuzzing`
//! (fuzz/Cargo.toml enables it, and so does the crate's dev-dependency on
//! itself for its tests); the server's own fields stay private.
//!
//! What it offers: [`Core`] with a `Vec` for a job sink, each connection's
//! [`Protocol`] and the calls the loop makes on them (`check_header`,
//! `handle_frame`, `content_piece`, `on_completion`, `closed`,
//! `purge_stale`), the packet arithmetic ([`plan_packet`] on a
//! [`Receiving`]), and read-only views of what the harness checks.

pub use super::connection::Frame;
pub use super::core::{Core, JobSink, Registry};
pub use super::machine::Flow;
pub use super::sequence::{plan_packet, wraps_to_one, PacketStep};
pub use super::state::{Incoming, Protocol, Receiving};

use super::core::ClientEntry;
use super::state::Upload;

use crate::budget::Budget;
use crate::protocol::{ClientId, Code, NameField, RequestHeader};
use crate::worker::{Job, UploadId};

impl Frame {
    /// The checked header the frame was read after.
    pub fn header(&self) -> &RequestHeader {
        &self.header
    }

    pub fn code(&self) -> Code {
        self.code
    }

    /// The payload read so far.
    pub fn payload(&self) -> &[u8] {
        &self.payload[..self.filled]
    }

    /// Copy as many of `bytes` as the payload still needs; how many.
    pub fn fill(&mut self, bytes: &[u8]) -> usize {
        let n = bytes.len().min(self.payload.len() - self.filled);
        self.payload[self.filled..self.filled + n].copy_from_slice(&bytes[..n]);
        self.filled += n;
        n
    }
}

impl Protocol {
    /// The encoded replies queued so far, taken.
    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.out)
    }

    /// What the file packet just handled decided about its content (not taken).
    pub fn incoming(&self) -> Option<Incoming> {
        self.incoming
    }

    /// The upload whose content goes to the worker: in progress, or with
    /// its last packet there.
    pub fn current_upload(&self) -> Option<UploadId> {
        match &self.upload {
            Upload::Receiving(r) => Some(r.upload),
            Upload::Finishing(f) => Some(f.upload),
            Upload::Idle | Upload::Ended(_) => None,
        }
    }

    /// The session's client id and key.
    pub fn session(&self) -> Option<(ClientId, [u8; 32])> {
        self.session.as_ref().map(|s| (s.id, s.key))
    }

    /// Content pieces at the worker.
    pub fn packets_in_flight(&self) -> usize {
        self.packets_in_flight
    }
}

impl Registry {
    /// A client on record, durable (as loaded at start-up), with its key if any.
    pub fn insert_client(&mut self, id: ClientId, name: &str, key: Option<rsa::RsaPublicKey>) {
        self.insert(id, ClientEntry::new(name, key, Default::default()));
    }
}

impl<J: JobSink> Core<J> {
    /// The memory budget.
    pub fn budget(&self) -> &Budget {
        &self.budget
    }
}

impl Core<Vec<Job>> {
    /// The jobs sent since the last call, taken.
    pub fn take_jobs(&mut self) -> Vec<Job> {
        std::mem::take(&mut self.jobs)
    }
}

impl Receiving {
    /// The number the next packet must carry.
    pub fn next(&self) -> u16 {
        self.next
    }

    pub fn total(&self) -> u16 {
        self.total
    }

    pub fn name_field(&self) -> &NameField {
        &self.name_field
    }

    /// Packets accepted so far.
    pub fn packets(&self) -> u64 {
        self.packets
    }

    pub fn last_stream_len(&self) -> u64 {
        self.last_stream_len
    }

    pub fn plain_total(&self) -> u64 {
        self.plain_total
    }

    /// The open CBC stream: its orig_file_size, whole ciphertext length and
    /// the ciphertext bytes received of it.
    pub fn open_stream(&self) -> Option<(u32, u64, u64)> {
        self.segment.map(|s| (s.orig, s.whole, s.whole - s.remaining))
    }

    /// As if `skip` one-byte packets of the open stream had been accepted
    /// (the fuzz target `packet_sequence` wraps the u16 counters this way).
    /// False, and nothing changed, unless the stream still expects more than
    /// `skip` bytes.
    pub fn fast_forward(&mut self, skip: u64) -> bool {
        let Some(seg) = self.segment.as_mut().filter(|s| s.remaining > skip) else { return false };
        seg.remaining -= skip;
        self.next = self.next.wrapping_add(skip as u16);
        self.packets += skip;
        self.multi_packet_stream = true;
        true
    }
}
