//! Associative recall, beyond LRA: the standard synthetic probe on which low-rank and kernel
//! approximations of attention fail while softmax attention succeeds (a query must find the
//! one key equal to it among many and copy the value next to it).
//!
//! Layout, fixed so that anyone can check an example: `k1 v1 k2 v2 … kP vP q`. The `P = pairs`
//! keys are distinct, drawn uniformly from a key vocabulary of `keys` symbols; each value is
//! drawn uniformly (with repetition) from a value vocabulary of `values` symbols; the query `q`
//! is one of the keys, uniformly; the label is the value paired with it. Tokens: 0 = pad, keys
//! `1..=keys`, values `keys+1..=keys+values`; classes = `values`; length `2·pairs + 1`. A model
//! must pool the last token (the query) — the mean over positions cannot tell which key was
//! asked.
//!
//! Splits: example `i` comes from the stream `(seed, split, i)` and a sequence belongs to the
//! split its hash names (shares 72/14/14), so none is in two splits.
//!
//! Defaults (64 pairs → 129 tokens, 256 keys, 16 values, chance 1/16): long enough that a
//! few random features or landmarks cannot single out one key, small enough for a 2-layer model
//! on a CPU. Whether softmax learns it at these sizes is measured by the trainer's issue.

use std::ops::Range;

use rand::Rng;
use rand::seq::index::sample;
use randattn::rng::StreamRng;

use crate::error::{Error, Result};
use crate::split::Split;
use crate::task::{Example, Task, TaskInfo, generate};

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
    }
}

impl Recall {
    fn candidate(&self, rng: &mut StreamRng) -> Example {
        let keys = sample(rng, self.keys, self.pairs);
        let mut tokens = Vec::with_capacity(2 * self.pairs + 1);
        let mut vals = Vec::with_capacity(self.pairs);
        for k in keys.iter() {
            let v = rng.random_range(0..self.values);
            tokens.push(1 + k as u32);
            tokens.push((1 + self.keys + v) as u32);
            vals.push(v as u32);
        }
        let q = rng.random_range(0..self.pairs);
        tokens.push(tokens[2 * q]);
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
        Ok(())
    }

    fn info(&self) -> TaskInfo {
        TaskInfo {
            vocab: 1 + self.keys + self.values,
            classes: self.values,
            max_len: 2 * self.pairs + 1,
            pad: 0,
            pad_in_data: false,
        }
    }

    fn split_sizes(&self) -> Result<[usize; 3]> {
        Ok([50_000, 2_000, 2_000])
    }

    fn examples(&self, seed: u64, split: Split, range: Range<usize>) -> Result<Vec<Example>> {
        self.validate()?;
        generate(Self::NAME, seed, split, range, [72, 14, 14], |rng| {
            Some(self.candidate(rng))
        })
    }
}
