//! What every chart shares: its record ([`Chart`]), the size, a colour per method, log-axis
//! ranges and tick labels, and the plotters glue that turns a drawing into an SVG string.

use plotters::prelude::*;
use plotters::style::RGBColor;

use crate::ReportError;

/// Width and height of a chart, in pixels.
pub const SIZE: (u32, u32) = (900, 480);

/// Width of the legend panel on the right of a line chart.
pub const LEGEND_WIDTH: u32 = 260;

/// One chart of the report.
#[derive(Debug, Clone)]
pub struct Chart {
    /// File name stem and HTML id (`error-budget-clustered-1024`).
    pub id: String,
    /// Title.
    pub title: String,
    /// What to read from it, in one line.
    pub caption: String,
    /// The SVG document.
    pub svg: String,
    /// The files its numbers came from.
    pub sources: Vec<String>,
}

impl From<plotters::drawing::DrawingAreaErrorKind<std::io::Error>> for ReportError {
    fn from(e: plotters::drawing::DrawingAreaErrorKind<std::io::Error>) -> Self {
        ReportError::Draw(e.to_string())
    }
}

/// Draws with `draw` on an SVG canvas of [`SIZE`] and returns the SVG text.
pub fn svg(
    draw: impl FnOnce(&DrawingArea<SVGBackend<'_>, plotters::coord::Shift>) -> Result<(), ReportError>,
) -> Result<String, ReportError> {
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, SIZE).into_drawing_area();
        root.fill(&WHITE)?;
        draw(&root)?;
        root.present()?;
    }
    Ok(out)
}

/// Fallback colours for names not listed in [`colour`] (other peers).
const PALETTE: [RGBColor; 6] = [
    RGBColor(0, 128, 128),
    RGBColor(128, 0, 128),
    RGBColor(128, 128, 0),
    RGBColor(0, 0, 160),
    RGBColor(160, 80, 0),
    RGBColor(0, 120, 0),
];

/// The colour of a method, the same in every chart: black for exact attention, dark red for
/// the PyTorch peer, grey for the V-Mean floor, a distinct colour for every other method of the
/// catalog (a stable fallback colour for other names).
pub fn colour(label: &str) -> RGBColor {
    let name = label.split(':').next().unwrap_or(label);
    match name {
        "exact" => BLACK,
        "exact-naive" => RGBColor(90, 90, 90),
        "torch-sdpa" => RGBColor(150, 0, 0),
        "vmean" => RGBColor(150, 150, 150),
        "yoso" => RGBColor(31, 119, 180),
        "yoso-e" => RGBColor(255, 127, 14),
        "informer" => RGBColor(148, 103, 189),
        "skeinformer" => RGBColor(214, 39, 40),
        "nystrom" => RGBColor(188, 189, 34),
        "linformer" => RGBColor(23, 190, 207),
        "performer" => RGBColor(44, 160, 44),
        "ra" => RGBColor(227, 119, 194),
        "lara" => RGBColor(140, 86, 75),
        "mca" => RGBColor(20, 60, 120),
        _ => PALETTE[name.bytes().map(usize::from).sum::<usize>() % PALETTE.len()],
    }
}

/// A log-axis range around `values` (positive ones), padded by a fraction of a decade.
pub fn log_range(values: impl IntoIterator<Item = f64>) -> Option<std::ops::Range<f64>> {
    let (lo, hi) = values
        .into_iter()
        .filter(|v| v.is_finite() && *v > 0.0)
        .fold((f64::INFINITY, 0.0f64), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
    if !lo.is_finite() {
        return None;
    }
    let (lo, hi) = if hi / lo < 1.5 {
        (lo / 1.5, hi * 1.5)
    } else {
        (lo, hi)
    };
    Some(lo / 1.25..hi * 1.25)
}

/// A linear range around `values`, padded by 5%.
pub fn lin_range(values: impl IntoIterator<Item = f64>) -> Option<std::ops::Range<f64>> {
    let (lo, hi) = values
        .into_iter()
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
    if !lo.is_finite() {
        return None;
    }
    let pad = ((hi - lo) * 0.05).max(1e-3);
    Some(lo - pad..hi + pad)
}

/// A tick label with three significant digits and no trailing zeros: `0.001`, `0.25`, `1`,
/// `4096`, `1.2e5`.
pub fn tick(v: &f64) -> String {
    let v = *v;
    if v == 0.0 {
        return "0".into();
    }
    let a = v.abs();
    if !(1e-3..1e5).contains(&a) {
        return format!("{v:.1e}");
    }
    let digits = (2 - a.log10().floor() as i32).max(0) as usize;
    let s = format!("{v:.digits$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// Font for titles, axis descriptions and labels (the viewer's sans-serif).
pub fn font(size: u32) -> TextStyle<'static> {
    ("sans-serif", size).into_font().into()
}

/// Escapes text for HTML and XML.
pub fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// An id-safe slug of `s`.
pub fn slug(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    out.trim_matches('-').to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_short_and_ranges_padded() {
        assert_eq!(tick(&0.25), "0.25");
        assert_eq!(tick(&1.0), "1");
        assert_eq!(tick(&4096.0), "4096");
        assert_eq!(tick(&0.0123456), "0.0123");
        assert_eq!(tick(&250000.0), "2.5e5");
        let r = log_range([1.0, 100.0]).unwrap();
        assert!(r.start < 1.0 && r.end > 100.0);
        assert!(log_range([0.0, -1.0, f64::NAN]).is_none());
        let r = log_range([5.0]).unwrap();
        assert!(r.start < 5.0 && r.end > 5.0);
        assert_eq!(
            slug("Real layer fixtures/minilm/layer5"),
            "real-layer-fixtures-minilm-layer5"
        );
        assert_eq!(colour("exact"), BLACK);
        assert_eq!(colour("performer:features=64"), colour("performer"));
        let mut seen: Vec<RGBColor> = randattn::Method::catalog()
            .iter()
            .map(|m| colour(m.name))
            .collect();
        seen.push(colour("torch-sdpa"));
        let all = seen.len();
        seen.sort_by_key(|c| (c.0, c.1, c.2));
        seen.dedup();
        assert_eq!(seen.len(), all, "two methods share a colour");
    }
}
