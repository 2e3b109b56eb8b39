//! Error against budget (log–log): per method, the relative error of its output against exact
//! attention as its budget parameter ([`randattn::MethodInfo::budget`]) grows, averaged over the
//! seeds measured; the V-Mean floor as a horizontal line and the Monte-Carlo `1/√budget` slope
//! as a reference. One chart per workload and sequence length with at least one method measured
//! at two budgets or more.

use std::collections::BTreeMap;

use plotters::style::RGBColor;

use super::{compare_groups, distinct, mean};
use crate::ReportError;
use crate::line::{LineChart, Series};
use crate::plot::{Chart, colour, slug};
use crate::source::param_number;

/// The budget parameter of method `name`, if it has one.
pub fn budget_param(name: &str) -> Option<&'static str> {
    randattn::Method::catalog()
        .into_iter()
        .find(|m| m.name == name)
        .and_then(|m| m.budget)
}

/// The charts.
pub fn charts(sources: &[crate::Source]) -> Result<Vec<Chart>, ReportError> {
    let mut out = Vec::new();
    for g in compare_groups(sources) {
        let n = g.n;
        let rows = &g.rows;
        // (method, budget) → errors over seeds.
        let mut errors: BTreeMap<(String, u64), Vec<f64>> = BTreeMap::new();
        let mut floor = Vec::new();
        let mut seeds = Vec::new();
        for r in rows {
            seeds.push(r.seed);
            let Some(e) = r.rel_error else { continue };
            if r.method == "vmean" {
                floor.push(e);
            }
            let Some(p) = budget_param(&r.method) else {
                continue;
            };
            let Some(b) = param_number(&r.params, p) else {
                continue;
            };
            errors
                .entry((r.method.clone(), b as u64))
                .or_default()
                .push(e);
        }
        let mut by_method: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
        for ((m, b), e) in &errors {
            by_method
                .entry(m.clone())
                .or_default()
                .push((*b as f64, mean(e)));
        }
        by_method.retain(|_, pts| pts.len() >= 2);
        if by_method.is_empty() {
            continue;
        }
        let workload = g.workload.clone();
        let seeds = distinct(&seeds, |s| *s).len();
        let mut chart = LineChart::new(
            format!("Error vs budget — {workload}, n = {n}"),
            "budget (samples, features, landmarks, rows; log)",
            "relative error ‖O − O_exact‖ / ‖O_exact‖ (log)",
        );
        chart.x_log = true;
        chart.y_log = true;
        let (mut x_lo, mut x_hi) = (f64::INFINITY, 0.0f64);
        for (m, pts) in &by_method {
            let param = budget_param(m).unwrap_or("budget");
            for p in pts {
                x_lo = x_lo.min(p.0);
                x_hi = x_hi.max(p.0);
            }
            chart.series.push(Series::line(
                format!("{m} ({param})"),
                colour(m),
                pts.clone(),
            ));
        }
        if !floor.is_empty() {
            let f = mean(&floor);
            chart.series.push(Series::reference(
                "V-Mean floor (output the mean of V)",
                colour("vmean"),
                vec![(x_lo, f), (x_hi, f)],
            ));
        }
        // The 1/√budget slope, through the median error at the smallest budget.
        let mut first: Vec<f64> = by_method
            .values()
            .filter_map(|p| p.iter().find(|q| q.0 == x_lo).map(|q| q.1))
            .collect();
        first.sort_by(f64::total_cmp);
        if let Some(&y0) = first.get(first.len() / 2) {
            chart.series.push(Series::reference(
                "∝ 1/√budget (Monte-Carlo rate)",
                RGBColor(170, 170, 170),
                vec![(x_lo, y0), (x_hi, y0 * (x_lo / x_hi).sqrt())],
            ));
        }
        out.push(Chart {
            id: format!("error-budget-{}-{n}", slug(&workload)),
            title: chart.title.clone(),
            caption: format!(
                "Lines that fall parallel to the grey 1/√budget slope improve as Monte-Carlo \
                 estimators do; a method above the dashed V-Mean floor does worse than \
                 outputting the mean of V. Mean over {seeds} seed(s)."
            ),
            svg: chart.render()?,
            sources: g.paths.clone(),
        });
    }
    Ok(out)
}
