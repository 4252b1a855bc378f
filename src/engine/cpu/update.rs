//! The element-wise passes of an optimizer step over flat f32 buffers, split over the engine's threads: the
//! AdamW and SGD updates, the gradient's sum of squares, zeroing. `optim` owns the semantics (state, bias
//! correction, weight decay per tensor); this is the part a device backend replaces.
use rayon::prelude::*;

/// Elements per task: large enough to amortise scheduling, and the fixed unit of the ordered reductions.
const CHUNK: usize = 1 << 14;

/// The scalars of one AdamW update (PyTorch's `torch.optim.AdamW`, non-fused formula).
#[derive(Debug, Clone, Copy)]
pub struct AdamWStep {
    /// `1 − lr · weight_decay`.
    pub decay: f32,
    pub beta1: f32,
    pub beta2: f32,
    /// `lr / (1 − beta1^t)`.
    pub step_size: f32,
    /// `sqrt(1 − beta2^t)`.
    pub bias_correction2_sqrt: f32,
    pub eps: f32,
    /// The clipping coefficient, applied to the gradient as it is read.
    pub grad_scale: f32,
}

pub fn adamw(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], s: AdamWStep) {
    // Chunks with a plain inner loop: one compiled form that vectorises (element-wise rayon iterators over four
    // zipped slices compiled to half the speed in some call contexts).
    p.par_chunks_mut(CHUNK).zip(g.par_chunks(CHUNK)).zip(m.par_chunks_mut(CHUNK)).zip(v.par_chunks_mut(CHUNK)).for_each(
        |(((p, g), m), v)| {
            for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
                let g = g * s.grad_scale;
                *p *= s.decay;
                *m += (1.0 - s.beta1) * (g - *m);
                *v = *v * s.beta2 + (1.0 - s.beta2) * g * g;
                let denom = v.sqrt() / s.bias_correction2_sqrt + s.eps;
                *p -= s.step_size * *m / denom;
            }
        },
    );
}

/// `p −= lr · (grad_scale · g + weight_decay · p)` (PyTorch's SGD without momentum).
pub fn sgd(p: &mut [f32], g: &[f32], lr: f32, weight_decay: f32, grad_scale: f32) {
    p.par_iter_mut().zip(g.par_iter()).for_each(|(p, &g)| *p -= lr * (g * grad_scale + weight_decay * *p));
}

/// `Σ g²` in f64, from partial sums per fixed chunk added in order: the same bits whatever the thread schedule.
pub fn sum_of_squares(g: &[f32]) -> f64 {
    let partials: Vec<f64> = g.par_chunks(CHUNK).map(|c| c.iter().map(|&x| x as f64 * x as f64).sum::<f64>()).collect();
    partials.iter().sum()
}

pub fn zero(buf: &mut [f32]) {
    buf.par_iter_mut().for_each(|v| *v = 0.0);
}

/// The engine's worker threads (all cores unless `set_threads` said otherwise).
pub fn threads() -> usize {
    rayon::current_num_threads()
}

/// Fixes the number of worker threads; only before the first parallel pass.
pub fn set_threads(n: usize) -> Result<(), String> {
    rayon::ThreadPoolBuilder::new().num_threads(n).build_global().map_err(|e| e.to_string())
}
