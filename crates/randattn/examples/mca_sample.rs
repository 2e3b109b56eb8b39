//! Times `Mca::sample_values` alone on the built-in workload with given uniform budgets:
//! `mca_sample [BUDGET] [REPEATS]` (n = 512, 12 heads of 32, d_model = 384).
use randattn::methods::mca::Mca;
use randattn::workload::clustered;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let r: u32 = args.get(1).map_or(40, |a| a.parse().expect("budget"));
    let repeats: usize = args.get(2).map_or(200, |a| a.parse().expect("repeats"));
    let w = clustered(1, 12, 512, 32, 0);
    let x = w.inputs().expect("inputs");
    let mca = Mca::default();
    let prep = mca.prepare(&w.wv, w.d_model, 12, 32).expect("prepare");
    let budgets = vec![r; 12 * 512];
    let mut times = Vec::new();
    for seed in 0..repeats as u64 {
        let t = std::time::Instant::now();
        std::hint::black_box(
            mca.sample_values(&x, &prep, &budgets, seed)
                .expect("sample"),
        );
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    let med = times[times.len() / 2];
    let draws = (r as f64) * 12.0 * 512.0;
    println!(
        "r={r}: median {med:.3} ms, {:.2} ns per draw (all threads), exact GEMM equivalent {:.3} ms",
        med * 1e6 / draws,
        {
            let t = std::time::Instant::now();
            for _ in 0..20 {
                std::hint::black_box(Mca::exact_projection(&x).expect("exact"));
            }
            t.elapsed().as_secs_f64() * 1e3 / 20.0
        }
    );
}
