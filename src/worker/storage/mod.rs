//! The data directory's layout: where files live, how names are judged, how
//! an upload is staged, published atomically and undone, and what startup
//! finds in `tmp/` and `files/`.
//!
//! Layout under `<data-dir>` (the lock and the marker: see [`crate::datadir`]):
//!
//! ```text
//! files/<client-id-hex>/<path>            verified files, current version
//! versions/<client-id-hex>/<path>/<n>     earlier verified versions (hard links), newest = largest n
//! tmp/<upload>.part                       uploads being received or waiting for 1029
//!                                         (small ones have no name there: see [`TempFiles`])
//! orphans/                                anything startup moved out of the way
//! ```
//!
//! `<path>` is the file's name as stored in the database (`FileName`): one
//! component, or a normalized relative path such as `docs/2026/report.pdf`
//! whose components the protocol layer validated. It is stored nested: every
//! folder on the way is created with `mkdirat` (0700, no link followed). In
//! `versions/`, the folder `versions/<id>/<path>/` holds the versions of
//! `<path>` as *regular files* named by a number (as [`version_number`]
//! reads it: `0123` is none), and the folders of the
//! files below `<path>/` (if `<path>` was once a file and later a folder) as
//! *directories*: the kind of the entry tells which is which, so nothing is
//! ambiguous. (A child whose name equals a version number cannot be linked
//! there: that one commit fails with 1607.)
//!
//! Everything is reached through descriptors held from start ([`Dir`]):
//! one component at a time, no symbolic link followed. An unexpected entry
//! (a link, a file where a folder belongs or the reverse) is never written or
//! removed through: the operation fails, and startup moves the entry itself
//! to `orphans/`. Only the worker thread calls into this module, and the
//! packet thread into its [`TempFiles`] (`tmp/` alone).

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use super::fault::{self, Point};
use super::Usage;
use crate::datadir::{components, Dir, Kind, Meta};
use crate::protocol::{id_hex, parse_id_hex, ClientId};

// The name rules live in the protocol module; re-exported for the worker.
pub use crate::protocol::path::{validate_file_name, NameError, MAX_FILE_NAME};

/// The data directory and the descriptors of its folders, held for the life
/// of the process (syncfs reports writeback errors through the descriptor
/// that asked last, so the root's must stay open).
#[derive(Debug)]
pub struct Storage {
    root: PathBuf,
    dir: Dir,
    files: Dir,
    versions: Dir,
    tmp: Dir,
}

/// The temp files of uploads being received (`tmp/<upload>.part`), as the
/// packet thread sees the data directory: it creates and removes its own
/// uploads' temp files there and touches nothing else. Once an upload is
/// received, its temp file is the committing worker's ([`Storage`]).
///
/// A small upload (all of it in its first content piece) gets a file
/// without a name instead ([`TempFiles::create_unnamed`], `O_TMPFILE` in
/// `tmp/`), which the commit links into place: `tmp/` then changes with
/// no small file, so a batch's sync does not write its folder and a new
/// temp file never waits for that write. At most [`UNNAMED_MAX`] live at
/// once; where the filesystem has none, every upload gets a named one.
#[derive(Debug)]
pub struct TempFiles {
    root: PathBuf,
    tmp: Dir,
    /// How many files without a name are held; None: not available here.
    unnamed: Option<Arc<AtomicUsize>>,
    /// How many may be: [`UNNAMED_MAX`], or fewer where the descriptor limit
    /// leaves fewer to spare.
    unnamed_max: usize,
}

/// Temp files without a name held at once (received or being received):
/// each holds a descriptor (of the 64 that the server keeps beyond
/// `--max-connections`) and, after a machine crash on a filesystem without
/// a journal, its blocks until the next `fsck` (at most one content piece
/// each: 128 KiB). Past it, uploads get named temp files.
pub const UNNAMED_MAX: usize = 32;

/// A small upload's temp file without a name, and its place among the
/// [`UNNAMED_MAX`] (given back when dropped, with the file: closed, the
/// kernel frees it unless the commit linked it into place).
pub type Unnamed = (File, UnnamedSlot);

/// A place among the [`UNNAMED_MAX`] files without a name.
#[derive(Debug)]
pub struct UnnamedSlot(Arc<AtomicUsize>);

impl Drop for UnnamedSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl TempFiles {
    /// A temp file without a name for a small upload, if one is available
    /// (supported here, fewer than [`UNNAMED_MAX`] held, created); None:
    /// use [`TempFiles::create`].
    pub fn create_unnamed(&self) -> Option<Unnamed> {
        let held = self.unnamed.as_ref()?;
        let max = self.unnamed_max;
        held.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1)).ok()?;
        let slot = UnnamedSlot(Arc::clone(held));
        match self.tmp.create_unnamed() {
            Ok(file) => Some((file, slot)),
            Err(e) => {
                log::debug!("worker: no temp file without a name ({e}); a named one instead");
                None
            }
        }
    }

    /// Create a new temp file for an upload, mode 0600 (never through a link).
    pub fn create(&self, upload: u64) -> io::Result<File> {
        self.tmp.create_file(temp_name(upload), 0o600)
    }

    /// Remove an upload's temp file, if there is one.
    pub fn remove(&self, upload: u64) -> io::Result<()> {
        remove_temp(&self.tmp, upload)
    }

    /// Where a temp file is (for messages).
    pub fn path(&self, upload: u64) -> PathBuf {
        temp_path(&self.root, upload)
    }
}

fn temp_path(root: &Path, upload: u64) -> PathBuf {
    root.join("tmp").join(temp_name(upload))
}

fn remove_temp(tmp: &Dir, upload: u64) -> io::Result<()> {
    match tmp.remove_file(temp_name(upload)) {
        Err(e) if !not_found(&e) => Err(e),
        _ => Ok(()),
    }
}

/// Directories whose entries changed and must be made durable.
#[derive(Debug, Default)]
pub struct Dirty {
    dirs: Vec<(String, Dir)>,
    changed: bool,
    /// Only whether something changed is kept (see [`Dirty::untracked`]).
    untracked: bool,
}

impl Dirty {
    /// For `--sync-mode syncfs`: one syncfs covers every folder, so only
    /// whether one changed matters (no descriptor kept per folder).
    pub fn untracked() -> Dirty {
        Dirty { untracked: true, ..Dirty::default() }
    }

    fn push(&mut self, rel: &str, dir: &Dir) -> io::Result<()> {
        self.changed = true;
        if !self.untracked && !self.dirs.iter().any(|(r, _)| r == rel) {
            self.dirs.push((rel.to_string(), dir.try_clone()?));
        }
        Ok(())
    }

    /// Nothing changed since the last `clear`.
    pub fn is_empty(&self) -> bool {
        !self.changed
    }

    /// The directories (relative to the data directory) and their descriptors.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Dir)> {
        self.dirs.iter().map(|(r, d)| (r.as_str(), d))
    }

    pub fn clear(&mut self) {
        self.dirs.clear();
        self.changed = false;
    }
}

fn unexpected(what: &str, kind: Kind) -> io::Error {
    io::Error::other(format!("{what} is a {kind:?}, not what backupd put there"))
}

fn not_found(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound
}

/// The temp-file name of an upload; startup removes only names of this form.
fn temp_name(upload: u64) -> String {
    format!("{upload}.part")
}

fn is_temp_name(name: &OsStr) -> bool {
    name.to_str()
        .and_then(|n| n.strip_suffix(".part"))
        .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
}

fn now_stamp() -> u64 {
    use std::time::{SystemTime, UNIX_EPOCH};
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

/// Split "a/b/c" into (["a", "b"], "c"), checking every component.
fn split_leaf(rel: &str) -> io::Result<(Vec<&str>, &str)> {
    let mut parts = components(rel)?;
    let leaf = parts.pop().unwrap_or_default();
    Ok((parts, leaf))
}

impl Storage {
    /// Open (creating what is missing) the layout in a data directory that
    /// [`crate::datadir`] locked and marked. A link or file where one of its
    /// folders belongs is moved to `orphans/` and the folder made anew.
    pub fn open(root: &Path) -> io::Result<Storage> {
        if !root.exists() {
            std::os::unix::fs::DirBuilderExt::mode(&mut std::fs::DirBuilder::new(), 0o700)
                .recursive(true)
                .create(root)?;
        }
        let dir = Dir::open(root)?;
        // Backups are private: tighten a pre-existing (empty or marked) directory too.
        dir.set_mode(0o700)?;
        let own = |name: &str| -> io::Result<Dir> {
            match dir.ensure_dir(name) {
                Ok((d, _)) => Ok(d),
                Err(e) if matches!(e.raw_os_error(), Some(libc::ELOOP) | Some(libc::ENOTDIR)) => {
                    let dest = orphan(&dir, &dir, OsStr::new(name), name)?;
                    log::error!("startup: {name} in the data directory is not a folder; moved to {dest}");
                    Ok(dir.ensure_dir(name)?.0)
                }
                Err(e) => Err(e),
            }
        };
        let (files, versions, tmp) = (own("files")?, own("versions")?, own("tmp")?);
        Ok(Storage { root: root.to_path_buf(), dir, files, versions, tmp })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// A descriptor of the data directory, for a thread that reads stored
    /// files (the S3 replicator) through [`Dir`] without following links.
    pub fn root_dir(&self) -> io::Result<Dir> {
        self.dir.try_clone()
    }

    /// Path of a verified file, relative to the data directory (as stored in the DB).
    pub fn relative_path(id: &ClientId, name: &str) -> String {
        format!("files/{}/{}", id_hex(id), name)
    }

    /// The folder of a file's earlier versions, relative to the data directory
    /// (its regular files are the versions, see [`Storage::versions`]).
    pub fn relative_versions_dir(id: &ClientId, name: &str) -> String {
        format!("versions/{}/{}", id_hex(id), name)
    }

    /// Version `n` of a file, relative to the data directory.
    pub fn relative_version_path(id: &ClientId, name: &str, n: u64) -> String {
        format!("{}/{n}", Storage::relative_versions_dir(id, name))
    }
}

/// Is there anything below `dir` but folders as empty?
fn holds_anything(dir: &Dir) -> io::Result<bool> {
    for (name, meta) in dir.entries()? {
        if meta.kind != Kind::Dir || holds_anything(&dir.open_dir(&name)?)? {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The number of the version whose entry is named `name`, if that is a
/// version's name: the decimal number as [`Storage::relative_version_path`]
/// writes it, nothing else. `0123` or `+5` (which a number parser would read
/// as 123 and 5) are strays: never listed, counted or pruned as versions.
pub fn version_number(name: &OsStr) -> Option<u64> {
    let s = name.to_str()?;
    s.parse().ok().filter(|n: &u64| n.to_string() == s)
}

impl Storage {
    /// A handle on `tmp/` alone, for the packet thread (see [`TempFiles`]),
    /// with at most `unnamed_max` temp files without a name at once.
    /// Whether those can be made and named here is tried once, now, with a
    /// file linked into `tmp/` and removed.
    pub fn temp_files(&self, unnamed_max: usize) -> io::Result<TempFiles> {
        let tried = (unnamed_max > 0).then(|| self.try_unnamed());
        let unnamed = match tried {
            None => None,
            Some(Ok(())) => Some(Arc::new(AtomicUsize::new(0))),
            Some(Err(e)) => {
                log::info!(
                    "temp files without a name are not available in {} ({e}): small uploads use named ones",
                    self.root.join("tmp").display()
                );
                None
            }
        };
        Ok(TempFiles { root: self.root.clone(), tmp: self.tmp.try_clone()?, unnamed, unnamed_max })
    }

    fn try_unnamed(&self) -> io::Result<()> {
        fault::check(Point::Unnamed, "")?;
        let f = self.tmp.create_unnamed()?;
        // A temp file's name: one left by a crash here goes with the others at start.
        let probe = temp_name(u64::MAX);
        self.tmp.link_unnamed(&f, &probe)?;
        self.tmp.remove_file(&probe)
    }

    /// Where a temp file is (for messages and tests; it is opened through `tmp/`'s descriptor).
    pub fn temp_path(&self, upload: u64) -> PathBuf {
        temp_path(&self.root, upload)
    }

    /// Open a staged temp file (to sync it).
    pub fn open_temp(&self, upload: u64) -> io::Result<File> {
        self.tmp.open_file(temp_name(upload))
    }

    /// Remove an upload's temp file, if there is one.
    pub fn remove_temp(&self, upload: u64) -> io::Result<()> {
        remove_temp(&self.tmp, upload)
    }

    /// Empty tmp/ at start: its uploads were never acknowledged. Only regular
    /// files named like our temp files are removed; anything else is moved to
    /// orphans/ (a link itself, never its target). Returns (removed, moved).
    pub fn clear_tmp(&self) -> io::Result<(usize, usize)> {
        let (mut removed, mut moved) = (0, 0);
        for (name, meta) in self.tmp.entries()? {
            if meta.kind == Kind::File && is_temp_name(&name) {
                self.tmp.remove_file(&name)?;
                removed += 1;
            } else {
                let rel = format!("tmp/{}", name.to_string_lossy());
                let dest = orphan(&self.dir, &self.tmp, &name, &rel)?;
                log::error!("startup: unexpected {:?} {rel:?} moved to {dest:?}", meta.kind);
                moved += 1;
            }
        }
        Ok((removed, moved))
    }

    /// The folder `top/<parts...>`, opened without creating anything; None
    /// when a component does not exist.
    fn find(&self, top: &Dir, parts: &[&str]) -> io::Result<Option<Dir>> {
        match top.open_path(parts) {
            Ok(d) => Ok(Some(d)),
            Err(e) if not_found(&e) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The folder `top/<parts...>`, creating what is missing (0700); each
    /// folder whose entries changed is added to `dirty`.
    fn make(&self, top_rel: &str, top: &Dir, parts: &[&str], dirty: &mut Dirty) -> io::Result<(String, Dir)> {
        let (mut rel, mut cur) = (top_rel.to_string(), None::<Dir>);
        for p in parts {
            let base = cur.as_ref().unwrap_or(top);
            let (d, created) = base.ensure_dir(p)?;
            if created {
                dirty.push(&rel, base)?;
            }
            rel = format!("{rel}/{p}");
            cur = Some(d);
        }
        let cur = match cur {
            Some(d) => d,
            None => top.try_clone()?,
        };
        Ok((rel, cur))
    }

    /// The top folder and the components below it of a data-directory-relative path.
    fn top<'a>(&self, rel: &'a str) -> io::Result<(&Dir, Vec<&'a str>, &'a str)> {
        let (parts, leaf) = split_leaf(rel)?;
        let top = match parts.first() {
            Some(&"files") => &self.files,
            Some(&"versions") => &self.versions,
            _ => {
                return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("not a stored path: {rel}")))
            }
        };
        Ok((top, parts[1..].to_vec(), leaf))
    }

    /// Existing version numbers of a file, ascending (regular files only).
    pub fn versions(&self, id: &ClientId, name: &str) -> Vec<u64> {
        let hex = id_hex(id);
        let mut parts = vec![hex.as_str()];
        parts.extend(name.split('/'));
        let mut v: Vec<u64> = match self.find(&self.versions, &parts) {
            Ok(Some(d)) => d
                .entries()
                .unwrap_or_default()
                .into_iter()
                .filter(|(_, m)| m.kind == Kind::File)
                .filter_map(|(n, _)| version_number(&n))
                .collect(),
            _ => Vec::new(),
        };
        v.sort_unstable();
        v
    }

    /// Delete the oldest versions so that at most `keep` remain. Returns the
    /// numbers of those removed. Folders left empty are removed, versions/<id> included.
    /// Each version removed is added to `freed` (one file, its size), also
    /// when a later removal fails.
    pub fn prune_versions(
        &self,
        id: &ClientId,
        name: &str,
        keep: usize,
        freed: &mut Usage,
    ) -> io::Result<Vec<u64>> {
        let v = self.versions(id, name);
        let excess = v.len().saturating_sub(keep);
        if excess == 0 {
            return Ok(Vec::new());
        }
        let hex = id_hex(id);
        let mut parts = vec![hex.as_str()];
        parts.extend(components(name)?);
        let Some(dir) = self.find(&self.versions, &parts)? else { return Ok(Vec::new()) };
        for n in &v[..excess] {
            let size = dir.stat(n.to_string())?.map_or(0, |m| m.size);
            dir.remove_file(n.to_string())?;
            freed.files += 1;
            freed.bytes += size;
        }
        if excess == v.len() {
            // Best effort: a folder still holding something stays.
            for depth in (0..parts.len()).rev() {
                let Ok(Some(parent)) = self.find(&self.versions, &parts[..depth]) else { break };
                if parent.remove_dir(parts[depth]).is_err() {
                    break;
                }
            }
        }
        Ok(v[..excess].to_vec())
    }
}

/// What publishing one file changed, so that it can be undone when the
/// database commit that must follow it fails (or after a crash, from the
/// intent recorded in the database). Paths are relative to the data directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    /// The final path, `files/<id>/<name>`.
    pub target: String,
    /// Where the previous version is preserved (a hard link), if there is one:
    /// `versions/<id>/<name>/<n>`.
    pub saved_previous: Option<String>,
}

impl Storage {
    /// Plan a publish: decide where the previous version (if any) will be kept.
    /// Nothing on disk changes. The previous version is kept even with
    /// `--keep-versions 0`, so that the publish can be undone until its commit;
    /// pruning removes it afterwards. Fails when something other than a file
    /// (a link, a folder) is at the target or a component on its way is not a folder.
    ///
    /// Also returns the target's folder, when it exists, as opened for the
    /// plan: `install` renames into it (one open per file, not two).
    pub fn plan_publish(&self, id: &ClientId, name: &str, stamp: u64) -> io::Result<(Publish, Option<Dir>)> {
        let target = Storage::relative_path(id, name);
        let (top, parts, leaf) = self.top(&target)?;
        let folder = self.find(top, &parts)?;
        let existing = match &folder {
            Some(d) => d.stat(leaf)?,
            None => None,
        };
        let saved_previous = match existing {
            None => None,
            Some(Meta { kind: Kind::File, .. }) => Some(Storage::relative_version_path(id, name, stamp)),
            Some(m) => return Err(unexpected(&target, m.kind)),
        };
        Ok((Publish { target, saved_previous }, folder))
    }

    /// Publish step 1: keep the current version (if the plan says so) as a
    /// hard link under versions/. Must be durable before step 2 replaces the
    /// current file, or a crash could lose both. Directories touched are
    /// added to `dirty` (the caller syncs them).
    pub fn save_previous(&self, p: &Publish, name: &str, dirty: &mut Dirty) -> io::Result<()> {
        let Some(prev) = &p.saved_previous else { return Ok(()) };
        let (_, vparts, n) = self.top(prev)?;
        let (vrel, vdir) = self.make("versions", &self.versions, &vparts, dirty)?;
        let (top, parts, leaf) = self.top(&p.target)?;
        let src = top.open_path(&parts)?;
        fault::check(Point::Link, name)?;
        src.hard_link(leaf, &vdir, n)?;
        dirty.push(&vrel, &vdir)
    }

    /// Publish step 2: rename the staged temp file over the target, into
    /// `folder` (the target's folder as `plan_publish` found it) or into the
    /// folders created on its way. Directories touched are added to `dirty`.
    ///
    /// A temp file without a name (`unnamed`) is linked in place of the
    /// rename, which never replaces an entry; over a previous version it is
    /// first linked into `tmp/` under its upload's name and renamed from there.
    pub fn install(
        &self,
        upload: u64,
        unnamed: Option<&File>,
        p: &Publish,
        folder: Option<&Dir>,
        name: &str,
        dirty: &mut Dirty,
    ) -> io::Result<()> {
        let (_, parts, leaf) = self.top(&p.target)?;
        let made;
        let (rel, dir) = match folder {
            Some(d) => (p.target.rsplit_once('/').map_or("files", |(r, _)| r), d),
            None => {
                made = self.make("files", &self.files, &parts, dirty)?;
                (made.0.as_str(), &made.1)
            }
        };
        fault::check(Point::Rename, name)?;
        match unnamed {
            Some(f) if p.saved_previous.is_none() => dir.link_unnamed(f, leaf)?,
            Some(f) => {
                self.tmp.link_unnamed(f, temp_name(upload))?;
                self.tmp.rename(temp_name(upload), dir, leaf)?;
            }
            None => self.tmp.rename(temp_name(upload), dir, leaf)?,
        }
        dirty.push(rel, dir)
    }

    /// Undo a publish: put the previous version back, or remove the new file.
    /// Safe to call whether or not the rename itself happened, and again.
    /// Never removes or renames anything that is not a regular file.
    pub fn undo(&self, p: &Publish) -> io::Result<()> {
        let (top, parts, leaf) = self.top(&p.target)?;
        let target_dir = self.find(top, &parts)?;
        let current = match &target_dir {
            Some(d) => d.stat(leaf)?,
            None => None,
        };
        if let Some(m) = current.filter(|m| m.kind != Kind::File) {
            return Err(unexpected(&p.target, m.kind));
        }
        match &p.saved_previous {
            Some(prev) => {
                let (vtop, vparts, n) = self.top(prev)?;
                let Some(vdir) = self.find(vtop, &vparts)? else { return Ok(()) };
                let saved = match vdir.stat(n)? {
                    Some(m) if m.kind == Kind::File => m,
                    // The link was never made, so the rename was not either.
                    None => return Ok(()),
                    Some(m) => return Err(unexpected(prev, m.kind)),
                };
                match (target_dir, current) {
                    // The rename did not happen: the link is a second name of the current file.
                    (_, Some(cur)) if cur.ino == saved.ino => vdir.remove_file(n),
                    (Some(d), _) => vdir.rename(n, &d, leaf),
                    (None, _) => Err(io::Error::other(format!("the folder of {} is gone", p.target))),
                }
            }
            None => match (target_dir, current) {
                (Some(d), Some(_)) => d.remove_file(leaf),
                _ => Ok(()),
            },
        }
    }

    /// The folders holding these stored paths (those that can be opened), to sync.
    pub fn parent_dirs<'a>(&self, targets: impl IntoIterator<Item = &'a str>) -> Dirty {
        let mut dirty = Dirty::default();
        for t in targets {
            if let Ok((top, parts, _)) = self.top(t) {
                if let Ok(Some(d)) = self.find(top, &parts) {
                    let rel = t.rsplit_once('/').map_or(t, |(p, _)| p);
                    let _ = dirty.push(rel, &d);
                }
            }
        }
        dirty
    }

    /// Does files/ or versions/ hold anything for client `id`: an entry named
    /// by it that is not a folder, or a folder with anything in it but
    /// folders as empty (whatever a non-folder is, it is not nothing)?
    pub fn holds_client(&self, id: &ClientId) -> io::Result<bool> {
        let hex = id_hex(id);
        for top in [&self.files, &self.versions] {
            let held = match top.stat(&hex)? {
                None => false,
                Some(Meta { kind: Kind::Dir, .. }) => holds_anything(&top.open_dir(&hex)?)?,
                Some(_) => true,
            };
            if held {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// What versions/ holds per client: every regular file below
    /// `versions/<client-id>/` named as a version ([`version_number`]) is a
    /// kept version (one file, its size). One walk at start, one `fstatat`
    /// per entry; entries that are not ours (a folder not named by a client
    /// id, a link, a stray file) are not counted.
    pub fn version_usage(&self) -> io::Result<HashMap<ClientId, Usage>> {
        fn walk(dir: &Dir, u: &mut Usage) -> io::Result<()> {
            for (name, meta) in dir.entries()? {
                match meta.kind {
                    // A stray (not named as a version) is none.
                    Kind::File if version_number(&name).is_some() => {
                        u.files += 1;
                        u.bytes += meta.size;
                    }
                    Kind::Dir => walk(&dir.open_dir(&name)?, u)?,
                    _ => {}
                }
            }
            Ok(())
        }
        let mut out = HashMap::new();
        for (name, meta) in self.versions.entries()? {
            let Some(id) = name.to_str().and_then(parse_id_hex) else { continue };
            if meta.kind == Kind::Dir {
                let mut u = Usage::default();
                walk(&self.versions.open_dir(&name)?, &mut u)?;
                out.insert(id, u);
            }
        }
        Ok(out)
    }

    /// Every regular file below files/ and versions/, as (path relative to
    /// the data directory, size): the stored copies, for the S3 tier's cache.
    pub fn list_stored(&self) -> io::Result<Vec<(String, u64)>> {
        let local = tier::Local::new(self.dir.try_clone()?);
        let mut out = tier::Tier::list(&local, "files")?;
        out.extend(tier::Tier::list(&local, "versions")?);
        Ok(out)
    }

    /// Remove a stored copy that the bucket holds (the S3 tier's cache
    /// eviction): a regular file only. Returns its size (0 when it was gone).
    pub fn evict(&self, rel: &str) -> io::Result<u64> {
        let (top, parts, leaf) = self.top(rel)?;
        let Some(dir) = self.find(top, &parts)? else { return Ok(0) };
        match dir.stat(leaf)? {
            Some(m) if m.kind == Kind::File => {
                dir.remove_file(leaf)?;
                Ok(m.size)
            }
            Some(m) => Err(unexpected(rel, m.kind)),
            None => Ok(0),
        }
    }

    /// Free bytes for an unprivileged writer on the data directory's
    /// filesystem (`fstatvfs` of the directory's descriptor).
    pub fn free_bytes(&self) -> io::Result<u64> {
        self.dir.free_bytes()
    }

    /// Make everything written to the data directory's filesystem durable
    /// (file contents and directory entries) with one `syncfs(2)`.
    pub fn sync_filesystem(&self) -> io::Result<()> {
        self.dir.syncfs()
    }

    /// Walk files/ (every folder, nested names included): regular files for
    /// which `keep(path, size)` says no, links and anything else unexpected
    /// are moved to orphans/ (each logged). Returns how many were moved.
    /// Depth first: one descriptor open per level.
    pub fn scan_files(&self, mut keep: impl FnMut(&str, u64) -> bool) -> io::Result<usize> {
        self.scan(&self.files, "files", &mut keep)
    }

    fn scan(&self, dir: &Dir, rel: &str, keep: &mut impl FnMut(&str, u64) -> bool) -> io::Result<usize> {
        let mut moved = 0;
        for (name, meta) in dir.entries()? {
            let path = format!("{rel}/{}", name.to_string_lossy());
            match meta.kind {
                Kind::Dir => moved += self.scan(&dir.open_dir(&name)?, &path, keep)?,
                Kind::File if keep(&path, meta.size) => {}
                Kind::File => {
                    let dest = orphan(&self.dir, dir, &name, &path)?;
                    log::warn!("startup: {path:?} has no verified database row; moved to {dest:?}");
                    moved += 1;
                }
                kind => {
                    let dest = orphan(&self.dir, dir, &name, &path)?;
                    log::error!("startup: unexpected {kind:?} {path:?} moved to {dest:?}");
                    moved += 1;
                }
            }
        }
        Ok(moved)
    }
}

/// Move the entry `name` of `parent` (known as `rel` in the data directory)
/// into `<root>/orphans/` under a flattened name cut to 200 bytes. The entry
/// itself moves (a link, not its target). Returns where it went.
fn orphan(root: &Dir, parent: &Dir, name: &OsStr, rel: &str) -> io::Result<String> {
    let mut flat: String = rel.strip_prefix("files/").unwrap_or(rel).replace('/', "_");
    let mut cut = flat.len().min(200);
    while !flat.is_char_boundary(cut) {
        cut -= 1;
    }
    flat.truncate(cut);
    let orphans = match root.ensure_dir("orphans") {
        Ok((d, _)) => d,
        Err(e) if matches!(e.raw_os_error(), Some(libc::ELOOP) | Some(libc::ENOTDIR)) => {
            // orphans itself is not a folder: set it aside in the data directory.
            let aside = format!("orphans.unexpected-{}", now_stamp());
            root.rename("orphans", root, &aside)?;
            log::error!("startup: orphans in the data directory is not a folder; renamed to {aside}");
            root.ensure_dir("orphans")?.0
        }
        Err(e) => return Err(e),
    };
    let mut stamp = now_stamp();
    while orphans.stat(format!("{stamp}-{flat}"))?.is_some() {
        stamp += 1;
    }
    let dest = format!("{stamp}-{flat}");
    parent.rename(name, &orphans, &dest)?;
    Ok(format!("orphans/{dest}"))
}

#[cfg(test)]
mod tests;
pub mod tier;
