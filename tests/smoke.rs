mod common;
use backupd::client::UploadOptions;
use common::*;

#[test]
fn smoke_register_upload_confirm() {
    let server = TestServer::start(&[]);
    let (mut c, id) = server.registered_client("alice");
    let data = pseudo_random(100_000, 1);
    let up =
        c.upload_bytes("a.bin", &data, &UploadOptions { packet_size: 4096, ..Default::default() }).unwrap();
    assert!(up.cksum_matches(), "{up:?}");
    c.crc_ok("a.bin").unwrap();
    assert_eq!(std::fs::read(server.stored_path(&id, "a.bin")).unwrap(), data);
}
