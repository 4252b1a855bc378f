//! Optimizers with PyTorch's semantics over the flat parameter buffer, gradient clipping as
//! `clip_grad_norm_` (the schedules are in `schedule.rs`).
use crate::model::TensorSlot;
use crate::engine::{self, AdamWStep, Buffer};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OptimKind {
    /// `torch.optim.AdamW` (transformers' `adamw_torch` / `adamw_torch_fused`: the same update).
    AdamW,
    /// `torch.optim.SGD` without momentum (transformers' `sgd`).
    Sgd,
}

/// `optim`, with transformers' names; both AdamW names make the same update.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OptimName {
    AdamwTorchFused,
    AdamwTorch,
    Sgd,
}

impl OptimName {
    pub fn kind(self) -> OptimKind {
        match self {
            OptimName::AdamwTorchFused | OptimName::AdamwTorch => OptimKind::AdamW,
            OptimName::Sgd => OptimKind::Sgd,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Optimizer {
    pub kind: OptimKind,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Per parameter element: weight decay applies (transformers exempts biases and norm weights).
    decay: Vec<(std::ops::Range<usize>, bool)>,
    /// AdamW's first and second moments (empty for SGD), in the engine like the parameters.
    pub exp_avg: Buffer,
    pub exp_avg_sq: Buffer,
    pub steps: u64,
}

impl Optimizer {
    /// An optimizer over the flat buffer described by `tensors` (the model's, or its adapters').
    pub fn new(kind: OptimKind, tensors: &[TensorSlot], beta1: f64, beta2: f64, eps: f64, weight_decay: f64) -> Self {
        let total = tensors.iter().map(|t| t.offset + t.len()).max().unwrap_or(0);
        let (m, v) = match kind {
            OptimKind::AdamW => (Buffer::zeros(total), Buffer::zeros(total)),
            OptimKind::Sgd => (Buffer::default(), Buffer::default()),
        };
        let decay = tensors.iter().map(|t| (t.range(), t.decay)).collect();
        Optimizer { kind, beta1, beta2, eps, weight_decay, decay, exp_avg: m, exp_avg_sq: v, steps: 0 }
    }

    /// One update with learning rate `lr` on the gradient `grad_scale · grads` (the clipping coefficient is
    /// applied here rather than in a separate pass over the gradient).
    pub fn step(&mut self, params: &mut Buffer, grads: &Buffer, lr: f64, grad_scale: f32) {
        self.steps += 1;
        let t = self.steps as i32;
        for (range, decays) in &self.decay {
            let wd = if *decays { self.weight_decay } else { 0.0 };
            match self.kind {
                OptimKind::Sgd => engine::sgd(params, grads, range.clone(), lr as f32, wd as f32, grad_scale),
                OptimKind::AdamW => {
                    let step = AdamWStep {
                        decay: (1.0 - lr * wd) as f32,
                        beta1: self.beta1 as f32,
                        beta2: self.beta2 as f32,
                        step_size: (lr / (1.0 - self.beta1.powi(t))) as f32,
                        bias_correction2_sqrt: (1.0 - self.beta2.powi(t)).sqrt() as f32,
                        eps: self.eps as f32,
                        grad_scale,
                    };
                    engine::adamw(params, grads, &mut self.exp_avg, &mut self.exp_avg_sq, range.clone(), step);
                }
            }
        }
    }
}

/// Global L2 norm of the gradient: what transformers logs as `grad_norm` (before clipping).
pub fn grad_norm(grads: &Buffer) -> f64 {
    engine::sum_of_squares(grads).sqrt()
}

/// The factor `clip_grad_norm_` scales the gradient by: `max_norm / (norm + 1e-6)` when that is below 1, else 1
/// (`max_norm <= 0` disables clipping).
pub fn clip_coefficient(norm: f64, max_norm: f64) -> f32 {
    if max_norm > 0.0 {
        let coef = max_norm / (norm + 1e-6);
        if coef < 1.0 {
            return coef as f32;
        }
    }
    1.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clipping_scales_to_max_norm_and_reports_the_norm_before() {
        let g = Buffer::from_host(vec![3.0f32, 4.0]);
        assert!((grad_norm(&g) - 5.0).abs() < 1e-9);
        assert!((clip_coefficient(5.0, 1.0) - 0.2).abs() < 1e-6);
        assert_eq!(clip_coefficient(0.5, 1.0), 1.0);
        assert_eq!(clip_coefficient(5.0, 0.0), 1.0);
        // SGD applies the coefficient: p −= lr · coef · g.
        let tensors = vec![TensorSlot { name: "w".into(), shape: vec![2], offset: 0, decay: true }];
        let mut opt = Optimizer::new(OptimKind::Sgd, &tensors, 0.9, 0.999, 1e-8, 0.0);
        let mut p = Buffer::from_host(vec![1.0f32, 1.0]);
        opt.step(&mut p, &g, 0.5, 0.2);
        let p = p.to_host();
        assert!((p[0] - 0.7).abs() < 1e-6 && (p[1] - 0.6).abs() < 1e-6);
    }
}
