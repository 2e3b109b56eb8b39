//! candle autograd through the randattn ops equals the core backward on the same seed, for
//! every method (MCA with its X, W_V and b_V), with masks.

use candle_core::{Device, Tensor, Var};
use rand::Rng;
use rand_distr::StandardNormal;
use randattn::methods::mca::Mca;
use randattn::rng::stream;
use randattn::{Attention, AttentionInputs, Method};
use randattn_nn::op::{Masks, ValueLayer, attention, mca};

fn normal(len: usize, seed: u64, what: &str) -> Vec<f32> {
    let mut r = stream(seed, 0, 0, what);
    (0..len)
        .map(|_| r.sample::<f32, _>(StandardNormal))
        .collect()
}

fn assert_close(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}");
    let scale = want.iter().fold(1.0f32, |m, v| m.max(v.abs()));
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        assert!((a - b).abs() <= 1e-5 * scale, "{what}[{i}]: {a} vs {b}");
    }
}

fn grad(grads: &candle_core::backprop::GradStore, v: &Var) -> Vec<f32> {
    grads
        .get(v.as_tensor())
        .expect("a gradient")
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

#[test]
fn autograd_equals_the_core_backward_for_every_method() {
    let (b, h, n, d) = (2usize, 2usize, 24usize, 8usize);
    let shape = [b, h, n, d];
    let dev = Device::Cpu;
    let (q, k, v) = (
        normal(b * h * n * d, 1, "q"),
        normal(b * h * n * d, 2, "k"),
        normal(b * h * n * d, 3, "v"),
    );
    let g = normal(b * h * n * d, 4, "g");
    let mut key = vec![true; b * n];
    key[3] = false;
    key[n + 7] = false;
    let masks = Masks {
        key: Some(key.clone()),
        query: None,
    };
    for info in Method::catalog() {
        if info.name == "mca" {
            continue;
        }
        let method = Method::parse::<&str>(info.name, &[]).unwrap();
        let vars: Vec<Var> = [&q, &k, &v]
            .iter()
            .map(|data| Var::from_vec((*data).clone(), shape.to_vec(), &dev).unwrap())
            .collect();
        let out = attention(&vars[0], &vars[1], &vars[2], &method, 9, &masks).unwrap();
        let gt = Tensor::from_vec(g.clone(), shape.to_vec(), &dev).unwrap();
        let loss = (&out * &gt).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();

        let x = AttentionInputs::new(&q, shape, &k, shape, &v, shape)
            .unwrap()
            .with_key_mask(&key)
            .unwrap();
        let f = method.forward(&x, 9).unwrap();
        assert_close(
            &format!("{} output", info.name),
            &out.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            &f.output,
        );
        let want = method.backward(&x, 9, &f.saved, &g).unwrap();
        assert_close(
            &format!("{} dq", info.name),
            &grad(&grads, &vars[0]),
            &want.dq,
        );
        assert_close(
            &format!("{} dk", info.name),
            &grad(&grads, &vars[1]),
            &want.dk,
        );
        assert_close(
            &format!("{} dv", info.name),
            &grad(&grads, &vars[2]),
            &want.dv,
        );
    }
}

#[test]
fn mca_autograd_reaches_x_and_the_value_weights() {
    let (b, h, n, d, d_model) = (2usize, 2usize, 20usize, 4usize, 12usize);
    let dv = 3;
    let dev = Device::Cpu;
    let q = normal(b * h * n * d, 5, "q");
    let k = normal(b * h * n * d, 6, "k");
    let xs = normal(b * n * d_model, 7, "x");
    let wv = normal(d_model * h * dv, 8, "wv");
    let bv = normal(h * dv, 9, "bv");
    let g = normal(b * h * n * dv, 10, "g");
    let mut key = vec![true; b * n];
    key[5] = false;
    let masks = Masks {
        key: Some(key.clone()),
        query: None,
    };
    let m = Mca {
        alpha: 0.8,
        ..Mca::default()
    };
    let vq = Var::from_vec(q.clone(), (b, h, n, d), &dev).unwrap();
    let vk = Var::from_vec(k.clone(), (b, h, n, d), &dev).unwrap();
    let vx = Var::from_vec(xs.clone(), (b, n, d_model), &dev).unwrap();
    let vw = Var::from_vec(wv.clone(), (d_model, h * dv), &dev).unwrap();
    let vb = Var::from_vec(bv.clone(), h * dv, &dev).unwrap();
    let layer = ValueLayer {
        x: &vx,
        wv: &vw,
        bv: &vb,
    };
    let out = mca(&vq, &vk, &layer, &m, 3, &masks).unwrap();
    let gt = Tensor::from_vec(g.clone(), (b, h, n, dv), &dev).unwrap();
    let grads = (&out * &gt).unwrap().sum_all().unwrap().backward().unwrap();

    let vals = randattn::inputs::project_values(&xs, [b, n, d_model], &wv, Some(&bv), h).unwrap();
    let x = AttentionInputs::new(&q, [b, h, n, d], &k, [b, h, n, d], &vals, [b, h, n, dv])
        .unwrap()
        .with_value_projection(&xs, [b, n, d_model], &wv, [d_model, h * dv], Some(&bv))
        .unwrap()
        .with_key_mask(&key)
        .unwrap();
    let f = m.forward(&x, 3).unwrap();
    assert_close(
        "mca output",
        &out.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        &f.output,
    );
    let want = m.backward(&x, 3, &f.saved, &g).unwrap();
    let param = |name: &str| {
        want.params
            .iter()
            .find(|p| p.name == name)
            .unwrap()
            .grad
            .clone()
    };
    assert_close("mca dq", &grad(&grads, &vq), &want.dq);
    assert_close("mca dk", &grad(&grads, &vk), &want.dk);
    assert_close("mca dx", &grad(&grads, &vx), &param("x"));
    assert_close("mca dwv", &grad(&grads, &vw), &param("wv"));
    assert_close("mca dbv", &grad(&grads, &vb), &param("bv"));
}

/// Bad tensors give errors, not panics: wrong rank, wrong dtype, mismatched heads, MCA through
/// the plain op, a key mask of the wrong length.
#[test]
fn bad_tensors_are_errors() {
    let dev = Device::Cpu;
    let exact = Method::parse::<&str>("exact", &[]).unwrap();
    let none = Masks::default();
    let q = Tensor::zeros((1, 2, 5, 4), candle_core::DType::F32, &dev).unwrap();
    let err = |r: candle_core::Result<Tensor>| r.unwrap_err().to_string();
    let flat = Tensor::zeros((10, 4), candle_core::DType::F32, &dev).unwrap();
    assert!(err(attention(&flat, &q, &q, &exact, 0, &none)).contains("[batch, heads, n, d]"));
    let f64q = q.to_dtype(candle_core::DType::F64).unwrap();
    assert!(err(attention(&f64q, &q, &q, &exact, 0, &none)).contains("f32"));
    let k3 = Tensor::zeros((1, 3, 5, 4), candle_core::DType::F32, &dev).unwrap();
    assert!(err(attention(&q, &k3, &k3, &exact, 0, &none)).contains("heads"));
    let m = Method::parse::<&str>("mca", &[]).unwrap();
    assert!(err(attention(&q, &q, &q, &m, 0, &none)).contains("op::mca"));
    let bad_mask = Masks {
        key: Some(vec![true; 3]),
        query: None,
    };
    assert!(err(attention(&q, &q, &q, &exact, 0, &bad_mask)).contains("key_mask"));
    let x = Tensor::zeros((1, 5, 6), candle_core::DType::F32, &dev).unwrap();
    let wv = Tensor::zeros((6, 5), candle_core::DType::F32, &dev).unwrap();
    let bv = Tensor::zeros(5, candle_core::DType::F32, &dev).unwrap();
    let layer = ValueLayer {
        x: &x,
        wv: &wv,
        bv: &bv,
    };
    let e = mca(&q, &q, &layer, &Mca::default(), 0, &none)
        .unwrap_err()
        .to_string();
    assert!(e.contains("multiple of 2 heads"), "{e}");
}
