//! Median wall time of one training step (forward, backward, AdamW) of the LRA model at the
//! papers' shapes: batch 32, width 64, 2 heads of 32, FFN 128, random tokens of length n.
//!
//!     cargo run --release -p randattn-train --example step_time -- [n,...] [spec,...]
//!
//! Like `randattn train`, it first tells glibc's allocator to keep freed memory for reuse
//! (otherwise every large activation is mapped afresh and page faults take half of a step).

use std::time::Instant;

use candle_core::{Device, Tensor};
use randattn::Method;
use randattn_train::model::Batch;
use randattn_train::optim::AdamW;
use randattn_train::{LraModel, ModelConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tuning parameters, before any other thread runs.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
    let args: Vec<String> = std::env::args().collect();
    let ns: Vec<usize> = args
        .get(1)
        .map_or("512,1024,2048", String::as_str)
        .split(',')
        .map(|s| s.parse())
        .collect::<Result<_, _>>()?;
    let specs: Vec<&str> = args
        .get(2)
        .map_or(
            "exact,performer,nystrom,linformer,lara,skeinformer,yoso",
            String::as_str,
        )
        .split(',')
        .collect();
    let batch = 32;
    println!("method        n     step ms (median of 5 after 1 warm-up)   process resident MiB");
    for &n in &ns {
        for spec in &specs {
            let method = Method::from_spec(spec)?;
            let model = LraModel::new(ModelConfig::lra(256, n, 10), &method, 0)?;
            let vars: Vec<_> = model.named_vars().into_iter().map(|(_, v)| v).collect();
            let mut opt = AdamW::new(vars, (0.9, 0.999), 1e-6, 0.0)?;
            let tokens: Vec<u32> = (0..batch * n)
                .map(|i| 1 + (i * 7919 % 255) as u32)
                .collect();
            let b = Batch {
                tokens: Tensor::from_vec(tokens, (batch, n), &Device::Cpu)?,
                mask: vec![true; batch * n],
                lengths: vec![n; batch],
            };
            let y = Tensor::from_vec(vec![3u32; batch], batch, &Device::Cpu)?;
            let mut times = Vec::new();
            for step in 0..6u64 {
                let t = Instant::now();
                let logits = model.forward(&b, Some((0, step)), 0)?;
                let loss = candle_nn::loss::cross_entropy(&logits, &y)?;
                let grads = loss.backward()?;
                opt.step(&grads, 1e-4)?;
                if step > 0 {
                    times.push(t.elapsed().as_secs_f64() * 1e3);
                }
            }
            times.sort_by(f64::total_cmp);
            // Resident memory after the six steps: a model that keeps its steps' graphs alive
            // (through an optimiser's state, say) grows here by a step's activations per step.
            let resident = std::fs::read_to_string("/proc/self/statm")
                .ok()
                .and_then(|s| s.split_whitespace().nth(1)?.parse::<usize>().ok())
                .map_or("-".to_string(), |pages| {
                    (pages * 4096 / (1 << 20)).to_string()
                });
            println!(
                "{spec:12} {n:5}  {:8.1}   {resident:>8}",
                times[times.len() / 2]
            );
        }
    }
    Ok(())
}
