//! The test support itself, against the real Garage, before anything of
//! backupd's: objects written and read back (the signer), Garage stopped and
//! started again on the same folders with the data still there, and each
//! fault of the proxy seen by an S3 client.

use std::net::SocketAddr;

use crate::bucket::Bucket;
use crate::common::pseudo_random;
use crate::garage::Garage;
use crate::proxy::{Fault, FaultProxy};
use crate::support::assert_bytes;

#[test]
fn garage_stores_objects_and_keeps_them_across_a_restart() {
    let mut g = Garage::start();
    let b = &g.bucket;
    let big = pseudo_random(3 << 20, 1);
    b.put("p/files/00/a b+c.txt", b"hello").unwrap();
    b.put("p/files/00/dir/big.bin", &big).unwrap();
    assert_eq!(b.get("p/files/00/a b+c.txt").unwrap().as_deref(), Some(&b"hello"[..]));
    assert_eq!(b.get("p/files/00/missing").unwrap(), None);
    assert_eq!(
        b.list("p/").unwrap(),
        vec![
            ("p/files/00/a b+c.txt".to_string(), 5),
            ("p/files/00/dir/big.bin".to_string(), big.len() as u64)
        ]
    );
    g.stop();
    assert!(g.bucket.get("p/files/00/a b+c.txt").is_err(), "Garage answered while stopped");
    g.restart();
    let b = &g.bucket;
    assert_bytes(b.get("p/files/00/dir/big.bin").unwrap().as_deref(), &big, "big.bin after the restart");
    b.delete("p/files/00/a b+c.txt").unwrap();
    assert_eq!(b.list("p/").unwrap().len(), 1);
    // A wrong secret is refused.
    let wrong = Bucket { secret: "0".repeat(64), ..b.clone() };
    assert!(wrong.get("p/files/00/dir/big.bin").is_err());
}

#[test]
fn the_proxy_passes_refuses_answers_errors_and_stalls() {
    let g = Garage::start();
    let proxy = FaultProxy::start(SocketAddr::from(([127, 0, 0, 1], g.s3_port)), Fault::Pass);
    let via = Bucket { host: proxy.endpoint().trim_start_matches("http://").to_string(), ..g.bucket.clone() };
    via.put("k", b"through the proxy").unwrap();
    assert_eq!(g.bucket.get("k").unwrap().as_deref(), Some(&b"through the proxy"[..]));
    proxy.set(Fault::Status(503));
    let e = via.put("k2", b"x").unwrap_err();
    assert!(e.contains("HTTP 503"), "{e}");
    proxy.set(Fault::Status(500));
    assert!(via.get("k").unwrap_err().contains("HTTP 500"));
    proxy.set(Fault::Close);
    assert!(via.get("k").is_err());
    proxy.set(Fault::Stall);
    let stalled = std::thread::spawn(move || via.get("k"));
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(!stalled.is_finished(), "a stalled request was answered");
    // Switching closes the stalled connection: the request fails, nothing hangs.
    proxy.set(Fault::Pass);
    assert!(stalled.join().unwrap().is_err());
    assert_eq!(g.bucket.get("k2").unwrap(), None);
}
