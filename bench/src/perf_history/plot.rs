//! `perf-history plot`: the ratio qemu-img/rimg of every workload over the runs of the history, one small
//! chart per workload on one SVG page, drawn with plotters' SVG backend.

use std::path::Path;

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::history::Run;
use crate::Result;

/// Panels per row.
const COLUMNS: usize = 4;
/// Size of one panel in pixels.
const PANEL: (u32, u32) = (420, 240);
/// Height of the page title.
const TITLE: u32 = 50;

/// Maps a plotters error to the harness's error type.
fn err<E: std::fmt::Display>(what: &str) -> impl Fn(E) -> String + '_ {
    move |e| format!("drawing the plot ({what}): {e}")
}

/// Draws the ratio per workload over `runs` (oldest first) into an SVG file at `out`. Workloads are those
/// of `workloads` in that order. Failed entries leave a gap; a dashed line marks ratio 1 (both tools equal).
pub(crate) fn plot(runs: &[&Run], workloads: &[String], out: &Path) -> Result<()> {
    if workloads.is_empty() {
        return Err("nothing to plot: no workload selected".into());
    }
    let rows = workloads.len().div_ceil(COLUMNS);
    let cols = workloads.len().min(COLUMNS);
    let size = (PANEL.0 * cols as u32, PANEL.1 * rows as u32 + TITLE);
    let root = SVGBackend::new(out, size).into_drawing_area();
    root.fill(&WHITE).map_err(err("background"))?;
    let (title, body) = root.split_vertically(TITLE);
    let first = runs.first().map(|r| r.date.as_str()).unwrap_or("");
    let last = runs.last().map(|r| r.date.as_str()).unwrap_or("");
    title
        .titled(
            &format!(
                "rimg side by side: qemu-img/rimg time ratio per workload (> 1: rimg faster), {} runs, {first} .. {last}",
                runs.len()
            ),
            ("sans-serif", 18),
        )
        .map_err(err("title"))?;
    let labels: Vec<String> = runs.iter().map(|r| r.label()).collect();
    let n = runs.len();
    for (panel, name) in body.split_evenly((rows, cols)).iter().zip(workloads) {
        let points: Vec<(f64, f64)> = runs
            .iter()
            .enumerate()
            .filter_map(|(i, r)| Some((i as f64, r.entry(name)?.ratio?)))
            .collect();
        let ymax = points.iter().map(|p| p.1).fold(1.0_f64, f64::max) * 1.15;
        let mut chart = ChartBuilder::on(panel)
            .caption(name, ("sans-serif", 15))
            .margin(8)
            .x_label_area_size(28)
            .y_label_area_size(40)
            .build_cartesian_2d(-0.5..(n as f64 - 0.5).max(0.5), 0.0..ymax)
            .map_err(err(name))?;
        let label_of = |x: &f64| {
            let i = x.round();
            if (x - i).abs() < 1e-6 && i >= 0.0 {
                labels.get(i as usize).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        };
        chart
            .configure_mesh()
            .x_labels(n.clamp(1, 5))
            .x_label_formatter(&label_of)
            .y_labels(5)
            .y_label_formatter(&|y| format!("{y:.1}x"))
            .light_line_style(WHITE)
            .label_style(("sans-serif", 11))
            .draw()
            .map_err(err(name))?;
        let one = [(-0.5, 1.0), ((n as f64 - 0.5).max(0.5), 1.0)];
        chart
            .draw_series(DashedLineSeries::new(
                one,
                4,
                4,
                RED.mix(0.6).stroke_width(1),
            ))
            .map_err(err(name))?;
        // A line through consecutive measured runs only: a failed run breaks it.
        let mut segment: Vec<(f64, f64)> = Vec::new();
        let mut segments = Vec::new();
        for (i, r) in runs.iter().enumerate() {
            match r.entry(name).and_then(|e| e.ratio) {
                Some(y) => segment.push((i as f64, y)),
                None => segments.push(std::mem::take(&mut segment)),
            }
        }
        segments.push(segment);
        for s in segments.into_iter().filter(|s| s.len() > 1) {
            chart
                .draw_series(LineSeries::new(s, BLUE.stroke_width(2)))
                .map_err(err(name))?;
        }
        chart
            .draw_series(points.iter().map(|&p| Circle::new(p, 3, BLUE.filled())))
            .map_err(err(name))?;
        if points.is_empty() {
            let mid = ((n as f64 - 1.0) / 2.0, ymax / 2.0);
            chart
                .draw_series(std::iter::once(Text::new(
                    "no measurement (failed or not run)",
                    mid,
                    ("sans-serif", 12)
                        .into_font()
                        .color(&RED)
                        .pos(Pos::new(HPos::Center, VPos::Center)),
                )))
                .map_err(err(name))?;
        }
    }
    root.present().map_err(err("writing the file"))?;
    Ok(())
}
