//! `MultiHeadSelfAttention`: Q/K/V/O projections around any randattn method.

use crate::linear::{Linear, linear};
use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;
use randattn::Method;

use crate::linformer::TrainableProjections;
use crate::op::{Masks, ValueLayer, attention, value_projection_attention};

/// Multi-head self-attention whose attention is a randattn [`Method`] (MCA included: it samples
/// the value projection from the layer input and this module's W_V).
#[derive(Debug, Clone)]
pub struct MultiHeadSelfAttention {
    query: Linear,
    key: Linear,
    value: Linear,
    output: Linear,
    heads: usize,
    head_dim: usize,
    /// The attention estimator (`exact` for the model's own softmax).
    pub method: Method,
    /// Linformer's `E`, `F` as variables of the model, when it trains them
    /// ([`Self::with_trainable_projections`]).
    projections: Option<TrainableProjections>,
}

/// What one attention call saw and produced, for fidelity reports.
#[derive(Debug, Clone)]
pub struct AttentionTrace {
    /// The attention output before the output projection, `[batch, heads, n, head_dim]`.
    pub heads_output: Tensor,
    /// MCA only: the mean over batch and heads of the FLOP fraction of the value projection on
    /// real tokens (mean r/d_model).
    pub flop_fraction: Option<f64>,
}

impl MultiHeadSelfAttention {
    /// Builds the projections from `vb` (`query`, `key`, `value`, each `hidden × hidden` with
    /// bias) and `out_vb` (`dense`) — Hugging Face BERT's names.
    pub fn load(
        vb: VarBuilder,
        out_vb: VarBuilder,
        hidden: usize,
        heads: usize,
        method: Method,
    ) -> Result<Self> {
        if heads == 0 || !hidden.is_multiple_of(heads) {
            candle_core::bail!("hidden size {hidden} is not a multiple of {heads} heads");
        }
        Ok(MultiHeadSelfAttention {
            query: linear(hidden, hidden, vb.pp("query"))?,
            key: linear(hidden, hidden, vb.pp("key"))?,
            value: linear(hidden, hidden, vb.pp("value"))?,
            output: linear(hidden, hidden, out_vb.pp("dense"))?,
            heads,
            head_dim: hidden / heads,
            method,
            projections: None,
        })
    }

    /// Makes Linformer's projections trainable variables under `vb` (`projection_e`,
    /// `projection_f`, `[heads, k, max_len]`; see [`crate::linformer`]) instead of the seeded
    /// configuration the method draws by itself. A model that trains Linformer needs this: with
    /// a new seed at every step, seeded projections change at every step. Errors for any other
    /// method.
    pub fn with_trainable_projections(mut self, vb: VarBuilder, max_len: usize) -> Result<Self> {
        self.projections = Some(TrainableProjections::new(
            vb,
            &self.method,
            self.heads,
            max_len,
        )?);
        Ok(self)
    }

    /// `[b, n, hidden]` → `[b, heads, n, head_dim]`.
    fn split(&self, t: &Tensor) -> Result<Tensor> {
        let (b, n, _) = t.dims3()?;
        t.reshape((b, n, self.heads, self.head_dim))?
            .transpose(1, 2)?
            .contiguous()
    }

    /// Attention over `x` (`[batch, n, hidden]`) with an optional padding mask (`[batch, n]`,
    /// `true` = token): the output before the output projection (and MCA's FLOP fraction).
    ///
    /// In self-attention a padding token is neither a key nor a query, so the mask is both: a
    /// padded row's output is zero, and the methods that build shared structures from the
    /// queries leave padding out of them (Nyström's landmarks, Informer's active queries,
    /// Skeinformer's pilot rows). With the key mask alone, padding diluted those structures:
    /// Nyström's error on the real rows of MiniLM layer 0 (300 tokens padded to 384) was 1.01
    /// instead of the 0.67 it has on the same tokens unpadded.
    pub fn attend(
        &self,
        x: &Tensor,
        mask: Option<&[bool]>,
        seed: u64,
    ) -> Result<(Tensor, Option<f64>)> {
        let masks = Masks {
            key: mask.map(<[bool]>::to_vec),
            query: mask.map(<[bool]>::to_vec),
        };
        let q = self.split(&self.query.forward(x)?)?;
        let k = self.split(&self.key.forward(x)?)?;
        if let Some(p) = &self.projections {
            let v = self.split(&self.value.forward(x)?)?;
            return Ok((p.attend(&q, &k, &v, mask)?, None));
        }
        if self.method.info().needs_value_projection {
            // V = X·W_V + b_V with W_V = weightᵀ (candle stores [out, in]).
            let wv = self.value.weight().t()?.contiguous()?;
            let bv = match self.value.bias() {
                Some(b) => b.clone(),
                None => Tensor::zeros(wv.dim(1)?, x.dtype(), x.device())?,
            };
            let layer = ValueLayer {
                x,
                wv: &wv,
                bv: &bv,
            };
            value_projection_attention(&q, &k, &layer, &self.method, seed, &masks)
        } else {
            let v = self.split(&self.value.forward(x)?)?;
            Ok((attention(&q, &k, &v, &self.method, seed, &masks)?, None))
        }
    }

    /// The full block: attention, heads merged, output projection. Returns the trace too.
    pub fn forward_traced(
        &self,
        x: &Tensor,
        mask: Option<&[bool]>,
        seed: u64,
    ) -> Result<(Tensor, AttentionTrace)> {
        let (b, n, _) = x.dims3()?;
        let (heads_output, flop_fraction) = self.attend(x, mask, seed)?;
        let merged = heads_output.transpose(1, 2)?.contiguous()?.reshape((
            b,
            n,
            self.heads * self.head_dim,
        ))?;
        Ok((
            self.output.forward(&merged)?,
            AttentionTrace {
                heads_output,
                flop_fraction,
            },
        ))
    }

    /// [`Self::forward_traced`] without the trace.
    pub fn forward(&self, x: &Tensor, mask: Option<&[bool]>, seed: u64) -> Result<Tensor> {
        Ok(self.forward_traced(x, mask, seed)?.0)
    }
}
