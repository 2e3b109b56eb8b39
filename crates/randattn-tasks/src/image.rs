//! Image classification on real photographs of clothing: Fashion-MNIST (Xiao, Rasul and
//! Vollgraf 2017) as the Debian package `dataset-fashion-mnist` ships it, the offline stand-in
//! for LRA's grayscale CIFAR-10 (`shared/papers/lra-glue-data.md` §4.3).
//!
//! Each 28×28 image is zero-padded by 2 pixels on every side to 32×32 = 1024 tokens, row-major,
//! one token per pixel value 0–255; 10 classes. Splits: train = the first 54 000 images of the
//! official training set, dev = its last 6 000, test = the official 10 000 test images.
//!
//! LRA treats pixel value 0 as padding (its mask is `token > 0`), so black pixels — here the
//! border and much of the background — are masked out of attention as keys. `pad_black=true`
//! (the default) keeps that quirk; `pad_black=false` makes pixel values tokens 1–256 with 0 left
//! for padding only.
//!
//! Deliberate difference: Fashion-MNIST is easier than grayscale CIFAR-10; compare methods with
//! each other, not with LRA's absolute accuracies.

use std::io::Read;
use std::ops::Range;
use std::path::Path;

use crate::error::{Error, Result};
use crate::split::Split;
use crate::task::{Example, Task, TaskInfo};

/// Images in the official training set; the last [`DEV_IMAGES`] of them form the dev split.
const TRAIN_FILE_IMAGES: usize = 60_000;
/// Size of the dev split.
const DEV_IMAGES: usize = 6_000;
/// Side of the padded image.
pub const SIDE: usize = 32;
const INSTALL: &str = "apt-get install dataset-fashion-mnist";

randattn::method_params! {
    /// Fashion-MNIST `image`. See the module documentation.
    #[derive(Debug, Clone, PartialEq)]
    pub struct Image {
        /// folder holding the IDX files
        pub dir: String = "/usr/share/datasets/fashion-mnist".to_string();
        /// pixel value 0 is the pad token, as LRA does (black pixels are masked out)
        pub pad_black: bool = true;
    }
}

/// The images and labels of one IDX pair.
pub struct Idx {
    /// `count × rows × cols` pixel values.
    pub pixels: Vec<u8>,
    /// One label per image.
    pub labels: Vec<u8>,
    /// Image height and width.
    pub rows: usize,
    /// Image width.
    pub cols: usize,
}

fn read_gz(path: &Path) -> Result<Vec<u8>> {
    let file = std::fs::File::open(path).map_err(|e| Error::Missing {
        what: "Fashion-MNIST",
        path: path.display().to_string(),
        cause: e.to_string(),
        install: INSTALL,
    })?;
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(file)
        .read_to_end(&mut out)
        .map_err(|e| Error::Corrupt {
            path: path.display().to_string(),
            message: format!("not a gzip file ({e})"),
        })?;
    Ok(out)
}

fn be_u32(bytes: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

/// Reads `{prefix}-images-idx3-ubyte.gz` and `{prefix}-labels-idx1-ubyte.gz` from `dir`,
/// checking magic numbers, sizes and labels.
pub fn read_idx(dir: &Path, prefix: &str) -> Result<Idx> {
    let ipath = dir.join(format!("{prefix}-images-idx3-ubyte.gz"));
    let lpath = dir.join(format!("{prefix}-labels-idx1-ubyte.gz"));
    let (images, labels) = (read_gz(&ipath)?, read_gz(&lpath)?);
    let corrupt = |path: &Path, message: String| Error::Corrupt {
        path: path.display().to_string(),
        message,
    };
    if images.len() < 16 || be_u32(&images, 0) != 0x0803 {
        return Err(corrupt(
            &ipath,
            "not an IDX image file (magic 0x00000803)".into(),
        ));
    }
    if labels.len() < 8 || be_u32(&labels, 0) != 0x0801 {
        return Err(corrupt(
            &lpath,
            "not an IDX label file (magic 0x00000801)".into(),
        ));
    }
    let (n, rows, cols) = (
        be_u32(&images, 4) as usize,
        be_u32(&images, 8) as usize,
        be_u32(&images, 12) as usize,
    );
    let pixels = images[16..].to_vec();
    let labels = labels[8..].to_vec();
    if pixels.len() != n * rows * cols || labels.len() != n {
        return Err(corrupt(
            &ipath,
            format!(
                "declares {n} images of {rows}x{cols} but holds {} pixel bytes and {} labels",
                pixels.len(),
                labels.len()
            ),
        ));
    }
    if let Some(bad) = labels.iter().find(|l| **l > 9) {
        return Err(corrupt(&lpath, format!("label {bad} is not a class 0-9")));
    }
    Ok(Idx {
        pixels,
        labels,
        rows,
        cols,
    })
}

impl Image {
    /// The image file and its index range for `split`.
    fn source(split: Split) -> (&'static str, Range<usize>) {
        match split {
            Split::Train => ("train", 0..TRAIN_FILE_IMAGES - DEV_IMAGES),
            Split::Dev => ("train", TRAIN_FILE_IMAGES - DEV_IMAGES..TRAIN_FILE_IMAGES),
            Split::Test => ("t10k", 0..10_000),
        }
    }

    /// Image `i` of `idx` padded to 32×32, as tokens.
    fn tokens(&self, idx: &Idx, i: usize) -> Vec<u32> {
        let (r, c) = (idx.rows, idx.cols);
        let (top, left) = ((SIDE - r) / 2, (SIDE - c) / 2);
        let shift = u32::from(!self.pad_black);
        let mut out = vec![shift; SIDE * SIDE];
        let img = &idx.pixels[i * r * c..(i + 1) * r * c];
        for y in 0..r {
            for x in 0..c {
                out[(top + y) * SIDE + left + x] = img[y * c + x] as u32 + shift;
            }
        }
        out
    }
}

impl Task for Image {
    const NAME: &'static str = "image";
    const SUMMARY: &'static str = "Fashion-MNIST (Debian dataset-fashion-mnist) padded to 32x32 = 1024 pixel tokens, 10 classes";

    fn info(&self) -> TaskInfo {
        TaskInfo {
            vocab: 256 + usize::from(!self.pad_black),
            classes: 10,
            max_len: SIDE * SIDE,
            pad: 0,
            pad_in_data: self.pad_black,
        }
    }

    fn split_sizes(&self) -> Result<[usize; 3]> {
        Ok([TRAIN_FILE_IMAGES - DEV_IMAGES, DEV_IMAGES, 10_000])
    }

    fn examples_within(
        &self,
        _seed: u64,
        split: Split,
        range: Range<usize>,
        _max_candidates: usize,
    ) -> Result<Vec<Example>> {
        self.validate()?;
        let (prefix, within) = Self::source(split);
        let idx = read_idx(Path::new(&self.dir), prefix)?;
        if idx.rows > SIDE || idx.cols > SIDE || idx.labels.len() < within.end {
            return Err(Error::Corrupt {
                path: self.dir.clone(),
                message: format!(
                    "{prefix}: {} images of {}x{}, expected at least {} of at most {SIDE}x{SIDE}",
                    idx.labels.len(),
                    idx.rows,
                    idx.cols,
                    within.end
                ),
            });
        }
        let size = within.len();
        if range.end > size {
            return Err(Error::param(
                Self::NAME,
                "count",
                &format!("at most {size} examples in the {} split", split.name()),
                format!("examples {}..{}", range.start, range.end),
            ));
        }
        Ok(range
            .map(|i| {
                let at = within.start + i;
                Example {
                    tokens: self.tokens(&idx, at),
                    label: idx.labels[at] as u32,
                    text: None,
                    meta: None,
                }
            })
            .collect())
    }
}
