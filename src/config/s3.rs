//! The S3 tier's settings (cargo feature `s3`): its flags (shared by the
//! server and the admin commands that read the bucket), the mode, and the
//! credentials. The bucket client and the replicator are the worker's
//! (`crate::worker::s3`). docs/OPERATIONS.md ("S3 tier") is the operator's
//! side.
//!
//! Secrets: the secret key lives in [`Secret`] only, whose `Debug` says
//! nothing, and is never logged (requests are signed into URLs, and a URL
//! is never logged either).

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::units::{parse_duration, parse_size};

/// `--s3-mode`: when the 1604 goes out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Mode {
    /// On local durability, as without S3; the file is copied to the bucket afterwards.
    #[default]
    Replica,
    /// Once the bucket confirmed the complete object; the local copy is a cache.
    Primary,
}

/// The S3 flags, shared by the server and the admin commands that read or
/// queue for the bucket (`restore`, `verify`, `s3 resync`).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct S3Args {
    /// S3 endpoint (http://127.0.0.1:3900 for a Garage node); path-style
    /// addressing. Setting it turns the S3 tier on [default: off]
    #[arg(long, env = "BACKUPD_S3_ENDPOINT", value_name = "URL")]
    pub s3_endpoint: Option<String>,

    /// Bucket name (required with --s3-endpoint) [default: none]
    #[arg(long, env = "BACKUPD_S3_BUCKET", value_name = "NAME")]
    pub s3_bucket: Option<String>,

    /// Region the requests are signed for
    #[arg(long, env = "BACKUPD_S3_REGION", value_name = "R", default_value = "us-east-1")]
    pub s3_region: String,

    /// Prefix of every key, so that boxes can share a bucket [default: none]
    #[arg(long, env = "BACKUPD_S3_PREFIX", value_name = "P")]
    pub s3_prefix: Option<String>,

    /// replica: 1604 on local durability, then copied to the bucket;
    /// primary: 1604 once the bucket has the file (the local copy is a cache)
    #[arg(long, env = "BACKUPD_S3_MODE", value_enum, default_value = "replica")]
    pub s3_mode: Mode,

    /// How long one request to the store may take; in primary mode, how long
    /// a 1029 waits for the bucket before it gets 1607
    #[arg(long, env = "BACKUPD_S3_TIMEOUT", value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub s3_timeout: Duration,

    /// Primary mode: bytes of stored files kept on the local disk (oldest
    /// copies already in the bucket are evicted first)
    #[arg(long, env = "BACKUPD_CACHE_SIZE", value_name = "SIZE", default_value = "1GiB", value_parser = parse_size)]
    pub cache_size: u64,

    /// File with `AWS_ACCESS_KEY_ID=...` and `AWS_SECRET_ACCESS_KEY=...`
    /// lines (or `aws_access_key_id = ...` as in ~/.aws/credentials)
    /// [default: the AWS_* variables]
    #[arg(long, env = "BACKUPD_S3_CREDENTIALS", value_name = "FILE")]
    pub s3_credentials: Option<PathBuf>,
}

/// A secret (the S3 secret key): kept out of `Debug` and logs.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// The S3 tier as configured: checked flags and loaded credentials.
#[derive(Debug, Clone)]
pub struct Settings {
    pub endpoint: String,
    pub bucket: String,
    pub region: String,
    /// Without slashes at either end; may be empty.
    pub prefix: String,
    pub mode: Mode,
    pub timeout: Duration,
    pub cache_size: u64,
    pub access_key: String,
    pub secret_key: Secret,
}

impl S3Args {
    /// The settings, or None when no endpoint is set (the tier is off).
    /// Errors name the flag at fault, never a secret.
    pub fn settings(&self) -> Result<Option<Settings>, String> {
        let Some(endpoint) = self.s3_endpoint.as_deref().filter(|e| !e.is_empty()) else {
            return Ok(None);
        };
        let scheme_ok =
            endpoint.starts_with("http://") || (endpoint.starts_with("https://") && cfg!(feature = "s3-tls"));
        if !scheme_ok {
            return Err(format!(
                "--s3-endpoint {endpoint:?}: expected http://HOST:PORT{}",
                if cfg!(feature = "s3-tls") {
                    " or https://..."
                } else {
                    " (https needs the s3-tls build feature)"
                }
            ));
        }
        let bucket = self.s3_bucket.clone().filter(|b| !b.is_empty());
        let bucket = bucket.ok_or("--s3-endpoint needs --s3-bucket (BACKUPD_S3_BUCKET)")?;
        let (access_key, secret_key) = load_credentials(self.s3_credentials.as_deref())?;
        let settings = Settings {
            endpoint: endpoint.to_string(),
            bucket,
            region: self.s3_region.clone(),
            prefix: self.s3_prefix.as_deref().unwrap_or("").trim_matches('/').to_string(),
            mode: self.s3_mode,
            timeout: self.s3_timeout.max(Duration::from_secs(1)),
            cache_size: self.cache_size,
            access_key,
            secret_key,
        };
        Ok(Some(settings))
    }
}

/// The access key and secret: from `--s3-credentials FILE` or else the
/// environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`).
pub fn load_credentials(file: Option<&Path>) -> Result<(String, Secret), String> {
    match file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("--s3-credentials {}: {e}", path.display()))?;
            parse_credentials(&text).ok_or_else(|| {
                format!(
                    "--s3-credentials {}: expected AWS_ACCESS_KEY_ID=... and AWS_SECRET_ACCESS_KEY=... lines",
                    path.display()
                )
            })
        }
        None => {
            let key = std::env::var("AWS_ACCESS_KEY_ID").ok().filter(|k| !k.is_empty());
            let secret = std::env::var("AWS_SECRET_ACCESS_KEY").ok().filter(|k| !k.is_empty());
            match (key, secret) {
                (Some(k), Some(s)) => Ok((k, Secret(s))),
                _ => Err("S3 credentials: give --s3-credentials FILE or set AWS_ACCESS_KEY_ID and \
                          AWS_SECRET_ACCESS_KEY"
                    .into()),
            }
        }
    }
}

/// Read `KEY=value` lines (shell style, optionally `export`ed and quoted)
/// or `key = value` lines (the AWS ini style; `[section]` lines and
/// comments ignored, the first values found win).
pub fn parse_credentials(text: &str) -> Option<(String, Secret)> {
    let (mut key, mut secret) = (None, None);
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') || line.starts_with('[') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        let Some((name, value)) = line.split_once('=') else { continue };
        let value = value.trim().trim_matches(|c| c == '"' || c == '\'').to_string();
        if value.is_empty() {
            continue;
        }
        match name.trim().to_ascii_lowercase().as_str() {
            "aws_access_key_id" if key.is_none() => key = Some(value),
            "aws_secret_access_key" if secret.is_none() => secret = Some(Secret(value)),
            _ => {}
        }
    }
    Some((key?, secret?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_slashes_are_trimmed() {
        let a = S3Args {
            s3_endpoint: Some("http://127.0.0.1:3900".into()),
            s3_bucket: Some("b".into()),
            s3_prefix: Some("/box1/".into()),
            s3_region: "garage".into(),
            s3_timeout: Duration::from_secs(30),
            ..S3Args::default()
        };
        let dir = tempfile::tempdir().unwrap();
        let creds = dir.path().join("creds");
        std::fs::write(&creds, "AWS_ACCESS_KEY_ID=GK1\nAWS_SECRET_ACCESS_KEY=s3cr3t\n").unwrap();
        let s = S3Args { s3_credentials: Some(creds), ..a.clone() }.settings().unwrap().unwrap();
        assert_eq!(s.prefix, "box1");
        assert_eq!(s.mode, Mode::Replica);
        assert!(!format!("{s:?}").contains("s3cr3t"), "the secret never shows in Debug");
        let no_bucket = S3Args { s3_bucket: None, ..a.clone() };
        assert!(no_bucket.settings().unwrap_err().contains("--s3-bucket"));
        let bad = S3Args { s3_endpoint: Some("ftp://x".into()), ..a };
        assert!(bad.settings().unwrap_err().contains("--s3-endpoint"));
        assert!(S3Args::default().settings().unwrap().is_none(), "no endpoint: no tier");
    }

    #[test]
    fn credentials_files_in_both_styles() {
        let env_style = "# backupd\nexport AWS_ACCESS_KEY_ID=\"GK123\"\nAWS_SECRET_ACCESS_KEY=abc=def\n";
        let (k, s) = parse_credentials(env_style).unwrap();
        assert_eq!((k.as_str(), s.0.as_str()), ("GK123", "abc=def"));
        let ini = "[default]\naws_access_key_id = GK9\naws_secret_access_key = xyz\n[other]\naws_access_key_id = no\n";
        let (k, s) = parse_credentials(ini).unwrap();
        assert_eq!((k.as_str(), s.0.as_str()), ("GK9", "xyz"));
        assert!(parse_credentials("AWS_ACCESS_KEY_ID=only").is_none());
        assert!(parse_credentials("").is_none());
    }
}
