//! `pg2 plan`: its activation estimate against the peak memory a step really adds on the
//! CPU, and its figures for the released sizes against the model-state arithmetic.

use std::process::Command;

fn pg2(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_pg2")).args(args).env("RUST_BACKTRACE", "0").output().unwrap();
    assert!(out.status.success(), "pg2 {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn activation_estimates_match_the_measured_peak_on_the_cpu() {
    for shape in ["tiny", "small"] {
        let out = pg2(&["plan", "--measure", shape]);
        let ratios: Vec<f64> =
            out.lines().filter_map(|l| l.split("(ratio ").nth(1)?.trim_end_matches(')').parse().ok()).collect();
        assert_eq!(ratios.len(), 3, "{out}");
        for ratio in ratios {
            assert!((0.75..1.3).contains(&ratio), "{shape}: measured / estimated {ratio}\n{out}");
        }
    }
}

#[test]
fn the_plan_for_10b_at_448_picks_the_cheapest_setting_that_fits() {
    let out =
        pg2(&["plan", "--size", "10", "--resolution", "448", "--batch", "1", "--gpus", "8", "--gpu-memory", "80"]);
    // 9.66B parameters: bf16 weights and gradients 19.3 GB each; f32 master and moments
    // 116 GB. Sharded, a GPU keeps an eighth of the master, moments and an f32 gradient
    // (4.8 GB): ZeRO-1 beside the whole bf16 gradient it accumulates, ZeRO-2 and 3 beside
    // the embedding's (1.8 GB) and a layer's (0.4 GB) that backward holds before their
    // buckets go. ZeRO-3 keeps an eighth of the layers' weights, the embeddings whole (1.8
    // GB) and two layers gathered.
    let row = |mode: &str| out.lines().find(|l| l.starts_with(mode)).unwrap_or_else(|| panic!("{out}")).to_string();
    assert!(row("none").contains("19.3     19.3     116.0"), "{out}");
    assert!(row("optimizer").contains("19.3     24.2      14.5"), "{out}");
    assert!(row("gradients").contains("19.3      7.1      14.5"), "{out}");
    assert!(row("full").contains("4.8      7.1      14.5"), "{out}");
    assert!(
        out.contains(
            "cheapest that fits in 90 % of 80 GB: train.sharding = \"optimizer\", model.lean_attention = true"
        ),
        "{out}"
    );
    let out =
        pg2(&["plan", "--size", "28", "--resolution", "448", "--batch", "1", "--gpus", "8", "--gpu-memory", "80"]);
    assert!(
        out.contains(
            "cheapest that fits in 90 % of 80 GB: train.sharding = \"full\", model.activation_checkpointing = true"
        ),
        "{out}"
    );
}

/// A recipe's text budget sizes the plan's sequence: VQAv2's `text_len` 32 is 33 text tokens
/// (`<bos>` to `<eos>`), of which at most 31 are targets (the prompt keeps its "\n").
#[test]
fn the_plan_of_a_recipe_reads_its_text_budget() {
    let recipe = concat!(env!("CARGO_MANIFEST_DIR"), "/../../recipes/transfer/vqav2.toml");
    let out = pg2(&["plan", "--recipe", recipe, "--gpus", "8", "--set", "model.init=\"paligemma2-3b\""]);
    assert!(out.contains("micro-batches of 32 x (256 image + 33 text tokens), 31 target tokens each"), "{out}");
}
