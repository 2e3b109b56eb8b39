//! Times YOSO's fast hash alone, on one thread: 32768 rows of `d` coordinates, 32 hashes of 12
//! bits (`hash_time D`, default 64). Prints the median and fastest of 31 calls, and a checksum
//! of the codes (equal across builds when the codes are).

use std::time::Instant;

use randattn::methods::yoso::hash::{HashFamily, LshHash};
use randattn::rng::stream;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let d: usize = std::env::args().nth(1).map_or(Ok(64), |s| s.parse())?;
    let (n, m, tau) = (32768, 32, 12);
    let rows: Vec<f32> = (0..n * d)
        .map(|i| (i.wrapping_mul(2_654_435_761) % 1000) as f32 / 500.0 - 1.0)
        .collect();
    let hash = LshHash::draw(
        HashFamily::Fast,
        d,
        tau,
        m,
        &mut stream(1, 0, 0, "hash_time"),
    )?;
    let mut codes = vec![0u32; n * m];
    let mut ms: Vec<f64> = (0..31)
        .map(|_| {
            let t = Instant::now();
            hash.codes(&rows, None, &mut codes);
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    ms.sort_by(f64::total_cmp);
    let checksum: u64 = codes.iter().map(|&c| u64::from(c)).sum();
    println!(
        "d={d}: {:.2} ms median, {:.2} ms fastest ({n} rows, {m} hashes of {tau} bits); checksum {checksum}",
        ms[15], ms[0]
    );
    Ok(())
}
