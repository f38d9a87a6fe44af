//! The machine's limits, measured in the same run: loopback TCP, the
//! decrypt+cksum pipeline, sequential writes, first writes to new memory and
//! the durable small-file paths. Every server figure is shown beside the
//! limit that bounds it.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use backupd::crypto::{Cksum, StreamDecryptor, AES_KEY_LEN};
use backupd::protocol::{PACKET_HEADER_LEN, REQUEST_HEADER_LEN};

use crate::cli::Opts;
use crate::clients::BigFile;
use crate::common::pseudo_random;
use crate::json::{Obj as _, J};
use crate::report::{line, mb_s, Samples};
use crate::{Res, MIB, PERIOD};

#[derive(Default)]
pub(crate) struct Limits {
    pub(crate) tcp: Option<f64>,
    pub(crate) pipeline: Option<f64>,
    pub(crate) seq_write: Option<f64>,
    pub(crate) seq_write_behind: Option<f64>,
    pub(crate) fresh_memory: Option<f64>,
    pub(crate) fsync1: Option<f64>,
    pub(crate) fsync16: Option<f64>,
    pub(crate) fsync16_db: Option<f64>,
    pub(crate) syncfs16: Option<f64>,
    pub(crate) syncfs16_db: Option<f64>,
    pub(crate) json: Option<J>,
}

impl Limits {
    /// Throughput if loopback, decrypt+cksum and write+fsync ran one after the other.
    pub(crate) fn serial(&self) -> Option<f64> {
        Some(1.0 / (1.0 / self.tcp? + 1.0 / self.pipeline? + 1.0 / self.seq_write?))
    }
}

/// Loopback TCP: one connection, 1 MiB writes, a reader thread.
pub(crate) fn limit_tcp(total_mib: u64) -> Res<f64> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("loopback: bind: {e}"))?;
    let addr = l.local_addr().map_err(|e| e.to_string())?;
    let reader = thread::spawn(move || -> Res<(u64, Instant)> {
        let (mut s, _) = l.accept().map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(60))).map_err(|e| e.to_string())?;
        let mut buf = vec![0u8; PERIOD];
        let mut n = 0u64;
        loop {
            match s.read(&mut buf) {
                Ok(0) => return Ok((n, Instant::now())),
                Ok(k) => n += k as u64,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    });
    let mut s = TcpStream::connect(addr).map_err(|e| format!("loopback: connect: {e}"))?;
    s.set_write_timeout(Some(Duration::from_secs(60))).map_err(|e| e.to_string())?;
    let buf = pseudo_random(PERIOD, 5);
    let t0 = Instant::now();
    for _ in 0..total_mib {
        s.write_all(&buf).map_err(|e| format!("loopback: write: {e}"))?;
    }
    s.shutdown(Shutdown::Write).map_err(|e| e.to_string())?;
    let (n, end) = reader.join().map_err(|_| "loopback reader panicked".to_string())??;
    if n != total_mib * MIB {
        return Err(format!("loopback: read {n} bytes of {}", total_mib * MIB));
    }
    Ok(mb_s(n, end - t0))
}

/// The server's in-memory path for packet content: StreamDecryptor + Cksum
/// over a whole-file ciphertext in 1 MiB pieces. `buf` is decrypted in
/// place, so only the first pass sees real ciphertext (and is checked);
/// later passes do the same work on other bytes.
pub(crate) fn limit_pipeline(buf: &mut [u8], key: &[u8; AES_KEY_LEN], check: Option<u32>) -> Res<f64> {
    let t0 = Instant::now();
    let mut dec = StreamDecryptor::new(key);
    let mut ck = Cksum::new();
    for piece in buf.chunks_mut(PERIOD) {
        dec.update(piece, |p| ck.update(p));
    }
    let fin = dec.finish(|p| ck.update(p));
    let v = ck.finalize();
    let d = t0.elapsed();
    if let Some(expect) = check {
        if fin.is_err() || v != expect {
            return Err(format!("decrypt+cksum self-check failed: cksum {v}, expected {expect}"));
        }
    }
    Ok(mb_s(buf.len() as u64, d))
}

/// Sequential write of `total_mib` in 1 MiB writes, then one fsync.
/// Sequential write of `total_mib` in 1 MiB writes, then one fsync. The file
/// is kept until the end of the run, as the server keeps what it stores:
/// deleting it would hand its page-cache pages, already backed by the
/// host, to the next iteration (see [`limit_fresh_memory`]).
///
/// With `behind`, writeback of every 8 MiB is started as it is written, and
/// the 8 MiB before it is waited for and dropped from the page cache
/// (sync_file_range + POSIX_FADV_DONTNEED), so that the file's pages are
/// recycled instead of the page cache growing into new memory.
pub(crate) fn limit_seq_write(dir: &Path, total_mib: u64, iteration: usize, behind: bool) -> Res<f64> {
    use std::os::fd::AsRawFd;
    const CHUNK: i64 = 8 << 20;
    let p = dir.join(format!("seq-{}{iteration}.bin", if behind { "behind-" } else { "" }));
    let buf = pseudo_random(PERIOD, 9);
    let t0 = Instant::now();
    let mut f = File::create(&p).map_err(|e| format!("{}: {e}", p.display()))?;
    let fd = f.as_raw_fd();
    for i in 1..=total_mib as i64 {
        f.write_all(&buf).map_err(|e| format!("{}: {e}", p.display()))?;
        let off = i * PERIOD as i64;
        if behind && off % CHUNK == 0 {
            // SAFETY: plain syscalls on a descriptor we own; failures only cost speed.
            unsafe {
                libc::sync_file_range(fd, off - CHUNK, CHUNK, libc::SYNC_FILE_RANGE_WRITE);
                if off >= 2 * CHUNK {
                    let all = libc::SYNC_FILE_RANGE_WAIT_BEFORE
                        | libc::SYNC_FILE_RANGE_WRITE
                        | libc::SYNC_FILE_RANGE_WAIT_AFTER;
                    libc::sync_file_range(fd, off - 2 * CHUNK, CHUNK, all);
                    libc::posix_fadvise(fd, off - 2 * CHUNK, CHUNK, libc::POSIX_FADV_DONTNEED);
                }
            }
        }
    }
    f.sync_data().map_err(|e| format!("fsync {}: {e}", p.display()))?;
    Ok(mb_s(total_mib * MIB, t0.elapsed()))
}

/// First write to memory the process has never touched: anonymous mappings
/// of `mib` MiB, one per iteration, each filled once and all kept until the
/// end so that no iteration reuses another's pages. New page-cache pages
/// cost the same first touch. In a VM whose host backs guest memory lazily
/// (or takes back free pages: virtio-balloon free page reporting) this is
/// far slower than writing memory a second time, and it bounds how fast a
/// large new file can enter the page cache.
pub(crate) fn limit_fresh_memory(mib: u64, iters: usize) -> Res<Samples> {
    let len = (mib * MIB) as usize;
    let mut maps = Vec::new();
    let mut s = Samples::default();
    let mut result = Ok(());
    for _ in 0..iters {
        // SAFETY: a fresh private anonymous mapping, checked for failure.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            result = Err(format!("mmap of {mib} MiB failed"));
            break;
        }
        maps.push(p);
        let t0 = Instant::now();
        // SAFETY: p is a writable mapping of len bytes.
        unsafe { std::ptr::write_bytes(p.cast::<u8>(), 0x5a, len) };
        s.0.push(mb_s(len as u64, t0.elapsed()));
    }
    for p in maps {
        // SAFETY: unmapping what was mapped above, with its length.
        unsafe { libc::munmap(p, len) };
    }
    result.map(|()| s)
}

pub(crate) fn fsync_dir(p: &Path) -> Res<()> {
    File::open(p).and_then(|d| d.sync_all()).map_err(|e| format!("fsync {}: {e}", p.display()))
}

/// How a batch of small files is made durable in [`limit_durable`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Durability {
    /// fdatasync each file before its rename, then one fsync of files/ per batch
    /// (the "temp-write + fsync + rename + dir fsync"; `--sync-mode fsync`).
    Fsync,
    /// Renames only, then one syncfs(2) per batch (`--sync-mode syncfs`).
    Syncfs,
}

/// The server's durable path for small files, without the server: write
/// 4 KiB to tmp/, rename into files/, made durable per `batch` files as
/// `mode` says; with `db`, also the SQLite transaction (WAL,
/// synchronous=FULL) the worker makes per batch of new files (their files
/// rows; replacements add a publish-intent transaction before the renames).
///
/// Returns files per second and the calling thread's CPU time (user +
/// system) per file, in microseconds: what this work costs the thread that
/// does it, without the server's network path and threads. Writeback that
/// the kernel's flusher threads do for the syncfs is in neither, as it is
/// not in the server's own CPU figures.
pub(crate) fn limit_durable(
    dir: &Path,
    n: usize,
    batch: usize,
    mode: Durability,
    db: bool,
) -> Res<(f64, f64)> {
    let tmp = dir.join("tmp");
    let files = dir.join("files");
    for d in [&tmp, &files] {
        fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
    }
    let sql = |e: rusqlite::Error| format!("SQLite: {e}");
    let mut conn = if db {
        let c = rusqlite::Connection::open(dir.join("limit.db")).map_err(sql)?;
        c.query_row("PRAGMA journal_mode=WAL", [], |_| Ok(())).map_err(sql)?;
        c.execute_batch(
            "PRAGMA synchronous=FULL;
             CREATE TABLE files(Name TEXT PRIMARY KEY, Verified INTEGER);",
        )
        .map_err(sql)?;
        Some(c)
    } else {
        None
    };
    let root = File::open(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let data = pseudo_random(4096, 3);
    let t0 = Instant::now();
    let cpu0 = thread_cpu_secs();
    let mut i = 0;
    while i < n {
        let end = (i + batch).min(n);
        for k in i..end {
            let t = tmp.join(format!("{k}.part"));
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&t)
                .map_err(|e| format!("{}: {e}", t.display()))?;
            f.write_all(&data).map_err(|e| e.to_string())?;
            if mode == Durability::Fsync {
                f.sync_data().map_err(|e| e.to_string())?;
            }
            drop(f);
            fs::rename(&t, files.join(format!("f{k}"))).map_err(|e| e.to_string())?;
        }
        match mode {
            Durability::Fsync => fsync_dir(&files)?,
            Durability::Syncfs => {
                use std::os::fd::AsRawFd;
                // SAFETY: syncfs on a descriptor we own for the call.
                if unsafe { libc::syncfs(root.as_raw_fd()) } != 0 {
                    return Err(format!("syncfs: {}", std::io::Error::last_os_error()));
                }
            }
        }
        if let Some(c) = conn.as_mut() {
            let tx = c.transaction().map_err(sql)?;
            for k in i..end {
                tx.execute("INSERT INTO files VALUES (?1, 1)", [format!("f{k}")]).map_err(sql)?;
            }
            tx.commit().map_err(sql)?;
        }
        i = end;
    }
    let cpu_us = (thread_cpu_secs() - cpu0) * 1e6 / n.max(1) as f64;
    Ok((n as f64 / t0.elapsed().as_secs_f64().max(1e-9), cpu_us))
}

/// CPU time (user + system) of the calling thread, in seconds.
fn thread_cpu_secs() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the timespec we own; the clock always exists on Linux.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } != 0 {
        return f64::NAN;
    }
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// The limits. What they write is left in `bench_dir/limits-PID` for the
/// caller to delete at the end of the run (see [`crate::run::run`]).
pub(crate) fn measure_limits(o: &Opts, bench_dir: &Path) -> Res<Limits> {
    println!("\n== machine limits (measured now, same run) ==");
    let iters = o.limit_iters;
    let mut j = J::obj();

    let mut tcp = Samples::default();
    for _ in 0..iters {
        tcp.0.push(limit_tcp(o.tcp_mib)?);
    }
    line(&format!("loopback TCP ({} MiB, 1 MiB writes)", o.tcp_mib), tcp.show("MB/s"));
    let mut t = tcp.json();
    t.set("mib_per_iteration", o.tcp_mib);
    j.set("loopback_tcp_mb_s", t);

    let pipe = pipeline_samples(o, &mut j)?;

    let dir = bench_dir.join(format!("limits-{}", std::process::id()));
    fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let (seq, behind) = seq_write_samples(o, &dir, &mut j)?;

    let fresh_mib = o.seq_mib.min(512);
    let fresh = limit_fresh_memory(fresh_mib, iters.min(3))?;
    line(&format!("first write to new memory ({fresh_mib} MiB)"), fresh.show("MB/s"));
    let mut t = fresh.json();
    t.set("mib_per_iteration", fresh_mib);
    j.set("fresh_memory_write_mb_s", t);

    let fs_rates = durable_rates(o, &dir, &mut j)?;
    Ok(Limits {
        tcp: Some(tcp.median()),
        pipeline: Some(pipe.median()),
        seq_write: Some(seq.median()),
        seq_write_behind: Some(behind.median()),
        fresh_memory: Some(fresh.median()),
        fsync1: Some(fs_rates[0]),
        fsync16: Some(fs_rates[1]),
        fsync16_db: Some(fs_rates[2]),
        syncfs16: Some(fs_rates[3]),
        syncfs16_db: Some(fs_rates[4]),
        json: Some(j),
    })
}

/// The decrypt+cksum limit over a whole-file ciphertext of `--pipeline-mib`.
fn pipeline_samples(o: &Opts, j: &mut J) -> Res<Samples> {
    let key = [0x42u8; AES_KEY_LEN];
    let big = BigFile::new(&key, o.pipeline_mib, 11);
    let mut buf = Vec::with_capacity((big.ciphertext_len()) as usize);
    for _ in 0..o.pipeline_mib {
        buf.extend_from_slice(&big.frame[REQUEST_HEADER_LEN + PACKET_HEADER_LEN..]);
    }
    buf.extend_from_slice(&big.last[REQUEST_HEADER_LEN + PACKET_HEADER_LEN..]);
    let mut pipe = Samples::default();
    for i in 0..o.limit_iters {
        pipe.0.push(limit_pipeline(&mut buf, &key, (i == 0).then_some(big.cksum))?);
    }
    drop(buf);
    line(&format!("decrypt+cksum ({} MiB, 1 MiB pieces)", o.pipeline_mib), pipe.show("MB/s"));
    let mut t = pipe.json();
    t.set("mib_per_iteration", o.pipeline_mib);
    j.set("decrypt_cksum_mb_s", t);
    Ok(pipe)
}

/// The sequential write limits, plain and write-behind.
fn seq_write_samples(o: &Opts, dir: &Path, j: &mut J) -> Res<(Samples, Samples)> {
    let mut seq = Samples::default();
    let mut behind = Samples::default();
    for i in 0..o.limit_iters.min(3) {
        seq.0.push(limit_seq_write(dir, o.seq_mib, i, false)?);
        behind.0.push(limit_seq_write(dir, o.seq_mib, i, true)?);
    }
    line(&format!("sequential write+fsync ({} MiB)", o.seq_mib), seq.show("MB/s"));
    let mut t = seq.json();
    t.set("mib_per_iteration", o.seq_mib);
    j.set("seq_write_fsync_mb_s", t);
    line("  the same, write-behind + DONTNEED", behind.show("MB/s"));
    let mut t = behind.json();
    t.set("mib_per_iteration", o.seq_mib);
    j.set("seq_write_behind_dontneed_mb_s", t);
    Ok((seq, behind))
}

/// The durable small-file limits, in the order of [`Limits`]' `fsync1` to
/// `syncfs16_db`: their medians.
fn durable_rates(o: &Opts, dir: &Path, j: &mut J) -> Res<Vec<f64>> {
    let mut fs_rates = Vec::new();
    for (batch, mode, db, key, label) in [
        (1, Durability::Fsync, false, "fsync_files_per_s", "4 KiB write+fsync+rename+dir fsync"),
        (
            16,
            Durability::Fsync,
            false,
            "fsync_batched16_files_per_s",
            "  the same, one dir fsync per 16 files",
        ),
        (16, Durability::Fsync, true, "fsync_batched16_sqlite_files_per_s", "    + 1 SQLite commit per 16"),
        (16, Durability::Syncfs, false, "syncfs_batched16_files_per_s", "  write+rename, one syncfs per 16"),
        (16, Durability::Syncfs, true, "syncfs_batched16_sqlite_files_per_s", "    + 1 SQLite commit per 16"),
    ] {
        let (mut s, mut cpu) = (Samples::default(), Samples::default());
        for it in 0..o.limit_iters {
            let d = dir.join(format!("{key}-{it}"));
            let (rate, cpu_us) = limit_durable(&d, o.fsync_files, batch, mode, db)?;
            s.0.push(rate);
            cpu.0.push(cpu_us);
        }
        line(label, format!("{}   CPU per file {:>5.1} us", s.show("files/s"), cpu.median()));
        let mut t = s.json();
        t.set("files_per_iteration", o.fsync_files);
        t.set("cpu_us_per_file", cpu.json());
        j.set(key, t);
        fs_rates.push(s.median());
    }
    Ok(fs_rates)
}
