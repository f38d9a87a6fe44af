//! The worker's errors as the layers above see them: why an upload failed
//! ([`UploadError`], carried by `PacketOutcome::Failed` to the loop, which
//! picks its answer and log line from it) and why the worker could not open
//! the data directory ([`OpenError`], reported by start-up; startup repair's
//! part of it is [`ReconcileError`]). Their messages are the log lines' text.

use std::io;
use std::path::PathBuf;

use crate::datadir::Kind;

/// Why an upload failed at the worker (its temp file is then gone). The
/// loop answers the upload with a 1607 and logs "upload failed: {this}"; a
/// [`UploadError::Decryption`] also costs the client one of its decryption
/// tokens (see `Core::decryption_failed`).
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    /// A CBC stream did not decrypt to a valid padding, or to the size its
    /// packets announced: forged or corrupt ciphertext, or the wrong key.
    #[error("decryption failed")]
    Decryption,
    #[error("upload ended inside a CBC stream")]
    EndedInsideStream,
    #[error("packet outside a CBC stream")]
    OutsideStream,
    #[error("no CBC stream to finish")]
    NoStreamToFinish,
    #[error("cannot create temp file: {0}")]
    CreateTemp(#[source] io::Error),
    #[error("cannot write temp file: {0}")]
    WriteTemp(#[source] io::Error),
    #[error("cannot write temp file (writeback): {0}")]
    Writeback(#[source] io::Error),
}

impl UploadError {
    /// The ciphertext did not decrypt (what a forger's upload does).
    pub fn is_decryption(&self) -> bool {
        matches!(self, UploadError::Decryption)
    }
}

/// Why [`Worker::open`](super::Worker::open) failed: the process cannot start.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The data directory's lock or marker, the database's lock (see
    /// `datadir`), or a database of another data directory
    /// (`db::check_owner`): its message as is.
    #[error("{0}")]
    DataDir(String),
    #[error(
        "database {}: {name} is a {kind:?}, not a file; backupd follows no link inside its data directory \
         (move it away, keep the real file there)",
        .path.display()
    )]
    DatabaseNotAFile { path: PathBuf, name: String, kind: Kind },
    #[error("database {}: {name}: {source}", .path.display())]
    DatabaseFile { path: PathBuf, name: String, source: io::Error },
    #[error("data directory {}: {source}", .dir.display())]
    Storage { dir: PathBuf, source: io::Error },
    #[error("database {}: {source}", .path.display())]
    Database { path: PathBuf, source: rusqlite::Error },
    /// Startup repair failed.
    #[error("reconciling {}: {source}", .dir.display())]
    Reconcile { dir: PathBuf, source: ReconcileError },
    #[error("versions/: {0}")]
    Versions(#[source] io::Error),
    /// `BACKUPD_S3_ENDPOINT` set in a build without the `s3` feature.
    #[error(
        "BACKUPD_S3_ENDPOINT is set, but this backupd was built without S3 support (cargo feature `s3`)"
    )]
    NoS3,
    /// The S3 flags or credentials (the message names the flag, never a secret).
    #[error("{0}")]
    S3(String),
}

/// Why startup repair (`Worker::reconcile`) could not finish, by the step
/// that failed.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("tmp/: {0}")]
    Tmp(#[source] io::Error),
    #[error("syncfs: {0}")]
    Syncfs(#[source] io::Error),
    #[error("files/: {0}")]
    Files(#[source] io::Error),
    #[error(transparent)]
    Database(#[from] rusqlite::Error),
}

/// Why a batch's publish intents could not be recorded (group commit, step 2).
#[derive(Debug, thiserror::Error)]
pub(super) enum IntentError {
    #[error(transparent)]
    Database(#[from] rusqlite::Error),
    /// An injected fault (tests, debug builds).
    #[error(transparent)]
    Fault(#[from] io::Error),
}
