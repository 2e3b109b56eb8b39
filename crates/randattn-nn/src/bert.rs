//! A compact BERT-family encoder on candle-nn whose self-attention is any randattn method.
//! Loads Hugging Face BERT safetensors by their standard tensor names.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{Embedding, LayerNorm, LayerNormConfig, Linear, VarBuilder, embedding, linear};
use randattn::Method;
use serde::Deserialize;

use crate::attention::{AttentionTrace, MultiHeadSelfAttention};

/// The fields of a Hugging Face BERT `config.json` this encoder uses.
#[derive(Debug, Clone, Deserialize)]
pub struct BertConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Hidden size (d_model).
    pub hidden_size: usize,
    /// Number of encoder layers.
    pub num_hidden_layers: usize,
    /// Attention heads per layer.
    pub num_attention_heads: usize,
    /// Feed-forward width.
    pub intermediate_size: usize,
    /// Longest input.
    pub max_position_embeddings: usize,
    /// Segment vocabulary.
    pub type_vocab_size: usize,
    /// LayerNorm epsilon.
    pub layer_norm_eps: f64,
    /// Activation; only `gelu` (the erf form) is supported.
    pub hidden_act: String,
}

struct Embeddings {
    word: Embedding,
    position: Embedding,
    token_type: Embedding,
    norm: LayerNorm,
}

struct Layer {
    attention: MultiHeadSelfAttention,
    attention_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
    output_norm: LayerNorm,
}

/// The encoder. `forward` returns the last hidden states.
pub struct BertModel {
    embeddings: Embeddings,
    layers: Vec<Layer>,
    /// Its configuration.
    pub config: BertConfig,
}

/// Every layer's attention trace (output before the output projection, MCA's FLOP fraction).
pub type LayerTraces = Vec<AttentionTrace>;

fn layer_norm(size: usize, eps: f64, vb: VarBuilder) -> Result<LayerNorm> {
    candle_nn::layer_norm(
        size,
        LayerNormConfig {
            eps,
            ..Default::default()
        },
        vb,
    )
}

/// The seed of layer `l`: each layer draws independently.
pub fn layer_seed(seed: u64, l: usize) -> u64 {
    let mut z = seed ^ ((l as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl BertModel {
    /// Loads the encoder from `vb` (tensor names `embeddings.*`, `encoder.layer.{i}.*`) with
    /// `method` as every layer's attention.
    pub fn load(vb: VarBuilder, config: BertConfig, method: Method) -> Result<Self> {
        if config.hidden_act != "gelu" {
            candle_core::bail!(
                "activation `{}` is not supported (only gelu)",
                config.hidden_act
            );
        }
        let h = config.hidden_size;
        let eps = config.layer_norm_eps;
        let e = vb.pp("embeddings");
        let embeddings = Embeddings {
            word: embedding(config.vocab_size, h, e.pp("word_embeddings"))?,
            position: embedding(
                config.max_position_embeddings,
                h,
                e.pp("position_embeddings"),
            )?,
            token_type: embedding(config.type_vocab_size, h, e.pp("token_type_embeddings"))?,
            norm: layer_norm(h, eps, e.pp("LayerNorm"))?,
        };
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let l = vb.pp(format!("encoder.layer.{i}"));
            let a = l.pp("attention");
            layers.push(Layer {
                attention: MultiHeadSelfAttention::load(
                    a.pp("self"),
                    a.pp("output"),
                    h,
                    config.num_attention_heads,
                    method.clone(),
                )?,
                attention_norm: layer_norm(h, eps, a.pp("output").pp("LayerNorm"))?,
                intermediate: linear(
                    h,
                    config.intermediate_size,
                    l.pp("intermediate").pp("dense"),
                )?,
                output: linear(config.intermediate_size, h, l.pp("output").pp("dense"))?,
                output_norm: layer_norm(h, eps, l.pp("output").pp("LayerNorm"))?,
            });
        }
        Ok(BertModel {
            embeddings,
            layers,
            config,
        })
    }

    /// Sets the attention method of every layer.
    pub fn set_method(&mut self, method: &Method) {
        for l in &mut self.layers {
            l.attention.method = method.clone();
        }
    }

    /// Last hidden states `[batch, n, hidden]` of `input_ids` (`[batch, n]`, u32) with an
    /// optional padding mask (`[batch, n]`, `true` = token), plus every layer's attention output.
    pub fn forward_traced(
        &self,
        input_ids: &Tensor,
        mask: Option<&[bool]>,
        seed: u64,
    ) -> Result<(Tensor, LayerTraces)> {
        let (b, n) = input_ids.dims2()?;
        if n > self.config.max_position_embeddings {
            candle_core::bail!(
                "input of {n} tokens is longer than the model's {} positions",
                self.config.max_position_embeddings
            );
        }
        let dev = input_ids.device();
        let positions = Tensor::arange(0u32, n as u32, dev)?
            .unsqueeze(0)?
            .repeat((b, 1))?;
        let types = Tensor::zeros((b, n), DType::U32, dev)?;
        let e = &self.embeddings;
        let mut x = e
            .word
            .forward(input_ids)?
            .broadcast_add(&e.position.forward(&positions)?)?
            .broadcast_add(&e.token_type.forward(&types)?)?;
        x = e.norm.forward(&x)?;
        let mut traces = Vec::with_capacity(self.layers.len());
        for (i, l) in self.layers.iter().enumerate() {
            let (a, trace) = l.attention.forward_traced(&x, mask, layer_seed(seed, i))?;
            traces.push(trace);
            let h = l.attention_norm.forward(&(a + &x)?)?;
            let f = l.output.forward(&l.intermediate.forward(&h)?.gelu_erf()?)?;
            x = l.output_norm.forward(&(f + &h)?)?;
        }
        Ok((x, traces))
    }

    /// [`Self::forward_traced`] without the traces.
    pub fn forward(&self, input_ids: &Tensor, mask: Option<&[bool]>, seed: u64) -> Result<Tensor> {
        Ok(self.forward_traced(input_ids, mask, seed)?.0)
    }

    /// The device of the weights.
    pub fn device(&self) -> Device {
        Device::Cpu
    }
}
