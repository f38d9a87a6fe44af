//! End-to-end tests of the S3 tier (issue 13) against a real single-node
//! Garage: the real `backupd` binary (built with `--features s3`) on
//! 127.0.0.1 with temp data directories, the test client uploading over real
//! sockets, and the bucket read back by a signer of the tests' own
//! (`bucket.rs`), never through the server's code.
//!
//! Only built with the `s3` feature (`make test-s3`), so `make test` does
//! not see it. Garage missing is a failure, not a skip: `make test-s3`
//! builds it first (`make garage`).
//!
//! * [`garage`]: the single-node Garage; [`proxy`]: the fault proxy;
//!   [`bucket`]: reading and writing objects; [`support`]: backupd with
//!   the S3 flags, its metrics and admin commands;
//! * [`harness`]: the support itself against Garage (no backupd);
//! * [`replica`]: replica mode, its queue across restarts and faults;
//! * [`primary`]: primary mode, 1607 while the store fails, the cache bound;
//! * [`restore`]: restore, verify and resync from the bucket;
//! * [`large`]: a 1 GiB file as a multipart upload in bounded memory;
//! * [`tier`]: the tier's crash, outage and cache-bound paths, and a lost
//!   box (its whole data directory gone) restored and verified from the
//!   bucket alone.
#![cfg(feature = "s3")]

#[path = "../common/mod.rs"]
mod common;

mod bucket;
mod garage;
mod proxy;
mod support;

mod harness;
mod large;
mod primary;
mod replica;
mod restore;
mod tier;
