//! Image preprocessing as big_vision does it: decode, resize to `res x res` (bilinear with
//! antialiasing, aspect ratio not kept), map [0, 255] to [-1, 1].
//!
//! The resize keeps 16 bits per channel (no rounding back to 8 bits: TensorFlow's resize in
//! big_vision works in floats) with fast_image_resize's convolution, which is Pillow's
//! algorithm: a triangle filter widened by the downscale factor.

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
    // Resized at 16 bits (v * 257): the SIMD kernels of fast_image_resize, with rounding
    // errors below 1e-5 of the value range, where the f32 kernels are twice as slow.
    let wide: Vec<u8> = img.as_raw().iter().flat_map(|&v| (u16::from(v) * 257).to_ne_bytes()).collect();
    let src = Image::from_vec_u8(img.width(), img.height(), wide, PixelType::U16x3).expect("buffer matches size");
    let mut dst = Image::new(res, res, PixelType::U16x3);
    let options = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Bilinear));
    Resizer::new().resize(&src, &mut dst, &options).expect("same pixel type");
    let plane = (res * res) as usize;
    let mut chw = vec![0f32; 3 * plane];
    for (i, px) in dst.buffer().chunks_exact(6).enumerate() {
        for c in 0..3 {
            let v = u16::from_ne_bytes([px[2 * c], px[2 * c + 1]]);
            chw[c * plane + i] = f32::from(v) / 32767.5 - 1.0;
        }
    }
    chw
}

/// Decodes and preprocesses the records' images into a `(batch, 3, res, res)` tensor; an
/// unreadable image is an error naming its record.
pub fn load_pixels(records: &[crate::Record], res: u32) -> Result<Tensor, crate::DataError> {
    let images =
        records.iter().map(|r| Ok(preprocess(&r.load_image()?, res))).collect::<Result<Vec<_>, crate::DataError>>()?;
    Ok(stack(&images, res))
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
