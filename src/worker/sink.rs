//! How an upload's bytes reach its temp file ([`TempSink`]): through the
//! page cache for its first [`DIRECT_FROM`] bytes (with write-behind, see
//! `packets.rs`), then, for a large upload, straight to the disk with
//! `O_DIRECT` in aligned chunks of [`CHUNK`] bytes, so that a large upload
//! costs no copy into the page cache, no page allocation and no writeback
//! work (docs/PERFORMANCE.md, issue 14, "7." and "9."). The packet thread
//! fills one chunk buffer ([`ChunkBuf`]) while the writer thread
//! ([`run_writer`]) writes the ones before (up to two queued, so that it
//! never waits for the next). Bounded: at most [`MAX_DIRECT`] uploads write
//! direct at once, each with [`BUFFERS`] buffers paid for by the memory budget
//! out of its open part only (`Budget::try_grant_open`: never the share kept
//! for each connection's piece, so direct buffers cannot starve the pieces,
//! their own upload's included); the
//! others, and every upload on a filesystem that refuses `O_DIRECT`, stay on
//! the page-cache path to their end.
//!
//! Durability is unchanged: a direct write is on the device (maybe in its
//! volatile cache) when it returns, and the file is made durable at commit
//! time exactly as before (the batch's syncfs, or the file's fdatasync,
//! both flush the device's cache and write the file's metadata).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;

use super::fault::{self, Point};
use crate::budget::{Budget, Grant};

/// Bytes of an upload written through the page cache before it goes
/// direct: small files never go direct, and the offset where a large one
/// does is aligned.
pub(super) const DIRECT_FROM: u64 = 8 << 20;

/// Bytes of one direct write.
const CHUNK: usize = 1 << 20;

/// Alignment of a direct write's buffer, offset and length: the largest
/// logical block size of the disks we meet.
const ALIGN: usize = 4096;

/// Uploads writing direct at once. Each holds [`BUFFERS`] chunk buffers,
/// paid for by the memory budget ([`GRANT`]); four keep the budget they can
/// hold (stalled, say) to 12 MiB of the default 64.
const MAX_DIRECT: usize = 4;

/// Chunk buffers of an upload writing direct: one being filled, up to two
/// at the writer thread (queued behind the one being written), so that the
/// writer always has the next chunk when a write returns.
const BUFFERS: usize = 3;

/// What an upload writing direct takes from the memory budget.
const GRANT: usize = BUFFERS * (CHUNK + ALIGN);

/// A chunk buffer, aligned for `O_DIRECT`.
pub(super) struct ChunkBuf {
    v: Vec<u8>,
    off: usize,
}

impl ChunkBuf {
    fn new() -> ChunkBuf {
        let v = vec![0u8; CHUNK + ALIGN];
        // (Not `align_offset`, which may decline to compute it.)
        let off = (ALIGN - v.as_ptr() as usize % ALIGN) % ALIGN;
        ChunkBuf { v, off }
    }

    fn bytes(&mut self) -> &mut [u8] {
        &mut self.v[self.off..self.off + CHUNK]
    }
}

/// One of the places of uploads writing direct ([`DirectWrites::places`]),
/// held while the upload does (it bounds their buffers: [`BUFFERS`] each).
struct Slot(Arc<AtomicUsize>);

impl Slot {
    fn take(live: &Arc<AtomicUsize>, places: usize) -> Option<Slot> {
        if live.fetch_add(1, Ordering::AcqRel) >= places {
            live.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Slot(live.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A full chunk for the writer thread, and where to answer.
pub(super) struct Chunk {
    file: Arc<File>,
    buf: ChunkBuf,
    at: u64,
    done: Sender<Written>,
}

/// A chunk written (or not), its buffer back for the next one.
struct Written {
    buf: ChunkBuf,
    result: io::Result<bool>,
}

/// The writer thread: writes full chunks direct, in the order sent, while
/// the packet thread decrypts the next ones. It stops when the packet
/// thread drops its sender.
pub(super) fn run_writer(chunks: Receiver<Chunk>) {
    while let Ok(Chunk { file, mut buf, at, done }) = chunks.recv() {
        let result = direct_write(&file, &buf.bytes()[..], at);
        // Closed here first: once the packet thread has the answer, no
        // descriptor of a received upload's file is left open.
        drop(file);
        // The upload may be gone (discarded): nothing waits then.
        let _ = done.send(Written { buf, result });
    }
}

/// What the packet thread needs to write direct: the writer thread's
/// queue and the count of uploads doing so.
pub(super) struct DirectWrites {
    chunks: Sender<Chunk>,
    live: Arc<AtomicUsize>,
    /// Uploads that may write direct at once: [`MAX_DIRECT`], or fewer when
    /// the budget's open part holds fewer [`GRANT`]s.
    places: usize,
    /// The memory budget, which pays for the chunk buffers.
    budget: Budget,
}

impl DirectWrites {
    pub(super) fn new(chunks: Sender<Chunk>, budget: Budget) -> DirectWrites {
        let places = MAX_DIRECT.min(budget.open() / GRANT);
        if places < MAX_DIRECT {
            log::info!(
                "worker: the memory budget leaves room for {places} upload(s) writing direct at once \
                 (of {MAX_DIRECT}; each takes {GRANT} bytes of the budget's first-come part)"
            );
        }
        DirectWrites { chunks, live: Arc::new(AtomicUsize::new(0)), places, budget }
    }

    /// No upload writes direct (every place taken for good).
    pub(super) fn disable(&self) {
        self.live.store(MAX_DIRECT << 16, Ordering::Release);
    }
}

/// An upload writing direct: the chunk being filled, the one being written.
struct Direct {
    _slot: Slot,
    _grant: Grant,
    buf: ChunkBuf,
    fill: usize,
    /// The offset of `buf[0]`.
    at: u64,
    /// Chunks at the writer thread: their answers come on `answers`, in
    /// the order sent.
    in_flight: usize,
    answers: Receiver<Written>,
    answer_to: Sender<Written>,
    spares: Vec<ChunkBuf>,
}

impl Direct {
    /// Wait for the oldest chunk at the writer thread; its buffer becomes a
    /// spare. Ok(false): the filesystem refused the direct write (the
    /// chunk was written through the page cache and `O_DIRECT` turned off).
    fn wait_one(&mut self) -> io::Result<bool> {
        let w = self.answers.recv().map_err(|_| io::Error::other("the writer thread stopped"))?;
        self.in_flight -= 1;
        self.spares.push(w.buf);
        w.result
    }

    /// Wait for every chunk at the writer thread (the later ones are
    /// written, through the page cache, even after a refusal). Ok(false)
    /// if any was refused.
    fn wait_all(&mut self) -> io::Result<bool> {
        let mut direct = true;
        while self.in_flight > 0 {
            direct &= self.wait_one()?;
        }
        Ok(direct)
    }
}

enum Mode {
    /// Through the page cache, until [`DIRECT_FROM`].
    Cached,
    /// Through the page cache to the end: no place was free, the
    /// filesystem refused `O_DIRECT`, or the upload is finished.
    CachedToEnd,
    Direct(Box<Direct>),
}

/// An upload's temp file and how its bytes reach it; every write is at an
/// explicit offset (the file's position is never used).
pub(super) struct TempSink {
    file: Arc<File>,
    written: u64,
    mode: Mode,
}

impl TempSink {
    pub(super) fn new(file: File) -> TempSink {
        TempSink { file: Arc::new(file), written: 0, mode: Mode::Cached }
    }

    /// The file, once no chunk of it is at the writer thread (after
    /// `finish`); None while one still is.
    pub(super) fn into_file(self) -> Option<File> {
        Arc::try_unwrap(self.file).ok()
    }

    pub(super) fn file(&self) -> &File {
        &self.file
    }

    /// Whether the bytes written so far went through the page cache (and
    /// so write-behind concerns them).
    pub(super) fn cached(&self) -> bool {
        !matches!(self.mode, Mode::Direct(_))
    }

    /// Append `data`.
    pub(super) fn write(&mut self, mut data: &[u8], direct: &DirectWrites) -> io::Result<()> {
        if matches!(self.mode, Mode::Cached) && self.written + data.len() as u64 > DIRECT_FROM {
            let head = (DIRECT_FROM - self.written) as usize;
            self.cached_write(&data[..head])?;
            data = &data[head..];
            self.mode = self.go_direct(direct);
        }
        let Mode::Direct(d) = &mut self.mode else {
            return self.cached_write(data);
        };
        let mut refused = false;
        while !data.is_empty() {
            let n = (CHUNK - d.fill).min(data.len());
            d.buf.bytes()[d.fill..d.fill + n].copy_from_slice(&data[..n]);
            d.fill += n;
            data = &data[n..];
            self.written += n as u64;
            if d.fill < CHUNK {
                continue;
            }
            if d.in_flight == BUFFERS - 1 && !d.wait_one()? {
                refused = true;
                break;
            }
            let next = d.spares.pop().unwrap_or_else(ChunkBuf::new);
            let full = std::mem::replace(&mut d.buf, next);
            let chunk = Chunk { file: self.file.clone(), buf: full, at: d.at, done: d.answer_to.clone() };
            direct.chunks.send(chunk).map_err(|_| io::Error::other("the writer thread stopped"))?;
            d.in_flight += 1;
            d.at += CHUNK as u64;
            d.fill = 0;
        }
        if refused {
            // Refused after all: this chunk and the rest through the page
            // cache, once the chunks still queued are written.
            if let Mode::Direct(mut d) = std::mem::replace(&mut self.mode, Mode::CachedToEnd) {
                d.wait_all()?;
                self.file.write_all_at(d.buf.bytes(), d.at)?;
            }
            return self.cached_write(data);
        }
        Ok(())
    }

    /// Write what is still buffered: the aligned part direct, the rest
    /// through the page cache. The upload's bytes are then all in the file.
    pub(super) fn finish(&mut self) -> io::Result<()> {
        let Mode::Direct(mut d) = std::mem::replace(&mut self.mode, Mode::CachedToEnd) else {
            return Ok(());
        };
        let mut done = 0;
        if d.wait_all()? {
            let aligned = d.fill / ALIGN * ALIGN;
            if aligned > 0 && direct_write(&self.file, &d.buf.bytes()[..aligned], d.at)? {
                done = aligned;
            }
            set_direct(&self.file, false)?;
        }
        self.file.write_all_at(&d.buf.bytes()[done..d.fill], d.at + done as u64)
    }

    fn cached_write(&mut self, data: &[u8]) -> io::Result<()> {
        self.file.write_all_at(data, self.written)?;
        self.written += data.len() as u64;
        Ok(())
    }

    /// At [`DIRECT_FROM`]: direct from here if a place is free and the
    /// filesystem takes `O_DIRECT`.
    fn go_direct(&self, direct: &DirectWrites) -> Mode {
        if direct.places == 0 {
            log::debug!("worker: no room in the memory budget to write direct; through the page cache");
            return Mode::CachedToEnd;
        }
        let Some(slot) = Slot::take(&direct.live, direct.places) else {
            log::debug!(
                "worker: {} uploads write direct already; this one goes on through the page cache",
                direct.places
            );
            return Mode::CachedToEnd;
        };
        let Some(grant) = direct.budget.try_grant_open(GRANT) else {
            log::debug!("worker: no room in the memory budget to write direct; through the page cache");
            return Mode::CachedToEnd;
        };
        if let Err(e) = set_direct(&self.file, true) {
            log::debug!("worker: no O_DIRECT for a temp file: {e}");
            return Mode::CachedToEnd;
        }
        let (answer_to, answers) = channel();
        Mode::Direct(Box::new(Direct {
            _slot: slot,
            _grant: grant,
            buf: ChunkBuf::new(),
            fill: 0,
            at: self.written,
            in_flight: 0,
            answers,
            answer_to,
            spares: Vec::with_capacity(BUFFERS - 1),
        }))
    }
}

/// Turn `O_DIRECT` on or off for the file's descriptor.
fn set_direct(f: &File, on: bool) -> io::Result<()> {
    let fd = f.as_raw_fd();
    // SAFETY: plain fcntl calls on a descriptor owned by `f`.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    let new = if on { flags | libc::O_DIRECT } else { flags & !libc::O_DIRECT };
    // SAFETY: as above.
    if new != flags && unsafe { libc::fcntl(fd, libc::F_SETFL, new) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Write an aligned chunk direct at `at`. Returns false, with the chunk
/// written through the page cache and `O_DIRECT` turned off, when the
/// filesystem refuses the direct write (EINVAL: some filesystems take the
/// flag and refuse the write).
fn direct_write(f: &File, data: &[u8], at: u64) -> io::Result<bool> {
    let mut done = 0;
    while done < data.len() {
        let refused =
            fault::check(Point::DirectWrite, "").map_err(|_| io::Error::from_raw_os_error(libc::EINVAL));
        match refused.and_then(|_| f.write_at(&data[done..], at + done as u64)) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                log::debug!("worker: direct write refused ({e}); through the page cache");
                set_direct(f, false)?;
                f.write_all_at(&data[done..], at + done as u64)?;
                return Ok(false);
            }
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_buffers_are_aligned_and_whole() {
        // Allocations of other sizes between them move the next one around.
        let mut keep = Vec::new();
        for n in 0..16 {
            keep.push(vec![0u8; 1 + n * 37]);
            let mut b = ChunkBuf::new();
            assert_eq!(b.bytes().as_ptr() as usize % ALIGN, 0);
            assert_eq!(b.bytes().len(), CHUNK);
        }
    }

    #[test]
    fn at_most_max_direct_places_and_a_dropped_one_is_free_again() {
        let live = Arc::new(AtomicUsize::new(0));
        let places: Vec<Slot> =
            (0..MAX_DIRECT).map(|_| Slot::take(&live, MAX_DIRECT).expect("a place")).collect();
        assert!(Slot::take(&live, MAX_DIRECT).is_none());
        drop(places);
        assert_eq!(live.load(Ordering::Acquire), 0);
        let one = Slot::take(&live, MAX_DIRECT).expect("a place again");
        assert!(Slot::take(&live, 1).is_none(), "fewer places when the budget holds fewer");
        drop(one);
        assert!(Slot::take(&live, 0).is_none(), "no place at all");
    }
}
