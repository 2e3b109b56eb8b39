//! The report page: one self-contained HTML file (no scripts, no external fonts or styles) with a
//! header saying where and when the data was measured, every chart as inline SVG with its
//! caption and the files its numbers came from, and a list of the sources.

use std::fmt::Write;

use crate::plot::{Chart, escape};
use crate::source::{Body, Source};

/// What the page says about its own making.
#[derive(Debug, Clone, Default)]
pub struct PageInfo {
    /// When the page was written (RFC 3339).
    pub generated_at: String,
    /// The command that wrote it.
    pub command: String,
    /// randattn's version.
    pub version: String,
    /// Notes to show under the header (what was skipped and why).
    pub notes: Vec<String>,
}

const STYLE: &str = "body{font-family:sans-serif;max-width:880px;margin:2em auto;padding:0 1em;\
color:#222;line-height:1.45}h1{margin-bottom:.2em}figure{margin:2.5em 0;border-top:1px solid #ddd;\
padding-top:1em}figcaption{font-size:.95em}figure svg{max-width:100%;height:auto}\
.src{font-size:.8em;color:#555;word-break:break-all}table{border-collapse:collapse;font-size:.85em}\
td,th{padding:.2em .6em;border-bottom:1px solid #eee;text-align:left;vertical-align:top}\
.note{background:#fff8e0;padding:.4em .8em;border-left:3px solid #e0b000}";

/// The machines, versions and measurement times of the sources, as table rows.
fn provenance(sources: &[Source]) -> String {
    let mut rows = String::new();
    for s in sources {
        let (machine, when, version) = match &s.meta {
            Some(m) => (
                m.machine.as_ref().map_or("-".into(), |m| m.describe()),
                m.measured_at.clone().unwrap_or_else(|| "-".into()),
                m.version.clone().unwrap_or_else(|| "-".into()),
            ),
            None => match &s.body {
                Body::Lra(l) if !l.machines.is_empty() => (
                    l.machines.join("; "),
                    "see the runs' summaries".into(),
                    "-".into(),
                ),
                _ => ("not recorded".into(), "not recorded".into(), "-".into()),
            },
        };
        let _ = write!(
            rows,
            "<tr><td>{}</td><td class=\"src\">{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(s.kind()),
            escape(&s.path),
            escape(&machine),
            escape(&when),
            escape(&version)
        );
    }
    rows
}

/// The distinct machines of the sources that record one.
fn machines(sources: &[Source]) -> Vec<String> {
    let mut out: Vec<String> = sources
        .iter()
        .filter_map(|s| s.meta.as_ref()?.machine.as_ref().map(|m| m.describe()))
        .collect();
    out.sort();
    out.dedup();
    out
}

/// The page.
pub fn html(charts: &[Chart], sources: &[Source], info: &PageInfo) -> String {
    let mut h = String::new();
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>randattn report</title><style>{STYLE}</style></head><body>\n\
         <h1>randattn report</h1>\n<p>Written {} by <code>{}</code> (randattn {}), from {} \
         source file(s). Measured on: {}.</p>\n",
        escape(&info.generated_at),
        escape(&info.command),
        escape(&info.version),
        sources.len(),
        {
            let m = machines(sources);
            if m.is_empty() {
                "not recorded".to_string()
            } else {
                escape(&m.join("; "))
            }
        }
    );
    for n in &info.notes {
        let _ = writeln!(h, "<p class=\"note\">{}</p>", escape(n));
    }
    h.push_str("<h2>Charts</h2>\n<ul>\n");
    for c in charts {
        let _ = writeln!(h, "<li><a href=\"#{}\">{}</a></li>", c.id, escape(&c.title));
    }
    h.push_str("</ul>\n");
    for c in charts {
        let svg = c
            .svg
            .trim_start_matches(|ch| ch != '<')
            .trim_start_matches("<?xml version=\"1.0\" encoding=\"UTF-8\"?>")
            .trim();
        let _ = write!(
            h,
            "<figure id=\"{}\" class=\"chart\">\n{svg}\n<figcaption><p>{}</p>\
             <p class=\"src\">Data: {} — this chart alone: <a href=\"{}.svg\">{}.svg</a></p>\
             </figcaption></figure>\n",
            c.id,
            escape(&c.caption),
            c.sources
                .iter()
                .map(|s| escape(s))
                .collect::<Vec<_>>()
                .join(", "),
            c.id,
            c.id
        );
    }
    let _ = write!(
        h,
        "<h2>Sources</h2>\n<table><tr><th>kind</th><th>file</th><th>machine</th>\
         <th>measured</th><th>version</th></tr>{}</table>\n</body></html>\n",
        provenance(sources)
    );
    h
}
