//! How much memory a call needs, before it is made: what the CLI's guards refuse requests by,
//! and what users plan batch sizes and sequence lengths with.
//!
//! Each method's estimate ([`crate::Method::memory`]) adds up, from its code, the
//! buffers it allocates beyond its inputs: the output, the state saved for the backward, the
//! gradients, the global work buffers and, for every thread of the pool at once, the largest
//! per-head (or per-task) working set; plus a fixed allowance per thread for the GEMM's packing
//! buffers and small vectors. `tests/memory.rs` checks every estimate against a counting
//! allocator at several shapes, budgets, masks and thread counts, each call the first in its
//! threads: never below the measured peak, and not more than twice it plus 4 MiB per thread,
//! except for MCA, whose estimate takes the worst case of its data-dependent sample budgets
//! (every token sampled to just below `d_model`) and is only checked to be above.
//!
//! ```
//! use randattn::{Dims, Method, Sizes};
//!
//! let dims = Dims { batch: 1, heads: 8, n_q: 4096, n_k: 4096, d: 64, d_v: 64 };
//! let m = Method::from_spec("linformer:k=256")?;
//! let mem = m.memory(&Sizes::new(dims, 2));
//! assert!(mem.forward_backward > mem.forward);
//! println!("{:.0} MiB for a training step", mem.forward_backward as f64 / 1048576.0);
//! # Ok::<(), randattn::Error>(())
//! ```

use crate::inputs::Dims;

/// Bytes a call needs beyond its inputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Memory {
    /// A forward: its output, its saved state and its peak scratch.
    pub forward: u128,
    /// A forward, then a backward while the forward's output and saved state are held (a
    /// training step's attention): the forward's output and state, the gradients and the
    /// backward's peak scratch. The output gradient is the caller's and not counted.
    pub forward_backward: u128,
}

/// The sizes of a call in values (f32 or index), the terms every estimate is written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sizes {
    /// Batch size.
    pub batch: u128,
    /// Heads.
    pub heads: u128,
    /// Queries per head.
    pub n_q: u128,
    /// Keys per head.
    pub n_k: u128,
    /// Query/key dimension.
    pub d: u128,
    /// Value dimension.
    pub d_v: u128,
    /// Threads of the pool the call runs in.
    pub threads: u128,
    /// Width of the layer input X behind V, for methods that sample the value projection
    /// (MCA); [`Sizes::new`] assumes `heads · d_v`, as in BERT-style layers.
    pub d_model: u128,
}

/// Values (f32 or u32) reserved per thread for the GEMM's packing buffers, which `gemm` sizes
/// from the caches (measured on first use: 1 MiB per thread on an AMD Zen 4 with 1 MiB of L2,
/// up to 1.55 MiB on an Intel Xeon with 2 MiB), and the small vectors every task allocates
/// (0.5 MiB): 2.25 MiB in all.
const THREAD_ALLOWANCE: u128 = 9 << 16;

impl Sizes {
    /// The sizes of a call on inputs of `dims` in a pool of `threads` threads.
    pub fn new(dims: Dims, threads: usize) -> Sizes {
        Sizes {
            batch: dims.batch as u128,
            heads: dims.heads as u128,
            n_q: dims.n_q as u128,
            n_k: dims.n_k as u128,
            d: dims.d as u128,
            d_v: dims.d_v as u128,
            threads: threads.max(1) as u128,
            d_model: (dims.heads * dims.d_v) as u128,
        }
    }

    /// Batch × heads.
    pub fn bh(&self) -> u128 {
        self.batch * self.heads
    }
    /// Values of Q.
    pub fn q(&self) -> u128 {
        self.bh() * self.n_q * self.d
    }
    /// Values of K.
    pub fn k(&self) -> u128 {
        self.bh() * self.n_k * self.d
    }
    /// Values of V.
    pub fn v(&self) -> u128 {
        self.bh() * self.n_k * self.d_v
    }
    /// Values of the output.
    pub fn o(&self) -> u128 {
        self.bh() * self.n_q * self.d_v
    }
    /// Values of the gradients of Q, K and V.
    pub fn grads(&self) -> u128 {
        self.q() + self.k() + self.v()
    }
    /// How many per-head working sets can be live at once: one per thread, at most one per
    /// head.
    pub fn parallel_heads(&self) -> u128 {
        self.threads.min(self.bh())
    }
    /// The same call with other query and key counts, dimensions (a method's inner exact
    /// attention over sampled or projected rows).
    pub fn with(&self, n_q: u128, n_k: u128, d: u128, d_v: u128) -> Sizes {
        Sizes {
            n_q,
            n_k,
            d,
            d_v,
            ..*self
        }
    }
}

impl Memory {
    /// An estimate from value counts (4 bytes each) of the forward and of the forward and
    /// backward, with the per-thread allowance added.
    pub fn from_values(s: &Sizes, forward: u128, forward_backward: u128) -> Memory {
        let allowance = s.threads * THREAD_ALLOWANCE;
        Memory {
            forward: 4 * (forward + allowance),
            forward_backward: 4 * (forward.max(forward_backward) + allowance),
        }
    }

    /// The estimate in values without the allowance (to build one method's on another's).
    pub fn values(&self, s: &Sizes) -> (u128, u128) {
        let allowance = s.threads * THREAD_ALLOWANCE;
        (
            self.forward / 4 - allowance,
            self.forward_backward / 4 - allowance,
        )
    }
}
