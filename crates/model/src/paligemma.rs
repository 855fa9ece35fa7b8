//! PaliGemma 2: SigLIP image tokens, projected to the decoder's width, take the places of
//! the `<image>` placeholders; the Gemma 2 decoder runs over them and the text as a
//! prefix-LM.

use std::path::Path;
use std::sync::Arc;

use tch::{Device, Kind, Tensor};

use crate::checkpoint::{self, LM_HEAD, PROJECTOR, TEXT, VISION};
use crate::config::PaliGemmaConfig;
use crate::gemma2::{Gemma2, KvCache, RunOptions, TokenLayout};
use crate::layer_params::LayerParams;
use crate::lora::{self, BaseDtype, Lora, LoraConfig};
use crate::nn::{Init, Linear, NamedTensors, Param, Weights};
use crate::siglip::{resample_positions, SiglipVision};
use crate::ModelError;

/// One forward call's input.
pub struct Inputs {
    /// `(batch, 3, res, res)` pixels in [-1, 1]; `None` for decoding steps after the prefill.
    pub pixels: Option<Tensor>,
    /// `(batch, tokens)` int64 token ids, with one `<image>` placeholder per image token.
    pub ids: Tensor,
    /// Which tokens attend to which.
    pub layout: TokenLayout,
}

/// Predicted distributions at the supervised positions of a batch.
pub struct Targets {
    /// `(n, vocab)` f32 log-probabilities.
    pub log_probs: Tensor,
    /// `(n,)` the target token ids.
    pub targets: Tensor,
    /// `(n,)` the batch row of each.
    pub example: Tensor,
}

/// The composite model.
pub struct PaliGemma {
    pub config: PaliGemmaConfig,
    pub options: RunOptions,
    vision: SiglipVision,
    projector: Linear,
    text: Gemma2,
    /// Every parameter, as the layers took them from the weights.
    params: Vec<Param>,
    /// The LoRA settings when the model has adapters.
    lora: Option<LoraConfig>,
    /// How the frozen base's decoder layers are held.
    base_dtype: BaseDtype,
    /// Where the layers' parameters come from when they are sharded ([`PaliGemma::shard_layers`]).
    layer_params: Option<Arc<dyn LayerParams>>,
}

impl PaliGemma {
    /// Builds the model from `weights` (a checkpoint, every tensor of which it must use, or
    /// fresh initialisation).
    pub fn new(config: PaliGemmaConfig, mut weights: Weights, options: RunOptions) -> Result<Self, ModelError> {
        let vision = SiglipVision::new(&config.vision, &mut weights, VISION)?;
        // big_vision zero-initialises the projector (its ViT `head`).
        let projector = Linear::new(
            &mut weights,
            PROJECTOR,
            config.vision.hidden_size,
            config.text.hidden_size,
            true,
            Init::Zeros,
        )?;
        let tied = config.tie_word_embeddings;
        let text = Gemma2::new(&config.text, &mut weights, TEXT, LM_HEAD, tied)?;
        let (lora, base_dtype) = (weights.lora().cloned(), weights.base_dtype());
        let params = weights.finish()?;
        Ok(Self { config, options, vision, projector, text, params, lora, base_dtype, layer_params: None })
    }

    /// Loads a Hugging Face model folder onto `device`, computing in `kind`.
    pub fn load(dir: &Path, device: Device, kind: Kind, options: RunOptions) -> Result<Self, ModelError> {
        Self::load_at(dir, None, None, device, kind, options)
    }

    /// As [`PaliGemma::load`], moved to another image `resolution` when given: the position
    /// embedding grid is resampled bilinearly, corners aligned as big_vision does (stage
    /// chaining 224 -> 448 -> 896 px); with `lora`, its adapters are added (and the parts
    /// it trains in full take its tensors).
    pub fn load_at(
        dir: &Path,
        resolution: Option<usize>,
        mut lora: Option<Lora>,
        device: Device,
        kind: Kind,
        options: RunOptions,
    ) -> Result<Self, ModelError> {
        let mut config = PaliGemmaConfig::from_file(&dir.join("config.json"))?;
        let mut tensors = checkpoint::read_tensors(dir)?;
        if let Some(lora) = &mut lora {
            // The adapter file's fully trained parts replace the base's tensors (before any
            // move to a new resolution, which they take part in).
            for (name, tensor) in std::mem::take(&mut lora.trained) {
                if tensors.insert(name.clone(), tensor).is_none() {
                    return Err(ModelError::Checkpoint(format!(
                        "{}: `{name}` is not in {}",
                        lora.origin,
                        dir.display()
                    )));
                }
            }
        }
        if let Some(res) = resolution.filter(|&r| r != config.vision.image_size) {
            if res == 0 || !res.is_multiple_of(config.vision.patch_size) {
                return Err(ModelError::Invalid(format!(
                    "resolution {res} is not a positive multiple of the patch size {}",
                    config.vision.patch_size
                )));
            }
            config.vision.image_size = res;
            let name = format!("{VISION}.embeddings.position_embedding.weight");
            if let Some(positions) = tensors.remove(&name) {
                tensors.insert(name, resample_positions(&positions, config.vision.grid() as i64));
            }
        }
        if config.tie_word_embeddings {
            // Some exports store the tied head anyway; it must then be the embedding.
            if let Some(head) = tensors.remove(LM_HEAD) {
                let embed = &tensors.get(&format!("{TEXT}.embed_tokens.weight"));
                if !embed.is_some_and(|e| e.size() == head.size() && e.equal(&head)) {
                    return Err(ModelError::Checkpoint(format!(
                        "{}: lm_head.weight differs from embed_tokens although config.json says tie_word_embeddings",
                        dir.display()
                    )));
                }
            }
        }
        let mut weights = Weights::from_tensors(tensors, dir.display().to_string(), device, kind);
        if let Some(lora) = lora {
            weights = weights.with_lora(lora)?;
        }
        Self::new(config, weights, options)
    }

    /// Writes a Hugging Face model folder (config.json + safetensors in the released layout),
    /// or for a model with adapters a PEFT adapter folder ([`crate::lora`]).
    pub fn save(&self, dir: &Path, kind: Kind) -> Result<(), ModelError> {
        self.save_weights(dir, &self.parameters(), kind)
    }

    /// The LoRA settings when the model has adapters.
    pub fn lora(&self) -> Option<&LoraConfig> {
        self.lora.as_ref()
    }

    /// Whether [`PaliGemma::save`] writes parameter `name`: all of them, or with adapters
    /// the adapters and the parts trained in full.
    pub fn saves(&self, name: &str) -> bool {
        self.lora.as_ref().is_none_or(|l| self.params.iter().any(|p| p.name == name && lora::is_saved(l, p)))
    }

    /// [`PaliGemma::save`] with `weights` (this model's parameters by name, e.g. host copies
    /// of sharded ones) in place of the parameters themselves.
    pub fn save_weights(&self, dir: &Path, weights: &[(String, Tensor)], kind: Kind) -> Result<(), ModelError> {
        if let Some(lora) = &self.lora {
            return lora::write_adapter(dir, lora, weights, kind);
        }
        self.save_plain(dir, weights, kind)
    }

    /// Writes a plain Hugging Face model folder with the adapters folded into their layers
    /// (the parameters as they are for a model without adapters). Not for a base held in
    /// int8, whose decoder weights are no parameters: fold the adapters into the base
    /// checkpoint itself (`pg2 merge`).
    pub fn save_merged(&self, dir: &Path, kind: Kind) -> Result<(), ModelError> {
        if self.base_dtype == BaseDtype::Int8 {
            return Err(ModelError::Invalid(
                "the base is held in int8: merge the adapters into the base checkpoint (pg2 merge)".into(),
            ));
        }
        match &self.lora {
            Some(lora) => self.save_plain(dir, &lora::merged(lora, &self.parameters()), kind),
            None => self.save_plain(dir, &self.parameters(), kind),
        }
    }

    fn save_plain(&self, dir: &Path, weights: &[(String, Tensor)], kind: Kind) -> Result<(), ModelError> {
        checkpoint::write_tensors(dir, weights, kind)?;
        let config = serde_json::to_string_pretty(&self.config.to_json()).unwrap();
        let path = dir.join("config.json");
        std::fs::write(&path, config).map_err(|e| ModelError::io(&path, e))
    }

    /// Every parameter with its checkpoint name; the tensors share storage with the model.
    pub fn parameters(&self) -> NamedTensors {
        self.params.iter().map(|p| (p.name.clone(), p.tensor.shallow_clone())).collect()
    }

    /// Every parameter with its name and kind, in the order the model took them.
    pub fn params(&self) -> &[Param] {
        &self.params
    }

    /// Number of decoder layers, for [`KvCache::new`].
    pub fn num_layers(&self) -> usize {
        self.text.num_layers()
    }

    /// Device of the parameters.
    pub fn device(&self) -> Device {
        self.params[0].tensor.device()
    }

    /// Compute kind of the parameters.
    pub fn kind(&self) -> Kind {
        self.params[0].tensor.kind()
    }

    /// Projected image tokens `(batch, patches, width)` for pixels `(batch, 3, res, res)`.
    pub fn encode_images(&self, pixels: &Tensor) -> Tensor {
        let features = self.vision.forward(pixels, self.options, self.layer_params.as_ref());
        self.projector.forward(&features, self.options.lora_dropout)
    }

    /// Runs each layer with its parameters from `params` (gathered around each use): for
    /// sharded parameters, whose tensors hold nothing between uses.
    pub fn shard_layers(&mut self, params: Arc<dyn LayerParams>) {
        self.layer_params = Some(params);
    }

    /// Input embeddings: scaled text embeddings, with image tokens (unscaled) placed at
    /// the `<image>` placeholders in order.
    pub fn embed(&self, ids: &Tensor, pixels: Option<&Tensor>) -> Result<Tensor, ModelError> {
        let is_image = ids.eq(self.config.image_token_id);
        // The placeholder id lies past the embedding table; any row will do, it is replaced.
        let text_ids = ids.where_scalarother(&is_image.logical_not(), 0);
        let embeds = self.text.embed(&text_ids);
        let placeholders = is_image.sum(Kind::Int64).int64_value(&[]);
        match pixels {
            None if placeholders == 0 => Ok(embeds),
            None => Err(ModelError::Invalid(format!("{placeholders} <image> tokens but no pixels"))),
            Some(pixels) => {
                let features = self.encode_images(pixels);
                if placeholders != features.size()[0] * features.size()[1] {
                    return Err(ModelError::Invalid(format!(
                        "{placeholders} <image> tokens for {} images of {} tokens each",
                        features.size()[0],
                        features.size()[1]
                    )));
                }
                Ok(embeds.masked_scatter(&is_image.unsqueeze(-1), &features.to_kind(embeds.kind())))
            }
        }
    }

    /// Final hidden states `(batch, tokens, width)`; with a cache, continues and extends it.
    pub fn forward(&self, inputs: &Inputs, cache: Option<&mut KvCache>) -> Result<Tensor, ModelError> {
        let embeds = self.embed(&inputs.ids, inputs.pixels.as_ref())?;
        Ok(self.text.forward(&embeds, &inputs.layout, cache, self.options, self.layer_params.as_ref()))
    }

    /// Output logits for hidden states, in f32.
    pub fn logits(&self, hidden: &Tensor) -> Tensor {
        self.text.logits(hidden, self.options)
    }

    /// The predicted distributions at the tokens where `loss_mask` `(batch, tokens)` is
    /// true, given all tokens before them, batch-major. Differentiable: training losses
    /// are built from these.
    pub fn target_distributions(&self, inputs: &Inputs, loss_mask: &Tensor) -> Result<Targets, ModelError> {
        let hidden = self.forward(inputs, None)?;
        let t = inputs.ids.size()[1];
        // Position i predicts token i + 1: keep only the rows whose target is supervised,
        // so the vocabulary-sized logits exist for those alone.
        let rows = loss_mask.narrow(1, 1, t - 1).nonzero();
        let (example, position) = (rows.select(1, 0), rows.select(1, 1));
        let select = |x: &Tensor| x.index(&[Some(&example), Some(&position)]);
        let hidden = select(&hidden.narrow(1, 0, t - 1));
        let targets = select(&inputs.ids.narrow(1, 1, t - 1));
        let log_probs = self.logits(&hidden).log_softmax(-1, Kind::Float);
        Ok(Targets { log_probs, targets, example })
    }

    /// Log-probabilities of the target tokens: `(logprobs, example)`, both `(n,)`.
    pub fn target_logprobs(&self, inputs: &Inputs, loss_mask: &Tensor) -> Result<(Tensor, Tensor), ModelError> {
        let t = self.target_distributions(inputs, loss_mask)?;
        Ok((t.log_probs.gather(1, &t.targets.unsqueeze(1), false).squeeze_dim(1), t.example))
    }

    /// Sum of the target log-probabilities of each sequence, in f64 on the CPU.
    pub fn sequence_logprobs(&self, inputs: &Inputs, loss_mask: &Tensor) -> Result<Vec<f64>, ModelError> {
        let (logprobs, example) = self.target_logprobs(inputs, loss_mask)?;
        let b = inputs.ids.size()[0];
        let sums = Tensor::zeros([b], (Kind::Double, logprobs.device())).index_add(
            0,
            &example,
            &logprobs.to_kind(Kind::Double),
        );
        Ok(Vec::<f64>::try_from(sums.to_device(Device::Cpu)).unwrap())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lora::{Lora, LoraConfig};
    use crate::nn::soft_cap;
    use crate::{PaliGemmaConfig, ParamKind, Part, TokenLayout, Weights};

    /// The layers record what each tensor is, for weight decay and freezing to read.
    #[test]
    fn parameters_are_recorded_with_their_kind_and_part() {
        let config = PaliGemmaConfig::tiny(40, 39, 32).unwrap();
        let model = PaliGemma::new(config, Weights::random(Device::Cpu, Kind::Float), RunOptions::default()).unwrap();
        let kind =
            |name: &str| model.params().iter().find(|p| p.name == name).unwrap_or_else(|| panic!("no {name}")).kind;
        let vision = "vision_tower.vision_model";
        assert_eq!(kind(&format!("{vision}.embeddings.patch_embedding.weight")), ParamKind::Kernel);
        assert_eq!(kind(&format!("{vision}.embeddings.patch_embedding.bias")), ParamKind::Bias);
        assert_eq!(kind(&format!("{vision}.embeddings.position_embedding.weight")), ParamKind::PositionEmbedding);
        assert_eq!(kind(&format!("{vision}.encoder.layers.0.layer_norm1.weight")), ParamKind::NormScale);
        assert_eq!(kind(&format!("{vision}.encoder.layers.0.layer_norm1.bias")), ParamKind::Bias);
        assert_eq!(kind(&format!("{vision}.encoder.layers.0.mlp.fc1.weight")), ParamKind::Kernel);
        assert_eq!(kind("multi_modal_projector.linear.weight"), ParamKind::Kernel);
        assert_eq!(kind("language_model.model.embed_tokens.weight"), ParamKind::Embedding);
        assert_eq!(kind("language_model.model.layers.0.post_feedforward_layernorm.weight"), ParamKind::NormScale);
        assert_eq!(kind("language_model.model.layers.0.self_attn.q_proj.weight"), ParamKind::Kernel);
        assert_eq!(kind("language_model.model.norm.weight"), ParamKind::NormScale);
        let mut names: Vec<&str> = model.params().iter().map(|p| p.name.as_str()).collect();
        assert!(names.iter().all(|n| Part::of(n).is_some()), "every parameter belongs to a part");
        let parts: Vec<Part> = names.iter().map(|n| Part::of(n).unwrap()).collect();
        assert_eq!(parts.first(), Some(&Part::Vision));
        assert_eq!(parts.last(), Some(&Part::Decoder));
        assert!(parts.contains(&Part::Projector));
        let count = names.len();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), count, "each name once");
    }

    #[test]
    fn parameter_counts_from_the_config_are_those_the_model_takes() {
        for config in [PaliGemmaConfig::tiny(40, 39, 32).unwrap(), PaliGemmaConfig::paligemma2(3, 224).unwrap()] {
            let counts = config.parameter_counts();
            if config.text.hidden_size > 1000 {
                // The released 3B: 3.03B parameters (400M vision, 2.6B Gemma 2 2B with its
                // 257k-token embedding).
                let total: i64 = counts.iter().map(|c| c.1).sum();
                assert!((3.0e9..3.1e9).contains(&(total as f64)), "{total}");
                continue;
            }
            let model =
                PaliGemma::new(config.clone(), Weights::random(Device::Cpu, Kind::Float), RunOptions::default())
                    .unwrap();
            for (part, count) in counts {
                let taken: i64 = model
                    .params()
                    .iter()
                    .filter(|p| Part::of(&p.name) == Some(part))
                    .map(|p| p.tensor.numel() as i64)
                    .sum();
                assert_eq!(count, taken, "{part:?}");
            }
        }
    }

    /// The config's list of linear layers is the model's: what `pg2 plan` counts LoRA
    /// adapters from.
    #[test]
    fn linear_layers_from_the_config_are_the_model_s() {
        let config = PaliGemmaConfig::tiny(40, 39, 32).unwrap();
        let model =
            PaliGemma::new(config.clone(), Weights::random(Device::Cpu, Kind::Float), RunOptions::default()).unwrap();
        let kernels: Vec<(String, Vec<i64>)> = model
            .params()
            .iter()
            .filter(|p| p.kind == ParamKind::Kernel && p.tensor.dim() == 2)
            .map(|p| (p.name.clone(), p.tensor.size()))
            .collect();
        let listed: Vec<(String, Vec<i64>)> = config
            .linear_layers()
            .into_iter()
            .map(|(name, i, o)| (format!("{name}.weight"), vec![o as i64, i as i64]))
            .collect();
        assert_eq!(listed, kernels);
    }

    /// Two examples for the tiny model: random pixels, image placeholders, 3 prompt tokens
    /// and 3 supervised ones; with the loss mask.
    fn tiny_batch(model: &PaliGemma) -> (Inputs, Tensor) {
        let image = model.config.vision.num_patches() as i64;
        let ids = Tensor::cat(
            &[
                Tensor::full([2, image], 39, (Kind::Int64, Device::Cpu)),
                Tensor::randint_low(1, 38, [2, 6], (Kind::Int64, Device::Cpu)),
            ],
            1,
        );
        let mask_ar = Tensor::cat(
            &[
                Tensor::zeros([2, image + 3], (Kind::Int64, Device::Cpu)),
                Tensor::ones([2, 3], (Kind::Int64, Device::Cpu)),
            ],
            1,
        );
        let inputs = Inputs {
            pixels: Some(Tensor::rand([2, 3, 32, 32], (Kind::Float, Device::Cpu)) * 2.0 - 1.0),
            ids,
            layout: TokenLayout { valid: mask_ar.ones_like().to_kind(Kind::Bool), mask_ar: mask_ar.shallow_clone() },
        };
        (inputs, mask_ar.to_kind(Kind::Bool))
    }

    /// The tiny model's weights with adapters on every linear layer kind (decoder, SigLIP,
    /// projector), `B` zero unless `b_std` draws it, in `kind`, the base held as `base_dtype`.
    fn adapted(base: &PaliGemma, b_std: Option<f64>, kind: Kind, base_dtype: BaseDtype) -> PaliGemma {
        let tensors = base.parameters().into_iter().map(|(n, t)| (n, t.copy())).collect();
        let targets =
            [LoraConfig::default_targets(), vec!["fc1".into(), "multi_modal_projector.linear".into()]].concat();
        let config = LoraConfig { rank: 2, alpha: 3.0, dropout: 0.5, targets, trained: vec![] };
        let lora = Lora::fresh(config).on_base(base_dtype);
        let weights = Weights::from_tensors(tensors, "base", Device::Cpu, kind).with_lora(lora).unwrap();
        let model = PaliGemma::new(base.config.clone(), weights, RunOptions::default()).unwrap();
        if let Some(std) = b_std {
            let b = model.params().iter().filter(|p| p.name.ends_with("lora_B.weight"));
            tch::no_grad(|| b.for_each(|p| drop(p.tensor.shallow_clone().normal_(0.0, std))));
        }
        model
    }

    fn random_base(kind: Kind) -> PaliGemma {
        tch::manual_seed(7);
        let config = PaliGemmaConfig::tiny(40, 39, 32).unwrap();
        let model = PaliGemma::new(config, Weights::random(Device::Cpu, kind), RunOptions::default()).unwrap();
        // A non-zero projector, so that the image reaches the text.
        let projector = model.params().iter().filter(|p| p.name.starts_with(PROJECTOR));
        tch::no_grad(|| projector.for_each(|p| drop(p.tensor.shallow_clone().normal_(0.0, 0.1))));
        model
    }

    /// PEFT's start: B = 0, so the adapted model computes exactly what the base does (with
    /// the adapters' dropout on too), in every dtype.
    #[test]
    fn zero_initialised_adapters_leave_outputs_unchanged() {
        for kind in [Kind::Float, Kind::BFloat16] {
            let base = random_base(kind);
            let (inputs, loss_mask) = tiny_batch(&base);
            let mut model = adapted(&base, None, kind, BaseDtype::Model);
            let names: Vec<&str> =
                model.params().iter().filter(|p| p.kind == ParamKind::Adapter).map(|p| p.name.as_str()).collect();
            // 7 decoder projections x 2 layers + 2 SigLIP fc1 + the projector, each A and B.
            assert_eq!(
                names.len(),
                2 * (7 * base.config.text.num_hidden_layers + base.config.vision.num_hidden_layers + 1)
            );
            assert!(names.contains(&"vision_tower.vision_model.encoder.layers.0.mlp.fc1.lora_A.weight"), "{names:?}");
            let a = model.params().iter().find(|p| p.name.ends_with("q_proj.lora_A.weight")).unwrap();
            let bound = 1.0 / (base.config.text.hidden_size as f64).sqrt();
            assert!(a.tensor.abs().max().double_value(&[]) <= bound, "kaiming-uniform(a=sqrt(5)) bound");
            model.options.lora_dropout = true;
            let want = tch::no_grad(|| base.target_logprobs(&inputs, &loss_mask)).unwrap().0;
            let got = tch::no_grad(|| model.target_logprobs(&inputs, &loss_mask)).unwrap().0;
            assert!(got.equal(&want), "{kind:?}");
        }
    }

    /// `pg2 merge`'s folding: the merged weights without adapters score as the adapted model.
    #[test]
    fn merged_adapters_score_as_unmerged() {
        let base = random_base(Kind::Float);
        let (inputs, loss_mask) = tiny_batch(&base);
        let model = adapted(&base, Some(0.5), Kind::Float, BaseDtype::Model);
        let lora = model.lora().unwrap();
        let merged = lora::merged(lora, &model.parameters());
        assert_eq!(merged.len(), base.parameters().len());
        let weights = Weights::from_tensors(merged.into_iter().collect(), "merged", Device::Cpu, Kind::Float);
        let plain = PaliGemma::new(base.config.clone(), weights, RunOptions::default()).unwrap();
        let score = |m: &PaliGemma| tch::no_grad(|| m.target_logprobs(&inputs, &loss_mask)).unwrap().0;
        let (want, got, before) = (score(&model), score(&plain), score(&base));
        assert!(!want.allclose(&before, 1e-3, 1e-3, false), "the adapters change the outputs");
        assert!(got.allclose(&want, 1e-4, 1e-4, false), "{got} vs {want}");
    }

    /// A frozen base in int8 scores within a stated tolerance of the same base in the
    /// model's dtype, with the same adapters (f32 and bf16): target log-probs within 0.1
    /// (0.04 on average; measured 0.036 and 0.015 in f32, 0.027 and 0.012 in bf16, on
    /// log-probs of -0.6 to -7.7); and the adapters' gradients, down to the vision tower's
    /// below the int8 decoder, within 5 % (f32) or 10 % (bf16) of the full base's, as one
    /// vector.
    #[test]
    fn an_int8_base_scores_and_trains_as_the_full_base_within_tolerance() {
        for kind in [Kind::Float, Kind::BFloat16] {
            let base = random_base(kind);
            let (inputs, loss_mask) = tiny_batch(&base);
            let (full, int8) =
                (adapted(&base, Some(0.05), kind, BaseDtype::Model), adapted(&base, None, kind, BaseDtype::Int8));
            // The same adapters on both (tests share the generator, so no seed makes two draws equal).
            for (p, q) in int8
                .params()
                .iter()
                .filter(|p| p.kind == ParamKind::Adapter)
                .zip(full.params().iter().filter(|p| p.kind == ParamKind::Adapter))
            {
                assert_eq!(p.name, q.name);
                tch::no_grad(|| p.tensor.shallow_clone().copy_(&q.tensor));
            }
            // The decoder layers' 7 projections are no parameters; everything else is.
            let names = |m: &PaliGemma| m.params().iter().map(|p| p.name.clone()).collect::<Vec<_>>();
            let layers = base.config.text.num_hidden_layers;
            assert_eq!(names(&full).len() - names(&int8).len(), 7 * layers);
            let decoder_kernel =
                |n: &String| n.starts_with("language_model.model.layers.") && n.ends_with("proj.weight");
            assert!(!names(&int8).iter().any(decoder_kernel) && names(&full).iter().any(decoder_kernel));
            let run = |m: &PaliGemma| {
                let adapters: Vec<Tensor> = m
                    .params()
                    .iter()
                    .filter(|p| p.kind == ParamKind::Adapter)
                    .map(|p| p.tensor.shallow_clone().set_requires_grad(true))
                    .collect();
                let (logprobs, _) = m.target_logprobs(&inputs, &loss_mask).unwrap();
                (-logprobs.mean(Kind::Float)).backward();
                (logprobs.detach(), adapters.iter().map(|a| a.grad().to_kind(Kind::Float)).collect::<Vec<_>>())
            };
            let ((want, want_grads), (got, got_grads)) = (run(&full), run(&int8));
            let diff = (&got - &want).abs().max().double_value(&[]);
            let mean = (&got - &want).abs().mean(Kind::Float).double_value(&[]);
            assert!(diff < 0.1 && mean < 0.04, "{kind:?}: log-probs off by {diff} at most, {mean} on average");
            assert!(diff > 0.0, "{kind:?}: the int8 base rounds");
            // Over all adapters together: a single small gradient's relative error depends on
            // the random draw (which other tests' draws interleave with) and reached 8 %.
            // Measured together: 1.2-1.8 % (f32), 2.3 % (bf16).
            let grad_tol = if kind == Kind::Float { 0.05 } else { 0.1 };
            let squares = |gs: &[Tensor]| gs.iter().map(|g| g.square().sum(Kind::Float).double_value(&[])).sum::<f64>();
            let diffs: Vec<Tensor> = got_grads.iter().zip(&want_grads).map(|(g, w)| g - w).collect();
            let rel = (squares(&diffs) / squares(&want_grads)).sqrt();
            assert!(want_grads.iter().all(|w| w.norm().double_value(&[]) > 0.0), "{kind:?}: every adapter learns");
            assert!(rel < grad_tol, "{kind:?}: adapter gradients off by {rel} (relative norm)");
            let vision = int8.params().iter().position(|p| p.name.contains("fc1.lora_B")).unwrap();
            let adapters = int8.params().iter().take(vision).filter(|p| p.kind == ParamKind::Adapter).count();
            assert!(
                got_grads[adapters].abs().sum(Kind::Float).double_value(&[]) > 0.0,
                "the vision tower's adapters learn"
            );
            let err = int8.save_merged(&std::env::temp_dir().join("pg2-int8-never-written"), kind).unwrap_err();
            assert!(err.to_string().contains("int8"), "{err}");
        }
    }

    /// With bf16 weights the targets' log-probabilities (the loss) come from f32 logits of
    /// the bf16 hidden states, as big_vision's f32 `embed_dtype`, not from bf16 logits.
    #[test]
    fn bf16_weights_score_targets_with_f32_logits() {
        tch::manual_seed(5);
        let config = PaliGemmaConfig::tiny(40, 39, 32).unwrap();
        let model =
            PaliGemma::new(config, Weights::random(Device::Cpu, Kind::BFloat16), RunOptions::default()).unwrap();
        let params = model.parameters();
        let head = &params.iter().find(|(n, _)| n == "language_model.model.embed_tokens.weight").unwrap().1;
        tch::no_grad(|| {
            // Non-zero projector, and an embedding large enough for logits of several units.
            params
                .iter()
                .filter(|(n, _)| n.starts_with(PROJECTOR))
                .for_each(|(_, p)| drop(p.shallow_clone().normal_(0.0, 0.1)));
            let _ = head.shallow_clone().normal_(0.0, 1.0);
        });
        let (inputs, loss_mask) = tiny_batch(&model);
        // Training (gradients through the bf16 product) and scoring (no gradients) alike.
        let unscored = tch::no_grad(|| model.target_logprobs(&inputs, &loss_mask)).unwrap().0;
        for (_, p) in &params {
            let _ = p.set_requires_grad(true);
        }
        let (got, example) = model.target_logprobs(&inputs, &loss_mask).unwrap();
        (-got.mean(Kind::Float)).backward();
        assert!(head.grad().abs().sum(Kind::Float).double_value(&[]) > 0.0, "the head gets a gradient");
        let got = got.detach();
        let hidden = tch::no_grad(|| model.forward(&inputs, None)).unwrap();
        assert_eq!(hidden.kind(), Kind::BFloat16);
        let t = inputs.ids.size()[1];
        let rows = loss_mask.narrow(1, 1, t - 1).nonzero();
        let index = |x: &Tensor| x.index(&[Some(&rows.select(1, 0)), Some(&rows.select(1, 1))]);
        let (hidden, targets) =
            (index(&hidden.narrow(1, 0, t - 1)), index(&inputs.ids.narrow(1, 1, t - 1)).unsqueeze(1));
        let score = |logits: Tensor| {
            soft_cap(&logits, Some(30.0)).log_softmax(-1, Kind::Float).gather(1, &targets, false).squeeze_dim(1)
        };
        let want = score(hidden.to_kind(Kind::Float).matmul(&head.to_kind(Kind::Float).tr()));
        let rounded = score(hidden.matmul(&head.tr()).to_kind(Kind::Float));
        assert!(example.equal(&rows.select(1, 0)));
        let diff = |a: &Tensor, b: &Tensor| (a - b).abs().max().double_value(&[]);
        assert!(diff(&got, &want) < 1e-5, "f32 logits: off by {}", diff(&got, &want));
        assert!(diff(&unscored, &want) < 1e-5, "f32 logits without gradients: off by {}", diff(&unscored, &want));
        assert!(diff(&rounded, &want) > 1e-3, "bf16 logits would differ: {}", diff(&rounded, &want));
        // The loss (here per token) is that of the f32 logits.
        assert!((got.mean(Kind::Float) - want.mean(Kind::Float)).abs().double_value(&[]) < 1e-6);
    }

    /// Activation checkpointing, of whole layers or of soft-capped attention alone, changes
    /// memory, not math: the loss and every parameter's gradient equal those of a forward
    /// that keeps its activations (soft-capped attention, the eager path, included; and in
    /// the fused path without caps).
    #[test]
    fn recomputed_layers_give_the_same_loss_and_gradients() {
        for soft_caps in [true, false] {
            tch::manual_seed(4);
            let config = PaliGemmaConfig::tiny(40, 39, 32).unwrap();
            let mut model = PaliGemma::new(
                config,
                Weights::random(Device::Cpu, Kind::Float),
                RunOptions { soft_caps, ..RunOptions::default() },
            )
            .unwrap();
            let params = model.parameters();
            for (_, p) in &params {
                let _ = p.set_requires_grad(true);
            }
            // Non-zero projector, so gradients reach the vision tower.
            tch::no_grad(|| {
                params
                    .iter()
                    .filter(|(n, _)| n.starts_with(PROJECTOR))
                    .for_each(|(_, p)| drop(p.shallow_clone().normal_(0.0, 0.1)))
            });
            let (inputs, loss_mask) = tiny_batch(&model);
            let mut run = |recompute: bool, lean_attention: bool| {
                (model.options.recompute, model.options.lean_attention) = (recompute, lean_attention);
                let (logprobs, _) = model.target_logprobs(&inputs, &loss_mask).unwrap();
                let loss = -logprobs.mean(Kind::Float);
                loss.backward();
                let grads: Vec<Tensor> = params.iter().map(|(_, p)| p.grad().copy()).collect();
                for (_, p) in &params {
                    p.shallow_clone().zero_grad();
                }
                (loss.double_value(&[]), grads)
            };
            let (kept, kept_grads) = run(false, false);
            for (tag, recompute, lean_attention) in
                [("recomputed layers", true, false), ("lean attention", false, true)]
            {
                let (recomputed, recomputed_grads) = run(recompute, lean_attention);
                assert_eq!(kept, recomputed, "{tag}, soft_caps {soft_caps}");
                for ((name, _), (a, b)) in params.iter().zip(kept_grads.iter().zip(&recomputed_grads)) {
                    assert!(a.abs().sum(Kind::Float).double_value(&[]) > 0.0, "{name} got no gradient");
                    assert!(a.allclose(b, 1e-5, 1e-7, false), "{tag}, soft_caps {soft_caps}: {name}");
                }
            }
        }
    }
}
