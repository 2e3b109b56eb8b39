//! One module per kind of chart; each turns the sources it can use into zero or more charts.

pub mod error_budget;
pub mod fidelity;
pub mod lra_matrix;
pub mod pareto;
pub mod time_n;
pub mod training;

use crate::source::{Body, CompareRow, Source};

/// The `compare` rows of one workload at one sequence length, gathered over every document
/// that measured it (one file per seed, say), with those documents' paths.
pub(crate) struct CompareGroup<'a> {
    /// The workload, in words.
    pub workload: String,
    /// Sequence length.
    pub n: usize,
    /// Its rows.
    pub rows: Vec<&'a CompareRow>,
    /// The files they came from.
    pub paths: Vec<String>,
}

/// Every (workload, n) of the `compare` documents, in the order first seen.
pub(crate) fn compare_groups(sources: &[Source]) -> Vec<CompareGroup<'_>> {
    let mut groups: Vec<CompareGroup<'_>> = Vec::new();
    for s in sources {
        let Body::Compare(c) = &s.body else { continue };
        let workload = c.workload_name();
        for r in &c.results {
            let i = match groups
                .iter()
                .position(|g| g.workload == workload && g.n == r.n)
            {
                Some(i) => i,
                None => {
                    groups.push(CompareGroup {
                        workload: workload.clone(),
                        n: r.n,
                        rows: Vec::new(),
                        paths: Vec::new(),
                    });
                    groups.len() - 1
                }
            };
            let g = &mut groups[i];
            g.rows.push(r);
            if !g.paths.contains(&s.path) {
                g.paths.push(s.path.clone());
            }
        }
    }
    groups
}

/// The distinct values of `key` over `items`, sorted.
pub(crate) fn distinct<T, K: Ord + Clone>(items: &[T], key: impl Fn(&T) -> K) -> Vec<K> {
    let mut v: Vec<K> = items.iter().map(key).collect();
    v.sort();
    v.dedup();
    v
}

/// The mean of `values`.
pub(crate) fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len().max(1) as f64
}
