//! What ships in dist/ (issue 11, server features 1-3): the systemd units,
//! the logrotate example, the Grafana dashboard, and `make install`. The
//! units are checked against the real binary's flags, the dashboard against
//! the metrics file the real server writes, and, when `systemd-analyze` is on
//! the machine, the installed units with `systemd-analyze verify`.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::*;

const UNITS: [&str; 3] = ["backupd.service", "backupd-verify.service", "backupd-verify.timer"];

/// The path the units name; `make install` rewrites it to its BINDIR.
const UNIT_BIN: &str = "/usr/local/bin/backupd";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn dist(name: &str) -> String {
    std::fs::read_to_string(repo().join("dist").join(name)).unwrap_or_else(|e| panic!("dist/{name}: {e}"))
}

/// One `Key=value` of a unit file.
#[derive(Debug)]
struct Entry {
    section: String,
    key: String,
    value: String,
    line: usize,
}

/// A unit file as systemd reads it: `[Section]` headers, `Key=value` lines,
/// `#` and `;` comments. (Line continuations are not used in dist/.)
fn parse_unit(name: &str, text: &str) -> Vec<Entry> {
    let mut section = String::new();
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        assert!(!line.ends_with('\\'), "{name}:{}: no line continuations, please", i + 1);
        if let Some(s) = line.strip_prefix('[') {
            section = s.strip_suffix(']').unwrap_or_else(|| panic!("{name}:{}: {raw}", i + 1)).to_string();
            continue;
        }
        let (k, v) = line.split_once('=').unwrap_or_else(|| panic!("{name}:{}: not Key=value: {raw}", i + 1));
        assert!(!section.is_empty(), "{name}:{}: a key before any section", i + 1);
        out.push(Entry {
            section: section.clone(),
            key: k.trim().into(),
            value: v.trim().into(),
            line: i + 1,
        });
    }
    out
}

fn values<'a>(entries: &'a [Entry], section: &str, key: &str) -> Vec<&'a str> {
    entries.iter().filter(|e| e.section == section && e.key == key).map(|e| e.value.as_str()).collect()
}

fn value<'a>(entries: &'a [Entry], section: &str, key: &str) -> &'a str {
    match values(entries, section, key)[..] {
        [v] => v,
        ref vs => panic!("[{section}] {key}: expected one value, found {vs:?}"),
    }
}

/// `Environment=` assignments of a [Service].
fn environment(entries: &[Entry]) -> Vec<(String, String)> {
    values(entries, "Service", "Environment")
        .iter()
        .flat_map(|v| v.split_whitespace())
        .map(|a| {
            let (k, v) = a.split_once('=').unwrap_or_else(|| panic!("Environment={a}"));
            (k.to_string(), v.to_string())
        })
        .collect()
}

/// The directives dist/ may use, by section (systemd.unit(5), systemd.service(5),
/// systemd.exec(5), systemd.resource-control(5), systemd.kill(5), systemd.timer(5)).
const KNOWN: &[(&str, &[&str])] = &[
    (
        "Unit",
        &[
            "Description",
            "Documentation",
            "After",
            "Before",
            "Wants",
            "Requires",
            "Requisite",
            "BindsTo",
            "PartOf",
            "Conflicts",
            "OnFailure",
            "StartLimitIntervalSec",
            "StartLimitBurst",
            "ConditionPathExists",
            "AssertPathExists",
        ],
    ),
    (
        "Service",
        &[
            "Type",
            "NotifyAccess",
            "WatchdogSec",
            "ExecStart",
            "ExecStartPre",
            "ExecReload",
            "ExecStop",
            "Restart",
            "RestartSec",
            "TimeoutStartSec",
            "TimeoutStopSec",
            "SuccessExitStatus",
            "Environment",
            "EnvironmentFile",
            "WorkingDirectory",
            "User",
            "Group",
            "DynamicUser",
            "UMask",
            "StateDirectory",
            "StateDirectoryMode",
            "LogsDirectory",
            "LogsDirectoryMode",
            "RuntimeDirectory",
            "RuntimeDirectoryMode",
            "ReadWritePaths",
            "ReadOnlyPaths",
            "InaccessiblePaths",
            "MemoryMax",
            "MemoryHigh",
            "TasksMax",
            "LimitNOFILE",
            "Nice",
            "IOSchedulingClass",
            "CPUSchedulingPolicy",
            "NoNewPrivileges",
            "CapabilityBoundingSet",
            "AmbientCapabilities",
            "ProtectSystem",
            "ProtectHome",
            "PrivateTmp",
            "PrivateMounts",
            "PrivateDevices",
            "PrivateNetwork",
            "PrivateUsers",
            "ProtectKernelTunables",
            "ProtectKernelModules",
            "ProtectKernelLogs",
            "ProtectControlGroups",
            "ProtectClock",
            "ProtectHostname",
            "ProtectProc",
            "ProcSubset",
            "RestrictAddressFamilies",
            "RestrictNamespaces",
            "RestrictRealtime",
            "RestrictSUIDSGID",
            "LockPersonality",
            "MemoryDenyWriteExecute",
            "RemoveIPC",
            "SystemCallArchitectures",
            "SystemCallFilter",
            "SystemCallErrorNumber",
            "KillMode",
            "KillSignal",
        ],
    ),
    ("Timer", &["OnCalendar", "OnBootSec", "RandomizedDelaySec", "AccuracySec", "Persistent", "Unit"]),
    ("Install", &["WantedBy", "RequiredBy", "Alias", "Also"]),
];

/// Run a command, bounded: its output, or a panic after `limit`.
fn run_bounded(cmd: &mut Command, limit: Duration) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let (out, err) = (dir.path().join("out"), dir.path().join("err"));
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    if !wait_until(limit, || child.try_wait().unwrap().is_some()) {
        let _ = child.kill();
        let _ = child.wait();
        panic!("{cmd:?} took more than {limit:?}");
    }
    let status = child.wait().unwrap();
    Output { status, stdout: std::fs::read(out).unwrap(), stderr: std::fs::read(err).unwrap() }
}

fn help(args: &[&str]) -> String {
    let o = run_bounded(Command::new(server_bin()).args(args).arg("--help"), Duration::from_secs(30));
    assert!(o.status.success(), "backupd {args:?} --help: {o:?}");
    String::from_utf8(o.stdout).unwrap()
}

/// Whether a program is on PATH.
fn on_path(program: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
}

/// Whether a test must be skipped because a program is missing (it says so).
fn skipped(programs: &[&str], what: &str) -> bool {
    let missing: Vec<&str> = programs.iter().copied().filter(|p| !on_path(p)).collect();
    if !missing.is_empty() {
        eprintln!("{} not installed: {what} skipped", missing.join(", "));
    }
    !missing.is_empty()
}

/// `make` with the repository as its directory and without the environment
/// of an enclosing make (`make test` runs this test).
fn make(args: &[&str]) -> Output {
    let mut cmd = Command::new("make");
    cmd.arg("-s").arg("-C").arg(repo()).args(args.iter().filter(|a| !a.is_empty()));
    for v in ["MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES"] {
        cmd.env_remove(v);
    }
    run_bounded(&mut cmd, Duration::from_secs(60))
}

#[test]
fn the_units_use_known_sections_and_keys_only() {
    for name in UNITS {
        let entries = parse_unit(name, &dist(name));
        assert!(!entries.is_empty(), "{name} is empty");
        for e in &entries {
            let keys = KNOWN
                .iter()
                .find(|(s, _)| *s == e.section)
                .unwrap_or_else(|| panic!("{name}:{}: unknown section [{}]", e.line, e.section))
                .1;
            assert!(
                keys.contains(&e.key.as_str()),
                "{name}:{}: unknown key {} in [{}]",
                e.line,
                e.key,
                e.section
            );
            assert!(
                !e.value.is_empty() || e.key == "CapabilityBoundingSet" || e.key == "AmbientCapabilities"
            );
        }
        assert!(!values(&entries, "Unit", "Description").is_empty(), "{name}: no Description");
    }
}

#[test]
fn the_units_run_backupd_with_flags_and_variables_it_has() {
    let mut checked = 0;
    for name in ["backupd.service", "backupd-verify.service"] {
        let entries = parse_unit(name, &dist(name));
        for key in ["ExecStart", "ExecReload"] {
            for line in values(&entries, "Service", key) {
                let mut words = line.split_whitespace();
                let program = words.next().unwrap();
                if key == "ExecReload" {
                    assert_eq!(
                        line, "/bin/kill -HUP $MAINPID",
                        "{name}: reload is SIGHUP (reopen the log file)"
                    );
                    continue;
                }
                assert_eq!(program, UNIT_BIN, "{name}: ExecStart runs {UNIT_BIN}");
                let sub = words.next().expect("a subcommand");
                let text = help(&[sub]);
                for w in words {
                    if let Some(flag) = w.strip_prefix("--") {
                        let flag = flag.split('=').next().unwrap();
                        assert!(
                            text.contains(&format!("--{flag} ")),
                            "{name}: backupd {sub} has no --{flag}"
                        );
                        checked += 1;
                    }
                }
                for (var, val) in environment(&entries) {
                    assert!(var.starts_with("BACKUPD_"), "{name}: Environment={var}");
                    assert!(
                        text.contains(&format!("[env: {var}=")),
                        "{name}: backupd {sub} does not read {var}"
                    );
                    if var == "BACKUPD_LISTEN" {
                        val.parse::<std::net::SocketAddr>().unwrap();
                    }
                    checked += 1;
                }
            }
        }
    }
    assert!(checked >= 3);
    // Every variable the example environment file names is one the server reads.
    let serve = help(&["serve"]);
    let env = dist("backupd.env");
    let mut named = 0;
    for line in env.lines().map(|l| l.trim_start_matches('#').trim()) {
        if let Some((var, _)) = line.split_once('=').filter(|(v, _)| v.starts_with("BACKUPD_")) {
            assert!(
                serve.contains(&format!("[env: {var}=")),
                "dist/backupd.env: backupd serve does not read {var}"
            );
            named += 1;
        }
    }
    assert!(named >= 5, "{named}");
}

#[test]
fn the_server_unit_is_a_hardened_notify_service() {
    let s = parse_unit("backupd.service", &dist("backupd.service"));
    for (key, want) in [
        ("Type", "notify"),
        ("WatchdogSec", "30s"),
        ("Restart", "on-failure"),
        ("StateDirectory", "backupd"),
        ("StateDirectoryMode", "0700"),
        ("User", "backupd"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("NoNewPrivileges", "yes"),
        ("CapabilityBoundingSet", ""),
        ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
        ("MemoryMax", "256M"),
    ] {
        assert_eq!(value(&s, "Service", key), want, "backupd.service {key}");
    }
    assert!(values(&s, "Service", "SystemCallFilter").contains(&"@system-service"));
    let env = environment(&s);
    let data_dir = &env.iter().find(|(k, _)| k == "BACKUPD_DATA_DIR").expect("BACKUPD_DATA_DIR").1;
    assert_eq!(data_dir, "/var/lib/backupd", "the data directory is the StateDirectory");
    assert_eq!(value(&s, "Install", "WantedBy"), "multi-user.target");
}

#[test]
fn the_verify_unit_runs_as_the_server_on_its_data_directory_read_only() {
    let s = parse_unit("backupd.service", &dist("backupd.service"));
    let v = parse_unit("backupd-verify.service", &dist("backupd-verify.service"));
    assert_eq!(value(&v, "Service", "Type"), "oneshot");
    assert_eq!(value(&v, "Service", "ExecStart"), format!("{UNIT_BIN} verify"));
    for key in ["User", "Group", "EnvironmentFile", "UMask"] {
        assert_eq!(value(&v, "Service", key), value(&s, "Service", key), "{key}");
    }
    let data_dir = "/var/lib/backupd";
    assert!(environment(&v).contains(&("BACKUPD_DATA_DIR".into(), data_dir.into())));
    // It must not create the store (no StateDirectory=); only the directory
    // itself is writable (SQLite's reader files), the store is read-only.
    assert!(values(&v, "Service", "StateDirectory").is_empty());
    assert_eq!(value(&v, "Service", "ReadWritePaths"), format!("-{data_dir}"));
    let ro: Vec<&str> =
        values(&v, "Service", "ReadOnlyPaths").iter().flat_map(|l| l.split_whitespace()).collect();
    for p in ["backupd.db", "backupd.layout", "files", "versions"] {
        assert!(ro.contains(&format!("-{data_dir}/{p}").as_str()), "{p} is not read-only: {ro:?}");
    }
    assert_eq!(value(&v, "Service", "ProtectSystem"), "strict");
    assert!(values(&v, "Install", "WantedBy").is_empty(), "the timer starts it");

    let t = parse_unit("backupd-verify.timer", &dist("backupd-verify.timer"));
    assert_eq!(value(&t, "Timer", "Unit"), "backupd-verify.service");
    assert_eq!(value(&t, "Timer", "Persistent"), "true");
    assert!(value(&t, "Timer", "OnCalendar").starts_with("Sun "), "weekly");
    assert!(!value(&t, "Timer", "RandomizedDelaySec").is_empty());
    assert_eq!(value(&t, "Install", "WantedBy"), "timers.target");
}

#[test]
fn the_logrotate_example_rotates_the_units_log_directory_and_sends_sighup() {
    let text = dist("backupd.logrotate");
    let s = parse_unit("backupd.service", &dist("backupd.service"));
    let logs = format!("/var/log/{}/", value(&s, "Service", "LogsDirectory"));
    let body: Vec<&str> =
        text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).collect();
    assert!(body[0].starts_with(&logs) && body[0].ends_with('{'), "{}", body[0]);
    assert_eq!(*body.last().unwrap(), "}");
    for d in ["weekly", "compress", "delaycompress", "missingok", "notifempty", "su backupd backupd"] {
        assert!(body.contains(&d), "{d} missing");
    }
    assert!(body.iter().any(|l| l.starts_with("rotate ") && l[7..].parse::<u32>().is_ok()));
    let post = body.iter().position(|l| *l == "postrotate").expect("postrotate");
    assert!(body[post + 1].starts_with("systemctl kill -s HUP backupd.service"), "{}", body[post + 1]);
    assert_eq!(body[post + 2], "endscript");
    // The example environment file's log file is in that directory.
    assert!(dist("backupd.env").contains(&format!("#BACKUPD_LOG_FILE={logs}backupd.log")));
}

/// Every string under an "expr" key, anywhere in the dashboard.
fn exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, x) in m {
                match (k.as_str(), x) {
                    ("expr", serde_json::Value::String(s)) => out.push(s.clone()),
                    _ => exprs(x, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|x| exprs(x, out)),
        _ => {}
    }
}

/// The `backupd_*` names in a text.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("backupd_") {
        let name: String = rest[i..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
        rest = &rest[i + name.len()..];
        out.insert(name);
    }
    out
}

/// The metrics file of a real server after one upload: (sample names, families).
fn written_metrics() -> (BTreeSet<String>, BTreeSet<String>) {
    let dir = tempfile::tempdir().unwrap();
    let prom = dir.path().join("backupd.prom");
    let mut server =
        TestServer::start(&["--metrics-file", prom.to_str().unwrap(), "--metrics-interval", "100ms"]);
    let (mut c, _) = server.registered_client("dashboard");
    let data = pseudo_random(3000, 7);
    assert!(c.upload_bytes("a.bin", &data, &Default::default()).unwrap().cksum_matches());
    c.crc_ok("a.bin").unwrap();
    drop(c);
    assert!(server.stop().success());
    let text = std::fs::read_to_string(&prom).unwrap();
    assert!(text.contains("backupd_uploads_verified_total 1"), "{text}");
    let mut samples = BTreeSet::new();
    let mut families = BTreeSet::new();
    for line in text.lines() {
        if let Some(t) = line.strip_prefix("# TYPE ") {
            families.insert(t.split(' ').next().unwrap().to_string());
        } else if !line.starts_with('#') {
            samples.insert(line.split(['{', ' ']).next().unwrap().to_string());
        }
    }
    (samples, families)
}

#[test]
fn the_dashboard_is_json_and_queries_only_metrics_backupd_writes() {
    let text = dist("grafana-dashboard.json");
    let dash: serde_json::Value =
        serde_json::from_str(&text).expect("dist/grafana-dashboard.json is not JSON");
    assert_eq!(dash["uid"], "backupd");
    assert!(dash["title"].is_string() && dash["schemaVersion"].is_u64());
    let panels = dash["panels"].as_array().expect("panels");
    let mut ids = BTreeSet::new();
    for p in panels {
        assert!(ids.insert(p["id"].as_u64().expect("a panel id")), "duplicate panel id {}", p["id"]);
        assert!(p["title"].is_string() && p["gridPos"]["w"].is_u64() && p["gridPos"]["h"].is_u64(), "{p}");
        if p["type"] != "row" {
            assert!(!p["targets"].as_array().expect("targets").is_empty(), "{}", p["title"]);
        }
    }
    let mut all = Vec::new();
    exprs(&dash, &mut all);
    assert!(all.len() >= 15, "{all:?}");
    let used: BTreeSet<String> = all.iter().flat_map(|e| metric_names(e)).collect();

    let (samples, families) = written_metrics();
    for name in &used {
        assert!(
            samples.contains(name),
            "the dashboard queries {name}, which backupd does not write: {samples:?}"
        );
    }
    for required in ["backupd_commit_seconds_bucket", "backupd_client_last_verified_timestamp_seconds"] {
        assert!(used.contains(required), "the dashboard does not show {required}");
    }
    // Every metric backupd writes is on the dashboard, and in the docs' list.
    let docs = std::fs::read_to_string(repo().join("docs/OPERATIONS.md")).unwrap();
    let documented = metric_names(&docs);
    for f in &families {
        assert!(used.iter().any(|u| u.starts_with(f.as_str())), "{f} is not on the dashboard");
        assert!(docs.contains(&format!("`{f}`")), "docs/OPERATIONS.md does not list {f}");
    }
    // The S3 tier's metrics are written only with it on (tests/tier.rs checks them).
    for d in documented.iter().filter(|d| !d.starts_with("backupd_s3_")) {
        assert!(
            samples.contains(d) || families.contains(d),
            "docs/OPERATIONS.md names {d}, which backupd does not write"
        );
    }
}

/// `make install-files` into `root` (PREFIX=root/usr, SYSCONFDIR=root/etc)
/// from the binaries under test: the units then name a binary that exists.
fn install_into(root: &Path) -> PathBuf {
    let build = Path::new(server_bin()).parent().unwrap();
    let o = make_in(root, "install-files", &format!("BUILD_DIR={}", build.display()));
    assert!(o.status.success(), "make install-files: {}", String::from_utf8_lossy(&o.stderr));
    root.join("usr")
}

/// `make TARGET PREFIX=root/usr SYSCONFDIR=root/etc EXTRA`.
fn make_in(root: &Path, target: &str, extra: &str) -> Output {
    let prefix = format!("PREFIX={}", root.join("usr").display());
    make(&[target, &prefix, &format!("SYSCONFDIR={}", root.join("etc").display()), extra])
}

#[test]
fn make_install_puts_everything_under_destdir_and_prefix() {
    if skipped(&["make"], "the install test") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let dest = t.path().join("dest");
    // `make -n install` shows the release build and every destination, and does nothing.
    let o = make(&["-n", "install", &format!("DESTDIR={}", dest.display()), "PREFIX=/opt/backupd"]);
    assert!(o.status.success(), "{o:?}");
    let plan = String::from_utf8(o.stdout).unwrap();
    assert!(plan.contains("build --release"), "{plan}");
    let d = dest.display();
    for want in [
        format!("target/release/backupd target/release/backup-client {d}/opt/backupd/bin/"),
        format!("> {d}/opt/backupd/lib/systemd/system/$u.new"),
        "s|/usr/local/bin/|/opt/backupd/bin/|g".to_string(),
        format!("{d}/opt/backupd/lib/sysusers.d/backupd.conf"),
        format!("{d}/etc/logrotate.d/backupd"),
        format!("dist/grafana-dashboard.json dist/backupd.env {d}/opt/backupd/share/doc/backupd/"),
        format!("{d}/etc/default/backupd"),
    ] {
        assert!(plan.contains(&want), "`make -n install` lacks {want}:\n{plan}");
    }
    assert!(!dest.exists(), "make -n wrote something");

    // A real install of the binaries under test (no release build).
    let root = t.path().join("root");
    let prefix = install_into(&root);
    for (path, mode) in [
        ("usr/bin/backupd", 0o755),
        ("usr/bin/backup-client", 0o755),
        ("usr/lib/systemd/system/backupd.service", 0o644),
        ("usr/lib/systemd/system/backupd-verify.service", 0o644),
        ("usr/lib/systemd/system/backupd-verify.timer", 0o644),
        ("usr/lib/sysusers.d/backupd.conf", 0o644),
        ("usr/share/doc/backupd/grafana-dashboard.json", 0o644),
        ("usr/share/doc/backupd/OPERATIONS.md", 0o644),
        ("etc/logrotate.d/backupd", 0o644),
        ("etc/default/backupd", 0o644),
    ] {
        use std::os::unix::fs::PermissionsExt;
        let m = std::fs::metadata(root.join(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
        assert_eq!(m.permissions().mode() & 0o777, mode, "{path}");
    }
    let unit = std::fs::read_to_string(prefix.join("lib/systemd/system/backupd.service")).unwrap();
    let s = parse_unit("installed backupd.service", &unit);
    assert_eq!(value(&s, "Service", "ExecStart"), format!("{}/bin/backupd serve", prefix.display()));
    assert_eq!(value(&s, "Service", "EnvironmentFile"), format!("-{}/etc/default/backupd", root.display()));
    assert!(!unit.contains("/usr/local/bin"), "{unit}");
    let o = run_bounded(Command::new(prefix.join("bin/backupd")).arg("--version"), Duration::from_secs(30));
    assert!(o.status.success());
    // An edited /etc/default/backupd survives a second install.
    std::fs::write(root.join("etc/default/backupd"), "BACKUPD_LISTEN=127.0.0.1:1\n").unwrap();
    install_into(&root);
    assert_eq!(
        std::fs::read_to_string(root.join("etc/default/backupd")).unwrap(),
        "BACKUPD_LISTEN=127.0.0.1:1\n"
    );
    // And uninstall removes what it installed, not the configuration.
    let o = make_in(&root, "uninstall", "");
    assert!(o.status.success(), "{o:?}");
    assert!(
        !prefix.join("bin/backupd").exists() && !prefix.join("lib/systemd/system/backupd.service").exists()
    );
    assert!(root.join("etc/default/backupd").exists());
}

#[test]
fn systemd_analyze_verify_accepts_the_installed_units() {
    if skipped(&["systemd-analyze", "make"], "`systemd-analyze verify` of the units") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let unit_dir = install_into(t.path()).join("lib/systemd/system");
    let mut cmd = Command::new("systemd-analyze");
    cmd.arg("verify").arg("--man=no");
    for u in UNITS {
        cmd.arg(unit_dir.join(u));
    }
    let o = run_bounded(&mut cmd, Duration::from_secs(60));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "systemd-analyze verify failed:\n{err}");
    // Unknown keys and sections are warnings (exit 0): none may name our files.
    let ours: Vec<&str> = err.lines().filter(|l| l.contains(unit_dir.to_str().unwrap())).collect();
    assert!(ours.is_empty(), "systemd-analyze verify complains:\n{}", ours.join("\n"));
}

#[test]
fn logrotate_rotates_with_the_example_and_runs_its_postrotate() {
    if skipped(&["logrotate"], "the live run of dist/backupd.logrotate") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let logs = t.path().join("log");
    std::fs::create_dir(&logs).unwrap();
    std::fs::write(logs.join("backupd.log"), "a line\n").unwrap();
    let hup = t.path().join("hup");
    // The example with the test's directory, no `su` (the user need not exist
    // here) and a marker file instead of the signal.
    let conf: String = dist("backupd.logrotate")
        .lines()
        .filter(|l| !l.trim().starts_with("su "))
        .map(|l| {
            let l = l.replace("/var/log/backupd/", &format!("{}/", logs.display()));
            if l.trim().starts_with("systemctl kill -s HUP backupd.service") {
                format!("\t\ttouch {}", hup.display())
            } else {
                l
            }
        })
        .map(|l| l + "\n")
        .collect();
    let conf_path = t.path().join("conf");
    std::fs::write(&conf_path, conf).unwrap();
    let o = run_bounded(
        Command::new("logrotate").arg("-f").arg("-s").arg(t.path().join("state")).arg(&conf_path),
        Duration::from_secs(30),
    );
    assert!(o.status.success(), "logrotate: {}", String::from_utf8_lossy(&o.stderr));
    // Renamed, not yet compressed (delaycompress), not recreated: the server
    // creates the new file when the signal makes it reopen.
    assert_eq!(std::fs::read_to_string(logs.join("backupd.log.1")).unwrap(), "a line\n");
    assert!(!logs.join("backupd.log").exists());
    assert!(hup.exists(), "postrotate did not run");
}
