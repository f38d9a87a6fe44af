//! The data directory's lock: one process at a time may write to a data
//! directory. `flock(LOCK_EX | LOCK_NB)` on `<data-dir>/backupd.lock`, which
//! then holds the owner's pid (for the message of the next one refused). The
//! kernel releases the lock when the process ends, however it ends; a stale
//! file left behind locks nothing.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Name of the lock file inside the data directory.
pub const LOCK_FILE: &str = "backupd.lock";

/// The data directory's lock, held until dropped.
#[derive(Debug)]
pub struct DirLock {
    _file: File,
}

/// Take the lock of `data_dir` without waiting. Fails with "data directory D
/// is in use by process N" when another process holds it.
pub fn acquire(data_dir: &Path) -> Result<DirLock, String> {
    let path = data_dir.join(LOCK_FILE);
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    // SAFETY: flock on a descriptor owned by `file` for the duration of the call.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
            let mut pid = String::new();
            let _ = file.read_to_string(&mut pid);
            let pid = pid.trim();
            let pid = if pid.is_empty() { "unknown" } else { pid };
            return Err(format!("data directory {} is in use by process {pid}", data_dir.display()));
        }
        return Err(format!("cannot lock {}: {err}", path.display()));
    }
    let written = file
        .set_len(0)
        .and_then(|_| file.seek(SeekFrom::Start(0)))
        .and_then(|_| writeln!(file, "{}", std::process::id()));
    written.map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    Ok(DirLock { _file: file })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_until_the_first_drops() {
        let dir = tempfile::tempdir().unwrap();
        let lock = acquire(dir.path()).unwrap();
        let pid = std::fs::read_to_string(dir.path().join(LOCK_FILE)).unwrap();
        assert_eq!(pid.trim(), std::process::id().to_string());
        // A second open file description conflicts, even in the same process.
        let err = acquire(dir.path()).unwrap_err();
        assert_eq!(
            err,
            format!("data directory {} is in use by process {}", dir.path().display(), std::process::id())
        );
        drop(lock);
        assert!(acquire(dir.path()).is_ok());
    }
}
