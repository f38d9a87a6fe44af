//! A single-node Garage (https://garagehq.deuxfleurs.fr) for the S3 tests
//! and the bench: its own config, metadata and data folders in a temp
//! directory, free ports on 127.0.0.1, the layout applied, a key and a
//! bucket created. It can be stopped and started again on the same folders
//! and ports (the store "goes away and comes back"); it is killed on drop.
//!
//! The binary: `$GARAGE_BIN`, else `$GARAGE_ROOT/bin/garage`, else
//! `$HOME/.cache/backupd/garage/bin/garage` (where `make garage` installs
//! it), else `garage` on the PATH. `make test-s3` builds it when missing.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::bucket::Bucket;

/// How long Garage gets to start (or restart) and answer S3 requests.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

pub struct Garage {
    bin: PathBuf,
    dir: tempfile::TempDir,
    child: Option<Child>,
    log: Arc<Mutex<String>>,
    pub s3_port: u16,
    pub rpc_port: u16,
    /// The bucket, the region and the key that may read and write it.
    pub bucket: Bucket,
}

/// Where the Garage binary is, or why there is none.
pub fn garage_bin() -> Result<PathBuf, String> {
    let mut tried = Vec::new();
    let mut candidates = Vec::new();
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    if let Some(b) = var("GARAGE_BIN") {
        candidates.push(PathBuf::from(b));
    }
    if let Some(r) = var("GARAGE_ROOT") {
        candidates.push(Path::new(&r).join("bin/garage"));
    }
    if let Some(h) = var("HOME") {
        candidates.push(Path::new(&h).join(".cache/backupd/garage/bin/garage"));
    }
    for c in candidates {
        if c.is_file() {
            return Ok(c);
        }
        tried.push(c.display().to_string());
    }
    if let Ok(out) =
        Command::new("garage").arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status()
    {
        if out.success() {
            return Ok(PathBuf::from("garage"));
        }
    }
    tried.push("garage on the PATH".into());
    Err(format!(
        "no Garage binary (tried {}): run `make garage` (cargo install --locked garage) or set GARAGE_BIN",
        tried.join(", ")
    ))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port on 127.0.0.1")
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut buf);
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

impl Garage {
    /// Start a fresh single-node Garage; panics (the tests fail, they do not
    /// skip) when the binary is missing or Garage does not come up.
    pub fn start() -> Garage {
        match Garage::try_start() {
            Ok(g) => g,
            Err(e) => panic!("Garage: {e}"),
        }
    }

    /// [`start`](Self::start), the reason as an error (the bench skips on it).
    pub fn try_start() -> Result<Garage, String> {
        let bin = garage_bin()?;
        let dir = tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?;
        let (s3_port, rpc_port) = (free_port(), free_port());
        let region = "garage".to_string();
        let config = format!(
            "metadata_dir = \"{meta}\"\n\
             data_dir = \"{data}\"\n\
             db_engine = \"sqlite\"\n\
             replication_factor = 1\n\
             rpc_bind_addr = \"127.0.0.1:{rpc_port}\"\n\
             rpc_public_addr = \"127.0.0.1:{rpc_port}\"\n\
             rpc_secret = \"{secret}\"\n\
             \n\
             [s3_api]\n\
             api_bind_addr = \"127.0.0.1:{s3_port}\"\n\
             s3_region = \"{region}\"\n\
             root_domain = \".s3.garage.localhost\"\n",
            meta = dir.path().join("meta").display(),
            data = dir.path().join("data").display(),
            secret = random_hex(32),
        );
        std::fs::write(dir.path().join("garage.toml"), config)
            .map_err(|e| format!("write garage.toml: {e}"))?;
        let bucket = Bucket {
            host: format!("127.0.0.1:{s3_port}"),
            bucket: "backupd-test".into(),
            region,
            key_id: format!("GK{}", random_hex(12)),
            secret: random_hex(32),
        };
        let mut g = Garage { bin, dir, child: None, log: Arc::default(), s3_port, rpc_port, bucket };
        g.spawn()?;
        g.setup()?;
        Ok(g)
    }

    /// `http://127.0.0.1:PORT`, the S3 endpoint.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.s3_port)
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("garage.toml")
    }

    /// What Garage printed so far.
    pub fn log_text(&self) -> String {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    fn spawn(&mut self) -> Result<(), String> {
        let mut child = Command::new(&self.bin)
            .arg("-c")
            .arg(self.config_path())
            .arg("server")
            .env("RUST_LOG", "garage=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", self.bin.display()))?;
        if let Some(stderr) = child.stderr.take() {
            let log = self.log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    if let Ok(mut l) = log.lock() {
                        l.push_str(&line);
                        l.push('\n');
                    }
                }
            });
        }
        self.child = Some(child);
        Ok(())
    }

    /// Run `garage -c CONFIG ARGS`; its stdout, or the error with its output.
    pub fn cli(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new(&self.bin)
            .arg("-c")
            .arg(self.config_path())
            .args(args)
            .env("RUST_LOG", "garage=warn")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("run garage {args:?}: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "garage {args:?}: {}\n{}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Layout, key and bucket on a fresh node.
    fn setup(&mut self) -> Result<(), String> {
        let end = Instant::now() + READY_TIMEOUT;
        // The node answers RPC once `garage status` works.
        let mut last = String::new();
        while let Err(e) = self.cli(&["status"]) {
            self.check_alive()?;
            if Instant::now() > end {
                return Err(format!(
                    "garage did not answer `garage status` within {READY_TIMEOUT:?}: {e}\n{last}"
                ));
            }
            last = e;
            std::thread::sleep(Duration::from_millis(100));
        }
        let id = self.cli(&["node", "id", "-q"])?;
        let node = id.trim().split('@').next().unwrap_or("").to_string();
        if node.is_empty() {
            return Err(format!("garage node id printed {id:?}"));
        }
        self.cli(&["layout", "assign", "-z", "dc1", "-c", "1G", &node])?;
        self.cli(&["layout", "apply", "--version", "1"])?;
        let b = self.bucket.clone();
        self.cli(&["key", "import", "--yes", "-n", "backupd-test", &b.key_id, &b.secret])?;
        self.cli(&["bucket", "create", &b.bucket])?;
        self.cli(&["bucket", "allow", "--read", "--write", "--owner", &b.bucket, "--key", &b.key_id])?;
        self.wait_ready(end)
    }

    /// Wait until a signed request on the bucket succeeds.
    fn wait_ready(&mut self, end: Instant) -> Result<(), String> {
        while !self.bucket.ready() {
            self.check_alive()?;
            if Instant::now() > end {
                return Err(format!(
                    "the bucket did not answer within {READY_TIMEOUT:?}; log:\n{}",
                    self.log_text()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    fn check_alive(&mut self) -> Result<(), String> {
        if let Some(c) = self.child.as_mut() {
            if let Ok(Some(status)) = c.try_wait() {
                self.child = None;
                return Err(format!("garage server exited ({status}); log:\n{}", self.log_text()));
            }
        }
        Ok(())
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// SIGTERM, and SIGKILL if it is still there after 10 s. The folders stay.
    pub fn stop(&mut self) {
        let Some(mut c) = self.child.take() else { return };
        unsafe {
            libc::kill(c.id() as i32, libc::SIGTERM);
        }
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end {
            if let Ok(Some(_)) = c.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        let _ = c.wait();
    }

    /// SIGKILL (a crash). The folders stay.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start again on the same folders and ports, and wait until the bucket answers.
    pub fn restart(&mut self) {
        self.kill();
        let end = Instant::now() + READY_TIMEOUT;
        let r = self.spawn().and_then(|_| self.wait_ready(end));
        if let Err(e) = r {
            panic!("Garage restart: {e}");
        }
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        self.kill();
    }
}
