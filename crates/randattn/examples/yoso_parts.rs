//! Where YOSO's forward time goes as `n` grows: the whole `yoso` forward, its hashing alone (the
//! codes of Q and K of every head, with the forward's own hash functions, on the same thread
//! pool), and the rest — the bucket numbering and the scatter and gather of value rows — on the
//! clustered workload at the default budget (`m = 32` hashes of `τ = ⌈log2 n⌉` bits).
//!
//! Usage: `yoso_parts [N,N,...] [HEADS] [REPEATS]` (defaults 4096,16384,65536, 8, 7); `d = d_v =
//! 64`. Prints medians in ms and, from the second `n` on, each part's growth over the previous
//! `n`. Run it with the allocator settings `randattn bench` uses
//! (`MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=2147483647`).

use std::time::Instant;

use randattn::methods::yoso::Yoso;
use randattn::{Attention, AttentionInputs, Method, workload};
use rayon::prelude::*;

const D: usize = 64;

/// Median wall time (ms) of `f` over `repeats` calls.
fn median_ms(repeats: usize, mut f: impl FnMut()) -> f64 {
    let mut ms: Vec<f64> = (0..repeats)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    ms.sort_by(f64::total_cmp);
    ms[ms.len() / 2]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let ns: Vec<usize> = args
        .first()
        .map_or("4096,16384,65536", String::as_str)
        .split(',')
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    let heads: usize = args.get(1).map_or(Ok(8), |s| s.parse())?;
    let repeats: usize = args.get(2).map_or(Ok(7), |s| s.parse())?;
    let method = Method::parse::<String>("yoso", &[])?;
    let mut previous: Option<[f64; 3]> = None;
    for n in ns {
        let w = workload::clustered(1, heads, n, D, 0);
        let s = w.dims.q_shape();
        let x = AttentionInputs::new(&w.q, s, &w.k, s, &w.v, s)?;
        let forward = median_ms(repeats, || {
            method.forward(&x, 0).expect("the workload is valid");
        });
        let hashers = (0..heads)
            .map(|h| Yoso::default().hasher(w.dims, 0, 0, h))
            .collect::<Result<Vec<_>, _>>()?;
        let (tau, m) = (hashers[0].tau(), hashers[0].hashes());
        let mut codes = vec![(vec![0u32; n * m], vec![0u32; n * m]); heads];
        let hash = median_ms(repeats, || {
            codes.par_iter_mut().enumerate().for_each(|(h, (qc, kc))| {
                hashers[h].codes(x.q_head(h), None, qc);
                hashers[h].codes(x.k_head(h), None, kc);
            });
        });
        let parts = [forward, hash, forward - hash];
        let growth = previous.map_or_else(String::new, |p| {
            format!(
                "; growth ×{:.2} / ×{:.2} / ×{:.2}",
                parts[0] / p[0],
                parts[1] / p[1],
                parts[2] / p[2]
            )
        });
        println!(
            "n={n} τ={tau} m={m}: forward {forward:.1} ms = hash {hash:.1} + buckets {:.1}{growth}",
            parts[2]
        );
        previous = Some(parts);
    }
    Ok(())
}
