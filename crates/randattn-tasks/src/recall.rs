//! Associative recall, beyond LRA: the standard synthetic probe on which low-rank and kernel
//! approximations of attention fail while softmax attention succeeds (a query must find the
//! one key equal to it among many and copy the value next to it).
//!
//! Layout `pairs` (the default), fixed so that anyone can check an example: `k1 v1 k2 v2 … kP vP
//! q`. The `P = pairs` keys are distinct, drawn uniformly from a key vocabulary of `keys`
//! symbols; each value is drawn uniformly (with repetition) from a value vocabulary of `values`
//! symbols; the query `q` is one of the keys, uniformly; the label is the value paired with it.
//! Tokens: 0 = pad, keys `1..=keys`, values `keys+1..=keys+values`; classes = `values`; length
//! `2·pairs + 1`. A model must pool the last token (the query) — the mean over positions cannot
//! tell which key was asked.
//!
//! Layout `fused`: `p1 p2 … pP q`, one token per pair, `keys + 1 + key·values + value` (key and
//! value counted from 0), the query a key token `1..=keys` as before; length `pairs + 1`. The
//! answer is one hop away (the token of the asked key), as sharp a retrieval as the two-hop
//! form: measured in issue 13, the two-hop form with a single query stays at the
//! most-frequent-value rate for 30,000 steps in our 2-layer model (and in PyTorch's copy of it),
//! while the fused form is learnt in a few thousand steps. The `lra-lite` suite uses it.
//!
//! Splits: example `i` comes from the stream `(seed, split, i)` and a sequence belongs to the
//! split its hash names (shares 72/14/14), so none is in two splits.
//!
//! Defaults (64 pairs → 129 tokens, 256 keys, 16 values, chance 1/16): long enough that a
//! few random features or landmarks cannot single out one key, small enough for a 2-layer model
//! on a CPU.

use std::ops::Range;

use rand::Rng;
use rand::seq::index::sample;
use randattn::rng::StreamRng;

use crate::error::{Error, Result};
use crate::split::Split;
use crate::task::{Example, Task, TaskInfo, generate};

randattn::choice! {
    /// How a key-value pair is written.
    pub enum Layout {
        /// Two tokens, the key then its value: answering takes two hops (find the key, read
        /// the token after it).
        Pairs = "pairs",
        /// One token naming both the key and the value: answering takes one hop (find the
        /// token of the asked key), as sharp as the two-hop form.
        Fused = "fused",
    }
}

randattn::method_params! {
    /// Associative recall `recall`. See the module documentation.
    #[derive(Debug, Clone, PartialEq)]
    pub struct Recall {
        /// key-value pairs per example (length 2·pairs + 1)
        pub pairs: usize = 64, randattn::params::in_range(1, 1 << 16);
        /// size of the key vocabulary (at least pairs)
        pub keys: usize = 256, randattn::params::in_range(1, 1 << 20);
        /// size of the value vocabulary (= the number of classes)
        pub values: usize = 16, randattn::params::in_range(2, 1 << 16);
        /// pairs: `k v` tokens (two hops); fused: one token per pair (one hop)
        pub layout: Layout = Layout::Pairs;
    }
}

impl Recall {
    fn candidate(&self, rng: &mut StreamRng) -> Example {
        let keys = sample(rng, self.keys, self.pairs);
        let mut tokens = Vec::with_capacity(2 * self.pairs + 1);
        let mut vals = Vec::with_capacity(self.pairs);
        for k in keys.iter() {
            let v = rng.random_range(0..self.values);
            match self.layout {
                Layout::Pairs => {
                    tokens.push(1 + k as u32);
                    tokens.push((1 + self.keys + v) as u32);
                }
                Layout::Fused => tokens.push((1 + self.keys + k * self.values + v) as u32),
            }
            vals.push(v as u32);
        }
        let q = rng.random_range(0..self.pairs);
        tokens.push(1 + keys.index(q) as u32);
        Example {
            tokens,
            label: vals[q],
            text: None,
            meta: None,
        }
    }
}

impl Task for Recall {
    const NAME: &'static str = "recall";
    const SUMMARY: &'static str =
        "associative recall: after k1 v1 ... kP vP q, name the value paired with key q";

    fn check(&self) -> Result<()> {
        if self.keys < self.pairs {
            return Err(Error::param(
                Self::NAME,
                "keys",
                "at least pairs (the keys of an example are distinct)",
                format!("{} with pairs = {}", self.keys, self.pairs),
            ));
        }
        if self.layout == Layout::Fused && self.keys * self.values > 1 << 22 {
            return Err(Error::param(
                Self::NAME,
                "values",
                "keys × values at most 4,194,304 with layout = fused (one token per pair)",
                format!("{} with keys = {}", self.values, self.keys),
            ));
        }
        Ok(())
    }

    fn info(&self) -> TaskInfo {
        let (vocab, max_len) = match self.layout {
            Layout::Pairs => (1 + self.keys + self.values, 2 * self.pairs + 1),
            Layout::Fused => (1 + self.keys + self.keys * self.values, self.pairs + 1),
        };
        TaskInfo {
            vocab,
            classes: self.values,
            max_len,
            pad: 0,
            pad_in_data: false,
        }
    }

    fn split_sizes(&self) -> Result<[usize; 3]> {
        Ok([50_000, 2_000, 2_000])
    }

    fn examples_within(
        &self,
        seed: u64,
        split: Split,
        range: Range<usize>,
        max_candidates: usize,
    ) -> Result<Vec<Example>> {
        self.validate()?;
        generate(
            Self::NAME,
            seed,
            split,
            range,
            [72, 14, 14],
            max_candidates,
            |rng| Some(self.candidate(rng)),
        )
    }
}
