//! `randattn data`: the long-range tasks' examples as JSON lines, their statistics, the list.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;
use randattn_tasks::{Example, Split, TaskSpec};
use serde_json::json;

use crate::console::table;

#[derive(Args)]
pub struct DataArgs {
    /// Task name (see --list).
    task: Option<String>,
    /// List every task with its parameters and defaults.
    #[arg(long, conflicts_with_all = ["stats", "out"])]
    list: bool,
    /// Split to write.
    #[arg(long, default_value = "train")]
    split: Split,
    /// Number of examples (default: the split's size; for --stats, every split's size).
    #[arg(long)]
    count: Option<usize>,
    /// Index of the first example.
    #[arg(long, default_value_t = 0)]
    start: usize,
    /// Seed of the generated tasks.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Task parameter, repeatable: --set key=value.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    settings: Vec<String>,
    /// Print split sizes, label histograms, length statistics and the majority-class rate.
    #[arg(long, conflicts_with = "out")]
    stats: bool,
    /// Write the examples as JSON lines to FILE (`-` = standard output).
    #[arg(long, value_name = "FILE.jsonl")]
    out: Option<PathBuf>,
    /// Also write the examples as grayscale PNG images (`DIR/<split>-<index>-label<k>.png`,
    /// image tasks only: pathfinder, image), enlarged 8× to look at.
    #[arg(long, value_name = "DIR")]
    png: Option<PathBuf>,
}

pub fn data(a: DataArgs) -> Result<()> {
    if a.list {
        return list();
    }
    let Some(name) = &a.task else {
        bail!("name a task (see `randattn data --list`)");
    };
    let task = TaskSpec::parse(name, &crate::parse_settings(&a.settings)?)?;
    if a.stats {
        return stats(&task, &a);
    }
    if a.out.is_none() && a.png.is_none() {
        bail!("give --out FILE.jsonl and/or --png DIR (or --stats)");
    }
    let sizes = task.split_sizes()?;
    let count = a.count.unwrap_or(if a.out.is_some() {
        sizes[a.split.index()]
    } else {
        8
    });
    let range = checked_range(&task, a.start, count)?;
    let examples = task.examples(a.seed, a.split, range)?;
    if let Some(dir) = &a.png {
        write_pngs(&task, &examples, a.split, a.start, dir)?;
    }
    let Some(out) = &a.out else {
        return Ok(());
    };
    let mut text = String::new();
    for ex in &examples {
        let mut obj = json!({ "tokens": ex.tokens, "label": ex.label });
        if let Some(t) = &ex.text {
            obj["text"] = json!(t);
        }
        if let Some(m) = &ex.meta {
            obj["meta"] = serde_json::from_str(m)?;
        }
        text.push_str(&serde_json::to_string(&obj)?);
        text.push('\n');
    }
    if out.as_os_str() == "-" {
        std::io::stdout().write_all(text.as_bytes())?;
    } else {
        std::fs::write(out, text).with_context(|| format!("cannot write {}", out.display()))?;
    }
    Ok(())
}

/// Each example as a square grayscale PNG, enlarged 8× (nearest neighbour).
fn write_pngs(
    task: &TaskSpec,
    examples: &[Example],
    split: Split,
    start: usize,
    dir: &std::path::Path,
) -> Result<()> {
    let info = task.info();
    let side = (info.max_len as f64).sqrt() as usize;
    if side * side != info.max_len || !matches!(task.name(), "pathfinder" | "image") {
        bail!(
            "--png draws image tasks (pathfinder, image), not {}",
            task.name()
        );
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let zoom = 8;
    let shift = u32::from(!info.pad_in_data);
    for (k, ex) in examples.iter().enumerate() {
        let big = side * zoom;
        let mut pixels = vec![0u8; big * big];
        for (i, px) in pixels.iter_mut().enumerate() {
            let (r, c) = (i / big / zoom, (i % big) / zoom);
            *px = ex.tokens[r * side + c].saturating_sub(shift).min(255) as u8;
        }
        let path = dir.join(format!(
            "{}-{}-label{}.png",
            split.name(),
            start + k,
            ex.label
        ));
        let file = std::fs::File::create(&path)
            .with_context(|| format!("cannot write {}", path.display()))?;
        let mut enc = png::Encoder::new(std::io::BufWriter::new(file), big as u32, big as u32);
        enc.set_color(png::ColorType::Grayscale);
        enc.set_depth(png::BitDepth::Eight);
        enc.write_header()?.write_image_data(&pixels)?;
    }
    Ok(())
}

/// The example range `start..start + count`, refused when it overflows or when the examples
/// (and their JSON text, about 6 bytes a token) would not fit in the memory available.
fn checked_range(task: &TaskSpec, start: usize, count: usize) -> Result<std::ops::Range<usize>> {
    let Some(end) = start.checked_add(count) else {
        bail!("--start {start} + --count {count} overflows");
    };
    let per_example = task.info().max_len.saturating_mul(4 + 6).saturating_add(64);
    let need = count as u128 * per_example as u128;
    if let Some(available) = randattn_cli::limits::available_bytes()
        && need > available as u128
    {
        bail!(
            "--count {count}: the examples need about {} MiB, more than the {} MiB of memory \
             available; write them in smaller ranges with --start",
            need >> 20,
            available >> 20
        );
    }
    Ok(start..end)
}

fn list() -> Result<()> {
    for t in TaskSpec::catalog() {
        println!("{}  —  {}", t.name, t.summary);
        for p in &t.params {
            println!(
                "    --set {}=…   default {}; valid: {}",
                p.name, p.default, p.range
            );
            println!("        {}", p.help);
        }
        println!();
    }
    Ok(())
}

/// Length statistics and label histogram of one split.
fn split_stats(examples: &[Example], classes: usize) -> (Vec<usize>, [usize; 4]) {
    let mut hist = vec![0usize; classes];
    let mut lens: Vec<usize> = examples.iter().map(|e| e.tokens.len()).collect();
    for e in examples {
        hist[e.label as usize] += 1;
    }
    lens.sort_unstable();
    let n = lens.len().max(1);
    let mean = lens.iter().sum::<usize>() / n;
    let len = [
        *lens.first().unwrap_or(&0),
        mean,
        lens.get(lens.len() / 2).copied().unwrap_or(0),
        *lens.last().unwrap_or(&0),
    ];
    (hist, len)
}

fn stats(task: &TaskSpec, a: &DataArgs) -> Result<()> {
    let info = task.info();
    let sizes = task.split_sizes()?;
    let params: Vec<String> = task
        .params()
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    println!(
        "task {} ({}); vocab {}, classes {}, max length {}, pad {}{}; seed {}",
        task.name(),
        params.join(" "),
        info.vocab,
        info.classes,
        info.max_len,
        info.pad,
        if info.pad_in_data {
            " (also a data value)"
        } else {
            ""
        },
        a.seed
    );
    let mut rows = Vec::new();
    for split in Split::ALL {
        let count = a.count.unwrap_or(sizes[split.index()]);
        let range = checked_range(task, 0, count)?;
        let started = std::time::Instant::now();
        let examples = task.examples(a.seed, split, range)?;
        let secs = started.elapsed().as_secs_f64();
        let (hist, len) = split_stats(&examples, info.classes);
        let majority = hist.iter().copied().max().unwrap_or(0) as f64 / count.max(1) as f64;
        let shares: Vec<String> = hist
            .iter()
            .map(|h| format!("{:.1}", 100.0 * *h as f64 / count.max(1) as f64))
            .collect();
        rows.push(vec![
            split.name().to_string(),
            count.to_string(),
            format!("{} / {} / {} / {}", len[0], len[1], len[2], len[3]),
            format!("{:.1}%", 100.0 * majority),
            format!("{:.0}", count as f64 / secs.max(1e-9)),
            shares.join(" "),
        ]);
    }
    print!(
        "{}",
        table(
            &[
                "split",
                "examples",
                "length min/mean/median/max",
                "majority",
                "examples/s",
                "label shares % (class 0, 1, ...)"
            ],
            &rows
        )
    );
    Ok(())
}
