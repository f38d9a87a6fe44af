//! The whole `backup-client` run (module docs of `cli.rs`, "Policy"): the
//! arguments walked, the identity checked, what is unchanged decided once
//! from the incremental record, then each file sent, skipped or settled, with
//! the record saved now and then and the closing count.

use std::time::{Duration, Instant};

use indicatif::ProgressBar;

use super::cli::{
    job_from, Cli, CommonOpts, Convention, Job, EXIT_LOCAL, REGISTER_AGAIN, REGISTER_AGAIN_LEGACY,
};
use super::exclude::Excludes;
use super::identity::{self, Identity};
use super::record::{self, Record, Stamp, Verified};
use super::report::{Done, Failure, FileReport, Tally};
use super::retry::{send_one, Fatal, Session};
use super::ui::Ui;
use super::walk::{self, Entry, Found, Naming, WalkOptions};
use super::{ClientOptions, ContentSizeField, UploadOptions};

/// The whole run; returns the exit code.
pub fn run(cli: Cli) -> i32 {
    let o = &cli.opts;
    let ui = Ui::new(o);
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

    let (ident, name) = match check_identity(&job, o, &ui) {
        Ok(v) => v,
        Err(f) => {
            // Nothing can be sent: every file is reported with the reason.
            ui.error(&f.message);
            for e in &entries {
                finish(settle(e, Some(&f), &ui), &ui, &mut tally);
            }
            return tally.code;
        }
    };
    let record = load_record(ident.as_ref(), o, &ui);
    // Decided once, before anything is sent: what goes and what is unchanged.
    let unchanged: Vec<Option<Verified>> = entries
        .iter()
        .map(|e| match &e.found {
            Found::File(stamp) if !o.all => record.unchanged(&e.name, stamp).copied(),
            _ => None,
        })
        .collect();
    let session = Session {
        server: job.server.clone(),
        name,
        identity_path: o.identity.clone(),
        identity: ident,
        new_key: None,
        key_bits: o.key_bits,
        register_again: if job.legacy { REGISTER_AGAIN_LEGACY } else { REGISTER_AGAIN },
        client_opts: ClientOptions {
            connect_timeout: o.connect_timeout,
            read_timeout: o.read_timeout,
            oaep_hash: o.oaep_hash,
        },
        client: None,
    };
    let mut sender = Sender::new(session, record, o, &ui, &entries, &unchanged);
    for (e, unchanged) in entries.iter().zip(unchanged) {
        finish(sender.entry(e, unchanged), &ui, &mut tally);
    }
    sender.end();
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

/// A file's report is printed and counted.
fn finish(r: FileReport, ui: &Ui, tally: &mut Tally) {
    ui.report(&r);
    tally.add(&r);
}

/// Checks before anything is sent: the server address, the user name, and
/// the identity file (if any, and not `--register`) against that name, or
/// (to register) that it can be saved. In legacy mode (transfer.info)
/// me.info's name wins. The identity, if one is used, and the name to
/// register or reconnect as.
fn check_identity(job: &Job, o: &CommonOpts, ui: &Ui) -> Result<(Option<Identity>, String), Failure> {
    super::cli::check_server(&job.server).map_err(Failure::local)?;
    let mut name = job.name.clone();
    super::name_field(&name).map_err(|e| Failure::local(format!("user name: {e}")))?;
    if o.register || !o.identity.exists() {
        // A registration whose identity cannot be saved locks the name out
        // (the key would be lost): find out before registering.
        identity::check_can_save(&o.identity).map_err(|e| {
            Failure::local(format!(
                "cannot save the identity to {}: {e}; nothing was registered (use --identity with a path in a \
                 folder that can be written)",
                o.identity.display()
            ))
        })?;
        return Ok((None, name));
    }
    let id =
        identity::load_identity(&o.identity).map_err(|e| Failure::local(format!("bad identity: {e}")))?;
    if id.name != name {
        if !job.legacy {
            return Err(Failure::local(format!(
                "{} belongs to {:?}, not {:?} (use --identity for another file, or --register)",
                o.identity.display(),
                id.name,
                name
            )));
        }
        ui.info(&format!(
            "{} belongs to {:?}; using that name instead of {:?} from transfer.info",
            o.identity.display(),
            id.name,
            name
        ));
        name = id.name.clone();
    }
    Ok((Some(id), name))
}

/// The incremental record of `ident` (empty without an identity, or when it
/// cannot be read: then every file is sent).
fn load_record(ident: Option<&Identity>, o: &CommonOpts, ui: &Ui) -> Record {
    let Some(id) = ident else { return Record::default() };
    let path = record::record_path(&o.identity, &id.id);
    Record::load(&path).unwrap_or_else(|e| {
        ui.warn(&format!("cannot read {}: {e}; every file is sent", path.display()));
        Record::default()
    })
}

/// The sending part of a run: the session, the record, the progress bar and
/// the failure that ended the run, if one did.
struct Sender<'a> {
    session: Session,
    record: Record,
    ui: &'a Ui,
    upload_opts: UploadOptions,
    retries: u32,
    fatal: Option<Failure>,
    /// Files to send, and how many have been started.
    n_send: usize,
    i_send: usize,
    /// Bytes of the files sent so far (the progress bar's position).
    bytes_done: u64,
    last_save: Instant,
}

impl<'a> Sender<'a> {
    fn new(
        session: Session,
        record: Record,
        o: &CommonOpts,
        ui: &'a Ui,
        entries: &[Entry],
        unchanged: &[Option<Verified>],
    ) -> Sender<'a> {
        let (n_send, bytes_send) = entries
            .iter()
            .zip(unchanged)
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
        Sender {
            session,
            record,
            ui,
            upload_opts,
            retries: o.retries,
            fatal: None,
            n_send,
            i_send: 0,
            bytes_done: 0,
            last_save: Instant::now(),
        }
    }

    /// The report of one entry: skipped as unchanged, sent, or settled
    /// (skipped by the walk, its error, or the failure that ended the run).
    fn entry(&mut self, e: &Entry, unchanged: Option<Verified>) -> FileReport {
        match (&e.found, unchanged) {
            (Found::File(stamp), Some(v)) => {
                let mut r =
                    report_for(e, Ok(Done::Skipped { status: "unchanged", reason: UNCHANGED.into() }));
                (r.size, r.cksum) = (Some(stamp.size), Some(v.cksum));
                r
            }
            (Found::File(stamp), None) if self.fatal.is_none() => self.send(e, *stamp),
            _ => settle(e, self.fatal.as_ref(), self.ui),
        }
    }

    fn send(&mut self, e: &Entry, stamp: Stamp) -> FileReport {
        let ui = self.ui;
        self.i_send += 1;
        if let Some(b) = &*ui.bar.borrow() {
            b.set_prefix(format!("{}/{} files", self.i_send, self.n_send));
            b.set_message(e.name.clone());
        }
        let sent =
            send_one(&mut self.session, e, stamp.size, &self.upload_opts, self.retries, ui, self.bytes_done);
        let r = match sent {
            Ok(r) => r,
            Err(Fatal(f)) => {
                ui.error(&f.message);
                self.fatal = Some(f.clone());
                report_for(e, Err(f))
            }
        };
        if let (Ok(Done::Verified), Some(ck)) = (&r.result, r.cksum) {
            self.record.insert(&e.name, stamp, ck);
            if self.last_save.elapsed() >= RECORD_SAVE_EVERY {
                save_record(&mut self.record, &self.session, ui);
                self.last_save = Instant::now();
            }
        }
        self.bytes_done += stamp.size;
        if let Some(b) = &*ui.bar.borrow() {
            b.set_position(self.bytes_done);
        }
        r
    }

    /// The progress bar cleared and the record saved.
    fn end(mut self) {
        if let Some(b) = self.ui.bar.borrow_mut().take() {
            b.finish_and_clear();
        }
        save_record(&mut self.record, &self.session, self.ui);
    }
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

pub(super) fn report_for(e: &Entry, result: Result<Done, Failure>) -> FileReport {
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
