//! The data directory as a whole: who owns it, what it is, and how anything
//! inside it is opened.
//!
//! - **One owner** ([`acquire`] for the server, [`acquire_existing`] for an
//!   admin command, [`DirLock`]): an exclusive `flock` on
//!   `<data-dir>/backupd.lock`, taken before anything else in the directory is
//!   touched and held for the life of the process (or of an admin command). The
//!   holder's pid is written into the file, so that a second server (or a
//!   writing admin command) can say who holds it and exit at once, and
//!   taken out again when the lock is released cleanly.
//! - **A marker, not a guess** ([`prepare`]): backupd creates a data directory
//!   only when it does not exist or is empty, and marks it with
//!   `backupd.layout` (the layout version, and the directory's id, which its
//!   database records: see `worker::db::check_owner`). A non-empty folder
//!   without the marker is refused, its mode and contents untouched.
//! - **One owner of the database too** ([`lock_database`], [`DbLock`]): an
//!   exclusive `flock` on `<db>.lock` beside the database, wherever `--db`
//!   puts it, with the holder's pid, as for the data directory.
//! - **Nothing is followed** ([`Dir`]): every entry inside the data directory
//!   is reached relative to a directory descriptor, one component at a time,
//!   with no symbolic link followed (`openat` with `O_NOFOLLOW`, `O_DIRECTORY`
//!   for folders; `mkdirat`, `renameat`, `linkat`, `unlinkat`, `fstatat`
//!   with `AT_SYMLINK_NOFOLLOW`). Only the data directory's own path (given by
//!   the operator) is resolved normally, and the one link that is followed
//!   is `/proc/self/fd/<n>`, the process's own descriptor of a file without
//!   a name, to give it one ([`Dir::link_unnamed`]).

use std::ffi::{CStr, CString, OsStr, OsString};
use std::fs::File;
use std::io::{self, Read, Seek, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

/// The lock file, in the data directory.
pub const LOCK_FILE: &str = "backupd.lock";
/// The marker file, in the data directory.
pub const MARKER_FILE: &str = "backupd.layout";
/// The layout this backupd writes and understands.
pub const LAYOUT_VERSION: u32 = 1;
/// What the marker holds, before the version number.
const MARKER_PREFIX: &str = "backupd data directory, layout ";

/// What an entry is, seen without following it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    /// A socket, fifo or device.
    Other,
}

/// An entry's kind and size (`fstatat` with `AT_SYMLINK_NOFOLLOW`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Meta {
    pub kind: Kind,
    pub size: u64,
    /// Device and inode: two names of one file have the same.
    pub ino: (u64, u64),
}

/// An open directory: every operation names a single component inside it and
/// follows no symbolic link.
#[derive(Debug)]
pub struct Dir {
    fd: OwnedFd,
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// One path component as a C string: not empty, not `..`, no `/` and no NUL,
/// so that an operation on it can never leave its directory.
fn component(name: &OsStr) -> io::Result<CString> {
    let b = name.as_bytes();
    if b.is_empty() || b == b".." || b.contains(&b'/') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("not a single path component: {name:?}"),
        ));
    }
    CString::new(b).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a path component"))
}

/// The components of a relative `/`-separated path; each must be a valid
/// single component (no empty, `.` or `..`).
pub fn components(rel: &str) -> io::Result<Vec<&str>> {
    let parts: Vec<&str> = rel.split('/').collect();
    if parts.iter().any(|p| p.is_empty() || *p == "." || *p == ".." || p.contains('\0')) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("not a plain relative path: {rel:?}"),
        ));
    }
    Ok(parts)
}

impl Dir {
    /// Open a directory by path (the data directory itself: the operator's
    /// path is resolved normally, links included).
    pub fn open(path: &Path) -> io::Result<Dir> {
        let c = CString::new(path.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a path"))?;
        // SAFETY: a valid C string; the returned descriptor is owned below.
        let fd =
            cvt(unsafe { libc::open(c.as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC) })?;
        // SAFETY: fd is a fresh descriptor nobody else owns.
        Ok(Dir { fd: unsafe { OwnedFd::from_raw_fd(fd) } })
    }

    fn openat(&self, name: &CStr, flags: libc::c_int, mode: libc::mode_t) -> io::Result<OwnedFd> {
        // SAFETY: valid descriptor and C string; the result is owned at once.
        let fd = cvt(unsafe {
            libc::openat(self.fd.as_raw_fd(), name.as_ptr(), flags | libc::O_NOFOLLOW | libc::O_CLOEXEC, mode)
        })?;
        // SAFETY: fd is a fresh descriptor nobody else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// Open the sub-directory `name` (fails with ENOTDIR on a link or a file).
    pub fn open_dir(&self, name: impl AsRef<OsStr>) -> io::Result<Dir> {
        let c = component(name.as_ref())?;
        Ok(Dir { fd: self.openat(&c, libc::O_RDONLY | libc::O_DIRECTORY, 0)? })
    }

    /// Open the sub-directory `name`, creating it (mode 0700) if missing.
    /// Returns whether it was created.
    pub fn ensure_dir(&self, name: impl AsRef<OsStr>) -> io::Result<(Dir, bool)> {
        let c = component(name.as_ref())?;
        let flags = libc::O_RDONLY | libc::O_DIRECTORY;
        // Opened first: the folder almost always exists (one call, not two).
        match self.openat(&c, flags, 0) {
            Ok(fd) => return Ok((Dir { fd }, false)),
            Err(e) if e.raw_os_error() != Some(libc::ENOENT) => return Err(e),
            Err(_) => {}
        }
        // SAFETY: valid descriptor and C string.
        let created = match cvt(unsafe { libc::mkdirat(self.fd.as_raw_fd(), c.as_ptr(), 0o700) }) {
            Ok(_) => true,
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => false,
            Err(e) => return Err(e),
        };
        Ok((Dir { fd: self.openat(&c, flags, 0)? }, created))
    }

    /// Open a chain of sub-directories, one component at a time, never
    /// following a link.
    pub fn open_path(&self, parts: &[&str]) -> io::Result<Dir> {
        let Some((first, rest)) = parts.split_first() else { return self.try_clone() };
        let mut d = self.open_dir(first)?;
        for p in rest {
            d = d.open_dir(p)?;
        }
        Ok(d)
    }

    /// Create a new file (`O_EXCL`: never an existing entry, never through a link).
    pub fn create_file(&self, name: impl AsRef<OsStr>, mode: u32) -> io::Result<File> {
        let c = component(name.as_ref())?;
        let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL;
        Ok(File::from(self.openat(&c, flags, mode as libc::mode_t)?))
    }

    /// Open an existing regular file for reading (fails on a link).
    pub fn open_file(&self, name: impl AsRef<OsStr>) -> io::Result<File> {
        let c = component(name.as_ref())?;
        let f = File::from(self.openat(&c, libc::O_RDONLY | libc::O_NONBLOCK, 0)?);
        if !f.metadata()?.is_file() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a regular file"));
        }
        Ok(f)
    }

    /// What `name` is, without following it; None when it does not exist.
    pub fn stat(&self, name: impl AsRef<OsStr>) -> io::Result<Option<Meta>> {
        let c = component(name.as_ref())?;
        // SAFETY: stat is plain data; valid descriptor and C string.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        let r = unsafe { libc::fstatat(self.fd.as_raw_fd(), c.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) };
        if r != 0 {
            let e = io::Error::last_os_error();
            return if e.raw_os_error() == Some(libc::ENOENT) { Ok(None) } else { Err(e) };
        }
        let kind = match st.st_mode & libc::S_IFMT {
            libc::S_IFREG => Kind::File,
            libc::S_IFDIR => Kind::Dir,
            libc::S_IFLNK => Kind::Symlink,
            _ => Kind::Other,
        };
        Ok(Some(Meta { kind, size: st.st_size as u64, ino: (st.st_dev, st.st_ino) }))
    }

    /// Remove the entry `name` (a link is removed itself, never its target).
    pub fn remove_file(&self, name: impl AsRef<OsStr>) -> io::Result<()> {
        let c = component(name.as_ref())?;
        // SAFETY: valid descriptor and C string.
        cvt(unsafe { libc::unlinkat(self.fd.as_raw_fd(), c.as_ptr(), 0) }).map(drop)
    }

    /// Remove the empty sub-directory `name`.
    pub fn remove_dir(&self, name: impl AsRef<OsStr>) -> io::Result<()> {
        let c = component(name.as_ref())?;
        // SAFETY: valid descriptor and C string.
        cvt(unsafe { libc::unlinkat(self.fd.as_raw_fd(), c.as_ptr(), libc::AT_REMOVEDIR) }).map(drop)
    }

    /// Create a regular file without a name in this directory's filesystem
    /// (`O_TMPFILE`, mode 0600): it is freed when its last descriptor
    /// closes unless [`Dir::link_unnamed`] gives it a name first. Fails
    /// (EOPNOTSUPP, EISDIR, EINVAL) where the filesystem or kernel has no
    /// such files.
    pub fn create_unnamed(&self) -> io::Result<File> {
        let flags = libc::O_TMPFILE | libc::O_WRONLY | libc::O_CLOEXEC;
        // SAFETY: valid descriptor and C string; the result is owned at once.
        let fd =
            cvt(unsafe { libc::openat(self.fd.as_raw_fd(), c".".as_ptr(), flags, 0o600 as libc::c_uint) })?;
        // SAFETY: fd is a fresh descriptor nobody else owns.
        Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Give a file made by [`Dir::create_unnamed`] the name `to_name` here.
    /// Never replaces an entry (EEXIST). The file is reached through
    /// `/proc/self/fd` (`linkat` with `AT_EMPTY_PATH` needs a capability).
    pub fn link_unnamed(&self, file: &File, to_name: impl AsRef<OsStr>) -> io::Result<()> {
        let b = component(to_name.as_ref())?;
        let src = CString::new(format!("/proc/self/fd/{}", file.as_raw_fd())).map_err(io::Error::other)?;
        // SAFETY: valid descriptors and C strings.
        cvt(unsafe {
            libc::linkat(
                libc::AT_FDCWD,
                src.as_ptr(),
                self.fd.as_raw_fd(),
                b.as_ptr(),
                libc::AT_SYMLINK_FOLLOW,
            )
        })
        .map(drop)
    }

    /// Rename `name` to `to/to_name` (the entry itself moves, whatever it is).
    pub fn rename(&self, name: impl AsRef<OsStr>, to: &Dir, to_name: impl AsRef<OsStr>) -> io::Result<()> {
        let (a, b) = (component(name.as_ref())?, component(to_name.as_ref())?);
        // SAFETY: valid descriptors and C strings.
        cvt(unsafe { libc::renameat(self.fd.as_raw_fd(), a.as_ptr(), to.fd.as_raw_fd(), b.as_ptr()) })
            .map(drop)
    }

    /// Hard-link `name` as `to/to_name` (no flag: a link is not followed).
    pub fn hard_link(&self, name: impl AsRef<OsStr>, to: &Dir, to_name: impl AsRef<OsStr>) -> io::Result<()> {
        let (a, b) = (component(name.as_ref())?, component(to_name.as_ref())?);
        // SAFETY: valid descriptors and C strings.
        cvt(unsafe { libc::linkat(self.fd.as_raw_fd(), a.as_ptr(), to.fd.as_raw_fd(), b.as_ptr(), 0) })
            .map(drop)
    }

    /// The entries of this directory (without `.` and `..`), each with its
    /// kind and size: one `fstatat` per entry.
    pub fn entries(&self) -> io::Result<Vec<(OsString, Meta)>> {
        let dot = CString::new(".").map_err(|_| io::ErrorKind::InvalidInput)?;
        // A new open file description, so that reading it moves no shared offset.
        let fd = self.openat(&dot, libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
        let raw: RawFd = std::os::fd::IntoRawFd::into_raw_fd(fd);
        // SAFETY: raw is an open directory descriptor; on success the stream owns it.
        let stream = unsafe { libc::fdopendir(raw) };
        if stream.is_null() {
            let e = io::Error::last_os_error();
            // SAFETY: fdopendir failed, so raw is still ours to close.
            unsafe { libc::close(raw) };
            return Err(e);
        }
        let mut names = Vec::new();
        let result = loop {
            // SAFETY: errno is thread-local; readdir on a valid stream.
            unsafe { *libc::__errno_location() = 0 };
            let ent = unsafe { libc::readdir(stream) };
            if ent.is_null() {
                let e = io::Error::last_os_error();
                break if e.raw_os_error().unwrap_or(0) == 0 { Ok(()) } else { Err(e) };
            }
            // SAFETY: d_name is a NUL-terminated array inside the entry readdir returned.
            let name = unsafe { CStr::from_ptr((*ent).d_name.as_ptr()) }.to_bytes();
            if name != b"." && name != b".." {
                names.push(OsString::from_vec(name.to_vec()));
            }
        };
        // SAFETY: the stream is valid and closed once.
        unsafe { libc::closedir(stream) };
        result?;
        let mut out = Vec::with_capacity(names.len());
        for n in names {
            // An entry removed meanwhile is simply not listed.
            if let Some(m) = self.stat(&n)? {
                out.push((n, m));
            }
        }
        Ok(out)
    }

    /// fsync the directory (its entries become durable).
    pub fn sync(&self) -> io::Result<()> {
        // SAFETY: valid descriptor.
        cvt(unsafe { libc::fsync(self.fd.as_raw_fd()) }).map(drop)
    }

    /// syncfs(2) of the filesystem holding this directory. Reports writeback
    /// errors of that filesystem since the last syncfs through this same
    /// descriptor (so keep the descriptor: a new one would not see them).
    pub fn syncfs(&self) -> io::Result<()> {
        // SAFETY: valid descriptor.
        cvt(unsafe { libc::syncfs(self.fd.as_raw_fd()) }).map(drop)
    }

    /// Bytes available to an unprivileged writer on this directory's
    /// filesystem (`fstatvfs`).
    pub fn free_bytes(&self) -> io::Result<u64> {
        // SAFETY: an all-zero statvfs is a valid value to be overwritten.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: valid descriptor and a pointer to a local struct.
        cvt(unsafe { libc::fstatvfs(self.fd.as_raw_fd(), &mut st) })?;
        Ok((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
    }

    /// Set this directory's mode.
    pub fn set_mode(&self, mode: u32) -> io::Result<()> {
        // SAFETY: valid descriptor.
        cvt(unsafe { libc::fchmod(self.fd.as_raw_fd(), mode as libc::mode_t) }).map(drop)
    }

    pub fn try_clone(&self) -> io::Result<Dir> {
        Ok(Dir { fd: self.fd.try_clone()? })
    }
}

/// Holds the data directory's lock; released when dropped (or when the
/// process ends, however it ends).
#[derive(Debug)]
pub struct DirLock {
    file: File,
    dir: Dir,
    path: PathBuf,
}

impl DirLock {
    /// The data directory this lock holds.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The data directory, opened (see [`Dir`]).
    pub fn dir(&self) -> &Dir {
        &self.dir
    }
}

/// On a clean release the pid is taken out of the lock file (still under
/// the lock, so never another holder's): a pid left there would name
/// whatever process gets that number next. A process that dies keeps its
/// pid in the file until the next holder writes its own.
impl Drop for DirLock {
    fn drop(&mut self) {
        let _ = self.file.set_len(0);
    }
}

/// Entries of a directory that do not make it "in use": the lock file (made
/// by [`acquire`]) and a filesystem's `lost+found`.
fn counts_as_content(name: &OsStr, meta: &Meta) -> bool {
    !(name == OsStr::new(LOCK_FILE) && meta.kind == Kind::File
        || name == OsStr::new("lost+found") && meta.kind == Kind::Dir)
}

/// What a data directory's marker says: its layout and, once a backupd that
/// ties databases to data directories has used it, its id (the second line,
/// `id <32 hex digits>`), which its database records too.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Marker {
    pub id: Option<String>,
}

/// Is the directory ours (marked) or free to take (empty)? Reads only.
/// `Ok(Some(marker))`: marked; `Ok(None)`: empty; `Err`: the message that refuses it.
fn check_marked_or_empty(dir: &Dir, path: &Path) -> Result<Option<Marker>, String> {
    if let Some(marker) = read_marker(dir, path)? {
        return Ok(Some(marker));
    }
    let d = path.display();
    let entries = dir.entries().map_err(|e| format!("data directory {d}: cannot list it: {e}"))?;
    let mut found: Vec<String> = entries
        .iter()
        .filter(|(n, m)| counts_as_content(n, m))
        .map(|(n, _)| n.to_string_lossy().into_owned())
        .collect();
    if found.is_empty() {
        return Ok(None);
    }
    found.sort();
    let more = found.len().saturating_sub(5);
    found.truncate(5);
    let mut list = found.join(", ");
    if more > 0 {
        list.push_str(&format!(" and {more} more"));
    }
    Err(format!(
        "data directory {d} is not empty and has no {MARKER_FILE} marker (it holds {list}); \
         backupd will not take over a folder that may not be its own. Point --data-dir at a new or \
         empty folder; if this is the data directory of an earlier backupd, mark it with \
         `echo '{MARKER_PREFIX}{LAYOUT_VERSION}' > {}` and start again",
        Path::new(path).join(MARKER_FILE).display()
    ))
}

/// The marker of the data directory `dir` (at `path`, for messages), None
/// when it has none. Reads only.
fn read_marker(dir: &Dir, path: &Path) -> Result<Option<Marker>, String> {
    let d = path.display();
    match dir.stat(MARKER_FILE).map_err(|e| format!("data directory {d}: {MARKER_FILE}: {e}"))? {
        Some(Meta { kind: Kind::File, .. }) => {}
        Some(_) => {
            return Err(format!("data directory {d}: {MARKER_FILE} is not a regular file; check the folder"));
        }
        None => return Ok(None),
    }
    let mut s = String::new();
    dir.open_file(MARKER_FILE)
        .and_then(|mut f| Read::by_ref(&mut f).take(256).read_to_string(&mut s))
        .map_err(|e| format!("data directory {d}: cannot read {MARKER_FILE}: {e}"))?;
    let mut lines = s.lines();
    let first = lines.next().unwrap_or("").trim();
    let id = lines.find_map(|l| l.trim().strip_prefix("id ")).map(str::trim);
    let id_ok = id.is_none_or(|i| i.len() == 32 && i.bytes().all(|b| b.is_ascii_hexdigit()));
    match first.strip_prefix(MARKER_PREFIX).and_then(|v| v.parse::<u32>().ok()) {
        Some(v) if v <= LAYOUT_VERSION && id_ok => Ok(Some(Marker { id: id.map(str::to_string) })),
        Some(v) if v > LAYOUT_VERSION => Err(format!(
            "data directory {d} has layout {v}, newer than this backupd understands ({LAYOUT_VERSION}); \
             run a newer backupd"
        )),
        _ => Err(format!(
            "data directory {d}: {MARKER_FILE} is not a backupd marker ({:?}); \
             check the folder before starting",
            s.chars().take(60).collect::<String>()
        )),
    }
}

/// The id in the marker of the data directory at `path` (None when it has
/// no marker, or a marker without an id). Reads only, takes no lock: for the
/// admin commands, which check that a database belongs to it.
pub fn marker_id(path: &Path) -> Result<Option<String>, String> {
    let dir = Dir::open(path).map_err(|e| format!("data directory {}: {e}", path.display()))?;
    Ok(read_marker(&dir, path)?.and_then(|m| m.id))
}

/// Take the data directory's lock: create the directory (mode 0700) if it
/// does not exist, refuse a non-empty folder without the marker (untouched),
/// then lock `backupd.lock` (`flock(LOCK_EX | LOCK_NB)`) and write our pid
/// into it. The error is the message for the user, e.g. "data directory D is
/// in use by process N".
pub fn acquire(data_dir: &Path) -> Result<DirLock, String> {
    lock(data_dir, Create::Leaf)
}

/// [`acquire`] for a new folder that may need its parents made too (a
/// snapshot's DIR).
pub fn acquire_with_parents(data_dir: &Path) -> Result<DirLock, String> {
    lock(data_dir, Create::WithParents)
}

/// [`acquire`] for a data directory that must exist already (an admin
/// command): a missing one is an error, not created.
pub fn acquire_existing(data_dir: &Path) -> Result<DirLock, String> {
    lock(data_dir, Create::No)
}

/// What [`lock`] makes of a missing directory.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Create {
    No,
    /// The directory itself, in a parent that exists: a mistyped path
    /// (`/var/lib/bakcupd/data`) is refused rather than made, parents and all.
    Leaf,
    WithParents,
}

fn lock(data_dir: &Path, create: Create) -> Result<DirLock, String> {
    let d = data_dir.display();
    match std::fs::symlink_metadata(data_dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound && create == Create::No => {
            return Err(format!("data directory {d} does not exist"))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => std::fs::DirBuilder::new()
            .recursive(create == Create::WithParents)
            .mode(0o700)
            .create(data_dir)
            .map_err(|e| match e.kind() {
                io::ErrorKind::NotFound => format!(
                    "cannot create data directory {d}: its parent folder does not exist (a typo in the path? \
                     create the parent first if the path is right)"
                ),
                _ => format!("cannot create data directory {d}: {e}"),
            })?,
        Err(e) => return Err(format!("data directory {d}: {e}")),
        Ok(_) => {}
    }
    let dir = Dir::open(data_dir).map_err(|e| match dangling_link(data_dir) {
        Some(why) => format!("data directory {why}"),
        None => format!("data directory {d}: {e}"),
    })?;
    check_marked_or_empty(&dir, data_dir)?;
    let file = lock_pid(&dir, LOCK_FILE, &format!("data directory {d}"))?;
    Ok(DirLock { file, dir, path: data_dir.to_path_buf() })
}

/// "PATH is a symbolic link to T, which does not exist", when `path` is a
/// link whose target is gone (a disk not mounted, a folder moved).
pub fn dangling_link(path: &Path) -> Option<String> {
    let to = std::fs::read_link(path).ok().filter(|_| !path.exists())?;
    Some(format!(
        "{} is a symbolic link to {}, which does not exist (a disk not mounted?)",
        path.display(),
        to.display()
    ))
}

/// Lock `dir/name` (`flock(LOCK_EX | LOCK_NB)`, created if missing, never
/// through a link) and write our pid into it. `what` names the thing locked
/// in the messages ("data directory D", "database D").
fn lock_pid(dir: &Dir, name: &str, what: &str) -> Result<File, String> {
    let c = component(OsStr::new(name)).map_err(|e| e.to_string())?;
    let fd = dir.openat(&c, libc::O_RDWR | libc::O_CREAT, 0o600).map_err(|e| {
        if e.raw_os_error() == Some(libc::ELOOP) {
            format!("{what}: {name} is a symbolic link; remove it")
        } else {
            format!("{what}: cannot open {name}: {e}")
        }
    })?;
    let mut file = File::from(fd);
    match file.metadata() {
        Ok(m) if m.is_file() => {}
        Ok(_) => return Err(format!("{what}: {name} is not a regular file")),
        Err(e) => return Err(format!("{what}: {name}: {e}")),
    }
    // SAFETY: valid descriptor owned by `file`.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            let mut s = String::new();
            let _ = Read::by_ref(&mut file).take(32).read_to_string(&mut s);
            let holder = s.trim().parse::<u32>().map(|p| p.to_string()).unwrap_or_else(|_| "?".into());
            return Err(format!("{what} is in use by process {holder}"));
        }
        return Err(format!("{what}: cannot lock {name}: {e}"));
    }
    let pid = format!("{}\n", std::process::id());
    file.set_len(0)
        .and_then(|_| file.rewind())
        .and_then(|_| file.write_all(pid.as_bytes()))
        .map_err(|e| format!("{what}: cannot write {name}: {e}"))?;
    Ok(file)
}

/// Holds a database's lock (`<db>.lock` beside it); released when dropped,
/// its pid emptied (as the data directory's).
#[derive(Debug)]
pub struct DbLock {
    file: File,
}

impl Drop for DbLock {
    fn drop(&mut self) {
        let _ = self.file.set_len(0);
    }
}

/// Lock the database at `db` for one owner: an exclusive `flock` on
/// `<db>.lock` in the database's folder, with our pid in it, as for the data
/// directory. A separate file, not the database itself: SQLite takes POSIX
/// (`fcntl`) locks on the database, and where `flock` is emulated with
/// `fcntl` locks (NFS) the two would meet. The error is the message for the
/// user, e.g. "database D is in use by process N".
pub fn lock_database(db: &Path) -> Result<DbLock, String> {
    let what = format!("database {}", db.display());
    let parent = match db.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = db.file_name().ok_or_else(|| format!("{what}: not a file name"))?;
    let dir = Dir::open(parent).map_err(|e| format!("{what}: {}: {e}", parent.display()))?;
    let mut lock_name = name.to_os_string();
    lock_name.push(".lock");
    Ok(DbLock { file: lock_pid(&dir, &lock_name.to_string_lossy(), &what)? })
}

/// Mark a locked data directory as backupd's if it is still empty (a marker
/// naming the layout version and a new id, made durable), or check the
/// marker it has, giving it an id if it has none (a marker written before
/// databases were tied to data directories). Returns the id.
pub fn prepare(lock: &DirLock) -> Result<String, String> {
    let (dir, d) = (&lock.dir, lock.path.display());
    let marked = check_marked_or_empty(dir, &lock.path)?;
    if let Some(Marker { id: Some(id) }) = marked {
        return Ok(id);
    }
    let id = new_id().map_err(|e| format!("data directory {d}: cannot make an id: {e}"))?;
    let tmp = format!("{MARKER_FILE}.new");
    let _ = dir.remove_file(&tmp);
    dir.create_file(&tmp, 0o600)
        .and_then(|mut f| {
            f.write_all(format!("{MARKER_PREFIX}{LAYOUT_VERSION}\nid {id}\n").as_bytes())?;
            f.sync_all()
        })
        .and_then(|_| dir.rename(&tmp, dir, MARKER_FILE))
        .and_then(|_| dir.sync())
        .map_err(|e| format!("data directory {d}: cannot write {MARKER_FILE}: {e}"))?;
    if marked.is_some() {
        log::info!("data directory {d}: {MARKER_FILE} given the id {id}");
    } else {
        log::info!("data directory {d} created (layout {LAYOUT_VERSION})");
    }
    Ok(id)
}

/// 16 random bytes from the kernel, in hex.
fn new_id() -> io::Result<String> {
    let mut b = [0u8; 16];
    let mut got = 0;
    while got < b.len() {
        // SAFETY: writes at most the remaining length into a local buffer.
        let n = unsafe { libc::getrandom(b[got..].as_mut_ptr().cast(), b.len() - got, 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        got += n as usize;
    }
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// The data directory's folder and lock files as they were when the server
/// started (device and inode), to notice while it serves that one was
/// removed, moved or replaced: an `rm -rf` of the data directory, or lock
/// files deleted as "stale" so that a second server could start beside this
/// one. Either way this server must stop, not go on acknowledging uploads
/// into a folder nobody will find or that another server shares.
#[derive(Debug)]
pub struct Watch {
    entries: Vec<(PathBuf, (u64, u64))>,
}

impl Watch {
    /// Note each of `paths` that exists now (a path to the data directory
    /// may be a link: it is followed, as at start).
    pub fn new(paths: &[PathBuf]) -> Watch {
        use std::os::unix::fs::MetadataExt;
        let entries = paths
            .iter()
            .filter_map(|p| std::fs::metadata(p).ok().map(|m| (p.clone(), (m.dev(), m.ino()))))
            .collect();
        Watch { entries }
    }

    /// The first noted path that is gone or is another file now, and what
    /// became of it.
    pub fn changed(&self) -> Option<String> {
        use std::os::unix::fs::MetadataExt;
        self.entries.iter().find_map(|(p, id)| match std::fs::metadata(p) {
            Ok(m) if (m.dev(), m.ino()) == *id => None,
            Ok(_) => Some(format!("{} was replaced by another file", p.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Some(format!("{} was removed", p.display()))
            }
            // Another error (permissions changed, I/O): not taken as a change.
            Err(_) => None,
        })
    }
}
#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, PermissionsExt};

    #[test]
    fn nothing_is_followed() {
        let t = tempfile::tempdir().unwrap();
        let outside = t.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("victim"), b"keep").unwrap();
        let root = t.path().join("root");
        std::fs::create_dir(&root).unwrap();
        symlink(&outside, root.join("link")).unwrap();
        symlink(outside.join("victim"), root.join("flink")).unwrap();
        std::fs::write(root.join("plain"), b"x").unwrap();
        let d = Dir::open(&root).unwrap();

        // O_DIRECTORY | O_NOFOLLOW on a link: ENOTDIR, as on a file.
        assert_eq!(d.open_dir("link").unwrap_err().raw_os_error(), Some(libc::ENOTDIR));
        assert_eq!(d.ensure_dir("link").unwrap_err().raw_os_error(), Some(libc::ENOTDIR));
        assert_eq!(d.open_dir("plain").unwrap_err().raw_os_error(), Some(libc::ENOTDIR));
        assert_eq!(d.ensure_dir("plain").unwrap_err().raw_os_error(), Some(libc::ENOTDIR));
        assert!(d.open_path(&["link", "x"]).is_err());
        assert!(d.create_file("flink", 0o600).is_err());
        assert!(d.open_file("flink").is_err());
        assert_eq!(d.stat("link").unwrap().unwrap().kind, Kind::Symlink);
        let m = d.stat("plain").unwrap().unwrap();
        assert_eq!((m.kind, m.size), (Kind::File, 1));
        assert_eq!(d.stat("missing").unwrap(), None);
        for bad in ["..", "a/b", "", "/etc"] {
            assert_eq!(d.stat(bad).unwrap_err().kind(), io::ErrorKind::InvalidInput, "{bad}");
        }
        // Removing, renaming and linking act on the link itself.
        let (sub, created) = d.ensure_dir("sub").unwrap();
        assert!(created);
        assert!(!d.ensure_dir("sub").unwrap().1);
        d.rename("link", &sub, "moved").unwrap();
        assert_eq!(sub.stat("moved").unwrap().unwrap().kind, Kind::Symlink);
        d.hard_link("flink", &sub, "hl").unwrap();
        assert_eq!(sub.stat("hl").unwrap().unwrap().kind, Kind::Symlink);
        d.remove_file("flink").unwrap();
        sub.remove_file("hl").unwrap();
        sub.remove_file("moved").unwrap();
        assert_eq!(std::fs::read(outside.join("victim")).unwrap(), b"keep");
        let mut names: Vec<_> = d.entries().unwrap().into_iter().map(|(n, m)| (n, m.kind)).collect();
        names.sort();
        assert_eq!(names, vec![("plain".into(), Kind::File), ("sub".into(), Kind::Dir)]);
        assert_eq!(std::fs::metadata(root.join("sub")).unwrap().permissions().mode() & 0o777, 0o700);
        d.remove_dir("sub").unwrap();
        assert!(components("a/b/c").is_ok());
        for bad in ["a//b", "/a", "a/", "a/./b", "a/../b", "."] {
            assert!(components(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn an_unnamed_file_gets_its_name_only_where_none_is() {
        let t = tempfile::tempdir().unwrap();
        let d = Dir::open(t.path()).unwrap();
        let mut f = d.create_unnamed().unwrap();
        f.write_all(b"content").unwrap();
        // No entry until it is linked.
        assert!(d.entries().unwrap().is_empty());
        std::fs::write(t.path().join("taken"), b"keep").unwrap();
        assert_eq!(d.link_unnamed(&f, "taken").unwrap_err().raw_os_error(), Some(libc::EEXIST));
        assert_eq!(std::fs::read(t.path().join("taken")).unwrap(), b"keep");
        symlink(t.path().join("taken"), t.path().join("alink")).unwrap();
        assert_eq!(d.link_unnamed(&f, "alink").unwrap_err().raw_os_error(), Some(libc::EEXIST));
        assert_eq!(d.link_unnamed(&f, "a/b").unwrap_err().kind(), io::ErrorKind::InvalidInput);
        d.link_unnamed(&f, "named").unwrap();
        assert_eq!(std::fs::read(t.path().join("named")).unwrap(), b"content");
        let m = std::fs::metadata(t.path().join("named")).unwrap();
        assert_eq!(m.permissions().mode() & 0o777, 0o600);
        // Dropped without a name: nothing is left.
        let g = d.create_unnamed().unwrap();
        drop(g);
        assert_eq!(d.entries().unwrap().len(), 3);
    }

    /// The lock is free once dropped, but a child process that another test
    /// thread forks at that moment holds a copy of the lock's descriptor
    /// until its exec closes it (`O_CLOEXEC`), and the flock with it: wait
    /// for that release, bounded, instead of failing by chance under load.
    fn acquire_after_release(data: &Path) -> DirLock {
        let end = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match acquire(data) {
                Ok(lock) => return lock,
                Err(e) if std::time::Instant::now() < end && e.contains("in use by process") => {
                    std::thread::sleep(std::time::Duration::from_millis(5))
                }
                Err(e) => panic!("{e}"),
            }
        }
    }

    #[test]
    fn lock_marker_and_refusal() {
        let t = tempfile::tempdir().unwrap();
        // A missing directory is created and marked (by the server, not by an
        // admin command), its parents only for a snapshot; a second lock is refused.
        let nested = t.path().join("new").join("data");
        assert!(acquire(&nested).unwrap_err().contains("its parent folder does not exist"));
        assert!(!t.path().join("new").exists());
        drop(acquire_with_parents(&nested).unwrap());
        let data = t.path().join("data");
        assert!(acquire_existing(&data).unwrap_err().contains("does not exist"));
        assert!(!data.exists());
        let lock = acquire(&data).unwrap();
        prepare(&lock).unwrap();
        let msg = acquire(&data).unwrap_err();
        assert_eq!(
            msg,
            format!("data directory {} is in use by process {}", data.display(), std::process::id())
        );
        drop(lock);
        let lock = acquire_after_release(&data);
        prepare(&lock).unwrap();
        drop(lock);
        // An empty existing directory is accepted.
        let empty = t.path().join("empty");
        std::fs::create_dir(&empty).unwrap();
        prepare(&acquire(&empty).unwrap()).unwrap();
        assert!(empty.join(MARKER_FILE).is_file());
        // A non-empty unmarked one is refused, untouched.
        let home = t.path().join("home");
        std::fs::create_dir_all(home.join("tmp")).unwrap();
        std::fs::write(home.join("notes.txt"), b"mine").unwrap();
        std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o755)).unwrap();
        let msg = acquire(&home).unwrap_err();
        assert!(msg.contains("notes.txt, tmp") && msg.contains("not empty"), "{msg}");
        let mut left: Vec<_> = std::fs::read_dir(&home).unwrap().map(|e| e.unwrap().file_name()).collect();
        left.sort();
        assert_eq!(left, vec![OsString::from("notes.txt"), OsString::from("tmp")]);
        assert_eq!(std::fs::metadata(&home).unwrap().permissions().mode() & 0o777, 0o755);
        // A marker from the future is refused.
        std::fs::write(empty.join(MARKER_FILE), "backupd data directory, layout 99\n").unwrap();
        assert!(acquire(&empty).unwrap_err().contains("layout 99"));
    }
}
