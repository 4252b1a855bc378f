//! Grouped-query attention over packed sequences, in 64-row query blocks keeping only the log-sum-exp of each
//! score row (memory linear in the sequence length): forward, backward, and continuation of cached prefixes.
use super::*;
use crate::engine::cpu::gemm::sgemm_strided;

/// Geometry of grouped-query attention over a packed batch whose q, k and v come fused in one row per token:
/// `[q (heads·d) | k (kv_heads·d) | v (kv_heads·d)]`.
pub struct AttnShape<'a> {
    pub seq_starts: &'a [usize],
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Sliding window: position p sees keys p − window + 1 ..= p. `None`: all earlier keys.
    pub window: Option<usize>,
    /// What the scores q·k are multiplied by (`head_dim^-1/2`, Gemma's `query_pre_attn_scalar^-1/2`).
    pub scale: f32,
    /// Gemma's `attn_logit_softcapping`: scaled scores become `cap · tanh(s / cap)` before the softmax.
    pub softcap: Option<f32>,
}

impl AttnShape<'_> {
    /// The first key position that position `p` attends to.
    #[inline]
    pub fn first_key(&self, p: usize) -> usize {
        match self.window {
            Some(w) => (p + 1).saturating_sub(w),
            None => 0,
        }
    }

    pub fn n_seqs(&self) -> usize {
        self.seq_starts.len() - 1
    }
    /// Width of a fused q|k|v row.
    pub fn qkv_width(&self) -> usize {
        (self.heads + 2 * self.kv_heads) * self.head_dim
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

/// In-place softmax of a score row over keys `lo..=t`, zeros elsewhere; returns the row's log-sum-exp.
#[inline(always)]
fn causal_softmax_row(row: &mut [f32], lo: usize, t: usize) -> f32 {
    row[..lo].fill(0.0);
    let max = lane_max(&row[lo..=t]);
    let mut lanes = [0f32; LANES];
    let mut chunks = row[lo..=t].chunks_exact_mut(LANES);
    for c in &mut chunks {
        for j in 0..LANES {
            c[j] = exp_f32(c[j] - max);
            lanes[j] += c[j];
        }
    }
    for v in chunks.into_remainder() {
        *v = exp_f32(*v - max);
        lanes[0] += *v;
    }
    let sum = lanes.iter().sum::<f32>();
    let inv = 1.0 / sum;
    row[lo..=t].iter_mut().for_each(|v| *v *= inv);
    row[t + 1..].fill(0.0);
    max + sum.ln()
}

/// Query rows handled at once by the attention kernels: their score block is `ATTN_BLOCK × keys`, so memory
/// grows linearly with the sequence length, never quadratically.
const ATTN_BLOCK: usize = 64;

/// Causal attention inside each sequence on fused `qkv: [N, qkv_width]`, writing `out: [N, heads·d]` and the
/// log-sum-exp of every (row, head) score row, `lse: [N, heads]`, which is all the backward pass needs to rebuild
/// the probabilities. Scores and outputs are GEMMs on strided views, one (sequence, head) per task, one block of
/// query rows at a time.
pub fn attention_forward(shape: &AttnShape, qkv: &[f32], out: &mut [f32], lse: &mut [f32]) {
    let (h, kvh, d) = (shape.heads, shape.kv_heads, shape.head_dim);
    let (w, ow) = (shape.qkv_width(), h * d);
    let group = h / kvh;
    let scale = shape.scale;
    let n = *shape.seq_starts.last().unwrap_or(&0);
    assert!(lse.len() >= n * h && out.len() >= n * ow && qkv.len() >= n * w);
    let out_ptr = SharedMut(out.as_mut_ptr());
    let lse_ptr = SharedMut(lse.as_mut_ptr());
    let tasks: Vec<(usize, usize)> = (0..shape.n_seqs()).flat_map(|s| (0..h).map(move |hh| (s, hh))).collect();
    tasks.par_iter().for_each(|&(s, hh)| {
        let (start, end) = (shape.seq_starts[s], shape.seq_starts[s + 1]);
        let l = end - start;
        let kv = hh / group;
        let mut sc = vec![0f32; ATTN_BLOCK.min(l) * l];
        // SAFETY: task (s, hh) writes only head hh's columns of rows start..end of `out` and of `lse`; no two
        // tasks share them. The read views lie inside `qkv` (asserted above).
        unsafe {
            let rows = qkv.as_ptr().add(start * w);
            let (ks, vs) = (rows.add(ow + kv * d), rows.add(ow + kvh * d + kv * d));
            for b0 in (0..l).step_by(ATTN_BLOCK) {
                // Keys k0..end cover every row of the block (k0 > 0 only under a sliding window).
                let (bn, end, k0) = (ATTN_BLOCK.min(l - b0), (b0 + ATTN_BLOCK).min(l), shape.first_key(b0));
                let keys = end - k0;
                let qs = rows.add(b0 * w + hh * d);
                sgemm_strided(bn, d, keys, scale, qs, w, 1, ks.add(k0 * w), 1, w, 0.0, sc.as_mut_ptr(), keys, 1);
                for i in 0..bn {
                    let t = b0 + i;
                    let (lo, hi, row) = (shape.first_key(t) - k0, t - k0, &mut sc[i * keys..(i + 1) * keys]);
                    cap_scores(shape, &mut row[lo..=hi]);
                    let l_row = causal_softmax_row(row, lo, hi);
                    *lse_ptr.ptr().add((start + t) * h + hh) = l_row;
                }
                let o = out_ptr.ptr().add((start + b0) * ow + hh * d);
                sgemm_strided(bn, keys, d, 1.0, sc.as_ptr(), keys, 1, vs.add(k0 * w), w, 1, 0.0, o, ow, 1);
            }
        }
    });
}

/// Backward of `attention_forward`, rebuilding each block of probabilities from `lse`: writes the q part of
/// `dqkv` and adds into its k and v parts, which must start zeroed. `out` is the forward's output.
pub fn attention_backward(shape: &AttnShape, dout: &[f32], qkv: &[f32], out: &[f32], lse: &[f32], dqkv: &mut [f32]) {
    let (h, kvh, d) = (shape.heads, shape.kv_heads, shape.head_dim);
    let (w, ow) = (shape.qkv_width(), h * d);
    let group = h / kvh;
    let scale = shape.scale;
    let n = *shape.seq_starts.last().unwrap_or(&0);
    assert!(lse.len() >= n * h && dout.len() >= n * ow && out.len() >= n * ow && qkv.len() >= n * w && dqkv.len() >= n * w);
    let d_ptr = SharedMut(dqkv.as_mut_ptr());
    // One task per (sequence, kv head): the query heads of a group all add into the same dk/dv columns.
    let tasks: Vec<(usize, usize)> = (0..shape.n_seqs()).flat_map(|s| (0..kvh).map(move |kv| (s, kv))).collect();
    tasks.par_iter().for_each(|&(s, kv)| {
        let (start, end) = (shape.seq_starts[s], shape.seq_starts[s + 1]);
        let l = end - start;
        let mut p = vec![0f32; ATTN_BLOCK.min(l) * l];
        let mut ds = vec![0f32; ATTN_BLOCK.min(l) * l];
        for hh in kv * group..(kv + 1) * group {
            // SAFETY: this task alone writes head hh's q columns (hh is in its group) and kv head kv's k/v columns
            // of rows start..end of dqkv; the read views lie inside their buffers (asserted above).
            unsafe {
                let rows = qkv.as_ptr().add(start * w);
                let (ks, vs) = (rows.add(ow + kv * d), rows.add(ow + kvh * d + kv * d));
                let drows = d_ptr.ptr().add(start * w);
                let (dk, dv) = (drows.add(ow + kv * d), drows.add(ow + kvh * d + kv * d));
                for b0 in (0..l).step_by(ATTN_BLOCK) {
                    let (bn, end, k0) = (ATTN_BLOCK.min(l - b0), (b0 + ATTN_BLOCK).min(l), shape.first_key(b0));
                    let keys = end - k0;
                    let qs = rows.add(b0 * w + hh * d);
                    let dos = dout.as_ptr().add((start + b0) * ow + hh * d);
                    let (kb, vb) = (ks.add(k0 * w), vs.add(k0 * w));
                    // P = exp(scale·Q·Kᵀ − lse), dP = dO·Vᵀ, dS = P ∘ (dP − rowsum(dO ∘ O)) · scale.
                    sgemm_strided(bn, d, keys, scale, qs, w, 1, kb, 1, w, 0.0, p.as_mut_ptr(), keys, 1);
                    sgemm_strided(bn, d, keys, 1.0, dos, ow, 1, vb, 1, w, 0.0, ds.as_mut_ptr(), keys, 1);
                    for i in 0..bn {
                        let t = b0 + i;
                        let (lo, hi) = (shape.first_key(t) - k0, t - k0);
                        let row_lse = lse[(start + t) * h + hh];
                        let (pr, dr) = (&mut p[i * keys..(i + 1) * keys], &mut ds[i * keys..(i + 1) * keys]);
                        let (dor, orow) = (&dout[(start + t) * ow + hh * d..][..d], &out[(start + t) * ow + hh * d..][..d]);
                        let delta: f32 = dor.iter().zip(orow).map(|(a, b)| a * b).sum();
                        match shape.softcap {
                            None => {
                                for u in lo..=hi {
                                    pr[u] = exp_f32(pr[u] - row_lse);
                                    dr[u] = pr[u] * (dr[u] - delta) * scale;
                                }
                            }
                            // s = cap · tanh(r / cap), so ds/dr = 1 − tanh².
                            Some(cap) => {
                                for u in lo..=hi {
                                    let t = (pr[u] / cap).tanh();
                                    pr[u] = exp_f32(t * cap - row_lse);
                                    dr[u] = pr[u] * (dr[u] - delta) * (1.0 - t * t) * scale;
                                }
                            }
                        }
                        for u in (0..lo).chain(hi + 1..keys) {
                            pr[u] = 0.0;
                            dr[u] = 0.0;
                        }
                    }
                    let dq = drows.add(b0 * w + hh * d);
                    sgemm_strided(bn, keys, d, 1.0, ds.as_ptr(), keys, 1, kb, w, 1, 0.0, dq, w, 1);
                    sgemm_strided(keys, bn, d, 1.0, ds.as_ptr(), 1, keys, qs, w, 1, 1.0, dk.add(k0 * w), w, 1);
                    sgemm_strided(keys, bn, d, 1.0, p.as_ptr(), 1, keys, dos, ow, 1, 1.0, dv.add(k0 * w), w, 1);
                }
            }
        }
    });
}

/// Attention of sequences that continue cached prefixes (no gradient): sequence s of the pass (rows of `qkv`)
/// attends to rows `prefix[s].0 .. prefix[s].0 + prefix[s].1` of `prefix_kv` (k|v rows, the cached pass's
/// keys then values), then causally to its own rows.
pub fn attention_continuation(
    shape: &AttnShape,
    qkv: &[f32],
    prefix_kv: &[f32],
    prefix: &[(usize, usize)],
    out: &mut [f32],
) {
    let (h, kvh, d) = (shape.heads, shape.kv_heads, shape.head_dim);
    let (w, ow, pw) = (shape.qkv_width(), h * d, 2 * kvh * d);
    let group = h / kvh;
    let scale = shape.scale;
    let n = *shape.seq_starts.last().unwrap_or(&0);
    assert!(out.len() >= n * ow && qkv.len() >= n * w && prefix.len() == shape.n_seqs());
    for &(start, len) in prefix {
        assert!(prefix_kv.len() >= (start + len) * pw, "prefix rows outside the cache");
    }
    let out_ptr = SharedMut(out.as_mut_ptr());
    let tasks: Vec<(usize, usize)> = (0..shape.n_seqs()).flat_map(|s| (0..h).map(move |hh| (s, hh))).collect();
    tasks.par_iter().for_each(|&(s, hh)| {
        let (start, end) = (shape.seq_starts[s], shape.seq_starts[s + 1]);
        let (l, (pstart, plen)) = (end - start, prefix[s]);
        let kv = hh / group;
        let mut sc = vec![0f32; ATTN_BLOCK.min(l) * (plen + l)];
        // SAFETY: task (s, hh) writes only head hh's columns of rows start..end of `out`; all reads lie inside
        // `qkv` and `prefix_qkv` (asserted above).
        unsafe {
            let rows = qkv.as_ptr().add(start * w);
            let (ks, vs) = (rows.add(ow + kv * d), rows.add(ow + kvh * d + kv * d));
            let prows = prefix_kv.as_ptr().add(pstart * pw);
            let (pk, pv) = (prows.add(kv * d), prows.add(kvh * d + kv * d));
            for b0 in (0..l).step_by(ATTN_BLOCK) {
                let (bn, own_keys) = (ATTN_BLOCK.min(l - b0), (b0 + ATTN_BLOCK).min(l));
                let width = plen + own_keys;
                let qs = rows.add(b0 * w + hh * d);
                let o = out_ptr.ptr().add((start + b0) * ow + hh * d);
                if bn == 1 {
                    // Decoding: one query row. Plain loops beat four GEMM calls that would each pack their operands.
                    let o = std::slice::from_raw_parts_mut(o, d);
                    let q = std::slice::from_raw_parts(qs, d);
                    let (lo, sc) = (shape.first_key(plen + b0), &mut sc[..width]);
                    single_query_on(active(), q, (scale, shape.softcap), (pk, pv, plen, pw), (ks, vs, own_keys, w), sc, lo, plen + b0, o);
                    continue;
                }
                if plen > 0 {
                    sgemm_strided(bn, d, plen, scale, qs, w, 1, pk, 1, pw, 0.0, sc.as_mut_ptr(), width, 1);
                }
                sgemm_strided(bn, d, own_keys, scale, qs, w, 1, ks, 1, w, 0.0, sc.as_mut_ptr().add(plen), width, 1);
                for i in 0..bn {
                    let pos = plen + b0 + i;
                    let (lo, row) = (shape.first_key(pos), &mut sc[i * width..(i + 1) * width]);
                    cap_scores(shape, &mut row[lo..=pos]);
                    causal_softmax_row(row, lo, pos);
                }
                sgemm_strided(bn, own_keys, d, 1.0, sc.as_ptr().add(plen), width, 1, vs, w, 1, 0.0, o, ow, 1);
                if plen > 0 {
                    sgemm_strided(bn, plen, d, 1.0, sc.as_ptr(), width, 1, pv, pw, 1, 1.0, o, ow, 1);
                }
            }
        }
    });
}

/// Soft-caps a row's visible scores when the model asks for it.
#[inline]
fn cap_scores(shape: &AttnShape, scores: &mut [f32]) {
    if let Some(cap) = shape.softcap {
        softcap(scores, cap);
    }
}

/// Attention of one query row `q` over `plen` cached keys/values then `own` keys/values of its own pass,
/// causal from key `lo` to key `t`: `out = softmax(cap(scale · q·K)) · V`, with `scores` as scratch; the second
/// argument is (scale, soft-cap), `cached` and `own` are (keys, values, rows, row stride).
///
/// # Safety
/// The key and value pointers address `plen` (cached) and `own` (own) rows of `q.len()` floats, their row
/// strides apart.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn single_query(
    q: &[f32],
    (scale, cap): (f32, Option<f32>),
    cached: (*const f32, *const f32, usize, usize),
    own: (*const f32, *const f32, usize, usize),
    scores: &mut [f32],
    lo: usize,
    t: usize,
    out: &mut [f32],
) {
    let d = q.len();
    let ((pk, pv, plen, pw), (ks, vs, n_own, w)) = (cached, own);
    for j in 0..plen {
        scores[j] = scaled_dot(q, std::slice::from_raw_parts(pk.add(j * pw), d), scale);
    }
    for j in 0..n_own {
        scores[plen + j] = scaled_dot(q, std::slice::from_raw_parts(ks.add(j * w), d), scale);
    }
    if let Some(cap) = cap {
        softcap(&mut scores[lo..=t], cap);
    }
    causal_softmax_row(&mut scores[..plen + n_own], lo, t);
    out.fill(0.0);
    for j in 0..n_own {
        add_scaled(out, scores[plen + j], std::slice::from_raw_parts(vs.add(j * w), d));
    }
    for j in 0..plen {
        add_scaled(out, scores[j], std::slice::from_raw_parts(pv.add(j * pw), d));
    }
}

vectorised! { [unsafe] fn single_query_on(q: &[f32], scale_cap: (f32, Option<f32>), cached: (*const f32, *const f32, usize, usize), own: (*const f32, *const f32, usize, usize), scores: &mut [f32], lo: usize, t: usize, out: &mut [f32]) = single_query }

/// `scale · q·k`. Functions rather than closures, so that they inline into `vectorised`'s copy and compile to
/// its vectors (a closure stayed a call of its own, in baseline code).
#[inline(always)]
fn scaled_dot(q: &[f32], k: &[f32], scale: f32) -> f32 {
    let mut lanes = [0f32; LANES];
    // Whole chunks as fixed-width loops, so that they compile to vector instructions; the last partial
    // chunk adds into the first lanes, as the whole ones would.
    let (qs, ks) = (q.chunks_exact(LANES), k.chunks_exact(LANES));
    let (q_rest, k_rest) = (qs.remainder(), ks.remainder());
    for (qc, kc) in qs.zip(ks) {
        for l in 0..LANES {
            lanes[l] += qc[l] * kc[l];
        }
    }
    for (l, (a, b)) in q_rest.iter().zip(k_rest).enumerate() {
        lanes[l] += a * b;
    }
    lanes.iter().sum::<f32>() * scale
}

/// `out += p · v`, skipped for a zero weight (a key outside the window).
#[inline(always)]
fn add_scaled(out: &mut [f32], p: f32, v: &[f32]) {
    if p != 0.0 {
        out.iter_mut().zip(v).for_each(|(o, v)| *o += p * v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::cpu::isa::Isa;

    /// The decode-path kernels give portable's bits on every set `vectorised` compiles them for: single-query
    /// attention (dot products, softmax, weighted sum), SwiGLU, RMSNorm and RoPE, at widths off the vector lengths.
    #[test]
    fn vectorised_kernels_give_the_same_bits_on_every_set() {
        let value = |i: usize| ((i * 7919) % 113) as f32 / 29.0 - 1.9;
        let (d, w, plen, own) = (72, 200, 37, 5);
        let qkv: Vec<f32> = (0..(plen + own) * w).map(value).collect();
        let q: Vec<f32> = (0..d).map(|i| value(i + 5)).collect();
        let run = |isa: Isa| {
            let (mut scores, mut out) = (vec![0f32; plen + own], vec![0f32; d]);
            let (k, v) = (qkv.as_ptr(), unsafe { qkv.as_ptr().add(d) });
            // SAFETY: plen + own rows of w ≥ 2d floats, keys at 0 and values at d in each.
            unsafe { single_query_on(isa, &q, (0.125, Some(30.0)), (k, v, plen, w), (k.add(plen * w), v.add(plen * w), own, w), &mut scores, 3, plen + own - 1, &mut out) };
            let (gate, up): (Vec<f32>, Vec<f32>) = ((0..1001).map(value).collect(), (0..1001).map(|i| value(i + 1)).collect());
            let mut h = vec![0f32; 1001];
            swiglu_row_on(isa, &gate, &up, &mut h);
            let mut y = vec![0f32; 1001];
            let rstd = rmsnorm_row_on(isa, &gate, &up, 1e-6, &mut y);
            let mut rotated = gate.clone();
            rotate_row_on(isa, &mut rotated[..1000], &up[..25], &up[25..50], -1.0);
            [out, scores, h, y, rotated, vec![rstd]].concat().iter().map(|v| v.to_bits()).collect::<Vec<u32>>()
        };
        let want = run(Isa::Portable);
        for isa in Isa::available() {
            assert_eq!(run(isa), want, "{}", isa.name());
        }
    }
}
