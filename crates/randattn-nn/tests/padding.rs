//! Padding changes nothing for the real tokens of a self-attention layer: with the padding mask,
//! the real rows equal those of the same tokens unpadded — also for methods that build shared
//! structures from the queries (Nyström's landmarks, Informer's active queries, Skeinformer's
//! pilot rows), which once took the padded queries in.

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use rand::Rng;
use randattn::Method;
use randattn::rng::stream;
use randattn_nn::MultiHeadSelfAttention;

fn input(rows: usize, hidden: usize, seed: u64) -> Tensor {
    let mut r = stream(seed, 0, 0, "padding-test");
    let v: Vec<f32> = (0..rows * hidden)
        .map(|_| r.random_range(-1.0..1.0))
        .collect();
    Tensor::from_vec(v, (1, rows, hidden), &Device::Cpu).unwrap()
}

#[test]
fn padded_rows_leave_the_real_rows_as_they_are_unpadded() {
    let (n, pad, hidden, heads) = (21, 11, 16, 2);
    let real = input(n, hidden, 1);
    let padded = Tensor::cat(&[&real, &input(pad, hidden, 2)], 1).unwrap();
    let mask: Vec<bool> = (0..n + pad).map(|i| i < n).collect();
    for spec in [
        "exact",
        "nystrom:landmarks=4",
        "informer:factor=1",
        "skeinformer:budget=6",
        "performer:features=8",
    ] {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let method = Method::from_spec(spec).unwrap();
        let layer =
            MultiHeadSelfAttention::load(vb.pp("a"), vb.pp("o"), hidden, heads, method).unwrap();
        let alone = layer.forward(&real, None, 5).unwrap();
        let with_pad = layer.forward(&padded, Some(&mask), 5).unwrap();
        let want: Vec<f32> = alone.flatten_all().unwrap().to_vec1().unwrap();
        let got: Vec<f32> = with_pad
            .narrow(1, 0, n)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let scale = want.iter().fold(1.0f32, |m, v| m.max(v.abs()));
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            assert!(
                (a - b).abs() <= 1e-5 * scale,
                "{spec}[{i}]: {a} padded vs {b} alone"
            );
        }
    }
}
