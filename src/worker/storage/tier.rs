//! The seam between the server and where stored copies live: a narrow
//! interface ([`Tier`]: publish, open for reading, list, delete) with the
//! data directory as one implementation ([`Local`]) and, with the `s3`
//! feature, the bucket as the other (`crate::worker::s3::client::Bucket`).
//!
//! Paths are relative to the data directory (`files/<id>/<path>`,
//! `versions/<id>/<path>/<n>`): the bucket mirrors that layout. The crash
//! rules are the same for both: a copy is published whole or not at all
//! (locally by the rename of a synced temp file, in the bucket by a single
//! PUT or a completed multipart upload), and nothing counts as stored until
//! the database says so.

use std::fs::File;
use std::io::{self, Read};

use crate::datadir::{components, Dir};

/// Where stored copies live.
pub trait Tier {
    /// Store the content of `src` as `rel`, whole or not at all. Returns the bytes stored.
    fn publish(&self, rel: &str, src: &mut File) -> io::Result<u64>;
    /// A reader of the copy at `rel`; None when there is none.
    fn open(&self, rel: &str) -> io::Result<Option<Box<dyn Read + Send>>>;
    /// Every copy below `top` (`files` or `versions`), with its size.
    fn list(&self, top: &str) -> io::Result<Vec<(String, u64)>>;
    /// Remove the copy at `rel` (done when it is not there).
    fn delete(&self, rel: &str) -> io::Result<()>;
}

/// The data directory, reached through its descriptor without following
/// links. Reading only: the worker publishes local copies in its group
/// commit (intents, renames, syncs, one transaction: `commit.rs`), which a
/// per-file call cannot express, and removes them through
/// [`super::Storage`] (pruning, cache eviction).
pub struct Local {
    root: Dir,
}

impl Local {
    pub fn new(root: Dir) -> Local {
        Local { root }
    }

    /// Open the regular file at `rel`, None when it is gone.
    pub fn open_file(&self, rel: &str) -> io::Result<Option<File>> {
        let parts = components(rel)?;
        let Some((leaf, dirs)) = parts.split_last() else { return Ok(None) };
        match self.root.open_path(dirs).and_then(|d| d.open_file(leaf)) {
            Ok(f) => Ok(Some(f)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }
}

fn read_only() -> io::Error {
    io::Error::new(io::ErrorKind::Unsupported, "local copies are published and removed by the worker")
}

impl Tier for Local {
    fn publish(&self, _rel: &str, _src: &mut File) -> io::Result<u64> {
        Err(read_only())
    }

    fn open(&self, rel: &str) -> io::Result<Option<Box<dyn Read + Send>>> {
        Ok(self.open_file(rel)?.map(|f| Box::new(f) as Box<dyn Read + Send>))
    }

    fn list(&self, top: &str) -> io::Result<Vec<(String, u64)>> {
        fn walk(dir: &Dir, rel: &str, out: &mut Vec<(String, u64)>) -> io::Result<()> {
            for (name, meta) in dir.entries()? {
                let path = format!("{rel}/{}", name.to_string_lossy());
                match meta.kind {
                    crate::datadir::Kind::File => out.push((path, meta.size)),
                    crate::datadir::Kind::Dir => walk(&dir.open_dir(&name)?, &path, out)?,
                    _ => {}
                }
            }
            Ok(())
        }
        let mut out = Vec::new();
        match self.root.open_dir(top) {
            Ok(d) => walk(&d, top, &mut out)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        Ok(out)
    }

    fn delete(&self, _rel: &str) -> io::Result<()> {
        Err(read_only())
    }
}
