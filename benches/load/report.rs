//! Reporting: the statistics of the figures, the stdout lines, the targets
//! of issue 5 and `target/bench/results.json`.

use std::fs;
use std::path::Path;
use std::time::Duration;

use crate::json::{json_num, render, Obj as _, J};
use crate::Res;

/// Repeated measurements of a rate (higher is better).
#[derive(Debug, Clone, Default)]
pub(crate) struct Samples(pub(crate) Vec<f64>);

impl Samples {
    pub(crate) fn median(&self) -> f64 {
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

    pub(crate) fn best(&self) -> f64 {
        self.0.iter().copied().fold(f64::NAN, f64::max)
    }

    pub(crate) fn json(&self) -> J {
        let mut o = J::obj();
        o.set("median", self.median());
        o.set("best", self.best());
        o.set("samples", self.0.clone());
        o
    }

    pub(crate) fn show(&self, unit: &str) -> String {
        format!("median {:>9.1} {unit}   best {:>9.1}", self.median(), self.best())
    }
}

/// The `p`th percentile (nearest rank) of sorted values.
pub(crate) fn percentile(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Latency summary in milliseconds from microsecond samples.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Lat {
    n: usize,
    pub(crate) p50: f64,
    pub(crate) p99: f64,
    pub(crate) max: f64,
    mean: f64,
    /// The distribution: percentile 0 (the least), 1, ..., 100 (the most).
    pub(crate) percentiles: [f64; 101],
}

pub(crate) fn lat_summary(us: &mut [u32]) -> Lat {
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
        percentiles: std::array::from_fn(|p| {
            ms(if p == 0 { us.first().copied().unwrap_or(0) } else { percentile(us, p as f64) })
        }),
    }
}

impl Lat {
    pub(crate) fn json(&self) -> J {
        let mut o = J::obj();
        o.set("count", self.n);
        o.set("p50_ms", self.p50);
        o.set("p99_ms", self.p99);
        o.set("max_ms", self.max);
        o.set("mean_ms", self.mean);
        o.set("percentiles_ms", self.percentiles.to_vec());
        o
    }

    pub(crate) fn show(&self) -> String {
        format!("p50 {:.2}  p99 {:.2}  max {:.2}  mean {:.2} ms", self.p50, self.p99, self.max, self.mean)
    }
}

pub(crate) fn mb_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / 1e6 / d.as_secs_f64().max(1e-9)
}

pub(crate) fn frac(value: f64, limit: Option<f64>) -> String {
    match limit {
        Some(l) if l > 0.0 && value.is_finite() => format!("{:.2}", value / l),
        _ => "n/a".into(),
    }
}

pub(crate) fn line(label: &str, value: impl AsRef<str>) {
    println!("  {label:<40} {}", value.as_ref());
}

pub(crate) struct Target {
    name: &'static str,
    measured: Option<f64>,
    at_least: bool,
    goal: f64,
    unit: &'static str,
    note: String,
}

impl Target {
    pub(crate) fn at_least(
        name: &'static str,
        measured: Option<f64>,
        goal: f64,
        unit: &'static str,
        note: String,
    ) -> Target {
        Target { name, measured, at_least: true, goal, unit, note }
    }

    pub(crate) fn at_most(
        name: &'static str,
        measured: Option<f64>,
        goal: f64,
        unit: &'static str,
        note: String,
    ) -> Target {
        Target { name, measured, at_least: false, goal, unit, note }
    }

    pub(crate) fn met(&self) -> Option<bool> {
        self.measured.map(|m| if self.at_least { m >= self.goal } else { m <= self.goal })
    }

    pub(crate) fn json(&self) -> J {
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

/// Targets, each with its verdict, under a heading.
pub(crate) fn print_targets(heading: &str, targets: &[Target]) {
    println!("\n== {heading} ==");
    for t in targets {
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
}

/// Every figure, to `dir/results.json`.
pub(crate) fn write_results(dir: &Path, top: &J) -> Res<()> {
    let out = render(top) + "\n";
    let path = dir.join("results.json");
    fs::write(&path, out).map_err(|e| format!("{}: {e}", path.display()))?;
    println!("\nall figures: {}", path.display());
    Ok(())
}

/// The key figures of a scenario set, as pointers into its `results.json`
/// object: (label, pointer, unit). Shown beside each other for the two sets
/// (`--confined`) and drawn in report.svg. A flat table.
pub(crate) const KEY_FIGURES: &[(&str, &str, &str)] = &[
    ("small files/s", "/small/files_per_s/median", "files/s"),
    ("small-file latency p50", "/small/latency_total/p50_ms", "ms"),
    ("small-file latency p99", "/small/latency_total/p99_ms", "ms"),
    ("one large file", "/large_single/aggregate_mb_s/median", "MB/s"),
    ("large files in parallel", "/large_multi/aggregate_mb_s/median", "MB/s"),
    ("small files/s beside idle clients", "/idle/small_with_idle/files_per_s/median", "files/s"),
    ("RSS per idle connection", "/idle/rss_per_idle_connection_kib", "KiB"),
    ("small files/s under attack", "/attack/under_attack/files_per_s/median", "files/s"),
    ("small-file p99 under attack", "/attack/under_attack/latency_total/p99_ms", "ms"),
];

/// Server CPU (user + system, all threads) per small file of scenario 1, in
/// microseconds.
pub(crate) fn cpu_per_small_file_us(scenarios: &J) -> Option<f64> {
    let small = scenarios.get("small")?;
    let files = small.get("files_ok")?.as_f64()?;
    let cpu = server_cpu_s(small)?;
    (files > 0.0).then(|| cpu / files * 1e6)
}

/// A scenario's server CPU time (user + system, all threads), seconds.
fn server_cpu_s(scenario: &J) -> Option<f64> {
    let threads = scenario.pointer("/server/cpu/server_cpu_s")?.as_object()?;
    Some(threads.values().filter_map(|t| Some(t.get("user")?.as_f64()? + t.get("system")?.as_f64()?)).sum())
}

/// Server CPU (user + system, all threads) per GB uploaded in a large-file
/// scenario, in core-seconds.
pub(crate) fn cpu_per_gb_s(scenarios: &J, scenario: &str) -> Option<f64> {
    let s = scenarios.get(scenario)?;
    let mib = s.get("clients")?.as_f64()? * s.get("mib_per_client")?.as_f64()? * s.get("rounds")?.as_f64()?;
    let cpu = server_cpu_s(s)?;
    (mib > 0.0).then(|| cpu / (mib * 1_048_576.0 / 1e9))
}

/// The targets of issue 14, set against the limits measured in the same run
/// (`limits`: the `limits` object of results.json), each with its verdict.
pub(crate) fn issue14_targets(scenarios: &J, limits: &J) -> Vec<Target> {
    let at = |j: &J, p: &str| j.pointer(p).and_then(J::as_f64);
    let ratio = |a: Option<f64>, b: Option<f64>| Some(a? / b?);
    let durable = at(limits, "/syncfs_batched16_sqlite_files_per_s/median");
    let behind = at(limits, "/seq_write_behind_dontneed_mb_s/median");
    let note = |what: &str, l: Option<f64>| format!("{what} {:.0} in this run", l.unwrap_or(f64::NAN));
    vec![
        Target::at_least(
            "small files / durable limit",
            ratio(at(scenarios, "/small/files_per_s/median"), durable),
            0.9,
            "x",
            note("syncfs per 16 + SQLite commit, files/s:", durable),
        ),
        Target::at_most(
            "small-file latency p99",
            at(scenarios, "/small/latency_total/p99_ms"),
            2.0,
            "ms",
            "16 clients".into(),
        ),
        Target::at_most(
            "small-file p99, many clients",
            at(scenarios, "/small_many/latency_total/p99_ms"),
            20.0,
            "ms",
            "256 active clients".into(),
        ),
        Target::at_most(
            "small-file p99, many, open load",
            at(scenarios, "/small_many/paced/latency_total/p99_ms"),
            20.0,
            "ms",
            format!(
                "256 clients at {:.0} files/s together",
                at(scenarios, "/small_many/paced/offered_files_per_s").unwrap_or(f64::NAN)
            ),
        ),
        Target::at_least(
            "1 GiB upload / write-behind limit",
            ratio(at(scenarios, "/large_single/aggregate_mb_s/median"), behind),
            0.8,
            "x",
            note("write-behind + DONTNEED, MB/s:", behind),
        ),
        Target::at_least(
            "parallel uploads / write-behind",
            ratio(at(scenarios, "/large_multi/aggregate_mb_s/median"), behind),
            0.8,
            "x",
            "4 x 256 MiB".into(),
        ),
        Target::at_most(
            "server CPU per small file",
            cpu_per_small_file_us(scenarios),
            60.0,
            "us",
            format!(
                "the durable limit's own loop: {:.0} us per file in this run",
                at(limits, "/syncfs_batched16_sqlite_files_per_s/cpu_us_per_file/median").unwrap_or(f64::NAN)
            ),
        ),
        Target::at_most(
            "server CPU per GB uploaded",
            cpu_per_gb_s(scenarios, "large_single"),
            0.6,
            "core-s",
            "1 GiB file".into(),
        ),
    ]
}

/// The two figure sets side by side: 2 cores as the machine is, and the
/// server confined (`how`).
pub(crate) fn print_beside(free: &J, confined: &J, how: &str) {
    println!("\n== the same scenarios, server on 2 cores and confined ({how}) ==");
    println!("  {:<36} {:>14} {:>14}", "", "2 cores", "1 core, 256 MB");
    let show = |v: Option<f64>| v.map_or("n/a".to_string(), |x| format!("{x:.2}"));
    let row = |label: &str, a: Option<f64>, b: Option<f64>, unit: &str| {
        println!("  {:<36} {:>14} {:>14} {unit}", label, show(a), show(b));
    };
    for (label, ptr, unit) in KEY_FIGURES {
        let get = |j: &J| j.pointer(ptr).and_then(J::as_f64);
        row(label, get(free), get(confined), unit);
    }
    row("server CPU per small file", cpu_per_small_file_us(free), cpu_per_small_file_us(confined), "us");
}
