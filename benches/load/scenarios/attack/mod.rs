//! Scenario 4: small files under attack (issue 8, "How it is shown").
//!
//! The small-file workload of scenario 1 (the same clients, files and round
//! trips, from 127.0.0.1) runs in timed phases on one server started with the
//! server's own defaults, alternating: a quiet phase, then a phase while 8
//! attackers of each kind below run, `--rounds` times. Quiet and attack
//! figures come from the same server and the same clients, interleaved, so
//! their ratio holds on a noisy machine; scenario 1's figures of the same run
//! are shown beside them.
//!
//! Attacker `i` of every kind connects from 127.0.0.(2 + i), so that the
//! per-address caps do not simply refuse them all (a non-loopback `--target`
//! gets them from the default address). The kinds, the rows of issue 8:
//!
//! * slow 1028 announcers: a 1028 header announcing a 16 MiB packet, a few
//!   content bytes, then one byte a second. The even-numbered ones first open
//!   a session with a 1027 for an identity registered at setup, so their
//!   content is streamed (budget pieces); the odd ones never log in (their
//!   packet is refused and its content drained).
//! * slot holders: one 1027 for an unknown id (1606) a second.
//! * refusal flooders: 1028s without a session (1607 each), in batches, as
//!   fast as the server answers.
//! * registration flooders: 1025s with fresh names, in batches, as fast as
//!   the server answers.
//!
//! Every attacker reconnects when the server closes it and stops on its own
//! at the end of the phase. Nothing is asserted: the figures are reported.

use std::net::Ipv4Addr;
use std::thread;
use std::time::{Duration, Instant};

use backupd::protocol::{ClientId, PACKET_HEADER_LEN};

use crate::cli::Opts;
use crate::clients::new_clients;
use crate::json::{Obj as _, J};
use crate::report::{lat_summary, line, Lat, Samples};
use crate::scenarios::small::{small_clients, small_round};
use crate::scenarios::{Ctx, Totals};
use crate::usage::{mib, show_mib, status_kib, Measured, Probe};
use crate::Res;

mod attackers;

use attackers::{attack, Tally};

/// Attackers of each kind.
pub(crate) const PER_KIND: usize = 8;
/// Content announced by a slow 1028: a 16 MiB payload less what makes the
/// content a whole number of AES blocks after the packet header.
pub(crate) const SLOW_CONTENT: usize = (16 << 20) - PACKET_HEADER_LEN.div_ceil(16) * 16;
/// Content bytes a slow announcer sends at once after its header.
pub(crate) const SLOW_FIRST: usize = 100;
/// Frames a flooder sends before reading their replies.
pub(crate) const BATCH: usize = 16;
/// Head start of the attackers before the timed phase.
pub(crate) const RAMP: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Slow,
    Slots,
    Refusals,
    Registrations,
}

pub(crate) const KINDS: [Kind; 4] = [Kind::Slow, Kind::Slots, Kind::Refusals, Kind::Registrations];

impl Kind {
    pub(crate) fn key(self) -> &'static str {
        match self {
            Kind::Slow => "slow_1028_announcers",
            Kind::Slots => "slot_holders",
            Kind::Refusals => "refusal_flooders",
            Kind::Registrations => "registration_flooders",
        }
    }

    pub(crate) fn flag(self) -> &'static str {
        match self {
            Kind::Slow => "slow",
            Kind::Slots => "slots",
            Kind::Refusals => "refusals",
            Kind::Registrations => "registrations",
        }
    }

    pub(crate) fn label(self) -> &'static str {
        match self {
            Kind::Slow => "slow 1028 announcers",
            Kind::Slots => "slot holders (1027, 1/s)",
            Kind::Refusals => "refusal flooders (1028)",
            Kind::Registrations => "registration flooders",
        }
    }
}

/// `--attack-kinds`: which kinds run, in the order of [`KINDS`].
pub(crate) fn parse_kinds(s: &str) -> Res<[bool; 4]> {
    let mut on = [false; 4];
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match KINDS.iter().position(|k| k.flag() == part) {
            Some(i) => on[i] = true,
            None if part == "all" => on = [true; 4],
            None => {
                return Err(format!(
                    "--attack-kinds: unknown kind {part:?} (slow, slots, refusals, registrations)"
                ))
            }
        }
    }
    Ok(on)
}

/// The figures of one kind of phase (quiet or under attack), over its rounds.
#[derive(Default)]
pub(crate) struct Phase {
    rate: Samples,
    total_us: Vec<u32>,
    upload_us: Vec<u32>,
    commit_us: Vec<u32>,
    files: usize,
    errors: Vec<String>,
    measured: Vec<Measured>,
}

impl Phase {
    pub(crate) fn lat(&self) -> (Lat, Lat, Lat) {
        let (mut t, mut u, mut c) = (self.total_us.clone(), self.upload_us.clone(), self.commit_us.clone());
        (lat_summary(&mut t), lat_summary(&mut u), lat_summary(&mut c))
    }

    pub(crate) fn peak_kib(&self) -> Option<u64> {
        self.measured.iter().filter_map(|m| m.peak_kib).max()
    }

    pub(crate) fn json(&self) -> J {
        let (t, u, c) = self.lat();
        let mut j = J::obj();
        j.set("files_ok", self.files);
        j.set("files_per_s", self.rate.json());
        j.set("latency_total", t.json());
        j.set("latency_upload_to_1603", u.json());
        j.set("latency_1029_to_1604", c.json());
        j.set("errors", self.errors.len());
        j.set("first_errors", self.errors.iter().take(5).cloned().collect::<Vec<_>>());
        j.set("peak_rss_mib", mib(self.peak_kib()));
        j.set("server_per_round", J::Array(self.measured.iter().map(Measured::json).collect()));
        j
    }

    pub(crate) fn print(&self, label: &str, server: bool) {
        let (t, _, _) = self.lat();
        line(
            label,
            format!(
                "{}   p50 {:.2}  p99 {:.2}  max {:.2} ms",
                self.rate.show("files/s"),
                t.p50,
                t.p99,
                t.max
            ),
        );
        if let Some(m) = self.measured.last() {
            line("  CPU (last round)", m.cpu.show(server));
        }
        if !self.errors.is_empty() {
            line("  ERRORS", format!("{} (first: {})", self.errors.len(), self.errors[0]));
        }
    }
}

pub(crate) struct AttackOutcome {
    secs: u64,
    rounds: usize,
    kinds: [bool; 4],
    clients: usize,
    sources: Vec<Option<Ipv4Addr>>,
    quiet: Phase,
    attack: Phase,
    tallies: [Tally; 4],
    /// Server RSS sampled every 100 ms during the attack phases, KiB.
    rss_kib: Vec<u64>,
}

pub(crate) fn sources(ctx: &Ctx) -> Vec<Option<Ipv4Addr>> {
    (0..PER_KIND)
        .map(|i| ctx.addr.ip().is_loopback().then(|| Ipv4Addr::new(127, 0, 0, 2 + i as u8)))
        .collect()
}

pub(crate) fn print_title(o: &Opts, ctx: &Ctx) {
    let from = if ctx.addr.ip().is_loopback() {
        format!("from 127.0.0.2..{}", 1 + PER_KIND)
    } else {
        "from the default address (non-loopback target)".into()
    };
    let kinds: Vec<&str> = KINDS.iter().zip(o.attack_kinds).filter(|k| k.1).map(|k| k.0.flag()).collect();
    println!(
        "\n== scenario 4: small files under attack ({} clients x {} B; {PER_KIND} attackers of each kind ({}) {from}; \
         {} x ({} s quiet, {} s attack)) ==",
        o.small_clients,
        o.small_size,
        kinds.join(", "),
        o.rounds,
        o.attack_secs,
        o.attack_secs
    );
}

/// Scenario 4: alternating quiet and attack phases on one server.
pub(crate) fn scenario_attack(o: &Opts, ctx: &Ctx) -> Res<AttackOutcome> {
    let mut cl = small_clients(o, ctx, "attack")?;
    // Identities of the slow announcers that open a session first.
    let names: Vec<String> = (0..PER_KIND.div_ceil(2)).map(|i| format!("{}-slow-{i}", ctx.run_tag)).collect();
    let (ids, errs) = new_clients(ctx.addr, &names, ctx.key, 1);
    if !errs.is_empty() {
        return Err(format!("attack: slow announcer identities: {}", errs[0]));
    }
    let idents: Vec<(ClientId, String)> = ids.iter().map(|c| c.id()).zip(names).collect();
    drop(ids);
    let sources = sources(ctx);
    let secs = Duration::from_secs(o.attack_secs);
    let mut out = AttackOutcome {
        secs: o.attack_secs,
        rounds: o.rounds,
        kinds: o.attack_kinds,
        clients: cl.len(),
        sources: sources.clone(),
        quiet: Phase::default(),
        attack: Phase::default(),
        tallies: Default::default(),
        rss_kib: Vec::new(),
    };
    for round in 1..=o.rounds {
        for attacked in [false, true] {
            let probe = Probe::begin(ctx.server);
            let tag = format!("attack-r{round}-{}", if attacked { "a" } else { "q" });
            let r = if attacked {
                let until = Instant::now() + RAMP + secs;
                let (tallies, idents, srcs, rss) = (&out.tallies, &idents, &sources, &mut out.rss_kib);
                thread::scope(|s| {
                    let tag = &tag;
                    let on = o.attack_kinds;
                    s.spawn(move || attack(ctx, srcs, idents, until, tallies, tag, on));
                    if let Some(pid) = ctx.server.map(|s| s.pid) {
                        s.spawn(move || {
                            while Instant::now() < until {
                                rss.extend(status_kib(pid, "VmRSS"));
                                thread::sleep(Duration::from_millis(100));
                            }
                        });
                    }
                    thread::sleep(RAMP);
                    small_round(&mut cl, usize::MAX, o.small_size, tag, Some(until), None)
                })
            } else {
                small_round(&mut cl, usize::MAX, o.small_size, &tag, Some(Instant::now() + secs), None)
            };
            let measured = probe.end();
            let fps = r.ok as f64 / r.elapsed.as_secs_f64().max(1e-9);
            eprintln!(
                "[load] attack: round {round}/{} {}: {} files in {:.2} s = {fps:.0} files/s{}",
                o.rounds,
                if attacked { "under attack" } else { "quiet" },
                r.ok,
                r.elapsed.as_secs_f64(),
                if r.errors.is_empty() { String::new() } else { format!(", {} error(s)", r.errors.len()) }
            );
            let p = if attacked { &mut out.attack } else { &mut out.quiet };
            p.rate.0.push(fps);
            p.files += r.ok;
            p.total_us.extend(r.total_us);
            p.upload_us.extend(r.upload_us);
            p.commit_us.extend(r.commit_us);
            p.errors.extend(r.errors);
            p.measured.push(measured);
            // The attackers' connections close; let the server see it before the next phase.
            thread::sleep(Duration::from_millis(if attacked { 500 } else { 0 }));
        }
    }
    Ok(out)
}

pub(crate) fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        f64::NAN
    }
}

impl AttackOutcome {
    pub(crate) fn files(&self) -> usize {
        self.quiet.files + self.attack.files
    }

    pub(crate) fn rss_median_max(&self) -> (Option<u64>, Option<u64>) {
        let mut v = self.rss_kib.clone();
        v.sort_unstable();
        (v.get(v.len() / 2).copied(), v.last().copied())
    }

    pub(crate) fn json(&self, small: Option<(f64, Lat)>) -> J {
        let mut j = J::obj();
        j.set("clients", self.clients);
        j.set("attackers_per_kind", PER_KIND);
        j.set(
            "attack_kinds",
            KINDS.iter().zip(self.kinds).filter(|k| k.1).map(|k| k.0.flag()).collect::<Vec<_>>(),
        );
        j.set(
            "attacker_sources",
            self.sources
                .iter()
                .map(|s| s.map_or("default".to_string(), |a| a.to_string()))
                .collect::<Vec<_>>(),
        );
        j.set("phase_seconds", self.secs);
        j.set("rounds", self.rounds);
        j.set("quiet", self.quiet.json());
        j.set("under_attack", self.attack.json());
        let (q, a) = (self.quiet.lat().0, self.attack.lat().0);
        let mut r = J::obj();
        r.set("files_per_s_attack_over_quiet", ratio(self.attack.rate.median(), self.quiet.rate.median()));
        r.set("p50_attack_over_quiet", ratio(a.p50, q.p50));
        r.set("p99_attack_over_quiet", ratio(a.p99, q.p99));
        if let Some((fps, lat)) = small {
            r.set("files_per_s_attack_over_scenario_small", ratio(self.attack.rate.median(), fps));
            r.set("p99_attack_over_scenario_small", ratio(a.p99, lat.p99));
        }
        j.set("ratios", r);
        if let Some((fps, lat)) = small {
            let mut s = J::obj();
            s.set("files_per_s_median", fps);
            s.set("latency_total", lat.json());
            j.set("scenario_small_same_run", s);
        }
        let (med, max) = self.rss_median_max();
        let mut m = J::obj();
        m.set("samples", self.rss_kib.len());
        m.set("median_mib", mib(med));
        m.set("max_mib", mib(max));
        m.set("peak_vmhwm_mib", mib(self.attack.peak_kib()));
        j.set("server_rss_under_attack", m);
        let mut t = J::obj();
        for ((k, tally), _) in KINDS.iter().zip(&self.tallies).zip(self.kinds).filter(|x| x.1) {
            t.set(k.key(), tally.json());
        }
        j.set("attackers", t);
        j
    }

    pub(crate) fn print(&self, small: Option<(f64, Lat)>, server: bool) {
        self.quiet.print("quiet phases (same server, alternating)", server);
        self.attack.print("under attack", server);
        let (q, a) = (self.quiet.lat().0, self.attack.lat().0);
        line(
            "  under attack / quiet",
            format!(
                "files/s {:.2}   p50 {:.2}x   p99 {:.2}x",
                ratio(self.attack.rate.median(), self.quiet.rate.median()),
                ratio(a.p50, q.p50),
                ratio(a.p99, q.p99)
            ),
        );
        if let Some((fps, lat)) = small {
            line(
                "  scenario 1 (quiet, own server)",
                format!(
                    "median {fps:.1} files/s, p99 {:.2} ms; under attack / scenario 1: files/s {:.2}, p99 {:.2}x",
                    lat.p99,
                    ratio(self.attack.rate.median(), fps),
                    ratio(a.p99, lat.p99)
                ),
            );
        }
        if server {
            let (med, max) = self.rss_median_max();
            line(
                "server RSS under attack",
                format!(
                    "median {}   max {} (sampled every 100 ms)   peak (VmHWM) {}   quiet peak {}",
                    show_mib(med),
                    show_mib(max),
                    show_mib(self.attack.peak_kib()),
                    show_mib(self.quiet.peak_kib())
                ),
            );
            let (w, e) = self.attack.measured.iter().fold((0, 0), |(w, e), m| (w + m.warn, e + m.error));
            line("server log under attack", format!("{w} warning line(s), {e} error line(s)"));
        }
        for ((k, t), _) in KINDS.iter().zip(&self.tallies).zip(self.kinds).filter(|x| x.1) {
            line(
                &format!("  {}", k.label()),
                format!(
                    "{} conns ({} closed by server, {} reply timeouts, {} failed), {} frames, {:.1} MB; replies: {}",
                    Tally::get(&t.connections),
                    Tally::get(&t.closed_by_server),
                    Tally::get(&t.reply_timeouts),
                    Tally::get(&t.connect_failed),
                    Tally::get(&t.frames),
                    Tally::get(&t.bytes) as f64 / 1e6,
                    t.replies_text()
                ),
            );
        }
    }
}

/// The slow 1028 is a valid packet 1 of 1 (so it streams on a session), and
/// its whole payload is within the server's default 16 MiB `--max-packet`.
pub(crate) fn self_check() {
    assert_eq!(parse_kinds("slots, refusals"), Ok([false, true, true, false]));
    assert_eq!(parse_kinds("all"), Ok([true; 4]));
    assert!(parse_kinds("nope").is_err());
    const { assert!(SLOW_CONTENT.is_multiple_of(16) && SLOW_CONTENT + PACKET_HEADER_LEN <= 16 << 20) };
    assert_eq!(backupd::crypto::ciphertext_len(SLOW_CONTENT as u64 - 1), SLOW_CONTENT as u64);
}

/// Scenario 4 in the run: its title and figures (reported, not asserted).
pub(crate) fn run(o: &Opts, ctx: &Ctx, start_line: &str, t: &mut Totals) -> Res<(J, usize)> {
    print_title(o, ctx);
    println!("  {start_line}");
    let r = scenario_attack(o, ctx)?;
    r.print(t.quiet_small, ctx.server.is_some());
    Ok((r.json(t.quiet_small), r.files()))
}
