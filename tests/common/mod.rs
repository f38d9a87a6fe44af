//! Shared harness for end-to-end tests: runs the real `backupd` binary on
//! 127.0.0.1 with a free port and a temp data directory, captures its log,
//! and offers registered clients.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use backupd::client::{Client, ClientOptions};
use backupd::protocol::{id_hex, ClientId};
use rsa::RsaPrivateKey;

/// A running backupd process. Killed on drop.
pub struct TestServer {
    child: Option<Child>,
    addr: SocketAddr,
    dir: tempfile::TempDir,
    args: Vec<String>,
    log: Arc<Mutex<String>>,
}

/// Path of the server binary under test.
pub fn server_bin() -> &'static str {
    env!("CARGO_BIN_EXE_backupd")
}

fn spawn(data_dir: &Path, listen: &str, args: &[String], log: Arc<Mutex<String>>) -> (Child, SocketAddr) {
    let mut child = Command::new(server_bin())
        .arg("--listen")
        .arg(listen)
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--log-level")
        .arg("debug")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn backupd");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if let Some(pos) = line.find("listening on ") {
                if let Some(t) = tx.take() {
                    let _ = t.send(line[pos + 13..].trim().to_string());
                }
            }
            let mut l = log.lock().unwrap();
            l.push_str(&line);
            l.push('\n');
        }
    });
    let addr = match rx.recv_timeout(Duration::from_secs(20)) {
        Ok(a) => a.parse().expect("listen address"),
        Err(_) => {
            let _ = child.kill();
            panic!("backupd did not start listening within 20 s");
        }
    };
    (child, addr)
}

impl TestServer {
    /// Start on 127.0.0.1 with a free port and a fresh data directory.
    pub fn start(extra_args: &[&str]) -> TestServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let args: Vec<String> = extra_args.iter().map(|s| s.to_string()).collect();
        let log = Arc::new(Mutex::new(String::new()));
        let (child, addr) = spawn(&dir.path().join("data"), "127.0.0.1:0", &args, log.clone());
        TestServer { child: Some(child), addr, dir, args, log }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The temp directory holding the data directory (and room for test files).
    pub fn temp_dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn files_dir(&self) -> PathBuf {
        self.data_dir().join("files")
    }

    pub fn db_path(&self) -> PathBuf {
        self.data_dir().join("backupd.db")
    }

    /// Where a client's verified file is stored.
    pub fn stored_path(&self, id: &ClientId, name: &str) -> PathBuf {
        self.files_dir().join(id_hex(id)).join(name)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Everything the server logged so far.
    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Wait until the log contains `needle` (or panic after `timeout`).
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if self.log_text().contains(needle) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("log never showed {needle:?}; log:\n{}", self.log_text());
    }

    /// Send a signal to the server process.
    pub fn signal(&self, sig: i32) {
        if let Some(c) = &self.child {
            unsafe {
                libc::kill(c.id() as i32, sig);
            }
        }
    }

    /// SIGTERM and wait (up to 30 s) for the exit status.
    pub fn stop(&mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        self.wait(Duration::from_secs(30))
    }

    /// Wait for the process to exit; kill it past `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("server running");
        let end = Instant::now() + timeout;
        loop {
            if let Some(s) = child.try_wait().expect("try_wait") {
                return s;
            }
            if Instant::now() > end {
                let _ = child.kill();
                let s = child.wait().expect("wait");
                panic!("server did not exit within {timeout:?} (killed: {s:?})");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILL (a crash) and reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start again on the same port and data directory (after stop or kill).
    pub fn restart(&mut self) {
        if self.child.is_some() {
            self.kill();
        }
        let listen = self.addr.to_string();
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            // The port can stay busy for a moment after a kill.
            let probe = std::net::TcpListener::bind(self.addr);
            if probe.is_ok() || Instant::now() > end {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let (child, addr) = spawn(&self.data_dir(), &listen, &self.args, self.log.clone());
        self.child = Some(child);
        self.addr = addr;
    }

    /// Connect a client library instance (short timeouts for tests).
    pub fn connect(&self) -> Client {
        Client::connect(self.addr, &test_client_options()).expect("connect")
    }

    /// Connect, register `name` and exchange keys: ready to upload.
    pub fn registered_client(&self, name: &str) -> (Client, ClientId) {
        let mut c = self.connect();
        let id = c.register(name).expect("register");
        c.send_public_key(name, test_key()).expect("public key");
        (c, id)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn test_client_options() -> ClientOptions {
    ClientOptions {
        connect_timeout: Duration::from_secs(5),
        read_timeout: Duration::from_secs(30),
        ..ClientOptions::default()
    }
}

/// One 1024-bit RSA key shared by the tests of a process (key generation is slow).
pub fn test_key() -> &'static RsaPrivateKey {
    static KEY: OnceLock<RsaPrivateKey> = OnceLock::new();
    KEY.get_or_init(|| RsaPrivateKey::new(&mut rand::rngs::OsRng, 1024).expect("rsa keygen"))
}

/// Deterministic pseudo-random bytes (xorshift), fast enough for large files.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// The `cksum(1)` of a file, from the real command.
pub fn cksum_cmd(path: &Path) -> u32 {
    let out = Command::new("cksum").arg(path).output().expect("run cksum");
    let s = String::from_utf8_lossy(&out.stdout);
    s.split_whitespace().next().expect("cksum output").parse().expect("cksum number")
}

/// Every regular file below `dir`, recursively.
pub fn walk_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else { return out };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk_files(&p));
        } else {
            out.push(p);
        }
    }
    out
}
