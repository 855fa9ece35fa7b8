//! The input pipeline: a background thread walks the mixture one optimizer update at a
//! time, a pool of worker threads tokenizes the update's examples and decodes and resizes
//! the images of this rank's micro-batches in parallel, and finished batches wait in a
//! bounded queue, so the training step never waits on data when the machine has the cores.
//!
//! Each rank draws only its share of each update ([`Deal`]): records of in-memory sources
//! are dealt out of the global stream, streamed sources are read from the rank's own
//! files. The trainer sums the ranks' target-token counts.

use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

use rayon::prelude::*;
use tch::Device;

use crate::image::{self, Resize};
use crate::layout::{Batch, EncodedExample, Truncation, DEFAULT_MAX_TOKENS};
use crate::mixture::{Deal, Mixture, MixturePosition};
use crate::source::Record;
use crate::tokenizer::PgTokenizer;
use crate::DataError;

/// What to do with a record whose image is missing or corrupt (`error`, `skip`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnBadRecord {
    /// Stop with an error naming the record.
    #[default]
    Error,
    /// Count it and use another good example of the same batch in its place (a
    /// duplicate keeps the batch shape; one bad record among thousands changes nothing).
    Skip,
}

/// Pipeline settings.
#[derive(Debug, Clone)]
pub struct PipelineConfig {
    /// How images are resized (the square's side and antialiasing).
    pub resize: Resize,
    /// `<image>` placeholders per example.
    pub image_tokens: usize,
    /// Examples per micro-batch on this rank.
    pub batch_size: usize,
    /// Micro-batches per optimizer update (gradient accumulation).
    pub accumulation: usize,
    /// Sort this rank's share of each update by token count before cutting it into
    /// micro-batches: a micro-batch then holds examples of like length and pads little, and
    /// the update still sees exactly the examples it would without sorting.
    pub bucket_by_length: bool,
    /// This process's data-parallel rank and the number of ranks.
    pub rank: usize,
    pub world: usize,
    /// Decoding threads.
    pub workers: usize,
    /// Finished batches kept ready.
    pub prefetch: usize,
    /// Pad every batch to at least this many tokens (`None`: to its longest example).
    pub pad_to: Option<usize>,
    pub on_bad_record: OnBadRecord,
}

impl PipelineConfig {
    /// The share of the stream this rank takes.
    pub fn deal(&self) -> Deal {
        Deal { rank: self.rank, world: self.world, batch: self.batch_size }
    }
}

/// Counters a batch adds to the run's totals.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchStats {
    /// Records replaced because their image could not be read.
    pub skipped: usize,
    pub prefix_truncated: usize,
    pub suffix_truncated: usize,
    pub eos_dropped: usize,
    /// The batch's tokens, and its positions with padding.
    pub tokens: TokenCounts,
}

/// A batch ready for the model (on the CPU), with where the stream stands after it.
pub struct LoadedBatch {
    pub batch: Batch,
    /// The records, for evaluation and error messages.
    pub records: Vec<Record>,
    /// Where the stream stands after this batch's update: save it with a checkpoint taken
    /// after that update.
    pub position: MixturePosition,
    /// Target tokens of this rank's share of the update, all its micro-batches (summed over
    /// the ranks, per-token loss normalisation divides by it). Counted as drawn: a skipped
    /// record's stand-in is not recounted.
    pub rank_targets: usize,
    pub stats: BatchStats,
}

/// A running pipeline; batches come out in stream order.
pub struct Pipeline {
    batches: Receiver<Result<LoadedBatch, DataError>>,
    _producer: JoinHandle<()>,
}

impl Pipeline {
    /// Starts producing batches from `mixture`'s current position.
    pub fn start(mut mixture: Mixture, tokenizer: Arc<PgTokenizer>, config: PipelineConfig) -> Result<Self, DataError> {
        mixture.deal(config.deal())?;
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(config.workers.max(1))
            .thread_name(|i| format!("pg2-data-{i}"))
            .build()
            .map_err(|e| DataError::File { path: "data pipeline".into(), msg: e.to_string() })?;
        let (send, batches) = sync_channel(config.prefetch.max(1));
        let producer = std::thread::Builder::new()
            .name("pg2-data".into())
            .spawn(move || loop {
                let (micro_batches, rank_targets) = match next_update(&mut mixture, &tokenizer, &config, &pool) {
                    Ok(update) => update,
                    Err(e) => return drop(send.send(Err(e))),
                };
                for examples in micro_batches {
                    let loaded = pool.install(|| load_batch(&mixture, &tokenizer, &config, examples, rank_targets));
                    let failed = loaded.is_err();
                    if send.send(loaded).is_err() || failed {
                        return; // the consumer hung up, or the run must stop on this error
                    }
                }
            })
            .map_err(|e| DataError::File { path: "data pipeline".into(), msg: e.to_string() })?;
        Ok(Self { batches, _producer: producer })
    }

    /// The next batch (the stream is endless; the trainer decides when to stop).
    pub fn next_batch(&self) -> Result<LoadedBatch, DataError> {
        self.batches.recv().expect("the data thread ends only after sending an error")
    }
}

/// An example tokenized, its image not yet read.
#[derive(Clone)]
struct Encoded {
    record: Record,
    tokens: EncodedExample,
    truncation: Truncation,
}

/// An example ready to collate.
#[derive(Clone)]
struct Prepared {
    example: Encoded,
    pixels: Vec<f32>,
}

/// An example's image either decoded or not.
enum Outcome {
    Ready(Box<Prepared>),
    BadImage(DataError),
}

/// Draws this rank's share of the next update, tokenizes it, sorts it by length when
/// bucketing, and returns it cut into micro-batches, with its target count.
fn next_update(
    mixture: &mut Mixture,
    tok: &PgTokenizer,
    config: &PipelineConfig,
    pool: &rayon::ThreadPool,
) -> Result<(Vec<Vec<Encoded>>, usize), DataError> {
    let draws = mixture.next_examples(config.batch_size * config.world * config.accumulation.max(1))?;
    let sources = mixture.sources();
    let mut update: Vec<Encoded> = pool.install(|| {
        draws
            .into_par_iter()
            .map(|(s, record)| {
                let prompt = sources[s].format.prompt(&record)?;
                let (tokens, truncation) = EncodedExample::with_limits(
                    tok,
                    config.image_tokens,
                    &prompt,
                    record.suffix.as_deref(),
                    &sources[s].format.limits,
                );
                if tokens.ids.len() > DEFAULT_MAX_TOKENS {
                    let n = tokens.ids.len();
                    return Err(record.error(format!(
                        "{n} tokens, more than {DEFAULT_MAX_TOKENS}: set the source's or data's text_len (or max_prefix_tokens / max_suffix_tokens) to cut such texts"
                    )));
                }
                Ok(Encoded { record, tokens, truncation })
            })
            .collect::<Result<_, DataError>>()
    })?;
    if config.bucket_by_length {
        update.sort_by_key(|e| e.tokens.ids.len()); // stable: like lengths keep stream order
    }
    let targets = update.iter().map(|e| e.tokens.num_targets()).sum();
    Ok((update.chunks(config.batch_size).map(<[Encoded]>::to_vec).collect(), targets))
}

/// Token counts of a run of micro-batches.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TokenCounts {
    /// The examples' own tokens (image placeholders and text).
    pub real: usize,
    /// What the padded micro-batches hold, padding included.
    pub padded: usize,
}

/// Counts the tokens of this rank's micro-batches over the next `updates` updates, as the
/// pipeline would lay them out, without reading an image (`pg2 bench padding`).
pub fn count_tokens(
    mut mixture: Mixture,
    tok: &PgTokenizer,
    config: &PipelineConfig,
    updates: usize,
) -> Result<TokenCounts, DataError> {
    mixture.deal(config.deal())?;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(config.workers.max(1))
        .build()
        .map_err(|e| DataError::File { path: "data pipeline".into(), msg: e.to_string() })?;
    let mut counts = TokenCounts::default();
    for _ in 0..updates {
        for micro_batch in next_update(&mut mixture, tok, config, &pool)?.0 {
            let lengths = micro_batch.iter().map(|e| e.tokens.ids.len());
            let longest = lengths.clone().max().unwrap_or(0).max(config.pad_to.unwrap_or(0));
            counts.real += lengths.sum::<usize>();
            counts.padded += longest * micro_batch.len();
        }
    }
    Ok(counts)
}

fn load_batch(
    mixture: &Mixture,
    tok: &PgTokenizer,
    config: &PipelineConfig,
    examples: Vec<Encoded>,
    rank_targets: usize,
) -> Result<LoadedBatch, DataError> {
    let outcomes: Vec<Outcome> = examples.into_par_iter().map(|example| prepare(config, example)).collect();
    let mut stats = BatchStats::default();
    let ready: Vec<Prepared> =
        outcomes.iter().filter_map(|o| if let Outcome::Ready(p) = o { Some((**p).clone()) } else { None }).collect();
    let mut prepared = Vec::with_capacity(outcomes.len());
    for (i, outcome) in outcomes.into_iter().enumerate() {
        match outcome {
            Outcome::Ready(p) => prepared.push(*p),
            Outcome::BadImage(e) if config.on_bad_record == OnBadRecord::Error || ready.is_empty() => return Err(e),
            // A pure function of the batch, so every rank and every resumed run agrees.
            Outcome::BadImage(_) => {
                stats.skipped += 1;
                prepared.push(ready[i % ready.len()].clone());
            }
        }
    }
    let (mut records, mut pixels, mut tokens) = (vec![], vec![], vec![]);
    for Prepared { example, pixels: image } in prepared {
        stats.prefix_truncated += example.truncation.prefix as usize;
        stats.suffix_truncated += example.truncation.suffix as usize;
        stats.eos_dropped += example.truncation.eos_dropped as usize;
        records.push(example.record);
        pixels.push(image);
        tokens.push(example.tokens);
    }
    let pixels = image::stack(&pixels, config.resize.size);
    let batch = Batch::collate_to(&tokens, Some(pixels), tok.pad_id, Device::Cpu, config.pad_to);
    stats.tokens = TokenCounts { real: tokens.iter().map(|t| t.ids.len()).sum(), padded: batch.inputs.ids.numel() };
    Ok(LoadedBatch { batch, records, position: mixture.position().clone(), rank_targets, stats })
}

/// Decodes and resizes one example's image; a bad image is reported as such (the policy
/// decides).
fn prepare(config: &PipelineConfig, example: Encoded) -> Outcome {
    match example.record.load_image() {
        Ok(img) => Outcome::Ready(Box::new(Prepared { pixels: image::preprocess(&img, config.resize), example })),
        Err(e) => Outcome::BadImage(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mixture::{MixtureSource, SourceData, TaskFormat};
    use crate::source::read_jsonl;
    use std::path::{Path, PathBuf};

    fn tokenizer() -> Arc<PgTokenizer> {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/paligemma/tokenizer.json");
        Arc::new(PgTokenizer::from_file(&path).unwrap())
    }

    /// Six records with solid-colour images (grey level 10 * i); record 2's image is corrupt.
    fn dataset(name: &str) -> (PathBuf, Vec<Record>) {
        let dir = std::env::temp_dir().join(format!("pg2-pipeline-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut lines = String::new();
        for i in 0..6 {
            let file = format!("{i}.png");
            if i == 2 {
                std::fs::write(dir.join(&file), b"corrupt").unwrap();
            } else {
                let v = 10 * i as u8;
                ::image::RgbImage::from_pixel(9, 7, ::image::Rgb([v, v, v])).save(dir.join(&file)).unwrap();
            }
            lines +=
                &format!("{{\"image\": \"{file}\", \"prefix\": \"caption en\", \"suffix\": \"three\", \"n\": {i}}}\n");
        }
        std::fs::write(dir.join("data.jsonl"), lines).unwrap();
        let records = read_jsonl(&dir.join("data.jsonl")).unwrap();
        (dir, records)
    }

    fn config(on_bad_record: OnBadRecord) -> PipelineConfig {
        PipelineConfig {
            resize: Resize { size: 4, antialias: false, pad_to_square: false },
            image_tokens: 2,
            batch_size: 2,
            accumulation: 1,
            bucket_by_length: false,
            rank: 0,
            world: 1,
            workers: 2,
            prefetch: 2,
            pad_to: None,
            on_bad_record,
        }
    }

    fn mixture(records: &[Record]) -> Mixture {
        let format = TaskFormat::default();
        let data = SourceData::Memory(records.to_vec());
        Mixture::new(vec![MixtureSource { name: "s".into(), data, weight: 1.0, format }], 5).unwrap()
    }

    fn ids_of(b: &LoadedBatch) -> Vec<i64> {
        b.records.iter().map(|r| r.extra["n"].as_i64().unwrap()).collect()
    }

    #[test]
    fn batches_are_laid_out_token_by_token() {
        let (dir, records) = dataset("layout");
        let tok = tokenizer();
        let p = Pipeline::start(mixture(&records[..2]), tok.clone(), config(OnBadRecord::Error)).unwrap();
        let b = p.next_batch().unwrap();
        let prompt = tok.encode("caption en\n");
        let target = [tok.encode("three"), vec![tok.eos_id]].concat();
        let want_ids = [vec![tok.image_id; 2], vec![tok.bos_id], prompt.clone(), target.clone()].concat();
        let n = want_ids.len() as i64;
        let ids = Vec::<i64>::try_from(b.batch.inputs.ids.view([-1])).unwrap();
        assert_eq!(ids, [want_ids.clone(), want_ids].concat());
        let prompt_len = 3 + prompt.len();
        let mask_ar: Vec<i64> = (0..n as usize).map(|i| (i >= prompt_len) as i64).collect();
        assert_eq!(Vec::<i64>::try_from(b.batch.inputs.layout.mask_ar.get(0)).unwrap(), mask_ar);
        let loss: Vec<bool> = mask_ar.iter().map(|&m| m == 1).collect();
        assert_eq!(Vec::<bool>::try_from(b.batch.loss_mask.get(1)).unwrap(), loss);
        assert_eq!(b.batch.inputs.pixels.as_ref().unwrap().size(), [2, 3, 4, 4]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn fixed_length_padding_is_masked_out() {
        let (dir, records) = dataset("pad");
        let tok = tokenizer();
        let p = Pipeline::start(
            mixture(&records[..2]),
            tok.clone(),
            PipelineConfig { pad_to: Some(40), ..config(OnBadRecord::Error) },
        )
        .unwrap();
        let b = p.next_batch().unwrap();
        assert_eq!(b.batch.inputs.ids.size(), [2, 40]);
        let row = Vec::<i64>::try_from(b.batch.inputs.ids.get(0)).unwrap();
        let valid = Vec::<bool>::try_from(b.batch.inputs.layout.valid.get(0)).unwrap();
        let real = valid.iter().filter(|&&v| v).count();
        assert!(row[real..].iter().all(|&id| id == tok.pad_id));
        assert!(!Vec::<bool>::try_from(b.batch.loss_mask.get(0)).unwrap()[real..].contains(&true));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn stream_is_deterministic_and_resumes_exactly() {
        let (dir, records) = dataset("resume");
        let good: Vec<Record> = records.iter().filter(|r| r.line != 3).cloned().collect();
        let run = |m: Mixture, n: usize| {
            let p = Pipeline::start(m, tokenizer(), config(OnBadRecord::Error)).unwrap();
            (0..n).map(|_| p.next_batch().unwrap()).collect::<Vec<_>>()
        };
        let whole = run(mixture(&good), 6);
        assert_eq!(
            whole.iter().map(ids_of).collect::<Vec<_>>(),
            run(mixture(&good), 6).iter().map(ids_of).collect::<Vec<_>>()
        );
        let mut resumed = mixture(&good);
        resumed.seek(whole[2].position.clone()).unwrap();
        let rest = run(resumed, 3);
        assert_eq!(rest.iter().map(ids_of).collect::<Vec<_>>(), whole[3..].iter().map(ids_of).collect::<Vec<_>>());
        assert!(rest[0].batch.inputs.pixels.as_ref().unwrap().equal(whole[3].batch.inputs.pixels.as_ref().unwrap()));
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// Twelve records of one good image whose targets are 1 to 12 words long, in a
    /// shuffled order.
    fn varied_lengths(name: &str) -> (PathBuf, Vec<Record>) {
        let (dir, records) = dataset(name);
        let varied = [7, 2, 11, 5, 9, 1, 12, 4, 8, 3, 10, 6]
            .iter()
            .map(|&words| {
                let mut r = records[1].clone();
                r.suffix = Some(vec!["three"; words].join(" "));
                r.extra.insert("n".into(), words.into());
                r
            })
            .collect();
        (dir, varied)
    }

    /// The records of `updates` updates, as `[update][micro-batch][rank]` lists of ids.
    fn deal(records: &[Record], config: &PipelineConfig, updates: usize) -> Vec<Vec<Vec<Vec<i64>>>> {
        let pipelines: Vec<Pipeline> = (0..config.world)
            .map(|rank| {
                Pipeline::start(mixture(records), tokenizer(), PipelineConfig { rank, ..config.clone() }).unwrap()
            })
            .collect();
        (0..updates)
            .map(|_| {
                (0..config.accumulation)
                    .map(|_| pipelines.iter().map(|p| ids_of(&p.next_batch().unwrap())).collect())
                    .collect()
            })
            .collect()
    }

    #[test]
    fn ranks_and_micro_batches_take_the_stream_in_order() {
        let (dir, records) = varied_lengths("deal");
        let config = PipelineConfig { batch_size: 2, world: 3, accumulation: 2, ..config(OnBadRecord::Error) };
        let dealt: Vec<i64> = deal(&records, &config, 2).into_iter().flatten().flatten().flatten().collect();
        let mut stream = mixture(&records);
        let want: Vec<i64> =
            stream.next_examples(24).unwrap().iter().map(|(_, r)| r.extra["n"].as_i64().unwrap()).collect();
        assert_eq!(dealt, want);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn bucketing_sorts_each_update_and_keeps_its_examples() {
        let (dir, records) = varied_lengths("bucket");
        let plain = PipelineConfig { batch_size: 2, world: 2, accumulation: 3, ..config(OnBadRecord::Error) };
        let bucketed = PipelineConfig { bucket_by_length: true, ..plain.clone() };
        let (a, b) = (deal(&records, &plain, 2), deal(&records, &bucketed, 2));
        assert_eq!(a.len(), b.len(), "as many updates either way");
        for (plain, sorted) in a.iter().zip(&b) {
            let rank = |u: &Vec<Vec<Vec<i64>>>, r: usize| u.iter().flat_map(|m| m[r].clone()).collect::<Vec<_>>();
            for r in 0..2 {
                let (mut unsorted, sorted) = (rank(plain, r), rank(sorted, r));
                assert!(sorted.is_sorted(), "longer targets come later in the rank's update: {sorted:?}");
                unsorted.sort();
                assert_eq!(unsorted, sorted, "the same examples");
            }
        }
        // Padding: the micro-batches' padded tokens, summed over the first update.
        let padded = |config: &PipelineConfig| {
            let p = Pipeline::start(mixture(&records), tokenizer(), config.clone()).unwrap();
            let batches: Vec<LoadedBatch> = (0..3).map(|_| p.next_batch().unwrap()).collect();
            let targets: i64 = batches.iter().map(|b| b.batch.loss_mask.sum(tch::Kind::Int64).int64_value(&[])).sum();
            assert!(batches.iter().all(|b| b.rank_targets == batches[0].rank_targets));
            (batches.iter().map(|b| b.batch.inputs.ids.numel()).sum::<usize>(), targets, batches[0].rank_targets)
        };
        let world1 = |c: &PipelineConfig| PipelineConfig { batch_size: 4, world: 1, ..c.clone() };
        let ((plain_tokens, plain_targets, plain_update), (sorted_tokens, sorted_targets, sorted_update)) =
            (padded(&world1(&plain)), padded(&world1(&bucketed)));
        assert!(sorted_tokens < plain_tokens, "{sorted_tokens} vs {plain_tokens}");
        for (config, tokens) in [(world1(&plain), plain_tokens), (world1(&bucketed), sorted_tokens)] {
            assert_eq!(
                count_tokens(mixture(&records), &tokenizer(), &config, 1).unwrap().padded,
                tokens,
                "counted as laid out"
            );
        }
        assert_eq!((plain_targets, sorted_targets), (plain_update as i64, sorted_update as i64));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn bad_images_stop_the_run_or_are_skipped_and_counted() {
        let (dir, records) = dataset("bad");
        let p = Pipeline::start(mixture(&records), tokenizer(), config(OnBadRecord::Error)).unwrap();
        let err = (0..3).find_map(|_| p.next_batch().err()).expect("record 2 is met in the first epoch").to_string();
        assert!(err.contains("data.jsonl:3") && err.contains("2.png"), "{err}");
        let p = Pipeline::start(mixture(&records), tokenizer(), config(OnBadRecord::Skip)).unwrap();
        let batches: Vec<_> = (0..3).map(|_| p.next_batch().unwrap()).collect();
        assert_eq!(batches.iter().map(|b| b.stats.skipped).sum::<usize>(), 1);
        let seen: Vec<i64> = batches.iter().flat_map(ids_of).collect();
        assert!(!seen.contains(&2), "{seen:?}");
        assert_eq!(seen.len(), 6, "the batch keeps its size");
        let mut distinct = seen.clone();
        distinct.sort();
        distinct.dedup();
        assert_eq!(distinct.len(), 5, "one good record stands in for record 2: {seen:?}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
