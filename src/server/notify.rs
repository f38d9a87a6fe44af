//! The systemd service protocol (sd_notify), when `NOTIFY_SOCKET` is set:
//! READY=1 once listening, WATCHDOG=1 from the event loop at half of
//! `WATCHDOG_USEC` (so a stuck loop is restarted by systemd), STOPPING=1 when
//! shutdown begins. Without `NOTIFY_SOCKET` every call does nothing.

use std::time::{Duration, Instant};

use sd_notify::NotifyState;

/// Readiness and watchdog notifications to the service manager.
pub struct Notifier {
    /// Half the watchdog interval, when systemd asked for a watchdog.
    watchdog: Option<Duration>,
    next_ping: Option<Instant>,
}

impl Notifier {
    pub fn from_env() -> Notifier {
        let mut usec = 0u64;
        let watchdog = sd_notify::watchdog_enabled(false, &mut usec)
            .then(|| Duration::from_micros(usec / 2).max(Duration::from_millis(10)));
        Notifier { watchdog, next_ping: None }
    }

    fn send(state: NotifyState<'_>) {
        if let Err(e) = sd_notify::notify(false, &[state]) {
            log::warn!("cannot notify the service manager: {e}");
        }
    }

    /// The server is listening.
    pub fn ready(&mut self, now: Instant) {
        Self::send(NotifyState::Ready);
        self.ping(now);
    }

    /// Shutdown has begun.
    pub fn stopping(&self) {
        Self::send(NotifyState::Stopping);
    }

    /// When the loop must wake next for the watchdog, if it must.
    pub fn due(&self) -> Option<Instant> {
        self.next_ping
    }

    /// Called from the loop: ping the watchdog when it is due.
    pub fn ping(&mut self, now: Instant) {
        let Some(every) = self.watchdog else { return };
        if self.next_ping.is_none_or(|t| now >= t) {
            Self::send(NotifyState::Watchdog);
            self.next_ping = Some(now + every);
        }
    }
}
