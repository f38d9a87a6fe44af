//! Deadlines, checked every housekeeping tick: header, payload and content
//! pace, lingering close, login and idle timeouts, stale uploads.

use std::time::{Duration, Instant};

use super::connection::{Connection, ReadState};
use super::{Server, CLOSE_GRACE, MIN_PAYLOAD_RATE};
use crate::config::Config;
use crate::metrics::Closed;

impl Server {
    /// Deadlines, checked every tick.
    pub(super) fn housekeeping(&mut self, now: Instant) {
        crate::logging::report_suppressed();
        self.report_refusals(now);
        let cfg = self.core.cfg.clone();
        let mut to_close: Vec<(usize, u64, String)> = Vec::new();
        let mut stale: Vec<(usize, u64)> = Vec::new();
        let mut ended: Vec<(usize, u64)> = Vec::new();
        let mut stopped: Vec<(usize, u64)> = Vec::new();
        for (key, c) in self.conns.iter() {
            if let Some(why) = overdue(c, &cfg, now) {
                to_close.push((key, c.serial(), why));
                continue;
            }
            if c.proto.has_stale(now, cfg.stale_upload_timeout) {
                stale.push((key, c.serial()));
            }
            if c.between_frames() && c.proto.end_overdue(now, END_GRACE) {
                ended.push((key, c.serial()));
            }
            if c.between_frames() && !c.has_input() && c.proto.past_total_overdue(now, END_GRACE) {
                stopped.push((key, c.serial()));
            }
        }
        for (key, serial) in stopped {
            if let Some(c) = self.conns.get_mut(key).filter(|c| c.serial() == serial) {
                self.core.refuse_stopped_past_total(&mut c.proto);
                // Its 1607 goes out now (a drive flushes before it reads).
                self.drive(key, serial);
            }
        }
        for (key, serial) in ended {
            if let Some(c) = self.conns.get_mut(key).filter(|c| c.serial() == serial) {
                self.core.finish_pending_end(&mut c.proto);
            }
        }
        for (key, serial, why) in to_close {
            self.close(key, serial, Closed::Timeout, Some(&why));
        }
        for (key, serial) in stale {
            if let Some(c) = self.conns.get_mut(key).filter(|c| c.serial() == serial) {
                self.core.purge_stale(&mut c.proto, now);
            }
        }
    }
}

/// How long a per-chunk upload's pending end (a full chunk numbered as the
/// total) waits for the empty chunk or the next chunk that per-chunk clients
/// send right after it, before the file ends there (`sequence.rs`); and how
/// long one whose count went on past its total may stop before it is
/// refused.
const END_GRACE: Duration = Duration::from_secs(1);

/// Time allowed for `bytes` at the slowest rate tolerated.
pub(super) fn slowest(bytes: u64) -> Duration {
    Duration::from_millis(bytes.saturating_mul(1000) / MIN_PAYLOAD_RATE)
}

/// Why a connection must be closed now, if it must: a deadline has passed.
fn overdue(c: &Connection, cfg: &Config, now: Instant) -> Option<String> {
    if let Some(t) = c.closing {
        return (now.duration_since(t) > CLOSE_GRACE).then(|| "closing connection timed out".into());
    }
    if let (Some(start), true) = (c.header_started(), c.header_in_progress()) {
        if now.duration_since(start) > cfg.header_timeout {
            return Some(format!("header not complete within {:?}", cfg.header_timeout));
        }
    }
    match c.read_state() {
        ReadState::AwaitPayload(f) => {
            let allowed = cfg.header_timeout + slowest(f.payload.len() as u64);
            if c.header_started().is_some_and(|start| now.duration_since(start) > allowed) {
                return Some(format!("frame not complete within {allowed:?}"));
            }
        }
        ReadState::Content(cr) if cr.deadline.is_some_and(|d| now > d) => {
            return Some("file content arriving too slowly".into());
        }
        ReadState::Drain { deadline, .. } if now > *deadline => {
            return Some("refused packet's content arriving too slowly".into());
        }
        _ => {}
    }
    let at_worker = c.proto.awaits_reply() || c.proto.packets_in_flight > 0;
    if !c.authed && !at_worker && now.duration_since(c.accepted) > cfg.login_timeout {
        return Some(format!("no session within --login-timeout ({:?})", cfg.login_timeout));
    }
    let waiting_for_budget = matches!(c.read_state(), ReadState::Content(cr) if cr.piece.is_none());
    if !at_worker && !waiting_for_budget && now.duration_since(c.last_activity) > cfg.idle_timeout {
        return Some(format!("idle for {:?}", cfg.idle_timeout));
    }
    None
}
