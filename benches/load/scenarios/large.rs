//! Scenario 2a: one large file in 1 MiB packets; its upload loop also runs
//! scenario 2b (parallel large files, [`super::parallel`]).

use std::sync::Barrier;
use std::thread;
use std::time::Instant;

use backupd::client::Client;
use backupd::crypto::AES_KEY_LEN;

use super::{Ctx, Totals};
use crate::cli::Opts;
use crate::clients::{new_clients, BigFile};
use crate::json::{Obj as _, J};
use crate::limits::Limits;
use crate::report::{frac, line, mb_s, Samples, Target};
use crate::usage::{mib, Measured, Probe};
use crate::{Res, MIB, PERIOD};

pub(crate) struct BigClient {
    c: Client,
    file: BigFile,
}

pub(crate) struct LargeOutcome {
    clients: usize,
    mib: u64,
    rate: Samples,
    /// Per upload: seconds to the 1603, seconds of the 1029 round trip.
    pub(crate) parts: Vec<(f64, f64)>,
    pub(crate) errors: Vec<String>,
    pub(crate) measured: Measured,
}

pub(crate) fn scenario_large(
    o: &Opts,
    ctx: &Ctx,
    label: &str,
    clients: usize,
    mib: u64,
) -> Res<LargeOutcome> {
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
    pub(crate) fn json(&self, o: &Opts) -> J {
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

    pub(crate) fn print(&self, limits: &Limits, server: bool) {
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

/// Scenario 2a in the run: its title, figures and targets.
pub(crate) fn run(o: &Opts, ctx: &Ctx, limits: &Limits, start_line: &str, t: &mut Totals) -> Res<(J, usize)> {
    println!("\n== scenario 2a: one {} MiB file in 1 MiB packets ({} rounds) ==", o.large_mib, o.rounds);
    println!("  {start_line}");
    let r = scenario_large(o, ctx, "large", 1, o.large_mib)?;
    let has_server = ctx.server.is_some();
    r.print(limits, has_server);
    t.ok &= r.errors.is_empty();
    t.targets.push(Target::at_least(
        "single large upload",
        Some(r.rate.median()),
        550.0,
        "MB/s",
        format!("{} MiB file, median of {} rounds", o.large_mib, o.rounds),
    ));
    if has_server {
        t.targets.push(Target::at_most(
            "peak RSS, single large upload",
            mib(r.measured.peak_kib),
            32.0,
            "MiB",
            format!("{} MiB file", o.large_mib),
        ));
    }
    Ok((r.json(o), r.parts.len()))
}
