//! LoRA adapters on a projection: forward (keeping `x·Aᵀ` for backward) and backward.
use crate::engine::cpu::pool::Buf;
use crate::engine::cpu::gemm::gemm;
use crate::model::lora::{Lora, LoraModule};
use rayon::prelude::*;

/// Adds the adapter's `(α/r)·(x·Aᵀ)·Bᵀ` into columns `out_col..out_col + out_dim` of `out` (rows `out_stride`
/// apart); returns `x·Aᵀ` for the backward pass.
pub(super) fn lora_forward(lora: &Lora, m: &LoraModule, input: &[f32], n: usize, out: &mut [f32], out_stride: usize) -> Buf {
    let r = lora.r;
    let mut u = Buf::zeros(n * r);
    gemm(n, m.in_dim, r, input, false, &lora.params.host()[m.a..], true, &mut u, false);
    let mut delta = Buf::zeros(n * m.out_dim);
    gemm(n, r, m.out_dim, &u, false, &lora.params.host()[m.b..], true, &mut delta, false);
    let s = lora.scale();
    out.par_chunks_mut(out_stride).zip(delta.par_chunks(m.out_dim)).for_each(|(row, d)| {
        row[m.out_col..m.out_col + m.out_dim].iter_mut().zip(d).for_each(|(o, d)| *o += s * d);
    });
    u
}

/// Backward of `lora_forward`: from the gradient of the whole output (`dy`, rows `dy_stride` apart), adds the
/// adapter's A and B gradients into `grads` (adapter layout) and its input gradient into `dinput`.
#[allow(clippy::too_many_arguments)]
pub(super) fn lora_backward(
    lora: &Lora,
    m: &LoraModule,
    dy: &[f32],
    dy_stride: usize,
    input: &[f32],
    u: &[f32],
    n: usize,
    grads: &mut [f32],
    dinput: &mut [f32],
) {
    let (r, s, o) = (lora.r, lora.scale(), m.out_dim);
    let mut dys = Buf::zeros(n * o);
    dys.par_chunks_mut(o).zip(dy.par_chunks(dy_stride)).for_each(|(d, row)| {
        d.iter_mut().zip(&row[m.out_col..m.out_col + o]).for_each(|(d, g)| *d = s * g);
    });
    gemm(o, n, r, &dys, true, u, false, &mut grads[m.b..][..o * r], true);
    let mut du = Buf::zeros(n * r);
    gemm(n, o, r, &dys, false, &lora.params.host()[m.b..], false, &mut du, false);
    gemm(r, n, m.in_dim, &du, true, input, false, &mut grads[m.a..][..r * m.in_dim], true);
    gemm(n, r, m.in_dim, &du, false, &lora.params.host()[m.a..], false, dinput, true);
}
