//! The server process: the release `backupd` started afresh for a scenario,
//! its log, its arguments and its stop.

use std::collections::VecDeque;
use std::fs;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::cli::Opts;
use crate::confine::Confinement;
use crate::machine::cmd_out;
use crate::usage::status_kib;
use crate::Res;

#[derive(Default)]
pub(crate) struct LogTail {
    lines: VecDeque<String>,
    warn: u64,
    error: u64,
    /// The last WARN or ERROR line, shown with the counts.
    last_bad: Option<String>,
}

pub(crate) struct Server {
    child: Option<Child>,
    pub(crate) pid: u32,
    pub(crate) addr: SocketAddr,
    pub(crate) data_dir: PathBuf,
    log: Arc<Mutex<LogTail>>,
}

impl Server {
    /// Start `bin`, confined as `confine` says if it is given.
    pub(crate) fn start(
        bin: &Path,
        data_dir: &Path,
        extra: &[String],
        confine: Option<&Confinement>,
    ) -> Res<Server> {
        if !bin.is_file() {
            return Err(format!(
                "server binary {} not found: run `cargo build --release --bin backupd` or pass --server-bin",
                bin.display()
            ));
        }
        // The address comes from the "listening on" line, logged at INFO on
        // standard error. With a quieter --log-level, or a --log-file, the
        // harness picks a free port itself instead.
        let quiet_log = hides_info(extra) || extra.iter().any(|a| a.starts_with("--log-file"));
        let listen = if quiet_log {
            let l = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("free port: {e}"))?;
            l.local_addr().map_err(|e| e.to_string())?.to_string()
        } else {
            "127.0.0.1:0".to_string()
        };
        let mut child = confine
            .map_or_else(|| Command::new(bin), |c| c.command(bin))
            .args(start_args(&listen, data_dir, extra))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        let pid = child.id();
        if let Some(Err(e)) = confine.map(|c| c.adopt(pid)) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(e);
        }
        let stderr = child.stderr.take().ok_or("no stderr pipe")?;
        let log = Arc::new(Mutex::new(LogTail::default()));
        let (tx, rx) = mpsc::channel();
        let log2 = log.clone();
        thread::spawn(move || read_log(stderr, &log2, tx));
        let mut server = Server {
            child: Some(child),
            pid,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            data_dir: data_dir.to_path_buf(),
            log,
        };
        if quiet_log {
            return server.wait_accepting(&listen);
        }
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(a) => {
                server.addr = a.parse().map_err(|_| format!("cannot parse listen address {a:?}"))?;
                Ok(server)
            }
            Err(_) => {
                server.kill();
                Err(format!("backupd did not report 'listening on' within 30 s; log:\n{}", server.log_tail()))
            }
        }
    }

    /// Wait (up to 30 s) until the server accepts connections on `listen`.
    fn wait_accepting(mut self, listen: &str) -> Res<Server> {
        let addr: SocketAddr = listen.parse().map_err(|_| format!("bad address {listen}"))?;
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(30) {
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                self.addr = addr;
                return Ok(self);
            }
            if self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(Some(_)))) {
                break;
            }
            thread::sleep(Duration::from_millis(20));
        }
        self.kill();
        Err(format!("backupd did not accept connections on {addr}; log:\n{}", self.log_tail()))
    }

    pub(crate) fn log_tail(&self) -> String {
        self.log.lock().map(|t| t.lines.iter().cloned().collect::<Vec<_>>().join("\n")).unwrap_or_default()
    }

    pub(crate) fn log_counts(&self) -> (u64, u64) {
        self.log.lock().map(|t| (t.warn, t.error)).unwrap_or((0, 0))
    }

    /// The last WARN or ERROR line the server logged.
    pub(crate) fn last_bad_line(&self) -> Option<String> {
        self.log.lock().ok().and_then(|t| t.last_bad.clone())
    }

    pub(crate) fn rss_kib(&self) -> Option<u64> {
        status_kib(self.pid, "VmRSS")
    }

    pub(crate) fn hwm_kib(&self) -> Option<u64> {
        status_kib(self.pid, "VmHWM")
    }

    /// Reset the peak RSS (VmHWM) to the current RSS (Linux clear_refs 5).
    pub(crate) fn reset_peak(&self) -> bool {
        fs::write(format!("/proc/{}/clear_refs", self.pid), "5").is_ok()
    }

    /// SIGTERM, then wait up to 30 s. Returns the exit code and the time taken.
    pub(crate) fn stop(&mut self) -> (Option<i32>, f64) {
        let t0 = Instant::now();
        let Some(mut child) = self.child.take() else { return (None, 0.0) };
        // SAFETY: signalling our own child process by its pid.
        unsafe {
            libc::kill(self.pid as libc::pid_t, libc::SIGTERM);
        }
        while t0.elapsed() < Duration::from_secs(30) {
            if let Ok(Some(st)) = child.try_wait() {
                return (st.code(), t0.elapsed().as_secs_f64());
            }
            thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        let _ = child.wait();
        (None, t0.elapsed().as_secs_f64())
    }

    pub(crate) fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The started server's arguments: the address, the data directory, the
/// harness's defaults unless given with --server-arg (clap refuses a flag
/// twice), then the --server-args.
fn start_args(listen: &str, data_dir: &Path, extra: &[String]) -> Vec<String> {
    let mut args: Vec<String> =
        vec!["--listen".into(), listen.to_string(), "--data-dir".into(), data_dir.display().to_string()];
    for (flag, v) in [("--max-connections", "2000"), ("--idle-timeout", "30m")] {
        if !extra.iter().any(|a| a == flag || a.starts_with(&format!("{flag}="))) {
            args.push(flag.into());
            args.push(v.into());
        }
    }
    args.extend(extra.iter().cloned());
    args
}

/// The server's standard error: the last 40 lines and the counts of warnings
/// and errors into `log`, the address of the "listening on" line to `tx`.
fn read_log(stderr: ChildStderr, log: &Mutex<LogTail>, tx: mpsc::Sender<String>) {
    let mut tx = Some(tx);
    for l in BufReader::new(stderr).lines() {
        let Ok(l) = l else { break };
        if let Some(pos) = l.find("listening on ") {
            if let Some(t) = tx.take() {
                let _ = t.send(l[pos + 13..].trim().to_string());
            }
        }
        let Ok(mut t) = log.lock() else { break };
        t.warn += u64::from(l.contains("[WARN]"));
        t.error += u64::from(l.contains("[ERROR]"));
        if l.contains("[WARN]") || l.contains("[ERROR]") {
            t.last_bad = Some(l.clone());
        }
        t.lines.push_back(l);
        if t.lines.len() > 40 {
            t.lines.pop_front();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The server's arguments for one scenario: `--server-arg`s, plus what the
/// scenario needs. Scenario 3 connects and registers its idle clients from
/// one address (as a site behind a NAT would), so the per-address caps and
/// the registration and session-key rates are turned off there, when the
/// binary has them.
/// Scenario 4 runs the server's own defaults for the connection table and
/// the idle timeout in place of the harness's (see [`Server::start`]).
pub(crate) fn run_server_args(o: &Opts, run: &str) -> Vec<String> {
    let given = |flag: &str| o.server_args.iter().any(|a| a == flag || a.starts_with(&format!("{flag}=")));
    let wanted: &[(&str, &str)] = match run {
        // Many clients from one address stand for many boxes: the per-address caps are lifted.
        "idle" | "small_many" => &[
            ("--max-connections-per-ip", "0"),
            ("--max-unauthenticated-per-ip", "0"),
            ("--registration-rate", "0"),
            ("--session-rate", "0"),
        ],
        "attack" => &[("--max-connections", "256"), ("--idle-timeout", "60s")],
        _ => &[],
    };
    let help = if wanted.is_empty() {
        String::new()
    } else {
        cmd_out(&o.server_bin.display().to_string(), &["--help"]).unwrap_or_default()
    };
    let mut args: Vec<String> = wanted
        .iter()
        .filter(|(flag, _)| !given(flag) && help.contains(flag))
        .map(|(flag, v)| format!("{flag}={v}"))
        .collect();
    args.extend(o.server_args.iter().cloned());
    args
}

/// Whether the server arguments set a log level that hides INFO lines.
pub(crate) fn hides_info(args: &[String]) -> bool {
    let mut level = None;
    for (i, a) in args.iter().enumerate() {
        if a == "--log-level" {
            level = args.get(i + 1).cloned();
        } else if let Some(v) = a.strip_prefix("--log-level=") {
            level = Some(v.to_string());
        }
    }
    level.is_some_and(|l| matches!(l.to_ascii_lowercase().as_str(), "off" | "error" | "warn"))
}

pub(crate) fn count_files(dir: &Path) -> usize {
    let Ok(rd) = fs::read_dir(dir) else { return 0 };
    rd.flatten()
        .map(|e| {
            let p = e.path();
            if p.is_dir() {
                count_files(&p)
            } else {
                1
            }
        })
        .sum()
}
