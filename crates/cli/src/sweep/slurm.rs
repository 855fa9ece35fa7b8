//! `--emit slurm`: the sweep as a SLURM array job.

use std::fs;
use std::path::Path;

use anyhow::Result;

use super::grid::Point;
use super::SweepCli;

/// Writes `DIR/sweep.sbatch` and says how to submit it.
pub(super) fn emit_slurm(cli: &SweepCli, stem: &str, dir: &Path, points: &[Point]) -> Result<()> {
    let script = dir.join("sweep.sbatch");
    fs::write(&script, sbatch_script(cli, stem, dir, points)?)?;
    println!(
        "wrote {} ({} array tasks); submit it with\n  sbatch {}",
        script.display(),
        points.len(),
        script.display()
    );
    println!("and once the tasks are done, run this command without --emit to collect the results.");
    if !Path::new("launch/launch").is_file() {
        eprintln!("sweep: warning: the script runs ./launch/launch from this folder, which has none; emit it from the repository root");
    }
    Ok(())
}

/// A SLURM array script: task `i` runs `./launch/launch` on point `i`, from the folder the
/// sweep was started in. Every task passes `--resume`, so a requeued or resubmitted task
/// continues its run (and one that had finished returns at once).
fn sbatch_script(cli: &SweepCli, stem: &str, dir: &Path, points: &[Point]) -> Result<String> {
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
