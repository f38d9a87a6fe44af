//! Admission control (issue 8): one test per attack of the table,
//! against the real binary. Each asserts the legitimate client's outcome:
//! while the attack runs, a fresh client registers, uploads 5,000 bytes (its
//! 1603 matches, its 1029 gets 1604, the file is stored byte for byte) with a
//! read timeout of a few seconds, and the attack's connections are closed or
//! held without harm.
//!
//! Attackers that must not be saved by the per-address caps connect from
//! 127.0.0.2 and up (the legitimate client from 127.0.0.1). Every loop and
//! wait is bounded; durations appear only as deadlines, never as measurements.

mod common;

use std::io::{self, BufRead, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use backupd::client::{Client, ClientError, ClientOptions, UploadOptions};
use backupd::protocol::{id_hex, ClientId, Code, Response, ResponseCode, REQUEST_HEADER_LEN};
use common::*;
use rsa::pkcs8::EncodePublicKey;
use socket2::{Domain, Socket, Type};

/// What the legitimate client uploads during every attack.
const FILE_LEN: usize = 5000;
/// An id no client has.
const BOGUS: ClientId = [0x5A; 16];
/// Reads and writes of every client here give up after this long.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

fn quick() -> ClientOptions {
    ClientOptions { connect_timeout: IO_TIMEOUT, read_timeout: IO_TIMEOUT, ..ClientOptions::default() }
}

/// A TCP connection to `addr` from the source address 127.0.0.`host`.
fn connect_from(host: u8, addr: SocketAddr) -> io::Result<TcpStream> {
    let s = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    s.bind(&SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, host)), 0).into())?;
    s.connect_timeout(&addr.into(), IO_TIMEOUT)?;
    let s: TcpStream = s.into();
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(s)
}

/// A client library connection from 127.0.0.`host`.
fn client_from(host: u8, addr: SocketAddr) -> Client {
    let s = connect_from(host, addr).unwrap_or_else(|e| panic!("connect from 127.0.0.{host}: {e}"));
    Client::from_stream(s, &quick()).unwrap()
}

/// The legitimate client's whole flow on a new connection from 127.0.0.1:
/// 1025, 1026, 5,000 bytes whose 1603 matches, 1029 answered 1604.
fn legit_flow(addr: SocketAddr, name: &str) -> Result<(ClientId, Vec<u8>), String> {
    let e = |e: ClientError| e.to_string();
    let mut c = Client::connect(addr, &quick()).map_err(e)?;
    let id = c.register(name).map_err(e)?;
    c.send_public_key(name, test_key()).map_err(e)?;
    let data = pseudo_random(FILE_LEN, name.bytes().map(u64::from).sum());
    let up = c.upload_bytes("legit.bin", &data, &UploadOptions::default()).map_err(e)?;
    if !up.cksum_matches() {
        return Err(format!("cksum mismatch: {up:?}"));
    }
    c.crc_ok("legit.bin").map_err(e)?;
    Ok((id, data))
}

/// The last `n` lines of a log, newest last.
fn tail(log: &str, n: usize) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// [`legit_flow`] must succeed and leave the file under `files_dir`.
fn legit_at(addr: SocketAddr, files_dir: &Path, name: &str, log: impl Fn() -> String) {
    match legit_flow(addr, name) {
        Ok((id, data)) => {
            let stored = std::fs::read(files_dir.join(id_hex(&id)).join("legit.bin"));
            assert_eq!(stored.ok(), Some(data), "{name}: the stored file differs");
        }
        Err(e) => panic!("{name}: the legitimate client failed: {e}; log tail:\n{}", tail(&log(), 40)),
    }
}

fn legit(server: &TestServer, name: &str) {
    legit_at(server.addr(), &server.files_dir(), name, || server.log_text());
}

/// Resident memory of a process, in bytes.
fn rss(pid: u32) -> u64 {
    let st = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/PID/status");
    let line = st.lines().find(|l| l.starts_with("VmRSS:")).expect("VmRSS line");
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

/// A cheap request the server refuses: 1029 without a session (1607) or a
/// 1027 for an unknown id (1606).
fn cheap_request(i: usize) -> (Vec<u8>, ResponseCode) {
    let nf = name_field_raw(b"nothing");
    if i.is_multiple_of(2) {
        (frame(&BOGUS, Code::CrcOk, &[&nf]), ResponseCode::GeneralError)
    } else {
        (frame(&BOGUS, Code::Reconnect, &[&nf]), ResponseCode::ReconnectDenied)
    }
}

/// Send one cheap request and read its reply; Err when the connection is gone.
fn ask_cheap(c: &mut Client, i: usize) -> Result<(), String> {
    let (req, want) = cheap_request(i);
    c.send_raw(&req).map_err(|e| e.to_string())?;
    match c.read_response() {
        Ok(r) if r.code() == want => Ok(()),
        Ok(r) => panic!("cheap request {i}: expected {want:?}, got {r:?}"),
        Err(e) => Err(e.to_string()),
    }
}

/// The 23-byte header announcing a `payload`-byte 1028 from `id`, then the
/// packet's fixed fields (no content).
fn announced_packet(id: &ClientId, payload: u32, orig: u32, number: u16, total: u16, name: &str) -> Vec<u8> {
    let content = payload - backupd::protocol::PACKET_HEADER_LEN as u32;
    let fixed = packet_frame(id, content, orig, number, total, &name_field_raw(name.as_bytes()), &[]);
    let mut v = raw_header(id, 3, 1028, payload);
    v.extend_from_slice(&fixed[REQUEST_HEADER_LEN..]);
    v
}

/// A thread that writes one byte a second to each stream, until the flag is
/// set or `longest` has passed.
fn trickle_each_second(
    streams: Vec<TcpStream>,
    longest: Duration,
) -> (Arc<AtomicBool>, thread::JoinHandle<()>) {
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let trickler = thread::spawn(move || {
        let end = Instant::now() + longest;
        while !stop2.load(Ordering::Relaxed) && Instant::now() < end {
            for mut s in &streams {
                let _ = s.write(&[0]);
            }
            thread::sleep(Duration::from_secs(1));
        }
    });
    (stop, trickler)
}

/// Log lines that mention `what`.
fn lines_with(log: &str, what: &str) -> usize {
    log.lines().filter(|l| l.contains(what)).count()
}

// ---------------------------------------------------------------------------
// Row 1: announced sizes reserve nothing
// ---------------------------------------------------------------------------

/// Four connections that never registered announce 16 MiB packets and
/// trickle a byte a second (and four that did register do the same with a
/// valid packet 1): no budget is reserved for what is only announced, the
/// legitimate client is served at once, the server's memory stays small, and
/// the strangers are closed at the login timeout.
#[test]
fn announced_16_mib_packets_reserve_nothing_and_trickling_strangers_are_closed() {
    let server = TestServer::start(&["--login-timeout", "3s"]);
    let addr = server.addr();
    let mut strangers: Vec<TcpStream> = (0..4).map(|_| connect_from(2, addr).unwrap()).collect();
    for s in &mut strangers {
        // The header and the first 10 bytes of the fixed fields.
        let start = announced_packet(&BOGUS, 16 << 20, 32 << 20, 1, 3, "big.bin");
        s.write_all(&start[..REQUEST_HEADER_LEN + 10]).unwrap();
    }
    // Registering first is free: four clients with sessions send a valid
    // packet 1 announcing 16 MiB of content, and a few bytes of it.
    let mut members: Vec<Client> = Vec::new();
    for i in 0..4 {
        let name = format!("member-{i}");
        let (mut c, id) = server.registered_client(&name);
        let mut start = announced_packet(&id, 16 << 20, 32 << 20, 1, 3, "big.bin");
        start.extend_from_slice(&[0u8; 10]);
        c.send_raw(&start).unwrap();
        members.push(c);
    }
    // One byte a second from each of them while the legitimate client works.
    let trickle: Vec<TcpStream> = strangers
        .iter()
        .map(|s| s.try_clone().unwrap())
        .chain(members.iter().map(|c| c.stream().try_clone().unwrap()))
        .collect();
    let (stop, trickler) = trickle_each_second(trickle, Duration::from_secs(10));
    thread::sleep(Duration::from_millis(500));
    let mut peak = rss(server.pid());
    legit(&server, "during-big-announcements");
    peak = peak.max(rss(server.pid()));
    // The strangers are closed at the login timeout (3 s), with no reply.
    for (i, s) in strangers.iter().enumerate() {
        let extra = assert_closed(s, Duration::from_secs(8));
        assert!(extra.is_empty(), "stranger {i} got reply bytes {extra:?}");
        peak = peak.max(rss(server.pid()));
    }
    stop.store(true, Ordering::Relaxed);
    trickler.join().unwrap();
    println!("server RSS peak during the attack: {} KiB", peak / 1024);
    assert!(peak < 32 << 20, "server RSS reached {} KiB: announced sizes took memory", peak / 1024);
    server.wait_for_log("no session within --login-timeout", IO_TIMEOUT);
    legit(&server, "after-big-announcements");
}

/// A tight budget (1 MiB with `--max-connections 64`, under the default's
/// 128 KiB x 256): twelve clients with sessions start a packet announcing
/// 16 MiB of content, send a few bytes of it, then a byte a second. At
/// 128 KiB pieces eight of them would hold the whole budget, and with a long
/// `--header-timeout` hold it for minutes. Half the budget is kept as an
/// 8 KiB share for each connection: four tricklers take the open half in
/// 128 KiB pieces, the others a share each, so meanwhile a fresh client
/// registers and uploads 5,000 bytes and ~500 KB (in shares), both stored
/// byte-identical. Its reads give up after 30 s
/// (a hang guard: the tricklers' pieces would be held for 2 minutes).
#[test]
fn tricklers_cannot_hold_a_tight_memory_budget() {
    const TRICKLERS: usize = 12;
    let args = ["--memory-budget", "1MiB", "--max-connections", "64", "--header-timeout", "120s"];
    let server = TestServer::start(&args);
    let addr = server.addr();
    let mut tricklers: Vec<Client> = Vec::new();
    for i in 0..TRICKLERS {
        let (mut c, id) = server.registered_client(&format!("trickler-{i}"));
        let mut start = announced_packet(&id, 16 << 20, 32 << 20, 1, 3, "big.bin");
        start.extend_from_slice(&[0u8; 10]);
        c.send_raw(&start).unwrap();
        tricklers.push(c);
    }
    let trickle: Vec<TcpStream> = tricklers.iter().map(|c| c.stream().try_clone().unwrap()).collect();
    let (stop, trickler) = trickle_each_second(trickle, Duration::from_secs(90));
    // Their pieces granted (or queued for) before the fresh client starts.
    thread::sleep(Duration::from_secs(1));
    let patient = ClientOptions { read_timeout: Duration::from_secs(30), ..quick() };
    let mut c = Client::connect(addr, &patient).unwrap();
    let id = c.register("beside-tricklers").unwrap();
    c.send_public_key("beside-tricklers", test_key()).unwrap();
    for (name, len) in [("small.bin", FILE_LEN), ("larger.bin", 500_000)] {
        let data = pseudo_random(len, len as u64);
        let up = c.upload_bytes(name, &data, &UploadOptions::default());
        let up = up.unwrap_or_else(|e| panic!("{name}: {e}; log tail:\n{}", tail(&server.log_text(), 40)));
        assert!(up.cksum_matches(), "{name}: {up:?}");
        c.crc_ok(name).unwrap();
        assert!(
            std::fs::read(server.stored_path(&id, name)).unwrap() == data,
            "{name} stored with other bytes"
        );
    }
    stop.store(true, Ordering::Relaxed);
    trickler.join().unwrap();
    server.wait_for_log("then in pieces of 8192 bytes", IO_TIMEOUT);
    drop(tricklers);
}

// ---------------------------------------------------------------------------
// Row 2: cheap requests do not hold slots
// ---------------------------------------------------------------------------

/// 256 connections from eight addresses (32 each: within the per-address
/// caps, which do not save the day here) fill the table and each send a
/// refused request every second, reconnecting when evicted. A new client
/// from 127.0.0.1 evicts one of them and uploads.
#[test]
fn a_table_full_of_cheap_requesters_makes_room_for_a_new_client() {
    const ATTACKERS: usize = 256;
    // A login timeout longer than the test: eviction is what makes room.
    let server = TestServer::start(&["--login-timeout", "60s"]);
    let addr = server.addr();
    let host = |i: usize| 2 + (i % 8) as u8;
    let mut attackers: Vec<Client> = (0..ATTACKERS).map(|i| client_from(host(i), addr)).collect();
    for (i, c) in attackers.iter_mut().enumerate() {
        ask_cheap(c, i).unwrap_or_else(|e| panic!("attacker {i} was not served: {e}"));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let evicted = Arc::new(AtomicUsize::new(0));
    let (stop2, evicted2) = (stop.clone(), evicted.clone());
    let attack = thread::spawn(move || {
        let end = Instant::now() + Duration::from_secs(15);
        while !stop2.load(Ordering::Relaxed) && Instant::now() < end {
            for (i, c) in attackers.iter_mut().enumerate() {
                if ask_cheap(c, i).is_err() {
                    evicted2.fetch_add(1, Ordering::Relaxed);
                    if let Ok(s) = connect_from(host(i), addr) {
                        *c = Client::from_stream(s, &quick()).unwrap();
                    }
                }
            }
            thread::sleep(Duration::from_secs(1));
        }
    });
    thread::sleep(Duration::from_millis(1500));
    legit(&server, "among-cheap-requesters");
    // One more round of the attack finds the connection that made room.
    thread::sleep(Duration::from_millis(1500));
    stop.store(true, Ordering::Relaxed);
    attack.join().unwrap();
    assert!(evicted.load(Ordering::Relaxed) >= 1, "no attacker was evicted for the new client");
    server.wait_for_log("evicted: the connection table is full", IO_TIMEOUT);
}

/// A client that only reconnects (1027 -> 1605) every second makes no upload
/// progress: at a full table it is evicted before a client that uploaded
/// earlier, and the newcomer gets its slot.
#[test]
fn a_client_that_only_reconnects_does_not_hold_a_slot_against_an_uploader() {
    let server = TestServer::start(&["--max-connections", "4"]);
    let addr = server.addr();
    let (mut uploader, uid) = server.registered_client("uploader");
    let data = pseudo_random(FILE_LEN, 21);
    assert!(uploader.upload_bytes("u1", &data, &UploadOptions::default()).unwrap().cksum_matches());
    uploader.crc_ok("u1").unwrap();
    // Three connections of one identity that it owns, holding the rest of
    // the table. It registered on a connection of its own, gone since (the
    // connection that registers or sets a key keeps its slot for the login
    // timeout: a_reconnect_churn_does_not_evict_a_client_logging_in).
    let (registration, rid) = server.registered_client("reconnector");
    let gone = registration.stream().local_addr().unwrap();
    drop(registration);
    server.wait_for_log(&format!("{gone} reconnector: closed"), IO_TIMEOUT);
    let mut reconnectors = Vec::new();
    for _ in 0..3 {
        let mut c = Client::connect(addr, &quick()).unwrap();
        c.reconnect(rid, "reconnector", test_key()).unwrap();
        reconnectors.push(c);
    }
    // Their 1605s are all more recent than the uploader's last progress.
    for _ in 0..2 {
        thread::sleep(Duration::from_millis(1000));
        for c in &mut reconnectors {
            c.reconnect(rid, "reconnector", test_key()).unwrap();
        }
    }
    legit(&server, "newcomer");
    // The oldest reconnector made room; the uploader kept its slot.
    let extra = assert_closed(reconnectors[0].stream(), IO_TIMEOUT);
    assert!(extra.is_empty(), "the evicted reconnector got bytes {extra:?}");
    for c in reconnectors.iter_mut().skip(1) {
        c.reconnect(rid, "reconnector", test_key()).unwrap();
    }
    assert!(uploader.upload_bytes("u2", &data, &UploadOptions::default()).unwrap().cksum_matches());
    uploader.crc_ok("u2").unwrap();
    assert_eq!(std::fs::read(server.stored_path(&uid, "u2")).unwrap(), data);
}

/// A connection from 127.0.0.`host` that establishes a session (1025, 1026).
fn session_from(host: u8, addr: SocketAddr, name: &str) -> Client {
    let mut c = client_from(host, addr);
    c.register(name).unwrap_or_else(|e| panic!("{name}: register: {e}"));
    c.send_public_key(name, test_key()).unwrap_or_else(|e| panic!("{name}: public key: {e}"));
    c
}

/// Over a per-address cap a new connection is closed at accept, with no
/// reply; connections with a session count only against the total cap;
/// other addresses are not affected.
#[test]
fn per_address_caps_close_new_connections_at_accept() {
    let server = TestServer::start(&["--max-unauthenticated-per-ip", "3", "--max-connections-per-ip", "6"]);
    let addr = server.addr();
    let mut sessions: Vec<Client> = (0..2).map(|i| session_from(2, addr, &format!("s{i}"))).collect();
    let mut fresh: Vec<Client> = (0..3).map(|_| client_from(2, addr)).collect();
    for (i, c) in fresh.iter_mut().enumerate() {
        ask_cheap(c, i).unwrap_or_else(|e| panic!("connection {i} without a session: {e}"));
    }
    let over = connect_from(2, addr).unwrap();
    let extra = assert_closed(&over, IO_TIMEOUT);
    assert!(extra.is_empty(), "a connection over the cap got bytes {extra:?}");
    server.wait_for_log("--max-unauthenticated-per-ip reached", IO_TIMEOUT);
    // Another address, and the connections already in, are served.
    let mut elsewhere = client_from(3, addr);
    ask_cheap(&mut elsewhere, 0).unwrap();
    legit(&server, "beside-the-cap");
    for (i, c) in fresh.iter_mut().enumerate() {
        ask_cheap(c, i).unwrap_or_else(|e| panic!("connection {i} lost after the cap: {e}"));
    }
    // Without the connections that have no session, sessions fill the total cap (6).
    drop(fresh);
    let room = wait_until(IO_TIMEOUT, || {
        let mut c = client_from(2, addr);
        ask_cheap(&mut c, 1).is_ok()
    });
    assert!(room, "the closed connections still count against the cap");
    for i in 2..6 {
        sessions.push(session_from(2, addr, &format!("s{i}")));
    }
    let over = connect_from(2, addr).unwrap();
    let extra = assert_closed(&over, IO_TIMEOUT);
    assert!(extra.is_empty(), "a connection over the total cap got bytes {extra:?}");
    for (i, c) in sessions.iter_mut().enumerate() {
        ask_cheap(c, i).unwrap_or_else(|e| panic!("session {i} lost after the cap: {e}"));
    }
}

// ---------------------------------------------------------------------------
// Row 3: no key takeover
// ---------------------------------------------------------------------------

/// Every file below `dir` with its contents, sorted by path.
fn contents(dir: &Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut v: Vec<_> =
        walk_files(dir).into_iter().map(|p| (p.clone(), std::fs::read(&p).unwrap())).collect();
    v.sort();
    v
}

/// Knowing a client's id and name (both cross the wire in clear), an
/// attacker reconnects as it (1027) and sends its own key (1026) on that
/// connection: refused with 1607, nothing changes; the victim still
/// reconnects with its own key and finds its file and versions intact.
#[test]
fn reconnect_then_public_key_cannot_take_over_a_client() {
    let server = TestServer::start(&[]);
    let addr = server.addr();
    let (mut victim, id) = server.registered_client("victim");
    for v in 0..3u64 {
        let data = pseudo_random(FILE_LEN, 100 + v);
        assert!(victim.upload_bytes("doc.bin", &data, &UploadOptions::default()).unwrap().cksum_matches());
        victim.crc_ok("doc.bin").unwrap();
    }
    drop(victim);
    let versions = server.data_dir().join("versions").join(id_hex(&id));
    let files = server.files_dir().join(id_hex(&id));
    let before = (contents(&files), contents(&versions));
    assert_eq!(before.1.len(), 2, "two earlier versions expected: {:?}", before.1);

    let attacker_key = rsa::RsaPrivateKey::new(&mut rand::rngs::OsRng, 1024).unwrap();
    let der = attacker_key.to_public_key().to_public_key_der().unwrap();
    let nf = name_field_raw(b"victim");
    let mut attacker = client_from(2, addr);
    attacker.send_raw(&frame(&id, Code::Reconnect, &[&nf])).unwrap();
    expect_reply(&mut attacker, ResponseCode::ReconnectOk);
    attacker.send_raw(&frame(&id, Code::PublicKey, &[&nf, der.as_bytes()])).unwrap();
    expect_reply(&mut attacker, ResponseCode::GeneralError);
    // The same 1026 again, and on a fresh connection: refused each time.
    attacker.send_raw(&frame(&id, Code::PublicKey, &[&nf, der.as_bytes()])).unwrap();
    expect_reply(&mut attacker, ResponseCode::GeneralError);
    let mut other = client_from(3, addr);
    other.send_raw(&frame(&id, Code::PublicKey, &[&nf, der.as_bytes()])).unwrap();
    expect_reply(&mut other, ResponseCode::GeneralError);

    legit(&server, "during-takeover");
    drop(attacker);
    drop(other);
    assert_eq!((contents(&files), contents(&versions)), before, "the victim's data changed");
    server.wait_for_log("only the connection that registered client", IO_TIMEOUT);

    // The victim's own key still works, and the name is still its own.
    let mut victim = Client::connect(addr, &quick()).unwrap();
    victim.reconnect(id, "victim", test_key()).expect("the victim's 1605 decrypts with its own key");
    let data = pseudo_random(FILE_LEN, 200);
    assert!(victim.upload_bytes("after.bin", &data, &UploadOptions::default()).unwrap().cksum_matches());
    victim.crc_ok("after.bin").unwrap();
    assert_eq!(std::fs::read(server.stored_path(&id, "after.bin")).unwrap(), data);
    assert_eq!(contents(&versions), before.1, "the versions changed");
    let mut again = Client::connect(addr, &quick()).unwrap();
    assert_eq!(again.register("victim").unwrap_err().refusal_code(), Some(ResponseCode::RegistrationFailed));
}

// ---------------------------------------------------------------------------
// Row 4: a stuck log sink does not stop the loop
// ---------------------------------------------------------------------------

/// A server process killed on drop.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The server's standard error is a pipe nobody reads (a hung supervisor):
/// 5,000 refused connections from eight addresses at debug level (three log
/// lines each) fill it many times over. The server answers every one of them
/// and the legitimate client meanwhile; once the pipe is read again, the
/// dropped lines are reported.
#[test]
fn a_stderr_pipe_nobody_reads_does_not_stop_the_server() {
    const THREADS: usize = 8;
    const EACH: usize = 625;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut child = Reaped(
        Command::new(server_bin())
            .args(["--listen", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(&data)
            .args(["--log-level", "debug"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn backupd"),
    );
    // Read up to the line naming the port (the kernel chose it: a port picked
    // beforehand could be taken meanwhile), then held open, not read until the end.
    let mut stderr = io::BufReader::new(child.0.stderr.take().unwrap());
    let mut addr = None;
    let mut line = String::new();
    while addr.is_none() && stderr.read_line(&mut line).is_ok_and(|n| n > 0) {
        addr = listen_address(&line);
        line.clear();
    }
    let addr = addr.expect("the server did not start listening");

    let answered = Arc::new(AtomicUsize::new(0));
    let floods: Vec<_> = (0..THREADS)
        .map(|t| {
            let answered = answered.clone();
            thread::spawn(move || {
                for i in 0..EACH {
                    let Ok(s) = connect_from(2 + t as u8, addr) else { continue };
                    let mut c = Client::from_stream(s, &quick()).unwrap();
                    if ask_cheap(&mut c, i).is_ok() {
                        answered.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    thread::sleep(Duration::from_millis(300));
    let no_log = || String::from("(standard error is not being read)");
    legit_at(addr, &data.join("files"), "during-stuck-log", no_log);
    for f in floods {
        f.join().unwrap();
    }
    let answered = answered.load(Ordering::Relaxed);
    assert_eq!(answered, THREADS * EACH, "only {answered} refusals were answered");
    legit_at(addr, &data.join("files"), "after-stuck-log", no_log);
    assert!(child.0.try_wait().unwrap().is_none(), "the server exited");

    // Reading again: the lines that could not be written are counted and reported.
    let (tx, rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 16];
        let mut seen = Vec::new();
        while let Ok(n) = stderr.read(&mut buf) {
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&seen).into_owned();
            if let Some(line) =
                text.lines().find(|l| l.contains("were dropped while the log output was blocked"))
            {
                let _ = tx.send(line.to_string());
                break;
            }
        }
    });
    // A request after the pipe moves again makes the writer thread write.
    let poke = || {
        let mut c = Client::connect(addr, &quick()).unwrap();
        let _ = ask_cheap(&mut c, 0);
    };
    let mut report = None;
    let reported = wait_until(Duration::from_secs(10), || {
        poke();
        report = rx.recv_timeout(Duration::from_millis(200)).ok();
        report.is_some()
    });
    assert!(reported, "no report of dropped log lines once the pipe was read again");
    // The count is of the lines lost: many here (each refusal logs, the
    // queue holds 4,096), not the one report line itself.
    let report = report.unwrap_or_default();
    let n: u64 = report.split(" [WARN] ").nth(1).and_then(|r| r.split(' ').next()?.parse().ok()).unwrap_or(0);
    assert!(n > 100, "{report}");
}

// ---------------------------------------------------------------------------
// Row 5: refused packets cost few replies and few log lines
// ---------------------------------------------------------------------------

/// Response codes read from `c` until a 1606 (the end marker), at most `limit` replies.
fn replies_until_1606(mut c: Client, limit: usize) -> Vec<ResponseCode> {
    let mut codes = Vec::new();
    while codes.len() < limit {
        match c.read_response() {
            Ok(Response::ReconnectDenied { .. }) => return codes,
            Ok(r) => codes.push(r.code()),
            Err(e) => panic!("after {} replies: {e}", codes.len()),
        }
    }
    codes
}

/// Send `packets` (then an end marker) on `c` while another thread reads the
/// replies; returns their codes.
fn send_counting_replies(mut c: Client, packets: impl Iterator<Item = Vec<u8>>) -> Vec<ResponseCode> {
    let reader = Client::from_stream(c.stream().try_clone().unwrap(), &quick()).unwrap();
    let counting = thread::spawn(move || replies_until_1606(reader, 200_000));
    let mut batch = Vec::with_capacity(1 << 20);
    for p in packets {
        batch.extend_from_slice(&p);
        if batch.len() >= 1 << 20 {
            c.send_raw(&batch).unwrap();
            batch.clear();
        }
    }
    batch.extend_from_slice(&frame(&BOGUS, Code::Reconnect, &[&name_field_raw(b"end")]));
    c.send_raw(&batch).unwrap();
    counting.join().unwrap()
}

/// 70,000 small packets refused from the first one: an upload whose packet 1
/// is over --max-file-size (from a client with a session), and packets from
/// a connection without a session numbered the way a field client numbers
/// them past 65,535 (wrapping). The legitimate client is served meanwhile;
/// replies and log lines stay few.
#[test]
fn packets_that_keep_being_refused_cost_few_replies_and_few_log_lines() {
    const PACKETS: usize = 70_000;
    let server = TestServer::start(&["--max-file-size", "1MiB"]);
    let addr = server.addr();
    let content = [0x33u8; 16];

    // A: a session; an upload of 65,535 packets refused at packet 1 (file too
    // large), then another of the remaining 4,465, refused the same way.
    let mut a = client_from(3, addr);
    let id = a.register("refused-uploader").unwrap();
    a.send_public_key("refused-uploader", test_key()).unwrap();
    let split = 65_535usize;
    let uploads = [("a.bin", split), ("b.bin", PACKETS - split)];
    let packets = uploads.into_iter().flat_map(move |(name, total)| {
        let nf = name_field_raw(name.as_bytes());
        (1..=total).map(move |n| packet_frame(&id, 16, 2 << 20, n as u16, total as u16, &nf, &content))
    });
    let legit_thread = thread::spawn(move || legit_flow(addr, "during-refusals-a"));
    let codes_a = send_counting_replies(a, packets);
    legit_thread.join().unwrap().expect("legitimate client during the refused uploads");

    // B: no session; packet numbers and totals taken modulo 2^16.
    let b = client_from(4, addr);
    let total = (PACKETS % 65_536) as u16;
    let nf = name_field_raw(b"wrapped.bin");
    let packets = (1..=PACKETS).map(move |n| packet_frame(&BOGUS, 16, 1000, n as u16, total, &nf, &content));
    let legit_thread = thread::spawn(move || legit_flow(addr, "during-refusals-b"));
    let codes_b = send_counting_replies(b, packets);
    legit_thread.join().unwrap().expect("legitimate client during the wrapped packets");

    let all_1607 = |codes: &[ResponseCode]| codes.iter().all(|&c| c == ResponseCode::GeneralError);
    assert!(all_1607(&codes_a) && all_1607(&codes_b), "replies other than 1607");
    println!(
        "replies to {PACKETS} refused packets: {} (refused uploads in sequence), {} (no session, wrapped numbers)",
        codes_a.len(),
        codes_b.len()
    );
    assert_eq!(codes_a.len(), 2, "one 1607 per refused upload");
    // Log lines caused by each attacker: a burst, then a few a second and a
    // "suppressed" count (wait for the last one).
    thread::sleep(Duration::from_millis(1500));
    let log = server.log_text();
    for host in ["127.0.0.3", "127.0.0.4"] {
        let n = lines_with(&log, host);
        assert!(n < 200, "{n} log lines for {host}:\n{}", tail(&log, 20));
    }
    legit(&server, "after-refusals");
}

// ---------------------------------------------------------------------------
// Row 6: out of descriptors, a queued connection is served once they free up
// ---------------------------------------------------------------------------

/// With the descriptors exhausted (RLIMIT_NOFILE 64, per-address caps off),
/// a client queues behind 100 held connections and sends its 1025. The held
/// connections close; no new connection arrives after that, yet the queued
/// client is accepted, answered, and uploads.
#[test]
fn a_connection_queued_while_descriptors_ran_out_is_served_when_they_free_up() {
    let caps_off = ["--max-connections-per-ip", "0", "--max-unauthenticated-per-ip", "0"];
    let server = TestServer::start_with(&caps_off, Launch::with_rlimit(libc::RLIMIT_NOFILE, 64), |_| {});
    let addr = server.addr();
    let held: Vec<TcpStream> =
        (0..100).map(|_| TcpStream::connect_timeout(&addr, IO_TIMEOUT).unwrap()).collect();
    server.wait_for_log("out of file descriptors", Duration::from_secs(10));
    let mut queued = Client::connect(addr, &quick()).unwrap();
    queued.send_raw(&frame(&[0; 16], Code::Register, &[&name_field_raw(b"queued")])).unwrap();
    thread::sleep(Duration::from_millis(300));
    drop(held);
    let id = match queued.read_response() {
        Ok(Response::RegistrationOk { id }) => id,
        other => panic!("the queued client: {other:?}; log tail:\n{}", tail(&server.log_text(), 30)),
    };
    queued.set_id(id);
    queued.send_public_key("queued", test_key()).unwrap();
    let data = pseudo_random(FILE_LEN, 6);
    assert!(queued.upload_bytes("q.bin", &data, &UploadOptions::default()).unwrap().cksum_matches());
    queued.crc_ok("q.bin").unwrap();
    assert_eq!(std::fs::read(server.stored_path(&id, "q.bin")).unwrap(), data);
    legit(&server, "after-descriptors");
}

// ---------------------------------------------------------------------------
// Row 7: registrations are limited
// ---------------------------------------------------------------------------

/// 5,000 registrations at once from 127.0.0.2 (ten connections, 500 pipelined
/// each): the burst of 100 and the rate of 10/s are granted, the rest get
/// 1601, and the refusals cost a few log lines a second. Another address
/// registers meanwhile, and the legitimate client uploads.
#[test]
fn a_registration_burst_from_one_address_is_rate_limited() {
    const CONNS: usize = 10;
    const EACH: usize = 500;
    let server = TestServer::start(&[]);
    let addr = server.addr();
    let started = Instant::now();
    let burst: Vec<_> = (0..CONNS)
        .map(|t| {
            thread::spawn(move || {
                let mut c = client_from(2, addr);
                let mut w = c.stream().try_clone().unwrap();
                let writer = thread::spawn(move || {
                    let reqs: Vec<u8> = (0..EACH)
                        .flat_map(|i| {
                            let name = format!("burst-{t}-{i}");
                            frame(&[0; 16], Code::Register, &[&name_field_raw(name.as_bytes())])
                        })
                        .collect();
                    w.write_all(&reqs).unwrap();
                });
                let mut ok = 0;
                for i in 0..EACH {
                    match c.read_response() {
                        Ok(Response::RegistrationOk { .. }) => ok += 1,
                        Ok(Response::RegistrationFailed) => {}
                        other => panic!("registration {t}/{i}: {other:?}"),
                    }
                }
                writer.join().unwrap();
                ok
            })
        })
        .collect();
    thread::sleep(Duration::from_millis(100));
    let mut elsewhere = client_from(3, addr);
    elsewhere.register("from-another-address").expect("another address registers during the burst");
    legit(&server, "during-registration-burst");
    let ok: usize = burst.into_iter().map(|t| t.join().unwrap()).sum();
    let secs = started.elapsed().as_secs_f64().ceil();
    println!("{ok} of {} registrations granted in about {secs} s", CONNS * EACH);
    assert!(ok >= 100, "the burst of 100 was not granted: {ok}");
    let most = 100 + (10.0 * (secs + 1.0)) as usize;
    assert!(ok <= most, "{ok} registrations granted (at most {most} in {secs} s)");
    let suppressed = wait_until(Duration::from_secs(3), || {
        server
            .log_text()
            .lines()
            .any(|l| l.contains("127.0.0.2: ") && l.contains("similar line(s) suppressed"))
    });
    assert!(suppressed, "no \"suppressed\" line for 127.0.0.2");
    let log = server.log_text();
    // The refusals share the address's log allowance with its "registered"
    // lines: some or none of them are logged, the rest are counted as suppressed.
    let refusals = lines_with(&log, "over the rate of registrations");
    let lines = lines_with(&log, "127.0.0.2");
    println!("{lines} log lines for 127.0.0.2, {refusals} of them rate refusals");
    assert!(lines < 200, "{lines} log lines for 127.0.0.2 ({refusals} rate refusals)");
}

/// `--max-clients 5` with five clients that have their keys: the sixth
/// registration gets 1601 (and a log line); registered clients go on uploading.
#[test]
fn max_clients_refuses_the_next_registration() {
    let server = TestServer::start(&["--max-clients", "5"]);
    let addr = server.addr();
    let (mut first, id) = server.registered_client("client-1");
    let _others: Vec<_> = (2..=5).map(|i| server.registered_client(&format!("client-{i}"))).collect();
    let mut c = Client::connect(addr, &quick()).unwrap();
    let refused = c.register("client-6").unwrap_err();
    assert_eq!(refused.refusal_code(), Some(ResponseCode::RegistrationFailed), "{refused}");
    let mut other = client_from(2, addr);
    let refused = other.register("client-7").unwrap_err();
    assert_eq!(refused.refusal_code(), Some(ResponseCode::RegistrationFailed), "{refused}");
    server.wait_for_log("--max-clients (5) reached", IO_TIMEOUT);
    assert_eq!(lines_with(&server.log_text(), "reclaimed client"), 0, "a client with a key was reclaimed");
    let data = pseudo_random(FILE_LEN, 5);
    assert!(first.upload_bytes("f.bin", &data, &UploadOptions::default()).unwrap().cksum_matches());
    first.crc_ok("f.bin").unwrap();
    assert_eq!(std::fs::read(server.stored_path(&id, "f.bin")).unwrap(), data);
}

/// `backupd ARGS --data-dir DATA` on the server's data directory: exit 0.
fn admin_ok(server: &TestServer, args: &[&str]) -> String {
    let data = server.data_dir();
    let mut all: Vec<&std::ffi::OsStr> = args.iter().map(std::ffi::OsStr::new).collect();
    all.extend([std::ffi::OsStr::new("--data-dir"), data.as_os_str()]);
    let run = run_admin(&all, &[], Duration::from_secs(60));
    assert_eq!(run.code, 0, "backupd {args:?}: {run:?}");
    run.stdout
}

/// The names `backupd clients --json` lists, sorted (read beside the
/// running server, or with it stopped).
fn client_names(server: &TestServer) -> Vec<String> {
    let list = json(&admin_ok(server, &["clients", "--json"]));
    let mut names: Vec<String> = list.arr().iter().map(|c| c["name"].str().to_string()).collect();
    names.sort();
    names
}

/// Register `name` on a new connection, retrying on 1601 until `IO_TIMEOUT`
/// (the server sees a closed registration connection a moment after it closes).
fn register_when_room(server: &TestServer, name: &str) -> (Client, ClientId) {
    let mut got = None;
    let ok = wait_until(IO_TIMEOUT, || {
        let mut c = Client::connect(server.addr(), &quick()).unwrap();
        match c.register(name) {
            Ok(id) => got = Some((c, id)),
            Err(e) => assert_eq!(e.refusal_code(), Some(ResponseCode::RegistrationFailed), "{e}"),
        }
        got.is_some()
    });
    assert!(ok, "{name} never registered:\n{}", tail(&server.log_text(), 20));
    got.unwrap()
}

/// Keyless registrations (the connection closed before its 1026) do not hold
/// `--max-clients` forever: at the limit, a new name takes the place of the
/// oldest of them, whose row is deleted for good (across a restart too); the
/// newcomer sends its key and stores a file. One who was reclaimed and comes
/// back registers again, with a new id.
#[test]
fn keyless_registrations_are_reclaimed_at_max_clients_oldest_first() {
    let mut server = TestServer::start(&["--max-clients", "3"]);
    let addr = server.addr();
    let mut idle = Vec::new();
    for i in 1..=3 {
        let mut c = client_from(2, addr);
        idle.push(c.register(&format!("idle-{i}")).unwrap());
        // Closed before its key.
    }
    let (mut newcomer, id) = register_when_room(&server, "newcomer");
    newcomer.send_public_key("newcomer", test_key()).unwrap();
    let data = pseudo_random(FILE_LEN, 77);
    assert!(newcomer.upload_bytes("new.bin", &data, &UploadOptions::default()).unwrap().cksum_matches());
    newcomer.crc_ok("new.bin").unwrap();
    assert_eq!(std::fs::read(server.stored_path(&id, "new.bin")).unwrap(), data);
    server.wait_for_log(&format!("reclaimed client {} \"idle-1\"", id_hex(&idle[0])), IO_TIMEOUT);
    assert_eq!(client_names(&server), ["idle-2", "idle-3", "newcomer"]);
    drop(newcomer);

    server.stop();
    assert_eq!(client_names(&server), ["idle-2", "idle-3", "newcomer"], "the reclaimed row came back");
    server.restart();
    // idle-2 is now the oldest keyless registration (the order is on record).
    let (mut back, again) = register_when_room(&server, "idle-1");
    assert_ne!(again, idle[0], "a reclaimed client registers again as a new one");
    back.send_public_key("idle-1", test_key()).unwrap();
    server.wait_for_log(&format!("reclaimed client {} \"idle-2\"", id_hex(&idle[1])), IO_TIMEOUT);
    assert_eq!(client_names(&server), ["idle-1", "idle-3", "newcomer"]);
    let mut c = Client::connect(server.addr(), &quick()).unwrap();
    c.reconnect(id, "newcomer", test_key()).unwrap();
    assert_eq!(std::fs::read(server.stored_path(&id, "new.bin")).unwrap(), data);
    legit_at(server.addr(), &server.files_dir(), "after-reclaims", || server.log_text());
    server.stop();
    assert_eq!(client_names(&server), ["after-reclaims", "idle-1", "newcomer"]);
}

/// Empty folders left under files/ for a keyless registration (say, after
/// start-up moved a hand-placed file out to orphans/) are nothing stored: the
/// registration is reclaimed all the same.
#[test]
fn empty_folders_do_not_keep_a_keyless_registration_from_its_reclaim() {
    let mut server = TestServer::start(&["--max-clients", "1"]);
    let mut c = client_from(2, server.addr());
    let idle = c.register("idle").unwrap();
    drop(c);
    server.stop();
    std::fs::create_dir_all(server.files_dir().join(id_hex(&idle)).join("docs").join("old")).unwrap();
    server.restart();
    let (mut newcomer, _) = register_when_room(&server, "newcomer");
    newcomer.send_public_key("newcomer", test_key()).unwrap();
    server.wait_for_log(&format!("reclaimed client {} \"idle\"", id_hex(&idle)), IO_TIMEOUT);
}

/// What is never reclaimed at `--max-clients`: a keyless registration whose
/// connection is still open, a client whose key an operator reset
/// (`backupd reset-key`) and that has files, and one with a file row from an
/// older server (`Verified=0`), which the worker finds in the database. With
/// nothing else, a new name gets 1601; once one of the open registrations
/// closes, that one is reclaimed.
#[test]
fn open_registrations_and_clients_with_files_are_not_reclaimed() {
    let mut server = TestServer::start(&["--max-clients", "3", "--login-timeout", "10min"]);
    let (mut stored, stored_id) = server.registered_client("stored");
    let data = pseudo_random(FILE_LEN, 78);
    assert!(stored.upload_bytes("kept.bin", &data, &UploadOptions::default()).unwrap().cksum_matches());
    stored.crc_ok("kept.bin").unwrap();
    drop(stored);
    let mut c = Client::connect(server.addr(), &quick()).unwrap();
    let old_row = c.register("old-row").unwrap();
    drop(c);
    server.stop();
    admin_ok(&server, &["reset-key", "stored"]);
    let db = rusqlite::Connection::open(server.db_path()).unwrap();
    db.execute(
        "INSERT INTO files(ID, FileName, PathName, Verified) VALUES (?1, 'aborted.bin', ?2, 0)",
        rusqlite::params![&old_row[..], format!("files/{}/aborted.bin", id_hex(&old_row))],
    )
    .unwrap();
    drop(db);
    server.restart();

    // At the limit: "stored" (files, no key), "old-row" (a file row) and one open registration.
    let mut open = Client::connect(server.addr(), &quick()).unwrap();
    let open_id = open.register("open").unwrap();
    for name in ["newcomer-1", "newcomer-2"] {
        let mut c = client_from(2, server.addr());
        let refused = c.register(name).unwrap_err();
        assert_eq!(refused.refusal_code(), Some(ResponseCode::RegistrationFailed), "{name}: {refused}");
    }
    server.wait_for_log(
        &format!("client {} is not reclaimed: it has a key or a file row", id_hex(&old_row)),
        IO_TIMEOUT,
    );
    server.wait_for_log("--max-clients (3) reached", IO_TIMEOUT);
    assert_eq!(lines_with(&server.log_text(), "reclaimed client"), 0);
    assert_eq!(client_names(&server), ["old-row", "open", "stored"]);

    drop(open);
    let (mut newcomer, _) = register_when_room(&server, "newcomer-3");
    newcomer.send_public_key("newcomer-3", test_key()).unwrap();
    server.wait_for_log(&format!("reclaimed client {} \"open\"", id_hex(&open_id)), IO_TIMEOUT);
    assert_eq!(client_names(&server), ["newcomer-3", "old-row", "stored"]);
    assert_eq!(std::fs::read(server.stored_path(&stored_id, "kept.bin")).unwrap(), data);
}

// ---------------------------------------------------------------------------
// Names in the log, control frames while the budget is full
// ---------------------------------------------------------------------------

/// Names with control characters and bidirectional overrides, in 1025s and
/// in a file packet, appear escaped in the log: no peer can start a log line
/// or reorder one.
#[test]
fn peer_names_are_escaped_in_the_log() {
    let server = TestServer::start(&[]);
    let addr = server.addr();
    let forged = "2026-11-30T00:00:00Z [INFO] forged line";
    let mut c = Client::connect(addr, &quick()).unwrap();
    for raw in [format!("evil\n{forged}"), "\u{1b}[2Jcleared".to_string()] {
        c.send_raw(&frame(&[0; 16], Code::Register, &[&name_field_raw(raw.as_bytes())])).unwrap();
        expect_reply(&mut c, ResponseCode::GeneralError);
    }
    // Not a control character: a valid (if unwise) name, registered once.
    let bidi = "invoice\u{202e}fdp.exe";
    let (mut bidi_client, _) = server.registered_client(bidi);
    assert_eq!(c.register(bidi).unwrap_err().refusal_code(), Some(ResponseCode::RegistrationFailed));
    let nf = name_field_raw("x\u{202e}\n.bin".as_bytes());
    let id = bidi_client.id();
    bidi_client.send_raw(&packet_frame(&id, 16, 5, 1, 1, &nf, &[0; 16])).unwrap();
    expect_reply(&mut bidi_client, ResponseCode::GeneralError);
    // A stored name with invisible characters: every line naming it (the
    // debug line of the publish too) shows them escaped.
    let odd = "ok\u{2028}\u{200b}\u{feff}.bin";
    let up = bidi_client.upload_bytes(odd, b"odd name", &UploadOptions::default()).unwrap();
    assert!(up.cksum_matches(), "{up:?}");
    bidi_client.crc_ok(odd).unwrap();
    legit(&server, "beside-odd-names");
    server.wait_for_log("fdp.exe", IO_TIMEOUT);
    server.wait_for_log("ok\\u{2028}\\u{200b}\\u{feff}.bin\" for client", IO_TIMEOUT);
    let log = server.log_text();
    for raw in ['\u{202e}', '\u{1b}', '\u{2028}', '\u{200b}', '\u{feff}'] {
        assert!(!log.contains(raw), "raw control, bidi or format character {raw:?}:\n{log}");
    }
    assert!(!log.lines().any(|l| l.starts_with(forged)), "a peer forged a log line:\n{log}");
    assert!(log.contains("\\u{202e}"), "U+202E not shown escaped:\n{log}");
    assert!(log.contains(&format!("evil\\n{forged}")), "the newline not shown escaped:\n{log}");
    assert!(log.contains("\\u{1b}[2Jcleared"), "ESC not shown escaped:\n{log}");
}

/// Eight slow uploaders (a packet 1 and 10 bytes of its content each) hold
/// every content piece of a 32 KiB budget (under
/// `--max-connections` x 4 KiB, so its pieces are the 4 KiB floor and eight
/// connections fill it: the one way left to fill a budget by trickling) and
/// a ninth waits for one; meanwhile 1025, 1026, 1027, 1029, 1030 and 1031 of
/// other connections are answered. Once the slow ones go, the ninth gets its
/// 1603 and the legitimate client uploads.
#[test]
fn control_frames_are_answered_while_the_budget_is_full() {
    let server = TestServer::start(&["--memory-budget", "32KiB"]);
    let addr = server.addr();
    let mut slow = Vec::new();
    for i in 0..8 {
        let (mut c, id) = server.registered_client(&format!("slow-{i}"));
        // A few bytes of content: a piece is granted once content is there to read.
        let mut start = announced_packet(&id, 1 << 20, 4 << 20, 1, 4, "slow.bin");
        start.extend_from_slice(&[0u8; 10]);
        c.send_raw(&start).unwrap();
        slow.push(c);
    }
    let (mut ninth, id9) = server.registered_client("ninth");
    let key9 = *ninth.aes_key().unwrap();
    let data9 = pseudo_random(FILE_LEN, 9);
    let nf9 = name_field_raw(b"ninth.bin");
    ninth.send_raw(&packet_frames(&id9, &key9, &nf9, &data9, 1 << 16).concat()).unwrap();
    server.wait_for_log("ninth: waiting for memory budget", IO_TIMEOUT);

    let mut c = Client::connect(addr, &quick()).unwrap();
    let id = c.register("control").expect("1025 answered while the budget is full");
    c.send_public_key("control", test_key()).expect("1026 answered while the budget is full");
    let mut r = Client::connect(addr, &quick()).unwrap();
    r.reconnect(id, "control", test_key()).expect("1027 answered while the budget is full");
    let refused = |e: ClientError| e.refusal_code();
    assert_eq!(r.crc_ok("none.bin").map_err(refused), Err(Some(ResponseCode::GeneralError)));
    assert_eq!(r.crc_retry("none.bin", true).map_err(refused), Err(Some(ResponseCode::GeneralError)));
    assert_eq!(r.crc_abort("none.bin").map_err(refused), Err(Some(ResponseCode::GeneralError)));

    drop(slow);
    match ninth.read_response() {
        Ok(Response::FileReceived { .. }) => {}
        other => panic!("the waiting uploader: {other:?}"),
    }
    ninth.crc_ok("ninth.bin").unwrap();
    assert_eq!(std::fs::read(server.stored_path(&id9, "ninth.bin")).unwrap(), data9);
    legit(&server, "after-full-budget");
}

/// Between a registration's 1600 and its 1026 the client has no key; the
/// id is in clear in the 1600. Issue 8: "a client's public key is set only
/// on the connection that registered it", even while it has none yet.
#[test]
fn a_key_is_set_only_on_the_registration_connection_even_before_the_first() {
    let server = TestServer::start(&[]);
    let addr = server.addr();
    let mut registrant = Client::connect(addr, &quick()).unwrap();
    let id = registrant.register("newcomer").unwrap();
    let attacker_key = rsa::RsaPrivateKey::new(&mut rand::rngs::OsRng, 1024).unwrap();
    let mut attacker = client_from(2, addr);
    attacker.set_id(id);
    match attacker.send_public_key("newcomer", &attacker_key) {
        Err(e) if e.refusal_code() == Some(ResponseCode::GeneralError) => {}
        other => panic!("a 1026 from another connection must be refused with 1607, got {other:?}"),
    }
    registrant.send_public_key("newcomer", test_key()).unwrap();
    drop(registrant);
    let mut again = Client::connect(addr, &quick()).unwrap();
    again.reconnect(id, "newcomer", test_key()).expect("the registrant reconnects with its own key");
}

/// A client whose registration connection closed before its 1026 has no key
/// and can never reconnect; the key rule above must not strand it. Its name
/// may be registered again (same id) once no registration connection of it is
/// open; while one is, the name is taken.
#[test]
fn a_registration_without_a_key_resumes_by_name_once_its_connection_is_gone() {
    let server = TestServer::start(&[]);
    let addr = server.addr();
    let mut first = Client::connect(addr, &quick()).unwrap();
    let id = first.register("halfway").unwrap();
    let mut other = client_from(2, addr);
    match other.register("halfway") {
        Err(e) if e.refusal_code() == Some(ResponseCode::RegistrationFailed) => {}
        r => panic!("the name is taken while its registration connection is open: {r:?}"),
    }
    drop(first);
    let resumed = wait_until(IO_TIMEOUT, || {
        let mut c = Client::connect(addr, &quick()).unwrap();
        match c.register("halfway") {
            Ok(again) => {
                assert_eq!(again, id, "the registration resumes with the same id");
                c.send_public_key("halfway", test_key()).unwrap();
                true
            }
            Err(_) => false,
        }
    });
    assert!(resumed, "the registration never resumed:\n{}", tail(&server.log_text(), 20));
    let mut c = Client::connect(addr, &quick()).unwrap();
    c.reconnect(id, "halfway", test_key()).unwrap();
    // With a key on file, the name is taken for good.
    let mut late = Client::connect(addr, &quick()).unwrap();
    assert_eq!(late.register("halfway").unwrap_err().refusal_code(), Some(ResponseCode::RegistrationFailed));
}

/// One who knows a client's id and name can reconnect (1605) and send
/// ciphertext it cannot make; one such upload in 256 would decrypt to a valid
/// padding and replace the client's file. Each decryption failure costs the
/// client a token: past 10, the session ends and reconnects are refused for a
/// while, so forging a file takes days instead of milliseconds.
#[test]
fn uploads_that_fail_to_decrypt_cost_the_client_its_reconnects() {
    let server = TestServer::start(&[]);
    let (mut victim, id) = server.registered_client("victim");
    let data = pseudo_random(FILE_LEN, 41);
    assert!(victim.upload_bytes("doc.bin", &data, &UploadOptions::default()).unwrap().cksum_matches());
    victim.crc_ok("doc.bin").unwrap();
    drop(victim);
    let mut forger = client_from(3, server.addr());
    forger.send_raw(&frame(&id, Code::Reconnect, &[&name_field_raw(b"victim")])).unwrap();
    assert_eq!(forger.read_response().unwrap().code(), ResponseCode::ReconnectOk);
    // 16 bytes of ciphertext for an empty file: it decrypts only if all 16
    // plaintext bytes are 0x10, so every try fails.
    let mut failures = 0;
    for i in 0..12u8 {
        let packet = packet_frame(&id, 16, 0, 1, 1, &name_field_raw(b"doc.bin"), &[i; 16]);
        forger.send_raw(&packet).unwrap();
        assert_eq!(forger.read_response().unwrap().code(), ResponseCode::GeneralError);
        failures += 1;
    }
    assert_eq!(failures, 12);
    server.wait_for_log("failed to decrypt", IO_TIMEOUT);
    // The session is gone from the forger's connection, and reconnects are refused.
    let packet = packet_frame(&id, 16, 0, 1, 1, &name_field_raw(b"doc.bin"), &[0; 16]);
    forger.send_raw(&packet).unwrap();
    assert_eq!(forger.read_response().unwrap().code(), ResponseCode::GeneralError);
    let mut again = client_from(4, server.addr());
    again.send_raw(&frame(&id, Code::Reconnect, &[&name_field_raw(b"victim")])).unwrap();
    assert_eq!(again.read_response().unwrap().code(), ResponseCode::ReconnectDenied);
    // The file is untouched.
    assert_eq!(std::fs::read(server.stored_path(&id, "doc.bin")).unwrap(), data);
    // The victim itself is not locked out: the address it set its key from
    // has its own tokens, which the forger did not spend.
    victim_uploads_from(1, &server, id, "after-forgery.bin");
}

/// The victim of forged uploads keeps its sessions from an address it has
/// proven itself from by uploads (two that decrypted, in one session), even
/// after a restart forgot the address it registered from; a forger elsewhere
/// spends only the tokens that all other addresses share.
#[test]
fn forged_uploads_do_not_lock_a_client_out_of_an_address_it_uploads_from() {
    let mut server = TestServer::start(&[]);
    let (victim, id) = server.registered_client("victim");
    drop(victim);
    server.restart();
    // From 127.0.0.5: one session with two uploads that decrypt.
    let mut home = client_from(5, server.addr());
    home.reconnect(id, "victim", test_key()).unwrap();
    for name in ["a.bin", "b.bin"] {
        let data = pseudo_random(FILE_LEN, 43);
        assert!(home.upload_bytes(name, &data, &UploadOptions::default()).unwrap().cksum_matches());
        home.crc_ok(name).unwrap();
    }
    drop(home);
    let mut forger = client_from(3, server.addr());
    forger.send_raw(&frame(&id, Code::Reconnect, &[&name_field_raw(b"victim")])).unwrap();
    assert_eq!(forger.read_response().unwrap().code(), ResponseCode::ReconnectOk);
    for i in 0..12u8 {
        let packet = packet_frame(&id, 16, 0, 1, 1, &name_field_raw(b"a.bin"), &[i; 16]);
        forger.send_raw(&packet).unwrap();
        assert_eq!(forger.read_response().unwrap().code(), ResponseCode::GeneralError);
    }
    server.wait_for_log("failed to decrypt", IO_TIMEOUT);
    // An address the client has not proven itself from (127.0.0.1, which it
    // registered from before the restart, included) is refused meanwhile ...
    for host in [1, 6] {
        let mut elsewhere = client_from(host, server.addr());
        elsewhere.send_raw(&frame(&id, Code::Reconnect, &[&name_field_raw(b"victim")])).unwrap();
        assert_eq!(
            elsewhere.read_response().unwrap().code(),
            ResponseCode::ReconnectDenied,
            "127.0.0.{host}"
        );
    }
    // ... the one it uploads from is not.
    victim_uploads_from(5, &server, id, "c.bin");
}

/// Client "victim" reconnects from 127.0.0.`host` and stores `name`.
fn victim_uploads_from(host: u8, server: &TestServer, id: ClientId, name: &str) {
    let mut c = client_from(host, server.addr());
    c.reconnect(id, "victim", test_key()).unwrap_or_else(|e| panic!("reconnect from 127.0.0.{host}: {e}"));
    let data = pseudo_random(FILE_LEN, 47);
    assert!(c.upload_bytes(name, &data, &UploadOptions::default()).unwrap().cksum_matches());
    c.crc_ok(name).unwrap();
    assert_eq!(std::fs::read(server.stored_path(&id, name)).unwrap(), data);
}

/// A flood of reconnects (1027) from one address, for a client of its own:
/// each 1605 costs the loop an RSA encryption, so the address gets its
/// `--session-burst` and then `--session-rate`, the rest 1606 with a
/// rate-limited log line. Another address's client is served meanwhile.
#[test]
fn a_reconnect_flood_from_one_address_is_rate_limited() {
    const CONNS: usize = 4;
    const EACH: usize = 500;
    let server = TestServer::start(&["--session-rate", "5", "--session-burst", "20"]);
    let addr = server.addr();
    let mut own = client_from(2, addr);
    let id = own.register("flooder").unwrap();
    own.send_public_key("flooder", test_key()).unwrap(); // the first of its 20
    let started = Instant::now();
    let flood: Vec<_> = (0..CONNS)
        .map(|_| {
            thread::spawn(move || {
                let mut c = client_from(2, addr);
                let mut w = c.stream().try_clone().unwrap();
                let writer = thread::spawn(move || {
                    let req = frame(&id, Code::Reconnect, &[&name_field_raw(b"flooder")]);
                    w.write_all(&req.repeat(EACH)).unwrap();
                });
                let mut ok = 0;
                for i in 0..EACH {
                    match c.read_response() {
                        Ok(Response::ReconnectOk { .. }) => ok += 1,
                        Ok(Response::ReconnectDenied { .. }) => {}
                        other => panic!("reconnect {i}: {other:?}"),
                    }
                }
                writer.join().unwrap();
                ok
            })
        })
        .collect();
    legit(&server, "during-reconnect-flood");
    let ok: usize = flood.into_iter().map(|t| t.join().unwrap()).sum();
    let secs = started.elapsed().as_secs_f64().ceil();
    println!("{ok} of {} reconnects granted in about {secs} s", CONNS * EACH);
    assert!(ok >= 19, "the burst was not granted: {ok}");
    let most = 19 + (5.0 * (secs + 1.0)) as usize;
    assert!(ok <= most, "{ok} reconnects granted (at most {most} in {secs} s)");
    let refused = wait_until(Duration::from_secs(3), || {
        server.log_text().contains("reconnect denied: over the rate of session keys for this address")
    });
    assert!(refused, "no refusal line:\n{}", tail(&server.log_text(), 20));
    // Another address is not limited by it.
    let mut other = client_from(3, addr);
    other.register("elsewhere").unwrap();
    other.send_public_key("elsewhere", test_key()).expect("another address gets its session key");
}

/// A flood of new connections that never send a byte, at a full table: each
/// evicts the oldest connection that has got least far. A client between its
/// registration (1600) and its key keeps its slot (1600s are rate-limited per
/// address, so a flood cannot make its own); its key is then accepted.
#[test]
fn a_connection_flood_does_not_evict_a_client_between_1600_and_its_key() {
    let server = TestServer::start(&["--max-connections", "8"]);
    let addr = server.addr();
    let mut c = Client::connect(addr, &quick()).unwrap();
    c.register("slow-keygen").unwrap();
    let mut silent = Vec::new();
    for _ in 0..24 {
        silent.push(connect_from(2, addr).unwrap());
        thread::sleep(Duration::from_millis(20));
    }
    server.wait_for_log("evicted: the connection table is full", IO_TIMEOUT);
    c.send_public_key("slow-keygen", test_key()).expect("the registering client kept its slot");
    let data = pseudo_random(3000, 1);
    let up = c.upload_bytes("kept.bin", &data, &UploadOptions::default()).unwrap();
    assert!(up.cksum_matches(), "{up:?}");
    drop(silent);
}

/// Reconnects (1027 -> 1605) churned from several addresses at a full
/// table, each a session that costs nothing: a client on its way to its
/// first upload, slow between its steps (a real round-trip time, key
/// generation), keeps its slot: its 1600 and its 1602 keep it for the login
/// timeout, while the churn evicts its own connections. Before, it was the
/// oldest connection without upload progress and went first.
#[test]
fn a_reconnect_churn_does_not_evict_a_client_logging_in() {
    let server = TestServer::start(&["--max-connections", "8"]);
    let addr = server.addr();
    let (registration, rid) = server.registered_client("churn");
    drop(registration);
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let churn = thread::spawn(move || {
        let mut held = std::collections::VecDeque::new();
        let mut i = 0u8;
        while !stop2.load(Ordering::Relaxed) {
            i = i.wrapping_add(1);
            let Ok(s) = connect_from(2 + i % 4, addr) else { continue };
            let Ok(mut c) = Client::from_stream(s, &quick()) else { continue };
            if c.reconnect(rid, "churn", test_key()).is_ok() {
                held.push_back(c);
            }
            if held.len() > 16 {
                held.pop_front();
            }
            thread::sleep(Duration::from_millis(10));
        }
    });
    server.wait_for_log("evicted: the connection table is full", IO_TIMEOUT);
    let pause = Duration::from_millis(400);
    // A brand-new connection, before its 1025 is read, is like any of the
    // churn's: evicted if it is the oldest such (for microseconds). A
    // client connects again then; what is tested is what follows.
    let mut c = (0..3)
        .find_map(|_| {
            let mut c = Client::connect(addr, &quick()).ok()?;
            c.register("slow-client").ok().map(|_| c)
        })
        .expect("three connections evicted before their 1600");
    thread::sleep(pause);
    let key = c.send_public_key("slow-client", test_key()).map_err(|e| e.to_string());
    thread::sleep(pause);
    let data = pseudo_random(FILE_LEN, 77);
    let up = key.and_then(|_| {
        c.upload_bytes("kept.bin", &data, &UploadOptions::default()).map_err(|e| e.to_string())
    });
    stop.store(true, Ordering::Relaxed);
    churn.join().unwrap();
    let up = up.unwrap_or_else(|e| {
        panic!("the client logging in lost its slot: {e}\n{}", tail(&server.log_text(), 30))
    });
    assert!(up.cksum_matches(), "{up:?}");
    c.crc_ok("kept.bin").unwrap();
    assert!(server.log_text().matches("evicted: the connection table is full").count() >= 8);
}

/// Connections refused at accept are logged at most once a second with a
/// count; those counted after the last line are reported a second later
/// even when no further refusal comes: every refusal is counted once.
#[test]
fn refusals_at_accept_are_all_counted_in_the_log() {
    let server = TestServer::start(&["--max-connections-per-ip", "2", "--max-unauthenticated-per-ip", "0"]);
    let addr = server.addr();
    let held: Vec<TcpStream> = (0..2).map(|_| connect_from(2, addr).unwrap()).collect();
    let refused: Vec<TcpStream> = (0..10).filter_map(|_| connect_from(2, addr).ok()).collect();
    assert_eq!(refused.len(), 10);
    let counted = |log: &str| -> u64 {
        log.lines()
            .filter_map(|l| {
                if let Some(i) = l.find(" refused since last report") {
                    l[..i].rsplit(' ').next()?.parse::<u64>().ok()
                } else if let Some(i) = l.find(" more connection(s) refused at accept") {
                    l[..i].rsplit(' ').next()?.parse::<u64>().ok()
                } else {
                    None
                }
            })
            .sum()
    };
    let all = wait_until(Duration::from_secs(5), || counted(&server.log_text()) >= 10);
    assert!(all, "counted {} of 10:\n{}", counted(&server.log_text()), tail(&server.log_text(), 20));
    thread::sleep(Duration::from_millis(1200));
    assert_eq!(counted(&server.log_text()), 10, "{}", tail(&server.log_text(), 20));
    drop((held, refused));
}

/// The other side of the login protection: connections that each register
/// a new name (every one "logging in") fill the table and keep coming; they
/// evict one another, never a client that has uploaded, which uploads on.
#[test]
fn registrations_that_fill_the_table_do_not_evict_an_uploader() {
    let server = TestServer::start(&["--max-connections", "6"]);
    let addr = server.addr();
    let (mut uploader, _) = server.registered_client("uploader");
    let data = pseudo_random(FILE_LEN, 41);
    assert!(uploader.upload_bytes("u1", &data, &UploadOptions::default()).unwrap().cksum_matches());
    uploader.crc_ok("u1").unwrap();
    let mut held = Vec::new();
    for i in 0..20 {
        let mut c = client_from(2 + (i % 4) as u8, addr);
        if c.register(&format!("squatter-{i}")).is_ok() {
            held.push(c);
        }
    }
    server.wait_for_log("evicted: the connection table is full", IO_TIMEOUT);
    assert!(uploader.upload_bytes("u2", &data, &UploadOptions::default()).unwrap().cksum_matches());
    uploader.crc_ok("u2").unwrap();
    drop(held);
}
