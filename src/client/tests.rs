//! Tests of the client library against a scripted server on a thread.

use super::plan::tests::{check_plan, sample};
use super::*;
use crate::crypto::{ciphertext_len, Cksum, StreamDecryptor};
use crate::protocol::{PacketHeader, RequestHeader, NAME_FIELD_LEN, PACKET_HEADER_LEN, REQUEST_HEADER_LEN};
use proptest::prelude::*;

/// A scripted server on a thread: registers, accepts a key, receives
/// files (answering a wrong cksum `wrong` times first), acks 1029/1031.
/// Returns the requests it saw (code, packet header if any) and the files.
fn fake_server(wrong: u32, ack_retry: bool) -> (std::net::SocketAddr, std::thread::JoinHandle<Vec<u16>>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let h = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let id = [0xab; 16];
        let mut aes = [0u8; 32];
        let mut seen = Vec::new();
        let mut wrong_left = wrong;
        let mut dec: Option<(StreamDecryptor, Cksum, u32)> = None;
        loop {
            let mut h = [0u8; REQUEST_HEADER_LEN];
            if s.read_exact(&mut h).is_err() {
                return seen;
            }
            let hdr = RequestHeader::decode(&h);
            let mut payload = vec![0u8; hdr.payload_size as usize];
            s.read_exact(&mut payload).unwrap();
            seen.push(hdr.code);
            let mut out = Vec::new();
            match hdr.code {
                1025 => Response::RegistrationOk { id }.encode(&mut out),
                1026 => {
                    let (pk, _) = crypto::parse_public_key(&payload[NAME_FIELD_LEN..]).unwrap();
                    aes = crypto::random_aes_key();
                    let encrypted_key = crypto::encrypt_session_key(&pk, &aes, OaepHash::Sha256).unwrap();
                    Response::KeyAccepted { id, encrypted_key }.encode(&mut out)
                }
                1028 => {
                    assert_eq!(hdr.client_id, id);
                    let ph = PacketHeader::decode(&payload).unwrap();
                    let (d, ck, total) =
                        dec.get_or_insert_with(|| (StreamDecryptor::new(&aes), Cksum::new(), 0));
                    *total += (payload.len() - PACKET_HEADER_LEN) as u32;
                    d.update(&mut payload[PACKET_HEADER_LEN..], |b| ck.update(b));
                    if ph.packet_number == ph.total_packets {
                        let (d, mut ck, total) = dec.take().unwrap();
                        d.finish(|b| ck.update(b)).unwrap();
                        let mut cksum = ck.finalize();
                        if wrong_left > 0 && ph.file_name.bytes() == b"f.bin" {
                            wrong_left -= 1;
                            cksum ^= 1;
                        }
                        let file_name = ph.file_name.0;
                        Response::FileReceived { id, content_size: total, file_name, cksum }.encode(&mut out)
                    }
                }
                1030 if ack_retry => Response::Ack { id }.encode(&mut out),
                1030 => {}
                1029 | 1031 => Response::Ack { id }.encode(&mut out),
                _ => Response::GeneralError.encode(&mut out),
            }
            s.write_all(&out).unwrap();
        }
    });
    (addr, h)
}

fn test_key() -> RsaPrivateKey {
    RsaPrivateKey::new(&mut rand::rngs::OsRng, 1024).unwrap()
}

#[test]
fn full_flow_against_fake_server() {
    let key = test_key();
    for (wrong, ack_retry, tell) in
        [(0, false, false), (1, false, false), (2, true, true), (1, true, false), (5, false, false)]
    {
        let (addr, h) = fake_server(wrong, ack_retry);
        let mut c = Client::connect(addr, &ClientOptions::default()).unwrap();
        assert_eq!(c.register("alice").unwrap(), [0xab; 16]);
        // The server encrypts with SHA-256: the client falls back from SHA-1.
        c.send_public_key("alice", &key).unwrap();
        assert!(c.aes_key().is_some());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.bin");
        let data = sample(300_000);
        std::fs::write(&path, &data).unwrap();
        let opts = UploadOptions { packet_size: 65536, ack_retry: tell, ..Default::default() };
        let mut last = 0;
        let out = c.send_file("f.bin", &path, &opts, &mut |n| last = n).unwrap();
        assert_eq!(last, 300_000);
        if wrong >= MAX_ATTEMPTS {
            assert_eq!(out, SendOutcome::CksumMismatch { attempts: 3 });
        } else {
            assert_eq!(out, SendOutcome::Verified { cksum: crypto::cksum(&data), attempts: wrong + 1 });
        }
        // The connection is still usable.
        let up = c.upload_bytes("g", b"hello", &UploadOptions::default()).unwrap();
        assert!(up.cksum_matches());
        assert_eq!(up.content_size, 16);
        c.crc_ok("g").unwrap();
        assert!(c.is_in_step());
        drop(c);
        let seen = h.join().unwrap();
        let n = 5; // 300_000 / 65536 -> 5 packets
        let mut expect = vec![1025, 1026];
        for a in 0..(wrong + 1).min(3) {
            if a > 0 {
                expect.push(1030);
            }
            expect.extend(std::iter::repeat_n(1028, n));
        }
        expect.push(if wrong >= 3 { 1031 } else { 1029 });
        expect.extend([1028, 1029]);
        assert_eq!(seen, expect, "wrong={wrong}");
    }
}

#[test]
fn refusals_and_bounds_from_server() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let h = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut b = vec![0u8; REQUEST_HEADER_LEN + NAME_FIELD_LEN];
        s.read_exact(&mut b).unwrap();
        let mut out = Vec::new();
        Response::RegistrationFailed.encode(&mut out);
        s.write_all(&out).unwrap();
        s.read_exact(&mut b).unwrap();
        // A response announcing a huge payload.
        s.write_all(&[3, 0x40, 0x06, 0, 0, 0, 1]).unwrap();
    });
    let mut c = Client::connect(addr, &ClientOptions::default()).unwrap();
    match c.register("bob") {
        Err(ClientError::Refused(Response::RegistrationFailed)) => {}
        other => panic!("{other:?}"),
    }
    assert!(c.is_in_step());
    match c.register("bob") {
        Err(ClientError::Protocol(m)) => assert!(m.contains("16777216"), "{m}"),
        other => panic!("{other:?}"),
    }
    assert!(!c.is_in_step());
    h.join().unwrap();
    match c.read_response() {
        Err(e) => assert!(e.is_network(), "{e}"),
        Ok(r) => panic!("{r:?}"),
    }
    // Nobody listening.
    let e = Client::connect(addr, &ClientOptions::default()).unwrap_err();
    assert!(e.is_network());
}

proptest! {
    #[test]
    fn plans_are_consistent(size in 0u64..5_000_000, p in 1usize..3_000_000, conv in 0u8..3) {
        let conv = [ContentSizeField::ThisPacket, ContentSizeField::WholeFile,
                    ContentSizeField::PerPacketEncrypted][conv as usize];
        if let Ok(plan) = PacketPlan::new(size, p, conv) {
            check_plan(&plan);
            let ct = ciphertext_len(size);
            let p64 = p as u64;
            let expect = match conv {
                ContentSizeField::ThisPacket => ct.div_ceil(p64),
                ContentSizeField::WholeFile => ct / p64 + 1,
                ContentSizeField::PerPacketEncrypted => size / p64 + 1,
            };
            prop_assert_eq!(u64::from(plan.total_packets), expect);
        } else {
            let n = match conv {
                ContentSizeField::ThisPacket => ciphertext_len(size).div_ceil(p as u64),
                ContentSizeField::WholeFile => ciphertext_len(size) / p as u64 + 1,
                ContentSizeField::PerPacketEncrypted => size / p as u64 + 1,
            };
            prop_assert!(n > 65535);
        }
    }
}
