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
    launch: Launch,
}

/// Path of the server binary under test.
pub fn server_bin() -> &'static str {
    env!("CARGO_BIN_EXE_backupd")
}

fn spawn(
    data_dir: &Path,
    listen: &str,
    args: &[String],
    log: Arc<Mutex<String>>,
    launch: &Launch,
) -> (Child, SocketAddr) {
    let mut cmd = Command::new(server_bin());
    if let Some(tweak) = &launch.tweak {
        tweak(&mut cmd);
    }
    let mut child = cmd
        .arg("--listen")
        .arg(listen)
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--log-level")
        .arg(launch.log_level)
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
            let Ok(mut line) = line else { break };
            line.push('\n');
            if let Some(addr) = listen_address(&line) {
                if let Some(t) = tx.take() {
                    let _ = t.send(addr);
                }
            }
            log.lock().unwrap().push_str(&line);
        }
    });
    let addr = match rx.recv_timeout(Duration::from_secs(20)) {
        Ok(a) => a,
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
        TestServer::start_with(extra_args, Launch::default(), |_| {})
    }

    /// [`start`](Self::start) with control over the launch: `launch` is kept
    /// for [`restart`](Self::restart); `prepare` runs once with the temp
    /// directory before the server starts (e.g. to mount a tmpfs on `<temp>/data`).
    pub fn start_with(extra_args: &[&str], launch: Launch, prepare: impl FnOnce(&Path)) -> TestServer {
        let dir = tempfile::tempdir().expect("tempdir");
        prepare(dir.path());
        let args: Vec<String> = extra_args.iter().map(|s| s.to_string()).collect();
        let log = Arc::new(Mutex::new(String::new()));
        let (child, addr) = spawn(&dir.path().join("data"), "127.0.0.1:0", &args, log.clone(), &launch);
        TestServer { child: Some(child), addr, dir, args, log, launch }
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
        let (child, addr) = spawn(&self.data_dir(), &listen, &self.args, self.log.clone(), &self.launch);
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

// ---------------------------------------------------------------------------
// Raw frames, replies, sockets and the database (for flow and refusal tests)
// ---------------------------------------------------------------------------

/// A 255-byte name field: `raw` followed by zeros. `raw` may hold anything,
/// including bytes after a NUL; 255 non-NUL bytes make an unterminated field.
pub fn name_field_raw(raw: &[u8]) -> [u8; backupd::protocol::NAME_FIELD_LEN] {
    let mut f = [0u8; backupd::protocol::NAME_FIELD_LEN];
    f[..raw.len()].copy_from_slice(raw);
    f
}

/// A request header with arbitrary fields (framing tests).
pub fn raw_header(id: &ClientId, version: u8, code: u16, payload_size: u32) -> Vec<u8> {
    backupd::protocol::RequestHeader { client_id: *id, version, code, payload_size }.encode().to_vec()
}

/// A whole request frame: header (version 3, size from the parts) and payload.
pub fn frame(id: &ClientId, code: backupd::protocol::Code, parts: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    backupd::protocol::encode_frame(id, code, parts, &mut out);
    out
}

/// A 1028 frame with every field given explicitly.
pub fn packet_frame(
    id: &ClientId,
    content_size: u32,
    orig_file_size: u32,
    packet_number: u16,
    total_packets: u16,
    name: &[u8; backupd::protocol::NAME_FIELD_LEN],
    content: &[u8],
) -> Vec<u8> {
    let mut fixed = Vec::with_capacity(backupd::protocol::PACKET_HEADER_LEN);
    fixed.extend_from_slice(&content_size.to_le_bytes());
    fixed.extend_from_slice(&orig_file_size.to_le_bytes());
    fixed.extend_from_slice(&packet_number.to_le_bytes());
    fixed.extend_from_slice(&total_packets.to_le_bytes());
    fixed.extend_from_slice(name);
    frame(id, backupd::protocol::Code::FilePacket, &[&fixed, content])
}

/// The whole-file ciphertext of `data` under `key` cut into `packet_size` pieces,
/// as 1028 frames with `content_size` = the piece's length (convention 1).
pub fn packet_frames(
    id: &ClientId,
    key: &[u8; 32],
    name: &[u8; backupd::protocol::NAME_FIELD_LEN],
    data: &[u8],
    packet_size: usize,
) -> Vec<Vec<u8>> {
    let ct = backupd::crypto::encrypt_all(key, data);
    let total = ct.chunks(packet_size).count() as u16;
    ct.chunks(packet_size)
        .enumerate()
        .map(|(i, p)| packet_frame(id, p.len() as u32, data.len() as u32, i as u16 + 1, total, name, p))
        .collect()
}

/// The frames of a per-chunk client (convention 3): each `chunk`-byte read
/// encrypted on its own (its own zero IV and padding), `orig_file_size` and
/// `content_size` its own sizes, reading until EOF, so a file whose size is
/// a multiple of `chunk` ends with an encrypted EMPTY chunk numbered n+1
/// "of n" (and an empty file is packet 1 of 0). Numbers and the total are
/// u16, wrapping past 65,535 as the field's clients do.
pub fn per_chunk_frames(
    id: &ClientId,
    key: &[u8; 32],
    field: &[u8; backupd::protocol::NAME_FIELD_LEN],
    data: &[u8],
    chunk: usize,
) -> Vec<u8> {
    let chunks: Vec<&[u8]> = data.chunks(chunk).collect();
    let n = chunks.len() as u16;
    let mut out = Vec::new();
    for (i, piece) in chunks.iter().chain([&[][..]].iter()).enumerate() {
        if i == chunks.len() && !data.len().is_multiple_of(chunk) {
            break; // a short last chunk: no empty one follows
        }
        let ct = backupd::crypto::encrypt_all(key, piece);
        out.extend(packet_frame(id, ct.len() as u32, piece.len() as u32, (i + 1) as u16, n, field, &ct));
    }
    out
}

/// Read one reply and check its code (panics with the reply otherwise).
pub fn expect_reply(c: &mut Client, code: backupd::protocol::ResponseCode) -> backupd::protocol::Response {
    match c.read_response() {
        Ok(r) if r.code() == code => r,
        Ok(r) => panic!("expected {code:?}, got {r:?}"),
        Err(e) => panic!("expected {code:?}, got error: {e}"),
    }
}

/// Assert that the peer closes `stream` within `within`: a read returns 0 or
/// fails with something other than a timeout. Bytes that arrive first are
/// returned (callers usually expect none).
pub fn assert_closed(stream: &std::net::TcpStream, within: Duration) -> Vec<u8> {
    use std::io::Read;
    let end = Instant::now() + within;
    let mut extra = Vec::new();
    let mut s = stream;
    let mut buf = [0u8; 4096];
    loop {
        let left = end.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "connection still open after {within:?} (read {} bytes)", extra.len());
        s.set_read_timeout(Some(left.max(Duration::from_millis(10)))).unwrap();
        match s.read(&mut buf) {
            Ok(0) => return extra,
            Ok(n) => extra.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                panic!("connection still open after {within:?} (read {} bytes)", extra.len())
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return extra, // reset: closed too
        }
    }
}

/// Poll `f` every 20 ms until it returns true or `timeout` passes; returns its last answer.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The `Verified` column of the files row (id, name), opening the database read-only.
/// None when there is no such row.
pub fn db_verified(db: &Path, id: &ClientId, name: &str) -> Option<i64> {
    use rusqlite::OptionalExtension;
    let conn = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .expect("open database read-only");
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    conn.query_row("SELECT Verified FROM files WHERE ID=?1 AND FileName=?2", (&id[..], name), |r| r.get(0))
        .optional()
        .expect("query files")
}

/// The address of the server's "listening on ADDR" line in `log`, once that
/// line is complete (a log file may be read while the line is written).
/// Servers listen on port 0 and are reached there: a port picked beforehand
/// and released (see [`free_port`]) can be taken by a parallel test meanwhile.
pub fn listen_address(log: &str) -> Option<SocketAddr> {
    let (_, rest) = log.split_once("listening on ")?;
    rest.split_once('\n')?.0.trim().parse().ok()
}

/// A free TCP port on 127.0.0.1 (bound, then released): only for what cannot
/// listen on port 0 and say where (a parallel test can take it meanwhile).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The outcome of one admin command (`backupd clients`, `restore`, ...).
pub struct AdminRun {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl std::fmt::Debug for AdminRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit {}\n--- stdout\n{}--- stderr\n{}", self.code, self.stdout, self.stderr)
    }
}

/// Run `backupd ARGS` with exactly the BACKUPD_* and AWS_* variables in
/// `env` (none from outside); killed (and the test failed) past `timeout`.
pub fn run_admin(args: &[&std::ffi::OsStr], env: &[(&str, &Path)], timeout: Duration) -> AdminRun {
    run_admin_in(None, args, env, timeout)
}

/// [`run_admin`] in the working directory `cwd` (None: the test's own).
pub fn run_admin_in(
    cwd: Option<&Path>,
    args: &[&std::ffi::OsStr],
    env: &[(&str, &Path)],
    timeout: Duration,
) -> AdminRun {
    let mut cmd = Command::new(server_bin());
    if let Some(dir) = cwd {
        cmd.current_dir(dir);
    }
    for (k, _) in std::env::vars_os() {
        let name = k.to_string_lossy();
        if name.starts_with("BACKUPD_") || name.starts_with("AWS_") {
            cmd.env_remove(&k);
        }
    }
    let child = cmd
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn backupd");
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = match rx.recv_timeout(timeout) {
        Ok(out) => out.expect("wait for backupd"),
        Err(_) => {
            unsafe {
                libc::kill(pid as i32, libc::SIGKILL);
            }
            panic!("backupd {args:?} did not finish within {timeout:?}");
        }
    };
    AdminRun {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A `backupd` process started with exactly `args` in `cwd` (no harness flags),
/// its standard error captured. Killed on drop.
pub struct RawServer {
    child: Option<Child>,
    log: Arc<Mutex<String>>,
}

impl RawServer {
    pub fn spawn(cwd: &Path, args: &[&std::ffi::OsStr]) -> RawServer {
        let mut cmd = Command::new(server_bin());
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("BACKUPD_") {
                cmd.env_remove(k);
            }
        }
        let mut child = cmd
            .current_dir(cwd)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn backupd");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(String::new()));
        let l2 = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let mut l = l2.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        RawServer { child: Some(child), log }
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// The exit status if the process ends within `timeout`, else None (still running).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut().expect("running");
        let end = Instant::now() + timeout;
        loop {
            if let Some(s) = child.try_wait().expect("try_wait") {
                // Let the stderr reader catch the last lines.
                std::thread::sleep(Duration::from_millis(100));
                return Some(s);
            }
            if Instant::now() > end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for RawServer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

// ---------------------------------------------------------------------------
// Launch control, liveness and process sampling (hostile, fault and security tests)
// ---------------------------------------------------------------------------

/// A change made to the server's command before it is spawned.
pub type CommandTweak = Arc<dyn Fn(&mut Command) + Send + Sync>;

/// How [`TestServer::start_with`] launches the server process.
#[derive(Clone)]
pub struct Launch {
    /// Value of `--log-level` (the harness default is `debug`).
    pub log_level: &'static str,
    /// Applied to the command before every spawn (start and restart): resource
    /// limits or a umask through `CommandExt::pre_exec`, environment variables.
    pub tweak: Option<CommandTweak>,
}

impl Default for Launch {
    fn default() -> Self {
        Launch { log_level: "debug", tweak: None }
    }
}

impl Launch {
    /// The default launch with one resource limit set in the server process.
    pub fn with_rlimit(resource: libc::__rlimit_resource_t, limit: u64) -> Launch {
        use std::os::unix::process::CommandExt;
        let tweak = move |cmd: &mut Command| {
            // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    let lim = libc::rlimit { rlim_cur: limit, rlim_max: limit };
                    if libc::setrlimit(resource, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        };
        Launch { tweak: Some(Arc::new(tweak)), ..Launch::default() }
    }
}

impl TestServer {
    /// Is the server process still alive (`kill(pid, 0)` succeeds and it is no zombie)?
    pub fn is_alive(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => {
                c.try_wait().map(|s| s.is_none()).unwrap_or(false)
                    && unsafe { libc::kill(c.id() as i32, 0) } == 0
            }
            None => false,
        }
    }

    /// The staging directory `<data>/tmp`.
    pub fn tmp_dir(&self) -> PathBuf {
        self.data_dir().join("tmp")
    }

    /// Temp files without a name the server holds (small uploads being
    /// received or waiting for their 1029): its descriptors of files in
    /// tmp/ that have no name there (`/proc/PID/fd` shows `tmp/#<inode> (deleted)`).
    pub fn unnamed_temps(&self) -> usize {
        let tmp = self.tmp_dir();
        let Ok(rd) = std::fs::read_dir(format!("/proc/{}/fd", self.pid())) else { return 0 };
        rd.flatten()
            .filter_map(|e| std::fs::read_link(e.path()).ok())
            .filter(|t| t.starts_with(&tmp) && t.to_string_lossy().ends_with(" (deleted)"))
            .count()
    }

    /// Each thread of the server: (thread id, name, scheduler state), the
    /// state being the letter of `/proc/PID/task/TID/stat`: `R` running or
    /// runnable, `S` asleep (in `epoll_wait`, on a channel or a timer), `D` in
    /// uninterruptible I/O, ... Threads that end while being read are skipped.
    pub fn thread_states(&self) -> Vec<(u32, String, char)> {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{}/task", self.pid())) else { return Vec::new() };
        let mut states = Vec::new();
        for task in tasks.flatten() {
            let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else { continue };
            let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else { continue };
            let tid = stat[..open].trim().parse().unwrap_or(0);
            let state = stat[close + 1..].trim_start().chars().next().unwrap_or('?');
            states.push((tid, stat[open + 1..close].to_string(), state));
        }
        states
    }

    /// How many descriptors the server process has open (`/proc/PID/fd`).
    pub fn open_descriptors(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid())).map(|d| d.count()).unwrap_or(0)
    }

    /// CPU time (user + system) the server process has used so far.
    pub fn cpu_time(&self) -> Duration {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).expect("read /proc/PID/stat");
        // Fields after the parenthesised command name: state is field 3, utime 14, stime 15.
        let rest = &stat[stat.rfind(')').expect("stat format") + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
        Duration::from_millis(ticks * 1000 / hz.max(1))
    }
}

// ---------------------------------------------------------------------------
// JSON of the --json outputs (serde_json: one reader for every test)
// ---------------------------------------------------------------------------

/// One JSON document (the whole text), or a panic that shows it.
pub fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text:?}"))
}

/// The value of `key` in the JSON object `obj` as text: a string as it is,
/// anything else as JSON (`3`, `true`, `null`).
pub fn json_field(obj: &str, key: &str) -> String {
    match json(obj).get(key) {
        None => panic!("no {key} in {obj}"),
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(v) => v.to_string(),
    }
}

/// Short accessors that panic with the value when it is not of the kind asked.
pub trait JsonExt {
    fn arr(&self) -> &[serde_json::Value];
    fn str(&self) -> &str;
    fn num(&self) -> u64;
}

impl JsonExt for serde_json::Value {
    fn arr(&self) -> &[serde_json::Value] {
        self.as_array().unwrap_or_else(|| panic!("not an array: {self}"))
    }
    fn str(&self) -> &str {
        self.as_str().unwrap_or_else(|| panic!("not a string: {self}"))
    }
    fn num(&self) -> u64 {
        self.as_u64().unwrap_or_else(|| panic!("not a number: {self}"))
    }
}

/// Mount a tmpfs of `size` (e.g. "4m") on `dir`: false when this process
/// cannot (not root, or no mount here). Unmount with `umount`.
pub fn mount_tmpfs(dir: &Path, size: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    root && Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700"), "tmpfs"])
        .arg(dir)
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Unmounts (lazily) a tmpfs that [`mount_tmpfs`] mounted, when dropped.
pub struct Unmount<'a>(pub &'a Path);

impl Drop for Unmount<'_> {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.0).status();
    }
}
