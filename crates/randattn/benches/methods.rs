//! Criterion benchmarks of every method (B=1, H=8, d=64, default parameters) on the clustered
//! workload, forward and forward+backward; `exact` is the yardstick. `randattn bench` measures
//! the same workloads and writes JSON for reports.

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use randattn::methods::mca::{Draws, Mca};
use randattn::workload::clustered;
use randattn::{Attention, Method};

fn methods(c: &mut Criterion) {
    for info in Method::catalog() {
        if info.name == "exact-naive" {
            continue; // the f64 reference, not a kernel anyone runs for speed
        }
        let m = Method::parse::<&str>(info.name, &[]).expect("defaults are valid");
        let mut group = c.benchmark_group(info.name);
        group.sample_size(10);
        for n in [512usize, 1024, 4096] {
            let w = clustered(1, 8, n, 64, 0);
            let x = w.inputs().unwrap(); // with X and W_V attached, for mca
            group.bench_with_input(BenchmarkId::new("forward", n), &x, |b, x| {
                b.iter(|| m.forward(x, 0).unwrap())
            });
            let g = vec![1.0f32; x.dims().out_len()];
            group.bench_with_input(BenchmarkId::new("forward+backward", n), &x, |b, x| {
                b.iter(|| {
                    let f = m.forward(x, 0).unwrap();
                    m.backward(x, 0, &f.saved, &g).unwrap()
                })
            });
        }
        group.finish();
    }
}

/// MCA's sampled value projection (given the budgets of α = 0.3) against the exact GEMM
/// projection, at MiniLM's sizes (n = 512, 12 heads of 32, d_model = 384), per-token and shared
/// draws; `randattn mca-profile` prints the same comparison with errors.
fn mca_projection(c: &mut Criterion) {
    let w = clustered(1, 12, 512, 32, 0);
    let x = w.inputs().unwrap();
    let mut group = c.benchmark_group("mca-projection");
    group.sample_size(20);
    group.bench_function("exact GEMM", |b| {
        b.iter(|| Mca::exact_projection(&x).unwrap())
    });
    for draws in [Draws::Token, Draws::Shared] {
        let m = Mca {
            draws,
            ..Mca::default()
        };
        let prep = m.prepare(&w.wv, w.d_model, 12, 32).unwrap();
        let (budgets, _) = m.budgets(&x, w.d_model).unwrap();
        group.bench_function(format!("sampled {draws:?}"), |b| {
            b.iter(|| m.sample_values(&x, &prep, &budgets, 0).unwrap())
        });
    }
    group.finish();
}

criterion_group!(benches, methods, mca_projection);
criterion_main!(benches);
