//! Test-only fault and crash injection in the storage and commit path.
//!
//! Owns the list of injection points. In debug builds (the tests' build) the
//! environment variable `BACKUPD_FAULTS` is read once; the release binary
//! never reads it and every check compiles to nothing.
//!
//! `BACKUPD_FAULTS` is a comma-separated list of rules:
//!
//! - `trace`: log `fault point <point> <file>` at info level each time a
//!   point is reached, so a test can check the order of the durability steps;
//! - `fail@<point>[:<file>]`: the step fails with EIO (for that file name only
//!   when one is given);
//! - `crash@<point>[:<file>]`: the process ends at once (`_exit(86)`, no
//!   destructor runs, nothing is flushed), as a kill -9 would end it.
//!
//! Points, in the order an upload and its commit pass them (see "Lifecycle
//! of a file" in docs/ARCHITECTURE.md): `write` and `write-behind` (each
//! temp-file write and writeback call while packets arrive; no file name),
//! `direct-write` (each `O_DIRECT` write of a large upload's chunk, see
//! `sink.rs`; `fail` there acts as a filesystem that refuses the direct
//! write (EINVAL), so the fallback through the page cache is what it tests),
//! `fdatasync` (the temp file's data, `--sync-mode fsync`), `intent` (the
//! publish intents committed), `link` (the previous version's hard link),
//! `sync-previous` (the sync after the links), `rename`, `sync-publish` (the
//! sync after the renames), `after-rename` (just before the database
//! commit), `commit` (committed, before the 1604; `fail` is ignored there).
//! New files with syncfs (one sync per batch, see `commit.rs`) pass
//! `rename`, `after-rename`, `recorded` (their rows written, the sync not
//! yet done; `fail` is ignored there), `sync-publish`, `commit`.
//! `unnamed` is checked once at start, where the packet thread's temp files
//! are set up: `fail` there acts as a filesystem without `O_TMPFILE`, so
//! every upload gets a named temp file.
//! Sync points are checked at each real sync call (the syncfs, or each
//! fdatasync/fsync), so that a removed sync step shows in a test.

use std::io;

/// One step of the storage path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Point {
    Write,
    WriteBehind,
    DirectWrite,
    Fdatasync,
    Intent,
    Link,
    SyncPrevious,
    Rename,
    SyncPublish,
    AfterRename,
    Recorded,
    Commit,
    Unnamed,
}

impl Point {
    #[cfg_attr(not(debug_assertions), allow(dead_code))]
    fn name(self) -> &'static str {
        match self {
            Point::Write => "write",
            Point::WriteBehind => "write-behind",
            Point::DirectWrite => "direct-write",
            Point::Fdatasync => "fdatasync",
            Point::Intent => "intent",
            Point::Link => "link",
            Point::SyncPrevious => "sync-previous",
            Point::Rename => "rename",
            Point::SyncPublish => "sync-publish",
            Point::AfterRename => "after-rename",
            Point::Recorded => "recorded",
            Point::Commit => "commit",
            Point::Unnamed => "unnamed",
        }
    }
}

#[cfg(debug_assertions)]
mod active {
    use std::sync::OnceLock;

    pub struct Rule {
        pub crash: bool,
        pub point: String,
        pub file: Option<String>,
    }

    pub struct Faults {
        pub trace: bool,
        pub rules: Vec<Rule>,
    }

    pub fn faults() -> &'static Faults {
        static F: OnceLock<Faults> = OnceLock::new();
        F.get_or_init(|| {
            let spec = std::env::var("BACKUPD_FAULTS").unwrap_or_default();
            let mut f = Faults { trace: false, rules: Vec::new() };
            for r in spec.split(',').map(str::trim).filter(|r| !r.is_empty()) {
                if r == "trace" {
                    f.trace = true;
                    continue;
                }
                let (crash, rest) = match r.split_once('@') {
                    Some(("fail", rest)) => (false, rest),
                    Some(("crash", rest)) => (true, rest),
                    _ => {
                        log::warn!("BACKUPD_FAULTS: ignored rule {r:?}");
                        continue;
                    }
                };
                let (point, file) = match rest.split_once(':') {
                    Some((p, f)) => (p.to_string(), Some(f.to_string())),
                    None => (rest.to_string(), None),
                };
                f.rules.push(Rule { crash, point, file });
            }
            if !spec.is_empty() {
                log::warn!("fault injection active: BACKUPD_FAULTS={spec:?}");
            }
            f
        })
    }
}

/// Pass the point `p` for the file `file` (a name, or "" for no file): in a
/// test build this may trace, fail or crash as `BACKUPD_FAULTS` says.
#[inline]
pub fn check(p: Point, file: &str) -> io::Result<()> {
    #[cfg(debug_assertions)]
    {
        let f = active::faults();
        if f.trace {
            log::info!("fault point {} {file}", p.name());
        }
        for r in &f.rules {
            if r.point == p.name() && r.file.as_deref().is_none_or(|n| n == file) {
                if r.crash {
                    log::error!("fault injection: crash at {} {file}", p.name());
                    // The log is written by its own thread: out before the end.
                    crate::logging::flush(std::time::Duration::from_secs(1));
                    // SAFETY: _exit ends the process at once; that is the point.
                    unsafe { libc::_exit(86) };
                }
                log::error!("fault injection: failing {} {file}", p.name());
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
        }
    }
    #[cfg(not(debug_assertions))]
    let _ = (p, file);
    Ok(())
}

/// [`check`] for every file of a batch step (a sync covers them all): the
/// first failure is returned.
pub fn check_all<'a>(p: Point, files: impl IntoIterator<Item = &'a str>) -> io::Result<()> {
    #[cfg(debug_assertions)]
    for f in files {
        check(p, f)?;
    }
    #[cfg(not(debug_assertions))]
    let _ = (p, files.into_iter());
    Ok(())
}
