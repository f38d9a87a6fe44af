//! `backupd verify`: read every stored file and version back, recompute its
//! POSIX cksum and compare it with the database; report mismatched, missing,
//! unreadable and unregistered files, and stray entries under versions/.
//! Exit 0 when all is well, 3 on a problem; a stray entry (something under
//! versions/ not named as a version) is reported but no problem: no stored
//! copy is damaged (docs/OPERATIONS.md, "Verify").
//!
//! Read-only: it works while the server runs. A file the server replaces or
//! publishes during the check can look wrong for a moment (between its
//! rename and its commit), so a problem is looked at again, against a fresh
//! read of the database, every half second for up to five seconds before it
//! is reported.
//!
//! The database records the cksum of the current copy of each file only: an
//! earlier version is read in full (so an unreadable one is found) and its
//! cksum reported, but there is nothing recorded to compare it with.

use std::collections::{HashMap, HashSet};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use super::output::{or_dash, shown, shown_path};
use super::store::{FileInfo, Store, StoreArgs, StoredEntry};
use crate::json::{json_opt_num, json_opt_str, json_str};
use crate::protocol::{id_hex, parse_id_hex, ClientId};
use crate::worker::storage::version_number;

/// Check every stored file and version against the database.
#[derive(clap::Args, Debug, Clone)]
pub struct VerifyArgs {
    /// The client: its id (32 hex characters) or its name; id:HEX or name:NAME to say which [default: every client]
    pub client: Option<String>,

    /// One JSON array with an object per file and version checked (and per problem)
    #[arg(long)]
    pub json: bool,

    #[command(flatten)]
    pub store: StoreArgs,

    /// Read copies that are gone locally from the bucket
    #[cfg(feature = "s3")]
    #[command(flatten)]
    pub s3: crate::config::s3::S3Args,
}

/// How often, and after what pause, a problem is looked at again.
const RECHECKS: usize = 10;
const RECHECK_PAUSE: std::time::Duration = std::time::Duration::from_millis(500);

/// Look again at something that looks wrong while the server may be
/// publishing it (between its rename and its commit): `still_wrong` after
/// each pause, until it says false or RECHECKS pauses passed. True when
/// it stayed wrong. `verify` and `restore` both decide so.
pub fn recheck(mut still_wrong: impl FnMut() -> Result<bool, String>) -> Result<bool, String> {
    for _ in 0..RECHECKS {
        std::thread::sleep(RECHECK_PAUSE);
        if !still_wrong()? {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Exit status when verify found a problem.
pub const EXIT_PROBLEMS: u8 = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Ok,
    Mismatched,
    Missing,
    Unreadable,
    Unregistered,
    /// A file row the database holds but that cannot be read (a value of
    /// the wrong type): its copies are not checked.
    Damaged,
    /// Under versions/, not named as a version: reported, not a problem.
    Stray,
}

impl Status {
    fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Mismatched => "mismatched",
            Status::Missing => "missing",
            Status::Unreadable => "unreadable",
            Status::Unregistered => "unregistered",
            Status::Damaged => "damaged",
            Status::Stray => "stray",
        }
    }

    /// Damage to what is stored, or a copy the database does not know (exit 3).
    fn is_problem(self) -> bool {
        !matches!(self, Status::Ok | Status::Stray)
    }
}

/// What an entry on disk that is no copy of a verified file is: under
/// files/, or named as a version (a regular file named by a version's number
/// in a folder below a client's folder: `versions/<id>/<name>/<n>`), a copy
/// the database does not know; anything else under versions/ (another name,
/// `0123`, a link, a file directly in a client's folder or outside one) a
/// stray, which the server never lists, counts or prunes as a version.
fn unknown_entry(e: &StoredEntry) -> Status {
    let as_version = parse_id_hex(&e.client_dir).is_some()
        && e.name.contains('/')
        && e.path.file_name().and_then(version_number).is_some()
        && e.path.symlink_metadata().is_ok_and(|m| m.is_file());
    if e.in_versions && !as_version {
        Status::Stray
    } else {
        Status::Unregistered
    }
}

/// The verdict on one file, version or stray entry.
#[derive(Debug, Clone)]
struct Item {
    status: Status,
    /// The client's id in hex (or the directory name of a stray entry).
    client: String,
    name: String,
    /// 0 for a current file, 1.. for earlier versions, None for a stray entry.
    version: Option<usize>,
    path: PathBuf,
    size: Option<u64>,
    cksum: Option<u32>,
    expected: Option<u32>,
    expected_size: Option<u64>,
    error: Option<String>,
}

/// Check `rows` (verified rows only are read) and the entries on disk. With
/// `only`, check just those paths (the second look at problems).
fn check(
    store: &Store,
    client: Option<&ClientId>,
    only: Option<&HashSet<PathBuf>>,
    bar: &indicatif::ProgressBar,
) -> Result<Vec<Item>, String> {
    let (rows, damaged) = store.files_checked(client)?;
    let rows: Vec<FileInfo> = rows.into_iter().filter(|f| f.verified).collect();
    let wanted = |p: &PathBuf| only.is_none_or(|o| o.contains(p));
    let mut copies = Vec::new();
    let mut known: HashSet<PathBuf> = HashSet::new();
    let mut items = Vec::new();
    // A row that cannot be read is the problem reported; its copies (when
    // its id and path can be read) are not reported as unregistered too.
    for d in damaged {
        let path = match (d.id, &d.path) {
            (Some(id), Some(p)) => {
                let f = FileInfo {
                    id,
                    name: d.name.clone(),
                    path: p.clone(),
                    verified: true,
                    size: None,
                    cksum: None,
                    received: None,
                };
                known.extend(store.copies(&f).into_iter().map(|c| c.path));
                store.root().join(p)
            }
            _ => store.root().to_path_buf(),
        };
        if wanted(&path) {
            items.push(Item {
                status: Status::Damaged,
                client: d.id.map_or_else(|| "?".into(), |id| id_hex(&id)),
                name: d.name,
                version: None,
                path,
                size: None,
                cksum: None,
                expected: None,
                expected_size: None,
                error: Some(d.error),
            });
        }
    }
    for f in &rows {
        for c in store.copies(f) {
            known.insert(c.path.clone());
            if wanted(&c.path) {
                copies.push((f, c));
            }
        }
    }
    let entries =
        store.stored_files(client).map_err(|e| format!("cannot list {}: {e}", store.root().display()))?;
    for e in entries.into_iter().filter(|e| !known.contains(&e.path) && wanted(&e.path)) {
        items.push(Item {
            status: unknown_entry(&e),
            client: e.client_dir,
            name: e.name,
            version: None,
            path: e.path,
            size: None,
            cksum: None,
            expected: None,
            expected_size: None,
            error: None,
        });
    }
    if only.is_none() {
        bar.set_length(copies.len() as u64);
    }
    for (f, c) in copies {
        let current = c.index == 0;
        let mut item = Item {
            status: Status::Ok,
            client: id_hex(&f.id),
            name: f.name.clone(),
            version: Some(c.index),
            path: c.path,
            size: None,
            cksum: None,
            expected: if current { f.cksum } else { None },
            expected_size: if current { f.size } else { None },
            error: None,
        };
        match store.cksum_copy(&item.path) {
            Ok((size, sum)) => {
                item.size = Some(size);
                item.cksum = Some(sum);
                // A copy read from the bucket is checked against its metadata too.
                let recorded = store.recorded(&item.path);
                item.expected = item.expected.or(recorded.map(|r| r.1));
                item.expected_size = item.expected_size.or(recorded.map(|r| r.0));
                let size_wrong = item.expected_size.is_some_and(|s| s != size);
                let meta_wrong = recorded.is_some_and(|r| r != (size, sum));
                if size_wrong || meta_wrong || item.expected.is_some_and(|e| e != sum) {
                    item.status = Status::Mismatched;
                }
            }
            // A version pruned since it was listed is no problem.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !current => continue,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => item.status = Status::Missing,
            Err(e) => {
                item.status = Status::Unreadable;
                item.error = Some(e.to_string());
            }
        }
        bar.inc(1);
        items.push(item);
    }
    Ok(items)
}

pub fn verify(args: &VerifyArgs) -> Result<ExitCode, String> {
    #[cfg(feature = "s3")]
    let store = super::remote::open_store(&args.store, &args.s3)?;
    #[cfg(not(feature = "s3"))]
    let store = Store::open_read_only(&args.store)?;
    let client = args.client.as_deref().map(|c| store.resolve(c)).transpose()?;
    let id = client.as_ref().map(|c| c.id);
    let bar = if std::io::stderr().is_terminal() && !args.json {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "verify {bar:40} {pos}/{len} files and versions, {eta} left",
            )
            .map_err(|e| e.to_string())?,
        );
        bar
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut items = check(&store, id.as_ref(), None, &bar)?;
    bar.finish_and_clear();
    // A publish between its rename and its commit looks like a problem for
    // a moment: look again, with what the database says then, until nothing
    // is left or the problems stay for RECHECKS pauses.
    // (A stray stays one: the server writes versions under their final names.)
    let suspects_of = |items: &[Item]| -> HashSet<PathBuf> {
        items.iter().filter(|i| i.status.is_problem()).map(|i| i.path.clone()).collect()
    };
    let mut suspects = suspects_of(&items);
    if !suspects.is_empty() {
        recheck(|| {
            let again = check(&store, id.as_ref(), Some(&suspects), &bar)?;
            items.retain(|i| !suspects.contains(&i.path));
            items.extend(again);
            suspects = suspects_of(&items);
            Ok(!suspects.is_empty())
        })?;
    }
    items.sort_by(|a, b| (&a.client, &a.name, a.version).cmp(&(&b.client, &b.name, b.version)));
    let names: HashMap<String, String> =
        store.clients()?.into_iter().map(|c| (id_hex(&c.id), c.name)).collect();
    if args.json {
        let objects: Vec<String> = items.iter().map(|i| json_item(i, names.get(&i.client))).collect();
        print!("{}", super::output::json_array(&objects));
    } else {
        for i in items.iter().filter(|i| i.status != Status::Ok) {
            println!("{}", text_item(i, names.get(&i.client)));
        }
        println!("{}", summary(&items));
    }
    let problem = items.iter().any(|i| i.status.is_problem());
    Ok(if problem { ExitCode::from(EXIT_PROBLEMS) } else { ExitCode::SUCCESS })
}

fn label(i: &Item, owner: Option<&String>) -> String {
    let who = shown(owner.unwrap_or(&i.client));
    let name = shown(&i.name);
    match i.version {
        Some(v) if v > 0 => format!("{who}/{name} (version {v})"),
        _ if i.name.is_empty() => who,
        _ => format!("{who}/{name}"),
    }
}

fn text_item(i: &Item, owner: Option<&String>) -> String {
    let what = label(i, owner);
    let path = shown_path(&i.path);
    match i.status {
        Status::Mismatched => format!(
            "mismatched    {what}: cksum {} ({} bytes), recorded {} ({} bytes) [{path}]",
            i.cksum.unwrap_or(0),
            i.size.unwrap_or(0),
            or_dash(i.expected),
            or_dash(i.expected_size),
        ),
        Status::Missing => format!("missing       {what} [{path}]"),
        Status::Unreadable => {
            format!("unreadable    {what}: {} [{path}]", i.error.as_deref().unwrap_or("read error"))
        }
        Status::Unregistered => format!("unregistered  {path} (no database row)"),
        Status::Damaged => format!(
            "damaged       {what}: its database row cannot be read ({}); its copies not checked",
            i.error.as_deref().unwrap_or("?")
        ),
        Status::Stray => {
            format!("stray         {path} (not a version the server wrote; no stored copy is damaged)")
        }
        Status::Ok => format!("ok            {what}"),
    }
}

fn json_item(i: &Item, owner: Option<&String>) -> String {
    format!(
        "{{\"status\":{},\"client_id\":{},\"client\":{},\"name\":{},\"version\":{},\"path\":{},\"size\":{},\
         \"cksum\":{},\"expected_cksum\":{},\"error\":{}}}",
        json_str(i.status.as_str()),
        json_str(&i.client),
        json_opt_str(owner.map(String::as_str)),
        json_str(&i.name),
        json_opt_num(i.version),
        json_str(&i.path.to_string_lossy()),
        json_opt_num(i.size),
        json_opt_num(i.cksum),
        json_opt_num(i.expected),
        json_opt_str(i.error.as_deref()),
    )
}

fn summary(items: &[Item]) -> String {
    let files = items.iter().filter(|i| i.version == Some(0)).count();
    let versions = items.iter().filter(|i| i.version.is_some_and(|v| v > 0)).count();
    let bytes: u64 = items.iter().filter_map(|i| i.size).sum();
    let count = |s: Status| items.iter().filter(|i| i.status == s).count();
    let bad =
        [Status::Mismatched, Status::Missing, Status::Unreadable, Status::Unregistered, Status::Damaged];
    let total: usize = bad.iter().map(|s| count(*s)).sum();
    let head = format!("checked {files} files and {versions} versions ({bytes} bytes)");
    let strays = match count(Status::Stray) {
        0 => String::new(),
        n => format!("; {n} stray entr{} under versions/ (not a problem)", if n == 1 { "y" } else { "ies" }),
    };
    if total == 0 {
        return format!("{head}: all well{strays}");
    }
    let parts: Vec<String> =
        bad.iter().filter(|s| count(**s) > 0).map(|s| format!("{} {}", count(*s), s.as_str())).collect();
    format!("{head}: {total} problem(s): {}{strays}", parts.join(", "))
}
