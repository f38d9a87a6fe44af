//! The admin side of the S3 tier: `backupd restore` and `backupd verify`
//! read from the bucket when the local copies are gone (a lost card), and
//! `backupd s3 resync` queues again whatever the bucket lacks.

use crate::common::{pseudo_random, walk_files};
use crate::garage::Garage;
use crate::support::{assert_bytes, send_ok, S3Conf, S3Server};

/// A server in replica mode with `alice`'s files uploaded and copied to the
/// bucket, then stopped.
fn backed_up(g: &Garage, prefix: &str) -> (S3Server, backupd::protocol::ClientId, Vec<(String, Vec<u8>)>) {
    let mut s = S3Server::start(S3Conf::new(g.endpoint(), &g.bucket, "replica", prefix), &[]);
    let (mut c, id) = s.server.registered_client("alice");
    let fs: Vec<(String, Vec<u8>)> = vec![
        ("report.pdf".into(), pseudo_random(250_000, 7)),
        ("photos/2026/a.jpg".into(), pseudo_random(1_000_001, 8)),
        ("notes/empty.txt".into(), Vec::new()),
    ];
    for (name, data) in &fs {
        send_ok(&mut c, name, data);
    }
    s.wait_drained(fs.len() as f64);
    drop(c);
    assert!(s.server.stop().success(), "{}", s.server.log_text());
    (s, id, fs)
}

/// Remove every file under `files/` (the card's copies are lost; the
/// database, which `backupd snapshot` keeps elsewhere, is not).
fn wipe_local_files(s: &S3Server) {
    for f in walk_files(&s.server.files_dir()) {
        std::fs::remove_file(&f).unwrap();
    }
    assert!(walk_files(&s.server.files_dir()).is_empty());
}

#[test]
fn restore_reads_the_bucket_when_the_local_files_are_gone() {
    let g = Garage::start();
    let (s, _id, fs) = backed_up(&g, "site1");
    wipe_local_files(&s);
    let out = s.side.path().join("restored");
    let out_s = out.display().to_string();
    s.admin_ok(&["restore", "alice", "--to", &out_s], true, 0);
    for (name, data) in &fs {
        assert_bytes(std::fs::read(out.join(name)).ok().as_deref(), data, &format!("restored {name}"));
    }
    // One file by name, too.
    let one = s.side.path().join("one");
    let one_s = one.display().to_string();
    s.admin_ok(&["restore", "alice", "photos/2026/a.jpg", "--to", &one_s], true, 0);
    assert_bytes(std::fs::read(one.join("photos/2026/a.jpg")).ok().as_deref(), &fs[1].1, "restored a.jpg");
}

#[test]
fn verify_checks_the_bucket_copies_when_the_local_files_are_gone() {
    let g = Garage::start();
    let (s, id, _fs) = backed_up(&g, "site2");
    wipe_local_files(&s);
    s.admin_ok(&["verify"], true, 0);
    // A damaged object: verify finds it (exit 3).
    let key = s.conf.key(&id, "report.pdf");
    g.bucket.put(&key, b"not the file that was backed up").unwrap();
    let r = s.admin_ok(&["verify"], true, 3);
    assert!(r.stdout.contains("report.pdf") || r.stderr.contains("report.pdf"), "{r:?}");
}

#[test]
fn resync_queues_again_what_the_bucket_lacks() {
    let g = Garage::start();
    let (mut s, id, fs) = backed_up(&g, "site3");
    // An object lost on the store's side.
    g.bucket.delete(&s.conf.key(&id, "report.pdf")).unwrap();
    assert_eq!(s.object(&id, "report.pdf"), None);
    s.admin_ok(&["s3", "resync"], true, 0);
    // The next start copies it again.
    s.restart();
    s.wait_drained(1.0);
    for (name, data) in &fs {
        assert_bytes(s.object(&id, name).as_deref(), data, name);
    }
}
