//! SigLIP vision tower (So400m/14 in PaliGemma 2), as transformers' `SiglipVisionModel`
//! without the pooling head: patch embedding, learned position embeddings, pre-norm
//! transformer blocks with tanh-GELU MLPs, final LayerNorm.

use std::sync::Arc;

use tch::{Kind, Tensor};

use crate::config::SiglipVisionConfig;
use crate::gemma2::RunOptions;
use crate::layer_params::{recompute_layer, Gathered, Layer, LayerParams};
use crate::nn::{Init, LayerNorm, Linear, ParamKind, Weights};
use crate::ModelError;

struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    heads: i64,
}

impl Attention {
    fn new(cfg: &SiglipVisionConfig, w: &mut Weights, p: &str) -> Result<Self, ModelError> {
        let d = cfg.hidden_size;
        let init = Init::Normal(0.02);
        Ok(Self {
            q_proj: Linear::new(w, &format!("{p}.q_proj"), d, d, true, init)?,
            k_proj: Linear::new(w, &format!("{p}.k_proj"), d, d, true, init)?,
            v_proj: Linear::new(w, &format!("{p}.v_proj"), d, d, true, init)?,
            out_proj: Linear::new(w, &format!("{p}.out_proj"), d, d, true, init)?,
            heads: cfg.num_attention_heads as i64,
        })
    }

    fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let (b, t, d) = x.size3().unwrap();
        let split = |y: Tensor| y.view([b, t, self.heads, d / self.heads]).transpose(1, 2);
        let q = split(self.q_proj.forward(x, train));
        let k = split(self.k_proj.forward(x, train));
        let v = split(self.v_proj.forward(x, train));
        // Unmasked, uncapped attention: libtorch's fused kernel computes exactly softmax(q k^T / sqrt(d)) v.
        let y = Tensor::scaled_dot_product_attention(&q, &k, &v, None::<Tensor>, 0.0, false, None, false);
        self.out_proj.forward(&y.transpose(1, 2).reshape([b, t, d]), train)
    }
}

struct EncoderLayer {
    layer_norm1: LayerNorm,
    self_attn: Attention,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

impl EncoderLayer {
    fn new(cfg: &SiglipVisionConfig, w: &mut Weights, p: &str) -> Result<Self, ModelError> {
        let (d, eps) = (cfg.hidden_size, cfg.layer_norm_eps);
        let init = Init::Normal(0.02);
        Ok(Self {
            layer_norm1: LayerNorm::new(w, &format!("{p}.layer_norm1"), d, eps)?,
            self_attn: Attention::new(cfg, w, &format!("{p}.self_attn"))?,
            layer_norm2: LayerNorm::new(w, &format!("{p}.layer_norm2"), d, eps)?,
            fc1: Linear::new(w, &format!("{p}.mlp.fc1"), d, cfg.intermediate_size, true, init)?,
            fc2: Linear::new(w, &format!("{p}.mlp.fc2"), cfg.intermediate_size, d, true, init)?,
        })
    }

    fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let x = x + self.self_attn.forward(&self.layer_norm1.forward(x), train);
        let h = self.fc1.forward(&self.layer_norm2.forward(&x), train).gelu("tanh");
        x + self.fc2.forward(&h, train)
    }
}

/// Moves learned position embeddings `(grid^2, width)` to a `to_grid x to_grid` grid by
/// bilinear resampling with the grids' corners aligned, as PaliGemma's stage 2 does when the
/// resolution grows from 224 to 448 and 896 px: big_vision's `resample_posemb` is
/// `scipy.ndimage.zoom(order=1)`, which maps corner to corner (2 -> 4 samples 0, 1/3, 2/3, 1),
/// not half-pixel centres (0, 1/4, 3/4, 1: up to 16 % of the embeddings' spread apart).
pub fn resample_positions(positions: &Tensor, to_grid: i64) -> Tensor {
    let (n, width) = positions.size2().unwrap();
    let grid = (n as f64).sqrt().round() as i64;
    let image = positions.to_kind(Kind::Float).view([1, grid, grid, width]).permute([0, 3, 1, 2]);
    let resized = image.upsample_bilinear2d([to_grid, to_grid], true, None, None);
    resized.permute([0, 2, 3, 1]).reshape([to_grid * to_grid, width]).to_kind(positions.kind())
}

/// The vision tower; parameters are named as under `vision_tower.vision_model.` in checkpoints.
pub struct SiglipVision {
    patch_weight: Tensor,
    patch_bias: Tensor,
    position_embedding: Tensor,
    layers: Vec<Arc<EncoderLayer>>,
    post_layernorm: LayerNorm,
    patch_size: i64,
}

impl SiglipVision {
    pub fn new(cfg: &SiglipVisionConfig, w: &mut Weights, p: &str) -> Result<Self, ModelError> {
        let (d, ps) = (cfg.hidden_size as i64, cfg.patch_size as i64);
        Ok(Self {
            patch_weight: w.take(
                &format!("{p}.embeddings.patch_embedding.weight"),
                &[d, 3, ps, ps],
                Init::Normal(0.02),
                ParamKind::Kernel,
            )?,
            patch_bias: w.take(&format!("{p}.embeddings.patch_embedding.bias"), &[d], Init::Zeros, ParamKind::Bias)?,
            position_embedding: w.take(
                &format!("{p}.embeddings.position_embedding.weight"),
                &[cfg.num_patches() as i64, d],
                Init::Normal(1.0 / (d as f64).sqrt()),
                ParamKind::PositionEmbedding,
            )?,
            layers: (0..cfg.num_hidden_layers)
                .map(|i| EncoderLayer::new(cfg, w, &format!("{p}.encoder.layers.{i}")).map(Arc::new))
                .collect::<Result<_, _>>()?,
            post_layernorm: LayerNorm::new(w, &format!("{p}.post_layernorm"), cfg.hidden_size, cfg.layer_norm_eps)?,
            patch_size: ps,
        })
    }

    /// Pixels `(batch, 3, res, res)` in [-1, 1] to patch features `(batch, patches, width)`;
    /// with `opts.recompute`, layers keep only their inputs for the backward pass (and
    /// `opts.lora_dropout` applies adapters' dropout). `params`, where the layers' parameters
    /// are sharded, gathers each layer's around its use.
    pub fn forward(&self, pixels: &Tensor, opts: RunOptions, params: Option<&Arc<dyn LayerParams>>) -> Tensor {
        let x = pixels.to_kind(self.patch_weight.kind());
        let x = x.conv2d(&self.patch_weight, Some(&self.patch_bias), [self.patch_size], [0], [1], 1);
        let mut x = x.flatten(2, 3).transpose(1, 2) + &self.position_embedding;
        let (recompute, train) = (opts.recompute && x.requires_grad(), opts.lora_dropout);
        for (i, layer) in self.layers.iter().enumerate() {
            let n = self.layers.len();
            let _gathered = Gathered::new(params, Layer::Vision(i), Layer::at(Layer::Vision, Some(i + 1), n));
            x = match recompute {
                true => {
                    let layer = layer.clone();
                    let below = Layer::at(Layer::Vision, i.checked_sub(1), n);
                    recompute_layer(&x, params, (Layer::Vision(i), below), move |x| layer.forward(x, train))
                }
                false => layer.forward(&x, train),
            };
        }
        self.post_layernorm.forward(&x)
    }

    /// Floating-point kind of the parameters.
    pub fn kind(&self) -> Kind {
        self.patch_weight.kind()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resampling_keeps_a_linear_ramp_linear_and_its_corners() {
        // A 2x2 grid whose value is x + 10 y, upsampled to 4x4 corner to corner.
        let pos = Tensor::from_slice(&[0.0f32, 1.0, 10.0, 11.0]).view([4, 1]);
        let up = Vec::<f32>::try_from(resample_positions(&pos, 4).view([-1])).unwrap();
        let thirds = [0.0, 1.0 / 3.0, 2.0 / 3.0, 1.0];
        let want: Vec<f32> = thirds.iter().flat_map(|&y| thirds.map(|x| x + 10.0 * y)).collect();
        assert_eq!(up.len(), want.len());
        for (g, w) in up.iter().zip(&want) {
            assert!((g - w).abs() < 1e-5, "{up:?}");
        }
        let same = resample_positions(&pos, 2);
        assert!(same.allclose(&pos, 1e-6, 1e-6, false));
    }

    /// big_vision's resample_posemb on a random 3x3 grid of 2 channels to 5x5: the values
    /// `scipy.ndimage.zoom(grid, (5/3, 5/3, 1), order=1)` gives (scipy 1.17.1).
    #[test]
    fn resampling_matches_scipy_zoom_as_big_vision_uses_it() {
        let grid = [
            [[0.126, -0.132], [0.64, 0.105], [-0.536, 0.362]],
            [[1.304, 0.947], [-0.704, -1.265], [-0.623, 0.041]],
            [[-2.325, -0.219], [-1.246, -0.732], [-0.544, -0.316]],
        ];
        let scipy = [
            [[0.126, -0.132], [0.383, -0.0135], [0.64, 0.105], [0.052, 0.2335], [-0.536, 0.362]],
            [[0.715, 0.4075], [0.3415, -0.08625], [-0.032, -0.58], [-0.30575, -0.18925], [-0.5795, 0.2015]],
            [[1.304, 0.947], [0.3, -0.159], [-0.704, -1.265], [-0.6635, -0.612], [-0.623, 0.041]],
            [[-0.5105, 0.364], [-0.74275, -0.31725], [-0.975, -0.9985], [-0.77925, -0.568], [-0.5835, -0.1375]],
            [[-2.325, -0.219], [-1.7855, -0.4755], [-1.246, -0.732], [-0.895, -0.524], [-0.544, -0.316]],
        ];
        let flat = |rows: &[[[f64; 2]; 3]]| rows.iter().flatten().flatten().map(|&v| v as f32).collect::<Vec<f32>>();
        let pos = Tensor::from_slice(&flat(&grid)).view([9, 2]);
        let got = Vec::<f32>::try_from(resample_positions(&pos, 5).view([-1])).unwrap();
        let want: Vec<f32> = scipy.iter().flatten().flatten().map(|&v| v as f32).collect();
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!((g - w).abs() < 1e-5, "element {i}: {g} vs scipy's {w}");
        }
    }
}
