//! The packet thread ([`Packets`]) and its path: a packet's content
//! decrypted, checksummed and appended to its upload's temp file in
//! cache-sized pieces (through its `TempSink`, `sink.rs`: past 8 MiB, written
//! direct by the writer thread this thread starts), with write-behind for the
//! part that goes through the page cache; the upload's
//! stream state ([`PartFile`]); the hand-over of a received upload to the
//! committing worker ([`Staged`]).

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;

use super::fault::{self, Point};
use super::sink::{run_writer, Chunk, DirectWrites, TempSink};
use super::storage::{TempFiles, Unnamed, UnnamedSlot};
use super::{Completion, Input, Job, PacketJob, PacketOutcome, StartUpload, UploadError, UploadId, Wake};
use crate::budget::Budget;
use crate::crypto::{Cksum, StreamDecryptor, AES_KEY_LEN};
use crate::metrics::Metrics;
use crate::protocol::{id_hex, ClientId};

/// An upload being received: its temp file (`tmp/<n>.part`, or one without
/// a name), the decryptor and cksum of its stream, until its last packet or
/// its discard.
struct PartFile {
    client: ClientId,
    key: SessionKey,
    sink: TempSink,
    /// The temp file has no name: its place among the few that may not.
    unnamed: Option<UnnamedSlot>,
    dec: Option<StreamDecryptor>,
    cksum: Cksum,
    ciphertext: u64,
    segment_start: u64,
    /// Bytes of the temp file before this offset have been handed to writeback,
    writeback_from: u64,
    /// ... and before this one written out and dropped from the page cache.
    dropped_to: u64,
    /// Failed syncs of the data directory before its first packet (see [`Staged`]).
    failed_syncs: u64,
}

/// A received upload handed to the committing worker: its temp file waits
/// in `tmp/` for the 1029 (or a discard), or comes along, without a name.
pub(crate) struct Staged {
    pub(super) upload: UploadId,
    pub(super) client: ClientId,
    pub(super) cksum: u32,
    pub(super) size: u64,
    /// The temp file without a name (None: `tmp/<upload>.part`).
    pub(super) unnamed: Option<Unnamed>,
    /// How many syncs of the data directory had failed when its first
    /// packet came: a sync that fails after that may have been the one
    /// whose writeback lost this file's data, and the error is reported to
    /// that sync only (see `Worker::take_received`).
    pub(super) failed_syncs: u64,
}

/// Bytes of a packet processed at a time (decrypt, cksum, write): fits L2.
const CACHE_PIECE: usize = 128 * 1024;

/// How much an upload writes between two writeback kicks.
const WRITEBACK_STEP: u64 = 4 << 20;

/// How far behind the end of the file a range must be before the packet
/// thread waits for its writeback: three steps, so that the range has had
/// the time of writing two more steps to reach the disk, and the wait
/// rarely waits (it used to be the step just before, and the packet thread
/// sat in that wait for about a quarter of a large upload).
const WRITEBACK_LAG: u64 = 3 * WRITEBACK_STEP;

/// Write-behind for a large upload, every WRITEBACK_STEP bytes: start
/// writeback of the range just written, then wait for the ranges more than
/// WRITEBACK_LAG behind the end and drop them from the page cache. Dirty
/// pages stay bounded (the lag and a step: 16 MiB), their pages are recycled
/// instead of the page cache growing into new memory (costly in a VM, scarce
/// on a small box), and the sync at commit time has at most that left to
/// flush. A writeback error is reported here (and consumed: a later fsync
/// may not see it again), so it fails the upload; only "not supported" is
/// ignored. Returns the new end of the dropped range.
fn write_behind(f: &File, dropped_to: u64, kicked_from: u64, written: u64) -> io::Result<u64> {
    use std::os::fd::AsRawFd;
    let fd = f.as_raw_fd();
    fault::check(Point::WriteBehind, "")?;
    let unsupported = |e: &io::Error| {
        matches!(e.raw_os_error(), Some(libc::ENOSYS | libc::EINVAL | libc::ESPIPE | libc::EOPNOTSUPP))
    };
    let range = |from: u64, len: u64, flags| {
        // SAFETY: a plain syscall on a descriptor owned by `f`.
        if unsafe { libc::sync_file_range(fd, from as i64, len as i64, flags) } == 0 {
            return Ok(true);
        }
        let e = io::Error::last_os_error();
        if unsupported(&e) {
            log::debug!("worker: sync_file_range: {e}");
            return Ok(false);
        }
        Err(e)
    };
    if !range(kicked_from, written - kicked_from, libc::SYNC_FILE_RANGE_WRITE)? {
        return Ok(dropped_to);
    }
    // Only ranges already kicked (before `kicked_from`) are waited for.
    let wait_to = kicked_from.min(written.saturating_sub(WRITEBACK_LAG));
    if wait_to > dropped_to {
        let all = libc::SYNC_FILE_RANGE_WAIT_BEFORE
            | libc::SYNC_FILE_RANGE_WRITE
            | libc::SYNC_FILE_RANGE_WAIT_AFTER;
        let len = wait_to - dropped_to;
        if range(dropped_to, len, all)? {
            // SAFETY: advice only, on a descriptor owned by `f`.
            unsafe { libc::posix_fadvise(fd, dropped_to as i64, len as i64, libc::POSIX_FADV_DONTNEED) };
        }
        return Ok(wait_to);
    }
    Ok(dropped_to)
}

/// A session key held by the worker; zeroed when dropped so that it does
/// not linger in freed memory.
struct SessionKey([u8; AES_KEY_LEN]);

impl Drop for SessionKey {
    fn drop(&mut self) {
        self.0 = [0; AES_KEY_LEN];
    }
}

/// The packet thread: every upload being received, from its packet 1 to its
/// last packet. It decrypts, checksums and appends packets to their temp
/// files and answers each with a [`Completion::Packet`]; once an upload is
/// received it hands the staged temp file to the committing worker
/// ([`Input::Staged`]) before it tells the loop, so the loop's 1029 for it
/// always finds it there (one channel, in causal order). It takes the
/// loop's discards and its shutdown too, and passes on what concerns the
/// committing worker in the same order. It never waits for a sync or the
/// database: a packet is answered while a batch is being made durable.
pub(super) struct Packets {
    temps: TempFiles,
    uploads: HashMap<UploadId, PartFile>,
    to_commit: Sender<Input>,
    done: Sender<Completion>,
    waker: Arc<dyn Wake>,
    metrics: Arc<Metrics>,
    /// The committing worker's count of failed syncs (see [`Staged`]).
    failed_syncs: Arc<AtomicU64>,
    /// The writer thread's queue, for uploads writing direct (see `sink.rs`).
    direct: DirectWrites,
    /// Its other end, until `run` starts the writer thread.
    chunks: Option<Receiver<Chunk>>,
}

impl Packets {
    pub(super) fn new(
        temps: TempFiles,
        to_commit: Sender<Input>,
        done: Sender<Completion>,
        waker: Arc<dyn Wake>,
        metrics: Arc<Metrics>,
        failed_syncs: Arc<AtomicU64>,
        budget: Budget,
    ) -> Packets {
        let (queue, chunks) = std::sync::mpsc::channel();
        Packets {
            temps,
            uploads: HashMap::new(),
            to_commit,
            done,
            waker,
            metrics,
            failed_syncs,
            direct: DirectWrites::new(queue, budget),
            chunks: Some(chunks),
        }
    }

    /// Serve the loop's packet jobs until its `Shutdown` or until it hangs up;
    /// then tell the committing worker to stop too.
    pub(super) fn run(mut self, jobs: Receiver<Job>) {
        let chunks = self.chunks.take();
        std::thread::scope(|s| {
            let writer = std::thread::Builder::new().name("backupd-writer".into());
            if let Some(Err(e)) = chunks.map(|c| writer.spawn_scoped(s, move || run_writer(c))) {
                log::warn!(
                    "worker: cannot start the writer thread ({e}); large uploads go through the page cache"
                );
                self.direct.disable();
            }
            // Returns with `self` dropped: the writer thread's queue closes.
            self.serve(jobs);
        });
    }

    fn serve(mut self, jobs: Receiver<Job>) {
        while let Ok(job) = jobs.recv() {
            self.metrics.worker_queue.add(-1);
            match job {
                // Answered at once, each: the loop's pipeline of a large upload
                // (a few pieces per connection) refills while the next is decrypted.
                Job::Packet(p) => {
                    let answer = self.packet(p);
                    let _ = self.done.send(answer);
                    self.waker.wake();
                }
                Job::Discard { upload, failed } => self.discard(upload, failed),
                Job::Shutdown => break,
                // The loop sends these to the committing worker (see `Jobs::send`).
                other => self.forward(Input::Job(other)),
            }
        }
        // Anything still being received was never confirmed: remove it.
        for (upload, u) in std::mem::take(&mut self.uploads) {
            let _ = self.remove_temp(upload, u);
        }
        self.forward(Input::Stop);
        log::debug!("worker: packet thread stopped");
    }

    /// An upload dropped before it was received: its named temp file is
    /// removed; one without a name goes with its descriptor.
    fn remove_temp(&self, upload: UploadId, u: PartFile) -> io::Result<()> {
        match u.unnamed {
            Some(_) => Ok(()),
            None => self.temps.remove(upload),
        }
    }

    fn forward(&self, i: Input) {
        let _ = self.to_commit.send(i);
    }

    /// Drop an upload: here while it is being received, else at the
    /// committing worker (staged, or already gone).
    fn discard(&mut self, upload: UploadId, failed: Option<(ClientId, String)>) {
        if let Some(u) = self.uploads.remove(&upload) {
            if let Err(e) = self.remove_temp(upload, u) {
                log::warn!("worker: cannot remove {}: {e}", self.temps.path(upload).display());
            }
        } else {
            self.forward(Input::Discard(upload));
        }
        if let Some((id, _)) = failed {
            log::debug!("worker: upload {upload} of client {} aborted; nothing recorded", id_hex(&id));
        }
    }

    /// Decrypt, checksum and append one packet.
    fn packet(&mut self, mut p: PacketJob) -> Completion {
        let (conn, upload, last) = (p.conn, p.upload, p.last);
        let outcome = match self.packet_inner(&mut p) {
            Ok(o) => o,
            Err(reason) => {
                if let Some(u) = self.uploads.remove(&upload) {
                    let _ = self.remove_temp(upload, u);
                }
                PacketOutcome::Failed(reason)
            }
        };
        Completion::Packet { conn, upload, buffer: p.content, last, outcome }
    }

    fn packet_inner(&mut self, p: &mut PacketJob) -> Result<PacketOutcome, UploadError> {
        if let Some(start) = p.start.take() {
            // All of it in this piece: a small upload.
            self.open_upload(p.upload, start, p.last)?;
        }
        let Some(u) = self.uploads.get_mut(&p.upload) else {
            return Ok(PacketOutcome::Ignored);
        };
        u.append(p, &self.direct)?;
        u.kick_writeback()?;
        if !p.last {
            return Ok(PacketOutcome::Accepted);
        }
        if u.dec.is_some() {
            return Err(UploadError::EndedInsideStream);
        }
        u.sink.finish().map_err(UploadError::WriteTemp)?;
        // The temp file is made durable at commit time, together with the
        // rest of its batch: 1603 promises nothing about durability, 1604 does.
        let plain_len = u.cksum.len();
        let cksum = std::mem::take(&mut u.cksum).finalize();
        let ciphertext_len = u.ciphertext;
        let (client, failed_syncs) = (u.client, u.failed_syncs);
        // The key is zeroed here; a named temp file is closed (a staged file
        // holds no descriptor), one without a name goes along.
        let unnamed = match self.uploads.remove(&p.upload) {
            Some(PartFile { sink, unnamed: Some(slot), .. }) => Some((
                sink.into_file().ok_or(UploadError::WriteTemp(io::Error::other("temp file still in use")))?,
                slot,
            )),
            _ => None,
        };
        self.forward(Input::Staged(Staged {
            upload: p.upload,
            client,
            cksum,
            size: plain_len,
            unnamed,
            failed_syncs,
        }));
        Ok(PacketOutcome::Received { cksum, ciphertext_len, plain_len })
    }

    /// A packet 1: the upload's temp file (without a name if `small` and
    /// one is available) and stream state.
    fn open_upload(&mut self, upload: UploadId, start: StartUpload, small: bool) -> Result<(), UploadError> {
        let (file, unnamed) = match small.then(|| self.temps.create_unnamed()).flatten() {
            Some((file, slot)) => (file, Some(slot)),
            None => (self.temps.create(upload).map_err(UploadError::CreateTemp)?, None),
        };
        self.uploads.insert(
            upload,
            PartFile {
                client: start.client,
                key: SessionKey(start.key),
                sink: TempSink::new(file),
                unnamed,
                dec: None,
                cksum: Cksum::new(),
                ciphertext: 0,
                segment_start: 0,
                writeback_from: 0,
                dropped_to: 0,
                // Read before anything is written to the file.
                failed_syncs: self.failed_syncs.load(Ordering::Acquire),
            },
        );
        Ok(())
    }
}

impl PartFile {
    /// Decrypt, checksum and append a packet's content (and finish its CBC
    /// stream when the packet ends one).
    fn append(&mut self, p: &mut PacketJob, direct: &DirectWrites) -> Result<(), UploadError> {
        let u = self;
        if p.new_segment {
            u.dec = Some(StreamDecryptor::new(&u.key.0));
            u.segment_start = u.cksum.len();
        }
        let content = &mut p.content.bytes[..];
        u.ciphertext += content.len() as u64;
        // Out of `u` while the closure below borrows its sink and cksum.
        let mut dec = u.dec.take();
        let PartFile { sink: out, cksum, .. } = u;
        let mut err: Option<io::Error> = None;
        let mut emit = |pt: &[u8]| {
            if err.is_none() {
                cksum.update(pt);
                if let Err(e) = fault::check(Point::Write, "").and_then(|_| out.write(pt, direct)) {
                    err = Some(e);
                }
            }
        };
        match dec.as_mut() {
            // In cache-sized pieces: each is decrypted, checksummed and copied
            // out while it is still in L2, instead of three passes over a
            // whole packet through main memory.
            Some(d) => {
                for piece in content.chunks_mut(CACHE_PIECE) {
                    d.update(piece, &mut emit);
                }
            }
            // The empty last packet of convention 2 follows the completed stream.
            None if content.is_empty() => {}
            None => return Err(UploadError::OutsideStream),
        }
        let finished = match p.end_segment {
            Some(expected) => {
                let d = dec.take().ok_or(UploadError::NoStreamToFinish)?;
                Some((d.finish(&mut emit), expected))
            }
            None => None,
        };
        // A failed write comes first: the bytes after it were not counted,
        // and a full disk is not a forgery (a decryption failure costs the
        // client one of its few tokens, see `Core::decryption_failed`).
        if let Some(e) = err {
            return Err(UploadError::WriteTemp(e));
        }
        if let Some((done, expected)) = finished {
            done.map_err(|_| UploadError::Decryption)?;
            if u.cksum.len() - u.segment_start != expected {
                return Err(UploadError::Decryption);
            }
        }
        u.dec = dec;
        Ok(())
    }

    /// Write-behind (see `write_behind`).
    fn kick_writeback(&mut self) -> Result<(), UploadError> {
        let u = self;
        let written = u.cksum.len();
        if u.sink.cached() && written - u.writeback_from >= WRITEBACK_STEP {
            u.dropped_to = write_behind(u.sink.file(), u.dropped_to, u.writeback_from, written)
                .map_err(UploadError::Writeback)?;
            u.writeback_from = written;
        }
        Ok(())
    }
}
