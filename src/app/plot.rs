//! `kto plot`: the curves of a run's `metrics.jsonl` (loss, KL, rewards, margins, and their eval counterparts)
//! drawn to one SVG with `plotters`, and the bar chart of the demo. SVG only: it needs no font files or system
//! libraries (the viewer renders the text).
use kto::error::{Error, Result};
use plotters::prelude::*;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// Panels in drawing order: a title and the metrics drawn in it (each only if the run logged it).
const PANELS: &[(&str, &[&str])] = &[
    ("loss", &["loss", "eval_loss"]),
    ("KL estimate", &["kl", "eval_kl"]),
    ("rewards", &["rewards/chosen", "rewards/rejected", "eval_rewards/chosen", "eval_rewards/rejected"]),
    ("reward margin", &["rewards/margins", "eval_rewards/margins"]),
    ("log-probs", &["logps/chosen", "logps/rejected", "eval_logps/chosen", "eval_logps/rejected"]),
    ("token accuracy", &["mean_token_accuracy", "eval_mean_token_accuracy"]),
    ("entropy", &["entropy", "eval_entropy"]),
];

const COLORS: [RGBColor; 4] = [RGBColor(31, 119, 180), RGBColor(214, 39, 40), RGBColor(44, 160, 44), RGBColor(255, 127, 14)];

fn draw_error(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::file(path, format!("cannot draw: {e}"))
}

/// (step, value) points of every metric in `metrics.jsonl`.
fn read_series(path: &Path) -> Result<Vec<(String, Vec<(f64, f64)>)>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::file(path, e))?;
    let mut series: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let entry: serde_json::Map<String, Value> =
            serde_json::from_str(line).map_err(|e| Error::Row { path: path.to_path_buf(), row: i + 1, msg: format!("invalid JSON: {e}") })?;
        if entry.contains_key("train_runtime") {
            continue;
        }
        let Some(step) = entry.get("step").and_then(|s| s.as_f64()) else { continue };
        for (k, v) in &entry {
            // Values beyond ±1e300 would make a range wider than f64 holds (and the axis ticks never end).
            let Some(v) = v.as_f64().filter(|v| v.is_finite()).map(|v| v.clamp(-1e300, 1e300)) else { continue };
            match series.iter_mut().find(|(name, _)| name == k) {
                Some((_, points)) => points.push((step, v)),
                None => series.push((k.clone(), vec![(step, v)])),
            }
        }
    }
    Ok(series)
}

fn bounds(points: impl Iterator<Item = (f64, f64)>) -> Option<((f64, f64), (f64, f64))> {
    let mut b: Option<((f64, f64), (f64, f64))> = None;
    for (x, y) in points {
        b = Some(match b {
            None => ((x, x), (y, y)),
            Some(((x0, x1), (y0, y1))) => ((x0.min(x), x1.max(x)), (y0.min(y), y1.max(y))),
        });
    }
    // Degenerate ranges (one step, a constant) still need some extent.
    b.map(|((x0, x1), (y0, y1))| {
        let pad = ((y1 - y0) * 0.05).max(1e-6 * y1.abs().max(1.0));
        ((x0, if x1 > x0 { x1 } else { x0 + 1.0 }), (y0 - pad, y1 + pad))
    })
}

/// Draws the run in `dir` (its `metrics.jsonl`) to `dir/metrics.svg`; returns the path.
pub fn plot_run(dir: &Path) -> Result<PathBuf> {
    let metrics = dir.join("metrics.jsonl");
    let series = read_series(&metrics)?;
    let panels: Vec<(&str, Vec<&(String, Vec<(f64, f64)>)>)> = PANELS
        .iter()
        .map(|(title, keys)| (*title, keys.iter().filter_map(|k| series.iter().find(|(n, _)| n == k)).collect::<Vec<_>>()))
        .filter(|(_, s)| !s.is_empty())
        .collect();
    if panels.is_empty() {
        return Err(Error::file(&metrics, "no step metrics to plot"));
    }
    let out = dir.join("metrics.svg");
    let cols = 2;
    let rows = panels.len().div_ceil(cols);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (1000, 300 * rows as u32)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| draw_error(&out, e))?;
        for (area, (title, lines)) in root.split_evenly((rows, cols)).iter().zip(&panels) {
            let Some(((x0, x1), (y0, y1))) = bounds(lines.iter().flat_map(|(_, p)| p.iter().copied())) else { continue };
            let mut chart = ChartBuilder::on(area)
                .caption(*title, ("sans-serif", 18))
                .margin(12)
                .x_label_area_size(30)
                .y_label_area_size(60)
                .build_cartesian_2d(x0..x1, y0..y1)
                .map_err(|e| draw_error(&out, e))?;
            chart.configure_mesh().x_desc("step").light_line_style(WHITE).draw().map_err(|e| draw_error(&out, e))?;
            for (i, (name, points)) in lines.iter().enumerate() {
                let color = COLORS[i % COLORS.len()];
                let style = if name.starts_with("eval_") { color.stroke_width(2) } else { color.stroke_width(1) };
                chart
                    .draw_series(LineSeries::new(points.iter().copied(), style))
                    .map_err(|e| draw_error(&out, e))?
                    .label(name.as_str())
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2)));
            }
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK.mix(0.3))
                .draw()
                .map_err(|e| draw_error(&out, e))?;
        }
        root.present().map_err(|e| draw_error(&out, e))?;
    }
    kto::files::write_atomic(&out, svg.as_bytes())?;
    Ok(out)
}

/// A grouped bar chart of rates in [0, 1]: one group per label, one bar per seed, a tick at the group's mean.
pub fn plot_rates(out: &Path, title: &str, groups: &[(String, Vec<f64>)]) -> Result<()> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (900, 420)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| draw_error(out, e))?;
        let n = groups.len() as f64;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 20))
            .margin(16)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..n, 0.0..1.0)
            .map_err(|e| draw_error(out, e))?;
        let labels: Vec<String> = groups.iter().map(|(l, _)| l.clone()).collect();
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(groups.len() * 2 + 1)
            .x_label_formatter(&|x| {
                let i = x.floor() as usize;
                if (x - x.floor() - 0.5).abs() < 1e-6 && i < labels.len() {
                    labels[i].clone()
                } else {
                    String::new()
                }
            })
            .y_desc("desirable rate on held-out prompts")
            .draw()
            .map_err(|e| draw_error(out, e))?;
        for (g, (_, values)) in groups.iter().enumerate() {
            let k = values.len().max(1) as f64;
            let width = 0.7 / k;
            for (j, &v) in values.iter().enumerate() {
                let x0 = g as f64 + 0.15 + j as f64 * width;
                let color = COLORS[g % COLORS.len()].mix(0.45 + 0.5 * (j as f64 + 1.0) / k);
                chart.draw_series(std::iter::once(Rectangle::new([(x0, 0.0), (x0 + width * 0.9, v)], color.filled()))).map_err(|e| draw_error(out, e))?;
            }
            if !values.is_empty() {
                let mean = values.iter().sum::<f64>() / k;
                chart
                    .draw_series(std::iter::once(PathElement::new(vec![(g as f64 + 0.1, mean), (g as f64 + 0.9, mean)], BLACK.stroke_width(2))))
                    .map_err(|e| draw_error(out, e))?;
            }
        }
        root.present().map_err(|e| draw_error(out, e))?;
    }
    kto::files::write_atomic(out, svg.as_bytes())
}
