//! Byte-level document classification on real human text: which collection of fortune cookies
//! a document comes from. The offline stand-in for LRA's IMDB byte-level task
//! (`shared/papers/lra-glue-data.md` §4.3): documents of a few hundred to a few thousand bytes,
//! classified from their bytes alone.
//!
//! Source: the fortune files of the Debian packages `fortunes` and `fortunes-min`, version
//! 1:1.99.1-7.3 (Debian 12), entries separated by lines holding `%`. Classes: eight collections
//! with at least 100 KB of text each, in this order: `computers`, `cookie`, `definitions`,
//! `people`, `politics`, `science`, `songs-poems`, `work`.
//!
//! Splits are made on the *fortunes*, not the documents: each fortune belongs to the split its
//! hash names (weights 80/10/10), so no fortune appears in two splits. Document `i` of a split
//! (stream `(seed, split, i)`) picks a class uniformly and a length uniformly in
//! `min_bytes..=max_bytes`, then concatenates fortunes of that class and split, drawn uniformly
//! with repetition and separated by a newline, and cuts the result to that length. Tokens are
//! bytes + 1 (0 = pad, vocabulary 257).

use std::ops::Range;
use std::path::Path;

use rand::Rng;
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::split::Split;
use crate::task::{Example, Task, TaskInfo};

/// The collections, in class order.
pub const CATEGORIES: [&str; 8] = [
    "computers",
    "cookie",
    "definitions",
    "people",
    "politics",
    "science",
    "songs-poems",
    "work",
];
const INSTALL: &str = "apt-get install fortunes";

randattn::method_params! {
    /// Fortune documents `text`. See the module documentation.
    #[derive(Debug, Clone, PartialEq)]
    pub struct Text {
        /// folder holding the fortune files
        pub dir: String = "/usr/share/games/fortunes".to_string();
        /// shortest document in bytes
        pub min_bytes: usize = 1000, randattn::params::in_range(1, 1 << 20);
        /// longest document in bytes
        pub max_bytes: usize = 4000, randattn::params::in_range(1, 1 << 20);
    }
}

/// The fortunes of one collection, each as its bytes.
pub fn read_fortunes(dir: &Path, category: &str) -> Result<Vec<Vec<u8>>> {
    let path = dir.join(category);
    let bytes = std::fs::read(&path).map_err(|e| Error::Missing {
        what: "the fortune files",
        path: path.display().to_string(),
        cause: e.to_string(),
        install: INSTALL,
    })?;
    let text = String::from_utf8_lossy(&bytes);
    let fortunes: Vec<Vec<u8>> = text
        .split("\n%\n")
        .map(|f| f.trim_matches(|c| c == '\n' || c == '%').trim_end())
        .filter(|f| !f.is_empty())
        .map(|f| f.as_bytes().to_vec())
        .collect();
    if fortunes.len() < 10 {
        return Err(Error::Corrupt {
            path: path.display().to_string(),
            message: format!("holds {} fortunes; expected a fortune file", fortunes.len()),
        });
    }
    Ok(fortunes)
}

/// The split of a fortune.
pub fn fortune_split(fortune: &[u8]) -> Split {
    let words: Vec<u32> = fortune.iter().map(|b| *b as u32).collect();
    Split::of_tokens(&words, [80, 10, 10])
}

impl Text {
    /// Every class's fortunes of `split`.
    fn pools(&self, split: Split) -> Result<Vec<Vec<Vec<u8>>>> {
        CATEGORIES
            .iter()
            .map(|c| {
                let all = read_fortunes(Path::new(&self.dir), c)?;
                Ok(all
                    .into_iter()
                    .filter(|f| fortune_split(f) == split)
                    .collect())
            })
            .collect()
    }
}

impl Task for Text {
    const NAME: &'static str = "text";
    const SUMMARY: &'static str =
        "fortune documents (Debian fortunes): which of 8 collections, from the bytes";

    fn check(&self) -> Result<()> {
        if self.min_bytes > self.max_bytes {
            return Err(Error::param(
                Self::NAME,
                "max_bytes",
                "at least min_bytes",
                format!("{} with min_bytes = {}", self.max_bytes, self.min_bytes),
            ));
        }
        Ok(())
    }

    fn info(&self) -> TaskInfo {
        TaskInfo {
            vocab: 257,
            classes: CATEGORIES.len(),
            max_len: self.max_bytes,
            pad: 0,
            pad_in_data: false,
        }
    }

    fn split_sizes(&self) -> Result<[usize; 3]> {
        Ok([20_000, 2_000, 2_000])
    }

    fn examples_within(
        &self,
        seed: u64,
        split: Split,
        range: Range<usize>,
        _max_candidates: usize,
    ) -> Result<Vec<Example>> {
        self.validate()?;
        let pools = self.pools(split)?;
        if let Some(c) = pools.iter().position(|p| p.is_empty()) {
            return Err(Error::Corrupt {
                path: self.dir.clone(),
                message: format!(
                    "collection `{}` has no fortune in the {} split",
                    CATEGORIES[c],
                    split.name()
                ),
            });
        }
        Ok(range
            .into_par_iter()
            .map(|i| {
                let mut rng = randattn::rng::stream(seed, split.index(), i, "text");
                let class = rng.random_range(0..CATEGORIES.len());
                let len = rng.random_range(self.min_bytes..=self.max_bytes);
                let pool = &pools[class];
                let mut doc: Vec<u8> = Vec::with_capacity(len + 256);
                while doc.len() < len {
                    if !doc.is_empty() {
                        doc.push(b'\n');
                    }
                    doc.extend_from_slice(&pool[rng.random_range(0..pool.len())]);
                }
                doc.truncate(len);
                Example {
                    tokens: doc.iter().map(|b| *b as u32 + 1).collect(),
                    label: class as u32,
                    text: Some(String::from_utf8_lossy(&doc).into_owned()),
                    meta: None,
                }
            })
            .collect())
    }
}
