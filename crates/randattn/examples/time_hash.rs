use randattn::methods::yoso::{HashFamily, LshHash};
use randattn::rng::stream;
use std::time::Instant;
fn main() {
    let (n, d, tau, m) = (4096usize, 64usize, 12u32, 32usize);
    let rows: Vec<f32> = (0..n * d)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.01)
        .collect();
    for family in [HashFamily::Fast, HashFamily::SimHash] {
        let h = LshHash::draw(family, d, tau, m, &mut stream(0, 0, 0, "t")).unwrap();
        let mut codes = vec![0u32; n * m];
        let mut best = f64::MAX;
        for _ in 0..20 {
            let t = Instant::now();
            h.codes(&rows, None, &mut codes);
            best = best.min(t.elapsed().as_secs_f64() * 1e3);
        }
        println!(
            "{family:?}: {best:.3} ms checksum {}",
            codes.iter().map(|&c| c as u64).sum::<u64>()
        );
    }
}
