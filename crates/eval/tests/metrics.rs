//! Each metric against the reference scorers' values on `tests/fixtures/metrics/` (written by
//! `make_metric_fixtures.py`: pycocoevalcap for the caption metrics and its tokeniser, the
//! official VQA evaluation's logic, the RRC ANLS rule, pix2struct's relaxed accuracy,
//! PubTabNet's TEDS class, HierText's end-to-end matching).

use std::path::PathBuf;

use pg2_eval::ocr::{self, Counts, Word};
use pg2_eval::{anls, caption, ptb, qa, refcoco, score, score_file, teds, EvalError, Metric};
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
    text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

fn assert_close(got: &[f64], want: &[f64], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (k, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= TOL, "{what}[{k}]: got {g}, want {w}");
    }
}

fn file_score(metric: Metric, file: &str, key: &str) -> f64 {
    score_file(metric, &fixtures().join(file), None).unwrap()[key].as_f64().unwrap()
}

/// `(prediction, answers)` of a QA fixture file.
fn qa_pairs(name: &str) -> Vec<(String, Vec<String>)> {
    let strings = |v: &Value| v.as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_string()).collect();
    examples(name).iter().map(|e| (e["prediction"].as_str().unwrap().to_string(), strings(&e["answers"]))).collect()
}

fn check_qa(name: &str, metric: Metric, f: fn(&str, &[&str]) -> f64) {
    let want = &expected()[metric.name()];
    let got: Vec<f64> =
        qa_pairs(name).iter().map(|(p, a)| f(p, &a.iter().map(String::as_str).collect::<Vec<_>>())).collect();
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
            let (text, want) = (case["text"].as_str().unwrap(), case["tokens"].as_str().unwrap());
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
            let refs = e["references"].as_array().unwrap().iter().map(|r| r.as_str().unwrap().to_string()).collect();
            (e["prediction"].as_str().unwrap().to_string(), refs)
        })
        .collect();
    let borrowed: Vec<(&str, Vec<&str>)> =
        items.iter().map(|(p, r)| (p.as_str(), r.iter().map(String::as_str).collect())).collect();
    assert_close(&caption::cider(&borrowed), &floats(&want["per_example"]), "cider");
    let corpus = file_score(Metric::Cider, "captions.jsonl", "cider");
    assert_close(&[corpus], &[want["score"].as_f64().unwrap()], "cider");
}

#[test]
fn bleu_matches_pycocoevalcap() {
    let out = score_file(Metric::Bleu4, &fixtures().join("captions.jsonl"), None).unwrap();
    let got: Vec<f64> = ["bleu1", "bleu2", "bleu3", "bleu4"].iter().map(|k| out[*k].as_f64().unwrap()).collect();
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
fn exact_match_keeping_case() {
    check_qa("exact.jsonl", Metric::ExactCased, qa::exact_match_cased);
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
    let out = score_file(Metric::RefCoco, &fixtures().join("refcoco.jsonl"), None).unwrap();
    assert_close(&[out["accuracy"].as_f64().unwrap()], &[want["accuracy"].as_f64().unwrap()], "accuracy");
    assert_close(&[out["mean_iou"].as_f64().unwrap()], &[want["mean_iou"].as_f64().unwrap()], "mean_iou");
}

fn check_teds(metric: Metric, structure_only: bool) {
    let want = &expected()[metric.name()];
    let got: Vec<f64> = examples("teds.jsonl")
        .iter()
        .map(|e| {
            let reference = teds::Table::parse(e["html"].as_str().unwrap()).unwrap();
            teds::teds(e["prediction"].as_str().unwrap(), &reference, structure_only)
        })
        .collect();
    assert_close(&got, &floats(&want["per_example"]), metric.name());
    let corpus = file_score(metric, "teds.jsonl", metric.name());
    assert_close(&[corpus], &[want["score"].as_f64().unwrap()], metric.name());
}

#[test]
fn teds_matches_pubtabnet() {
    check_teds(Metric::Teds, false);
}

#[test]
fn teds_struct_matches_pubtabnet() {
    check_teds(Metric::TedsStruct, true);
}

#[test]
fn ocr_f1_matches_hiertext_matching() {
    let want = &expected()["ocr_f1"];
    for (k, e) in examples("ocr.jsonl").iter().enumerate() {
        let (w, h) = (e["width"].as_f64().unwrap(), e["height"].as_f64().unwrap());
        let predictions = ocr::parse_prediction(e["prediction"].as_str().unwrap(), w, h);
        let references: Vec<Word> = e["words"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                let b = floats(&r["box"]);
                Word {
                    text: r["text"].as_str().unwrap(),
                    bbox: Some(refcoco::Box::from_yxyx([b[0], b[1], b[2], b[3]])),
                }
            })
            .collect();
        let c = Counts::of(&predictions, &references);
        let counts = [c.matches, c.predictions, c.references].map(|n| n as f64);
        assert_close(&counts, &floats(&want["per_example"][k]), "ocr counts");
    }
    for key in ["precision", "recall", "f1"] {
        let got = file_score(Metric::OcrF1, "ocr.jsonl", key);
        assert_close(&[got], &[want[key].as_f64().unwrap()], key);
    }
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
    let b = refcoco::parse_box("<loc0000><loc0000><loc1023><loc0511><loc0001>", 200.0, 100.0).unwrap();
    assert_eq!((b.y2, b.x2), (100.0, 511.0 / 1023.0 * 200.0));
}

/// TEDS = 1 - TED / n, n the elements below `<table>` of the larger table.
#[test]
fn teds_hand_computed_cases() {
    let t = |body: &str| format!("<table>{body}</table>");
    let score = |pred: &str, reference: &str, structure_only: bool| {
        teds::teds(&t(pred), &teds::Table::parse(&t(reference)).unwrap(), structure_only)
    };
    let both = |pred: &str, reference: &str| (score(pred, reference, false), score(pred, reference, true));
    // Empty prediction table: insert tr and td (2) over n = 2.
    assert_eq!(both("", "<tr><td>a</td></tr>"), (0.0, 0.0));
    // Two empty tables are identical (the official code divides by zero).
    assert_eq!(both("", ""), (1.0, 1.0));
    // A colspan mismatch renames the cell (1) over n = 2, in both variants.
    assert_eq!(both("<tr><td colspan=\"2\">a</td></tr>", "<tr><td>a</td></tr>"), (0.5, 0.5));
    // A missing cell: one insertion over n = 3.
    let (content, structure) = both("<tr><td>a</td></tr>", "<tr><td>a</td><td>b</td></tr>");
    assert!((content - 2.0 / 3.0).abs() < 1e-12 && (structure - 2.0 / 3.0).abs() < 1e-12);
    // One character of two differs: rename costs 1/2, over n = 2; S-TEDS ignores it.
    assert_eq!(both("<tr><td>ab</td></tr>", "<tr><td>ac</td></tr>"), (0.75, 1.0));
    // `<b>` inside a cell is content (tokens <b> a </b> against a: 2/3) and counts in n (3).
    let (content, structure) = both("<tr><td><b>a</b></td></tr>", "<tr><td>a</td></tr>");
    assert!((content - (1.0 - 2.0 / 9.0)).abs() < 1e-12 && structure == 1.0);
    // Unclosed cells and rows close as libxml2 closes them.
    assert_eq!(both("<tr><td>a<td>b<tr><td>c", "<tr><td>a</td><td>b</td></tr><tr><td>c</td></tr>"), (1.0, 1.0));
    // No table at all scores 0.
    let reference = teds::Table::parse(&t("<tr><td>a</td></tr>")).unwrap();
    assert_eq!(teds::teds("<div>a</div>", &reference, false), 0.0);
}

/// HierText's matching: mutually best IoU >= 0.5, then exact text; each word matches once.
#[test]
fn ocr_hand_computed_cases() {
    let word = |text, b: [f64; 4]| Word { text, bbox: Some(refcoco::Box::from_yxyx(b)) };
    let hello = word("Hello", [0.0, 0.0, 10.0, 50.0]);
    let counts = |p: &[Word], r: &[Word]| {
        let c = Counts::of(p, r);
        (c.matches, c.predictions, c.references)
    };
    // No predictions: precision 1 (nothing wrong was said), recall 0, F1 0.
    assert_eq!(counts(&[], &[hello]), (0, 0, 1));
    assert_eq!(Counts::of(&[], &[hello]).scores(), (1.0, 0.0, 0.0));
    // Nothing to read and nothing read: all 1.
    assert_eq!(Counts::default().scores(), (1.0, 1.0, 1.0));
    // A duplicate matches nothing: p = 1/2, r = 1, F1 = 2/3.
    let c = Counts::of(&[hello, hello], &[hello]);
    assert_eq!((c.matches, c.predictions), (1, 2));
    let (p, r, f1) = c.scores();
    assert!(p == 0.5 && r == 1.0 && (f1 - 2.0 / 3.0).abs() < 1e-12);
    // Right box, wrong text (case counts): no match.
    assert_eq!(counts(&[word("hello", [0.0, 0.0, 10.0, 50.0])], &[hello]).0, 0);
    // Right text, box IoU 0.4 < 0.5: no match.
    assert_eq!(counts(&[word("Hello", [0.0, 0.0, 10.0, 20.0])], &[hello]).0, 0);
    // A wrong-text prediction with the best box takes the word from a right-text one (IoU 0.8).
    let near = word("Hello", [0.0, 0.0, 10.0, 40.0]);
    assert_eq!(counts(&[word("Hallo", [0.0, 0.0, 10.0, 50.0]), near], &[hello]).0, 0);
    assert_eq!(counts(&[near], &[hello]).0, 1);
    // Parsing: loc tokens map to pixels; a segment without a box is a word that cannot match.
    let words = ocr::parse_prediction("<loc0000><loc0000><loc1023><loc0511> a b ; stray", 200.0, 100.0);
    assert_eq!(words.len(), 2);
    assert_eq!(words[0].text, "a b");
    assert_eq!(words[0].bbox, Some(refcoco::Box::from_yxyx([0.0, 0.0, 100.0, 511.0 / 1023.0 * 200.0])));
    assert_eq!(words[1], Word { text: "stray", bbox: None });
    assert!(ocr::parse_prediction("", 1.0, 1.0).is_empty());
}

#[test]
fn empty_prediction_scores_zero() {
    let caption = json!({"prediction": "", "references": ["a dog", "a cat"]});
    let other = json!({"prediction": "a dog", "references": ["a dog", "a bird"]});
    assert_eq!(caption::cider(&[("", vec!["a dog", "a cat"]), ("a dog", vec!["a dog", "a bird"])])[0], 0.0);
    assert_eq!(score(Metric::Cider, &[caption, other]).unwrap()["n"], 2);
    assert_eq!(anls::anls("", &["x"]), 0.0);
    assert_eq!(refcoco::prediction_iou("", refcoco::Box::from_yxyx([0.0, 0.0, 1.0, 1.0]), 1.0, 1.0), 0.0);
}

#[test]
fn metric_names_round_trip() {
    for (metric, name) in Metric::ALL {
        assert_eq!(name.parse::<Metric>().unwrap(), metric);
        assert_eq!(metric.to_string(), name);
    }
    let err = "ciderd".parse::<Metric>().unwrap_err();
    assert!(matches!(err, EvalError::UnknownMetric(_)));
    assert!(
        err.to_string().ends_with("exact_cased, tallyqa, scienceqa, refcoco, refcoco_seg, teds, teds_struct, ocr_f1)"),
        "{err}"
    );
}

#[test]
fn errors_name_the_example_and_field() {
    let examples = [json!({"prediction": "a", "answers": ["a"]}), json!({"prediction": "b"})];
    let err = score(Metric::Vqa, &examples).unwrap_err().to_string();
    assert_eq!(err, "example 1: field `answers` is missing");
    let err = score(Metric::RefCoco, &[json!({"prediction": "", "boxes": [[1, 2, 3]], "width": 1, "height": 1})]);
    assert!(err.unwrap_err().to_string().contains("field `boxes`"));
    let err = score(Metric::Teds, &[json!({"prediction": "", "html": "<p>no table</p>"})]);
    assert_eq!(err.unwrap_err().to_string(), "example 0: field `html` holds no <table>");
    let err = score(Metric::OcrF1, &[json!({"prediction": "", "words": [{"text": "a"}], "width": 1, "height": 1})]);
    assert!(err.unwrap_err().to_string().contains("field `words`"));
    assert!(matches!(score(Metric::Exact, &[]), Err(EvalError::Empty)));
}

#[test]
fn file_errors_name_file_and_line() {
    let dir = std::env::temp_dir().join(format!("pg2-eval-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bad.jsonl");
    std::fs::write(
        &path,
        "{\"prediction\": \"a\", \"answers\": [\"a\"]}\n\n{\"prediction\": 3, \"answers\": [\"a\"]}\n",
    )
    .unwrap();
    let err = score_file(Metric::Exact, &path, None).unwrap_err().to_string();
    assert_eq!(err, format!("{}:3: field `prediction` is not a string", path.display()));
    std::fs::write(&path, "{not json\n").unwrap();
    assert!(score_file(Metric::Exact, &path, None)
        .unwrap_err()
        .to_string()
        .starts_with(&format!("{}:1: ", path.display())));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// big_vision's TallyQA evaluator (`evaluators/proj/paligemma/transfers/tallyqa.py`): the whole
/// prediction and answer go through `_number_word_to_numeral` (a dict lookup of the
/// lower-cased string, words up to "twenty"), then `==`.
#[test]
fn tallyqa_maps_number_words_as_big_vision() {
    let cases: [(&str, &str, f64); 10] = [
        ("2", "2", 1.0),
        ("two", "2", 1.0),
        ("Two", "2", 1.0),
        ("TWENTY", "20", 1.0),
        ("none", "0", 1.0),
        ("zero", "none", 1.0),
        ("twenty-one", "21", 0.0), // not in big_vision's table
        ("two apples", "2", 0.0),  // only whole strings are mapped
        (" 2", "2", 0.0),          // nothing is trimmed
        ("3", "2", 0.0),
    ];
    for (prediction, answer, want) in cases {
        assert_eq!(qa::tallyqa_accuracy(prediction, &[answer]), want, "{prediction:?} vs {answer:?}");
    }
    let examples = [json!({"prediction": "Two", "answers": ["2"]}), json!({"prediction": "4", "answers": ["5"]})];
    let out = score(Metric::TallyQa, &examples).unwrap();
    assert_eq!((out["tallyqa"].as_f64(), &out["n"]), (Some(0.5), &json!(2)));
    // `exact` (case ignored) does not map number words.
    assert_eq!(score(Metric::Exact, &examples).unwrap()["exact"].as_f64(), Some(0.0));
}

/// big_vision's ScienceQA evaluator (`evaluators/proj/paligemma/transfers/science_qa.py`):
/// `re.match(r"the answer is ([a-z])\.", text.lower())` on prediction and target, the groups
/// compared, "failed" when the pattern does not match at the start.
#[test]
fn scienceqa_compares_answer_letters_as_big_vision() {
    let target = "The answer is B.";
    let cases: [(&str, f64); 8] = [
        ("The answer is B.", 1.0),
        ("the answer is b.", 1.0),
        ("The answer is B. BECAUSE: plants need light", 1.0), // what follows is ignored
        ("THE ANSWER IS B.x", 1.0),
        ("The answer is C.", 0.0),
        ("The answer is B", 0.0),   // no period: failed
        (" The answer is B.", 0.0), // re.match anchors at the start
        ("B", 0.0),
    ];
    for (prediction, want) in cases {
        assert_eq!(qa::scienceqa_accuracy(prediction, &[target]), want, "{prediction:?}");
    }
    // Two unreadable strings are equal ("failed" == "failed"), as in big_vision.
    assert_eq!(qa::scienceqa_accuracy("no idea", &["(B) x"]), 1.0);
    let examples = [
        json!({"prediction": "The answer is A. BECAUSE: x", "answers": ["The answer is A."]}),
        json!({"prediction": "The answer is A.", "answers": ["The answer is C."]}),
    ];
    assert_eq!(score(Metric::ScienceQa, &examples).unwrap()["scienceqa"].as_f64(), Some(0.5));
    assert_eq!(score(Metric::Exact, &examples).unwrap()["exact"].as_f64(), Some(0.0));
}
