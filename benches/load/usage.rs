//! /proc: the memory and CPU time of the server, of the harness and of the
//! rest of the machine, and what a scenario cost the server.

use std::collections::HashMap;
use std::fs;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use crate::json::{Obj as _, J};
use crate::report::line;
use crate::server::Server;

/// A field of /proc/<pid>/status in KiB (VmRSS, VmHWM, ...).
pub(crate) fn status_kib(pid: u32, key: &str) -> Option<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with(key) && l[key.len()..].starts_with(':'))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

pub(crate) fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// Name, utime and stime (ticks) of a /proc task from its stat file.
pub(crate) fn stat_ticks(path: &Path) -> Option<(String, u64, u64)> {
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
pub(crate) fn machine_busy_ticks() -> u64 {
    let Ok(s) = fs::read_to_string("/proc/stat") else { return 0 };
    let Some(l) = s.lines().next() else { return 0 };
    let v: Vec<u64> = l.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal (guest is inside user)
    let at = |i: usize| v.get(i).copied().unwrap_or(0);
    at(0) + at(1) + at(2) + at(5) + at(6) + at(7)
}

#[derive(Debug, Clone)]
pub(crate) struct CpuSnap {
    at: Instant,
    /// Server threads by tid: (name, user ticks, system ticks, run-queue wait ns).
    threads: HashMap<String, (String, u64, u64, u64)>,
    harness: u64,
    machine: u64,
}

pub(crate) fn cpu_snap(server: Option<u32>) -> CpuSnap {
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
pub(crate) struct CpuUse {
    wall: f64,
    /// Server threads by role ("loop", "worker", other names): user and
    /// system CPU seconds, seconds runnable but waiting for a CPU.
    server: Vec<(String, f64, f64, f64)>,
    harness: f64,
    machine: f64,
}

impl CpuUse {
    pub(crate) fn between(a: &CpuSnap, b: &CpuSnap) -> CpuUse {
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

    pub(crate) fn server_total(&self) -> f64 {
        self.server.iter().map(|r| r.1 + r.2).sum()
    }

    pub(crate) fn others(&self) -> f64 {
        (self.machine - self.server_total() - self.harness).max(0.0)
    }

    pub(crate) fn json(&self) -> J {
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

    pub(crate) fn show(&self, with_server: bool) -> String {
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

pub(crate) fn nproc() -> usize {
    thread::available_parallelism().map_or(1, |n| n.get())
}

/// What a scenario cost the server: memory and CPU.
pub(crate) struct Probe<'a> {
    server: Option<&'a Server>,
    cpu0: CpuSnap,
    rss0: Option<u64>,
    peak_reset: bool,
    log0: (u64, u64),
}

pub(crate) struct Measured {
    pub(crate) cpu: CpuUse,
    rss_before_kib: Option<u64>,
    pub(crate) peak_kib: Option<u64>,
    peak_reset: bool,
    rss_after_kib: Option<u64>,
    pub(crate) warn: u64,
    pub(crate) error: u64,
    /// The last of those lines.
    last_bad: Option<String>,
}

impl<'a> Probe<'a> {
    pub(crate) fn begin(server: Option<&'a Server>) -> Probe<'a> {
        let peak_reset = server.is_some_and(|s| s.reset_peak());
        Probe {
            server,
            cpu0: cpu_snap(server.map(|s| s.pid)),
            rss0: server.and_then(|s| s.rss_kib()),
            peak_reset,
            log0: server.map_or((0, 0), |s| s.log_counts()),
        }
    }

    pub(crate) fn end(self) -> Measured {
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
            last_bad: s.and_then(|s| s.last_bad_line()),
        }
    }
}

pub(crate) fn mib(kib: Option<u64>) -> Option<f64> {
    kib.map(|k| k as f64 / 1024.0)
}

pub(crate) fn show_mib(kib: Option<u64>) -> String {
    mib(kib).map_or("n/a".into(), |m| format!("{m:.1} MiB"))
}

impl Measured {
    pub(crate) fn json(&self) -> J {
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

    pub(crate) fn print(&self, server: bool) {
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
            if let Some(l) = &self.last_bad {
                line("  the last of them", l.chars().take(160).collect::<String>());
            }
        }
    }
}

/// Wait (up to `max_secs`) until the rest of the machine uses less than a
/// quarter of a core, sampled over 2 s. Returns the last sample, in cores.
pub(crate) fn wait_quiet(max_secs: u64, what: &str) -> f64 {
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
