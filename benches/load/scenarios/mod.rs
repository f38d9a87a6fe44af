//! The scenarios, one module each, and what runs them: every scenario on a
//! freshly started server with its own data directory.
//!
//! * [`small`]: scenario 1, small files;
//! * [`large`]: scenario 2a, one large file;
//! * [`parallel`]: scenario 2b, large files in parallel;
//! * [`idle`]: scenario 3, idle connections;
//! * [`attack`]: scenario 4, small files under attack;
//! * [`replica`]: scenario 5, replication to S3 off vs on (its own servers).

use std::fs;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::Duration;

use rsa::RsaPrivateKey;

use crate::cli::{Opts, Scn};
use crate::json::{Obj as _, J};
use crate::limits::Limits;
use crate::report::{line, Lat, Samples, Target};
use crate::server::{count_files, run_server_args, Server};
use crate::usage::{mib, show_mib, wait_quiet};
use crate::Res;

pub(crate) mod attack;
pub(crate) mod idle;
pub(crate) mod large;
pub(crate) mod parallel;
pub(crate) mod replica;
pub(crate) mod small;

/// What every scenario needs.
pub(crate) struct Ctx<'a> {
    addr: SocketAddr,
    server: Option<&'a Server>,
    key: &'a RsaPrivateKey,
    run_tag: String,
}

/// What the scenarios of a run add up to.
#[derive(Default)]
pub(crate) struct Totals {
    /// The targets of issue 5 the scenarios measured, in order.
    pub(crate) targets: Vec<Target>,
    /// The server's RSS after each start, MiB.
    pub(crate) rss_starts: Samples,
    /// Scenario 1's figures, shown again beside scenario 4's.
    quiet_small: Option<(f64, Lat)>,
    /// Every upload succeeded and every server stopped cleanly.
    pub(crate) ok: bool,
}

/// Each selected scenario, each on a fresh server (or on `--target`): their
/// `results.json` objects and their totals.
pub(crate) fn run_scenarios(
    o: &Opts,
    dir: &Path,
    limits: &Limits,
    cleanup: &mut Vec<PathBuf>,
) -> Res<(J, Totals)> {
    let want = |s: Scn| o.scenarios.contains(&s);
    let runs: Vec<&str> = [
        ("small", Scn::Small),
        ("small_many", Scn::Small),
        ("large_single", Scn::Large),
        ("large_multi", Scn::Large),
        ("idle", Scn::Idle),
        ("attack", Scn::Attack),
        ("replica", Scn::Replica),
    ]
    .into_iter()
    .filter(|r| want(r.1))
    .map(|r| r.0)
    .collect();
    let mut scen = J::obj();
    let mut totals = Totals { ok: true, ..Totals::default() };
    if runs.is_empty() {
        return Ok((scen, totals));
    }
    eprintln!("[load] generating the client RSA key");
    let key = RsaPrivateKey::new(&mut rand::rngs::OsRng, 1024).map_err(|e| format!("RSA keygen: {e}"))?;
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
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
        let set = if o.confinement.is_some() { "-confined" } else { "" };
        let data_dir = dir.join(format!("data-{}-{run_name}{set}", std::process::id()));
        let one = One { o, limits, key: &key, run_tag: &run_tag, target_addr };
        let j = one.run(run_name, &data_dir, &mut totals)?;
        scen.set(run_name, j);
        if !o.keep_data {
            cleanup.push(data_dir);
        }
    }
    Ok((scen, totals))
}

/// One scenario's run, on its own server.
struct One<'a> {
    o: &'a Opts,
    limits: &'a Limits,
    key: &'a RsaPrivateKey,
    run_tag: &'a str,
    target_addr: Option<SocketAddr>,
}

impl One<'_> {
    fn run(&self, run_name: &str, data_dir: &Path, totals: &mut Totals) -> Res<J> {
        let o = self.o;
        if run_name == "replica" {
            let dir = data_dir.parent().unwrap_or(data_dir);
            return replica::run(o, dir, self.key, self.run_tag, totals);
        }
        let quiet = (o.wait_quiet > 0).then(|| wait_quiet(o.wait_quiet, run_name));
        let mut server = match self.target_addr {
            Some(_) => None,
            None => {
                let _ = fs::remove_dir_all(data_dir);
                Some(Server::start(
                    &o.server_bin,
                    data_dir,
                    &run_server_args(o, run_name),
                    o.confinement.as_deref(),
                )?)
            }
        };
        let addr = self.target_addr.or(server.as_ref().map(|s| s.addr)).ok_or("no server address")?;
        let mut sj = J::obj();
        sj.set("address", addr.to_string());
        sj.set("other_processes_cores_before", quiet);
        let mut start_line = String::new();
        if let Some(s) = &server {
            start_line = after_start(o, s, &mut sj, totals);
        }
        let (mut j, expected_files) = {
            let ctx = Ctx { addr, server: server.as_ref(), key: self.key, run_tag: self.run_tag.to_string() };
            self.scenario(run_name, &ctx, &start_line, totals)?
        };
        if let Some(s) = server.as_mut() {
            totals.ok &= stop(s, &mut sj, expected_files);
        }
        j.set("server_process", sj);
        Ok(j)
    }

    /// The scenario itself: its figures and the number of files it confirmed.
    fn scenario(&self, run_name: &str, ctx: &Ctx, start_line: &str, totals: &mut Totals) -> Res<(J, usize)> {
        let (o, limits) = (self.o, self.limits);
        match run_name {
            "small" => small::run(o, ctx, limits, start_line, totals),
            "small_many" => small::run_many(o, ctx, limits, start_line, totals),
            "large_single" => large::run(o, ctx, limits, start_line, totals),
            "large_multi" => parallel::run(o, ctx, limits, start_line, totals),
            "attack" => attack::run(o, ctx, start_line, totals),
            _ => idle::run(o, ctx, limits, start_line, totals),
        }
    }
}

/// The server's memory once started: into `sj` and the totals; the line
/// that says it.
fn after_start(o: &Opts, s: &Server, sj: &mut J, totals: &mut Totals) -> String {
    thread::sleep(Duration::from_millis(300));
    let (rss, hwm) = (s.rss_kib(), s.hwm_kib());
    if let Some(r) = mib(rss) {
        totals.rss_starts.0.push(r);
    }
    sj.set("pid", s.pid);
    sj.set("args", o.server_args.clone());
    sj.set("rss_after_start_mib", mib(rss));
    sj.set("peak_rss_at_start_mib", mib(hwm));
    format!("server RSS after start {} (peak so far {})", show_mib(rss), show_mib(hwm))
}

/// Stop the server (SIGTERM) and check that it exited 0 with every
/// confirmed file on disk.
fn stop(s: &mut Server, sj: &mut J, expected_files: usize) -> bool {
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
        println!("  UNEXPECTED: server log tail:\n{}", s.log_tail());
        return false;
    }
    true
}
