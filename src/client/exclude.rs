//! `--exclude GLOB`: which walked entries are left out of a run.
//!
//! Owns the compiled set of patterns and the matching rule; the walk
//! (`walk.rs`) asks it about every file and folder it meets. A pattern is a
//! glob in `globset`'s syntax (`*`, `?`, `[abc]`, `{a,b}`, `**`), with `*` and
//! `?` never crossing a `/` (`**` does). An entry is excluded when a pattern
//! matches its relative path (the name it would be sent under, e.g.
//! `docs/sub/b.txt`) or its base name (`b.txt`). An excluded folder is not
//! entered.

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};

/// The `--exclude` patterns of a run.
#[derive(Debug, Clone)]
pub struct Excludes {
    set: GlobSet,
    patterns: Vec<String>,
}

impl Excludes {
    /// Compile the patterns; an invalid one is an error naming it.
    pub fn new(patterns: &[String]) -> Result<Excludes, String> {
        let mut builder = GlobSetBuilder::new();
        for p in patterns {
            let glob = GlobBuilder::new(p)
                .literal_separator(true)
                .backslash_escape(true)
                .build()
                .map_err(|e| format!("--exclude {p:?}: {e}"))?;
            builder.add(glob);
        }
        let set = builder.build().map_err(|e| format!("--exclude: {e}"))?;
        Ok(Excludes { set, patterns: patterns.to_vec() })
    }

    /// No pattern at all.
    pub fn none() -> Excludes {
        Excludes { set: GlobSet::empty(), patterns: Vec::new() }
    }

    /// The first pattern that excludes the entry with relative path `rel`
    /// (`/`-separated), matched against the whole path and its base name.
    pub fn matching(&self, rel: &str) -> Option<&str> {
        if self.patterns.is_empty() {
            return None;
        }
        let base = rel.rsplit('/').next().unwrap_or(rel);
        let first = |s: &str| self.set.matches(s).first().copied();
        let i = first(rel).or_else(|| if base != rel { first(base) } else { None })?;
        self.patterns.get(i).map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(p: &[&str]) -> Excludes {
        Excludes::new(&p.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn base_name_and_relative_path() {
        let e = ex(&["*.log", "docs/tmp", "**/cache/**", "build"]);
        assert_eq!(e.matching("a.log"), Some("*.log"));
        assert_eq!(e.matching("docs/sub/a.log"), Some("*.log"));
        assert_eq!(e.matching("docs/sub/a.txt"), None);
        assert_eq!(e.matching("docs/tmp"), Some("docs/tmp"));
        // `*` and a literal path do not cross `/`, `**` does.
        assert_eq!(e.matching("x/docs/tmp"), None);
        assert_eq!(e.matching("x/cache/y/z"), Some("**/cache/**"));
        assert_eq!(e.matching("cache/z"), Some("**/cache/**"));
        // A base name anywhere.
        assert_eq!(e.matching("src/build"), Some("build"));
        assert_eq!(e.matching("src/builds"), None);
        assert_eq!(ex(&["docs/*"]).matching("docs/sub/b.txt"), None);
        assert_eq!(ex(&["docs/*"]).matching("docs/sub"), Some("docs/*"));
        assert_eq!(ex(&["{a,b}.txt", "[0-9]*"]).matching("d/b.txt"), Some("{a,b}.txt"));
        assert_eq!(ex(&["{a,b}.txt", "[0-9]*"]).matching("d/7z"), Some("[0-9]*"));
        assert_eq!(Excludes::none().matching("anything"), None);
    }

    #[test]
    fn bad_patterns_are_named() {
        let e = Excludes::new(&["ok".into(), "a[".into()]).unwrap_err();
        assert!(e.contains("\"a[\""), "{e}");
    }
}
