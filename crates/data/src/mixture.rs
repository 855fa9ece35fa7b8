//! Weighted mixtures of sources: deterministic from a seed, resumable from a saved
//! position, and shardable over data-parallel ranks.
//!
//! The global stream is a pure function of the seed: example `i` picks its source with a
//! generator seeded by `(seed, i)`, and the `k`-th pick of a source takes element
//! `k % len` of that source's permutation for epoch `k / len`. A [`MixturePosition`] (the
//! next example index and how many examples each source has given) therefore restores the
//! stream exactly, and every rank walks the same stream, keeping only its own share.

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use std::path::Path;
use std::sync::Arc;

use crate::layout::TextLimits;
use crate::parquet::Columns;
use crate::source::{fill_template, OnBadLine, Record};
use crate::stream::{Reading, SourceFile};
use crate::DataError;

/// How a task turns a record into text.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TaskFormat {
    /// Prompt template such as `"answer en {question}"`: `{name}` takes the record's field
    /// `name` (`prefix`, `suffix` or any extra field). `None` keeps the record's prefix.
    pub prefix: Option<String>,
    /// Token limits and the truncation policy.
    pub limits: TextLimits,
    /// A list field of the record (such as VQA's `answers`) to draw each visit's target
    /// from, in place of its `suffix`: big_vision's `choice_no_replacement`.
    pub suffix_from: Option<String>,
    /// A list field of the record (ScienceQA's `choices`, the right one's index in its
    /// `answer` field) to put in a fresh order each visit, as big_vision's
    /// `sci_qa_choices_shuffle`: the visit's record gets the fields `indexed_choices`
    /// (`"(A) x, (B) y"`) and `indexed_answer` (`"B"`) for the templates.
    pub shuffle_choices: Option<String>,
    /// Target template such as `"The answer is {indexed_answer}."` (fields as in `prefix`);
    /// the record's suffix by default.
    pub suffix: Option<String>,
}

impl TaskFormat {
    /// The prompt of `record` under this format.
    pub fn prompt(&self, record: &Record) -> Result<String, DataError> {
        match &self.prefix {
            Some(template) => fill_record(template, record),
            None => Ok(record.prefix.clone()),
        }
    }
}

/// `template` filled from `record`'s prefix, suffix and fields.
fn fill_record(template: &str, record: &Record) -> Result<String, DataError> {
    let value = |name: &str| match name {
        "prefix" => Some(record.prefix.clone()),
        "suffix" => record.suffix.clone(),
        _ => record.extra.get(name).map(crate::parquet::json_text),
    };
    fill_template(template, value).map_err(|msg| record.error(msg))
}

/// One weighted source of a mixture (records only; images load lazily).
#[derive(Debug)]
pub struct MixtureSource {
    pub name: String,
    pub data: SourceData,
    pub weight: f64,
    pub format: TaskFormat,
}

/// Where a source's records come from.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // one per source: boxing the stream would save nothing
pub enum SourceData {
    /// Every record in memory; each epoch is a fresh permutation.
    Memory(Vec<Record>),
    /// Shards read lazily through a shuffle buffer, for sources too large for memory.
    Stream(StreamSource),
}

impl SourceData {
    /// Records per epoch.
    pub fn len(&self) -> usize {
        match self {
            SourceData::Memory(records) => records.len(),
            SourceData::Stream(stream) => stream.len,
        }
    }

    /// True for a source without records.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A source read lazily: each epoch visits the source's files (JSONL files, WebDataset
/// tar shards or parquet files) in a shuffled order and emits records through a shuffle
/// buffer, so only `buffer` records are held at a time. The order is a pure function of the
/// seed and the epoch; seeking replays the current epoch up to the position (for JSONL and
/// tar, reading records without their images).
#[derive(Debug)]
pub struct StreamSource {
    files: Vec<SourceFile>,
    buffer: usize,
    policy: OnBadLine,
    columns: Arc<Columns>,
    len: usize,
    state: Option<StreamEpoch>,
}

#[derive(Debug)]
struct StreamEpoch {
    epoch: u64,
    emitted: usize,
    pending: std::vec::IntoIter<SourceFile>,
    reading: Option<Reading>,
    buffer: Vec<Record>,
    rng: ChaCha8Rng,
}

impl StreamSource {
    /// Opens a JSONL file, a folder of JSONL shards, tar shards or parquet files (mapped by
    /// `columns`), counting its records once: parquet files by their footers unless bad rows
    /// are skipped (a bad row then stops the run when it is reached), the others by reading
    /// them through.
    pub fn open(path: &Path, buffer: usize, policy: OnBadLine, columns: &Columns) -> Result<Self, DataError> {
        let files = SourceFile::all(path)?;
        let columns = Arc::new(columns.clone());
        let mut len = 0;
        for file in &files {
            len += file.open(policy, &columns)?.count()?;
        }
        Ok(Self { files, buffer: buffer.max(1), policy, columns, len, state: None })
    }

    fn start_epoch(&self, seed: u64, epoch: u64) -> Result<StreamEpoch, DataError> {
        let mut rng = rng_for(seed, u64::MAX, epoch);
        let mut files = self.files.clone();
        files.shuffle(&mut rng);
        Ok(StreamEpoch { epoch, emitted: 0, pending: files.into_iter(), reading: None, buffer: Vec::new(), rng })
    }

    /// The next good record of the epoch's file order, or `None` at its end.
    fn read_record(&self, e: &mut StreamEpoch) -> Result<Option<Record>, DataError> {
        loop {
            if e.reading.is_none() {
                match e.pending.next() {
                    None => return Ok(None),
                    Some(file) => e.reading = Some(file.open(self.policy, &self.columns)?),
                }
            }
            match e.reading.as_mut().expect("a file is open").next_record()? {
                Some(record) => return Ok(Some(record)),
                None => e.reading = None,
            }
        }
    }

    /// The `k`-th record this source emits (`k` counts over all epochs).
    fn record(&mut self, seed: u64, k: u64) -> Result<Record, DataError> {
        let (epoch, offset) = (k / self.len as u64, (k % self.len as u64) as usize);
        let mut state = match self.state.take() {
            Some(s) if s.epoch == epoch && s.emitted <= offset => s,
            _ => self.start_epoch(seed, epoch)?,
        };
        loop {
            while state.buffer.len() < self.buffer {
                match self.read_record(&mut state)? {
                    Some(record) => state.buffer.push(record),
                    None => break,
                }
            }
            let pick = state.rng.random_range(0..state.buffer.len());
            let record = state.buffer.swap_remove(pick);
            state.emitted += 1;
            if state.emitted > offset {
                self.state = Some(state);
                return Ok(record);
            }
        }
    }
}

/// How long a run lasts: pretraining counts examples (the paper's 1B for stage 1),
/// transfer counts epochs of its one dataset.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RunLength {
    Steps(u64),
    Examples(u64),
    Epochs(f64),
}

impl RunLength {
    /// Optimizer steps for a global batch of `global_batch` examples over a mixture of
    /// `records` records per epoch (a partial last batch counts as a step).
    pub fn steps(&self, records: usize, global_batch: usize) -> u64 {
        let batches = |examples: f64| (examples / global_batch as f64).ceil() as u64;
        match *self {
            RunLength::Steps(n) => n,
            RunLength::Examples(n) => batches(n as f64),
            RunLength::Epochs(e) => batches(e * records as f64),
        }
    }
}

/// Where a mixture stands: saved with checkpoints, restored with [`Mixture::seek`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MixturePosition {
    /// Index of the next example of the global stream.
    pub next: u64,
    /// Examples taken from each source so far.
    pub consumed: Vec<u64>,
}

/// The global example stream of a list of weighted sources.
pub struct Mixture {
    sources: Vec<MixtureSource>,
    /// Cumulative normalised weights, for picking a source.
    cumulative: Vec<f64>,
    seed: u64,
    position: MixturePosition,
    /// Each source's current epoch and its permutation.
    orders: Vec<Option<(u64, Vec<u32>)>>,
}

/// A generator for one purpose and index, independent of every other (ChaCha streams).
fn rng_for(seed: u64, stream: u64, index: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    rng.set_stream(stream);
    rng
}

impl Mixture {
    /// A mixture starting at its first example. Sources need at least one record and a
    /// positive weight.
    pub fn new(sources: Vec<MixtureSource>, seed: u64) -> Result<Self, DataError> {
        let total: f64 = sources.iter().map(|s| s.weight).sum();
        for s in &sources {
            if s.data.is_empty() || s.weight.is_nan() || s.weight <= 0.0 {
                return Err(DataError::File {
                    path: s.name.clone(),
                    msg: "a mixture source needs records and a positive weight".into(),
                });
            }
        }
        if sources.is_empty() {
            return Err(DataError::File { path: "mixture".into(), msg: "no sources".into() });
        }
        let cumulative = sources
            .iter()
            .scan(0.0, |acc, s| {
                *acc += s.weight / total;
                Some(*acc)
            })
            .collect();
        let position = MixturePosition { next: 0, consumed: vec![0; sources.len()] };
        let orders = sources.iter().map(|_| None).collect();
        Ok(Self { sources, cumulative, seed, position, orders })
    }

    /// The sources, in recipe order.
    pub fn sources(&self) -> &[MixtureSource] {
        &self.sources
    }

    /// Records over all sources (one epoch of a single-source transfer run).
    pub fn total_records(&self) -> usize {
        self.sources.iter().map(|s| s.data.len()).sum()
    }

    /// Where the stream stands.
    pub fn position(&self) -> &MixturePosition {
        &self.position
    }

    /// Continues from a saved position.
    pub fn seek(&mut self, position: MixturePosition) -> Result<(), DataError> {
        if position.consumed.len() != self.sources.len() {
            return Err(DataError::File {
                path: "mixture".into(),
                msg: format!(
                    "saved position has {} sources, the recipe {}",
                    position.consumed.len(),
                    self.sources.len()
                ),
            });
        }
        self.position = position;
        Ok(())
    }

    /// Source index of global example `index`.
    fn pick(&self, index: u64) -> usize {
        let u: f64 = rng_for(self.seed, 0, index).random();
        self.cumulative.iter().position(|&c| u < c).unwrap_or(self.sources.len() - 1)
    }

    /// The `k`-th example of source `s`.
    fn element(&mut self, s: usize, k: u64) -> Result<Record, DataError> {
        let seed = self.seed;
        match &mut self.sources[s].data {
            SourceData::Memory(records) => {
                let len = records.len() as u64;
                let epoch = k / len;
                if self.orders[s].as_ref().is_none_or(|(e, _)| *e != epoch) {
                    let mut order: Vec<u32> = (0..len as u32).collect();
                    order.shuffle(&mut rng_for(seed, 1 + s as u64, epoch));
                    self.orders[s] = Some((epoch, order));
                }
                Ok(records[self.orders[s].as_ref().unwrap().1[(k % len) as usize] as usize].clone())
            }
            SourceData::Stream(stream) => stream.record(seed ^ ((s as u64) << 32), k),
        }
    }

    /// The next example of the global stream, with the index of its source.
    pub fn next_example(&mut self) -> Result<(usize, Record), DataError> {
        let s = self.pick(self.position.next);
        let k = self.position.consumed[s];
        self.position.next += 1;
        self.position.consumed[s] += 1;
        let mut record = self.element(s, k)?;
        // Each epoch of a source shows each of its records once.
        let visit = k / self.sources[s].data.len() as u64;
        let format = &self.sources[s].format;
        if let Some(field) = &format.suffix_from {
            record.suffix = Some(draw_suffix(&record, field, self.seed, visit)?);
        }
        if let Some(field) = &format.shuffle_choices {
            shuffle_choices(&mut record, field, self.seed, visit)?;
        }
        if let Some(template) = &format.suffix {
            record.suffix = Some(fill_record(template, &record)?);
        }
        Ok((s, record))
    }

    /// The next `n` examples of the global stream (one optimizer update's worth: the
    /// pipeline deals them out to micro-batches and ranks).
    pub fn next_examples(&mut self, n: usize) -> Result<Vec<(usize, Record)>, DataError> {
        (0..n).map(|_| self.next_example()).collect()
    }
}

/// The target of `record`'s `visit`-th showing, drawn from its list field `field` as
/// big_vision's `choice_no_replacement`: every `n` visits take the `n` entries in a fresh
/// order, so each comes once before any comes again (duplicates, such as VQA's repeated
/// answers, keep their weight). A pure function of the seed, the record's file and line and
/// the visit, so a resumed stream draws the same targets.
fn draw_suffix(record: &Record, field: &str, seed: u64, visit: u64) -> Result<String, DataError> {
    let expected =
        || record.error(format!("the source draws its target from `{field}`: expected a non-empty list of strings"));
    let entries = match record.extra.get(field) {
        Some(serde_json::Value::Array(entries)) if !entries.is_empty() => entries,
        _ => return Err(expected()),
    };
    let n = entries.len() as u64;
    let mut order: Vec<usize> = (0..entries.len()).collect();
    order.shuffle(&mut rng_for(seed ^ record_key(record), SUFFIX_STREAM, visit / n));
    entries[order[(visit % n) as usize]].as_str().map(str::to_owned).ok_or_else(expected)
}

/// Sets `record`'s `indexed_choices` and `indexed_answer` for its `visit`-th showing: its
/// list field `field` in an order drawn from the seed, the record and the visit, lettered
/// `(A) x, (B) y`, and the letter its `answer` index now has (big_vision's
/// `sci_qa_choices_shuffle`).
fn shuffle_choices(record: &mut Record, field: &str, seed: u64, visit: u64) -> Result<(), DataError> {
    let bad = |what: &str| record.error(format!("the source shuffles the choices in `{field}`: {what}"));
    let choices: Vec<String> = match record.extra.get(field) {
        Some(serde_json::Value::Array(c)) if (1..=26).contains(&c.len()) => c
            .iter()
            .map(|c| c.as_str().map(str::to_owned))
            .collect::<Option<_>>()
            .ok_or_else(|| bad("expected strings"))?,
        _ => return Err(bad("expected a list of 1 to 26 strings")),
    };
    let answer = record.extra.get("answer").and_then(|a| a.as_u64()).filter(|&a| (a as usize) < choices.len());
    let answer = answer.ok_or_else(|| bad("expected `answer`, the index of the right one"))? as usize;
    let mut order: Vec<usize> = (0..choices.len()).collect();
    order.shuffle(&mut rng_for(seed ^ record_key(record), CHOICES_STREAM, visit));
    let indexed = lettered_choices(order.iter().map(|&c| choices[c].as_str()));
    let position = order.iter().position(|&c| c == answer).expect("the order holds every index");
    record.extra.insert("indexed_choices".into(), indexed.into());
    record.extra.insert("indexed_answer".into(), choice_letter(position).to_string().into());
    Ok(())
}

/// Choices as `sci_qa_choices_shuffle` writes them: `(A) x, (B) y, ...` (at most 26).
pub(crate) fn lettered_choices<'a>(choices: impl Iterator<Item = &'a str>) -> String {
    let lettered: Vec<String> = choices.enumerate().map(|(i, c)| format!("({}) {c}", choice_letter(i))).collect();
    lettered.join(", ")
}

/// The letter of choice `i` (0 is `A`).
pub(crate) fn choice_letter(i: usize) -> char {
    char::from(b'A' + i as u8)
}

/// FNV-1a of the record's file and line: a stable key, the same on every machine and build.
fn record_key(record: &Record) -> u64 {
    record
        .file
        .to_string_lossy()
        .bytes()
        .chain(record.line.to_le_bytes())
        .fold(0xCBF2_9CE4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01B3))
}

/// The generator streams of target draws and choice orders (0 picks sources, `1 + s`
/// orders source `s`, `u64::MAX` orders a streamed source's shards).
const SUFFIX_STREAM: u64 = u64::MAX - 1;
const CHOICES_STREAM: u64 = u64::MAX - 2;

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn source(name: &str, n: usize, weight: f64) -> MixtureSource {
        let records = (0..n)
            .map(|i| Record {
                image: crate::source::ImageData::File(PathBuf::from(format!("{name}-{i}.png"))),
                prefix: format!("{name} {i}"),
                suffix: None,
                extra: serde_json::Map::from_iter([("question".to_string(), serde_json::json!(format!("q{i}")))]),
                file: PathBuf::from(format!("{name}.jsonl")),
                line: i + 1,
            })
            .collect();
        MixtureSource { name: name.into(), data: SourceData::Memory(records), weight, format: TaskFormat::default() }
    }

    /// An example as (source, record prefix), comparable across runs.
    fn key(example: Result<(usize, Record), DataError>) -> (usize, String) {
        let (s, r) = example.unwrap();
        (s, r.prefix)
    }

    fn mixture() -> Mixture {
        Mixture::new(vec![source("a", 7, 1.0), source("b", 11, 3.0)], 42).unwrap()
    }

    #[test]
    fn run_lengths_become_steps() {
        assert_eq!(RunLength::Steps(7).steps(100, 8), 7);
        assert_eq!(RunLength::Examples(1000).steps(100, 8), 125);
        assert_eq!(RunLength::Epochs(2.5).steps(100, 8), 32, "250 examples: 31 full batches and a partial one");
    }

    #[test]
    fn weights_are_respected() {
        let mut m = mixture();
        let n = 20_000;
        let from_b = (0..n).filter(|_| m.next_example().unwrap().0 == 1).count() as f64;
        // Binomial(20000, 0.75): standard deviation ~61; allow 5 of them.
        assert!((from_b - 0.75 * n as f64).abs() < 5.0 * 61.3, "{from_b}");
    }

    #[test]
    fn each_epoch_visits_every_record_once() {
        let mut m = Mixture::new(vec![source("a", 7, 1.0)], 3).unwrap();
        let mut seen: Vec<usize> = (0..7).map(|_| m.next_example().unwrap().1.line - 1).collect();
        let first = seen.clone();
        seen.sort();
        assert_eq!(seen, (0..7).collect::<Vec<_>>());
        let second: Vec<usize> = (0..7).map(|_| m.next_example().unwrap().1.line - 1).collect();
        assert_ne!(first, second, "each epoch reshuffles");
    }

    #[test]
    fn same_seed_same_stream_other_seed_other_stream() {
        let run = |seed| {
            let mut m = Mixture::new(vec![source("a", 7, 1.0), source("b", 11, 3.0)], seed).unwrap();
            (0..100).map(|_| key(m.next_example())).collect::<Vec<_>>()
        };
        assert_eq!(run(1), run(1));
        assert_ne!(run(1), run(2));
    }

    #[test]
    fn resuming_from_a_position_continues_exactly() {
        let mut whole = mixture();
        let all: Vec<_> = (0..300).map(|_| key(whole.next_example())).collect();
        let mut first = mixture();
        for _ in 0..123 {
            first.next_example().unwrap();
        }
        let saved = serde_json::to_string(first.position()).unwrap();
        let mut resumed = mixture();
        resumed.seek(serde_json::from_str(&saved).unwrap()).unwrap();
        let rest: Vec<_> = (123..300).map(|_| key(resumed.next_example())).collect();
        assert_eq!(rest, all[123..]);
    }

    /// A source with `suffix_from = "answers"`: two records of four answers (one repeated).
    fn answering() -> Mixture {
        let mut a = source("a", 2, 1.0);
        let SourceData::Memory(records) = &mut a.data else { unreachable!() };
        for r in records.iter_mut() {
            r.extra.insert("answers".into(), serde_json::json!(["x", "y", "y", "z"]));
        }
        a.format.suffix_from = Some("answers".into());
        Mixture::new(vec![a], 5).unwrap()
    }

    /// (record line, drawn target) of the next `n` examples.
    fn drawn(m: &mut Mixture, n: usize) -> Vec<(usize, String)> {
        (0..n).map(|_| m.next_example().map(|(_, r)| (r.line, r.suffix.unwrap())).unwrap()).collect()
    }

    #[test]
    fn targets_are_drawn_per_visit_without_replacement() {
        let all = drawn(&mut answering(), 24); // 12 visits of each record: three rounds of 4
        for line in [1, 2] {
            let mine: Vec<&str> = all.iter().filter(|(l, _)| *l == line).map(|(_, s)| s.as_str()).collect();
            for round in mine.chunks(4) {
                let mut round = round.to_vec();
                round.sort();
                assert_eq!(round, ["x", "y", "y", "z"], "record {line}: each answer once a round: {mine:?}");
            }
            assert!(mine[..4] != mine[4..8] || mine[4..8] != mine[8..], "each round reorders: {mine:?}");
        }
        let mut first = answering();
        drawn(&mut first, 9);
        let mut resumed = answering();
        resumed.seek(first.position().clone()).unwrap();
        assert_eq!(drawn(&mut resumed, 15), all[9..], "a resumed stream draws the same targets");
        let mut m = answering();
        m.sources[0].format.suffix_from = Some("references".into());
        let err = m.next_example().unwrap_err().to_string();
        assert!(err.contains("a.jsonl:") && err.contains("`references`: expected a non-empty list"), "{err}");
    }

    /// ScienceQA's choices in a fresh order each visit, the answer's letter following its
    /// choice, and a target template over it; the same again after a resume.
    #[test]
    fn choices_are_reshuffled_per_visit_with_the_answer_letter_following() {
        let quiz = || {
            let mut a = source("a", 1, 1.0);
            let SourceData::Memory(records) = &mut a.data else { unreachable!() };
            records[0].extra.insert("choices".into(), serde_json::json!(["ant", "bee", "cat", "dog"]));
            records[0].extra.insert("answer".into(), serde_json::json!(2));
            a.format.shuffle_choices = Some("choices".into());
            a.format.suffix = Some("The answer is {indexed_answer}.".into());
            a.format.prefix = Some("Options: {indexed_choices}".into());
            Mixture::new(vec![a], 5).unwrap()
        };
        let mut m = quiz();
        let shown: Vec<(String, String)> = (0..12)
            .map(|_| {
                let (s, r) = m.next_example().unwrap();
                (m.sources()[s].format.prompt(&r).unwrap(), r.suffix.unwrap())
            })
            .collect();
        for (prompt, suffix) in &shown {
            let letter = suffix.strip_prefix("The answer is ").unwrap().trim_end_matches('.');
            assert!(prompt.contains(&format!("({letter}) cat")), "{prompt} / {suffix}");
            assert!(prompt.starts_with("Options: (A) ") && prompt.contains(", (D) "), "{prompt}");
        }
        let orders: std::collections::BTreeSet<_> = shown.iter().map(|(p, _)| p).collect();
        assert!(orders.len() > 4, "orders vary over visits: {orders:?}");
        let mut resumed = quiz();
        resumed.seek(MixturePosition { next: 7, consumed: vec![7] }).unwrap();
        let (_, r) = resumed.next_example().unwrap();
        assert_eq!(r.suffix.unwrap(), shown[7].1);
        let mut m = quiz();
        m.sources[0].format.shuffle_choices = Some("answers".into());
        let err = m.next_example().unwrap_err().to_string();
        assert!(err.contains("a.jsonl:1") && err.contains("`answers`: expected a list"), "{err}");
    }

    #[test]
    fn prompt_templates_fill_fields_and_name_missing_ones() {
        let SourceData::Memory(records) = source("a", 1, 1.0).data else { unreachable!() };
        let format = TaskFormat { prefix: Some("answer en {question}".into()), ..TaskFormat::default() };
        assert_eq!(format.prompt(&records[0]).unwrap(), "answer en q0");
        assert_eq!(TaskFormat::default().prompt(&records[0]).unwrap(), "a 0");
        let format = TaskFormat { prefix: Some("detect {classes}".into()), ..TaskFormat::default() };
        let err = format.prompt(&records[0]).unwrap_err().to_string();
        assert!(err.contains("a.jsonl:1") && err.contains("`classes`"), "{err}");
    }
}

#[cfg(test)]
mod stream_tests {
    use super::*;
    use std::path::PathBuf;

    /// 3 shards of 5 records: prefixes "s{shard} {i}".
    fn shards(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("pg2-stream-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for shard in 0..3 {
            let lines: String =
                (0..5).map(|i| format!("{{\"image\": \"x.png\", \"prefix\": \"s{shard} {i}\"}}\n")).collect();
            std::fs::write(dir.join(format!("{shard}.jsonl")), lines).unwrap();
        }
        dir
    }

    fn stream_mixture(dir: &Path, buffer: usize) -> Mixture {
        let data = SourceData::Stream(StreamSource::open(dir, buffer, OnBadLine::Error, &Default::default()).unwrap());
        Mixture::new(vec![MixtureSource { name: "s".into(), data, weight: 1.0, format: TaskFormat::default() }], 9)
            .unwrap()
    }

    fn prefixes(m: &mut Mixture, n: usize) -> Vec<String> {
        (0..n).map(|_| m.next_example().unwrap().1.prefix).collect()
    }

    /// Parquet files are counted from their footers, not by reading every row and image,
    /// unless bad rows are skipped. `plain.parquet` has three rows, the second without an image.
    #[test]
    fn parquet_sources_are_counted_from_their_footers_unless_bad_rows_are_skipped() {
        let plain = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/parquet/plain.parquet");
        let columns = Columns::default();
        let mut strict = StreamSource::open(&plain, 8, OnBadLine::Error, &columns).unwrap();
        assert_eq!(strict.len, 3);
        let err = (0..3).map(|k| strict.record(0, k)).find_map(Result::err).unwrap().to_string();
        assert!(
            err.ends_with("plain.parquet:2: `image`: no image (null)"),
            "the bad row stops the run when reached: {err}"
        );
        assert_eq!(StreamSource::open(&plain, 8, OnBadLine::Skip, &columns).unwrap().len, 2);
    }

    #[test]
    fn buffered_stream_shuffles_each_epoch_and_resumes_exactly() {
        let dir = shards("resume");
        let mut m = stream_mixture(&dir, 4);
        assert_eq!(m.total_records(), 15);
        let all = prefixes(&mut m, 45);
        let mut epoch: Vec<_> = all[..15].to_vec();
        epoch.sort();
        let mut want: Vec<String> = (0..3).flat_map(|s| (0..5).map(move |i| format!("s{s} {i}"))).collect();
        want.sort();
        assert_eq!(epoch, want, "every record once per epoch");
        assert_ne!(all[..15], all[15..30], "epochs differ");
        let mut resumed = stream_mixture(&dir, 4);
        let mut first = stream_mixture(&dir, 4);
        prefixes(&mut first, 22);
        resumed.seek(first.position().clone()).unwrap();
        assert_eq!(prefixes(&mut resumed, 23), all[22..]);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
