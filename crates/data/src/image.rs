//! Image preprocessing as big_vision's `decode|resize(res)|value_range(-1, 1)`: decode,
//! resize to `res x res` (bilinear, aspect ratio not kept), cast back to 8 bits, map
//! [0, 255] to [-1, 1].
//!
//! big_vision's `resize` is `tf.image.resize` followed by a cast to the image's `uint8`,
//! which truncates. Without antialiasing (its default, and what most PaliGemma configs
//! use) the resize is TF's `resize_bilinear` with half-pixel centres, which pg2 repeats
//! in f32 operation for operation. With `antialias=True` it is a triangle filter widened
//! by the downscale factor, Pillow's algorithm, which pg2 runs with fast_image_resize's
//! convolution at 16 bits before truncating.
//!
//! With [`Resize::pad_to_square`] the decoded image is first padded with white to a square
//! (the PaliGemma 2 paper's OCR, table, molecule and music transfers).

use std::path::Path;

use fast_image_resize::images::Image;
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use image::RgbImage;
use tch::Tensor;

/// How an image becomes the model's square input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resize {
    /// Side of the square, in pixels.
    pub size: u32,
    /// Low-pass filter before downscaling (big_vision's `resize(res, antialias=True)`);
    /// off is big_vision's default.
    pub antialias: bool,
    /// Pad the image with white (255, 255, 255) to a square of its longer side before the
    /// resize, as the paper does for OCR, tables, molecules and music. The padding goes below
    /// and to the right of the image (big_vision's `pad_to_shape` pads `after` by default; the
    /// paper does not say where), so a pixel keeps its coordinates and `<loc>` tokens binned on
    /// the square's side stay right (`pg2 convert --pad-to-square`).
    pub pad_to_square: bool,
}

/// Decodes a JPEG or PNG file to RGB; the error says what went wrong with it.
pub fn load_rgb(path: &Path) -> Result<RgbImage, String> {
    let reader = image::ImageReader::open(path).map_err(|e| format!("cannot open image {}: {e}", path.display()))?;
    let reader = reader.with_guessed_format().map_err(|e| format!("cannot read image {}: {e}", path.display()))?;
    let img = reader.decode().map_err(|e| format!("cannot decode image {}: {e}", path.display()))?;
    Ok(img.to_rgb8())
}

/// Decodes an encoded image (JPEG, PNG, ...) held in memory to 8-bit RGB.
pub fn decode_rgb(data: &[u8]) -> Result<RgbImage, String> {
    let img = image::load_from_memory(data).map_err(|e| format!("cannot decode image: {e}"))?;
    Ok(img.to_rgb8())
}

/// Resizes to a square and returns channel-first pixels in [-1, 1] (`3 * size * size`).
pub fn preprocess(img: &RgbImage, resize: Resize) -> Vec<f32> {
    let padded;
    let img = if resize.pad_to_square && img.width() != img.height() {
        padded = pad_to_square(img);
        &padded
    } else {
        img
    };
    let levels = if resize.antialias { antialiased(img, resize.size) } else { bilinear(img, resize.size) };
    let plane = (resize.size * resize.size) as usize;
    let mut chw = vec![0f32; 3 * plane];
    for (i, px) in levels.chunks_exact(3).enumerate() {
        for c in 0..3 {
            chw[c * plane + i] = f32::from(px[c]) / 127.5 - 1.0;
        }
    }
    chw
}

/// The image padded with white below or to its right to a square of its longer side.
fn pad_to_square(img: &RgbImage) -> RgbImage {
    let side = img.width().max(img.height());
    let mut square = RgbImage::from_pixel(side, side, image::Rgb([255, 255, 255]));
    image::imageops::replace(&mut square, img, 0, 0);
    square
}

/// Back to 8 bits as `tf.cast(float -> uint8)`: truncated (after big_vision's clip).
fn to_level(v: f32) -> u8 {
    v.clamp(0.0, 255.0) as u8
}

/// One axis of TF's `resize_bilinear` with half-pixel centres
/// (`compute_interpolation_weights` with `HalfPixelScaler`): per output index, the lower
/// and upper source indices and the upper one's weight.
fn taps(input: u32, output: u32) -> Vec<(usize, usize, f32)> {
    let scale = input as f32 / output as f32;
    (0..output)
        .map(|i| {
            let x = (i as f32 + 0.5) * scale - 0.5;
            let lower = (x.floor() as i64).max(0) as usize;
            let upper = (x.ceil() as i64).min(i64::from(input) - 1) as usize;
            (lower, upper, x - x.floor())
        })
        .collect()
}

/// TF's bilinear resize without antialiasing (`compute_lerp`, in f32), as 8-bit RGB.
fn bilinear(img: &RgbImage, size: u32) -> Vec<u8> {
    let (xs, ys) = (taps(img.width(), size), taps(img.height(), size));
    let (src, width) = (img.as_raw(), img.width() as usize);
    let px = |y: usize, x: usize, c: usize| f32::from(src[(y * width + x) * 3 + c]);
    let mut out = Vec::with_capacity(3 * (size * size) as usize);
    for &(y0, y1, dy) in &ys {
        for &(x0, x1, dx) in &xs {
            for c in 0..3 {
                let top = px(y0, x0, c) + (px(y0, x1, c) - px(y0, x0, c)) * dx;
                let bottom = px(y1, x0, c) + (px(y1, x1, c) - px(y1, x0, c)) * dx;
                out.push(to_level(top + (bottom - top) * dy));
            }
        }
    }
    out
}

/// The antialiased bilinear resize, as 8-bit RGB.
fn antialiased(img: &RgbImage, size: u32) -> Vec<u8> {
    // Resized at 16 bits (v * 257): the SIMD kernels of fast_image_resize, with rounding
    // errors below 1e-5 of the value range, where the f32 kernels are twice as slow.
    let wide: Vec<u8> = img.as_raw().iter().flat_map(|&v| (u16::from(v) * 257).to_ne_bytes()).collect();
    let src = Image::from_vec_u8(img.width(), img.height(), wide, PixelType::U16x3).expect("buffer matches size");
    let mut dst = Image::new(size, size, PixelType::U16x3);
    let options = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Bilinear));
    Resizer::new().resize(&src, &mut dst, &options).expect("same pixel type");
    // Integer division truncates as the cast does; whole levels (v * 257) stay exact.
    dst.buffer().chunks_exact(2).map(|v| (u16::from_ne_bytes([v[0], v[1]]) / 257) as u8).collect()
}

/// Decodes and preprocesses the records' images into a `(batch, 3, size, size)` tensor; an
/// unreadable image is an error naming its record.
pub fn load_pixels(records: &[crate::Record], resize: Resize) -> Result<Tensor, crate::DataError> {
    let images = records
        .iter()
        .map(|r| Ok(preprocess(&r.load_image()?, resize)))
        .collect::<Result<Vec<_>, crate::DataError>>()?;
    Ok(stack(&images, resize.size))
}

/// Stacks preprocessed images into a `(batch, 3, res, res)` f32 tensor.
pub fn stack(images: &[Vec<f32>], res: u32) -> Tensor {
    let flat: Vec<f32> = images.concat();
    Tensor::from_slice(&flat).view([images.len() as i64, 3, res as i64, res as i64])
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHARP: Resize = Resize { size: 0, antialias: false, pad_to_square: false };
    const SMOOTH: Resize = Resize { size: 0, antialias: true, pad_to_square: false };

    #[test]
    fn uniform_image_maps_to_the_value_range() {
        for resize in [SHARP, SMOOTH] {
            for (v, want) in [(0u8, -1.0f32), (255, 1.0), (51, 51.0 / 127.5 - 1.0)] {
                let img = RgbImage::from_pixel(37, 23, image::Rgb([v, v, v]));
                let px = preprocess(&img, Resize { size: 14, ..resize });
                assert_eq!(px.len(), 3 * 14 * 14);
                assert!(px.iter().all(|&p| (p - want).abs() < 1e-6), "{resize:?} {v}: {:?}", &px[..3]);
            }
        }
    }

    #[test]
    fn pad_to_square_fills_below_or_right_with_white_before_the_resize() {
        // Resizing to the padded square's own side is the identity: the pixels are the square.
        let level = |px: &[f32], plane: usize, i: usize| ((px[plane * 16 + i] + 1.0) * 127.5).round() as u8;
        for resize in [SHARP, SMOOTH] {
            let pad = Resize { size: 4, pad_to_square: true, ..resize };
            // 4 wide, 2 high: rows 0 and 1 are the image, rows 2 and 3 white.
            let wide = RgbImage::from_fn(4, 2, |x, y| image::Rgb([(10 * x + 100 * y) as u8, 7, 0]));
            let px = preprocess(&wide, pad);
            for (i, (y, x)) in (0..4).flat_map(|y| (0..4).map(move |x| (y, x))).enumerate() {
                let want = if y < 2 { [(10 * x + 100 * y) as u8, 7, 0] } else { [255; 3] };
                assert_eq!([0, 1, 2].map(|c| level(&px, c, i)), want, "{resize:?} wide ({y}, {x})");
            }
            // 1 wide, 4 high: column 0 is the image, the others white.
            let tall = RgbImage::from_fn(1, 4, |_, y| image::Rgb([0, 0, (50 * y) as u8]));
            let px = preprocess(&tall, pad);
            for (i, (y, x)) in (0..4).flat_map(|y| (0..4).map(move |x| (y, x))).enumerate() {
                let want = if x == 0 { [0, 0, (50 * y) as u8] } else { [255; 3] };
                assert_eq!([0, 1, 2].map(|c| level(&px, c, i)), want, "{resize:?} tall ({y}, {x})");
            }
            // A square image is left as it is; without the option the image is stretched.
            let square = RgbImage::from_fn(4, 4, |x, y| image::Rgb([x as u8, y as u8, 9]));
            assert_eq!(preprocess(&square, pad), preprocess(&square, Resize { size: 4, ..resize }));
            assert_ne!(preprocess(&wide, pad), preprocess(&wide, Resize { size: 4, ..resize }));
        }
    }

    #[test]
    fn channels_come_out_planar() {
        for resize in [SHARP, SMOOTH] {
            let img = RgbImage::from_pixel(8, 8, image::Rgb([255, 0, 127]));
            let px = preprocess(&img, Resize { size: 4, ..resize });
            assert!(px[..16].iter().all(|&p| (p - 1.0).abs() < 1e-6));
            assert!(px[16..32].iter().all(|&p| (p + 1.0).abs() < 1e-6));
            assert!(px[32..].iter().all(|&p| (p - (127.0 / 127.5 - 1.0)).abs() < 1e-6));
        }
    }

    /// A 7 x 5 image with every level different enough to show the filter.
    fn fixture() -> RgbImage {
        RgbImage::from_fn(7, 5, |x, y| {
            image::Rgb([0, 1, 2].map(|c| ((x * 37 + y * 91 + c * 53 + x * y * 13) % 256) as u8))
        })
    }

    #[test]
    fn the_default_resize_is_tf_bilinear_truncated_to_bytes() {
        // Channel-first levels of `tf.cast(tf.image.resize(img, (n, n)), tf.uint8)`, from TF's
        // resize_bilinear formula in numpy float32 (torch's interpolate(bilinear,
        // align_corners=False) agrees after truncation; rounding instead would change 24 and
        // 96 of these).
        let down: [u8; 48] = [
            25, 93, 133, 196, 145, 145, 101, 117, 105, 134, 118, 162, 129, 58, 183, 108, 78, 142, 182, 109, 162, 178,
            134, 134, 122, 167, 151, 79, 182, 107, 36, 141, 131, 167, 235, 78, 155, 91, 103, 187, 115, 80, 120, 132,
            151, 132, 89, 194,
        ];
        let up: [u8; 243] = [
            0, 24, 53, 82, 111, 139, 168, 197, 222, 30, 57, 90, 122, 154, 120, 133, 165, 193, 80, 113, 151, 188, 226,
            87, 74, 112, 144, 131, 168, 161, 141, 184, 117, 129, 135, 96, 182, 224, 159, 66, 115, 164, 213, 176, 48,
            90, 137, 141, 132, 187, 131, 154, 170, 141, 27, 78, 126, 170, 231, 114, 108, 155, 207, 77, 134, 124, 95,
            160, 160, 112, 102, 158, 108, 167, 122, 49, 119, 188, 115, 70, 130, 53, 77, 106, 135, 164, 192, 221, 164,
            19, 83, 110, 143, 156, 122, 154, 186, 161, 75, 133, 166, 204, 191, 51, 89, 127, 155, 169, 184, 145, 151,
            163, 95, 139, 119, 112, 149, 235, 106, 70, 119, 168, 217, 123, 59, 101, 143, 114, 130, 154, 97, 152, 144,
            100, 52, 80, 131, 179, 173, 56, 94, 148, 132, 32, 130, 187, 177, 129, 128, 61, 89, 127, 126, 161, 220, 175,
            102, 172, 42, 54, 123, 183, 106, 130, 159, 188, 217, 245, 132, 47, 72, 136, 163, 158, 142, 175, 207, 144,
            100, 128, 186, 219, 155, 67, 104, 142, 164, 189, 222, 123, 160, 141, 105, 148, 103, 121, 165, 202, 32, 74,
            123, 172, 221, 70, 63, 112, 154, 82, 129, 120, 96, 150, 117, 146, 153, 105, 133, 165, 115, 49, 109, 147,
            201, 185, 85, 183, 126, 97, 115, 181, 114, 142, 180, 179, 214, 102, 86, 155, 225, 95, 107, 176, 236,
        ];
        for (size, want) in [(4, &down[..]), (9, &up[..])] {
            let got = preprocess(&fixture(), Resize { size, ..SHARP });
            let levels: Vec<f32> = got.iter().map(|p| (p + 1.0) * 127.5).collect();
            let worst = levels.iter().zip(want).map(|(g, &w)| (g - f32::from(w)).abs()).fold(0f32, f32::max);
            assert!(worst < 1e-3, "{size} px: {levels:?}");
        }
    }
}
