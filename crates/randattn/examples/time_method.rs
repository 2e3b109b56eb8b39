//! Times one method's forward (and backward) on the clustered workload, without the exact
//! baseline: a quick profiling target (`perf record cargo run --release --example time_method`).
//!
//! Usage: `time_method METHOD N [REPEATS] [key=value ...]`. `FORWARD_ONLY=1` skips the backward;
//! `FIXED_SEED=1` uses seed 0 for every repeat (otherwise repeat `r` uses seed `r`);
//! `HEAD_DIM=d` sets the head dimension (default 64).

use std::time::Instant;

use randattn::{Attention, AttentionInputs, Method, workload};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let name = args.first().map_or("yoso", String::as_str);
    let n: usize = args.get(1).map_or(Ok(4096), |s| s.parse())?;
    let repeats: usize = args.get(2).map_or(Ok(10), |s| s.parse())?;
    let settings: Vec<(String, String)> = args
        .iter()
        .skip(3)
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let method = Method::parse(name, &settings)?;
    let d: usize = std::env::var("HEAD_DIM").map_or(Ok(64), |s| s.parse())?;
    let w = workload::clustered(1, 8, n, d, 0);
    let s = w.dims.q_shape();
    let x = AttentionInputs::new(&w.q, s, &w.k, s, &w.v, s)?;
    let g: Vec<f32> = (0..w.q.len())
        .map(|i| ((i * 7) % 13) as f32 - 6.0)
        .collect();
    let (mut fwd_ms, mut bwd_ms) = (Vec::new(), Vec::new());
    let fixed_seed = std::env::var_os("FIXED_SEED").is_some();
    for repeat in 0..repeats as u64 {
        let seed = if fixed_seed { 0 } else { repeat };
        let t = Instant::now();
        let f = method.forward(&x, seed)?;
        fwd_ms.push(t.elapsed().as_secs_f64() * 1e3);
        if std::env::var_os("FORWARD_ONLY").is_some() {
            bwd_ms.push(0.0);
            continue;
        }
        let t = Instant::now();
        method.backward(&x, seed, &f.saved, &g)?;
        bwd_ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!(
        "{name} n={n}: forward {:.2} ms, backward {:.2} ms (medians of {repeats})",
        median(&mut fwd_ms),
        median(&mut bwd_ms)
    );
    Ok(())
}
