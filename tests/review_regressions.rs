//! Regression tests for defects found in the code review of src/server and
//! src/worker. Each test names the defect it pins down.
mod common;

use std::time::Duration;

use backupd::client::UploadOptions;
use backupd::protocol::ResponseCode;
use common::*;

/// Two independent refusals of one upload must not give the client two 1607s.
///
/// Packet 1 of 2 is a complete CBC stream with bad padding (only the worker can
/// tell), packet 2 breaks a size rule (the loop refuses it). When the worker's
/// failure arrives first, packet 2 is swallowed (one 1607). When the loop
/// reads packet 2 before the worker is done with packet 1 — the usual order,
/// since packet 1 is large and both arrive back to back — the loop refused
/// packet 2 and the late failure of packet 1 used to be answered with a
/// second 1607 for an upload already refused.
#[test]
fn late_failure_of_an_already_refused_upload_gets_no_second_1607() {
    let server = TestServer::start(&[]);
    let (mut c, id) = server.registered_client("late-failure");
    let name = name_field_raw(b"bad.bin");
    let orig: u32 = 4 << 20; // a multiple of 16: garbage ciphertext cannot pass the padding check
    let whole = backupd::crypto::ciphertext_len(orig as u64) as usize;
    let garbage = pseudo_random(whole, 7);
    let mut both = packet_frame(&id, whole as u32, orig, 1, 2, &name, &garbage);
    // Packet 2 begins a stream after packet 1 but carries 32 bytes for a 16-byte stream.
    both.extend(packet_frame(&id, 32, 0, 2, 2, &name, &[0u8; 32]));
    c.send_raw(&both).unwrap();
    expect_reply(&mut c, ResponseCode::GeneralError);
    // The next reply must answer the next request, not be a second 1607.
    c.reconnect(id, "late-failure", test_key()).expect("the reply to 1027 must be 1605");
    // The connection is still usable.
    let data = pseudo_random(1000, 8);
    let up = c.upload_bytes("good.bin", &data, &UploadOptions::default()).unwrap();
    assert!(up.cksum_matches());
    c.crc_ok("good.bin").unwrap();
    assert_eq!(std::fs::read(server.stored_path(&id, "good.bin")).unwrap(), data);
}

/// A 1029 refused by the worker (the staged upload belongs to another client:
/// the connection switched identity with 1027 after the 1603) must not leave
/// the staged temp file behind in tmp/ until the next restart, nor hold a
/// small upload's temp file without a name.
#[test]
fn refused_commit_of_another_clients_upload_removes_its_temp_file() {
    let server = TestServer::start(&[]);
    // Larger than one content piece: named in tmp/; 5000 bytes: without a name.
    for (len, named, unnamed) in [(200_000, 1, 0), (5000, 0, 1)] {
        let (mut alice, _alice_id) = server.registered_client(&format!("alice{len}"));
        let (bob, bob_id) = (format!("bob{len}"), server.registered_client(&format!("bob{len}")).1);
        let data = pseudo_random(len, 9);
        let up = alice.upload_bytes("f.bin", &data, &UploadOptions::default()).unwrap();
        assert!(up.cksum_matches());
        assert_eq!(walk_files(&server.tmp_dir()).len(), named, "{len}: the staged upload in tmp/");
        assert_eq!(server.unnamed_temps(), unnamed, "{len}: the staged upload without a name");
        // Same connection, now as bob (the same test key is bob's key too).
        alice.reconnect(bob_id, &bob, test_key()).unwrap();
        let err = alice.crc_ok("f.bin").expect_err("bob cannot confirm alice's upload");
        assert_eq!(err.refusal_code(), Some(ResponseCode::GeneralError), "{err}");
        let cleaned = wait_until(Duration::from_secs(5), || {
            walk_files(&server.tmp_dir()).is_empty() && server.unnamed_temps() == 0
        });
        assert!(
            cleaned,
            "{len}: temp files left: {:?}, {} without a name",
            walk_files(&server.tmp_dir()),
            server.unnamed_temps()
        );
        assert!(walk_files(&server.files_dir()).is_empty(), "nothing may be published");
    }
}

/// Files waiting for their 1029 must not hold a file descriptor each: with
/// 16 staged files allowed per connection and 256 connections, the server
/// would need over 4000 descriptors, and once out of them every client's
/// uploads and commits fail. Here three connections stage 16 files each under
/// a limit of 48 descriptors; every upload must get 1603 and every 1029 1604.
/// Both sync modes (`fsync` reopens each staged file to sync it). Small
/// uploads' temp files without a name do hold one each until their commit:
/// only as many as the limit leaves beyond --max-connections + 64 (none
/// under 48; four under 84 with 16 connections), and only with syncfs.
#[test]
fn staged_files_do_not_hold_file_descriptors() {
    for (mode, limit, max_conns, unnamed) in
        [("syncfs", 48, "256", 0), ("fsync", 48, "256", 0), ("syncfs", 84, "16", 4), ("fsync", 84, "16", 0)]
    {
        let server = TestServer::start_with(
            &["--sync-mode", mode, "--max-connections", max_conns],
            Launch::with_rlimit(libc::RLIMIT_NOFILE, limit),
            |_| {},
        );
        let mut conns: Vec<_> = (0..3).map(|i| server.registered_client(&format!("fd{i}"))).collect();
        let data = pseudo_random(300, 10);
        for (i, (c, _)) in conns.iter_mut().enumerate() {
            for n in 0..16 {
                let name = format!("c{i}-{n}.bin");
                let up = c
                    .upload_bytes(&name, &data, &UploadOptions::default())
                    .unwrap_or_else(|e| panic!("{mode}: upload {name}: {e}\nlog:\n{}", server.log_text()));
                assert!(up.cksum_matches());
            }
        }
        assert_eq!(server.unnamed_temps(), unnamed, "{mode}, limit {limit}: files without a name");
        for (i, (c, id)) in conns.iter_mut().enumerate() {
            for n in 0..16 {
                let name = format!("c{i}-{n}.bin");
                c.crc_ok(&name)
                    .unwrap_or_else(|e| panic!("{mode}: 1029 {name}: {e}\nlog:\n{}", server.log_text()));
                assert_eq!(std::fs::read(server.stored_path(id, &name)).unwrap(), data);
            }
        }
        assert!(walk_files(&server.tmp_dir()).is_empty());
    }
}
