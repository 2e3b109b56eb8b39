//! YOSO and YOSO-E against naive O(n²) f64 implementations of their formulas, their statistical
//! properties (collision probabilities, convergence of the sampled estimator to its expectation
//! at the 1/√m rate), finite differences for the exact derivative, masks, seeds and bad input.
#![allow(clippy::needless_range_loop)] // index loops mirror the formulas

mod common;

use common::{
    Case, Loss, assert_close, assert_derivative, check_qkv_gradients, log_log_slope, normal,
    random_masks,
};
use randattn::methods::yoso::{
    HashFamily, LshHash, NO_CODE, Yoso, YosoBackward, YosoE, expectation::SLOPE_CLAMP,
    seeded_conv_weights,
};
use randattn::rng::stream;
use randattn::{Attention, AttentionInputs, Auto, Error, Estimator, Grads, Method};

// ---------------------------------------------------------------------------------------------
// Naive reference
// ---------------------------------------------------------------------------------------------

/// Which pairwise weight matrix a naive computation uses.
enum Weights {
    /// `B̂` from the hash codes of a sampled forward (`[bh][i][j]`).
    Sampled(Vec<Vec<Vec<f64>>>),
    /// The exact `B`.
    Exact,
}

struct Naive<'a> {
    case: &'a Case,
    tau: u32,
    normalize: bool,
    conv: Option<Vec<f64>>, // [heads, w]
}

fn unit(x: &[f64]) -> (Vec<f64>, f64) {
    let n = x.iter().map(|a| a * a).sum::<f64>().sqrt();
    (x.iter().map(|a| a / n.max(1e-12)).collect(), n)
}

fn b_exact(x: f64, tau: u32) -> f64 {
    (1.0 - x.clamp(-1.0, 1.0).acos() / std::f64::consts::PI).powi(tau as i32)
}

fn b_slope(x: f64, tau: u32) -> f64 {
    let c = SLOPE_CLAMP as f64;
    let x = x.clamp(-c, c);
    let y = 1.0 - x.acos() / std::f64::consts::PI;
    tau as f64 * y.powi(tau as i32 - 1) / (std::f64::consts::PI * (1.0 - x * x).sqrt())
}

/// `B̂_ij = (1/m) Σ_h 1[c_h(q_i) = c_h(k_j)]` per head, from the public hash API and the
/// documented stream of head `(b, h)`.
fn sampled_weights(yoso: &Yoso, case: &Case, seed: u64) -> Vec<Vec<Vec<f64>>> {
    let x = case.inputs();
    let dims = x.dims();
    let (nq, nk, m) = (dims.n_q, dims.n_k, yoso.m);
    (0..dims.batch_heads())
        .map(|bh| {
            let (b, h) = (bh / dims.heads, bh % dims.heads);
            let hasher = yoso.hasher(dims, seed, b, h).unwrap();
            let (mut qc, mut kc) = (vec![0u32; nq * m], vec![0u32; nk * m]);
            hasher.codes(x.q_head(bh), x.query_mask_row(b), &mut qc);
            hasher.codes(x.k_head(bh), x.key_mask_row(b), &mut kc);
            (0..nq)
                .map(|i| {
                    (0..nk)
                        .map(|j| {
                            (0..m)
                                .filter(|&hh| {
                                    let (a, c) = (qc[hh * nq + i], kc[hh * nk + j]);
                                    a != NO_CODE && a == c
                                })
                                .count() as f64
                                / m as f64
                        })
                        .collect()
                })
                .collect()
        })
        .collect()
}

impl Naive<'_> {
    fn dims(&self) -> (usize, usize, usize, usize, usize, usize) {
        self.case.shape
    }
    fn row(data: &[f32], idx: usize, w: usize) -> Vec<f64> {
        data[idx * w..(idx + 1) * w]
            .iter()
            .map(|a| *a as f64)
            .collect()
    }
    fn key_kept(&self, b: usize, j: usize) -> bool {
        let nk = self.dims().3;
        self.case.key_mask.as_ref().is_none_or(|m| m[b * nk + j])
    }
    fn query_kept(&self, b: usize, i: usize) -> bool {
        let nq = self.dims().2;
        self.case.query_mask.as_ref().is_none_or(|m| m[b * nq + i])
    }
    /// Masked weight and cosine of pair (i, j) of head bh.
    fn weight(&self, w: &Weights, bh: usize, i: usize, j: usize) -> (f64, f64) {
        let (_, h, nq, nk, d, _) = self.dims();
        let b = bh / h;
        if !self.key_kept(b, j) || !self.query_kept(b, i) {
            return (0.0, 0.0);
        }
        let (qi, _) = unit(&Self::row(&self.case.q, bh * nq + i, d));
        let (kj, _) = unit(&Self::row(&self.case.k, bh * nk + j, d));
        let x: f64 = qi.iter().zip(&kj).map(|(a, b)| a * b).sum();
        let weight = match w {
            Weights::Sampled(bhat) => bhat[bh][i][j],
            Weights::Exact => b_exact(x, self.tau),
        };
        (weight, x)
    }
    /// `Y_raw` of head bh, row i.
    fn raw_row(&self, w: &Weights, bh: usize, i: usize) -> Vec<f64> {
        let (_, _, _, nk, _, dv) = self.dims();
        let mut y = vec![0.0; dv];
        for j in 0..nk {
            let (wij, _) = self.weight(w, bh, i, j);
            for c in 0..dv {
                y[c] += wij * self.case.v[(bh * nk + j) * dv + c] as f64;
            }
        }
        y
    }
    fn conv_row(&self, bh: usize, i: usize) -> Vec<f64> {
        let (_, h, _, nk, _, dv) = self.dims();
        let mut y = vec![0.0; dv];
        let Some(conv) = &self.conv else { return y };
        let w = conv.len() / h;
        for t in 0..w {
            let j = i as isize + t as isize - (w / 2) as isize;
            if j < 0 || j >= nk as isize || !self.key_kept(bh / h, j as usize) {
                continue;
            }
            for c in 0..dv {
                y[c] +=
                    conv[(bh % h) * w + t] * self.case.v[(bh * nk + j as usize) * dv + c] as f64;
            }
        }
        y
    }
    fn forward(&self, w: &Weights) -> Vec<f64> {
        let (b, h, nq, _, _, dv) = self.dims();
        let mut out = Vec::with_capacity(b * h * nq * dv);
        for bh in 0..b * h {
            for i in 0..nq {
                if !self.query_kept(bh / h, i) {
                    out.extend(std::iter::repeat_n(0.0, dv));
                    continue;
                }
                let raw = self.raw_row(w, bh, i);
                let y = if self.normalize { unit(&raw).0 } else { raw };
                let conv = self.conv_row(bh, i);
                out.extend(y.iter().zip(&conv).map(|(a, c)| a + c));
            }
        }
        out
    }
    /// The backward formula: `slope` gives the weight of `(g_i·v_j)` in dq̂/dk̂ from
    /// `(B̃_ij, x_ij)`; dV uses `B̃`.
    fn backward(&self, w: &Weights, g_out: &[f32], slope: &dyn Fn(f64, f64) -> f64) -> Grads {
        let (b, h, nq, nk, d, dv) = self.dims();
        let (mut dq, mut dk, mut dvv) = (
            vec![0.0f64; b * h * nq * d],
            vec![0.0f64; b * h * nk * d],
            vec![0.0f64; b * h * nk * dv],
        );
        let mut dconv = self.conv.as_ref().map(|c| vec![0.0f64; c.len()]);
        for bh in 0..b * h {
            let kh: Vec<(Vec<f64>, f64)> = (0..nk)
                .map(|j| unit(&Self::row(&self.case.k, bh * nk + j, d)))
                .collect();
            let mut dkh = vec![vec![0.0f64; d]; nk];
            for i in 0..nq {
                if !self.query_kept(bh / h, i) {
                    continue;
                }
                let gt = Self::row(g_out, bh * nq + i, dv);
                // Through the output normalisation.
                let raw = self.raw_row(w, bh, i);
                let g: Vec<f64> = if self.normalize {
                    let (y, norm) = unit(&raw);
                    if norm == 0.0 {
                        vec![0.0; dv]
                    } else {
                        let p: f64 = y.iter().zip(&gt).map(|(a, b)| a * b).sum();
                        gt.iter().zip(&y).map(|(g, y)| (g - y * p) / norm).collect()
                    }
                } else {
                    gt.clone()
                };
                let (qi, qnorm) = unit(&Self::row(&self.case.q, bh * nq + i, d));
                let mut dqh = vec![0.0f64; d];
                for j in 0..nk {
                    let (wij, x) = self.weight(w, bh, i, j);
                    let vj = Self::row(&self.case.v, bh * nk + j, dv);
                    for c in 0..dv {
                        dvv[(bh * nk + j) * dv + c] += wij * g[c];
                    }
                    if !self.key_kept(bh / h, j) {
                        continue;
                    }
                    let s = g.iter().zip(&vj).map(|(a, b)| a * b).sum::<f64>() * slope(wij, x);
                    for c in 0..d {
                        dqh[c] += s * kh[j].0[c];
                        dkh[j][c] += s * qi[c];
                    }
                }
                let p: f64 = dqh.iter().zip(&qi).map(|(a, b)| a * b).sum();
                for c in 0..d {
                    dq[(bh * nq + i) * d + c] = (dqh[c] - qi[c] * p) / qnorm;
                }
                // Conv branch: out_i += Σ_t w_t v_{i+t-half}.
                if let (Some(conv), Some(dconv)) = (&self.conv, dconv.as_mut()) {
                    let wlen = conv.len() / h;
                    for t in 0..wlen {
                        let j = i as isize + t as isize - (wlen / 2) as isize;
                        if j < 0 || j >= nk as isize || !self.key_kept(bh / h, j as usize) {
                            continue;
                        }
                        let j = j as usize;
                        let vj = Self::row(&self.case.v, bh * nk + j, dv);
                        dconv[(bh % h) * wlen + t] +=
                            gt.iter().zip(&vj).map(|(a, b)| a * b).sum::<f64>();
                        for c in 0..dv {
                            dvv[(bh * nk + j) * dv + c] += conv[(bh % h) * wlen + t] * gt[c];
                        }
                    }
                }
            }
            for j in 0..nk {
                let (kj, knorm) = &kh[j];
                let p: f64 = dkh[j].iter().zip(kj).map(|(a, b)| a * b).sum();
                for c in 0..d {
                    dk[(bh * nk + j) * d + c] = (dkh[j][c] - kj[c] * p) / knorm;
                }
            }
        }
        let f = |v: Vec<f64>| v.into_iter().map(|a| a as f32).collect::<Vec<f32>>();
        Grads {
            dq: f(dq),
            dk: f(dk),
            dv: f(dvv),
            params: dconv
                .map(|dc| {
                    vec![randattn::ParamGrad {
                        name: "conv_weights",
                        shape: vec![h, dc.len() / h],
                        grad: f(dc),
                    }]
                })
                .unwrap_or_default(),
        }
    }
}

fn to_f32(x: &[f64]) -> Vec<f32> {
    x.iter().map(|a| *a as f32).collect()
}

fn conv_f64(w: &[f32]) -> Vec<f64> {
    w.iter().map(|a| *a as f64).collect()
}

/// Runs a method's forward and backward and checks both against the naive formulas.
fn check_method(
    method: &dyn Attention,
    naive: &Naive<'_>,
    weights: &Weights,
    slope: &dyn Fn(f64, f64) -> f64,
    seed: u64,
    tol: f32,
    tag: &str,
) {
    let x = naive.case.inputs();
    let fwd = method.forward(&x, seed).unwrap();
    assert_close(
        &format!("out {tag}"),
        &fwd.output,
        &to_f32(&naive.forward(weights)),
        tol,
    );
    let g = normal(x.dims().out_len(), 1.0, seed + 77, "g");
    let got = method.backward(&x, seed, &fwd.saved, &g).unwrap();
    let want = naive.backward(weights, &g, slope);
    assert_close(&format!("dq {tag}"), &got.dq, &want.dq, tol);
    assert_close(&format!("dk {tag}"), &got.dk, &want.dk, tol);
    assert_close(&format!("dv {tag}"), &got.dv, &want.dv, tol);
    assert_eq!(got.params.len(), want.params.len(), "{tag}");
    for (a, b) in got.params.iter().zip(&want.params) {
        assert_eq!((a.name, &a.shape), (b.name, &b.shape));
        assert_close(&format!("{} {tag}", a.name), &a.grad, &b.grad, tol);
    }
}

// ---------------------------------------------------------------------------------------------
// Against the naive formulas
// ---------------------------------------------------------------------------------------------

#[test]
fn sampled_forward_and_lsh_backward_match_the_formulas_with_the_same_codes() {
    // Shapes: n not a multiple of 8, d not a power of two, d_v ≠ d, cross-attention, masks,
    // both hash families, τ from 1 to 20 (τ = 20 takes the sorted bucket path).
    let cases = [
        ((1, 2, 37, 37, 17, 5), 6, HashFamily::Fast, 8, true, 0),
        ((2, 1, 29, 41, 1, 3), 3, HashFamily::SimHash, 5, true, 0),
        ((1, 1, 50, 50, 32, 32), 4, HashFamily::Fast, 16, false, 5),
        ((2, 2, 23, 23, 48, 7), 5, HashFamily::SimHash, 7, true, 3),
        ((1, 1, 61, 70, 64, 64), 20, HashFamily::Fast, 6, true, 0),
        ((1, 1, 40, 33, 96, 16), 2, HashFamily::Fast, 9, false, 0),
        ((1, 1, 19, 19, 8, 4), 1, HashFamily::SimHash, 3, true, 0),
    ];
    for (i, (shape, tau, hash, m, masks, conv)) in cases.into_iter().enumerate() {
        let mut case = Case::new(shape, 100 + i as u64);
        if masks {
            random_masks(&mut case, i as u64);
        }
        let yoso = Yoso {
            tau: Auto::Fixed(tau),
            m,
            hash,
            normalize: i % 3 != 2,
            conv,
            ..Yoso::default()
        };
        let seed = 7 + i as u64;
        let conv_w = (conv > 0).then(|| conv_f64(&seeded_conv_weights(shape.1, conv, seed)));
        let naive = Naive {
            case: &case,
            tau,
            normalize: yoso.normalize,
            conv: conv_w,
        };
        let weights = Weights::Sampled(sampled_weights(&yoso, &case, seed));
        let half_tau = 0.5 * tau as f64;
        check_method(
            &yoso,
            &naive,
            &weights,
            &|w, _| half_tau * w,
            seed,
            2e-4,
            &format!("lsh case {i}"),
        );
        // The same forward with the exact-B surrogate: dQ and dK use B, dV stays B̂ᵀ G.
        let exact_b = Yoso {
            backward: YosoBackward::SurrogateExactB,
            ..yoso.clone()
        };
        let x = case.inputs();
        let fwd = exact_b.forward(&x, seed).unwrap();
        let g = normal(x.dims().out_len(), 1.0, seed + 77, "g");
        let got = exact_b.backward(&x, seed, &fwd.saved, &g).unwrap();
        let want_v = naive.backward(&weights, &g, &|_, _| 0.0).dv;
        let tau_ = tau;
        let want_qk = naive.backward(&weights, &g, &move |_, x| half_tau * b_exact(x, tau_));
        assert_close("dv exact-b", &got.dv, &want_v, 2e-4);
        assert_close("dq exact-b", &got.dq, &want_qk.dq, 2e-4);
        assert_close("dk exact-b", &got.dk, &want_qk.dk, 2e-4);
    }
}

#[test]
fn expectation_forward_and_both_backwards_match_the_formulas() {
    let cases = [
        ((1, 2, 37, 37, 17, 5), 6, true, 0),
        ((2, 1, 29, 300, 64, 3), 9, true, 0),
        ((1, 1, 130, 130, 32, 32), 4, false, 5),
        ((2, 2, 23, 23, 48, 7), 12, true, 3),
        ((1, 1, 9, 11, 1, 2), 2, false, 0),
    ];
    for (i, (shape, tau, masks, conv)) in cases.into_iter().enumerate() {
        let mut case = Case::new(shape, 200 + i as u64);
        if masks {
            random_masks(&mut case, 10 + i as u64);
        }
        for backward in [YosoBackward::SurrogateExactB, YosoBackward::True] {
            let method = YosoE {
                tau: Auto::Fixed(tau),
                normalize: i != 2,
                conv,
                backward,
                ..YosoE::default()
            };
            let naive = Naive {
                case: &case,
                tau,
                normalize: method.normalize,
                conv: (conv > 0).then(|| conv_f64(&seeded_conv_weights(shape.1, conv, 3))),
            };
            let half_tau = 0.5 * tau as f64;
            let slope: Box<dyn Fn(f64, f64) -> f64> = match backward {
                YosoBackward::True => Box::new(move |_, x| b_slope(x, tau)),
                _ => Box::new(move |w, _| half_tau * w),
            };
            check_method(
                &method,
                &naive,
                &Weights::Exact,
                &slope,
                3,
                2e-4,
                &format!("yoso-e case {i} {backward:?}"),
            );
        }
    }
}

#[test]
fn true_backward_matches_finite_differences_of_the_expectation() {
    // Central differences of the f64 forward (exact acos) against the analytic gradient, for
    // every input and the conv kernels. Random Q/K keep every cosine well inside the clamp.
    let mut case = Case::new((1, 2, 9, 9, 5, 3), 31);
    random_masks(&mut case, 4);
    let (tau, conv) = (5, 3);
    let weights = seeded_conv_weights(2, conv, 0);
    let method = YosoE {
        tau: Auto::Fixed(tau),
        conv,
        conv_weights: Auto::Fixed(weights.clone()),
        backward: YosoBackward::True,
        ..YosoE::default()
    };
    let x = case.inputs();
    let g = normal(x.dims().out_len(), 1.0, 5, "g");
    let fwd = method.forward(&x, 0).unwrap();
    let grads = method.backward(&x, 0, &fwd.saved, &g).unwrap();
    let loss = |c: &Case, w: &[f32]| -> Loss {
        let naive = Naive {
            case: c,
            tau,
            normalize: true,
            conv: Some(conv_f64(w)),
        };
        let out = naive.forward(&Weights::Exact);
        let terms: Vec<f64> = out.iter().zip(&g).map(|(a, b)| a * *b as f64).collect();
        Loss {
            value: terms.iter().sum(),
            magnitude: terms.iter().map(|t| t * t).sum::<f64>().sqrt(),
        }
    };
    check_qkv_gradients("yoso-e true backward", &case, &grads, |c| loss(c, &weights));
    for t in 0..weights.len() {
        let what = format!("conv {t}");
        assert_derivative(&what, grads.params[0].grad[t] as f64, weights[t], |v| {
            let mut w = weights.clone();
            w[t] = v;
            loss(&case, &w)
        });
    }
}

// ---------------------------------------------------------------------------------------------
// Statistical properties
// ---------------------------------------------------------------------------------------------

/// Two unit vectors in `d` dimensions at angle `theta`, in a random orientation.
fn pair_at_angle(d: usize, theta: f64, seed: u64) -> (Vec<f32>, Vec<f32>) {
    let a = normal(d, 1.0, seed, "a");
    let b = normal(d, 1.0, seed, "b");
    let na = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let u: Vec<f32> = a.iter().map(|x| x / na).collect();
    let p: f32 = b.iter().zip(&u).map(|(x, y)| x * y).sum();
    let w: Vec<f32> = b.iter().zip(&u).map(|(x, y)| x - p * y).collect();
    let nw = w.iter().map(|x| x * x).sum::<f32>().sqrt();
    let w: Vec<f32> = w.iter().map(|x| x / nw).collect();
    let v = u
        .iter()
        .zip(&w)
        .map(|(x, y)| (theta.cos() as f32) * x + (theta.sin() as f32) * y)
        .collect();
    (u, v)
}

#[test]
fn collision_probability_of_each_hash_family_is_one_minus_angle_over_pi_to_the_tau() {
    // Over many seeds, the fraction of hashes in which two vectors at angle θ collide estimates
    // P = (1 − θ/π)^τ. SimHash's hashes are independent Bernoulli(P): 5 standard errors. The fast
    // hash's hashes within one rotation are correlated, so the standard error is taken from the
    // spread of per-seed means; its structured rotation is only close to Gaussian, so it also gets
    // an absolute allowance of 0.01.
    let (d, tau, m, seeds) = (64, 4u32, 16, 1500);
    for family in [HashFamily::SimHash, HashFamily::Fast] {
        for theta in [0.3, 0.8, 1.3, std::f64::consts::FRAC_PI_2, 2.2] {
            let want = (1.0 - theta / std::f64::consts::PI).powi(tau as i32);
            let per_seed: Vec<f64> = (0..seeds)
                .map(|s| {
                    let (u, v) = pair_at_angle(d, theta, s);
                    let h = LshHash::draw(family, d, tau, m, &mut stream(s, 0, 0, "c")).unwrap();
                    let mut rows = u.clone();
                    rows.extend(&v);
                    let mut codes = vec![0u32; 2 * m];
                    h.codes(&rows, None, &mut codes);
                    (0..m).filter(|&k| codes[2 * k] == codes[2 * k + 1]).count() as f64 / m as f64
                })
                .collect();
            let mean = per_seed.iter().sum::<f64>() / seeds as f64;
            let var = per_seed.iter().map(|p| (p - mean).powi(2)).sum::<f64>() / (seeds - 1) as f64;
            let se = (var / seeds as f64).sqrt();
            let tol = match family {
                HashFamily::SimHash => {
                    5.0 * (want * (1.0 - want) / (seeds as usize * m) as f64).sqrt()
                }
                HashFamily::Fast => 5.0 * se + 0.01,
            };
            assert!(
                (mean - want).abs() <= tol,
                "{family:?} θ={theta}: empirical {mean:.4} vs (1-θ/π)^τ = {want:.4} (tol {tol:.4})"
            );
        }
    }
}

/// Root-mean-square difference between two tensors.
fn rms(a: &[f32], b: &[f32]) -> f64 {
    (a.iter()
        .zip(b)
        .map(|(x, y)| ((x - y) as f64).powi(2))
        .sum::<f64>()
        / a.len() as f64)
        .sqrt()
}

#[test]
fn sampled_estimate_converges_to_the_expectation_at_rate_one_over_sqrt_m() {
    // Unnormalised outputs: E[Ŷ_raw] = Y_raw (YOSO-E) and Var ∝ 1/m, so the RMS error over
    // seeds falls like m^(-1/2): the log-log slope over m ∈ {4, 16, 64, 256} is -0.5. With
    // SimHash the estimator is exactly unbiased; the fast hash only approximately, so it gets a
    // looser window. On real clustered data (the workload), not isotropic noise.
    let w = randattn::workload::clustered(1, 2, 96, 32, 5);
    let s = w.dims.q_shape();
    let x = AttentionInputs::new(&w.q, s, &w.k, s, &w.v, s).unwrap();
    let tau = 6;
    let exp = YosoE {
        tau: Auto::Fixed(tau),
        normalize: false,
        ..YosoE::default()
    }
    .forward(&x, 0)
    .unwrap()
    .output;
    let scale = rms(&exp, &vec![0.0; exp.len()]);
    for (family, window) in [(HashFamily::SimHash, 0.08), (HashFamily::Fast, 0.12)] {
        let ms = [4usize, 16, 64, 256];
        let errs: Vec<f64> = ms
            .iter()
            .map(|&m| {
                let y = Yoso {
                    tau: Auto::Fixed(tau),
                    m,
                    hash: family,
                    normalize: false,
                    ..Yoso::default()
                };
                let seeds = 12;
                let mse: f64 = (0..seeds)
                    .map(|s| rms(&y.forward(&x, s).unwrap().output, &exp).powi(2))
                    .sum::<f64>()
                    / seeds as f64;
                mse.sqrt() / scale
            })
            .collect();
        let points: Vec<(f64, f64)> = ms.iter().map(|m| *m as f64).zip(errs.clone()).collect();
        let slope = log_log_slope(&points);
        assert!(
            (slope + 0.5).abs() <= window,
            "{family:?}: relative RMS errors {errs:?} give slope {slope:.3}, theory -0.5"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Masks, seeds, threads
// ---------------------------------------------------------------------------------------------

#[test]
fn masks_are_honoured_including_all_masked_batches() {
    // Regression for the HF port, which turned a 0/1 padding mask into all ones: values at
    // masked keys must not matter, masked queries output 0, an all-masked batch element outputs
    // 0 with zero gradients, and nothing is NaN.
    for name in ["yoso", "yoso-e"] {
        let method = Method::parse(name, &[("conv", "3")]).unwrap();
        let mut case = Case::new((3, 2, 45, 45, 16, 8), 9);
        random_masks(&mut case, 9);
        let x = case.inputs();
        let f = method.forward(&x, 4).unwrap();
        let (nq, dv) = (45, 8);
        let qm = case.query_mask.clone().unwrap();
        let km = case.key_mask.clone().unwrap();
        for bh in 0..6 {
            for i in 0..nq {
                let row = &f.output[(bh * nq + i) * dv..(bh * nq + i + 1) * dv];
                assert!(row.iter().all(|v| v.is_finite()));
                if !qm[(bh / 2) * nq + i] {
                    assert!(
                        row.iter().all(|v| *v == 0.0),
                        "{name}: masked query {bh} {i}"
                    );
                }
                if bh / 2 == 1 {
                    assert!(row.iter().all(|v| *v == 0.0), "{name}: all-masked batch");
                }
            }
        }
        let mut changed = case.v.clone();
        for (idx, v) in changed.iter_mut().enumerate() {
            let (bh, j) = (idx / (45 * dv), (idx / dv) % 45);
            if !km[(bh / 2) * 45 + j] {
                *v = 1e3;
            }
        }
        let mut case2 = Case::new(case.shape, 9);
        case2.v = changed;
        case2.key_mask = case.key_mask.clone();
        case2.query_mask = case.query_mask.clone();
        let f2 = method.forward(&case2.inputs(), 4).unwrap();
        assert_eq!(f.output, f2.output, "{name}: masked values leaked");
        let g = normal(f.output.len(), 1.0, 1, "g");
        let grads = method.backward(&x, 4, &f.saved, &g).unwrap();
        for (what, t, w) in [
            ("dq", &grads.dq, 16),
            ("dk", &grads.dk, 16),
            ("dv", &grads.dv, 8),
        ] {
            assert!(t.iter().all(|v| v.is_finite()), "{name} {what}");
            // Batch element 1 is all masked: nothing flows to it.
            for bh in 2..4 {
                assert!(
                    t[bh * 45 * w..(bh + 1) * 45 * w].iter().all(|v| *v == 0.0),
                    "{name} {what} of the all-masked batch"
                );
            }
        }
    }
}

#[test]
fn queries_are_hashed_with_their_own_codes() {
    // Regression for the HF SimHash path, which returned the key codes for the queries: a query
    // antipodal to key 0 never collides with it, while with the key's codes it always would.
    for hash in ["simhash", "fast"] {
        let (n, d) = (5, 8);
        let mut case = Case::new((1, 1, n, n, d, 1), 3);
        case.v = vec![0.0; n];
        case.v[0] = 1.0; // only key 0 carries a value
        for c in 0..d {
            case.q[c] = -case.k[c];
        }
        let method = Method::parse(
            "yoso",
            &[
                ("hash", hash),
                ("normalize", "false"),
                ("m", "64"),
                ("tau", "3"),
            ],
        )
        .unwrap();
        let out = method.forward(&case.inputs(), 1).unwrap().output;
        assert_eq!(
            out[0], 0.0,
            "{hash}: the antipodal query collided with key 0"
        );
    }
}

#[test]
fn same_seed_same_output_at_any_thread_count_and_new_seeds_new_hashes() {
    let w = randattn::workload::clustered(2, 3, 300, 24, 1);
    let s = w.dims.q_shape();
    let x = AttentionInputs::new(&w.q, s, &w.k, s, &w.v, s).unwrap();
    let g = normal(w.q.len(), 1.0, 2, "g");
    for settings in [
        vec![],
        vec![("hash", "simhash"), ("conv", "5")],
        vec![("backward", "surrogate-exact-b")],
    ] {
        let method = Method::parse("yoso", &settings).unwrap();
        let run = |threads: usize, seed: u64| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                let f = method.forward(&x, seed).unwrap();
                let gr = method.backward(&x, seed, &f.saved, &g).unwrap();
                (f.output, gr)
            })
        };
        let (o1, g1) = run(1, 5);
        for t in [2, 3, 5] {
            let (o, gr) = run(t, 5);
            assert_eq!(o, o1, "{settings:?} threads {t}");
            assert_eq!(gr, g1, "{settings:?} threads {t}");
        }
        let (o2, _) = run(2, 6);
        let differ = o1.iter().zip(&o2).filter(|(a, b)| a != b).count();
        assert!(
            differ > o1.len() / 2,
            "{settings:?}: seeds 5 and 6 gave {differ} different entries"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Bad input
// ---------------------------------------------------------------------------------------------

#[test]
fn out_of_range_parameters_are_clear_errors() {
    type Settings<'a> = &'a [(&'a str, &'a str)];
    let bad: &[(&str, Settings, &str)] = &[
        ("yoso", &[("tau", "0")], "parameter `tau` of method `yoso`"),
        ("yoso", &[("tau", "31")], "parameter `tau`"),
        ("yoso", &[("m", "0")], "parameter `m`"),
        ("yoso", &[("m", "-3")], "parameter `m`"),
        ("yoso", &[("hash", "minhash")], "`fast` or `simhash`"),
        ("yoso", &[("normalize", "yes")], "`true` or `false`"),
        ("yoso", &[("conv", "4")], "odd"),
        ("yoso", &[("conv_weights", "1,2")], "conv=0"),
        (
            "yoso",
            &[("conv", "3"), ("conv_weights", "1,2")],
            "2 values (conv=3)",
        ),
        (
            "yoso",
            &[("conv", "3"), ("conv_weights", "1,nan,2")],
            "conv_weights",
        ),
        ("yoso", &[("backward", "true")], "use yoso-e"),
        ("yoso", &[("backward", "exact")], "parameter `backward`"),
        ("yoso-e", &[("backward", "surrogate-lsh")], "no hash codes"),
        ("yoso-e", &[("m", "4")], "has no parameter `m`"),
    ];
    for (name, settings, needle) in bad {
        let err = Method::parse(name, settings).unwrap_err().to_string();
        assert!(err.contains(needle), "{name} {settings:?}: {err}");
    }
}

#[test]
fn shape_problems_are_errors_not_panics() {
    // The conv branch needs n_q = n_k; conv weights must match the head count; the backward
    // rejects state from another method or other inputs, and bad output gradients.
    let case = Case::new((1, 2, 5, 7, 4, 4), 1);
    let x = case.inputs();
    let conv = Method::parse("yoso", &[("conv", "3")]).unwrap();
    let err = conv.forward(&x, 0).unwrap_err().to_string();
    assert!(err.contains("needs self-attention"), "{err}");
    let square = Case::new((1, 2, 5, 5, 4, 4), 1);
    let xs = square.inputs();
    let wrong = Method::parse("yoso-e", &[("conv", "3"), ("conv_weights", "1,2,3")]).unwrap();
    let err = wrong.forward(&xs, 0).unwrap_err().to_string();
    assert!(err.contains("heads * conv = 2 * 3 = 6"), "{err}");

    let yoso = Method::parse::<&str>("yoso", &[]).unwrap();
    let f = yoso.forward(&x, 0).unwrap();
    let g = vec![0.5; f.output.len()];
    let e = Method::parse::<&str>("yoso-e", &[]).unwrap();
    assert!(matches!(
        e.backward(&x, 0, &f.saved, &g),
        Err(Error::Saved { .. })
    ));
    assert!(matches!(
        yoso.backward(&xs, 0, &f.saved, &g),
        Err(Error::Saved { .. })
    ));
    assert!(matches!(
        yoso.backward(&x, 0, &f.saved, &g[1..]),
        Err(Error::Shape { .. })
    ));
    let mut nan = g.clone();
    nan[3] = f32::NAN;
    assert!(matches!(
        yoso.backward(&x, 0, &f.saved, &nan),
        Err(Error::NonFinite { .. })
    ));
    assert!(yoso.backward(&x, 0, &f.saved, &g).is_ok());
    assert_eq!(Yoso::INFO.name, "yoso");
}
