//! Scenario 3: idle connections, then the small files of scenario 1 with
//! them still connected.

use std::thread;
use std::time::{Duration, Instant};

use super::small::{scenario_small, SmallOutcome};
use super::{Ctx, Totals};
use crate::cli::Opts;
use crate::clients::new_clients;
use crate::json::{Obj as _, J};
use crate::limits::Limits;
use crate::report::{line, Target};
use crate::usage::{mib, show_mib, Measured, Probe};
use crate::Res;

pub(crate) struct IdleOutcome {
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

pub(crate) fn scenario_idle(o: &Opts, ctx: &Ctx) -> Res<IdleOutcome> {
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
    pub(crate) fn per_conn_kib(&self) -> Option<f64> {
        match (self.rss_idle_kib, self.rss_start_kib) {
            (Some(a), Some(b)) if self.connected > 0 => Some((a as f64 - b as f64) / self.connected as f64),
            _ => None,
        }
    }

    pub(crate) fn json(&self, o: &Opts) -> J {
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

    pub(crate) fn print(&self, o: &Opts, limits: &Limits, server: bool) {
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

/// Scenario 3 in the run: its title, figures and targets.
pub(crate) fn run(o: &Opts, ctx: &Ctx, limits: &Limits, start_line: &str, t: &mut Totals) -> Res<(J, usize)> {
    println!(
        "\n== scenario 3: {} idle clients, then small files ({} clients) ==",
        o.idle_clients, o.small_clients
    );
    println!("  {start_line}");
    let r = scenario_idle(o, ctx)?;
    let has_server = ctx.server.is_some();
    r.print(o, limits, has_server);
    t.ok &= r.small.errors.is_empty() && r.errors.is_empty() && r.alive_after == r.connected;
    if has_server {
        t.targets.push(Target::at_most(
            "RSS with the idle connections",
            mib(r.rss_idle_kib),
            12.0,
            "MiB",
            format!("{} idle connections (the goal is for 1000)", r.connected),
        ));
    }
    t.targets.push(Target::at_most(
        "small-file p99, idle clients open",
        Some(r.small.total.p99),
        5.0,
        "ms",
        "the 5 ms goal is scenario 1's; shown for comparison".into(),
    ));
    Ok((r.json(o), r.small.files))
}
