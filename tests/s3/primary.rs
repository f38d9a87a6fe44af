//! Primary mode: the 1604 goes out only once the store has confirmed the
//! whole file; while the store fails (stopped, 503, 500, stalled) the 1029
//! gets 1607 after `--s3-timeout` and the client's retry works once the
//! store is back; the local copy is a cache that `--cache-size` bounds.

use std::net::SocketAddr;
use std::time::Duration;

use crate::common::{pseudo_random, wait_until, walk_files};
use crate::garage::Garage;
use crate::proxy::{Fault, FaultProxy};
use crate::support::{assert_bytes, is_1607, send, send_ok, S3Conf, S3Server};

#[test]
fn the_1604_means_the_object_is_in_the_bucket() {
    let g = Garage::start();
    let s = S3Server::start(S3Conf::new(g.endpoint(), &g.bucket, "primary", "p"), &[]);
    let (mut c, id) = s.server.registered_client("alice");
    for (i, name) in ["one.bin", "deep/er/two.bin", "three.txt"].iter().enumerate() {
        let data = pseudo_random(40_000 * (i + 1), 40 + i as u64);
        send_ok(&mut c, name, &data);
        // No waiting: the 1604 itself says the store has it.
        assert_bytes(s.object(&id, name).as_deref(), &data, &format!("{name} in the bucket at its 1604"));
    }
    s.assert_no_secret();
}

#[test]
fn the_store_stopped_gives_1607_and_the_retry_works_once_it_is_back() {
    let mut g = Garage::start();
    let s = S3Server::start(S3Conf::new(g.endpoint(), &g.bucket, "primary", "p"), &[]);
    let (mut c, id) = s.server.registered_client("bob");
    send_ok(&mut c, "first.bin", &pseudo_random(10_000, 1));
    g.stop();
    let data = pseudo_random(123_456, 2);
    let r = send(&mut c, "second.bin", &data);
    assert!(is_1607(&r), "1029 with the store down: expected 1607, got {r:?}\n{}", s.server.log_text());
    // What the server keeps of the refused file meanwhile (a queued copy that
    // may reach the bucket once it is back) is its own business; the client
    // was told 1607, so it sends the file again.
    g.restart();
    // The client's retry: the file again on the same connection.
    send_ok(&mut c, "second.bin", &data);
    assert_bytes(s.object(&id, "second.bin").as_deref(), &data, "second.bin");
    assert_bytes(s.object(&id, "first.bin").as_deref(), &pseudo_random(10_000, 1), "first.bin");
}

#[test]
fn error_answers_and_a_stall_give_1607_then_the_retry_works() {
    let g = Garage::start();
    let proxy = FaultProxy::start(SocketAddr::from(([127, 0, 0, 1], g.s3_port)), Fault::Pass);
    let s = S3Server::start(S3Conf::new(proxy.endpoint(), &g.bucket, "primary", "f"), &[]);
    let (mut c, id) = s.server.registered_client("carol");
    for (i, fault) in
        [Fault::Status(503), Fault::Status(500), Fault::Close, Fault::Stall].into_iter().enumerate()
    {
        let name = format!("f{i}.bin");
        let data = pseudo_random(90_000 + i, 50 + i as u64);
        proxy.set(fault);
        let r = send(&mut c, &name, &data);
        assert!(is_1607(&r), "{fault:?}: expected 1607, got {r:?}\n{}", s.server.log_text());
        proxy.set(Fault::Pass);
        send_ok(&mut c, &name, &data);
        assert_bytes(s.object(&id, &name).as_deref(), &data, &format!("{name} after {fault:?}"));
    }
}

#[test]
fn wrong_credentials_give_1607() {
    let g = Garage::start();
    let mut conf = S3Conf::new(g.endpoint(), &g.bucket, "primary", "w");
    conf.secret = format!("wrong{}", "6b".repeat(30));
    let s = S3Server::start(conf, &[]);
    let (mut c, id) = s.server.registered_client("dan");
    let r = send(&mut c, "x.bin", b"refused by the store");
    assert!(is_1607(&r), "expected 1607, got {r:?}");
    assert_eq!(s.object(&id, "x.bin"), None);
    s.assert_no_secret();
}

#[test]
fn the_cache_is_bounded_and_evicted_files_restore_from_the_bucket() {
    let g = Garage::start();
    let s =
        S3Server::start(S3Conf::new(g.endpoint(), &g.bucket, "primary", "cache"), &["--cache-size", "256K"]);
    let (mut c, id) = s.server.registered_client("erin");
    let mut all = Vec::new();
    for i in 0..8u64 {
        let f = (format!("c/{i}.bin"), pseudo_random(100_000, 60 + i));
        send_ok(&mut c, &f.0, &f.1);
        all.push(f);
    }
    // 800 KB confirmed, at most 256 KiB of it kept locally (eviction may
    // follow the 1604 by a moment).
    let local = || -> u64 {
        walk_files(&s.server.files_dir())
            .iter()
            .filter_map(|p| std::fs::metadata(p).ok())
            .map(|m| m.len())
            .sum()
    };
    let bounded = wait_until(Duration::from_secs(30), || local() <= 256 * 1024);
    assert!(bounded, "the cache holds {} bytes, over --cache-size 256K", local());
    for (name, data) in &all {
        assert_bytes(s.object(&id, name).as_deref(), data, name);
    }
    // Restore reads what the cache evicted from the bucket.
    drop(c);
    let out = s.side.path().join("out");
    let out_s = out.display().to_string();
    s.admin_ok(&["restore", "erin", "--to", &out_s], true, 0);
    for (name, data) in &all {
        assert_bytes(std::fs::read(out.join(name)).ok().as_deref(), data, &format!("restored {name}"));
    }
}

/// A store that accepts a request and then says nothing holds one client's
/// commit in primary mode, and nothing else: while that 1029 waits, another
/// client registers (a worker job) and an earlier file of the first client
/// restores; once the store answers again the waiting client gets its reply.
#[test]
fn a_stalled_store_holds_only_the_commit_that_waits_for_it() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let g = Garage::start();
    let proxy = FaultProxy::start(SocketAddr::from(([127, 0, 0, 1], g.s3_port)), Fault::Pass);
    let mut conf = S3Conf::new(proxy.endpoint(), &g.bucket, "primary", "stall");
    conf.timeout = "120s";
    let s = S3Server::start(conf, &[]);
    let (mut c, id) = s.server.registered_client("erin");
    send_ok(&mut c, "before.bin", &pseudo_random(5_000, 9));
    proxy.set(Fault::Stall);
    let before = proxy.accepted();
    let answered = Arc::new(AtomicBool::new(false));
    let waiting = {
        let answered = answered.clone();
        std::thread::spawn(move || {
            let r = send(&mut c, "held.bin", &pseudo_random(70_000, 10));
            answered.store(true, Ordering::SeqCst);
            r
        })
    };
    // The held upload has reached the (stalled) store.
    assert!(
        wait_until(Duration::from_secs(60), || proxy.accepted() > before),
        "the upload never reached the store"
    );
    // Meanwhile the server serves others: a registration, a local read.
    let (_other, _) = s.server.registered_client("frank");
    let local = s.server.stored_path(&id, "before.bin");
    assert_eq!(
        std::fs::read(&local).ok(),
        Some(pseudo_random(5_000, 9)),
        "the earlier file is stored locally"
    );
    assert!(!answered.load(Ordering::SeqCst), "the held 1029 was answered before the store said anything");
    // The store answers again (the stalled connections close): the waiting
    // client gets a reply, 1604 or 1607, and the server is still up.
    proxy.set(Fault::Pass);
    let r = waiting.join().expect("uploader thread");
    assert!(r.is_ok() || is_1607(&r), "the held upload got neither 1604 nor 1607: {r:?}");
    let (mut again, _) = s.server.registered_client("gina");
    send_ok(&mut again, "after.bin", b"the store is back");
}
