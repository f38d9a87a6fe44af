//! The S3 tier end to end: the real backupd against the shared single-node
//! Garage ([`crate::garage`]): a crash and an outage in replica mode, primary
//! mode's 1607 and cache bound, and a lost box restored from the bucket
//! alone. No mocks; Garage missing fails the test, as everywhere here.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::common::{pseudo_random, server_bin, wait_until, Launch, TestServer};
use crate::support::write_credentials;
use backupd::client::{ClientError, UploadOptions};

/// The shared single-node Garage of these tests ([`crate::garage`]), with
/// a credentials file for its key and the flags the tests here pass.
struct Garage {
    g: crate::garage::Garage,
    creds: tempfile::TempDir,
    port: u16,
}

impl Garage {
    fn start() -> Garage {
        let g = crate::garage::Garage::start();
        let creds = tempfile::tempdir().unwrap();
        write_credentials(&creds.path().join("creds"), &g.bucket.key_id, &g.bucket.secret);
        let port = g.s3_port;
        Garage { g, creds, port }
    }

    /// Start it again (same folders and ports) after [`Garage::stop`].
    fn run(&mut self) {
        self.g.restart();
    }

    fn stop(&mut self) {
        self.g.stop();
    }

    fn secret(&self) -> &str {
        &self.g.bucket.secret
    }

    /// The S3 flags of a server or command using this Garage.
    fn flags(&self, prefix: &str) -> Vec<String> {
        [
            "--s3-endpoint",
            &format!("http://127.0.0.1:{}", self.port),
            "--s3-bucket",
            &self.g.bucket.bucket,
            "--s3-region",
            &self.g.bucket.region,
            "--s3-prefix",
            prefix,
            "--s3-credentials",
            &self.creds.path().join("creds").display().to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }
}

fn queued(db: &Path) -> i64 {
    let c = rusqlite::Connection::open(db).unwrap();
    c.query_row("SELECT COUNT(*) FROM s3_queue", [], |r| r.get(0)).unwrap()
}

fn admin(args: &[&str], extra: &[String]) -> (i32, String) {
    let out = Command::new(server_bin()).args(args).args(extra).output().expect("run backupd");
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

/// Upload and confirm (1029): Ok once the server answered 1604.
fn store(c: &mut backupd::client::Client, name: &str, data: &[u8]) -> Result<(), Box<ClientError>> {
    c.upload_bytes(name, data, &UploadOptions::default())?;
    Ok(c.crc_ok(name)?)
}

fn start_server(garage: &Garage, extra: &[&str]) -> TestServer {
    let mut args = garage.flags("box1");
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    TestServer::start_with(&args, Launch::default(), |_| {})
}

/// Replica mode: files (one of them a multipart upload) reach the bucket; a
/// queue filled while the store is down survives a crash and drains once the
/// store is back; with the local copies wiped, restore and verify read the
/// bucket.
#[test]
fn replica_survives_a_crash_and_an_outage_and_restores_from_the_bucket() {
    let mut garage = Garage::start();
    let metrics = tempfile::tempdir().unwrap();
    let prom = metrics.path().join("backupd.prom");
    let prom_arg = prom.display().to_string();
    let mut server = start_server(&garage, &["--metrics-file", &prom_arg, "--metrics-interval", "1s"]);
    let (mut c, _id) = server.registered_client("alice");
    let big = pseudo_random(20 << 20, 7); // two parts of a multipart upload
    let small = b"hello bucket".to_vec();
    store(&mut c, "docs/big.bin", &big).unwrap();
    store(&mut c, "small.txt", &small).unwrap();
    assert!(wait_until(Duration::from_secs(60), || queued(&server.db_path()) == 0), "queue never drained");

    let written = |name: &str| -> Option<f64> {
        let text = std::fs::read_to_string(&prom).ok()?;
        text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
    };
    assert!(wait_until(Duration::from_secs(10), || written("backupd_s3_uploaded_total") == Some(2.0)));
    assert_eq!(written("backupd_s3_uploaded_bytes_total"), Some((big.len() + small.len()) as f64));
    assert_eq!(written("backupd_s3_queue_depth"), Some(0.0));
    assert_eq!(written("backupd_s3_queue_lag_seconds"), Some(0.0));
    assert_eq!(written("backupd_s3_failures_total"), Some(0.0));

    // The store goes away: 1604 as before, the row waits; a crash keeps it.
    garage.stop();
    let later = b"written while the store was down".to_vec();
    store(&mut c, "later.txt", &later).unwrap();
    assert_eq!(queued(&server.db_path()), 1);
    assert!(
        wait_until(Duration::from_secs(10), || written("backupd_s3_failures_total").unwrap_or(0.0) >= 1.0)
    );
    assert!(wait_until(Duration::from_secs(10), || written("backupd_s3_queue_depth") == Some(1.0)));
    let (code, out) =
        admin(&["clients", "--json", "--data-dir", &server.data_dir().display().to_string()], &[]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("\"s3_pending\":1"), "{out}");
    drop(c);
    server.kill();
    server.restart();
    assert_eq!(queued(&server.db_path()), 1, "the queue survives a crash");
    garage.run();
    assert!(wait_until(Duration::from_secs(60), || queued(&server.db_path()) == 0), "queue never drained");
    server.stop();

    // The local copies are lost: restore and verify read the bucket.
    std::fs::remove_dir_all(server.files_dir()).unwrap();
    let data = server.data_dir().display().to_string();
    let to = server.temp_dir().join("restored");
    let s3 = garage.flags("box1");
    let (code, out) =
        admin(&["restore", "alice", "--to", &to.display().to_string(), "--data-dir", &data], &s3);
    assert_eq!(code, 0, "{out}");
    assert_eq!(std::fs::read(to.join("docs/big.bin")).unwrap(), big);
    assert_eq!(std::fs::read(to.join("small.txt")).unwrap(), small);
    assert_eq!(std::fs::read(to.join("later.txt")).unwrap(), later);
    let (code, out) = admin(&["verify", "--data-dir", &data], &s3);
    assert_eq!(code, 0, "{out}");
    let (code, out) = admin(&["verify", "--data-dir", &data], &[]);
    assert_eq!(code, 3, "without the bucket the copies are missing: {out}");
    // The bucket has everything: resync queues nothing.
    let (code, out) = admin(&["s3", "resync", "--data-dir", &data], &garage.flags("box1"));
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("queued 0 file(s)"), "{out}");
    assert!(!server.log_text().contains(garage.secret()), "the secret key is never logged");
}

/// Primary mode: no 1604 without the store (1607 after --s3-timeout); the
/// client's next try works once it is back, and the cache stays bounded.
#[test]
fn primary_answers_1607_until_the_store_is_back() {
    let mut garage = Garage::start();
    garage.stop();
    let server =
        start_server(&garage, &["--s3-mode", "primary", "--s3-timeout", "2s", "--cache-size", "1MiB"]);
    let (mut c, _id) = server.registered_client("bob");
    let data = pseudo_random(3 << 20, 3);
    match store(&mut c, "f.bin", &data) {
        Err(e) if matches!(*e, ClientError::Refused(_)) => {}
        other => panic!(
            "expected 1607 without the store, got {:?}; log:\n{}",
            other.map(|_| ()),
            server.log_text()
        ),
    }
    garage.run();
    // The client's retry works once the store answers (its row may still be in backoff).
    let ok = wait_until(Duration::from_secs(60), || store(&mut c, "f.bin", &data).is_ok());
    assert!(ok, "no 1604 once the store is back; log:\n{}", server.log_text());
    assert!(wait_until(Duration::from_secs(60), || queued(&server.db_path()) == 0));
    // The cache (1 MiB) keeps no 3 MiB copy once the bucket has it.
    let local = || -> u64 {
        let files = crate::common::walk_files(&server.files_dir());
        let versions = crate::common::walk_files(&server.data_dir().join("versions"));
        files.iter().chain(&versions).filter_map(|p| p.metadata().ok()).map(|m| m.len()).sum()
    };
    assert!(wait_until(Duration::from_secs(30), || local() <= 1 << 20), "cache not bounded: {}", local());
}

/// The bucket on its own, as the admin commands' flags name it.
fn bucket(garage: &Garage, prefix: &str) -> backupd::worker::s3::client::Bucket {
    let args = backupd::config::s3::S3Args {
        s3_endpoint: Some(format!("http://127.0.0.1:{}", garage.port)),
        s3_bucket: Some(garage.g.bucket.bucket.clone()),
        s3_region: garage.g.bucket.region.clone(),
        s3_prefix: Some(prefix.into()),
        s3_credentials: Some(garage.creds.path().join("creds")),
        ..Default::default()
    };
    let settings = args.settings().unwrap().unwrap();
    backupd::worker::s3::client::Bucket::new(&settings).unwrap()
}

/// A lost box: the whole data directory (database included) is gone. The
/// bucket describes itself (client names, sizes and cksums in each object's
/// metadata), so restore (by name or id, versions too) and verify work from
/// it alone, without creating a data directory; an object whose bytes no
/// longer match its metadata makes verify fail, naming it.
#[test]
fn a_lost_box_restores_and_verifies_from_the_bucket_alone() {
    let garage = Garage::start();
    let mut server = start_server(&garage, &[]);
    let (mut c, id) = server.registered_client("Zoë's laptop");
    let first = b"first text".to_vec();
    let second = b"second text, longer".to_vec();
    let big = pseudo_random((16 << 20) + 12345, 11); // a multipart upload
    store(&mut c, "notes/a.txt", &first).unwrap();
    store(&mut c, "big.bin", &big).unwrap();
    store(&mut c, "notes/a.txt", &second).unwrap(); // the first becomes version 1
    assert!(wait_until(Duration::from_secs(60), || queued(&server.db_path()) == 0), "queue never drained");
    drop(c);
    server.stop();

    let data = server.data_dir();
    std::fs::remove_dir_all(&data).unwrap();
    let data_arg = data.display().to_string();
    let s3 = garage.flags("box1");
    let to = server.temp_dir().join("restored");
    let to_arg = to.display().to_string();
    let (code, out) = admin(&["restore", "Zoë's laptop", "--to", &to_arg, "--data-dir", &data_arg], &s3);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("reading the bucket alone"), "{out}");
    assert_eq!(std::fs::read(to.join("notes/a.txt")).unwrap(), second);
    assert_eq!(std::fs::read(to.join("big.bin")).unwrap(), big);
    // By id, an earlier version.
    let old = server.temp_dir().join("old");
    let hex = backupd::protocol::id_hex(&id);
    let (code, out) = admin(
        &["restore", &hex, "notes/a.txt", "--version", "1", "--to", &old.display().to_string()],
        &[&["--data-dir".to_string(), data_arg.clone()][..], &s3].concat(),
    );
    assert_eq!(code, 0, "{out}");
    assert_eq!(std::fs::read(old.join("notes/a.txt")).unwrap(), first);
    // --before reads the stored time from the metadata.
    let (code, out) = admin(
        &["restore", &hex, "big.bin", "--before", "@9999999999", "--to", &old.display().to_string()],
        &[&["--data-dir".to_string(), data_arg.clone()][..], &s3].concat(),
    );
    assert_eq!(code, 0, "{out}");
    assert_eq!(std::fs::read(old.join("big.bin")).unwrap(), big);
    let (code, out) = admin(&["verify", "--data-dir", &data_arg], &s3);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("checked 2 files and 1 versions"), "{out}");
    assert!(!data.exists(), "reading the bucket creates no data directory");
    // A new box's empty data directory: the same, and it stays empty.
    let empty = server.temp_dir().join("new-box");
    std::fs::create_dir(&empty).unwrap();
    let (code, out) = admin(&["verify", "--data-dir", &empty.display().to_string()], &s3);
    assert_eq!(code, 0, "{out}");
    assert_eq!(std::fs::read_dir(&empty).unwrap().count(), 0, "nothing written into it");

    // Bit rot in the bucket: other bytes under the same metadata.
    let b = bucket(&garage, "box1");
    let rel = format!("files/{hex}/notes/a.txt");
    let (_, meta) = b.head(&rel).unwrap().expect("the object is there");
    let meta = meta.expect("the object carries its metadata");
    assert_eq!((meta.client.as_str(), meta.size), ("Zoë's laptop", second.len() as u64));
    let mut rotten = tempfile::tempfile().unwrap();
    let mut bytes = second.clone();
    bytes[3] ^= 0x20;
    std::io::Write::write_all(&mut rotten, &bytes).unwrap();
    b.put_file(&rel, &mut rotten, Some(&meta)).unwrap();
    let (code, out) = admin(&["verify", "--data-dir", &data_arg], &s3);
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("mismatched") && out.contains("Zoë's laptop/notes/a.txt"), "{out}");
    let again = server.temp_dir().join("again");
    let (code, out) = admin(
        &["restore", "Zoë's laptop", "--to", &again.display().to_string()],
        &[&["--data-dir".to_string(), data_arg.clone()][..], &s3].concat(),
    );
    assert_eq!(code, 1, "a damaged object is not restored: {out}");
    assert!(out.contains("damaged"), "{out}");
    assert!(!again.join("notes/a.txt").exists());
    assert!(!data.exists());
}
