//! TensorBoard event files: scalars (`train/loss`, `eval/<metric>`, ...) that TensorBoard reads.
//!
//! An events file is a sequence of TFRecords, each `length: u64 LE`, `masked_crc32c(length)`,
//! `payload`, `masked_crc32c(payload)`, where every payload is a serialized `tensorflow.Event`
//! protobuf. The first event names the file format (`brain.Event:2`); each scalar is an event
//! with its wall time, step and a `Summary` holding one `simple_value`. The few protobuf fields
//! needed are encoded here by hand.

use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Protobuf wire types.
const VARINT: u32 = 0;
const FIXED64: u32 = 1;
const LEN: u32 = 2;
const FIXED32: u32 = 5;

/// Distinguishes the files of writers created by one process in the same second.
static FILE_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Appends scalar summaries to a new TensorBoard events file.
pub struct EventWriter {
    file: BufWriter<File>,
}

impl EventWriter {
    /// Creates `dir` and a new events file in it (TensorBoard's naming:
    /// `events.out.tfevents.<unix time>.<hostname>.<pid>.<counter>`), starting with the
    /// file-version event. Never overwrites an existing file.
    pub fn create(dir: &Path) -> io::Result<Self> {
        fs::create_dir_all(dir)?;
        let secs = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let host = fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        let host = if host.trim().is_empty() { "localhost" } else { host.trim() };
        let name = format!(
            "events.out.tfevents.{secs:010}.{host}.{}.{}",
            std::process::id(),
            FILE_COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let file = File::options().write(true).create_new(true).open(dir.join(name))?;
        let mut writer = EventWriter { file: BufWriter::new(file) };
        writer.write_event(0, 3, b"brain.Event:2")?;
        writer.flush()?;
        Ok(writer)
    }

    /// One scalar at a step. TensorBoard stores scalars as f32, so `value` is rounded to f32.
    pub fn scalar(&mut self, tag: &str, value: f64, step: u64) -> io::Result<()> {
        let mut summary_value = Vec::new();
        put_len(&mut summary_value, 1, tag.as_bytes()); // Summary.Value.tag
        put_key(&mut summary_value, 2, FIXED32); // Summary.Value.simple_value
        summary_value.extend_from_slice(&(value as f32).to_le_bytes());
        let mut summary = Vec::new();
        put_len(&mut summary, 1, &summary_value); // Summary.value
        self.write_event(step, 5, &summary) // Event.summary
    }

    /// Makes everything written so far durable (called at log steps and checkpoints).
    pub fn flush(&mut self) -> io::Result<()> {
        self.file.flush()?;
        self.file.get_ref().sync_data()
    }

    /// Writes one `Event` record: the current wall time, `step`, and the length-delimited
    /// `field` (3: file_version, 5: summary) holding `payload`.
    fn write_event(&mut self, step: u64, field: u32, payload: &[u8]) -> io::Result<()> {
        let wall_time = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
        let mut event = Vec::new();
        put_key(&mut event, 1, FIXED64); // Event.wall_time
        event.extend_from_slice(&wall_time.to_le_bytes());
        put_key(&mut event, 2, VARINT); // Event.step
        put_varint(&mut event, step);
        put_len(&mut event, field, payload);

        let len = (event.len() as u64).to_le_bytes();
        self.file.write_all(&len)?;
        self.file.write_all(&masked_crc32c(&len).to_le_bytes())?;
        self.file.write_all(&event)?;
        self.file.write_all(&masked_crc32c(&event).to_le_bytes())
    }
}

/// TFRecord's checksum: CRC32C, rotated right by 15 bits, plus a constant.
fn masked_crc32c(data: &[u8]) -> u32 {
    crc32c::crc32c(data).rotate_right(15).wrapping_add(0xa282_ead8)
}

fn put_varint(buf: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        buf.push(v as u8 | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

fn put_key(buf: &mut Vec<u8>, field: u32, wire_type: u32) {
    put_varint(buf, u64::from(field << 3 | wire_type));
}

fn put_len(buf: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    put_key(buf, field, LEN);
    put_varint(buf, bytes.len() as u64);
    buf.extend_from_slice(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    /// A protobuf field's value, as far as events need.
    #[derive(Debug)]
    enum Field<'a> {
        Varint(u64),
        Fixed64([u8; 8]),
        Bytes(&'a [u8]),
        Fixed32([u8; 4]),
    }

    fn read_varint(buf: &[u8], pos: &mut usize) -> u64 {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = buf[*pos];
            *pos += 1;
            v |= u64::from(b & 0x7f) << shift;
            if b < 0x80 {
                return v;
            }
        }
        panic!("varint too long");
    }

    /// Decodes one protobuf message into its (field number, value) pairs.
    fn fields(buf: &[u8]) -> Vec<(u64, Field<'_>)> {
        let mut pos = 0;
        let mut out = Vec::new();
        while pos < buf.len() {
            let key = read_varint(buf, &mut pos);
            let value = match key & 7 {
                0 => Field::Varint(read_varint(buf, &mut pos)),
                1 => Field::Fixed64(buf[pos..pos + 8].try_into().unwrap()),
                2 => {
                    let n = read_varint(buf, &mut pos) as usize;
                    Field::Bytes(&buf[pos..pos + n])
                }
                5 => Field::Fixed32(buf[pos..pos + 4].try_into().unwrap()),
                w => panic!("unexpected wire type {w}"),
            };
            pos += match &value {
                Field::Varint(_) => 0,
                Field::Fixed64(_) => 8,
                Field::Bytes(b) => b.len(),
                Field::Fixed32(_) => 4,
            };
            out.push((key >> 3, value));
        }
        out
    }

    /// The TFRecord mask (TensorFlow's `crc32c::Mask`).
    fn mask(crc: u32) -> u32 {
        crc.rotate_right(15).wrapping_add(0xa282_ead8)
    }

    /// Splits a file into record payloads, checking both checksums of every record.
    fn records(bytes: &[u8]) -> Vec<&[u8]> {
        let mut pos = 0;
        let mut out = Vec::new();
        while pos < bytes.len() {
            let len_bytes = &bytes[pos..pos + 8];
            let len = u64::from_le_bytes(len_bytes.try_into().unwrap()) as usize;
            let len_crc = u32::from_le_bytes(bytes[pos + 8..pos + 12].try_into().unwrap());
            assert_eq!(len_crc, mask(crc32c::crc32c(len_bytes)), "length crc at byte {pos}");
            let data = &bytes[pos + 12..pos + 12 + len];
            let data_crc = u32::from_le_bytes(bytes[pos + 12 + len..pos + 16 + len].try_into().unwrap());
            assert_eq!(data_crc, mask(crc32c::crc32c(data)), "data crc at byte {pos}");
            out.push(data);
            pos += 16 + len;
        }
        out
    }

    /// What one event holds: wall time, step, file_version, and (tag, simple_value) pairs.
    #[derive(Debug, Default)]
    struct Event {
        wall_time: f64,
        step: u64,
        file_version: Option<String>,
        scalars: Vec<(String, f32)>,
    }

    fn decode_event(data: &[u8]) -> Event {
        let mut event = Event::default();
        for (number, field) in fields(data) {
            match (number, field) {
                (1, Field::Fixed64(b)) => event.wall_time = f64::from_le_bytes(b),
                (2, Field::Varint(v)) => event.step = v,
                (3, Field::Bytes(b)) => event.file_version = Some(String::from_utf8(b.to_vec()).unwrap()),
                (5, Field::Bytes(summary)) => {
                    for (number, value) in fields(summary) {
                        let (1, Field::Bytes(value)) = (number, value) else { panic!("bad Summary field") };
                        let (mut tag, mut simple) = (None, None);
                        for f in fields(value) {
                            match f {
                                (1, Field::Bytes(b)) => tag = Some(String::from_utf8(b.to_vec()).unwrap()),
                                (2, Field::Fixed32(b)) => simple = Some(f32::from_le_bytes(b)),
                                other => panic!("unexpected Summary.Value field {other:?}"),
                            }
                        }
                        event.scalars.push((tag.unwrap(), simple.unwrap()));
                    }
                }
                other => panic!("unexpected Event field {other:?}"),
            }
        }
        event
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("pg2-tensorboard-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    fn event_files(dir: &Path) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
        files.sort();
        files
    }

    #[test]
    fn scalars_read_back() {
        let dir = temp_dir("scalars").join("run");
        let mut writer = EventWriter::create(&dir).unwrap();
        let logged = [
            ("train/loss", 8.0, 1),
            ("train/lr", 3e-5, 1),
            ("train/grad_norm", 12.25, 1),
            ("train/loss", 1.5, 600),
            ("eval/accuracy", 0.75, 600),
            ("train/loss", 1.25, 1u64 << 40),
        ];
        for (tag, value, step) in logged {
            writer.scalar(tag, value, step).unwrap();
        }
        writer.flush().unwrap();

        // Read while the writer is still open: flush must have put everything in the file.
        let files = event_files(&dir);
        assert_eq!(files.len(), 1);
        let name = files[0].file_name().unwrap().to_str().unwrap().to_owned();
        let parts: Vec<&str> = name.split('.').collect();
        assert_eq!(parts[..3], ["events", "out", "tfevents"], "{name}");
        assert_eq!(parts[3].len(), 10, "{name}");
        assert!(name.contains(&format!(".{}.", std::process::id())), "{name}");

        let bytes = fs::read(&files[0]).unwrap();
        let events: Vec<Event> = records(&bytes).into_iter().map(decode_event).collect();
        assert_eq!(events.len(), 1 + logged.len());
        assert_eq!(events[0].file_version.as_deref(), Some("brain.Event:2"));
        assert!(events[0].scalars.is_empty());
        for (event, (tag, value, step)) in events[1..].iter().zip(logged) {
            assert_eq!(event.scalars, [(tag.to_owned(), value as f32)]);
            assert_eq!(event.step, step);
            assert!(event.file_version.is_none());
            assert!(event.wall_time >= events[0].wall_time && event.wall_time > 1.5e9);
        }
        drop(writer);
        fs::remove_dir_all(dir.parent().unwrap()).unwrap();
    }

    #[test]
    fn each_writer_gets_its_own_file() {
        let dir = temp_dir("two-writers");
        let mut first = EventWriter::create(&dir).unwrap();
        let mut second = EventWriter::create(&dir).unwrap();
        first.scalar("train/loss", 2.0, 1).unwrap();
        second.scalar("train/loss", 3.0, 1).unwrap();
        drop((first, second));
        let files = event_files(&dir);
        assert_eq!(files.len(), 2);
        for file in files {
            let bytes = fs::read(file).unwrap();
            assert_eq!(records(&bytes).len(), 2);
        }
        fs::remove_dir_all(&dir).unwrap();
    }
}
