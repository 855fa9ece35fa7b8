//! Each metric against the reference scorers' values on `tests/fixtures/metrics/` (written by
//! `make_metric_fixtures.py`: pycocoevalcap for the caption metrics and its tokeniser, the
//! official VQA evaluation's logic, the RRC ANLS rule, pix2struct's relaxed accuracy).

use std::path::PathBuf;

use pg2_eval::{anls, caption, ptb, qa, refcoco, score, score_file, EvalError, Metric};
use serde_json::{json, Value};

/// The reference scorers compute in f64 too; only summation order differs.
const TOL: f64 = 1e-9;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/metrics")
}

fn expected() -> Value {
    let text = std::fs::read_to_string(fixtures().join("expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn examples(name: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(fixtures().join(name)).unwrap();
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn assert_close(got: &[f64], want: &[f64], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (k, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= TOL, "{what}[{k}]: got {g}, want {w}");
    }
}

fn file_score(metric: Metric, file: &str, key: &str) -> f64 {
    score_file(metric, &fixtures().join(file)).unwrap()[key]
        .as_f64()
        .unwrap()
}

/// `(prediction, answers)` of a QA fixture file.
fn qa_pairs(name: &str) -> Vec<(String, Vec<String>)> {
    let strings = |v: &Value| {
        v.as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_string())
            .collect()
    };
    examples(name)
        .iter()
        .map(|e| {
            (
                e["prediction"].as_str().unwrap().to_string(),
                strings(&e["answers"]),
            )
        })
        .collect()
}

fn check_qa(name: &str, metric: Metric, f: fn(&str, &[&str]) -> f64) {
    let want = &expected()[metric.name()];
    let got: Vec<f64> = qa_pairs(name)
        .iter()
        .map(|(p, a)| f(p, &a.iter().map(String::as_str).collect::<Vec<_>>()))
        .collect();
    assert_close(&got, &floats(&want["per_example"]), metric.name());
    let corpus = file_score(metric, name, metric.name());
    assert_close(&[corpus], &[want["score"].as_f64().unwrap()], metric.name());
}

#[test]
fn ptb_tokenizer_matches_corenlp_on_probe_sentences() {
    let mismatches: Vec<String> = expected()["ptb"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|case| {
            let (text, want) = (
                case["text"].as_str().unwrap(),
                case["tokens"].as_str().unwrap(),
            );
            let got = ptb::tokenize(text).join(" ");
            (got != want).then(|| format!("{text:?}: got {got:?}, want {want:?}"))
        })
        .collect();
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
}

#[test]
fn cider_matches_pycocoevalcap() {
    let want = &expected()["cider"];
    let items: Vec<(String, Vec<String>)> = examples("captions.jsonl")
        .iter()
        .map(|e| {
            let refs = e["references"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r.as_str().unwrap().to_string())
                .collect();
            (e["prediction"].as_str().unwrap().to_string(), refs)
        })
        .collect();
    let borrowed: Vec<(&str, Vec<&str>)> = items
        .iter()
        .map(|(p, r)| (p.as_str(), r.iter().map(String::as_str).collect()))
        .collect();
    assert_close(
        &caption::cider(&borrowed),
        &floats(&want["per_example"]),
        "cider",
    );
    let corpus = file_score(Metric::Cider, "captions.jsonl", "cider");
    assert_close(&[corpus], &[want["score"].as_f64().unwrap()], "cider");
}

#[test]
fn bleu_matches_pycocoevalcap() {
    let out = score_file(Metric::Bleu4, &fixtures().join("captions.jsonl")).unwrap();
    let got: Vec<f64> = ["bleu1", "bleu2", "bleu3", "bleu4"]
        .iter()
        .map(|k| out[*k].as_f64().unwrap())
        .collect();
    assert_close(&got, &floats(&expected()["bleu"]["score"]), "bleu");
    assert_eq!(out["n"], 10);
}

#[test]
fn vqa_matches_official_evaluation() {
    check_qa("vqa.jsonl", Metric::Vqa, qa::vqa_accuracy);
}

#[test]
fn anls_matches_rrc_rule() {
    check_qa("anls.jsonl", Metric::Anls, anls::anls);
}

#[test]
fn relaxed_matches_pix2struct() {
    check_qa("relaxed.jsonl", Metric::Relaxed, qa::relaxed_accuracy);
}

#[test]
fn exact_match() {
    check_qa("exact.jsonl", Metric::Exact, qa::exact_match);
}

#[test]
fn refcoco_iou_and_accuracy() {
    let want = &expected()["refcoco"];
    let got: Vec<f64> = examples("refcoco.jsonl")
        .iter()
        .map(|e| {
            let b: Vec<f64> = floats(&e["boxes"][0]);
            let reference = refcoco::Box::from_yxyx([b[0], b[1], b[2], b[3]]);
            let (w, h) = (e["width"].as_f64().unwrap(), e["height"].as_f64().unwrap());
            refcoco::prediction_iou(e["prediction"].as_str().unwrap(), reference, w, h)
        })
        .collect();
    assert_close(&got, &floats(&want["per_example"]), "refcoco iou");
    let out = score_file(Metric::RefCoco, &fixtures().join("refcoco.jsonl")).unwrap();
    assert_close(
        &[out["accuracy"].as_f64().unwrap()],
        &[want["accuracy"].as_f64().unwrap()],
        "accuracy",
    );
    assert_close(
        &[out["mean_iou"].as_f64().unwrap()],
        &[want["mean_iou"].as_f64().unwrap()],
        "mean_iou",
    );
}

/// Hand-computed cases, with the reasoning the expected values rest on.
#[test]
fn hand_computed_cases() {
    // ANLS: "abcd" vs "abxy" is 2 edits over 4 characters, similarity exactly 0.5: kept.
    assert_eq!(anls::anls("abcd", &["abxy"]), 0.5);
    // 3 edits over 5: 0.4 < 0.5 counts 0; the best answer wins.
    assert_eq!(anls::anls("abcde", &["abxyz"]), 0.0);
    assert_eq!(anls::anls(" ABC ", &["zzz", "abc"]), 1.0);
    // Relaxed: 5% relative error is in, 5.5% out; percentages divide by 100.
    assert_eq!(qa::relaxed_accuracy("105", &["100"]), 1.0);
    assert_eq!(qa::relaxed_accuracy("94.5", &["100"]), 0.0);
    assert_eq!(qa::relaxed_accuracy("12%", &["0.12"]), 1.0);
    // A zero target falls back to string comparison (pix2struct tests `if target_float`).
    assert_eq!(qa::relaxed_accuracy("0.0", &["0"]), 0.0);
    // VQA: 2 of 10 annotators agree: 8 subsets hold both (2/3), 2 hold one (1/3) -> 0.6.
    let answers = ["2", "2", "x", "x", "x", "x", "x", "x", "x", "x"];
    assert!((qa::vqa_accuracy("two", &answers) - 0.6).abs() < 1e-12);
    assert_eq!(qa::normalize_vqa("The Two dogs."), "2 dogs");
    // RefCOCO: <loc1023> is the far edge; tokens past the fourth are ignored.
    let b = refcoco::parse_box(
        "<loc0000><loc0000><loc1023><loc0511><loc0001>",
        200.0,
        100.0,
    )
    .unwrap();
    assert_eq!((b.y2, b.x2), (100.0, 511.0 / 1023.0 * 200.0));
}

#[test]
fn empty_prediction_scores_zero() {
    let caption = json!({"prediction": "", "references": ["a dog", "a cat"]});
    let other = json!({"prediction": "a dog", "references": ["a dog", "a bird"]});
    assert_eq!(
        caption::cider(&[
            ("", vec!["a dog", "a cat"]),
            ("a dog", vec!["a dog", "a bird"])
        ])[0],
        0.0
    );
    assert_eq!(score(Metric::Cider, &[caption, other]).unwrap()["n"], 2);
    assert_eq!(anls::anls("", &["x"]), 0.0);
    assert_eq!(
        refcoco::prediction_iou("", refcoco::Box::from_yxyx([0.0, 0.0, 1.0, 1.0]), 1.0, 1.0),
        0.0
    );
}

#[test]
fn metric_names_round_trip() {
    for (metric, name) in Metric::ALL {
        assert_eq!(name.parse::<Metric>().unwrap(), metric);
        assert_eq!(metric.to_string(), name);
    }
    assert!(matches!(
        "ciderd".parse::<Metric>(),
        Err(EvalError::UnknownMetric(_))
    ));
}

#[test]
fn errors_name_the_example_and_field() {
    let examples = [
        json!({"prediction": "a", "answers": ["a"]}),
        json!({"prediction": "b"}),
    ];
    let err = score(Metric::Vqa, &examples).unwrap_err().to_string();
    assert_eq!(err, "example 1: field `answers` is missing");
    let err = score(
        Metric::RefCoco,
        &[json!({"prediction": "", "boxes": [[1, 2, 3]], "width": 1, "height": 1})],
    );
    assert!(err.unwrap_err().to_string().contains("field `boxes`"));
    assert!(matches!(score(Metric::Exact, &[]), Err(EvalError::Empty)));
}

#[test]
fn file_errors_name_file_and_line() {
    let dir = std::env::temp_dir().join(format!("pg2-eval-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bad.jsonl");
    std::fs::write(&path, "{\"prediction\": \"a\", \"answers\": [\"a\"]}\n\n{\"prediction\": 3, \"answers\": [\"a\"]}\n")
        .unwrap();
    let err = score_file(Metric::Exact, &path).unwrap_err().to_string();
    assert_eq!(
        err,
        format!("{}:3: field `prediction` is not a string", path.display())
    );
    std::fs::write(&path, "{not json\n").unwrap();
    assert!(score_file(Metric::Exact, &path)
        .unwrap_err()
        .to_string()
        .starts_with(&format!("{}:1: ", path.display())));
    std::fs::remove_dir_all(&dir).unwrap();
}
