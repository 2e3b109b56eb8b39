//! The pretrained model with each method in every layer (`fidelity`): the relative error of each
//! layer's attention output, and per method the sentence-embedding distance (1 − cosine) against
//! the mean layer error; and MCA's FLOP fraction of the value projection against its error, from
//! `mca-profile` (one line per way of drawing) and from `fidelity`'s MCA rows.

use std::collections::BTreeMap;

use super::mean;
use crate::ReportError;
use crate::line::{LineChart, Series};
use crate::plot::{Chart, colour};
use crate::source::{Body, Source};

fn dots(label: String, pts: Vec<(f64, f64)>) -> Series {
    let c = colour(&label);
    Series::dots(label, c, pts)
}

/// The charts.
pub fn charts(sources: &[Source]) -> Result<Vec<Chart>, ReportError> {
    let mut out = Vec::new();
    let mut mca = LineChart::new(
        "MCA: FLOP fraction vs error",
        "FLOP fraction of the exact value projection (real tokens)",
        "relative error of the attention output (log)",
    );
    mca.y_log = true;
    let mut mca_sources = Vec::new();
    let mut mca_layers: Vec<String> = Vec::new();
    for s in sources {
        match &s.body {
            Body::Fidelity(f) if !f.results.is_empty() => {
                let mut layers = LineChart::new(
                    format!("Per-layer attention error — {}", f.model),
                    "layer",
                    "relative error of the attention output (log)",
                );
                layers.y_log = true;
                let depth = f
                    .results
                    .iter()
                    .map(|r| r.layer_rel_error.len())
                    .max()
                    .unwrap_or(1);
                layers.x_labels = depth;
                let mut cosine = LineChart::new(
                    format!("Embedding distance vs attention error — {}", f.model),
                    "1 − cosine of sentence embeddings vs exact (log)",
                    "mean per-layer attention error (log)",
                );
                cosine.x_log = true;
                cosine.y_log = true;
                // A method whose budget covers every token is exact here (Skeinformer's 256
                // columns on sentences of fewer tokens): named in the caption, not drawn at an
                // error of 1e-7 that would squash every other line.
                let mut exact_here = Vec::new();
                for r in &f.results {
                    if mean(&r.layer_rel_error) < 1e-4 {
                        exact_here.push(if r.spec.is_empty() {
                            r.method.clone()
                        } else {
                            r.spec.clone()
                        });
                        continue;
                    }
                    let label = if r.spec.is_empty() {
                        r.method.clone()
                    } else {
                        r.spec.clone()
                    };
                    let pts: Vec<(f64, f64)> = r
                        .layer_rel_error
                        .iter()
                        .enumerate()
                        .map(|(l, &e)| (l as f64, e))
                        .collect();
                    layers
                        .series
                        .push(Series::line(label.clone(), colour(&label), pts));
                    cosine.series.push(dots(
                        label.clone(),
                        vec![((1.0 - r.cosine_mean).max(1e-7), mean(&r.layer_rel_error))],
                    ));
                    if let Some(fr) = r.mca_flop_fraction {
                        mca.series.push(dots(
                            format!("{label} (all layers)"),
                            vec![(fr, mean(&r.layer_rel_error))],
                        ));
                        mca_sources.push(s.path.clone());
                    }
                }
                out.push(Chart {
                    id: "fidelity-layers".into(),
                    title: layers.title.clone(),
                    caption: format!(
                        "Every layer's attention replaced at once: errors compound from layer \
                         to layer; a flat line keeps the pretrained model's attention at every \
                         depth.{}",
                        if exact_here.is_empty() {
                            String::new()
                        } else {
                            format!(
                                " Not drawn, exact on these inputs (budget ≥ tokens): {}.",
                                exact_here.join(", ")
                            )
                        }
                    ),
                    svg: layers.render()?,
                    sources: vec![s.path.clone()],
                });
                out.push(Chart {
                    id: "fidelity-cosine".into(),
                    title: cosine.title.clone(),
                    caption: "Down and to the left is closer to the pretrained model: what the \
                              attention error costs in the sentence embeddings users keep."
                        .into(),
                    svg: cosine.render()?,
                    sources: vec![s.path.clone()],
                });
            }
            Body::McaProfile(m) => {
                let mut by_draws: BTreeMap<&str, Vec<(f64, f64)>> = BTreeMap::new();
                for r in &m.results {
                    by_draws
                        .entry(&r.draws)
                        .or_default()
                        .push((r.flop_fraction, r.rel_error));
                }
                for (draws, mut pts) in by_draws {
                    pts.sort_by(|a, b| a.0.total_cmp(&b.0));
                    let label = format!("mca, draws={draws}");
                    let mut line = Series::line(label, colour("mca"), pts);
                    line.dashed = draws == "shared";
                    mca.series.push(line);
                }
                mca_sources.push(s.path.clone());
                mca_layers.push(m.source.clone());
            }
            _ => {}
        }
    }
    if !mca.is_empty() {
        mca_sources.dedup();
        out.push(Chart {
            id: "mca-flops".into(),
            title: mca.title.clone(),
            caption: format!(
                "MCA spends fewer multiplications on the value projection as its error target α \
                 grows; read off the error a FLOP saving costs (the fraction counts only the \
                 projection, not the attention). Profiled on: {}.",
                if mca_layers.is_empty() {
                    "-".to_string()
                } else {
                    mca_layers.join("; ")
                }
            ),
            svg: mca.render()?,
            sources: mca_sources,
        });
    }
    Ok(out)
}
