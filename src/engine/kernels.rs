//! The per-layer kernels of the decoder, each forward beside its backward. Rows are tokens of a packed batch.
use super::gemm::sgemm_strided;
use rayon::prelude::*;

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

/// RMSNorm as Llama computes it: `y = w ⊙ x / sqrt(mean(x²) + eps)`. Returns `rstd` per row for backward.
pub fn rmsnorm_forward(x: &[f32], w: &[f32], eps: f32, y: &mut [f32], rstd: &mut [f32]) {
    let h = w.len();
    y.par_chunks_mut(h).zip(x.par_chunks(h)).zip(rstd.par_iter_mut()).for_each(|((yr, xr), r)| {
        let ms = xr.iter().map(|v| v * v).sum::<f32>() / h as f32;
        *r = 1.0 / (ms + eps).sqrt();
        for ((yv, xv), wv) in yr.iter_mut().zip(xr).zip(w) {
            *yv = wv * (xv * *r);
        }
    });
}

/// Backward of `rmsnorm_forward`: adds into `dx` and `dw`.
pub fn rmsnorm_backward(dy: &[f32], x: &[f32], w: &[f32], rstd: &[f32], dx: &mut [f32], dw: &mut [f32]) {
    let h = w.len();
    // dw is a sum over rows: accumulate per thread, then reduce.
    let dw_sum = dy
        .par_chunks(h)
        .zip(x.par_chunks(h))
        .zip(rstd.par_iter())
        .zip(dx.par_chunks_mut(h))
        .fold(
            || vec![0f32; h],
            |mut acc, (((dyr, xr), &r), dxr)| {
                let mut dot = 0f32;
                for j in 0..h {
                    acc[j] += dyr[j] * xr[j] * r;
                    dot += dyr[j] * w[j] * xr[j];
                }
                let c = r * r * r * dot / h as f32;
                for j in 0..h {
                    dxr[j] += r * dyr[j] * w[j] - c * xr[j];
                }
                acc
            },
        )
        .reduce(|| vec![0f32; h], |mut a, b| {
            a.iter_mut().zip(&b).for_each(|(x, y)| *x += y);
            a
        });
    dw.iter_mut().zip(&dw_sum).for_each(|(a, b)| *a += b);
}

/// Rotary tables in Hugging Face's "rotate half" layout, computed in f32 as transformers does.
pub struct Rope {
    pub half: usize,
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
}

impl Rope {
    pub fn new(head_dim: usize, theta: f64, max_pos: usize) -> Self {
        let half = head_dim / 2;
        let inv_freq: Vec<f32> =
            (0..half).map(|j| 1.0 / (theta as f32).powf((2 * j) as f32 / head_dim as f32)).collect();
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

    /// Rotates every head of every row in place; `positions[row]` is the token's position in its sequence.
    /// `inverse` applies the transpose rotation (the backward pass).
    pub fn apply(&self, x: &mut [f32], width: usize, positions: &[u32], inverse: bool) {
        let half = self.half;
        let sign = if inverse { -1.0 } else { 1.0 };
        x.par_chunks_mut(width).zip(positions.par_iter()).for_each(|(row, &p)| {
            let c = &self.cos[p as usize * half..][..half];
            let s = &self.sin[p as usize * half..][..half];
            for head in row.chunks_mut(2 * half) {
                let (a, b) = head.split_at_mut(half);
                for j in 0..half {
                    let (x1, x2) = (a[j], b[j]);
                    a[j] = x1 * c[j] - sign * x2 * s[j];
                    b[j] = x2 * c[j] + sign * x1 * s[j];
                }
            }
        });
    }
}

#[inline]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// SwiGLU: `h = silu(gate) ⊙ up`.
pub fn swiglu_forward(gate: &[f32], up: &[f32], h: &mut [f32]) {
    h.par_iter_mut().zip(gate.par_iter()).zip(up.par_iter()).for_each(|((h, &g), &u)| *h = g * sigmoid(g) * u);
}

/// Backward of `swiglu_forward`: writes `dgate` and `dup`.
pub fn swiglu_backward(dh: &[f32], gate: &[f32], up: &[f32], dgate: &mut [f32], dup: &mut [f32]) {
    dgate.par_iter_mut().zip(dup.par_iter_mut()).enumerate().for_each(|(i, (dg, du))| {
        let g = gate[i];
        let s = sigmoid(g);
        *du = dh[i] * g * s;
        *dg = dh[i] * up[i] * s * (1.0 + g * (1.0 - s));
    });
}

/// Geometry of grouped-query attention over a packed batch.
pub struct AttnShape<'a> {
    pub seq_starts: &'a [usize],
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl AttnShape<'_> {
    pub fn n_seqs(&self) -> usize {
        self.seq_starts.len() - 1
    }
    /// Offsets of each (sequence, head) probability matrix `[L, L]` in the saved buffer, and its total size.
    pub fn prob_offsets(&self) -> (Vec<usize>, usize) {
        let mut offs = Vec::with_capacity(self.n_seqs() * self.heads);
        let mut total = 0;
        for s in 0..self.n_seqs() {
            let l = self.seq_starts[s + 1] - self.seq_starts[s];
            for _ in 0..self.heads {
                offs.push(total);
                total += l * l;
            }
        }
        (offs, total)
    }
}

/// Causal attention inside each sequence. `q: [N, heads·d]`, `k, v: [N, kv_heads·d]`, `out: [N, heads·d]`;
/// `probs` receives each (sequence, head) softmax matrix (row t holds the weights over keys 0..=t, zeros after).
/// Scores and outputs are GEMMs on strided views of the packed rows, one (sequence, head) per task.
pub fn attention_forward(shape: &AttnShape, q: &[f32], k: &[f32], v: &[f32], out: &mut [f32], probs: &mut [f32]) {
    let (h, kvh, d) = (shape.heads, shape.kv_heads, shape.head_dim);
    let (qw, kw) = (h * d, kvh * d);
    let group = h / kvh;
    let scale = 1.0 / (d as f32).sqrt();
    let (offs, total) = shape.prob_offsets();
    assert!(probs.len() >= total && out.len() >= q.len());
    let out_ptr = SharedMut(out.as_mut_ptr());
    let probs_ptr = SharedMut(probs.as_mut_ptr());
    let tasks: Vec<(usize, usize)> = (0..shape.n_seqs()).flat_map(|s| (0..h).map(move |hh| (s, hh))).collect();
    tasks.par_iter().for_each(|&(s, hh)| {
        let (start, end) = (shape.seq_starts[s], shape.seq_starts[s + 1]);
        let l = end - start;
        let kv = hh / group;
        // SAFETY: task (s, hh) writes only its own [l, l] block of `probs` and head hh's columns of rows
        // start..end of `out`; no two tasks share either. The read views lie inside q, k, v.
        unsafe {
            let p = std::slice::from_raw_parts_mut(probs_ptr.ptr().add(offs[s * h + hh]), l * l);
            let qs = q.as_ptr().add(start * qw + hh * d);
            let ks = k.as_ptr().add(start * kw + kv * d);
            let vs = v.as_ptr().add(start * kw + kv * d);
            sgemm_strided(l, d, l, scale, qs, qw, 1, ks, 1, kw, 0.0, p.as_mut_ptr(), l, 1);
            for t in 0..l {
                let row = &mut p[t * l..t * l + l];
                let max = row[..=t].iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0f32;
                for val in row[..=t].iter_mut() {
                    *val = (*val - max).exp();
                    sum += *val;
                }
                let inv = 1.0 / sum;
                row[..=t].iter_mut().for_each(|v| *v *= inv);
                row[t + 1..].fill(0.0);
            }
            sgemm_strided(l, l, d, 1.0, p.as_ptr(), l, 1, vs, kw, 1, 0.0, out_ptr.ptr().add(start * qw + hh * d), qw, 1);
        }
    });
}

/// Backward of `attention_forward`: writes `dq` and adds into `dk`, `dv` (which must start zeroed).
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    shape: &AttnShape,
    dout: &[f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    probs: &[f32],
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
) {
    let (h, kvh, d) = (shape.heads, shape.kv_heads, shape.head_dim);
    let (qw, kw) = (h * d, kvh * d);
    let group = h / kvh;
    let scale = 1.0 / (d as f32).sqrt();
    let (offs, _) = shape.prob_offsets();
    let (dq_ptr, dk_ptr, dv_ptr) = (SharedMut(dq.as_mut_ptr()), SharedMut(dk.as_mut_ptr()), SharedMut(dv.as_mut_ptr()));
    // One task per (sequence, kv head): the query heads of a group all add into the same dk/dv columns.
    let tasks: Vec<(usize, usize)> = (0..shape.n_seqs()).flat_map(|s| (0..kvh).map(move |kv| (s, kv))).collect();
    tasks.par_iter().for_each(|&(s, kv)| {
        let (start, end) = (shape.seq_starts[s], shape.seq_starts[s + 1]);
        let l = end - start;
        let mut ds = vec![0f32; l * l];
        for hh in kv * group..(kv + 1) * group {
            let p = &probs[offs[s * h + hh]..][..l * l];
            // SAFETY: this task alone writes head hh's columns of dq rows start..end (hh is in its group) and
            // kv head kv's columns of dk/dv rows start..end; the read views lie inside their buffers.
            unsafe {
                let dos = dout.as_ptr().add(start * qw + hh * d);
                let qs = q.as_ptr().add(start * qw + hh * d);
                let ks = k.as_ptr().add(start * kw + kv * d);
                let vs = v.as_ptr().add(start * kw + kv * d);
                // dP = dO·Vᵀ, then dS = P ∘ (dP − Σ_u P·dP) · scale, row by row.
                sgemm_strided(l, d, l, 1.0, dos, qw, 1, vs, 1, kw, 0.0, ds.as_mut_ptr(), l, 1);
                for t in 0..l {
                    let (pr, dr) = (&p[t * l..t * l + l], &mut ds[t * l..t * l + l]);
                    let dot: f32 = pr[..=t].iter().zip(&dr[..=t]).map(|(a, b)| a * b).sum();
                    for u in 0..=t {
                        dr[u] = pr[u] * (dr[u] - dot) * scale;
                    }
                    dr[t + 1..].fill(0.0);
                }
                sgemm_strided(l, l, d, 1.0, ds.as_ptr(), l, 1, ks, kw, 1, 0.0, dq_ptr.ptr().add(start * qw + hh * d), qw, 1);
                sgemm_strided(l, l, d, 1.0, ds.as_ptr(), 1, l, qs, qw, 1, 1.0, dk_ptr.ptr().add(start * kw + kv * d), kw, 1);
                sgemm_strided(l, l, d, 1.0, p.as_ptr(), 1, l, dos, qw, 1, 1.0, dv_ptr.ptr().add(start * kw + kv * d), kw, 1);
            }
        }
    });
}
