//! COCO caption tokenisation: what pycocoevalcap's `PTBTokenizer` (Stanford CoreNLP 3.4.1's
//! `PTBTokenizer -preserveLines -lowerCase`, then its punctuation filter) produces, for
//! ordinary English, without Java.
//!
//! Reproduced: lower-casing; punctuation split from words (`dog.` -> `dog`); clitics split
//! (`dog's` -> `dog 's`, `isn't` -> `is n't`, `we'll`, `'d`, `'ve`, `'m`, `'re`, `y'all`, and
//! `cannot`/`gonna`/`wanna`/`gotta`/`gimme`/`lemme`); hyphenated words, numbers (`3.5`,
//! `1,000`, `10:30`, `1/2`) and abbreviations (`u.s.a.`, `mr.`, `st.`) kept whole; the
//! filter dropping `. , ; : ? ! - -- ... ' '' `` `` ` ``. Also its quirks: brackets become
//! `-lrb-`, `-rrb-`, `-lsb-`, ... which the filter misses (it lists them upper case) and so
//! stay words; runs like `!!!` and `?!` stay one token that the filter keeps; characters
//! CoreNLP cannot tokenise (emoji and other symbols outside the BMP) are dropped.
//!
//! Known differences (rare in captions): CoreNLP's full abbreviation list (we know the
//! common ones in [`ABBREVIATIONS`]), URLs and e-mail addresses with other characters than
//! `. / : @`, `'tis`/`'twas`, `'60s`, `rock'n'roll`, `AT&T`, combining marks written
//! separately from their letter, and symbols of the BMP that CoreNLP would drop.
//! `tests/fixtures/metrics/ptb_probe.txt` lists the sentences checked against CoreNLP.

/// Tokens pycocoevalcap removes after tokenising (its `PUNCTUATIONS`, as they appear in
/// lower-cased output: the bracket names never match, see the module docs).
const REMOVED: [&str; 13] = ["''", "'", "``", "`", ".", "?", "!", ",", ":", ";", "-", "--", "..."];

/// Words that keep a following period, as CoreNLP's abbreviation patterns do (each checked
/// against CoreNLP 3.4.1; `no.` is left out, CoreNLP keeps it only before a number).
pub const ABBREVIATIONS: [&str; 28] = [
    "mr", "mrs", "ms", "dr", "prof", "gen", "sgt", "st", "jr", "sr", "vs", "etc", "inc", "ltd", "co", "corp", "mt",
    "ave", "blvd", "rd", "ft", "jan", "feb", "aug", "sept", "oct", "nov", "dec",
];

/// Clitics split from the end of a word (`n't` is handled first, as it ends in `t`).
const CLITICS: [&str; 6] = ["'s", "'re", "'ll", "'d", "'ve", "'m"];

/// Words CoreNLP splits in two, with where.
const SPLIT_WORDS: [(&str, usize); 6] =
    [("cannot", 3), ("gonna", 3), ("wanna", 3), ("gotta", 3), ("gimme", 3), ("lemme", 3)];

/// Tokenises a caption as COCO evaluation does: lower-cased tokens, punctuation removed.
pub fn tokenize(text: &str) -> Vec<String> {
    ptb_tokens(text).into_iter().filter(|t| !REMOVED.contains(&t.as_str())).collect()
}

/// The lower-cased PTB tokens of `text`, before the punctuation filter.
pub fn ptb_tokens(text: &str) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if is_word_char(c) {
            let end = word_end(&chars, i);
            let word: String = chars[i..end].iter().collect::<String>().to_lowercase();
            split_clitics(&word, &mut tokens);
            i = end;
        } else {
            let (token, len) = punctuation(&chars[i..]);
            tokens.extend(token);
            i += len;
        }
    }
    tokens
}

fn is_word_char(c: char) -> bool {
    c.is_alphanumeric()
}

/// End of the word starting at `start`: alphanumeric runs joined by connectors
/// (`-`, `.`, `/`, `@`, `'` between word characters, `,` and `:` between digits),
/// plus the period of an abbreviation.
fn word_end(chars: &[char], start: usize) -> usize {
    let at = |k: usize| chars.get(k).copied();
    let mut end = start;
    loop {
        while at(end).is_some_and(is_word_char) {
            end += 1;
        }
        let (Some(joiner), Some(next)) = (at(end), at(end + 1)) else {
            break;
        };
        let prev = chars[end - 1];
        let joins = match joiner {
            '-' | '.' | '/' | '@' | '\'' | '’' => is_word_char(next),
            ':' => prev.is_ascii_digit() && next.is_ascii_digit(),
            ',' => prev.is_ascii_digit() && thousands_group(&chars[end + 1..]),
            _ => false,
        };
        if !joins {
            break;
        }
        end += 1;
    }
    if at(end) == Some('.') && is_abbreviation(&chars[start..end]) {
        end += 1;
    }
    end
}

/// Whether `rest` starts with exactly three digits (the tail of `1,000`).
fn thousands_group(rest: &[char]) -> bool {
    rest.len() >= 3 && rest[..3].iter().all(char::is_ascii_digit) && !rest.get(3).is_some_and(char::is_ascii_digit)
}

/// `u.s.a`, `e.g`, `a.m` (single letters joined by periods) or a known abbreviation.
fn is_abbreviation(word: &[char]) -> bool {
    let initials =
        word.len() >= 3 && word.iter().enumerate().all(|(k, c)| if k % 2 == 0 { c.is_alphabetic() } else { *c == '.' });
    let lower = word.iter().collect::<String>().to_lowercase();
    initials || ABBREVIATIONS.contains(&lower.as_str())
}

/// Pushes `word`'s stem and its clitics (`they'd've` -> `they 'd 've`).
fn split_clitics(word: &str, tokens: &mut Vec<String>) {
    let word = word.replace('’', "'");
    if let Some(&(_, at)) = SPLIT_WORDS.iter().find(|(w, _)| *w == word) {
        tokens.push(word[..at].to_string());
        tokens.push(word[at..].to_string());
        return;
    }
    let mut stem = word.as_str();
    if let Some(rest) = stem.strip_prefix("y'").filter(|r| !r.is_empty()) {
        tokens.push("y'".to_string()); // `y'all`, `y'know`
        stem = rest;
    }
    let mut clitics = Vec::new();
    loop {
        let clitic = if stem.ends_with("n't") { Some("n't") } else { CLITICS.into_iter().find(|c| stem.ends_with(c)) };
        match clitic {
            Some(c) if stem.len() > c.len() => {
                stem = &stem[..stem.len() - c.len()];
                clitics.push(c);
            }
            _ => break,
        }
    }
    tokens.push(stem.to_string());
    tokens.extend(clitics.into_iter().rev().map(str::to_string));
}

/// The token (if any) that the punctuation or symbol at the start of `chars` makes, and how
/// many characters it spans. Tokens the filter removes are returned in one spelling of theirs.
fn punctuation(chars: &[char]) -> (Option<String>, usize) {
    let run = |set: &[char]| chars.iter().take_while(|c| set.contains(c)).count();
    let token = |t: &str, len: usize| (Some(t.to_string()), len);
    match chars[0] {
        '.' => match run(&['.']) {
            n if n >= 3 => token("...", n),
            _ => token(".", 1),
        },
        // CoreNLP keeps a run as one token, which the filter keeps unless it is a lone `!`/`?`.
        '!' | '?' => {
            let n = run(&['!', '?']);
            (Some(chars[..n].iter().collect()), n)
        }
        '-' => token("--", run(&['-'])),
        '—' | '–' | '…' => token("--", 1),
        '"' | '\'' | '`' | '‘' | '’' | '“' | '”' => token("''", 1),
        '(' => token("-lrb-", 1),
        ')' => token("-rrb-", 1),
        '[' => token("-lsb-", 1),
        ']' => token("-rsb-", 1),
        '{' => token("-lcb-", 1),
        '}' => token("-rcb-", 1),
        ',' | ';' | ':' => token(",", 1),
        // CoreNLP 3.4.1 cannot tokenise characters outside the BMP and drops them.
        c if (c as u32) > 0xFFFF => (None, 1),
        c => (Some(c.to_lowercase().collect()), 1),
    }
}
