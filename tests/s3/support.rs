//! backupd with its S3 tier switched on, for the S3 tests: the flags of
//! issue 13 pointed at a store (Garage, or the fault proxy in front of it),
//! the credentials in a file, the metrics file to read the queue from, the
//! admin commands run with the same flags, and the object key of a file.
#![allow(dead_code)]

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::time::Duration;

use backupd::client::{Client, ClientError, UploadOptions};
use backupd::protocol::{id_hex, ClientId, ResponseCode};

use crate::bucket::Bucket;
use crate::common::{run_admin, wait_until, AdminRun as Run, Launch, TestServer};

/// How long a queue gets to drain once the store is reachable again
/// (it includes the replica queue's retry backoff).
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(180);
const ADMIN_TIMEOUT: Duration = Duration::from_secs(300);

/// How backupd is pointed at the store.
#[derive(Clone)]
pub struct S3Conf {
    /// The endpoint backupd is given (Garage's, or a proxy's).
    pub endpoint: String,
    /// The real bucket (reads by the tests go there directly).
    pub bucket: Bucket,
    pub mode: &'static str,
    pub prefix: String,
    pub timeout: &'static str,
    /// The secret written to the credentials file (the bucket's, or a wrong one).
    pub secret: String,
    /// Give the server the credentials in AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY
    /// instead of `--s3-credentials FILE`.
    pub creds_in_env: bool,
}

impl S3Conf {
    pub fn new(endpoint: String, bucket: &Bucket, mode: &'static str, prefix: &str) -> S3Conf {
        S3Conf {
            endpoint,
            bucket: bucket.clone(),
            mode,
            prefix: prefix.to_string(),
            timeout: "10s",
            secret: bucket.secret.clone(),
            creds_in_env: false,
        }
    }

    /// The object key of a client's current file: `<prefix>/files/<id-hex>/<path>`.
    pub fn key(&self, id: &ClientId, path: &str) -> String {
        let k = format!("files/{}/{path}", id_hex(id));
        if self.prefix.is_empty() {
            k
        } else {
            format!("{}/{k}", self.prefix.trim_end_matches('/'))
        }
    }
}

/// A backupd server with the S3 tier on, and what the tests need beside it.
pub struct S3Server {
    pub server: TestServer,
    pub conf: S3Conf,
    /// Holds the credentials file, the metrics file and restore targets.
    pub side: tempfile::TempDir,
}

impl S3Server {
    pub fn start(conf: S3Conf, extra: &[&str]) -> S3Server {
        S3Server::start_with(conf, extra, Launch::default())
    }

    pub fn start_with(conf: S3Conf, extra: &[&str], mut launch: Launch) -> S3Server {
        if conf.creds_in_env {
            let (id, secret) = (conf.bucket.key_id.clone(), conf.secret.clone());
            let before = launch.tweak.take();
            launch.tweak = Some(std::sync::Arc::new(move |cmd: &mut std::process::Command| {
                if let Some(t) = &before {
                    t(cmd);
                }
                cmd.env("AWS_ACCESS_KEY_ID", &id).env("AWS_SECRET_ACCESS_KEY", &secret);
            }));
        }
        let side = tempfile::tempdir().expect("tempdir");
        write_credentials(&side.path().join("s3.credentials"), &conf.bucket.key_id, &conf.secret);
        let prom = side.path().join("backupd.prom");
        let mut args: Vec<String> =
            s3_flags(&conf, side.path()).iter().map(|s| s.to_string_lossy().into_owned()).collect();
        args.extend([
            "--metrics-file".into(),
            prom.display().to_string(),
            "--metrics-interval".into(),
            "200ms".into(),
        ]);
        args.extend(extra.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let server = TestServer::start_with(&refs, launch, |_| {});
        S3Server { server, conf, side }
    }

    /// Start the server again (same port, data and flags), with the metrics
    /// file of the previous run removed: its figures must not answer for
    /// the new process.
    pub fn restart(&mut self) {
        let _ = std::fs::remove_file(self.prom_path());
        self.server.restart();
    }

    pub fn prom_path(&self) -> PathBuf {
        self.side.path().join("backupd.prom")
    }

    /// Rewrite the credentials file (picked up at the next start).
    pub fn set_secret(&mut self, secret: &str) {
        self.conf.secret = secret.to_string();
        write_credentials(&self.side.path().join("s3.credentials"), &self.conf.bucket.key_id, secret);
    }

    /// A metric's value from the metrics file (the sample without labels).
    pub fn metric(&self, name: &str) -> Option<f64> {
        metric(&std::fs::read_to_string(self.prom_path()).unwrap_or_default(), name)
    }

    pub fn metrics_text(&self) -> String {
        std::fs::read_to_string(self.prom_path()).unwrap_or_default()
    }

    /// Wait until the metrics show `at_least` files uploaded to the store
    /// and an empty queue; panics with the metrics and the log otherwise.
    pub fn wait_drained(&self, at_least: f64) {
        let ok = wait_until(DRAIN_TIMEOUT, || {
            self.metric("backupd_s3_queue_depth") == Some(0.0)
                && self.metric("backupd_s3_uploaded_total").is_some_and(|n| n >= at_least)
        });
        assert!(
            ok,
            "the S3 queue did not drain ({at_least} uploads) within {DRAIN_TIMEOUT:?}\n--- metrics\n{}\n--- log\n{}",
            self.metrics_text(),
            self.server.log_text()
        );
    }

    /// Wait until `name` is at least `value` (e.g. failures counted).
    pub fn wait_metric_at_least(&self, name: &str, value: f64, timeout: Duration) {
        let ok = wait_until(timeout, || self.metric(name).is_some_and(|v| v >= value));
        assert!(
            ok,
            "{name} never reached {value} within {timeout:?}\n--- metrics\n{}\n--- log\n{}",
            self.metrics_text(),
            self.server.log_text()
        );
    }

    /// `backupd ARGS --data-dir DATA`, with the S3 flags when `with_s3`.
    pub fn admin(&self, args: &[&str], with_s3: bool) -> Run {
        let mut all: Vec<OsString> = args.iter().map(OsString::from).collect();
        all.extend([OsString::from("--data-dir"), self.server.data_dir().into_os_string()]);
        if with_s3 {
            all.extend(s3_flags(&self.conf, self.side.path()));
        }
        run_backupd(&all)
    }

    /// [`admin`](Self::admin), expecting exit `code`.
    pub fn admin_ok(&self, args: &[&str], with_s3: bool, code: i32) -> Run {
        let r = self.admin(args, with_s3);
        assert_eq!(r.code, code, "backupd {args:?}: {r:?}");
        r
    }

    /// The object's bytes, read from the bucket directly.
    pub fn object(&self, id: &ClientId, path: &str) -> Option<Vec<u8>> {
        let key = self.conf.key(id, path);
        match self.conf.bucket.get(&key) {
            Ok(b) => b,
            Err(e) => panic!("reading {key} from the bucket: {e}"),
        }
    }

    /// Every key under this server's prefix.
    pub fn keys(&self) -> Vec<String> {
        let prefix =
            if self.conf.prefix.is_empty() { String::new() } else { format!("{}/", self.conf.prefix) };
        match self.conf.bucket.list(&prefix) {
            Ok(v) => v.into_iter().map(|(k, _)| k).collect(),
            Err(e) => panic!("listing the bucket: {e}"),
        }
    }

    /// Neither the log nor any file in the data directory holds the secret key.
    pub fn assert_no_secret(&self) {
        let secret = self.conf.secret.as_bytes();
        assert!(!self.server.log_text().contains(&self.conf.secret), "the S3 secret key is in the log");
        for f in crate::common::walk_files(&self.server.data_dir()) {
            let bytes = std::fs::read(&f).unwrap_or_default();
            assert!(
                !bytes.windows(secret.len()).any(|w| w == secret),
                "the S3 secret key is in {}",
                f.display()
            );
        }
    }
}

/// The S3 flags of issue 13 for `conf`, the credentials in `side/s3.credentials`.
pub fn s3_flags(conf: &S3Conf, side: &Path) -> Vec<OsString> {
    let mut v: Vec<OsString> = [
        "--s3-endpoint",
        &conf.endpoint,
        "--s3-bucket",
        &conf.bucket.bucket,
        "--s3-region",
        &conf.bucket.region,
        "--s3-mode",
        conf.mode,
        "--s3-timeout",
        conf.timeout,
    ]
    .iter()
    .map(OsString::from)
    .collect();
    if !conf.prefix.is_empty() {
        v.extend([OsString::from("--s3-prefix"), OsString::from(&conf.prefix)]);
    }
    if !conf.creds_in_env {
        v.extend([OsString::from("--s3-credentials"), side.join("s3.credentials").into_os_string()]);
    }
    v
}

pub fn write_credentials(path: &Path, key_id: &str, secret: &str) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .expect("create the credentials file");
    write!(f, "AWS_ACCESS_KEY_ID={key_id}\nAWS_SECRET_ACCESS_KEY={secret}\n")
        .expect("write the credentials file");
}

/// A sample's value in Prometheus text: the line `NAME VALUE` (no labels).
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
}

/// Run `backupd ARGS` (no BACKUPD_* or AWS_* variables from outside).
pub fn run_backupd(args: &[OsString]) -> Run {
    let refs: Vec<&OsStr> = args.iter().map(OsString::as_os_str).collect();
    run_admin(&refs, &[], ADMIN_TIMEOUT)
}

/// `got` is exactly `want`; on failure the message says where they part,
/// not the bytes.
pub fn assert_bytes(got: Option<&[u8]>, want: &[u8], what: &str) {
    match got {
        None => panic!("{what}: missing (expected {} bytes)", want.len()),
        Some(g) if g == want => {}
        Some(g) => {
            let at = g.iter().zip(want).position(|(a, b)| a != b).unwrap_or(g.len().min(want.len()));
            panic!("{what}: {} bytes, expected {}; they differ from byte {at}", g.len(), want.len())
        }
    }
}

/// Upload `data` as `name`, check the cksums and send 1029: the 1029's answer.
pub fn send(c: &mut Client, name: &str, data: &[u8]) -> Result<(), Box<ClientError>> {
    let up = c.upload_bytes(name, data, &UploadOptions::default()).map_err(Box::new)?;
    assert!(up.cksum_matches(), "cksum mismatch on {name}");
    c.crc_ok(name).map_err(Box::new)
}

/// [`send`], expecting 1604.
pub fn send_ok(c: &mut Client, name: &str, data: &[u8]) {
    if let Err(e) = send(c, name, data) {
        panic!("upload of {name}: expected 1604, got {e}");
    }
}

/// Is this the 1607 of a refused 1029?
pub fn is_1607(r: &Result<(), Box<ClientError>>) -> bool {
    matches!(r, Err(e) if matches!(&**e, ClientError::Refused(resp) if resp.code() == ResponseCode::GeneralError))
}

/// `s3_pending` of client `name` in `backupd clients --json`.
pub fn s3_pending(s: &S3Server, name: &str) -> Option<f64> {
    let out = s.admin_ok(&["clients", "--json"], false, 0).stdout;
    let v: serde_json::Value = match serde_json::from_str(&out) {
        Ok(v) => v,
        Err(e) => panic!("clients --json is not JSON ({e}): {out}"),
    };
    v.as_array()?.iter().find(|c| c["name"] == name).and_then(|c| c["s3_pending"].as_f64())
}
