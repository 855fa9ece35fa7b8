//! The mask VQ-VAE of PaliGemma's referring segmentation: a 64 x 64 mask of the box's
//! contents is 16 codes, written as the tokens `<seg000>`..`<seg127>` after the box's four
//! `<loc>` tokens.
//!
//! The weights are big_vision's `vae-oid.npz` (`gs://big_vision/paligemma/vae-oid.npz`, a
//! PyTorch model's state dict saved with NumPy, trained on Open Images masks). The encoder
//! follows big_vision's `encode_to_codebook_indices` (`pp/proj/paligemma/segmentation.py`,
//! which makes the training targets), the decoder its `get_reconstruct_masks`
//! (`evaluators/proj/paligemma/transfers/segmentation.py`). big_vision runs the encoder in
//! TensorFlow with `padding="SAME"` (extra padding after, for stride 2) and the decoder in
//! Flax; both are laid out here as the PyTorch convolutions the weights come from: Flax's
//! `ConvTranspose(kernel 4, stride 2, padding 2, transpose_kernel=True)` is PyTorch's
//! `conv_transpose2d(stride 2, padding 1)` on the original weight.

use std::collections::HashMap;
use std::path::Path;

use tch::{Kind, Tensor};

use crate::ModelError;

/// Where big_vision publishes `vae-oid.npz`.
pub const VAE_URL: &str = "https://storage.googleapis.com/big_vision/paligemma/vae-oid.npz";

/// Side of the masks the VQ-VAE encodes and decodes.
pub const MASK_SIDE: i64 = 64;
/// Codes per mask (a 4 x 4 grid).
pub const CODES_PER_MASK: usize = 16;

/// A convolution's PyTorch weight (`[out, in, kh, kw]`, or `[in, out, kh, kw]` transposed)
/// and bias.
struct Conv {
    weight: Tensor,
    bias: Tensor,
}

impl Conv {
    /// TensorFlow's `padding="SAME"`: the output is `ceil(input / stride)` and the padding
    /// that takes is split with the odd pixel after.
    fn same(&self, x: &Tensor, stride: i64) -> Tensor {
        let size = x.size();
        let kernel = self.weight.size();
        let pad = |input: i64, k: i64| {
            let total = (((input + stride - 1) / stride - 1) * stride + k - input).max(0);
            (total / 2, total - total / 2)
        };
        let (top, bottom) = pad(size[2], kernel[2]);
        let (left, right) = pad(size[3], kernel[3]);
        x.constant_pad_nd([left, right, top, bottom]).conv2d(&self.weight, Some(&self.bias), [stride], [0], [1], 1)
    }

    /// Doubles the grid: big_vision's 4 x 4, stride 2 transposed convolution.
    fn upsample(&self, x: &Tensor) -> Tensor {
        x.conv_transpose2d(&self.weight, Some(&self.bias), [2], [1], [0], 1, [1])
    }
}

/// Three convolutions (3 x 3, 3 x 3, 1 x 1) with ReLUs between, added to their input.
struct ResBlock([Conv; 3]);

impl ResBlock {
    fn forward(&self, x: &Tensor) -> Tensor {
        let [a, b, c] = &self.0;
        c.same(&b.same(&a.same(x, 1).relu(), 1).relu(), 1) + x
    }
}

/// The VQ-VAE's encoder, codebook and decoder, on the CPU in f32.
pub struct MaskVae {
    /// Four stride-2 convolutions (64 -> 4), two residual blocks, a projection to the codes.
    encoder: ([Conv; 4], [ResBlock; 2], Conv),
    /// `[128, dim]`: the code vectors.
    codebook: Tensor,
    /// A projection from the codes, two residual blocks, four upsamplings (4 -> 64), and a
    /// projection to one channel.
    decoder: (Conv, [ResBlock; 2], [Conv; 4], Conv),
}

impl MaskVae {
    /// Reads `vae-oid.npz` (the state dict's names: `encoder.0.weight`, ...,
    /// `_vq_vae._embedding`, `decoder.12.bias`); a missing array names the file and key.
    pub fn load(path: &Path) -> Result<MaskVae, ModelError> {
        let read = Tensor::read_npz(path).map_err(|e| {
            ModelError::Checkpoint(format!(
                "{}: cannot read the mask VQ-VAE: {e} (it is big_vision's vae-oid.npz: {VAE_URL})",
                path.display()
            ))
        })?;
        let mut arrays = Arrays { path, arrays: read.into_iter().collect() };
        let encoder = (
            [
                arrays.conv("encoder.0")?,
                arrays.conv("encoder.2")?,
                arrays.conv("encoder.4")?,
                arrays.conv("encoder.6")?,
            ],
            [arrays.block("encoder.8")?, arrays.block("encoder.9")?],
            arrays.conv("encoder.10")?,
        );
        let decoder = (
            arrays.conv("decoder.0")?,
            [arrays.block("decoder.2")?, arrays.block("decoder.3")?],
            [
                arrays.conv("decoder.4")?,
                arrays.conv("decoder.6")?,
                arrays.conv("decoder.8")?,
                arrays.conv("decoder.10")?,
            ],
            arrays.conv("decoder.12")?,
        );
        let codebook = arrays.take("_vq_vae._embedding")?;
        if let Some(up) = decoder.2.iter().find(|c| c.weight.size()[2..] != [4, 4]) {
            let shape = up.weight.size();
            return Err(ModelError::Checkpoint(format!(
                "{}: the decoder's upsampling kernels are 4 x 4, found {shape:?}",
                path.display()
            )));
        }
        Ok(MaskVae { encoder, codebook, decoder })
    }

    /// The codes (`[batch, 16]`, each in `0..128`) of `masks`, `[batch, 64, 64]` in [0, 1].
    pub fn encode(&self, masks: &Tensor) -> Result<Tensor, ModelError> {
        let batch = mask_batch(masks)?;
        let (downsample, blocks, project) = &self.encoder;
        let mut x = (masks.to_kind(Kind::Float) * 2.0 - 1.0).unsqueeze(1);
        for conv in downsample {
            x = conv.same(&x, 2).relu();
        }
        for block in blocks {
            x = block.forward(&x);
        }
        let x = project.same(&x, 1);
        // One code per grid cell, read row by row as big_vision's NHWC reshape does.
        let dim = self.codebook.size()[1];
        let flat = x.permute([0, 2, 3, 1]).reshape([-1, dim]);
        if flat.size()[0] != batch * CODES_PER_MASK as i64 {
            return Err(ModelError::Invalid(format!("the mask encoder made a {:?} grid, not 4 x 4", &x.size()[2..])));
        }
        let distances = flat.square().sum_dim_intlist(1, true, Kind::Float)
            + self.codebook.square().sum_dim_intlist(1, false, Kind::Float)
            - flat.matmul(&self.codebook.tr()) * 2.0;
        Ok(distances.argmin(1, false).reshape([batch, CODES_PER_MASK as i64]))
    }

    /// The masks (`[batch, 64, 64]`, about -1 outside and 1 inside) of `codes`, `[batch, 16]`.
    pub fn decode(&self, codes: &Tensor) -> Result<Tensor, ModelError> {
        let size = codes.size();
        let entries = self.codebook.size()[0];
        if size.len() != 2 || size[1] != CODES_PER_MASK as i64 {
            return Err(ModelError::Invalid(format!("mask codes must be [batch, 16], got {size:?}")));
        }
        if size[0] > 0 && (codes.min().int64_value(&[]) < 0 || codes.max().int64_value(&[]) >= entries) {
            return Err(ModelError::Invalid(format!("mask codes must be in 0..{entries}")));
        }
        let (project, blocks, upsample, out) = &self.decoder;
        let dim = self.codebook.size()[1];
        let quantized = self.codebook.index_select(0, &codes.reshape([-1]).to_kind(Kind::Int64));
        let mut x = quantized.reshape([size[0], 4, 4, dim]).permute([0, 3, 1, 2]);
        x = project.same(&x, 1).relu();
        for block in blocks {
            x = block.forward(&x);
        }
        for conv in upsample {
            x = conv.upsample(&x).relu();
        }
        Ok(out.same(&x, 1).squeeze_dim(1))
    }
}

/// The arrays of `vae-oid.npz` not taken yet.
struct Arrays<'a> {
    path: &'a Path,
    arrays: HashMap<String, Tensor>,
}

impl Arrays<'_> {
    fn take(&mut self, key: &str) -> Result<Tensor, ModelError> {
        self.arrays.remove(key).map(|t| t.to_kind(Kind::Float)).ok_or_else(|| {
            ModelError::Checkpoint(format!("{}: no array `{key}`: not big_vision's vae-oid.npz?", self.path.display()))
        })
    }

    fn conv(&mut self, name: &str) -> Result<Conv, ModelError> {
        Ok(Conv { weight: self.take(&format!("{name}.weight"))?, bias: self.take(&format!("{name}.bias"))? })
    }

    /// A residual block's convolutions, PyTorch's `net.0`, `net.2` and `net.4` (ReLUs between).
    fn block(&mut self, name: &str) -> Result<ResBlock, ModelError> {
        Ok(ResBlock([
            self.conv(&format!("{name}.net.0"))?,
            self.conv(&format!("{name}.net.2"))?,
            self.conv(&format!("{name}.net.4"))?,
        ]))
    }
}

impl MaskVae {
    /// [`MaskVae::decode`] of code lists, each mask row-major (64 * 64 values), as the
    /// `refcoco_seg` metric takes them; 256 at a time, since the decoder's activations take
    /// about 2 MB per mask.
    pub fn decode_lists(&self, codes: &[[u8; CODES_PER_MASK]]) -> Result<Vec<Vec<f32>>, ModelError> {
        let mut masks = Vec::with_capacity(codes.len());
        for chunk in codes.chunks(256) {
            let flat: Vec<i64> = chunk.iter().flatten().map(|&c| i64::from(c)).collect();
            let decoded = self.decode(&Tensor::from_slice(&flat).view([chunk.len() as i64, CODES_PER_MASK as i64]))?;
            let values = Vec::<f32>::try_from(decoded.reshape([-1])).expect("f32 masks");
            masks.extend(values.chunks((MASK_SIDE * MASK_SIDE) as usize).map(<[f32]>::to_vec));
        }
        Ok(masks)
    }
}

/// The batch size of `[batch, 64, 64]` masks.
fn mask_batch(masks: &Tensor) -> Result<i64, ModelError> {
    match masks.size()[..] {
        [batch, MASK_SIDE, MASK_SIDE] => Ok(batch),
        ref other => Err(ModelError::Invalid(format!("masks to encode must be [batch, 64, 64], got {other:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use serde_json::Value;

    use super::*;

    fn fixtures() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/segmentation")
    }

    /// `make_segmentation_fixture.py`'s values, computed with TensorFlow's SAME convolutions
    /// (through jax) for the encoder and flax's modules for the decoder, from `vae-tiny.npz`.
    fn expected() -> Value {
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("segmentation.json")).unwrap()).unwrap()
    }

    fn floats(v: &Value) -> Vec<f32> {
        serde_json::from_value(v.clone()).unwrap()
    }

    #[test]
    fn encoder_and_decoder_match_big_vision() {
        let vae = MaskVae::load(&fixtures().join("vae-tiny.npz")).unwrap();
        let expected = expected();
        let crops: Vec<f32> =
            expected["crops"].as_array().unwrap().iter().flat_map(|c| floats(&c["resized"])).collect();
        let masks = Tensor::from_slice(&crops).view([-1, MASK_SIDE, MASK_SIDE]);
        let codes: Vec<i64> = vae.encode(&masks).unwrap().reshape([-1]).try_into().unwrap();
        let want: Vec<Vec<i64>> = serde_json::from_value(expected["encode"]["codes"].clone()).unwrap();
        assert_eq!(codes, want.concat());
        assert!(codes.iter().collect::<std::collections::BTreeSet<_>>().len() > 3, "codes differ by cell");

        let codes: Vec<Vec<i64>> = serde_json::from_value(expected["decode"]["codes"].clone()).unwrap();
        let decoded = vae.decode(&Tensor::from_slice(&codes.concat()).view([-1, 16])).unwrap();
        assert_eq!(decoded.size(), [3, 64, 64]);
        let decoded: Vec<f32> = decoded.reshape([-1]).try_into().unwrap();
        let want: Vec<f32> = expected["decode"]["masks"].as_array().unwrap().iter().flat_map(floats).collect();
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        let worst = decoded.iter().zip(&want).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(worst < 1e-5 * scale, "decoded masks off by {worst} (values up to {scale})");

        // As lists, past one chunk of 256: the same masks in the same order.
        let lists: Vec<[u8; 16]> = (0..300).map(|i| std::array::from_fn(|k| codes[i % 3][k] as u8)).collect();
        let masks = vae.decode_lists(&lists).unwrap();
        assert_eq!(masks.len(), 300);
        for i in [0, 1, 2, 256, 257, 299] {
            let want = &decoded[(i % 3) * 4096..(i % 3 + 1) * 4096];
            let worst = masks[i].iter().zip(want).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(worst < 1e-5 * scale, "mask {i} off by {worst}");
        }
    }

    #[test]
    fn bad_files_and_inputs_are_named() {
        let missing = fixtures().join("no-such.npz");
        let err = MaskVae::load(&missing).err().unwrap().to_string();
        assert!(err.contains("no-such.npz") && err.contains("cannot read the mask VQ-VAE"), "{err}");
        let dir = std::env::temp_dir().join(format!("pg2-vqvae-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let partial = dir.join("partial.npz");
        Tensor::write_npz(
            &[("encoder.0.weight", Tensor::zeros([8, 1, 3, 3], (Kind::Float, tch::Device::Cpu)))],
            &partial,
        )
        .unwrap();
        let err = MaskVae::load(&partial).err().unwrap().to_string();
        assert!(err.contains("partial.npz") && err.contains("no array `encoder.0.bias`"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();

        let vae = MaskVae::load(&fixtures().join("vae-tiny.npz")).unwrap();
        let err = vae.encode(&Tensor::zeros([2, 32, 32], (Kind::Float, tch::Device::Cpu))).err().unwrap();
        assert!(err.to_string().contains("[batch, 64, 64], got [2, 32, 32]"), "{err}");
        let err = vae.decode(&Tensor::from_slice(&[128i64; 16]).view([1, 16])).err().unwrap();
        assert!(err.to_string().contains("in 0..128"), "{err}");
    }
}
