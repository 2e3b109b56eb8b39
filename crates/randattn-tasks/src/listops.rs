//! ListOps (Nangia & Bowman 2018, as extended by the Long Range Arena, Tay et al. 2021): the
//! value of a nested prefix expression of list operators over digits.
//!
//! The generator is LRA's `lra_benchmarks/data/listops.py` as the brief describes it
//! (`shared/papers/lra-glue-data.md` §2): a node at depth `< max_depth` is an operator with
//! probability 0.25 (at `max_depth` always a digit); an operator draws 2..=`max_args` children
//! one level deeper and one of MIN, MAX, MED, SM; a digit is uniform in 0–9. A tree is kept when
//! its length — operator, digit and `]` tokens — lies strictly inside
//! (`min_length`, `max_length`). Values: MIN and MAX as usual, MED = `int(np.median(...))`
//! (for an even count the mean of the two middle values, truncated), SM = sum mod 10.
//!
//! Tokens: 0 = pad, then the 15 symbols in this fixed order: `[MIN` 1, `[MAX` 2, `[MED` 3,
//! `[SM` 4, digits `0`–`9` as 5–14, `]` 15 (LRA's ids depend on Python's set order; any fixed
//! map is equivalent).
//!
//! Deliberate differences: LRA draws 100 000 unique trees and cuts them 96k/2k/2k in set order;
//! here example `i` of a split is drawn from its own stream and a tree belongs to the split its
//! hash names (shares 78/11/11, proportional to √ of the split sizes, which minimises the
//! candidates drawn), so any number of examples can be made in parallel, the same
//! `(seed, split, i)` gives the same tree, and no tree is in two splits. Duplicates within a
//! split are not removed: at the default window (≥ 500 tokens) none occurs (tested on 20 000);
//! at very short windows they can.

use std::ops::Range;

use rand::Rng;
use randattn::rng::StreamRng;

use crate::error::{Error, Result};
use crate::split::Split;
use crate::task::{Example, Task, TaskInfo, generate};

/// The symbols, by token id − 1.
pub const SYMBOLS: [&str; 15] = [
    "[MIN", "[MAX", "[MED", "[SM", "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "]",
];
/// Token id of the closing bracket.
pub const CLOSE: u32 = 15;
/// Token id of digit 0 (digit `v` is `DIGIT0 + v`).
pub const DIGIT0: u32 = 5;
/// Probability that a node above the depth limit is an operator.
const OPERATOR_P: f64 = 0.25;

randattn::method_params! {
    /// ListOps `listops`. See the module documentation.
    #[derive(Debug, Clone, PartialEq)]
    pub struct ListOps {
        /// examples are longer than this (tokens)
        pub min_length: usize = 500, randattn::params::in_range(0, 1 << 20);
        /// examples are shorter than this (tokens)
        pub max_length: usize = 2000, randattn::params::in_range(2, 1 << 20);
        /// deepest level of a node (the root is level 1)
        pub max_depth: usize = 10, randattn::params::in_range(1, 64);
        /// most arguments of an operator
        pub max_args: usize = 10, randattn::params::in_range(2, 64);
    }
}

/// The value of an operator over its arguments.
pub fn apply(op: u32, args: &[u32]) -> u32 {
    match op {
        1 => *args.iter().min().expect("operators have arguments"),
        2 => *args.iter().max().expect("operators have arguments"),
        3 => {
            let mut s = args.to_vec();
            s.sort_unstable();
            let n = s.len();
            if n % 2 == 1 {
                s[n / 2]
            } else {
                (s[n / 2 - 1] + s[n / 2]) / 2 // the mean, truncated: int(np.median(...))
            }
        }
        _ => args.iter().sum::<u32>() % 10,
    }
}

impl ListOps {
    /// One subtree at `depth` appended to `out`; its value, or `None` once the tree has grown
    /// to `max_length` tokens (it would be rejected anyway).
    fn node(&self, depth: usize, rng: &mut StreamRng, out: &mut Vec<u32>) -> Option<u32> {
        if out.len() >= self.max_length {
            return None;
        }
        let r: f64 = if depth < self.max_depth {
            rng.random()
        } else {
            1.0
        };
        if r > OPERATOR_P {
            let v = rng.random_range(0..10u32);
            out.push(DIGIT0 + v);
            return Some(v);
        }
        let k = rng.random_range(2..=self.max_args);
        let at = out.len();
        out.push(0); // the operator, drawn after its children as LRA does
        let mut args = Vec::with_capacity(k);
        for _ in 0..k {
            args.push(self.node(depth + 1, rng, out)?);
        }
        let op = rng.random_range(1..=4u32);
        out[at] = op;
        out.push(CLOSE);
        Some(apply(op, &args))
    }

    /// A tree inside the length window, or `None`.
    fn candidate(&self, rng: &mut StreamRng) -> Option<Example> {
        let mut tokens = Vec::new();
        let value = self.node(1, rng, &mut tokens)?;
        if tokens.len() <= self.min_length || tokens.len() >= self.max_length {
            return None;
        }
        let text = tokens
            .iter()
            .map(|t| SYMBOLS[*t as usize - 1])
            .collect::<Vec<_>>()
            .join(" ");
        Some(Example {
            tokens,
            label: value,
            text: Some(text),
            meta: None,
        })
    }
}

impl Task for ListOps {
    const NAME: &'static str = "listops";
    const SUMMARY: &'static str =
        "ListOps (LRA): the value 0-9 of a nested MIN/MAX/MED/SM expression, generated";

    fn check(&self) -> Result<()> {
        if self.min_length + 1 >= self.max_length {
            return Err(Error::param(
                Self::NAME,
                "max_length",
                "at least min_length + 2 (the window is strict)",
                format!("{} with min_length = {}", self.max_length, self.min_length),
            ));
        }
        Ok(())
    }

    fn info(&self) -> TaskInfo {
        TaskInfo {
            vocab: 16,
            classes: 10,
            max_len: self.max_length - 1,
            pad: 0,
            pad_in_data: false,
        }
    }

    fn split_sizes(&self) -> Result<[usize; 3]> {
        Ok([96_000, 2_000, 2_000])
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
            [78, 11, 11],
            max_candidates,
            |rng| self.candidate(rng),
        )
    }
}
