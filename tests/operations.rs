//! Running backupd as a service (issue 11, server features): the metrics
//! file, SIGHUP reopening the log file, and the sd_notify protocol, each
//! against the real binary.

mod common;

use std::ffi::OsStr;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::time::Duration;

use backupd::client::UploadOptions;
use common::*;

/// The value of a sample line `name value` (or `name{labels} value`) in a metrics file.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (n, v) = l.rsplit_once(' ')?;
        (n == name).then(|| v.parse().ok()).flatten()
    })
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

#[test]
fn the_metrics_file_counts_what_happened_and_is_written_at_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let prom = dir.path().join("backupd.prom");
    let prom_arg = prom.to_str().unwrap().to_string();
    let mut server = TestServer::start(&["--metrics-file", &prom_arg, "--metrics-interval", "200ms"]);
    let (mut c, id) = server.registered_client("metered");
    for (i, name) in ["a.bin", "b.bin"].iter().enumerate() {
        let data = pseudo_random(10_000 + i, i as u64);
        assert!(c.upload_bytes(name, &data, &UploadOptions::default()).unwrap().cksum_matches());
        c.crc_ok(name).unwrap();
    }
    // A refused packet (no session on this connection).
    let mut stranger = server.connect();
    stranger.send_raw(&packet_frame(&id, 16, 3, 1, 1, &name_field_raw(b"x"), &[0u8; 16])).unwrap();
    expect_reply(&mut stranger, backupd::protocol::ResponseCode::GeneralError);
    let ok = wait_until(Duration::from_secs(10), || {
        sample(&read(&prom), "backupd_uploads_verified_total") == Some(2.0)
    });
    assert!(ok, "metrics never showed 2 verified uploads:\n{}", read(&prom));
    let text = read(&prom);
    for (name, at_least) in [
        ("backupd_connections_accepted_total", 2.0),
        ("backupd_bytes_received_total", 20_000.0),
        ("backupd_bytes_stored_total", 20_001.0),
        ("backupd_files_stored", 2.0),
        ("backupd_clients", 1.0),
        ("backupd_requests_total{code=\"1028\"}", 3.0),
        ("backupd_requests_total{code=\"1029\"}", 2.0),
        ("backupd_uploads_unstored_total{reason=\"refused\"}", 1.0),
        ("backupd_commit_seconds_count", 1.0),
        ("backupd_budget_bytes_limit", 64.0 * 1024.0 * 1024.0),
        ("backupd_data_dir_free_bytes", 1.0),
        ("backupd_uptime_seconds", 0.0),
    ] {
        let v = sample(&text, name).unwrap_or_else(|| panic!("{name} missing:\n{text}"));
        assert!(v >= at_least, "{name} = {v}, expected at least {at_least}");
    }
    assert!(text.contains("backupd_client_last_verified_timestamp_seconds{client=\"metered\"}"), "{text}");
    assert!(text.contains("# TYPE backupd_commit_seconds histogram"));
    assert_eq!(sample(&text, "backupd_log_records_dropped_total"), Some(0.0));
    // No temp file is left beside it; at shutdown the file is written once more.
    assert!(!dir.path().join("backupd.prom.tmp").exists());
    drop(c);
    drop(stranger);
    std::fs::remove_file(&prom).unwrap();
    assert!(server.stop().success());
    let last = read(&prom);
    assert_eq!(sample(&last, "backupd_uploads_verified_total"), Some(2.0), "final metrics:\n{last}");
    // After a restart, the stored files and the client's last backup come from the database.
    std::fs::remove_file(&prom).unwrap();
    server.restart();
    let ok =
        wait_until(Duration::from_secs(10), || sample(&read(&prom), "backupd_files_stored") == Some(2.0));
    assert!(ok, "after a restart:\n{}", read(&prom));
    assert!(read(&prom).contains("backupd_client_last_verified_timestamp_seconds{client=\"metered\"}"));
}

/// The real binary on a port of its own, data in `dir/data`, its log in
/// `dir/backupd.log` (whose "listening on" line gives the address).
fn serve_with_log_file(dir: &Path, extra: &[&str]) -> (RawServer, std::path::PathBuf, std::net::SocketAddr) {
    let (log, data) = (dir.join("backupd.log"), dir.join("data"));
    let mut args = vec![
        OsStr::new("--listen"),
        OsStr::new("127.0.0.1:0"),
        OsStr::new("--data-dir"),
        data.as_os_str(),
        OsStr::new("--log-file"),
        log.as_os_str(),
    ];
    args.extend(extra.iter().map(OsStr::new));
    let server = RawServer::spawn(dir, &args);
    assert!(wait_until(Duration::from_secs(20), || listen_address(&read(&log)).is_some()), "{}", read(&log));
    let addr = listen_address(&read(&log)).expect("listen address");
    (server, log, addr)
}

#[test]
fn sighup_reopens_the_log_file_after_a_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let (mut server, log, addr) = serve_with_log_file(dir.path(), &[]);
    // logrotate: move the file away, then SIGHUP.
    let rotated = dir.path().join("backupd.log.1");
    std::fs::rename(&log, &rotated).unwrap();
    unsafe {
        libc::kill(server.pid() as i32, libc::SIGHUP);
    }
    assert!(
        wait_until(Duration::from_secs(10), || read(&log).contains("log file reopened")),
        "no new log file after SIGHUP; old one:\n{}",
        read(&rotated)
    );
    // New lines go to the new file; the server still serves.
    let mut c = backupd::client::Client::connect(addr, &test_client_options()).unwrap();
    c.register("after-rotation").unwrap();
    assert!(wait_until(Duration::from_secs(10), || read(&log).contains("registered as")));
    assert!(!read(&rotated).contains("registered as"));
    unsafe {
        libc::kill(server.pid() as i32, libc::SIGTERM);
    }
    assert!(server.wait_exit(Duration::from_secs(30)).is_some_and(|s| s.success()));
}

#[test]
fn sd_notify_ready_watchdog_and_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let data = dir.path().join("data");
    // systemd sets WATCHDOG_PID to the service's pid: a shell that execs the
    // server gives it its own pid.
    let mut child = std::process::Command::new("sh")
        .arg("-c")
        .arg("WATCHDOG_PID=$$ exec \"$0\" \"$@\"")
        .arg(server_bin())
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&data)
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "200000")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 512];
    let mut next = || -> String {
        let n = sock.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    assert_eq!(next().trim(), "READY=1");
    // The watchdog is pinged from the loop at half the interval, over and
    // over (the socket's 20 s read timeout is only a hang guard).
    for _ in 0..3 {
        assert_eq!(next().trim(), "WATCHDOG=1");
    }
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let mut stopping = false;
    for _ in 0..50 {
        if next().trim() == "STOPPING=1" {
            stopping = true;
            break;
        }
    }
    assert!(stopping, "no STOPPING=1 after SIGTERM");
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
}

/// The log writer gathers lines while they keep coming (issue 14). Under a
/// burst of uploads from several clients, with the operator rotating the log
/// (SIGHUP) in the middle of it and stopping the server at the end, every
/// line still lands exactly once, in order per connection, none dropped: the
/// lines gathered before the reopen go to the old file, the rest to the new.
#[test]
fn a_burst_of_log_lines_across_a_rotation_and_a_shutdown_loses_none() {
    const CLIENTS: usize = 6;
    const FILES: usize = 120;
    let dir = tempfile::tempdir().unwrap();
    let rotated = dir.path().join("backupd.log.1");
    let (mut server, log, addr) = serve_with_log_file(dir.path(), &["--max-connections-per-ip", "0"]);
    // The clients stop half-way until the log is rotated: the first half of
    // every client's lines belongs in the old file, the second in the new.
    let (half, go) = (std::sync::Barrier::new(CLIENTS + 1), std::sync::Barrier::new(CLIENTS + 1));
    std::thread::scope(|s| {
        for k in 0..CLIENTS {
            let (half, go) = (&half, &go);
            s.spawn(move || {
                let mut c = backupd::client::Client::connect(addr, &test_client_options()).unwrap();
                let name = format!("burst{k}");
                c.register(&name).unwrap();
                c.send_public_key(&name, test_key()).unwrap();
                for i in 0..FILES {
                    if i == FILES / 2 {
                        half.wait();
                        go.wait();
                    }
                    let f = format!("f{i:04}.bin");
                    let up = c.upload_bytes(
                        &f,
                        &pseudo_random(512, (k * FILES + i) as u64),
                        &UploadOptions::default(),
                    );
                    assert!(up.unwrap().cksum_matches());
                    c.crc_ok(&f).unwrap();
                }
            });
        }
        // Every client has had its first half stored (its 1604s came back);
        // their log lines may still be gathered in the writer when it reopens.
        half.wait();
        std::fs::rename(&log, &rotated).unwrap();
        unsafe {
            libc::kill(server.pid() as i32, libc::SIGHUP);
        }
        assert!(wait_until(Duration::from_secs(10), || read(&log).contains("log file reopened")));
        go.wait();
    });
    unsafe {
        libc::kill(server.pid() as i32, libc::SIGTERM);
    }
    assert!(server.wait_exit(Duration::from_secs(30)).is_some_and(|s| s.success()));
    let (old, new) = (read(&rotated), read(&log));
    assert!(new.contains("log file reopened"), "no reopen line in the new file");
    assert!(
        new.trim_end().ends_with("shut down cleanly"),
        "the last line is not the shutdown's:\n{}",
        tail(&new)
    );
    let both = format!("{old}{new}");
    assert!(!both.contains("were dropped"), "lines were dropped");
    for k in 0..CLIENTS {
        let mut last = None;
        for i in 0..FILES {
            let line = format!("burst{k}: \"f{i:04}.bin\" verified and stored");
            let at: Vec<usize> = both.match_indices(&line).map(|(p, _)| p).collect();
            assert_eq!(at.len(), 1, "{line:?} appears {} times", at.len());
            let in_old = at[0] < old.len();
            assert_eq!(in_old, i < FILES / 2, "{line:?} in the wrong file (old: {in_old})");
            // The lines of one connection stay in their order.
            assert!(last < Some(at[0]), "{line:?} out of order");
            last = Some(at[0]);
        }
    }
}

fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(5)..].join("\n")
}

/// The metrics file is readable by node_exporter (another user) whatever
/// the service's umask (the shipped unit has `UMask=0077`); an interval of
/// 0 (which would rewrite it without pause) is refused at start.
#[test]
fn the_metrics_file_is_readable_by_all_and_its_interval_has_a_floor() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    let prom = dir.path().join("backupd.prom");
    let prom_arg = prom.to_str().unwrap().to_string();
    let umask077 = |cmd: &mut std::process::Command| {
        // SAFETY: umask is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                libc::umask(0o077);
                Ok(())
            });
        }
    };
    let launch = Launch { tweak: Some(std::sync::Arc::new(umask077)), ..Launch::default() };
    let args = ["--metrics-file", &prom_arg, "--metrics-interval", "200ms"];
    // A link planted where the temp file goes: its target is neither written nor opened up.
    let victim = dir.path().join("victim");
    std::fs::write(&victim, b"secret").unwrap();
    std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::symlink(&victim, dir.path().join("backupd.prom.tmp")).unwrap();
    let mut server = TestServer::start_with(&args, launch, |_| {});
    assert!(wait_until(Duration::from_secs(10), || prom.exists()), "no metrics file");
    assert_eq!(std::fs::read(&victim).unwrap(), b"secret");
    assert_eq!(std::fs::metadata(&victim).unwrap().permissions().mode() & 0o777, 0o600);
    server.stop();
    let mode = std::fs::metadata(&prom).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o644, "the metrics file's mode");
    assert!(!dir.path().join("backupd.prom.tmp").exists());

    let data = tempfile::tempdir().unwrap();
    let d = data.path().join("d");
    let args =
        ["--listen", "127.0.0.1:0", "--metrics-file", &prom_arg, "--metrics-interval", "0s", "--data-dir"];
    let mut args: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
    args.push(d.as_os_str());
    let out = run_admin(&args, &[], Duration::from_secs(20));
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("--metrics-interval must be at least 100ms"), "{out:?}");
}

/// A metrics file that cannot be written (its folder missing) is logged
/// once, not every interval, and its recovery is logged once it can be.
#[test]
fn a_metrics_file_that_cannot_be_written_is_logged_once_and_its_recovery_too() {
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("not-yet");
    let prom = folder.join("backupd.prom");
    let server =
        TestServer::start(&["--metrics-file", prom.to_str().unwrap(), "--metrics-interval", "100ms"]);
    server.wait_for_log("cannot write metrics", Duration::from_secs(10));
    // Ten intervals and more.
    std::thread::sleep(Duration::from_millis(1500));
    let log = server.log_text();
    assert_eq!(log.matches("cannot write metrics").count(), 1, "{log}");
    std::fs::create_dir(&folder).unwrap();
    server.wait_for_log("metrics written to", Duration::from_secs(10));
    assert!(wait_until(Duration::from_secs(10), || prom.exists()), "no metrics file");
    let log = server.log_text();
    assert_eq!(log.matches("cannot write metrics").count(), 1, "{log}");
    assert!(log.contains("again, after "), "{log}");
}
