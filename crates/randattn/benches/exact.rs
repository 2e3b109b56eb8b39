//! Criterion benchmarks of the exact kernel (B=1, H=8, d=64), the yardstick of every estimator.
//! `randattn bench` measures the same workloads and writes JSON for reports.

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use randattn::methods::exact::Exact;
use randattn::workload::clustered;
use randattn::{Attention, AttentionInputs};

fn exact(c: &mut Criterion) {
    let mut group = c.benchmark_group("exact");
    group.sample_size(10);
    for n in [512usize, 1024, 4096] {
        let w = clustered(1, 8, n, 64, 0);
        let shape = [1, 8, n, 64];
        let x = AttentionInputs::new(&w.q, shape, &w.k, shape, &w.v, shape).unwrap();
        let m = Exact::default();
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

criterion_group!(benches, exact);
criterion_main!(benches);
