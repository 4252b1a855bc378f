//! The per-layer kernels of the decoder, each forward beside its backward. Rows are tokens of a packed batch.
use super::isa::{active, vectorised};
use rayon::prelude::*;

mod attention;
pub use attention::{attention_backward, attention_continuation, attention_forward, AttnShape};

/// A raw pointer that tasks may share when each writes a disjoint set of elements.
#[derive(Clone, Copy)]
pub(crate) struct SharedMut(pub *mut f32);
// SAFETY: only used where every task writes elements no other task touches (documented at each use).
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

impl SharedMut {
    /// A method (not field access) so closures capture the whole Sync wrapper, not the raw pointer.
    #[inline]
    pub(crate) fn ptr(&self) -> *mut f32 {
        self.0
    }
}

/// Σ x² with eight independent partial sums, so the loop vectorises.
#[inline(always)]
fn sum_of_squares(x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = x.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().map(|v| v * v).sum();
    for c in chunks {
        for j in 0..8 {
            acc[j] += c[j] * c[j];
        }
    }
    acc.iter().sum::<f32>() + tail
}

const LANES: usize = 8;

/// Maximum with independent lanes (vectorises; no NaN handling needed for finite logits).
#[inline(always)]
fn lane_max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder().iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    for c in chunks {
        for j in 0..LANES {
            acc[j] = if c[j] > acc[j] { c[j] } else { acc[j] };
        }
    }
    acc.iter().cloned().fold(tail, f32::max)
}

/// Statistics of one row of logits `z` with target token `t`: (log p(t), entropy, mean logit, log-sum-exp,
/// 1 / Σ exp(z − max), whether t has the largest logit). Overwrites `z` with `exp(z − max)`, so scaling it by the last value gives the softmax. Sums run in eight f32 lanes per block of 512, blocks added in f64.
pub fn logit_row_stats(z: &mut [f32], t: usize) -> (f32, f32, f32, f32, f32, bool) {
    let target = z[t];
    let max = lane_max(z);
    let (mut sum, mut zsum, mut ezsum) = (0f64, 0f64, 0f64);
    for block in z.chunks_mut(512) {
        let (mut s, mut zs, mut ez) = ([0f32; LANES], [0f32; LANES], [0f32; LANES]);
        let mut chunks = block.chunks_exact_mut(LANES);
        for c in &mut chunks {
            for j in 0..LANES {
                let v = c[j];
                let e = exp_f32(v - max);
                s[j] += e;
                zs[j] += v;
                ez[j] += e * v;
                c[j] = e;
            }
        }
        for v in chunks.into_remainder() {
            let e = exp_f32(*v - max);
            s[0] += e;
            zs[0] += *v;
            ez[0] += e * *v;
            *v = e;
        }
        sum += s.iter().map(|&x| x as f64).sum::<f64>();
        zsum += zs.iter().map(|&x| x as f64).sum::<f64>();
        ezsum += ez.iter().map(|&x| x as f64).sum::<f64>();
    }
    let lse = max as f64 + sum.ln();
    let logp = target as f64 - lse;
    let entropy = lse - ezsum / sum;
    (logp as f32, entropy as f32, (zsum / z.len() as f64) as f32, lse as f32, (1.0 / sum) as f32, target >= max)
}

/// RMSNorm as Llama computes it: `y = w ⊙ x / sqrt(mean(x²) + eps)`. Returns `rstd` per row for backward.
pub fn rmsnorm_forward(x: &[f32], w: &[f32], eps: f32, y: &mut [f32], rstd: &mut [f32]) {
    let h = w.len();
    y.par_chunks_mut(h).zip(x.par_chunks(h)).zip(rstd.par_iter_mut()).for_each(|((yr, xr), r)| {
        *r = rmsnorm_row_on(active(), xr, w, eps, yr);
    });
}

/// One row of `rmsnorm_forward`; returns its `rstd`.
#[inline(always)]
fn rmsnorm_row_and_rstd(x: &[f32], w: &[f32], eps: f32, y: &mut [f32]) -> f32 {
    let rstd = 1.0 / (sum_of_squares(x) / w.len() as f32 + eps).sqrt();
    rmsnorm_row(x, w, rstd, y);
    rstd
}

vectorised! { fn rmsnorm_row_on(x: &[f32], w: &[f32], eps: f32, y: &mut [f32]) -> f32 = rmsnorm_row_and_rstd }
vectorised! { fn swiglu_row_on(gate: &[f32], up: &[f32], h: &mut [f32]) = swiglu_row }

/// `rmsnorm_forward`'s output again from its input and `rstd`, bit for bit (backward recomputes it rather
/// than keeping it on the tape).
pub fn rmsnorm_apply(x: &[f32], w: &[f32], rstd: &[f32], y: &mut [f32]) {
    let h = w.len();
    y.par_chunks_mut(h).zip(x.par_chunks(h)).zip(rstd.par_iter()).for_each(|((yr, xr), &r)| rmsnorm_row(xr, w, r, yr));
}

#[inline(always)]
fn rmsnorm_row(x: &[f32], w: &[f32], rstd: f32, y: &mut [f32]) {
    for ((yv, xv), wv) in y.iter_mut().zip(x).zip(w) {
        *yv = wv * (xv * rstd);
    }
}

/// Rows per partial sum in the weight-gradient reductions below: partials are formed per fixed block of rows and
/// added in order, so the result does not depend on how rayon schedules the blocks (runs are bit-reproducible).
const ROWS_PER_PARTIAL: usize = 32;

/// Adds per-block partial vectors in block order.
fn sum_partials(partials: Vec<Vec<f32>>, into: &mut [f32]) {
    for p in partials {
        into.iter_mut().zip(&p).for_each(|(a, b)| *a += b);
    }
}

/// Backward of `rmsnorm_forward`: adds into `dx` and `dw`.
pub fn rmsnorm_backward(dy: &[f32], x: &[f32], w: &[f32], rstd: &[f32], dx: &mut [f32], dw: &mut [f32]) {
    let h = w.len();
    let b = ROWS_PER_PARTIAL;
    let partials: Vec<Vec<f32>> = dy
        .par_chunks(b * h)
        .zip(x.par_chunks(b * h))
        .zip(rstd.par_chunks(b))
        .zip(dx.par_chunks_mut(b * h))
        .map(|(((dyb, xb), rb), dxb)| {
            let mut acc = vec![0f32; h];
            for (((dyr, xr), &r), dxr) in dyb.chunks(h).zip(xb.chunks(h)).zip(rb).zip(dxb.chunks_mut(h)) {
                let mut dot = 0f32;
                for j in 0..h {
                    acc[j] += dyr[j] * xr[j] * r;
                    dot += dyr[j] * w[j] * xr[j];
                }
                let c = r * r * r * dot / h as f32;
                for j in 0..h {
                    dxr[j] += r * dyr[j] * w[j] - c * xr[j];
                }
            }
            acc
        })
        .collect();
    sum_partials(partials, dw);
}

/// Adds `bias` to the first `bias.len()` columns of every row (rows `row_stride` apart).
pub fn add_bias(x: &mut [f32], row_stride: usize, bias: &[f32]) {
    x.par_chunks_mut(row_stride).for_each(|row| row.iter_mut().zip(bias).for_each(|(v, b)| *v += b));
}

/// Backward of `add_bias`: adds the column sums of the first `dbias.len()` columns into `dbias`.
pub fn bias_backward(dy: &[f32], row_stride: usize, dbias: &mut [f32]) {
    let width = dbias.len();
    let partials: Vec<Vec<f32>> = dy
        .par_chunks(ROWS_PER_PARTIAL * row_stride)
        .map(|block| {
            let mut acc = vec![0f32; width];
            for row in block.chunks(row_stride) {
                acc.iter_mut().zip(row).for_each(|(a, v)| *a += v);
            }
            acc
        })
        .collect();
    sum_partials(partials, dbias);
}

/// Qwen3's per-head RMSNorm, in place on the q and k heads of fused q|k|v rows: each of the `heads` query heads
/// is normalised with `wq`, each of the `kv_heads` key heads with `wk`. `rstd` receives `[rows, heads + kv_heads]`.
#[allow(clippy::too_many_arguments)]
pub fn head_rmsnorm_forward(
    qkv: &mut [f32],
    row_stride: usize,
    heads: usize,
    kv_heads: usize,
    wq: &[f32],
    wk: &[f32],
    eps: f32,
    rstd: &mut [f32],
) {
    let d = wq.len();
    let nh = heads + kv_heads;
    qkv.par_chunks_mut(row_stride).zip(rstd.par_chunks_mut(nh)).for_each(|(row, r)| {
        for (hh, head) in row[..nh * d].chunks_mut(d).enumerate() {
            let w = if hh < heads { wq } else { wk };
            let inv = 1.0 / (sum_of_squares(head) / d as f32 + eps).sqrt();
            r[hh] = inv;
            head.iter_mut().zip(w).for_each(|(v, w)| *v = w * (*v * inv));
        }
    });
}

/// Backward of `head_rmsnorm_forward`: turns the q and k parts of `dqkv` (gradient after the norm) into the
/// gradient before it, given the pre-norm rows `pre`, and adds into `dwq`, `dwk`.
#[allow(clippy::too_many_arguments)]
pub fn head_rmsnorm_backward(
    dqkv: &mut [f32],
    pre: &[f32],
    row_stride: usize,
    heads: usize,
    kv_heads: usize,
    wq: &[f32],
    wk: &[f32],
    rstd: &[f32],
    dwq: &mut [f32],
    dwk: &mut [f32],
) {
    let d = wq.len();
    let nh = heads + kv_heads;
    let b = ROWS_PER_PARTIAL;
    let partials: Vec<(Vec<f32>, Vec<f32>)> = dqkv
        .par_chunks_mut(b * row_stride)
        .zip(pre.par_chunks(b * row_stride))
        .zip(rstd.par_chunks(b * nh))
        .map(|((dblock, xblock), rblock)| {
            let (mut gq, mut gk) = (vec![0f32; d], vec![0f32; d]);
            for ((drow, xrow), r) in dblock.chunks_mut(row_stride).zip(xblock.chunks(row_stride)).zip(rblock.chunks(nh)) {
                for hh in 0..nh {
                    let (w, gw) = if hh < heads { (wq, &mut gq) } else { (wk, &mut gk) };
                    let (dy, x, inv) = (&mut drow[hh * d..(hh + 1) * d], &xrow[hh * d..(hh + 1) * d], r[hh]);
                    let mut dot = 0f32;
                    for j in 0..d {
                        gw[j] += dy[j] * x[j] * inv;
                        dot += dy[j] * w[j] * x[j];
                    }
                    let c = inv * inv * inv * dot / d as f32;
                    for j in 0..d {
                        dy[j] = inv * dy[j] * w[j] - c * x[j];
                    }
                }
            }
            (gq, gk)
        })
        .collect();
    let (mut gq, mut gk) = (vec![0f32; d], vec![0f32; d]);
    for (a, b) in partials {
        gq.iter_mut().zip(&a).for_each(|(x, y)| *x += y);
        gk.iter_mut().zip(&b).for_each(|(x, y)| *x += y);
    }
    dwq.iter_mut().zip(&gq).for_each(|(a, b)| *a += b);
    dwk.iter_mut().zip(&gk).for_each(|(a, b)| *a += b);
}

/// Rotary tables in Hugging Face's "rotate half" layout, computed in f32 as transformers does.
pub struct Rope {
    pub half: usize,
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
}

impl Rope {
    /// A shared table for the rotary frequencies `inv_freq` (one per pair of a head's dimensions) covering at
    /// least `max_pos` positions; built once, reused by every forward and backward pass.
    pub fn cached(inv_freq: &[f32], max_pos: usize) -> std::sync::Arc<Rope> {
        use std::sync::{Arc, Mutex};
        type Entry = (Vec<f32>, Arc<Rope>);
        static TABLES: Mutex<Vec<Entry>> = Mutex::new(Vec::new());
        let mut tables = TABLES.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, r)) = tables.iter().find(|(f, r)| f.as_slice() == inv_freq && r.cos.len() / r.half.max(1) >= max_pos) {
            return r.clone();
        }
        // Round up so a slowly growing maximum length does not rebuild the table every time.
        let table = Arc::new(Rope::new(inv_freq, max_pos.next_power_of_two().max(256)));
        tables.retain(|(f, _)| f.as_slice() != inv_freq);
        tables.push((inv_freq.to_vec(), table.clone()));
        table
    }

    pub fn new(inv_freq: &[f32], max_pos: usize) -> Self {
        let half = inv_freq.len();
        let mut cos = vec![0f32; max_pos * half];
        let mut sin = vec![0f32; max_pos * half];
        for p in 0..max_pos {
            for j in 0..half {
                let a = p as f32 * inv_freq[j];
                cos[p * half + j] = a.cos();
                sin[p * half + j] = a.sin();
            }
        }
        Rope { half, cos, sin }
    }

    /// Rotates, in place, the heads in columns `0..cols` of every row of `x` (rows `row_stride` apart);
    /// `positions[row]` is the token's position in its sequence. `inverse` applies the transpose rotation
    /// (the backward pass).
    pub fn apply(&self, x: &mut [f32], row_stride: usize, cols: usize, positions: &[u32], inverse: bool) {
        let half = self.half;
        let sign = if inverse { -1.0 } else { 1.0 };
        x.par_chunks_mut(row_stride).zip(positions.par_iter()).for_each(|(row, &p)| {
            let c = &self.cos[p as usize * half..][..half];
            let s = &self.sin[p as usize * half..][..half];
            rotate_row_on(active(), &mut row[..cols], c, s, sign);
        });
    }
}

/// Rotates each head of `row` (heads `2·c.len()` wide: first half, second half) by the angles of `c`, `s`.
#[inline(always)]
fn rotate_row(row: &mut [f32], c: &[f32], s: &[f32], sign: f32) {
    let half = c.len();
    for head in row.chunks_mut(2 * half) {
        let (a, b) = head.split_at_mut(half);
        for j in 0..half {
            let (x1, x2) = (a[j], b[j]);
            a[j] = x1 * c[j] - sign * x2 * s[j];
            b[j] = x2 * c[j] + sign * x1 * s[j];
        }
    }
}

vectorised! { fn rotate_row_on(row: &mut [f32], c: &[f32], s: &[f32], sign: f32) = rotate_row }

/// `exp` for f32 by range reduction and a degree-6 polynomial (Cephes `expf`): within 2 ulp of the libm result
/// on the range that matters here, and simple enough for the compiler to vectorise the loops that call it.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    let x = x.clamp(-87.3, 88.7);
    // Round to nearest by adding and subtracting 1.5·2²³: plain f32 arithmetic, so loops vectorise (f32::round
    // is a libm call on baseline x86-64).
    const SHIFTER: f32 = 12_582_912.0;
    let shifted = x * std::f32::consts::LOG2_E + SHIFTER;
    let n = shifted - SHIFTER;
    // The integer n sits in the low mantissa bits of `shifted`: read it from there, because `n as i32` (a
    // saturating conversion with a NaN check) does not vectorise and was most of this function's cost.
    let n_int = shifted.to_bits().wrapping_sub(SHIFTER.to_bits()) as i32;
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let p = 1.987_569_1e-4f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 5.000_000_1e-1;
    let p = p * r * r + r + 1.0;
    p * f32::from_bits((n_int.wrapping_add(127) as u32) << 23)
}

#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp_f32(-x))
}

/// SwiGLU on the fused gate/up projection: each row of `gate_up` is `[gate (inter) | up (inter)]`;
/// `h = silu(gate) ⊙ up`, `[rows, inter]`.
pub fn swiglu_forward(gate_up: &[f32], inter: usize, h: &mut [f32]) {
    h.par_chunks_mut(inter).zip(gate_up.par_chunks(2 * inter)).for_each(|(h, gu)| {
        let (gate, up) = gu.split_at(inter);
        swiglu_row_on(active(), gate, up, h)
    });
}

#[inline(always)]
fn swiglu_row(gate: &[f32], up: &[f32], h: &mut [f32]) {
    for ((h, &g), &u) in h.iter_mut().zip(gate).zip(up) {
        *h = g * sigmoid(g) * u;
    }
}

/// Backward of `swiglu_forward`: writes `dgate_up` (same layout as `gate_up`).
pub fn swiglu_backward(dh: &[f32], gate_up: &[f32], inter: usize, dgate_up: &mut [f32]) {
    dgate_up.par_chunks_mut(2 * inter).zip(gate_up.par_chunks(2 * inter)).zip(dh.par_chunks(inter)).for_each(
        |((dgu, gu), dh)| {
            let (gate, up) = gu.split_at(inter);
            let (dgate, dup) = dgu.split_at_mut(inter);
            for j in 0..inter {
                let (g, s) = (gate[j], sigmoid(gate[j]));
                dup[j] = dh[j] * g * s;
                dgate[j] = dh[j] * up[j] * s * (1.0 + g * (1.0 - s));
            }
        },
    );
}

/// `sqrt(2/π)` as PyTorch's GELU-tanh writes it (`M_SQRT2 * M_2_SQRTPI * 0.5`), and the cubic's coefficient.
const GELU_BETA: f32 = (std::f64::consts::SQRT_2 * std::f64::consts::FRAC_2_SQRT_PI * 0.5) as f32;
const GELU_KAPPA: f32 = 0.044715;

/// GELU with the tanh approximation, as PyTorch's `gelu(approximate="tanh")`.
#[inline(always)]
fn gelu_tanh(x: f32) -> f32 {
    let inner = GELU_BETA * (x + GELU_KAPPA * x * x * x);
    0.5 * x * (1.0 + inner.tanh())
}

/// Its derivative, as PyTorch's `gelu_backward(approximate="tanh")` forms it.
#[inline(always)]
fn gelu_tanh_grad(x: f32) -> f32 {
    let x_sq = x * x;
    let t = (GELU_BETA * (x + GELU_KAPPA * x_sq * x)).tanh();
    let (left, right) = (0.5 * x, 1.0 + t);
    0.5 * right + left * (1.0 - t * t) * GELU_BETA * (1.0 + 3.0 * GELU_KAPPA * x_sq)
}

/// Gemma's gated MLP on the fused gate/up projection: `h = gelu_tanh(gate) ⊙ up`.
pub fn geglu_forward(gate_up: &[f32], inter: usize, h: &mut [f32]) {
    h.par_chunks_mut(inter).zip(gate_up.par_chunks(2 * inter)).for_each(|(h, gu)| {
        let (gate, up) = gu.split_at(inter);
        for ((h, &g), &u) in h.iter_mut().zip(gate).zip(up) {
            *h = gelu_tanh(g) * u;
        }
    });
}

/// Backward of `geglu_forward`: writes `dgate_up`.
pub fn geglu_backward(dh: &[f32], gate_up: &[f32], inter: usize, dgate_up: &mut [f32]) {
    dgate_up.par_chunks_mut(2 * inter).zip(gate_up.par_chunks(2 * inter)).zip(dh.par_chunks(inter)).for_each(
        |((dgu, gu), dh)| {
            let (gate, up) = gu.split_at(inter);
            let (dgate, dup) = dgu.split_at_mut(inter);
            for j in 0..inter {
                dup[j] = dh[j] * gelu_tanh(gate[j]);
                dgate[j] = dh[j] * up[j] * gelu_tanh_grad(gate[j]);
            }
        },
    );
}

/// The gated MLP's activation of the family: `h = act(gate) ⊙ up`.
pub fn glu_forward(act: crate::model::Activation, gate_up: &[f32], inter: usize, h: &mut [f32]) {
    match act {
        crate::model::Activation::Silu => swiglu_forward(gate_up, inter, h),
        crate::model::Activation::GeluTanh => geglu_forward(gate_up, inter, h),
    }
}

/// Backward of `glu_forward`.
pub fn glu_backward(act: crate::model::Activation, dh: &[f32], gate_up: &[f32], inter: usize, dgate_up: &mut [f32]) {
    match act {
        crate::model::Activation::Silu => swiglu_backward(dh, gate_up, inter, dgate_up),
        crate::model::Activation::GeluTanh => geglu_backward(dh, gate_up, inter, dgate_up),
    }
}

/// Gemma's soft-capping in place, `v ← tanh(v / cap) · cap`, in transformers' order of operations.
pub fn softcap(values: &mut [f32], cap: f32) {
    values.iter_mut().for_each(|v| *v = (*v / cap).tanh() * cap);
}
