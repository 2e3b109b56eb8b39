//! Sampling algorithms shared by the estimators: Vose's alias tables (MCA's per-head feature
//! distributions, drawn from in O(1) per sample) and Gumbel-top-k (Skeinformer's columns,
//! drawn without replacement in O(n)).

use rand::Rng;

use crate::rng::StreamRng;

/// Vose's alias method: `threshold[i]/2³²` is the chance of keeping `i` once drawn uniformly,
/// else `alias[i]` is taken.
pub fn build_alias(p: &[f64], threshold: &mut [u32], alias: &mut [u32]) {
    let n = p.len();
    let mut scaled: Vec<f64> = p.iter().map(|v| v * n as f64).collect();
    let (mut small, mut large): (Vec<usize>, Vec<usize>) = (0..n).partition(|&i| scaled[i] < 1.0);
    for (i, a) in alias.iter_mut().enumerate() {
        *a = i as u32;
    }
    while let (Some(&s), Some(&l)) = (small.last(), large.last()) {
        small.pop();
        threshold[s] = to_threshold(scaled[s]);
        alias[s] = l as u32;
        scaled[l] -= 1.0 - scaled[s];
        if scaled[l] < 1.0 {
            large.pop();
            small.push(l);
        }
    }
    // Leftovers hold (up to rounding) probability one.
    for i in small.into_iter().chain(large) {
        threshold[i] = u32::MAX;
        alias[i] = i as u32;
    }
    // A feature of probability zero must never be drawn (its weight 1/p would be infinite),
    // whatever the rounding above did: its own slot always passes to its alias, and an alias of
    // probability zero (only possible for rounding leftovers, which alias themselves) is
    // replaced by the most likely feature. A zero feature's Vose alias is kept: the whole
    // slot's mass belongs to it.
    let top = (0..n).max_by(|&a, &b| p[a].total_cmp(&p[b])).unwrap_or(0);
    for i in 0..n {
        if p[i] == 0.0 {
            threshold[i] = 0;
        }
        if p[alias[i] as usize] == 0.0 {
            alias[i] = top as u32;
        }
    }
}

fn to_threshold(x: f64) -> u32 {
    (x.clamp(0.0, 1.0) * 4294967296.0).min(u32::MAX as f64) as u32
}

/// `k` distinct indices drawn without replacement with probabilities proportional to `prob`
/// (zero-probability indices are never drawn; fewer than `k` come back when fewer are positive),
/// sorted. Gumbel-top-k: the `k` largest `log p_j + G_j` with Gumbel noise `G_j` have the law of
/// sequential sampling without replacement; one draw per positive index, in index order, so the
/// sample depends only on `prob` and the stream.
pub fn gumbel_top_k(prob: &[f32], k: usize, rng: &mut StreamRng) -> Vec<u32> {
    let mut keyed: Vec<(f64, u32)> = prob
        .iter()
        .enumerate()
        .filter(|(_, p)| **p > 0.0)
        .map(|(j, p)| {
            let u: f64 = rng.random_range(f64::MIN_POSITIVE..1.0);
            ((*p as f64).ln() - (-u.ln()).ln(), j as u32)
        })
        .collect();
    let take = k.min(keyed.len());
    if take > 0 && take < keyed.len() {
        keyed.select_nth_unstable_by(take - 1, |a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    }
    let mut chosen: Vec<u32> = keyed[..take].iter().map(|(_, j)| *j).collect();
    chosen.sort_unstable();
    chosen
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::stream;

    /// Draws from an alias table as MCA does: a uniform index, kept with its threshold.
    fn draw(threshold: &[u32], alias: &[u32], u: u64) -> usize {
        let n = threshold.len() as u64;
        let i = (((u >> 32) * n) >> 32) as usize;
        if (u as u32) < threshold[i] {
            i
        } else {
            alias[i] as usize
        }
    }

    #[test]
    fn alias_tables_reproduce_their_distribution_and_never_draw_zeros() {
        let p = [0.5, 0.0, 0.125, 0.25, 0.125, 0.0];
        let (mut threshold, mut alias) = (vec![0u32; 6], vec![0u32; 6]);
        build_alias(&p, &mut threshold, &mut alias);
        // Exact probabilities from the table: each slot is picked with 1/n.
        let mut exact = [0.0f64; 6];
        for i in 0..6 {
            let keep = threshold[i] as f64 / 4294967296.0;
            exact[i] += keep / 6.0;
            exact[alias[i] as usize] += (1.0 - keep) / 6.0;
        }
        for (got, want) in exact.iter().zip(&p) {
            assert!((got - want).abs() < 1e-9, "{exact:?}");
        }
        let mut rng = stream(1, 0, 0, "test");
        let mut counts = [0usize; 6];
        for _ in 0..60_000 {
            counts[draw(&threshold, &alias, rng.random())] += 1;
        }
        assert_eq!(
            (counts[1], counts[5]),
            (0, 0),
            "zero-probability features drawn"
        );
        // Binomial standard deviation at 60 000 draws is at most 0.002: allow 5 of them.
        for (c, want) in counts.iter().zip(&p) {
            assert!((*c as f64 / 60_000.0 - want).abs() < 0.01, "{counts:?}");
        }
    }

    #[test]
    fn gumbel_top_k_samples_without_replacement_in_proportion() {
        let prob = [0.4f32, 0.0, 0.3, 0.2, 0.1];
        let mut rng = stream(2, 0, 0, "test");
        let mut first = [0usize; 5];
        for _ in 0..20_000 {
            let one = gumbel_top_k(&prob, 1, &mut rng);
            first[one[0] as usize] += 1;
            let two = gumbel_top_k(&prob, 2, &mut rng);
            assert!(
                two.len() == 2 && two[0] < two[1] && !two.contains(&1),
                "{two:?}"
            );
        }
        // A single draw follows prob (binomial sd at most 0.0035 at 20 000: allow 5 of them).
        for (c, p) in first.iter().zip(&prob) {
            assert!(
                (*c as f64 / 20_000.0 - *p as f64).abs() < 0.018,
                "{first:?}"
            );
        }
        assert_eq!(
            gumbel_top_k(&prob, 9, &mut rng),
            [0, 2, 3, 4],
            "all positive ones"
        );
        assert!(gumbel_top_k(&[0.0; 3], 2, &mut rng).is_empty());
    }
}
