//! The streaming JSON reader the parsers share: [`read_json`] hands out one item of a file's
//! top level at a time as a [`Node`], which knows its place in the file for error messages.

use std::fmt;
use std::path::Path;

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

use crate::DataError;

/// A JSON value with its place in its file (`annotations[3].caption`), so that every error
/// names the file, the key and the array index.
pub(super) struct Node<'a> {
    file: &'a Path,
    pub(super) at: String,
    pub(super) value: &'a Value,
}

impl<'a> Node<'a> {
    pub(super) fn root(file: &'a Path, value: &'a Value) -> Self {
        Node { file, at: String::new(), value }
    }

    pub(super) fn error(&self, msg: impl fmt::Display) -> DataError {
        let msg = if self.at.is_empty() { msg.to_string() } else { format!("`{}`: {msg}", self.at) };
        DataError::File { path: self.file.display().to_string(), msg }
    }

    /// A field that may be absent (or null).
    pub(super) fn opt(&self, key: &str) -> Option<Node<'a>> {
        let value = self.value.get(key).filter(|v| !v.is_null())?;
        Some(self.child(key, value))
    }

    pub(super) fn field(&self, key: &str) -> Result<Node<'a>, DataError> {
        self.opt(key).ok_or_else(|| self.error(format!("missing key `{key}`")))
    }

    fn expected(&self, what: &str) -> DataError {
        let found = match self.value {
            Value::Null => "null",
            Value::Bool(_) => "a boolean",
            Value::Number(_) => "a number",
            Value::String(_) => "a string",
            Value::Array(_) => "an array",
            Value::Object(_) => "an object",
        };
        self.error(format!("expected {what}, found {found}"))
    }

    pub(super) fn str(&self) -> Result<&'a str, DataError> {
        self.value.as_str().ok_or_else(|| self.expected("a string"))
    }

    pub(super) fn number(&self) -> Result<f64, DataError> {
        self.value.as_f64().ok_or_else(|| self.expected("a number"))
    }

    pub(super) fn u64(&self) -> Result<u64, DataError> {
        self.value.as_u64().ok_or_else(|| self.expected("a non-negative integer"))
    }

    pub(super) fn bool(&self) -> Result<bool, DataError> {
        self.value.as_bool().ok_or_else(|| self.expected("a boolean"))
    }

    /// An id, integer or string, as text (ids key maps and make file names).
    pub(super) fn id(&self) -> Result<String, DataError> {
        match self.value {
            Value::String(_) | Value::Number(_) => Ok(id_text(self.value)),
            _ => Err(self.expected("an id (string or number)")),
        }
    }

    pub(super) fn items(&self) -> Result<Vec<Node<'a>>, DataError> {
        let items = self.value.as_array().ok_or_else(|| self.expected("an array"))?;
        let node = |(i, value)| Node { file: self.file, at: format!("{}[{i}]", self.at), value };
        Ok(items.iter().enumerate().map(node).collect())
    }

    pub(super) fn strings(&self) -> Result<Vec<String>, DataError> {
        self.items()?.iter().map(|n| n.str().map(str::to_owned)).collect()
    }

    /// An object's fields with their nodes, in the object's order.
    pub(super) fn entries(&self) -> Result<Vec<(&'a str, Node<'a>)>, DataError> {
        let map = self.value.as_object().ok_or_else(|| self.expected("an object"))?;
        Ok(map.iter().map(|(key, value)| (key.as_str(), self.child(key, value))).collect())
    }

    fn child(&self, key: &str, value: &'a Value) -> Node<'a> {
        let at = if self.at.is_empty() { key.to_owned() } else { format!("{}.{key}", self.at) };
        Node { file: self.file, at, value }
    }
}

/// An id's text: a string as it is, a number in JSON.
pub(super) fn id_text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Reads the JSON Lines file `path` (one JSON value a line, blank lines skipped), calling
/// `each` with each line's value, named `line N` (counted from 1).
pub(super) fn read_jsonl<F>(path: &Path, mut each: F) -> Result<(), DataError>
where
    F: FnMut(Node) -> Result<(), DataError>,
{
    let file_error = |msg: String| DataError::File { path: path.display().to_string(), msg };
    let text = std::fs::read_to_string(path).map_err(|e| file_error(e.to_string()))?;
    for (i, line) in text.lines().enumerate().filter(|(_, line)| !line.trim().is_empty()) {
        let value: Value =
            serde_json::from_str(line).map_err(|e| file_error(format!("line {}: invalid JSON: {e}", i + 1)))?;
        each(Node { file: path, at: format!("line {}", i + 1), value: &value })?;
    }
    Ok(())
}

/// A flat `[x1, y1, x2, y2, ...]` polygon (COCO's, TextOCR's) as points.
pub(super) fn points(node: &Node) -> Result<Vec<(f64, f64)>, DataError> {
    let numbers = node.items()?.iter().map(Node::number).collect::<Result<Vec<_>, _>>()?;
    if numbers.is_empty() || numbers.len() % 2 != 0 {
        return Err(node.error(format!("expected [x1, y1, x2, y2, ...], found {} numbers", numbers.len())));
    }
    Ok(numbers.chunks(2).map(|p| (p[0], p[1])).collect())
}

/// Reads a whole (small) JSON file as one value, for [`Node::root`].
pub(super) fn read_value(path: &Path) -> Result<Value, DataError> {
    let file_error = |msg: String| DataError::File { path: path.display().to_string(), msg };
    let bytes = std::fs::read(path).map_err(|e| file_error(e.to_string()))?;
    serde_json::from_slice(&bytes).map_err(|e| file_error(format!("invalid JSON: {e}")))
}

/// How [`read_json`] walks a file's top level, handing out one item at a time so that the
/// multi-GB annotation files (COCO instances with their polygons, VQAv2 answers) never sit in
/// memory as a whole tree.
#[derive(Clone, Copy)]
pub(super) enum Walk<'k> {
    /// An object whose arrays under these keys (all required) are handed out element by
    /// element, named by their key; the other fields are returned.
    Arrays(&'k [&'k str]),
    /// An object handed out entry by entry, named by their key, in file order (OCR-VQA).
    Entries,
    /// An array handed out element by element, unnamed (RefCOCO refs).
    Elements,
}

/// Reads the JSON file `path`, calling `each(name, node)` per item of `walk`; returns the
/// top-level fields `walk` did not hand out (as an object).
pub(super) fn read_json<F>(path: &Path, walk: Walk, mut each: F) -> Result<Value, DataError>
where
    F: FnMut(&str, Node) -> Result<(), DataError>,
{
    let file_error = |msg: String| DataError::File { path: path.display().to_string(), msg };
    let bytes = std::fs::read(path).map_err(|e| file_error(e.to_string()))?;
    let mut failure = None;
    let mut de = serde_json::Deserializer::from_slice(&bytes);
    let walker = Walker { file: path, walk, each: &mut each, failure: &mut failure };
    let result = de::Deserializer::deserialize_any(&mut de, walker).and_then(|kept| de.end().map(|()| kept));
    match (failure, result) {
        (Some(e), _) => Err(e), // the callback's own error, not serde's echo of it
        (None, Ok(kept)) => Ok(Value::Object(kept)),
        (None, Err(e)) => Err(file_error(format!("invalid JSON: {e}"))),
    }
}

/// The serde visitor behind [`read_json`]. Errors of `each` are parked in `failure` and
/// serde is stopped with a placeholder error.
struct Walker<'a, F> {
    file: &'a Path,
    walk: Walk<'a>,
    each: &'a mut F,
    failure: &'a mut Option<DataError>,
}

impl<F: FnMut(&str, Node) -> Result<(), DataError>> Walker<'_, F> {
    fn fail<E: de::Error>(&mut self, error: DataError) -> E {
        *self.failure = Some(error);
        E::custom("stopped")
    }

    fn call<E: de::Error>(&mut self, name: &str, at: String, value: &Value) -> Result<(), E> {
        (self.each)(name, Node { file: self.file, at, value }).map_err(|e| self.fail(e))
    }

    fn elements<'de, A: SeqAccess<'de>>(&mut self, name: &str, mut seq: A) -> Result<(), A::Error> {
        let mut i = 0;
        while let Some(value) = seq.next_element::<Value>()? {
            self.call(name, format!("{name}[{i}]"), &value)?;
            i += 1;
        }
        Ok(())
    }
}

impl<'de, F: FnMut(&str, Node) -> Result<(), DataError>> Visitor<'de> for Walker<'_, F> {
    type Value = Map<String, Value>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(if matches!(self.walk, Walk::Elements) { "a JSON array" } else { "a JSON object" })
    }

    fn visit_map<A: MapAccess<'de>>(mut self, mut map: A) -> Result<Self::Value, A::Error> {
        if matches!(self.walk, Walk::Elements) {
            return Err(de::Error::invalid_type(de::Unexpected::Map, &self));
        }
        let mut kept = Map::new();
        let mut seen = Vec::new();
        while let Some(key) = map.next_key::<String>()? {
            match self.walk {
                Walk::Entries => {
                    let value: Value = map.next_value()?;
                    self.call(&key, key.clone(), &value)?;
                }
                Walk::Arrays(names) if names.contains(&key.as_str()) => {
                    map.next_value_seed(ArraySeed { name: &key, walker: &mut self })?;
                    seen.push(key);
                }
                _ => {
                    kept.insert(key, map.next_value()?);
                }
            }
        }
        if let Walk::Arrays(names) = self.walk {
            if let Some(missing) = names.iter().find(|n| !seen.iter().any(|s| s == *n)) {
                let error = Node::root(self.file, &Value::Null).error(format!("missing key `{missing}`"));
                return Err(self.fail(error));
            }
        }
        Ok(kept)
    }

    fn visit_seq<A: SeqAccess<'de>>(mut self, seq: A) -> Result<Self::Value, A::Error> {
        if !matches!(self.walk, Walk::Elements) {
            return Err(de::Error::invalid_type(de::Unexpected::Seq, &self));
        }
        self.elements("", seq)?;
        Ok(Map::new())
    }
}

/// Streams the array under one top-level key through its [`Walker`].
struct ArraySeed<'w, 'a, F> {
    name: &'w str,
    walker: &'w mut Walker<'a, F>,
}

impl<'de, F: FnMut(&str, Node) -> Result<(), DataError>> DeserializeSeed<'de> for ArraySeed<'_, '_, F> {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_seq(self)
    }
}

impl<'de, F: FnMut(&str, Node) -> Result<(), DataError>> Visitor<'de> for ArraySeed<'_, '_, F> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "an array under `{}`", self.name)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<(), A::Error> {
        self.walker.elements(self.name, seq)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::{id_text, read_json, read_jsonl, Node, Walk};
    use crate::convert::test_support::TempDir;

    #[test]
    fn walks_hand_out_items_with_their_place_and_keep_the_rest() {
        let tmp = TempDir::new("json-walk");
        let path = tmp.0.join("walk.json");
        let mut seen = Vec::new();

        std::fs::write(&path, r#"{"a": [1, {"x": 2}], "b": "kept", "c": []}"#).unwrap();
        let kept = read_json(&path, Walk::Arrays(&["a", "c"]), |name, node| {
            seen.push((name.to_owned(), node.at, node.value.clone()));
            Ok(())
        })
        .unwrap();
        assert_eq!(kept, json!({"b": "kept"}));
        assert_eq!(seen, [("a".into(), "a[0]".into(), json!(1)), ("a".into(), "a[1]".into(), json!({"x": 2}))]);

        seen.clear();
        std::fs::write(&path, r#"{"k2": 3, "k1": {"y": null}}"#).unwrap();
        let kept = read_json(&path, Walk::Entries, |name, node| {
            seen.push((name.to_owned(), node.at, node.value.clone()));
            Ok(())
        })
        .unwrap();
        assert_eq!(kept, json!({}));
        assert_eq!(seen, [("k2".into(), "k2".into(), json!(3)), ("k1".into(), "k1".into(), json!({"y": null}))]);

        seen.clear();
        std::fs::write(&path, r#"[{"s": 1}, "t"]"#).unwrap();
        read_json(&path, Walk::Elements, |name, node| {
            seen.push((name.to_owned(), node.at, node.value.clone()));
            Ok(())
        })
        .unwrap();
        assert_eq!(seen, [("".into(), "[0]".into(), json!({"s": 1})), ("".into(), "[1]".into(), json!("t"))]);

        assert_eq!((id_text(&json!("0061120081")), id_text(&json!(42))), ("0061120081".into(), "42".into()));
    }

    #[test]
    fn errors_name_the_file_and_the_place() {
        let tmp = TempDir::new("json-errors");
        let path = tmp.0.join("errors.json");
        let error = |text: &str, walk: Walk| {
            std::fs::write(&path, text).unwrap();
            let err = read_json(&path, walk, |_, node| {
                if let Some(y) = node.field("x")?.opt("y") {
                    y.str()?;
                }
                Ok(())
            })
            .unwrap_err()
            .to_string();
            assert!(err.starts_with(&format!("{}: ", path.display())), "{err}");
            err
        };
        // The callback's error comes back, not serde's placeholder for it.
        let err = error(r#"{"a": [{"x": {}}, {"z": 1}]}"#, Walk::Arrays(&["a"]));
        assert!(err.ends_with("`a[1]`: missing key `x`"), "{err}");
        let err = error(r#"[{"x": {"y": 7}}]"#, Walk::Elements);
        assert!(err.ends_with("`[0].x.y`: expected a string, found a number"), "{err}");
        let err = error(r#"{"b": {"x": {"y": null}}, "c": []}"#, Walk::Arrays(&["a", "c"]));
        assert!(err.ends_with(": missing key `a`"), "{err}");
        let err = error(r#"{"a": []}"#, Walk::Elements);
        assert!(err.contains("invalid JSON") && err.contains("expected a JSON array"), "{err}");
        let err = error(r#"{"a": {}}"#, Walk::Arrays(&["a"]));
        assert!(err.contains("invalid JSON") && err.contains("expected an array under `a`"), "{err}");
        let err = error(r#"{"a": []} x"#, Walk::Arrays(&["a"]));
        assert!(err.contains("invalid JSON") && err.contains("trailing characters"), "{err}");
    }

    #[test]
    fn jsonl_lines_and_object_entries_are_named() {
        let tmp = TempDir::new("json-lines");
        let path = tmp.0.join("lines.jsonl");
        std::fs::write(&path, "{\"q\": {\"b\": 1, \"a\": \"x\"}}\n\n{\"q\": {\"c\": 2}}\n").unwrap();
        let mut seen = Vec::new();
        read_jsonl(&path, |node| {
            for (key, entry) in node.field("q")?.entries()? {
                seen.push((key.to_owned(), entry.at));
            }
            Ok(())
        })
        .unwrap();
        let seen: Vec<_> = seen.iter().map(|(k, at)| (k.as_str(), at.as_str())).collect();
        assert_eq!(seen[2], ("c", "line 3.q.c"), "blank lines are counted, not handed out");
        assert!(seen[..2].contains(&("a", "line 1.q.a")) && seen.len() == 3, "{seen:?}");

        let err = read_jsonl(&path, |node| node.field("r").map(drop)).unwrap_err().to_string();
        assert!(err.ends_with("`line 1`: missing key `r`"), "{err}");
        std::fs::write(&path, "{}\n{\"q\": [}\n").unwrap();
        let err = read_jsonl(&path, |_| Ok(())).unwrap_err().to_string();
        assert!(err.contains("lines.jsonl: line 2: invalid JSON"), "{err}");
        let value = serde_json::json!([1]);
        let err = Node::root(&path, &value).entries().err().unwrap().to_string();
        assert!(err.ends_with("expected an object, found an array"), "{err}");
    }
}
