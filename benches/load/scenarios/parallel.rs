//! Scenario 2b: large files from several clients in parallel, through the
//! upload loop of scenario 2a ([`super::large`]).

use super::large::scenario_large;
use super::{Ctx, Totals};
use crate::cli::Opts;
use crate::json::J;
use crate::limits::Limits;
use crate::report::Target;
use crate::usage::mib;
use crate::Res;

/// Scenario 2b in the run: its title, figures and targets.
pub(crate) fn run(o: &Opts, ctx: &Ctx, limits: &Limits, start_line: &str, t: &mut Totals) -> Res<(J, usize)> {
    println!(
        "\n== scenario 2b: {} clients x {} MiB in parallel ({} rounds) ==",
        o.multi_clients, o.multi_mib, o.rounds
    );
    println!("  {start_line}");
    let r = scenario_large(o, ctx, "multi", o.multi_clients, o.multi_mib)?;
    let has_server = ctx.server.is_some();
    r.print(limits, has_server);
    t.ok &= r.errors.is_empty();
    if has_server {
        t.targets.push(Target::at_most(
            "peak RSS, parallel large uploads",
            mib(r.measured.peak_kib),
            32.0,
            "MiB",
            format!("{} x {} MiB", o.multi_clients, o.multi_mib),
        ));
    }
    Ok((r.json(o), r.parts.len()))
}
