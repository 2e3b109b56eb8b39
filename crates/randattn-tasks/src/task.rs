//! What every task is: examples `(tokens, label)`, the splits, and the sizes a model needs.

use std::ops::Range;

use randattn::params::Params;
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::split::Split;

/// One classification example.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    /// Token ids, each below [`TaskInfo::vocab`]; never the pad token except where the task says
    /// so (pixel value 0 in images).
    pub tokens: Vec<u32>,
    /// The class, below [`TaskInfo::classes`].
    pub label: u32,
    /// A human-readable form where it helps to check the example (ListOps: the expression;
    /// Text: the document).
    pub text: Option<String>,
    /// Facts about the example as a JSON object, where they help to check it (Pathfinder: the
    /// marker centres `[[row, col], [row, col]]` and the target curves' lengths in dashes).
    pub meta: Option<String>,
}

/// The sizes of a task, as a model needs them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskInfo {
    /// Number of token ids (ids are `0..vocab`).
    pub vocab: usize,
    /// Number of classes.
    pub classes: usize,
    /// The longest sequence an example can have.
    pub max_len: usize,
    /// The token that pads sequences (and that attention masks out).
    pub pad: u32,
    /// Whether some real tokens equal `pad` (pixel value 0 in images, as LRA treats it), so
    /// that masking by `token != pad` also hides them.
    pub pad_in_data: bool,
}

/// A task: a config with declared parameters (see `randattn::method_params!`) that produces
/// the examples of each split.
pub trait Task: Params + Clone + std::fmt::Debug + Send + Sync {
    /// Name used on the command line.
    const NAME: &'static str;
    /// One-line description.
    const SUMMARY: &'static str;

    /// Rules between parameters (each parameter's own range is checked from its declaration).
    fn check(&self) -> Result<()> {
        Ok(())
    }

    /// Checks every parameter, then [`Task::check`].
    fn validate(&self) -> Result<()> {
        randattn::params::check(Self::NAME, self)?;
        self.check()
    }

    /// The sizes a model needs.
    fn info(&self) -> TaskInfo;

    /// The number of examples of each split `[train, dev, test]`: fixed for real data, the
    /// default set size for generated tasks (which can make any number).
    fn split_sizes(&self) -> Result<[usize; 3]>;

    /// Examples `range` of `split`. Example `i` depends only on `(seed, split, i)` and the
    /// parameters (loaders ignore the seed where the data fixes the example).
    fn examples(&self, seed: u64, split: Split, range: Range<usize>) -> Result<Vec<Example>> {
        self.examples_within(seed, split, range, MAX_CANDIDATES)
    }

    /// [`Task::examples`], giving up (with [`Error::NoExample`]) after `max_candidates`
    /// candidates for one example instead of [`MAX_CANDIDATES`]: a quick answer to "can these
    /// parameters produce examples at all?". The same examples as [`Task::examples`] wherever
    /// both succeed. Loaders draw no candidates and ignore it.
    fn examples_within(
        &self,
        seed: u64,
        split: Split,
        range: Range<usize>,
        max_candidates: usize,
    ) -> Result<Vec<Example>>;
}

/// Candidates drawn for one example before giving up: parameters that (almost) never produce
/// an example (an unreachable ListOps length window, say) are an error, not an endless loop.
pub const MAX_CANDIDATES: usize = 1_000_000;

/// Examples `range` of a generated task: example `i` is the first candidate drawn from the
/// stream `(seed, split, i, purpose)` that `candidate` accepts and whose token sequence belongs
/// to `split` (see [`Split::of_tokens`]), so no sequence can be in two splits. In parallel.
pub(crate) fn generate(
    task: &'static str,
    seed: u64,
    split: Split,
    range: Range<usize>,
    weights: [u32; 3],
    max_candidates: usize,
    candidate: impl Fn(&mut randattn::rng::StreamRng) -> Option<Example> + Sync,
) -> Result<Vec<Example>> {
    range
        .into_par_iter()
        .map(|i| {
            let mut rng = randattn::rng::stream(seed, split.index(), i, task);
            for _ in 0..max_candidates {
                if let Some(ex) = candidate(&mut rng)
                    && Split::of_tokens(&ex.tokens, weights) == split
                {
                    return Ok(ex);
                }
            }
            Err(Error::NoExample {
                task,
                split: split.name(),
                candidates: max_candidates,
            })
        })
        .collect()
}
