//! `pg2 inspect`: a checkpoint's configuration, parameter counts per part and dtype.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use pg2_model::{checkpoint, PaliGemmaConfig, Part};

#[derive(Args)]
pub struct InspectArgs {
    /// A Hugging Face model folder (config.json + safetensors), or a run folder (its
    /// checkpoints/latest).
    #[arg(long)]
    pub checkpoint: PathBuf,
}

pub fn run(args: &InspectArgs) -> Result<()> {
    let dir = pg2_train::checkpoint_dir(&args.checkpoint)?;
    let config = PaliGemmaConfig::from_file(&dir.join("config.json"))?;
    let tensors = checkpoint::read_tensors(&dir)?;
    let (t, v) = (&config.text, &config.vision);
    println!("checkpoint  {}", dir.display());
    println!(
        "vision      SigLIP {}px /{} patches ({} tokens), width {}, depth {}, MLP {}, {} heads",
        v.image_size,
        v.patch_size,
        v.num_patches(),
        v.hidden_size,
        v.num_hidden_layers,
        v.intermediate_size,
        v.num_attention_heads
    );
    println!(
        "decoder     Gemma 2 width {}, depth {}, MLP {}, {} heads / {} KV heads of {}, query scale 1/sqrt({})",
        t.hidden_size,
        t.num_hidden_layers,
        t.intermediate_size,
        t.num_attention_heads,
        t.num_key_value_heads,
        t.head_dim,
        t.query_pre_attn_scalar
    );
    println!(
        "            vocab {}, soft-caps attention {:?} final {:?}, rope theta {}, window {:?} (off unless asked)",
        t.vocab_size, t.attn_logit_softcapping, t.final_logit_softcapping, t.rope_theta, t.sliding_window
    );
    let mut counts = Part::ALL.map(|part| (part, 0i64));
    let mut kinds = std::collections::BTreeSet::new();
    for (name, tensor) in &tensors {
        if let Some(count) = counts.iter_mut().find(|(part, _)| Part::of(name) == Some(*part)) {
            count.1 += tensor.numel() as i64;
        }
        kinds.insert(format!("{:?}", tensor.kind()));
    }
    for (part, n) in counts {
        println!("params      {:<10} {n:>15} ({:.3}B)", part.name(), n as f64 / 1e9);
    }
    let total: i64 = counts.iter().map(|c| c.1).sum();
    println!("params      {:<10} {total:>15} ({:.3}B)", "total", total as f64 / 1e9);
    println!("dtype       {}", kinds.into_iter().collect::<Vec<_>>().join(", "));
    Ok(())
}
