//! The `backup-client` command line: its arguments, exit codes and entry
//! point, and the policy below, carried out by `run.rs` (the run: walk,
//! identity, record, summary), `retry.rs` (the per-file retry policy and the
//! connection kept across files) and `ui.rs` (progress and output).
//!
//! Policy, in one place:
//!
//! * Session (once per connection): reconnect (1027) with `me.info`, or
//!   register (1025) + send a fresh key (1026) and then save `me.info`
//!   atomically. 1601 and 1606 end the run (exit 2) with a clear message.
//!   Before registering, the run checks that `me.info` can be saved (exit 1
//!   and nothing registered if not); if saving fails after all, the run ends
//!   (exit 1) before anything is uploaded, naming the id and the
//!   `backupd reset-key` that frees the name.
//! * Each file: [`Client::send_file`] (three cksum attempts, then 1031). On
//!   1607, a network failure or a malformed reply, the file is retried up to
//!   `--retries` more times (default 2) with a short backoff, on a new
//!   connection when the old one is out of step; then it is reported failed
//!   and the next file goes on. If a new connection cannot be set up at all
//!   (server down), the remaining files are reported failed at once.
//! * The arguments are walked first (`walk.rs`, `--exclude` in
//!   `exclude.rs`); files unchanged since the server verified them
//!   (`record.rs`) are skipped without connecting for them. Nothing to send:
//!   no connection at all.
//! * With `--json` every file gets one JSON object on stdout (sent, skipped
//!   and why, failed and why); otherwise every file sent or failed gets one
//!   line, symlinks and special files a warning on stderr, and a closing
//!   count goes to stderr. The exit code is the largest of the files' codes
//!   (skipped files count as 0).

use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use super::identity;
pub use super::report::{Done, Failure, FileReport};
pub use super::run::run;
use super::ui::Ui;
use crate::crypto::OaepHash;

/// Every file was verified.
pub const EXIT_OK: i32 = 0;
/// Usage or local error (bad arguments, missing file, bad me.info, me.info cannot be saved, file changed
/// while read).
pub const EXIT_LOCAL: i32 = 1;
/// Refused by the server (name taken, reconnect denied, 1607 after retries, malformed reply).
pub const EXIT_REFUSED: i32 = 2;
/// The cksum was still wrong after three attempts.
pub const EXIT_CKSUM: i32 = 3;
/// Network failure or timeout.
pub const EXIT_NETWORK: i32 = 4;

/// The command lines that register a client again (defined in `protocol`,
/// which `backupd reset-key`'s hint may use too; held to this CLI below).
pub use crate::protocol::{REGISTER_AGAIN, REGISTER_AGAIN_LEGACY};

const AFTER_HELP: &str = "\
Modes:
  backup-client send PATH... --server HOST:PORT --name NAME [--identity PATH]
      Upload files and folders (recursively) over one connection, each file
      named by its path as given, like tar: `send docs` sends docs/a.txt and
      docs/sub/b.txt; a leading /, `.` components and everything up to a `..`
      are removed (`send /srv/docs` sends srv/docs/a.txt).
  backup-client [OPTIONS]
      With no subcommand, do what existing clients of protocol v3 do: read
      ./transfer.info (line 1 host:port, line 2 user name, line 3 the file to
      send, further lines more files or folders) and keep the identity in
      ./me.info. Each file is named by its base name (in a folder: the
      folder's base name and the path below it).

Folders: symlinks inside them are skipped unless --follow-symlinks (then
  loops are skipped); fifos, sockets and devices are skipped with a warning;
  --exclude GLOB (repeatable) leaves out what matches the relative path or
  the base name (`*` does not cross /, `**` does).

Incremental: files the server verified are recorded beside me.info
  (me.info.<id>.sent); a file whose size and mtime are unchanged is skipped
  without being read. --all sends everything.

Identity (me.info: name, 32-hex id, base64 of the RSA private key's DER):
  Without me.info the client registers (1025), sends a new RSA key (1026) and
  saves me.info (mode 0600, written atomically). With it, it reconnects (1027).
  Before registering it checks that me.info can be written there: if not, it
  registers nothing and exits 1. Should saving still fail after registering,
  it uploads nothing and exits 1; the server then holds the name with a lost
  key until the operator runs `backupd reset-key NAME` there.

Exit codes:
  0  every file was verified by the server
  1  usage or local error (bad arguments, missing file, bad me.info,
     me.info cannot be saved, file changed while being read)
  2  refused by the server (name taken, reconnect denied, 1607 after retries,
     malformed reply)
  3  cksum still wrong after three attempts (the upload was aborted with 1031)
  4  network failure or timeout
  When files fail for different reasons, the largest code is returned.";

/// Command-line arguments.
#[derive(Parser, Debug)]
#[command(
    name = "backup-client",
    version,
    about = "Send encrypted backups to a protocol-v3 server (backupd or any other)",
    after_help = AFTER_HELP
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub opts: CommonOpts,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Upload one or more files over one connection
    Send(SendArgs),
}

#[derive(Args, Debug)]
pub struct SendArgs {
    /// Files and folders to upload (folders recursively), named as given, like tar
    #[arg(required = true, value_name = "PATH")]
    pub files: Vec<PathBuf>,
    /// Server address
    #[arg(long, value_name = "HOST:PORT", env = "BACKUP_SERVER")]
    pub server: String,
    /// User name to register or reconnect as (must match me.info's, unless --register)
    #[arg(long, env = "BACKUP_NAME")]
    pub name: String,
}

/// How file packets are cut and labelled (see PROTOCOL.md).
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Convention {
    /// Whole-file ciphertext in pieces; content_size = this packet's length
    ThisPacket,
    /// Whole-file ciphertext in pieces; content_size = whole ciphertext length
    WholeFile,
    /// Each plaintext chunk encrypted separately
    PerChunk,
}

#[derive(Args, Debug)]
pub struct CommonOpts {
    /// Identity file
    #[arg(long, global = true, value_name = "PATH", default_value = "me.info")]
    pub identity: PathBuf,
    /// Register afresh even if the identity file exists; it is replaced only once registration succeeded
    #[arg(long, global = true)]
    pub register: bool,
    /// RSA key size for a new registration (servers in the field may expect exactly 1024)
    #[arg(long, global = true, value_name = "BITS", default_value_t = 1024,
          value_parser = clap::value_parser!(u32).range(1024..=4096))]
    pub key_bits: u32,
    /// Content bytes per file packet (suffixes K, KiB, M, MiB, G, GiB: binary multiples)
    #[arg(long, global = true, value_name = "SIZE", default_value = "1MiB", value_parser = parse_size)]
    pub packet_size: usize,
    /// Send each file as one packet, for servers that only take one (streamed, not held in memory)
    #[arg(long, global = true)]
    pub single_packet: bool,
    /// Packet convention
    #[arg(long, global = true, value_enum, default_value = "this-packet")]
    pub packet_convention: Convention,
    /// RSA-OAEP hash the server uses for the session key (sha1 or sha256; the other is tried if it fails)
    #[arg(long, global = true, value_name = "HASH", default_value = "sha1")]
    pub oaep_hash: OaepHash,
    /// Wait for the server's 1604 after 1030 (a stray 1604 is tolerated anyway)
    #[arg(long, global = true)]
    pub ack_retry: bool,
    /// TCP connect timeout (e.g. 10s, 500ms; a bare number is seconds)
    #[arg(long, global = true, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub connect_timeout: Duration,
    /// Timeout of each socket read and write (0 = none)
    #[arg(long, global = true, value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
    pub read_timeout: Duration,
    /// Extra attempts of a file after 1607, a dropped connection or a timeout
    #[arg(long, global = true, value_name = "N", default_value_t = 2)]
    pub retries: u32,
    /// Leave out files and folders whose relative path or base name matches GLOB (repeatable)
    #[arg(long, global = true, value_name = "GLOB")]
    pub exclude: Vec<String>,
    /// Follow symlinks inside folders (loops are skipped); without it they are skipped
    #[arg(long, global = true)]
    pub follow_symlinks: bool,
    /// Send every file, also those unchanged since the server verified them
    #[arg(long, global = true)]
    pub all: bool,
    /// Print one JSON object per file on stdout instead of the summary lines
    #[arg(long, global = true)]
    pub json: bool,
    /// No progress bar and no informational messages on stderr
    #[arg(long, short, global = true)]
    pub quiet: bool,
}

/// Parse a byte size (the server's syntax: `4096`, `64KiB`, `1MiB`), at least 1 byte.
pub fn parse_size(s: &str) -> Result<usize, String> {
    let v = crate::units::parse_size(s)?;
    if v == 0 {
        return Err("the size must be at least 1 byte".into());
    }
    usize::try_from(v).map_err(|_| format!("{s:?} is too large"))
}

/// Parse a duration (the server's syntax: `10`, `10s`, `500ms`, `2m`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    crate::units::parse_duration(s)
}

/// What to do, from the arguments or transfer.info.
pub(super) struct Job {
    pub(super) server: String,
    pub(super) name: String,
    pub(super) files: Vec<PathBuf>,
    /// Legacy mode: me.info's name wins over transfer.info's.
    pub(super) legacy: bool,
}

/// Run the command line of this process; returns the exit code.
pub fn main() -> i32 {
    main_with_args(std::env::args_os())
}

/// Run with explicit arguments (the first is the program name).
pub fn main_with_args<I, T>(args: I) -> i32
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.exit_code() == 0 { EXIT_OK } else { EXIT_LOCAL };
        }
    };
    run(cli)
}

pub(super) fn job_from(cli: &Cli, ui: &Ui) -> Result<Job, String> {
    match &cli.command {
        Some(Command::Send(a)) => {
            Ok(Job { server: a.server.clone(), name: a.name.clone(), files: a.files.clone(), legacy: false })
        }
        None => {
            let path = Path::new("transfer.info");
            let text = match std::fs::read_to_string(path) {
                Ok(t) => t,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    return Err("no transfer.info in the current directory; use \
                                `backup-client send PATH... --server HOST:PORT --name NAME` (see --help)"
                        .into())
                }
                Err(e) => return Err(format!("cannot read transfer.info: {e}")),
            };
            let t = identity::parse_transfer_info(&text).map_err(|e| format!("transfer.info: {e}"))?;
            ui.info(&format!(
                "transfer.info: sending {} file(s) to {} as {}",
                t.files.len(),
                t.server,
                t.name
            ));
            Ok(Job { server: t.server, name: t.name, files: t.files, legacy: true })
        }
    }
}

pub(super) fn check_server(s: &str) -> Result<(), String> {
    let ok = s.rsplit_once(':').is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
    if ok {
        Ok(())
    } else {
        Err(format!("server address {s:?} is not HOST:PORT"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert_eq!(parse_size("1M"), Ok(1 << 20));
        assert_eq!(parse_size("2 MiB"), Ok(2 << 20));
        assert!(parse_size("0").is_err());
        assert!(parse_size("1x").is_err());
        assert!(parse_size("").is_err());
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("-1").is_err());
        assert!(parse_duration("3d").is_err());
        assert!(parse_duration("31d").is_err());
    }

    #[test]
    fn server_address_check() {
        assert!(check_server("127.0.0.1:1256").is_ok());
        assert!(check_server("[::1]:1256").is_ok());
        assert!(check_server("host").is_err());
        assert!(check_server(":1").is_err());
        assert!(check_server("h:99999").is_err());
    }

    #[test]
    fn cli_parses() {
        let cli = Cli::try_parse_from([
            "backup-client",
            "send",
            "a",
            "b",
            "--server",
            "h:1",
            "--name",
            "n",
            "--json",
        ])
        .unwrap();
        assert!(cli.opts.json);
        assert_eq!(cli.opts.key_bits, 1024);
        assert_eq!(cli.opts.packet_size, 1 << 20);
        let Some(Command::Send(s)) = cli.command else { panic!() };
        assert_eq!(s.files.len(), 2);
        assert!(!cli.opts.all && !cli.opts.follow_symlinks && cli.opts.exclude.is_empty());
        let cli = Cli::try_parse_from([
            "backup-client",
            "send",
            "d",
            "--exclude",
            "*.log",
            "--exclude=tmp",
            "--all",
            "--follow-symlinks",
            "--server",
            "h:1",
            "--name",
            "n",
        ])
        .unwrap();
        assert_eq!(cli.opts.exclude, ["*.log", "tmp"]);
        assert!(cli.opts.all && cli.opts.follow_symlinks);
        let cli = Cli::try_parse_from(["backup-client", "--quiet"]).unwrap();
        assert!(cli.command.is_none());
        assert!(Cli::try_parse_from(["backup-client", "--key-bits", "512"]).is_err());
        // The commands the hints give parse, and register.
        let cli = Cli::try_parse_from(REGISTER_AGAIN.split(' ')).unwrap();
        assert!(cli.opts.register);
        let Some(Command::Send(s)) = cli.command else { panic!("{REGISTER_AGAIN}") };
        assert_eq!((s.server.as_str(), s.name.as_str()), ("HOST:PORT", "NAME"));
        let cli = Cli::try_parse_from(REGISTER_AGAIN_LEGACY.split(' ')).unwrap();
        assert!(cli.opts.register && cli.command.is_none());
        // What the hint of `backupd reset-key` used to say does not.
        assert!(Cli::try_parse_from(["backup-client", "--register", "--name", "NAME"]).is_err());
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
