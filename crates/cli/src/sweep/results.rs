//! The sweep's results: each point's metric, the best point, `sweep.csv`, `sweep.json`
//! and the table on stdout.

use std::path::Path;

use pg2_train::run_dir::Metrics;
use pg2_train::RunDir;
use serde_json::{json, Map, Value};

use super::grid::{Axis, Point};
use super::run::Status;

/// A run's metrics by step ([`RunDir::metrics`]); empty when it has none yet.
pub(super) fn read_metrics(run: &Path) -> Metrics {
    RunDir::new(run).metrics().unwrap_or_default()
}

/// `eval/<primary>` (the recipe metric's [`pg2_eval::Metric::primary`] score) when the runs
/// logged it, else their first `eval/...` key, else `loss`.
pub(super) fn default_metric(runs: &[Metrics], primary: Option<&str>) -> String {
    let keys = || runs.iter().flat_map(|run| run.values()).flat_map(|fields| fields.keys());
    let primary = primary.map(|p| format!("eval/{p}"));
    keys()
        .find(|k| Some(*k) == primary.as_ref())
        .or_else(|| keys().find(|k| k.starts_with("eval/")))
        .cloned()
        .unwrap_or_else(|| "loss".into())
}

pub(super) fn lower_is_better(metric: &str) -> bool {
    metric.ends_with("loss")
}

/// Whether `a` is a better value of the metric than `b`.
pub(super) fn better(metric: &str, a: f64, b: f64) -> bool {
    if lower_is_better(metric) {
        a < b
    } else {
        a > b
    }
}

/// One point's results.
pub(super) struct Row<'a> {
    pub(super) point: &'a Point,
    pub(super) status: Status,
    /// The metric at the last step that logged it.
    pub(super) last: Option<f64>,
    /// The metric's best value over the run.
    pub(super) best: Option<f64>,
    pub(super) final_loss: Option<f64>,
}

impl<'a> Row<'a> {
    pub(super) fn new(point: &'a Point, status: Status, run: &Metrics, metric: &str) -> Self {
        let series = |key: &str| run.values().filter_map(|fields| fields.get(key)?.as_f64()).collect::<Vec<f64>>();
        let values = series(metric);
        let best = values.iter().copied().reduce(|a, b| if better(metric, b, a) { b } else { a });
        Row { point, status, last: values.last().copied(), best, final_loss: series("loss").last().copied() }
    }
}

/// The point with the best final metric among those that did not fail; of points that tie
/// (a tiny run's accuracies are often all 0), the one with the lowest final loss.
pub(super) fn best_row(rows: &[Row], metric: &str) -> Option<usize> {
    let candidates = rows.iter().enumerate().filter(|(_, r)| r.status != Status::Failed);
    let scored = candidates.filter_map(|(i, r)| Some((i, r.last?, r.final_loss.unwrap_or(f64::INFINITY))));
    let wins = |b: (usize, f64, f64), a: (usize, f64, f64)| better(metric, b.1, a.1) || (b.1 == a.1 && b.2 < a.2);
    scored.reduce(|a, b| if wins(b, a) { b } else { a }).map(|(i, ..)| i)
}

/// `point,<grid keys>,status,final_<metric>,best_<metric>,final_loss,best_point`.
pub(super) fn csv(axes: &[Axis], rows: &[Row], metric: &str, best: Option<usize>) -> String {
    let field =
        |s: &str| if s.contains([',', '"', '\n']) { format!("\"{}\"", s.replace('"', "\"\"")) } else { s.to_string() };
    let number = |v: Option<f64>| v.map(|v| v.to_string()).unwrap_or_default();
    let mut header = vec!["point".to_string()];
    header.extend(axes.iter().map(|a| a.key.clone()));
    header.extend([
        "status".into(),
        format!("final_{metric}"),
        format!("best_{metric}"),
        "final_loss".into(),
        "best_point".into(),
    ]);
    let mut lines = vec![header.iter().map(|h| field(h)).collect::<Vec<_>>().join(",")];
    for (i, row) in rows.iter().enumerate() {
        let mut cells = vec![field(&row.point.name)];
        cells.extend(row.point.values.iter().map(|(_, v)| field(v)));
        cells.extend([
            row.status.as_str().into(),
            number(row.last),
            number(row.best),
            number(row.final_loss),
            (best == Some(i)).to_string(),
        ]);
        lines.push(cells.join(","));
    }
    lines.join("\n") + "\n"
}

/// sweep.json: the metric, the best point and every point with its values and results.
pub(super) fn summary_json(recipe: &Path, rows: &[Row], metric: &str, best: Option<usize>) -> Value {
    let points: Vec<Value> = rows
        .iter()
        .map(|row| {
            let values: Map<String, Value> = row.point.values.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
            json!({
                "name": row.point.name,
                "dir": row.point.dir.display().to_string(),
                "values": values,
                "status": row.status.as_str(),
                "final": row.last,
                "best": row.best,
                "final_loss": row.final_loss,
                "log": row.point.log().display().to_string(),
            })
        })
        .collect();
    json!({
        "recipe": recipe.display().to_string(),
        "metric": metric,
        "higher_is_better": !lower_is_better(metric),
        "best": best.map(|i| rows[i].point.name.clone()),
        "points": points,
    })
}

/// The results as an aligned text table, the best point marked.
pub(super) fn table(rows: &[Row], metric: &str, best: Option<usize>) -> String {
    let number = |v: Option<f64>| v.map(|v| format!("{v:.4}")).unwrap_or_else(|| "-".into());
    let header = ["point", "status", "final", "best", "final loss"].map(String::from);
    let cells: Vec<[String; 5]> = rows
        .iter()
        .map(|r| [r.point.name.clone(), r.status.as_str().into(), number(r.last), number(r.best), number(r.final_loss)])
        .collect();
    let width = |c: usize| cells.iter().map(|row| row[c].len()).chain([header[c].len()]).max().unwrap();
    let line = |row: &[String; 5]| {
        format!(
            "{:<w0$}  {:<w1$}  {:>w2$}  {:>w3$}  {:>w4$}",
            row[0],
            row[1],
            row[2],
            row[3],
            row[4],
            w0 = width(0),
            w1 = width(1),
            w2 = width(2),
            w3 = width(3),
            w4 = width(4)
        )
    };
    let direction = if lower_is_better(metric) { "lower" } else { "higher" };
    let mut out = format!("{metric} ({direction} is better)\n{}\n", line(&header));
    for (i, row) in cells.iter().enumerate() {
        out += &line(row);
        out += if best == Some(i) { "  <- best\n" } else { "\n" };
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_metric_is_the_recipe_metrics_main_score() {
        let fields = |keys: &[&str]| keys.iter().map(|k| (k.to_string(), json!(0.5))).collect::<Map<String, Value>>();
        let runs: Vec<Metrics> =
            vec![[(10, fields(&["loss"]))].into(), [(10, fields(&["eval/box_accuracy@0.5", "eval/miou"]))].into()];
        assert_eq!(default_metric(&runs, Some("miou")), "eval/miou");
        assert_eq!(default_metric(&runs, None), "eval/box_accuracy@0.5");
        assert_eq!(default_metric(&runs, Some("cider")), "eval/box_accuracy@0.5", "not logged: the first");
        assert_eq!(default_metric(&runs[..1], Some("miou")), "loss");
    }
}
