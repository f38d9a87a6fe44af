//! The boxes backupd is for, on this machine: the server confined to one
//! core (`taskset -c 0`) and 256 MB of memory, for the second figure set
//! (`--confined`, issue 14). The memory limit is the first of these that
//! works here, and the report names it:
//!
//! 1. `systemd-run --scope -p MemoryMax=256M` (needs systemd as PID 1);
//! 2. a cgroup v2 folder of our own with `memory.max` (needs the memory
//!    controller on the v2 hierarchy and a writable folder);
//! 3. a cgroup v1 memory folder below our own with `memory.limit_in_bytes`;
//! 4. `prlimit --as` (an address-space limit: counts reservations, not
//!    memory used, so it is the roughest).
//!
//! A cgroup counts the page cache the server's writes make, as a 256 MB box
//! would; `prlimit` does not.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::Res;

/// 256 MB, in bytes.
pub(crate) const MEMORY_BYTES: u64 = 256 << 20;

#[derive(Debug)]
pub(crate) enum Memory {
    SystemdRun,
    /// Our cgroup folder (v2, or v1's memory hierarchy), made for the run.
    Cgroup {
        dir: PathBuf,
        v2: bool,
    },
    Prlimit,
}

#[derive(Debug)]
pub(crate) struct Confinement {
    pub(crate) memory: Memory,
}

impl Confinement {
    /// The first memory limit that works here (see the module docs);
    /// `taskset` is required.
    pub(crate) fn detect() -> Res<Confinement> {
        if !runs(Command::new("taskset").args(["-c", "0", "true"])) {
            return Err("--confined: `taskset -c 0` does not work here".into());
        }
        let memory =
            if runs(Command::new("systemd-run").args(["--scope", "--quiet", "-p", "MemoryMax=256M", "true"]))
            {
                Memory::SystemdRun
            } else if let Some(dir) = cgroup_v2() {
                Memory::Cgroup { dir, v2: true }
            } else if let Some(dir) = cgroup_v1() {
                Memory::Cgroup { dir, v2: false }
            } else if runs(Command::new("prlimit").args([&format!("--as={MEMORY_BYTES}"), "true"])) {
                Memory::Prlimit
            } else {
                return Err(
                    "--confined: no way to limit the server's memory here (systemd-run, cgroups, prlimit)"
                        .into(),
                );
            };
        Ok(Confinement { memory })
    }

    /// How the server is confined, for the report.
    pub(crate) fn describe(&self) -> String {
        let mem = match &self.memory {
            Memory::SystemdRun => "systemd-run --scope -p MemoryMax=256M".to_string(),
            Memory::Cgroup { dir, v2: true } => format!("cgroup v2 {} (memory.max 256M)", dir.display()),
            Memory::Cgroup { dir, v2: false } => {
                format!("cgroup v1 {} (memory.limit_in_bytes 256M, page cache included)", dir.display())
            }
            Memory::Prlimit => "prlimit --as=256M (address space, not a cgroup)".to_string(),
        };
        format!("taskset -c 0 (one core); {mem}")
    }

    /// The command that starts `bin` confined: the wrappers exec the server,
    /// so the child's pid is the server's.
    pub(crate) fn command(&self, bin: &Path) -> Command {
        let mut c = match self.memory {
            Memory::SystemdRun => {
                let mut c = Command::new("systemd-run");
                c.args(["--scope", "--quiet", "-p", "MemoryMax=256M", "taskset", "-c", "0"]);
                c
            }
            Memory::Prlimit => {
                let mut c = Command::new("prlimit");
                c.args([&format!("--as={MEMORY_BYTES}"), "taskset", "-c", "0"]);
                c
            }
            Memory::Cgroup { .. } => {
                let mut c = Command::new("taskset");
                c.args(["-c", "0"]);
                c
            }
        };
        c.arg(bin);
        c
    }

    /// Put the started server into the cgroup (nothing to do for the other
    /// ways: the wrapper did it). Its first milliseconds run outside it.
    pub(crate) fn adopt(&self, pid: u32) -> Res<()> {
        if let Memory::Cgroup { dir, .. } = &self.memory {
            let procs = dir.join("cgroup.procs");
            fs::write(&procs, pid.to_string()).map_err(|e| format!("{}: {e}", procs.display()))?;
        }
        Ok(())
    }
}

impl Drop for Confinement {
    fn drop(&mut self) {
        if let Memory::Cgroup { dir, .. } = &self.memory {
            let _ = fs::remove_dir(dir);
        }
    }
}

fn runs(c: &mut Command) -> bool {
    c.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
}

/// A folder of ours for the run, named after the process.
fn folder_name() -> String {
    format!("backupd-bench-{}", std::process::id())
}

/// A cgroup v2 folder with a 256 MB `memory.max`, below the v2 hierarchy's
/// root (or our own v2 group), if the memory controller is enabled there.
fn cgroup_v2() -> Option<PathBuf> {
    let roots = ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"];
    let root = roots.iter().map(Path::new).find(|r| {
        fs::read_to_string(r.join("cgroup.subtree_control"))
            .is_ok_and(|c| c.split_whitespace().any(|x| x == "memory"))
    })?;
    let own = fs::read_to_string("/proc/self/cgroup")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("0::").map(|p| p.trim_start_matches('/').to_string()))?;
    let dir = root.join(own).join(folder_name());
    make_group(&dir, "memory.max")
}

/// A cgroup v1 memory folder with a 256 MB `memory.limit_in_bytes`, below
/// our own memory group.
fn cgroup_v1() -> Option<PathBuf> {
    let own = fs::read_to_string("/proc/self/cgroup").ok()?.lines().find_map(|l| {
        let mut f = l.splitn(3, ':');
        let (_, ctl, path) = (f.next()?, f.next()?, f.next()?);
        ctl.split(',').any(|c| c == "memory").then(|| path.trim_start_matches('/').to_string())
    })?;
    let dir = Path::new("/sys/fs/cgroup/memory").join(own).join(folder_name());
    make_group(&dir, "memory.limit_in_bytes")
}

fn make_group(dir: &Path, limit_file: &str) -> Option<PathBuf> {
    fs::create_dir(dir).ok()?;
    if fs::write(dir.join(limit_file), MEMORY_BYTES.to_string()).is_err() {
        let _ = fs::remove_dir(dir);
        return None;
    }
    Some(dir.to_path_buf())
}
