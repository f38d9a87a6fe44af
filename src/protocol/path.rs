//! File names and paths as clients send them: the rules that decide which
//! names are accepted and what relative path under `files/<client-id-hex>/`
//! an accepted name stands for (issue 10, "Paths, tar-like").
//!
//! This module owns those rules and nothing else: it is pure (no I/O), so
//! that it can be unit-tested, property-tested (`tests/properties.rs`) and
//! fuzzed (`path_normalize` in `fuzz/`).
//!
//! * [`validate_file_name`]: the single-component rule (no separator at all).
//! * [`normalize_path`]: the tar-like rule. A leading root (`/`, `\`, any
//!   number of them) and a Windows drive prefix (`C:`) are removed, `/` and
//!   `\` both separate components, empty components collapse, `.` and `..`
//!   components are refused, every component must pass
//!   [`validate_file_name`] and contain no bidi override or isolate character,
//!   and the whole path is at most [`MAX_PATH_LEN`] bytes.
//!
//! A [`NormalizedPath`] therefore joined under any directory names a place
//! inside that directory, lexically: it has only ordinary components.

use std::fmt;

/// Longest accepted file name, or path component, in bytes (leaves room under
/// NAME_MAX = 255).
pub const MAX_FILE_NAME: usize = 250;

/// Longest accepted normalized path in bytes (components and the `/` between
/// them).
///
/// Linux's PATH_MAX (4096 bytes, NUL included) bounds the whole path the
/// server opens: `<data-dir>/versions/<32 hex>/<path>/<version number>` is
/// the longest it builds, under 70 bytes plus the data directory and the
/// path, so 1024 leaves about 3000 bytes for the data directory. Over
/// protocol v3 the limit that bites first is the 255-byte name field (254
/// bytes of name); this one holds for every other caller.
pub const MAX_PATH_LEN: usize = 1024;

/// Why a file name or path was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NameError {
    /// Nothing left: an empty name, or only a root and drive prefix (`/`, `C:\`).
    Empty,
    /// A `.` or `..` name or path component.
    Dots,
    /// A `/` or `\` in a name that must be a single component.
    Separator,
    /// A control character (Unicode category Cc).
    Control,
    /// A bidi override or isolate character (U+202A..=U+202E, U+2066..=U+2069).
    Bidi,
    NotUtf8,
    /// A name or path component over [`MAX_FILE_NAME`] bytes.
    TooLong(usize),
    /// A normalized path over [`MAX_PATH_LEN`] bytes.
    PathTooLong(usize),
}

impl fmt::Display for NameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NameError::Empty => write!(f, "file name is empty"),
            NameError::Dots => write!(f, "file name is '.' or '..', or has such a component"),
            NameError::Separator => write!(f, "file name contains a path separator"),
            NameError::Control => write!(f, "file name contains a control character"),
            NameError::Bidi => write!(f, "file name contains a bidi override or isolate character"),
            NameError::NotUtf8 => write!(f, "file name is not valid UTF-8"),
            NameError::TooLong(n) => write!(f, "file name is {n} bytes, over the {MAX_FILE_NAME}-byte limit"),
            NameError::PathTooLong(n) => {
                write!(f, "file path is {n} bytes, over the {MAX_PATH_LEN}-byte limit")
            }
        }
    }
}

impl std::error::Error for NameError {}

/// Judge a file name (the bytes before the field's NUL). A valid name is a
/// single path component: it can never climb out of its directory.
pub fn validate_file_name(name: &[u8]) -> Result<&str, NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > MAX_FILE_NAME {
        return Err(NameError::TooLong(name.len()));
    }
    let s = std::str::from_utf8(name).map_err(|_| NameError::NotUtf8)?;
    if s == "." || s == ".." {
        return Err(NameError::Dots);
    }
    if s.contains(SEPARATORS) {
        return Err(NameError::Separator);
    }
    if s.chars().any(|c| c.is_control()) {
        return Err(NameError::Control);
    }
    Ok(s)
}

/// Both separators a client may use.
const SEPARATORS: [char; 2] = ['/', '\\'];

/// The bidi embedding/override (U+202A..=U+202E) and isolate
/// (U+2066..=U+2069) characters: they make a name display other than it is.
fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

/// A file path as a client sent it, made relative and checked: non-empty
/// components joined by `/`, none of them `.` or `..`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NormalizedPath {
    path: String,
    stripped: bool,
}

impl NormalizedPath {
    /// The components joined by `/`: no leading `/`, no `\`, no empty component.
    pub fn as_str(&self) -> &str {
        &self.path
    }

    /// The components, first to last (at least one).
    pub fn components(&self) -> std::str::Split<'_, char> {
        self.path.split('/')
    }

    /// Whether a leading root (`/`, `\`) or a drive prefix (`C:`) was removed:
    /// the client sent an absolute path.
    pub fn stripped(&self) -> bool {
        self.stripped
    }
}

/// The name without its leading roots and drive prefixes (`/`, `\\`, `C:`,
/// `C:\`, in any repetition), and whether there were any.
fn strip_prefix(mut s: &str) -> (&str, bool) {
    let start = s.len();
    loop {
        let rest = s.trim_start_matches(SEPARATORS);
        let b = rest.as_bytes();
        if b.len() >= 2 && b[0].is_ascii_alphabetic() && b[1] == b':' {
            s = &rest[2..];
        } else {
            return (rest, rest.len() != start);
        }
    }
}

/// Normalize a file path (the name field's bytes before its NUL) the way tar
/// extracts one: see the module documentation for the rules. Stripping the
/// leading root and drive prefix first means the result never starts with
/// either, so normalizing a result again gives it back unchanged.
pub fn normalize_path(raw: &[u8]) -> Result<NormalizedPath, NameError> {
    let s = std::str::from_utf8(raw).map_err(|_| NameError::NotUtf8)?;
    let (rest, stripped) = strip_prefix(s);
    let mut path = String::with_capacity(rest.len());
    for component in rest.split(SEPARATORS).filter(|c| !c.is_empty()) {
        validate_file_name(component.as_bytes())?;
        if component.contains(is_bidi_control) {
            return Err(NameError::Bidi);
        }
        if !path.is_empty() {
            path.push('/');
        }
        path.push_str(component);
    }
    if path.is_empty() {
        return Err(NameError::Empty);
    }
    if path.len() > MAX_PATH_LEN {
        return Err(NameError::PathTooLong(path.len()));
    }
    Ok(NormalizedPath { path, stripped })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(validate_file_name(b"report.pdf"), Ok("report.pdf"));
        assert_eq!(validate_file_name(b".hidden"), Ok(".hidden"));
        assert_eq!(validate_file_name("été.txt".as_bytes()), Ok("été.txt"));
        assert_eq!(validate_file_name(b""), Err(NameError::Empty));
        assert_eq!(validate_file_name(b"."), Err(NameError::Dots));
        assert_eq!(validate_file_name(b".."), Err(NameError::Dots));
        for bad in [&b"../x"[..], b"..\\x", b"/abs", b"a/b", b"a\\b"] {
            assert_eq!(validate_file_name(bad), Err(NameError::Separator), "{bad:?}");
        }
        assert_eq!(validate_file_name(b"a\nb"), Err(NameError::Control));
        assert_eq!(validate_file_name(b"a\x7fb"), Err(NameError::Control));
        assert_eq!(validate_file_name(b"\xff\xfe"), Err(NameError::NotUtf8));
        assert_eq!(validate_file_name(&[b'a'; 251]), Err(NameError::TooLong(251)));
        assert!(validate_file_name(&[b'a'; 250]).is_ok());
    }

    /// `(as_str, stripped)`, or the error.
    fn norm(raw: &[u8]) -> Result<(String, bool), NameError> {
        normalize_path(raw).map(|p| (p.as_str().to_string(), p.stripped()))
    }

    /// What is accepted: the name as sent, the path it stands for, whether a
    /// root or drive was stripped.
    const ACCEPTED: &[(&str, &str, bool)] = &[
        // The examples.
        ("/home/user/docs/report.pdf", "home/user/docs/report.pdf", true),
        ("docs/2026/report.pdf", "docs/2026/report.pdf", false),
        ("C:\\Users\\me\\cv.docx", "Users/me/cv.docx", true),
        ("report.pdf", "report.pdf", false),
        // Separators and empty components.
        ("a//b", "a/b", false),
        ("a\\b\\", "a/b", false),
        ("a\\\\b\\\\", "a/b", false),
        ("a/\\/b/", "a/b", false),
        ("///a", "a", true),
        ("\\\\server\\share\\f", "server/share/f", true),
        (".hidden/.x/..y/y..", ".hidden/.x/..y/y..", false),
        ("d/caf\u{e9}/\u{e9}t\u{e9}.txt", "d/caf\u{e9}/\u{e9}t\u{e9}.txt", false),
        // Neighbours of the bidi ranges are ordinary characters.
        ("a\u{2029}b\u{2065}", "a\u{2029}b\u{2065}", false),
        // Drive prefixes, with or without a separator, after a root, repeated.
        ("C:/x", "x", true),
        ("d:\\x", "x", true),
        ("C:x", "x", true),
        ("/C:/x", "x", true),
        ("C:C:\\x", "x", true),
        // Only a letter and a colon at the start is a drive.
        ("a/C:/x", "a/C:/x", false),
        ("1:/x", "1:/x", false),
        ("ab:x", "ab:x", false),
        ("\u{e9}:x", "\u{e9}:x", false),
    ];

    #[test]
    fn accepted_paths() {
        for (raw, path, stripped) in ACCEPTED {
            assert_eq!(norm(raw.as_bytes()), Ok((path.to_string(), *stripped)), "{raw:?}");
        }
    }

    /// What is refused, and why.
    const REFUSED: &[(&[u8], NameError)] = &[
        (b"../../secret.txt", NameError::Dots),
        (b"a/./b", NameError::Dots),
        (b"a/../b", NameError::Dots),
        (b"..\\x", NameError::Dots),
        (b"..", NameError::Dots),
        (b".", NameError::Dots),
        (b"/..", NameError::Dots),
        (b"C:..\\x", NameError::Dots),
        (b"C:\\..", NameError::Dots),
        (b"a/..", NameError::Dots),
        (b"a\\.\\", NameError::Dots),
        (b"x//../y", NameError::Dots),
        // Nothing left.
        (b"", NameError::Empty),
        (b"/", NameError::Empty),
        (b"\\", NameError::Empty),
        (b"//\\", NameError::Empty),
        (b"C:", NameError::Empty),
        (b"C:\\", NameError::Empty),
        (b"c:/", NameError::Empty),
        (b"C:C:/", NameError::Empty),
        // Characters.
        (b"a\nb", NameError::Control),
        (b"a/b\tc", NameError::Control),
        (b"\x7f", NameError::Control),
        (b"a\0b", NameError::Control),
        (b"x/\xc2\x85", NameError::Control), // U+0085 NEXT LINE
        (b"bad\xff\xfeutf8", NameError::NotUtf8),
        (b"/ok/\xc3", NameError::NotUtf8),
    ];

    #[test]
    fn refused_paths() {
        for (raw, why) in REFUSED {
            assert_eq!(norm(raw).as_ref(), Err(why), "{:?}", String::from_utf8_lossy(raw));
        }
        for c in ['\u{202A}', '\u{202B}', '\u{202C}', '\u{202D}', '\u{202E}', '\u{2066}', '\u{2069}'] {
            let name = format!("docs/invoice{c}fdp.exe");
            assert_eq!(norm(name.as_bytes()), Err(NameError::Bidi), "{c:?}");
        }
    }

    #[test]
    fn lengths() {
        let longest = "n".repeat(MAX_FILE_NAME);
        assert_eq!(norm(format!("a/{longest}").as_bytes()), Ok((format!("a/{longest}"), false)));
        let over = format!("a/{longest}n/b");
        assert_eq!(norm(over.as_bytes()), Err(NameError::TooLong(MAX_FILE_NAME + 1)));
        // Components of 9 bytes and their separators: 102 * 10 - 1 = 1019 bytes fit.
        let fits = vec!["123456789"; 102].join("/");
        assert_eq!(norm(fits.as_bytes()).map(|p| p.0.len()), Ok(1019));
        let too_long = format!("{fits}/12345");
        assert_eq!(norm(too_long.as_bytes()), Err(NameError::PathTooLong(1025)));
        // The limit is on the normalized path: collapsed separators do not count.
        let padded = format!("////{}", vec!["123456789"; 102].join("//"));
        assert_eq!(norm(padded.as_bytes()).map(|p| p.0.len()), Ok(1019));
        assert_eq!(norm(format!("{fits}/1234").as_bytes()).map(|p| p.0.len()), Ok(MAX_PATH_LEN));
    }

    #[test]
    fn components_and_idempotence() {
        let p = normalize_path(b"C:\\a\\\\b/c.txt").unwrap();
        assert_eq!(p.components().collect::<Vec<_>>(), ["a", "b", "c.txt"]);
        assert_eq!(p.components().next_back(), Some("c.txt"));
        assert!(p.stripped());
        let again = normalize_path(p.as_str().as_bytes()).unwrap();
        assert_eq!(again.as_str(), p.as_str());
        assert!(!again.stripped());
    }

    #[test]
    fn errors_read_well() {
        assert_eq!(
            NameError::PathTooLong(2000).to_string(),
            "file path is 2000 bytes, over the 1024-byte limit"
        );
        assert!(NameError::Bidi.to_string().contains("bidi"));
        assert!(NameError::Dots.to_string().contains("'.' or '..'"));
    }
}
