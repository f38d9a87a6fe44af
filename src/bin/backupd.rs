//! `backupd`: parse the command line; run an admin command (`src/admin/`),
//! or set up logging, start the server and map the outcome to an exit code
//! (0 after a clean shutdown, 1 when it cannot start or fails).

use std::fs::OpenOptions;
use std::io::LineWriter;
use std::process::ExitCode;

use clap::Parser;
use simplelog::{ConfigBuilder, WriteLogger};

use backupd::admin::{self, Cli};
use backupd::config::Config;
use backupd::server::Server;

fn init_logging(cfg: &Config) -> Result<(), String> {
    let log_cfg = ConfigBuilder::new()
        .set_time_format_rfc3339()
        .set_thread_level(log::LevelFilter::Off)
        .set_target_level(log::LevelFilter::Off)
        .build();
    match &cfg.log_file {
        Some(path) => {
            let f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| format!("cannot open log file {}: {e}", path.display()))?;
            WriteLogger::init(cfg.log_level, log_cfg, LineWriter::new(f)).map_err(|e| e.to_string())
        }
        // simplelog writes a line in many small pieces: buffer them into one
        // write(2) per line (the loop logs from its own thread).
        None => WriteLogger::init(cfg.log_level, log_cfg, LineWriter::new(std::io::stderr()))
            .map_err(|e| e.to_string()),
    }
}

fn main() -> ExitCode {
    let cfg = match Cli::parse().into_server() {
        Ok(cfg) => cfg,
        Err(cmd) => return admin::run(&cmd),
    };
    // A file-size limit (RLIMIT_FSIZE) must fail the write with EFBIG, which
    // the worker turns into a 1607 for that upload, not kill the server.
    // SAFETY: setting a signal disposition to SIG_IGN before any thread starts.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
    if let Err(e) = init_logging(&cfg) {
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
    let server = match Server::bind(cfg, addr) {
        Ok(s) => s,
        Err(e) => {
            log::error!("cannot start: {e}");
            eprintln!("backupd: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    match server.run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("server failed: {e}");
            ExitCode::FAILURE
        }
    }
}
