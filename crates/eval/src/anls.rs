//! DocVQA's Average Normalised Levenshtein Similarity, as the official (RRC) evaluation.

/// Similarities below this count as 0.
pub const THRESHOLD: f64 = 0.5;

/// ANLS of one prediction as the official RRC / DocVQA script scores it: both strings
/// lower-cased with their whitespace runs collapsed to single spaces and the ends stripped
/// (Python's `split`, so `"x  y"` matches `"x y"`), the edit distance divided by the longer
/// of the *raw* strings' upper-cased lengths (`ß` counts 2), the best answer kept, and 0
/// where that is below [`THRESHOLD`] (exactly 0.5 counts). Two empty strings match.
///
/// Distances count Unicode scalar values (Python's characters).
pub fn anls(prediction: &str, answers: &[&str]) -> f64 {
    let normal = |s: &str| crate::python_split(&s.to_lowercase()).collect::<Vec<_>>().join(" ");
    let upper_len = |s: &str| s.to_uppercase().chars().count();
    let prediction_normal = normal(prediction);
    let least = answers
        .iter()
        .map(|a| {
            let length = upper_len(a).max(upper_len(prediction));
            match length {
                0 => 0.0,
                _ => levenshtein(&normal(a), &prediction_normal) as f64 / length as f64,
            }
        })
        .fold(f64::INFINITY, f64::min);
    let similarity = 1.0 - least;
    if similarity < THRESHOLD {
        0.0
    } else {
        similarity
    }
}

/// Edit distance (insertions, deletions, substitutions of characters).
pub fn levenshtein(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    edit_distance(&a, &b)
}

/// Edit distance between two sequences (insertions, deletions, substitutions of items).
pub fn edit_distance<T: PartialEq>(a: &[T], b: &[T]) -> usize {
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, x) in a.iter().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, y) in b.iter().enumerate() {
            let substitute = diagonal + usize::from(x != y);
            diagonal = row[j + 1];
            row[j + 1] = substitute.min(row[j] + 1).min(diagonal + 1);
        }
    }
    row[b.len()]
}
