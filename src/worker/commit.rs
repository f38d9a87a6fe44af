//! The group commit: a batch's received uploads published into `files/` and
//! made durable together with the batch's other database writes, in the
//! numbered steps of docs/ARCHITECTURE.md (contents, intents, previous
//! versions, renames, directory syncs, one transaction; for a batch of new
//! files with syncfs, renames, one transaction, one sync: "One sync per
//! batch"), then each item reported; and the undo of a batch that could not
//! be made durable.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Instant;

use super::db::{Intent, Write};
use super::fault::{self, Point};
use super::storage::{Dirty, Publish, Storage, Unnamed};
use super::{stamp, Completion, ConnRef, IntentError, Reclaimed, Staged, UploadId, Usage, Worker};
use crate::config::SyncMode;
use crate::datadir::Dir;
use crate::protocol::{id_hex, ClientId};

/// A commit asked for by the loop: its connection, the upload, the client
/// and the file's name.
type CommitRequest = (ConnRef, UploadId, ClientId, String);

/// A batch item whose database writes succeed or fail together, and what to
/// report for it.
pub(super) enum Pending {
    /// With the keyless registration its writes remove first, if any.
    Register {
        conn: ConnRef,
        id: ClientId,
        reclaim: Option<ClientId>,
    },
    SetKey {
        conn: ConnRef,
        id: ClientId,
        der: Vec<u8>,
    },
    Silent,
}

/// A received upload on its way into `files/` in a group commit.
pub(super) struct Publishing {
    conn: ConnRef,
    upload: UploadId,
    client: ClientId,
    name: String,
    size: u64,
    cksum: u32,
    publish: Publish,
    /// The target's folder as the plan found it (None: to be created).
    folder: Option<Dir>,
    /// The temp file, if it has no name (None: `tmp/<upload>.part`).
    unnamed: Option<Unnamed>,
}

impl Worker {
    /// Make a batch durable: publish intents, renames, syncs, one database
    /// transaction; then report each item (see docs/ARCHITECTURE.md). Any
    /// error of a write, sync or rename fails the files it concerns (1607) and
    /// leaves their previous versions in place.
    pub(super) fn group_commit(
        &mut self,
        commits: Vec<CommitRequest>,
        mut writes: Vec<(Pending, Vec<Write>)>,
        out: &mut Vec<Completion>,
    ) {
        let started = Instant::now();
        let (mut staged, deferred) = self.take_received(commits, out);
        self.sync_contents(&mut staged, out);
        // New files only, with syncfs: one sync makes the files and their
        // rows durable together (see `record`).
        let one_sync = self.one_sync && staged.iter().all(|s| s.publish.saved_previous.is_none());
        self.record_intents(&mut staged, &mut writes, out);
        let (published, ok) = self.rename_into_place(staged, &mut writes, !one_sync, out);
        let (files_ok, others_ok) = self.record(&published, &writes, ok, one_sync, started);
        self.report_published(published, files_ok, out);
        self.report_writes(writes, others_ok, out);
        if !deferred.is_empty() {
            self.group_commit(deferred, Vec::new(), out);
        }
    }

    /// The uploads of the batch's commits, each planned for publishing, and
    /// the commits deferred to the next round (a second commit of the same
    /// file in the batch). A commit that cannot be published is reported.
    fn take_received(
        &mut self,
        commits: Vec<CommitRequest>,
        out: &mut Vec<Completion>,
    ) -> (Vec<Publishing>, Vec<CommitRequest>) {
        let mut staged: Vec<Publishing> = Vec::new();
        let mut deferred = Vec::new();
        let base = stamp();
        for (i, (conn, upload, client, name)) in commits.into_iter().enumerate() {
            // Two commits of the same file in one batch: publish the later one in the next round.
            if staged.iter().any(|s| s.client == client && s.name == name) {
                deferred.push((conn, upload, client, name));
                continue;
            }
            let ready = matches!(self.staged.get(&upload), Some(u) if u.client == client);
            let Some(Staged { cksum, size, failed_syncs, unnamed, .. }) =
                self.staged.remove(&upload).filter(|_| ready)
            else {
                // Refused (e.g. another client's upload): the loop no longer
                // tracks it, so its temp file goes now.
                log::warn!("worker: commit of {name:?} for an upload that is not staged");
                self.refuse(conn, upload, client, out);
                continue;
            };
            // A syncfs failed since this upload began: the writeback error it
            // reported may have been this file's (the error is reported once,
            // so this file's own sync would not see it). Refused: sent again.
            if failed_syncs != self.failed_syncs.load(Ordering::Acquire) {
                log::error!(
                    "worker: {name:?} of client {} was being written when a sync of the data directory failed; refused, to be sent again",
                    id_hex(&client)
                );
                self.refuse(conn, upload, client, out);
                continue;
            }
            match self.storage.plan_publish(&client, &name, base + i as u64) {
                Ok((publish, folder)) => staged.push(Publishing {
                    conn,
                    upload,
                    client,
                    name,
                    size,
                    cksum,
                    publish,
                    folder,
                    unnamed,
                }),
                Err(e) => {
                    log::error!("worker: cannot publish {name:?} of client {}: {e}", id_hex(&client));
                    self.refuse(conn, upload, client, out);
                }
            }
        }
        (staged, deferred)
    }

    /// A commit that will not be published: its temp file goes, its 1029 gets 1607.
    fn refuse(&self, conn: ConnRef, upload: UploadId, client: ClientId, out: &mut Vec<Completion>) {
        refuse(&self.storage, &self.usage, (conn, upload, client), out);
    }

    /// Step 1: file contents (per-file mode; syncfs covers them in step 5).
    fn sync_contents(&self, staged: &mut Vec<Publishing>, out: &mut Vec<Completion>) {
        if self.sync_mode == SyncMode::Fsync {
            let mut synced = Vec::with_capacity(staged.len());
            for s in staged.drain(..) {
                // (No temp file without a name in this mode: see `Worker::spawn`.)
                let r = self.storage.open_temp(s.upload).and_then(|f| {
                    fault::check(Point::Fdatasync, &s.name)?;
                    f.sync_data()
                });
                match r {
                    Ok(()) => synced.push(s),
                    Err(e) => {
                        log::error!("worker: cannot fsync staged {:?}: {e}", s.name);
                        fail(&self.storage, &self.usage, s, out);
                    }
                }
            }
            *staged = synced;
        }
    }

    //// Step 2: intents, durable before anything is renamed, for the publishes
    /// that replace a verified file. A new file needs none: after a crash
    /// before step 6 it has no verified row, and startup moves it out of
    /// files/ (see `reconcile`); a replaced one must get its previous
    /// version back, which only the intent can tell.
    fn record_intents(
        &mut self,
        staged: &mut Vec<Publishing>,
        writes: &mut Vec<(Pending, Vec<Write>)>,
        out: &mut Vec<Completion>,
    ) {
        let intents: Vec<Intent> = staged
            .iter()
            .filter_map(|s| {
                Some(Intent {
                    upload: s.upload,
                    target: s.publish.target.clone(),
                    saved_previous: Some(s.publish.saved_previous.clone()?),
                })
            })
            .collect();
        if !intents.is_empty() {
            let names = staged.iter().filter(|s| s.publish.saved_previous.is_some()).map(|s| s.name.as_str());
            let r = self.db.add_intents(&intents).map_err(IntentError::from);
            if let Err(e) = r.and_then(|()| Ok(fault::check_all(Point::Intent, names)?)) {
                log::error!("worker: database error recording {} publish(es): {e}", staged.len());
                let clear = intents.iter().map(|i| Write::ClearIntent { upload: i.upload }).collect();
                writes.push((Pending::Silent, clear));
                for s in staged.drain(..) {
                    fail(&self.storage, &self.usage, s, out);
                }
            }
        }
    }

    /// Steps 3 to 5: keep previous versions, durably, then rename into place
    /// and, with `sync`, make the directory entries (and, with syncfs, file
    /// contents) durable. The files renamed (or to be undone), and whether
    /// all of it held.
    fn rename_into_place(
        &mut self,
        staged: Vec<Publishing>,
        writes: &mut Vec<(Pending, Vec<Write>)>,
        sync: bool,
        out: &mut Vec<Completion>,
    ) -> (Vec<Publishing>, bool) {
        let mut dirty = match self.sync_mode {
            SyncMode::Syncfs => Dirty::untracked(),
            SyncMode::Fsync => Dirty::default(),
        };
        let mut published = Vec::new();
        let mut ok = true;
        let mut linked = Vec::new();
        for s in staged {
            match self.storage.save_previous(&s.publish, &s.name, &mut dirty) {
                Ok(()) => linked.push(s),
                Err(e) => {
                    log::error!("worker: cannot keep the previous version of {}: {e}", s.publish.target);
                    if let Err(e) = self.storage.undo(&s.publish) {
                        log::error!("worker: cannot undo publish of {}: {e}", s.publish.target);
                    }
                    writes.push((Pending::Silent, vec![Write::ClearIntent { upload: s.upload }]));
                    fail(&self.storage, &self.usage, s, out);
                }
            }
        }
        if !dirty.is_empty() {
            let names: Vec<&str> = linked.iter().map(|s| s.name.as_str()).collect();
            ok &= self.sync_dirs(&mut dirty, Point::SyncPrevious, &names);
        }
        for s in linked {
            if !ok {
                published.push(s);
                continue;
            }
            let unnamed = s.unnamed.as_ref().map(|(f, _)| f);
            match self.storage.install(s.upload, unnamed, &s.publish, s.folder.as_ref(), &s.name, &mut dirty)
            {
                Ok(()) => published.push(s),
                Err(e) => {
                    log::error!("worker: cannot publish {:?} of client {}: {e}", s.name, id_hex(&s.client));
                    if let Err(e) = self.storage.undo(&s.publish) {
                        log::error!("worker: cannot undo publish of {}: {e}", s.publish.target);
                    }
                    writes.push((Pending::Silent, vec![Write::ClearIntent { upload: s.upload }]));
                    fail(&self.storage, &self.usage, s, out);
                }
            }
        }
        // 5. Directory entries (and, with syncfs, file contents) durable.
        let names: Vec<&str> = published.iter().map(|s| s.name.as_str()).collect();
        if sync && ok && !published.is_empty() {
            ok &= self.sync_dirs(&mut dirty, Point::SyncPublish, &names);
        }
        if ok && !published.is_empty() {
            ok = fault::check_all(Point::AfterRename, names.iter().copied()).is_ok();
        }
        (published, ok)
    }

    /// Step 6: one transaction records the files; the rest of the batch
    /// follows. A batch that did not go in is unpublished. Whether the
    /// files, and the other writes, were recorded.
    ///
    /// With `one_sync` (new files only, syncfs), step 5 comes after the
    /// transaction instead: its commit does not sync the WAL, the one
    /// syncfs makes the files, their folders and their rows durable
    /// together. Until then a crash can leave a row without its whole file;
    /// the rows are marked (`unsynced_files`, in the same transaction), and
    /// startup drops a marked row whose file is not whole (`reconcile`).
    /// The marks go with the next such transaction, or once the 1604s are
    /// out and nothing is queued (`clear_unsynced`), so that a stored file
    /// lost later is reported as damage, not taken for an upload that was
    /// never acknowledged.
    fn record(
        &mut self,
        published: &[Publishing],
        writes: &[(Pending, Vec<Write>)],
        ok: bool,
        one_sync: bool,
        started: Instant,
    ) -> (bool, bool) {
        let mut all: Vec<Write> = Vec::new();
        if one_sync {
            all.push(Write::ClearUnsynced);
            all.extend(published.iter().map(|s| Write::MarkUnsynced { path: s.publish.target.clone() }));
        }
        for s in published {
            all.push(Write::FileVerified {
                id: s.client,
                name: s.name.clone(),
                path: s.publish.target.clone(),
                size: s.size,
                cksum: s.cksum,
            });
            if s.publish.saved_previous.is_some() {
                all.push(Write::ClearIntent { upload: s.upload });
            }
            // The S3 queue's rows, in the same transaction as the file's.
            #[cfg(feature = "s3")]
            all.extend(self.queue_writes(&s.client, &s.publish.target, s.publish.saved_previous.as_deref()));
        }
        let apply = |db: &mut super::db::Db| if one_sync { db.apply_unsynced(&all) } else { db.apply(&all) };
        let mut files_ok = ok
            && (published.is_empty()
                || apply(&mut self.db)
                    .map_err(|e| log::error!("worker: database commit failed: {e}"))
                    .is_ok());
        if one_sync && files_ok && !published.is_empty() {
            self.unsynced = true;
            files_ok = self.sync_recorded(published);
        }
        if files_ok && !published.is_empty() {
            // Committed: from here only a crash (for the tests) can interrupt.
            let _ = fault::check_all(Point::Commit, published.iter().map(|s| s.name.as_str()));
        }
        let others_ok = files_ok && {
            let rest: Vec<Write> = writes.iter().flat_map(|(_, w)| w.iter().cloned()).collect();
            self.db.apply(&rest).is_ok()
        };
        if !files_ok && !published.is_empty() {
            self.unpublish(published);
        }
        if files_ok && !published.is_empty() {
            self.metrics.commit_batch_size.observe(published.len() as f64);
            self.metrics.commit_seconds.observe(started.elapsed().as_secs_f64());
        }
        (files_ok, others_ok)
    }

    /// Step 5 of a `one_sync` batch, after its transaction: the one syncfs.
    /// When it fails, the rows go again (the caller unpublishes the files).
    fn sync_recorded(&mut self, published: &[Publishing]) -> bool {
        let names: Vec<&str> = published.iter().map(|s| s.name.as_str()).collect();
        // Only a crash (for the tests) can interrupt here.
        let _ = fault::check_all(Point::Recorded, names.iter().copied());
        if self.sync_dirs(&mut Dirty::default(), Point::SyncPublish, &names) {
            return true;
        }
        let mut undo: Vec<Write> = published
            .iter()
            .map(|s| Write::DropFile { id: s.client, name: s.name.clone(), path: s.publish.target.clone() })
            .collect();
        undo.push(Write::ClearUnsynced);
        if let Err(e) = self.db.apply(&undo) {
            log::error!("worker: cannot remove the rows of {} file(s) not made durable: {e}", undo.len() - 1);
        }
        false
    }

    /// Clear the marks of the last `one_sync` batch once its sync is done
    /// and its 1604s sent: when the worker finds nothing queued (and at its
    /// stop). Not synced: a mark that outlives a power cut only has startup
    /// check a file the sync made whole.
    pub(super) fn clear_unsynced(&mut self) {
        if std::mem::take(&mut self.unsynced) {
            if let Err(e) = self.db.apply_unsynced(&[Write::ClearUnsynced]) {
                log::warn!("worker: cannot clear the marks of files recorded before their sync: {e}");
            }
        }
    }

    /// Report each file of the batch: stored (its versions pruned, its
    /// client's usage updated) or failed.
    fn report_published(&mut self, published: Vec<Publishing>, files_ok: bool, out: &mut Vec<Completion>) {
        // The space just used (and freed by pruning) counts for the next
        // packet 1: measured before the 1604s go out.
        let measure = files_ok && !published.is_empty();
        for s in published {
            if files_ok {
                // A name whose verified file was missing at start: the new
                // file replaces its row, which counted (size, one file) already.
                let was_missing =
                    self.missing.remove(&s.publish.target).filter(|_| s.publish.saved_previous.is_none());
                if s.publish.saved_previous.is_none() && was_missing.is_none() {
                    self.metrics.files_stored.inc();
                }
                self.metrics.bytes_stored.add(s.size as i64);
                log::debug!(
                    "stored \"{}\" for client {} ({} bytes, cksum {})",
                    crate::logging::Esc(&s.name),
                    id_hex(&s.client),
                    s.size,
                    s.cksum
                );
                // The new file counts in full; a replaced one stays, as a
                // version, until pruned (what pruning removes is freed).
                // Only a replacement adds a version, so only it prunes.
                let mut freed = Usage::default();
                let keep = self.keep_versions as usize;
                let pruned = match s.publish.saved_previous {
                    Some(_) => self.storage.prune_versions(&s.client, &s.name, keep, &mut freed),
                    None => Ok(Vec::new()),
                };
                match pruned {
                    #[cfg(feature = "s3")]
                    Ok(removed) => self.queue_deletes(&s.client, &s.name, &removed),
                    #[cfg(not(feature = "s3"))]
                    Ok(_) => {}
                    Err(e) => log::warn!("worker: cannot prune old versions of {}: {e}", s.name),
                }
                #[cfg(feature = "s3")]
                self.note_published(s.upload, &s.publish.target, s.size, freed.bytes);
                let u = self.usage.entry(s.client).or_default();
                u.add(Usage { bytes: s.size, files: 1 });
                u.sub(freed);
                if let Some(bytes) = was_missing {
                    u.sub(Usage { bytes, files: 1 });
                }
                let usage = *u;
                out.push(Completion::Committed {
                    conn: s.conn,
                    upload: s.upload,
                    ok: true,
                    client: s.client,
                    usage,
                });
            } else {
                fail(&self.storage, &self.usage, s, out);
            }
        }
        if measure {
            self.free_checked = None;
            self.refresh_free_space();
        }
    }

    /// Report each registration and key change of the batch.
    fn report_writes(
        &mut self,
        writes: Vec<(Pending, Vec<Write>)>,
        others_ok: bool,
        out: &mut Vec<Completion>,
    ) {
        // Items whose writes did not go in with the batch get one transaction each,
        // so one bad item cannot fail the others.
        for (pending, w) in writes {
            let ok = others_ok
                || self.db.apply(&w).map_err(|e| log::error!("worker: database write failed: {e}")).is_ok();
            match pending {
                Pending::Register { conn, id, reclaim } => {
                    let reclaimed = reclaim.map(|old| match ok {
                        true => {
                            self.usage.remove(&old);
                            Reclaimed::Removed(old)
                        }
                        false => Reclaimed::Unchanged(old),
                    });
                    out.push(Completion::Registered { conn, id, ok, reclaimed })
                }
                Pending::SetKey { conn, id, der } => out.push(Completion::KeySaved { conn, id, ok, der }),
                Pending::Silent => {}
            }
        }
    }

    /// Make the listed directories durable (and clear the list): one fsync
    /// each, or one syncfs for everything in `SyncMode::Syncfs`. `point`
    /// and `names` are the step and the files it is for (fault injection).
    fn sync_dirs(&self, dirty: &mut Dirty, point: Point, names: &[&str]) -> bool {
        let mut ok = true;
        match self.sync_mode {
            SyncMode::Syncfs => {
                let r = fault::check_all(point, names.iter().copied())
                    .and_then(|_| self.storage.sync_filesystem());
                if let Err(e) = r {
                    log::error!("worker: syncfs failed: {e}");
                    self.failed_syncs.fetch_add(1, Ordering::AcqRel);
                    ok = false;
                }
            }
            SyncMode::Fsync => {
                for (rel, d) in dirty.iter() {
                    if let Err(e) = fault::check_all(point, names.iter().copied()).and_then(|_| d.sync()) {
                        log::error!("worker: cannot fsync {rel}: {e}");
                        ok = false;
                    }
                }
            }
        }
        dirty.clear();
        ok
    }

    /// A batch of publishes could not be made durable or recorded: put every
    /// target back as it was.
    fn unpublish(&mut self, published: &[Publishing]) {
        log::error!("worker: undoing {} publish(es)", published.len());
        for s in published.iter().rev() {
            if let Err(e) = self.storage.undo(&s.publish) {
                log::error!("worker: cannot undo publish of {}: {e}", s.publish.target);
            }
        }
        let mut dirty = self.storage.parent_dirs(published.iter().map(|s| s.publish.target.as_str()));
        let _ = self.sync_dirs(&mut dirty, Point::SyncPublish, &[]);
        let clear: Vec<Write> = published.iter().map(|s| Write::ClearIntent { upload: s.upload }).collect();
        if let Err(e) = self.db.apply(&clear) {
            log::warn!("worker: cannot clear publish intents ({e}); the next start will check them");
        }
    }
}

/// A staged file that will not be published: its temp file goes, its 1029 gets 1607.
fn fail(storage: &Storage, usage: &HashMap<ClientId, Usage>, s: Publishing, out: &mut Vec<Completion>) {
    refuse(storage, usage, (s.conn, s.upload, s.client), out);
}

fn refuse(
    storage: &Storage,
    usage: &HashMap<ClientId, Usage>,
    (conn, upload, client): (ConnRef, UploadId, ClientId),
    out: &mut Vec<Completion>,
) {
    let _ = storage.remove_temp(upload);
    let usage = usage.get(&client).copied().unwrap_or_default();
    out.push(Completion::Committed { conn, upload, ok: false, client, usage });
}
