//! Simple reference kernels: plain loops, one obvious line per formula. The fast kernels are tested against
//! these (and these against finite differences through the whole decoder).
use super::kernels::{AttnShape, SharedMut};
use rayon::prelude::*;

/// Causal attention inside each sequence. `q: [N, heads·d]`, `k, v: [N, kv_heads·d]`, `out: [N, heads·d]`;
/// `probs` receives each (sequence, head) softmax matrix (row t holds the weights over keys 0..=t).
pub fn attention_forward_naive(shape: &AttnShape, q: &[f32], k: &[f32], v: &[f32], out: &mut [f32], probs: &mut [f32]) {
    let (h, kvh, d) = (shape.heads, shape.kv_heads, shape.head_dim);
    let (qw, kw) = (h * d, kvh * d);
    let group = h / kvh;
    let scale = shape.scale;
    let (offs, _) = shape.prob_offsets();
    let out_ptr = SharedMut(out.as_mut_ptr());
    let probs_ptr = SharedMut(probs.as_mut_ptr());
    let tasks: Vec<(usize, usize)> = (0..shape.n_seqs()).flat_map(|s| (0..h).map(move |hh| (s, hh))).collect();
    tasks.par_iter().for_each(|&(s, hh)| {
        let (start, end) = (shape.seq_starts[s], shape.seq_starts[s + 1]);
        let l = end - start;
        let kv = hh / group;
        // SAFETY: task (s, hh) writes only head hh's columns of rows start..end of `out`, and only its own
        // [l, l] block of `probs`; no two tasks share either.
        let p = unsafe { std::slice::from_raw_parts_mut(probs_ptr.ptr().add(offs[s * h + hh]), l * l) };
        for t in 0..l {
            let qr = &q[(start + t) * qw + hh * d..][..d];
            let row = &mut p[t * l..t * l + l];
            let mut max = f32::NEG_INFINITY;
            let lo = shape.first_key(t);
            row.fill(0.0);
            for u in lo..=t {
                let kr = &k[(start + u) * kw + kv * d..][..d];
                let mut sc = qr.iter().zip(kr).map(|(a, b)| a * b).sum::<f32>() * scale;
                if let Some(cap) = shape.softcap {
                    sc = cap * (sc / cap).tanh();
                }
                row[u] = sc;
                max = max.max(sc);
            }
            let mut sum = 0f32;
            for val in row[lo..=t].iter_mut() {
                *val = (*val - max).exp();
                sum += *val;
            }
            let inv = 1.0 / sum;
            row[lo..=t].iter_mut().for_each(|v| *v *= inv);
            let o = unsafe { std::slice::from_raw_parts_mut(out_ptr.ptr().add((start + t) * qw + hh * d), d) };
            o.fill(0.0);
            for u in shape.first_key(t)..=t {
                let vr = &v[(start + u) * kw + kv * d..][..d];
                let pu = row[u];
                o.iter_mut().zip(vr).for_each(|(a, b)| *a += pu * b);
            }
        }
    });
}

/// Backward of `attention_forward`: writes `dq` and adds into `dk`, `dv` (which must start zeroed).
#[allow(clippy::too_many_arguments)]
pub fn attention_backward_naive(
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
    let scale = shape.scale;
    let (offs, _) = shape.prob_offsets();
    let (dq_ptr, dk_ptr, dv_ptr) = (SharedMut(dq.as_mut_ptr()), SharedMut(dk.as_mut_ptr()), SharedMut(dv.as_mut_ptr()));
    // One task per (sequence, kv head): the query heads of a group all write the same dk/dv columns.
    let tasks: Vec<(usize, usize)> = (0..shape.n_seqs()).flat_map(|s| (0..kvh).map(move |kv| (s, kv))).collect();
    tasks.par_iter().for_each(|&(s, kv)| {
        let (start, end) = (shape.seq_starts[s], shape.seq_starts[s + 1]);
        let l = end - start;
        let mut dp = vec![0f32; l];
        for hh in kv * group..(kv + 1) * group {
            let p = &probs[offs[s * h + hh]..][..l * l];
            for t in 0..l {
                let row = &p[t * l..t * l + l];
                let dor = &dout[(start + t) * qw + hh * d..][..d];
                let mut dot = 0f32;
                for u in 0..=t {
                    let vr = &v[(start + u) * kw + kv * d..][..d];
                    dp[u] = dor.iter().zip(vr).map(|(a, b)| a * b).sum();
                    dot += row[u] * dp[u];
                }
                // SAFETY: this task alone writes head hh's columns of dq rows start..end (hh is in its group)
                // and kv head kv's columns of dk/dv rows start..end.
                let dqr = unsafe { std::slice::from_raw_parts_mut(dq_ptr.ptr().add((start + t) * qw + hh * d), d) };
                dqr.fill(0.0);
                let qr = &q[(start + t) * qw + hh * d..][..d];
                for u in 0..=t {
                    let kr = &k[(start + u) * kw + kv * d..][..d];
                    // Through the soft-cap s = cap · tanh(r / cap): ds/dr = 1 − tanh(r / cap)².
                    let capped = match shape.softcap {
                        Some(cap) => 1.0 - ((qr.iter().zip(kr).map(|(a, b)| a * b).sum::<f32>() * scale) / cap).tanh().powi(2),
                        None => 1.0,
                    };
                    let ds = row[u] * (dp[u] - dot) * capped * scale;
                    let dkr = unsafe { std::slice::from_raw_parts_mut(dk_ptr.ptr().add((start + u) * kw + kv * d), d) };
                    let dvr = unsafe { std::slice::from_raw_parts_mut(dv_ptr.ptr().add((start + u) * kw + kv * d), d) };
                    for j in 0..d {
                        dqr[j] += ds * kr[j];
                        dkr[j] += ds * qr[j];
                        dvr[j] += row[u] * dor[j];
                    }
                }
            }
        }
    });
}
