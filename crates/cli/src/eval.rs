//! `pg2 eval`: evaluates a checkpoint with a recipe's `[eval]` block.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use pg2_train::Recipe;

#[derive(Args)]
pub struct EvalArgs {
    /// A model folder, or a run folder (its checkpoints/latest).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// A LoRA adapter folder (PEFT's format, e.g. a LoRA run's checkpoint, or the run folder)
    /// to put on the checkpoint, held as the recipe's `lora.base_dtype` says.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// The recipe whose [eval] block (and model settings) to use.
    #[arg(long)]
    pub recipe: PathBuf,
    /// Override a recipe key (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Where the predictions go.
    #[arg(long, default_value = ".")]
    pub out: PathBuf,
    #[arg(long, default_value = "auto")]
    pub device: String,
}

/// Prints the scores as JSON and writes the predictions to OUT/eval/step-NNNNNN.jsonl.
pub fn run(args: &EvalArgs) -> Result<()> {
    let (recipe, _) = Recipe::load(&args.recipe, &args.overrides)?;
    let device = crate::device::prepare_device(&args.device)?;
    let adapter = args.adapter.as_deref();
    let scores = pg2_train::evaluate_checkpoint(&recipe, &args.checkpoint, adapter, device, &args.out)?;
    println!("{}", serde_json::Value::Object(scores));
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::merge::MergeArgs;
    use crate::model_args::DtypeArg;

    /// `--adapter` evaluates the checkpoint with the adapter on it: the predictions are those
    /// of the model `pg2 merge` makes of the two (the PEFT fixture adapter on its base).
    #[test]
    fn an_adapter_on_the_checkpoint_predicts_as_the_merged_model() {
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
        let (base, adapter) = (fixtures.join("paligemma/released"), fixtures.join("lora/adapter"));
        let dir = std::env::temp_dir().join(format!("pg2-eval-adapter-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // The fixture's records, their suffixes as the answers `exact` reads.
        let records = std::fs::read_to_string(fixtures.join("paligemma/data.jsonl")).unwrap();
        let records: String = records
            .lines()
            .map(|line| {
                let mut r: serde_json::Value = serde_json::from_str(line).unwrap();
                r["image"] = fixtures.join("paligemma").join(r["image"].as_str().unwrap()).to_string_lossy().into();
                r["answers"] = serde_json::json!([r["suffix"]]);
                format!("{r}\n")
            })
            .collect();
        let data = dir.join("data.jsonl");
        std::fs::write(&data, records).unwrap();
        let recipe = format!(
            "[model]\ninit = {base:?}\nresolution = 28\n[data]\ntokenizer = {:?}\nmixture = [{{ path = {data:?}, \
             weight = 1.0 }}]\n[train]\nsteps = 1\nbatch_size = 1\nlr = 1e-3\n[eval]\ndata = {data:?}\nmetric = \
             \"exact\"\nmax_len = 6\n",
            fixtures.join("paligemma/tokenizer.json")
        );
        std::fs::write(dir.join("recipe.toml"), recipe).unwrap();
        let merged = dir.join("merged");
        let merge =
            MergeArgs { base: base.clone(), adapter: adapter.clone(), out: merged.clone(), dtype: DtypeArg::F32 };
        crate::merge::run(&merge).unwrap();
        let predictions = |checkpoint: &Path, adapter: Option<&Path>, out: &str| {
            let args = EvalArgs {
                checkpoint: checkpoint.to_path_buf(),
                adapter: adapter.map(Path::to_path_buf),
                recipe: dir.join("recipe.toml"),
                overrides: vec![],
                out: dir.join(out),
                device: "cpu".into(),
            };
            run(&args).unwrap();
            std::fs::read_to_string(dir.join(out).join("eval/step-000000.jsonl")).unwrap()
        };
        let adapted = predictions(&base, Some(&adapter), "adapted");
        assert_eq!(adapted, predictions(&merged, None, "merged"));
        assert_ne!(adapted, predictions(&base, None, "base"), "the adapter changes the predictions");
        let err = run(&EvalArgs {
            checkpoint: adapter.clone(),
            adapter: Some(adapter),
            recipe: dir.join("recipe.toml"),
            overrides: vec![],
            out: dir.join("twice"),
            device: "cpu".into(),
        })
        .unwrap_err();
        assert!(err.to_string().contains("is an adapter folder"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
