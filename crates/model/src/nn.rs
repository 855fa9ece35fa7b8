//! The few layers PaliGemma is built from, and the weight source they are made from.
//!
//! A module is created with `new(cfg, weights, prefix)` and run with a plain `forward`.
//! [`Weights`] hands out tensors by checkpoint name: from a checkpoint (shape-checked)
//! or freshly initialised, so a loaded model and a random one are built by the same code.
//! It also records what it handed out, with the [`ParamKind`] the taking layer gives, so
//! each name is written once (where the layer takes it) and the model's parameter list is
//! that record.

use std::collections::BTreeMap;
use tch::{Device, Kind, Tensor};

use crate::int8::Int8Weight;
use crate::lora::{BaseDtype, Lora};
use crate::ModelError;

/// How a parameter is initialised when the model is created from scratch.
#[derive(Debug, Clone, Copy)]
pub enum Init {
    Zeros,
    Ones,
    /// Normal with mean 0 and this standard deviation.
    Normal(f64),
}

/// What a parameter is to the layer that takes it: what weight decay and initialisation
/// depend on, read from the layer instead of guessed from the name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamKind {
    /// A dense or convolution weight.
    Kernel,
    /// An additive bias.
    Bias,
    /// A normalisation layer's scale.
    NormScale,
    /// A token embedding table (also the tied output head).
    Embedding,
    /// Learned position embeddings.
    PositionEmbedding,
    /// A LoRA adapter's `A` or `B` ([`crate::lora`]).
    Adapter,
}

impl ParamKind {
    /// Whether weight decay applies unless a recipe says otherwise: to kernels alone, as
    /// big_vision decays only `.../kernel` (norm scales, biases and embeddings are spared).
    /// Adapters count as kernels: the recipe's `wd_mults` decide for them as for the layers
    /// they adapt.
    pub fn decays_by_default(self) -> bool {
        matches!(self, ParamKind::Kernel | ParamKind::Adapter)
    }
}

/// One parameter of a model: its checkpoint name, the tensor (sharing storage with the
/// model) and what it is.
#[derive(Debug)]
pub struct Param {
    pub name: String,
    pub tensor: Tensor,
    pub kind: ParamKind,
}

/// Where parameters come from.
enum Source {
    /// Tensors read from a checkpoint, by canonical name; taken out as the model is built.
    Checkpoint { tensors: BTreeMap<String, Tensor>, origin: String },
    /// Fresh initialisation on the target device (draws from libtorch's generator of that
    /// device; seed it first).
    Random,
}

/// The parameters a model is built from.
pub struct Weights {
    source: Source,
    device: Device,
    kind: Kind,
    /// The adapters linear layers add, if any.
    lora: Option<Lora>,
    /// What has been taken, in order.
    taken: Vec<Param>,
}

impl Weights {
    /// Parameters read from a checkpoint (`origin` names it in errors).
    pub fn from_tensors(
        tensors: BTreeMap<String, Tensor>,
        origin: impl Into<String>,
        device: Device,
        kind: Kind,
    ) -> Self {
        Self {
            source: Source::Checkpoint { tensors, origin: origin.into() },
            device,
            kind,
            lora: None,
            taken: Vec::new(),
        }
    }

    /// Freshly initialised parameters.
    pub fn random(device: Device, kind: Kind) -> Self {
        Self { source: Source::Random, device, kind, lora: None, taken: Vec::new() }
    }

    /// The same weights with LoRA adapters on the layers `lora` targets. Tensors of fully
    /// trained parts must already be among the weights' ([`crate::PaliGemma::load_at`] puts them there).
    pub fn with_lora(mut self, lora: Lora) -> Result<Self, ModelError> {
        if let Some(name) = lora.trained.keys().next() {
            return Err(ModelError::Invalid(format!(
                "{}: `{name}` was not placed among the base's tensors",
                lora.origin
            )));
        }
        self.lora = Some(lora);
        Ok(self)
    }

    /// The LoRA settings the weights were given, if any.
    pub fn lora(&self) -> Option<&crate::lora::LoraConfig> {
        self.lora.as_ref().map(|l| &l.config)
    }

    /// How the frozen base is held: as the model, unless LoRA settings say int8.
    pub fn base_dtype(&self) -> BaseDtype {
        self.lora.as_ref().map_or(BaseDtype::Model, |l| l.base_dtype)
    }

    /// The device parameters are placed on.
    pub fn device(&self) -> Device {
        self.device
    }

    /// The floating-point kind parameters are stored in.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// The parameter `name` with the expected `shape`, recorded as a `kind`.
    pub fn take(&mut self, name: &str, shape: &[i64], init: Init, kind: ParamKind) -> Result<Tensor, ModelError> {
        let tensor = self.fetch(name, shape, init)?;
        Ok(self.record(name, tensor, kind))
    }

    /// Whether linear layer `layer` is held in int8 ([`Lora::quantizes`]).
    fn quantizes(&self, layer: &str) -> bool {
        self.lora.as_ref().is_some_and(|l| l.quantizes(layer))
    }

    /// The frozen kernel `name` with the expected `shape`, quantised to int8 on the
    /// weights' device: not a parameter (nothing trains it, and checkpoints never hold it).
    fn take_int8(&mut self, name: &str, shape: &[i64], init: Init) -> Result<Int8Weight, ModelError> {
        let tensor = self.fetch(name, shape, init)?;
        Ok(Int8Weight::quantize(&tensor.to_device(self.device)))
    }

    /// The tensor `name` of the source, checked to have `shape`, or freshly initialised.
    fn fetch(&mut self, name: &str, shape: &[i64], init: Init) -> Result<Tensor, ModelError> {
        let device = self.device;
        match &mut self.source {
            Source::Random => {
                let opts = (Kind::Float, device);
                Ok(match init {
                    Init::Zeros => Tensor::zeros(shape, opts),
                    Init::Ones => Tensor::ones(shape, opts),
                    Init::Normal(std) => Tensor::randn(shape, opts) * std,
                })
            }
            Source::Checkpoint { tensors, origin } => {
                let t = tensors
                    .remove(name)
                    .ok_or_else(|| ModelError::Checkpoint(format!("{origin}: tensor `{name}` is missing")))?;
                if t.size() != shape {
                    return Err(ModelError::Checkpoint(format!(
                        "{origin}: tensor `{name}` has shape {:?}, the config implies {shape:?}",
                        t.size()
                    )));
                }
                Ok(t)
            }
        }
    }

    /// `tensor` on the weights' device and kind, recorded as parameter `name`.
    fn record(&mut self, name: &str, tensor: Tensor, kind: ParamKind) -> Tensor {
        let tensor = tensor.to_device(self.device).to_kind(self.kind).detach();
        self.taken.push(Param { name: name.to_string(), tensor: tensor.shallow_clone(), kind });
        tensor
    }

    /// The adapter of linear layer `layer` `(in_dim -> out_dim)` when the LoRA settings
    /// target it: read from the adapter source, or fresh as PEFT makes it.
    fn adapter(&mut self, layer: &str, in_dim: i64, out_dim: i64) -> Result<Option<Adapter>, ModelError> {
        let Some(lora) = self.lora.as_mut().filter(|l| l.config.targets(layer)) else { return Ok(None) };
        let (rank, scale, dropout) = (lora.config.rank as i64, lora.config.scale(), lora.config.dropout);
        let fresh = lora.fresh;
        let mut part = |which: &str, shape: [i64; 2]| -> Result<(String, Tensor), ModelError> {
            let name = format!("{layer}.{which}.weight");
            let tensor = match fresh {
                // kaiming_uniform_(a = sqrt(5)) on (rank, in): bound sqrt(6 / (1 + 5) / in).
                true if which == "lora_A" => {
                    let bound = 1.0 / (in_dim as f64).sqrt();
                    Tensor::empty(shape, (Kind::Float, self.device)).uniform_(-bound, bound)
                }
                true => Tensor::zeros(shape, (Kind::Float, self.device)),
                false => lora
                    .adapters
                    .remove(&name)
                    .ok_or_else(|| ModelError::Checkpoint(format!("{}: tensor `{name}` is missing", lora.origin)))?,
            };
            if tensor.size() != shape {
                return Err(ModelError::Checkpoint(format!(
                    "{}: tensor `{name}` has shape {:?}, rank {rank} and the layer imply {shape:?}",
                    lora.origin,
                    tensor.size()
                )));
            }
            Ok((name, tensor))
        };
        let (a_name, a) = part("lora_A", [rank, in_dim])?;
        let (b_name, b) = part("lora_B", [out_dim, rank])?;
        let a = self.record(&a_name, a, ParamKind::Adapter);
        let b = self.record(&b_name, b, ParamKind::Adapter);
        Ok(Some(Adapter { a, b, scale, dropout }))
    }

    /// The parameters taken so far, in order; errors if the checkpoint holds tensors the
    /// model did not use.
    pub fn finish(self) -> Result<Vec<Param>, ModelError> {
        if let Source::Checkpoint { tensors, origin } = self.source {
            if let Some(name) = tensors.keys().next() {
                let more = tensors.len() - 1;
                let tail = if more > 0 { format!(" (and {more} more)") } else { String::new() };
                return Err(ModelError::Checkpoint(format!(
                    "{origin}: unknown tensor `{name}`{tail}: it belongs to no part of this PaliGemma config"
                )));
            }
        }
        if let Some(name) = self.lora.as_ref().and_then(|l| l.adapters.keys().next()) {
            let origin = &self.lora.as_ref().unwrap().origin;
            return Err(ModelError::Checkpoint(format!("{origin}: adapter `{name}` belongs to no linear layer")));
        }
        Ok(self.taken)
    }
}

/// Collects `(checkpoint name, tensor)` pairs; the tensors share storage with the model.
pub type NamedTensors = Vec<(String, Tensor)>;

/// A LoRA adapter of a linear layer: adds `B A dropout(x) * scale` ([`crate::lora`]).
struct Adapter {
    /// `(rank, in)`.
    a: Tensor,
    /// `(out, rank)`.
    b: Tensor,
    scale: f64,
    dropout: f64,
}

/// A linear layer's weight: a parameter, or a frozen base's int8 copy.
enum Kernel {
    Dense(Tensor),
    Int8(Int8Weight),
}

/// Fully connected layer `x W^T + b`, plus its LoRA adapter's term if it has one. With a
/// frozen base in int8 (`lora.base_dtype`), the weight of a layer the LoRA settings
/// quantise is held in int8 ([`crate::int8`]).
pub struct Linear {
    kernel: Kernel,
    bias: Option<Tensor>,
    adapter: Option<Adapter>,
}

impl Linear {
    pub fn new(
        w: &mut Weights,
        prefix: &str,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
        init: Init,
    ) -> Result<Self, ModelError> {
        let (name, shape) = (format!("{prefix}.weight"), [out_dim as i64, in_dim as i64]);
        let kernel = match w.quantizes(prefix) {
            true => Kernel::Int8(w.take_int8(&name, &shape, init)?),
            false => Kernel::Dense(w.take(&name, &shape, init, ParamKind::Kernel)?),
        };
        let bias = match bias {
            true => Some(w.take(&format!("{prefix}.bias"), &[out_dim as i64], Init::Zeros, ParamKind::Bias)?),
            false => None,
        };
        let adapter = w.adapter(prefix, in_dim as i64, out_dim as i64)?;
        Ok(Self { kernel, bias, adapter })
    }

    /// `x W^T + b`, plus the adapter's term; `train` applies the adapter's dropout.
    pub fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let y = match &self.kernel {
            Kernel::Dense(weight) => x.linear(weight, self.bias.as_ref()),
            Kernel::Int8(weight) => match &self.bias {
                Some(bias) => weight.linear(x) + bias,
                None => weight.linear(x),
            },
        };
        match &self.adapter {
            None => y,
            Some(ad) => {
                let x = if train && ad.dropout > 0.0 { x.dropout(ad.dropout, true) } else { x.shallow_clone() };
                y + x.linear::<&Tensor>(&ad.a, None).linear::<&Tensor>(&ad.b, None) * ad.scale
            }
        }
    }
}

/// LayerNorm with weight and bias (SigLIP).
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn new(w: &mut Weights, prefix: &str, dim: usize, eps: f64) -> Result<Self, ModelError> {
        Ok(Self {
            weight: w.take(&format!("{prefix}.weight"), &[dim as i64], Init::Ones, ParamKind::NormScale)?,
            bias: w.take(&format!("{prefix}.bias"), &[dim as i64], Init::Zeros, ParamKind::Bias)?,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let dim = *self.weight.size().last().unwrap();
        x.layer_norm([dim], Some(&self.weight), Some(&self.bias), self.eps, true)
    }
}

/// Gemma's RMSNorm: `x * rsqrt(mean(x^2) + eps) * (1 + w)`, computed in f32.
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    pub fn new(w: &mut Weights, prefix: &str, dim: usize, eps: f64) -> Result<Self, ModelError> {
        // The stored weight is the offset from 1, so a fresh norm starts at zero.
        Ok(Self { weight: w.take(&format!("{prefix}.weight"), &[dim as i64], Init::Zeros, ParamKind::NormScale)?, eps })
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let xf = x.to_kind(Kind::Float);
        let rms = (xf.square().mean_dim(-1, true, Kind::Float) + self.eps).rsqrt();
        // Scale in f32 and round once, as transformers does ((x * w).to(dtype), not x.to(dtype) * w).
        (xf * rms * (self.weight.to_kind(Kind::Float) + 1.0)).to_kind(x.kind())
    }
}

/// The smallest finite value of `kind`: the masked-out score, as in transformers
/// (finite, so a row with nothing to attend to gives a uniform softmax, never NaN).
pub fn mask_value(kind: Kind) -> f64 {
    match kind {
        Kind::BFloat16 => -3.3895313892515355e38,
        Kind::Half => -65504.0,
        Kind::Double => f64::MIN,
        _ => f32::MIN as f64,
    }
}

/// `tanh(x / cap) * cap`: Gemma 2's soft-capping.
pub fn soft_cap(x: &Tensor, cap: Option<f64>) -> Tensor {
    match cap {
        Some(c) => (x / c).tanh() * c,
        None => x.shallow_clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rms_norm_matches_the_formula() {
        let mut w = Weights::from_tensors(
            BTreeMap::from([("n.weight".to_string(), Tensor::from_slice(&[0.5f32, -1.0, 0.0]))]),
            "test",
            Device::Cpu,
            Kind::Float,
        );
        let norm = RmsNorm::new(&mut w, "n", 3, 1e-6).unwrap();
        let x = Tensor::from_slice(&[1.0f32, 2.0, 3.0]).view([1, 3]);
        let y: Vec<f32> = norm.forward(&x).view([-1]).try_into().unwrap();
        let rms = ((1.0f32 + 4.0 + 9.0) / 3.0 + 1e-6).sqrt();
        let want = [1.0 / rms * 1.5, 2.0 / rms * 0.0, 3.0 / rms * 1.0];
        assert_eq!(y.len(), want.len());
        for (a, b) in y.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{y:?} vs {want:?}");
        }
    }

    #[test]
    fn rms_norm_runs_in_f32_for_bf16_input() {
        let mut w = Weights::random(Device::Cpu, Kind::BFloat16);
        let norm = RmsNorm::new(&mut w, "n", 4, 1e-6).unwrap();
        // Squares of 300 overflow nothing in f32; in bf16 the mean would lose precision.
        let x = Tensor::from_slice(&[300.0f32, -300.0, 300.0, -300.0]).view([1, 4]).to_kind(Kind::BFloat16);
        let y = norm.forward(&x);
        assert_eq!(y.kind(), Kind::BFloat16);
        let y: Vec<f32> = y.to_kind(Kind::Float).view([-1]).try_into().unwrap();
        assert_eq!(y, vec![1.0, -1.0, 1.0, -1.0]);
    }

    #[test]
    fn soft_cap_bounds_and_is_identity_when_off() {
        let x = Tensor::from_slice(&[-1000.0f32, 0.1, 1000.0]);
        let y: Vec<f32> = soft_cap(&x, Some(30.0)).try_into().unwrap();
        assert!((y[0] + 30.0).abs() < 1e-4 && (y[2] - 30.0).abs() < 1e-4);
        assert!((y[1] - 0.1).abs() < 1e-6);
        let same: Vec<f32> = soft_cap(&x, None).try_into().unwrap();
        assert_eq!(same, vec![-1000.0, 0.1, 1000.0]);
    }

    #[test]
    fn missing_and_misshapen_tensors_are_named() {
        let mut w = Weights::from_tensors(
            BTreeMap::from([("a.weight".to_string(), Tensor::zeros([2, 3], (Kind::Float, Device::Cpu)))]),
            "ckpt",
            Device::Cpu,
            Kind::Float,
        );
        let err = Linear::new(&mut w, "a", 2, 3, false, Init::Zeros).err().unwrap().to_string();
        assert!(err.contains("`a.weight`") && err.contains("[2, 3]") && err.contains("[3, 2]"), "{err}");
        let err = Linear::new(&mut w, "b", 2, 3, false, Init::Zeros).err().unwrap().to_string();
        assert!(err.contains("`b.weight` is missing"), "{err}");
    }

    #[test]
    fn leftover_tensors_are_reported() {
        let w = Weights::from_tensors(
            BTreeMap::from([("extra.bias".to_string(), Tensor::zeros([1], (Kind::Float, Device::Cpu)))]),
            "ckpt",
            Device::Cpu,
            Kind::Float,
        );
        let err = w.finish().unwrap_err().to_string();
        assert!(err.contains("unknown tensor `extra.bias`"), "{err}");
    }
}
