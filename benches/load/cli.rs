//! The flags of the load benchmark (`--help`) and their defaults.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::confine::Confinement;

use crate::scenarios::attack;
use crate::Res;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scn {
    Small,
    Large,
    Idle,
    Attack,
    Limits,
    Replica,
}

#[derive(Debug, Clone)]
pub(crate) struct Opts {
    pub(crate) quick: bool,
    pub(crate) scenarios: Vec<Scn>,
    pub(crate) rounds: usize,
    pub(crate) small_count: usize,
    pub(crate) small_clients: usize,
    /// Clients of scenario 1b (small files with many active clients, issue 14).
    pub(crate) many_clients: usize,
    /// Scenario 1b's second part: the same clients sending this many files/s
    /// together, each at its own steady pace (an open load; 0: skipped).
    pub(crate) many_rate: f64,
    /// Set for that part: the small-file clients' aggregate pace (0: as fast
    /// as each can, one file after another).
    pub(crate) small_rate: f64,
    pub(crate) small_size: usize,
    pub(crate) large_mib: u64,
    pub(crate) multi_clients: usize,
    pub(crate) multi_mib: u64,
    pub(crate) idle_clients: usize,
    /// Seconds of each quiet and each attack phase of scenario 4.
    pub(crate) attack_secs: u64,
    /// Which of scenario 4's kinds of attackers run (slow, slots, refusals, registrations).
    pub(crate) attack_kinds: [bool; 4],
    // Limits.
    pub(crate) tcp_mib: u64,
    pub(crate) pipeline_mib: u64,
    pub(crate) fsync_files: usize,
    pub(crate) seq_mib: u64,
    pub(crate) limit_iters: usize,
    pub(crate) target: Option<String>,
    pub(crate) server_bin: PathBuf,
    pub(crate) server_args: Vec<String>,
    pub(crate) keep_data: bool,
    pub(crate) wait_quiet: u64,
    /// `--confined`: after the scenarios, run them again with the server on
    /// one core and 256 MB, reported beside.
    pub(crate) confined: bool,
    /// Set for that second pass: how the servers it starts are confined.
    pub(crate) confinement: Option<Arc<Confinement>>,
}

impl Opts {
    pub(crate) fn defaults(quick: bool) -> Opts {
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
        let common = Opts {
            quick,
            scenarios: vec![Scn::Limits, Scn::Small, Scn::Large, Scn::Idle, Scn::Attack, Scn::Replica],
            rounds: 3,
            small_count: 10_000,
            small_clients: 16,
            many_clients: 256,
            many_rate: 4000.0,
            small_rate: 0.0,
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
            confined: false,
            confinement: None,
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

pub(crate) const HELP: &str = "\
load: backupd load benchmark (issue 5). Run via `cargo bench --bench load -- FLAGS`.

  --quick                 everything small (about a minute)
  --scenario LIST         comma-separated: small,large,idle,attack,replica,limits (or all) [all]
  --rounds N              timed rounds per scenario [3; quick 2]
  --small-count N         files per small-file round [10000; quick 1000]
  --small-clients N       concurrent small-file clients [16]
  --many-clients N        clients of scenario 1b, small files with many active clients [256]
  --many-rate N           then the same clients at N files/s together, each at a steady pace
                          (an open load: latency counted from each file's scheduled start) [4000; 0: skip]
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
  --confined              then the same scenarios again with the server confined to one core
                          (taskset -c 0) and 256 MB (systemd-run, a cgroup or prlimit, as
                          available: the report names it), reported beside the first set
  --wait-quiet SECS       before the limits and each scenario, wait up to SECS for the rest of
                          the machine to use < 0.25 cores (shared machines) [0: don't wait]
";

pub(crate) fn parse_num<T: std::str::FromStr>(s: &str, flag: &str) -> Res<T> {
    s.trim().parse().map_err(|_| format!("{flag}: invalid number {s:?}"))
}

pub(crate) fn parse_scenarios(s: &str) -> Res<Vec<Scn>> {
    let mut v = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part {
            "small" => v.push(Scn::Small),
            "large" => v.push(Scn::Large),
            "idle" => v.push(Scn::Idle),
            "attack" => v.push(Scn::Attack),
            "limits" => v.push(Scn::Limits),
            "replica" => v.push(Scn::Replica),
            "all" => v.extend([Scn::Limits, Scn::Small, Scn::Large, Scn::Idle, Scn::Attack, Scn::Replica]),
            other => {
                return Err(format!(
                    "--scenario: unknown scenario {other:?} (small, large, idle, attack, replica, limits)"
                ))
            }
        }
    }
    if v.is_empty() {
        return Err("--scenario: empty list".into());
    }
    Ok(v)
}

pub(crate) fn parse_opts(args: &[String]) -> Res<Opts> {
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
            "--many-clients" => o.many_clients = parse_num(&val()?, &flag)?,
            "--many-rate" => o.many_rate = parse_num::<usize>(&val()?, &flag)? as f64,
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
            "--confined" => o.confined = true,
            "--wait-quiet" => o.wait_quiet = parse_num(&val()?, &flag)?,
            other => return Err(format!("unknown flag {other:?} (see --help)")),
        }
    }
    if o.rounds == 0
        || o.small_clients == 0
        || o.many_clients == 0
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
