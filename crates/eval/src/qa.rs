//! Short-answer accuracies: VQAv2's official accuracy, ChartQA's relaxed accuracy, exact
//! match and big_vision's TallyQA and ScienceQA accuracies. Each takes one prediction and its reference answers and returns a score in [0, 1].

/// VQAv2 accuracy of one prediction, as the official `vqaEval.py`: the mean over the
/// leave-one-out subsets of the answers of `min(#answers in the subset equal to the
/// prediction / 3, 1)`.
///
/// Newlines and tabs become spaces and the ends are stripped of what Python takes for
/// whitespace (see `is_python_space`). Like the official code, the
/// prediction and answers are normalised ([`normalize_vqa`]) only when the answers are not all
/// identical, so against ten identical `"yes"` a `"Yes"` scores 0.
pub fn vqa_accuracy(prediction: &str, answers: &[&str]) -> f64 {
    let clean = |s: &str| s.replace(['\n', '\t'], " ").trim_matches(crate::is_python_space).to_string();
    let mut prediction = clean(prediction);
    let mut answers: Vec<String> = answers.iter().map(|a| clean(a)).collect();
    if answers.iter().any(|a| *a != answers[0]) {
        prediction = normalize_vqa(&prediction);
        answers = answers.iter().map(|a| normalize_vqa(a)).collect();
    }
    let matches = answers.iter().filter(|a| **a == prediction).count();
    let total: f64 = answers
        .iter()
        .map(|a| {
            let others = matches - usize::from(*a == prediction);
            (others as f64 / 3.0).min(1.0)
        })
        .sum();
    total / answers.len() as f64
}

/// The official VQA answer normalisation: `processPunctuation` then `processDigitArticle`.
pub fn normalize_vqa(text: &str) -> String {
    digits_and_articles(&strip_punctuation(text))
}

/// Characters `processPunctuation` deletes or turns into spaces (periods are handled apart).
const VQA_PUNCT: [char; 21] =
    [';', '/', '[', ']', '"', '{', '}', '(', ')', '=', '+', '\\', '_', '-', '>', '<', '@', '`', ',', '?', '!'];

/// `processPunctuation`: each punctuation mark is deleted if it touches a space anywhere in the
/// text (or the text has a digit-comma-digit), else replaced by a space; then periods not
/// followed by a digit are deleted, at most 32 of them (the official code passes `re.UNICODE`,
/// 32, as `re.sub`'s count). Digits are ASCII ones (Python's `\d` also takes other scripts'
/// decimal digits).
fn strip_punctuation(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let digit_comma_digit = chars.windows(3).any(|w| w[0].is_ascii_digit() && w[1] == ',' && w[2].is_ascii_digit());
    let mut out = text.to_string();
    for p in VQA_PUNCT {
        let touches_space = text.contains(&format!("{p} ")) || text.contains(&format!(" {p}"));
        out = out.replace(p, if touches_space || digit_comma_digit { "" } else { " " });
    }
    let chars: Vec<char> = out.chars().collect();
    let mut removed = 0;
    let mut result = String::with_capacity(out.len());
    for (k, &c) in chars.iter().enumerate() {
        let next_is_digit = chars.get(k + 1).is_some_and(char::is_ascii_digit);
        if c == '.' && !next_is_digit && removed < 32 {
            removed += 1;
        } else {
            result.push(c);
        }
    }
    result
}

/// `processDigitArticle`: lower-case, number words to digits, articles dropped, contractions
/// missing their apostrophe fixed, words (split as Python's `split`) re-joined by single
/// spaces.
fn digits_and_articles(text: &str) -> String {
    let lower = text.to_lowercase();
    let words: Vec<&str> = crate::python_split(&lower)
        .map(|w| NUMBER_WORDS.iter().find(|(k, _)| *k == w).map_or(w, |(_, v)| v))
        .filter(|w| !["a", "an", "the"].contains(w))
        .map(|w| CONTRACTIONS.iter().find(|(k, _)| *k == w).map_or(w, |(_, v)| v))
        .collect();
    words.join(" ")
}

/// The official `manualMap`.
const NUMBER_WORDS: [(&str, &str); 12] = [
    ("none", "0"),
    ("zero", "0"),
    ("one", "1"),
    ("two", "2"),
    ("three", "3"),
    ("four", "4"),
    ("five", "5"),
    ("six", "6"),
    ("seven", "7"),
    ("eight", "8"),
    ("nine", "9"),
    ("ten", "10"),
];

/// The official `contractions` map, verbatim (its entries with capitals can never match, as
/// the words are lower-cased first, and `somebody'd` maps to `somebodyd`: both as upstream).
const CONTRACTIONS: [(&str, &str); 120] = [
    ("aint", "ain't"),
    ("arent", "aren't"),
    ("cant", "can't"),
    ("couldve", "could've"),
    ("couldnt", "couldn't"),
    ("couldn'tve", "couldn't've"),
    ("couldnt've", "couldn't've"),
    ("didnt", "didn't"),
    ("doesnt", "doesn't"),
    ("dont", "don't"),
    ("hadnt", "hadn't"),
    ("hadnt've", "hadn't've"),
    ("hadn'tve", "hadn't've"),
    ("hasnt", "hasn't"),
    ("havent", "haven't"),
    ("hed", "he'd"),
    ("hed've", "he'd've"),
    ("he'dve", "he'd've"),
    ("hes", "he's"),
    ("howd", "how'd"),
    ("howll", "how'll"),
    ("hows", "how's"),
    ("Id've", "I'd've"),
    ("I'dve", "I'd've"),
    ("Im", "I'm"),
    ("Ive", "I've"),
    ("isnt", "isn't"),
    ("itd", "it'd"),
    ("itd've", "it'd've"),
    ("it'dve", "it'd've"),
    ("itll", "it'll"),
    ("let's", "let's"),
    ("maam", "ma'am"),
    ("mightnt", "mightn't"),
    ("mightnt've", "mightn't've"),
    ("mightn'tve", "mightn't've"),
    ("mightve", "might've"),
    ("mustnt", "mustn't"),
    ("mustve", "must've"),
    ("neednt", "needn't"),
    ("notve", "not've"),
    ("oclock", "o'clock"),
    ("oughtnt", "oughtn't"),
    ("ow's'at", "'ow's'at"),
    ("'ows'at", "'ow's'at"),
    ("'ow'sat", "'ow's'at"),
    ("shant", "shan't"),
    ("shed've", "she'd've"),
    ("she'dve", "she'd've"),
    ("she's", "she's"),
    ("shouldve", "should've"),
    ("shouldnt", "shouldn't"),
    ("shouldnt've", "shouldn't've"),
    ("shouldn'tve", "shouldn't've"),
    ("somebody'd", "somebodyd"),
    ("somebodyd've", "somebody'd've"),
    ("somebody'dve", "somebody'd've"),
    ("somebodyll", "somebody'll"),
    ("somebodys", "somebody's"),
    ("someoned", "someone'd"),
    ("someoned've", "someone'd've"),
    ("someone'dve", "someone'd've"),
    ("someonell", "someone'll"),
    ("someones", "someone's"),
    ("somethingd", "something'd"),
    ("somethingd've", "something'd've"),
    ("something'dve", "something'd've"),
    ("somethingll", "something'll"),
    ("thats", "that's"),
    ("thered", "there'd"),
    ("thered've", "there'd've"),
    ("there'dve", "there'd've"),
    ("therere", "there're"),
    ("theres", "there's"),
    ("theyd", "they'd"),
    ("theyd've", "they'd've"),
    ("they'dve", "they'd've"),
    ("theyll", "they'll"),
    ("theyre", "they're"),
    ("theyve", "they've"),
    ("twas", "'twas"),
    ("wasnt", "wasn't"),
    ("wed've", "we'd've"),
    ("we'dve", "we'd've"),
    ("weve", "we've"),
    ("werent", "weren't"),
    ("whatll", "what'll"),
    ("whatre", "what're"),
    ("whats", "what's"),
    ("whatve", "what've"),
    ("whens", "when's"),
    ("whered", "where'd"),
    ("wheres", "where's"),
    ("whereve", "where've"),
    ("whod", "who'd"),
    ("whod've", "who'd've"),
    ("who'dve", "who'd've"),
    ("wholl", "who'll"),
    ("whos", "who's"),
    ("whove", "who've"),
    ("whyll", "why'll"),
    ("whyre", "why're"),
    ("whys", "why's"),
    ("wont", "won't"),
    ("wouldve", "would've"),
    ("wouldnt", "wouldn't"),
    ("wouldnt've", "wouldn't've"),
    ("wouldn'tve", "wouldn't've"),
    ("yall", "y'all"),
    ("yall'll", "y'all'll"),
    ("y'allll", "y'all'll"),
    ("yall'd've", "y'all'd've"),
    ("y'alld've", "y'all'd've"),
    ("y'all'dve", "y'all'd've"),
    ("youd", "you'd"),
    ("youd've", "you'd've"),
    ("you'dve", "you'd've"),
    ("youll", "you'll"),
    ("youre", "you're"),
    ("youve", "you've"),
];

/// ChartQA relaxed accuracy against any answer (pix2struct's `relaxed_correctness`): if both
/// parse as numbers (as Python's `float`; trailing `%`s stripped and the value divided by
/// 100) and the answer is not 0, correct when within 5% relative error; otherwise a
/// case-insensitive match of the strings as they are (not trimmed).
pub fn relaxed_accuracy(prediction: &str, answers: &[&str]) -> f64 {
    let correct = |answer: &&str| match (parse_number(prediction), parse_number(answer)) {
        (Some(p), Some(a)) if a != 0.0 => (p - a).abs() / a.abs() <= 0.05,
        _ => prediction.to_lowercase() == answer.to_lowercase(),
    };
    f64::from(u8::from(answers.iter().any(correct)))
}

/// pix2struct's `_to_float`: `float(text.rstrip("%")) / 100` when `text` ends in `%`, else
/// `float(text)`.
fn parse_number(text: &str) -> Option<f64> {
    match text.ends_with('%') {
        true => python_float(text.trim_end_matches('%')).map(|v| v / 100.0),
        false => python_float(text),
    }
}

/// Python's `float(text)`: surrounding whitespace skipped, single underscores between digits
/// allowed (`1_000`), `inf`/`nan` in any case. (Digits of other scripts, which Python also
/// reads, are not.)
fn python_float(text: &str) -> Option<f64> {
    let text = text.trim_matches(crate::is_python_space);
    let bytes = text.as_bytes();
    let underscores_between_digits = bytes.iter().enumerate().all(|(i, &b)| {
        b != b'_' || (i > 0 && bytes[i - 1].is_ascii_digit() && bytes.get(i + 1).is_some_and(u8::is_ascii_digit))
    });
    if !underscores_between_digits {
        return None;
    }
    text.replace('_', "").parse().ok()
}

/// 1 if the trimmed, lower-cased prediction equals any trimmed, lower-cased answer, else 0.
pub fn exact_match(prediction: &str, answers: &[&str]) -> f64 {
    let norm = |s: &str| s.trim().to_lowercase();
    let prediction = norm(prediction);
    f64::from(u8::from(answers.iter().any(|a| norm(a) == prediction)))
}

/// 1 if the trimmed prediction equals any trimmed answer, case kept, else 0: big_vision's
/// `vqa` evaluator with `to_lower=False` (its default), as AI2D, OCR-VQA and GQA use it.
pub fn exact_match_cased(prediction: &str, answers: &[&str]) -> f64 {
    let prediction = prediction.trim();
    f64::from(u8::from(answers.iter().any(|a| a.trim() == prediction)))
}

/// 1 if the prediction equals any answer after big_vision's TallyQA evaluator maps each whole
/// string that is a number word from "none"/"zero" to "twenty" (any case) to its numeral
/// (`"Two"` -> `"2"`), else 0. Like that evaluator nothing is trimmed and other text keeps its
/// case.
pub fn tallyqa_accuracy(prediction: &str, answers: &[&str]) -> f64 {
    let prediction = tally_numeral(prediction);
    f64::from(u8::from(answers.iter().any(|a| tally_numeral(a) == prediction)))
}

/// big_vision's `_number_word_to_numeral`: the numeral of a number word up to 20, else the
/// text as it is.
fn tally_numeral(text: &str) -> &str {
    let lower = text.to_lowercase();
    TALLY_WORDS.iter().position(|w| *w == lower).map_or(text, |n| TALLY_NUMERALS[n])
}

/// The number words big_vision's TallyQA evaluator maps, `none` and `zero` to 0, then 1 to 20.
const TALLY_WORDS: [&str; 22] = [
    "none",
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
    "twenty",
];

/// The numerals of [`TALLY_WORDS`], in the same order.
const TALLY_NUMERALS: [&str; 22] = [
    "0", "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16", "17", "18", "19",
    "20",
];

/// big_vision's ScienceQA accuracy: 1 if the letter read from the start of the lower-cased
/// prediction by `the answer is ([a-z])\.` equals the letter read so from any answer (`"The
/// answer is B."`), else 0. Text after the period is ignored; a prediction or answer the
/// pattern does not match reads as "failed", and, as in big_vision, two failures are equal.
pub fn scienceqa_accuracy(prediction: &str, answers: &[&str]) -> f64 {
    let letter = scienceqa_letter(prediction);
    f64::from(u8::from(answers.iter().any(|a| scienceqa_letter(a) == letter)))
}

/// The letter of `the answer is X.` at the start of the lower-cased text, `None` when the text
/// does not start so.
fn scienceqa_letter(text: &str) -> Option<char> {
    let lower = text.to_lowercase();
    let mut rest = lower.strip_prefix("the answer is ")?.chars();
    match (rest.next(), rest.next()) {
        (Some(letter @ 'a'..='z'), Some('.')) => Some(letter),
        _ => None,
    }
}
