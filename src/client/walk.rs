//! The walk: what a run's arguments expand to, and the name each file is
//! sent under.
//!
//! Owns the naming rule (tar's), symlink and special-file policy and loop
//! protection. Pure local file-system reads; nothing here talks to a server.
//!
//! Naming, like tar:
//!
//! * [`Naming::AsGiven`] (`backup-client send`): the path as given on the
//!   command line, `/`-separated: `send docs` sends `docs/a.txt`,
//!   `docs/sub/b.txt`. A leading `/` is removed (`send /srv/docs` sends
//!   `srv/docs/a.txt`), `.` and empty components are dropped (`send ./docs`
//!   sends `docs/a.txt`, `send .` sends `a.txt`), and everything up to the
//!   last `..` component is removed (`send ../x/docs` sends `x/docs/a.txt`),
//!   as GNU tar does. So a name never starts with `/` and never holds `.` or
//!   `..` components, which servers refuse.
//! * [`Naming::BaseName`] (the legacy `transfer.info` mode): each argument is
//!   named by its last component, as existing clients store a file under its
//!   base name: `/home/u/report.pdf` is `report.pdf`, the folder `/home/u/docs`
//!   gives `docs/a.txt`.
//!
//! Symlinks named on the command line are followed. Symlinks met inside a
//! folder are skipped (reported, not sent) unless `follow_symlinks`; then a
//! link to a folder that is already being walked (a loop) is skipped with a
//! warning. Fifos, sockets and devices are skipped with a warning, and so
//! are the client's own identity and record files (no warning). Entries
//! of a folder are walked in byte order of their names, so runs are
//! repeatable.

use std::fs::{self, Metadata};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Component, Path, PathBuf};

use super::exclude::Excludes;
use super::record::Stamp;

/// How names are derived from the arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Naming {
    /// The path as given (tar-like, see the module doc).
    AsGiven,
    /// Relative to the argument's parent folder.
    BaseName,
}

/// Options of a walk.
#[derive(Debug, Clone)]
pub struct WalkOptions {
    pub naming: Naming,
    pub follow_symlinks: bool,
    pub excludes: Excludes,
    /// (device, inode) of the client's own files (identity, records): never sent.
    pub own_files: Vec<(u64, u64)>,
}

/// What was found at one place of the walk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// A regular file to consider sending.
    File(Stamp),
    /// Left out, with a machine-readable status and a reason for people.
    /// `warn` entries are worth a warning on stderr (symlinks not followed,
    /// special files, loops); exclusions are not.
    Skipped { status: &'static str, reason: String, warn: bool },
    /// Could not be read or named (missing argument, unreadable folder, a
    /// name that is not UTF-8).
    Error(String),
}

/// One entry of a walk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The local path (for opening and for messages).
    pub path: PathBuf,
    /// The name it is sent under (`/`-separated; may be empty when the
    /// argument names no file, e.g. `/`, then `found` is an error).
    pub name: String,
    pub found: Found,
}

/// Expand `args` into entries, in order.
pub fn walk(args: &[PathBuf], opts: &WalkOptions) -> Vec<Entry> {
    let mut out = Vec::new();
    for arg in args {
        let prefix = match opts.naming {
            Naming::AsGiven => tar_name(arg),
            Naming::BaseName => Ok(base_name(arg)),
        };
        let prefix = match prefix {
            Ok(p) => p,
            Err(e) => {
                out.push(Entry { path: arg.clone(), name: String::new(), found: Found::Error(e) });
                continue;
            }
        };
        // Command-line symlinks are followed (as `find -H` and `cp -r` do).
        match fs::metadata(arg) {
            Ok(meta) => visit(arg.clone(), prefix, &meta, opts, &mut Vec::new(), &mut out),
            Err(e) => {
                let why = match fs::symlink_metadata(arg) {
                    Ok(_) => format!("cannot open {}: dangling symlink ({e})", arg.display()),
                    Err(_) => format!("cannot open {}: {e}", arg.display()),
                };
                out.push(Entry { path: arg.clone(), name: prefix, found: Found::Error(why) });
            }
        }
    }
    out
}

/// The tar-like name of a path as given (see the module doc).
pub fn tar_name(path: &Path) -> Result<String, String> {
    let mut parts: Vec<&str> = Vec::new();
    for c in path.components() {
        match c {
            Component::Prefix(_) | Component::RootDir | Component::CurDir => {}
            Component::ParentDir => parts.clear(),
            Component::Normal(s) => parts
                .push(s.to_str().ok_or_else(|| format!("{}: the file name is not UTF-8", path.display()))?),
        }
    }
    Ok(parts.join("/"))
}

/// The last component of `path` (empty for `/`, `.` or `..`; lossy when not UTF-8).
fn base_name(path: &Path) -> String {
    path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

fn join(prefix: &str, child: &str) -> String {
    if prefix.is_empty() {
        child.to_string()
    } else {
        format!("{prefix}/{child}")
    }
}

fn skipped(status: &'static str, reason: String, warn: bool) -> Found {
    Found::Skipped { status, reason, warn }
}

/// Handle one place whose metadata (after following, where we follow) is `meta`.
fn visit(
    path: PathBuf,
    name: String,
    meta: &Metadata,
    opts: &WalkOptions,
    ancestors: &mut Vec<(u64, u64)>,
    out: &mut Vec<Entry>,
) {
    if let Some(pattern) = opts.excludes.matching(&name) {
        let found = skipped("excluded", format!("excluded by --exclude {pattern:?}"), false);
        out.push(Entry { path, name, found });
        return;
    }
    let ft = meta.file_type();
    let found = if ft.is_file() && opts.own_files.contains(&(meta.dev(), meta.ino())) {
        skipped("own_file", "the client's own identity or record file is not sent".into(), false)
    } else if ft.is_file() {
        Found::File(Stamp::of(meta))
    } else if ft.is_dir() {
        let key = (meta.dev(), meta.ino());
        if ancestors.contains(&key) {
            let reason = "symlink loop: this folder is already being backed up".to_string();
            skipped("symlink_loop", reason, true)
        } else {
            ancestors.push(key);
            let r = visit_dir(&path, &name, opts, ancestors, out);
            ancestors.pop();
            match r {
                Ok(()) => return,
                Err(e) => Found::Error(format!("cannot read folder {}: {e}", path.display())),
            }
        }
    } else if ft.is_symlink() {
        skipped("symlink", "symlink not followed (use --follow-symlinks)".into(), true)
    } else {
        let kind = if ft.is_fifo() {
            "fifo"
        } else if ft.is_socket() {
            "socket"
        } else if ft.is_block_device() {
            "block device"
        } else if ft.is_char_device() {
            "character device"
        } else {
            "unknown file type"
        };
        skipped("special_file", format!("special file ({kind}) not sent"), true)
    };
    out.push(Entry { path, name, found });
}

fn visit_dir(
    dir: &Path,
    name: &str,
    opts: &WalkOptions,
    ancestors: &mut Vec<(u64, u64)>,
    out: &mut Vec<Entry>,
) -> std::io::Result<()> {
    let mut children: Vec<fs::DirEntry> = fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    children.sort_by_key(|e| e.file_name());
    for child in children {
        let path = child.path();
        let file_name = child.file_name();
        let Some(child_name) = file_name.to_str() else {
            let found = Found::Error(format!("{}: the file name is not UTF-8", path.display()));
            out.push(Entry { path, name: join(name, &file_name.to_string_lossy()), found });
            continue;
        };
        let child_name = join(name, child_name);
        let meta = if opts.follow_symlinks { fs::metadata(&path) } else { fs::symlink_metadata(&path) };
        match meta {
            Ok(meta) => visit(path, child_name, &meta, opts, ancestors, out),
            Err(e) => {
                let why = match fs::symlink_metadata(&path) {
                    Ok(m) if m.file_type().is_symlink() => format!("dangling symlink: {e}"),
                    _ => format!("cannot stat {}: {e}", path.display()),
                };
                out.push(Entry { path, name: child_name, found: Found::Error(why) });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn opts(naming: Naming, follow: bool, ex: &[&str]) -> WalkOptions {
        let ex: Vec<String> = ex.iter().map(|s| s.to_string()).collect();
        WalkOptions {
            naming,
            follow_symlinks: follow,
            excludes: Excludes::new(&ex).unwrap(),
            own_files: vec![],
        }
    }

    /// (name, status) of every entry: "file", an error, or the skip status.
    fn summary(entries: &[Entry]) -> Vec<(String, String)> {
        entries
            .iter()
            .map(|e| {
                let s = match &e.found {
                    Found::File(_) => "file".to_string(),
                    Found::Skipped { status, .. } => status.to_string(),
                    Found::Error(_) => "error".to_string(),
                };
                (e.name.clone(), s)
            })
            .collect()
    }

    fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
    }

    #[test]
    fn tar_names() {
        let t = |s: &str| tar_name(Path::new(s)).unwrap();
        assert_eq!(t("docs"), "docs");
        assert_eq!(t("docs/"), "docs");
        assert_eq!(t("./docs//sub/./x"), "docs/sub/x");
        assert_eq!(t("/abs/docs"), "abs/docs");
        assert_eq!(t("//abs"), "abs");
        assert_eq!(t("../x/docs"), "x/docs");
        assert_eq!(t("a/../../b/c"), "b/c");
        assert_eq!(t("docs/.."), "");
        assert_eq!(t("."), "");
        assert_eq!(t("/"), "");
    }

    #[test]
    fn folders_recursively_sorted_with_symlinks_and_specials() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path().join("docs");
        fs::create_dir_all(d.join("sub/deeper")).unwrap();
        fs::write(d.join("b.txt"), b"bb").unwrap();
        fs::write(d.join("a.txt"), b"a").unwrap();
        fs::write(d.join("sub/c.log"), b"c").unwrap();
        fs::write(d.join("sub/deeper/d"), b"d").unwrap();
        symlink(d.join("a.txt"), d.join("link")).unwrap();
        symlink(&d, d.join("sub/loop")).unwrap();
        symlink(d.join("nowhere"), d.join("zdangling")).unwrap();
        let fifo = std::ffi::CString::new(d.join("pipe").into_os_string().into_encoded_bytes()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);

        let w = walk(std::slice::from_ref(&d), &opts(Naming::BaseName, false, &[]));
        let expect = [
            ("docs/a.txt", "file"),
            ("docs/b.txt", "file"),
            ("docs/link", "symlink"),
            ("docs/pipe", "special_file"),
            ("docs/sub/c.log", "file"),
            ("docs/sub/deeper/d", "file"),
            ("docs/sub/loop", "symlink"),
            ("docs/zdangling", "symlink"),
        ];
        assert_eq!(summary(&w), pairs(&expect));
        match &w[1].found {
            Found::File(s) => assert_eq!(s.size, 2),
            other => panic!("{other:?}"),
        }

        // Followed: the file link is a file, the folder link a loop, the dangling one an error.
        let w = walk(std::slice::from_ref(&d), &opts(Naming::BaseName, true, &["*.log"]));
        let expect = [
            ("docs/a.txt", "file"),
            ("docs/b.txt", "file"),
            ("docs/link", "file"),
            ("docs/pipe", "special_file"),
            ("docs/sub/c.log", "excluded"),
            ("docs/sub/deeper/d", "file"),
            ("docs/sub/loop", "symlink_loop"),
            ("docs/zdangling", "error"),
        ];
        assert_eq!(summary(&w), pairs(&expect));

        // Names as given; an excluded folder is not entered.
        let w = walk(&[d.join("sub"), d.join("a.txt")], &opts(Naming::AsGiven, false, &["deeper"]));
        let base = tar_name(&d).unwrap();
        let expect = [
            (format!("{base}/sub/c.log"), "file"),
            (format!("{base}/sub/deeper"), "excluded"),
            (format!("{base}/sub/loop"), "symlink"),
            (format!("{base}/a.txt"), "file"),
        ];
        let expect: Vec<(&str, &str)> = expect.iter().map(|(a, b)| (a.as_str(), *b)).collect();
        assert_eq!(summary(&w), pairs(&expect));
        assert!(!base.starts_with('/'));
    }

    #[test]
    fn missing_and_command_line_symlinks() {
        let tmp = tempfile::tempdir().unwrap();
        fs::write(tmp.path().join("f"), b"x").unwrap();
        symlink(tmp.path().join("f"), tmp.path().join("l")).unwrap();
        symlink(tmp.path().join("none"), tmp.path().join("dl")).unwrap();
        let args = ["l", "dl", "missing"].map(|n| tmp.path().join(n));
        let w = walk(&args, &opts(Naming::BaseName, false, &[]));
        assert_eq!(summary(&w), pairs(&[("l", "file"), ("dl", "error"), ("missing", "error")]));
        match &w[1].found {
            Found::Error(e) => assert!(e.contains("dangling symlink"), "{e}"),
            other => panic!("{other:?}"),
        }
        // The same file as one of the client's own is skipped, under any name.
        let meta = fs::metadata(tmp.path().join("f")).unwrap();
        let own =
            WalkOptions { own_files: vec![(meta.dev(), meta.ino())], ..opts(Naming::AsGiven, false, &[]) };
        let w = walk(&[tmp.path().join("l")], &own);
        assert_eq!(summary(&w)[0].1, "own_file");
    }
}
