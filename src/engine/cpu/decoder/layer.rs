//! One decoder layer: its forward (saving a tape) beside its backward, and the layer stack.
use super::*;
use crate::engine::cpu::pool::Buf;
use crate::engine::cpu::gemm::{gemm, gemm_w};
use crate::engine::cpu::weights::Weights;
use crate::engine::cpu::kernels::{self, AttnShape, Rope};
use crate::model::lora::{LoraModule, Target};
use crate::model::Model;
use rayon::prelude::*;

pub(super) struct LayerTape {
    /// Each norm's input and inverse RMS: backward recomputes the normed rows from them (exactly, with
    /// `rmsnorm_apply`), as it recomputes `h` from `gate_up`, rather than keeping them.
    pub(super) x_in: Buf,
    pub(super) rstd1: Buf,
    /// Fused `[q | k | v]` rows after RoPE, and the log-sum-exp of every (row, head) attention score row.
    pub(super) qkv: Buf,
    pub(super) attn_lse: Buf,
    /// With per-head q/k norms: the rows before the norm, and each (row, head)'s inverse RMS.
    pub(super) qk_pre: Buf,
    pub(super) qk_rstd: Buf,
    pub(super) att: Buf,
    pub(super) x_mid: Buf,
    pub(super) rstd2: Buf,
    /// Fused `[gate | up]` rows.
    pub(super) gate_up: Buf,
    /// Gemma's sandwich norms: the attention and MLP projections' outputs before their norms, and those
    /// norms' inverse RMS per row (empty in the other families).
    pub(super) o_out: Buf,
    pub(super) o_rstd: Buf,
    pub(super) down_out: Buf,
    pub(super) down_rstd: Buf,
    /// Per adapter of the layer (in `Lora::layers` order): its input times Aᵀ, `[N, r]` (`[M, r]` after attention
    /// when the layer keeps only `out_rows`).
    pub(super) lora_u: Vec<Buf>,
    /// The last layer computes its output only at the rows that are scored (nothing reads the others): those
    /// rows, and the attention output gathered at them. From `x_mid` on, such a tape holds only these rows.
    pub(super) out_rows: Option<Vec<usize>>,
    pub(super) att_out: Buf,
}

impl LayerTape {
    /// Floats held, for checking `tape_floats` against what a pass really keeps.
    pub(super) fn floats(&self) -> usize {
        let bufs = [&self.x_in, &self.rstd1, &self.qkv, &self.attn_lse, &self.qk_pre, &self.qk_rstd, &self.att];
        let rest = [&self.x_mid, &self.rstd2, &self.gate_up, &self.att_out, &self.o_out, &self.o_rstd, &self.down_out, &self.down_rstd];
        bufs.iter().chain(&rest).map(|b| b.len()).sum::<usize>() + self.lora_u.iter().map(|b| b.len()).sum::<usize>()
    }
}

/// Floats one layer's tape holds: `n` rows up to attention, `m` rows after it (`m == n` except in the last
/// layer, which runs only the scored rows past attention). Mirrors `layer_forward`'s buffers one by one.
pub(super) fn layer_tape_floats(model: &Model, l: usize, n: usize, m: usize, last: bool) -> usize {
    let spec = &model.spec;
    let (hd, qd, inter) = (spec.hidden, spec.q_dim(), spec.intermediate);
    let qkv_w = qd + 2 * spec.kv_dim();
    // x_in, rstd1, qkv, attn_lse, att; with q/k norms, qk_pre and qk_rstd.
    let mut before = hd + 1 + qkv_w + spec.heads + qd;
    if spec.qk_norm {
        before += qkv_w + spec.heads + spec.kv_heads;
    }
    // x_mid, rstd2, gate_up; the last layer also gathers attention's output at its rows.
    let mut after = hd + 1 + 2 * inter + if last { qd } else { 0 };
    if spec.sandwich_norms {
        after += 2 * (hd + 1);
    }
    let (mut lora_before, mut lora_after) = (0, 0);
    if let Some(lora) = &model.lora {
        for module in &lora.layers[l] {
            match module.target {
                Target::Q | Target::K | Target::V => lora_before += lora.r,
                _ => lora_after += lora.r,
            }
        }
    }
    n * (before + lora_before) + m * (after + lora_after)
}

/// What the forward kept of one layer: everything, or (gradient checkpointing) only its input.
pub(super) enum LayerRecord {
    Full(LayerTape),
    Checkpoint(Buf),
}

pub(super) fn linear(x: &[f32], rows: usize, w: Weights, in_dim: usize, out_dim: usize) -> Buf {
    let mut y = Buf::scratch(rows * out_dim);
    gemm_w(rows, in_dim, out_dim, x, false, w, true, &mut y, false);
    y
}

/// The decoder layers over `tokens` (embedding in, pre-norm hidden states out). Keeps the backward tape and/or
/// each layer's q|k|v rows when asked.
/// The decoder layers over `tokens` (embedding in, pre-norm hidden states out). Keeps the backward tape
/// (with `checkpoint`, only each layer's input, recomputed in backward) and/or each layer's q|k|v rows.
#[allow(clippy::too_many_arguments)]
pub(super) fn run_layers(
    model: &Model,
    tokens: &[u32],
    positions: &[u32],
    keys: Keys,
    pass: Pass,
    last_layer_rows: Option<&[usize]>,
) -> (Buf, Vec<LayerRecord>, Vec<Buf>) {
    let (p, lay, hd) = (model.params.weights(), &model.layout, model.spec.hidden);
    // With checkpointing a layer keeps no tape of its own: its input is kept here and backward recomputes it.
    let layer_pass = Pass { keep_tape: pass.keep_tape && !pass.checkpoint, checkpoint: false, ..pass };
    let mut x = Buf::scratch(tokens.len() * hd);
    // Gemma scales the looked-up rows by sqrt(hidden); the other families take them as stored.
    let scale = model.spec.embed_scale;
    x.par_chunks_mut(hd).zip(tokens.par_iter()).for_each(|(row, &t)| {
        p.copy_into(lay.embed + t as usize * hd, row);
        if let Some(scale) = scale {
            row.iter_mut().for_each(|v| *v *= scale);
        }
    });
    let (mut records, mut kept_kv) = (Vec::new(), Vec::new());
    let last = lay.layers.len().saturating_sub(1);
    for l in 0..lay.layers.len() {
        let x_in = (pass.keep_tape && pass.checkpoint).then(|| Buf::copy_of(&x));
        let rows = if l == last { last_layer_rows } else { None };
        let (tape, qkv) = layer_forward(model, l, &mut x, positions, &keys, layer_pass, rows);
        if let Some(q) = qkv {
            kept_kv.push(q);
        }
        match (tape, x_in) {
            (Some(t), _) => records.push(LayerRecord::Full(t)),
            (None, Some(x_in)) => records.push(LayerRecord::Checkpoint(x_in)),
            (None, None) => {}
        }
    }
    (x, records, kept_kv)
}

/// One decoder layer, updating the residual stream `x` in place; returns its tape when asked (and its k|v
/// rows with `keep_kv`). With `out_rows`, everything after attention runs only at those rows and `x` comes
/// back with just them (the last layer, whose other rows nothing reads).
#[allow(clippy::too_many_arguments)]
pub(super) fn layer_forward(
    model: &Model,
    l: usize,
    x: &mut Buf,
    positions: &[u32],
    keys: &Keys,
    pass: Pass,
    out_rows: Option<&[usize]>,
) -> (Option<LayerTape>, Option<Buf>) {
    let (keep_tape, keep_kv) = (pass.keep_tape, pass.keep_cache);
    let lora = if pass.adapters { model.lora.as_ref() } else { None };
    let spec = &model.spec;
    let p = model.params.weights();
    let lo = &model.layout.layers[l];
    let (n, hd) = (positions.len(), spec.hidden);
    let (qd, kvd, inter) = (spec.q_dim(), spec.kv_dim(), spec.intermediate);
    let max_pos = positions.iter().max().map_or(1, |&m| m as usize + 1);
    let rope = Rope::cached(&spec.rope_of(l).inv_freq(spec.head_dim), max_pos);
    let seq_starts = match keys {
        Keys::Causal { seq_starts } | Keys::Continuation { seq_starts, .. } => *seq_starts,
    };
    let qkv_w = (spec.heads + 2 * spec.kv_heads) * spec.head_dim;
    let shape = attn_shape(model, l, seq_starts);
    let mut xn1 = Buf::scratch(n * hd);
    let mut rstd1 = Buf::scratch(n);
    kernels::rmsnorm_forward(x, &norm_weight(model, lo.input_norm, hd), spec.rms_eps, &mut xn1, &mut rstd1);
    // q, k and v weights are consecutive in the layout: one GEMM against the [q|k|v] stack.
    let mut qkv = linear(&xn1, n, p.at(lo.q), hd, qkv_w);
    let mut lora_u = Vec::new();
    let adapters_of = |targets: &[Target]| -> Vec<&LoraModule> {
        lora.map(|lr| lr.layers[l].iter().filter(|m| targets.contains(&m.target)).collect()).unwrap_or_default()
    };
    for m in adapters_of(&[Target::Q, Target::K, Target::V]) {
        lora_u.push(lora_forward(lora.unwrap(), m, &xn1, n, &mut qkv, qkv_w));
    }
    if let Some(b) = lo.qkv_bias {
        kernels::add_bias(&mut qkv, qkv_w, &p.f32s(b, qkv_w));
    }
    let (mut qk_pre, mut qk_rstd) = (Buf::default(), Buf::default());
    if let (Some(qn), Some(kn)) = (lo.q_norm, lo.k_norm) {
        if keep_tape {
            qk_pre = Buf::copy_of(&qkv);
        }
        qk_rstd = Buf::zeros(n * (spec.heads + spec.kv_heads));
        let (wq, wk) = (&norm_weight(model, qn, spec.head_dim), &norm_weight(model, kn, spec.head_dim));
        kernels::head_rmsnorm_forward(&mut qkv, qkv_w, spec.heads, spec.kv_heads, wq, wk, spec.rms_eps, &mut qk_rstd);
    }
    rope.apply(&mut qkv, qkv_w, qd + kvd, positions, false);
    let mut att = Buf::zeros(n * qd);
    let mut attn_lse = Buf::default();
    match keys {
        Keys::Causal { .. } => {
            attn_lse = Buf::zeros(n * spec.heads);
            kernels::attention_forward(&shape, &qkv, &mut att, &mut attn_lse);
        }
        Keys::Continuation { cache, prefix, .. } => {
            kernels::attention_continuation(&shape, &qkv, &cache.kv[l], prefix, &mut att);
        }
    }
    let x_in = if keep_tape { Buf::copy_of(x) } else { Buf::default() };
    let att_out = match out_rows {
        Some(rows) => {
            *x = gather_rows(x, rows, hd);
            gather_rows(&att, rows, qd)
        }
        None => Buf::default(),
    };
    let (n, att_in) = match out_rows {
        Some(rows) => (rows.len(), &att_out),
        None => (n, &att),
    };
    // Gemma norms the projection's output before the residual add; the others add it straight in.
    let (mut o_out, mut o_rstd) = (Buf::default(), Buf::default());
    match lo.attn_out_norm {
        None => {
            gemm_w(n, qd, hd, att_in, false, p.at(lo.o), true, x, true);
            for m in adapters_of(&[Target::O]) {
                lora_u.push(lora_forward(lora.unwrap(), m, att_in, n, x, hd));
            }
        }
        Some(norm) => {
            o_out = linear(att_in, n, p.at(lo.o), qd, hd);
            for m in adapters_of(&[Target::O]) {
                lora_u.push(lora_forward(lora.unwrap(), m, att_in, n, &mut o_out, hd));
            }
            o_rstd = add_normed(x, &o_out, &norm_weight(model, norm, hd), spec.rms_eps);
        }
    }
    let mut xn2 = Buf::scratch(n * hd);
    let mut rstd2 = Buf::scratch(n);
    kernels::rmsnorm_forward(x, &norm_weight(model, lo.post_norm, hd), spec.rms_eps, &mut xn2, &mut rstd2);
    // gate and up weights are consecutive too: one GEMM against the [gate|up] stack.
    let mut gate_up = linear(&xn2, n, p.at(lo.gate), hd, 2 * inter);
    for m in adapters_of(&[Target::Gate, Target::Up]) {
        lora_u.push(lora_forward(lora.unwrap(), m, &xn2, n, &mut gate_up, 2 * inter));
    }
    let mut h = Buf::scratch(n * inter);
    kernels::glu_forward(spec.activation, &gate_up, inter, &mut h);
    let x_mid = if keep_tape { Buf::copy_of(x) } else { Buf::default() };
    let (mut down_out, mut down_rstd) = (Buf::default(), Buf::default());
    match lo.mlp_out_norm {
        None => {
            gemm_w(n, inter, hd, &h, false, p.at(lo.down), true, x, true);
            for m in adapters_of(&[Target::Down]) {
                lora_u.push(lora_forward(lora.unwrap(), m, &h, n, x, hd));
            }
        }
        Some(norm) => {
            down_out = linear(&h, n, p.at(lo.down), inter, hd);
            for m in adapters_of(&[Target::Down]) {
                lora_u.push(lora_forward(lora.unwrap(), m, &h, n, &mut down_out, hd));
            }
            down_rstd = add_normed(x, &down_out, &norm_weight(model, norm, hd), spec.rms_eps);
        }
    }
    // Later passes read only the keys and values (the queries were 78% of the row at Qwen2.5's shapes).
    let kept_kv = keep_kv.then(|| {
        let mut kv = Buf::scratch(qkv.len() / qkv_w * (qkv_w - qd));
        kv.chunks_exact_mut(qkv_w - qd).zip(qkv.chunks_exact(qkv_w)).for_each(|(d, row)| d.copy_from_slice(&row[qd..]));
        kv
    });
    let out_rows = out_rows.map(|r| r.to_vec());
    let tape = keep_tape.then(|| LayerTape {
        x_in,
        rstd1,
        qkv,
        attn_lse,
        qk_pre,
        qk_rstd,
        att,
        x_mid,
        rstd2,
        gate_up,
        o_out,
        o_rstd,
        down_out,
        down_rstd,
        lora_u,
        out_rows,
        att_out,
    });
    (tape, kept_kv)
}

/// The attention geometry of layer `l` over the sequences starting at `seq_starts`.
fn attn_shape<'a>(model: &Model, l: usize, seq_starts: &'a [usize]) -> AttnShape<'a> {
    let spec = &model.spec;
    AttnShape {
        seq_starts,
        heads: spec.heads,
        kv_heads: spec.kv_heads,
        head_dim: spec.head_dim,
        window: spec.layer_windows[l],
        scale: spec.attn_scale,
        softcap: spec.attn_softcap,
    }
}

/// Gemma's sandwich norm: `x += rmsnorm(y)`; returns the norm's inverse RMS per row for backward.
fn add_normed(x: &mut [f32], y: &[f32], w: &[f32], eps: f32) -> Buf {
    let mut normed = Buf::scratch(y.len());
    let mut rstd = Buf::scratch(y.len() / w.len());
    kernels::rmsnorm_forward(y, w, eps, &mut normed, &mut rstd);
    x.par_iter_mut().zip(normed.par_iter()).for_each(|(a, b)| *a += b);
    rstd
}

/// Backward of `add_normed`: the gradient at `y` from the residual's gradient `dx` (which flows on unchanged);
/// the norm's weight gradient goes to `sink`.
fn add_normed_backward(model: &Model, dx: &[f32], y: &[f32], rstd: &[f32], norm: usize, sink: &mut GradSink) -> Buf {
    let hd = model.spec.hidden;
    let mut dy = Buf::zeros(dx.len());
    kernels::rmsnorm_backward(dx, y, &norm_weight(model, norm, hd), rstd, &mut dy, sink.norm_weights(norm, hd));
    dy
}

/// Backward through decoder layer `l` from its tape: `dx` is the gradient at the layer's output (only at
/// `t.out_rows` when the layer kept just those), and the gradient at its input comes back. Weight gradients go
/// to `sink`.
pub(super) fn layer_backward(model: &Model, batch: &SeqBatch, l: usize, t: &LayerTape, rope: &Rope, mut dx: Buf, sink: &mut GradSink) -> Buf {
    let (spec, p, lo) = (&model.spec, model.params.weights(), &model.layout.layers[l]);
    let lora = model.lora.as_ref();
    let (n, hd, inter) = (batch.n_tokens(), spec.hidden, spec.intermediate);
    let (qd, kvd) = (spec.q_dim(), spec.kv_dim());
    let qkv_w = (spec.heads + 2 * spec.kv_heads) * spec.head_dim;
    let shape = attn_shape(model, l, &batch.seq_starts);
    // MLP block: x_out = x_mid + down(swiglu(gate(xn2), up(xn2))). A layer that kept only `out_rows` past
    // attention runs this block and the output projection on those rows (`dx` has just them).
    let nr = t.out_rows.as_ref().map_or(n, |r| r.len());
    let att_in = if t.out_rows.is_some() { &t.att_out } else { &t.att };
    let mut dh = Buf::scratch(nr * inter);
    let adapters_of = |targets: &[Target]| -> Vec<(usize, &LoraModule)> {
        lora.map(|lr| lr.layers[l].iter().enumerate().filter(|(_, m)| targets.contains(&m.target)).collect())
            .unwrap_or_default()
    };
    // With Gemma's sandwich norm the projection's gradient is the norm's backward of the residual's.
    let d_down = lo.mlp_out_norm.map(|norm| add_normed_backward(model, &dx, &t.down_out, &t.down_rstd, norm, sink));
    let dy = d_down.as_ref().unwrap_or(&dx);
    gemm_w(nr, hd, inter, dy, false, p.at(lo.down), false, &mut dh, false);
    let mut h = Buf::scratch(nr * inter);
    kernels::glu_forward(spec.activation, &t.gate_up, inter, &mut h);
    if let Some(g) = sink.base.as_deref_mut() {
        gemm(hd, nr, inter, dy, true, &h, false, &mut g[lo.down..][..hd * inter], true);
    }
    for (i, m) in adapters_of(&[Target::Down]) {
        let ag = sink.adapters.as_deref_mut().expect("adapter gradients");
        lora_backward(lora.unwrap(), m, dy, hd, &h, &t.lora_u[i], nr, ag, &mut dh);
    }
    drop((h, d_down));
    let mut dgate_up = Buf::scratch(nr * 2 * inter);
    kernels::glu_backward(spec.activation, &dh, &t.gate_up, inter, &mut dgate_up);
    let mut dxn2 = Buf::scratch(nr * hd);
    gemm_w(nr, 2 * inter, hd, &dgate_up, false, p.at(lo.gate), false, &mut dxn2, false);
    let w_post = norm_weight(model, lo.post_norm, hd);
    let mut xn2 = Buf::scratch(nr * hd);
    kernels::rmsnorm_apply(&t.x_mid, &w_post, &t.rstd2, &mut xn2);
    if let Some(g) = sink.base.as_deref_mut() {
        gemm(2 * inter, nr, hd, &dgate_up, true, &xn2, false, &mut g[lo.gate..][..2 * inter * hd], true);
    }
    for (i, m) in adapters_of(&[Target::Gate, Target::Up]) {
        let ag = sink.adapters.as_deref_mut().expect("adapter gradients");
        lora_backward(lora.unwrap(), m, &dgate_up, 2 * inter, &xn2, &t.lora_u[i], nr, ag, &mut dxn2);
    }
    drop((xn2, dgate_up));
    kernels::rmsnorm_backward(&dxn2, &t.x_mid, &w_post, &t.rstd2, &mut dx, sink.norm_weights(lo.post_norm, hd));

    // Attention block: x_mid = x_in + o(attention(rope(q(xn1)), rope(k(xn1)), v(xn1))).
    let d_o = lo.attn_out_norm.map(|norm| add_normed_backward(model, &dx, &t.o_out, &t.o_rstd, norm, sink));
    let dy = d_o.as_ref().unwrap_or(&dx);
    let mut datt = Buf::scratch(nr * qd);
    gemm_w(nr, hd, qd, dy, false, p.at(lo.o), false, &mut datt, false);
    if let Some(g) = sink.base.as_deref_mut() {
        gemm(hd, nr, qd, dy, true, att_in, false, &mut g[lo.o..][..hd * qd], true);
    }
    for (i, m) in adapters_of(&[Target::O]) {
        let ag = sink.adapters.as_deref_mut().expect("adapter gradients");
        lora_backward(lora.unwrap(), m, dy, hd, att_in, &t.lora_u[i], nr, ag, &mut datt);
    }
    drop(d_o);
    if let Some(rows) = &t.out_rows {
        // Back to every row: the rows past attention carried no gradient.
        datt = scatter_rows(&datt, rows, qd, n);
        dx = scatter_rows(&dx, rows, hd, n);
    }
    let mut dqkv = Buf::zeros(n * qkv_w);
    kernels::attention_backward(&shape, &datt, &t.qkv, &t.att, &t.attn_lse, &mut dqkv);
    rope.apply(&mut dqkv, qkv_w, qd + kvd, &batch.positions, true);
    if let (Some(qn), Some(kn)) = (lo.q_norm, lo.k_norm) {
        let d = spec.head_dim;
        let (mut dwq, mut dwk) = (vec![0f32; d], vec![0f32; d]);
        let (wq, wk) = (&norm_weight(model, qn, d), &norm_weight(model, kn, d));
        kernels::head_rmsnorm_backward(
            &mut dqkv, &t.qk_pre, qkv_w, spec.heads, spec.kv_heads, wq, wk, &t.qk_rstd, &mut dwq, &mut dwk,
        );
        if let Some(g) = sink.base.as_deref_mut() {
            g[qn..qn + d].iter_mut().zip(&dwq).for_each(|(a, b)| *a += b);
            g[kn..kn + d].iter_mut().zip(&dwk).for_each(|(a, b)| *a += b);
        }
    }
    if let (Some(b), Some(g)) = (lo.qkv_bias, sink.base.as_deref_mut()) {
        kernels::bias_backward(&dqkv, qkv_w, &mut g[b..b + qkv_w]);
    }
    let mut dxn1 = Buf::scratch(n * hd);
    gemm_w(n, qkv_w, hd, &dqkv, false, p.at(lo.q), false, &mut dxn1, false);
    let w_in = norm_weight(model, lo.input_norm, hd);
    let mut xn1 = Buf::scratch(n * hd);
    kernels::rmsnorm_apply(&t.x_in, &w_in, &t.rstd1, &mut xn1);
    if let Some(g) = sink.base.as_deref_mut() {
        gemm(qkv_w, n, hd, &dqkv, true, &xn1, false, &mut g[lo.q..][..qkv_w * hd], true);
    }
    for (i, m) in adapters_of(&[Target::Q, Target::K, Target::V]) {
        let ag = sink.adapters.as_deref_mut().expect("adapter gradients");
        lora_backward(lora.unwrap(), m, &dqkv, qkv_w, &xn1, &t.lora_u[i], n, ag, &mut dxn1);
    }
    drop(xn1);
    kernels::rmsnorm_backward(&dxn1, &t.x_in, &w_in, &t.rstd1, &mut dx, sink.norm_weights(lo.input_norm, hd));
    dx
}
