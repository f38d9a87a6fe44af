//! The attackers of scenario 4, one function per kind, and what they tally.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use backupd::client::{Client, ClientOptions};
use backupd::protocol::{ClientId, Code, NameField, Response, PACKET_HEADER_LEN, REQUEST_HEADER_LEN};

use crate::clients::{client_options, write_packet_headers};
use crate::common::{frame, name_field_raw, packet_frame};
use crate::json::{Obj as _, J};
use crate::scenarios::Ctx;

use super::{BATCH, SLOW_CONTENT, SLOW_FIRST};

/// What the attackers of one kind did, over every attack phase.
#[derive(Default)]
pub(crate) struct Tally {
    pub(crate) connections: AtomicU64,
    pub(crate) connect_failed: AtomicU64,
    /// Connections the server closed (EOF or reset) before the phase ended.
    pub(crate) closed_by_server: AtomicU64,
    /// Replies that did not come within the read timeout (the attacker then reconnects).
    pub(crate) reply_timeouts: AtomicU64,
    pub(crate) frames: AtomicU64,
    pub(crate) bytes: AtomicU64,
    /// Replies by code, 1600..=1607.
    replies: [AtomicU64; 8],
}

impl Tally {
    pub(crate) fn add(n: &AtomicU64, k: u64) {
        n.fetch_add(k, Ordering::Relaxed);
    }

    pub(crate) fn get(n: &AtomicU64) -> u64 {
        n.load(Ordering::Relaxed)
    }

    pub(crate) fn sent(&self, frames: u64, bytes: usize) {
        Tally::add(&self.frames, frames);
        Tally::add(&self.bytes, bytes as u64);
    }

    pub(crate) fn reply(&self, r: &Response) {
        let code = r.code() as usize;
        if let Some(n) = code.checked_sub(1600).and_then(|i| self.replies.get(i)) {
            Tally::add(n, 1);
        }
    }

    /// A read or write failed: the server closed the connection, or a reply is late.
    pub(crate) fn lost(&self, e: &backupd::client::ClientError) {
        Tally::add(if e.is_timeout() { &self.reply_timeouts } else { &self.closed_by_server }, 1);
    }

    pub(crate) fn connect(&self, src: Option<Ipv4Addr>, dst: SocketAddr) -> Option<Client> {
        let opts = ClientOptions { read_timeout: Duration::from_secs(2), ..client_options() };
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

    pub(crate) fn replies_text(&self) -> String {
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

    pub(crate) fn json(&self) -> J {
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
pub(crate) fn connect_from(src: Option<Ipv4Addr>, dst: SocketAddr) -> io::Result<TcpStream> {
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
pub(crate) fn nap(d: Duration, deadline: Instant) {
    thread::sleep(d.min(deadline.saturating_duration_since(Instant::now())));
}

/// Read the replies already waiting, without blocking. False when the
/// server has closed the connection.
pub(crate) fn drain_replies(c: &mut Client, t: &Tally) -> bool {
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
pub(crate) fn slow_announcer(
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
pub(crate) fn slot_holder(ctx: &Ctx, src: Option<Ipv4Addr>, deadline: Instant, i: usize, t: &Tally) {
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
pub(crate) fn flooder(
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
pub(crate) fn attack(
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
