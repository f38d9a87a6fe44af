//! Startup reconciliation: what a crash can leave behind (unfinished temp
//! files, publishes without their database commit, files without a verified
//! row, verified rows without their file) repaired, each fix logged.

use std::collections::{HashMap, HashSet};

use super::db::Write;
use super::storage::Publish;
use super::{ReconcileError, Worker};
use crate::protocol::id_hex;

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
        // ... and verified rows their file, of the size recorded.
        let mut torn = 0;
        for r in rows.iter().filter(|r| r.verified) {
            match (found.get(&r.path), r.size) {
                (None, _) => {
                    log::error!(
                        "startup: verified file {} of client {} is missing; marked unverified",
                        r.path,
                        id_hex(&r.id)
                    );
                    self.db.mark_unverified(&r.id, &r.name)?;
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
        if torn > 0 {
            log::error!("startup: {torn} verified file(s) differ in size from their database rows");
        }
        Ok(())
    }

    fn verified_path(&self, rel: &str) -> bool {
        self.db.file_rows().map(|rows| rows.iter().any(|r| r.verified && r.path == rel)).unwrap_or(false)
    }
}
