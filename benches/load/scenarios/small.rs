//! Scenario 1: small files (also the second half of scenario 3 and the
//! workload of scenario 4).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Barrier;
use std::thread;
use std::time::{Duration, Instant};

use backupd::client::{Client, UploadOptions};
use backupd::crypto::{self, AES_KEY_LEN};

use super::{Ctx, Totals};
use crate::cli::Opts;
use crate::clients::new_clients;
use crate::common::pseudo_random;
use crate::json::{Obj as _, J};
use crate::limits::Limits;
use crate::report::{frac, lat_summary, line, Lat, Samples, Target};
use crate::usage::{Measured, Probe};
use crate::Res;

pub(crate) struct SmallClient {
    c: Client,
    ct: Vec<u8>,
    cksum: u32,
}

pub(crate) struct SmallRound {
    pub(crate) elapsed: Duration,
    pub(crate) ok: usize,
    pub(crate) total_us: Vec<u32>,
    pub(crate) upload_us: Vec<u32>,
    pub(crate) commit_us: Vec<u32>,
    pub(crate) errors: Vec<String>,
}

pub(crate) fn us(d: Duration) -> u32 {
    d.as_micros().min(u128::from(u32::MAX)) as u32
}

/// One timed round: the clients share a counter of `count` files; each
/// uploads (1028 -> 1603) and confirms (1029 -> 1604) one file at a time.
/// With `until`, no file is started after that time.
pub(crate) fn small_round(
    cl: &mut [SmallClient],
    count: usize,
    size: usize,
    tag: &str,
    until: Option<Instant>,
    pace: Option<Duration>,
) -> SmallRound {
    let next = AtomicUsize::new(0);
    let barrier = Barrier::new(cl.len() + 1);
    let clients = cl.len();
    let round = Round { next: &next, count, size, tag, until, pace, clients, opts: UploadOptions::default() };
    thread::scope(|s| {
        let handles: Vec<_> = cl
            .iter_mut()
            .map(|sc| {
                let (round, barrier) = (&round, &barrier);
                s.spawn(move || {
                    barrier.wait();
                    round.client(sc)
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

/// Latencies in microseconds: total, 1028 -> 1603, 1029 -> 1604.
type Latencies = (Vec<u32>, Vec<u32>, Vec<u32>);

/// What the clients of a round share.
struct Round<'a> {
    next: &'a AtomicUsize,
    count: usize,
    size: usize,
    tag: &'a str,
    until: Option<Instant>,
    /// Each client starts a file every this long (an open load) instead of
    /// one right after the other.
    pace: Option<Duration>,
    /// How many clients share the round (the paced ones spread their phases over the interval).
    clients: usize,
    opts: UploadOptions,
}

impl Round<'_> {
    /// One client's part of the round: files until the counter or the time
    /// runs out. Returns its latencies, its errors and when it finished.
    fn client(&self, sc: &mut SmallClient) -> (Latencies, Vec<String>, Instant) {
        let mut lat = (Vec::new(), Vec::new(), Vec::new());
        let mut errs = Vec::new();
        let mut scheduled: Option<Instant> = None;
        loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            if i >= self.count || self.until.is_some_and(|u| Instant::now() >= u) {
                break;
            }
            // Paced: start at the scheduled time (the clients' first files
            // spread evenly over one interval: the first `clients` numbers go
            // one to each), and count the latency from it, so a file that had
            // to wait for the one before counts that wait too.
            let start = self.pace.map(|p| {
                let phase = (i % self.clients.max(1)) as f64 / self.clients.max(1) as f64;
                let due = scheduled.map_or_else(|| Instant::now() + p.mul_f64(phase), |s| s + p);
                scheduled = Some(due);
                thread::sleep(due.saturating_duration_since(Instant::now()));
                due
            });
            let name = format!("{}-{i:07}.bin", self.tag);
            let t0 = Instant::now();
            let from = start.unwrap_or(t0);
            match sc.c.upload_ciphertext(&name, &sc.ct, self.size as u64, sc.cksum, &self.opts) {
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
            lat.0.push(us(t2 - from));
            lat.1.push(us(t1 - t0));
            lat.2.push(us(t2 - t1));
        }
        (lat, errs, Instant::now())
    }
}

pub(crate) struct SmallOutcome {
    rate: Samples,
    pub(crate) total: Lat,
    upload: Lat,
    commit: Lat,
    pub(crate) files: usize,
    pub(crate) errors: Vec<String>,
    measured: Measured,
}

/// The clients of the small-file workload, registered, each with its file
/// encrypted once.
pub(crate) fn small_clients(o: &Opts, ctx: &Ctx, label: &str) -> Res<Vec<SmallClient>> {
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

/// Round `round` of `label` (all of `o.small_count` files), its progress
/// line, and its rate in files/s.
pub(crate) fn timed_round(o: &Opts, cl: &mut [SmallClient], label: &str, round: usize) -> (SmallRound, f64) {
    let pace = (o.small_rate > 0.0).then(|| Duration::from_secs_f64(cl.len() as f64 / o.small_rate));
    let r = small_round(cl, o.small_count, o.small_size, &format!("{label}-r{round}"), None, pace);
    let fps = r.ok as f64 / r.elapsed.as_secs_f64().max(1e-9);
    eprintln!(
        "[load] {label}: round {round}/{}: {} files in {:.2} s = {fps:.0} files/s{}",
        o.rounds,
        r.ok,
        r.elapsed.as_secs_f64(),
        if r.errors.is_empty() { String::new() } else { format!(", {} error(s)", r.errors.len()) }
    );
    (r, fps)
}

/// Scenario 1 (also the second half of scenario 3): register the clients,
/// then `rounds` timed rounds.
pub(crate) fn scenario_small(o: &Opts, ctx: &Ctx, label: &str) -> Res<SmallOutcome> {
    let mut cl = small_clients(o, ctx, label)?;
    let probe = Probe::begin(ctx.server);
    let mut rate = Samples::default();
    let (mut t, mut u, mut c) = (Vec::new(), Vec::new(), Vec::new());
    let mut errors = Vec::new();
    let mut files = 0;
    for round in 1..=o.rounds {
        let (r, fps) = timed_round(o, &mut cl, label, round);
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
    pub(crate) fn json(&self, o: &Opts) -> J {
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

    pub(crate) fn print(&self, o: &Opts, limits: &Limits, server: bool) {
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
        if o.small_rate == 0.0 {
            line(
                "  Little's law: clients / rate",
                format!("{:.2} ms mean at {} clients", o.small_clients as f64 / r * 1000.0, o.small_clients),
            );
        }
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

/// Scenario 1 in the run: its title, figures and targets.
pub(crate) fn run(o: &Opts, ctx: &Ctx, limits: &Limits, start_line: &str, t: &mut Totals) -> Res<(J, usize)> {
    println!(
        "\n== scenario 1: small files ({} clients x {} B, {} files/round, {} rounds) ==",
        o.small_clients, o.small_size, o.small_count, o.rounds
    );
    println!("  {start_line}");
    let r = scenario_small(o, ctx, "small")?;
    t.quiet_small = Some((r.rate.median(), r.total));
    r.print(o, limits, ctx.server.is_some());
    t.ok &= r.errors.is_empty();
    t.targets.push(Target::at_least(
        "small files/s",
        Some(r.rate.median()),
        3000.0,
        "files/s",
        format!("{} clients, median of {} rounds", o.small_clients, o.rounds),
    ));
    t.targets.push(Target::at_most(
        "small-file latency p99",
        Some(r.total.p99),
        5.0,
        "ms",
        format!("{} clients", o.small_clients),
    ));
    Ok((r.json(o), r.files))
}

/// Scenario 1b (issue 14): the same small files with many active clients
/// (`--many-clients`, 256), each uploading one file after another: the
/// latency a file sees when the server is shared by many busy clients.
pub(crate) fn run_many(
    o: &Opts,
    ctx: &Ctx,
    limits: &Limits,
    start_line: &str,
    t: &mut Totals,
) -> Res<(J, usize)> {
    let many = Opts { small_clients: o.many_clients, ..o.clone() };
    println!(
        "\n== scenario 1b: small files, many active clients ({} clients x {} B, {} files/round, {} rounds) ==",
        many.small_clients, many.small_size, many.small_count, many.rounds
    );
    println!("  {start_line}");
    let r = scenario_small(&many, ctx, "many")?;
    r.print(&many, limits, ctx.server.is_some());
    t.ok &= r.errors.is_empty();
    let mut j = r.json(&many);
    let mut files = r.files;
    // The same clients at a steady aggregate rate: what a file waits when
    // many clients are active but the server is not saturated.
    if o.many_rate > 0.0 {
        let paced = Opts { small_rate: o.many_rate, ..many.clone() };
        println!(
            "  -- the same {} clients at {:.0} files/s together (open load) --",
            paced.small_clients, paced.small_rate
        );
        let p = scenario_small(&paced, ctx, "paced")?;
        p.print(&paced, limits, ctx.server.is_some());
        t.ok &= p.errors.is_empty();
        let mut pj = p.json(&paced);
        pj.set("offered_files_per_s", paced.small_rate);
        j.set("paced", pj);
        files += p.files;
    }
    // Its targets are among issue 14's (report::issue14_targets).
    Ok((j, files))
}
