//! What a run reports as it goes: `metrics.jsonl`, TensorBoard events and a progress bar
//! (plain log lines when stderr is not a terminal), written by rank 0 alone.

use std::io::{IsTerminal, Write};

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Map, Value};

use crate::run_dir::RunDir;
use crate::tensorboard::EventWriter;

/// Totals of what the input pipeline did to the examples so far, over all ranks.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct DataCounts {
    /// Records replaced because their image could not be read (`data.on_bad_record = "skip"`).
    pub skipped_records: u64,
    /// Prompts cut to `text_len` or `max_prefix_tokens`.
    pub prefix_truncated: u64,
    /// Targets cut to what `text_len` left them or to `max_suffix_tokens`.
    pub suffix_truncated: u64,
    /// Cut targets that lost their `<eos>`.
    pub eos_dropped: u64,
    /// Tokens of the examples (image placeholders included) ...
    pub tokens: u64,
    /// ... and positions in the batches, padding included (`data.pad_to`, the longest of a batch).
    pub batch_tokens: u64,
}

/// One logged training step.
pub struct StepLine {
    pub step: u64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub examples_per_s: f64,
    /// Updates skipped so far for a non-finite loss or gradient norm.
    pub skipped_steps: u64,
    pub data: DataCounts,
}

/// The run's log; on ranks other than 0 every call does nothing.
pub struct RunLog {
    /// `None` on the other ranks.
    files: Option<(std::fs::File, EventWriter)>,
    bar: ProgressBar,
    interactive: bool,
    total_steps: u64,
}

impl RunLog {
    /// Opens (appends to) the run's `metrics.jsonl` and TensorBoard folder on the main
    /// rank; the progress bar starts at `first_step` of `total_steps`.
    pub fn open(run: &RunDir, name: &str, first_step: u64, total_steps: u64, main: bool) -> Result<RunLog> {
        let interactive = main && std::io::stderr().is_terminal();
        let bar = if interactive { ProgressBar::new(total_steps) } else { ProgressBar::hidden() };
        bar.set_style(
            ProgressStyle::with_template("{prefix} {bar:30} {pos}/{len} {msg} [{elapsed} < {eta}]")
                .expect("a valid template"),
        );
        bar.set_prefix(name.to_string());
        bar.set_position(first_step);
        let files = match main {
            true => {
                let path = run.metrics_path();
                let mut metrics = std::fs::OpenOptions::new()
                    .create(true)
                    .read(true)
                    .append(true)
                    .open(&path)
                    .with_context(|| format!("opening {}", path.display()))?;
                // A line cut by a kill is ended, so the first new line stays whole.
                if !ends_with_newline(&mut metrics)? {
                    metrics.write_all(b"\n").with_context(|| format!("appending to {}", path.display()))?;
                }
                Some((metrics, EventWriter::create(&run.tensorboard_dir())?))
            }
            false => None,
        };
        Ok(RunLog { files, bar, interactive, total_steps })
    }

    /// Logs a training step: a metrics line, TensorBoard scalars, and the bar's message or
    /// a log line.
    pub fn step(&mut self, s: &StepLine) -> Result<()> {
        let d = &s.data;
        let line = serde_json::json!({"step": s.step, "loss": s.loss, "lr": s.lr, "grad_norm": s.grad_norm,
            "examples_per_s": s.examples_per_s, "skipped_records": d.skipped_records, "skipped_steps": s.skipped_steps,
            "prefix_truncated": d.prefix_truncated, "suffix_truncated": d.suffix_truncated, "eos_dropped": d.eos_dropped,
            "tokens": d.tokens, "batch_tokens": d.batch_tokens});
        self.write(line, s.step, &[("train/loss", s.loss), ("train/lr", s.lr), ("train/grad_norm", s.grad_norm)])?;
        if self.files.is_some() {
            match self.interactive {
                true => self.bar.set_message(format!("loss {:.4} | {:.1} ex/s", s.loss, s.examples_per_s)),
                false => eprintln!(
                    "step {}/{} loss {:.4} lr {:.3e} grad_norm {:.3} {:.1} ex/s",
                    s.step, self.total_steps, s.loss, s.lr, s.grad_norm, s.examples_per_s
                ),
            }
        }
        Ok(())
    }

    /// Logs an evaluation's scores as `eval/<name>` (the example count `n` left out).
    pub fn evaluation(&mut self, step: u64, scores: &Map<String, Value>) -> Result<()> {
        let mut line = Map::new();
        line.insert("step".into(), step.into());
        for (name, value) in scores.iter().filter(|(name, _)| name.as_str() != "n") {
            line.insert(format!("eval/{name}"), value.clone());
        }
        let tags: Vec<(String, f64)> = line
            .iter()
            .filter(|(tag, _)| *tag != "step")
            .filter_map(|(tag, v)| Some((tag.clone(), v.as_f64()?)))
            .collect();
        for (tag, v) in &tags {
            self.bar.suspend(|| eprintln!("step {step} {tag} {v:.4}"));
        }
        let tags: Vec<(&str, f64)> = tags.iter().map(|(tag, v)| (tag.as_str(), *v)).collect();
        self.write(Value::Object(line), step, &tags)
    }

    /// Runs `f` with the progress bar out of the way of its output.
    pub fn suspend<T>(&self, f: impl FnOnce() -> T) -> T {
        self.bar.suspend(f)
    }

    /// Moves the progress bar to `step`.
    pub fn advance(&self, step: u64) {
        self.bar.set_position(step);
    }

    /// Clears the progress bar.
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }

    /// One line of `metrics.jsonl`, and TensorBoard scalars at `step`.
    fn write(&mut self, line: Value, step: u64, tags: &[(&str, f64)]) -> Result<()> {
        let Some((metrics, events)) = &mut self.files else { return Ok(()) };
        // One write per line, so a kill cuts at most the line being written.
        metrics.write_all(format!("{line}\n").as_bytes()).context("appending to metrics.jsonl")?;
        for (tag, v) in tags {
            events.scalar(tag, *v, step)?;
        }
        events.flush()?;
        Ok(())
    }
}

/// Whether `file` is empty or ends with a newline.
fn ends_with_newline(file: &mut std::fs::File) -> Result<bool> {
    use std::io::{Read, Seek, SeekFrom};
    if file.metadata()?.len() == 0 {
        return Ok(true);
    }
    file.seek(SeekFrom::End(-1))?;
    let mut last = [0u8; 1];
    file.read_exact(&mut last)?;
    Ok(last[0] == b'\n')
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A line cut by a kill is ended on reopening, so the resumed run's first line stays whole.
    #[test]
    fn a_cut_metrics_line_does_not_swallow_the_next() {
        let run = RunDir::new(std::env::temp_dir().join(format!("pg2-runlog-{}", std::process::id())));
        std::fs::create_dir_all(run.root()).unwrap();
        std::fs::write(run.metrics_path(), "{\"step\": 1, \"loss\": 2.0}\n{\"step\": 2, \"lo").unwrap();
        let mut log = RunLog::open(&run, "t", 2, 3, true).unwrap();
        let line = StepLine {
            step: 3,
            loss: 1.5,
            lr: 0.1,
            grad_norm: 1.0,
            examples_per_s: 1.0,
            skipped_steps: 0,
            data: DataCounts::default(),
        };
        log.step(&line).unwrap();
        let metrics = run.metrics().unwrap();
        assert_eq!(metrics.keys().copied().collect::<Vec<_>>(), [1, 3]);
        assert_eq!(metrics[&3]["loss"], 1.5);
        std::fs::remove_dir_all(run.root()).unwrap();
    }
}
