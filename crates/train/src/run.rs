//! The training loop: one recipe, one run folder (see [`crate::run_dir`]).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Result};
use pg2_data::{synth, LoadedBatch, PgTokenizer, Pipeline};
use pg2_dist::Group;
use pg2_optim::Schedule;
use tch::Device;

use crate::checkpointer::Checkpointer;
use crate::evaluator::Evaluator;
use crate::input;
use crate::recipe::Recipe;
use crate::run_dir::{RunDir, TrainerState};
use crate::run_log::{DataCounts, RunLog, StepLine};
use crate::trainer::{build_model, load_model, training_options, Trainer};

/// How `launch` was asked to run a recipe.
#[derive(Debug, Clone)]
pub struct LaunchOptions {
    /// The run folder (default `runs/<recipe name>`).
    pub out: PathBuf,
    /// Continue from the run folder's latest checkpoint.
    pub resume: bool,
    /// Start over in a run folder that holds checkpoints.
    pub overwrite: bool,
    pub device: Device,
}

/// What a finished run reports.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainSummary {
    /// Loss of every logged step this process ran (each `train.log_every`-th and the last), in order.
    pub losses: Vec<f64>,
    /// The last checkpoint written (on ranks other than 0: the newest found at the end).
    pub checkpoint: PathBuf,
}

/// Runs the recipe to its last step (or from the latest checkpoint with `resume`) as one
/// worker of `group`: rank 0 prepares the run folder and writes logs, evaluations and
/// checkpoints (with sharded training each rank adds its optimizer share); every rank
/// reads its share of each batch and makes the same update from the averaged gradients,
/// so the weights stay identical.
pub fn train(recipe: &Recipe, resolved: &toml::Table, opts: &LaunchOptions, group: &mut Group) -> Result<TrainSummary> {
    let run = RunDir::new(&opts.out);
    let resume_from = prepare(&run, recipe, resolved, opts, group)?;
    let tokenizer = Arc::new(PgTokenizer::from_file(&recipe.data.tokenizer)?);
    let mut mixture = input::mixture(recipe)?;
    let (model, first_step) = match &resume_from {
        None => (build_model(recipe, &tokenizer, opts.device)?, 0),
        Some(dir) => {
            let state = TrainerState::read(dir)?;
            mixture.seek(state.position)?;
            if group.is_main() {
                eprintln!("launch: resuming from {} (step {})", dir.display(), state.step);
            }
            (load_model(recipe, &tokenizer, dir, opts.device, training_options(recipe))?, state.step)
        }
    };
    let t = &recipe.train;
    let total_steps = t.length().steps(mixture.total_records(), t.batch_size * t.grad_accumulation);
    let warmup_steps = t.warmup_fraction.map_or(t.warmup_steps, |f| (f * total_steps as f64).round() as u64);
    let schedule = Schedule { warmup_steps, total_steps, shape: t.schedule };
    let mut trainer = Trainer::new(model, recipe, schedule, first_step, tokenizer.text_ids(), group)?;
    if let Some(dir) = &resume_from {
        trainer.load_optimizer_state(dir)?;
    }
    let pipeline = Pipeline::start(
        mixture,
        tokenizer.clone(),
        input::pipeline_config(recipe, &trainer.model.config, group.rank(), group.world())?,
    )?;
    let evaluator =
        recipe.eval.as_ref().map(|spec| Evaluator::new(spec, &recipe.data, tokenizer.clone())).transpose()?;
    let checkpointer = Checkpointer::new(run.clone(), recipe);
    let mut log =
        RunLog::open(&run, recipe.name.as_deref().unwrap_or_default(), first_step, total_steps, group.is_main())?;
    let evaluate = |step: u64, trainer: &Trainer, group: &mut Group, log: &mut RunLog| -> Result<()> {
        let Some(evaluator) = &evaluator else { return Ok(()) };
        match log.suspend(|| trainer.with_whole_model(|model| evaluator.run(model, step, &run, group)))?? {
            Some(scores) => log.evaluation(step, &scores),
            None => Ok(()),
        }
    };
    if first_step == 0 {
        evaluate(0, &trainer, group, &mut log)?;
    }
    let (mut losses, mut last_checkpoint, mut counts) = (Vec::new(), None, DataCounts::default());
    let (mut window_start, mut window_examples) = (Instant::now(), 0usize);
    for _ in first_step..total_steps {
        let update =
            (0..t.grad_accumulation).map(|_| pipeline.next_batch()).collect::<Result<Vec<LoadedBatch>, _>>()?;
        add_counts(&mut counts, &update);
        let targets = trainer.update_targets(update[0].rank_targets, group)?;
        // The host reads the sum back only when this rank has no targets of its own.
        if update[0].rank_targets == 0 && targets.double_value(&[]) == 0.0 {
            let sources: Vec<String> = recipe.data.mixture.iter().map(|s| s.path.display().to_string()).collect();
            bail!(
                "update {}: none of its {} examples has a target token to train on: do the records of {} have a `suffix`?",
                trainer.steps_done() + 1,
                t.batch_size * t.grad_accumulation,
                sources.join(", ")
            );
        }
        let stats = trainer.step(&update.iter().map(|l| &l.batch).collect::<Vec<_>>(), &targets, group)?;
        let done = stats.step;
        window_examples += t.batch_size * t.grad_accumulation;
        // The first step too, so the logged curve starts from the starting weights' loss.
        let log_step = done == 1 || done.is_multiple_of(t.log_every) || done == total_steps;
        let eval_step = evaluator.as_ref().is_some_and(|e| e.due(done, total_steps));
        let checkpoint_step = checkpointer.due(done, total_steps);
        // Here, and only here, the host waits for the device: before anything is logged or saved.
        let skipped_steps =
            if log_step || eval_step || checkpoint_step { trainer.check_nonfinite(t.on_nonfinite)? } else { 0 };
        if log_step {
            let loss = stats.loss.double_value(&[]);
            let examples_per_s = window_examples as f64 / window_start.elapsed().as_secs_f64();
            let data = sum_counts(&counts, group)?;
            log.step(&StepLine {
                step: done,
                loss,
                lr: stats.lr,
                grad_norm: stats.grad_norm.double_value(&[]),
                examples_per_s,
                skipped_steps,
                data,
            })?;
            losses.push(loss);
            (window_start, window_examples) = (Instant::now(), 0);
        }
        if eval_step {
            evaluate(done, &trainer, group, &mut log)?;
        }
        log.advance(done);
        if checkpoint_step {
            let position = update.last().expect("an update has micro-batches").position.clone();
            let state = TrainerState { step: done, total_steps: Some(total_steps), position, seed: recipe.seed };
            if let Some(dir) = checkpointer.save(&trainer, &state, group)? {
                last_checkpoint = Some(dir);
            }
        }
    }
    log.finish();
    let checkpoint = match last_checkpoint {
        Some(dir) => dir,
        None => run.latest()?.unwrap_or_default(),
    };
    Ok(TrainSummary { losses, checkpoint })
}

/// Readies the run folder before anything is read (rank 0 writes, every rank checks): a
/// folder with checkpoints is continued with `resume`, cleared with `overwrite`, and else
/// left alone with an error; the resolved recipe and, once, the synthetic demo data are
/// written. Returns the checkpoint to resume from.
fn prepare(
    run: &RunDir,
    recipe: &Recipe,
    resolved: &toml::Table,
    opts: &LaunchOptions,
    group: &mut Group,
) -> Result<Option<PathBuf>> {
    let main = group.is_main();
    input::worker_batch(recipe, group.world())?; // before anything in the run folder changes
    if run.root().is_file() {
        bail!("{} is a file; --out needs a folder (a new one, or a run to --resume)", run.root().display());
    }
    let latest = run.latest()?;
    match (&latest, opts.resume, opts.overwrite) {
        (Some(_), false, false) => bail!(
            "{} already holds checkpoints: pass --resume to continue the run or --overwrite to start over",
            run.root().display()
        ),
        (Some(_), _, true) if main => run.clear()?,
        (None, true, _) if main => {
            eprintln!("launch: nothing to resume in {}; starting from step 0", run.root().display())
        }
        _ => {}
    }
    let missing = recipe.missing_sources();
    if !missing.is_empty() {
        bail!("the recipe's data is missing; nothing was trained:\n  {}", missing.join("\n  "));
    }
    if main {
        std::fs::create_dir_all(run.root())?;
        std::fs::write(run.recipe_path(), toml::to_string_pretty(resolved)?)?;
        if let Some(dir) = recipe.data.synth.as_ref().filter(|d| !d.exists()) {
            eprintln!("launch: writing the synthetic demo data to {} (once)", dir.display());
            synth::write_synth(dir, &synth::SynthOptions::default())?;
        }
    }
    // The other ranks read the data and checkpoints only once rank 0 has prepared them.
    group.barrier("setup")?;
    Ok(latest.filter(|_| opts.resume && !opts.overwrite))
}

/// Adds an update's pipeline counters to this rank's totals.
fn add_counts(counts: &mut DataCounts, update: &[LoadedBatch]) {
    for loaded in update {
        let s = &loaded.stats;
        counts.skipped_records += s.skipped as u64;
        counts.prefix_truncated += s.prefix_truncated as u64;
        counts.suffix_truncated += s.suffix_truncated as u64;
        counts.eos_dropped += s.eos_dropped as u64;
        counts.tokens += s.tokens.real as u64;
        counts.batch_tokens += s.tokens.padded as u64;
    }
}

/// Every rank's totals summed.
fn sum_counts(counts: &DataCounts, group: &mut Group) -> Result<DataCounts> {
    let c = counts;
    let all = [c.skipped_records, c.prefix_truncated, c.suffix_truncated, c.eos_dropped, c.tokens, c.batch_tokens];
    let sums = group.sum_scalars(&all.map(|x| x as f64))?;
    let [skipped_records, prefix_truncated, suffix_truncated, eos_dropped, tokens, batch_tokens] =
        [0, 1, 2, 3, 4, 5].map(|i| sums[i] as u64);
    Ok(DataCounts { skipped_records, prefix_truncated, suffix_truncated, eos_dropped, tokens, batch_tokens })
}
