//! What `backup-client` tells the person running it: informational lines,
//! warnings and errors on stderr (without tearing the progress bar), and one
//! report per file on stdout (`--json`: every file; otherwise those sent or
//! failed).

use std::cell::RefCell;
use std::io::{self, IsTerminal, Write};

use indicatif::ProgressBar;

use super::cli::CommonOpts;
use super::report::{Done, FileReport};

pub(super) struct Ui {
    json: bool,
    quiet: bool,
    /// A progress bar is shown (stderr is a terminal and not `--quiet`).
    pub(super) progress: bool,
    /// The run's progress bar while files are being sent (terminal only).
    pub(super) bar: RefCell<Option<ProgressBar>>,
}

impl Ui {
    pub(super) fn new(o: &CommonOpts) -> Ui {
        Ui {
            json: o.json,
            quiet: o.quiet,
            progress: !o.quiet && io::stderr().is_terminal(),
            bar: RefCell::new(None),
        }
    }

    /// Write to stderr/stdout without tearing the progress bar.
    pub(super) fn suspend(&self, f: impl FnOnce()) {
        match &*self.bar.borrow() {
            Some(b) => b.suspend(f),
            None => f(),
        }
    }

    pub(super) fn info(&self, msg: &str) {
        if !self.quiet {
            self.suspend(|| {
                let _ = writeln!(io::stderr(), "backup-client: {msg}");
            });
        }
    }

    pub(super) fn warn(&self, msg: &str) {
        self.suspend(|| {
            let _ = writeln!(io::stderr(), "backup-client: warning: {msg}");
        });
    }

    pub(super) fn error(&self, msg: &str) {
        self.suspend(|| {
            let _ = writeln!(io::stderr(), "backup-client: error: {msg}");
        });
    }

    /// `--json`: every file; otherwise one line per file sent or failed
    /// (skipped files are counted at the end, symlinks and special files warned about).
    pub(super) fn report(&self, r: &FileReport) {
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
