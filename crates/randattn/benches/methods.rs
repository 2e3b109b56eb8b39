//! Criterion benchmarks of every method (B=1, H=8, d=64, default parameters) on the clustered
//! workload, forward and forward+backward; `exact` is the yardstick. `randattn bench` measures
//! the same workloads and writes JSON for reports.

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use randattn::workload::clustered;
use randattn::{Attention, AttentionInputs, Method};

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
            let shape = [1, 8, n, 64];
            let x = AttentionInputs::new(&w.q, shape, &w.k, shape, &w.v, shape).unwrap();
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

criterion_group!(benches, methods);
criterion_main!(benches);
