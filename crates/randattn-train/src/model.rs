//! The classifier every efficient-attention paper trains on the Long Range Arena (the PyTorch
//! model of mlpen/Nystromformer's `LRA/`, used by YOSO, Skyformer and Skeinformer; brief
//! `shared/papers/lra-glue-data.md` §1.3), with any randattn method as its attention:
//!
//! token embedding + learned position embedding (both `N(0, 0.02)`), dropout; `layers` pre-LN
//! blocks (LayerNorm → attention → dropout → residual; LayerNorm → Linear → GELU → dropout →
//! Linear → dropout → residual); final LayerNorm, zeroed at padding; pooled — the mean over all
//! positions as the reference does (padding included after zeroing), or the last token (what
//! associative recall needs); then Linear → ReLU → Linear to the classes.
//!
//! Linformer's projections `E`, `F` are variables of the model (`randattn_nn::linformer`), as in
//! its paper and the Nyströmformer LRA code: with the per-step attention seed below, seeded
//! projections would be redrawn at every step and never learned.
//!
//! Every weight is drawn from the run's seed (candle's own initialiser cannot be seeded): the
//! embeddings from `N(0, 0.02)`, Linear weights and biases from `U(±1/√fan_in)` as PyTorch
//! initialises them, Linformer's projections from `N(0, 1/k)`, LayerNorm to 1 and 0. Dropout masks come from the seed, the step and the
//! place in the model. The reference's attention-probability dropout has no counterpart for an
//! estimator that never forms the probabilities, and is left out.

use crate::layer_norm::{LayerNorm, layer_norm};
use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{VarBuilder, VarMap};
use rand::Rng;
use rand_distr::StandardNormal;
use randattn::Method;
use randattn::rng::{GOLDEN, mix64, stream};
use randattn_nn::MultiHeadSelfAttention;
use randattn_nn::linear::{Linear, linear};
use rayon::prelude::*;

randattn::choice! {
    /// How the sequence is summarised for the classifier.
    pub enum Pooling {
        /// The mean over all positions, padding zeroed (the reference's).
        Mean = "mean",
        /// The last real token (associative recall asks its question there).
        Last = "last",
    }
}

/// The model's sizes.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// Number of token ids.
    pub vocab: usize,
    /// Longest sequence (size of the position table).
    pub max_len: usize,
    /// Number of classes.
    pub classes: usize,
    /// Number of blocks.
    pub layers: usize,
    /// Width of the residual stream.
    pub width: usize,
    /// Attention heads (width / heads per head).
    pub heads: usize,
    /// Hidden size of the feed-forward layers.
    pub ffn: usize,
    /// Hidden size of the classifier.
    pub classifier_hidden: usize,
    /// Pooling.
    pub pooling: Pooling,
    /// Dropout probability.
    pub dropout: f32,
}

impl ModelConfig {
    /// The reference's sizes (2 layers, width 64, 2 heads of 32, FFN 128, classifier 128,
    /// dropout 0.1, mean pooling) for a task with these token and class counts.
    pub fn lra(vocab: usize, max_len: usize, classes: usize) -> ModelConfig {
        ModelConfig {
            vocab,
            max_len,
            classes,
            layers: 2,
            width: 64,
            heads: 2,
            ffn: 128,
            classifier_hidden: 128,
            pooling: Pooling::Mean,
            dropout: 0.1,
        }
    }
}

struct Block {
    ln1: LayerNorm,
    attention: MultiHeadSelfAttention,
    ln2: LayerNorm,
    ff1: Linear,
    ff2: Linear,
}

/// The LRA classifier. Its weights live in [`LraModel::varmap`].
pub struct LraModel {
    config: ModelConfig,
    embedding: Tensor,
    positions: Tensor,
    blocks: Vec<Block>,
    final_ln: LayerNorm,
    cls1: Linear,
    cls2: Linear,
    /// Every trainable variable, by name.
    pub varmap: VarMap,
}

/// A batch: token ids `[batch, n]` (padded with the pad token) and the attention mask
/// (`true` = a token attention may look at).
pub struct Batch {
    /// `[batch, n]` u32 ids.
    pub tokens: Tensor,
    /// `[batch · n]`, row-major.
    pub mask: Vec<bool>,
    /// Real length of each sequence.
    pub lengths: Vec<usize>,
}

impl LraModel {
    /// Builds the model with `attention` in every block, weights drawn from `seed`.
    pub fn new(config: ModelConfig, attention: &Method, seed: u64) -> Result<LraModel> {
        if config.width == 0 || config.heads == 0 || !config.width.is_multiple_of(config.heads) {
            candle_core::bail!(
                "width {} must be a positive multiple of heads {}",
                config.width,
                config.heads
            );
        }
        let dev = Device::Cpu;
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
        let w = config.width;
        let embedding = vb.get((config.vocab, w), "embedding")?;
        let positions = vb.get((config.max_len, w), "positions")?;
        let mut blocks = Vec::with_capacity(config.layers);
        for l in 0..config.layers {
            let b = vb.pp(format!("block{l}"));
            let mut mhsa = MultiHeadSelfAttention::load(
                b.pp("attention"),
                b.pp("attention_output"),
                w,
                config.heads,
                attention.clone(),
            )?;
            if matches!(attention, Method::Linformer(_)) {
                mhsa = mhsa.with_trainable_projections(b.pp("attention"), config.max_len)?;
            }
            blocks.push(Block {
                ln1: layer_norm(w, 1e-5, b.pp("ln1"))?,
                attention: mhsa,
                ln2: layer_norm(w, 1e-5, b.pp("ln2"))?,
                ff1: linear(w, config.ffn, b.pp("ff1"))?,
                ff2: linear(config.ffn, w, b.pp("ff2"))?,
            });
        }
        let final_ln = layer_norm(w, 1e-5, vb.pp("final_ln"))?;
        let cls1 = linear(w, config.classifier_hidden, vb.pp("cls1"))?;
        let cls2 = linear(config.classifier_hidden, config.classes, vb.pp("cls2"))?;
        let model = LraModel {
            config,
            embedding,
            positions,
            blocks,
            final_ln,
            cls1,
            cls2,
            varmap,
        };
        model.initialise(seed)?;
        Ok(model)
    }

    /// The model's sizes.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Every trainable variable with its name, sorted by name (a stable order: `VarMap`'s own
    /// order changes from process to process).
    pub fn named_vars(&self) -> Vec<(String, candle_core::Var)> {
        let data = self.varmap.data().lock().expect("varmap lock");
        let mut vars: Vec<(String, candle_core::Var)> =
            data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        vars
    }

    /// Number of trainable values.
    pub fn parameter_count(&self) -> usize {
        self.varmap.all_vars().iter().map(|v| v.elem_count()).sum()
    }

    /// Draws every weight from `seed` (see the module documentation), in name order.
    fn initialise(&self, seed: u64) -> Result<()> {
        let data = self.varmap.data().lock().expect("varmap lock");
        let mut names: Vec<&String> = data.keys().collect();
        names.sort();
        let fan_in = |name: &str| -> usize {
            // Linear weights are [out, in]; a bias shares its weight's fan-in.
            let weight = name.replace(".bias", ".weight");
            data.get(&weight)
                .map_or(1, |v| v.dims().get(1).copied().unwrap_or(1))
        };
        for (i, name) in names.iter().enumerate() {
            let var = &data[*name];
            let n = var.elem_count();
            let mut rng = stream(seed, 0, i, "train/init");
            let values: Vec<f32> = if name.as_str() == "embedding" || name.as_str() == "positions" {
                (0..n)
                    .map(|_| 0.02 * rng.sample::<f32, _>(StandardNormal))
                    .collect()
            } else if name.ends_with("projection_e") || name.ends_with("projection_f") {
                // Linformer's [heads, k, max_len]: N(0, 1/k), the scale of its seeded sketch.
                let k = var.dims().get(1).copied().unwrap_or(1);
                let std = 1.0 / (k as f32).sqrt();
                (0..n)
                    .map(|_| std * rng.sample::<f32, _>(StandardNormal))
                    .collect()
            } else if name.contains("ln") {
                vec![if name.ends_with("weight") { 1.0 } else { 0.0 }; n]
            } else {
                let bound = 1.0 / (fan_in(name) as f32).sqrt();
                (0..n).map(|_| rng.random_range(-bound..bound)).collect()
            };
            var.set(&Tensor::from_vec(values, var.shape(), &Device::Cpu)?)?;
        }
        Ok(())
    }

    /// Inverted dropout with a mask drawn from `(seed, step, place)`; the identity when not
    /// training.
    fn dropout(&self, x: &Tensor, train: Option<(u64, u64)>, place: usize) -> Result<Tensor> {
        let p = self.config.dropout;
        let Some((seed, step)) = train.filter(|_| p > 0.0) else {
            return Ok(x.clone());
        };
        // Counter-based and in parallel: element i keeps when the 32-bit half of
        // mix64(key + (i/2 + 1)·GOLDEN) it owns is at or above p·2³², so the mask depends on
        // (seed, step, place) only, not on the thread count.
        let key = stream(seed, step as usize, place, "train/dropout").random::<u64>();
        let threshold = (p as f64 * 4294967296.0) as u64;
        let scale = 1.0 / (1.0 - p);
        let mut mask = vec![0.0f32; x.elem_count()];
        mask.par_chunks_mut(1 << 14)
            .enumerate()
            .for_each(|(c, chunk)| {
                let first = (c << 14) / 2;
                for (j, pair) in chunk.chunks_mut(2).enumerate() {
                    let r = mix64(key.wrapping_add(((first + j + 1) as u64).wrapping_mul(GOLDEN)));
                    for (k, m) in pair.iter_mut().enumerate() {
                        let u = (r >> (32 * k)) & 0xFFFF_FFFF;
                        *m = if u < threshold { 0.0 } else { scale };
                    }
                }
            });
        x * Tensor::from_vec(mask, x.shape(), x.device())?
    }

    /// Class logits `[batch, classes]`. `train = Some((seed, step))` turns dropout on and keys
    /// every random draw (dropout masks, the attention's samples) to the run's seed and the step;
    /// `None` evaluates (attention samples keyed to `eval_seed`).
    pub fn forward(
        &self,
        batch: &Batch,
        train: Option<(u64, u64)>,
        eval_seed: u64,
    ) -> Result<Tensor> {
        let (b, n) = batch.tokens.dims2()?;
        if n > self.config.max_len {
            candle_core::bail!(
                "sequence of {n} tokens, longer than the model's {}",
                self.config.max_len
            );
        }
        let ids = batch.tokens.flatten_all()?;
        let x = self
            .embedding
            .index_select(&ids, 0)?
            .reshape((b, n, self.config.width))?;
        let x = x.broadcast_add(&self.positions.narrow(0, 0, n)?)?;
        let mut x = self.dropout(&x, train, 0)?;
        let attention_seed = |layer: usize| match train {
            Some((seed, step)) => seed
                .wrapping_mul(0x9E37_79B9)
                .wrapping_add(step.wrapping_mul(1_000_003))
                .wrapping_add(layer as u64),
            None => eval_seed.wrapping_add(layer as u64),
        };
        for (l, block) in self.blocks.iter().enumerate() {
            let h = block.ln1.forward(&x)?;
            let a = block
                .attention
                .forward(&h, Some(&batch.mask), attention_seed(l))?;
            x = (x + self.dropout(&a, train, 1 + 3 * l)?)?;
            let h = block.ln2.forward(&x)?;
            let f = crate::gelu::gelu(&block.ff1.forward(&h)?)?;
            let f = block.ff2.forward(&self.dropout(&f, train, 2 + 3 * l)?)?;
            x = (x + self.dropout(&f, train, 3 + 3 * l)?)?;
        }
        let keep: Vec<f32> = batch.mask.iter().map(|m| f32::from(u8::from(*m))).collect();
        let keep = Tensor::from_vec(keep, (b, n, 1), x.device())?;
        let x = self.final_ln.forward(&x)?.broadcast_mul(&keep)?;
        let pooled = match self.config.pooling {
            Pooling::Mean => (x.sum(1)? / n as f64)?,
            Pooling::Last => {
                let rows: Vec<Tensor> = batch
                    .lengths
                    .iter()
                    .enumerate()
                    .map(|(i, len)| x.get(i)?.get(len.saturating_sub(1)))
                    .collect::<Result<_>>()?;
                Tensor::stack(&rows, 0)?
            }
        };
        self.cls2.forward(&self.cls1.forward(&pooled)?.relu()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mask_of(model: &LraModel, threads: usize, place: usize) -> Vec<f32> {
        let ones = Tensor::ones((7, 5003), DType::F32, &Device::Cpu).unwrap();
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
            .install(|| model.dropout(&ones, Some((11, 3)), place))
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    #[test]
    fn dropout_masks_depend_on_seed_step_and_place_only() {
        let config = ModelConfig {
            dropout: 0.1,
            ..ModelConfig::lra(10, 16, 2)
        };
        let model = LraModel::new(config, &Method::from_spec("exact").unwrap(), 1).unwrap();
        let one = mask_of(&model, 1, 0);
        assert_eq!(one, mask_of(&model, 2, 0), "thread count changed the mask");
        assert_eq!(one, mask_of(&model, 4, 0), "thread count changed the mask");
        assert_ne!(one, mask_of(&model, 1, 1), "two places share a mask");
        // Kept entries carry 1/(1-p); the dropped count is Binomial(N, p): within 5 sd.
        let n = one.len() as f64;
        let dropped = one.iter().filter(|&&m| m == 0.0).count() as f64;
        assert!(
            one.iter()
                .all(|&m| m == 0.0 || (m - 1.0 / 0.9).abs() < 1e-6)
        );
        let sd = (n * 0.1 * 0.9).sqrt();
        assert!(
            (dropped - 0.1 * n).abs() < 5.0 * sd,
            "dropped {dropped} of {n}"
        );
    }
}
