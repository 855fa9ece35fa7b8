//! The grid: axes from `--grid KEY=V1,V2,...`, and their points, each with its run folder.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, ensure, Result};
use pg2_train::RunDir;

/// One axis of the grid: a recipe key and the values it takes.
pub(super) struct Axis {
    pub(super) key: String,
    pub(super) values: Vec<String>,
}

impl Axis {
    /// Reads `KEY=V1,V2,...`.
    pub(super) fn parse(arg: &str) -> Result<Self> {
        let (key, values) = arg.split_once('=').ok_or_else(|| anyhow!("--grid {arg}: expected KEY=V1,V2,..."))?;
        let values: Vec<String> = values.split(',').map(|v| v.trim().to_string()).collect();
        ensure!(
            !key.trim().is_empty() && values.iter().all(|v| !v.is_empty()),
            "--grid {arg}: expected KEY=V1,V2,... with no empty value"
        );
        Ok(Axis { key: key.trim().to_string(), values })
    }
}

/// One point of the grid: a value for each axis, and its run folder.
pub(super) struct Point {
    /// `(key, value)` in the order of the axes.
    pub(super) values: Vec<(String, String)>,
    /// `key=value,key=value`, with characters other than letters, digits and `._=,+-` as `_`.
    pub(super) name: String,
    pub(super) dir: PathBuf,
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
    pub(super) fn launch_args(&self, device: Option<&str>) -> Vec<String> {
        let mut args: Vec<String> =
            self.values.iter().flat_map(|(k, v)| ["--set".to_string(), format!("{k}={v}")]).collect();
        args.extend(["--out".to_string(), self.dir.display().to_string()]);
        if let Some(device) = device {
            args.extend(["--device".to_string(), device.to_string()]);
        }
        args
    }

    pub(super) fn log(&self) -> PathBuf {
        self.dir.join("launch.log")
    }

    /// Whether the point's run has made its last update (see [`RunDir::finished`]); a run
    /// that has not is continued with `launch --resume`.
    pub(super) fn is_finished(&self) -> bool {
        RunDir::new(&self.dir).finished()
    }
}

/// The cartesian product of the axes, the first axis varying slowest.
pub(super) fn grid_points(axes: &[Axis], sweep_dir: &Path) -> Result<Vec<Point>> {
    let mut combos: Vec<Vec<(String, String)>> = vec![vec![]];
    for axis in axes {
        ensure!(axes.iter().filter(|a| a.key == axis.key).count() == 1, "--grid {} is given twice", axis.key);
        combos = combos
            .into_iter()
            .flat_map(|combo| {
                axis.values.iter().map(move |v| [combo.clone(), vec![(axis.key.clone(), v.clone())]].concat())
            })
            .collect();
    }
    let points: Vec<Point> = combos.into_iter().map(|values| Point::new(values, sweep_dir)).collect();
    for (i, p) in points.iter().enumerate() {
        ensure!(
            points[..i].iter().all(|q| q.name != p.name),
            "two points of the grid would share the folder {}",
            p.dir.display()
        );
    }
    Ok(points)
}
