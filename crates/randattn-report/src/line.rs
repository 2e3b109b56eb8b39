//! Line and scatter charts on linear or logarithmic axes: the one drawing routine behind most of
//! the report's charts (a chart module only decides what its series are).

use plotters::coord::Shift;
use plotters::coord::ranged1d::{AsRangedCoord, ValueFormatter};
use plotters::prelude::*;
use plotters::style::RGBColor;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::ReportError;
use crate::plot::{LEGEND_WIDTH, SIZE, font, lin_range, log_range, svg, tick};

/// One line (or scatter) with its legend entry.
#[derive(Debug, Clone)]
pub struct Series {
    /// Legend text (empty: no legend entry).
    pub label: String,
    /// Colour.
    pub colour: RGBColor,
    /// Points in data coordinates, drawn in this order.
    pub points: Vec<(f64, f64)>,
    /// Line width in pixels (0: markers only).
    pub width: u32,
    /// Dashed line (reference lines).
    pub dashed: bool,
    /// A circle at every point.
    pub markers: bool,
}

impl Series {
    /// A solid line with markers.
    pub fn line(label: impl Into<String>, colour: RGBColor, points: Vec<(f64, f64)>) -> Self {
        Series {
            label: label.into(),
            colour,
            points,
            width: 2,
            dashed: false,
            markers: true,
        }
    }

    /// Markers only (a scatter).
    pub fn dots(label: impl Into<String>, colour: RGBColor, points: Vec<(f64, f64)>) -> Self {
        Series {
            label: label.into(),
            colour,
            points,
            width: 0,
            dashed: false,
            markers: true,
        }
    }

    /// A dashed reference line without markers.
    pub fn reference(label: impl Into<String>, colour: RGBColor, points: Vec<(f64, f64)>) -> Self {
        Series {
            label: label.into(),
            colour,
            points,
            width: 2,
            dashed: true,
            markers: false,
        }
    }
}

/// Ticks of a logarithmic axis over `range`: the data's own values when there are a few of them
/// (budgets, sequence lengths), else 1–2–5 steps of each decade (1–1.5–2–3–5–7 when the range
/// spans less than one).
pub fn log_ticks(range: &std::ops::Range<f64>, data: impl Iterator<Item = f64>) -> Vec<f64> {
    let mut values: Vec<f64> = data.filter(|v| *v > 0.0 && v.is_finite()).collect();
    values.sort_by(f64::total_cmp);
    values.dedup();
    // The data's own values when they are few and spread out enough for their labels to fit.
    let spread = values.windows(2).all(|w| w[1] / w[0] >= 1.4);
    if (2..=10).contains(&values.len()) && spread {
        return values;
    }
    let steps: &[f64] = if range.end / range.start < 10.0 {
        &[1.0, 1.5, 2.0, 3.0, 5.0, 7.0]
    } else {
        &[1.0, 2.0, 5.0]
    };
    let mut out = Vec::new();
    let mut decade = 10f64.powf(range.start.log10().floor());
    while decade <= range.end {
        for s in steps {
            let v = decade * s;
            if range.contains(&v) {
                out.push(v);
            }
        }
        decade *= 10.0;
    }
    out
}

/// A labelled point (a crossover, an annotation).
#[derive(Debug, Clone)]
pub struct Mark {
    /// Text next to it.
    pub text: String,
    /// Where.
    pub at: (f64, f64),
    /// Colour.
    pub colour: RGBColor,
}

/// A chart of lines on two axes.
#[derive(Debug, Clone)]
pub struct LineChart {
    /// Title drawn on top.
    pub title: String,
    /// X-axis description with its unit.
    pub x_desc: String,
    /// Y-axis description with its unit.
    pub y_desc: String,
    /// Logarithmic x axis.
    pub x_log: bool,
    /// Logarithmic y axis.
    pub y_log: bool,
    /// The lines.
    pub series: Vec<Series>,
    /// Labelled points.
    pub marks: Vec<Mark>,
    /// At most this many labels on a linear x axis (few for an axis of whole numbers).
    pub x_labels: usize,
}

impl LineChart {
    /// An empty chart.
    pub fn new(
        title: impl Into<String>,
        x_desc: impl Into<String>,
        y_desc: impl Into<String>,
    ) -> Self {
        LineChart {
            title: title.into(),
            x_desc: x_desc.into(),
            y_desc: y_desc.into(),
            x_log: false,
            y_log: false,
            series: Vec::new(),
            marks: Vec::new(),
            x_labels: 12,
        }
    }

    /// Whether it has anything to draw.
    pub fn is_empty(&self) -> bool {
        self.series.iter().all(|s| s.points.is_empty())
    }

    /// The SVG.
    pub fn render(&self) -> Result<String, ReportError> {
        let xs = || self.points().map(|p| p.0);
        let ys = || self.points().map(|p| p.1);
        let range = |log: bool, v: Vec<f64>| {
            if log { log_range(v) } else { lin_range(v) }
        };
        let no_data = || ReportError::Draw(format!("{}: no finite data to draw", self.title));
        let x = range(self.x_log, xs().collect()).ok_or_else(no_data)?;
        let y = range(self.y_log, ys().collect()).ok_or_else(no_data)?;
        // Ticks at the series' own x values (not at marks such as crossovers).
        let series_x = self
            .series
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.0));
        let (kx, ky) = (log_ticks(&x, series_x), log_ticks(&y, std::iter::empty()));
        svg(|root| match (self.x_log, self.y_log) {
            (true, true) => self.draw(
                root,
                x.log_scale().with_key_points(kx),
                y.log_scale().with_key_points(ky),
            ),
            (true, false) => self.draw(root, x.log_scale().with_key_points(kx), y),
            (false, true) => self.draw(root, x, y.log_scale().with_key_points(ky)),
            (false, false) => self.draw(root, x, y),
        })
    }

    fn points(&self) -> impl Iterator<Item = (f64, f64)> + '_ {
        self.series
            .iter()
            .flat_map(|s| s.points.iter().copied())
            .chain(self.marks.iter().map(|m| m.at))
            .filter(|(x, y)| {
                x.is_finite()
                    && y.is_finite()
                    && (!self.x_log || *x > 0.0)
                    && (!self.y_log || *y > 0.0)
            })
    }

    fn draw<X, Y>(
        &self,
        root: &DrawingArea<SVGBackend<'_>, Shift>,
        x: X,
        y: Y,
    ) -> Result<(), ReportError>
    where
        X: AsRangedCoord<Value = f64>,
        Y: AsRangedCoord<Value = f64>,
        X::CoordDescType: ValueFormatter<f64>,
        Y::CoordDescType: ValueFormatter<f64>,
    {
        // The legend gets its own panel on the right: it never hides a line.
        let labelled: Vec<&Series> = self.series.iter().filter(|s| !s.label.is_empty()).collect();
        let (plot_area, legend_area) = if labelled.is_empty() {
            (root.clone(), None)
        } else {
            let (a, b) = root.split_horizontally(SIZE.0 - LEGEND_WIDTH);
            (a, Some(b))
        };
        let mut chart = ChartBuilder::on(&plot_area)
            .caption(&self.title, font(19))
            .margin(14)
            .x_label_area_size(46)
            .y_label_area_size(64)
            .build_cartesian_2d(x, y)?;
        chart
            .configure_mesh()
            .x_desc(&self.x_desc)
            .y_desc(&self.y_desc)
            .axis_desc_style(font(14))
            .label_style(font(13))
            .x_labels(self.x_labels)
            .y_labels(10)
            .x_label_formatter(&|v| tick(v))
            .y_label_formatter(&|v| tick(v))
            .light_line_style(RGBColor(238, 238, 238))
            .draw()?;
        for s in &self.series {
            let pts: Vec<(f64, f64)> = s
                .points
                .iter()
                .copied()
                .filter(|(x, y)| x.is_finite() && y.is_finite())
                .collect();
            let style = s.colour.stroke_width(s.width);
            if s.width > 0 && s.dashed {
                chart.draw_series(DashedLineSeries::new(pts.clone(), 8, 5, style))?;
            } else if s.width > 0 {
                chart.draw_series(LineSeries::new(pts.clone(), style))?;
            }
            if s.markers {
                chart.draw_series(pts.iter().map(|&p| Circle::new(p, 3, s.colour.filled())))?;
            }
        }
        for m in &self.marks {
            chart.draw_series(std::iter::once(Circle::new(
                m.at,
                6,
                m.colour.stroke_width(2),
            )))?;
            if !m.text.is_empty() {
                chart.draw_series(std::iter::once(Text::new(
                    m.text.clone(),
                    m.at,
                    font(12).color(&m.colour),
                )))?;
            }
        }
        if let Some(area) = legend_area {
            let left = Pos::new(HPos::Left, VPos::Center);
            let step = (420 / labelled.len().max(1) as i32).clamp(10, 20);
            for (i, s) in labelled.iter().enumerate() {
                let y = 50 + step * i as i32;
                let style = s.colour.stroke_width(s.width.clamp(2, 4));
                if s.width == 0 {
                    area.draw(&Circle::new((14, y), 4, s.colour.filled()))?;
                } else if s.dashed {
                    area.draw(&PathElement::new(vec![(4, y), (11, y)], style))?;
                    area.draw(&PathElement::new(vec![(16, y), (24, y)], style))?;
                } else {
                    area.draw(&PathElement::new(vec![(4, y), (24, y)], style))?;
                }
                area.draw(&Text::new(s.label.clone(), (30, y), font(12).pos(left)))?;
            }
        }
        Ok(())
    }
}
