//! Training the points: `launch` per point, `--parallel` at a time, each with its log.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use anyhow::{ensure, Context, Result};

use super::grid::Point;
use super::SweepCli;

/// What became of a point in this invocation.
#[derive(Clone, Copy, PartialEq)]
pub(super) enum Status {
    /// Finished by an earlier invocation; not run again.
    Kept,
    /// Trained (or continued) to its last step now.
    Ran,
    /// launch exited non-zero (or could not be started).
    Failed,
}

impl Status {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Status::Kept => "kept",
            Status::Ran => "ran",
            Status::Failed => "failed",
        }
    }
}

/// Trains the unfinished points, `--parallel` at a time; returns each point's status.
pub(super) fn run_points(cli: &SweepCli, points: &[Point]) -> Result<Vec<Status>> {
    let launch = std::env::current_exe()?.with_file_name("launch");
    ensure!(
        launch.is_file(),
        "{} is missing: build it with cargo build --release --bins (./launch/sweep does)",
        launch.display()
    );
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
fn run_point(launch: &Path, cli: &SweepCli, point: &Point) -> Status {
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
fn launch_point(launch: &Path, cli: &SweepCli, point: &Point, resume: bool) -> Result<bool> {
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
