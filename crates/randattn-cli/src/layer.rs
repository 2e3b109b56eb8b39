//! A real attention layer from `.npy` files, the way `fixtures/minilm` stores them:
//! `PREFIX-q.npy`, `PREFIX-k.npy`, `PREFIX-v.npy` (`[batch, heads, n, d]`), and where present the
//! padding mask `PREFIX-mask.npy` (`[batch, n]`; self-attention, so it masks keys and queries:
//! padded rows output zero and the error is that of the real rows) and the layer input with its value
//! projection, `PREFIX-x.npy` (`[batch, n, d_model]`), `PREFIX-wv.npy` (`[d_model, heads·d_v]`)
//! and `PREFIX-bv.npy` (`[heads·d_v]`), which MCA needs.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use randattn::{AttentionInputs, Dims};
use randattn_cli::npy;

/// The value projection behind V: X, W_V, b_V and `d_model`.
struct Projection {
    x: Vec<f32>,
    wv: Vec<f32>,
    bv: Vec<f32>,
    d_model: usize,
}

/// Q, K, V of a real layer, with its mask and value projection where the files have them.
pub struct Layer {
    /// Where it came from (the prefix).
    pub source: String,
    /// `[batch, heads, n, d]` of Q.
    pub q_shape: [usize; 4],
    /// `[batch, heads, n, d_v]` of V.
    pub v_shape: [usize; 4],
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    mask: Option<Vec<bool>>,
    projection: Option<Projection>,
}

fn file(prefix: &Path, part: &str) -> PathBuf {
    let mut name = prefix.as_os_str().to_os_string();
    name.push(format!("-{part}.npy"));
    PathBuf::from(name)
}

fn shape4(s: &[usize]) -> [usize; 4] {
    [s[0], s[1], s[2], s[3]]
}

impl Layer {
    /// Reads the layer at `prefix` (e.g. `fixtures/minilm/layer5`).
    pub fn read(prefix: &Path) -> Result<Layer> {
        let (q, qs) = npy::read_f32(&file(prefix, "q"), 4, "q")?;
        let (k, ks) = npy::read_f32(&file(prefix, "k"), 4, "k")?;
        let (v, vs) = npy::read_f32(&file(prefix, "v"), 4, "v")?;
        if qs != ks || vs[..3] != ks[..3] {
            bail!(
                "{}: q {qs:?}, k {ks:?} and v {vs:?} must share batch, heads and n (self-attention), \
                 and q and k the head dimension",
                prefix.display()
            );
        }
        let mask_file = file(prefix, "mask");
        let mask = if mask_file.exists() {
            let (m, shape) = npy::read_mask(&mask_file, "mask")?;
            if shape != [qs[0], qs[2]] {
                bail!(
                    "{}: mask has shape {shape:?} but must be [batch, n] = [{}, {}]",
                    mask_file.display(),
                    qs[0],
                    qs[2]
                );
            }
            Some(m)
        } else {
            None
        };
        let projection = if file(prefix, "x").exists() && file(prefix, "wv").exists() {
            let (x, xs) = npy::read_f32(&file(prefix, "x"), 3, "x")?;
            let (wv, ws) = npy::read_f32(&file(prefix, "wv"), 2, "wv")?;
            let bv = if file(prefix, "bv").exists() {
                npy::read_f32(&file(prefix, "bv"), 1, "bv")?.0
            } else {
                vec![0.0; ws[1]]
            };
            Some(Projection {
                x,
                wv,
                bv,
                d_model: xs[2],
            })
        } else {
            None
        };
        Ok(Layer {
            source: prefix.display().to_string(),
            q_shape: shape4(&qs),
            v_shape: shape4(&vs),
            q,
            k,
            v,
            mask,
            projection,
        })
    }

    /// Its sizes.
    pub fn dims(&self) -> Dims {
        let [batch, heads, n, d] = self.q_shape;
        Dims {
            batch,
            heads,
            n_q: n,
            n_k: n,
            d,
            d_v: self.v_shape[3],
        }
    }

    /// Whether a key-padding mask came with it.
    pub fn masked(&self) -> bool {
        self.mask.is_some()
    }

    /// Whether X and W_V came with it (MCA can run).
    pub fn has_value_projection(&self) -> bool {
        self.projection.is_some()
    }

    /// The inputs, masked, with the value projection attached where there is one (all checked
    /// by the core: shapes, finiteness).
    pub fn inputs(&self) -> Result<AttentionInputs<'_>> {
        let mut x = AttentionInputs::new(
            &self.q,
            self.q_shape,
            &self.k,
            self.q_shape,
            &self.v,
            self.v_shape,
        )?;
        if let Some(p) = &self.projection {
            let [batch, heads, n, _] = self.q_shape;
            x = x.with_value_projection(
                &p.x,
                [batch, n, p.d_model],
                &p.wv,
                [p.d_model, heads * self.v_shape[3]],
                Some(&p.bv),
            )?;
        }
        // Self-attention: a padding token is neither a key nor a query.
        if let Some(m) = &self.mask {
            x = x.with_key_mask(m)?.with_query_mask(m)?;
        }
        Ok(x)
    }
}
