//! The floor that matrix products alone put under a method: each method's large products (the
//! shapes and transposes its code multiplies, per head), run for B·H heads on the thread pool
//! with the crate's own `matmul`, and nothing else. A method cannot be faster than its products;
//! the README's performance section compares these floors with the goals.
//!
//! Usage: `product_floor [N] [HEADS] [REPEATS]` (defaults 4096, 8, 41). Prints, per method and
//! pass, the number of products, their GFLOP, and the median and fastest wall time.

use std::time::Instant;

use randattn::matrix::{MatMut, MatRef, matmul};
use rayon::prelude::*;

/// One product `C (m × n) = op(A) (m × k) · op(B) (k × n)`; `ta`/`tb`: the operand is stored
/// transposed (`k × m`, `n × k`) and read through a transposed view, as the method does.
#[derive(Clone, Copy)]
struct Product {
    m: usize,
    k: usize,
    n: usize,
    ta: bool,
    tb: bool,
}

const fn p(m: usize, k: usize, n: usize, ta: bool, tb: bool) -> Product {
    Product { m, k, n, ta, tb }
}

/// One product's `A`, `B` and `C`.
type Operands = (Vec<f32>, Vec<f32>, Vec<f32>);

/// Median and fastest wall time (ms) of `set` for `heads` heads in parallel.
fn time_set(set: &[Product], heads: usize, repeats: usize) -> (f64, f64) {
    let mut buffers: Vec<Vec<Operands>> = (0..heads)
        .map(|h| {
            set.iter()
                .map(|q| {
                    let fill = |len: usize, salt: usize| -> Vec<f32> {
                        (0..len)
                            .map(|i| ((i * 31 + salt + h) % 17) as f32 / 17.0 - 0.5)
                            .collect()
                    };
                    (
                        fill(q.m * q.k, 1),
                        fill(q.k * q.n, 2),
                        vec![0.0f32; q.m * q.n],
                    )
                })
                .collect()
        })
        .collect();
    let mut times = Vec::with_capacity(repeats);
    for _ in 0..repeats {
        let started = Instant::now();
        buffers.par_iter_mut().for_each(|head| {
            for (q, (a, b, c)) in set.iter().zip(head.iter_mut()) {
                let a = if q.ta {
                    MatRef::new(a, q.k, q.m).t()
                } else {
                    MatRef::new(a, q.m, q.k)
                };
                let b = if q.tb {
                    MatRef::new(b, q.n, q.k).t()
                } else {
                    MatRef::new(b, q.k, q.n)
                };
                matmul(MatMut::new(c, q.m, q.n), false, a, b, 1.0);
            }
        });
        times.push(started.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    (times[times.len() / 2], times[0])
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let n: usize = args.first().map_or(Ok(4096), |s| s.parse())?;
    let heads: usize = args.get(1).map_or(Ok(8), |s| s.parse())?;
    let repeats: usize = args.get(2).map_or(Ok(41), |s| s.parse())?;
    let (d, f, t) = (64, false, true);
    // LARA, C = 64 proposals (J = 64 samples, [ω; q̃] 128 rows): forward, the backward's
    // rebuild of the key softmaxes and of W (F is saved), then the backward's own products.
    let (j, jc) = (64, 128);
    let lara_fwd = [
        p(j, d, n, f, t),  // ω yᵀ
        p(j, n, d, f, f),  // softmax · V
        p(n, d, jc, f, t), // x [ω; q̃]ᵀ
        p(n, j, d, f, f),  // W F
    ];
    let lara_bwd = [
        p(j, d, n, f, t),
        p(n, d, jc, f, t),
        p(n, d, j, f, t),  // G Fᵀ
        p(j, n, d, t, f),  // Wᵀ G
        p(jc, n, d, t, f), // Dᵀ x
        p(n, jc, d, f, f), // D [ω; q̃]
        p(j, d, n, f, t),  // dF Vᵀ
        p(n, j, d, t, f),  // Pᵀ dF
        p(j, n, d, f, f),  // dA y
        p(n, j, d, t, f),  // dAᵀ ω
    ];
    // Nyströmformer, 64 landmarks: forward; the backward recomputes the two n × m kernels.
    let m = 64;
    let nystrom_fwd = [
        p(n, d, m, f, t), // K1 logits Q K̃ᵀ
        p(m, d, n, f, t), // K3 logits Q̃ Kᵀ
        p(m, n, d, f, f), // W = K3 V
        p(n, m, d, f, f), // K1 Y
    ];
    let nystrom_bwd = [
        p(n, d, m, f, t),
        p(m, d, n, f, t),
        p(n, d, m, f, t), // dK1 = G Yᵀ
        p(m, n, d, t, f), // dY = K1ᵀ G
        p(m, d, n, f, t), // dK3 = dW Vᵀ
        p(n, m, d, t, f), // dV = K3ᵀ dW
        p(n, m, d, f, f), // dQ = dS1 K̃
        p(m, n, d, t, f), // dK̃ = dS1ᵀ Q
        p(m, n, d, f, f), // dQ̃ = dS3 K
        p(n, m, d, t, f), // dK = dS3ᵀ Q̃
    ];
    // Linformer, k = 256, fixed projections: E K, F V, then exact attention over k columns;
    // the backward recomputes the scores.
    let k = 256;
    let linformer_fwd = [
        p(k, n, d, f, f), // E K
        p(k, n, d, f, f), // F V
        p(n, d, k, f, t), // Q K'ᵀ
        p(n, k, d, f, f), // P V'
    ];
    let linformer_bwd = [
        p(n, d, k, f, t), // Q K'ᵀ again
        p(k, n, d, t, f), // dV' = Pᵀ dO
        p(n, d, k, f, t), // dP = dO V'ᵀ
        p(k, n, d, t, f), // dK' = dSᵀ Q
        p(n, k, d, f, f), // dQ = dS K'
        p(n, k, d, t, f), // dK = Eᵀ dK'
        p(n, k, d, t, f), // dV = Fᵀ dV'
    ];
    // Skeinformer, 256 pilot rows and 256 sampled columns: the pilot rows' exact attention
    // (scores over every key, then their values), and the sketch over the sampled columns for
    // every query (its code runs the sketch in row blocks; whole products are no slower). Its
    // backward is not listed.
    let s = 256;
    let skeinformer_fwd = [
        p(s, d, n, f, t), // pilot scores Q_J Kᵀ
        p(s, n, d, f, f), // pilot rows · V
        p(n, d, s, f, t), // Q K_Sᵀ
        p(n, s, d, f, f), // sketch · V_S
    ];
    println!(
        "products alone, n = {n}, {heads} heads, d = {d}, {} threads (median / fastest of {repeats})",
        rayon::current_num_threads()
    );
    println!("| method | pass | products | GFLOP | ms | GFLOP/s |");
    println!("|---|---|---|---|---|---|");
    for (name, fwd, bwd) in [
        ("lara", &lara_fwd[..], &lara_bwd[..]),
        ("nystrom", &nystrom_fwd[..], &nystrom_bwd[..]),
        ("linformer", &linformer_fwd[..], &linformer_bwd[..]),
        ("skeinformer", &skeinformer_fwd[..], &[][..]),
    ] {
        let both: Vec<Product> = fwd.iter().chain(bwd).copied().collect();
        let passes = [("forward", fwd), ("forward + backward", &both[..])];
        for (pass, set) in &passes[..if bwd.is_empty() { 1 } else { 2 }] {
            let flop: f64 = set
                .iter()
                .map(|q| 2.0 * (q.m * q.k * q.n * heads) as f64)
                .sum();
            let (median, fastest) = time_set(set, heads, repeats);
            println!(
                "| {name} | {pass} | {} | {:.2} | {median:.2} / {fastest:.2} | {:.0} |",
                set.len(),
                flop / 1e9,
                flop / median / 1e6
            );
        }
    }
    Ok(())
}
