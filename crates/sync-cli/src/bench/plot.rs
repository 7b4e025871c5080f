//! The sweep's outputs: an SVG plot of entries/s and peak RSS against the
//! number of entries (plotters, SVG backend only), and a markdown table.

use std::fmt::Write as _;
use std::path::Path;

use plotters::prelude::*;

use super::Report;

/// Cases drawn, with their colours.
const SERIES: [(&str, RGBColor); 4] = [
    ("floor", RGBColor(90, 90, 90)),
    ("batch", RGBColor(31, 119, 180)),
    ("bulk", RGBColor(214, 39, 40)),
    ("snapshot", RGBColor(44, 160, 44)),
];

/// One value of case `case` per report, as `(entries, value)`.
fn points(
    reports: &[Report],
    case: &str,
    value: impl Fn(&super::CaseResult) -> f64,
) -> Vec<(f64, f64)> {
    reports
        .iter()
        .filter_map(|r| {
            r.cases
                .iter()
                .find(|c| c.case == case)
                .map(|c| (r.entries as f64, value(c)))
        })
        .collect()
}

/// Writes `path`: entries/s (left) and peak RSS of the larger process
/// (right) against entries, log-scaled x axis, one line per case.
pub fn write_svg(path: &Path, reports: &[Report]) -> anyhow::Result<()> {
    let err = |e: &dyn std::fmt::Display| anyhow::anyhow!("cannot draw {}: {e}", path.display());
    let (lo, hi) = reports.iter().fold((f64::MAX, 0f64), |(lo, hi), r| {
        (lo.min(r.entries as f64), hi.max(r.entries as f64))
    });
    let (lo, hi) = (lo * 0.8, hi * 1.25);
    let root = SVGBackend::new(path, (1100, 450)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let panels = root.split_evenly((1, 2));
    type Metric = fn(&super::CaseResult) -> f64;
    let metrics: [(&str, &str, Metric); 2] = [
        ("entries/s", "entries per second", |c| c.entries_per_second),
        ("peak RSS, MB (max of both processes)", "MB", |c| {
            c.sender_peak_rss_mb.max(c.receiver_peak_rss_mb)
        }),
    ];
    for (panel, (title, unit, metric)) in panels.iter().zip(metrics) {
        let top = SERIES
            .iter()
            .flat_map(|(case, _)| points(reports, case, metric))
            .map(|p| p.1)
            .fold(0f64, f64::max)
            * 1.15;
        let mut chart = ChartBuilder::on(panel)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d((lo..hi).log_scale(), 0f64..top.max(1.0))
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_desc("entries")
            .y_desc(unit)
            .x_label_formatter(&|x| {
                if *x >= 1e6 {
                    format!("{:.0}M", x / 1e6)
                } else {
                    format!("{:.0}K", x / 1e3)
                }
            })
            .y_label_formatter(&|y| {
                if *y >= 10_000.0 {
                    format!("{:.0}K", y / 1000.0)
                } else {
                    format!("{y:.0}")
                }
            })
            .draw()
            .map_err(|e| err(&e))?;
        for (case, color) in SERIES {
            let pts = points(reports, case, metric);
            chart
                .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
                .map_err(|e| err(&e))?
                .label(case)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperLeft)
            .draw()
            .map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

/// A markdown table: one row per size and case.
pub fn markdown(reports: &[Report]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| entries | case | strategy | seconds | entries/s | wire bytes | B/entry | sender RSS MB (anon) | receiver RSS MB (anon) | x floor | p50 ms | p99 ms |"
    );
    let _ = writeln!(
        s,
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    let opt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}"));
    for r in reports {
        for c in &r.cases {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {:.2} | {:.0} | {} | {:.1} | {:.0} ({:.0}) | {:.0} ({:.0}) | {} | {} | {} |",
                r.entries,
                c.case,
                c.strategy,
                c.seconds,
                c.entries_per_second,
                c.wire_bytes,
                c.bytes_per_entry,
                c.sender_peak_rss_mb,
                c.sender_peak_anon_mb,
                c.receiver_peak_rss_mb,
                c.receiver_peak_anon_mb,
                opt(c.ratio_to_floor),
                opt(c.p50_ms),
                opt(c.p99_ms),
            );
        }
    }
    s
}
