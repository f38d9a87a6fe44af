//! The incremental record: which paths the server has verified, so that
//! unchanged files are not sent again.
//!
//! Owns the record file's format, its name beside the identity file, and the
//! "unchanged" rule. One record per server identity (client id): for
//! `me.info` with id `0123…ef` it is `me.info.0123…ef.sent`, in the same
//! folder. A file re-registered under a new id starts with an empty record.
//!
//! Format: UTF-8 text, one line per path, four tab-separated fields
//!
//! ```text
//! # backup-client record v1: name, size, mtime (s.ns), cksum
//! docs/a.txt<TAB>1234<TAB>1767225600.123456789<TAB>3015617425
//! ```
//!
//! `\`, tab, CR and LF in a name are written `\\`, `\t`, `\r`, `\n`. Lines
//! that do not parse are ignored (the file is only a cache: at worst a file
//! is sent again). The file is written atomically (temp file, fsync,
//! rename), mode 0600.
//!
//! A file is unchanged when its size and mtime (to the nanosecond) equal the
//! recorded ones; its content is not read. An entry is added only after the
//! server acknowledged the 1029 of that file (1604).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::fs::{self, Metadata};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::identity::write_atomic;
use crate::protocol::{id_hex, ClientId};

const HEADER: &str = "# backup-client record v1: name, size, mtime (s.ns), cksum";

/// Size and modification time of a file: what "unchanged" compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    pub size: u64,
    pub mtime_sec: i64,
    pub mtime_nsec: u32,
}

impl Stamp {
    pub fn of(meta: &Metadata) -> Stamp {
        Stamp {
            size: meta.len(),
            mtime_sec: meta.mtime(),
            mtime_nsec: meta.mtime_nsec().clamp(0, 999_999_999) as u32,
        }
    }
}

/// What the record holds about one path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verified {
    pub stamp: Stamp,
    pub cksum: u32,
}

/// The record of one identity, in memory.
#[derive(Debug, Default)]
pub struct Record {
    entries: HashMap<String, Verified>,
    dirty: bool,
}

/// The record file of identity `id` whose identity file is `identity_path`.
pub fn record_path(identity_path: &Path, id: &ClientId) -> PathBuf {
    let file = identity_path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    identity_path.with_file_name(format!("{file}.{}.sent", id_hex(id)))
}

/// (device, inode) of the identity file and of every record beside it, so
/// that a folder holding them does not send them (the key is private).
pub fn own_files(identity_path: &Path) -> Vec<(u64, u64)> {
    let key = |p: &Path| fs::metadata(p).ok().map(|m| (m.dev(), m.ino()));
    let mut out: Vec<(u64, u64)> = key(identity_path).into_iter().collect();
    let Some(file) = identity_path.file_name().map(|n| format!("{}.", n.to_string_lossy())) else {
        return out;
    };
    let dir = match identity_path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            let n = e.file_name();
            let n = n.to_string_lossy();
            if n.starts_with(&file) && n.ends_with(".sent") {
                out.extend(key(&e.path()));
            }
        }
    }
    out
}

impl Record {
    /// Read a record file; a missing file is an empty record.
    pub fn load(path: &Path) -> io::Result<Record> {
        match fs::read_to_string(path) {
            Ok(text) => Ok(Record::parse(&text)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Record::default()),
            Err(e) => Err(e),
        }
    }

    /// Parse the text of a record file (bad lines are skipped).
    pub fn parse(text: &str) -> Record {
        // The first line is the header; a name may start with `#` too.
        let body = text.lines().enumerate().filter(|(i, l)| !(*i == 0 && l.starts_with('#')));
        let entries = body.filter_map(|(_, l)| parse_line(l)).collect();
        Record { entries, dirty: false }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entry of `name` when the file is unchanged since it was verified.
    pub fn unchanged(&self, name: &str, stamp: &Stamp) -> Option<&Verified> {
        self.entries.get(name).filter(|v| v.stamp == *stamp)
    }

    /// Note that the server verified `name` (call after its 1604).
    pub fn insert(&mut self, name: &str, stamp: Stamp, cksum: u32) {
        let v = Verified { stamp, cksum };
        if self.entries.insert(name.to_string(), v) != Some(v) {
            self.dirty = true;
        }
    }

    /// Whether there is something not yet saved.
    pub fn is_dirty(&self) -> bool {
        self.dirty
    }

    /// The file's text, sorted by name.
    pub fn to_text(&self) -> String {
        let mut names: Vec<&String> = self.entries.keys().collect();
        names.sort();
        let mut out = String::with_capacity(64 * (names.len() + 1));
        out.push_str(HEADER);
        out.push('\n');
        for name in names {
            let v = &self.entries[name];
            escape_into(&mut out, name);
            let s = &v.stamp;
            let _ = writeln!(out, "\t{}\t{}.{:09}\t{}", s.size, s.mtime_sec, s.mtime_nsec, v.cksum);
        }
        out
    }

    /// Write the record atomically to `path` if anything changed.
    pub fn save(&mut self, path: &Path) -> io::Result<()> {
        if !self.dirty {
            return Ok(());
        }
        write_atomic(path, self.to_text().as_bytes(), 0o600)?;
        self.dirty = false;
        Ok(())
    }
}

fn parse_line(line: &str) -> Option<(String, Verified)> {
    let mut f = line.split('\t');
    let name = unescape(f.next()?)?;
    let size = f.next()?.parse().ok()?;
    let (sec, nsec) = f.next()?.split_once('.')?;
    let cksum = f.next()?.parse().ok()?;
    if f.next().is_some() || name.is_empty() {
        return None;
    }
    let nsec: u32 = nsec.parse().ok().filter(|&n| n < 1_000_000_000)?;
    let stamp = Stamp { size, mtime_sec: sec.parse().ok()?, mtime_nsec: nsec };
    Some((name, Verified { stamp, cksum }))
}

fn escape_into(out: &mut String, name: &str) {
    for c in name.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c => out.push(c),
        }
    }
}

fn unescape(s: &str) -> Option<String> {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars();
    while let Some(c) = it.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        out.push(match it.next()? {
            '\\' => '\\',
            't' => '\t',
            'n' => '\n',
            'r' => '\r',
            _ => return None,
        });
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn st(size: u64, sec: i64, nsec: u32) -> Stamp {
        Stamp { size, mtime_sec: sec, mtime_nsec: nsec }
    }

    #[test]
    fn round_trip_and_unchanged_rule() {
        let mut r = Record::default();
        assert!(!r.is_dirty());
        r.insert("docs/a.txt", st(10, 1_700_000_000, 5), 42);
        r.insert("odd\tname\\with\nbreaks\r", st(0, -3, 999_999_999), 7);
        r.insert("#hash", st(1, 1, 1), 1);
        assert!(r.is_dirty());
        let text = r.to_text();
        assert!(text.starts_with("# backup-client record v1"));
        assert!(text.contains("docs/a.txt\t10\t1700000000.000000005\t42\n"), "{text}");
        let back = Record::parse(&text);
        assert_eq!(back.len(), 3);
        assert!(back.unchanged("#hash", &st(1, 1, 1)).is_some());
        assert_eq!(back.unchanged("docs/a.txt", &st(10, 1_700_000_000, 5)).map(|v| v.cksum), Some(42));
        assert!(back.unchanged("docs/a.txt", &st(11, 1_700_000_000, 5)).is_none());
        assert!(back.unchanged("docs/a.txt", &st(10, 1_700_000_000, 6)).is_none());
        assert!(back.unchanged("docs/b.txt", &st(10, 1_700_000_000, 5)).is_none());
        assert!(back.unchanged("odd\tname\\with\nbreaks\r", &st(0, -3, 999_999_999)).is_some());
        // Inserting the same again changes nothing.
        let mut back = back;
        back.insert("docs/a.txt", st(10, 1_700_000_000, 5), 42);
        assert!(!back.is_dirty());
    }

    #[test]
    fn bad_lines_are_skipped() {
        let text = "# header\nok\t1\t2.000000003\t4\nbad\t1\t2\t4\nbad\\x\t1\t2.0\t4\n\t1\t2.0\t4\n\
                    extra\t1\t2.0\t4\t5\nbig\t1\t2.1000000000\t4\nneg\t-1\t2.0\t4\n";
        let r = Record::parse(text);
        assert_eq!(r.len(), 1);
        assert!(r.unchanged("ok", &st(1, 2, 3)).is_some());
    }

    #[test]
    fn path_beside_identity_and_atomic_save() {
        let dir = tempfile::tempdir().unwrap();
        let me = dir.path().join("me.info");
        let p = record_path(&me, &[0xAB; 16]);
        assert_eq!(p, dir.path().join(format!("me.info.{}.sent", "ab".repeat(16))));
        assert_eq!(
            record_path(Path::new("me.info"), &[0; 16]),
            PathBuf::from(format!("me.info.{}.sent", "0".repeat(32)))
        );
        assert!(Record::load(&p).unwrap().is_empty());
        let mut r = Record::default();
        r.insert("x", st(1, 2, 3), 4);
        r.save(&p).unwrap();
        assert!(!r.is_dirty());
        assert_eq!(Record::load(&p).unwrap().len(), 1);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1, "no temp file left");
        fs::write(&me, "x").unwrap();
        fs::write(dir.path().join("other"), "y").unwrap();
        let key = |p: &Path| fs::metadata(p).map(|m| (m.dev(), m.ino())).unwrap();
        let mut own = own_files(&me);
        own.sort();
        let mut expect = vec![key(&me), key(&p)];
        expect.sort();
        assert_eq!(own, expect);
    }

    #[test]
    fn ten_thousand_entries_load_and_match() {
        let mut r = Record::default();
        for i in 0..10_000u32 {
            r.insert(&format!("d/{}/f{i}", i % 97), st(u64::from(i), 1_700_000_000 + i64::from(i), i), i);
        }
        let back = Record::parse(&r.to_text());
        assert_eq!(back.len(), 10_000);
        for i in 0..10_000u32 {
            let s = st(u64::from(i), 1_700_000_000 + i64::from(i), i);
            assert_eq!(back.unchanged(&format!("d/{}/f{i}", i % 97), &s).map(|v| v.cksum), Some(i));
        }
    }

    proptest! {
        #[test]
        fn any_name_round_trips(name in "\\PC{1,40}|[\\\\\t\r\n a]{1,10}", size: u64, sec: i64, nsec in 0u32..1_000_000_000, ck: u32) {
            let mut r = Record::default();
            r.insert(&name, st(size, sec, nsec), ck);
            let back = Record::parse(&r.to_text());
            prop_assert_eq!(back.unchanged(&name, &st(size, sec, nsec)).map(|v| v.cksum), Some(ck));
        }
    }
}
