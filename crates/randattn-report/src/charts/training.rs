//! Training curves: dev accuracy against step for every run of a task, every seed drawn, one
//! colour per attention; the majority-class rate as a dashed line where an `lra collect`
//! document gives it.

use std::collections::BTreeMap;

use plotters::style::RGBColor;

use crate::ReportError;
use crate::line::{LineChart, Series};
use crate::plot::{Chart, colour, slug};
use crate::source::{Body, Source, TrainingRun};

/// The charts (one per task).
pub fn charts(sources: &[Source]) -> Result<Vec<Chart>, ReportError> {
    let mut by_task: BTreeMap<&str, Vec<(&str, &TrainingRun)>> = BTreeMap::new();
    for s in sources {
        if let Body::Run(r) = &s.body
            && !r.metrics.is_empty()
        {
            by_task.entry(&r.task).or_default().push((&s.path, r));
        }
    }
    let majority = |task: &str| {
        sources.iter().find_map(|s| match &s.body {
            Body::Lra(l) => l.majority.get(task).copied(),
            _ => None,
        })
    };
    let mut out = Vec::new();
    for (task, mut runs) in by_task {
        runs.sort_by(|a, b| (&a.1.attention, a.1.seed).cmp(&(&b.1.attention, b.1.seed)));
        let mut chart = LineChart::new(
            format!("Training curves — {task}"),
            "optimiser step",
            "dev accuracy (%)",
        );
        let mut labelled = Vec::new();
        let mut last_step = 0;
        for (_, r) in &runs {
            let pts: Vec<(f64, f64)> = r
                .metrics
                .iter()
                .map(|m| (m.step as f64, 100.0 * m.dev_acc))
                .collect();
            last_step = last_step.max(r.metrics.last().map_or(0, |m| m.step));
            let label = if labelled.contains(&r.attention) {
                String::new()
            } else {
                labelled.push(r.attention.clone());
                r.attention.clone()
            };
            let mut s = Series::line(label, colour(&r.attention), pts);
            s.width = if r.attention == "exact" { 3 } else { 1 };
            s.markers = false;
            chart.series.push(s);
        }
        if let Some(m) = majority(task) {
            chart.series.push(Series::reference(
                "majority class",
                RGBColor(120, 120, 120),
                vec![(0.0, 100.0 * m), (last_step as f64, 100.0 * m)],
            ));
        }
        let seeds = runs.len();
        out.push(Chart {
            id: format!("training-{}", slug(task)),
            title: chart.title.clone(),
            caption: format!(
                "Dev accuracy at each evaluation, {seeds} run(s), one line per seed; exact \
                 attention drawn thicker. A line that stays on the majority rate never took off."
            ),
            svg: chart.render()?,
            sources: runs.iter().map(|(p, _)| p.to_string()).collect(),
        });
    }
    Ok(out)
}
