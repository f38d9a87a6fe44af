//! Target 6: path normalization (file paths as clients send them, issue 10).
//!
//! Input: the bytes of a file name field before its NUL, as a client sends a
//! path (issue 10: `/home/u/a.txt`, `C:\Users\a.txt`, `docs/a.txt`).
//!
//! Invariants: no panic; invalid UTF-8 is refused; an input with a `.` or `..`
//! component (split on either separator) is always refused; an accepted path
//! has the shape `check_normalized_path` demands, was made from the input only
//! by dropping leading roots and drive prefixes and empty components (and
//! `stripped` says whether a root or drive was dropped); normalizing it again
//! gives it back unchanged.

use std::path::{Component, Path};

use backupd::protocol::{
    normalize_path, validate_file_name, NameError, NormalizedPath, MAX_FILE_NAME, MAX_PATH_LEN,
};

/// Leading roots or drive prefixes: `/`, `\`, `C:` in any repetition.
fn starts_like_root(s: &str) -> bool {
    let b = s.as_bytes();
    b.first().is_some_and(|&c| c == b'/' || c == b'\\')
        || (b.len() >= 2 && b[0].is_ascii_alphabetic() && b[1] == b':')
}

/// Only drive prefixes (`C:D:`), or nothing.
fn only_drives(s: &str) -> bool {
    s.as_bytes().chunks(2).all(|c| c.len() == 2 && c[0].is_ascii_alphabetic() && c[1] == b':')
}

/// The shape of every accepted path, checked without the module's helpers.
pub fn check_normalized_path(p: &NormalizedPath) {
    let s = p.as_str();
    assert!(!s.is_empty() && s.len() <= MAX_PATH_LEN, "{s:?}");
    assert!(!s.starts_with('/') && !s.contains('\\'), "{s:?}");
    assert!(!starts_like_root(s), "a root or drive left at the start: {s:?}");
    assert!(!s.chars().any(char::is_control), "a control character (or NUL) in {s:?}");
    let bidi = |c: char| ('\u{202A}'..='\u{202E}').contains(&c) || ('\u{2066}'..='\u{2069}').contains(&c);
    assert!(!s.chars().any(bidi), "a bidi control in {s:?}");
    let comps: Vec<&str> = p.components().collect();
    assert_eq!(comps, s.split('/').collect::<Vec<_>>());
    for c in &comps {
        assert!(!c.is_empty() && c.len() <= MAX_FILE_NAME, "component {c:?} of {s:?}");
        assert!(*c != "." && *c != "..", "a dot component in {s:?}");
        assert_eq!(validate_file_name(c.as_bytes()), Ok(*c));
    }
    // Joined under files/<id>/, only ordinary components follow the base: it
    // cannot climb out of it, lexically.
    let base = Path::new("files/0123456789abcdef0123456789abcdef");
    let joined = base.join(s);
    let below = joined.strip_prefix(base).expect("the join stays under the base");
    let kinds: Vec<Component<'_>> = below.components().collect();
    assert_eq!(kinds.len(), comps.len(), "{s:?}");
    assert!(kinds.iter().all(|k| matches!(k, Component::Normal(_))), "{s:?}: {kinds:?}");
}

/// Target 6: see the module documentation.
pub fn path_normalize(data: &[u8]) {
    let result = normalize_path(data);
    let Ok(text) = std::str::from_utf8(data) else {
        assert_eq!(result, Err(NameError::NotUtf8));
        return;
    };
    let input: Vec<&str> = text.split(['/', '\\']).filter(|c| !c.is_empty()).collect();
    if input.iter().any(|c| *c == "." || *c == "..") {
        assert!(result.is_err(), "a dot component accepted: {text:?} -> {result:?}");
    }
    let p = match result {
        Ok(p) => p,
        Err(e) => {
            let _ = e.to_string();
            return;
        }
    };
    check_normalized_path(&p);
    assert_eq!(p.stripped(), starts_like_root(text), "{text:?}");
    // The output is the input's last components; what went before them was
    // drive prefixes (the roots and empty components are not in `input`).
    let out: Vec<&str> = p.components().collect();
    let cut = input.len().checked_sub(out.len()).expect("no component added");
    assert_eq!(out[1..], input[cut + 1..], "{text:?}");
    let dropped = input[cut].strip_suffix(out[0]).expect("the first component is kept whole");
    assert!(input[..cut].iter().all(|c| only_drives(c)) && only_drives(dropped), "{text:?}");
    let again = normalize_path(p.as_str().as_bytes()).expect("a normalized path is accepted again");
    assert_eq!(again.as_str(), p.as_str());
    assert!(!again.stripped());
}
