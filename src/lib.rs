//! backupd: a server for protocol-v3 encrypted file backups, and its client.
//!
//! Two threads in the server: the event loop ([`server`], mio, every socket)
//! and the worker ([`worker`], the data directory and SQLite), with small
//! helper threads for the log ([`logging`]) and the metrics file
//! ([`metrics`]). docs/ARCHITECTURE.md has the lifecycle of a connection and
//! of a file.
//!
//! The modules, from the binaries down (a module uses only those below it):
//!
//! * [`admin`]: the operator's subcommands (`backupd clients`, `verify`, ...).
//! * [`server`]: the event loop, admission, the protocol state machine.
//! * [`client`]: the blocking client library and `backup-client`.
//! * [`worker`]: the worker thread, storage, the database.
//! * `s3` (feature `s3`): the S3 tier's bucket client and replicator thread.
//! * [`datadir`]: the data directory's lock, marker and no-follow access.
//! * [`protocol`], [`crypto`]: the wire format and its cryptography, no I/O.
//! * [`config`], [`units`], [`budget`], [`metrics`], [`logging`],
//!   [`ratelimit`], [`json`]: settings and shared utilities.

pub mod admin;
pub mod budget;
pub mod client;
pub mod config;
pub mod crypto;
pub mod datadir;
pub mod json;
pub mod logging;
pub mod metrics;
pub mod protocol;
pub mod ratelimit;
#[cfg(feature = "s3")]
pub mod s3;
pub mod server;
pub mod units;
pub mod worker;
