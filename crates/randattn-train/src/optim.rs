//! AdamW with its moments in the open (so that a checkpoint can hold them), a linear warm-up
//! then linear decay to zero, and gradient-norm clipping.

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};

/// Decoupled-weight-decay Adam (Loshchilov & Hutter), as `torch.optim.AdamW`.
pub struct AdamW {
    vars: Vec<Var>,
    /// First and second moments, one per variable.
    pub moments: Vec<(Tensor, Tensor)>,
    /// Steps taken.
    pub t: usize,
    /// β₁, β₂.
    pub betas: (f64, f64),
    /// ε.
    pub eps: f64,
    /// Weight decay λ (applied as `θ ← θ·(1 − lr·λ)`).
    pub weight_decay: f64,
}

impl AdamW {
    /// AdamW over `vars`, moments at zero.
    pub fn new(vars: Vec<Var>, betas: (f64, f64), eps: f64, weight_decay: f64) -> Result<AdamW> {
        let moments = vars
            .iter()
            .map(|v| Ok((v.zeros_like()?, v.zeros_like()?)))
            .collect::<Result<_>>()?;
        Ok(AdamW {
            vars,
            moments,
            t: 0,
            betas,
            eps,
            weight_decay,
        })
    }

    /// One update with learning rate `lr`; variables without a gradient are left alone.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        self.t += 1;
        let (b1, b2) = self.betas;
        let c1 = 1.0 / (1.0 - b1.powi(self.t as i32));
        let c2 = 1.0 / (1.0 - b2.powi(self.t as i32));
        for (var, (m, v)) in self.vars.iter().zip(self.moments.iter_mut()) {
            let Some(g) = grads.get(var) else { continue };
            // Detached: a gradient may still reference the step's graph (candle detaches the
            // gradients it passes back, not the last products that reach a variable), and
            // moments that kept it would hold every step's activations alive.
            *m = ((&*m * b1)? + (g * (1.0 - b1))?)?.detach();
            *v = ((&*v * b2)? + (g.sqr()? * (1.0 - b2))?)?.detach();
            let update = ((&*m * c1)? / ((&*v * c2)?.sqrt()? + self.eps)?)?;
            let decayed = (var.as_tensor() * (1.0 - lr * self.weight_decay))?;
            var.set(&(decayed - (update * lr)?)?)?;
        }
        Ok(())
    }
}

/// The learning rate at `step` (0-based) of `total`: linear warm-up over `warmup` steps to
/// `peak`, then linear decay to zero at `total`.
pub fn learning_rate(step: usize, total: usize, warmup: usize, peak: f64) -> f64 {
    if step < warmup {
        peak * (step + 1) as f64 / warmup as f64
    } else {
        let rest = total.saturating_sub(warmup).max(1) as f64;
        peak * (1.0 - (step - warmup) as f64 / rest).max(0.0)
    }
}

/// Scales the gradients of `vars` so that their global L2 norm is at most `max_norm`; returns
/// the norm before clipping.
pub fn clip_grad_norm(grads: &mut GradStore, vars: &[Var], max_norm: f64) -> Result<f64> {
    let mut total = 0.0f64;
    for v in vars {
        if let Some(g) = grads.get(v) {
            total += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
        }
    }
    let norm = total.sqrt();
    if norm > max_norm && norm > 0.0 {
        let scale = max_norm / norm;
        for v in vars {
            if let Some(g) = grads.get(v) {
                let scaled = (g * scale)?;
                grads.insert(v, scaled);
            }
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schedule_warms_up_then_decays_to_zero() {
        let lr: Vec<f64> = (0..10).map(|s| learning_rate(s, 10, 4, 1.0)).collect();
        assert_eq!(&lr[..4], &[0.25, 0.5, 0.75, 1.0]);
        assert!((lr[4] - 1.0).abs() < 1e-12 && (lr[9] - 1.0 / 6.0).abs() < 1e-12);
        assert_eq!(learning_rate(10, 10, 4, 1.0), 0.0);
    }

    #[test]
    fn adamw_matches_the_formula_on_one_scalar() {
        let dev = candle_core::Device::Cpu;
        let x = Var::new(&[1.0f32], &dev).unwrap();
        let mut opt = AdamW::new(vec![x.clone()], (0.9, 0.999), 1e-6, 0.1).unwrap();
        // L = 3x: g = 3. First step: m̂ = 3, v̂ = 9, update = 3/(3+ε) ≈ 1.
        let loss = (x.as_tensor() * 3.0).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        opt.step(&grads, 0.01).unwrap();
        let got = x.as_tensor().to_vec1::<f32>().unwrap()[0] as f64;
        let want = 1.0 * (1.0 - 0.01 * 0.1) - 0.01 * 3.0 / (3.0 + 1e-6);
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
    }

    /// A variable that is a direct operand of a product gets a gradient that still references
    /// the other operand, an activation with the step's whole graph behind it: the moments
    /// must not keep it (they did, and a Linformer model grew by its activations every step).
    #[test]
    fn the_moments_hold_no_graph() {
        let dev = candle_core::Device::Cpu;
        let w = Var::new(&[[1.0f32, 2.0], [3.0, 4.0]], &dev).unwrap();
        // `x` comes out of an earlier layer (here `exp(u)`, `u` trained too).
        let u = Var::new(&[[0.5f32], [-1.0]], &dev).unwrap();
        let mut opt = AdamW::new(vec![w.clone(), u.clone()], (0.9, 0.999), 1e-6, 0.0).unwrap();
        for _ in 0..2 {
            let x = u.as_tensor().exp().unwrap();
            let loss = w
                .as_tensor()
                .matmul(&x)
                .unwrap()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap();
            let grads = loss.backward().unwrap();
            assert!(
                grads.get(&w).unwrap().track_op(),
                "the gradient references x's graph"
            );
            opt.step(&grads, 0.01).unwrap();
            for (m, v) in &opt.moments {
                assert!(!m.track_op() && !v.track_op(), "a moment keeps the graph");
            }
        }
    }
}
