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

use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use backupd::client::{Client, ClientOptions};
use backupd::protocol::{ClientId, Code, NameField, Response, PACKET_HEADER_LEN, REQUEST_HEADER_LEN};

use super::common::{frame, name_field_raw, packet_frame};
use super::{
    lat_summary, line, mib, new_clients, show_mib, small_clients, small_round, status_kib,
    write_packet_headers, Ctx, Lat, Measured, Opts, Probe, Res, Samples, J,
};

/// Attackers of each kind.
const PER_KIND: usize = 8;
/// Content announced by a slow 1028: a 16 MiB payload less what makes the
/// content a whole number of AES blocks after the packet header.
const SLOW_CONTENT: usize = (16 << 20) - PACKET_HEADER_LEN.div_ceil(16) * 16;
/// Content bytes a slow announcer sends at once after its header.
const SLOW_FIRST: usize = 100;
/// Frames a flooder sends before reading their replies.
const BATCH: usize = 16;
/// Head start of the attackers before the timed phase.
const RAMP: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Slow,
    Slots,
    Refusals,
    Registrations,
}

const KINDS: [Kind; 4] = [Kind::Slow, Kind::Slots, Kind::Refusals, Kind::Registrations];

impl Kind {
    fn key(self) -> &'static str {
        match self {
            Kind::Slow => "slow_1028_announcers",
            Kind::Slots => "slot_holders",
            Kind::Refusals => "refusal_flooders",
            Kind::Registrations => "registration_flooders",
        }
    }

    fn flag(self) -> &'static str {
        match self {
            Kind::Slow => "slow",
            Kind::Slots => "slots",
            Kind::Refusals => "refusals",
            Kind::Registrations => "registrations",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Kind::Slow => "slow 1028 announcers",
            Kind::Slots => "slot holders (1027, 1/s)",
            Kind::Refusals => "refusal flooders (1028)",
            Kind::Registrations => "registration flooders",
        }
    }
}

/// `--attack-kinds`: which kinds run, in the order of [`KINDS`].
pub(super) fn parse_kinds(s: &str) -> Res<[bool; 4]> {
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

/// What the attackers of one kind did, over every attack phase.
#[derive(Default)]
struct Tally {
    connections: AtomicU64,
    connect_failed: AtomicU64,
    /// Connections the server closed (EOF or reset) before the phase ended.
    closed_by_server: AtomicU64,
    /// Replies that did not come within the read timeout (the attacker then reconnects).
    reply_timeouts: AtomicU64,
    frames: AtomicU64,
    bytes: AtomicU64,
    /// Replies by code, 1600..=1607.
    replies: [AtomicU64; 8],
}

impl Tally {
    fn add(n: &AtomicU64, k: u64) {
        n.fetch_add(k, Ordering::Relaxed);
    }

    fn get(n: &AtomicU64) -> u64 {
        n.load(Ordering::Relaxed)
    }

    fn sent(&self, frames: u64, bytes: usize) {
        Tally::add(&self.frames, frames);
        Tally::add(&self.bytes, bytes as u64);
    }

    fn reply(&self, r: &Response) {
        let code = r.code() as usize;
        if let Some(n) = code.checked_sub(1600).and_then(|i| self.replies.get(i)) {
            Tally::add(n, 1);
        }
    }

    /// A read or write failed: the server closed the connection, or a reply is late.
    fn lost(&self, e: &backupd::client::ClientError) {
        Tally::add(if e.is_timeout() { &self.reply_timeouts } else { &self.closed_by_server }, 1);
    }

    fn connect(&self, src: Option<Ipv4Addr>, dst: SocketAddr) -> Option<Client> {
        let opts = ClientOptions { read_timeout: Duration::from_secs(2), ..super::client_options() };
        match connect_from(src, dst).and_then(|s| Client::from_stream(s, &opts).map_err(io::Error::other)) {
            Ok(c) => {
                Tally::add(&self.connections, 1);
                Some(c)
            }
            Err(_) => {
                Tally::add(&self.connect_failed, 1);
                None
            }
        }
    }

    fn replies_text(&self) -> String {
        let v: Vec<String> = (0..8)
            .filter_map(|i| {
                let n = Tally::get(&self.replies[i]);
                (n > 0).then(|| format!("{} x{n}", 1600 + i))
            })
            .collect();
        if v.is_empty() {
            "none".into()
        } else {
            v.join(", ")
        }
    }

    fn json(&self) -> J {
        let mut j = J::obj();
        j.set("connections", Tally::get(&self.connections));
        j.set("connect_failed", Tally::get(&self.connect_failed));
        j.set("closed_by_server", Tally::get(&self.closed_by_server));
        j.set("reply_timeouts", Tally::get(&self.reply_timeouts));
        j.set("frames_sent", Tally::get(&self.frames));
        j.set("bytes_sent", Tally::get(&self.bytes));
        let mut r = J::obj();
        for (i, n) in self.replies.iter().enumerate() {
            if Tally::get(n) > 0 {
                r.set(&(1600 + i).to_string(), Tally::get(n));
            }
        }
        j.set("replies", r);
        j
    }
}

/// Connect to `dst` from `src` (std has no bind-before-connect); the port is
/// chosen at connect (IP_BIND_ADDRESS_NO_PORT). Without `src`, or for an
/// IPv6 `dst`, an ordinary connect.
fn connect_from(src: Option<Ipv4Addr>, dst: SocketAddr) -> io::Result<TcpStream> {
    let (Some(src), SocketAddr::V4(dst4)) = (src, dst) else {
        return TcpStream::connect_timeout(&dst, Duration::from_secs(5));
    };
    let sockaddr = |ip: Ipv4Addr, port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from(ip).to_be() },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: a new socket, owned at once by `fd` (closed on every error path).
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a descriptor we just opened and nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let one: libc::c_int = 1;
    let (a, b) = (sockaddr(src, 0), sockaddr(*dst4.ip(), dst4.port()));
    // SAFETY: plain socket calls on our descriptor, with structs that live across each call.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
        if libc::bind(fd.as_raw_fd(), (&a as *const libc::sockaddr_in).cast(), len) != 0 {
            return Err(io::Error::last_os_error());
        }
        while libc::connect(fd.as_raw_fd(), (&b as *const libc::sockaddr_in).cast(), len) != 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
    Ok(TcpStream::from(fd))
}

/// Sleep `d`, but not past `deadline`.
fn nap(d: Duration, deadline: Instant) {
    thread::sleep(d.min(deadline.saturating_duration_since(Instant::now())));
}

/// Read the replies already waiting, without blocking. False when the
/// server has closed the connection.
fn drain_replies(c: &mut Client, t: &Tally) -> bool {
    loop {
        let s = c.stream();
        if s.set_nonblocking(true).is_err() {
            return false;
        }
        let mut b = [0u8; 1];
        let r = s.peek(&mut b);
        if s.set_nonblocking(false).is_err() {
            return false;
        }
        match r {
            Ok(0) => {
                Tally::add(&t.closed_by_server, 1);
                return false;
            }
            Ok(_) => match c.read_response() {
                Ok(resp) => t.reply(&resp),
                Err(e) => {
                    t.lost(&e);
                    return false;
                }
            },
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
            Err(_) => {
                Tally::add(&t.closed_by_server, 1);
                return false;
            }
        }
    }
}

/// (a) A 1028 header announcing 16 MiB, a few bytes, then a byte a second;
/// with `ident`, after a 1027 that opens a session.
fn slow_announcer(
    ctx: &Ctx,
    src: Option<Ipv4Addr>,
    deadline: Instant,
    ident: Option<&(ClientId, String)>,
    t: &Tally,
) {
    let field = NameField::from_name(b"slow.bin").expect("name");
    let mut head = vec![0u8; REQUEST_HEADER_LEN + PACKET_HEADER_LEN + SLOW_FIRST];
    while Instant::now() < deadline {
        let Some(mut c) = t.connect(src, ctx.addr) else {
            nap(Duration::from_secs(1), deadline);
            continue;
        };
        let id = match ident {
            Some((id, name)) => {
                t.sent(1, REQUEST_HEADER_LEN + 255);
                let r = c.reconnect(*id, name, ctx.key);
                match r {
                    Ok(()) => {
                        Tally::add(&t.replies[5], 1);
                        *id
                    }
                    Err(e) => {
                        if let backupd::client::ClientError::Refused(r) = &e {
                            t.reply(r);
                        } else {
                            t.lost(&e);
                        }
                        nap(Duration::from_secs(1), deadline);
                        continue;
                    }
                }
            }
            None => [0xa5; 16],
        };
        let content = SLOW_CONTENT as u32;
        write_packet_headers(&mut head, &id, &field, SLOW_CONTENT, content - 1, 1, 1);
        if c.send_raw(&head).is_err() {
            Tally::add(&t.closed_by_server, 1);
            continue;
        }
        t.sent(1, head.len());
        while Instant::now() < deadline {
            nap(Duration::from_secs(1), deadline);
            if Instant::now() >= deadline || !drain_replies(&mut c, t) {
                break;
            }
            if c.send_raw(&[0]).is_err() {
                Tally::add(&t.closed_by_server, 1);
                break;
            }
            Tally::add(&t.bytes, 1);
        }
    }
}

/// (b) One 1027 for an unknown id a second (refused with 1606).
fn slot_holder(ctx: &Ctx, src: Option<Ipv4Addr>, deadline: Instant, i: usize, t: &Tally) {
    let mut n = 0u64;
    while Instant::now() < deadline {
        let Some(mut c) = t.connect(src, ctx.addr) else {
            nap(Duration::from_secs(1), deadline);
            continue;
        };
        while Instant::now() < deadline {
            n += 1;
            let mut id = [0u8; 16];
            id[..8].copy_from_slice(&n.to_le_bytes());
            id[8] = i as u8;
            id[15] = 0xee;
            t.sent(1, REQUEST_HEADER_LEN + 255);
            match c.reconnect(id, "no-such-client", ctx.key) {
                Ok(()) => Tally::add(&t.replies[5], 1),
                Err(backupd::client::ClientError::Refused(r)) => t.reply(&r),
                Err(e) => {
                    t.lost(&e);
                    break;
                }
            }
            nap(Duration::from_secs(1), deadline);
        }
    }
}

/// (c), (d): batches of `BATCH` frames from `fill`, each batch's replies read
/// before the next, as fast as the server answers.
fn flooder(
    ctx: &Ctx,
    src: Option<Ipv4Addr>,
    deadline: Instant,
    t: &Tally,
    mut fill: impl FnMut(&mut Vec<u8>),
) {
    let mut buf = Vec::new();
    while Instant::now() < deadline {
        let Some(mut c) = t.connect(src, ctx.addr) else {
            nap(Duration::from_millis(100), deadline);
            continue;
        };
        'conn: while Instant::now() < deadline {
            buf.clear();
            for _ in 0..BATCH {
                fill(&mut buf);
            }
            if c.send_raw(&buf).is_err() {
                Tally::add(&t.closed_by_server, 1);
                break;
            }
            t.sent(BATCH as u64, buf.len());
            for _ in 0..BATCH {
                match c.read_response() {
                    Ok(r) => t.reply(&r),
                    Err(e) => {
                        t.lost(&e);
                        break 'conn;
                    }
                }
            }
        }
    }
}

/// Run every attacker until `deadline`.
/// `tag` makes the flooders' registration names fresh in every phase.
fn attack(
    ctx: &Ctx,
    sources: &[Option<Ipv4Addr>],
    idents: &[(ClientId, String)],
    deadline: Instant,
    tallies: &[Tally; 4],
    tag: &str,
    on: [bool; 4],
) {
    let bad_packet = packet_frame(&[0x5a; 16], 16, 15, 1, 1, &name_field_raw(b"flood.bin"), &[0; 16]);
    thread::scope(|s| {
        for (i, &src) in sources.iter().enumerate() {
            let ident = (i % 2 == 0).then(|| idents.get(i / 2)).flatten();
            if on[0] {
                s.spawn(move || slow_announcer(ctx, src, deadline, ident, &tallies[0]));
            }
            if on[1] {
                s.spawn(move || slot_holder(ctx, src, deadline, i, &tallies[1]));
            }
            let bad = &bad_packet;
            if on[2] {
                s.spawn(move || flooder(ctx, src, deadline, &tallies[2], |b| b.extend_from_slice(bad)));
            }
            let mut n = 0u64;
            if !on[3] {
                continue;
            }
            s.spawn(move || {
                flooder(ctx, src, deadline, &tallies[3], |b| {
                    n += 1;
                    let name = format!("{}-{tag}-{i}-{n}", ctx.run_tag);
                    b.extend_from_slice(&frame(
                        &[0; 16],
                        Code::Register,
                        &[&name_field_raw(name.as_bytes())],
                    ));
                })
            });
        }
    });
}

/// The figures of one kind of phase (quiet or under attack), over its rounds.
#[derive(Default)]
struct Phase {
    rate: Samples,
    total_us: Vec<u32>,
    upload_us: Vec<u32>,
    commit_us: Vec<u32>,
    files: usize,
    errors: Vec<String>,
    measured: Vec<Measured>,
}

impl Phase {
    fn lat(&self) -> (Lat, Lat, Lat) {
        let (mut t, mut u, mut c) = (self.total_us.clone(), self.upload_us.clone(), self.commit_us.clone());
        (lat_summary(&mut t), lat_summary(&mut u), lat_summary(&mut c))
    }

    fn peak_kib(&self) -> Option<u64> {
        self.measured.iter().filter_map(|m| m.peak_kib).max()
    }

    fn json(&self) -> J {
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
        j.set("server_per_round", J::Arr(self.measured.iter().map(Measured::json).collect()));
        j
    }

    fn print(&self, label: &str, server: bool) {
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

pub(super) struct AttackOutcome {
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

fn sources(ctx: &Ctx) -> Vec<Option<Ipv4Addr>> {
    (0..PER_KIND)
        .map(|i| ctx.addr.ip().is_loopback().then(|| Ipv4Addr::new(127, 0, 0, 2 + i as u8)))
        .collect()
}

pub(super) fn print_title(o: &Opts, ctx: &Ctx) {
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
pub(super) fn scenario_attack(o: &Opts, ctx: &Ctx) -> Res<AttackOutcome> {
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
                    small_round(&mut cl, usize::MAX, o.small_size, tag, Some(until))
                })
            } else {
                small_round(&mut cl, usize::MAX, o.small_size, &tag, Some(Instant::now() + secs))
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

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        f64::NAN
    }
}

impl AttackOutcome {
    pub(super) fn files(&self) -> usize {
        self.quiet.files + self.attack.files
    }

    fn rss_median_max(&self) -> (Option<u64>, Option<u64>) {
        let mut v = self.rss_kib.clone();
        v.sort_unstable();
        (v.get(v.len() / 2).copied(), v.last().copied())
    }

    pub(super) fn json(&self, small: Option<(f64, Lat)>) -> J {
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

    pub(super) fn print(&self, small: Option<(f64, Lat)>, server: bool) {
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
pub(super) fn self_check() {
    assert_eq!(parse_kinds("slots, refusals"), Ok([false, true, true, false]));
    assert_eq!(parse_kinds("all"), Ok([true; 4]));
    assert!(parse_kinds("nope").is_err());
    const { assert!(SLOW_CONTENT.is_multiple_of(16) && SLOW_CONTENT + PACKET_HEADER_LEN <= 16 << 20) };
    assert_eq!(backupd::crypto::ciphertext_len(SLOW_CONTENT as u64 - 1), SLOW_CONTENT as u64);
}
