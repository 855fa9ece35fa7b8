//! DocVQA's Average Normalised Levenshtein Similarity, as the official (RRC) evaluation.

/// Similarities below this count as 0.
pub const THRESHOLD: f64 = 0.5;

/// ANLS of one prediction: the best over the answers of `1 - lev(p, a) / max(|p|, |a|)`,
/// both trimmed and lower-cased, or 0 where that is below [`THRESHOLD`] (exactly 0.5 counts).
///
/// Distances count Unicode scalar values (Python's characters); as in the official code the
/// lengths are those of the upper-cased strings (`ß` counts 2), and two empty strings match.
pub fn anls(prediction: &str, answers: &[&str]) -> f64 {
    let prediction = prediction.trim().to_lowercase();
    answers.iter().map(|a| similarity(&prediction, &a.trim().to_lowercase())).fold(0.0, f64::max)
}

fn similarity(a: &str, b: &str) -> f64 {
    let length = a.to_uppercase().chars().count().max(b.to_uppercase().chars().count());
    if length == 0 {
        return 1.0;
    }
    let s = 1.0 - levenshtein(a, b) as f64 / length as f64;
    if s < THRESHOLD {
        0.0
    } else {
        s
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
