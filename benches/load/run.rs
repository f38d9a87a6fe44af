//! The run: the machine, its limits, then every scenario on a fresh server,
//! the targets of issue 5 and `target/bench/results.json`.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::cli::{Opts, Scn};
use crate::confine::Confinement;
use crate::figure::write_figure;
use crate::json::{Obj as _, J};
use crate::limits::{measure_limits, Limits};
use crate::machine::{describe_binary, describe_machine, raise_nofile};
use crate::report::{
    cpu_per_small_file_us, issue14_targets, print_beside, print_targets, write_results, Target,
};
use crate::scenarios::run_scenarios;
use crate::usage::wait_quiet;
use crate::Res;

pub(crate) fn bench_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench")
}

pub(crate) fn run(o: &Opts) -> Res<bool> {
    let mut cleanup = Vec::new();
    let r = run_measured(o, &mut cleanup);
    // Deleting many files makes the next file creations on the same ext4
    // block groups slow for up to 5 minutes when the filesystem has no journal
    // (ext4 then skips recently deleted inodes, reading each one's inode
    // table block), so nothing is deleted before the last measurement.
    for d in cleanup {
        let _ = fs::remove_dir_all(d);
    }
    r
}

fn run_measured(o: &Opts, cleanup: &mut Vec<PathBuf>) -> Res<bool> {
    let dir = bench_dir();
    fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let nofile =
        raise_nofile((o.idle_clients + o.small_clients.max(o.many_clients) + o.multi_clients + 256) as u64);
    let want = |s: Scn| o.scenarios.contains(&s);

    // Machine.
    let mut top = describe_machine(o, &dir, nofile);

    // Binary.
    let binary_mib = if o.target.is_none() { describe_binary(o, &dir, &mut top) } else { None };

    // Limits.
    if want(Scn::Limits) && o.wait_quiet > 0 {
        wait_quiet(o.wait_quiet, "limits");
    }
    cleanup.push(dir.join(format!("limits-{}", std::process::id())));
    let limits = if want(Scn::Limits) { measure_limits(o, &dir)? } else { Limits::default() };
    top.set("limits", limits.json.clone());

    // Server scenarios, each on a freshly started server with its own data
    // directory, so that what one scenario leaves in memory is not the next
    // one's baseline.
    // Scenario 5 runs last, after the confined set: it removes what it made
    // (its Garage's blocks, its data directories), and file creation on the
    // same ext4 block groups is slow for minutes after a mass deletion (see
    // `run` above and docs/PERFORMANCE.md, "ext4 and deleted files").
    let replica = o.scenarios.contains(&Scn::Replica);
    let o = &Opts {
        scenarios: o.scenarios.iter().copied().filter(|s| *s != Scn::Replica).collect(),
        ..o.clone()
    };
    let (mut scen, mut totals) = run_scenarios(o, &dir, &limits, cleanup)?;
    top.set("server_cpu_per_small_file_us", cpu_per_small_file_us(&scen));
    top.set("scenarios", scen.clone());
    // The second figure set: the same scenarios, the server confined.
    if o.confined && o.target.is_none() {
        let c = Confinement::detect()?;
        let how = c.describe();
        println!("\n== second figure set: the server confined: {how} ==");
        let oc = Opts { confinement: Some(Arc::new(c)), ..o.clone() };
        let (scen_c, totals_c) = run_scenarios(&oc, &dir, &limits, cleanup)?;
        totals.ok &= totals_c.ok;
        print_beside(&scen, &scen_c, &how);
        let mut cj = J::obj();
        cj.set("how", how);
        cj.set("server_cpu_per_small_file_us", cpu_per_small_file_us(&scen_c));
        cj.set("scenarios", scen_c);
        top.set("confined", cj);
    }
    if replica {
        let or = Opts { scenarios: vec![Scn::Replica], ..o.clone() };
        let (scen_r, totals_r) = run_scenarios(&or, &dir, &limits, cleanup)?;
        totals.ok &= totals_r.ok;
        if let Some(r) = scen_r.get("replica") {
            scen.set("replica", r.clone());
            top.set("scenarios", scen.clone());
        }
    }

    if o.target.is_none() && !totals.rss_starts.0.is_empty() {
        totals.targets.insert(
            0,
            Target::at_most(
                "RSS idle (after start)",
                Some(totals.rss_starts.median()),
                4.0,
                "MiB",
                format!("median of {} starts", totals.rss_starts.0.len()),
            ),
        );
    }
    if o.target.is_none() {
        totals.targets.push(Target::at_most(
            "stripped release binary",
            binary_mib,
            2.0,
            "MiB",
            String::new(),
        ));
    }
    print_targets("targets of issue 5", &totals.targets);
    top.set("targets", J::Array(totals.targets.iter().map(Target::json).collect()));
    if o.target.is_none() {
        let t14 = issue14_targets(&scen, limits.json.as_ref().unwrap_or(&J::Null));
        print_targets("targets of issue 14 (ratios to this run's limits)", &t14);
        top.set("targets_issue14", J::Array(t14.iter().map(Target::json).collect()));
    }
    top.set("all_uploads_ok", totals.ok);
    write_results(&dir, &top)?;
    match write_figure(&dir, &top, &limits) {
        Ok(p) => println!("figure: {}", p.display()),
        Err(e) => println!("figure: not drawn: {e}"),
    }
    Ok(totals.ok)
}
