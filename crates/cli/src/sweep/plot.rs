//! `sweep.png`: the metric against the learning rate.

use std::ops::Range;
use std::path::Path;

use anyhow::{anyhow, ensure, Context, Result};
use plotters::prelude::*;

use super::grid::Axis;
use super::results::Row;
use super::run::Status;

/// Draws sweep.png: the final metric against the learning rate (or, when `train.lr` is not
/// swept, the first axis), one line per combination of the other axes' values, the best
/// point ringed. The x axis is logarithmic when all its values are positive.
pub(super) fn plot(path: &Path, axes: &[Axis], rows: &[Row], metric: &str, best: Option<usize>) -> Result<()> {
    let x_key = &axes.iter().find(|a| a.key == "train.lr").unwrap_or(&axes[0]).key;
    let x_of = |row: &Row| -> Result<f64> {
        let value = &row.point.values.iter().find(|(k, _)| k == x_key).unwrap().1;
        value.parse().map_err(|_| anyhow!("{x_key} = {value} is not a number"))
    };
    let xs = rows.iter().map(x_of).collect::<Result<Vec<f64>>>()?;
    let log = xs.iter().all(|&x| x > 0.0);
    let to_axis = |x: f64| if log { x.log10() } else { x };
    // One series per combination of the other axes' values, in grid order.
    let mut series: Vec<(String, Vec<(f64, f64)>)> = vec![];
    let mut best_point = None;
    for (i, (row, &x)) in rows.iter().zip(&xs).enumerate() {
        let Some(y) = row.last.filter(|_| row.status != Status::Failed) else { continue };
        let label = row
            .point
            .values
            .iter()
            .filter(|(k, _)| k != x_key)
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(", ");
        match series.iter_mut().find(|(l, _)| *l == label) {
            Some((_, line)) => line.push((to_axis(x), y)),
            None => series.push((label, vec![(to_axis(x), y)])),
        }
        if best == Some(i) {
            best_point = Some((to_axis(x), y));
        }
    }
    ensure!(!series.is_empty(), "no point has a value of {metric}");
    for (_, line) in &mut series {
        line.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    let all = || series.iter().flat_map(|(_, line)| line.iter());
    let x_range = padded(all().map(|p| p.0));
    let y_range = padded(all().map(|p| p.1));

    plotters::style::register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular())
        .map_err(|_| anyhow!("the embedded font did not load"))?;
    let (width, height) = (800u32, 500u32);
    let mut pixels = vec![0u8; (width * height * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut pixels, (width, height)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(format!("{metric} by {x_key}"), ("sans-serif", 22))
            .margin(15)
            .x_label_area_size(45)
            .y_label_area_size(65)
            .build_cartesian_2d(x_range, y_range)?;
        let x_label = |t: &f64| if log { format!("{:.1e}", 10f64.powf(*t)) } else { format!("{t}") };
        chart
            .configure_mesh()
            .x_desc(if log { format!("{x_key} (log scale)") } else { x_key.clone() })
            .y_desc(format!("final {metric}"))
            .x_label_formatter(&x_label)
            .draw()?;
        for (i, (label, line)) in series.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(line.iter().copied(), color.stroke_width(2)))?
                .label(if label.is_empty() { "all points" } else { label })
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
            chart.draw_series(line.iter().map(|&p| Circle::new(p, 4, color.filled())))?;
        }
        if let Some(p) = best_point {
            chart
                .draw_series([Circle::new(p, 10, RED.stroke_width(3))])?
                .label("best")
                .legend(|(x, y)| Circle::new((x + 10, y), 5, RED.stroke_width(2)));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .border_style(BLACK)
            .background_style(WHITE.mix(0.8))
            .draw()?;
        root.present()?;
    }
    image::save_buffer(path, &pixels, width, height, image::ColorType::Rgb8)
        .with_context(|| format!("writing {}", path.display()))
}

/// The values' range with a margin, never empty.
fn padded(values: impl Iterator<Item = f64>) -> Range<f64> {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let pad = if hi > lo { (hi - lo) * 0.08 } else { hi.abs().max(1.0) * 0.1 };
    lo - pad..hi + pad
}
