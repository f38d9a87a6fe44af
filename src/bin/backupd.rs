//! `backupd`: parse the command line; run an admin command (`src/admin/`),
//! or set up logging, start the server and map the outcome to an exit code
//! (0 after a clean shutdown, 1 when it cannot start or fails; clap exits 2
//! on a usage error, the loop 130 on a second signal).

use std::process::ExitCode;
use std::time::Duration;

use backupd::admin::{self, Cli};
use backupd::logging::{self, Sink};
use backupd::server::Server;

fn main() -> ExitCode {
    let cfg = match Cli::parse_args(std::env::args_os().collect()).into_server() {
        Ok(cfg) => cfg,
        Err(cmd) => return admin::run(&cmd),
    };
    // A file-size limit (RLIMIT_FSIZE) must fail the write with EFBIG, which
    // the worker turns into a 1607 for that upload, not kill the server.
    // SAFETY: setting a signal disposition to SIG_IGN before any thread starts.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
    let sink = cfg.log_file.clone().map_or(Sink::Stderr, Sink::File);
    if let Err(e) = logging::init(cfg.log_level, sink) {
        eprintln!("backupd: {e}");
        return ExitCode::FAILURE;
    }
    let (addr, warning) = cfg.listen_addr();
    if let Some(w) = warning {
        log::warn!("{w}");
    }
    log::info!(
        "backupd {} starting: data in {}, database {}",
        env!("CARGO_PKG_VERSION"),
        cfg.data_dir.display(),
        cfg.db_path().display()
    );
    // With the log on standard error the error line is already there.
    let log_to_file = cfg.log_file.is_some();
    let code = match Server::bind(cfg, addr) {
        Ok(server) => match server.run() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                log::error!("server failed: {e}");
                ExitCode::FAILURE
            }
        },
        Err(e) => {
            let why = match e.hint() {
                Some(hint) => format!("{e}; {hint}"),
                None => e.to_string(),
            };
            log::error!("cannot start: {why}");
            logging::flush(Duration::from_secs(2));
            if log_to_file {
                eprintln!("backupd: cannot start: {why}");
            }
            return ExitCode::FAILURE;
        }
    };
    logging::flush(Duration::from_secs(2));
    code
}
