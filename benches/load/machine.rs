//! The machine's description: CPU, memory, kernel, the bench directory's
//! filesystem, the open-file limit, the release binary.

use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::{Command, Stdio};

use crate::cli::Opts;
use crate::json::{Obj as _, J};
use crate::report::line;
use crate::usage::nproc;
use crate::MIB;

pub(crate) fn cmd_out(cmd: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(cmd).args(args).stderr(Stdio::null()).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

pub(crate) fn cpu_model() -> Option<String> {
    let s = fs::read_to_string("/proc/cpuinfo").ok()?;
    let l = s.lines().find(|l| l.starts_with("model name"))?;
    Some(l.split_once(':')?.1.trim().to_string())
}

pub(crate) fn mem_total_mib() -> Option<f64> {
    let s = fs::read_to_string("/proc/meminfo").ok()?;
    let kib: f64 = s.lines().find(|l| l.starts_with("MemTotal:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// Filesystem type of `p` (statfs magic) and the options of its mount.
pub(crate) fn fs_info(p: &Path) -> (String, String) {
    let mut kind = "unknown".to_string();
    if let Ok(c) = CString::new(p.as_os_str().as_bytes()) {
        // SAFETY: statfs writes into the zeroed struct we own; the path is NUL-terminated.
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::statfs(c.as_ptr(), &mut st) } == 0 {
            kind = match st.f_type as i64 {
                0xEF53 => "ext2/3/4".into(),
                0x0102_1994 => "tmpfs".into(),
                0x5846_5342 => "xfs".into(),
                0x9123_683E => "btrfs".into(),
                0x794C_7630 => "overlayfs".into(),
                0x2FC1_2FC1 => "zfs".into(),
                other => format!("0x{other:x}"),
            };
        }
    }
    // The mount with the longest mount point that is a prefix of the path.
    let abs = fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let mut best = (0usize, String::new());
    if let Ok(m) = fs::read_to_string("/proc/mounts") {
        for l in m.lines() {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() >= 4 && abs.starts_with(f[1]) && f[1].len() >= best.0 {
                best = (f[1].len(), format!("{} on {} type {} ({})", f[0], f[1], f[2], f[3]));
            }
        }
    }
    (kind, best.1)
}

pub(crate) fn raise_nofile(want: u64) -> (u64, u64) {
    // SAFETY: getrlimit/setrlimit on our own process with a struct we own.
    unsafe {
        let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return (0, 0);
        }
        if r.rlim_cur < want {
            let nr = libc::rlimit { rlim_cur: want.min(r.rlim_max), rlim_max: r.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &nr) == 0 {
                r.rlim_cur = nr.rlim_cur;
            }
        }
        (r.rlim_cur, r.rlim_max)
    }
}

/// The machine, printed and as the top of `results.json` (issue 5: every
/// figure comes with what it was measured on).
pub(crate) fn describe_machine(o: &Opts, dir: &Path, (nofile, nofile_max): (u64, u64)) -> J {
    let (fs_kind, mount) = fs_info(dir);
    let git_rev = cmd_out("git", &["-C", env!("CARGO_MANIFEST_DIR"), "rev-parse", "HEAD"]);
    let git_dirty =
        cmd_out("git", &["-C", env!("CARGO_MANIFEST_DIR"), "status", "--porcelain", "--untracked-files=no"])
            .map(|s| !s.is_empty());
    let mut top = J::obj();
    top.set("timestamp", cmd_out("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]));
    top.set("git_revision", git_rev.clone());
    top.set("git_dirty", git_dirty);
    top.set("nproc", nproc());
    top.set("kernel", cmd_out("uname", &["-r"]));
    top.set("cpu_model", cpu_model());
    top.set("mem_total_mib", mem_total_mib());
    top.set("loadavg_at_start", fs::read_to_string("/proc/loadavg").ok().map(|s| s.trim().to_string()));
    top.set("mode", if o.quick { "quick" } else { "full" });
    top.set("target", o.target.clone());
    top.set(
        "scenarios_selected",
        o.scenarios.iter().map(|s| format!("{s:?}").to_lowercase()).collect::<Vec<_>>(),
    );
    let mut fsj = J::obj();
    fsj.set("path", dir.display().to_string());
    fsj.set("fs_type", fs_kind.clone());
    fsj.set("mount", mount.clone());
    top.set("bench_dir", fsj);
    top.set("rlimit_nofile", nofile);

    println!("backupd load benchmark ({} mode)", if o.quick { "quick" } else { "full" });
    line(
        "machine",
        format!(
            "{} cores, {}, kernel {}",
            nproc(),
            cpu_model().unwrap_or_default(),
            cmd_out("uname", &["-r"]).unwrap_or_default()
        ),
    );
    line(
        "git",
        format!(
            "{}{}",
            git_rev.unwrap_or_default(),
            if git_dirty == Some(true) { " (dirty tree)" } else { "" }
        ),
    );
    line("bench dir filesystem", format!("{fs_kind}: {mount}"));
    line("load average at start", fs::read_to_string("/proc/loadavg").unwrap_or_default().trim());
    line("RLIMIT_NOFILE", format!("{nofile} (hard {nofile_max})"));
    if fs_kind == "tmpfs" {
        println!("  WARNING: {} is on tmpfs: the fsync figures mean nothing there", dir.display());
    }
    top
}

/// The release binary's size, printed and in `top`; its stripped size in MiB.
pub(crate) fn describe_binary(o: &Opts, dir: &Path, top: &mut J) -> Option<f64> {
    let size = fs::metadata(&o.server_bin).map(|m| m.len()).ok();
    let stripped_path = dir.join("backupd.stripped");
    let stripped =
        cmd_out("strip", &["-o", &stripped_path.display().to_string(), &o.server_bin.display().to_string()])
            .and_then(|_| fs::metadata(&stripped_path).map(|m| m.len()).ok());
    let _ = fs::remove_file(&stripped_path);
    let mut b = J::obj();
    b.set("path", o.server_bin.display().to_string());
    b.set("size_bytes", size);
    b.set("stripped_size_bytes", stripped);
    top.set("binary", b);
    let binary_mib = stripped.or(size).map(|b| b as f64 / MIB as f64);
    line(
        "release binary",
        format!(
            "{} bytes; stripped {} bytes ({:.2} MiB)",
            size.map_or("n/a".into(), |s| s.to_string()),
            stripped.map_or("n/a".into(), |s| s.to_string()),
            binary_mib.unwrap_or(f64::NAN)
        ),
    );
    binary_mib
}
