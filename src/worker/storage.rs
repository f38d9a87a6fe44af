//! The data directory: where files live, how names are judged, how an upload
//! is staged and how it is published atomically.
//!
//! Layout under `<data-dir>`:
//!
//! ```text
//! files/<client-id-hex>/<name>            verified files, current version
//! versions/<client-id-hex>/<name>/<n>     earlier verified versions (hard links), newest = largest n
//! tmp/<upload>.part                       uploads being received or waiting for 1029
//! orphans/                                anything reconciliation moved out of files/
//! ```
//!
//! Every path is built from the data directory, a hex client id and a name
//! that passed [`validate_file_name`], so nothing can be written outside the
//! data directory. Only the worker thread calls into this module.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::protocol::{id_hex, ClientId};

// The name rules live in the protocol module; re-exported for the worker.
pub use crate::protocol::path::{validate_file_name, NameError, MAX_FILE_NAME};

/// The data directory and the paths inside it.
#[derive(Debug, Clone)]
pub struct Storage {
    root: PathBuf,
}

/// Create a directory (and parents) with mode 0700.
pub fn create_private_dir(path: &Path) -> io::Result<()> {
    fs::DirBuilder::new().recursive(true).mode(0o700).create(path)
}

/// fsync a directory so that renames and new entries in it are durable.
pub fn sync_dir(path: &Path) -> io::Result<()> {
    File::open(path)?.sync_all()
}

impl Storage {
    /// Open (creating if needed) the data directory layout.
    pub fn open(root: &Path) -> io::Result<Storage> {
        let s = Storage { root: root.to_path_buf() };
        create_private_dir(root)?;
        // Tighten a pre-existing directory too: backups are private.
        fs::set_permissions(root, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
        for d in ["files", "versions", "tmp"] {
            create_private_dir(&root.join(d))?;
        }
        Ok(s)
    }

    /// The layout of an existing data directory, without touching the disk
    /// (the admin commands read a directory that a server may be using).
    pub fn at(root: &Path) -> Storage {
        Storage { root: root.to_path_buf() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    pub fn files_dir(&self) -> PathBuf {
        self.root.join("files")
    }

    pub fn client_dir(&self, id: &ClientId) -> PathBuf {
        self.files_dir().join(id_hex(id))
    }

    /// Path of a verified file, relative to the data directory (as stored in the DB).
    pub fn relative_path(id: &ClientId, name: &str) -> String {
        format!("files/{}/{}", id_hex(id), name)
    }

    pub fn file_path(&self, id: &ClientId, name: &str) -> PathBuf {
        self.client_dir(id).join(name)
    }

    pub fn versions_dir(&self, id: &ClientId, name: &str) -> PathBuf {
        self.versions_root().join(id_hex(id)).join(name)
    }

    /// Where the earlier versions of every file of every client live.
    pub fn versions_root(&self) -> PathBuf {
        self.root.join("versions")
    }

    /// Path of version `n` of a file (see [`Storage::versions`]).
    pub fn version_path(&self, id: &ClientId, name: &str, n: u64) -> PathBuf {
        self.versions_dir(id, name).join(n.to_string())
    }

    pub fn temp_path(&self, upload: u64) -> PathBuf {
        self.tmp_dir().join(format!("{upload}.part"))
    }

    /// Create a new temp file for an upload, mode 0600.
    pub fn create_temp(&self, upload: u64) -> io::Result<File> {
        OpenOptions::new().write(true).create_new(true).mode(0o600).open(self.temp_path(upload))
    }

    /// Remove every leftover temp file (called at start: they belong to uploads
    /// that a crash interrupted and that were never acknowledged).
    pub fn clear_tmp(&self) -> io::Result<usize> {
        let mut n = 0;
        for e in fs::read_dir(self.tmp_dir())? {
            let e = e?;
            let p = e.path();
            if e.file_type()?.is_dir() {
                fs::remove_dir_all(&p)?;
            } else {
                fs::remove_file(&p)?;
            }
            n += 1;
        }
        Ok(n)
    }

    /// Existing version numbers of a file, ascending.
    pub fn versions(&self, id: &ClientId, name: &str) -> Vec<u64> {
        let mut v: Vec<u64> = match fs::read_dir(self.versions_dir(id, name)) {
            Ok(rd) => rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect(),
            Err(_) => Vec::new(),
        };
        v.sort_unstable();
        v
    }

    /// Delete the oldest versions so that at most `keep` remain. Returns how many were removed.
    pub fn prune_versions(&self, id: &ClientId, name: &str, keep: usize) -> io::Result<usize> {
        let v = self.versions(id, name);
        let excess = v.len().saturating_sub(keep);
        let dir = self.versions_dir(id, name);
        for n in &v[..excess] {
            fs::remove_file(dir.join(n.to_string()))?;
        }
        if keep == 0 && excess == v.len() && !v.is_empty() {
            let _ = fs::remove_dir(&dir);
        }
        Ok(excess)
    }
}

/// What publishing one file changed, so that it can be undone when the
/// database commit that must follow it fails (or after a crash, from the
/// intent recorded in the database).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    /// The final path.
    pub target: PathBuf,
    /// Where the previous version was preserved (a hard link), if there was one.
    pub saved_previous: Option<PathBuf>,
}

impl Publish {
    /// Undo a publish: put the previous version back, or remove the new file.
    /// Safe to call whether or not the rename itself happened.
    pub fn undo(&self) -> io::Result<()> {
        match &self.saved_previous {
            Some(prev) if prev.exists() => fs::rename(prev, &self.target),
            Some(_) => Ok(()), // the link was never made, so the rename was not either
            None => match fs::remove_file(&self.target) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            },
        }
    }
}

impl Storage {
    /// Plan a publish: decide where the previous version (if any) will be kept.
    /// Nothing on disk changes. The previous version is kept even with
    /// `--keep-versions 0`, so that the publish can be undone until its commit;
    /// pruning removes it afterwards.
    pub fn plan_publish(&self, id: &ClientId, name: &str, stamp: u64) -> Publish {
        let target = self.file_path(id, name);
        let saved_previous =
            if target.exists() { Some(self.versions_dir(id, name).join(stamp.to_string())) } else { None };
        Publish { target, saved_previous }
    }

    /// Publish step 1: keep the current version (if the plan says so) as a
    /// hard link under versions/. Must be durable before step 2 replaces the
    /// current file, or a crash could lose both. Directories touched are
    /// added to `dirty` (the caller syncs them).
    pub fn save_previous(&self, p: &Publish, dirty: &mut Vec<PathBuf>) -> io::Result<()> {
        let Some(prev) = &p.saved_previous else { return Ok(()) };
        let vdir = prev.parent().map(Path::to_path_buf).unwrap_or_else(|| self.root.join("versions"));
        if !vdir.exists() {
            create_private_dir(&vdir)?;
            if let Some(pp) = vdir.parent() {
                push_unique(dirty, pp.to_path_buf());
                if let Some(ppp) = pp.parent() {
                    push_unique(dirty, ppp.to_path_buf());
                }
            }
        }
        fs::hard_link(&p.target, prev)?;
        push_unique(dirty, vdir);
        Ok(())
    }

    /// Publish step 2: rename the staged temp file over the target.
    /// Directories touched are added to `dirty` (the caller syncs them).
    pub fn install(&self, temp: &Path, p: &Publish, dirty: &mut Vec<PathBuf>) -> io::Result<()> {
        let dir = p.target.parent().map(Path::to_path_buf).unwrap_or_else(|| self.files_dir());
        if !dir.exists() {
            create_private_dir(&dir)?;
            push_unique(dirty, self.files_dir());
        }
        fs::rename(temp, &p.target)?;
        push_unique(dirty, dir);
        Ok(())
    }

    /// Make everything written to the data directory's filesystem durable
    /// (file contents and directory entries) with one `syncfs(2)`.
    pub fn sync_filesystem(&self) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        let dir = File::open(&self.root)?;
        // SAFETY: syncfs takes a valid open descriptor, owned by `dir` for the call.
        if unsafe { libc::syncfs(dir.as_raw_fd()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Move a file found under files/ without a verified database row out of
    /// the way, into orphans/ (kept for the operator, never served as verified).
    pub fn move_to_orphans(&self, path: &Path, stamp: u64) -> io::Result<PathBuf> {
        let rel = path.strip_prefix(self.files_dir()).unwrap_or(path);
        let mut flat: String = rel.to_string_lossy().replace('/', "_");
        let mut cut = flat.len().min(200);
        while !flat.is_char_boundary(cut) {
            cut -= 1;
        }
        flat.truncate(cut);
        let dest_dir = self.root.join("orphans");
        create_private_dir(&dest_dir)?;
        let dest = dest_dir.join(format!("{stamp}-{flat}"));
        fs::rename(path, &dest)?;
        Ok(dest)
    }
}

pub fn push_unique(v: &mut Vec<PathBuf>, p: PathBuf) {
    if !v.contains(&p) {
        v.push(p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_and_undo_keep_the_previous_version() {
        let dir = tempfile::tempdir().unwrap();
        let s = Storage::open(&dir.path().join("data")).unwrap();
        let id = [0xab; 16];
        let mut dirty = Vec::new();
        let t1 = s.temp_path(1);
        fs::write(&t1, b"one").unwrap();
        let p1 = s.plan_publish(&id, "f", 10);
        assert_eq!(p1.saved_previous, None);
        s.save_previous(&p1, &mut dirty).unwrap();
        s.install(&t1, &p1, &mut dirty).unwrap();
        let t2 = s.temp_path(2);
        fs::write(&t2, b"two").unwrap();
        let p2 = s.plan_publish(&id, "f", 11);
        s.save_previous(&p2, &mut dirty).unwrap();
        s.install(&t2, &p2, &mut dirty).unwrap();
        assert_eq!(fs::read(s.file_path(&id, "f")).unwrap(), b"two");
        assert_eq!(s.versions(&id, "f"), vec![11]);
        p2.undo().unwrap();
        assert_eq!(fs::read(s.file_path(&id, "f")).unwrap(), b"one");
        assert!(s.versions(&id, "f").is_empty());
        p1.undo().unwrap();
        assert!(!s.file_path(&id, "f").exists());
    }

    #[test]
    fn undo_with_keep_versions_0_restores_the_verified_file() {
        // With --keep-versions 0 a publish over a verified file must still be
        // undoable (failed commit, or a crash before it): the previous file is
        // linked for the duration of the publish and pruned only after commit.
        let dir = tempfile::tempdir().unwrap();
        let s = Storage::open(&dir.path().join("data")).unwrap();
        let id = [0xcd; 16];
        let mut dirty = Vec::new();
        let t1 = s.temp_path(1);
        fs::write(&t1, b"verified").unwrap();
        let p1 = s.plan_publish(&id, "f", 10);
        s.save_previous(&p1, &mut dirty).unwrap();
        s.install(&t1, &p1, &mut dirty).unwrap();
        let t2 = s.temp_path(2);
        fs::write(&t2, b"unconfirmed").unwrap();
        let p2 = s.plan_publish(&id, "f", 11);
        s.save_previous(&p2, &mut dirty).unwrap();
        s.install(&t2, &p2, &mut dirty).unwrap();
        p2.undo().unwrap();
        assert_eq!(fs::read(s.file_path(&id, "f")).unwrap(), b"verified");
        // After a successful commit, pruning to 0 leaves no version behind.
        let p3 = s.plan_publish(&id, "f", 12);
        s.save_previous(&p3, &mut dirty).unwrap();
        fs::write(&t2, b"second").unwrap();
        s.install(&t2, &p3, &mut dirty).unwrap();
        s.prune_versions(&id, "f", 0).unwrap();
        assert!(s.versions(&id, "f").is_empty());
        assert!(!s.versions_dir(&id, "f").exists());
        assert_eq!(fs::read(s.file_path(&id, "f")).unwrap(), b"second");
    }

    /// Reconciliation moves files without a verified row to orphans/ under a
    /// flattened name cut to 200 bytes; a client's UTF-8 file name must not
    /// make that cut panic (the server could then never start).
    #[test]
    fn orphan_names_are_cut_on_a_character_boundary() {
        let dir = tempfile::tempdir().unwrap();
        let s = Storage::open(&dir.path().join("data")).unwrap();
        let id = [0x5a; 16];
        let name = "é".repeat(125); // 250 bytes: byte 200 of "<hex>_<name>" falls inside an 'é'
        assert!(validate_file_name(name.as_bytes()).is_ok());
        create_private_dir(&s.client_dir(&id)).unwrap();
        let path = s.file_path(&id, &name);
        fs::write(&path, b"x").unwrap();
        let dest = s.move_to_orphans(&path, 42).unwrap();
        assert!(!path.exists());
        assert_eq!(fs::read(&dest).unwrap(), b"x");
        assert!(dest.starts_with(dir.path().join("data").join("orphans")));
    }
}
