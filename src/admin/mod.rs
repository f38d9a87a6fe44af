//! The `backupd` command line: the server (no subcommand, or `serve`) and
//! the admin commands an operator runs on the data directory.
//!
//! | module | commands |
//! |---|---|
//! | [`list`] | `clients`, `files` |
//! | [`verify`] | `verify` |
//! | [`restore`] | `restore` |
//! | [`manage`] | `remove-client`, `reset-key` (they write: they take the data directory's lock) |
//! | [`snapshot`] | `snapshot` |
//! | `remote` | `s3 resync`, and the bucket as `restore` and `verify` read it (feature `s3`) |
//! | [`store`] | the data directory as they read it (database read-only, stored copies) |
//!
//! Read-only commands open the database with `SQLITE_OPEN_READ_ONLY` and
//! work while the server runs. Exit codes: 0 success, 1 failure, 2 usage
//! error (clap's), 3 `verify` found a problem.

pub mod list;
pub mod manage;
pub mod output;
#[cfg(feature = "s3")]
pub mod remote;
pub mod restore;
pub mod snapshot;
pub mod store;
pub mod time;
pub mod verify;

use std::ffi::OsString;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::Config;

/// The end of `backupd --help` (the same list as README.md).
const EXIT_CODES: &str = "\
Exit codes:
  0    success; for the server, a clean shutdown
  1    the server cannot start (the reason is printed) or failed; a command failed
  2    usage error: an unknown flag or subcommand, a bad value (the message says which)
  3    verify found a problem
  130  the server got a second SIGINT/SIGTERM while finishing its work, and stopped at once";

/// backupd: receives protocol-v3 encrypted backups and stores them safely.
///
/// With no subcommand (or `serve`) it runs the server: with no arguments it
/// listens on 0.0.0.0 at the port in ./port.info (1256 if that file is
/// missing or invalid) and keeps its data in ./backupd-data. The other
/// subcommands inspect and manage the data directory; see docs/OPERATIONS.md.
#[derive(Parser, Debug)]
#[command(
    name = "backupd",
    version,
    about,
    long_about,
    args_conflicts_with_subcommands = true,
    after_help = EXIT_CODES
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    #[command(flatten)]
    pub server: Config,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the server (the same as no subcommand)
    Serve(Config),
    /// List the clients: id, name, last seen, files, bytes stored, last backup, quota
    Clients(list::ClientsArgs),
    /// List the files of one client, or of all: size, cksum, received time, versions
    Files(list::FilesArgs),
    /// Recompute the cksum of every stored file and version; exit 3 on any problem
    Verify(verify::VerifyArgs),
    /// Copy a client's files (or the named files and folders) out into a directory
    Restore(restore::RestoreArgs),
    /// Remove a client's registration and (unless --keep-files) its files; server stopped
    RemoveClient(manage::RemoveClientArgs),
    /// Forget a client's public key so that it can send a new one; server stopped
    ResetKey(manage::ResetKeyArgs),
    /// Copy the database (online backup) and hard-link the stored files into DIR
    Snapshot(snapshot::SnapshotArgs),
    /// The S3 tier: `s3 resync` queues what the bucket lacks
    #[cfg(feature = "s3")]
    #[command(subcommand)]
    S3(remote::S3Command),
}

impl Cli {
    /// Parse the command line. Options written before a subcommand
    /// (`backupd --data-dir /srv/b verify`, as `git -C` reads) are taken as
    /// the subcommand's when it has them; otherwise clap's usage error
    /// (exit 2).
    ///
    /// For an admin subcommand the environment variables of the server's
    /// own options (BACKUPD_LISTEN, BACKUPD_LOG_LEVEL, ...) are not read:
    /// one environment file serves the server and the admin commands, and a
    /// server setting must not make `verify` fail. The subcommand still
    /// reads those it takes (BACKUPD_DATA_DIR, ...). The server (no
    /// subcommand, or `serve`) validates them all as before.
    pub fn parse_args(args: Vec<OsString>) -> Cli {
        match Cli::try_parse_args(&args) {
            Ok(cli) => cli,
            // The subcommand's own error when the options were its (for
            // `backupd --json --data-dir D clients` too): it names what is wrong.
            Err(e) => match subcommand_first(&args) {
                Some(moved) => Cli::try_parse_args(&moved).unwrap_or_else(|e| e.exit()),
                None => unknown_subcommand(&args, e).exit(),
            },
        }
    }

    /// One parse of `args` (see [`Cli::parse_args`]): the server's options
    /// read no environment variable when `args` name an admin subcommand.
    fn try_parse_args(args: &[OsString]) -> Result<Cli, clap::Error> {
        use clap::{CommandFactory, FromArgMatches};
        let mut cmd = Cli::command();
        if admin_subcommand(args) {
            cmd = cmd.mut_args(|a| a.env(None));
        }
        let mut matches = cmd.try_get_matches_from_mut(args)?;
        Cli::from_arg_matches_mut(&mut matches).map_err(|e| e.format(&mut cmd))
    }

    /// The server's configuration when the command line runs the server.
    pub fn into_server(self) -> Result<Config, Box<Command>> {
        match self.command {
            None => Ok(self.server),
            Some(Command::Serve(cfg)) => Ok(cfg),
            Some(other) => Err(Box::new(other)),
        }
    }
}

/// `args` with its subcommand moved before the options, when it comes after
/// options only (see [`word_after_options`]). None when no subcommand
/// follows options that way.
fn subcommand_first(args: &[OsString]) -> Option<Vec<OsString>> {
    let (at, name) = word_after_options(args)?;
    if at == 1 || !subcommand_names().contains(&name) {
        return None;
    }
    let mut v = args.to_vec();
    let sub = v.remove(at);
    v.insert(1, sub);
    Some(v)
}

/// For `backupd --data-dir D verfy`: clap reports a word after the
/// server's options as a subcommand that "cannot be used with" them, even
/// when no subcommand has that name. The error of that word alone then
/// (`unrecognized subcommand 'verfy'`, as without the options), which is
/// what is wrong; `error` otherwise.
fn unknown_subcommand(args: &[OsString], error: clap::Error) -> clap::Error {
    if error.kind() != clap::error::ErrorKind::ArgumentConflict {
        return error;
    }
    match word_after_options(args) {
        Some((at, word)) if at > 1 && !subcommand_names().contains(&word) => {
            let alone = args.iter().take(1).chain(&args[at..]);
            Cli::try_parse_from(alone).err().unwrap_or(error)
        }
        _ => error,
    }
}

/// Whether `args` run an admin subcommand: their first word that is not
/// an option (or an option's value) names a subcommand other than `serve`.
fn admin_subcommand(args: &[OsString]) -> bool {
    matches!(word_after_options(args), Some((_, w)) if w != "serve" && subcommand_names().contains(&w))
}

/// The names of the subcommands.
fn subcommand_names() -> Vec<String> {
    let cmd = <Cli as clap::CommandFactory>::command();
    cmd.get_subcommands().map(|c| c.get_name().to_string()).collect()
}

/// The first word of `args` (after the program's name) that is neither an
/// option nor an option's value, with its index. A value is skipped for any
/// option that takes one anywhere in the command line's grammar, so that
/// `--data-dir files` is the folder "files", not the subcommand. None at
/// `--`, `-` or the end.
fn word_after_options(args: &[OsString]) -> Option<(usize, String)> {
    let cmd = <Cli as clap::CommandFactory>::command();
    let every_arg = cmd.get_arguments().chain(cmd.get_subcommands().flat_map(|c| c.get_arguments()));
    let valued: Vec<&clap::Arg> = every_arg.filter(|a| a.get_action().takes_values()).collect();
    let mut i = 1;
    loop {
        // Lossy: options are ASCII, and a word that is not UTF-8 is no subcommand.
        let word = args.get(i)?.to_string_lossy();
        if word == "--" || word == "-" {
            return None;
        }
        let skip_value = if let Some(long) = word.strip_prefix("--") {
            !long.contains('=') && valued.iter().any(|a| a.get_long() == Some(long))
        } else if let Some(short) = word.strip_prefix('-') {
            let mut chars = short.chars();
            let (c, rest) = (chars.next(), chars.next());
            rest.is_none() && valued.iter().any(|a| a.get_short() == c)
        } else {
            return Some((i, word.into_owned()));
        };
        i += 1 + usize::from(skip_value);
    }
}

/// Run an admin command; errors are printed as `backupd: ...` with exit 1.
pub fn run(cmd: &Command) -> ExitCode {
    let result = match cmd {
        Command::Serve(_) => Err("serve is not an admin command".to_string()),
        Command::Clients(a) => list::clients(a),
        Command::Files(a) => list::files(a),
        Command::Verify(a) => verify::verify(a),
        Command::Restore(a) => restore::restore(a),
        Command::RemoveClient(a) => manage::remove_client(a),
        Command::ResetKey(a) => manage::reset_key(a),
        Command::Snapshot(a) => snapshot::snapshot(a),
        #[cfg(feature = "s3")]
        Command::S3(c) => remote::run(c),
    };
    result.unwrap_or_else(|e| {
        eprintln!("backupd: {e}");
        ExitCode::FAILURE
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_subcommand_runs_the_server_with_its_flags() {
        let cli = Cli::try_parse_from(["backupd", "--data-dir", "d", "--keep-versions", "5"]).unwrap();
        let cfg = cli.into_server().unwrap();
        assert_eq!(cfg.keep_versions, 5);
        let cli = Cli::try_parse_from(["backupd", "serve", "--data-dir", "d"]).unwrap();
        assert_eq!(cli.into_server().unwrap().data_dir, std::path::PathBuf::from("d"));
        let cli =
            Cli::try_parse_from(["backupd", "files", "alice", "--versions", "--data-dir", "d"]).unwrap();
        let Err(cmd) = cli.into_server() else { panic!("files must not run the server") };
        assert!(matches!(&*cmd, Command::Files(f) if f.versions && f.client.as_deref() == Some("alice")));
        // Options before the subcommand are the subcommand's, when it has them.
        let args = |v: &[&str]| v.iter().map(OsString::from).collect::<Vec<_>>();
        let cli = Cli::parse_args(args(&["backupd", "--data-dir", "d", "files", "alice", "--versions"]));
        let Err(cmd) = cli.into_server() else { panic!("files must not run the server") };
        assert!(
            matches!(&*cmd, Command::Files(f) if f.versions && f.store.data_dir == std::path::Path::new("d"))
        );
        // A value that is a subcommand's name is the option's value (the
        // folder "reset-key"), not the subcommand.
        let moved = subcommand_first(&args(&["backupd", "--data-dir", "reset-key", "files", "s"]));
        assert_eq!(moved, Some(args(&["backupd", "files", "--data-dir", "reset-key", "s"])));
        let moved = subcommand_first(&args(&["backupd", "--db", "verify", "-q", "--to=x", "clients"]));
        assert_eq!(moved, Some(args(&["backupd", "clients", "--db", "verify", "-q", "--to=x"])));
        assert_eq!(subcommand_first(&args(&["backupd", "--data-dir", "verify"])), None);
        assert_eq!(subcommand_first(&args(&["backupd", "--data-dir", "d", "bogus", "files"])), None);
        assert_eq!(subcommand_first(&args(&["backupd", "files", "--data-dir", "d"])), None);
        assert_eq!(subcommand_first(&args(&["backupd", "--", "files"])), None);
        // A word after the server's options that names no subcommand: the
        // error says so, not that a subcommand conflicts with the options.
        let bogus = args(&["backupd", "--data-dir", "d", "bogus"]);
        let e = Cli::try_parse_from(&bogus).unwrap_err();
        assert_eq!(e.kind(), clap::error::ErrorKind::ArgumentConflict);
        let e = unknown_subcommand(&bogus, e);
        assert_eq!(e.kind(), clap::error::ErrorKind::InvalidSubcommand);
        assert!(e.to_string().contains("'bogus'"), "{e}");
        // Another error is left as it is.
        let bad = args(&["backupd", "--max-connections", "many"]);
        let e = unknown_subcommand(&bad, Cli::try_parse_from(&bad).unwrap_err());
        assert_eq!(e.kind(), clap::error::ErrorKind::ValueValidation);
        // A word that is not UTF-8 after the options is no subcommand either.
        {
            use std::os::unix::ffi::OsStringExt;
            let mut odd = args(&["backupd", "--data-dir", "d"]);
            odd.push(OsString::from_vec(vec![0x62, 0xff, 0x67]));
            assert_eq!(word_after_options(&odd), Some((3, "b\u{fffd}g".to_string())));
            let e = unknown_subcommand(&odd, Cli::try_parse_from(&odd).unwrap_err());
            assert_ne!(e.kind(), clap::error::ErrorKind::ArgumentConflict, "{e}");
        }
        // Usage errors are clap's (exit 2).
        assert!(Cli::try_parse_from(["backupd", "restore", "alice"]).is_err());
        assert!(Cli::try_parse_from([
            "backupd",
            "restore",
            "a",
            "--to",
            "x",
            "--version",
            "1",
            "--before",
            "@0"
        ])
        .is_err());
    }
}
