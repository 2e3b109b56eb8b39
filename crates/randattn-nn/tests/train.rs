//! A two-layer toy model trains through every method: candle's autograd runs the core backward
//! with each forward's samples, AdamW updates the projections, and the loss falls.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{AdamW, Linear, Optimizer, ParamsAdamW, VarBuilder, VarMap, linear};
use rand::Rng;
use rand_distr::StandardNormal;
use randattn::Method;
use randattn::rng::stream;
use randattn_nn::MultiHeadSelfAttention;

fn normal(len: usize, seed: u64, what: &str, scale: f32) -> Vec<f32> {
    let mut r = stream(seed, 0, 0, what);
    (0..len)
        .map(|_| scale * r.sample::<f32, _>(StandardNormal))
        .collect()
}

struct Toy {
    layers: Vec<MultiHeadSelfAttention>,
    head: Linear,
}

impl Toy {
    fn forward(&self, x: &Tensor, seed: u64) -> candle_core::Result<Tensor> {
        let mut h = x.clone();
        for (i, l) in self.layers.iter().enumerate() {
            h = (l.forward(&h, None, seed * 7 + i as u64)? + &h)?;
        }
        self.head.forward(&h)
    }
}

/// Mean loss of the first and last five of 60 AdamW steps on a task that needs attention: every
/// token must output the sequence mean of the inputs' first four features.
fn train(method: &Method) -> (f32, f32) {
    let dev = Device::Cpu;
    let (b, n, hidden, heads) = (4usize, 16usize, 8usize, 2usize);
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let layers = (0..2)
        .map(|i| {
            MultiHeadSelfAttention::load(
                vb.pp(format!("l{i}.self")),
                vb.pp(format!("l{i}.out")),
                hidden,
                heads,
                method.clone(),
            )
            .unwrap()
        })
        .collect();
    let model = Toy {
        layers,
        head: linear(hidden, 4, vb.pp("head")).unwrap(),
    };
    // Seeded initial weights (candle's own initialiser cannot be seeded).
    let data = varmap.data().lock().unwrap();
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    for (i, name) in names.iter().enumerate() {
        let var = &data[*name];
        let len = var.elem_count();
        let scale = if name.ends_with("bias") { 0.0 } else { 0.35 };
        let t = Tensor::from_vec(normal(len, i as u64, "init", scale), var.shape(), &dev).unwrap();
        var.set(&t).unwrap();
    }
    drop(data);
    let x = Tensor::from_vec(normal(b * n * hidden, 1, "x", 1.0), (b, n, hidden), &dev).unwrap();
    let target = x
        .narrow(2, 0, 4)
        .unwrap()
        .mean_keepdim(1)
        .unwrap()
        .broadcast_as((b, n, 4))
        .unwrap()
        .contiguous()
        .unwrap();
    let mut opt = AdamW::new(
        varmap.all_vars(),
        ParamsAdamW {
            lr: 0.02,
            weight_decay: 0.0,
            ..Default::default()
        },
    )
    .unwrap();
    let mut losses = Vec::new();
    for step in 0..60u64 {
        let pred = model.forward(&x, step).unwrap();
        let loss = (pred - &target).unwrap().sqr().unwrap().mean_all().unwrap();
        losses.push(loss.to_scalar::<f32>().unwrap());
        opt.backward_step(&loss).unwrap();
    }
    let first = losses[..5].iter().sum::<f32>() / 5.0;
    let last = losses[losses.len() - 5..].iter().sum::<f32>() / 5.0;
    (first, last)
}

#[test]
fn a_two_layer_toy_model_trains_with_every_method() {
    for info in Method::catalog() {
        let settings: &[(&str, &str)] = match info.name {
            // Budgets below the toy's 16 tokens, so the estimators are not exact.
            "skeinformer" => &[("budget", "8")],
            "linformer" => &[("k", "8")],
            "nystrom" => &[("landmarks", "4")],
            "lara" => &[("proposals", "4")],
            "performer" => &[("features", "16")],
            "mca" => &[("alpha", "0.5")],
            _ => &[],
        };
        let method = Method::parse(info.name, settings).unwrap();
        let (first, last) = train(&method);
        eprintln!("{:12} loss {first:.4} -> {last:.4}", info.name);
        assert!(
            last.is_finite() && last < 0.7 * first,
            "{}: loss {first} -> {last}",
            info.name
        );
    }
}
