//! Shared by the training tests.

use randattn_tasks::TaskSpec;

/// Recall with 4 pairs of 8 keys and 4 values: 9 tokens, chance 0.25; guessing a most frequent
/// value of the sequence scores 0.531.
pub fn tiny_recall() -> TaskSpec {
    TaskSpec::parse("recall", &[("pairs", "4"), ("keys", "8"), ("values", "4")]).unwrap()
}
