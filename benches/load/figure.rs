//! `target/bench/report.svg`: the run drawn with plotters (SVG backend, a
//! dev-dependency), from the same figures that go to `results.json`:
//!
//! * top: the small-file latency distribution (1028 -> 1604, every file of
//!   every round) of each scenario that sends small files, as percentile
//!   curves on a log scale; the confined set (`--confined`) dashed;
//! * bottom left: small files/s beside the limits of the same run that
//!   bound them (16 files per syncfs or per folder fsync, plus the SQLite
//!   commit);
//! * bottom right: large-file MB/s beside theirs (write-behind, decrypt +
//!   cksum, loopback TCP).

use std::path::{Path, PathBuf};

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::json::J;
use crate::limits::Limits;
use crate::Res;

/// The latency curves: (label, pointer to a `Lat` object below a scenario set).
const CURVES: &[(&str, &str)] = &[
    ("scenario 1, small files", "/small/latency_total"),
    ("scenario 1b, many active clients", "/small_many/latency_total"),
    ("scenario 1b, the same at a steady pace", "/small_many/paced/latency_total"),
    ("scenario 3, beside idle clients", "/idle/small_with_idle/latency_total"),
    ("scenario 4, quiet phases", "/attack/quiet/latency_total"),
    ("scenario 4, under attack", "/attack/under_attack/latency_total"),
];

type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;

/// Draw `dir/report.svg` from the run's results (`top`) and its limits.
pub(crate) fn write_figure(dir: &Path, top: &J, limits: &Limits) -> Res<PathBuf> {
    let path = dir.join("report.svg");
    let root = SVGBackend::new(&path, (1200, 1000)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let field =
        |k: &str| top.get(k).map(|v| v.as_str().map_or(v.to_string(), str::to_string)).unwrap_or_default();
    let title = format!(
        "backupd make bench ({}), {} at {}, {} cores, {}",
        field("mode"),
        field("git_revision").chars().take(9).collect::<String>(),
        field("timestamp"),
        field("nproc"),
        field("cpu_model")
    );
    let root = root.titled(&title, ("sans-serif", 22)).map_err(err)?;
    let (upper, lower) = root.split_vertically(520);
    let (left, right) = lower.split_horizontally(560);
    latency(&upper, top)?;
    let set = |ptr: &str| top.pointer(&format!("/scenarios{ptr}")).and_then(J::as_f64);
    let confined = |ptr: &str| top.pointer(&format!("/confined/scenarios{ptr}")).and_then(J::as_f64);
    let small = "/small/files_per_s/median";
    bars(
        &left,
        "small files/s (16 clients, 4 KiB) and their limits",
        "files/s",
        &[
            ("2 cores", set(small), 0),
            ("1 core, 256 MB", confined(small), 1),
            ("limit: 16/syncfs + SQLite", limits.syncfs16_db, 2),
            ("limit: 16/dir fsync + SQLite", limits.fsync16_db, 2),
        ],
    )?;
    let (one, par) = ("/large_single/aggregate_mb_s/median", "/large_multi/aggregate_mb_s/median");
    bars(
        &right,
        "large files, MB/s, and their limits",
        "MB/s",
        &[
            ("one file", set(one), 0),
            ("one, confined", confined(one), 1),
            ("4 parallel", set(par), 0),
            ("4, confined", confined(par), 1),
            ("limit: write-behind", limits.seq_write_behind, 2),
            ("limit: decrypt+cksum", limits.pipeline, 2),
            ("limit: loopback TCP", limits.tcp, 2),
        ],
    )?;
    root.present().map_err(err)?;
    Ok(dir.join("report.svg"))
}

fn err(e: impl std::fmt::Display) -> String {
    format!("report.svg: {e}")
}

/// The latency distributions: x the latency (ms, log scale), y the share of
/// files at most that slow (%).
fn latency(area: &Area, top: &J) -> Res<()> {
    let mut curves: Vec<(String, Vec<f64>, bool)> = Vec::new();
    for (set, prefix, dashed) in
        [("/scenarios", "", false), ("/confined/scenarios", " (1 core, 256 MB)", true)]
    {
        for (label, ptr) in CURVES {
            let Some(p) = top.pointer(&format!("{set}{ptr}/percentiles_ms")).and_then(J::as_array) else {
                continue;
            };
            let v: Vec<f64> = p.iter().filter_map(J::as_f64).collect();
            if v.len() == 101 && v[100] > 0.0 {
                curves.push((format!("{label}{prefix}"), v, dashed));
            }
        }
    }
    // No curve (a run without small files): an empty 0.1-10 ms axis, not an
    // infinite one (its ticks would take all the memory there is).
    let lo = match curves.iter().map(|c| c.1[0]).reduce(f64::min) {
        Some(lo) => lo.max(0.01),
        None => 0.1,
    };
    let hi = curves.iter().map(|c| c.1[100]).fold(0.0, f64::max).max(lo * 10.0);
    let mut chart = ChartBuilder::on(area)
        .caption("small-file latency, 1028 -> 1604 (every file of every round)", ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d((lo * 0.8..hi * 1.25).log_scale(), 0f64..100f64)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("latency, ms (log scale)")
        .y_desc("files at most that slow, %")
        .draw()
        .map_err(err)?;
    for (i, (label, v, dashed)) in curves.iter().enumerate() {
        let color = Palette99::pick(i % CURVES.len()).to_rgba();
        let style = color.stroke_width(2);
        let points: Vec<(f64, f64)> = v.iter().enumerate().map(|(p, &ms)| (ms.max(lo), p as f64)).collect();
        let drawn = if *dashed {
            chart.draw_series(DashedLineSeries::new(points, 6, 4, style)).map_err(err)?
        } else {
            chart.draw_series(LineSeries::new(points, style)).map_err(err)?
        };
        drawn.label(label.as_str()).legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(err)?;
    Ok(())
}

/// Bars: (name, value, colour index: 0 measured on 2 cores, 1 confined, 2 a
/// limit), each with its value written above it; a missing value is left out.
fn bars(area: &Area, caption: &str, unit: &str, items: &[(&str, Option<f64>, usize)]) -> Res<()> {
    let items: Vec<(&str, f64, usize)> =
        items.iter().filter_map(|&(n, v, c)| Some((n, v.filter(|x| x.is_finite())?, c))).collect();
    let top = items.iter().map(|i| i.1).fold(1.0, f64::max) * 1.2;
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(10)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..items.len().max(1) as f64, 0f64..top)
        .map_err(err)?;
    chart.configure_mesh().disable_x_mesh().disable_x_axis().y_desc(unit).draw().map_err(err)?;
    let colors = [RGBColor(31, 119, 180), RGBColor(255, 127, 14), RGBColor(150, 150, 150)];
    chart
        .draw_series(items.iter().enumerate().map(|(i, &(_, v, c))| {
            Rectangle::new([(i as f64 + 0.12, 0.0), (i as f64 + 0.88, v)], colors[c.min(2)].filled())
        }))
        .map_err(err)?;
    // The value above each bar, the name up the bar from its foot.
    let font = ("sans-serif", 12).into_font();
    chart
        .draw_series(items.iter().enumerate().map(|(i, &(_, v, _))| {
            Text::new(format!("{v:.0}"), (i as f64 + 0.2, v + top * 0.05), font.clone())
        }))
        .map_err(err)?;
    let up = font.clone().transform(FontTransform::Rotate270);
    chart
        .draw_series(
            items
                .iter()
                .enumerate()
                .map(|(i, &(n, _, _))| Text::new(n.to_string(), (i as f64 + 0.42, top * 0.02), up.clone())),
        )
        .map_err(err)?;
    Ok(())
}
