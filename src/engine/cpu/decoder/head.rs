//! The final norm and the vocabulary projection: scoring the scored rows block by block (forward) and its
//! backward, and moving rows between the full and the scored set.
use super::*;
use crate::engine::cpu::pool::Buf;
use crate::engine::cpu::gemm::{gemm, gemm_w};
use crate::engine::cpu::kernels::{self};
use crate::model::Model;
use rayon::prelude::*;

pub(super) fn final_norm(model: &Model, x: &[f32]) -> (Buf, Buf) {
    let hd = model.spec.hidden;
    let mut xf = Buf::scratch(x.len());
    let mut rstd = Buf::scratch(x.len() / hd);
    let w = norm_weight(model, model.layout.final_norm, hd);
    kernels::rmsnorm_forward(x, &w, model.spec.rms_eps, &mut xf, &mut rstd);
    (xf, rstd)
}

/// The model's logits of `rows` final-normed hidden states into `out: [rows, vocab]`: the vocabulary projection,
/// then Gemma's final soft-cap.
pub(super) fn vocab_logits(model: &Model, rows: usize, hidden: &[f32], out: &mut [f32]) {
    let (hd, vocab) = (model.spec.hidden, model.spec.vocab_size);
    let w = model.params.weights().slice(model.layout.lm_head, vocab * hd);
    gemm_w(rows, hd, vocab, hidden, false, w, true, out, false);
    if let Some(cap) = model.spec.final_softcap {
        out[..rows * vocab].par_chunks_mut(vocab).for_each(|row| kernels::softcap(row, cap));
    }
}

/// Whether a training forward keeps the softmax of its `m` scored rows for the backward pass. Never under a
/// final soft-cap, whose backward needs the logits themselves.
pub(super) fn keeps_softmax(model: &Model, m: usize) -> bool {
    model.spec.final_softcap.is_none() && m * model.spec.vocab_size * 4 <= softmax_cache_bytes()
}

/// Log-probs of the scored positions from their final hidden states, summed per sequence.
pub(super) fn score(
    model: &Model,
    hidden: &[f32],
    targets: &[u32],
    seq_of: &[usize],
    n_seqs: usize,
    mut softmax: Option<&mut [f32]>,
) -> (ScoredOutput, Buf) {
    let m = targets.len();
    let mut out = ScoredOutput {
        seq_logps: vec![0.0; n_seqs],
        token_logps: vec![0.0; m],
        entropy: vec![0.0; m],
        mean_logit: vec![0.0; m],
        target_is_argmax: vec![false; m],
    };
    let mut lse = Buf::zeros(m);
    lm_head_forward(model, hidden, targets, &mut out, &mut lse, softmax.as_deref_mut());
    for (i, &s) in seq_of.iter().enumerate() {
        out.seq_logps[s] += out.token_logps[i] as f64;
    }
    (out, lse)
}

/// `rows.len()` rows of `src` placed at `rows` of an `n`-row buffer, zeros elsewhere (inverse of `gather_rows`).
pub(super) fn scatter_rows(src: &[f32], rows: &[usize], width: usize, n: usize) -> Buf {
    let mut dst = Buf::zeros(n * width);
    for (i, &r) in rows.iter().enumerate() {
        dst[r * width..][..width].copy_from_slice(&src[i * width..][..width]);
    }
    dst
}

pub(super) fn gather_rows(src: &[f32], rows: &[usize], width: usize) -> Buf {
    let mut dst = Buf::scratch(rows.len() * width);
    dst.par_chunks_mut(width).zip(rows.par_iter()).for_each(|(d, &r)| d.copy_from_slice(&src[r * width..][..width]));
    dst
}

/// Logits of the scored rows, one block of rows at a time, reduced to log p(target), entropy, mean logit and
/// log-sum-exp; the full `[M, vocab]` logits never exist at once unless `softmax` asks to keep them (then it
/// receives the normalised probabilities).
pub(super) fn lm_head_forward(
    model: &Model,
    hidden: &[f32],
    targets: &[u32],
    out: &mut ScoredOutput,
    lse: &mut [f32],
    mut softmax: Option<&mut [f32]>,
) {
    let (hd, vocab) = (model.spec.hidden, model.spec.vocab_size);
    let m = targets.len();
    let keep = softmax.is_some();
    let mut scratch = if keep { Buf::default() } else { Buf::zeros(LM_HEAD_ROWS.min(m) * vocab) };
    for r0 in (0..m).step_by(LM_HEAD_ROWS) {
        let nr = LM_HEAD_ROWS.min(m - r0);
        let z = match softmax.as_deref_mut() {
            Some(all) => &mut all[r0 * vocab..(r0 + nr) * vocab],
            None => &mut scratch[..nr * vocab],
        };
        vocab_logits(model, nr, &hidden[r0 * hd..], z);
        let stats: Vec<(f32, f32, f32, f32, bool)> = z
            .par_chunks_mut(vocab)
            .zip(targets[r0..r0 + nr].par_iter())
            .map(|(zr, &t)| {
                let (lp, ent, ml, l, inv_sum, hit) = kernels::logit_row_stats(zr, t as usize);
                if keep {
                    zr.iter_mut().for_each(|e| *e *= inv_sum);
                }
                (lp, ent, ml, l, hit)
            })
            .collect();
        for (i, (lp, ent, ml, l, hit)) in stats.into_iter().enumerate() {
            out.target_is_argmax[r0 + i] = hit;
            out.token_logps[r0 + i] = lp;
            out.entropy[r0 + i] = ent;
            out.mean_logit[r0 + i] = ml;
            lse[r0 + i] = l;
        }
    }
}

/// Backward through the vocabulary projection: `dz = g · (onehot(target) − softmax(z))` per scored row, from
/// the kept softmax or recomputing `z` block by block; returns the gradient at the final-normed hidden states
/// `[M, hidden]` and adds the projection's weight gradient into `base` (full fine-tuning).
pub(super) fn lm_head_backward(
    model: &Model,
    batch: &SeqBatch,
    scored_hidden: &[f32],
    lse: &[f32],
    mut kept: Option<Buf>,
    dlogp: &[f32],
    mut base: Option<&mut [f32]>,
) -> Buf {
    let (lay, p) = (&model.layout, model.params.weights());
    let (hd, vocab) = (model.spec.hidden, model.spec.vocab_size);
    let m = batch.scored_rows.len();
    // lm_head: dz = g · (onehot(target) − softmax(z)), from the kept softmax or recomputing z block by block.
    let w_lm = p.slice(lay.lm_head, vocab * hd);
    let mut d_hidden = Buf::zeros(m * hd);
    let mut scratch = if kept.is_some() { Buf::default() } else { Buf::zeros(LM_HEAD_ROWS.min(m) * vocab) };
    let cap = model.spec.final_softcap;
    assert!(kept.is_none() || cap.is_none(), "a soft-capped head's backward recomputes its logits");
    for r0 in (0..m).step_by(LM_HEAD_ROWS) {
        let nr = LM_HEAD_ROWS.min(m - r0);
        let xs = &scored_hidden[r0 * hd..][..nr * hd];
        // Per row, dlogit/draw at the target: 1, or 1 − tanh² under the soft-cap z = cap · tanh(raw / cap).
        let mut target_slope = vec![1f32; nr];
        let z = match kept.as_deref_mut() {
            Some(all) => &mut all[r0 * vocab..(r0 + nr) * vocab],
            None => {
                let z = &mut scratch[..nr * vocab];
                gemm_w(nr, hd, vocab, xs, false, w_lm, true, z, false);
                z.par_chunks_mut(vocab).zip(target_slope.par_iter_mut()).enumerate().for_each(|(i, (zr, slope))| {
                    let l = lse[r0 + i];
                    match cap {
                        None => zr.iter_mut().for_each(|v| *v = kernels::exp_f32(*v - l)),
                        // Each entry becomes softmax · (1 − tanh²): the chain through the cap, folded in.
                        Some(cap) => {
                            let t = (zr[batch.scored_targets[r0 + i] as usize] / cap).tanh();
                            *slope = 1.0 - t * t;
                            zr.iter_mut().for_each(|v| {
                                let t = (*v / cap).tanh();
                                *v = kernels::exp_f32(t * cap - l) * (1.0 - t * t);
                            });
                        }
                    }
                });
                z
            }
        };
        z.par_chunks_mut(vocab).zip(target_slope.par_iter()).enumerate().for_each(|(i, (zr, &slope))| {
            let row = r0 + i;
            let g = dlogp[batch.scored_seq[row]];
            zr.iter_mut().for_each(|v| *v *= -g);
            zr[batch.scored_targets[row] as usize] += g * slope;
        });
        gemm_w(nr, vocab, hd, z, false, w_lm, false, &mut d_hidden[r0 * hd..][..nr * hd], false);
        if let Some(g) = base.as_deref_mut() {
            gemm(vocab, nr, hd, z, true, xs, false, &mut g[lay.lm_head..][..vocab * hd], true);
        }
    }
    d_hidden
}
