//! `backupd restore`: copy a client's files (all, or the named files and
//! folders) out of the store into a directory, with their relative paths.
//!
//! Read-only on the store (it works while the server runs). Each file is
//! written to a temp file beside its destination, checked against the
//! database's cksum when it is the current copy (a mismatch is looked at
//! again for up to five seconds, as `verify` does: the server may be
//! publishing that file), synced, then renamed into place; an existing file
//! is never replaced without `--force`, and nothing is written inside the
//! data directory (DIR and each destination are resolved first, links
//! followed, and refused there). The exit
//! status is 1 when anything asked for was missing or could not be written.

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::Seek;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};
use std::process::ExitCode;

use super::output::{shown, shown_path};
use super::store::{mtime_nanos, refuse_inside_data_dir, Copy, FileInfo, Store, StoreArgs};
use super::time::{format_nanos, parse_time};
use super::verify::recheck;
use crate::crypto::copy_with_cksum;

/// Copy a client's files out of the store into DIR.
#[derive(clap::Args, Debug, Clone)]
pub struct RestoreArgs {
    /// The client: its id (32 hex characters) or its name; id:HEX or name:NAME to say which
    pub client: String,

    /// Stored files or folders to restore (`/`-separated, as `backupd files`
    /// lists them; a folder restores everything below it) [default: every file]
    pub paths: Vec<String>,

    /// Directory to restore into (created if missing); files keep their relative paths
    #[arg(long, value_name = "DIR")]
    pub to: PathBuf,

    /// Restore copy N of each file: 0 is the current one, 1 the newest
    /// earlier version, and so on (as `backupd files --versions` numbers them)
    #[arg(long, value_name = "N", conflicts_with = "before")]
    pub version: Option<usize>,

    /// Restore the newest copy of each file received before TIME (UTC:
    /// 2026-11-25, 2026-11-25T17:56:33Z or @SECONDS)
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    pub before: Option<i128>,

    /// Replace files that already exist in DIR
    #[arg(long)]
    pub force: bool,

    #[command(flatten)]
    pub store: StoreArgs,

    /// Read copies that are gone locally from the bucket
    #[cfg(feature = "s3")]
    #[command(flatten)]
    pub s3: crate::config::s3::S3Args,
}

/// A stored name as a relative path, refusing anything that could leave DIR.
fn relative(name: &str) -> Option<PathBuf> {
    let p = Path::new(name);
    let ok = !name.is_empty() && p.components().all(|c| matches!(c, Component::Normal(_)));
    ok.then(|| p.to_path_buf())
}

/// When a copy was received: the database's time for the current copy, the
/// file's modification time (when its upload was written) for a version, or
/// for a copy in the bucket only the time its metadata records.
fn received_nanos(store: &Store, f: &FileInfo, c: &Copy) -> Option<i128> {
    let db = (c.index == 0).then(|| f.received.as_deref().and_then(|r| parse_time(r).ok())).flatten();
    db.or_else(|| mtime_nanos(&c.path).ok()).or_else(|| store.stored_nanos(&c.path))
}

/// Which copy of `f` the arguments ask for.
fn choose(store: &Store, args: &RestoreArgs, f: &FileInfo) -> Result<Copy, String> {
    let copies = store.copies(f);
    if let Some(n) = args.version {
        return copies
            .into_iter()
            .nth(n)
            .ok_or_else(|| format!("{}: no version {n} is kept", shown(&f.name)));
    }
    if let Some(t) = args.before {
        return copies
            .into_iter()
            .find(|c| received_nanos(store, f, c).is_some_and(|r| r < t))
            .ok_or_else(|| format!("{}: no copy received before {}", shown(&f.name), format_nanos(t)));
    }
    copies.into_iter().next().ok_or_else(|| format!("{}: no stored copy", shown(&f.name)))
}

/// The files the arguments name: every verified file, or those equal to or
/// below each PATH. Names that match nothing are returned apart.
fn select<'a>(files: &'a [FileInfo], paths: &[String]) -> (BTreeMap<&'a str, &'a FileInfo>, Vec<String>) {
    let mut chosen = BTreeMap::new();
    let mut unmatched = Vec::new();
    if paths.is_empty() {
        chosen.extend(files.iter().map(|f| (f.name.as_str(), f)));
        return (chosen, unmatched);
    }
    for p in paths {
        // As the server takes names: empty and `.` components dropped
        // (`./docs`, `docs//sub`, `/docs/`); a `..` names nothing stored.
        let parts: Vec<&str> = p.split('/').filter(|c| !c.is_empty() && *c != ".").collect();
        if parts.contains(&"..") {
            unmatched.push(p.clone());
            continue;
        }
        let want = parts.join("/");
        let want = want.as_str();
        let mut found = false;
        for f in files {
            let below = f.name.strip_prefix(want).is_some_and(|rest| rest.starts_with('/'));
            if want.is_empty() || f.name == want || below {
                chosen.insert(f.name.as_str(), f);
                found = true;
            }
        }
        if !found {
            unmatched.push(p.clone());
        }
    }
    (chosen, unmatched)
}

/// Write one copy to `dest` through a temp file and a rename. Returns the size.
fn write_copy(store: &Store, f: &FileInfo, c: &Copy, dest: &Path) -> Result<u64, String> {
    let parent = dest.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(parent).map_err(|e| format!("cannot create {}: {e}", shown_path(parent)))?;
    let base = dest.file_name().map(|b| b.to_string_lossy().into_owned()).unwrap_or_default();
    // The temp name starts like the file's, cut short so that it stays within
    // the 255 bytes of a file name whatever the file's (a stored name may have
    // up to 250).
    let mut cut = base.len().min(96);
    while !base.is_char_boundary(cut) {
        cut -= 1;
    }
    let temp = parent.join(format!(".{}.restore-{}", &base[..cut], std::process::id()));
    let result = (|| {
        let mut out = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temp)
            .map_err(|e| format!("cannot create {}: {e}", shown_path(&temp)))?;
        // The copy into the (emptied) temp file: its size and cksum.
        let copy = |out: &mut fs::File| {
            let mut src = store.open_copy(&c.path).map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => format!(
                    "{}: the stored copy is missing ({}); not restored (see `backupd verify` and \
                     docs/OPERATIONS.md, \"A missing file\")",
                    shown(&f.name),
                    shown_path(&c.path)
                ),
                _ => format!("cannot read {}: {e}", shown_path(&c.path)),
            })?;
            out.set_len(0)
                .and_then(|_| out.rewind())
                .and_then(|_| copy_with_cksum(&mut src, out))
                .map_err(|e| format!("cannot copy {} to {}: {e}", shown_path(&c.path), shown_path(&temp)))
        };
        let (mut size, mut sum) = copy(&mut out)?;
        if c.index == 0 && f.cksum.is_some_and(|e| e != sum) {
            // The server may have replaced the file since its row was read, or
            // be doing so (between its rename and its commit): the row read
            // again, then, as `verify` does, the copy made again and compared
            // with the row as it is then, before the copy is called damaged.
            let row_cksum = || -> Result<Option<u32>, String> {
                Ok(store.files(Some(&f.id))?.into_iter().find(|r| r.name == f.name).and_then(|r| r.cksum))
            };
            let mut expected = row_cksum()?;
            let damaged = expected != Some(sum)
                && recheck(|| {
                    (size, sum) = copy(&mut out)?;
                    expected = row_cksum()?;
                    Ok(expected != Some(sum))
                })?;
            if damaged {
                return Err(format!(
                    "{}: the stored copy is damaged (cksum {sum}, the database says {}); not restored \
                     (see `backupd verify`)",
                    shown(&f.name),
                    expected.map_or("nothing".into(), |e| e.to_string())
                ));
            }
        }
        if let Some((rs, rk)) = store.recorded(&c.path).filter(|r| *r != (size, sum)) {
            return Err(format!(
                "{}: the bucket's copy is damaged (cksum {sum}, {size} bytes; its metadata says {rk}, \
                 {rs} bytes); not restored (see `backupd verify`)",
                shown(&f.name)
            ));
        }
        out.sync_all().map_err(|e| format!("cannot write {}: {e}", shown_path(&temp)))?;
        fs::rename(&temp, dest).map_err(|e| format!("cannot rename to {}: {e}", shown_path(dest)))?;
        Ok(size)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&temp);
    }
    result
}

pub fn restore(args: &RestoreArgs) -> Result<ExitCode, String> {
    #[cfg(feature = "s3")]
    let store = super::remote::open_store(&args.store, &args.s3)?;
    #[cfg(not(feature = "s3"))]
    let store = Store::open_read_only(&args.store)?;
    let client = store.resolve(&args.client)?;
    refuse_inside_data_dir(&args.to, store.root())?;
    let files: Vec<FileInfo> = store.files(Some(&client.id))?.into_iter().filter(|f| f.verified).collect();
    let (chosen, unmatched) = select(&files, &args.paths);
    let mut failed = 0usize;
    for p in &unmatched {
        eprintln!(
            "backupd: restore: \"{}\" is not a stored file or folder of {}",
            shown(p),
            shown(&client.name)
        );
        failed += 1;
    }
    fs::create_dir_all(&args.to).map_err(|e| format!("cannot create {}: {e}", args.to.display()))?;
    let mut restored = 0usize;
    for (name, f) in chosen {
        let outcome = (|| {
            let rel =
                relative(name).ok_or_else(|| format!("\"{}\": not a relative path; skipped", shown(name)))?;
            let dest = args.to.join(rel);
            // DIR outside, but a name leading back in (DIR above the data directory).
            refuse_inside_data_dir(&dest, store.root())?;
            if let Ok(m) = fs::symlink_metadata(&dest) {
                if m.is_dir() || !args.force {
                    return Err(format!("{} exists; not replaced (use --force)", shown_path(&dest)));
                }
            }
            let copy = choose(&store, args, f)?;
            let size = write_copy(&store, f, &copy, &dest)?;
            Ok((dest, size, copy.index))
        })();
        match outcome {
            Ok((dest, size, index)) => {
                let which = if index == 0 { String::new() } else { format!(", version {index}") };
                println!("restored {} ({size} bytes{which}) to {}", shown(name), shown_path(&dest));
                restored += 1;
            }
            Err(e) => {
                eprintln!("backupd: restore: {e}");
                failed += 1;
            }
        }
    }
    if failed > 0 {
        println!("restored {restored} file(s) into {}; {failed} failed", args.to.display());
        return Ok(ExitCode::FAILURE);
    }
    println!("restored {restored} file(s) into {}", args.to.display());
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(name: &str) -> FileInfo {
        FileInfo {
            id: [1; 16],
            name: name.into(),
            path: format!("files/x/{name}"),
            verified: true,
            size: None,
            cksum: None,
            received: None,
        }
    }

    #[test]
    fn folders_select_what_is_below_them() {
        let files = [row("a.txt"), row("docs/2026/report.pdf"), row("docs/2026x"), row("docs/notes")];
        let names = |paths: &[&str]| {
            let p: Vec<String> = paths.iter().map(|s| s.to_string()).collect();
            let (c, u) = select(&files, &p);
            (c.keys().map(|k| k.to_string()).collect::<Vec<_>>(), u)
        };
        assert_eq!(names(&["docs/2026"]).0, ["docs/2026/report.pdf"]);
        assert_eq!(names(&["docs/"]).0, ["docs/2026/report.pdf", "docs/2026x", "docs/notes"]);
        assert_eq!(names(&["a.txt", "nope"]), (vec!["a.txt".to_string()], vec!["nope".to_string()]));
        assert_eq!(names(&[]).0.len(), 4);
    }

    #[test]
    fn names_never_leave_the_directory() {
        assert!(relative("docs/a").is_some());
        for bad in ["", "/etc/passwd", "../x", "a/../../x", "./a"] {
            assert!(relative(bad).is_none(), "{bad}");
        }
    }
}
