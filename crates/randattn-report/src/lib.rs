//! `randattn report`'s library: charts (inline SVG, drawn with plotters) and one self-contained
//! HTML page from the JSON that randattn's commands write — error against budget, time and
//! memory against sequence length with the crossover where each method beats exact attention,
//! the accuracy–cost Pareto front, training curves, the LRA matrix as a heat map, and the
//! pretrained model's per-layer fidelity.
//!
//! [`source`] parses the documents (each keeps its path: every number on the page traces to
//! its file); [`charts`] turns them into [`Chart`]s; [`page`] lays the page out. No file or
//! terminal I/O here: the CLI reads the files and writes the page.

pub mod charts;
pub mod line;
pub mod page;
pub mod plot;
pub mod source;

pub use plot::Chart;
pub use source::{Body, Source, parse_json, parse_metrics};

/// Why a report could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// A document that cannot be charted (the message names the file).
    #[error("{0}")]
    Input(String),
    /// plotters failed to draw.
    #[error("drawing a chart: {0}")]
    Draw(String),
}

/// Every chart the sources allow, in page order.
pub fn build(sources: &[Source]) -> Result<Vec<Chart>, ReportError> {
    let mut out = Vec::new();
    out.extend(charts::error_budget::charts(sources)?);
    out.extend(charts::time_n::charts(sources)?);
    out.extend(charts::pareto::charts(sources)?);
    out.extend(charts::lra_matrix::charts(sources)?);
    out.extend(charts::training::charts(sources)?);
    out.extend(charts::fidelity::charts(sources)?);
    // Two documents of one kind (two suites, say) give charts of one name: number the later.
    let mut seen: Vec<String> = Vec::new();
    for c in &mut out {
        let base = c.id.clone();
        let mut k = 1;
        while seen.contains(&c.id) {
            k += 1;
            c.id = format!("{base}-{k}");
        }
        seen.push(c.id.clone());
    }
    Ok(out)
}
