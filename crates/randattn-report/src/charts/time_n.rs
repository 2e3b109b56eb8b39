//! Time against sequence length (log–log), forward and forward + backward, every method with
//! exact attention (and PyTorch SDPA when a peer's JSON is given) as the reference; the legend
//! gives the crossover n from which each method is faster than exact, and a ring marks it. Peak
//! memory against n from the same `bench` documents.

use std::collections::BTreeMap;

use super::distinct;
use crate::ReportError;
use crate::line::{LineChart, Mark, Series};
use crate::plot::{Chart, colour};
use crate::source::{BenchRow, Body, Source};

/// A measured quantity of a bench row.
#[derive(Clone, Copy)]
enum Quantity {
    Forward,
    ForwardBackward,
    Memory,
}

impl Quantity {
    fn of(self, r: &BenchRow) -> Option<f64> {
        match self {
            Quantity::Forward => Some(r.forward_ms),
            Quantity::ForwardBackward => r.backward_ms.map(|b| r.forward_ms + b),
            Quantity::Memory => r.peak_extra_bytes.map(|b| b / (1024.0 * 1024.0)),
        }
    }
}

/// Where `method` (times `m`) becomes faster than `exact` (times `e`), both at the same sorted
/// `n`: interpolated in log–log between the last n where it was slower and the first where it is
/// faster (and stays faster at every larger n measured); the smallest n if it is faster from the
/// start; `None` if it is not faster at the largest n.
pub fn crossover(points: &[(f64, f64, f64)]) -> Option<(f64, f64)> {
    let faster = |p: &(f64, f64, f64)| p.1 < p.2;
    let last_slow = points.iter().rposition(|p| !faster(p));
    match last_slow {
        None => points.first().map(|p| (p.0, p.1)),
        Some(i) if i + 1 == points.len() => None,
        Some(i) => {
            let (a, b) = (points[i], points[i + 1]);
            // ln(m/e) is linear in ln n between a and b; it crosses zero at t.
            let (ra, rb) = ((a.1 / a.2).ln(), (b.1 / b.2).ln());
            let t = ra / (ra - rb);
            let n = (a.0.ln() + t * (b.0.ln() - a.0.ln())).exp();
            let y = (a.2.ln() + t * (b.2.ln() - a.2.ln())).exp();
            Some((n, y))
        }
    }
}

/// (batch, heads, d) of a bench row.
type Shape = (usize, usize, usize);

/// The charts.
pub fn charts(sources: &[Source]) -> Result<Vec<Chart>, ReportError> {
    // Rows of every bench document (ours and peers'), by shape (batch, heads, d).
    let mut groups: BTreeMap<Shape, Vec<(&str, &BenchRow)>> = BTreeMap::new();
    for s in sources {
        if let Body::Bench(b) = &s.body {
            for r in &b.results {
                groups
                    .entry((r.batch, r.heads, r.d))
                    .or_default()
                    .push((s.path.as_str(), r));
            }
        }
    }
    let mut out = Vec::new();
    for ((batch, heads, d), rows) in groups {
        let shape = format!("batch {batch}, {heads} heads, d = {d}");
        let files = distinct(&rows, |(p, _)| p.to_string());
        for (q, id, title, y_desc) in [
            (
                Quantity::Forward,
                "time-forward",
                "Forward time vs n",
                "median forward time, ms (log)",
            ),
            (
                Quantity::ForwardBackward,
                "time-forward-backward",
                "Forward + backward time vs n",
                "median forward + backward time, ms (log)",
            ),
            (
                Quantity::Memory,
                "memory",
                "Peak memory vs n",
                "peak memory beyond the inputs, MiB (log)",
            ),
        ] {
            let mut by_label: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
            for (_, r) in &rows {
                if let Some(v) = q.of(r) {
                    by_label
                        .entry(r.label().to_string())
                        .or_default()
                        .push((r.n as f64, v));
                }
            }
            by_label.retain(|_, p| !p.is_empty());
            if by_label.is_empty() {
                continue;
            }
            for p in by_label.values_mut() {
                p.sort_by(|a, b| a.0.total_cmp(&b.0));
            }
            let mut chart = LineChart::new(
                format!("{title} — {shape}"),
                "sequence length n (log)",
                y_desc,
            );
            chart.x_log = true;
            chart.y_log = true;
            let exact = by_label.get("exact").cloned();
            for (label, pts) in &by_label {
                let mut s = Series::line(label.clone(), colour(label), pts.clone());
                if label == "exact" {
                    s.width = 4;
                    s.label = "exact (reference)".into();
                } else if label.starts_with("torch") {
                    s.dashed = true;
                    s.label = format!("{label} (PyTorch)");
                } else if let (Some(e), false) = (&exact, matches!(q, Quantity::Memory)) {
                    // The crossover with exact, at the n both measured.
                    let both: Vec<(f64, f64, f64)> = pts
                        .iter()
                        .filter_map(|&(n, t)| e.iter().find(|p| p.0 == n).map(|p| (n, t, p.1)))
                        .collect();
                    match crossover(&both) {
                        Some((n, y)) => {
                            s.label = if n <= both[0].0 {
                                format!("{label} (faster at every n)")
                            } else {
                                format!("{label} (faster from n ≈ {n:.0})")
                            };
                            chart.marks.push(Mark {
                                text: String::new(),
                                at: (n, y),
                                colour: colour(label),
                            });
                        }
                        None if !both.is_empty() => {
                            s.label = format!("{label} (not faster)");
                        }
                        None => {}
                    }
                }
                chart.series.push(s);
            }
            let caption = match q {
                Quantity::Memory => "Peak memory one call allocates beyond its inputs (forward, \
                                     plus backward where it was timed): a slope of 1 is memory \
                                     linear in n, 2 quadratic."
                    .to_string(),
                _ => "The thick black line is exact attention; a ring marks where a method \
                      becomes faster than it (the crossover n, in the legend). Slopes: 2 for \
                      quadratic methods, 1 for linear ones."
                    .to_string(),
            };
            out.push(Chart {
                id: format!("{id}-b{batch}-h{heads}-d{d}"),
                title: chart.title.clone(),
                caption,
                svg: chart.render()?,
                sources: files.clone(),
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::crossover;

    #[test]
    fn crossover_is_interpolated_in_log_log() {
        // Twice as slow at 100, twice as fast at 400: the ratio crosses 1 at 200.
        let (n, y) = crossover(&[(100.0, 2.0, 1.0), (400.0, 8.0, 16.0)]).unwrap();
        assert!((n - 200.0).abs() < 1e-9, "{n}");
        assert!((y - 4.0).abs() < 1e-9, "{y}");
        assert_eq!(crossover(&[(100.0, 1.0, 2.0)]), Some((100.0, 1.0)));
        assert_eq!(crossover(&[(100.0, 1.0, 2.0), (200.0, 3.0, 2.0)]), None);
        // Faster, slower, faster: the last crossing counts.
        let (n, _) = crossover(&[(1.0, 1.0, 2.0), (10.0, 4.0, 2.0), (100.0, 1.0, 4.0)]).unwrap();
        assert!(n > 10.0 && n < 100.0);
    }
}
