//! Every weight of the model receives its gradient: for each variable, the entry with the largest
//! gradient matches a central difference of the loss. (candle-nn's fused LayerNorm has no
//! backward and once cut every gradient below the final normalisation — only the classifier head
//! trained; this test fails in that case.)

mod common;

use candle_core::{Device, Tensor};
use randattn::Method;
use randattn_tasks::Split;
use randattn_train::trainer::make_batch;
use randattn_train::{LraModel, ModelConfig, Pooling};

fn check(spec: &str) {
    let task = common::tiny_recall();
    let info = task.info();
    let config = ModelConfig {
        width: 32,
        ffn: 64,
        classifier_hidden: 64,
        pooling: Pooling::Last,
        dropout: 0.0,
        ..ModelConfig::lra(info.vocab, info.max_len, info.classes)
    };
    let model = LraModel::new(config, &Method::from_spec(spec).unwrap(), 3).unwrap();
    let examples = task.examples(0, Split::Train, 0..16).unwrap();
    let refs: Vec<_> = examples.iter().collect();
    let batch = make_batch(&refs, info.pad).unwrap();
    let labels: Vec<u32> = examples.iter().map(|e| e.label).collect();
    let y = Tensor::new(labels, &Device::Cpu).unwrap();
    // Training mode (fixed seed and step: the same attention samples in every evaluation).
    let loss = |m: &LraModel| {
        candle_nn::loss::cross_entropy(&m.forward(&batch, Some((1, 0)), 0).unwrap(), &y).unwrap()
    };
    let grads = loss(&model).backward().unwrap();
    for (name, var) in model.named_vars() {
        let g = grads
            .get(&var)
            .unwrap_or_else(|| panic!("{spec}: no gradient reaches {name}"))
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let i = (0..g.len())
            .max_by(|&a, &b| g[a].abs().total_cmp(&g[b].abs()))
            .unwrap();
        // A key bias adds the same score to every key of a query: softmax ignores it (a
        // random-feature kernel does not).
        if spec == "exact" && name.ends_with("key.bias") {
            assert!(g[i].abs() < 1e-6, "{spec}: {name} {}", g[i]);
            continue;
        }
        let base = var.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        // Step 1e-2: f32 rounding of a loss near 1.5 contributes ~1e-5 to the difference, the
        // third-derivative term a few percent of the slope at this step (measured ≤ 3.5%).
        let eps = 1e-2f32;
        let mut fd = 0.0f32;
        for s in [1.0f32, -1.0] {
            let mut v = base.clone();
            v[i] += s * eps;
            var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap())
                .unwrap();
            fd += s * loss(&model).to_scalar::<f32>().unwrap();
        }
        var.set(&Tensor::from_vec(base, var.shape(), &Device::Cpu).unwrap())
            .unwrap();
        fd /= 2.0 * eps;
        assert!(g[i].abs() > 1e-4, "{spec}: {name} has a zero gradient");
        assert!(
            (g[i] - fd).abs() <= 0.1 * g[i].abs() + 1e-3,
            "{spec}: {name}[{i}] gradient {} vs central difference {fd}",
            g[i]
        );
    }
}

#[test]
fn every_weight_gets_its_gradient_with_exact_attention() {
    check("exact");
}

#[test]
fn every_weight_gets_its_gradient_with_a_linear_attention() {
    check("performer:features=32");
}

#[test]
fn every_weight_gets_its_gradient_with_linformer_projections_included() {
    check("linformer:k=4");
    let task = common::tiny_recall();
    let info = task.info();
    let config = ModelConfig::lra(info.vocab, info.max_len, info.classes);
    let model = LraModel::new(config, &Method::from_spec("linformer:k=4").unwrap(), 3).unwrap();
    let names: Vec<String> = model.named_vars().into_iter().map(|(n, _)| n).collect();
    for want in [
        "block0.attention.projection_e",
        "block1.attention.projection_f",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "{want} missing from {names:?}"
        );
    }
}
