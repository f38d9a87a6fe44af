//! Server configuration: command-line flags (with environment variables),
//! their defaults and the reason for each limit.
//!
//! `Config` is built once in `main` and then shared read-only by the event
//! loop and the worker.

#[cfg(feature = "s3")]
pub mod s3;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;

use crate::crypto::OaepHash;

/// Port used when `port.info` is missing or invalid (the field's convention).
pub const DEFAULT_PORT: u16 = 1256;

/// backupd: receives protocol-v3 encrypted backups and stores them safely.
///
/// With no arguments it listens on 0.0.0.0 at the port in ./port.info (1256 if
/// that file is missing or invalid) and keeps its data in ./backupd-data.
#[derive(Parser, Debug, Clone)]
#[command(name = "backupd", version, about, long_about)]
pub struct Config {
    /// Address to listen on [default: 0.0.0.0:<port from ./port.info, else 1256>]
    #[arg(long, env = "BACKUPD_LISTEN")]
    pub listen: Option<SocketAddr>,

    /// Directory that holds files/, tmp/, versions/ and the database
    #[arg(long, env = "BACKUPD_DATA_DIR", default_value = "backupd-data")]
    pub data_dir: PathBuf,

    /// SQLite database file [default: <data-dir>/backupd.db]
    #[arg(long, env = "BACKUPD_DB")]
    pub db: Option<PathBuf>,

    /// Most simultaneous client connections; at the limit a new connection
    /// evicts the one whose last upload progress is oldest
    #[arg(long, env = "BACKUPD_MAX_CONNECTIONS", default_value_t = 256)]
    pub max_connections: usize,

    /// Most connections from one address; more are closed at accept (0: no limit)
    #[arg(long, env = "BACKUPD_MAX_CONNECTIONS_PER_IP", default_value_t = 64)]
    pub max_connections_per_ip: usize,

    /// Most connections from one address that have no session yet (0: no limit)
    #[arg(long, env = "BACKUPD_MAX_UNAUTHENTICATED_PER_IP", default_value_t = 32)]
    pub max_unauthenticated_per_ip: usize,

    /// Close a connection that has no session (1602 or 1605) this long after it connected
    #[arg(long, env = "BACKUPD_LOGIN_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub login_timeout: Duration,

    /// Most registered clients; at the limit a new name takes the place of the oldest
    /// registration that never sent its key and stores nothing, or gets 1601
    #[arg(long, env = "BACKUPD_MAX_CLIENTS", default_value_t = 100_000)]
    pub max_clients: usize,

    /// Registrations allowed per second from one address, on average (0: no limit)
    #[arg(long, env = "BACKUPD_REGISTRATION_RATE", default_value_t = 10.0)]
    pub registration_rate: f64,

    /// Registrations one address may make at once before the rate applies
    #[arg(long, env = "BACKUPD_REGISTRATION_BURST", default_value_t = 100)]
    pub registration_burst: u32,

    /// Session keys (1602, 1605: an RSA encryption each) granted per second to one address, on average (0: no limit)
    #[arg(long, env = "BACKUPD_SESSION_RATE", default_value_t = 50.0)]
    pub session_rate: f64,

    /// Session keys one address may be granted at once before the rate applies
    #[arg(long, env = "BACKUPD_SESSION_BURST", default_value_t = 512)]
    pub session_burst: u32,

    /// Largest request frame accepted (a file packet's payload), e.g. 16MiB
    #[arg(long, env = "BACKUPD_MAX_PACKET", default_value = "16MiB", value_parser = parse_size)]
    pub max_packet: u64,

    /// Largest file accepted (plaintext bytes)
    #[arg(long, env = "BACKUPD_MAX_FILE_SIZE", default_value = "4294967295", value_parser = parse_size)]
    pub max_file_size: u64,

    /// File content in flight between the network and the disk, read in pieces of up to 128 KiB; a share of it is kept for each of --max-connections (128 KiB, or half of this / --max-connections if smaller, at least 4 KiB) so that connections that trickle cannot hold it all; plus 3 MiB per large upload written direct (at most 4, from the part not kept); over it the server stops reading file content
    #[arg(long, env = "BACKUPD_MEMORY_BUDGET", default_value = "64MiB", value_parser = parse_size)]
    pub memory_budget: u64,

    /// Most bytes one client may store, current files plus kept versions; an upload that would cross it is refused at its first packet with 1607 (0: no limit)
    #[arg(long, env = "BACKUPD_QUOTA", default_value = "0", value_parser = parse_size)]
    pub quota: u64,

    /// Most files one client may store, current files plus kept versions (0: no limit)
    #[arg(long, env = "BACKUPD_QUOTA_FILES", default_value_t = 0)]
    pub quota_files: u64,

    /// Free space kept on the data directory's filesystem: an upload that would leave less is refused at its first packet with 1607 (0: no check)
    #[arg(long, env = "BACKUPD_MIN_FREE", default_value = "64MiB", value_parser = parse_size)]
    pub min_free: u64,

    /// Previous verified versions kept when a file name is uploaded again
    #[arg(long, env = "BACKUPD_KEEP_VERSIONS", default_value_t = 3)]
    pub keep_versions: u32,

    /// How long to retry a busy or locked database before answering 1607
    #[arg(long, env = "BACKUPD_DB_BUSY_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub db_busy_timeout: Duration,

    /// How a batch of confirmed files is made durable: `syncfs` (one
    /// filesystem sync per batch step) or `fsync` (each file and directory)
    #[arg(long, env = "BACKUPD_SYNC_MODE", value_enum, default_value = "syncfs")]
    pub sync_mode: SyncMode,

    /// Hash used by RSA-OAEP for the session key (sha1 is what clients in the field use)
    #[arg(long, env = "BACKUPD_OAEP_HASH", default_value = "sha1")]
    pub oaep_hash: OaepHash,

    /// Answer 1030 (CRC bad, resending) with 1604, for clients that wait for it [default: off]
    #[arg(long, env = "BACKUPD_ACK_RETRY")]
    pub ack_retry: bool,

    /// Close a connection with no bytes in either direction for this long
    #[arg(long, env = "BACKUPD_IDLE_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub idle_timeout: Duration,

    /// A request header must complete within this time of its first byte
    #[arg(long, env = "BACKUPD_HEADER_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub header_timeout: Duration,

    /// Discard staged or in-progress transfers untouched for this long
    #[arg(long, env = "BACKUPD_STALE_UPLOAD_TIMEOUT", default_value = "15m", value_parser = parse_duration)]
    pub stale_upload_timeout: Duration,

    /// On SIGINT/SIGTERM, how long in-flight work may take to finish
    #[arg(long, env = "BACKUPD_SHUTDOWN_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub shutdown_timeout: Duration,

    /// Write metrics in the Prometheus text format to this file (for node_exporter's textfile collector) [default: off]
    #[arg(long, env = "BACKUPD_METRICS_FILE")]
    pub metrics_file: Option<PathBuf>,

    /// How often the metrics file is rewritten
    #[arg(long, env = "BACKUPD_METRICS_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub metrics_interval: Duration,

    /// Most clients given their own "last verified backup" series in the metrics
    #[arg(long, env = "BACKUPD_METRICS_MAX_CLIENTS", default_value_t = 1000)]
    pub metrics_max_clients: usize,

    /// error, warn, info, debug or trace
    #[arg(long, env = "BACKUPD_LOG_LEVEL", default_value = "info")]
    pub log_level: log::LevelFilter,

    /// Append log lines to this file [default: standard error]
    #[arg(long, env = "BACKUPD_LOG_FILE")]
    pub log_file: Option<PathBuf>,

    /// The S3 tier (docs/OPERATIONS.md, "S3"); only in builds with the `s3` feature.
    #[cfg(feature = "s3")]
    #[command(flatten)]
    pub s3: crate::config::s3::S3Args,
}

/// How the worker makes a batch durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SyncMode {
    /// fdatasync every staged file and fsync every touched directory.
    Fsync,
    /// One syncfs(2) of the data directory's filesystem per step: the cost of
    /// a batch no longer grows with its number of files and directories.
    Syncfs,
}

impl Config {
    /// The database path, defaulting to `<data-dir>/backupd.db`.
    pub fn db_path(&self) -> PathBuf {
        self.db.clone().unwrap_or_else(|| self.data_dir.join("backupd.db"))
    }

    /// The listen address: `--listen`, else 0.0.0.0 at the port in `port.info`
    /// of the working directory. Returns a warning to log when port.info was
    /// missing or invalid.
    pub fn listen_addr(&self) -> (SocketAddr, Option<String>) {
        if let Some(a) = self.listen {
            return (a, None);
        }
        let (port, warning) = port_from_file(Path::new("port.info"));
        (SocketAddr::from(([0, 0, 0, 0], port)), warning)
    }

    /// Defaults for tests and embedding (as if run with no arguments).
    pub fn defaults() -> Config {
        Config::parse_from(["backupd"])
    }
}

/// Read the port from a `port.info` file; fall back to 1256 with a warning.
/// A UTF-8 byte order mark (Windows Notepad writes one) is skipped, as the
/// client does for its own files.
pub fn port_from_file(path: &Path) -> (u16, Option<String>) {
    match std::fs::read_to_string(path) {
        Ok(s) => {
            let s = s.strip_prefix('\u{feff}').unwrap_or(&s).trim();
            match s.parse::<u16>() {
                Ok(p) if p != 0 => (p, None),
                _ => (
                    DEFAULT_PORT,
                    Some(format!("{}: invalid port {s:?}; using {DEFAULT_PORT}", path.display())),
                ),
            }
        }
        Err(e) => (DEFAULT_PORT, Some(format!("{}: {e}; using port {DEFAULT_PORT}", path.display()))),
    }
}

pub use crate::units::{parse_duration, parse_size};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_size("16MiB"), Ok(16 << 20));
        assert_eq!(parse_size("100"), Ok(100));
        assert_eq!(parse_size("2k"), Ok(2048));
        assert_eq!(parse_size("1000TiB"), Ok(1000 << 40));
        assert!(parse_size("12x").is_err());
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert!(parse_duration("5y").is_err());
    }

    #[test]
    fn port_info() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("port.info");
        assert_eq!(port_from_file(&p).0, DEFAULT_PORT);
        std::fs::write(&p, "4321\n").unwrap();
        assert_eq!(port_from_file(&p), (4321, None));
        std::fs::write(&p, "\u{feff}4322\r\n").unwrap();
        assert_eq!(port_from_file(&p), (4322, None), "a byte order mark and CRLF, as Notepad writes");
        std::fs::write(&p, "nope").unwrap();
        let (port, warn) = port_from_file(&p);
        assert_eq!(port, DEFAULT_PORT);
        assert!(warn.is_some());
    }

    #[test]
    fn defaults_match_the_issue() {
        let c = Config::defaults();
        assert_eq!(c.max_connections, 256);
        assert_eq!(c.max_connections_per_ip, 64);
        assert_eq!(c.max_unauthenticated_per_ip, 32);
        assert_eq!(c.login_timeout, Duration::from_secs(10));
        assert_eq!(c.max_clients, 100_000);
        assert_eq!(c.registration_rate, 10.0);
        assert_eq!(c.registration_burst, 100);
        assert_eq!(c.session_rate, 50.0);
        assert_eq!(c.session_burst, 512);
        assert_eq!(c.max_packet, 16 << 20);
        assert_eq!(c.max_file_size, u32::MAX as u64);
        assert_eq!(c.memory_budget, 64 << 20);
        assert_eq!(c.keep_versions, 3);
        assert_eq!((c.quota, c.quota_files, c.min_free), (0, 0, 64 << 20));
        assert_eq!(c.oaep_hash, OaepHash::Sha1);
        assert!(!c.ack_retry);
    }
}
