//! The S3 tier's I/O (cargo feature `s3`): the bucket client ([`client`])
//! and the replicator thread ([`replicator`]), started by the worker
//! (`replica.rs` is the worker's side). The settings are
//! [`crate::config::s3`]'s. docs/ARCHITECTURE.md ("The S3 tier") has the
//! lifecycle.
//!
//! Object keys mirror the data directory: the file stored locally at
//! `files/<client-id-hex>/<path>` is the object `<prefix>/files/<client-id-hex>/<path>`
//! and version `n` of it `<prefix>/versions/<client-id-hex>/<path>/<n>`; with
//! an empty prefix the key is the relative path itself (no leading slash).

pub mod client;
pub mod replicator;

use std::time::Duration;

/// The object key of a path relative to the data directory
/// (`files/<id>/<path>`, `versions/<id>/<path>/<n>`).
pub fn object_key(prefix: &str, rel: &str) -> String {
    if prefix.is_empty() {
        rel.to_string()
    } else {
        format!("{prefix}/{rel}")
    }
}

/// The path relative to the data directory of an object key under `prefix`
/// (None for a key outside it).
pub fn relative_of_key<'a>(prefix: &str, key: &'a str) -> Option<&'a str> {
    if prefix.is_empty() {
        Some(key)
    } else {
        key.strip_prefix(prefix)?.strip_prefix('/')
    }
}

/// Exponential backoff after `failures` consecutive failures: 1 s, 2 s,
/// 4 s ... capped at `cap`.
pub fn backoff(failures: u32, cap: Duration) -> Duration {
    let exp = failures.saturating_sub(1).min(16);
    Duration::from_secs(1u64 << exp).min(cap)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_mirror_the_local_layout() {
        let id = "ab".repeat(16);
        let rel = format!("files/{id}/docs/2026/report.pdf");
        assert_eq!(object_key("", &rel), rel, "no leading slash with an empty prefix");
        assert_eq!(object_key("box1", &rel), format!("box1/{rel}"));
        assert_eq!(object_key("site/box1", "versions/x/f/3"), "site/box1/versions/x/f/3");
        assert_eq!(relative_of_key("box1", &format!("box1/{rel}")), Some(rel.as_str()));
        assert_eq!(relative_of_key("box1", "box10/files/x"), None, "a prefix is a whole component");
        assert_eq!(relative_of_key("", "files/x/y"), Some("files/x/y"));
    }

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let cap = Duration::from_secs(60);
        let seq: Vec<u64> = (1..=9).map(|n| backoff(n, cap).as_secs()).collect();
        assert_eq!(seq, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(backoff(u32::MAX, cap), cap);
        assert_eq!(backoff(0, cap), Duration::from_secs(1));
    }
}
