//! What a run says about each file: [`FileReport`] (its human line and its
//! `--json` object), why a file failed ([`Failure`]) or was skipped
//! ([`Done::Skipped`]), and the run's [`Tally`] for the closing line and the
//! exit code. Formatting only: the decisions are made in `run.rs` and `retry.rs`.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use super::cli::{EXIT_LOCAL, EXIT_OK};
use crate::json::{json_opt_num, json_str};

/// Why a file was not verified.
#[derive(Debug, Clone)]
pub struct Failure {
    pub code: i32,
    /// Short machine-readable kind for `--json`.
    pub status: &'static str,
    pub message: String,
}

impl Failure {
    pub fn local(message: impl Into<String>) -> Failure {
        Failure { code: EXIT_LOCAL, status: "local_error", message: message.into() }
    }
}

/// How a file ended without failing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Done {
    /// Sent, and verified by the server.
    Verified,
    /// Not sent: `status` for `--json` (`unchanged`, `excluded`, `symlink`,
    /// `symlink_loop`, `special_file`) and a reason for people.
    Skipped { status: &'static str, reason: String },
}

/// The outcome of one file, as printed.
#[derive(Debug, Clone)]
pub struct FileReport {
    pub path: PathBuf,
    pub name: String,
    pub size: Option<u64>,
    pub cksum: Option<u32>,
    pub server_cksum: Option<u32>,
    pub attempts: u32,
    pub elapsed: Duration,
    pub result: Result<Done, Failure>,
}

impl FileReport {
    pub fn code(&self) -> i32 {
        match &self.result {
            Ok(_) => EXIT_OK,
            Err(f) => f.code,
        }
    }

    fn verified(&self) -> bool {
        matches!(self.result, Ok(Done::Verified))
    }

    fn mb_per_s(&self) -> Option<f64> {
        let secs = self.elapsed.as_secs_f64();
        match (self.verified(), self.size) {
            (true, Some(size)) if secs > 0.0 => Some(size as f64 / secs / 1e6),
            _ => None,
        }
    }

    /// The human summary line.
    pub fn line(&self) -> String {
        let mut s = format!("{}:", self.path.display());
        match (self.size, &self.result) {
            (_, Ok(Done::Skipped { reason, .. })) => {
                let _ = write!(s, " skipped: {reason}");
                return s;
            }
            (None, Err(f)) => {
                let _ = write!(s, " NOT sent: {}", f.message);
                return s;
            }
            (Some(n), _) => {
                let _ = write!(s, " {n} bytes,");
            }
            (None, _) => s.push_str(" - bytes,"),
        }
        match (self.cksum, self.server_cksum) {
            (Some(c), Some(sc)) if c != sc => {
                let _ = write!(s, " cksum {c} (server: {sc}),");
            }
            (Some(c), _) => {
                let _ = write!(s, " cksum {c},");
            }
            (None, _) => s.push_str(" cksum -,"),
        }
        match &self.result {
            Ok(_) if self.attempts > 1 => {
                let _ = write!(s, " verified (attempt {}),", self.attempts);
            }
            Ok(_) => s.push_str(" verified,"),
            Err(f) => {
                let _ = write!(s, " NOT verified: {},", f.message);
            }
        }
        let _ = write!(s, " {:.2} s", self.elapsed.as_secs_f64());
        if let Some(r) = self.mb_per_s() {
            let _ = write!(s, ", {r:.1} MB/s");
        }
        s
    }

    /// The `--json` object (one line).
    pub fn json(&self) -> String {
        let null = || "null".to_string();
        let (status, error, reason) = match &self.result {
            Ok(Done::Verified) => ("verified", null(), null()),
            Ok(Done::Skipped { status, reason }) => (*status, null(), json_str(reason)),
            Err(f) => (f.status, json_str(&f.message), null()),
        };
        format!(
            "{{\"file\":{},\"name\":{},\"size\":{},\"cksum\":{},\"server_cksum\":{},\"verified\":{},\
             \"status\":{},\"attempts\":{},\"error\":{},\"reason\":{},\"seconds\":{:.3},\"mb_per_s\":{},\
             \"exit_code\":{}}}",
            json_str(&self.path.to_string_lossy()),
            json_str(&self.name),
            json_opt_num(self.size),
            json_opt_num(self.cksum),
            json_opt_num(self.server_cksum),
            self.verified(),
            json_str(status),
            self.attempts,
            error,
            reason,
            self.elapsed.as_secs_f64(),
            json_opt_num(self.mb_per_s().map(|r| format!("{r:.3}"))),
            self.code(),
        )
    }
}

/// Tally of a run, for the closing line.
#[derive(Default)]
pub struct Tally {
    pub sent: usize,
    pub unchanged: usize,
    pub skipped: usize,
    pub failed: usize,
    /// The exit code: the largest of the files' codes.
    pub code: i32,
}

impl Tally {
    pub fn add(&mut self, r: &FileReport) {
        match &r.result {
            Ok(Done::Verified) => self.sent += 1,
            Ok(Done::Skipped { status: "unchanged", .. }) => self.unchanged += 1,
            Ok(Done::Skipped { .. }) => self.skipped += 1,
            Err(_) => self.failed += 1,
        }
        self.code = self.code.max(r.code());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_escaping() {
        assert_eq!(json_str("a\"b\\c\nd\u{1}é"), "\"a\\\"b\\\\c\\nd\\u0001é\"");
        let r = FileReport {
            path: PathBuf::from("dir/\"x\".bin"),
            name: "\"x\".bin".into(),
            size: Some(10),
            cksum: Some(1),
            server_cksum: None,
            attempts: 1,
            elapsed: Duration::from_millis(1500),
            result: Err(Failure::local("boom\t!")),
        };
        let j = r.json();
        assert!(j.starts_with("{\"file\":\"dir/\\\"x\\\".bin\""), "{j}");
        assert!(j.contains("\"server_cksum\":null"), "{j}");
        assert!(j.contains("\"error\":\"boom\\t!\""), "{j}");
        assert!(j.contains("\"exit_code\":1"), "{j}");
        assert!(j.contains("\"mb_per_s\":null"), "{j}");
        assert!(j.contains("\"reason\":null"), "{j}");
        assert!(!j.contains('\n'));
        let skipped = FileReport {
            result: Ok(Done::Skipped { status: "unchanged", reason: "same\tsize".into() }),
            ..r
        };
        let j = skipped.json();
        assert!(
            j.contains("\"status\":\"unchanged\",\"attempts\":1,\"error\":null,\"reason\":\"same\\tsize\""),
            "{j}"
        );
        assert!(j.contains("\"verified\":false") && j.contains("\"exit_code\":0"), "{j}");
        assert_eq!(skipped.line(), "dir/\"x\".bin: skipped: same\tsize");
    }
}
