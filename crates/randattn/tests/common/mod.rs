//! Helpers shared by the integration tests: random cases with masks, closeness checks.
#![allow(dead_code)] // each test binary uses a subset

use rand::Rng;
use rand_distr::StandardNormal;
use randattn::rng::stream;
use randattn::{Attention, AttentionInputs, Grads};

/// One attention problem: `(batch, heads, n_q, n_k, d, d_v)`, standard normal Q, K, V.
#[derive(Clone)]
pub struct Case {
    pub shape: (usize, usize, usize, usize, usize, usize), // b, h, n_q, n_k, d, d_v
    pub q: Vec<f32>,
    pub k: Vec<f32>,
    pub v: Vec<f32>,
    pub key_mask: Option<Vec<bool>>,
    pub query_mask: Option<Vec<bool>>,
    /// The layer input X `[b, n_k, d_model]`, W_V `[d_model, h·d_v]` and b_V behind V, for
    /// methods that sample the value projection.
    pub projection: Option<Projection>,
}

/// A value projection `V = X·W_V + b_V`.
#[derive(Clone)]
pub struct Projection {
    pub x: Vec<f32>,
    pub wv: Vec<f32>,
    pub bv: Vec<f32>,
    pub d_model: usize,
}

/// The parameters that set a method's sample budget.
pub const BUDGET_PARAMS: [&str; 7] = [
    "budget",
    "features",
    "k",
    "landmarks",
    "proposals",
    "m",
    "factor",
];

pub fn normal(len: usize, scale: f32, seed: u64, what: &str) -> Vec<f32> {
    let mut r = stream(seed, 0, 0, what);
    (0..len)
        .map(|_| scale * r.sample::<f32, _>(StandardNormal))
        .collect()
}

impl Case {
    pub fn new(shape: (usize, usize, usize, usize, usize, usize), seed: u64) -> Case {
        let (b, h, nq, nk, d, dv) = shape;
        Case {
            shape,
            q: normal(b * h * nq * d, 1.0, seed, "q"),
            k: normal(b * h * nk * d, 1.0, seed, "k"),
            v: normal(b * h * nk * dv, 1.0, seed, "v"),
            key_mask: None,
            query_mask: None,
            projection: None,
        }
    }

    /// The same case with V made from a seeded value projection of width `d_model`.
    pub fn with_projection(mut self, d_model: usize, seed: u64) -> Case {
        let (b, h, _, nk, _, dv) = self.shape;
        let p = Projection {
            x: normal(b * nk * d_model, 1.0, seed, "x"),
            wv: normal(d_model * h * dv, 1.0 / (d_model as f32).sqrt(), seed, "wv"),
            bv: normal(h * dv, 0.5, seed, "bv"),
            d_model,
        };
        self.v = randattn::inputs::project_values(&p.x, [b, nk, d_model], &p.wv, Some(&p.bv), h)
            .unwrap();
        self.projection = Some(p);
        self
    }
    pub fn inputs(&self) -> AttentionInputs<'_> {
        let (b, h, nq, nk, d, dv) = self.shape;
        let mut x = AttentionInputs::new(
            &self.q,
            [b, h, nq, d],
            &self.k,
            [b, h, nk, d],
            &self.v,
            [b, h, nk, dv],
        )
        .unwrap();
        if let Some(m) = &self.key_mask {
            x = x.with_key_mask(m).unwrap();
        }
        if let Some(m) = &self.query_mask {
            x = x.with_query_mask(m).unwrap();
        }
        if let Some(p) = &self.projection {
            x = x
                .with_value_projection(
                    &p.x,
                    [b, nk, p.d_model],
                    &p.wv,
                    [p.d_model, h * dv],
                    Some(&p.bv),
                )
                .unwrap();
        }
        x
    }
}

pub fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let scale = want.iter().fold(1.0f32, |m, x| m.max(x.abs()));
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(g.is_finite(), "{what}[{i}] = {g}");
        assert!(
            (g - w).abs() <= tol * scale,
            "{what}[{i}]: got {g}, want {w} (tol {tol} x {scale})"
        );
    }
}

/// A float32 C-order `.npy` file of the MiniLM fixtures (`fixtures/minilm` in the
/// repository): its data and shape.
pub fn minilm(name: &str) -> (Vec<f32>, Vec<usize>) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/minilm")
        .join(name);
    let bytes = std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "missing fixture {} ({e}; fixtures/minilm is part of the repository)",
            path.display()
        )
    });
    assert_eq!(&bytes[..6], b"\x93NUMPY", "{name}: not an npy file");
    let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let header = std::str::from_utf8(&bytes[10..10 + header_len]).unwrap();
    assert!(
        header.contains("'<f4'") && header.contains("False"),
        "{name}: {header}"
    );
    let shape_text = header
        .split("'shape': (")
        .nth(1)
        .unwrap()
        .split(')')
        .next()
        .unwrap();
    let shape: Vec<usize> = shape_text
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| s.trim().parse().unwrap())
        .collect();
    let data: Vec<f32> = bytes[10 + header_len..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    assert_eq!(data.len(), shape.iter().product::<usize>(), "{name}");
    (data, shape)
}

/// Relative Frobenius error `‖a − b‖ / ‖b‖`.
pub fn rel_error(a: &[f32], b: &[f32]) -> f64 {
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (x, y) in a.iter().zip(b) {
        num += (*x as f64 - *y as f64).powi(2);
        den += (*y as f64).powi(2);
    }
    (num / den.max(f64::MIN_POSITIVE)).sqrt()
}

/// Random key (70% kept) and query (80% kept) masks; batch element 1, if any, attends to nothing.
pub fn random_masks(case: &mut Case, seed: u64) {
    let (b, _, nq, nk, _, _) = case.shape;
    let mut r = stream(seed, 0, 0, "masks");
    let mut km: Vec<bool> = (0..b * nk).map(|_| r.random_bool(0.7)).collect();
    let qm: Vec<bool> = (0..b * nq).map(|_| r.random_bool(0.8)).collect();
    if b > 1 {
        km[nk..2 * nk].fill(false); // batch element 1 attends to nothing
    }
    case.key_mask = Some(km);
    case.query_mask = Some(qm);
}

/// Forward and backward of `method` on `x` with `seed`, in a pool of `threads` threads.
pub fn run_in_pool(
    method: &(dyn Attention + Sync),
    x: &AttentionInputs<'_>,
    seed: u64,
    grad_output: &[f32],
    threads: usize,
) -> (Vec<f32>, Grads) {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    pool.install(|| {
        let f = method.forward(x, seed).unwrap();
        let grads = method.backward(x, seed, &f.saved, grad_output).unwrap();
        (f.output, grads)
    })
}

/// A scalar test loss `L = Σ g·out` (in f64) and the Euclidean size of its terms
/// `√Σ (g·out)²`, which sets the f32 rounding error of `L`.
pub struct Loss {
    pub value: f64,
    pub magnitude: f64,
}

/// `L = ⟨g, out⟩`.
pub fn dot_loss(out: &[f32], g: &[f32]) -> Loss {
    let (mut value, mut squares) = (0.0f64, 0.0f64);
    for (o, w) in out.iter().zip(g) {
        let t = *o as f64 * *w as f64;
        value += t;
        squares += t * t;
    }
    Loss {
        value,
        magnitude: squares.sqrt(),
    }
}

/// Step of the central differences. Truncation error falls as h² and f32 rounding of the loss
/// grows as ε/h, so the error is smallest near h = ε^(1/3) ≈ 5e-3 for O(1) inputs.
pub const FD_STEP: f32 = 5e-3;

/// How many times ε·√Σ(g·out)² the f32 rounding of a loss may reach. Each output element is
/// the result of reductions over at most a few hundred terms in these tests (softmax sums, dot
/// products, GEMM tiles), so its relative rounding error is at most about √terms·ε ≈ 16ε;
/// errors of different elements are independent, so they add in quadrature in `L`.
pub const ROUNDING_GROWTH: f64 = 16.0;

/// The central difference of `f` at `base` and a bound on its error. `f` gets the perturbed
/// value of one input (f32, as the kernel sees it) and returns the loss there. The steps are
/// the exact f32 differences, the truncation error is estimated by Richardson's rule
/// (`D(2h) − D(h) ≈ 3·(D(h) − L′)`), and the rounding error is
/// `ROUNDING_GROWTH·ε·√Σ(g·out)² / (2h)`.
pub fn central_difference(base: f32, mut f: impl FnMut(f32) -> Loss) -> (f64, f64) {
    let mut diff = |h: f32| -> (f64, f64) {
        let (up, down) = (base + h, base - h);
        let (lp, lm) = (f(up), f(down));
        let d = (lp.value - lm.value) / (up as f64 - down as f64);
        let rounding = ROUNDING_GROWTH * f32::EPSILON as f64 * lp.magnitude.max(lm.magnitude)
            / (up as f64 - down as f64);
        (d, rounding)
    };
    let (d1, r1) = diff(FD_STEP);
    let (d2, r2) = diff(2.0 * FD_STEP);
    let truncation = (d2 - d1).abs() / 3.0;
    (d1, truncation + r1 + r2)
}

/// Asserts `analytic` is within the error bound of the central difference (twice the bound,
/// since both the truncation estimate and the rounding bound are estimates).
pub fn assert_derivative(what: &str, analytic: f64, base: f32, f: impl FnMut(f32) -> Loss) {
    let (fd, bound) = central_difference(base, f);
    assert!(
        (analytic - fd).abs() <= 2.0 * bound + 1e-9,
        "{what}: analytic {analytic} vs central difference {fd} (error bound {bound})"
    );
}

/// Checks `grads.dq`, `dk`, `dv` of `case` element by element against central differences of
/// `loss` (which runs the forward on a perturbed copy of the case).
pub fn check_qkv_gradients(what: &str, case: &Case, grads: &Grads, loss: impl Fn(&Case) -> Loss) {
    fn field(c: &mut Case, which: usize) -> &mut Vec<f32> {
        match which {
            0 => &mut c.q,
            1 => &mut c.k,
            _ => &mut c.v,
        }
    }
    let mut work = case.clone();
    for (which, (name, analytic)) in [("dq", &grads.dq), ("dk", &grads.dk), ("dv", &grads.dv)]
        .into_iter()
        .enumerate()
    {
        for (idx, &an) in analytic.iter().enumerate() {
            let base = field(&mut work, which)[idx];
            assert_derivative(&format!("{what}: {name}[{idx}]"), an as f64, base, |v| {
                field(&mut work, which)[idx] = v;
                loss(&work)
            });
            field(&mut work, which)[idx] = base;
        }
    }
}

/// The least-squares slope of `ln y` against `ln x` (the rate in `y ∝ x^slope`).
pub fn log_log_slope(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    let (lx, ly): (Vec<f64>, Vec<f64>) = points.iter().map(|(x, y)| (x.ln(), y.ln())).unzip();
    let (mx, my) = (lx.iter().sum::<f64>() / n, ly.iter().sum::<f64>() / n);
    let cov: f64 = lx.iter().zip(&ly).map(|(x, y)| (x - mx) * (y - my)).sum();
    let var: f64 = lx.iter().map(|x| (x - mx).powi(2)).sum();
    cov / var
}
