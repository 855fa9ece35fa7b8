//! Referring segmentation against `tests/fixtures/segmentation/segmentation.json`, written by
//! `make_segmentation_fixture.py` with the libraries big_vision runs: pycocotools for the
//! masks, `jax.image.resize` (TensorFlow's antialiased bilinear) for the 64 x 64 crops,
//! Pillow for the evaluator's resize, and big_vision's evaluator logic for the scores.

use std::path::PathBuf;

use pg2_eval::mask::Mask;
use pg2_eval::segmentation::{self, Prediction, CODES};
use pg2_eval::{score, score_with, EvalError, Metric};
use serde_json::Value;

fn fixture() -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/segmentation/segmentation.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn numbers<T: serde::de::DeserializeOwned>(v: &Value) -> T {
    serde_json::from_value(v.clone()).unwrap()
}

fn polygon_mask(case: &Value) -> Mask {
    Mask::from_polygons(&numbers::<Vec<Vec<f64>>>(&case["polygons"]), numbers(&case["height"]), numbers(&case["width"]))
}

#[test]
fn polygons_rasterise_as_pycocotools() {
    for (i, case) in fixture()["polygons"].as_array().unwrap().iter().enumerate() {
        let mask = polygon_mask(case);
        let counts: Vec<u64> = numbers(&case["counts"]);
        assert_eq!(mask.counts(), counts, "case {i}");
        assert_eq!(Mask::from_counts(&counts, mask.height, mask.width).unwrap(), mask, "case {i}");
        assert_eq!(Mask::from_json(&mask.to_json()).unwrap(), mask, "case {i}");
        // pycocotools' compressed counts, both ways.
        let compressed = case["compressed"].as_str().unwrap();
        assert_eq!(pg2_eval::mask::compress(&counts), compressed, "case {i}");
        assert_eq!(pg2_eval::mask::decompress(compressed).unwrap(), counts, "case {i}");
        assert_eq!(mask.to_json()["counts"], compressed, "case {i}");
    }
    assert!(pg2_eval::mask::decompress("0d?\u{7f}").is_err());
    assert!(pg2_eval::mask::decompress("0d?2b").unwrap_err().contains("end inside a number"));
    let err = Mask::from_counts(&[3, 4], 2, 4).unwrap_err();
    assert_eq!(err, "RLE counts cover 7 pixels, not 2 x 4");
    assert!(Mask::from_json(&serde_json::json!({"size": [2], "counts": [8]})).is_err());
}

#[test]
fn box_crops_resize_to_64_as_tensorflow_antialiased() {
    for (i, case) in fixture()["crops"].as_array().unwrap().iter().enumerate() {
        let resized = polygon_mask(case).crop_resized(numbers(&case["crop"]), 64);
        let want: Vec<f32> = numbers(&case["resized"]);
        let worst = resized.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
        assert!(worst < 2e-6, "case {i}: off by {worst}");
        assert!(want.iter().any(|&v| v > 0.0 && v < 1.0), "case {i}: the crop has soft edges");
    }
}

#[test]
fn predictions_parse_as_big_vision_reads_tokens() {
    let seg: String = (0..16).map(|i| format!("<seg{:03}>", i * 8)).collect();
    let box_ = "<loc0010><loc0020><loc0900><loc1000>";
    let parsed = Prediction::parse(&format!("{box_}{seg} and more")).unwrap();
    assert_eq!(parsed.locs, [10, 20, 900, 1000]);
    assert_eq!(parsed.codes, std::array::from_fn::<u8, CODES, _>(|i| (i * 8) as u8));
    for bad in [
        format!(" {box_}{seg}"),                              // not at the start
        box_.to_string(),                                     // no mask
        format!("{box_}{}", &seg[..seg.len() - 8]),           // 15 codes
        format!("<loc0900><loc0020><loc0010><loc1000>{seg}"), // y2 < y1
        format!("<loc0010><loc0020><loc0900><loc1024>{seg}"), // beyond 1023
        format!("{box_}<seg128>{}", &seg[8..]),               // beyond 127
        format!("<loc10><loc0020><loc0900><loc1000>{seg}"),   // three digits
    ] {
        assert_eq!(Prediction::parse(&bad), None, "{bad}");
    }
}

/// The fixture's decoder: its codes and the masks the VQ-VAE decodes them to.
fn fixture_decoder(fixture: &Value) -> impl Fn(&[[u8; CODES]]) -> Result<Vec<Vec<f32>>, String> {
    let codes: Vec<[u8; CODES]> = numbers(&fixture["decode"]["codes"]);
    let masks: Vec<Vec<f32>> = numbers(&fixture["decode"]["masks"]);
    move |asked| {
        asked
            .iter()
            .map(|c| codes.iter().position(|k| k == c).map(|i| masks[i].clone()).ok_or("unknown".into()))
            .collect()
    }
}

#[test]
fn refcoco_seg_scores_as_big_vision_evaluator() {
    let fixture = fixture();
    let examples = fixture["metric"]["examples"].as_array().unwrap().clone();
    let decode = fixture_decoder(&fixture);
    let scores = score_with(Metric::RefCocoSeg, &examples, Some(&decode)).unwrap();
    let want = fixture["metric"]["scores"].as_object().unwrap();
    assert_eq!(scores.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>());
    for (key, value) in want {
        let (got, value) = (scores[key].as_f64().unwrap(), value.as_f64().unwrap());
        assert!((got - value).abs() < 1e-9, "{key}: {got} vs {value}");
    }
    // Per example, the valid ones overlap partly (the decoded masks are a random VQ-VAE's).
    let predictions: Vec<_> = examples.iter().map(|e| Prediction::parse(e["prediction"].as_str().unwrap())).collect();
    let reference = (
        Mask::from_json(&examples[0]["mask"]).unwrap(),
        pg2_eval::refcoco::Box::from_yxyx(numbers::<[[f64; 4]; 1]>(&examples[0]["boxes"])[0]),
    );
    let scored = segmentation::score(&predictions, &vec![reference; examples.len()], &decode).unwrap();
    let ious: Vec<f64> = numbers(&fixture["metric"]["ious"]);
    for (i, (s, want)) in scored.iter().zip(&ious).enumerate() {
        assert!((s.iou - want).abs() < 1e-12, "example {i}: {} vs {want}", s.iou);
    }
    assert!(ious[..3].iter().all(|&iou| iou > 0.1 && iou < 0.9), "{ious:?}");

    let err = score(Metric::RefCocoSeg, &examples).unwrap_err();
    assert!(matches!(err, EvalError::NoMaskDecoder) && err.to_string().contains("vae-oid.npz"), "{err}");
    let mut broken = examples.clone();
    broken[1]["mask"] = serde_json::json!({"size": [48, 64], "counts": [5]});
    let err = score_with(Metric::RefCocoSeg, &broken, Some(&decode)).unwrap_err().to_string();
    assert!(err.starts_with("example 1: field `mask` RLE counts cover 5 pixels"), "{err}");
}
