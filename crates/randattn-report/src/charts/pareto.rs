//! Accuracy against cost: every (method, budget) of a `compare` document as a point of
//! relative error against forward time, with the Pareto front (no other point is both faster and
//! more accurate) as a dashed line; and, from `lra collect`, each attention's LRA accuracy
//! averaged over tasks against its median training step time.

use std::collections::BTreeMap;

use plotters::style::BLACK;

use super::{compare_groups, distinct, mean};
use crate::ReportError;
use crate::line::{LineChart, Series};
use crate::plot::{Chart, colour, slug};
use crate::source::{Body, Source};

/// The points of `points` (cost, error) that no other point beats in both, by cost.
pub fn front(points: &[(f64, f64)]) -> Vec<(f64, f64)> {
    let mut sorted = points.to_vec();
    sorted.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.total_cmp(&b.1)));
    let mut out: Vec<(f64, f64)> = Vec::new();
    for p in sorted {
        if out.last().is_none_or(|l| p.1 < l.1) {
            out.push(p);
        }
    }
    out
}

fn scatter(label: String, pts: Vec<(f64, f64)>) -> Series {
    let c = colour(&label);
    Series::dots(label, c, pts)
}

/// The charts.
pub fn charts(sources: &[Source]) -> Result<Vec<Chart>, ReportError> {
    let mut out = Vec::new();
    for g in compare_groups(sources) {
        let n = g.n;
        // (method, spec) → (time, error) over seeds.
        let mut cells: BTreeMap<(String, String), (Vec<f64>, Vec<f64>)> = BTreeMap::new();
        for r in &g.rows {
            if let Some(e) = r.rel_error.filter(|_| r.method != "exact") {
                let c = cells.entry((r.method.clone(), r.spec.clone())).or_default();
                c.0.push(r.forward_ms);
                c.1.push(e);
            }
        }
        if cells.len() < 2 {
            continue;
        }
        let mut by_method: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
        for ((m, _), (t, e)) in &cells {
            by_method
                .entry(m.clone())
                .or_default()
                .push((mean(t), mean(e)));
        }
        let all: Vec<(f64, f64)> = by_method.values().flatten().copied().collect();
        let workload = g.workload.clone();
        let mut chart = LineChart::new(
            format!("Error vs time — {workload}, n = {n}"),
            "median forward time, ms (log)",
            "relative error vs exact (log)",
        );
        chart.x_log = true;
        chart.y_log = true;
        for (m, pts) in by_method {
            chart.series.push(scatter(m, pts));
        }
        let mut f = Series::reference("Pareto front", BLACK, front(&all));
        f.width = 1;
        chart.series.push(f);
        let exact: Vec<f64> = g
            .rows
            .iter()
            .filter(|r| r.method == "exact")
            .map(|r| r.forward_ms)
            .collect();
        let exact_ms = (!exact.is_empty()).then(|| mean(&exact));
        out.push(Chart {
            id: format!("pareto-{}-{n}", slug(&workload)),
            title: chart.title.clone(),
            caption: format!(
                "One point per method and budget; the dashed line joins the points that no \
                 other beats in both time and error — the methods worth choosing at some \
                 budget. Exact attention takes {} ms here (error 0).",
                exact_ms.map_or("-".into(), |t| format!("{t:.3}"))
            ),
            svg: chart.render()?,
            sources: g.paths.clone(),
        });
    }
    for s in sources {
        let Body::Lra(l) = &s.body else { continue };
        let tasks = distinct(&l.results, |c| c.task.clone());
        let mut chart = LineChart::new(
            "LRA accuracy vs training step time",
            "median training step, ms (mean over tasks)",
            "test accuracy, mean over tasks and seeds (%)",
        );
        let mut pts = Vec::new();
        for a in distinct(&l.results, |c| c.attention.clone()) {
            let cells: Vec<_> = l.results.iter().filter(|c| c.attention == a).collect();
            if cells.len() != tasks.len() {
                continue;
            }
            let acc = mean(
                &cells
                    .iter()
                    .map(|c| 100.0 * c.test_acc_mean)
                    .collect::<Vec<_>>(),
            );
            let ms = mean(&cells.iter().map(|c| c.step_ms).collect::<Vec<_>>());
            pts.push((ms, acc));
            chart.series.push(scatter(a.clone(), vec![(ms, acc)]));
        }
        if pts.len() < 2 {
            continue;
        }
        let best: Vec<(f64, f64)> = front(&pts.iter().map(|p| (p.0, -p.1)).collect::<Vec<_>>())
            .into_iter()
            .map(|p| (p.0, -p.1))
            .collect();
        let mut f = Series::reference("Pareto front", BLACK, best);
        f.width = 1;
        chart.series.push(f);
        out.push(Chart {
            id: "pareto-lra".into(),
            title: chart.title.clone(),
            caption: format!(
                "One point per attention with results on all {} tasks ({}); up and to the left is \
                 better. Differences within the seed spread of the matrix below are not findings.",
                tasks.len(),
                tasks.join(", ")
            ),
            svg: chart.render()?,
            sources: vec![s.path.clone()],
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::front;

    #[test]
    fn the_front_keeps_only_unbeaten_points() {
        let pts = [(1.0, 0.9), (2.0, 0.5), (3.0, 0.6), (4.0, 0.1), (0.5, 1.0)];
        assert_eq!(
            front(&pts),
            vec![(0.5, 1.0), (1.0, 0.9), (2.0, 0.5), (4.0, 0.1)]
        );
    }
}
