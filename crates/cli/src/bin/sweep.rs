//! `sweep RECIPE.toml --grid train.lr=1e-6,3e-6,1e-5 [--grid KEY=A,B]...`: trains one run per
//! point of the grids' cartesian product, by calling the `launch` binary that sits next to
//! this one, and compares the runs.
//!
//! - Each point is a run folder `DIR/<key=value,...>` (DIR defaults to `sweeps/<recipe stem>`),
//!   trained with `launch --set KEY=VALUE... --out DIR/<point>`, its output appended to
//!   `DIR/<point>/launch.log`; `--parallel N` points train at a time.
//! - Running the same command again keeps the finished points (their `checkpoints/latest`
//!   names the last step of their resolved `recipe.toml`) and continues the others with
//!   `launch --resume`.
//! - A failed point is reported with its log and does not stop the others; the sweep exits
//!   non-zero once the results of all are written.
//! - Results: `DIR/sweep.csv`, `DIR/sweep.json`, a table on stdout with the best point marked,
//!   and `DIR/sweep.png`, the metric against the learning rate.
//! - `--emit slurm` writes `DIR/sweep.sbatch`, a SLURM array job, instead of training.

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use anyhow::{anyhow, bail, ensure, Context, Result};
use clap::{Parser, ValueEnum};
use plotters::prelude::*;
use serde_json::{json, Map, Value};

#[derive(Parser)]
#[command(name = "sweep", version, about = "Train a recipe over a grid of overrides (learning rates, ...) and compare the runs")]
struct Cli {
    /// The recipe, e.g. recipes/tiny/transfer-color.toml.
    recipe: PathBuf,
    /// One axis of the grid, e.g. --grid train.lr=1e-6,3e-6,1e-5 (repeatable; each value is
    /// passed to launch as --set KEY=VALUE, so values are TOML; none may hold a comma).
    #[arg(long = "grid", value_name = "KEY=V1,V2,...", required = true)]
    grids: Vec<String>,
    /// Sweep folder, holding one run folder per point (default: sweeps/<recipe stem>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Points trained at the same time (default 1); with --emit slurm, the most array tasks
    /// running at once (default: no limit).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    parallel: Option<u32>,
    /// Write a job script for this scheduler instead of training.
    #[arg(long, value_enum)]
    emit: Option<Emit>,
    /// The metric to compare (default: the first `eval/...` key of the runs' metrics.jsonl, else
    /// `loss`); lower is better for a name ending in `loss`, higher for any other.
    #[arg(long)]
    metric: Option<String>,
    /// Passed to launch: cpu, cuda, cuda:N or auto (launch's default).
    #[arg(long)]
    device: Option<String>,
}

#[derive(Clone, Copy, PartialEq, ValueEnum)]
enum Emit {
    Slurm,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    ensure!(cli.recipe.is_file(), "no recipe at {}", cli.recipe.display());
    let axes = cli.grids.iter().map(|g| Axis::parse(g)).collect::<Result<Vec<_>>>()?;
    let stem = cli.recipe.file_stem().unwrap_or_default().to_string_lossy().into_owned();
    let dir = cli.out.clone().unwrap_or_else(|| Path::new("sweeps").join(&stem));
    let points = grid_points(&axes, &dir)?;
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    if cli.emit == Some(Emit::Slurm) {
        return emit_slurm(&cli, &stem, &dir, &points);
    }

    let statuses = run_points(&cli, &points)?;
    let runs: Vec<_> = points.iter().map(|p| read_metrics(&p.dir)).collect();
    let metric = cli.metric.clone().unwrap_or_else(|| default_metric(&runs));
    let rows: Vec<Row> = points.iter().zip(statuses).zip(&runs).map(|((point, status), run)| Row::new(point, status, run, &metric)).collect();
    let best = best_row(&rows, &metric);
    fs::write(dir.join("sweep.csv"), csv(&axes, &rows, &metric, best))?;
    fs::write(dir.join("sweep.json"), serde_json::to_string_pretty(&summary_json(&cli.recipe, &rows, &metric, best))? + "\n")?;
    print!("{}", table(&rows, &metric, best));
    let png = dir.join("sweep.png");
    if let Err(e) = plot(&png, &axes, &rows, &metric, best) {
        eprintln!("sweep: sweep.png not drawn: {e:#}");
        let _ = fs::remove_file(&png);
    }

    let failed: Vec<&Row> = rows.iter().filter(|r| r.status == Status::Failed).collect();
    for row in &failed {
        eprintln!("sweep: {} failed; see {}", row.point.name, row.point.log().display());
    }
    if !failed.is_empty() {
        bail!("{} of {} points failed", failed.len(), rows.len());
    }
    Ok(())
}

/// One axis of the grid: a recipe key and the values it takes.
struct Axis {
    key: String,
    values: Vec<String>,
}

impl Axis {
    /// Reads `KEY=V1,V2,...`.
    fn parse(arg: &str) -> Result<Self> {
        let (key, values) = arg.split_once('=').ok_or_else(|| anyhow!("--grid {arg}: expected KEY=V1,V2,..."))?;
        let values: Vec<String> = values.split(',').map(|v| v.trim().to_string()).collect();
        ensure!(!key.trim().is_empty() && values.iter().all(|v| !v.is_empty()), "--grid {arg}: expected KEY=V1,V2,... with no empty value");
        Ok(Axis { key: key.trim().to_string(), values })
    }
}

/// One point of the grid: a value for each axis, and its run folder.
struct Point {
    /// `(key, value)` in the order of the axes.
    values: Vec<(String, String)>,
    /// `key=value,key=value`, with characters other than letters, digits and `._=,+-` as `_`.
    name: String,
    dir: PathBuf,
}

impl Point {
    fn new(values: Vec<(String, String)>, sweep_dir: &Path) -> Self {
        let name: String = values
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",")
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() || "._=,+-".contains(c) { c } else { '_' })
            .collect();
        Point { dir: sweep_dir.join(&name), name, values }
    }

    /// launch's arguments after the recipe: the point's overrides and run folder.
    fn launch_args(&self, device: Option<&str>) -> Vec<String> {
        let mut args: Vec<String> = self.values.iter().flat_map(|(k, v)| ["--set".to_string(), format!("{k}={v}")]).collect();
        args.extend(["--out".to_string(), self.dir.display().to_string()]);
        if let Some(device) = device {
            args.extend(["--device".to_string(), device.to_string()]);
        }
        args
    }

    fn log(&self) -> PathBuf {
        self.dir.join("launch.log")
    }

    /// Whether the run reached its last step: `checkpoints/latest` names `step-<train.steps>`
    /// of the run's resolved `recipe.toml` (a run measured in examples or epochs never counts
    /// as finished, and `launch --resume` returns at once for it when it is).
    fn is_finished(&self) -> bool {
        let recipe = fs::read_to_string(self.dir.join("recipe.toml")).ok().and_then(|text| toml::from_str::<toml::Table>(&text).ok());
        let steps = recipe.as_ref().and_then(|r| r.get("train")?.get("steps")?.as_integer());
        let latest = fs::read_to_string(self.dir.join("checkpoints/latest")).ok();
        matches!((steps, latest), (Some(n), Some(latest)) if latest.trim() == format!("step-{n:06}"))
    }
}

/// The cartesian product of the axes, the first axis varying slowest.
fn grid_points(axes: &[Axis], sweep_dir: &Path) -> Result<Vec<Point>> {
    let mut combos: Vec<Vec<(String, String)>> = vec![vec![]];
    for axis in axes {
        ensure!(axes.iter().filter(|a| a.key == axis.key).count() == 1, "--grid {} is given twice", axis.key);
        combos = combos.into_iter().flat_map(|combo| axis.values.iter().map(move |v| [combo.clone(), vec![(axis.key.clone(), v.clone())]].concat())).collect();
    }
    let points: Vec<Point> = combos.into_iter().map(|values| Point::new(values, sweep_dir)).collect();
    for (i, p) in points.iter().enumerate() {
        ensure!(points[..i].iter().all(|q| q.name != p.name), "two points of the grid would share the folder {}", p.dir.display());
    }
    Ok(points)
}

/// What became of a point in this invocation.
#[derive(Clone, Copy, PartialEq)]
enum Status {
    /// Finished by an earlier invocation; not run again.
    Kept,
    /// Trained (or continued) to its last step now.
    Ran,
    /// launch exited non-zero (or could not be started).
    Failed,
}

impl Status {
    fn as_str(self) -> &'static str {
        match self {
            Status::Kept => "kept",
            Status::Ran => "ran",
            Status::Failed => "failed",
        }
    }
}

/// Trains the unfinished points, `--parallel` at a time; returns each point's status.
fn run_points(cli: &Cli, points: &[Point]) -> Result<Vec<Status>> {
    let launch = std::env::current_exe()?.with_file_name("launch");
    ensure!(launch.is_file(), "{} is missing: build it with cargo build --release --bins (./launch/sweep does)", launch.display());
    let mut todo = vec![];
    for (i, point) in points.iter().enumerate() {
        if point.is_finished() {
            eprintln!("sweep: {} finished earlier; kept", point.name);
        } else {
            todo.push(i);
        }
    }
    let statuses = Mutex::new(vec![Status::Kept; points.len()]);
    let next = AtomicUsize::new(0);
    std::thread::scope(|scope| {
        for _ in 0..cli.parallel.unwrap_or(1).min(todo.len() as u32) {
            scope.spawn(|| {
                while let Some(&i) = todo.get(next.fetch_add(1, Ordering::Relaxed)) {
                    let status = run_point(&launch, cli, &points[i]);
                    statuses.lock().unwrap()[i] = status;
                }
            });
        }
    });
    Ok(statuses.into_inner().unwrap())
}

/// Trains one point, continuing its run if it has a checkpoint; reports how it went.
fn run_point(launch: &Path, cli: &Cli, point: &Point) -> Status {
    let start = Instant::now();
    let resume = point.dir.join("checkpoints/latest").exists();
    eprintln!("sweep: {} {}", if resume { "resuming" } else { "starting" }, point.name);
    let ok = launch_point(launch, cli, point, resume).unwrap_or_else(|e| {
        eprintln!("sweep: {}: {e:#}", point.name);
        false
    });
    let secs = start.elapsed().as_secs_f64();
    if ok {
        eprintln!("sweep: {} done in {secs:.1}s", point.name);
        Status::Ran
    } else {
        eprintln!("sweep: {} FAILED after {secs:.1}s; see {}", point.name, point.log().display());
        Status::Failed
    }
}

/// Runs launch for a point with its output appended to the point's launch.log; whether it
/// succeeded.
fn launch_point(launch: &Path, cli: &Cli, point: &Point, resume: bool) -> Result<bool> {
    fs::create_dir_all(&point.dir).with_context(|| format!("creating {}", point.dir.display()))?;
    let mut log = OpenOptions::new().create(true).append(true).open(point.log())?;
    let mut command = Command::new(launch);
    command.arg(&cli.recipe).args(point.launch_args(cli.device.as_deref()));
    if resume {
        command.arg("--resume");
    }
    writeln!(log, "sweep: running {command:?}")?;
    let status = command.stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log).status()?;
    Ok(status.success())
}

/// Writes `DIR/sweep.sbatch` and says how to submit it.
fn emit_slurm(cli: &Cli, stem: &str, dir: &Path, points: &[Point]) -> Result<()> {
    let script = dir.join("sweep.sbatch");
    fs::write(&script, sbatch_script(cli, stem, dir, points)?)?;
    println!("wrote {} ({} array tasks); submit it with\n  sbatch {}", script.display(), points.len(), script.display());
    println!("and once the tasks are done, run this command without --emit to collect the results.");
    if !Path::new("launch/launch").is_file() {
        eprintln!("sweep: warning: the script runs ./launch/launch from this folder, which has none; emit it from the repository root");
    }
    Ok(())
}

/// A SLURM array script: task `i` runs `./launch/launch` on point `i`, from the folder the
/// sweep was started in. Every task passes `--resume`, so a requeued or resubmitted task
/// continues its run (and one that had finished returns at once).
fn sbatch_script(cli: &Cli, stem: &str, dir: &Path, points: &[Point]) -> Result<String> {
    let cwd = std::env::current_dir()?;
    let limit = cli.parallel.map(|n| format!("%{n}")).unwrap_or_default();
    let mut script = format!(
        "#!/bin/bash\n\
         # Written by sweep: one array task per point of the grid, each running ./launch/launch\n\
         # from the folder the sweep was started in. Add the #SBATCH lines your cluster needs\n\
         # (partition, --gpus, --time, ...).\n\
         #SBATCH --job-name=sweep-{stem}\n\
         #SBATCH --array=0-{last}{limit}\n\
         #SBATCH --output={log}/slurm-%A_%a.log\n\
         set -euo pipefail\n\
         cd {cwd}\n\
         case \"$SLURM_ARRAY_TASK_ID\" in\n",
        last = points.len() - 1,
        log = cwd.join(dir).display(),
        cwd = shell_quote(&cwd.display().to_string()),
    );
    for (i, point) in points.iter().enumerate() {
        let mut args = vec![cli.recipe.display().to_string()];
        args.extend(point.launch_args(cli.device.as_deref()));
        args.push("--resume".into());
        let args: Vec<String> = args.iter().map(|a| shell_quote(a)).collect();
        script += &format!("  {i}) exec ./launch/launch {} ;;\n", args.join(" "));
    }
    script += "  *) echo \"sweep.sbatch: no point $SLURM_ARRAY_TASK_ID\" >&2; exit 1 ;;\nesac\n";
    Ok(script)
}

/// `s` as one shell word.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// A run's metrics.jsonl merged by step. A resumed run logs again the steps after its
/// checkpoint; the later values win.
type Metrics = BTreeMap<u64, Map<String, Value>>;

fn read_metrics(run: &Path) -> Metrics {
    let mut steps = Metrics::new();
    for line in fs::read_to_string(run.join("metrics.jsonl")).unwrap_or_default().lines() {
        let Ok(Value::Object(fields)) = serde_json::from_str::<Value>(line) else { continue };
        if let Some(step) = fields.get("step").and_then(Value::as_u64) {
            steps.entry(step).or_default().extend(fields);
        }
    }
    steps
}

/// The first `eval/...` key of the runs, else `loss`.
fn default_metric(runs: &[Metrics]) -> String {
    runs.iter().flat_map(|run| run.values()).flat_map(|fields| fields.keys()).find(|k| k.starts_with("eval/")).cloned().unwrap_or_else(|| "loss".into())
}

fn lower_is_better(metric: &str) -> bool {
    metric.ends_with("loss")
}

/// Whether `a` is a better value of the metric than `b`.
fn better(metric: &str, a: f64, b: f64) -> bool {
    if lower_is_better(metric) {
        a < b
    } else {
        a > b
    }
}

/// One point's results.
struct Row<'a> {
    point: &'a Point,
    status: Status,
    /// The metric at the last step that logged it.
    last: Option<f64>,
    /// The metric's best value over the run.
    best: Option<f64>,
    final_loss: Option<f64>,
}

impl<'a> Row<'a> {
    fn new(point: &'a Point, status: Status, run: &Metrics, metric: &str) -> Self {
        let series = |key: &str| run.values().filter_map(|fields| fields.get(key)?.as_f64()).collect::<Vec<f64>>();
        let values = series(metric);
        let best = values.iter().copied().reduce(|a, b| if better(metric, b, a) { b } else { a });
        Row { point, status, last: values.last().copied(), best, final_loss: series("loss").last().copied() }
    }
}

/// The point with the best final metric among those that did not fail; of points that tie
/// (a tiny run's accuracies are often all 0), the one with the lowest final loss.
fn best_row(rows: &[Row], metric: &str) -> Option<usize> {
    let candidates = rows.iter().enumerate().filter(|(_, r)| r.status != Status::Failed);
    let scored = candidates.filter_map(|(i, r)| Some((i, r.last?, r.final_loss.unwrap_or(f64::INFINITY))));
    let wins = |b: (usize, f64, f64), a: (usize, f64, f64)| better(metric, b.1, a.1) || (b.1 == a.1 && b.2 < a.2);
    scored.reduce(|a, b| if wins(b, a) { b } else { a }).map(|(i, ..)| i)
}

/// `point,<grid keys>,status,final_<metric>,best_<metric>,final_loss,best_point`.
fn csv(axes: &[Axis], rows: &[Row], metric: &str, best: Option<usize>) -> String {
    let field = |s: &str| if s.contains([',', '"', '\n']) { format!("\"{}\"", s.replace('"', "\"\"")) } else { s.to_string() };
    let number = |v: Option<f64>| v.map(|v| v.to_string()).unwrap_or_default();
    let mut header = vec!["point".to_string()];
    header.extend(axes.iter().map(|a| a.key.clone()));
    header.extend(["status".into(), format!("final_{metric}"), format!("best_{metric}"), "final_loss".into(), "best_point".into()]);
    let mut lines = vec![header.iter().map(|h| field(h)).collect::<Vec<_>>().join(",")];
    for (i, row) in rows.iter().enumerate() {
        let mut cells = vec![field(&row.point.name)];
        cells.extend(row.point.values.iter().map(|(_, v)| field(v)));
        cells.extend([row.status.as_str().into(), number(row.last), number(row.best), number(row.final_loss), (best == Some(i)).to_string()]);
        lines.push(cells.join(","));
    }
    lines.join("\n") + "\n"
}

/// sweep.json: the metric, the best point and every point with its values and results.
fn summary_json(recipe: &Path, rows: &[Row], metric: &str, best: Option<usize>) -> Value {
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
fn table(rows: &[Row], metric: &str, best: Option<usize>) -> String {
    let number = |v: Option<f64>| v.map(|v| format!("{v:.4}")).unwrap_or_else(|| "-".into());
    let header = ["point", "status", "final", "best", "final loss"].map(String::from);
    let cells: Vec<[String; 5]> =
        rows.iter().map(|r| [r.point.name.clone(), r.status.as_str().into(), number(r.last), number(r.best), number(r.final_loss)]).collect();
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

/// Draws sweep.png: the final metric against the learning rate (or, when `train.lr` is not
/// swept, the first axis), one line per combination of the other axes' values, the best
/// point ringed. The x axis is logarithmic when all its values are positive.
fn plot(path: &Path, axes: &[Axis], rows: &[Row], metric: &str, best: Option<usize>) -> Result<()> {
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
        let label = row.point.values.iter().filter(|(k, _)| k != x_key).map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(", ");
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

    plotters::style::register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular()).map_err(|_| anyhow!("the embedded font did not load"))?;
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
            chart.draw_series([Circle::new(p, 10, RED.stroke_width(3))])?.label("best").legend(|(x, y)| Circle::new((x + 10, y), 5, RED.stroke_width(2)));
        }
        chart.configure_series_labels().position(SeriesLabelPosition::UpperRight).border_style(BLACK).background_style(WHITE.mix(0.8)).draw()?;
        root.present()?;
    }
    image::save_buffer(path, &pixels, width, height, image::ColorType::Rgb8).with_context(|| format!("writing {}", path.display()))
}

/// The values' range with a margin, never empty.
fn padded(values: impl Iterator<Item = f64>) -> Range<f64> {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let pad = if hi > lo { (hi - lo) * 0.08 } else { hi.abs().max(1.0) * 0.1 };
    lo - pad..hi + pad
}
