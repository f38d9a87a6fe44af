//! backupd: a server for protocol-v3 encrypted file backups, and its client.
//!
//! Two threads in the server: the event loop ([`server`], mio, every socket)
//! and the worker ([`worker`], the data directory and SQLite), with small
//! helper threads for the log ([`logging`]) and the metrics file
//! ([`metrics`]). docs/ARCHITECTURE.md has the lifecycle of a connection and
//! of a file.
//!
//! The modules, from the binaries down: a module imports only modules
//! below it, and only those its row of the ladder in docs/ARCHITECTURE.md
//! names (`tests/ladder.rs` checks the code against it):
//!
//! * [`admin`]: the operator's subcommands (`backupd clients`, `verify`, ...).
//! * [`server`]: the event loop, admission, the protocol state machine.
//!   [`client`], beside it: the blocking client library and
//!   `backup-client`, on [`protocol`], [`crypto`], [`units`] and [`json`] only.
//! * [`worker`]: the worker thread, storage, the database.
//! * [`datadir`], [`config`], [`metrics`], [`protocol`]: the data
//!   directory's lock, marker and no-follow access; the server's settings;
//!   the metrics; the wire format (no I/O).
//! * [`logging`]: the logger and the escaping of peer text.
//! * [`crypto`], [`budget`], [`ratelimit`], [`units`], [`json`]: leaves
//!   that import nothing of the crate.

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
pub mod server;
pub mod units;
pub mod worker;
