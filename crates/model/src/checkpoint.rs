//! Hugging Face model folders: `config.json` plus `model.safetensors`, or shards listed in
//! `model.safetensors.index.json`.
//!
//! transformers has named PaliGemma tensors in several ways over the years; every one is
//! mapped onto the layout of the released checkpoints, which is also what pg2 writes:
//!
//! | part | released layout (pg2's canonical names) | also read |
//! |---|---|---|
//! | vision | `vision_tower.vision_model.*` | `model.vision_tower.vision_model.*`, `vision_tower.*`, `model.vision_tower.*` |
//! | projector | `multi_modal_projector.linear.*` | `model.multi_modal_projector.linear.*` |
//! | decoder | `language_model.model.*` | `model.language_model.*` |
//! | head | absent (tied to `embed_tokens`) | `lm_head.weight`, `language_model.lm_head.weight` |

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, SafeTensors, View};
use tch::{Device, Kind, Tensor};

use crate::ModelError;

/// Canonical prefix of the vision tower.
pub const VISION: &str = "vision_tower.vision_model";
/// Canonical prefix of the projector.
pub const PROJECTOR: &str = "multi_modal_projector.linear";
/// Canonical prefix of the decoder.
pub const TEXT: &str = "language_model.model";
/// Canonical name of an untied output head.
pub const LM_HEAD: &str = "language_model.lm_head.weight";

/// A part of PaliGemma, as a recipe names it (`vision`, `projector`, `decoder`), for
/// freezing and for loading a part from its own checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Part {
    /// SigLIP: `vision_tower.*`.
    Vision,
    /// The linear projector: `multi_modal_projector.*`.
    Projector,
    /// Gemma 2 with its head: `language_model.*`.
    Decoder,
}

impl Part {
    /// Every part, in the order the model holds them.
    pub const ALL: [Part; 3] = [Part::Vision, Part::Projector, Part::Decoder];

    /// The part a canonical parameter name belongs to.
    pub fn of(name: &str) -> Option<Part> {
        Self::ALL.into_iter().find(|part| name.starts_with(part.prefix()))
    }

    /// The canonical-name prefix of the part's parameters (with its trailing dot).
    pub fn prefix(self) -> &'static str {
        match self {
            Part::Vision => "vision_tower.",
            Part::Projector => "multi_modal_projector.",
            Part::Decoder => "language_model.",
        }
    }

    /// The name a recipe uses.
    pub fn name(self) -> &'static str {
        match self {
            Part::Vision => "vision",
            Part::Projector => "projector",
            Part::Decoder => "decoder",
        }
    }
}

/// `(prefix in a file, canonical prefix)`, longest prefixes first.
const LAYOUTS: &[(&str, &str)] = &[
    ("model.vision_tower.vision_model.", "vision_tower.vision_model."),
    ("vision_tower.vision_model.", "vision_tower.vision_model."),
    ("model.vision_tower.", "vision_tower.vision_model."),
    ("vision_tower.", "vision_tower.vision_model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("multi_modal_projector.", "multi_modal_projector."),
    ("model.language_model.", "language_model.model."),
    ("language_model.model.", "language_model.model."),
    ("language_model.lm_head.", "language_model.lm_head."),
    ("lm_head.", "language_model.lm_head."),
];

/// Maps a tensor name of any known layout to pg2's canonical (released) name.
pub fn canonical_name(name: &str) -> Option<String> {
    LAYOUTS.iter().find_map(|(from, to)| name.strip_prefix(from).map(|rest| format!("{to}{rest}")))
}

/// The safetensors files of a model folder, in shard order.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>, ModelError> {
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    let index_path = dir.join("model.safetensors.index.json");
    if !index_path.exists() {
        return Err(ModelError::Checkpoint(format!(
            "{}: no model.safetensors or model.safetensors.index.json: is this a Hugging Face model folder?",
            dir.display()
        )));
    }
    let text = std::fs::read_to_string(&index_path).map_err(|e| ModelError::io(&index_path, e))?;
    let index: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| ModelError::Checkpoint(format!("{}: invalid JSON: {e}", index_path.display())))?;
    let map = index["weight_map"]
        .as_object()
        .ok_or_else(|| ModelError::Checkpoint(format!("{}: no `weight_map` object", index_path.display())))?;
    let mut files: Vec<String> = map.values().filter_map(|v| v.as_str().map(str::to_string)).collect();
    files.sort();
    files.dedup();
    Ok(files.into_iter().map(|f| dir.join(f)).collect())
}

fn kind_of(dtype: Dtype) -> Option<Kind> {
    match dtype {
        Dtype::F32 => Some(Kind::Float),
        Dtype::BF16 => Some(Kind::BFloat16),
        Dtype::F16 => Some(Kind::Half),
        Dtype::F64 => Some(Kind::Double),
        _ => None,
    }
}

/// Reads every tensor of the folder's safetensors files, renamed to canonical names.
/// Tensors stay in their on-disk dtype on the CPU; [`crate::nn::Weights`] converts them.
pub fn read_tensors(dir: &Path) -> Result<BTreeMap<String, Tensor>, ModelError> {
    let mut out = BTreeMap::new();
    for path in weight_files(dir)? {
        for (name, tensor) in read_file(&path)? {
            let canonical = canonical_name(&name).ok_or_else(|| {
                ModelError::Checkpoint(format!(
                    "{}: unknown tensor `{name}`: not part of a PaliGemma checkpoint",
                    path.display()
                ))
            })?;
            if out.insert(canonical.clone(), tensor).is_some() {
                return Err(ModelError::Checkpoint(format!(
                    "{}: tensor `{name}` appears twice (as `{canonical}` under another naming)",
                    dir.display()
                )));
            }
        }
    }
    Ok(out)
}

/// Every tensor of one safetensors file, by its stored name, on the CPU.
pub fn read_file(path: &Path) -> Result<Vec<(String, Tensor)>, ModelError> {
    let file = File::open(path).map_err(|e| ModelError::io(path, e))?;
    // SAFETY: the file is only read; a concurrent writer would be a user error that
    // safetensors' header checks turn into an error rather than UB in practice.
    let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| ModelError::io(path, e))?;
    let st = SafeTensors::deserialize(&mmap)
        .map_err(|e| ModelError::Checkpoint(format!("{}: not a valid safetensors file: {e}", path.display())))?;
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            let kind = kind_of(view.dtype()).ok_or_else(|| {
                ModelError::Checkpoint(format!(
                    "{}: tensor `{name}` has dtype {:?}; pg2 reads f32, bf16, f16",
                    path.display(),
                    view.dtype()
                ))
            })?;
            let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
            let tensor = Tensor::f_from_data_size(view.data(), &shape, kind)
                .map_err(|e| ModelError::Checkpoint(format!("{}: tensor `{name}`: {e}", path.display())))?;
            Ok((name, tensor))
        })
        .collect()
}

/// Calls `visit(name, kind, data)` for each tensor of the safetensors file at `path`, with
/// its bytes straight from a memory map: only the bytes the visitor copies are read from
/// disk (for taking a few runs out of a large file).
pub fn visit_file(
    path: &Path,
    mut visit: impl FnMut(&str, Kind, &[u8]) -> Result<(), ModelError>,
) -> Result<(), ModelError> {
    let file = File::open(path).map_err(|e| ModelError::io(path, e))?;
    // SAFETY: as in `read_file`.
    let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| ModelError::io(path, e))?;
    let st = SafeTensors::deserialize(&mmap)
        .map_err(|e| ModelError::Checkpoint(format!("{}: not a valid safetensors file: {e}", path.display())))?;
    for (name, view) in st.tensors() {
        let kind = kind_of(view.dtype()).ok_or_else(|| {
            ModelError::Checkpoint(format!("{}: tensor `{name}` has dtype {:?}", path.display(), view.dtype()))
        })?;
        visit(&name, kind, view.data())?;
    }
    Ok(())
}

/// Writes `tensors` as one safetensors file, converted to `kind`.
pub fn write_file(path: &Path, tensors: &[(String, Tensor)], kind: Kind) -> Result<(), ModelError> {
    let views = tensors
        .iter()
        .map(|(n, t)| Ok((n.clone(), TensorBytes::new(t, kind)?)))
        .collect::<Result<Vec<_>, ModelError>>()?;
    let metadata = Some(HashMap::from([("format".to_string(), "pt".to_string())]));
    safetensors::serialize_to_file(views, metadata, path)
        .map_err(|e| ModelError::Checkpoint(format!("{}: {e}", path.display())))
}

/// A CPU tensor's bytes, for the safetensors writer.
struct TensorBytes {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl TensorBytes {
    fn new(t: &Tensor, kind: Kind) -> Result<Self, ModelError> {
        let t = t.detach().to_device(Device::Cpu).to_kind(kind).contiguous();
        let dtype = match kind {
            Kind::Float => Dtype::F32,
            Kind::BFloat16 => Dtype::BF16,
            Kind::Half => Dtype::F16,
            other => return Err(ModelError::Invalid(format!("cannot save tensors as {other:?}"))),
        };
        let numel = t.numel();
        let mut data = vec![0u8; numel * kind.elt_size_in_bytes()];
        t.f_copy_data_u8(&mut data, numel).map_err(|e| ModelError::Invalid(e.to_string()))?;
        Ok(Self { dtype, shape: t.size().iter().map(|&d| d as usize).collect(), data })
    }
}

impl View for TensorBytes {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// Largest shard pg2 writes, as transformers' default `max_shard_size`.
const MAX_SHARD_BYTES: usize = 5 << 30;

/// Writes `tensors` (canonical names) as `model.safetensors`, or as shards with an index
/// when they exceed 5 GB, converted to `kind`.
pub fn write_tensors(dir: &Path, tensors: &[(String, Tensor)], kind: Kind) -> Result<(), ModelError> {
    std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    let bytes_of = |t: &Tensor| t.numel() * kind.elt_size_in_bytes();
    let mut shards: Vec<Vec<(String, Tensor)>> = vec![vec![]];
    let mut shard_bytes = 0;
    for (name, t) in tensors {
        if shard_bytes > 0 && shard_bytes + bytes_of(t) > MAX_SHARD_BYTES {
            shards.push(vec![]);
            shard_bytes = 0;
        }
        shard_bytes += bytes_of(t);
        shards.last_mut().unwrap().push((name.clone(), t.shallow_clone()));
    }
    let n = shards.len();
    let mut weight_map = serde_json::Map::new();
    for (i, shard) in shards.iter().enumerate() {
        let file =
            if n == 1 { "model.safetensors".to_string() } else { format!("model-{:05}-of-{n:05}.safetensors", i + 1) };
        for (name, _) in shard {
            weight_map.insert(name.clone(), file.clone().into());
        }
        write_file(&dir.join(&file), shard, kind)?;
    }
    if n > 1 {
        let total: usize = tensors.iter().map(|(_, t)| bytes_of(t)).sum();
        let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        let path = dir.join("model.safetensors.index.json");
        std::fs::write(&path, serde_json::to_string_pretty(&index).unwrap()).map_err(|e| ModelError::io(&path, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_layout_maps_to_the_released_names() {
        let cases = [
            ("model.vision_tower.vision_model.post_layernorm.bias", "vision_tower.vision_model.post_layernorm.bias"),
            ("vision_tower.vision_model.post_layernorm.bias", "vision_tower.vision_model.post_layernorm.bias"),
            ("vision_tower.post_layernorm.bias", "vision_tower.vision_model.post_layernorm.bias"),
            ("model.multi_modal_projector.linear.weight", "multi_modal_projector.linear.weight"),
            ("model.language_model.layers.0.mlp.up_proj.weight", "language_model.model.layers.0.mlp.up_proj.weight"),
            ("language_model.model.norm.weight", "language_model.model.norm.weight"),
            ("lm_head.weight", LM_HEAD),
            ("language_model.lm_head.weight", LM_HEAD),
        ];
        for (from, to) in cases {
            assert_eq!(canonical_name(from).as_deref(), Some(to), "{from}");
        }
        assert_eq!(canonical_name("text_model.embeddings.weight"), None);
    }

    #[test]
    fn write_then_read_round_trips_in_both_dtypes() {
        let dir = std::env::temp_dir().join(format!("pg2-ckpt-test-{}", std::process::id()));
        let t = Tensor::from_slice(&[1.5f32, -2.25, 3.0, 0.125]).view([2, 2]);
        for kind in [Kind::Float, Kind::BFloat16] {
            write_tensors(&dir, &[(format!("{TEXT}.norm.weight"), t.shallow_clone())], kind).unwrap();
            let back = read_tensors(&dir).unwrap();
            let got = &back[&format!("{TEXT}.norm.weight")];
            assert_eq!(got.kind(), kind);
            assert!(got.to_kind(Kind::Float).equal(&t), "values exact in {kind:?}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn foreign_tensor_and_corrupt_file_are_named() {
        let dir = std::env::temp_dir().join(format!("pg2-ckpt-bad-{}", std::process::id()));
        let t = Tensor::zeros([2], (Kind::Float, Device::Cpu));
        let bytes = TensorBytes::new(&t, Kind::Float).unwrap();
        std::fs::create_dir_all(&dir).unwrap();
        safetensors::serialize_to_file([("text_model.x", bytes)], None, &dir.join("model.safetensors")).unwrap();
        let err = read_tensors(&dir).unwrap_err().to_string();
        assert!(err.contains("unknown tensor `text_model.x`"), "{err}");
        std::fs::write(dir.join("model.safetensors"), b"\x10\x00\x00\x00\x00\x00\x00\x00{not json").unwrap();
        let err = read_tensors(&dir).unwrap_err().to_string();
        assert!(err.contains("model.safetensors") && err.contains("not a valid safetensors file"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
        let err = read_tensors(&dir).unwrap_err().to_string();
        assert!(err.contains("no model.safetensors"), "{err}");
    }
}
