//! The `backup-client` command line: argument parsing, identity handling,
//! the per-file retry policy, progress and the summary output.
//!
//! Policy, in one place:
//!
//! * Session (once per connection): reconnect (1027) with `me.info`, or
//!   register (1025) + send a fresh key (1026) and then save `me.info`
//!   atomically. 1601 and 1606 end the run (exit 2) with a clear message.
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

use std::cell::RefCell;
use std::ffi::OsString;
use std::io::{self, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand, ValueEnum};
use indicatif::ProgressBar;
use rsa::RsaPrivateKey;

use super::exclude::Excludes;
use super::identity::{self, Identity};
use super::record::{self, Record, Verified};
use super::report::Tally;
pub use super::report::{Done, Failure, FileReport};
use super::walk::{self, Entry, Found, Naming, WalkOptions};
use super::{Client, ClientError, ClientOptions, ContentSizeField, PacketPlan, SendOutcome, UploadOptions};
use crate::crypto::OaepHash;
use crate::protocol::{id_hex, Response};

/// Every file was verified.
pub const EXIT_OK: i32 = 0;
/// Usage or local error (bad arguments, missing file, bad me.info, file changed while read).
pub const EXIT_LOCAL: i32 = 1;
/// Refused by the server (name taken, reconnect denied, 1607 after retries, malformed reply).
pub const EXIT_REFUSED: i32 = 2;
/// The cksum was still wrong after three attempts.
pub const EXIT_CKSUM: i32 = 3;
/// Network failure or timeout.
pub const EXIT_NETWORK: i32 = 4;

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

Exit codes:
  0  every file was verified by the server
  1  usage or local error (bad arguments, missing file, bad me.info,
     file changed while being read)
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

// ---------------------------------------------------------------------------
// The retry policy
// ---------------------------------------------------------------------------

/// How an error from the client library is handled.
enum Disposition {
    /// 1607, network failure, malformed reply: retry the file.
    Retry(Failure),
    /// Give up on this file.
    Fail(Failure),
}

fn classify(e: &ClientError) -> Disposition {
    let msg = e.to_string();
    match e {
        ClientError::Io(_) => Disposition::Retry(Failure {
            code: EXIT_NETWORK,
            status: if e.is_timeout() { "timeout" } else { "network_error" },
            message: msg,
        }),
        ClientError::Refused(Response::GeneralError) => {
            Disposition::Retry(Failure { code: EXIT_REFUSED, status: "server_error", message: msg })
        }
        ClientError::Protocol(_) => {
            Disposition::Retry(Failure { code: EXIT_REFUSED, status: "protocol_error", message: msg })
        }
        ClientError::Refused(_) => {
            Disposition::Fail(Failure { code: EXIT_REFUSED, status: "refused", message: msg })
        }
        ClientError::Crypto(_) => {
            Disposition::Fail(Failure { code: EXIT_REFUSED, status: "crypto_error", message: msg })
        }
        ClientError::Local(_) => Disposition::Fail(Failure::local(msg)),
        ClientError::FileChanged { .. } => {
            Disposition::Fail(Failure { code: EXIT_LOCAL, status: "file_changed", message: msg })
        }
    }
}

// ---------------------------------------------------------------------------
// The run
// ---------------------------------------------------------------------------

/// What to do, from the arguments or transfer.info.
struct Job {
    server: String,
    name: String,
    files: Vec<PathBuf>,
    /// Legacy mode: me.info's name wins over transfer.info's.
    legacy: bool,
}

struct Ui {
    json: bool,
    quiet: bool,
    progress: bool,
    /// The run's progress bar while files are being sent (terminal only).
    bar: RefCell<Option<ProgressBar>>,
}

impl Ui {
    /// Write to stderr/stdout without tearing the progress bar.
    fn suspend(&self, f: impl FnOnce()) {
        match &*self.bar.borrow() {
            Some(b) => b.suspend(f),
            None => f(),
        }
    }

    fn info(&self, msg: &str) {
        if !self.quiet {
            self.suspend(|| {
                let _ = writeln!(io::stderr(), "backup-client: {msg}");
            });
        }
    }

    fn warn(&self, msg: &str) {
        self.suspend(|| {
            let _ = writeln!(io::stderr(), "backup-client: warning: {msg}");
        });
    }

    fn error(&self, msg: &str) {
        self.suspend(|| {
            let _ = writeln!(io::stderr(), "backup-client: error: {msg}");
        });
    }

    /// `--json`: every file; otherwise one line per file sent or failed
    /// (skipped files are counted at the end, symlinks and special files warned about).
    fn report(&self, r: &FileReport) {
        if !self.json && matches!(r.result, Ok(Done::Skipped { .. })) {
            return;
        }
        let text = if self.json { r.json() } else { r.line() };
        self.suspend(|| {
            let mut out = io::stdout().lock();
            let _ = writeln!(out, "{text}");
            let _ = out.flush();
        });
    }
}

/// A session-level failure: it ends the run for all remaining files.
struct Fatal(Failure);

/// Connection + identity state across files.
struct Session {
    server: String,
    name: String,
    identity_path: PathBuf,
    identity: Option<Identity>,
    /// Key generated for a registration not completed yet (kept across retries).
    new_key: Option<RsaPrivateKey>,
    key_bits: u32,
    client_opts: ClientOptions,
    client: Option<Client>,
}

impl Session {
    /// A usable, keyed connection; sets one up if needed.
    fn ensure(&mut self, ui: &Ui) -> Result<&mut Client, ClientError> {
        let usable = self
            .client
            .as_ref()
            .is_some_and(|c| c.is_in_step() && c.aes_key().is_some() && !c.is_peer_closed());
        if !usable {
            self.client = None;
            let client = self.setup(ui)?;
            self.client = Some(client);
        }
        Ok(self.client.as_mut().expect("client set above"))
    }

    fn setup(&mut self, ui: &Ui) -> Result<Client, ClientError> {
        if self.identity.is_none() && self.new_key.is_none() {
            ui.info(&format!("generating a {}-bit RSA key", self.key_bits));
            let key = RsaPrivateKey::new(&mut rand::rngs::OsRng, self.key_bits as usize)
                .map_err(|e| ClientError::Crypto(format!("RSA key generation failed: {e}")))?;
            self.new_key = Some(key);
        }
        let mut client = Client::connect(self.server.as_str(), &self.client_opts)?;
        if let Some(ident) = &self.identity {
            client.reconnect(ident.id, &ident.name, &ident.key)?;
            ui.info(&format!("reconnected as {} (id {})", ident.name, id_hex(&ident.id)));
            return Ok(client);
        }
        let id = client.register(&self.name)?;
        let key = self.new_key.as_ref().expect("key generated above");
        client.send_public_key(&self.name, key)?;
        let ident = Identity { name: self.name.clone(), id, key: key.clone() };
        match identity::save_identity(&self.identity_path, &ident) {
            Ok(()) => ui.info(&format!(
                "registered as {} (id {}); identity saved to {}",
                ident.name,
                id_hex(&id),
                self.identity_path.display()
            )),
            Err(e) => ui.error(&format!(
                "registered as {} (id {}) but could not save {}: {e}; this identity will be lost",
                ident.name,
                id_hex(&id),
                self.identity_path.display()
            )),
        }
        self.identity = Some(ident);
        self.new_key = None;
        Ok(client)
    }
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

fn job_from(cli: &Cli, ui: &Ui) -> Result<Job, String> {
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

fn check_server(s: &str) -> Result<(), String> {
    let ok = s.rsplit_once(':').is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
    if ok {
        Ok(())
    } else {
        Err(format!("server address {s:?} is not HOST:PORT"))
    }
}

/// The whole run; returns the exit code.
pub fn run(cli: Cli) -> i32 {
    let o = &cli.opts;
    let ui = Ui {
        json: o.json,
        quiet: o.quiet,
        progress: !o.quiet && io::stderr().is_terminal(),
        bar: RefCell::new(None),
    };
    let (job, excludes) = match job_from(&cli, &ui).and_then(|j| Ok((j, Excludes::new(&o.exclude)?))) {
        Ok(v) => v,
        Err(e) => {
            ui.error(&e);
            return EXIT_LOCAL;
        }
    };
    let naming = if job.legacy { Naming::BaseName } else { Naming::AsGiven };
    let own_files = record::own_files(&o.identity);
    let walk_opts = WalkOptions { naming, follow_symlinks: o.follow_symlinks, excludes, own_files };
    let entries = walk::walk(&job.files, &walk_opts);
    let mut tally = Tally::default();
    let finish = |r: FileReport, tally: &mut Tally| {
        ui.report(&r);
        tally.add(&r);
    };

    let pre = (|| -> Result<(Option<Identity>, String), Failure> {
        check_server(&job.server).map_err(Failure::local)?;
        let mut name = job.name.clone();
        super::name_field(&name).map_err(|e| Failure::local(format!("user name: {e}")))?;
        let mut ident = None;
        if !o.register && o.identity.exists() {
            let id = identity::load_identity(&o.identity)
                .map_err(|e| Failure::local(format!("bad identity: {e}")))?;
            if id.name != name {
                if job.legacy {
                    ui.info(&format!(
                        "{} belongs to {:?}; using that name instead of {:?} from transfer.info",
                        o.identity.display(),
                        id.name,
                        name
                    ));
                    name = id.name.clone();
                } else {
                    return Err(Failure::local(format!(
                        "{} belongs to {:?}, not {:?} (use --identity for another file, or --register)",
                        o.identity.display(),
                        id.name,
                        name
                    )));
                }
            }
            ident = Some(id);
        }
        Ok((ident, name))
    })();
    let (ident, name) = match pre {
        Ok(v) => v,
        Err(f) => {
            // Nothing can be sent: every file is reported with the reason.
            ui.error(&f.message);
            for e in &entries {
                finish(settle(e, Some(&f), &ui), &mut tally);
            }
            return tally.code;
        }
    };

    let mut record = match &ident {
        Some(id) => {
            let path = record::record_path(&o.identity, &id.id);
            Record::load(&path).unwrap_or_else(|e| {
                ui.warn(&format!("cannot read {}: {e}; every file is sent", path.display()));
                Record::default()
            })
        }
        None => Record::default(),
    };
    // Decided once, before anything is sent: what goes and what is unchanged.
    let unchanged: Vec<Option<Verified>> = entries
        .iter()
        .map(|e| match &e.found {
            Found::File(stamp) if !o.all => record.unchanged(&e.name, stamp).copied(),
            _ => None,
        })
        .collect();
    let (n_send, bytes_send) = entries
        .iter()
        .zip(&unchanged)
        .filter_map(|(e, u)| match (&e.found, u) {
            (Found::File(stamp), None) => Some(stamp.size),
            _ => None,
        })
        .fold((0usize, 0u64), |(n, b), size| (n + 1, b + size));
    if ui.progress && n_send > 0 {
        *ui.bar.borrow_mut() = Some(run_bar(bytes_send));
    }

    let upload_opts = UploadOptions {
        packet_size: if o.single_packet { usize::MAX } else { o.packet_size },
        content_size: match o.packet_convention {
            Convention::ThisPacket => ContentSizeField::ThisPacket,
            Convention::WholeFile => ContentSizeField::WholeFile,
            Convention::PerChunk => ContentSizeField::PerPacketEncrypted,
        },
        ack_retry: o.ack_retry,
    };
    let mut session = Session {
        server: job.server.clone(),
        name,
        identity_path: o.identity.clone(),
        identity: ident,
        new_key: None,
        key_bits: o.key_bits,
        client_opts: ClientOptions {
            connect_timeout: o.connect_timeout,
            read_timeout: o.read_timeout,
            oaep_hash: o.oaep_hash,
        },
        client: None,
    };

    let mut fatal: Option<Failure> = None;
    let (mut i_send, mut bytes_done) = (0usize, 0u64);
    let mut last_save = Instant::now();
    for (e, unchanged) in entries.iter().zip(unchanged) {
        let report = match (&e.found, unchanged, &fatal) {
            (Found::File(stamp), Some(v), _) => {
                let mut r =
                    report_for(e, Ok(Done::Skipped { status: "unchanged", reason: UNCHANGED.into() }));
                (r.size, r.cksum) = (Some(stamp.size), Some(v.cksum));
                r
            }
            (Found::File(stamp), None, None) => {
                i_send += 1;
                if let Some(b) = &*ui.bar.borrow() {
                    b.set_prefix(format!("{i_send}/{n_send} files"));
                    b.set_message(e.name.clone());
                }
                let r = match send_one(&mut session, e, stamp.size, &upload_opts, o.retries, &ui, bytes_done)
                {
                    Ok(r) => r,
                    Err(Fatal(f)) => {
                        ui.error(&f.message);
                        fatal = Some(f.clone());
                        report_for(e, Err(f))
                    }
                };
                if let (Ok(Done::Verified), Some(ck)) = (&r.result, r.cksum) {
                    record.insert(&e.name, *stamp, ck);
                    if last_save.elapsed() >= RECORD_SAVE_EVERY {
                        save_record(&mut record, &session, &ui);
                        last_save = Instant::now();
                    }
                }
                bytes_done += stamp.size;
                if let Some(b) = &*ui.bar.borrow() {
                    b.set_position(bytes_done);
                }
                r
            }
            (_, _, fatal) => settle(e, fatal.as_ref(), &ui),
        };
        finish(report, &mut tally);
    }
    if let Some(b) = ui.bar.borrow_mut().take() {
        b.finish_and_clear();
    }
    save_record(&mut record, &session, &ui);
    ui.info(&format!(
        "{} file(s): {} sent, {} unchanged, {} skipped, {} failed",
        tally.sent + tally.unchanged + tally.skipped + tally.failed,
        tally.sent,
        tally.unchanged,
        tally.skipped,
        tally.failed
    ));
    tally.code
}

const UNCHANGED: &str = "unchanged since the server verified it (--all sends it anyway)";

/// How often the record is saved during a run (and always at its end), so
/// that an interrupted run does not send again what was verified.
const RECORD_SAVE_EVERY: Duration = Duration::from_secs(5);

/// Save the record of the session's identity (if there is one yet); a
/// failure is a warning: files are then only sent again next time.
fn save_record(record: &mut Record, session: &Session, ui: &Ui) {
    let Some(ident) = &session.identity else { return };
    let path = record::record_path(&session.identity_path, &ident.id);
    if let Err(e) = record.save(&path) {
        ui.warn(&format!("cannot save {}: {e}; verified files will be sent again next time", path.display()));
    }
}

/// The progress bar of a whole run: files (prefix), bytes, rate, ETA.
fn run_bar(total_bytes: u64) -> ProgressBar {
    let style = indicatif::ProgressStyle::with_template(
        "{prefix} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta} {wide_msg}",
    )
    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
    .progress_chars("=> ");
    ProgressBar::new(total_bytes).with_style(style)
}

/// The report of an entry that is not sent: skipped as the walk found it,
/// its walk error, or (a regular file) the failure that ended the run.
fn settle(e: &Entry, fatal: Option<&Failure>, ui: &Ui) -> FileReport {
    match &e.found {
        Found::Skipped { status, reason, warn } => {
            if *warn {
                ui.warn(&format!("{}: {reason}", e.path.display()));
            }
            report_for(e, Ok(Done::Skipped { status, reason: reason.clone() }))
        }
        Found::Error(msg) => report_for(e, Err(Failure::local(msg.clone()))),
        Found::File(stamp) => {
            let f = fatal.cloned().unwrap_or_else(|| Failure::local("not sent"));
            let mut r = report_for(e, Err(f));
            r.size = Some(stamp.size);
            r
        }
    }
}

fn report_for(e: &Entry, result: Result<Done, Failure>) -> FileReport {
    FileReport {
        path: e.path.clone(),
        name: e.name.clone(),
        size: None,
        cksum: None,
        server_cksum: None,
        attempts: 0,
        elapsed: Duration::ZERO,
        result,
    }
}

/// Checks that need no server: the name and size can be sent.
fn precheck(e: &Entry, size: u64, opts: &UploadOptions) -> Result<(), Failure> {
    if e.name.is_empty() {
        return Err(Failure::local(format!("{}: no file name to send it under", e.path.display())));
    }
    super::name_field(&e.name).map_err(|err| Failure::local(format!("{}: {err}", e.path.display())))?;
    PacketPlan::new(size, opts.packet_size, opts.content_size)
        .map_err(|m| Failure::local(format!("{}: {m}", e.path.display())))?;
    Ok(())
}

fn session_failure(e: &ClientError, server: &str, name: &str) -> Disposition {
    match e {
        ClientError::Refused(Response::RegistrationFailed) => Disposition::Fail(Failure {
            code: EXIT_REFUSED,
            status: "name_taken",
            message: format!(
                "the server refused to register {name:?}: the name is already taken \
                 (choose another --name, or use the me.info of that user)"
            ),
        }),
        ClientError::Refused(Response::ReconnectDenied { .. }) => Disposition::Fail(Failure {
            code: EXIT_REFUSED,
            status: "reconnect_denied",
            message: format!(
                "the server denied reconnecting as {name:?} (it does not know this id and name, or has no key \
                 for it); use --register to register afresh"
            ),
        }),
        ClientError::Io(_) => Disposition::Retry(Failure {
            code: EXIT_NETWORK,
            status: if e.is_timeout() { "timeout" } else { "network_error" },
            message: format!("{server}: {e}"),
        }),
        _ => classify(e),
    }
}

/// Send one file (with the retry policy); `bytes_before` is what the run's
/// progress bar had reached before it.
fn send_one(
    session: &mut Session,
    e: &Entry,
    size: u64,
    opts: &UploadOptions,
    retries: u32,
    ui: &Ui,
    bytes_before: u64,
) -> Result<FileReport, Fatal> {
    let start = Instant::now();
    // Time and rate count from the first byte of the file sent, not the
    // connection and identity set-up (key generation can take seconds).
    let mut upload_start: Option<Instant> = None;
    let mut report = report_for(e, Ok(Done::Verified));
    report.size = Some(size);
    if let Err(f) = precheck(e, size, opts) {
        report.result = Err(f);
        return Ok(report);
    }
    let (name, path) = (e.name.as_str(), e.path.as_path());

    let mut tries = 0;
    let result = loop {
        let backoff = Duration::from_millis(500 * u64::from(tries + 1));
        let client = match session.ensure(ui) {
            Ok(c) => c,
            Err(err) => match session_failure(&err, &session.server, &session.name) {
                Disposition::Retry(f) if tries < retries => {
                    ui.info(&format!("{}; retrying in {:.1} s", f.message, backoff.as_secs_f64()));
                    tries += 1;
                    std::thread::sleep(backoff);
                    continue;
                }
                Disposition::Retry(f) | Disposition::Fail(f) => return Err(Fatal(f)),
            },
        };
        let mut progress = |n: u64| {
            if let Some(b) = &*ui.bar.borrow() {
                b.set_position(bytes_before + n);
            }
        };
        upload_start.get_or_insert_with(Instant::now);
        // Only a 1603 of this file counts (not one of an earlier file on this connection).
        let earlier = client.last_upload().cloned();
        let r = client.send_file(name, path, opts, &mut progress);
        if let Some(up) = client.last_upload().filter(|&up| Some(up) != earlier.as_ref()) {
            report.cksum = Some(up.local_cksum);
            report.server_cksum = Some(up.server_cksum);
        }
        match r {
            Ok(SendOutcome::Verified { attempts, cksum }) => {
                report.attempts = attempts;
                report.cksum = Some(cksum);
                report.server_cksum = Some(cksum);
                break Ok(Done::Verified);
            }
            Ok(SendOutcome::CksumMismatch { attempts }) => {
                report.attempts = attempts;
                break Err(Failure {
                    code: EXIT_CKSUM,
                    status: "cksum_mismatch",
                    message: format!("cksum still wrong after {attempts} attempts; upload aborted (1031)"),
                });
            }
            Err(err) => {
                if !client.is_in_step() || err.is_network() {
                    session.client = None;
                }
                match classify(&err) {
                    Disposition::Retry(f) if tries < retries => {
                        ui.info(&format!(
                            "{}: {}; retrying in {:.1} s",
                            path.display(),
                            f.message,
                            backoff.as_secs_f64()
                        ));
                        tries += 1;
                        std::thread::sleep(backoff);
                    }
                    Disposition::Retry(f) | Disposition::Fail(f) => break Err(f),
                }
            }
        }
    };
    report.elapsed = upload_start.unwrap_or(start).elapsed();
    report.result = result;
    if report.result.is_err() && report.attempts == 0 {
        report.attempts = tries + 1;
    }
    Ok(report)
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
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
