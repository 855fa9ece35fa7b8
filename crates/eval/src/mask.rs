//! Binary object masks as the COCO API (pycocotools' `maskApi.c`) makes and stores them:
//! polygons rasterised the COCO way, and run-length encoding over the pixels in column-major
//! order, `{"size": [height, width], "counts": ...}` with the runs (zeros, ones, zeros, ...)
//! as a list (COCO's uncompressed RLE) or as pycocotools' compressed string, plus the
//! bilinear resampling masks go through on their way into and out of PaliGemma's 64 x 64
//! mask codes.

use fast_image_resize::images::Image;
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use serde_json::{json, Value};

/// A binary mask over a `height` x `width` image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mask {
    pub height: usize,
    pub width: usize,
    /// Row-major: pixel (y, x) is `pixels[y * width + x]`.
    pub pixels: Vec<bool>,
}

impl Mask {
    /// An empty mask.
    pub fn empty(height: usize, width: usize) -> Mask {
        Mask { height, width, pixels: vec![false; height * width] }
    }

    /// The union of `polygons` (each `[x1, y1, x2, y2, ...]` in pixels, COCO's
    /// `segmentation` list), rasterised as pycocotools' `rleFrPoly`: the boundary traced on
    /// a 5x finer grid, a pixel inside when its centre is.
    pub fn from_polygons(polygons: &[Vec<f64>], height: usize, width: usize) -> Mask {
        let mut mask = Mask::empty(height, width);
        for polygon in polygons {
            let counts = polygon_counts(polygon, height, width);
            let one = Mask::from_counts(&counts, height, width).expect("rleFrPoly's counts cover the image");
            mask.pixels.iter_mut().zip(one.pixels).for_each(|(p, q)| *p |= q);
        }
        mask
    }

    /// From COCO's uncompressed RLE counts (runs of 0s and 1s alternating, 0s first, in
    /// column-major order); an error when they do not cover the image exactly.
    pub fn from_counts(counts: &[u64], height: usize, width: usize) -> Result<Mask, String> {
        let total: u64 = counts.iter().sum();
        if total != (height * width) as u64 {
            return Err(format!("RLE counts cover {total} pixels, not {height} x {width}"));
        }
        let mut mask = Mask::empty(height, width);
        let mut at = 0usize;
        for (i, &run) in counts.iter().enumerate() {
            if i % 2 == 1 {
                for k in at..at + run as usize {
                    mask.pixels[(k % height) * width + k / height] = true;
                }
            }
            at += run as usize;
        }
        Ok(mask)
    }

    /// COCO's uncompressed RLE counts of the mask.
    pub fn counts(&self) -> Vec<u64> {
        let mut counts = Vec::new();
        let (mut value, mut run) = (false, 0u64);
        for x in 0..self.width {
            for y in 0..self.height {
                if self.pixels[y * self.width + x] != value {
                    counts.push(run);
                    (value, run) = (!value, 0);
                }
                run += 1;
            }
        }
        counts.push(run);
        counts
    }

    /// The mask as COCO's RLE object with compressed counts (what `pycocotools.mask.encode`
    /// returns, a few times shorter than the list).
    pub fn to_json(&self) -> Value {
        json!({"size": [self.height, self.width], "counts": compress(&self.counts())})
    }

    /// Reads COCO's RLE object, `{"size": [h, w], "counts": ...}` with the counts as a list or
    /// as pycocotools' compressed string.
    pub fn from_json(value: &Value) -> Result<Mask, String> {
        let bad = || "is not COCO's RLE {\"size\": [height, width], \"counts\": [...] or \"...\"}".to_string();
        let size: Option<Vec<u64>> =
            value.get("size").and_then(Value::as_array).and_then(|s| s.iter().map(Value::as_u64).collect());
        let Some([height, width]) = size.as_deref().and_then(|s| <[u64; 2]>::try_from(s).ok()) else {
            return Err(bad());
        };
        let counts = match value.get("counts") {
            Some(Value::String(text)) => decompress(text)?,
            Some(Value::Array(list)) => list.iter().map(Value::as_u64).collect::<Option<_>>().ok_or_else(bad)?,
            _ => return Err(bad()),
        };
        Mask::from_counts(&counts, height as usize, width as usize)
    }

    /// Pixels inside.
    pub fn area(&self) -> usize {
        self.pixels.iter().filter(|&&p| p).count()
    }

    /// The rows `y1..y2` and columns `x1..x2` as 0.0 / 1.0, resized to `side` x `side` with
    /// [`resize_bilinear`]: big_vision's `refcoco_mask2str` before the VQ-VAE encoder.
    pub fn crop_resized(&self, [y1, x1, y2, x2]: [usize; 4], side: usize) -> Vec<f32> {
        let (h, w) = (y2 - y1, x2 - x1);
        let mut crop = Vec::with_capacity(h * w);
        for y in y1..y2 {
            crop.extend(self.pixels[y * self.width + x1..y * self.width + x2].iter().map(|&p| f32::from(u8::from(p))));
        }
        resize_bilinear(&crop, (h, w), (side, side))
    }
}

/// Resizes a row-major `from.0` x `from.1` image of floats to `to` with the triangle filter
/// widened by the downscale factor and half-pixel centres: Pillow's `BILINEAR` resize (which
/// big_vision's segmentation evaluator uses on the decoded masks) and
/// `tf.image.resize(method="bilinear", antialias=True)` (which its `refcoco_mask2str` uses on
/// the training masks) compute the same weights.
pub fn resize_bilinear(pixels: &[f32], from: (usize, usize), to: (usize, usize)) -> Vec<f32> {
    assert_eq!(pixels.len(), from.0 * from.1, "pixels for a {from:?} image");
    if from == to {
        return pixels.to_vec();
    }
    let bytes: Vec<u8> = pixels.iter().flat_map(|v| v.to_ne_bytes()).collect();
    let src = Image::from_vec_u8(from.1 as u32, from.0 as u32, bytes, PixelType::F32).expect("buffer matches size");
    let mut dst = Image::new(to.1 as u32, to.0 as u32, PixelType::F32);
    let options = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Bilinear));
    Resizer::new().resize(&src, &mut dst, &options).expect("same pixel type");
    dst.buffer().chunks_exact(4).map(|v| f32::from_ne_bytes([v[0], v[1], v[2], v[3]])).collect()
}

/// pycocotools' `rleToString`: each count (from the fourth on, less the count two before
/// it) in 5-bit groups, low first, with a continuation bit, as characters from `0`.
pub fn compress(counts: &[u64]) -> String {
    let mut text = String::new();
    for (i, &count) in counts.iter().enumerate() {
        let mut x = count as i64 - if i > 2 { counts[i - 2] as i64 } else { 0 };
        loop {
            let mut c = (x & 0x1f) as u8;
            x >>= 5;
            let more = if c & 0x10 != 0 { x != -1 } else { x != 0 };
            if more {
                c |= 0x20;
            }
            text.push(char::from(c + 48));
            if !more {
                break;
            }
        }
    }
    text
}

/// pycocotools' `rleFrString`: the counts of a compressed string.
pub fn decompress(text: &str) -> Result<Vec<u64>, String> {
    let mut counts: Vec<u64> = Vec::new();
    let mut bytes = text.bytes();
    while let Some(first) = bytes.next() {
        let (mut x, mut shift, mut byte) = (0i64, 0, first);
        loop {
            let c = byte.checked_sub(48).filter(|c| *c < 64).ok_or("a character outside 0..o in RLE counts")?;
            x |= i64::from(c & 0x1f) << shift;
            shift += 5;
            if c & 0x20 == 0 {
                if c & 0x10 != 0 {
                    x |= -1 << shift;
                }
                break;
            }
            byte = bytes.next().ok_or("RLE counts end inside a number")?;
        }
        if counts.len() > 2 {
            x += counts[counts.len() - 2] as i64;
        }
        counts.push(u64::try_from(x).map_err(|_| "a negative run in RLE counts")?);
    }
    Ok(counts)
}

/// pycocotools' `rleFrPoly`: the RLE counts of one polygon.
fn polygon_counts(xy: &[f64], height: usize, width: usize) -> Vec<u64> {
    const SCALE: f64 = 5.0;
    let k = xy.len() / 2;
    if k == 0 {
        return vec![(height * width) as u64];
    }
    // The corners on the finer grid, closed.
    let mut x: Vec<i64> = (0..k).map(|j| (SCALE * xy[2 * j] + 0.5) as i64).collect();
    let mut y: Vec<i64> = (0..k).map(|j| (SCALE * xy[2 * j + 1] + 0.5) as i64).collect();
    x.push(x[0]);
    y.push(y[0]);
    // Every fine-grid point along the boundary, each edge walked along its longer axis.
    let (mut u, mut v) = (Vec::new(), Vec::new());
    for j in 0..k {
        let (mut xs, mut xe, mut ys, mut ye) = (x[j], x[j + 1], y[j], y[j + 1]);
        let (dx, dy) = ((xe - xs).abs(), (ys - ye).abs());
        let flip = (dx >= dy && xs > xe) || (dx < dy && ys > ye);
        if flip {
            (xs, xe, ys, ye) = (xe, xs, ye, ys);
        }
        if dx >= dy {
            let s = if dx == 0 { 0.0 } else { (ye - ys) as f64 / dx as f64 };
            for d in 0..=dx {
                let t = if flip { dx - d } else { d };
                u.push(t + xs);
                v.push((ys as f64 + s * t as f64 + 0.5) as i64);
            }
        } else {
            let s = (xe - xs) as f64 / dy as f64;
            for d in 0..=dy {
                let t = if flip { dy - d } else { d };
                v.push(t + ys);
                u.push((xs as f64 + s * t as f64 + 0.5) as i64);
            }
        }
    }
    // Where the boundary crosses a pixel column's centre, back on the pixel grid: the first
    // pixel of that column below the crossing.
    let (h, w) = (height as f64, width as f64);
    let mut starts = Vec::new();
    for j in 1..u.len() {
        if u[j] == u[j - 1] {
            continue;
        }
        let xd = (if u[j] < u[j - 1] { u[j] } else { u[j] - 1 }) as f64;
        let xd = (xd + 0.5) / SCALE - 0.5;
        if xd.floor() != xd || xd < 0.0 || xd > w - 1.0 {
            continue;
        }
        let yd = v[j].min(v[j - 1]) as f64;
        let yd = ((yd + 0.5) / SCALE - 0.5).clamp(0.0, h).ceil();
        starts.push(xd as u64 * height as u64 + yd as u64);
    }
    // Sorted crossings alternate the value; equal crossings cancel, as pycocotools merges them.
    starts.push((height * width) as u64);
    starts.sort_unstable();
    let mut previous = 0;
    let runs: Vec<u64> = starts
        .into_iter()
        .map(|s| {
            let run = s - previous;
            previous = s;
            run
        })
        .collect();
    let mut counts = vec![runs[0]];
    let mut j = 1;
    while j < runs.len() {
        if runs[j] > 0 {
            counts.push(runs[j]);
            j += 1;
        } else {
            j += 1;
            if j < runs.len() {
                *counts.last_mut().expect("one count at least") += runs[j];
                j += 1;
            }
        }
    }
    counts
}
