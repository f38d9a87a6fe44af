//! `make bench`: the load generator of issue 5.
//!
//! Drives the release `backupd` binary (or, with `--target HOST:PORT`, any
//! running protocol-v3 server) through the crate's client library, measures
//! this machine's limits in the same run, and prints every server figure next
//! to the limit that bounds it. Every figure also goes to
//! `target/bench/results.json`. See docs/PERFORMANCE.md.
//!
//! Run: `cargo bench --bench load -- [--quick] [--scenario small,large,idle,attack,limits] ...`
//! (`--help` lists the flags). Under `cargo test` (no `--bench` argument) only
//! the harness's own self-checks run.
//!
//! The load side is kept cheap, since it shares the cores with the server:
//! every payload is encrypted once per session and sent from reused buffers.
//! Large files are built so that they cost one 1 MiB buffer whatever their
//! size: the ciphertext is chosen first (one random 1 MiB period repeated,
//! plus a final block made to decrypt to a full padding block) and the
//! plaintext it decrypts to, which is periodic too, is only checksummed. Each
//! packet frame is then the same buffer with its packet number patched.

use std::collections::{HashMap, VecDeque};
use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Barrier, Mutex};
use std::thread;
use std::time::{Duration, Instant};

#[path = "../tests/common/mod.rs"]
mod common;

/// Scenario 4, small files under attack: its own file to keep this one short.
#[path = "load/attack.rs"]
mod attack;

use backupd::client::{Client, ClientOptions, UploadOptions};
use backupd::crypto::{self, Cksum, StreamDecryptor, AES_KEY_LEN};
use backupd::json::json_str;
use backupd::protocol::{
    ClientId, Code, NameField, PacketHeader, RequestHeader, Response, PACKET_HEADER_LEN, REQUEST_HEADER_LEN,
    VERSION,
};
use common::pseudo_random;
use rsa::RsaPrivateKey;

type Res<T> = Result<T, String>;

const MIB: u64 = 1 << 20;
/// Packet size of the large scenarios, and the period of their ciphertext.
const PERIOD: usize = 1 << 20;
/// Offset of the packet_number field in a 1028 frame.
const PACKET_NUMBER_AT: usize = REQUEST_HEADER_LEN + 8;

// ---------------------------------------------------------------------------
// Options
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scn {
    Small,
    Large,
    Idle,
    Attack,
    Limits,
}

#[derive(Debug, Clone)]
struct Opts {
    quick: bool,
    scenarios: Vec<Scn>,
    rounds: usize,
    small_count: usize,
    small_clients: usize,
    small_size: usize,
    large_mib: u64,
    multi_clients: usize,
    multi_mib: u64,
    idle_clients: usize,
    /// Seconds of each quiet and each attack phase of scenario 4.
    attack_secs: u64,
    /// Which of scenario 4's kinds of attackers run (slow, slots, refusals, registrations).
    attack_kinds: [bool; 4],
    // Limits.
    tcp_mib: u64,
    pipeline_mib: u64,
    fsync_files: usize,
    seq_mib: u64,
    limit_iters: usize,
    target: Option<String>,
    server_bin: PathBuf,
    server_args: Vec<String>,
    keep_data: bool,
    wait_quiet: u64,
}

impl Opts {
    fn defaults(quick: bool) -> Opts {
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
        let common = Opts {
            quick,
            scenarios: vec![Scn::Limits, Scn::Small, Scn::Large, Scn::Idle, Scn::Attack],
            rounds: 3,
            small_count: 10_000,
            small_clients: 16,
            small_size: 4096,
            large_mib: 1024,
            multi_clients: 4,
            multi_mib: 256,
            idle_clients: 1000,
            attack_secs: 15,
            attack_kinds: [true; 4],
            tcp_mib: 2048,
            pipeline_mib: 256,
            fsync_files: 1000,
            seq_mib: 1024,
            limit_iters: 5,
            target: None,
            server_bin: manifest.join("target/release/backupd"),
            server_args: Vec::new(),
            keep_data: false,
            wait_quiet: 0,
        };
        if !quick {
            return common;
        }
        Opts {
            rounds: 2,
            small_count: 1000,
            large_mib: 128,
            multi_mib: 32,
            idle_clients: 250,
            attack_secs: 5,
            tcp_mib: 256,
            pipeline_mib: 64,
            fsync_files: 200,
            seq_mib: 128,
            limit_iters: 3,
            ..common
        }
    }
}

const HELP: &str = "\
load: backupd load benchmark (issue 5). Run via `cargo bench --bench load -- FLAGS`.

  --quick                 everything small (about a minute)
  --scenario LIST         comma-separated: small,large,idle,attack,limits (or all) [all]
  --rounds N              timed rounds per scenario [3; quick 2]
  --small-count N         files per small-file round [10000; quick 1000]
  --small-clients N       concurrent small-file clients [16]
  --small-size BYTES      small file size [4096]
  --large-mib N           size of the single large file, MiB (1 MiB packets) [1024; quick 128]
  --multi-clients N       clients of the parallel large uploads [4]
  --multi-mib N           file size per parallel client, MiB [256; quick 32]
  --idle-clients N        idle connected (registered) clients [1000; quick 250]
  --attack-secs N         attack scenario: seconds of each quiet and each attack phase
                          (--rounds of each, alternating) [15; quick 5]
  --attack-kinds LIST     attackers of the attack scenario, 8 of each kind: comma-separated
                          slow,slots,refusals,registrations (or all) [all]
  --tcp-mib N             loopback TCP limit: MiB sent per iteration [2048; quick 256]
  --pipeline-mib N        decrypt+cksum limit: MiB per iteration [256; quick 64]
  --fsync-files N         files per fsync-limit iteration [1000; quick 200]
  --seq-mib N             sequential write+fsync limit: MiB [1024; quick 128]
  --limit-iters N         iterations of each limit [5; quick 3]
  --target HOST:PORT      drive an already running protocol-v3 server (client-side figures only)
  --server-bin PATH       backupd binary to start [target/release/backupd]
  --server-arg ARG        extra argument for the started server (repeatable)
  --keep-data             keep the servers' data directories (target/bench/data-PID-SCENARIO)
  --wait-quiet SECS       before the limits and each scenario, wait up to SECS for the rest of
                          the machine to use < 0.25 cores (shared machines) [0: don't wait]
";

fn parse_num<T: std::str::FromStr>(s: &str, flag: &str) -> Res<T> {
    s.trim().parse().map_err(|_| format!("{flag}: invalid number {s:?}"))
}

fn parse_scenarios(s: &str) -> Res<Vec<Scn>> {
    let mut v = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part {
            "small" => v.push(Scn::Small),
            "large" => v.push(Scn::Large),
            "idle" => v.push(Scn::Idle),
            "attack" => v.push(Scn::Attack),
            "limits" => v.push(Scn::Limits),
            "all" => v.extend([Scn::Limits, Scn::Small, Scn::Large, Scn::Idle, Scn::Attack]),
            other => {
                return Err(format!(
                    "--scenario: unknown scenario {other:?} (small, large, idle, attack, limits)"
                ))
            }
        }
    }
    if v.is_empty() {
        return Err("--scenario: empty list".into());
    }
    Ok(v)
}

fn parse_opts(args: &[String]) -> Res<Opts> {
    let args: Vec<&String> = args.iter().filter(|a| *a != "--bench").collect();
    let quick = args.iter().any(|a| *a == "--quick");
    let mut o = Opts::defaults(quick);
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        let (flag, inline) = match a.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (a.clone(), None),
        };
        let mut val = || inline.clone().or_else(|| it.next().cloned()).ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--quick" => {}
            "--help" | "-h" => {
                print!("{HELP}");
                std::process::exit(0);
            }
            "--scenario" | "--scenarios" => o.scenarios = parse_scenarios(&val()?)?,
            "--rounds" => o.rounds = parse_num(&val()?, &flag)?,
            "--small-count" => o.small_count = parse_num(&val()?, &flag)?,
            "--small-clients" => o.small_clients = parse_num(&val()?, &flag)?,
            "--small-size" => o.small_size = parse_num(&val()?, &flag)?,
            "--large-mib" => o.large_mib = parse_num(&val()?, &flag)?,
            "--multi-clients" => o.multi_clients = parse_num(&val()?, &flag)?,
            "--multi-mib" => o.multi_mib = parse_num(&val()?, &flag)?,
            "--idle-clients" => o.idle_clients = parse_num(&val()?, &flag)?,
            "--attack-secs" => o.attack_secs = parse_num(&val()?, &flag)?,
            "--attack-kinds" => o.attack_kinds = attack::parse_kinds(&val()?)?,
            "--tcp-mib" => o.tcp_mib = parse_num(&val()?, &flag)?,
            "--pipeline-mib" => o.pipeline_mib = parse_num(&val()?, &flag)?,
            "--fsync-files" => o.fsync_files = parse_num(&val()?, &flag)?,
            "--seq-mib" => o.seq_mib = parse_num(&val()?, &flag)?,
            "--limit-iters" => o.limit_iters = parse_num(&val()?, &flag)?,
            "--target" => o.target = Some(val()?),
            "--server-bin" => o.server_bin = PathBuf::from(val()?),
            "--server-arg" => o.server_args.push(val()?),
            "--keep-data" => o.keep_data = true,
            "--wait-quiet" => o.wait_quiet = parse_num(&val()?, &flag)?,
            other => return Err(format!("unknown flag {other:?} (see --help)")),
        }
    }
    if o.rounds == 0
        || o.small_clients == 0
        || o.multi_clients == 0
        || o.limit_iters == 0
        || o.attack_secs == 0
    {
        return Err(
            "--rounds, --small-clients, --multi-clients, --limit-iters and --attack-secs must be at least 1"
                .into(),
        );
    }
    for (mib, flag) in [(o.large_mib, "--large-mib"), (o.multi_mib, "--multi-mib")] {
        if !(1..=4095).contains(&mib) {
            return Err(format!("{flag} must be 1..=4095 (protocol v3 sizes are 32-bit)"));
        }
    }
    if o.small_size > 16 * 1024 * 1024 - 1024 {
        return Err("--small-size must be below 16 MiB (the server's default --max-packet)".into());
    }
    if o.tcp_mib == 0 || o.pipeline_mib == 0 || o.seq_mib == 0 || o.fsync_files == 0 {
        return Err("limit sizes must be at least 1".into());
    }
    Ok(o)
}

// ---------------------------------------------------------------------------
// Hand-written JSON
// ---------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum J {
    Null,
    Bool(bool),
    Num(f64),
    Str(String),
    Arr(Vec<J>),
    Obj(Vec<(String, J)>),
}

macro_rules! json_number {
    ($($t:ty),*) => {$(
        impl From<$t> for J {
            fn from(x: $t) -> J {
                J::Num(x as f64)
            }
        }
    )*};
}
json_number!(f64, u64, usize, u32, i32);

impl From<bool> for J {
    fn from(x: bool) -> J {
        J::Bool(x)
    }
}
impl From<&str> for J {
    fn from(x: &str) -> J {
        J::Str(x.to_string())
    }
}
impl From<String> for J {
    fn from(x: String) -> J {
        J::Str(x)
    }
}
impl<T: Into<J>> From<Option<T>> for J {
    fn from(x: Option<T>) -> J {
        x.map_or(J::Null, Into::into)
    }
}
impl<T: Into<J>> From<Vec<T>> for J {
    fn from(x: Vec<T>) -> J {
        J::Arr(x.into_iter().map(Into::into).collect())
    }
}

impl J {
    fn obj() -> J {
        J::Obj(Vec::new())
    }

    fn set(&mut self, key: &str, v: impl Into<J>) {
        if let J::Obj(m) = self {
            m.push((key.to_string(), v.into()));
        }
    }

    fn render(&self, out: &mut String, indent: usize) {
        match self {
            J::Null => out.push_str("null"),
            J::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            J::Num(x) => out.push_str(&json_num(*x)),
            J::Str(s) => json_str_to(s, out),
            J::Arr(a) if a.iter().all(|x| !matches!(x, J::Arr(_) | J::Obj(_))) => {
                out.push('[');
                for (i, x) in a.iter().enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    x.render(out, indent);
                }
                out.push(']');
            }
            J::Arr(a) => {
                out.push_str("[\n");
                for (i, x) in a.iter().enumerate() {
                    out.push_str(&" ".repeat(indent + 2));
                    x.render(out, indent + 2);
                    out.push_str(if i + 1 < a.len() { ",\n" } else { "\n" });
                }
                out.push_str(&" ".repeat(indent));
                out.push(']');
            }
            J::Obj(m) if m.is_empty() => out.push_str("{}"),
            J::Obj(m) => {
                out.push_str("{\n");
                for (i, (k, v)) in m.iter().enumerate() {
                    out.push_str(&" ".repeat(indent + 2));
                    json_str_to(k, out);
                    out.push_str(": ");
                    v.render(out, indent + 2);
                    out.push_str(if i + 1 < m.len() { ",\n" } else { "\n" });
                }
                out.push_str(&" ".repeat(indent));
                out.push('}');
            }
        }
    }
}

fn json_num(x: f64) -> String {
    if !x.is_finite() {
        "null".into()
    } else if x == x.trunc() && x.abs() < 1e15 {
        format!("{}", x as i64)
    } else {
        let s = format!("{x:.4}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

fn json_str_to(s: &str, out: &mut String) {
    out.push_str(&json_str(s));
}

// ---------------------------------------------------------------------------
// Statistics
// ---------------------------------------------------------------------------

/// Repeated measurements of a rate (higher is better).
#[derive(Debug, Clone, Default)]
struct Samples(Vec<f64>);

impl Samples {
    fn median(&self) -> f64 {
        let mut v = self.0.clone();
        if v.is_empty() {
            return f64::NAN;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        }
    }

    fn best(&self) -> f64 {
        self.0.iter().copied().fold(f64::NAN, f64::max)
    }

    fn json(&self) -> J {
        let mut o = J::obj();
        o.set("median", self.median());
        o.set("best", self.best());
        o.set("samples", self.0.clone());
        o
    }

    fn show(&self, unit: &str) -> String {
        format!("median {:>9.1} {unit}   best {:>9.1}", self.median(), self.best())
    }
}

/// The `p`th percentile (nearest rank) of sorted values.
fn percentile(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Latency summary in milliseconds from microsecond samples.
#[derive(Debug, Clone, Copy)]
struct Lat {
    n: usize,
    p50: f64,
    p99: f64,
    max: f64,
    mean: f64,
}

fn lat_summary(us: &mut [u32]) -> Lat {
    us.sort_unstable();
    let ms = |v: u32| f64::from(v) / 1000.0;
    let mean = if us.is_empty() {
        0.0
    } else {
        us.iter().map(|&v| f64::from(v)).sum::<f64>() / us.len() as f64 / 1000.0
    };
    Lat {
        n: us.len(),
        p50: ms(percentile(us, 50.0)),
        p99: ms(percentile(us, 99.0)),
        max: ms(us.last().copied().unwrap_or(0)),
        mean,
    }
}

impl Lat {
    fn json(&self) -> J {
        let mut o = J::obj();
        o.set("count", self.n);
        o.set("p50_ms", self.p50);
        o.set("p99_ms", self.p99);
        o.set("max_ms", self.max);
        o.set("mean_ms", self.mean);
        o
    }

    fn show(&self) -> String {
        format!("p50 {:.2}  p99 {:.2}  max {:.2}  mean {:.2} ms", self.p50, self.p99, self.max, self.mean)
    }
}

fn mb_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / 1e6 / d.as_secs_f64().max(1e-9)
}

fn frac(value: f64, limit: Option<f64>) -> String {
    match limit {
        Some(l) if l > 0.0 && value.is_finite() => format!("{:.2}", value / l),
        _ => "n/a".into(),
    }
}

fn line(label: &str, value: impl AsRef<str>) {
    println!("  {label:<40} {}", value.as_ref());
}

// ---------------------------------------------------------------------------
// /proc: memory and CPU time
// ---------------------------------------------------------------------------

/// A field of /proc/<pid>/status in KiB (VmRSS, VmHWM, ...).
fn status_kib(pid: u32, key: &str) -> Option<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with(key) && l[key.len()..].starts_with(':'))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// Name, utime and stime (ticks) of a /proc task from its stat file.
fn stat_ticks(path: &Path) -> Option<(String, u64, u64)> {
    let s = fs::read_to_string(path).ok()?;
    let open = s.find('(')?;
    let close = s.rfind(')')?;
    let comm = s[open + 1..close].to_string();
    let f: Vec<&str> = s[close + 1..].split_whitespace().collect();
    // Fields after the command: state is field 3, utime 14, stime 15.
    let ut: u64 = f.get(11)?.parse().ok()?;
    let st: u64 = f.get(12)?.parse().ok()?;
    Some((comm, ut, st))
}

/// Busy ticks of the whole machine (all CPUs) from /proc/stat.
fn machine_busy_ticks() -> u64 {
    let Ok(s) = fs::read_to_string("/proc/stat") else { return 0 };
    let Some(l) = s.lines().next() else { return 0 };
    let v: Vec<u64> = l.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal (guest is inside user)
    let at = |i: usize| v.get(i).copied().unwrap_or(0);
    at(0) + at(1) + at(2) + at(5) + at(6) + at(7)
}

#[derive(Debug, Clone)]
struct CpuSnap {
    at: Instant,
    /// Server threads by tid: (name, user ticks, system ticks, run-queue wait ns).
    threads: HashMap<String, (String, u64, u64, u64)>,
    harness: u64,
    machine: u64,
}

fn cpu_snap(server: Option<u32>) -> CpuSnap {
    let mut threads = HashMap::new();
    if let Some(pid) = server {
        if let Ok(rd) = fs::read_dir(format!("/proc/{pid}/task")) {
            for e in rd.flatten() {
                if let Some((name, user, sys)) = stat_ticks(&e.path().join("stat")) {
                    // schedstat: ns on CPU, ns runnable but waiting for a CPU, slices.
                    let wait = fs::read_to_string(e.path().join("schedstat"))
                        .ok()
                        .and_then(|s| s.split_whitespace().nth(1)?.parse().ok())
                        .unwrap_or(0);
                    threads.insert(e.file_name().to_string_lossy().into_owned(), (name, user, sys, wait));
                }
            }
        }
    }
    CpuSnap {
        at: Instant::now(),
        threads,
        harness: stat_ticks(Path::new("/proc/self/stat")).map_or(0, |t| t.1 + t.2),
        machine: machine_busy_ticks(),
    }
}

/// CPU used between two snapshots, in cores (CPU seconds per wall second).
#[derive(Debug, Clone)]
struct CpuUse {
    wall: f64,
    /// Server threads by role ("loop", "worker", other names): user and
    /// system CPU seconds, seconds runnable but waiting for a CPU.
    server: Vec<(String, f64, f64, f64)>,
    harness: f64,
    machine: f64,
}

impl CpuUse {
    fn between(a: &CpuSnap, b: &CpuSnap) -> CpuUse {
        let hz = clk_tck();
        let mut by_role: Vec<(String, f64, f64, f64)> = Vec::new();
        for (tid, (name, user, sys, wait)) in &b.threads {
            let (u0, s0, w0) = a.threads.get(tid).map_or((0, 0, 0), |t| (t.1, t.2, t.3));
            let role = match name.as_str() {
                "backupd" => "loop".to_string(),
                "backupd-worker" => "worker".to_string(),
                other => other.to_string(),
            };
            let (us, ss) = (user.saturating_sub(u0) as f64 / hz, sys.saturating_sub(s0) as f64 / hz);
            let ws = wait.saturating_sub(w0) as f64 / 1e9;
            match by_role.iter_mut().find(|r| r.0 == role) {
                Some(r) => {
                    r.1 += us;
                    r.2 += ss;
                    r.3 += ws;
                }
                None => by_role.push((role, us, ss, ws)),
            }
        }
        by_role.sort_by(|x, y| x.0.cmp(&y.0));
        CpuUse {
            wall: b.at.duration_since(a.at).as_secs_f64().max(1e-9),
            server: by_role,
            harness: b.harness.saturating_sub(a.harness) as f64 / hz,
            machine: b.machine.saturating_sub(a.machine) as f64 / hz,
        }
    }

    fn server_total(&self) -> f64 {
        self.server.iter().map(|r| r.1 + r.2).sum()
    }

    fn others(&self) -> f64 {
        (self.machine - self.server_total() - self.harness).max(0.0)
    }

    fn json(&self) -> J {
        let mut o = J::obj();
        o.set("wall_s", self.wall);
        let mut s = J::obj();
        for (role, user, sys, wait) in &self.server {
            let mut t = J::obj();
            t.set("user", *user);
            t.set("system", *sys);
            t.set("runqueue_wait", *wait);
            s.set(role, t);
        }
        o.set("server_cpu_s", s);
        o.set("server_cores", self.server_total() / self.wall);
        o.set("harness_cores", self.harness / self.wall);
        o.set("other_processes_cores", self.others() / self.wall);
        o
    }

    fn show(&self, with_server: bool) -> String {
        let mut s = String::new();
        if with_server {
            for (role, user, sys, wait) in &self.server {
                let w = self.wall;
                s.push_str(&format!(
                    "{role} {:.2} (sys {:.2}, runq {:.2})  ",
                    (user + sys) / w,
                    sys / w,
                    wait / w
                ));
            }
        }
        s.push_str(&format!(
            "harness {:.2}  other processes {:.2}  (cores, of {})",
            self.harness / self.wall,
            self.others() / self.wall,
            nproc()
        ));
        s
    }
}

fn nproc() -> usize {
    thread::available_parallelism().map_or(1, |n| n.get())
}

// ---------------------------------------------------------------------------
// The server process
// ---------------------------------------------------------------------------

#[derive(Default)]
struct LogTail {
    lines: VecDeque<String>,
    warn: u64,
    error: u64,
}

struct Server {
    child: Option<Child>,
    pid: u32,
    addr: SocketAddr,
    data_dir: PathBuf,
    log: Arc<Mutex<LogTail>>,
}

impl Server {
    fn start(bin: &Path, data_dir: &Path, extra: &[String]) -> Res<Server> {
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
        let mut args: Vec<String> =
            vec!["--listen".into(), listen.clone(), "--data-dir".into(), data_dir.display().to_string()];
        // Defaults of the harness, unless given with --server-arg (clap refuses a flag twice).
        for (flag, v) in [("--max-connections", "2000"), ("--idle-timeout", "30m")] {
            if !extra.iter().any(|a| a == flag || a.starts_with(&format!("{flag}="))) {
                args.push(flag.into());
                args.push(v.into());
            }
        }
        args.extend(extra.iter().cloned());
        let mut child = Command::new(bin)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        let pid = child.id();
        let stderr = child.stderr.take().ok_or("no stderr pipe")?;
        let log = Arc::new(Mutex::new(LogTail::default()));
        let (tx, rx) = mpsc::channel();
        let log2 = log.clone();
        thread::spawn(move || {
            let mut tx = Some(tx);
            for l in BufReader::new(stderr).lines() {
                let Ok(l) = l else { break };
                if let Some(pos) = l.find("listening on ") {
                    if let Some(t) = tx.take() {
                        let _ = t.send(l[pos + 13..].trim().to_string());
                    }
                }
                let Ok(mut t) = log2.lock() else { break };
                t.warn += u64::from(l.contains("[WARN]"));
                t.error += u64::from(l.contains("[ERROR]"));
                t.lines.push_back(l);
                if t.lines.len() > 40 {
                    t.lines.pop_front();
                }
            }
        });
        let mut server = Server {
            child: Some(child),
            pid,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            data_dir: data_dir.to_path_buf(),
            log,
        };
        if quiet_log {
            let addr: SocketAddr = listen.parse().map_err(|_| format!("bad address {listen}"))?;
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(30) {
                if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                    server.addr = addr;
                    return Ok(server);
                }
                if server.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(Some(_)))) {
                    break;
                }
                thread::sleep(Duration::from_millis(20));
            }
            server.kill();
            return Err(format!("backupd did not accept connections on {addr}; log:\n{}", server.log_tail()));
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

    fn log_tail(&self) -> String {
        self.log.lock().map(|t| t.lines.iter().cloned().collect::<Vec<_>>().join("\n")).unwrap_or_default()
    }

    fn log_counts(&self) -> (u64, u64) {
        self.log.lock().map(|t| (t.warn, t.error)).unwrap_or((0, 0))
    }

    fn rss_kib(&self) -> Option<u64> {
        status_kib(self.pid, "VmRSS")
    }

    fn hwm_kib(&self) -> Option<u64> {
        status_kib(self.pid, "VmHWM")
    }

    /// Reset the peak RSS (VmHWM) to the current RSS (Linux clear_refs 5).
    fn reset_peak(&self) -> bool {
        fs::write(format!("/proc/{}/clear_refs", self.pid), "5").is_ok()
    }

    /// SIGTERM, then wait up to 30 s. Returns the exit code and the time taken.
    fn stop(&mut self) -> (Option<i32>, f64) {
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

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
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
/// the registration rate are turned off there, when the binary has them.
/// Scenario 4 runs the server's own defaults for the connection table and
/// the idle timeout in place of the harness's (see [`Server::start`]).
fn run_server_args(o: &Opts, run: &str) -> Vec<String> {
    let given = |flag: &str| o.server_args.iter().any(|a| a == flag || a.starts_with(&format!("{flag}=")));
    let wanted: &[(&str, &str)] = match run {
        "idle" => &[
            ("--max-connections-per-ip", "0"),
            ("--max-unauthenticated-per-ip", "0"),
            ("--registration-rate", "0"),
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
fn hides_info(args: &[String]) -> bool {
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

/// What a scenario cost the server: memory and CPU.
struct Probe<'a> {
    server: Option<&'a Server>,
    cpu0: CpuSnap,
    rss0: Option<u64>,
    peak_reset: bool,
    log0: (u64, u64),
}

struct Measured {
    cpu: CpuUse,
    rss_before_kib: Option<u64>,
    peak_kib: Option<u64>,
    peak_reset: bool,
    rss_after_kib: Option<u64>,
    warn: u64,
    error: u64,
}

impl<'a> Probe<'a> {
    fn begin(server: Option<&'a Server>) -> Probe<'a> {
        let peak_reset = server.is_some_and(|s| s.reset_peak());
        Probe {
            server,
            cpu0: cpu_snap(server.map(|s| s.pid)),
            rss0: server.and_then(|s| s.rss_kib()),
            peak_reset,
            log0: server.map_or((0, 0), |s| s.log_counts()),
        }
    }

    fn end(self) -> Measured {
        let s = self.server;
        let cpu = CpuUse::between(&self.cpu0, &cpu_snap(s.map(|s| s.pid)));
        let (w, e) = s.map_or((0, 0), |s| s.log_counts());
        Measured {
            cpu,
            rss_before_kib: self.rss0,
            peak_kib: s.and_then(|s| s.hwm_kib()),
            peak_reset: self.peak_reset,
            rss_after_kib: s.and_then(|s| s.rss_kib()),
            warn: w - self.log0.0,
            error: e - self.log0.1,
        }
    }
}

fn mib(kib: Option<u64>) -> Option<f64> {
    kib.map(|k| k as f64 / 1024.0)
}

fn show_mib(kib: Option<u64>) -> String {
    mib(kib).map_or("n/a".into(), |m| format!("{m:.1} MiB"))
}

impl Measured {
    fn json(&self) -> J {
        let mut o = J::obj();
        o.set("rss_before_mib", mib(self.rss_before_kib));
        o.set("peak_rss_mib", mib(self.peak_kib));
        o.set("peak_is_scenario_peak", self.peak_reset);
        o.set("rss_after_mib", mib(self.rss_after_kib));
        o.set("cpu", self.cpu.json());
        o.set("server_log_warnings", self.warn);
        o.set("server_log_errors", self.error);
        o
    }

    fn print(&self, server: bool) {
        if server {
            let peak = if self.peak_reset { "peak (VmHWM)" } else { "peak (VmHWM, since start)" };
            line(
                "server memory",
                format!(
                    "RSS before {}   {peak} {}   RSS after {}",
                    show_mib(self.rss_before_kib),
                    show_mib(self.peak_kib),
                    show_mib(self.rss_after_kib)
                ),
            );
        }
        line("CPU", self.cpu.show(server));
        if self.warn + self.error > 0 {
            line("server log", format!("{} warning(s), {} error(s)", self.warn, self.error));
        }
    }
}

// ---------------------------------------------------------------------------
// Clients and payloads
// ---------------------------------------------------------------------------

fn client_options() -> ClientOptions {
    ClientOptions {
        connect_timeout: Duration::from_secs(10),
        read_timeout: Duration::from_secs(120),
        ..ClientOptions::default()
    }
}

/// Connect, register `name`, exchange keys.
fn new_client(addr: SocketAddr, name: &str, key: &RsaPrivateKey) -> Res<Client> {
    let mut c = Client::connect(addr, &client_options()).map_err(|e| format!("connect: {e}"))?;
    c.register(name).map_err(|e| format!("register {name}: {e}"))?;
    c.send_public_key(name, key).map_err(|e| format!("key exchange {name}: {e}"))?;
    Ok(c)
}

/// Set up one client per name on `threads` threads. Returns the clients that
/// made it, in order, and the errors of the others.
fn new_clients(
    addr: SocketAddr,
    names: &[String],
    key: &RsaPrivateKey,
    threads: usize,
) -> (Vec<Client>, Vec<String>) {
    let next = AtomicUsize::new(0);
    let mut results: Vec<(usize, Res<Client>)> = thread::scope(|s| {
        let hs: Vec<_> = (0..threads.clamp(1, names.len().max(1)))
            .map(|_| {
                s.spawn(|| {
                    let mut out = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= names.len() {
                            return out;
                        }
                        out.push((i, new_client(addr, &names[i], key)));
                    }
                })
            })
            .collect();
        hs.into_iter().flat_map(|h| h.join().unwrap_or_default()).collect()
    });
    results.sort_by_key(|r| r.0);
    let mut ok = Vec::new();
    let mut errs = Vec::new();
    for (_, r) in results {
        match r {
            Ok(c) => ok.push(c),
            Err(e) => errs.push(e),
        }
    }
    (ok, errs)
}

/// A whole-file ciphertext of `mib` MiB that costs one 1 MiB buffer: the
/// ciphertext is one random period `R` repeated `mib` times, then a final
/// block `F = E(pad ^ r_last)` that decrypts to a full PKCS#7 padding block.
/// CBC makes the plaintext periodic too (block k of a period decrypts to
/// `D(r_k) ^ r_{k-1}`), except the first block of the file, which is chained
/// to the zero IV instead of `r_last`. Only its checksum is needed.
struct BigFile {
    /// Request header + packet header + `R`: every packet but the last.
    frame: Vec<u8>,
    /// Request header + packet header + `F`: the last packet.
    last: Vec<u8>,
    mib: u64,
    cksum: u32,
}

impl BigFile {
    fn new(key: &[u8; AES_KEY_LEN], mib: u64, seed: u64) -> BigFile {
        let r = pseudo_random(PERIOD, seed);
        let mut r_last = [0u8; 16];
        r_last.copy_from_slice(&r[PERIOD - 16..]);
        // Decrypt r_last ++ R ++ (one more block, held back by the decryptor):
        // after the first block, the output is the plaintext of a period that
        // follows another period.
        let mut stream = Vec::with_capacity(PERIOD + 32);
        stream.extend_from_slice(&r_last);
        stream.extend_from_slice(&r);
        stream.extend_from_slice(&[0u8; 16]);
        let mut plain = Vec::with_capacity(PERIOD + 16);
        StreamDecryptor::new(key).update(&mut stream, |p| plain.extend_from_slice(p));
        let generic = &plain[16..16 + PERIOD];
        let mut first = generic.to_vec();
        for (b, x) in first.iter_mut().zip(r_last) {
            *b ^= x;
        }
        let mut ck = Cksum::new();
        ck.update(&first);
        for _ in 1..mib {
            ck.update(generic);
        }
        let mut x = [16u8; 16];
        for (b, l) in x.iter_mut().zip(r_last) {
            *b ^= l;
        }
        let f = crypto::encrypt_all(key, &x);
        let mut frame = vec![0u8; REQUEST_HEADER_LEN + PACKET_HEADER_LEN];
        frame.extend_from_slice(&r);
        let mut last = vec![0u8; REQUEST_HEADER_LEN + PACKET_HEADER_LEN];
        last.extend_from_slice(&f[..16]);
        BigFile { frame, last, mib, cksum: ck.finalize() }
    }

    fn orig(&self) -> u64 {
        self.mib * MIB
    }

    fn ciphertext_len(&self) -> u64 {
        self.orig() + 16
    }

    fn packets(&self) -> u16 {
        (self.mib + 1) as u16
    }

    /// Write the headers for `id`'s upload of `name`.
    fn address(&mut self, id: &ClientId, name: &str) -> Res<()> {
        let field = NameField::from_name(name.as_bytes()).ok_or(format!("bad file name {name:?}"))?;
        let (orig, total) = (self.orig() as u32, self.packets());
        write_packet_headers(&mut self.frame, id, &field, PERIOD, orig, 1, total);
        write_packet_headers(&mut self.last, id, &field, 16, orig, total, total);
        Ok(())
    }

    /// Upload as `name`, check the 1603, confirm with 1029. Returns the time
    /// to the 1603 and the time of the 1029 round trip.
    fn upload(&mut self, c: &mut Client, name: &str) -> Res<(Duration, Duration)> {
        self.address(&c.id(), name)?;
        let t0 = Instant::now();
        for n in 1..self.packets() {
            self.frame[PACKET_NUMBER_AT..PACKET_NUMBER_AT + 2].copy_from_slice(&n.to_le_bytes());
            c.send_raw(&self.frame).map_err(|e| format!("{name}: packet {n}: {e}"))?;
        }
        c.send_raw(&self.last).map_err(|e| format!("{name}: last packet: {e}"))?;
        match c.read_response() {
            Ok(Response::FileReceived { cksum, content_size, .. }) => {
                if cksum != self.cksum || u64::from(content_size) != self.ciphertext_len() {
                    let _ = c.crc_abort(name);
                    return Err(format!(
                        "{name}: 1603 says {content_size} bytes, cksum {cksum}; expected {} bytes, cksum {}",
                        self.ciphertext_len(),
                        self.cksum
                    ));
                }
            }
            Ok(other) => return Err(format!("{name}: expected 1603, got {}", other.code() as u16)),
            Err(e) => return Err(format!("{name}: waiting for 1603: {e}")),
        }
        let t1 = Instant::now();
        c.crc_ok(name).map_err(|e| format!("{name}: 1029: {e}"))?;
        Ok((t1 - t0, t1.elapsed()))
    }
}

fn write_packet_headers(
    buf: &mut [u8],
    id: &ClientId,
    field: &NameField,
    content: usize,
    orig: u32,
    number: u16,
    total: u16,
) {
    let h = RequestHeader {
        client_id: *id,
        version: VERSION,
        code: Code::FilePacket.as_u16(),
        payload_size: (PACKET_HEADER_LEN + content) as u32,
    };
    buf[..REQUEST_HEADER_LEN].copy_from_slice(&h.encode());
    let mut ph = Vec::with_capacity(PACKET_HEADER_LEN);
    PacketHeader {
        content_size: content as u32,
        orig_file_size: orig,
        packet_number: number,
        total_packets: total,
        file_name: field.clone(),
    }
    .encode(&mut ph);
    buf[REQUEST_HEADER_LEN..REQUEST_HEADER_LEN + PACKET_HEADER_LEN].copy_from_slice(&ph);
}

// ---------------------------------------------------------------------------
// Scenario 1: small files
// ---------------------------------------------------------------------------

struct SmallClient {
    c: Client,
    ct: Vec<u8>,
    cksum: u32,
}

struct SmallRound {
    elapsed: Duration,
    ok: usize,
    total_us: Vec<u32>,
    upload_us: Vec<u32>,
    commit_us: Vec<u32>,
    errors: Vec<String>,
}

fn us(d: Duration) -> u32 {
    d.as_micros().min(u128::from(u32::MAX)) as u32
}

/// One timed round: the clients share a counter of `count` files; each
/// uploads (1028 -> 1603) and confirms (1029 -> 1604) one file at a time.
/// With `until`, no file is started after that time.
fn small_round(
    cl: &mut [SmallClient],
    count: usize,
    size: usize,
    tag: &str,
    until: Option<Instant>,
) -> SmallRound {
    let next = AtomicUsize::new(0);
    let barrier = Barrier::new(cl.len() + 1);
    let opts = UploadOptions::default();
    thread::scope(|s| {
        let handles: Vec<_> = cl
            .iter_mut()
            .map(|sc| {
                let (next, barrier, opts) = (&next, &barrier, &opts);
                s.spawn(move || {
                    let mut lat = (Vec::new(), Vec::new(), Vec::new());
                    let mut errs = Vec::new();
                    barrier.wait();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= count || until.is_some_and(|u| Instant::now() >= u) {
                            break;
                        }
                        let name = format!("{tag}-{i:07}.bin");
                        let t0 = Instant::now();
                        match sc.c.upload_ciphertext(&name, &sc.ct, size as u64, sc.cksum, opts) {
                            Ok(up) if up.cksum_matches() => {}
                            Ok(up) => {
                                errs.push(format!(
                                    "{name}: cksum mismatch (server {}, local {})",
                                    up.server_cksum, up.local_cksum
                                ));
                                let _ = sc.c.crc_abort(&name);
                                continue;
                            }
                            Err(e) => {
                                errs.push(format!("{name}: upload: {e}"));
                                if sc.c.is_in_step() {
                                    continue;
                                }
                                break;
                            }
                        }
                        let t1 = Instant::now();
                        if let Err(e) = sc.c.crc_ok(&name) {
                            errs.push(format!("{name}: 1029: {e}"));
                            if sc.c.is_in_step() {
                                continue;
                            }
                            break;
                        }
                        let t2 = Instant::now();
                        lat.0.push(us(t2 - t0));
                        lat.1.push(us(t1 - t0));
                        lat.2.push(us(t2 - t1));
                    }
                    (lat, errs, Instant::now())
                })
            })
            .collect();
        barrier.wait();
        let t0 = Instant::now();
        let mut r = SmallRound {
            elapsed: Duration::ZERO,
            ok: 0,
            total_us: Vec::with_capacity(count.min(1 << 16)),
            upload_us: Vec::with_capacity(count.min(1 << 16)),
            commit_us: Vec::with_capacity(count.min(1 << 16)),
            errors: Vec::new(),
        };
        let mut end = t0;
        for h in handles {
            match h.join() {
                Ok((lat, errs, t)) => {
                    r.ok += lat.0.len();
                    r.total_us.extend(lat.0);
                    r.upload_us.extend(lat.1);
                    r.commit_us.extend(lat.2);
                    r.errors.extend(errs);
                    end = end.max(t);
                }
                Err(_) => r.errors.push("client thread panicked".into()),
            }
        }
        r.elapsed = end - t0;
        r
    })
}

struct SmallOutcome {
    rate: Samples,
    total: Lat,
    upload: Lat,
    commit: Lat,
    files: usize,
    errors: Vec<String>,
    measured: Measured,
}

/// The clients of the small-file workload, registered, each with its file
/// encrypted once.
fn small_clients(o: &Opts, ctx: &Ctx, label: &str) -> Res<Vec<SmallClient>> {
    let names: Vec<String> = (0..o.small_clients).map(|i| format!("{}-{label}-{i}", ctx.run_tag)).collect();
    let (clients, errs) = new_clients(ctx.addr, &names, ctx.key, 4);
    if !errs.is_empty() {
        return Err(format!(
            "{label}: {} of {} clients could not be set up: {}",
            errs.len(),
            names.len(),
            errs[0]
        ));
    }
    Ok(clients
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            let plain = pseudo_random(o.small_size, 1000 + i as u64);
            let key = c.aes_key().copied().unwrap_or([0; AES_KEY_LEN]);
            SmallClient { ct: crypto::encrypt_all(&key, &plain), cksum: crypto::cksum(&plain), c }
        })
        .collect())
}

/// Scenario 1 (also the second half of scenario 3): register the clients,
/// then `rounds` timed rounds.
fn scenario_small(o: &Opts, ctx: &Ctx, label: &str) -> Res<SmallOutcome> {
    let mut cl = small_clients(o, ctx, label)?;
    let probe = Probe::begin(ctx.server);
    let mut rate = Samples::default();
    let (mut t, mut u, mut c) = (Vec::new(), Vec::new(), Vec::new());
    let mut errors = Vec::new();
    let mut files = 0;
    for round in 1..=o.rounds {
        let r = small_round(&mut cl, o.small_count, o.small_size, &format!("{label}-r{round}"), None);
        let fps = r.ok as f64 / r.elapsed.as_secs_f64().max(1e-9);
        eprintln!(
            "[load] {label}: round {round}/{}: {} files in {:.2} s = {fps:.0} files/s{}",
            o.rounds,
            r.ok,
            r.elapsed.as_secs_f64(),
            if r.errors.is_empty() { String::new() } else { format!(", {} error(s)", r.errors.len()) }
        );
        rate.0.push(fps);
        files += r.ok;
        t.extend(r.total_us);
        u.extend(r.upload_us);
        c.extend(r.commit_us);
        errors.extend(r.errors);
    }
    let measured = probe.end();
    Ok(SmallOutcome {
        rate,
        total: lat_summary(&mut t),
        upload: lat_summary(&mut u),
        commit: lat_summary(&mut c),
        files,
        errors,
        measured,
    })
}

impl SmallOutcome {
    fn json(&self, o: &Opts) -> J {
        let mut j = J::obj();
        j.set("clients", o.small_clients);
        j.set("file_bytes", o.small_size);
        j.set("files_per_round", o.small_count);
        j.set("rounds", o.rounds);
        j.set("files_ok", self.files);
        j.set("files_per_s", self.rate.json());
        j.set("latency_total", self.total.json());
        j.set("latency_upload_to_1603", self.upload.json());
        j.set("latency_1029_to_1604", self.commit.json());
        j.set("littles_law_mean_ms", o.small_clients as f64 / self.rate.median() * 1000.0);
        j.set("errors", self.errors.len());
        j.set("first_errors", self.errors.iter().take(5).cloned().collect::<Vec<_>>());
        j.set("server", self.measured.json());
        j
    }

    fn print(&self, o: &Opts, limits: &Limits, server: bool) {
        let r = self.rate.median();
        line("throughput", self.rate.show("files/s"));
        let of = |l: Option<f64>| format!("{} of {:.0}", frac(r, l), l.unwrap_or(f64::NAN));
        if limits.fsync1.is_some() {
            line(
                "  / limits: fsync mode",
                format!(
                    "per file {}   16 per dir fsync {}   + SQLite {}",
                    of(limits.fsync1),
                    of(limits.fsync16),
                    of(limits.fsync16_db)
                ),
            );
            line(
                "  / limits: syncfs mode",
                format!("16 per syncfs {}   + SQLite {}", of(limits.syncfs16), of(limits.syncfs16_db)),
            );
        }
        line("latency per file (1028..1604)", self.total.show());
        line("  of which 1028 -> 1603", self.upload.show());
        line("  of which 1029 -> 1604", self.commit.show());
        line(
            "  Little's law: clients / rate",
            format!("{:.2} ms mean at {} clients", o.small_clients as f64 / r * 1000.0, o.small_clients),
        );
        self.measured.print(server);
        let cpu = &self.measured.cpu;
        if server && self.files > 0 {
            line(
                "server CPU per file",
                format!("{:.0} us (all server threads)", cpu.server_total() / self.files as f64 * 1e6),
            );
        }
        if !self.errors.is_empty() {
            line("ERRORS", format!("{} (first: {})", self.errors.len(), self.errors[0]));
        }
    }
}

// ---------------------------------------------------------------------------
// Scenario 2: large files
// ---------------------------------------------------------------------------

struct BigClient {
    c: Client,
    file: BigFile,
}

struct LargeOutcome {
    clients: usize,
    mib: u64,
    rate: Samples,
    /// Per upload: seconds to the 1603, seconds of the 1029 round trip.
    parts: Vec<(f64, f64)>,
    errors: Vec<String>,
    measured: Measured,
}

fn scenario_large(o: &Opts, ctx: &Ctx, label: &str, clients: usize, mib: u64) -> Res<LargeOutcome> {
    let names: Vec<String> = (0..clients).map(|i| format!("{}-{label}-{i}", ctx.run_tag)).collect();
    let (cs, errs) = new_clients(ctx.addr, &names, ctx.key, clients);
    if !errs.is_empty() {
        return Err(format!("{label}: client setup failed: {}", errs[0]));
    }
    let mut cl: Vec<BigClient> = cs
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            let key = c.aes_key().copied().unwrap_or([0; AES_KEY_LEN]);
            BigClient { file: BigFile::new(&key, mib, 77 + i as u64), c }
        })
        .collect();
    let probe = Probe::begin(ctx.server);
    let mut rate = Samples::default();
    let mut parts = Vec::new();
    let mut errors = Vec::new();
    for round in 1..=o.rounds {
        let barrier = Barrier::new(cl.len() + 1);
        let (t0, results) = thread::scope(|s| {
            let hs: Vec<_> = cl
                .iter_mut()
                .enumerate()
                .map(|(i, bc)| {
                    let barrier = &barrier;
                    s.spawn(move || {
                        barrier.wait();
                        let r = bc.file.upload(&mut bc.c, &format!("{label}-r{round}-{i}.bin"));
                        (r, Instant::now())
                    })
                })
                .collect();
            barrier.wait();
            let t0 = Instant::now();
            let rs: Vec<_> =
                hs.into_iter().map(|h| h.join().map_err(|_| "thread panicked".to_string())).collect();
            (t0, rs)
        });
        let mut end = t0;
        let mut ok = 0u64;
        for r in results {
            match r {
                Ok((Ok((up, commit)), t)) => {
                    ok += 1;
                    end = end.max(t);
                    parts.push((up.as_secs_f64(), commit.as_secs_f64()));
                }
                Ok((Err(e), _)) | Err(e) => errors.push(e),
            }
        }
        let secs = (end - t0).as_secs_f64();
        let r = mb_s(ok * mib * MIB, end - t0);
        eprintln!(
            "[load] {label}: round {round}/{}: {ok} x {mib} MiB in {secs:.2} s = {r:.0} MB/s",
            o.rounds
        );
        rate.0.push(r);
        if ok == 0 {
            break;
        }
    }
    let measured = probe.end();
    Ok(LargeOutcome { clients, mib, rate, parts, errors, measured })
}

impl LargeOutcome {
    fn json(&self, o: &Opts) -> J {
        let mut j = J::obj();
        j.set("clients", self.clients);
        j.set("mib_per_client", self.mib);
        j.set("packet_bytes", PERIOD);
        j.set("rounds", o.rounds);
        j.set("aggregate_mb_s", self.rate.json());
        let ups: Vec<f64> = self.parts.iter().map(|p| p.0).collect();
        let commits: Vec<f64> = self.parts.iter().map(|p| p.1 * 1000.0).collect();
        j.set("seconds_to_1603", ups);
        j.set("ms_1029_to_1604", commits);
        j.set("errors", self.errors.len());
        j.set("first_errors", self.errors.iter().take(5).cloned().collect::<Vec<_>>());
        j.set("server", self.measured.json());
        j
    }

    fn print(&self, limits: &Limits, server: bool) {
        let r = self.rate.median();
        line("throughput", self.rate.show("MB/s"));
        if limits.tcp.is_some() {
            line(
                "  / limits",
                format!(
                    "loopback TCP {}   decrypt+cksum {}   write+fsync {} (write-behind {})   new memory {}   all in series {}",
                    frac(r, limits.tcp),
                    frac(r, limits.pipeline),
                    frac(r, limits.seq_write),
                    frac(r, limits.seq_write_behind),
                    frac(r, limits.fresh_memory),
                    frac(r, limits.serial()),
                ),
            );
        }
        if let Some(max_commit) = self.parts.iter().map(|p| p.1).reduce(f64::max) {
            line("1029 -> 1604 (publish + commit)", format!("max {:.1} ms", max_commit * 1000.0));
        }
        self.measured.print(server);
        if server {
            let bytes = (self.parts.len() as u64 * self.mib * MIB) as f64;
            if bytes > 0.0 {
                line(
                    "server CPU per MB",
                    format!("{:.0} us (all server threads)", self.measured.cpu.server_total() / bytes * 1e12),
                );
            }
        }
        if !self.errors.is_empty() {
            line("ERRORS", format!("{} (first: {})", self.errors.len(), self.errors[0]));
        }
    }
}

// ---------------------------------------------------------------------------
// Scenario 3: idle connections
// ---------------------------------------------------------------------------

struct IdleOutcome {
    wanted: usize,
    connected: usize,
    setup_secs: f64,
    setup: Measured,
    rss_idle_kib: Option<u64>,
    rss_start_kib: Option<u64>,
    alive_after: usize,
    small: SmallOutcome,
    errors: Vec<String>,
}

fn scenario_idle(o: &Opts, ctx: &Ctx) -> Res<IdleOutcome> {
    let rss_start_kib = ctx.server.and_then(|s| s.rss_kib());
    let names: Vec<String> = (0..o.idle_clients).map(|i| format!("{}-idle-{i}", ctx.run_tag)).collect();
    let probe = Probe::begin(ctx.server);
    let t0 = Instant::now();
    let (mut idle, errors) = new_clients(ctx.addr, &names, ctx.key, 8);
    let setup_secs = t0.elapsed().as_secs_f64();
    let setup = probe.end();
    eprintln!(
        "[load] idle: {} of {} clients connected and registered in {setup_secs:.1} s",
        idle.len(),
        o.idle_clients
    );
    thread::sleep(Duration::from_secs(1));
    let rss_idle_kib = ctx.server.and_then(|s| s.rss_kib());
    let small = scenario_small(o, ctx, "idle-small")?;
    // Are the idle sessions still there? A 1029 for a file never uploaded is
    // refused with 1607 on a live session; a closed one fails with an I/O error.
    let alive_after = idle
        .iter_mut()
        .map(|c| matches!(c.crc_ok("never-uploaded.bin"), Err(e) if e.refusal_code().is_some()))
        .filter(|alive| *alive)
        .count();
    Ok(IdleOutcome {
        wanted: o.idle_clients,
        connected: idle.len(),
        setup_secs,
        setup,
        rss_idle_kib,
        rss_start_kib,
        alive_after,
        small,
        errors,
    })
}

impl IdleOutcome {
    fn per_conn_kib(&self) -> Option<f64> {
        match (self.rss_idle_kib, self.rss_start_kib) {
            (Some(a), Some(b)) if self.connected > 0 => Some((a as f64 - b as f64) / self.connected as f64),
            _ => None,
        }
    }

    fn json(&self, o: &Opts) -> J {
        let mut j = J::obj();
        j.set("idle_clients_wanted", self.wanted);
        j.set("idle_clients_connected", self.connected);
        j.set("idle_clients_alive_after", self.alive_after);
        j.set("setup_seconds", self.setup_secs);
        j.set("setup_server", self.setup.json());
        j.set("rss_before_idle_mib", mib(self.rss_start_kib));
        j.set("rss_with_idle_mib", mib(self.rss_idle_kib));
        j.set("rss_per_idle_connection_kib", self.per_conn_kib());
        j.set("setup_errors", self.errors.len());
        j.set("first_setup_errors", self.errors.iter().take(5).cloned().collect::<Vec<_>>());
        j.set("small_with_idle", self.small.json(o));
        j
    }

    fn print(&self, o: &Opts, limits: &Limits, server: bool) {
        line(
            "idle clients",
            format!(
                "{} of {} connected+registered in {:.1} s; {} still connected at the end",
                self.connected, self.wanted, self.setup_secs, self.alive_after
            ),
        );
        if server {
            line(
                "server RSS with idle clients",
                format!(
                    "{}  (before: {}; {:.1} KiB per connection; setup peak {})",
                    show_mib(self.rss_idle_kib),
                    show_mib(self.rss_start_kib),
                    self.per_conn_kib().unwrap_or(f64::NAN),
                    show_mib(self.setup.peak_kib)
                ),
            );
        }
        if !self.errors.is_empty() {
            line("SETUP ERRORS", format!("{} (first: {})", self.errors.len(), self.errors[0]));
        }
        println!("  -- small files again, with the idle clients connected --");
        self.small.print(o, limits, server);
    }
}

// ---------------------------------------------------------------------------
// Machine limits
// ---------------------------------------------------------------------------

#[derive(Default)]
struct Limits {
    tcp: Option<f64>,
    pipeline: Option<f64>,
    seq_write: Option<f64>,
    seq_write_behind: Option<f64>,
    fresh_memory: Option<f64>,
    fsync1: Option<f64>,
    fsync16: Option<f64>,
    fsync16_db: Option<f64>,
    syncfs16: Option<f64>,
    syncfs16_db: Option<f64>,
    json: Option<J>,
}

impl Limits {
    /// Throughput if loopback, decrypt+cksum and write+fsync ran one after the other.
    fn serial(&self) -> Option<f64> {
        Some(1.0 / (1.0 / self.tcp? + 1.0 / self.pipeline? + 1.0 / self.seq_write?))
    }
}

/// Loopback TCP: one connection, 1 MiB writes, a reader thread.
fn limit_tcp(total_mib: u64) -> Res<f64> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("loopback: bind: {e}"))?;
    let addr = l.local_addr().map_err(|e| e.to_string())?;
    let reader = thread::spawn(move || -> Res<(u64, Instant)> {
        let (mut s, _) = l.accept().map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(60))).map_err(|e| e.to_string())?;
        let mut buf = vec![0u8; PERIOD];
        let mut n = 0u64;
        loop {
            match s.read(&mut buf) {
                Ok(0) => return Ok((n, Instant::now())),
                Ok(k) => n += k as u64,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    });
    let mut s = TcpStream::connect(addr).map_err(|e| format!("loopback: connect: {e}"))?;
    s.set_write_timeout(Some(Duration::from_secs(60))).map_err(|e| e.to_string())?;
    let buf = pseudo_random(PERIOD, 5);
    let t0 = Instant::now();
    for _ in 0..total_mib {
        s.write_all(&buf).map_err(|e| format!("loopback: write: {e}"))?;
    }
    s.shutdown(Shutdown::Write).map_err(|e| e.to_string())?;
    let (n, end) = reader.join().map_err(|_| "loopback reader panicked".to_string())??;
    if n != total_mib * MIB {
        return Err(format!("loopback: read {n} bytes of {}", total_mib * MIB));
    }
    Ok(mb_s(n, end - t0))
}

/// The server's in-memory path for packet content: StreamDecryptor + Cksum
/// over a whole-file ciphertext in 1 MiB pieces. `buf` is decrypted in
/// place, so only the first pass sees real ciphertext (and is checked);
/// later passes do the same work on other bytes.
fn limit_pipeline(buf: &mut [u8], key: &[u8; AES_KEY_LEN], check: Option<u32>) -> Res<f64> {
    let t0 = Instant::now();
    let mut dec = StreamDecryptor::new(key);
    let mut ck = Cksum::new();
    for piece in buf.chunks_mut(PERIOD) {
        dec.update(piece, |p| ck.update(p));
    }
    let fin = dec.finish(|p| ck.update(p));
    let v = ck.finalize();
    let d = t0.elapsed();
    if let Some(expect) = check {
        if fin.is_err() || v != expect {
            return Err(format!("decrypt+cksum self-check failed: cksum {v}, expected {expect}"));
        }
    }
    Ok(mb_s(buf.len() as u64, d))
}

/// Sequential write of `total_mib` in 1 MiB writes, then one fsync.
/// Sequential write of `total_mib` in 1 MiB writes, then one fsync. The file
/// is kept until the end of the run, as the server keeps what it stores:
/// deleting it would hand its page-cache pages, already backed by the
/// host, to the next iteration (see [`limit_fresh_memory`]).
///
/// With `behind`, writeback of every 8 MiB is started as it is written, and
/// the 8 MiB before it is waited for and dropped from the page cache
/// (sync_file_range + POSIX_FADV_DONTNEED), so that the file's pages are
/// recycled instead of the page cache growing into new memory.
fn limit_seq_write(dir: &Path, total_mib: u64, iteration: usize, behind: bool) -> Res<f64> {
    use std::os::fd::AsRawFd;
    const CHUNK: i64 = 8 << 20;
    let p = dir.join(format!("seq-{}{iteration}.bin", if behind { "behind-" } else { "" }));
    let buf = pseudo_random(PERIOD, 9);
    let t0 = Instant::now();
    let mut f = File::create(&p).map_err(|e| format!("{}: {e}", p.display()))?;
    let fd = f.as_raw_fd();
    for i in 1..=total_mib as i64 {
        f.write_all(&buf).map_err(|e| format!("{}: {e}", p.display()))?;
        let off = i * PERIOD as i64;
        if behind && off % CHUNK == 0 {
            // SAFETY: plain syscalls on a descriptor we own; failures only cost speed.
            unsafe {
                libc::sync_file_range(fd, off - CHUNK, CHUNK, libc::SYNC_FILE_RANGE_WRITE);
                if off >= 2 * CHUNK {
                    let all = libc::SYNC_FILE_RANGE_WAIT_BEFORE
                        | libc::SYNC_FILE_RANGE_WRITE
                        | libc::SYNC_FILE_RANGE_WAIT_AFTER;
                    libc::sync_file_range(fd, off - 2 * CHUNK, CHUNK, all);
                    libc::posix_fadvise(fd, off - 2 * CHUNK, CHUNK, libc::POSIX_FADV_DONTNEED);
                }
            }
        }
    }
    f.sync_data().map_err(|e| format!("fsync {}: {e}", p.display()))?;
    Ok(mb_s(total_mib * MIB, t0.elapsed()))
}

/// First write to memory the process has never touched: anonymous mappings
/// of `mib` MiB, one per iteration, each filled once and all kept until the
/// end so that no iteration reuses another's pages. New page-cache pages
/// cost the same first touch. In a VM whose host backs guest memory lazily
/// (or takes back free pages: virtio-balloon free page reporting) this is
/// far slower than writing memory a second time, and it bounds how fast a
/// large new file can enter the page cache.
fn limit_fresh_memory(mib: u64, iters: usize) -> Res<Samples> {
    let len = (mib * MIB) as usize;
    let mut maps = Vec::new();
    let mut s = Samples::default();
    let mut result = Ok(());
    for _ in 0..iters {
        // SAFETY: a fresh private anonymous mapping, checked for failure.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            result = Err(format!("mmap of {mib} MiB failed"));
            break;
        }
        maps.push(p);
        let t0 = Instant::now();
        // SAFETY: p is a writable mapping of len bytes.
        unsafe { std::ptr::write_bytes(p.cast::<u8>(), 0x5a, len) };
        s.0.push(mb_s(len as u64, t0.elapsed()));
    }
    for p in maps {
        // SAFETY: unmapping what was mapped above, with its length.
        unsafe { libc::munmap(p, len) };
    }
    result.map(|()| s)
}

fn fsync_dir(p: &Path) -> Res<()> {
    File::open(p).and_then(|d| d.sync_all()).map_err(|e| format!("fsync {}: {e}", p.display()))
}

/// How a batch of small files is made durable in [`limit_durable`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Durability {
    /// fdatasync each file before its rename, then one fsync of files/ per batch
    /// (the issue's "temp-write + fsync + rename + dir fsync"; `--sync-mode fsync`).
    Fsync,
    /// Renames only, then one syncfs(2) per batch (`--sync-mode syncfs`).
    Syncfs,
}

/// The server's durable path for small files, without the server: write
/// 4 KiB to tmp/, rename into files/, made durable per `batch` files as
/// `mode` says; with `db`, also the SQLite transaction (WAL,
/// synchronous=FULL) the worker makes per batch of new files (their files
/// rows; replacements add a publish-intent transaction before the renames).
fn limit_durable(dir: &Path, n: usize, batch: usize, mode: Durability, db: bool) -> Res<f64> {
    let tmp = dir.join("tmp");
    let files = dir.join("files");
    for d in [&tmp, &files] {
        fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
    }
    let sql = |e: rusqlite::Error| format!("SQLite: {e}");
    let mut conn = if db {
        let c = rusqlite::Connection::open(dir.join("limit.db")).map_err(sql)?;
        c.query_row("PRAGMA journal_mode=WAL", [], |_| Ok(())).map_err(sql)?;
        c.execute_batch(
            "PRAGMA synchronous=FULL;
             CREATE TABLE files(Name TEXT PRIMARY KEY, Verified INTEGER);",
        )
        .map_err(sql)?;
        Some(c)
    } else {
        None
    };
    let root = File::open(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let data = pseudo_random(4096, 3);
    let t0 = Instant::now();
    let mut i = 0;
    while i < n {
        let end = (i + batch).min(n);
        for k in i..end {
            let t = tmp.join(format!("{k}.part"));
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&t)
                .map_err(|e| format!("{}: {e}", t.display()))?;
            f.write_all(&data).map_err(|e| e.to_string())?;
            if mode == Durability::Fsync {
                f.sync_data().map_err(|e| e.to_string())?;
            }
            drop(f);
            fs::rename(&t, files.join(format!("f{k}"))).map_err(|e| e.to_string())?;
        }
        match mode {
            Durability::Fsync => fsync_dir(&files)?,
            Durability::Syncfs => {
                use std::os::fd::AsRawFd;
                // SAFETY: syncfs on a descriptor we own for the call.
                if unsafe { libc::syncfs(root.as_raw_fd()) } != 0 {
                    return Err(format!("syncfs: {}", std::io::Error::last_os_error()));
                }
            }
        }
        if let Some(c) = conn.as_mut() {
            let tx = c.transaction().map_err(sql)?;
            for k in i..end {
                tx.execute("INSERT INTO files VALUES (?1, 1)", [format!("f{k}")]).map_err(sql)?;
            }
            tx.commit().map_err(sql)?;
        }
        i = end;
    }
    Ok(n as f64 / t0.elapsed().as_secs_f64().max(1e-9))
}

/// The limits. What they write is left in `bench_dir/limits-PID` for the
/// caller to delete at the end of the run (see [`run`]).
fn measure_limits(o: &Opts, bench_dir: &Path) -> Res<Limits> {
    println!("\n== machine limits (measured now, same run) ==");
    let iters = o.limit_iters;
    let mut j = J::obj();

    let mut tcp = Samples::default();
    for _ in 0..iters {
        tcp.0.push(limit_tcp(o.tcp_mib)?);
    }
    line(&format!("loopback TCP ({} MiB, 1 MiB writes)", o.tcp_mib), tcp.show("MB/s"));
    let mut t = tcp.json();
    t.set("mib_per_iteration", o.tcp_mib);
    j.set("loopback_tcp_mb_s", t);

    let key = [0x42u8; AES_KEY_LEN];
    let big = BigFile::new(&key, o.pipeline_mib, 11);
    let mut buf = Vec::with_capacity((big.ciphertext_len()) as usize);
    for _ in 0..o.pipeline_mib {
        buf.extend_from_slice(&big.frame[REQUEST_HEADER_LEN + PACKET_HEADER_LEN..]);
    }
    buf.extend_from_slice(&big.last[REQUEST_HEADER_LEN + PACKET_HEADER_LEN..]);
    let mut pipe = Samples::default();
    for i in 0..iters {
        pipe.0.push(limit_pipeline(&mut buf, &key, (i == 0).then_some(big.cksum))?);
    }
    drop(buf);
    line(&format!("decrypt+cksum ({} MiB, 1 MiB pieces)", o.pipeline_mib), pipe.show("MB/s"));
    let mut t = pipe.json();
    t.set("mib_per_iteration", o.pipeline_mib);
    j.set("decrypt_cksum_mb_s", t);

    let dir = bench_dir.join(format!("limits-{}", std::process::id()));
    fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut seq = Samples::default();
    let mut behind = Samples::default();
    for i in 0..iters.min(3) {
        seq.0.push(limit_seq_write(&dir, o.seq_mib, i, false)?);
        behind.0.push(limit_seq_write(&dir, o.seq_mib, i, true)?);
    }
    line(&format!("sequential write+fsync ({} MiB)", o.seq_mib), seq.show("MB/s"));
    let mut t = seq.json();
    t.set("mib_per_iteration", o.seq_mib);
    j.set("seq_write_fsync_mb_s", t);
    line("  the same, write-behind + DONTNEED", behind.show("MB/s"));
    let mut t = behind.json();
    t.set("mib_per_iteration", o.seq_mib);
    j.set("seq_write_behind_dontneed_mb_s", t);

    let fresh_mib = o.seq_mib.min(512);
    let fresh = limit_fresh_memory(fresh_mib, iters.min(3))?;
    line(&format!("first write to new memory ({fresh_mib} MiB)"), fresh.show("MB/s"));
    let mut t = fresh.json();
    t.set("mib_per_iteration", fresh_mib);
    j.set("fresh_memory_write_mb_s", t);

    let mut fs_rates = Vec::new();
    for (batch, mode, db, key, label) in [
        (1, Durability::Fsync, false, "fsync_files_per_s", "4 KiB write+fsync+rename+dir fsync"),
        (
            16,
            Durability::Fsync,
            false,
            "fsync_batched16_files_per_s",
            "  the same, one dir fsync per 16 files",
        ),
        (16, Durability::Fsync, true, "fsync_batched16_sqlite_files_per_s", "    + 1 SQLite commit per 16"),
        (16, Durability::Syncfs, false, "syncfs_batched16_files_per_s", "  write+rename, one syncfs per 16"),
        (16, Durability::Syncfs, true, "syncfs_batched16_sqlite_files_per_s", "    + 1 SQLite commit per 16"),
    ] {
        let mut s = Samples::default();
        for it in 0..iters {
            let d = dir.join(format!("{key}-{it}"));
            s.0.push(limit_durable(&d, o.fsync_files, batch, mode, db)?);
        }
        line(label, s.show("files/s"));
        let mut t = s.json();
        t.set("files_per_iteration", o.fsync_files);
        j.set(key, t);
        fs_rates.push(s.median());
    }
    Ok(Limits {
        tcp: Some(tcp.median()),
        pipeline: Some(pipe.median()),
        seq_write: Some(seq.median()),
        seq_write_behind: Some(behind.median()),
        fresh_memory: Some(fresh.median()),
        fsync1: Some(fs_rates[0]),
        fsync16: Some(fs_rates[1]),
        fsync16_db: Some(fs_rates[2]),
        syncfs16: Some(fs_rates[3]),
        syncfs16_db: Some(fs_rates[4]),
        json: Some(j),
    })
}

// ---------------------------------------------------------------------------
// Machine description
// ---------------------------------------------------------------------------

fn cmd_out(cmd: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(cmd).args(args).stderr(Stdio::null()).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn cpu_model() -> Option<String> {
    let s = fs::read_to_string("/proc/cpuinfo").ok()?;
    let l = s.lines().find(|l| l.starts_with("model name"))?;
    Some(l.split_once(':')?.1.trim().to_string())
}

fn mem_total_mib() -> Option<f64> {
    let s = fs::read_to_string("/proc/meminfo").ok()?;
    let kib: f64 = s.lines().find(|l| l.starts_with("MemTotal:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// Filesystem type of `p` (statfs magic) and the options of its mount.
fn fs_info(p: &Path) -> (String, String) {
    let mut kind = "unknown".to_string();
    if let Ok(c) = CString::new(p.as_os_str().as_bytes()) {
        // SAFETY: statfs writes into the zeroed struct we own; the path is NUL-terminated.
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::statfs(c.as_ptr(), &mut st) } == 0 {
            kind = match st.f_type as i64 {
                0xEF53 => "ext2/3/4".into(),
                0x0102_1994 => "tmpfs".into(),
                0x5846_5342 => "xfs".into(),
                0x9123_683E => "btrfs".into(),
                0x794C_7630 => "overlayfs".into(),
                0x2FC1_2FC1 => "zfs".into(),
                other => format!("0x{other:x}"),
            };
        }
    }
    // The mount with the longest mount point that is a prefix of the path.
    let abs = fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let mut best = (0usize, String::new());
    if let Ok(m) = fs::read_to_string("/proc/mounts") {
        for l in m.lines() {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() >= 4 && abs.starts_with(f[1]) && f[1].len() >= best.0 {
                best = (f[1].len(), format!("{} on {} type {} ({})", f[0], f[1], f[2], f[3]));
            }
        }
    }
    (kind, best.1)
}

fn raise_nofile(want: u64) -> (u64, u64) {
    // SAFETY: getrlimit/setrlimit on our own process with a struct we own.
    unsafe {
        let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return (0, 0);
        }
        if r.rlim_cur < want {
            let nr = libc::rlimit { rlim_cur: want.min(r.rlim_max), rlim_max: r.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &nr) == 0 {
                r.rlim_cur = nr.rlim_cur;
            }
        }
        (r.rlim_cur, r.rlim_max)
    }
}

// ---------------------------------------------------------------------------
// Targets of issue 5
// ---------------------------------------------------------------------------

struct Target {
    name: &'static str,
    measured: Option<f64>,
    at_least: bool,
    goal: f64,
    unit: &'static str,
    note: String,
}

impl Target {
    fn at_least(
        name: &'static str,
        measured: Option<f64>,
        goal: f64,
        unit: &'static str,
        note: String,
    ) -> Target {
        Target { name, measured, at_least: true, goal, unit, note }
    }

    fn at_most(
        name: &'static str,
        measured: Option<f64>,
        goal: f64,
        unit: &'static str,
        note: String,
    ) -> Target {
        Target { name, measured, at_least: false, goal, unit, note }
    }

    fn met(&self) -> Option<bool> {
        self.measured.map(|m| if self.at_least { m >= self.goal } else { m <= self.goal })
    }

    fn json(&self) -> J {
        let mut j = J::obj();
        j.set("name", self.name);
        j.set("measured", self.measured);
        j.set(
            "goal",
            format!("{} {} {}", if self.at_least { ">=" } else { "<=" }, json_num(self.goal), self.unit),
        );
        j.set("met", self.met());
        j.set("measured_over_goal", self.measured.map(|m| m / self.goal));
        j.set("note", self.note.clone());
        j
    }
}

// ---------------------------------------------------------------------------
// The run
// ---------------------------------------------------------------------------

/// What every scenario needs.
struct Ctx<'a> {
    addr: SocketAddr,
    server: Option<&'a Server>,
    key: &'a RsaPrivateKey,
    run_tag: String,
}

fn bench_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench")
}

fn run(o: &Opts) -> Res<bool> {
    let mut cleanup = Vec::new();
    let r = run_measured(o, &mut cleanup);
    // Deleting many files makes the next file creations on the same ext4
    // block groups slow for about 30 s when the filesystem has no journal
    // (ext4 then skips recently deleted inodes, reading each one's inode
    // table block), so nothing is deleted before the last measurement.
    for d in cleanup {
        let _ = fs::remove_dir_all(d);
    }
    r
}

fn run_measured(o: &Opts, cleanup: &mut Vec<PathBuf>) -> Res<bool> {
    let dir = bench_dir();
    fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let (nofile, nofile_max) =
        raise_nofile((o.idle_clients + o.small_clients + o.multi_clients + 256) as u64);
    let want = |s: Scn| o.scenarios.contains(&s);
    let mut ok = true;

    // Machine.
    let (fs_kind, mount) = fs_info(&dir);
    let git_rev = cmd_out("git", &["-C", env!("CARGO_MANIFEST_DIR"), "rev-parse", "HEAD"]);
    let git_dirty =
        cmd_out("git", &["-C", env!("CARGO_MANIFEST_DIR"), "status", "--porcelain", "--untracked-files=no"])
            .map(|s| !s.is_empty());
    let mut top = J::obj();
    top.set("timestamp", cmd_out("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]));
    top.set("git_revision", git_rev.clone());
    top.set("git_dirty", git_dirty);
    top.set("nproc", nproc());
    top.set("kernel", cmd_out("uname", &["-r"]));
    top.set("cpu_model", cpu_model());
    top.set("mem_total_mib", mem_total_mib());
    top.set("loadavg_at_start", fs::read_to_string("/proc/loadavg").ok().map(|s| s.trim().to_string()));
    top.set("mode", if o.quick { "quick" } else { "full" });
    top.set("target", o.target.clone());
    top.set(
        "scenarios_selected",
        o.scenarios.iter().map(|s| format!("{s:?}").to_lowercase()).collect::<Vec<_>>(),
    );
    let mut fsj = J::obj();
    fsj.set("path", dir.display().to_string());
    fsj.set("fs_type", fs_kind.clone());
    fsj.set("mount", mount.clone());
    top.set("bench_dir", fsj);
    top.set("rlimit_nofile", nofile);

    println!("backupd load benchmark ({} mode)", if o.quick { "quick" } else { "full" });
    line(
        "machine",
        format!(
            "{} cores, {}, kernel {}",
            nproc(),
            cpu_model().unwrap_or_default(),
            cmd_out("uname", &["-r"]).unwrap_or_default()
        ),
    );
    line(
        "git",
        format!(
            "{}{}",
            git_rev.unwrap_or_default(),
            if git_dirty == Some(true) { " (dirty tree)" } else { "" }
        ),
    );
    line("bench dir filesystem", format!("{fs_kind}: {mount}"));
    line("load average at start", fs::read_to_string("/proc/loadavg").unwrap_or_default().trim());
    line("RLIMIT_NOFILE", format!("{nofile} (hard {nofile_max})"));
    if fs_kind == "tmpfs" {
        println!("  WARNING: {} is on tmpfs: the fsync figures mean nothing there", dir.display());
    }

    // Binary.
    let mut binary_mib = None;
    if o.target.is_none() {
        let size = fs::metadata(&o.server_bin).map(|m| m.len()).ok();
        let stripped_path = dir.join("backupd.stripped");
        let stripped = cmd_out(
            "strip",
            &["-o", &stripped_path.display().to_string(), &o.server_bin.display().to_string()],
        )
        .and_then(|_| fs::metadata(&stripped_path).map(|m| m.len()).ok());
        let _ = fs::remove_file(&stripped_path);
        let mut b = J::obj();
        b.set("path", o.server_bin.display().to_string());
        b.set("size_bytes", size);
        b.set("stripped_size_bytes", stripped);
        top.set("binary", b);
        binary_mib = stripped.or(size).map(|b| b as f64 / MIB as f64);
        line(
            "release binary",
            format!(
                "{} bytes; stripped {} bytes ({:.2} MiB)",
                size.map_or("n/a".into(), |s| s.to_string()),
                stripped.map_or("n/a".into(), |s| s.to_string()),
                binary_mib.unwrap_or(f64::NAN)
            ),
        );
    }

    // Limits.
    if want(Scn::Limits) && o.wait_quiet > 0 {
        wait_quiet(o.wait_quiet, "limits");
    }
    cleanup.push(dir.join(format!("limits-{}", std::process::id())));
    let limits = if want(Scn::Limits) { measure_limits(o, &dir)? } else { Limits::default() };
    top.set("limits", limits.json.clone());

    // Server scenarios, each on a freshly started server with its own data
    // directory, so that what one scenario leaves in memory is not the next
    // one's baseline.
    let runs: Vec<&str> = [
        ("small", Scn::Small),
        ("large_single", Scn::Large),
        ("large_multi", Scn::Large),
        ("idle", Scn::Idle),
        ("attack", Scn::Attack),
    ]
    .into_iter()
    .filter(|r| want(r.1))
    .map(|r| r.0)
    .collect();
    let mut scen = J::obj();
    let mut targets = Vec::new();
    let mut rss_starts = Samples::default();
    // Scenario 1's figures, shown again beside scenario 4's.
    let mut quiet_small: Option<(f64, Lat)> = None;
    if !runs.is_empty() {
        eprintln!("[load] generating the client RSA key");
        let key = RsaPrivateKey::new(&mut rand::rngs::OsRng, 1024).map_err(|e| format!("RSA keygen: {e}"))?;
        let secs =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let run_tag = format!("bench{}x{secs}", std::process::id());
        let target_addr = match &o.target {
            Some(t) => Some(
                t.to_socket_addrs()
                    .map_err(|e| format!("--target {t}: {e}"))?
                    .next()
                    .ok_or(format!("--target {t}: no address"))?,
            ),
            None => None,
        };
        match (&o.target, target_addr) {
            (Some(t), Some(a)) => println!("\n== server: external {t} ({a}): client-side figures only =="),
            _ => println!(
                "\n== server: {} {}, started afresh (own data dir) for every scenario ==",
                o.server_bin.display(),
                o.server_args.join(" ")
            ),
        }
        for run_name in runs {
            let quiet = (o.wait_quiet > 0).then(|| wait_quiet(o.wait_quiet, run_name));
            let data_dir = dir.join(format!("data-{}-{run_name}", std::process::id()));
            let mut server = match target_addr {
                Some(_) => None,
                None => {
                    let _ = fs::remove_dir_all(&data_dir);
                    Some(Server::start(&o.server_bin, &data_dir, &run_server_args(o, run_name))?)
                }
            };
            let addr = target_addr.or(server.as_ref().map(|s| s.addr)).ok_or("no server address")?;
            let mut sj = J::obj();
            sj.set("address", addr.to_string());
            sj.set("other_processes_cores_before", quiet);
            let mut start_line = String::new();
            if let Some(s) = &server {
                thread::sleep(Duration::from_millis(300));
                let (rss, hwm) = (s.rss_kib(), s.hwm_kib());
                if let Some(r) = mib(rss) {
                    rss_starts.0.push(r);
                }
                sj.set("pid", s.pid);
                sj.set("args", o.server_args.clone());
                sj.set("rss_after_start_mib", mib(rss));
                sj.set("peak_rss_at_start_mib", mib(hwm));
                start_line =
                    format!("server RSS after start {} (peak so far {})", show_mib(rss), show_mib(hwm));
            }
            let (mut j, expected_files) = {
                let ctx = Ctx { addr, server: server.as_ref(), key: &key, run_tag: run_tag.clone() };
                let has_server = ctx.server.is_some();
                match run_name {
                    "small" => {
                        println!(
                            "\n== scenario 1: small files ({} clients x {} B, {} files/round, {} rounds) ==",
                            o.small_clients, o.small_size, o.small_count, o.rounds
                        );
                        println!("  {start_line}");
                        let r = scenario_small(o, &ctx, "small")?;
                        quiet_small = Some((r.rate.median(), r.total));
                        r.print(o, &limits, has_server);
                        ok &= r.errors.is_empty();
                        targets.push(Target::at_least(
                            "small files/s",
                            Some(r.rate.median()),
                            3000.0,
                            "files/s",
                            format!("{} clients, median of {} rounds", o.small_clients, o.rounds),
                        ));
                        targets.push(Target::at_most(
                            "small-file latency p99",
                            Some(r.total.p99),
                            5.0,
                            "ms",
                            format!("{} clients", o.small_clients),
                        ));
                        (r.json(o), r.files)
                    }
                    "large_single" => {
                        println!(
                            "\n== scenario 2a: one {} MiB file in 1 MiB packets ({} rounds) ==",
                            o.large_mib, o.rounds
                        );
                        println!("  {start_line}");
                        let r = scenario_large(o, &ctx, "large", 1, o.large_mib)?;
                        r.print(&limits, has_server);
                        ok &= r.errors.is_empty();
                        targets.push(Target::at_least(
                            "single large upload",
                            Some(r.rate.median()),
                            550.0,
                            "MB/s",
                            format!("{} MiB file, median of {} rounds", o.large_mib, o.rounds),
                        ));
                        if has_server {
                            targets.push(Target::at_most(
                                "peak RSS, single large upload",
                                mib(r.measured.peak_kib),
                                32.0,
                                "MiB",
                                format!("{} MiB file", o.large_mib),
                            ));
                        }
                        (r.json(o), r.parts.len())
                    }
                    "large_multi" => {
                        println!(
                            "\n== scenario 2b: {} clients x {} MiB in parallel ({} rounds) ==",
                            o.multi_clients, o.multi_mib, o.rounds
                        );
                        println!("  {start_line}");
                        let r = scenario_large(o, &ctx, "multi", o.multi_clients, o.multi_mib)?;
                        r.print(&limits, has_server);
                        ok &= r.errors.is_empty();
                        if has_server {
                            targets.push(Target::at_most(
                                "peak RSS, parallel large uploads",
                                mib(r.measured.peak_kib),
                                32.0,
                                "MiB",
                                format!("{} x {} MiB", o.multi_clients, o.multi_mib),
                            ));
                        }
                        (r.json(o), r.parts.len())
                    }
                    "attack" => {
                        attack::print_title(o, &ctx);
                        println!("  {start_line}");
                        let r = attack::scenario_attack(o, &ctx)?;
                        r.print(quiet_small, has_server);
                        (r.json(quiet_small), r.files())
                    }
                    _ => {
                        println!(
                            "\n== scenario 3: {} idle clients, then small files ({} clients) ==",
                            o.idle_clients, o.small_clients
                        );
                        println!("  {start_line}");
                        let r = scenario_idle(o, &ctx)?;
                        r.print(o, &limits, has_server);
                        ok &=
                            r.small.errors.is_empty() && r.errors.is_empty() && r.alive_after == r.connected;
                        if has_server {
                            targets.push(Target::at_most(
                                "RSS with the idle connections",
                                mib(r.rss_idle_kib),
                                12.0,
                                "MiB",
                                format!("{} idle connections (the goal is for 1000)", r.connected),
                            ));
                        }
                        targets.push(Target::at_most(
                            "small-file p99, idle clients open",
                            Some(r.small.total.p99),
                            5.0,
                            "ms",
                            "the 5 ms goal is scenario 1's; shown for comparison".into(),
                        ));
                        (r.json(o), r.small.files)
                    }
                }
            };
            if let Some(s) = server.as_mut() {
                let on_disk = count_files(&s.data_dir.join("files"));
                let (code, secs) = s.stop();
                let mut st = J::obj();
                st.set("exit_code", code);
                st.set("seconds", secs);
                st.set("files_on_disk", on_disk);
                st.set("files_confirmed", expected_files);
                sj.set("stop", st);
                line(
                    "server stop (SIGTERM)",
                    format!(
                        "exit code {} after {secs:.2} s; {on_disk} files in files/, {expected_files} confirmed",
                        code.map_or("none (killed)".into(), |c| c.to_string())
                    ),
                );
                if code != Some(0) || on_disk != expected_files {
                    ok = false;
                    println!("  UNEXPECTED: server log tail:\n{}", s.log_tail());
                }
            }
            j.set("server_process", sj);
            scen.set(run_name, j);
            if !o.keep_data {
                cleanup.push(data_dir);
            }
        }
    }
    top.set("scenarios", scen);

    if o.target.is_none() && !rss_starts.0.is_empty() {
        targets.insert(
            0,
            Target::at_most(
                "RSS idle (after start)",
                Some(rss_starts.median()),
                4.0,
                "MiB",
                format!("median of {} starts", rss_starts.0.len()),
            ),
        );
    }
    if o.target.is_none() {
        targets.push(Target::at_most("stripped release binary", binary_mib, 2.0, "MiB", String::new()));
    }
    println!("\n== targets of issue 5 ==");
    for t in &targets {
        let verdict = match t.met() {
            Some(true) => "met",
            Some(false) => "MISSED",
            None => "n/a",
        };
        println!(
            "  {:<34} {:>9} {:<8} goal {} {:<5} {verdict:<7} {:>6}{}",
            t.name,
            t.measured.map_or("n/a".into(), |m| format!("{m:.2}")),
            t.unit,
            if t.at_least { ">=" } else { "<=" },
            json_num(t.goal),
            t.measured.map_or("".into(), |m| format!("{:.2}x", m / t.goal)),
            if t.note.is_empty() { String::new() } else { format!("  ({})", t.note) }
        );
    }
    top.set("targets", J::Arr(targets.iter().map(Target::json).collect()));
    top.set("all_uploads_ok", ok);

    let mut out = String::new();
    top.render(&mut out, 0);
    out.push('\n');
    let path = dir.join("results.json");
    fs::write(&path, out).map_err(|e| format!("{}: {e}", path.display()))?;
    println!("\nall figures: {}", path.display());
    Ok(ok)
}

/// Wait (up to `max_secs`) until the rest of the machine uses less than a
/// quarter of a core, sampled over 2 s. Returns the last sample, in cores.
fn wait_quiet(max_secs: u64, what: &str) -> f64 {
    let t0 = Instant::now();
    loop {
        let a = cpu_snap(None);
        thread::sleep(Duration::from_secs(2));
        let u = CpuUse::between(&a, &cpu_snap(None));
        let others = u.others() / u.wall;
        if others < 0.25 || t0.elapsed() >= Duration::from_secs(max_secs) {
            eprintln!(
                "[load] {what}: other processes use {others:.2} cores (waited {:.0} s for quiet)",
                t0.elapsed().as_secs_f64()
            );
            return others;
        }
    }
}

fn count_files(dir: &Path) -> usize {
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

// ---------------------------------------------------------------------------
// Self-checks (cargo test)
// ---------------------------------------------------------------------------

fn self_check() {
    // The periodic large file decrypts, as one stream, to a plaintext of
    // the announced size with the announced cksum.
    let key = [0x17u8; AES_KEY_LEN];
    for mib in [1u64, 3] {
        let mut f = BigFile::new(&key, mib, 5);
        f.address(&[1; 16], "x.bin").expect("address");
        assert_eq!(f.packets() as u64, mib + 1);
        let mut dec = StreamDecryptor::new(&key);
        let mut ck = Cksum::new();
        for _ in 0..mib {
            let mut piece = f.frame[REQUEST_HEADER_LEN + PACKET_HEADER_LEN..].to_vec();
            dec.update(&mut piece, |p| ck.update(p));
        }
        let mut last = f.last[REQUEST_HEADER_LEN + PACKET_HEADER_LEN..].to_vec();
        assert_eq!(last.len(), 16);
        dec.update(&mut last, |p| ck.update(p));
        dec.finish(|p| ck.update(p)).expect("valid padding");
        assert_eq!(ck.len(), f.orig());
        assert_eq!(ck.finalize(), f.cksum);
        // The frames parse as the server would read them.
        let h: [u8; REQUEST_HEADER_LEN] = f.last[..REQUEST_HEADER_LEN].try_into().expect("header");
        let h = RequestHeader::decode(&h);
        assert_eq!(h.check(16 << 20), Ok(Code::FilePacket));
        assert_eq!(h.payload_size as usize, f.last.len() - REQUEST_HEADER_LEN);
        let ph = PacketHeader::decode(&f.last[REQUEST_HEADER_LEN..]).expect("packet header");
        assert_eq!((ph.packet_number, ph.total_packets, ph.content_size), (f.packets(), f.packets(), 16));
        assert_eq!(ph.file_name.bytes(), b"x.bin");
    }
    // Percentiles are nearest-rank.
    let v: Vec<u32> = (1..=100).collect();
    assert_eq!((percentile(&v, 50.0), percentile(&v, 99.0), percentile(&v, 100.0)), (50, 99, 100));
    assert_eq!(percentile(&[7], 99.0), 7);
    // JSON escaping and numbers.
    let mut s = String::new();
    let mut o = J::obj();
    o.set("a\"b", "x\ny\u{1}");
    o.set("n", vec![1.5f64, 2.0, f64::NAN]);
    o.render(&mut s, 0);
    assert_eq!(s, "{\n  \"a\\\"b\": \"x\\ny\\u0001\",\n  \"n\": [1.5, 2, null]\n}");
    // Flags.
    let args: Vec<String> = ["--quick", "--scenario", "small,idle", "--large-mib=64", "--bench"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let o = parse_opts(&args).expect("flags");
    assert!(o.quick);
    assert_eq!(o.scenarios, vec![Scn::Small, Scn::Idle]);
    assert_eq!(o.large_mib, 64);
    assert_eq!(parse_scenarios("attack").expect("attack"), vec![Scn::Attack]);
    assert!(parse_scenarios("all").expect("all").contains(&Scn::Attack));
    attack::self_check();
    assert!(parse_opts(&["--large-mib".to_string(), "5000".to_string()]).is_err());
    assert!(parse_opts(&["--nope".to_string()]).is_err());
    assert!(hides_info(&["--log-level".to_string(), "WARN".to_string()]));
    assert!(hides_info(&["--log-level=error".to_string()]));
    assert!(!hides_info(&["--log-level=debug".to_string()]));
    assert!(!hides_info(&[]));
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if !args.iter().any(|a| a == "--bench") {
        // `cargo test --all-targets` runs this binary without `--bench`.
        self_check();
        println!(
            "load: self-checks passed; run the benchmark with `make bench` or `cargo bench --bench load`"
        );
        return;
    }
    let opts = match parse_opts(&args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("load: {e}");
            std::process::exit(2);
        }
    };
    match run(&opts) {
        Ok(true) => {}
        Ok(false) => {
            eprintln!("load: some uploads failed or the server did not stop cleanly (see above)");
            std::process::exit(1);
        }
        Err(e) => {
            eprintln!("load: {e}");
            std::process::exit(1);
        }
    }
}
