//! SigLIP vision tower (So400m/14 in PaliGemma 2), as transformers' `SiglipVisionModel`
//! without the pooling head: patch embedding, learned position embeddings, pre-norm
//! transformer blocks with tanh-GELU MLPs, final LayerNorm.

use std::sync::Arc;

use tch::{Kind, Tensor};

use crate::config::SiglipVisionConfig;
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

    fn forward(&self, x: &Tensor) -> Tensor {
        let (b, t, d) = x.size3().unwrap();
        let split = |y: Tensor| y.view([b, t, self.heads, d / self.heads]).transpose(1, 2);
        let q = split(self.q_proj.forward(x));
        let k = split(self.k_proj.forward(x));
        let v = split(self.v_proj.forward(x));
        // Unmasked, uncapped attention: libtorch's fused kernel computes exactly softmax(q k^T / sqrt(d)) v.
        let y = Tensor::scaled_dot_product_attention(&q, &k, &v, None::<Tensor>, 0.0, false, None, false);
        self.out_proj.forward(&y.transpose(1, 2).reshape([b, t, d]))
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

    fn forward(&self, x: &Tensor) -> Tensor {
        let x = x + self.self_attn.forward(&self.layer_norm1.forward(x));
        let h = self.fc1.forward(&self.layer_norm2.forward(&x)).gelu("tanh");
        x + self.fc2.forward(&h)
    }
}

/// Moves learned position embeddings `(grid^2, width)` to a `to_grid x to_grid` grid by
/// bilinear resampling (half-pixel centres), as PaliGemma's stage 2 does when the
/// resolution grows from 224 to 448 and 896 px.
pub fn resample_positions(positions: &Tensor, to_grid: i64) -> Tensor {
    let (n, width) = positions.size2().unwrap();
    let grid = (n as f64).sqrt().round() as i64;
    let image = positions.to_kind(Kind::Float).view([1, grid, grid, width]).permute([0, 3, 1, 2]);
    let resized = image.upsample_bilinear2d([to_grid, to_grid], false, None, None);
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
    /// with `recompute`, layers keep only their inputs for the backward pass.
    pub fn forward(&self, pixels: &Tensor, recompute: bool) -> Tensor {
        let x = pixels.to_kind(self.patch_weight.kind());
        let x = x.conv2d(&self.patch_weight, Some(&self.patch_bias), [self.patch_size], [0], [1], 1);
        let mut x = x.flatten(2, 3).transpose(1, 2) + &self.position_embedding;
        let recompute = recompute && x.requires_grad();
        for layer in &self.layers {
            x = match recompute {
                true => {
                    let layer = layer.clone();
                    crate::recompute::recompute(&x, move |x| layer.forward(x))
                }
                false => layer.forward(&x),
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
        // A 2x2 grid whose value is x + 10 y, upsampled to 4x4 with half-pixel centres:
        // the interior interpolates, the border clamps (as jax.image.resize and torch).
        let pos = Tensor::from_slice(&[0.0f32, 1.0, 10.0, 11.0]).view([4, 1]);
        let up = Vec::<f32>::try_from(resample_positions(&pos, 4).view([-1])).unwrap();
        let row = |y: f32| [0.0, 0.25, 0.75, 1.0].map(|x| x + 10.0 * y);
        let want: Vec<f32> = [0.0, 0.25, 0.75, 1.0].iter().flat_map(|&y| row(y)).collect();
        assert_eq!(up.len(), want.len());
        for (g, w) in up.iter().zip(&want) {
            assert!((g - w).abs() < 1e-5, "{up:?}");
        }
        let same = resample_positions(&pos, 2);
        assert!(same.allclose(&pos, 1e-6, 1e-6, false));
    }
}
