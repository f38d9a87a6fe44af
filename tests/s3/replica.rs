//! Replica mode: 1604 on local durability as without S3, then every
//! verified file copied to the bucket by a queue that survives restarts,
//! retried until the store takes it (unreachable, stopped, 503, 500,
//! stalled, wrong credentials), nothing lost.

use std::net::SocketAddr;
use std::time::Duration;

use crate::common::pseudo_random;
use crate::garage::Garage;
use crate::proxy::{Fault, FaultProxy};
use crate::support::{assert_bytes, s3_pending, send_ok, S3Conf, S3Server};

fn garage_addr(g: &Garage) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], g.s3_port))
}

/// Files of a few sizes (empty, under and over a packet, nested) and their bytes.
fn files(seed: u64) -> Vec<(String, Vec<u8>)> {
    vec![
        ("a.txt".to_string(), b"hello bucket\n".to_vec()),
        ("empty.bin".to_string(), Vec::new()),
        ("docs/sub/b.bin".to_string(), pseudo_random(300_000, seed)),
        ("docs/c.bin".to_string(), pseudo_random(70_001, seed + 1)),
    ]
}

/// Every file is in the bucket under its key, byte for byte.
fn assert_in_bucket(s: &S3Server, id: &backupd::protocol::ClientId, files: &[(String, Vec<u8>)]) {
    for (name, data) in files {
        let got = s.object(id, name);
        assert!(got.is_some(), "{} is not in the bucket; keys: {:?}", s.conf.key(id, name), s.keys());
        assert!(got.as_deref() == Some(&data[..]), "{} differs from what was uploaded", s.conf.key(id, name));
    }
}

#[test]
fn replica_copies_each_verified_file_to_its_key() {
    let g = Garage::start();
    let s = S3Server::start(S3Conf::new(g.endpoint(), &g.bucket, "replica", "box-a"), &[]);
    let (mut c, id) = s.server.registered_client("alice");
    let fs = files(1);
    for (name, data) in &fs {
        send_ok(&mut c, name, data);
    }
    s.wait_drained(fs.len() as f64);
    assert_in_bucket(&s, &id, &fs);
    let mut want: Vec<String> = fs.iter().map(|(n, _)| s.conf.key(&id, n)).collect();
    want.sort();
    // Versions may have keys of their own; the current files are exactly these.
    let current: Vec<String> = s.keys().into_iter().filter(|k| k.contains("/files/")).collect();
    assert_eq!(current, want);
    // The local copies are there too (replica: the local store is primary).
    for (name, data) in &fs {
        assert_bytes(
            std::fs::read(s.server.stored_path(&id, name)).ok().as_deref(),
            data,
            &format!("local {name}"),
        );
    }
    assert!(
        s.metric("backupd_s3_uploaded_bytes_total").is_some_and(|b| b >= 370_014.0),
        "{}",
        s.metrics_text()
    );
    assert_eq!(s.metric("backupd_s3_failures_total"), Some(0.0), "{}", s.metrics_text());
    assert_eq!(s3_pending(&s, "alice"), Some(0.0));

    // A new upload of a name replaces the object's bytes.
    let newer = pseudo_random(5000, 99);
    send_ok(&mut c, "a.txt", &newer);
    s.wait_drained(fs.len() as f64 + 1.0);
    assert_bytes(s.object(&id, "a.txt").as_deref(), &newer, "a.txt replaced");
    s.assert_no_secret();
}

#[test]
fn credentials_from_the_environment_and_an_empty_prefix() {
    let g = Garage::start();
    let mut conf = S3Conf::new(g.endpoint(), &g.bucket, "replica", "");
    conf.creds_in_env = true;
    let s = S3Server::start(conf, &[]);
    let (mut c, id) = s.server.registered_client("env");
    send_ok(&mut c, "x/y.txt", b"from the environment");
    s.wait_drained(1.0);
    // No prefix: the key is files/<id>/<path>, no leading slash.
    let key = format!("files/{}/x/y.txt", backupd::protocol::id_hex(&id));
    assert_eq!(s.conf.key(&id, "x/y.txt"), key);
    assert_eq!(g.bucket.get(&key).unwrap().as_deref(), Some(&b"from the environment"[..]));
    s.assert_no_secret();
}

#[test]
fn the_queue_survives_a_restart_and_drains_once_the_store_is_reachable() {
    let g = Garage::start();
    let proxy = FaultProxy::start(garage_addr(&g), Fault::Close);
    let mut s = S3Server::start(S3Conf::new(proxy.endpoint(), &g.bucket, "replica", "q"), &[]);
    let (mut c, id) = s.server.registered_client("bob");
    let fs = files(2);
    for (name, data) in &fs {
        // The store is unreachable: replica mode still answers 1604 at once.
        send_ok(&mut c, name, data);
    }
    s.wait_metric_at_least("backupd_s3_failures_total", 1.0, Duration::from_secs(60));
    s.wait_metric_at_least("backupd_s3_queue_depth", fs.len() as f64, Duration::from_secs(30));
    assert_eq!(s3_pending(&s, "bob"), Some(fs.len() as f64));
    drop(c);
    let status = s.server.stop();
    assert!(status.success(), "backupd did not stop cleanly: {status:?}\n{}", s.server.log_text());
    assert!(s.keys().is_empty(), "nothing can have reached the bucket: {:?}", s.keys());

    // Restart with the store reachable: the queue, read from the database, drains.
    proxy.set(Fault::Pass);
    s.restart();
    s.wait_drained(fs.len() as f64);
    assert_in_bucket(&s, &id, &fs);
    assert_eq!(s3_pending(&s, "bob"), Some(0.0));
}

#[test]
fn a_crash_after_the_1604_loses_nothing() {
    let g = Garage::start();
    let proxy = FaultProxy::start(garage_addr(&g), Fault::Stall);
    let mut s = S3Server::start(S3Conf::new(proxy.endpoint(), &g.bucket, "replica", "crash"), &[]);
    let (mut c, id) = s.server.registered_client("carol");
    let fs = files(3);
    for (name, data) in &fs {
        send_ok(&mut c, name, data);
    }
    // Killed (no clean shutdown) while the copies hang on the store.
    drop(c);
    s.server.kill();
    proxy.set(Fault::Pass);
    s.restart();
    s.wait_drained(fs.len() as f64);
    assert_in_bucket(&s, &id, &fs);
}

#[test]
fn the_store_stopped_and_restarted_during_uploads_loses_nothing() {
    let mut g = Garage::start();
    let s = S3Server::start(S3Conf::new(g.endpoint(), &g.bucket, "replica", "r"), &[]);
    let (mut c, id) = s.server.registered_client("dave");
    let mut all = Vec::new();
    for i in 0..3u64 {
        let f = (format!("before/{i}.bin"), pseudo_random(100_000 + i as usize, 10 + i));
        send_ok(&mut c, &f.0, &f.1);
        all.push(f);
    }
    g.stop();
    for i in 0..5u64 {
        let f = (format!("during/{i}.bin"), pseudo_random(200_000 + i as usize, 20 + i));
        send_ok(&mut c, &f.0, &f.1);
        all.push(f);
    }
    s.wait_metric_at_least("backupd_s3_failures_total", 1.0, Duration::from_secs(60));
    g.restart();
    for i in 0..2u64 {
        let f = (format!("after/{i}.bin"), pseudo_random(50_000 + i as usize, 30 + i));
        send_ok(&mut c, &f.0, &f.1);
        all.push(f);
    }
    s.wait_drained(all.len() as f64);
    assert_in_bucket(&s, &id, &all);
}

#[test]
fn answers_503_and_500_are_retried_until_the_store_takes_the_file() {
    let g = Garage::start();
    let proxy = FaultProxy::start(garage_addr(&g), Fault::Status(503));
    let s = S3Server::start(S3Conf::new(proxy.endpoint(), &g.bucket, "replica", "e"), &[]);
    let (mut c, id) = s.server.registered_client("erin");
    let fs = files(4);
    for (name, data) in &fs {
        send_ok(&mut c, name, data);
    }
    s.wait_metric_at_least("backupd_s3_failures_total", 1.0, Duration::from_secs(60));
    let after_503 = s.metric("backupd_s3_failures_total").unwrap_or(0.0);
    proxy.set(Fault::Status(500));
    s.wait_metric_at_least("backupd_s3_failures_total", after_503 + 1.0, DRAIN_TIMEOUT_FAILURE);
    assert!(s.keys().is_empty(), "{:?}", s.keys());
    assert_eq!(s.metric("backupd_s3_queue_depth"), Some(fs.len() as f64), "{}", s.metrics_text());
    proxy.set(Fault::Pass);
    s.wait_drained(fs.len() as f64);
    assert_in_bucket(&s, &id, &fs);
}

/// How long a retry may take to come round again (the backoff's cap).
const DRAIN_TIMEOUT_FAILURE: Duration = crate::support::DRAIN_TIMEOUT;

#[test]
fn a_stalled_store_times_out_and_never_holds_up_the_1604() {
    let g = Garage::start();
    let proxy = FaultProxy::start(garage_addr(&g), Fault::Stall);
    let s = S3Server::start(S3Conf::new(proxy.endpoint(), &g.bucket, "replica", "stall"), &[]);
    let (mut c, id) = s.server.registered_client("frank");
    let fs = files(5);
    for (name, data) in &fs {
        send_ok(&mut c, name, data);
    }
    // --s3-timeout (10 s here): the stalled requests end as failures, the loop goes on.
    s.wait_metric_at_least("backupd_s3_failures_total", 1.0, Duration::from_secs(60));
    send_ok(&mut c, "late.txt", b"still answered while the store hangs");
    proxy.set(Fault::Pass);
    s.wait_drained(fs.len() as f64 + 1.0);
    assert_in_bucket(&s, &id, &fs);
}

#[test]
fn wrong_credentials_keep_the_queue_until_they_are_fixed() {
    let g = Garage::start();
    let mut conf = S3Conf::new(g.endpoint(), &g.bucket, "replica", "creds");
    conf.secret = format!("wrong{}", "5a".repeat(30));
    let mut s = S3Server::start(conf, &[]);
    let (mut c, id) = s.server.registered_client("grace");
    let fs = files(6);
    for (name, data) in &fs {
        send_ok(&mut c, name, data);
    }
    s.wait_metric_at_least("backupd_s3_failures_total", 1.0, Duration::from_secs(60));
    assert!(s.keys().is_empty(), "{:?}", s.keys());
    s.assert_no_secret();
    drop(c);
    assert!(s.server.stop().success());
    let right = g.bucket.secret.clone();
    s.set_secret(&right);
    s.restart();
    s.wait_drained(fs.len() as f64);
    assert_in_bucket(&s, &id, &fs);
    s.assert_no_secret();
}
