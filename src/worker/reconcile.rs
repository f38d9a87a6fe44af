//! Startup reconciliation: what a crash can leave behind (unfinished temp
//! files, publishes without their database commit, rows recorded before
//! their one sync whose file is not whole, files without a verified row)
//! repaired, each fix logged; verified rows without their file, or with a
//! file of another size, reported and kept for the operator.

use std::collections::{HashMap, HashSet};

use super::db::Write;
use super::storage::tier::Local;
use super::storage::Publish;
use super::{ReconcileError, Worker};
use crate::crypto::copy_with_cksum;
use crate::protocol::id_hex;

/// Missing verified files named one log line each at start; the summary
/// line counts them all.
const MISSING_NAMED: usize = 20;

impl Worker {
    /// Repair what a crash can leave behind. Each fix is logged.
    pub(super) fn reconcile(&mut self) -> Result<(), ReconcileError> {
        let (removed, moved) = self.storage.clear_tmp().map_err(ReconcileError::Tmp)?;
        if removed > 0 {
            log::info!("startup: removed {removed} unfinished upload(s) left in tmp/");
        }
        if moved > 0 {
            log::error!("startup: moved {moved} unexpected entr(ies) out of tmp/ into orphans/");
        }
        // Publishes interrupted between their renames and their database commit.
        let intents = self.db.intents()?;
        for i in &intents {
            let p = Publish { target: i.target.clone(), saved_previous: i.saved_previous.clone() };
            let verified_elsewhere = p.saved_previous.is_none() && self.verified_path(&i.target);
            if !verified_elsewhere {
                match self.storage.undo(&p) {
                    Ok(()) => log::warn!("startup: undid unacknowledged publish of {}", i.target),
                    Err(e) => log::error!("startup: cannot undo publish of {}: {e}", i.target),
                }
            }
        }
        if !intents.is_empty() {
            // The undo must be durable before its intents go.
            self.storage.sync_filesystem().map_err(ReconcileError::Syncfs)?;
            let clear: Vec<Write> = intents.iter().map(|i| Write::ClearIntent { upload: i.upload }).collect();
            self.db.apply(&clear)?;
        }
        self.check_unsynced()?;
        // Files must have a verified row (one walk of files/, one stat per entry) ...
        let rows = self.db.file_rows()?;
        let verified: HashSet<&str> = rows.iter().filter(|r| r.verified).map(|r| r.path.as_str()).collect();
        let mut found: HashMap<String, u64> = HashMap::new();
        self.storage
            .scan_files(|path, size| {
                let keep = verified.contains(path);
                if keep {
                    found.insert(path.to_string(), size);
                }
                keep
            })
            .map_err(ReconcileError::Files)?;
        // ... and verified rows their file, of the size recorded (or, with the
        // S3 tier, a copy in the bucket: a row no longer queued was confirmed).
        let in_bucket = self.replicated_paths()?;
        let mut torn = 0;
        let mut remote = 0;
        let mut missing = 0usize;
        for r in rows.iter().filter(|r| r.verified) {
            match (found.get(&r.path), r.size) {
                (None, _) if in_bucket(&r.path) => remote += 1,
                (None, _) => {
                    // Kept verified: the file may come back (a disk moved
                    // and put back), and then it is accepted as it was.
                    missing += 1;
                    self.missing.insert(r.path.clone(), r.size.unwrap_or(0));
                    if missing <= MISSING_NAMED {
                        log::error!(
                            "startup: verified file {} of client {} is missing; its row is kept",
                            r.path,
                            id_hex(&r.id)
                        );
                    }
                }
                (Some(&on_disk), Some(size)) if on_disk != size => {
                    log::error!(
                        "startup: verified file {} of client {} is {on_disk} bytes on disk but {size} \
                         in its database row; left in place for the operator",
                        r.path,
                        id_hex(&r.id)
                    );
                    torn += 1;
                }
                _ => {}
            }
        }
        if missing > 0 {
            let named = if missing > MISSING_NAMED {
                format!(" (the first {MISSING_NAMED} named above)")
            } else {
                String::new()
            };
            log::error!(
                "startup: {missing} verified file(s) are missing from files/{named}; their rows are kept: \
                 put them back, or restore them from a snapshot (`backupd verify` lists them; \
                 docs/OPERATIONS.md, \"A missing file\")"
            );
        }
        if torn > 0 {
            log::error!("startup: {torn} verified file(s) differ in size from their database rows");
        }
        if remote > 0 {
            log::info!("startup: {remote} verified file(s) are in the bucket only");
        }
        Ok(())
    }

    /// New files recorded before their one sync (see `commit.rs`, `record`)
    /// whose marks outlived the server: a row stays only when its file is
    /// whole (the size and cksum of the row). Otherwise the crash came before
    /// the sync, the 1604 never went out, and the row goes; the walk of
    /// files/ then moves a partial file to orphans/.
    fn check_unsynced(&mut self) -> Result<(), ReconcileError> {
        let marked = self.db.unsynced_files()?;
        if marked.is_empty() {
            return Ok(());
        }
        let rows = self.db.file_rows()?;
        let by_path: HashMap<&str, _> =
            rows.iter().filter(|r| r.verified).map(|r| (r.path.as_str(), r)).collect();
        let local = Local::new(self.storage.root_dir().map_err(ReconcileError::Files)?);
        // With the S3 tier, a copy confirmed by the bucket may have been evicted.
        let in_bucket = self.replicated_paths()?;
        let mut writes = Vec::new();
        for path in &marked {
            let Some(r) = by_path.get(path.as_str()) else { continue };
            let on_disk = match local.open_file(path).and_then(|f| f.map(cksum_of).transpose()) {
                Ok(None) if in_bucket(path) => continue,
                Ok(on_disk) => on_disk,
                // No regular file there (a link, a folder): not whole either.
                Err(e) if no_regular_file(&e) => None,
                // A read error says nothing of what the sync did: the row
                // stays, for the operator (`backupd verify`).
                Err(e) => {
                    log::error!("startup: cannot read {path} back to check it: {e}; its row is kept");
                    continue;
                }
            };
            if on_disk.is_some() && on_disk == r.size.zip(r.cksum) {
                continue;
            }
            log::warn!(
                "startup: {path} of client {} was being stored when the server stopped and is not whole \
                 on disk; its row is removed (the client was never told it was stored)",
                id_hex(&r.id)
            );
            writes.push(Write::DropFile { id: r.id, name: r.name.clone(), path: path.clone() });
        }
        writes.push(Write::ClearUnsynced);
        self.db.apply(&writes)?;
        Ok(())
    }

    /// Whether a stored path's copy is in the bucket: never without the S3 tier.
    #[cfg(not(feature = "s3"))]
    fn replicated_paths(&self) -> Result<impl Fn(&str) -> bool, ReconcileError> {
        Ok(|_: &str| false)
    }

    /// Whether a stored path's copy is in the bucket: the S3 tier is on and
    /// the path has no queue row left.
    #[cfg(feature = "s3")]
    fn replicated_paths(&self) -> Result<impl Fn(&str) -> bool, ReconcileError> {
        let queued: Option<HashSet<String>> = match self.replica {
            Some(_) => Some(self.db.queue_after(0, usize::MAX)?.into_iter().map(|q| q.path).collect()),
            None => None,
        };
        Ok(move |p: &str| queued.as_ref().is_some_and(|q| !q.contains(p)))
    }

    fn verified_path(&self, rel: &str) -> bool {
        self.db.file_rows().map(|rows| rows.iter().any(|r| r.verified && r.path == rel)).unwrap_or(false)
    }
}

/// The size and cksum of a stored file, read back.
fn cksum_of(mut f: std::fs::File) -> std::io::Result<(u64, u32)> {
    copy_with_cksum(&mut f, &mut std::io::sink())
}

/// The error of opening something that is not a regular file (a link is
/// never followed: ELOOP; a folder: InvalidInput; a file on the way: ENOTDIR).
fn no_regular_file(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::InvalidInput
        || matches!(e.raw_os_error(), Some(libc::ELOOP | libc::ENOTDIR))
}
