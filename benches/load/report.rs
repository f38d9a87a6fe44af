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

/// The targets of issue 5, each with its verdict.
pub(crate) fn print_targets(targets: &[Target]) {
    println!("\n== targets of issue 5 ==");
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
    let cpu: f64 = small
        .pointer("/server/cpu/server_cpu_s")?
        .as_object()?
        .values()
        .filter_map(|t| Some(t.get("user")?.as_f64()? + t.get("system")?.as_f64()?))
        .sum();
    (files > 0.0).then(|| cpu / files * 1e6)
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
