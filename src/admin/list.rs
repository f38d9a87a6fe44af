//! `backupd clients` and `backupd files`: what the store holds, from the
//! database (read-only) and the sizes of the stored versions.

use std::collections::HashMap;
use std::process::ExitCode;

use super::output::{json_array, or_dash, shown, table};
use super::store::{mtime_nanos, ClientInfo, DamagedRow, FileInfo, Store, StoreArgs};
use super::time::format_nanos;
use crate::json::{json_opt_num, json_opt_str, json_str};
use crate::protocol::{id_hex, ClientId};

/// List the registered clients.
#[derive(clap::Args, Debug, Clone)]
pub struct ClientsArgs {
    /// One JSON array of objects instead of a table
    #[arg(long)]
    pub json: bool,

    /// The server's --quota, to show each client's use of it [default: BACKUPD_QUOTA as the server reads it, else no limit]
    #[arg(long, value_parser = crate::config::parse_size)]
    pub quota: Option<u64>,

    /// The server's --quota-files, to show each client's use of it [default: BACKUPD_QUOTA_FILES, else no limit]
    #[arg(long)]
    pub quota_files: Option<u64>,

    #[command(flatten)]
    pub store: StoreArgs,
}

/// List the files of one client, or of all clients.
#[derive(clap::Args, Debug, Clone)]
pub struct FilesArgs {
    /// The client: its id (32 hex characters) or its name; id:HEX or name:NAME to say which [default: every client]
    pub client: Option<String>,

    /// Also list each earlier version kept of every file
    #[arg(long)]
    pub versions: bool,

    /// One JSON array of objects instead of a table
    #[arg(long)]
    pub json: bool,

    #[command(flatten)]
    pub store: StoreArgs,
}

/// An earlier version of a file as listed.
struct VersionInfo {
    index: usize,
    size: Option<u64>,
    received: Option<String>,
}

fn versions_of(store: &Store, f: &FileInfo) -> Vec<VersionInfo> {
    store
        .copies(f)
        .into_iter()
        .skip(1)
        .map(|c| VersionInfo {
            index: c.index,
            size: std::fs::metadata(&c.path).ok().map(|m| m.len()),
            received: mtime_nanos(&c.path).ok().map(format_nanos),
        })
        .collect()
}

/// What one client has stored.
#[derive(Default)]
struct Usage {
    files: u64,
    versions: u64,
    bytes: u64,
    last_backup: Option<String>,
}

fn usage(store: &Store, files: &[FileInfo]) -> HashMap<ClientId, Usage> {
    let mut out: HashMap<ClientId, Usage> = HashMap::new();
    for f in files.iter().filter(|f| f.verified) {
        let u = out.entry(f.id).or_default();
        u.files += 1;
        u.bytes += f.size.unwrap_or(0);
        for v in versions_of(store, f) {
            u.versions += 1;
            u.bytes += v.size.unwrap_or(0);
        }
        // ISO-8601 UTC strings sort as the times they name.
        if f.received > u.last_backup {
            u.last_backup = f.received.clone();
        }
    }
    out
}

/// The QUOTA column: `used/quota` bytes and files for each limit set, `-` when none is.
fn quota_cell(u: &Usage, quota: u64, quota_files: u64) -> String {
    let mut parts = Vec::new();
    if quota > 0 {
        parts.push(format!("{}/{quota}", u.bytes));
    }
    if quota_files > 0 {
        parts.push(format!("{}/{quota_files} files", u.files + u.versions));
    }
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(", ")
    }
}

/// The `quota` object of the JSON output: the limits (null: none) and the
/// use they are checked against (current files plus versions).
fn quota_json(u: &Usage, quota: u64, quota_files: u64) -> String {
    if quota == 0 && quota_files == 0 {
        return "null".into();
    }
    let limit = |q: u64| if q > 0 { q.to_string() } else { "null".into() };
    format!(
        "{{\"bytes\":{},\"bytes_used\":{},\"files\":{},\"files_used\":{}}}",
        limit(quota),
        u.bytes,
        limit(quota_files),
        u.files + u.versions
    )
}

/// A limit for the QUOTA column: the flag, else the server's environment
/// variable `var`. A value there that does not parse (the server would
/// refuse to start with it) is ignored, with a warning, rather than
/// failing the listing; unset or empty: no limit (0).
fn limit(flag: Option<u64>, var: &str, parse: impl Fn(&str) -> Result<u64, String>) -> u64 {
    if let Some(v) = flag {
        return v;
    }
    let raw = std::env::var_os(var).unwrap_or_default();
    let raw = raw.to_string_lossy();
    if raw.is_empty() {
        return 0;
    }
    parse(&raw).unwrap_or_else(|e| {
        eprintln!("backupd: {var}=\"{}\" ignored ({e}); the QUOTA column shows no such limit", shown(&raw));
        0
    })
}

pub fn clients(args: &ClientsArgs) -> Result<ExitCode, String> {
    let quota = limit(args.quota, "BACKUPD_QUOTA", crate::config::parse_size);
    let quota_files =
        limit(args.quota_files, "BACKUPD_QUOTA_FILES", |s| s.parse().map_err(|e| format!("{e}")));
    let store = Store::open_read_only(&args.store)?;
    let clients = store.clients()?;
    let (files, damaged) = store.files_checked(None)?;
    let usage = usage(&store, &files);
    #[cfg(feature = "s3")]
    let pending = crate::worker::db::queued_per_client(&store.conn).map_err(|e| store.err(e))?;
    #[cfg(not(feature = "s3"))]
    let pending: HashMap<ClientId, u64> = HashMap::new();
    let none = Usage::default();
    let mut rows = Vec::new();
    let mut objects = Vec::new();
    for c in &clients {
        let u = usage.get(&c.id).unwrap_or(&none);
        let s3_pending = pending.get(&c.id).copied().unwrap_or(0);
        if args.json {
            objects.push(format!(
                "{{\"id\":{},\"name\":{},\"has_key\":{},\"last_seen\":{},\"files\":{},\"versions\":{},\
                 \"bytes\":{},\"last_backup\":{},\"quota\":{},\"s3_pending\":{}}}",
                json_str(&id_hex(&c.id)),
                json_str(&c.name),
                c.has_key,
                json_opt_str(c.last_seen.as_deref()),
                u.files,
                u.versions,
                u.bytes,
                json_opt_str(u.last_backup.as_deref()),
                quota_json(u, quota, quota_files),
                s3_pending,
            ));
        } else {
            rows.push(vec![
                id_hex(&c.id),
                shown(&c.name),
                or_dash(c.last_seen.as_ref()),
                u.files.to_string(),
                u.bytes.to_string(),
                or_dash(u.last_backup.as_ref()),
                quota_cell(u, quota, quota_files),
                s3_pending.to_string(),
            ]);
        }
    }
    if args.json {
        print!("{}", json_array(&objects));
    } else {
        let headers = ["ID", "NAME", "LAST SEEN", "FILES", "BYTES", "LAST BACKUP", "QUOTA", "S3 PENDING"];
        print!("{}", table(&headers, &rows, &[3, 4, 7]));
    }
    let names = clients.into_iter().map(|c| (c.id, c.name)).collect();
    Ok(report_damaged(&store, &damaged, &names, "not counted"))
}

/// Name each damaged file row on standard error (one line each): the
/// listing shows the others. Failure when there is one.
fn report_damaged(
    store: &Store,
    damaged: &[DamagedRow],
    names: &HashMap<ClientId, String>,
    what: &str,
) -> ExitCode {
    for d in damaged {
        eprintln!("backupd: {}: database row damaged ({}); {what}", store.damaged_label(d, names), d.error);
    }
    if damaged.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

pub fn files(args: &FilesArgs) -> Result<ExitCode, String> {
    let store = Store::open_read_only(&args.store)?;
    let client = args.client.as_deref().map(|c| store.resolve(c)).transpose()?;
    let names: HashMap<ClientId, String> = match &client {
        Some(c) => HashMap::from([(c.id, c.name.clone())]),
        None => store.clients()?.into_iter().map(|c: ClientInfo| (c.id, c.name)).collect(),
    };
    let (files, damaged) = store.files_checked(client.as_ref().map(|c| &c.id))?;
    let mut rows = Vec::new();
    let mut objects = Vec::new();
    for f in &files {
        let owner = names.get(&f.id).map(String::as_str);
        let versions = if f.verified { versions_of(&store, f) } else { Vec::new() };
        let missing = store.is_missing(f);
        if args.json {
            let mut o = format!(
                "{{\"client_id\":{},\"client\":{},\"name\":{},\"verified\":{},\"missing\":{},\"size\":{},\"cksum\":{},\
                 \"received\":{},\"versions\":{}",
                json_str(&id_hex(&f.id)),
                json_opt_str(owner),
                json_str(&f.name),
                f.verified,
                missing,
                json_opt_num(f.size),
                json_opt_num(f.cksum),
                json_opt_str(f.received.as_deref()),
                versions.len(),
            );
            if args.versions {
                let list: Vec<String> = versions
                    .iter()
                    .map(|v| {
                        format!(
                            "{{\"version\":{},\"size\":{},\"received\":{}}}",
                            v.index,
                            json_opt_num(v.size),
                            json_opt_str(v.received.as_deref())
                        )
                    })
                    .collect();
                o.push_str(&format!(",\"history\":[{}]", list.join(",")));
            }
            o.push('}');
            objects.push(o);
            continue;
        }
        rows.push(vec![
            owner.map_or_else(|| "?".into(), shown),
            shown(&f.name),
            or_dash(f.size),
            or_dash(f.cksum),
            f.received.clone().unwrap_or_else(|| "-".into()),
            match (f.verified, missing) {
                (false, _) => "not verified".into(),
                (true, true) => format!("{} (missing)", versions.len()),
                (true, false) => versions.len().to_string(),
            },
        ]);
        if args.versions {
            for v in &versions {
                rows.push(vec![
                    String::new(),
                    format!("  version {}", v.index),
                    or_dash(v.size),
                    String::new(),
                    or_dash(v.received.as_ref()),
                    String::new(),
                ]);
            }
        }
    }
    if args.json {
        print!("{}", json_array(&objects));
    } else {
        let headers = ["CLIENT", "NAME", "SIZE", "CKSUM", "RECEIVED", "VERSIONS"];
        print!("{}", table(&headers, &rows, &[2, 3]));
    }
    Ok(report_damaged(&store, &damaged, &names, "not listed"))
}
