//! Output helpers shared by the admin commands: aligned text tables, names
//! and paths escaped for the human output, and the single JSON document of
//! `--json`.

use std::path::Path;

use crate::logging::Esc;

/// Lay out rows under headers, columns separated by two spaces; columns
/// listed in `right` are right-aligned (numbers).
pub fn table(headers: &[&str], rows: &[Vec<String>], right: &[usize]) -> String {
    let mut width: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut s = String::new();
        for (i, (c, w)) in cells.zip(&width).enumerate() {
            if i > 0 {
                s.push_str("  ");
            }
            let pad = w.saturating_sub(c.chars().count());
            if right.contains(&i) {
                s.extend(std::iter::repeat_n(' ', pad));
                s.push_str(c);
            } else {
                s.push_str(c);
                s.extend(std::iter::repeat_n(' ', pad));
            }
        }
        s.truncate(s.trim_end().len());
        s.push('\n');
        s
    };
    let mut out = line(&mut headers.iter().copied());
    for r in rows {
        out.push_str(&line(&mut r.iter().map(String::as_str)));
    }
    out
}

/// One JSON document: an array of already-encoded objects, one per line.
pub fn json_array(items: &[String]) -> String {
    if items.is_empty() {
        return "[]\n".into();
    }
    format!("[\n  {}\n]\n", items.join(",\n  "))
}

/// A client's name or a stored file's name in the human output, escaped as
/// the server's log lines escape it ([`Esc`]): a client chose it, and a
/// bidirectional override or an invisible character in it would reorder or
/// hide what the operator reads. The `--json` outputs carry names exact
/// (JSON-escaped) instead.
pub fn shown(name: &str) -> String {
    Esc(name).to_string()
}

/// A path in the human output (stored names are part of it), escaped as by [`shown`].
pub fn shown_path(p: &Path) -> String {
    shown(&p.to_string_lossy())
}

/// A value for a text column: the value, or `-`.
pub fn or_dash<T: ToString>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "-".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align() {
        let t = table(&["A", "NUM"], &[vec!["xyz".into(), "5".into()], vec!["é".into(), "100".into()]], &[1]);
        assert_eq!(t, "A    NUM\nxyz    5\né    100\n");
        assert_eq!(json_array(&[]), "[]\n");
        assert_eq!(json_array(&["{}".into(), "{}".into()]), "[\n  {},\n  {}\n]\n");
    }
}
