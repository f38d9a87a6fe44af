//! A TCP proxy between backupd and the store that can be switched, while
//! it runs, between passing traffic and the faults of issue 13: closing
//! every connection, answering each request with an HTTP error (503, 500,
//! ...), or stalling (reading, never answering). Switching closes the
//! connections already open, so a pooled keep-alive connection cannot carry
//! traffic past a fault.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Forward both ways.
    Pass,
    /// Accept, then reset the connection at once (the store unreachable).
    Close,
    /// Read the request (head and body), answer this HTTP status with an S3 error body.
    Status(u16),
    /// Read whatever comes, never answer (a store that hangs).
    Stall,
}

struct Shared {
    fault: Mutex<Fault>,
    /// Every connection open now (client side and upstream side), to close on a switch.
    open: Mutex<Vec<TcpStream>>,
    stop: AtomicBool,
    /// Connections accepted, in all.
    accepted: AtomicU64,
}

pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

impl FaultProxy {
    /// Listen on 127.0.0.1 (free port), forwarding to `upstream` while the fault is Pass.
    pub fn start(upstream: SocketAddr, fault: Fault) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("proxy listen");
        let addr = listener.local_addr().expect("proxy address");
        let shared = Arc::new(Shared {
            fault: Mutex::new(fault),
            open: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
            accepted: AtomicU64::new(0),
        });
        let s = shared.clone();
        thread::spawn(move || {
            for conn in listener.incoming() {
                if s.stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                s.accepted.fetch_add(1, Ordering::SeqCst);
                let s2 = s.clone();
                thread::spawn(move || serve(conn, upstream, &s2));
            }
        });
        FaultProxy { addr, shared }
    }

    /// `http://127.0.0.1:PORT`, to give backupd as its endpoint.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Switch to `fault`; connections already open are closed.
    pub fn set(&self, fault: Fault) {
        *self.shared.fault.lock().unwrap() = fault;
        close_all(&self.shared);
    }

    pub fn fault(&self) -> Fault {
        *self.shared.fault.lock().unwrap()
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        close_all(&self.shared);
        // Wake the accept loop so that it sees `stop`.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
    }
}

fn close_all(shared: &Shared) {
    for c in shared.open.lock().unwrap().drain(..) {
        let _ = c.shutdown(Shutdown::Both);
    }
}

fn track(shared: &Shared, s: &TcpStream) {
    if let Ok(c) = s.try_clone() {
        shared.open.lock().unwrap().push(c);
    }
}

fn serve(conn: TcpStream, upstream: SocketAddr, shared: &Shared) {
    let fault = *shared.fault.lock().unwrap();
    match fault {
        Fault::Pass => {
            let Ok(up) = TcpStream::connect_timeout(&upstream, Duration::from_secs(5)) else {
                return;
            };
            track(shared, &conn);
            track(shared, &up);
            let (Ok(conn2), Ok(up2)) = (conn.try_clone(), up.try_clone()) else { return };
            thread::spawn(move || pipe(conn2, up2));
            pipe(up, conn);
        }
        Fault::Close => {
            // SO_LINGER 0: the close is a reset, as from a host that is gone.
            let _ = socket2::SockRef::from(&conn).set_linger(Some(Duration::ZERO));
            drop(conn);
        }
        Fault::Status(code) => {
            track(shared, &conn);
            answer_each(conn, code);
        }
        Fault::Stall => {
            track(shared, &conn);
            let mut c = conn;
            let mut buf = [0u8; 64 * 1024];
            while matches!(c.read(&mut buf), Ok(n) if n > 0) {}
        }
    }
}

fn pipe(mut from: TcpStream, mut to: TcpStream) {
    let _ = std::io::copy(&mut from, &mut to);
    let _ = to.shutdown(Shutdown::Write);
}

/// Read and drop exactly `len` bytes.
fn skip(rd: &mut impl BufRead, len: u64) -> bool {
    std::io::copy(&mut rd.take(len), &mut std::io::sink()).is_ok_and(|n| n == len)
}

/// Read and drop a chunked body (and its trailer).
fn skip_chunked(rd: &mut impl BufRead) -> bool {
    let mut line = String::new();
    loop {
        line.clear();
        if !matches!(rd.read_line(&mut line), Ok(n) if n > 0) {
            return false;
        }
        let Ok(size) = u64::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16) else {
            return false;
        };
        if size == 0 {
            // Trailer lines up to the empty one.
            loop {
                line.clear();
                if !matches!(rd.read_line(&mut line), Ok(n) if n > 0) {
                    return false;
                }
                if line.trim_end().is_empty() {
                    return true;
                }
            }
        }
        if !skip(rd, size + 2) {
            return false;
        }
    }
}

/// Read each request (head, then a Content-Length body) and answer `code`.
fn answer_each(conn: TcpStream, code: u16) {
    let Ok(mut w) = conn.try_clone() else { return };
    let mut rd = BufReader::new(conn);
    loop {
        let mut len = 0u64;
        let mut chunked = false;
        let mut line = String::new();
        let mut first = true;
        loop {
            line.clear();
            match rd.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            let l = line.trim_end();
            if l.is_empty() {
                if first {
                    continue;
                }
                break;
            }
            first = false;
            if let Some((k, v)) = l.split_once(':') {
                if k.trim().eq_ignore_ascii_case("content-length") {
                    len = v.trim().parse().unwrap_or(0);
                }
                if k.trim().eq_ignore_ascii_case("transfer-encoding")
                    && v.to_ascii_lowercase().contains("chunked")
                {
                    chunked = true;
                }
            }
        }
        let body_read = if chunked { skip_chunked(&mut rd) } else { skip(&mut rd, len) };
        if !body_read {
            return;
        }
        let (reason, s3) = match code {
            503 => ("Service Unavailable", "SlowDown"),
            500 => ("Internal Server Error", "InternalError"),
            403 => ("Forbidden", "AccessDenied"),
            _ => ("Error", "InternalError"),
        };
        let body = format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{s3}</Code><Message>fault proxy</Message></Error>"
        );
        let head = format!(
            "HTTP/1.1 {code} {reason}\r\nContent-Type: application/xml\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        if w.write_all(head.as_bytes()).and_then(|_| w.write_all(body.as_bytes())).is_err() {
            return;
        }
    }
}
