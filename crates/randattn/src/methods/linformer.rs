//! Linformer: attention over keys and values projected along the sequence axis.
//!
//! Wang, Li, Khabsa, Fang, Ma, *Linformer: Self-Attention with Linear Complexity*, 2020; a
//! baseline of Skeinformer (NAACL 2022), which reads it as a Johnson–Lindenstrauss sketch.
//! Brief: `shared/papers/skeinformer.md` §3.1.
//!
//! # The estimator
//!
//! With `E, F ∈ ℝ^{k×n_k}` per head (projections along the sequence),
//!
//! ```text
//! O = softmax(s · Q (E (K ⊙ M))ᵀ) · F (V ⊙ M)
//! ```
//!
//! where `M` zeroes the masked key and value rows before the projection (as the reference does).
//! Cost `O(n·k·(d + d_v))` time and `O(n·d + k·n)` memory (the projections themselves); the
//! attention over the `k` projected rows runs through the blocked exact kernel.
//!
//! `E` and `F` are learnable parameters of a model: give them in
//! [`Linformer::projections`] (`[heads, k, n_k]` each), or leave them `None` for seeded
//! `N(0, 1/k)` entries (head `h` from `rng::stream(seed, 0, h, "linformer/e")` and
//! `".../f"`, shared by the batch). Drawing them is `2·heads·k·n_k` Gaussian samples — more work
//! than the attention itself at `k = 256` — so the seeded ones are cached per
//! `(seed, heads, k, n_k)` inside the config, as a model would hold its parameters; results do not
//! depend on the cache. With given projections the backward returns `∂L/∂E` and `∂L/∂F` as the
//! parameter gradients `e` and `f`; seeded ones are fixed draws and get none (their gradients
//! are `heads·k·n_k` floats each: 1 GiB together at n = 65536, B·H = 8, k = 256).
//!
//! With `k = n_k` and `E = F = I` this is exact attention (without masks: masked rows project to
//! zero vectors, which still take part in the softmax, as in the reference).

use std::borrow::Cow;
use std::sync::{Arc, Mutex};

use rand::Rng;
use rand_distr::StandardNormal;
use rayon::prelude::*;

use super::exact::{ExactSaved, exact_memory};
use crate::error::{Error, Result};
use crate::estimator::{Estimator, Grads, MethodInfo, ParamGrad, TensorParam};
use crate::inputs::check_finite;
use crate::inputs::{AttentionInputs, Dims};
use crate::matrix::{MatMut, MatRef, matmul};
use crate::memory::{Memory, Sizes};
use crate::methods::exact::Exact;
use crate::params::{Auto, in_range, scale_rule};
use crate::rng::stream;

/// Largest projected length accepted.
pub const MAX_K: usize = 1 << 16;

/// The key and value projections `E`, `F`, each `[heads, k, n_k]` row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Projections {
    /// Key projection `E`.
    pub e: Vec<f32>,
    /// Value projection `F`.
    pub f: Vec<f32>,
}

/// Seeded projections drawn for one `(seed, heads, k, n_k)`.
#[derive(Debug, Default)]
struct Cache {
    key: Option<(u64, usize, usize, usize)>,
    projections: Option<Arc<Projections>>,
}

crate::method_params! {
    /// Linformer `linformer`. See the module documentation.
    #[derive(Debug, Clone)]
    pub struct Linformer {
        /// projected length (rows of E and F)
        pub k: usize = 256, in_range(1, MAX_K as u64);
        /// softmax temperature s in softmax(s * Q K^T)
        pub scale: Auto<f32> = Auto::Auto, scale_rule();
    }
    extra {
        /// Given projections; `None` = seeded `N(0, 1/k)`.
        pub projections: Option<Projections> = None;
        cache: Arc<Mutex<Cache>> = Arc::default();
    }
}

impl PartialEq for Linformer {
    fn eq(&self, other: &Self) -> bool {
        // The cache is not part of the configuration.
        self.k == other.k && self.projections == other.projections && self.scale == other.scale
    }
}

/// What the backward needs: the projections used (shared, not copied, when seeded).
#[derive(Debug, Clone)]
pub struct LinformerSaved {
    projections: Arc<Projections>,
    /// `K' = E (K ⊙ M)` and `V' = F (V ⊙ M)` (`[batch, heads, k, d]`, `[…, d_v]`) and the inner
    /// exact attention's saved state, so the backward does not recompute them.
    kp: Vec<f32>,
    vp: Vec<f32>,
    inner: ExactSaved,
}

/// Seeded `N(0, 1/k)` projections for `heads` heads of `k × n_k`.
pub fn seeded_projections(heads: usize, k: usize, n_k: usize, seed: u64) -> Projections {
    let std = 1.0 / (k as f32).sqrt();
    let draw = |label: &'static str| -> Vec<f32> {
        let mut out = vec![0.0f32; heads * k * n_k];
        out.par_chunks_mut(k * n_k).enumerate().for_each(|(h, m)| {
            let mut rng = stream(seed, 0, h, label);
            for x in m.iter_mut() {
                *x = std * rng.sample::<f32, _>(StandardNormal);
            }
        });
        out
    };
    let (e, f) = rayon::join(|| draw("linformer/e"), || draw("linformer/f"));
    Projections { e, f }
}

impl Linformer {
    /// Projected length `k`, seeded projections, default scale.
    pub fn new(k: usize) -> Self {
        Linformer {
            k,
            ..Linformer::default()
        }
    }

    /// The same method with given projections (`[heads, k, n_k]` each).
    pub fn with_projections(mut self, projections: Projections) -> Self {
        self.projections = Some(projections);
        self
    }

    fn exact(&self) -> Exact {
        Exact { scale: self.scale }
    }

    /// The projections for these sizes: the given ones (checked) or the seeded ones (cached).
    fn projections_for(&self, dims: Dims, seed: u64) -> Result<Arc<Projections>> {
        let want = dims.heads * self.k * dims.n_k;
        if let Some(p) = &self.projections {
            if p.e.len() != want {
                return Err(Error::shape(
                    "projections",
                    format!(
                        "have {} elements each but [heads, k, n_k] = [{}, {}, {}] needs {want}",
                        p.e.len(),
                        dims.heads,
                        self.k,
                        dims.n_k
                    ),
                ));
            }
            return Ok(Arc::new(p.clone()));
        }
        let key = (seed, dims.heads, self.k, dims.n_k);
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.key != Some(key) {
            cache.projections = Some(Arc::new(seeded_projections(
                dims.heads, self.k, dims.n_k, seed,
            )));
            cache.key = Some(key);
        }
        Ok(cache.projections.clone().expect("just filled"))
    }

    /// `E (K ⊙ M)` and `F (V ⊙ M)` for every head: `[batch, heads, k, d]` and `[…, d_v]`.
    fn project(&self, x: &AttentionInputs<'_>, p: &Projections) -> (Vec<f32>, Vec<f32>) {
        let Dims {
            heads, n_k, d, d_v, ..
        } = x.dims();
        let k = self.k;
        let bhs = x.dims().batch_heads();
        let mut kp = vec![0.0f32; bhs * k * d];
        let mut vp = vec![0.0f32; bhs * k * d_v];
        kp.par_chunks_mut(k * d)
            .zip(vp.par_chunks_mut(k * d_v))
            .enumerate()
            .for_each(|(bh, (kp, vp))| {
                let h = bh % heads;
                let keep = x.key_mask_row(bh / heads);
                let e = &p.e[h * k * n_k..(h + 1) * k * n_k];
                let f = &p.f[h * k * n_k..(h + 1) * k * n_k];
                let (km, vm) = masked(x.k_head(bh), x.v_head(bh), keep, d, d_v);
                matmul(
                    MatMut::new(kp, k, d),
                    false,
                    MatRef::new(e, k, n_k),
                    MatRef::new(&km, n_k, d),
                    1.0,
                );
                matmul(
                    MatMut::new(vp, k, d_v),
                    false,
                    MatRef::new(f, k, n_k),
                    MatRef::new(&vm, n_k, d_v),
                    1.0,
                );
            });
        (kp, vp)
    }
}

/// K and V of one head with masked rows zeroed (copied only when some row is masked).
fn masked<'a>(
    k: &'a [f32],
    v: &'a [f32],
    keep: Option<&[bool]>,
    d: usize,
    d_v: usize,
) -> (Cow<'a, [f32]>, Cow<'a, [f32]>) {
    match keep {
        Some(keep) if keep.iter().any(|k| !k) => {
            let (mut km, mut vm) = (k.to_vec(), v.to_vec());
            for (j, kept) in keep.iter().enumerate() {
                if !kept {
                    km[j * d..(j + 1) * d].fill(0.0);
                    vm[j * d_v..(j + 1) * d_v].fill(0.0);
                }
            }
            (Cow::Owned(km), Cow::Owned(vm))
        }
        _ => (Cow::Borrowed(k), Cow::Borrowed(v)),
    }
}

impl Estimator for Linformer {
    const INFO: MethodInfo = MethodInfo {
        budget: Some("k"),
        random: true,
        tensor_params: &[
            TensorParam {
                name: "e",
                shape: "[heads, k, n_k]",
                rank: 3,
            },
            TensorParam {
                name: "f",
                shape: "[heads, k, n_k]",
                rank: 3,
            },
        ],
        ..MethodInfo::new(
            "linformer",
            "Linformer: keys and values projected along the sequence to k rows",
            "O(n k (d + d_v)) time, O(n d + k n) memory",
        )
    };
    type Saved = LinformerSaved;

    fn memory(&self, s: &Sizes) -> Memory {
        let k = self.projections.as_ref().map_or(self.k, |p| {
            p.e.len() / (s.heads.max(1) as usize * s.n_k.max(1) as usize)
        }) as u128;
        let projections = 2 * s.heads * k * s.n_k;
        let projected = s.bh() * k * (s.d + s.d_v);
        let masked = s.threads * s.n_k * (s.d + s.d_v);
        let (inner_f, inner_fb) = exact_memory(&s.with(s.n_q, k, s.d, s.d_v)).values(s);
        let forward = projections + projected + masked + inner_f;
        // Backward: K' and V' again, the inner exact forward and backward, dK, dV and the
        // per-(batch, head) parts of dE and dF (summed over the batch when it is above 1).
        // Only given projections get gradients (seeded ones are fixed draws).
        let parts = if self.projections.is_some() {
            2 * s.bh() * k * s.n_k + if s.batch > 1 { projections } else { 0 }
        } else {
            0
        };
        let backward = projected + masked + inner_fb + s.k() + s.v() + parts;
        Memory::from_values(s, forward, projections + s.o() + backward)
    }

    fn saved_bytes(saved: &LinformerSaved) -> usize {
        4 * (saved.kp.len() + saved.vp.len()) + Exact::saved_bytes(&saved.inner)
    }

    fn check(&self) -> Result<()> {
        if let Some(p) = &self.projections {
            if p.e.is_empty() || p.f.is_empty() || p.e.len() != p.f.len() {
                return Err(Error::shape(
                    "projections",
                    format!(
                        "E has {} values and F has {}: give both, each [heads, k, n_k]",
                        p.e.len(),
                        p.f.len()
                    ),
                ));
            }
            check_finite("projections", &p.e)?;
            check_finite("projections", &p.f)?;
        }
        Ok(())
    }

    fn store_tensor(&mut self, name: &str, data: Vec<f32>, shape: &[usize]) -> Result<()> {
        let mut p = self.projections.take().unwrap_or(Projections {
            e: Vec::new(),
            f: Vec::new(),
        });
        if name == "e" {
            p.e = data;
        } else {
            p.f = data;
        }
        self.k = shape[1];
        self.projections = Some(p);
        Ok(())
    }

    fn forward_saved(
        &self,
        x: &AttentionInputs<'_>,
        seed: u64,
    ) -> Result<(Vec<f32>, LinformerSaved)> {
        let dims = x.dims();
        let p = self.projections_for(dims, seed)?;
        let (kp, vp) = self.project(x, &p);
        let mut sub = AttentionInputs::new(
            x.q(),
            dims.q_shape(),
            &kp,
            [dims.batch, dims.heads, self.k, dims.d],
            &vp,
            [dims.batch, dims.heads, self.k, dims.d_v],
        )?;
        if let Some(m) = x.query_mask() {
            sub = sub.with_query_mask(m)?;
        }
        let (output, inner) = self.exact().forward_saved(&sub, seed)?;
        Ok((
            output,
            LinformerSaved {
                projections: p,
                kp,
                vp,
                inner,
            },
        ))
    }

    fn backward_saved(
        &self,
        x: &AttentionInputs<'_>,
        seed: u64,
        s: &LinformerSaved,
        grad_output: &[f32],
    ) -> Result<Grads> {
        let dims = x.dims();
        let Dims {
            heads, n_k, d, d_v, ..
        } = dims;
        let k = self.k;
        let p = &s.projections;
        if p.e.len() != heads * k * n_k {
            return Err(Error::Saved {
                message: format!("holds projections for another k than k={k}"),
            });
        }
        let mut sub = AttentionInputs::new(
            x.q(),
            dims.q_shape(),
            &s.kp,
            [dims.batch, heads, k, d],
            &s.vp,
            [dims.batch, heads, k, d_v],
        )?;
        if let Some(m) = x.query_mask() {
            sub = sub.with_query_mask(m)?;
        }
        let sub_grads = self
            .exact()
            .backward_saved(&sub, seed, &s.inner, grad_output)?;
        // K' = E (K ⊙ M): dK = M ⊙ Eᵀ dK', dE += dK' (K ⊙ M)ᵀ (summed over the batch).
        let bhs = dims.batch_heads();
        let mut dk = crate::linalg::par_zeroed(x.k().len());
        let mut dv = crate::linalg::par_zeroed(x.v().len());
        // Given projections are parameters and get gradients; seeded ones are fixed draws (a
        // model that learns them passes them in), so their n_k-wide gradients are not computed.
        let learn = self.projections.is_some();
        let part_len = if learn { bhs * k * n_k } else { 0 };
        let (mut de_parts, mut df_parts) = (vec![0.0f32; part_len], vec![0.0f32; part_len]);
        let parts: Vec<Option<(&mut [f32], &mut [f32])>> = if learn {
            de_parts
                .chunks_mut(k * n_k)
                .zip(df_parts.chunks_mut(k * n_k))
                .map(Some)
                .collect()
        } else {
            (0..bhs).map(|_| None).collect()
        };
        dk.par_chunks_mut(n_k * d)
            .zip(dv.par_chunks_mut(n_k * d_v))
            .zip(parts.into_par_iter())
            .enumerate()
            .for_each(|(bh, ((dk, dv), parts))| {
                let h = bh % heads;
                let keep = x.key_mask_row(bh / heads);
                let e = &p.e[h * k * n_k..(h + 1) * k * n_k];
                let f = &p.f[h * k * n_k..(h + 1) * k * n_k];
                let dkp = &sub_grads.dk[bh * k * d..(bh + 1) * k * d];
                let dvp = &sub_grads.dv[bh * k * d_v..(bh + 1) * k * d_v];
                let (km, vm) = masked(x.k_head(bh), x.v_head(bh), keep, d, d_v);
                matmul(
                    MatMut::new(dk, n_k, d),
                    false,
                    MatRef::new(e, k, n_k).t(),
                    MatRef::new(dkp, k, d),
                    1.0,
                );
                matmul(
                    MatMut::new(dv, n_k, d_v),
                    false,
                    MatRef::new(f, k, n_k).t(),
                    MatRef::new(dvp, k, d_v),
                    1.0,
                );
                if let Some(keep) = keep {
                    for (j, kept) in keep.iter().enumerate() {
                        if !kept {
                            dk[j * d..(j + 1) * d].fill(0.0);
                            dv[j * d_v..(j + 1) * d_v].fill(0.0);
                        }
                    }
                }
                if let Some((de, df)) = parts {
                    matmul(
                        MatMut::new(de, k, n_k),
                        false,
                        MatRef::new(dkp, k, d),
                        MatRef::new(&km, n_k, d).t(),
                        1.0,
                    );
                    matmul(
                        MatMut::new(df, k, n_k),
                        false,
                        MatRef::new(dvp, k, d_v),
                        MatRef::new(&vm, n_k, d_v).t(),
                        1.0,
                    );
                }
            });
        // Parameters are shared by the batch: sum the batch elements' parts (with one batch
        // element the parts already are the gradients).
        let sum_heads = |parts: Vec<f32>| -> Vec<f32> {
            if dims.batch == 1 {
                return parts;
            }
            let mut out = vec![0.0f32; heads * k * n_k];
            for (bh, part) in parts.chunks_exact(k * n_k).enumerate() {
                let h = bh % heads;
                for (a, b) in out[h * k * n_k..(h + 1) * k * n_k].iter_mut().zip(part) {
                    *a += *b;
                }
            }
            out
        };
        let params = if learn {
            vec![
                ParamGrad {
                    name: "e",
                    shape: vec![heads, k, n_k],
                    grad: sum_heads(de_parts),
                },
                ParamGrad {
                    name: "f",
                    shape: vec![heads, k, n_k],
                    grad: sum_heads(df_parts),
                },
            ]
        } else {
            Vec::new()
        };
        Ok(Grads {
            dq: sub_grads.dq,
            dk,
            dv,
            params,
        })
    }
}
