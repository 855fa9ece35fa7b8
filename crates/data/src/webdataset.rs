//! WebDataset tar shards as a source, read as webdataset does: a sample is the consecutive
//! members of a tar that share a key (`000123.jpg` + `000123.json`: the name up to the
//! first dot of its file name), the JSON holding `prefix`, `suffix` and any evaluation
//! fields (a `.txt` member is the suffix when there is no JSON). Shards are streamed, never
//! unpacked: a local shard's image members are remembered by offset and read when the
//! example is loaded (so a worker reads only its own examples' images, and seeking over a
//! shard reads its headers alone); `pipe:CMD` shards are the standard output of a shell
//! command (`pipe:aws s3 cp s3://bucket/shard-000001.tar -`), whose images are kept in
//! memory with their sample.
//!
//! A source names its shards with brace ranges and lists (`shard-{000000..000575}.tar`,
//! `{a,b}.tar`) and `*`/`?` globs in the file name, or by a shard index (see
//! [`read_index`]) that also gives each shard's sample count.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::Arc;

use serde_json::{Map, Value};

use crate::source::{ImageData, OnBadLine, Record};
use crate::DataError;

/// One tar shard of a source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Shard {
    File(PathBuf),
    /// A shell command whose standard output is the tar.
    Pipe(String),
}

impl Shard {
    /// How errors name it.
    pub fn name(&self) -> String {
        match self {
            Shard::File(path) => path.display().to_string(),
            Shard::Pipe(command) => format!("pipe:{command}"),
        }
    }
}

/// Whether a source path names tar shards (`pipe:` commands, `.tar` files, or a shard index).
pub fn is_webdataset(spec: &str) -> bool {
    spec.starts_with("pipe:")
        || expand_braces(spec).is_ok_and(|all| all.iter().all(|s| s.ends_with(".tar")))
        || is_index(spec)
}

/// The file [`write_shards`] lists its shards in, beside them.
pub const INDEX_FILE: &str = "index.json";

/// Whether a source path is a shard index: a `.json` file holding an object with a
/// `shardlist`.
pub fn is_index(spec: &str) -> bool {
    spec.ends_with(".json")
        && std::fs::read(spec)
            .is_ok_and(|bytes| serde_json::from_slice::<Value>(&bytes).is_ok_and(|v| v.get("shardlist").is_some()))
}

/// The shards of a shard index with their sample counts, in order. The index is webdataset's
/// (wids) `{"__kind__": "wids-shard-index-v1", "shardlist": [{"url": "shard-000000.tar",
/// "nsamples": 20}, ...]}`, as `widsindex create` and [`write_shards`] write it; a `url` is
/// a path relative to the index's folder, an absolute path, or a `pipe:` command.
pub fn read_index(path: &Path) -> Result<Vec<(Shard, usize)>, DataError> {
    let err = |msg: String| DataError::File { path: path.display().to_string(), msg };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let index: Value = serde_json::from_str(&text).map_err(|e| err(format!("not a shard index: {e}")))?;
    let list = index.get("shardlist").and_then(Value::as_array).ok_or_else(|| err("no `shardlist` list".into()))?;
    let dir = path.parent().unwrap_or(Path::new(""));
    let shards: Vec<(Shard, usize)> = list
        .iter()
        .enumerate()
        .map(|(i, entry)| {
            let bad = |what: &str| err(format!("shardlist[{i}]: {what}"));
            let url = entry.get("url").and_then(Value::as_str).ok_or_else(|| bad("expected a `url` string"))?;
            let count = entry.get("nsamples").and_then(Value::as_u64).ok_or_else(|| bad("expected `nsamples`"))?;
            let shard = match url.strip_prefix("pipe:") {
                Some(command) => Shard::Pipe(command.to_string()),
                None => Shard::File(dir.join(url)),
            };
            Ok((shard, count as usize))
        })
        .collect::<Result<_, DataError>>()?;
    if shards.is_empty() {
        return Err(err("the shard list is empty".into()));
    }
    Ok(shards)
}

/// Writes the shard index of `shards` (paths in `dir`, with their sample counts) as
/// `dir/index.json`, atomically.
fn write_index(dir: &Path, shards: &[(PathBuf, usize)]) -> Result<(), DataError> {
    let path = dir.join(INDEX_FILE);
    let err = |e: std::io::Error| DataError::File { path: path.display().to_string(), msg: e.to_string() };
    let list: Vec<Value> = shards
        .iter()
        .map(|(shard, count)| {
            let url = shard.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            serde_json::json!({ "url": url, "nsamples": count })
        })
        .collect();
    let index = serde_json::json!({ "__kind__": "wids-shard-index-v1", "wids_version": 1, "shardlist": list });
    let staged = crate::files::Staged::new(&path).map_err(err)?;
    std::fs::write(staged.path(), serde_json::to_vec_pretty(&index).expect("JSON values serialise")).map_err(err)?;
    staged.commit().map_err(err)
}

/// The shards a source path names, in order: brace ranges and lists expanded, `*` and `?`
/// matched against the files of the folder (sorted), `pipe:` commands kept as written.
pub fn shards(spec: &str) -> Result<Vec<Shard>, DataError> {
    let err = |msg: String| DataError::File { path: spec.to_string(), msg };
    let expanded = expand_braces(spec).map_err(err)?;
    if spec.starts_with("pipe:") {
        return Ok(expanded.into_iter().map(|s| Shard::Pipe(s["pipe:".len()..].to_string())).collect());
    }
    let mut shards = vec![];
    for path in expanded.iter().map(PathBuf::from) {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if !name.contains(['*', '?']) {
            shards.push(Shard::File(path));
            continue;
        }
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let listing = std::fs::read_dir(dir).map_err(|e| err(format!("listing {}: {e}", dir.display())))?;
        let mut matched: Vec<PathBuf> = listing
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|p| p.file_name().is_some_and(|n| wildcard(&name, &n.to_string_lossy())))
            .collect();
        matched.sort();
        shards.extend(matched.into_iter().map(Shard::File));
    }
    if shards.is_empty() {
        return Err(err("names no shards".into()));
    }
    Ok(shards)
}

/// Which of a source's local shards are missing (none for `pipe:` commands).
pub fn missing_shards(spec: &str) -> Vec<String> {
    let listed = match is_index(spec) {
        true => read_index(Path::new(spec)).map(|shards| shards.into_iter().map(|(shard, _)| shard).collect()),
        false => shards(spec),
    };
    match listed {
        Ok(shards) => {
            shards.iter().filter(|s| matches!(s, Shard::File(path) if !path.is_file())).map(Shard::name).collect()
        }
        Err(_) => vec![spec.to_string()],
    }
}

/// `s` with its brace groups expanded, left to right: `{3..5}` (zero-padded as written:
/// `{08..10}` gives `08 09 10`) and `{a,b}`.
fn expand_braces(s: &str) -> Result<Vec<String>, String> {
    let Some(open) = s.find('{') else { return Ok(vec![s.to_string()]) };
    let close = s[open..].find('}').map(|i| open + i).ok_or_else(|| format!("`{{` at {open} has no `}}`"))?;
    let (head, body, tail) = (&s[..open], &s[open + 1..close], &s[close + 1..]);
    let choices: Vec<String> = match body.split_once("..") {
        Some((from, to)) => {
            let bad = || format!("`{{{body}}}`: expected a range of whole numbers such as {{000..127}}");
            let (a, b): (u64, u64) = (from.parse().map_err(|_| bad())?, to.parse().map_err(|_| bad())?);
            if a > b {
                return Err(bad());
            }
            let width = if from.starts_with('0') && from.len() > 1 { from.len() } else { 0 };
            (a..=b).map(|n| format!("{n:0width$}")).collect()
        }
        None => body.split(',').map(str::to_string).collect(),
    };
    let rest = expand_braces(tail)?;
    Ok(choices.iter().flat_map(|c| rest.iter().map(move |r| format!("{head}{c}{r}"))).collect())
}

/// Whether `name` matches `pattern`, whose `*` stands for any run and `?` for one character.
fn wildcard(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    // matches[j]: whether the pattern so far matches name[..j].
    let mut matches = vec![false; n.len() + 1];
    matches[0] = true;
    for &c in &p {
        let mut next = vec![false; n.len() + 1];
        for j in 0..=n.len() {
            next[j] = match c {
                '*' => matches[j] || (j > 0 && next[j - 1]),
                '?' => j > 0 && matches[j - 1],
                c => j > 0 && matches[j - 1] && n[j - 1] == c,
            };
        }
        matches = next;
    }
    matches[n.len()]
}

/// The bytes of a shard, with where they stand.
enum Input {
    /// `len`: the file's size, so that a shard cut short is caught where a seek would not.
    File {
        reader: BufReader<File>,
        at: u64,
        len: u64,
    },
    Pipe {
        child: Child,
        reader: BufReader<ChildStdout>,
        at: u64,
    },
}

impl Input {
    fn at(&self) -> u64 {
        match self {
            Input::File { at, .. } | Input::Pipe { at, .. } => *at,
        }
    }

    /// Fills `buf`, or returns false at the end of the stream (nothing read).
    fn read_block(&mut self, buf: &mut [u8]) -> std::io::Result<bool> {
        let (reader, at): (&mut dyn Read, &mut u64) = match self {
            Input::File { reader, at, .. } => (reader, at),
            Input::Pipe { reader, at, .. } => (reader, at),
        };
        let mut filled = 0;
        while filled < buf.len() {
            match reader.read(&mut buf[filled..])? {
                0 if filled == 0 => return Ok(false),
                0 => return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "cut short")),
                n => filled += n,
            }
        }
        *at += buf.len() as u64;
        Ok(true)
    }

    fn read_exact(&mut self, len: u64) -> std::io::Result<Vec<u8>> {
        let mut data = vec![0; len as usize];
        if !data.is_empty() && !self.read_block(&mut data)? {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "cut short"));
        }
        Ok(data)
    }

    /// Passes over `len` bytes: a seek in a file, a read from a pipe.
    fn skip(&mut self, len: u64) -> std::io::Result<()> {
        match self {
            Input::File { reader, at, len: size } => {
                if *at + len > *size {
                    return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "cut short"));
                }
                reader.seek_relative(len as i64)?;
                *at += len;
            }
            Input::Pipe { reader, at, .. } => {
                let copied = std::io::copy(&mut reader.by_ref().take(len), &mut std::io::sink())?;
                if copied < len {
                    return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "cut short"));
                }
                *at += len;
            }
        }
        Ok(())
    }
}

impl Drop for Input {
    fn drop(&mut self) {
        if let Input::Pipe { child, .. } = self {
            // A command stopped early (a shard left mid-way) must not linger.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A member's contents: read, or (local shards' images) where they lie.
enum Contents {
    Bytes(Vec<u8>),
    At { offset: u64, len: u64 },
}

/// The samples of one shard, read in order.
pub struct ShardReader {
    shard: Shard,
    input: Input,
    policy: OnBadLine,
    /// Samples emitted so far (a record's `line` is its 1-based index).
    samples: usize,
    /// The first member of the next sample, read ahead.
    next_member: Option<(String, String, Contents)>,
    done: bool,
}

impl std::fmt::Debug for ShardReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ShardReader({}, {} samples read)", self.shard.name(), self.samples)
    }
}

const IMAGE_EXTENSIONS: [&str; 5] = ["jpg", "jpeg", "png", "webp", "bmp"];

impl ShardReader {
    /// Opens a shard (starts its command, for `pipe:`).
    pub fn open(shard: &Shard, policy: OnBadLine) -> Result<ShardReader, DataError> {
        let err = |msg: String| DataError::File { path: shard.name(), msg };
        let input = match shard {
            Shard::File(path) => {
                let file = File::open(path).map_err(|e| err(e.to_string()))?;
                let len = file.metadata().map_err(|e| err(e.to_string()))?.len();
                Input::File { reader: BufReader::new(file), at: 0, len }
            }
            Shard::Pipe(command) => {
                let mut child = Command::new("sh")
                    .args(["-c", command])
                    .stdout(Stdio::piped())
                    .spawn()
                    .map_err(|e| err(format!("starting the command: {e}")))?;
                let stdout = child.stdout.take().expect("stdout is piped");
                Input::Pipe { child, reader: BufReader::new(stdout), at: 0 }
            }
        };
        Ok(ShardReader { shard: shard.clone(), input, policy, samples: 0, next_member: None, done: false })
    }

    fn error(&self, msg: String) -> DataError {
        DataError::File { path: self.shard.name(), msg: format!("at byte {}: {msg}", self.input.at()) }
    }

    /// The next member worth keeping: its key, extension (lower case) and contents.
    fn member(&mut self) -> Result<Option<(String, String, Contents)>, DataError> {
        let mut long_name: Option<String> = None;
        let mut block = [0u8; 512];
        loop {
            let more = self.input.read_block(&mut block).map_err(|e| self.error(e.to_string()))?;
            if !more || block.iter().all(|&b| b == 0) {
                return Ok(None); // the end-of-archive blocks, or a stream that just ends
            }
            let header = tar::Header::from_byte_slice(&block);
            let stored = header.cksum().map_err(|e| self.error(format!("a bad header: {e}")))?;
            let sum: u32 =
                block.iter().enumerate().map(|(i, &b)| if (148..156).contains(&i) { 32 } else { b as u32 }).sum();
            if stored != sum {
                return Err(self.error("a header fails its checksum: the tar is corrupt".into()));
            }
            let size = header.entry_size().map_err(|e| self.error(format!("a bad header: {e}")))?;
            let padding = size.next_multiple_of(512) - size;
            let kind = header.entry_type();
            if kind.is_gnu_longname() || kind.is_pax_local_extensions() {
                let data = self.input.read_exact(size).map_err(|e| self.error(e.to_string()))?;
                self.input.skip(padding).map_err(|e| self.error(e.to_string()))?;
                long_name = match kind.is_gnu_longname() {
                    true => Some(String::from_utf8_lossy(&data).trim_end_matches('\0').to_string()),
                    false => pax_path(&data).or(long_name),
                };
                continue;
            }
            if !kind.is_file() {
                self.input.skip(size + padding).map_err(|e| self.error(e.to_string()))?;
                continue;
            }
            let name = match long_name.take() {
                Some(name) => name,
                None => String::from_utf8_lossy(&header.path_bytes()).into_owned(),
            };
            let (key, extension) = split_key(&name);
            let contents = match (&self.input, IMAGE_EXTENSIONS.contains(&extension.as_str())) {
                (Input::File { .. }, true) => {
                    let offset = self.input.at();
                    self.input.skip(size).map_err(|e| self.error(e.to_string()))?;
                    Contents::At { offset, len: size }
                }
                _ if IMAGE_EXTENSIONS.contains(&extension.as_str()) || extension == "json" || extension == "txt" => {
                    Contents::Bytes(self.input.read_exact(size).map_err(|e| self.error(e.to_string()))?)
                }
                _ => {
                    self.input.skip(size + padding).map_err(|e| self.error(e.to_string()))?;
                    continue;
                }
            };
            self.input.skip(padding).map_err(|e| self.error(e.to_string()))?;
            return Ok(Some((key, extension, contents)));
        }
    }

    /// The next good sample as a record, or `None` at the shard's end. A sample that is not
    /// a valid record is an error naming the shard and its key, or is passed over with
    /// `OnBadLine::Skip`.
    pub fn next_record(&mut self) -> Result<Option<Record>, DataError> {
        loop {
            if self.done {
                return Ok(None);
            }
            let first = match self.next_member.take() {
                Some(member) => member,
                None => match self.member()? {
                    Some(member) => member,
                    None => return Ok(None),
                },
            };
            let key = first.0.clone();
            let mut members = vec![first];
            loop {
                match self.member()? {
                    Some(member) if member.0 == key => members.push(member),
                    Some(member) => {
                        self.next_member = Some(member);
                        break;
                    }
                    None => {
                        self.done = true;
                        break;
                    }
                }
            }
            self.samples += 1;
            match self.record(&key, members) {
                Ok(record) => return Ok(Some(record)),
                Err(_) if self.policy == OnBadLine::Skip => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// One sample's members as a record.
    fn record(&self, key: &str, members: Vec<(String, String, Contents)>) -> Result<Record, DataError> {
        let err = |msg: String| DataError::Record {
            path: self.shard.name(),
            line: self.samples,
            msg: format!("sample `{key}`: {msg}"),
        };
        let (mut fields, mut text, mut image) = (None, None, None);
        for (_, extension, contents) in members {
            match (extension.as_str(), contents) {
                ("json", Contents::Bytes(data)) => match serde_json::from_slice::<Value>(&data) {
                    Ok(Value::Object(map)) => fields = Some(map),
                    Ok(_) => return Err(err("its .json is not a JSON object".into())),
                    Err(e) => return Err(err(format!("its .json is invalid: {e}"))),
                },
                ("txt", Contents::Bytes(data)) => text = Some(String::from_utf8_lossy(&data).trim_end().to_string()),
                (ext, contents) if image.is_none() && IMAGE_EXTENSIONS.contains(&ext) => {
                    let name = format!("{key}.{ext}");
                    image = Some(match (contents, &self.shard) {
                        (Contents::At { offset, len }, Shard::File(shard)) => {
                            ImageData::Member { shard: shard.clone(), name, offset, len }
                        }
                        (Contents::Bytes(data), _) => ImageData::Bytes { name, data: Arc::new(data) },
                        (Contents::At { .. }, Shard::Pipe(_)) => unreachable!("piped images are read"),
                    });
                }
                _ => {}
            }
        }
        let image = image.ok_or_else(|| err(format!("no image member ({})", IMAGE_EXTENSIONS.join(", "))))?;
        let mut fields: Map<String, Value> = fields.unwrap_or_default();
        let mut text_field = |name: &str| match fields.remove(name) {
            Some(Value::String(s)) => Ok(Some(s)),
            None | Some(Value::Null) => Ok(None),
            Some(other) => Err(err(format!("`{name}` must be a string, found {other}"))),
        };
        let prefix = text_field("prefix")?.unwrap_or_default();
        let suffix = text_field("suffix")?.or(text);
        fields.insert("__key__".into(), Value::String(key.to_string()));
        Ok(Record { image, prefix, suffix, extra: fields, file: PathBuf::from(self.shard.name()), line: self.samples })
    }
}

/// The key and (lower-case) extension of a member: the name up to the first dot of its
/// file name, and what follows.
fn split_key(name: &str) -> (String, String) {
    let start = name.rfind('/').map_or(0, |i| i + 1);
    match name[start..].find('.') {
        Some(dot) => (name[..start + dot].to_string(), name[start + dot + 1..].to_lowercase()),
        None => (name.to_string(), String::new()),
    }
}

/// The `path` of a PAX extended header's records (`LEN path=VALUE\n`).
fn pax_path(data: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(data);
    text.lines().find_map(|record| record.split_once(' ')?.1.strip_prefix("path=").map(str::to_string))
}

/// The source path naming the `count` shards [`write_shards`] wrote in `dir`
/// (`dir/shard-{000000..000003}.tar`).
pub fn shards_pattern(dir: &Path, count: usize) -> PathBuf {
    dir.join(format!("shard-{{000000..{:06}}}.tar", count.saturating_sub(1)))
}

/// How to name the `count` shards [`write_shards`] wrote in `dir` in a recipe, for messages.
pub fn use_as(dir: &Path, count: usize) -> String {
    format!(
        "`path = \"{}\"` (their index: each shard's sample count, so no worker reads a shard to count it) or `path = \"{}\"`",
        dir.join(INDEX_FILE).display(),
        shards_pattern(dir, count).display()
    )
}

/// Writes `records` as tar shards of `per_shard` samples in `dir` (`shard-000000.tar`, ...,
/// each written atomically): per sample its image as `KEY.EXT` and `KEY.json` holding
/// `prefix`, `suffix` and every other field, the keys numbering the samples; then the
/// shards' index ([`INDEX_FILE`], see [`read_index`]). Returns the shards written.
pub fn write_shards(
    records: impl IntoIterator<Item = Result<Record, DataError>>,
    dir: &Path,
    per_shard: usize,
) -> Result<Vec<PathBuf>, DataError> {
    let err = |path: &Path, e: std::io::Error| DataError::File { path: path.display().to_string(), msg: e.to_string() };
    std::fs::create_dir_all(dir).map_err(|e| err(dir, e))?;
    let mut written = vec![];
    let mut open: Option<(crate::files::Staged, tar::Builder<File>)> = None;
    let mut samples = 0;
    for record in records {
        let record = record?;
        if samples % per_shard.max(1) == 0 {
            if let Some((staged, tar)) = open.take() {
                written.push((finish_shard(staged, tar)?, per_shard.max(1)));
            }
            let path = dir.join(format!("shard-{:06}.tar", written.len()));
            let staged = crate::files::Staged::new(&path).map_err(|e| err(&path, e))?;
            let file = File::create(staged.path()).map_err(|e| err(&path, e))?;
            open = Some((staged, tar::Builder::new(file)));
        }
        let (staged, tar) = open.as_mut().expect("a shard is open");
        let image = image_bytes(&record)?;
        let extension = match image::guess_format(&image) {
            Ok(image::ImageFormat::Jpeg) => "jpg",
            Ok(image::ImageFormat::Png) => "png",
            Ok(image::ImageFormat::WebP) => "webp",
            Ok(image::ImageFormat::Bmp) => "bmp",
            _ => return Err(record.error("its image is not JPEG, PNG, WebP or BMP")),
        };
        let mut fields = record.extra.clone();
        fields.remove("__key__");
        fields.insert("prefix".into(), Value::String(record.prefix.clone()));
        if let Some(suffix) = &record.suffix {
            fields.insert("suffix".into(), Value::String(suffix.clone()));
        }
        let json = serde_json::to_vec(&Value::Object(fields)).expect("JSON values serialise");
        let key = format!("{samples:09}");
        for (name, data) in [(format!("{key}.{extension}"), image), (format!("{key}.json"), json)] {
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            header.set_cksum();
            tar.append_data(&mut header, &name, data.as_slice()).map_err(|e| err(staged.path(), e))?;
        }
        samples += 1;
    }
    if let Some((staged, tar)) = open {
        let rest = samples - per_shard.max(1) * written.len();
        written.push((finish_shard(staged, tar)?, rest));
    }
    write_index(dir, &written)?;
    Ok(written.into_iter().map(|(shard, _)| shard).collect())
}

/// Ends a shard's archive and puts it in place.
fn finish_shard(staged: crate::files::Staged, tar: tar::Builder<File>) -> Result<PathBuf, DataError> {
    let dest = staged.dest().to_path_buf();
    let err = |e: std::io::Error| DataError::File { path: dest.display().to_string(), msg: e.to_string() };
    tar.into_inner().and_then(|f| f.sync_all()).map_err(err)?;
    staged.commit().map_err(err)?;
    Ok(dest)
}

/// A record's encoded image.
pub(crate) fn image_bytes(record: &Record) -> Result<Vec<u8>, DataError> {
    match &record.image {
        ImageData::File(path) => std::fs::read(path).map_err(|e| record.error(format!("{}: {e}", path.display()))),
        ImageData::Member { shard, name, offset, len } => {
            read_member(shard, *offset, *len).map_err(|e| record.error(format!("reading {name}: {e}")))
        }
        ImageData::Bytes { data, .. } => Ok(data.to_vec()),
    }
}

/// Reads a tar member's bytes back from its shard.
pub(crate) fn read_member(shard: &Path, offset: u64, len: u64) -> std::io::Result<Vec<u8>> {
    let mut file = File::open(shard)?;
    file.seek(SeekFrom::Start(offset))?;
    let mut data = vec![0; len as usize];
    file.read_exact(&mut data)?;
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("pg2-wds-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn png(level: u8) -> Vec<u8> {
        let mut bytes = vec![];
        image::RgbImage::from_pixel(4, 3, image::Rgb([level, 0, 0]))
            .write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png)
            .unwrap();
        bytes
    }

    /// A tar of `members` (name, bytes), as Python's tarfile or `tar` write it.
    fn write_tar(path: &Path, members: &[(&str, Vec<u8>)]) {
        let mut tar = tar::Builder::new(File::create(path).unwrap());
        for (name, data) in members {
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            header.set_cksum();
            tar.append_data(&mut header, name, data.as_slice()).unwrap();
        }
        tar.finish().unwrap();
    }

    #[test]
    fn shard_names_expand_braces_and_globs() {
        assert_eq!(expand_braces("s-{08..10}.tar").unwrap(), ["s-08.tar", "s-09.tar", "s-10.tar"]);
        assert_eq!(expand_braces("{a,b}/{1..2}.tar").unwrap(), ["a/1.tar", "a/2.tar", "b/1.tar", "b/2.tar"]);
        assert!(expand_braces("s-{3..1}.tar").is_err() && expand_braces("s-{1..2.tar").is_err());
        assert!(wildcard("shard-*.tar", "shard-0001.tar") && wildcard("s?.tar", "s1.tar"));
        assert!(!wildcard("shard-*.tar", "shard-0001.tar.idx") && !wildcard("s?.tar", "s12.tar"));
        let dir = scratch("glob");
        for name in ["b.tar", "a.tar", "c.txt"] {
            std::fs::write(dir.join(name), b"").unwrap();
        }
        let found = shards(&format!("{}/*.tar", dir.display())).unwrap();
        assert_eq!(found, [Shard::File(dir.join("a.tar")), Shard::File(dir.join("b.tar"))]);
        assert_eq!(
            shards("pipe:cat s-{1..2}.tar").unwrap(),
            [Shard::Pipe("cat s-1.tar".into()), Shard::Pipe("cat s-2.tar".into())]
        );
        assert!(is_webdataset("d/s-{000..009}.tar") && is_webdataset("pipe:gsutil cat gs://b/s.tar"));
        assert!(!is_webdataset("d/train.jsonl"));
        let index = dir.join("index.json");
        std::fs::write(
            &index,
            r#"{"__kind__": "wids-shard-index-v1", "shardlist": [{"url": "a.tar", "nsamples": 2}, {"url": "z.tar", "nsamples": 1}, {"url": "pipe:cat z.tar", "nsamples": 4}]}"#,
        )
        .unwrap();
        assert!(is_webdataset(&index.display().to_string()));
        assert_eq!(
            read_index(&index).unwrap(),
            [
                (Shard::File(dir.join("a.tar")), 2),
                (Shard::File(dir.join("z.tar")), 1),
                (Shard::Pipe("cat z.tar".into()), 4)
            ]
        );
        assert_eq!(missing_shards(&index.display().to_string()), [dir.join("z.tar").display().to_string()]);
        std::fs::write(&index, r#"{"shardlist": [{"url": "a.tar"}]}"#).unwrap();
        let err = read_index(&index).unwrap_err().to_string();
        assert!(err.contains("index.json") && err.contains("shardlist[0]: expected `nsamples`"), "{err}");
        std::fs::write(&index, r#"{"name": "not an index"}"#).unwrap();
        assert!(!is_webdataset(&index.display().to_string()), "a JSON file without a shard list");
        assert_eq!(
            missing_shards(&format!("{}/{{a,z}}.tar", dir.display())),
            [dir.join("z.tar").display().to_string()]
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn samples_group_members_by_key_from_files_and_pipes() {
        let dir = scratch("read");
        let long = format!("{}/000002", "d".repeat(120)); // past ustar's 100-byte names
        let path = dir.join("shard.tar");
        write_tar(
            &path,
            &[
                ("000001.png", png(10)),
                ("000001.json", br#"{"prefix": "caption en", "suffix": "a red square", "answers": ["red"]}"#.to_vec()),
                ("README.md", b"neither an image, JSON nor text: passed over".to_vec()),
                ("notes.json", b"{}".to_vec()),
                (&format!("{long}.png"), png(200)),
                (&format!("{long}.txt"), b"just a target\n".to_vec()),
            ],
        );
        for shard in [Shard::File(path.clone()), Shard::Pipe(format!("cat '{}'", path.display()))] {
            let mut reader = ShardReader::open(&shard, OnBadLine::Error).unwrap();
            let first = reader.next_record().unwrap().unwrap();
            assert_eq!((first.prefix.as_str(), first.suffix.as_deref()), ("caption en", Some("a red square")));
            assert_eq!(first.extra["answers"], serde_json::json!(["red"]));
            assert_eq!(first.extra["__key__"], "000001");
            assert_eq!(first.load_image().unwrap().get_pixel(0, 0).0, [10, 0, 0]);
            assert!(matches!(
                (&shard, &first.image),
                (Shard::File(_), ImageData::Member { .. }) | (Shard::Pipe(_), ImageData::Bytes { .. })
            ));
            let notes = reader.next_record().unwrap_err().to_string();
            assert!(notes.contains(":2: sample `notes`: no image member"), "{notes}");
            let second = reader.next_record().unwrap().unwrap();
            assert_eq!((second.prefix.as_str(), second.suffix.as_deref()), ("", Some("just a target")));
            assert_eq!(second.extra["__key__"], serde_json::json!(long));
            assert_eq!(second.load_image().unwrap().get_pixel(0, 0).0, [200, 0, 0]);
            assert!(reader.next_record().unwrap().is_none());
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn bad_samples_and_corrupt_shards_are_named() {
        let dir = scratch("bad");
        let path = dir.join("bad.tar");
        write_tar(
            &path,
            &[
                ("a.png", b"not a png".to_vec()),
                ("b.json", b"{\"prefix\": 3}".to_vec()),
                ("b.png", png(1)),
                ("c.png", png(2)),
            ],
        );
        let mut strict = ShardReader::open(&Shard::File(path.clone()), OnBadLine::Error).unwrap();
        let a = strict.next_record().unwrap().unwrap();
        let err = a.load_image().unwrap_err().to_string();
        assert!(err.starts_with(&format!("{}:1: a.png: cannot decode image", path.display())), "{err}");
        let err = strict.next_record().unwrap_err().to_string();
        assert!(err.contains("bad.tar:2: sample `b`: `prefix` must be a string"), "{err}");
        // Skipping passes over the bad sample.
        let mut lenient = ShardReader::open(&Shard::File(path.clone()), OnBadLine::Skip).unwrap();
        let keys: Vec<String> =
            std::iter::from_fn(|| lenient.next_record().unwrap()).map(|r| r.extra["__key__"].to_string()).collect();
        assert_eq!(keys, ["\"a\"", "\"c\""]);
        // A shard cut in the middle of a member, and one whose header is damaged.
        let bytes = std::fs::read(&path).unwrap();
        let cut = dir.join("cut.tar");
        std::fs::write(&cut, &bytes[..512 + 4]).unwrap();
        let mut reader = ShardReader::open(&Shard::File(cut.clone()), OnBadLine::Skip).unwrap();
        let err = reader.next_record().unwrap_err().to_string();
        assert!(err.starts_with(&cut.display().to_string()) && err.contains("cut short"), "{err}");
        let mut damaged = bytes.clone();
        damaged[1024 + 3] ^= 0x55; // in the second member's header
        let broken = dir.join("broken.tar");
        std::fs::write(&broken, damaged).unwrap();
        let mut reader = ShardReader::open(&Shard::File(broken), OnBadLine::Skip).unwrap();
        let err = reader.next_record().unwrap_err().to_string();
        assert!(err.contains("checksum"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
