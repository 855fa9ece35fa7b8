//! A source's files and reading them a record at a time, whatever their kind: JSONL files
//! (or a folder of them), WebDataset tar shards ([`crate::webdataset`]) or parquet files
//! ([`crate::parquet`]).

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::parquet::{Columns, ParquetReader};
use crate::source::{parse_line, OnBadLine, Record};
use crate::webdataset::{Shard, ShardReader};
use crate::DataError;

/// One file of a source.
#[derive(Debug, Clone)]
pub(crate) enum SourceFile {
    Jsonl(PathBuf),
    Tar(Shard),
    Parquet(PathBuf),
}

impl SourceFile {
    /// The files a source path names, with their record counts where an index gives them:
    /// tar shards by a shard index ([`crate::webdataset::read_index`]), tar shards and
    /// parquet files by pattern ([`crate::webdataset::shards`]), a folder's `*.jsonl` shards,
    /// or one JSONL file.
    pub(crate) fn indexed(spec: &Path) -> Result<Vec<(SourceFile, Option<usize>)>, DataError> {
        let text = spec.to_string_lossy();
        if crate::webdataset::is_index(&text) {
            let shards = crate::webdataset::read_index(spec)?;
            return Ok(shards.into_iter().map(|(shard, count)| (SourceFile::Tar(shard), Some(count))).collect());
        }
        let files = if crate::webdataset::is_webdataset(&text) {
            crate::webdataset::shards(&text)?.into_iter().map(SourceFile::Tar).collect()
        } else if crate::parquet::is_parquet(&text) {
            crate::parquet::files(&text)?.into_iter().map(SourceFile::Parquet).collect()
        } else if spec.is_dir() {
            crate::source::shard_files(spec)?.into_iter().map(SourceFile::Jsonl).collect()
        } else {
            vec![SourceFile::Jsonl(spec.to_path_buf())]
        };
        Ok(files.into_iter().map(|file| (file, None)).collect())
    }

    /// The files a source path names, as [`SourceFile::indexed`] without the counts.
    pub(crate) fn all(spec: &Path) -> Result<Vec<SourceFile>, DataError> {
        Ok(Self::indexed(spec)?.into_iter().map(|(file, _)| file).collect())
    }

    /// The file's name, for messages.
    pub(crate) fn name(&self) -> String {
        match self {
            SourceFile::Tar(shard) => shard.name(),
            SourceFile::Jsonl(path) | SourceFile::Parquet(path) => path.display().to_string(),
        }
    }

    /// Starts reading the file.
    pub(crate) fn open(&self, policy: OnBadLine, columns: &Arc<Columns>) -> Result<Reading, DataError> {
        Ok(match self {
            SourceFile::Tar(shard) => Reading::Tar(ShardReader::open(shard, policy)?),
            SourceFile::Parquet(path) => Reading::Parquet(ParquetReader::open(path, columns.clone(), policy)?),
            SourceFile::Jsonl(path) => {
                let file = File::open(path)
                    .map_err(|e| DataError::File { path: path.display().to_string(), msg: e.to_string() })?;
                Reading::Lines { path: path.clone(), lines: BufReader::new(file).lines().enumerate(), policy }
            }
        })
    }
}

/// A file being read.
#[derive(Debug)]
pub(crate) enum Reading {
    Lines { path: PathBuf, lines: std::iter::Enumerate<std::io::Lines<BufReader<File>>>, policy: OnBadLine },
    Tar(ShardReader),
    Parquet(ParquetReader),
}

impl Reading {
    /// How many records the file holds: from a parquet footer (its rows, bad ones included),
    /// else by reading it through (for tar and JSONL without their images; good records).
    pub(crate) fn count(mut self) -> Result<usize, DataError> {
        if let Reading::Parquet(reader) = &self {
            return Ok(reader.total_rows());
        }
        let mut count = 0;
        while self.next_record()?.is_some() {
            count += 1;
        }
        Ok(count)
    }

    /// The file's next good record, or `None` at its end.
    pub(crate) fn next_record(&mut self) -> Result<Option<Record>, DataError> {
        let (path, lines, policy) = match self {
            Reading::Tar(reader) => return reader.next_record(),
            Reading::Parquet(reader) => return reader.next_record(),
            Reading::Lines { path, lines, policy } => (path, lines, *policy),
        };
        loop {
            match lines.next() {
                None => return Ok(None),
                Some((_, Err(e))) => {
                    return Err(DataError::File { path: path.display().to_string(), msg: e.to_string() })
                }
                Some((_, Ok(line))) if line.trim().is_empty() => {}
                Some((i, Ok(line))) => match parse_line(path, i + 1, &line) {
                    Ok(record) => return Ok(Some(record)),
                    Err(_) if policy == OnBadLine::Skip => {}
                    Err(e) => return Err(e),
                },
            }
        }
    }
}

/// Every record of a source path (JSONL, tar shards or parquet files, with `columns`
/// mapping parquet rows), in order, read a file at a time.
pub fn records(
    spec: &Path,
    policy: OnBadLine,
    columns: &Columns,
) -> Result<impl Iterator<Item = Result<Record, DataError>>, DataError> {
    let mut pending = SourceFile::all(spec)?.into_iter();
    let columns = Arc::new(columns.clone());
    let mut reading: Option<Reading> = None;
    Ok(std::iter::from_fn(move || loop {
        if reading.is_none() {
            reading = match pending.next()?.open(policy, &columns) {
                Ok(r) => Some(r),
                Err(e) => return Some(Err(e)),
            };
        }
        match reading.as_mut()?.next_record() {
            Ok(Some(record)) => return Some(Ok(record)),
            Ok(None) => reading = None,
            Err(e) => return Some(Err(e)),
        }
    }))
}
