//! Numerical parity with Hugging Face transformers on the tiny random checkpoints of
//! `tests/fixtures/paligemma/` (written by `tests/fixtures/make_paligemma_fixtures.py`),
//! and with PEFT on the LoRA adapter of `tests/fixtures/lora/` (written by
//! `tests/fixtures/lora/make_lora_fixture.py`), through the library and the `pg2` binary.

use std::path::{Path, PathBuf};
use std::process::Command;

use pg2_data::{image, source, Batch, EncodedExample, PgTokenizer, Record};
use pg2_model::{
    checkpoint, generate, DecodeOptions, Lora, LoraConfig, PaliGemma, PaliGemmaConfig, Part, RunOptions, Weights,
};
use serde_json::Value;
use tch::{Device, Kind};

const CHECKPOINTS: [&str; 2] = ["released", "native"];

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/paligemma")
}

fn expected() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("expected.json")).unwrap()).unwrap()
}

fn records() -> Vec<Record> {
    source::read_jsonl(&fixtures().join("data.jsonl")).unwrap()
}

fn tokenizer() -> PgTokenizer {
    PgTokenizer::from_file(&fixtures().join("tokenizer.json")).unwrap()
}

fn load(name: &str, options: RunOptions) -> PaliGemma {
    PaliGemma::load(&fixtures().join(name), Device::Cpu, Kind::Float, options).unwrap()
}

/// Loads a checkpoint with an edited config.
fn load_with(name: &str, edit: impl FnOnce(&mut PaliGemmaConfig), options: RunOptions) -> PaliGemma {
    let dir = fixtures().join(name);
    let mut config = PaliGemmaConfig::from_file(&dir.join("config.json")).unwrap();
    edit(&mut config);
    let mut tensors = checkpoint::read_tensors(&dir).unwrap();
    tensors.remove(checkpoint::LM_HEAD);
    PaliGemma::new(config, Weights::from_tensors(tensors, name, Device::Cpu, Kind::Float), options).unwrap()
}

/// The records' inputs, with the exact pixels transformers saw (big_vision's default
/// preprocessing of the fixture script): JPEG decoders differ by a
/// level here and there (see `preprocessing_matches_the_reference_resize`), and these
/// random models amplify that; model parity is tested on identical pixels.
fn batch(name: &str, model: &PaliGemma, tok: &PgTokenizer, records: &[Record], with_suffix: bool) -> Batch {
    let res = model.config.vision.image_size as u32;
    let n_image = model.config.vision.num_patches();
    let examples: Vec<_> = records
        .iter()
        .map(|r| EncodedExample::new(tok, n_image, &r.prefix, if with_suffix { r.suffix.as_deref() } else { None }))
        .collect();
    let pixels: Vec<_> = records.iter().map(|r| reference_pixels(name, r)).collect();
    Batch::collate(&examples, Some(image::stack(&pixels, res)), tok.pad_id, Device::Cpu)
}

fn reference_pixels(name: &str, record: &Record) -> Vec<f32> {
    let file = record.image.path().unwrap().file_name().unwrap().to_str().unwrap();
    serde_json::from_value(expected()["checkpoints"][name]["pixels"][file].clone()).unwrap()
}

fn assert_close(got: f64, want: f64, rel: f64, what: &str) {
    assert!((got - want).abs() <= rel * want.abs().max(1.0), "{what}: got {got}, transformers {want}");
}

fn logprobs(name: &str, model: &PaliGemma, records: &[Record]) -> Vec<f64> {
    let b = batch(name, model, &tokenizer(), records, true);
    tch::no_grad(|| model.sequence_logprobs(&b.inputs, &b.loss_mask)).unwrap()
}

#[test]
fn layout_matches_the_processor_token_by_token() {
    let (tok, expected) = (tokenizer(), expected());
    for name in CHECKPOINTS {
        let config = PaliGemmaConfig::from_file(&fixtures().join(name).join("config.json")).unwrap();
        assert_eq!(tok.image_id, config.image_token_id);
        let want_records = expected["checkpoints"][name]["records"].as_array().unwrap();
        assert_eq!(records().len(), want_records.len(), "{name}: one expected entry per record");
        for (r, want) in records().iter().zip(want_records) {
            let example = EncodedExample::new(&tok, config.vision.num_patches(), &r.prefix, r.suffix.as_deref());
            let want_ids: Vec<i64> = serde_json::from_value(want["input_ids"].clone()).unwrap();
            assert_eq!(example.ids, want_ids, "{name}: {}", r.prefix);
            assert_eq!(example.num_targets() as u64, want["tokens"].as_u64().unwrap());
        }
    }
}

#[test]
fn preprocessing_matches_the_reference_resize() {
    let expected = expected();
    for name in CHECKPOINTS {
        let res = PaliGemmaConfig::from_file(&fixtures().join(name).join("config.json")).unwrap().vision.image_size;
        let want = |key: &str, file: &str| -> Vec<f32> {
            serde_json::from_value(expected["checkpoints"][name][key][file].clone()).unwrap()
        };
        // PNG decodes exactly; JPEG decoders (libjpeg-turbo under PIL, zune-jpeg here) may
        // differ by a level or two per pixel.
        for (file, tolerance) in [("a.png", 1e-4), ("b.png", 1e-4), ("c.jpg", 3.0 / 127.5)] {
            let img = image::load_rgb(&fixtures().join("images").join(file)).unwrap();
            for (key, antialias, tolerance) in [
                ("pixels", false, tolerance),
                // Antialiased at 16 bits here, in float by PIL: truncation may tip a level.
                ("antialiased_pixels", true, tolerance + 1.0 / 127.5),
            ] {
                let got = image::preprocess(&img, image::Resize { size: res as u32, antialias, pad_to_square: false });
                let want = want(key, file);
                assert_eq!(got.len(), want.len());
                let worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                assert!(worst < tolerance, "{name} {file} {key}: worst pixel difference {worst}");
            }
        }
    }
}

#[test]
fn logprobs_match_transformers_in_both_layouts() {
    let expected = expected();
    let records = records();
    for name in CHECKPOINTS {
        let model = load(name, RunOptions::default());
        // One batch of mixed lengths: padding must not change anything.
        let batched = logprobs(name, &model, &records);
        for (i, want) in expected["checkpoints"][name]["records"].as_array().unwrap().iter().enumerate() {
            let want = want["logprob"].as_f64().unwrap();
            assert_close(batched[i], want, 1e-4, &format!("{name} record {i}"));
            let alone = logprobs(name, &model, &records[i..i + 1])[0];
            assert_close(alone, batched[i], 1e-5, &format!("{name} record {i} alone vs batched"));
        }
    }
}

#[test]
fn each_soft_cap_is_applied_and_can_be_switched_off() {
    let expected = expected();
    let records = &records()[..1];
    for name in CHECKPOINTS {
        let uncapped = &expected["checkpoints"][name]["uncapped_logprob_0"];
        let model = load_with(name, |c| c.text.attn_logit_softcapping = None, RunOptions::default());
        let want = uncapped["attn_logit_softcapping"].as_f64().unwrap();
        assert_close(logprobs(name, &model, records)[0], want, 1e-4, &format!("{name} without attention cap"));
        let model = load_with(name, |c| c.text.final_logit_softcapping = None, RunOptions::default());
        let want = uncapped["final_logit_softcapping"].as_f64().unwrap();
        assert_close(logprobs(name, &model, records)[0], want, 1e-4, &format!("{name} without final cap"));
        // The run switch turns both off, whatever the config says.
        let switched =
            logprobs(name, &load(name, RunOptions { soft_caps: false, ..RunOptions::default() }), records)[0];
        let both_off = load_with(
            name,
            |c| (c.text.attn_logit_softcapping, c.text.final_logit_softcapping) = (None, None),
            RunOptions::default(),
        );
        assert_close(switched, logprobs(name, &both_off, records)[0], 1e-9, "soft-cap switch");
    }
}

#[test]
fn sliding_window_matches_transformers_when_asked_for() {
    let expected = &expected()["checkpoints"]["released"];
    let window = expected["window"].as_u64().unwrap() as usize;
    let records = &records()[..1];
    let windowed = RunOptions { sliding_window: true, ..RunOptions::default() };
    let model = load_with("released", |c| c.text.sliding_window = Some(window), windowed);
    assert_close(
        logprobs("released", &model, records)[0],
        expected["windowed_logprob_0"].as_f64().unwrap(),
        1e-4,
        "window",
    );
    // Off by default (big_vision): then the window changes nothing.
    let model = load_with("released", |c| c.text.sliding_window = Some(window), RunOptions::default());
    assert_close(
        logprobs("released", &model, records)[0],
        expected["records"][0]["logprob"].as_f64().unwrap(),
        1e-4,
        "no window",
    );
}

fn decode(name: &str, beam_size: usize) -> Vec<Vec<i64>> {
    let (tok, expected) = (tokenizer(), expected());
    let model = load(name, RunOptions::default());
    let b = batch(name, &model, &tok, &records(), false);
    let opts = DecodeOptions {
        max_new_tokens: expected["max_new_tokens"].as_u64().unwrap() as usize,
        beam_size,
        eos_id: tok.eos_id,
        pad_id: tok.pad_id,
    };
    generate(&model, &b.inputs, &opts).unwrap()
}

#[test]
fn greedy_decoding_matches_transformers() {
    let expected = expected();
    for name in CHECKPOINTS {
        let got = decode(name, 1);
        for (i, want) in expected["checkpoints"][name]["records"].as_array().unwrap().iter().enumerate() {
            let want: Vec<i64> = serde_json::from_value(want["greedy"].clone()).unwrap();
            assert_eq!(got[i], want, "{name} record {i}");
        }
    }
}

/// The expectations come from big_vision's search ported to Python over transformers'
/// model (`big_vision_beam` in the fixture script), not from transformers' own beam search.
#[test]
fn beam_search_matches_big_vision_s_over_transformers_model() {
    let expected = expected();
    let beams = expected["beams"].as_u64().unwrap() as usize;
    for name in CHECKPOINTS {
        let got = decode(name, beams);
        for (i, want) in expected["checkpoints"][name]["records"].as_array().unwrap().iter().enumerate() {
            let want: Vec<i64> = serde_json::from_value(want["beam"].clone()).unwrap();
            assert_eq!(got[i], want, "{name} record {i}");
        }
    }
}

fn pg2(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_pg2")).args(args).output().unwrap();
    assert!(out.status.success(), "pg2 {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn score_and_predict_commands_match_transformers() {
    let expected = expected();
    let data = fixtures().join("data.jsonl");
    for name in CHECKPOINTS {
        let dir = fixtures().join(name);
        let want = expected["checkpoints"][name]["records"].as_array().unwrap();
        let args =
            ["score", "--checkpoint", dir.to_str().unwrap(), "--data", data.to_str().unwrap(), "--batch-size", "3"];
        let lines: Vec<Value> = pg2(&args).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), want.len());
        // The binary decodes the images itself: exact for PNG, near for JPEG (see above).
        let is_png: Vec<bool> =
            records().iter().map(|r| r.image.path().unwrap().extension().unwrap() == "png").collect();
        for ((got, want), &png) in lines.iter().zip(want).zip(&is_png) {
            let tolerance = if png { 1e-4 } else { 0.05 };
            assert_close(got["logprob"].as_f64().unwrap(), want["logprob"].as_f64().unwrap(), tolerance, name);
            assert_eq!(got["tokens"], want["tokens"]);
        }
        let args =
            ["predict", "--checkpoint", dir.to_str().unwrap(), "--data", data.to_str().unwrap(), "--max-len", "8"];
        let lines: Vec<Value> = pg2(&args).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), want.len());
        for ((got, want), &png) in lines.iter().zip(want).zip(&is_png) {
            if png {
                assert_eq!(got["prediction"], want["prediction"], "{name}");
            }
        }
    }
}

#[test]
fn bf16_compute_stays_near_f32() {
    let records = records();
    let expected = expected();
    let model =
        PaliGemma::load(&fixtures().join("native"), Device::Cpu, Kind::BFloat16, RunOptions::default()).unwrap();
    for (i, got) in logprobs("native", &model, &records).iter().enumerate() {
        let want = expected["checkpoints"]["native"]["records"][i]["logprob"].as_f64().unwrap();
        // bf16 keeps 8 bits of mantissa; the summed log-prob drifts by a few percent at most.
        assert_close(*got, want, 0.1, &format!("bf16 record {i}"));
    }
}

#[test]
fn saved_model_reloads_identically_and_inspects() {
    let model = load("native", RunOptions::default());
    let dir = std::env::temp_dir().join(format!("pg2-parity-save-{}", std::process::id()));
    model.save(&dir, Kind::Float).unwrap();
    let names: Vec<String> = checkpoint::read_tensors(&dir).unwrap().into_keys().collect();
    assert!(
        names.iter().all(|n| n.starts_with("vision_tower.vision_model.")
            || n.starts_with("multi_modal_projector.linear.")
            || n.starts_with("language_model.model.")),
        "released layout: {names:?}"
    );
    let back = PaliGemma::load(&dir, Device::Cpu, Kind::Float, RunOptions::default()).unwrap();
    assert_eq!(model.parameters().len(), back.parameters().len());
    for ((n1, a), (n2, b)) in model.parameters().iter().zip(back.parameters()) {
        assert_eq!(n1, &n2);
        assert!(a.equal(&b), "{n1}");
    }
    let summary = pg2(&["inspect", "--checkpoint", dir.to_str().unwrap()]);
    assert!(summary.contains("Gemma 2 width 48, depth 2"), "{summary}");
    assert!(summary.contains("dtype       Float"), "{summary}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The PEFT adapter of `tests/fixtures/lora/` (for the `released` checkpoint) and PEFT's log-probs.
fn peft_adapter() -> (PathBuf, Value) {
    let dir = fixtures().join("../lora");
    let expected = serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    (dir.join("adapter"), expected)
}

fn load_adapted(lora: Lora) -> PaliGemma {
    let released = fixtures().join("released");
    PaliGemma::load_at(&released, None, Some(lora), Device::Cpu, Kind::Float, RunOptions::default()).unwrap()
}

#[test]
fn peft_adapter_gives_peft_s_logprobs() {
    let ((adapter, peft), fixture) = (peft_adapter(), expected());
    let model = load_adapted(Lora::read(&adapter).unwrap());
    let lora = model.lora().unwrap();
    assert_eq!((lora.rank, lora.alpha, lora.trained.as_slice()), (4, 8.0, &[Part::Projector][..]));
    for (i, got) in logprobs("released", &model, &records()).iter().enumerate() {
        let want = &peft["records"][i];
        assert_close(*got, want["logprob"].as_f64().unwrap(), 1e-4, &format!("record {i} with the adapter"));
        let base = fixture["checkpoints"]["released"]["records"][i]["logprob"].as_f64().unwrap();
        assert_close(want["base_logprob"].as_f64().unwrap(), base, 1e-6, "PEFT's base is the fixture");
    }
}

/// The names and shapes a pg2 LoRA run saves are PEFT's, and a PEFT adapter goes back out as it came in.
#[test]
fn saved_adapters_have_peft_s_names_and_shapes() {
    let (adapter, _) = peft_adapter();
    let shapes = |dir: &Path| -> Vec<(String, Vec<i64>)> {
        checkpoint::read_file(&dir.join("adapter_model.safetensors"))
            .unwrap()
            .into_iter()
            .map(|(n, t)| (n, t.size()))
            .collect()
    };
    let config = LoraConfig {
        rank: 4,
        alpha: 8.0,
        dropout: 0.0,
        targets: LoraConfig::default_targets(),
        trained: vec![Part::Projector],
    };
    let dir = std::env::temp_dir().join(format!("pg2-parity-lora-{}", std::process::id()));
    load_adapted(Lora::fresh(config)).save(&dir.join("fresh"), Kind::Float).unwrap();
    let mut want = shapes(&adapter);
    let mut got = shapes(&dir.join("fresh"));
    want.sort();
    got.sort();
    assert_eq!(got, want);
    let json = |dir: &Path| -> Value {
        serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap()).unwrap()
    };
    let (got, want) = (json(&dir.join("fresh")), json(&adapter));
    for key in ["peft_type", "r", "lora_alpha", "modules_to_save", "bias", "use_rslora", "use_dora"] {
        assert_eq!(got[key], want[key], "{key}");
    }
    // PEFT's own adapter, loaded and saved again: the same tensors.
    load_adapted(Lora::read(&adapter).unwrap()).save(&dir.join("again"), Kind::Float).unwrap();
    let again: std::collections::BTreeMap<_, _> =
        checkpoint::read_file(&dir.join("again/adapter_model.safetensors")).unwrap().into_iter().collect();
    for (name, t) in checkpoint::read_file(&adapter.join("adapter_model.safetensors")).unwrap() {
        assert!(again[&name].equal(&t), "{name}");
    }
    std::fs::remove_dir_all(dir).unwrap();
}

/// `pg2 merge` folds PEFT's adapter into the base; the plain folder scores as PEFT does, as
/// `pg2 score --adapter` does on the unmerged pair.
#[test]
fn merged_model_scores_as_the_unmerged_one() {
    let (adapter, expected) = peft_adapter();
    let released = fixtures().join("released");
    let out = std::env::temp_dir().join(format!("pg2-parity-merge-{}", std::process::id()));
    let path = |p: &Path| p.to_str().unwrap().to_string();
    pg2(&["merge", "--base", &path(&released), "--adapter", &path(&adapter), "--out", &path(&out)]);
    assert!(!out.join("adapter_config.json").exists() && out.join("config.json").is_file());
    let merged = PaliGemma::load(&out, Device::Cpu, Kind::Float, RunOptions::default()).unwrap();
    assert!(merged.lora().is_none());
    let got = logprobs("released", &merged, &records());
    for (i, got) in got.iter().enumerate() {
        assert_close(*got, expected["records"][i]["logprob"].as_f64().unwrap(), 1e-4, &format!("merged record {i}"));
    }
    let data = path(&fixtures().join("data.jsonl"));
    let score = |extra: &[&str]| -> Vec<f64> {
        let args = [&["score", "--data", data.as_str()][..], extra].concat();
        pg2(&args).lines().map(|l| serde_json::from_str::<Value>(l).unwrap()["logprob"].as_f64().unwrap()).collect()
    };
    let unmerged = score(&["--checkpoint", &path(&released), "--adapter", &path(&adapter)]);
    for (a, b) in unmerged.iter().zip(score(&["--checkpoint", &path(&out)])) {
        assert_close(b, *a, 1e-5, "pg2 score, merged vs --adapter");
    }
    std::fs::remove_dir_all(out).unwrap();
}
