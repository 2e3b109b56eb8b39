//! The three splits, and how a generated sequence is assigned to one.

use randattn::rng::{GOLDEN, mix64};

/// A data split.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Split {
    /// Training examples.
    Train,
    /// Development (validation) examples: model selection.
    Dev,
    /// Test examples: reported once.
    Test,
}

impl Split {
    /// All three, in order.
    pub const ALL: [Split; 3] = [Split::Train, Split::Dev, Split::Test];

    /// 0, 1, 2.
    pub fn index(self) -> usize {
        match self {
            Split::Train => 0,
            Split::Dev => 1,
            Split::Test => 2,
        }
    }

    /// `train`, `dev`, `test`.
    pub fn name(self) -> &'static str {
        ["train", "dev", "test"][self.index()]
    }

    /// The split a token sequence belongs to: a hash of the sequence falls into one of three
    /// ranges with relative sizes `weights`. Generators keep only candidates of the split they
    /// make, so the same sequence can never appear in two splits.
    pub fn of_tokens(tokens: &[u32], weights: [u32; 3]) -> Split {
        let mut h = mix64(tokens.len() as u64 ^ GOLDEN);
        for &t in tokens {
            h = mix64(h ^ (t as u64).wrapping_mul(GOLDEN));
        }
        let total: u64 = weights.iter().map(|w| *w as u64).sum();
        let r = h % total.max(1);
        if r < weights[0] as u64 {
            Split::Train
        } else if r < (weights[0] + weights[1]) as u64 {
            Split::Dev
        } else {
            Split::Test
        }
    }
}

impl std::str::FromStr for Split {
    type Err = String;
    fn from_str(s: &str) -> Result<Split, String> {
        match s.trim() {
            "train" => Ok(Split::Train),
            "dev" | "valid" | "validation" => Ok(Split::Dev),
            "test" => Ok(Split::Test),
            other => Err(format!("`{other}` is not a split; valid: train, dev, test")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequences_fall_into_splits_in_proportion() {
        let mut counts = [0usize; 3];
        for i in 0..30_000u32 {
            counts[Split::of_tokens(&[i, i / 7, 3], [80, 10, 10]).index()] += 1;
        }
        // Binomial sd of the 10 % share at 30 000: 0.0017; allow 5 of them.
        assert!(
            (counts[1] as f64 / 30_000.0 - 0.1).abs() < 0.009,
            "{counts:?}"
        );
        assert!(
            (counts[2] as f64 / 30_000.0 - 0.1).abs() < 0.009,
            "{counts:?}"
        );
        assert_eq!(Split::of_tokens(&[1, 2], [1, 0, 0]), Split::Train);
        assert_eq!("valid".parse::<Split>(), Ok(Split::Dev));
        assert!("eval".parse::<Split>().is_err());
    }
}
