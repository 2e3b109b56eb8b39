//! The LRA matrix as a heat map: one row per attention, one column per task. Each cell shows the
//! mean test accuracy, its spread over seeds and the seed count; its colour is the share of
//! softmax's gain over the majority class that the attention keeps — `(acc − majority) /
//! (exact − majority)`: green at or above softmax, yellow at half, red at the majority class or
//! below. A task on which softmax itself stays within two points of the majority class does not
//! discriminate: its column is grey.

use plotters::prelude::*;
use plotters::style::RGBColor;

use super::distinct;
use crate::ReportError;
use crate::plot::{Chart, font, svg};
use crate::source::{Body, LraCell, LraMatrix, Source};

/// The colour of a kept share `g` of softmax's gain (clamped to `[0, 1]`): red → yellow → green.
fn heat(g: f64) -> RGBColor {
    let g = g.clamp(0.0, 1.0);
    let (r0, g0, b0, r1, g1, b1, t) = if g < 0.5 {
        (215.0, 48.0, 39.0, 254.0, 224.0, 139.0, g / 0.5)
    } else {
        (254.0, 224.0, 139.0, 26.0, 152.0, 80.0, (g - 0.5) / 0.5)
    };
    let mix = |a: f64, b: f64| (a + (b - a) * t).round() as u8;
    RGBColor(mix(r0, r1), mix(g0, g1), mix(b0, b1))
}

/// Whether softmax rises clearly (two points) above the majority class on `task`.
fn discriminates(l: &LraMatrix, task: &str) -> Option<f64> {
    let exact = l
        .results
        .iter()
        .find(|c| c.task == task && c.attention == "exact")?;
    let majority = *l.majority.get(task)?;
    (exact.test_acc_mean - majority > 0.02).then_some(exact.test_acc_mean - majority)
}

fn cell_text(c: &LraCell) -> (String, String) {
    let acc = match c.test_acc_std {
        Some(sd) => format!("{:.1} ± {:.1}", 100.0 * c.test_acc_mean, 100.0 * sd),
        None => format!("{:.1}", 100.0 * c.test_acc_mean),
    };
    let seeds = match c.took_off {
        Some(t) => format!("{} seed(s), {t} took off", c.seeds),
        None => format!("{} seed(s)", c.seeds),
    };
    (acc, seeds)
}

/// The charts (one per `lra collect` document).
pub fn charts(sources: &[Source]) -> Result<Vec<Chart>, ReportError> {
    let mut out = Vec::new();
    for s in sources {
        let Body::Lra(l) = &s.body else { continue };
        if l.results.is_empty() {
            continue;
        }
        // Tasks and attentions in the order `collect` reported them.
        let mut tasks: Vec<String> = Vec::new();
        let mut attentions: Vec<String> = Vec::new();
        for c in &l.results {
            if !tasks.contains(&c.task) {
                tasks.push(c.task.clone());
            }
            if !attentions.contains(&c.attention) {
                attentions.push(c.attention.clone());
            }
        }
        let (w, h) = crate::plot::SIZE;
        let (left, top, right, bottom) = (150i32, 70i32, 10i32, 40i32);
        let cw = (w as i32 - left - right) / tasks.len() as i32;
        let rh = ((h as i32 - top - bottom) / (attentions.len() as i32 + 1)).min(40);
        let text = svg(|root| {
            root.draw(&Text::new(
                "LRA matrix — test accuracy (%), mean ± sd over seeds",
                (w as i32 / 2, 12),
                font(20).pos(plotters::style::text_anchor::Pos::new(
                    plotters::style::text_anchor::HPos::Center,
                    plotters::style::text_anchor::VPos::Top,
                )),
            ))?;
            let centre = plotters::style::text_anchor::Pos::new(
                plotters::style::text_anchor::HPos::Center,
                plotters::style::text_anchor::VPos::Center,
            );
            let right_align = plotters::style::text_anchor::Pos::new(
                plotters::style::text_anchor::HPos::Right,
                plotters::style::text_anchor::VPos::Center,
            );
            for (j, t) in tasks.iter().enumerate() {
                let x = left + j as i32 * cw + cw / 2;
                let maj = l
                    .majority
                    .get(t)
                    .map_or(String::new(), |m| format!(" (majority {:.1})", 100.0 * m));
                root.draw(&Text::new(t.clone(), (x, top - 30), font(15).pos(centre)))?;
                root.draw(&Text::new(maj, (x, top - 12), font(11).pos(centre)))?;
            }
            for (i, a) in attentions.iter().enumerate() {
                let y = top + i as i32 * rh;
                root.draw(&Text::new(
                    a.clone(),
                    (left - 8, y + rh / 2),
                    font(14).pos(right_align),
                ))?;
                for (j, t) in tasks.iter().enumerate() {
                    let x = left + j as i32 * cw;
                    let Some(c) = l.results.iter().find(|c| &c.task == t && &c.attention == a)
                    else {
                        let at = (x + cw / 2, y + rh / 2);
                        root.draw(&Text::new("not run", at, font(11).pos(centre)))?;
                        continue;
                    };
                    let fill = match (discriminates(l, t), l.majority.get(t)) {
                        (Some(gain), Some(m)) => heat((c.test_acc_mean - m) / gain),
                        _ => RGBColor(215, 215, 215),
                    };
                    root.draw(&Rectangle::new(
                        [(x + 1, y + 1), (x + cw - 1, y + rh - 1)],
                        fill.filled(),
                    ))?;
                    let (acc, seeds) = cell_text(c);
                    root.draw(&Text::new(
                        acc,
                        (x + cw / 2, y + rh / 2 - 3),
                        font(13).pos(centre),
                    ))?;
                    root.draw(&Text::new(
                        seeds,
                        (x + cw / 2, y + rh / 2 + 10),
                        font(10).pos(centre),
                    ))?;
                }
            }
            let y = top + attentions.len() as i32 * rh + 16;
            for (k, (label, g)) in [
                ("≤ majority", 0.0),
                ("half of softmax's gain", 0.5),
                ("≥ softmax", 1.0),
            ]
            .iter()
            .enumerate()
            {
                let x = left + k as i32 * 190;
                root.draw(&Rectangle::new(
                    [(x, y), (x + 16, y + 14)],
                    heat(*g).filled(),
                ))?;
                root.draw(&Text::new(
                    label.to_string(),
                    (x + 22, y + 7),
                    font(12).pos(plotters::style::text_anchor::Pos::new(
                        plotters::style::text_anchor::HPos::Left,
                        plotters::style::text_anchor::VPos::Center,
                    )),
                ))?;
            }
            let x = left + 3 * 190;
            root.draw(&Rectangle::new(
                [(x, y), (x + 16, y + 14)],
                RGBColor(215, 215, 215).filled(),
            ))?;
            root.draw(&Text::new(
                "softmax ≈ majority",
                (x + 22, y + 7),
                font(12).pos(plotters::style::text_anchor::Pos::new(
                    plotters::style::text_anchor::HPos::Left,
                    plotters::style::text_anchor::VPos::Center,
                )),
            ))?;
            Ok(())
        })?;
        let grey: Vec<&str> = tasks
            .iter()
            .filter(|t| discriminates(l, t).is_none())
            .map(String::as_str)
            .collect();
        let seeds = distinct(&l.results, |c| c.seeds);
        out.push(Chart {
            id: "lra-matrix".into(),
            title: "LRA matrix".into(),
            caption: format!(
                "Colour = the share of softmax's gain over the majority class each attention \
                 keeps; {} runs{}. {}",
                l.runs,
                if seeds.len() > 1 {
                    ", unequal seed counts per cell"
                } else {
                    ""
                },
                if grey.is_empty() {
                    String::new()
                } else {
                    format!(
                        "Grey columns ({}): softmax stays within two points of the majority class, \
                         so the task does not discriminate here.",
                        grey.join(", ")
                    )
                }
            ),
            svg: text,
            sources: vec![s.path.clone()],
        });
    }
    Ok(out)
}
