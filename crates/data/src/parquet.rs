//! Parquet files as a source, in the layout Hugging Face datasets writes
//! (`data/train-00000-of-00005.parquet`): one row an example, the image in a column of
//! type `struct{bytes, path}` (or plain binary), every other column a field. A source names
//! its files as tar shards are named (`train-{00000..00004}-of-00005.parquet`,
//! `train-*.parquet`); they are streamed a row group at a time.
//!
//! [`Columns`] maps the rows onto records: which column holds the image, the prompt and
//! target as templates over the columns (`prefix = "answer en {question}"`,
//! `suffix = "{answer}"`), and further fields a metric needs (`answers = "answers"` copies
//! a column as it is). Without a mapping the columns `image`, `prefix` and `suffix` are
//! used. Every other column is kept as a field too, its value as JSON.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::{Array, RecordBatch};
use arrow_schema::DataType;
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::source::{fill_template, template_fields, ImageData, OnBadLine, Record};
use crate::DataError;

/// Rows decoded at a time: images make rows large, so batches stay small.
const ROWS_PER_BATCH: usize = 64;

/// How a parquet file's columns become a record: `image` names the image column; `prefix`
/// and `suffix` and any other key are a template such as `"answer en {question}"` (when
/// they hold a `{`) or the name of a column whose value is copied as it is.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct Columns(pub BTreeMap<String, String>);

impl Columns {
    fn image(&self) -> &str {
        self.0.get("image").map_or("image", String::as_str)
    }

    /// The columns a mapping value reads: a template's fields, or the column it names.
    fn reads(value: &str) -> Result<Vec<String>, String> {
        match value.contains('{') {
            true => template_fields(value),
            false => Ok(vec![value.to_string()]),
        }
    }
}

/// Whether a source path names parquet files.
pub fn is_parquet(spec: &str) -> bool {
    spec.ends_with(".parquet")
}

/// The parquet files a source path names, in order (see [`crate::webdataset::shards`] for
/// the patterns); they must be local files, as parquet is read from its footer.
pub fn files(spec: &str) -> Result<Vec<PathBuf>, DataError> {
    crate::webdataset::shards(spec)?
        .into_iter()
        .map(|shard| match shard {
            crate::webdataset::Shard::File(path) => Ok(path),
            crate::webdataset::Shard::Pipe(_) => Err(DataError::File {
                path: spec.to_string(),
                msg: "parquet is read from the end of the file, so `pipe:` cannot stream it; copy the files to \
                      local disk first"
                    .into(),
            }),
        })
        .collect()
}

/// The rows of one parquet file, read a batch at a time.
pub struct ParquetReader {
    path: PathBuf,
    columns: Arc<Columns>,
    policy: OnBadLine,
    /// In a mutex only so that a mixture holding the reader can be shared between threads
    /// (the reader is `Send` but not `Sync`); reads take `&mut self` and never lock.
    batches: std::sync::Mutex<ParquetRecordBatchReader>,
    /// The rows of the current batch, as records (or the error each row gives).
    pending: std::vec::IntoIter<Result<Record, DataError>>,
    /// Rows read so far (a record's `line` is its 1-based row number).
    rows: usize,
    /// Rows in the file, from its footer.
    total_rows: usize,
}

impl std::fmt::Debug for ParquetReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ParquetReader({}, {} rows read)", self.path.display(), self.rows)
    }
}

impl ParquetReader {
    /// Opens `path` and checks that `columns` names only columns it has.
    pub fn open(path: &Path, columns: Arc<Columns>, policy: OnBadLine) -> Result<ParquetReader, DataError> {
        let err = |msg: String| DataError::File { path: path.display().to_string(), msg };
        let file = File::open(path).map_err(|e| err(e.to_string()))?;
        let builder = ParquetRecordBatchReaderBuilder::try_new(file)
            .map_err(|e| err(format!("not a readable parquet file: {e}")))?;
        let schema = builder.schema().clone();
        let total_rows = usize::try_from(builder.metadata().file_metadata().num_rows()).unwrap_or(0);
        let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
        let image = columns.image();
        match schema.field_with_name(image).map(|f| f.data_type()) {
            Err(_) => {
                return Err(err(format!(
                    "no image column `{image}` (columns: {}); name it with columns.image",
                    names.join(", ")
                )))
            }
            Ok(DataType::Struct(_) | DataType::Binary | DataType::LargeBinary | DataType::BinaryView) => {}
            Ok(other) => {
                return Err(err(format!("image column `{image}` is {other}, expected struct{{bytes, path}} or binary")))
            }
        }
        for (key, value) in columns.0.iter().filter(|(key, _)| *key != "image") {
            for column in Columns::reads(value).map_err(|msg| err(format!("columns.{key} = {value:?}: {msg}")))? {
                if !names.contains(&column.as_str()) {
                    return Err(err(format!(
                        "columns.{key} = {value:?} reads column `{column}`, which the file lacks (columns: {})",
                        names.join(", ")
                    )));
                }
            }
        }
        let batches = builder
            .with_batch_size(ROWS_PER_BATCH)
            .build()
            .map_err(|e| err(format!("not a readable parquet file: {e}")))?;
        Ok(ParquetReader {
            path: path.to_path_buf(),
            columns,
            policy,
            batches: std::sync::Mutex::new(batches),
            pending: Vec::new().into_iter(),
            rows: 0,
            total_rows,
        })
    }

    /// The rows the file holds, from its footer without reading one. A bad row stops the
    /// run when it is reached, or with `OnBadLine::Skip` keeps its place in the count (a
    /// streamed source puts a stand-in there: see [`crate::StreamSource`]).
    pub fn total_rows(&self) -> usize {
        self.total_rows
    }

    /// The next good row as a record, or `None` at the file's end. A row that is not a
    /// valid record is an error naming the file and row, or is passed over with
    /// `OnBadLine::Skip`.
    pub fn next_record(&mut self) -> Result<Option<Record>, DataError> {
        loop {
            match self.pending.next() {
                Some(Ok(record)) => return Ok(Some(record)),
                Some(Err(_)) if self.policy == OnBadLine::Skip => continue,
                Some(Err(e)) => return Err(e),
                None => {}
            }
            let batches = self.batches.get_mut().unwrap_or_else(|poisoned| poisoned.into_inner());
            let Some(batch) = batches.next() else { return Ok(None) };
            let batch = batch.map_err(|e| DataError::File {
                path: self.path.display().to_string(),
                msg: format!("after row {}: {e}", self.rows),
            })?;
            self.pending = self.records(&batch)?.into_iter();
        }
    }

    /// A batch's rows as records.
    fn records(&mut self, batch: &RecordBatch) -> Result<Vec<Result<Record, DataError>>, DataError> {
        let file_err = |msg: String| DataError::File { path: self.path.display().to_string(), msg };
        let image_column = self.columns.image();
        let (index, _) = batch.schema().column_with_name(image_column).expect("checked when opened");
        let images = batch.column(index).clone();
        let mut rest = batch.clone();
        rest.remove_column(index);
        let mut json = arrow_json::WriterBuilder::new()
            .with_explicit_nulls(false)
            .build::<_, arrow_json::writer::LineDelimited>(Vec::new());
        json.write(&rest).map_err(|e| file_err(format!("rows after {}: {e}", self.rows)))?;
        json.finish().map_err(|e| file_err(e.to_string()))?;
        let text = json.into_inner();
        let lines: Vec<&[u8]> = text.split(|&b| b == b'\n').filter(|l| !l.is_empty()).collect();
        if lines.len() != batch.num_rows() {
            // Never lose rows silently: each row, even one without fields, is a `{}` line.
            return Err(file_err(format!(
                "rows after {}: {} rows read as {} objects",
                self.rows,
                batch.num_rows(),
                lines.len()
            )));
        }
        let dir = self.path.parent().unwrap_or(Path::new(".")).to_path_buf();
        let mut out = Vec::with_capacity(batch.num_rows());
        for (i, line) in lines.into_iter().enumerate() {
            let row = self.rows + i + 1;
            let record_err = |msg: String| DataError::Record { path: self.path.display().to_string(), line: row, msg };
            let fields = match serde_json::from_slice::<Value>(line) {
                Ok(Value::Object(map)) => map,
                other => return Err(record_err(format!("columns not readable as JSON: {other:?}"))),
            };
            let image = image_at(&images, i, &dir, row).map_err(|msg| record_err(format!("`{image_column}`: {msg}")));
            out.push(image.and_then(|image| self.record(image, fields, row).map_err(record_err)));
        }
        self.rows += batch.num_rows();
        Ok(out)
    }

    /// One row's fields as a record, mapped through the columns.
    fn record(&self, image: ImageData, mut fields: Map<String, Value>, row: usize) -> Result<Record, String> {
        let mut mapped = Map::new();
        for (key, value) in self.columns.0.iter().filter(|(key, _)| *key != "image") {
            let field = match value.contains('{') {
                true => Value::String(fill_template(value, |name| fields.get(name).map(json_text))?),
                false => fields.get(value).cloned().unwrap_or(Value::Null),
            };
            mapped.insert(key.clone(), field);
        }
        fields.extend(mapped);
        let mut text = |key: &str| match fields.remove(key) {
            Some(Value::String(s)) => Ok(Some(s)),
            None | Some(Value::Null) => Ok(None),
            Some(other) => Err(format!("`{key}` must be a string, found {other}")),
        };
        let prefix = text("prefix")?.unwrap_or_default();
        let suffix = text("suffix")?;
        Ok(Record { image, prefix, suffix, extra: fields, file: self.path.clone(), line: row })
    }
}

/// A field's value as template text: strings as they are, anything else as JSON.
pub(crate) fn json_text(value: &Value) -> String {
    value.as_str().map(str::to_string).unwrap_or_else(|| value.to_string())
}

/// Row `i`'s image: the bytes of a binary column or of the `bytes` field of a
/// `struct{bytes, path}`, or else the file `path` names (relative to the parquet file).
fn image_at(column: &Arc<dyn Array>, i: usize, dir: &Path, row: usize) -> Result<ImageData, String> {
    let name = format!("row {row}");
    let bytes = |array: &dyn Array| -> Option<Vec<u8>> {
        if array.is_null(i) {
            return None;
        }
        match array.data_type() {
            DataType::Binary => Some(array.as_binary::<i32>().value(i).to_vec()),
            DataType::LargeBinary => Some(array.as_binary::<i64>().value(i).to_vec()),
            DataType::BinaryView => Some(array.as_binary_view().value(i).to_vec()),
            _ => None,
        }
    };
    if column.is_null(i) {
        return Err("no image (null)".into());
    }
    let DataType::Struct(_) = column.data_type() else {
        return bytes(column.as_ref())
            .map(|data| ImageData::Bytes { name, data: Arc::new(data) })
            .ok_or_else(|| format!("expected image bytes, found {}", column.data_type()));
    };
    let image = column.as_struct();
    if let Some(data) = image.column_by_name("bytes").and_then(|b| bytes(b.as_ref())) {
        return Ok(ImageData::Bytes { name, data: Arc::new(data) });
    }
    let path = image.column_by_name("path").filter(|p| !p.is_null(i)).and_then(|p| match p.data_type() {
        DataType::Utf8 => Some(p.as_string::<i32>().value(i).to_string()),
        DataType::LargeUtf8 => Some(p.as_string::<i64>().value(i).to_string()),
        DataType::Utf8View => Some(p.as_string_view().value(i).to_string()),
        _ => None,
    });
    path.map(|p| ImageData::File(dir.join(p))).ok_or_else(|| "neither `bytes` nor `path` is set".into())
}

/// Records per written row group: small, as rows hold images.
const ROWS_PER_GROUP: usize = 256;

/// Writes `records` as parquet files of `per_file` rows in `dir` (`part-00000.parquet`, ...,
/// each written atomically) in Hugging Face's layout: the image as `struct{bytes, path}`
/// (bytes only), then `prefix`, `suffix` and every other field as columns, their types
/// inferred from each file's first rows (a later row with a field those lack is an error
/// naming it). Returns the files written.
pub fn write_files(
    records: impl IntoIterator<Item = Result<Record, DataError>>,
    dir: &Path,
    per_file: usize,
) -> Result<Vec<PathBuf>, DataError> {
    std::fs::create_dir_all(dir)
        .map_err(|e| DataError::File { path: dir.display().to_string(), msg: e.to_string() })?;
    let per_file = per_file.max(1);
    let (mut written, mut open, mut rows, mut in_file) = (vec![], None::<OpenFile>, vec![], 0);
    let flush = |open: &mut Option<OpenFile>, rows: &mut Vec<Record>, written: usize| -> Result<(), DataError> {
        let path = dir.join(format!("part-{written:05}.parquet"));
        let file = match open.take() {
            Some(file) => file,
            None => OpenFile::new(path, rows)?,
        };
        *open = Some(file.write(std::mem::take(rows))?);
        Ok(())
    };
    for record in records {
        rows.push(record?);
        in_file += 1;
        if rows.len() == ROWS_PER_GROUP || in_file == per_file {
            flush(&mut open, &mut rows, written.len())?;
        }
        if in_file == per_file {
            written.push(open.take().expect("a file is open").finish()?);
            in_file = 0;
        }
    }
    if !rows.is_empty() {
        flush(&mut open, &mut rows, written.len())?;
    }
    if let Some(file) = open {
        written.push(file.finish()?);
    }
    Ok(written)
}

/// The source path naming the `count` files [`write_files`] wrote in `dir`
/// (`dir/part-{00000..00002}.parquet`).
pub fn files_pattern(dir: &Path, count: usize) -> PathBuf {
    dir.join(format!("part-{{00000..{:05}}}.parquet", count.saturating_sub(1)))
}

/// A parquet file being written.
struct OpenFile {
    path: PathBuf,
    staged: crate::files::Staged,
    writer: parquet::arrow::ArrowWriter<File>,
    schema: arrow_schema::SchemaRef,
    /// The schema of the fields beside the image.
    fields: arrow_schema::SchemaRef,
}

impl OpenFile {
    /// Starts a file whose field columns are typed from `rows`.
    fn new(path: PathBuf, rows: &[Record]) -> Result<OpenFile, DataError> {
        let err = |msg: String| DataError::File { path: path.display().to_string(), msg };
        let values: Vec<Value> = rows.iter().map(|r| Value::Object(field_row(r))).collect();
        let fields = arrow_json::reader::infer_json_schema_from_iterator(values.iter().map(Ok))
            .map_err(|e| err(format!("typing the fields: {e}")))?;
        let image = arrow_schema::Field::new("image", DataType::Struct(image_fields()), true);
        let columns: Vec<_> = std::iter::once(Arc::new(image)).chain(fields.fields().iter().cloned()).collect();
        let schema = Arc::new(arrow_schema::Schema::new(columns));
        let staged = crate::files::Staged::new(&path).map_err(|e| err(e.to_string()))?;
        let file = File::create(staged.path()).map_err(|e| err(e.to_string()))?;
        let properties = parquet::file::properties::WriterProperties::builder()
            .set_compression(parquet::basic::Compression::SNAPPY)
            .build();
        let writer = parquet::arrow::ArrowWriter::try_new(file, schema.clone(), Some(properties))
            .map_err(|e| err(e.to_string()))?;
        Ok(OpenFile { path, staged, writer, schema, fields: Arc::new(fields) })
    }

    /// Writes `rows` as one row group.
    fn write(mut self, rows: Vec<Record>) -> Result<OpenFile, DataError> {
        let path = self.path.display().to_string();
        let err = |msg: String| DataError::File { path: path.clone(), msg };
        let values: Vec<Value> = rows.iter().map(|r| Value::Object(field_row(r))).collect();
        let mut decoder = arrow_json::ReaderBuilder::new(self.fields.clone())
            .with_strict_mode(true)
            .build_decoder()
            .map_err(|e| err(e.to_string()))?;
        decoder.serialize(&values).map_err(|e| err(format!("a row does not fit the file's first rows: {e}")))?;
        let fields = decoder.flush().map_err(|e| err(e.to_string()))?.expect("rows were given");
        let mut bytes = Vec::with_capacity(rows.len());
        for record in &rows {
            bytes.push(crate::webdataset::image_bytes(record)?);
        }
        let image = arrow_array::StructArray::new(
            image_fields(),
            vec![
                Arc::new(arrow_array::BinaryArray::from_iter_values(&bytes)),
                Arc::new(arrow_array::StringArray::new_null(rows.len())),
            ],
            None,
        );
        let columns: Vec<Arc<dyn Array>> =
            std::iter::once(Arc::new(image) as _).chain(fields.columns().iter().cloned()).collect();
        let batch = RecordBatch::try_new(self.schema.clone(), columns).map_err(|e| err(e.to_string()))?;
        self.writer.write(&batch).map_err(|e| err(e.to_string()))?;
        self.writer.flush().map_err(|e| err(e.to_string()))?; // one row group per call
        Ok(self)
    }

    fn finish(self) -> Result<PathBuf, DataError> {
        let path = self.path;
        let err = |msg: String| DataError::File { path: path.display().to_string(), msg };
        self.writer.close().map_err(|e| err(e.to_string()))?;
        self.staged.commit().map_err(|e| err(e.to_string()))?;
        Ok(path)
    }
}

/// The fields of Hugging Face's `Image` feature.
fn image_fields() -> arrow_schema::Fields {
    vec![
        arrow_schema::Field::new("bytes", DataType::Binary, true),
        arrow_schema::Field::new("path", DataType::Utf8, true),
    ]
    .into()
}

/// A record's text and fields as one JSON object (the image left out).
fn field_row(record: &Record) -> Map<String, Value> {
    let mut row = Map::new();
    row.insert("prefix".into(), Value::String(record.prefix.clone()));
    if let Some(suffix) = &record.suffix {
        row.insert("suffix".into(), Value::String(suffix.clone()));
    }
    row.extend(record.extra.clone());
    row
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/parquet").join(name)
    }

    fn columns(pairs: &[(&str, &str)]) -> Columns {
        Columns(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect())
    }

    fn read(spec: &Path, columns: &Columns, policy: OnBadLine) -> Result<Vec<Record>, DataError> {
        crate::stream::records(spec, policy, columns)?.collect()
    }

    /// Files written by Hugging Face datasets' features (`Image` as struct{bytes, path},
    /// two rows a row group) read through a mapping, in order over both files.
    #[test]
    fn hugging_face_files_map_columns_onto_records() {
        let spec = fixture("train-{00000..00001}-of-00002.parquet");
        let mapping = columns(&[("prefix", "answer en {question}"), ("suffix", "{answer}"), ("references", "answers")]);
        let records = read(&spec, &mapping, OnBadLine::Error).unwrap();
        assert_eq!(records.len(), 5);
        let r = &records[3];
        assert_eq!((r.prefix.as_str(), r.suffix.as_deref()), ("answer en what colour is image 3?", Some("yellow")));
        assert_eq!(r.extra["references"], serde_json::json!(["yellow"]));
        assert_eq!(r.extra["question_id"], 103);
        assert_eq!(r.extra["question"], "what colour is image 3?", "unmapped columns stay fields");
        assert!(!r.extra.contains_key("image"));
        assert_eq!((r.file.file_name().unwrap().to_str().unwrap(), r.line), ("train-00001-of-00002.parquet", 1));
        let colours: Vec<[u8; 3]> = records.iter().map(|r| r.load_image().unwrap().get_pixel(1, 1).0).collect();
        assert_eq!(colours, [[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [0, 255, 255]]);
        let globbed = read(&fixture("train-*.parquet"), &mapping, OnBadLine::Error).unwrap();
        assert_eq!(globbed, records);
    }

    /// Without a mapping the `image`, `prefix` and `suffix` columns are read; a row without
    /// an image is an error naming file and row (or is skipped), and one whose bytes are no
    /// image fails when loaded, named so.
    #[test]
    fn bad_rows_name_file_and_row() {
        for name in ["plain.parquet", "plain-zstd.parquet"] {
            bad_rows_of(name);
        }
    }

    fn bad_rows_of(name: &str) {
        let plain = fixture(name);
        let err = read(&plain, &Columns::default(), OnBadLine::Error).unwrap_err().to_string();
        assert!(err.ends_with(&format!("{name}:2: `image`: no image (null)")), "{err}");
        let records = read(&plain, &Columns::default(), OnBadLine::Skip).unwrap();
        assert_eq!(records.len(), 2);
        assert_eq!((records[0].prefix.as_str(), records[0].suffix.as_deref()), ("caption en", Some("a red square")));
        assert_eq!(records[0].load_image().unwrap().get_pixel(0, 0).0, [255, 0, 0]);
        let err = records[1].load_image().unwrap_err().to_string();
        assert!(err.contains(&format!("{name}:3: row 3:")), "{err}");
    }

    /// Records written as parquet read back the same: texts, list and number fields, images.
    #[test]
    fn written_files_read_back_the_same_records() {
        let mapping = columns(&[("prefix", "answer en {question}"), ("suffix", "{answer}")]);
        let records = read(&fixture("train-*.parquet"), &mapping, OnBadLine::Error).unwrap();
        let dir = std::env::temp_dir().join(format!("pg2-parquet-write-{}", std::process::id()));
        let files = write_files(records.clone().into_iter().map(Ok), &dir, 2).unwrap();
        assert_eq!(files.len(), 3);
        let pattern = files_pattern(&dir, files.len());
        assert!(pattern.ends_with("part-{00000..00002}.parquet"), "{}", pattern.display());
        let back = read(&pattern, &Columns::default(), OnBadLine::Error).unwrap();
        assert_eq!(back.len(), records.len());
        for (a, b) in records.iter().zip(&back) {
            assert_eq!((&a.prefix, &a.suffix, &a.extra), (&b.prefix, &b.suffix, &b.extra));
            assert_eq!(a.load_image().unwrap(), b.load_image().unwrap());
        }
        let mut odd = records[4].clone();
        odd.extra.insert("extra_field".into(), Value::from(1));
        let first_group = std::iter::repeat_n(records[0].clone(), ROWS_PER_GROUP);
        let err = write_files(first_group.chain([odd]).map(Ok), &dir, 1000).unwrap_err().to_string();
        assert!(err.contains("part-00000.parquet") && err.contains("extra_field"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// A file of images alone (an unlabelled set, prompts from the source's template) gives
    /// one record per row, with no fields.
    #[test]
    fn a_file_of_images_alone_reads_every_row() {
        let dir = std::env::temp_dir().join(format!("pg2-parquet-images-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("images.parquet");
        let png = |v: u8| {
            let mut bytes = std::io::Cursor::new(Vec::new());
            image::RgbImage::from_pixel(2, 2, image::Rgb([v, 0, 0]))
                .write_to(&mut bytes, image::ImageFormat::Png)
                .unwrap();
            bytes.into_inner()
        };
        let pngs: Vec<Vec<u8>> = (0..3).map(|i| png(i * 100)).collect();
        let column = arrow_array::BinaryArray::from_iter_values(pngs.iter());
        let batch = RecordBatch::try_from_iter([("image", Arc::new(column) as arrow_array::ArrayRef)]).unwrap();
        let mut writer =
            parquet::arrow::ArrowWriter::try_new(File::create(&path).unwrap(), batch.schema(), None).unwrap();
        writer.write(&batch).unwrap();
        writer.close().unwrap();
        let records = read(&path, &Columns::default(), OnBadLine::Error).unwrap();
        assert_eq!(records.len(), 3);
        for (i, record) in records.iter().enumerate() {
            assert_eq!(record.load_image().unwrap().get_pixel(1, 1).0, [i as u8 * 100, 0, 0]);
            assert!(record.extra.is_empty() && record.prefix.is_empty() && record.suffix.is_none(), "{record:?}");
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn mappings_naming_missing_columns_and_piped_parquet_are_refused() {
        let spec = fixture("train-00000-of-00002.parquet");
        let err = read(&spec, &columns(&[("suffix", "{anwser}")]), OnBadLine::Error).unwrap_err().to_string();
        assert!(err.contains("train-00000-of-00002.parquet: columns.suffix = \"{anwser}\" reads column `anwser`"));
        assert!(err.contains("(columns: image, question, answer, answers, question_id)"), "{err}");
        let err = read(&spec, &columns(&[("image", "picture")]), OnBadLine::Error).unwrap_err().to_string();
        assert!(err.contains("no image column `picture`"), "{err}");
        let err = read(&spec, &columns(&[("image", "question")]), OnBadLine::Error).unwrap_err().to_string();
        assert!(err.contains("image column `question` is Utf8"), "{err}");
        let err = files("pipe:cat train.parquet").unwrap_err().to_string();
        assert!(err.contains("cannot stream it"), "{err}");
        let err = read(&fixture("make_parquet_fixture.py.parquet"), &Columns::default(), OnBadLine::Error);
        assert!(err.unwrap_err().to_string().contains("No such file"));
    }
}
