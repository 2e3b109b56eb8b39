//! Linformer with its projections as trainable variables of a candle model.
//!
//! Linformer's `E, F ∈ ℝ^{k×n}` (per head) are parameters of the model in its paper (Wang et al.
//! 2020) and in the Nyströmformer LRA code. [`crate::op::attention`] treats a method's own
//! parameters as configuration (no gradients), and a model that hands Linformer a fresh seed at
//! every step would get fresh random projections at every step — a target that moves under the
//! optimiser, which never learns. Here they are candle variables instead:
//!
//! ```text
//! K' = E[:, :, :n] · (K ⊙ M),   V' = F[:, :, :n] · (V ⊙ M),   O = softmax(s · Q K'ᵀ) · V'
//! ```
//!
//! with `E`, `F` of shape `[heads, k, max_len]` (the first `n` columns serve a sequence of `n`
//! tokens), `M` the key mask zeroing padded rows before the projection (as the reference does),
//! and the attention over the `k` projected rows run by the exact kernel of
//! [`crate::op::attention`]. The projections are plain candle matmuls, so `backward()` reaches
//! `E` and `F`. Initialisation is `N(0, 1/k)`, the scale of the core's seeded projections
//! ([`randattn::methods::linformer::seeded_projections`]), so a model starts from the same
//! Johnson–Lindenstrauss sketch the untrained method uses.

use candle_core::{Result, Tensor, bail};
use candle_nn::{Init, VarBuilder};
use randattn::Method;
use randattn::methods::exact::Exact;

use crate::op::{Masks, attention};

/// The trainable `E`, `F` of one Linformer attention layer, with the exact attention over the
/// projected keys and values.
#[derive(Debug, Clone)]
pub struct TrainableProjections {
    /// `[heads, k, max_len]`.
    e: Tensor,
    /// `[heads, k, max_len]`.
    f: Tensor,
    /// Exact attention at Linformer's scale.
    exact: Method,
}

impl TrainableProjections {
    /// Variables `projection_e` and `projection_f` (`[heads, k, max_len]`, `N(0, 1/k)`) under
    /// `vb`, for `method`, which must be Linformer (its `k` and `scale` are used).
    pub fn new(vb: VarBuilder, method: &Method, heads: usize, max_len: usize) -> Result<Self> {
        let Method::Linformer(linformer) = method else {
            bail!(
                "trainable projections belong to linformer, not {}",
                method.name()
            );
        };
        if heads == 0 || max_len == 0 {
            bail!("linformer projections need heads ≥ 1 and max_len ≥ 1 (got {heads}, {max_len})");
        }
        let k = linformer.k;
        let init = Init::Randn {
            mean: 0.0,
            stdev: 1.0 / (k as f64).sqrt(),
        };
        let shape = (heads, k, max_len);
        Ok(TrainableProjections {
            e: vb.get_with_hints(shape, "projection_e", init)?,
            f: vb.get_with_hints(shape, "projection_f", init)?,
            exact: Method::from(Exact {
                scale: linformer.scale,
            }),
        })
    }

    /// Linformer attention of `q`, `k`, `v` (`[batch, heads, n, d]`) with a key-padding mask
    /// (`[batch, n]`, `true` = token): `[batch, heads, n, d_v]`.
    pub fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: Option<&[bool]>,
    ) -> Result<Tensor> {
        let (b, heads, n, _) = k.dims4()?;
        let (e_heads, _, max_len) = self.e.dims3()?;
        if heads != e_heads || n > max_len {
            bail!(
                "linformer projections are for {e_heads} heads and up to {max_len} tokens, got \
                 {heads} heads of {n} tokens"
            );
        }
        let (k, v) = match mask {
            Some(m) => {
                if m.len() != b * n {
                    bail!("key mask has {} entries, want batch·n = {}", m.len(), b * n);
                }
                let keep: Vec<f32> = m.iter().map(|&t| f32::from(u8::from(t))).collect();
                let keep = Tensor::from_vec(keep, (b, 1, n, 1), k.device())?;
                (k.broadcast_mul(&keep)?, v.broadcast_mul(&keep)?)
            }
            None => (k.clone(), v.clone()),
        };
        // Per head, one product over the whole batch, `[k, n] · [n, batch·d]`: the batch rides
        // in the product's columns, so `∂E = ∂K'·Xᵀ` is one product too. (A broadcast product of
        // `[1, heads, k, n]` with `[batch, heads, n, d]` formed `∂E` batch by batch,
        // `batch·heads·k·n` floats, and then summed them: 1.6× the step time at n = 1024.)
        let project = |p: &Tensor, x: &Tensor| -> Result<Tensor> {
            let d = x.dim(3)?;
            let x = x
                .permute((1, 2, 0, 3))?
                .contiguous()?
                .reshape((heads, n, b * d))?;
            let y = p.narrow(2, 0, n)?.contiguous()?.matmul(&x)?;
            let rows = y.dim(1)?;
            y.reshape((heads, rows, b, d))?
                .permute((2, 0, 1, 3))?
                .contiguous()
        };
        let kp = project(&self.e, &k)?;
        let vp = project(&self.f, &v)?;
        // Every projected row is a real (if mixed) row: no mask over them.
        attention(q, &kp, &vp, &self.exact, 0, &Masks::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;
    use randattn::methods::linformer::{Linformer, Projections};
    use randattn::{Attention, AttentionInputs};

    fn randn(shape: &[usize], seed: u64) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn vec(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    /// The candle composition equals the core estimator given the same projections, masks
    /// included; and the gradients reach E and F.
    #[test]
    fn matches_the_core_estimator_and_trains_its_projections() {
        let (b, h, n, d, kk, max_len) = (2, 3, 11, 4, 5, 16);
        let method = Method::from(Linformer::new(kk));
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let p = TrainableProjections::new(vb, &method, h, max_len).unwrap();
        let (q, k, v) = (
            randn(&[b, h, n, d], 1),
            randn(&[b, h, n, d], 2),
            randn(&[b, h, n, d], 3),
        );
        let mask: Vec<bool> = (0..b * n).map(|i| i % n < n - 2 * (i / n)).collect();
        let out = p.attend(&q, &k, &v, Some(&mask)).unwrap();

        let cut = |t: &Tensor| vec(&t.narrow(2, 0, n).unwrap().contiguous().unwrap());
        let core = Method::from(Linformer::new(kk).with_projections(Projections {
            e: cut(&p.e),
            f: cut(&p.f),
        }));
        let (qd, kd, vd) = (vec(&q), vec(&k), vec(&v));
        let shape = [b, h, n, d];
        let x = AttentionInputs::new(&qd, shape, &kd, shape, &vd, shape)
            .unwrap()
            .with_key_mask(&mask)
            .unwrap();
        let want = core.forward(&x, 0).unwrap().output;
        let got = vec(&out);
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-5, "{g} vs {w}");
        }

        let grads = out.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        for t in [&p.e, &p.f] {
            let g = grads.get(t).expect("projection has a gradient");
            let g = vec(g);
            // Columns past n serve no token: their gradient is zero; the others are not.
            let used: f32 = (0..h * kk)
                .flat_map(|r| (0..n).map(move |c| r * max_len + c))
                .map(|i| g[i].abs())
                .sum();
            let unused: f32 = (0..h * kk)
                .flat_map(|r| (n..max_len).map(move |c| r * max_len + c))
                .map(|i| g[i].abs())
                .sum();
            assert!(used > 0.0 && unused == 0.0, "used {used}, unused {unused}");
        }
    }

    #[test]
    fn refuses_other_methods_and_long_sequences() {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let err = TrainableProjections::new(vb.clone(), &Method::from_spec("exact").unwrap(), 2, 8)
            .unwrap_err();
        assert!(err.to_string().contains("linformer"), "{err}");
        let method = Method::from(Linformer::new(4));
        let p = TrainableProjections::new(vb, &method, 2, 8).unwrap();
        let x = randn(&[1, 2, 9, 4], 1);
        let err = p.attend(&x, &x, &x, None).unwrap_err();
        assert!(err.to_string().contains("up to 8 tokens"), "{err}");
    }
}
