//! Image preprocessing as big_vision does it: decode, resize to `res x res` (bilinear with
//! antialiasing, aspect ratio not kept), map [0, 255] to [-1, 1].
//!
//! The resize runs in f32 (no rounding back to 8 bits, as TensorFlow's resize in
//! big_vision) with fast_image_resize's convolution, which is Pillow's algorithm: a
//! triangle filter widened by the downscale factor.

use std::path::Path;

use fast_image_resize::images::Image;
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use image::RgbImage;
use tch::Tensor;

/// Decodes a JPEG or PNG file to RGB; the error says what went wrong with it.
pub fn load_rgb(path: &Path) -> Result<RgbImage, String> {
    let reader = image::ImageReader::open(path).map_err(|e| format!("cannot open image {}: {e}", path.display()))?;
    let reader = reader.with_guessed_format().map_err(|e| format!("cannot read image {}: {e}", path.display()))?;
    let img = reader.decode().map_err(|e| format!("cannot decode image {}: {e}", path.display()))?;
    Ok(img.to_rgb8())
}

/// Resizes to `res x res` and returns channel-first pixels in [-1, 1] (`3 * res * res`).
pub fn preprocess(img: &RgbImage, res: u32) -> Vec<f32> {
    let floats: Vec<u8> = img.as_raw().iter().flat_map(|&v| f32::from(v).to_ne_bytes()).collect();
    let src = Image::from_vec_u8(img.width(), img.height(), floats, PixelType::F32x3).expect("buffer matches size");
    let mut dst = Image::new(res, res, PixelType::F32x3);
    let options = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Bilinear));
    Resizer::new().resize(&src, &mut dst, &options).expect("same pixel type");
    let hwc: Vec<f32> = dst.buffer().chunks_exact(4).map(|b| f32::from_ne_bytes(b.try_into().unwrap())).collect();
    let plane = (res * res) as usize;
    let mut chw = vec![0f32; 3 * plane];
    for (i, px) in hwc.chunks_exact(3).enumerate() {
        for c in 0..3 {
            chw[c * plane + i] = px[c] / 127.5 - 1.0;
        }
    }
    chw
}

/// Stacks preprocessed images into a `(batch, 3, res, res)` f32 tensor.
pub fn stack(images: &[Vec<f32>], res: u32) -> Tensor {
    let flat: Vec<f32> = images.concat();
    Tensor::from_slice(&flat).view([images.len() as i64, 3, res as i64, res as i64])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_image_maps_to_the_value_range() {
        for (v, want) in [(0u8, -1.0f32), (255, 1.0), (51, 51.0 / 127.5 - 1.0)] {
            let img = RgbImage::from_pixel(37, 23, image::Rgb([v, v, v]));
            let px = preprocess(&img, 14);
            assert_eq!(px.len(), 3 * 14 * 14);
            assert!(px.iter().all(|&p| (p - want).abs() < 1e-6), "{v}: {:?}", &px[..3]);
        }
    }

    #[test]
    fn channels_come_out_planar() {
        let img = RgbImage::from_pixel(8, 8, image::Rgb([255, 0, 127]));
        let px = preprocess(&img, 4);
        assert!(px[..16].iter().all(|&p| (p - 1.0).abs() < 1e-6));
        assert!(px[16..32].iter().all(|&p| (p + 1.0).abs() < 1e-6));
        assert!(px[32..].iter().all(|&p| (p - (127.0 / 127.5 - 1.0)).abs() < 1e-6));
    }
}
