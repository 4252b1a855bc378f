//! Forward and backward of the Llama-family decoder over a packed batch, llm.c style: every layer's forward
//! saves what its backward needs on a `Tape`, and the backward walks the layers in reverse.
//!
//! Sequences are packed without padding: each token row knows its position, and attention never crosses a
//! sequence. That equals Hugging Face's right-padded forward at every real token (padding never changes a real
//! token's output), and the padding positions are never scored.
use super::buffers::Buf;
use super::gemm::gemm;
use super::kernels::{self, AttnShape, Rope};
use crate::model::lora::{Lora, LoraModule, Target};
use crate::model::Model;
use rayon::prelude::*;

/// Rows of the vocabulary projection computed at once: bounds the logits buffer to `LM_HEAD_ROWS × vocab`.
const LM_HEAD_ROWS: usize = 256;

/// A training forward keeps the softmax of its scored rows for the backward pass when it fits in this many
/// bytes (saving the backward a second vocabulary projection); larger ones are recomputed block by block.
static SOFTMAX_CACHE_BYTES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(64 << 20);

/// The budget for keeping the softmax between forward and backward, in bytes.
pub fn softmax_cache_bytes() -> usize {
    SOFTMAX_CACHE_BYTES.load(std::sync::atomic::Ordering::Relaxed)
}

/// Sets the budget for keeping the softmax between forward and backward (0: always recompute).
pub fn set_softmax_cache_bytes(bytes: usize) {
    SOFTMAX_CACHE_BYTES.store(bytes, std::sync::atomic::Ordering::Relaxed);
}

/// Sequences packed end to end, with the positions whose next token is scored.
#[derive(Debug, Clone, Default)]
pub struct SeqBatch {
    pub tokens: Vec<u32>,
    pub positions: Vec<u32>,
    /// `seq_starts[s]..seq_starts[s+1]` are the rows of sequence `s`.
    pub seq_starts: Vec<usize>,
    /// Rows whose next token is a completion token, the token they predict, and their sequence.
    pub scored_rows: Vec<usize>,
    pub scored_targets: Vec<u32>,
    pub scored_seq: Vec<usize>,
}

impl SeqBatch {
    /// `seqs[s] = (input ids, completion mask)`. Position t is scored when token t+1 is a completion token,
    /// exactly TRL's `labels[:, 1:] != -100`.
    pub fn new(seqs: &[(&[u32], &[bool])]) -> Self {
        let mut b = SeqBatch { seq_starts: vec![0], ..Default::default() };
        for (s, (ids, mask)) in seqs.iter().enumerate() {
            assert_eq!(ids.len(), mask.len(), "ids and completion mask differ in length");
            let start = b.tokens.len();
            b.tokens.extend_from_slice(ids);
            b.positions.extend(0..ids.len() as u32);
            for t in 0..ids.len().saturating_sub(1) {
                if mask[t + 1] {
                    b.scored_rows.push(start + t);
                    b.scored_targets.push(ids[t + 1]);
                    b.scored_seq.push(s);
                }
            }
            b.seq_starts.push(b.tokens.len());
        }
        b
    }
    pub fn n_seqs(&self) -> usize {
        self.seq_starts.len() - 1
    }
    pub fn n_tokens(&self) -> usize {
        self.tokens.len()
    }
    fn max_len(&self) -> usize {
        self.seq_starts.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0)
    }
}

/// What a forward pass yields at the scored positions.
#[derive(Debug, Clone, Default)]
pub struct ScoredOutput {
    /// Per sequence: sum of the log-probabilities of its completion tokens.
    pub seq_logps: Vec<f64>,
    /// Per scored position: log p(target), entropy of the next-token distribution, mean logit over the vocabulary.
    pub token_logps: Vec<f32>,
    pub entropy: Vec<f32>,
    pub mean_logit: Vec<f32>,
    /// Per scored position: whether the target is the most likely token (SFT's token accuracy).
    pub target_is_argmax: Vec<bool>,
}

struct LayerTape {
    x_in: Buf,
    xn1: Buf,
    rstd1: Buf,
    /// Fused `[q | k | v]` rows after RoPE, and the log-sum-exp of every (row, head) attention score row.
    qkv: Buf,
    attn_lse: Buf,
    /// With per-head q/k norms: the rows before the norm, and each (row, head)'s inverse RMS.
    qk_pre: Buf,
    qk_rstd: Buf,
    att: Buf,
    x_mid: Buf,
    xn2: Buf,
    rstd2: Buf,
    /// Fused `[gate | up]` rows.
    gate_up: Buf,
    /// Per adapter of the layer (in `Lora::layers` order): its input times Aᵀ, `[N, r]` (`[M, r]` after attention
    /// when the layer keeps only `out_rows`).
    lora_u: Vec<Buf>,
    h: Buf,
    /// The last layer computes its output only at the rows that are scored (nothing reads the others): those
    /// rows, and the attention output gathered at them. From `x_mid` on, such a tape holds only these rows.
    out_rows: Option<Vec<usize>>,
    att_out: Buf,
}

/// What the forward kept of one layer: everything, or (gradient checkpointing) only its input.
enum LayerRecord {
    Full(LayerTape),
    Checkpoint(Buf),
}

/// Activations a backward pass needs.
pub struct Tape {
    layers: Vec<LayerRecord>,
    x_final: Buf,
    rstd_final: Buf,
    /// Final-normed hidden states at the scored rows, `[M, hidden]`, and the log-sum-exp of their logits.
    scored_hidden: Buf,
    lse: Buf,
    /// The softmax of the scored rows, `[M, vocab]`, when it fits `SOFTMAX_CACHE_BYTES`.
    softmax: Option<Buf>,
}

fn linear(x: &[f32], rows: usize, w: &[f32], in_dim: usize, out_dim: usize) -> Buf {
    let mut y = Buf::scratch(rows * out_dim);
    gemm(rows, in_dim, out_dim, x, false, w, true, &mut y, false);
    y
}

/// Hidden states and keys/values of a finished pass that later passes may continue from (see
/// `forward_continuation`): per layer the fused q|k|v rows, and the final-normed hidden state of every row.
pub struct PrefixCache {
    seq_starts: Vec<usize>,
    tokens: Vec<u32>,
    qkv: Vec<Buf>,
    /// Final-normed hidden states of the pass's scored rows (`hidden_rows`, ascending), the only ones it computes.
    final_hidden: Buf,
    hidden_rows: Vec<usize>,
}

/// Which keys the tokens of a pass attend to.
enum Keys<'a> {
    /// Causal, inside each sequence of the pass.
    Causal { seq_starts: &'a [usize] },
    /// Each sequence of the pass continues `prefix[s] = (base row start, length)` rows of a cached pass.
    Continuation { seq_starts: &'a [usize], cache: &'a PrefixCache, prefix: &'a [(usize, usize)] },
}

/// The decoder layers over `tokens` (embedding in, pre-norm hidden states out). Keeps the backward tape and/or
/// each layer's q|k|v rows when asked.
/// The decoder layers over `tokens` (embedding in, pre-norm hidden states out). Keeps the backward tape
/// (with `checkpoint`, only each layer's input, recomputed in backward) and/or each layer's q|k|v rows.
#[allow(clippy::too_many_arguments)]
fn run_layers(
    model: &Model,
    tokens: &[u32],
    positions: &[u32],
    keys: Keys,
    keep_tape: bool,
    keep_qkv: bool,
    adapters: bool,
    checkpoint: bool,
    last_layer_rows: Option<&[usize]>,
) -> (Buf, Vec<LayerRecord>, Vec<Buf>) {
    let (p, lay, hd) = (&model.params, &model.layout, model.spec.hidden);
    let mut x = Buf::scratch(tokens.len() * hd);
    x.par_chunks_mut(hd).zip(tokens.par_iter()).for_each(|(row, &t)| {
        row.copy_from_slice(&p[lay.embed + t as usize * hd..][..hd]);
    });
    let (mut records, mut kept_qkv) = (Vec::new(), Vec::new());
    let last = lay.layers.len().saturating_sub(1);
    for l in 0..lay.layers.len() {
        let x_in = (keep_tape && checkpoint).then(|| Buf::copy_of(&x));
        let rows = if l == last { last_layer_rows } else { None };
        let (tape, qkv) = layer_forward(model, l, &mut x, positions, &keys, keep_tape && !checkpoint, keep_qkv, adapters, rows);
        if let Some(q) = qkv {
            kept_qkv.push(q);
        }
        match (tape, x_in) {
            (Some(t), _) => records.push(LayerRecord::Full(t)),
            (None, Some(x_in)) => records.push(LayerRecord::Checkpoint(x_in)),
            (None, None) => {}
        }
    }
    (x, records, kept_qkv)
}

/// One decoder layer, updating the residual stream `x` in place; returns its tape when asked (and its q|k|v
/// rows with `keep_qkv`). With `out_rows`, everything after attention runs only at those rows and `x` comes
/// back with just them (the last layer, whose other rows nothing reads).
#[allow(clippy::too_many_arguments)]
fn layer_forward(
    model: &Model,
    l: usize,
    x: &mut Buf,
    positions: &[u32],
    keys: &Keys,
    keep_tape: bool,
    keep_qkv: bool,
    adapters: bool,
    out_rows: Option<&[usize]>,
) -> (Option<LayerTape>, Option<Buf>) {
    let lora = if adapters { model.lora.as_ref() } else { None };
    let spec = &model.spec;
    let p = &model.params;
    let lo = &model.layout.layers[l];
    let (n, hd) = (positions.len(), spec.hidden);
    let (qd, kvd, inter) = (spec.q_dim(), spec.kv_dim(), spec.intermediate);
    let max_pos = positions.iter().max().map_or(1, |&m| m as usize + 1);
    let rope = Rope::cached(spec.head_dim, &spec.rope, max_pos);
    let seq_starts = match keys {
        Keys::Causal { seq_starts } | Keys::Continuation { seq_starts, .. } => *seq_starts,
    };
    let qkv_w = (spec.heads + 2 * spec.kv_heads) * spec.head_dim;
    let shape =
        AttnShape { seq_starts, heads: spec.heads, kv_heads: spec.kv_heads, head_dim: spec.head_dim, window: spec.layer_windows[l] };
    let mut xn1 = Buf::scratch(n * hd);
    let mut rstd1 = Buf::scratch(n);
    kernels::rmsnorm_forward(x, &p[lo.input_norm..][..hd], spec.rms_eps, &mut xn1, &mut rstd1);
    // q, k and v weights are consecutive in the layout: one GEMM against the [q|k|v] stack.
    let mut qkv = linear(&xn1, n, &p[lo.q..], hd, qkv_w);
    let mut lora_u = Vec::new();
    let adapters_of = |targets: &[Target]| -> Vec<&LoraModule> {
        lora.map(|lr| lr.layers[l].iter().filter(|m| targets.contains(&m.target)).collect()).unwrap_or_default()
    };
    for m in adapters_of(&[Target::Q, Target::K, Target::V]) {
        lora_u.push(lora_forward(lora.unwrap(), m, &xn1, n, &mut qkv, qkv_w));
    }
    if let Some(b) = lo.qkv_bias {
        kernels::add_bias(&mut qkv, qkv_w, &p[b..][..qkv_w]);
    }
    let (mut qk_pre, mut qk_rstd) = (Buf::default(), Buf::default());
    if let (Some(qn), Some(kn)) = (lo.q_norm, lo.k_norm) {
        if keep_tape {
            qk_pre = Buf::copy_of(&qkv);
        }
        qk_rstd = Buf::zeros(n * (spec.heads + spec.kv_heads));
        let (wq, wk) = (&p[qn..][..spec.head_dim], &p[kn..][..spec.head_dim]);
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
            kernels::attention_continuation(&shape, &qkv, &cache.qkv[l], prefix, &mut att);
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
    gemm(n, qd, hd, att_in, false, &p[lo.o..], true, x, true);
    for m in adapters_of(&[Target::O]) {
        lora_u.push(lora_forward(lora.unwrap(), m, att_in, n, x, hd));
    }
    let mut xn2 = Buf::scratch(n * hd);
    let mut rstd2 = Buf::scratch(n);
    kernels::rmsnorm_forward(x, &p[lo.post_norm..][..hd], spec.rms_eps, &mut xn2, &mut rstd2);
    // gate and up weights are consecutive too: one GEMM against the [gate|up] stack.
    let mut gate_up = linear(&xn2, n, &p[lo.gate..], hd, 2 * inter);
    for m in adapters_of(&[Target::Gate, Target::Up]) {
        lora_u.push(lora_forward(lora.unwrap(), m, &xn2, n, &mut gate_up, 2 * inter));
    }
    let mut h = Buf::scratch(n * inter);
    kernels::swiglu_forward(&gate_up, inter, &mut h);
    let x_mid = if keep_tape { Buf::copy_of(x) } else { Buf::default() };
    gemm(n, inter, hd, &h, false, &p[lo.down..], true, x, true);
    for m in adapters_of(&[Target::Down]) {
        lora_u.push(lora_forward(lora.unwrap(), m, &h, n, x, hd));
    }
    let kept_qkv = keep_qkv.then(|| Buf::copy_of(&qkv));
    let out_rows = out_rows.map(|r| r.to_vec());
    let tape = keep_tape.then(|| LayerTape {
        x_in,
        xn1,
        rstd1,
        qkv,
        attn_lse,
        qk_pre,
        qk_rstd,
        att,
        x_mid,
        xn2,
        rstd2,
        gate_up,
        h,
        lora_u,
        out_rows,
        att_out,
    });
    (tape, kept_qkv)
}

/// Adds the adapter's `(α/r)·(x·Aᵀ)·Bᵀ` into columns `out_col..out_col + out_dim` of `out` (rows `out_stride`
/// apart); returns `x·Aᵀ` for the backward pass.
fn lora_forward(lora: &Lora, m: &LoraModule, input: &[f32], n: usize, out: &mut [f32], out_stride: usize) -> Buf {
    let r = lora.r;
    let mut u = Buf::zeros(n * r);
    gemm(n, m.in_dim, r, input, false, &lora.params[m.a..], true, &mut u, false);
    let mut delta = Buf::zeros(n * m.out_dim);
    gemm(n, r, m.out_dim, &u, false, &lora.params[m.b..], true, &mut delta, false);
    let s = lora.scale();
    out.par_chunks_mut(out_stride).zip(delta.par_chunks(m.out_dim)).for_each(|(row, d)| {
        row[m.out_col..m.out_col + m.out_dim].iter_mut().zip(d).for_each(|(o, d)| *o += s * d);
    });
    u
}

/// Backward of `lora_forward`: from the gradient of the whole output (`dy`, rows `dy_stride` apart), adds the
/// adapter's A and B gradients into `grads` (adapter layout) and its input gradient into `dinput`.
#[allow(clippy::too_many_arguments)]
fn lora_backward(
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
    gemm(n, o, r, &dys, false, &lora.params[m.b..], false, &mut du, false);
    gemm(r, n, m.in_dim, &du, true, input, false, &mut grads[m.a..][..r * m.in_dim], true);
    gemm(n, r, m.in_dim, &du, false, &lora.params[m.a..], false, dinput, true);
}

fn final_norm(model: &Model, x: &[f32]) -> (Buf, Buf) {
    let hd = model.spec.hidden;
    let mut xf = Buf::scratch(x.len());
    let mut rstd = Buf::scratch(x.len() / hd);
    let w = &model.params[model.layout.final_norm..][..hd];
    kernels::rmsnorm_forward(x, w, model.spec.rms_eps, &mut xf, &mut rstd);
    (xf, rstd)
}

/// Log-probs of the scored positions from their final hidden states, summed per sequence.
fn score(
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
fn scatter_rows(src: &[f32], rows: &[usize], width: usize, n: usize) -> Buf {
    let mut dst = Buf::zeros(n * width);
    for (i, &r) in rows.iter().enumerate() {
        dst[r * width..][..width].copy_from_slice(&src[i * width..][..width]);
    }
    dst
}

fn gather_rows(src: &[f32], rows: &[usize], width: usize) -> Buf {
    let mut dst = Buf::scratch(rows.len() * width);
    dst.par_chunks_mut(width).zip(rows.par_iter()).for_each(|(d, &r)| d.copy_from_slice(&src[r * width..][..width]));
    dst
}

/// Full logits `[len, vocab]` of every position of each sequence (for checks against other implementations and
/// for sampling; training never builds them).
pub fn forward_logits(model: &Model, seqs: &[&[u32]]) -> Vec<Vec<f32>> {
    let masks: Vec<Vec<bool>> = seqs.iter().map(|s| vec![false; s.len()]).collect();
    let pairs: Vec<(&[u32], &[bool])> = seqs.iter().zip(&masks).map(|(s, m)| (*s, m.as_slice())).collect();
    let batch = SeqBatch::new(&pairs);
    let keys = Keys::Causal { seq_starts: &batch.seq_starts };
    let (x, _, _) = run_layers(model, &batch.tokens, &batch.positions, keys, false, false, true, false, None);
    let (xf, _) = final_norm(model, &x);
    let (hd, vocab) = (model.spec.hidden, model.spec.vocab_size);
    let w = &model.params[model.layout.lm_head..][..vocab * hd];
    batch
        .seq_starts
        .windows(2)
        .map(|r| {
            let rows = r[1] - r[0];
            let mut logits = vec![0f32; rows * vocab];
            gemm(rows, hd, vocab, &xf[r[0] * hd..r[1] * hd], false, w, true, &mut logits, false);
            logits
        })
        .collect()
}

/// Runs the decoder. With `keep_tape` the activations are kept for `backward`.
pub fn forward(model: &Model, batch: &SeqBatch, keep_tape: bool) -> (ScoredOutput, Option<Tape>) {
    let (out, tape, _) = forward_with_cache(model, batch, keep_tape, false, true, false);
    (out, tape)
}

/// `forward`, also returning what `forward_continuation` needs to continue this pass's sequences. `adapters`:
/// apply the model's LoRA adapters (false: the frozen base, KTO's reference under LoRA). `checkpoint`: the tape
/// keeps only each layer's input and backward recomputes the rest (gradient checkpointing; same numbers).
pub fn forward_with_cache(
    model: &Model,
    batch: &SeqBatch,
    keep_tape: bool,
    keep_cache: bool,
    adapters: bool,
    checkpoint: bool,
) -> (ScoredOutput, Option<Tape>, Option<PrefixCache>) {
    let keys = Keys::Causal { seq_starts: &batch.seq_starts };
    // The last layer runs only the scored rows past attention: the hidden state comes back with just them.
    let rows = Some(batch.scored_rows.as_slice());
    let (x, tapes, qkv) =
        run_layers(model, &batch.tokens, &batch.positions, keys, keep_tape, keep_cache, adapters, checkpoint, rows);
    let (scored_hidden, rstd_final) = final_norm(model, &x);
    let m = batch.scored_rows.len();
    let mut softmax = (keep_tape && m * model.spec.vocab_size * 4 <= softmax_cache_bytes())
        .then(|| Buf::zeros(m * model.spec.vocab_size));
    let (out, lse) =
        score(model, &scored_hidden, &batch.scored_targets, &batch.scored_seq, batch.n_seqs(), softmax.as_deref_mut().map(|v| v.as_mut_slice()));
    let cache = keep_cache.then(|| PrefixCache {
        seq_starts: batch.seq_starts.clone(),
        tokens: batch.tokens.clone(),
        qkv,
        final_hidden: Buf::copy_of(&scored_hidden),
        hidden_rows: batch.scored_rows.clone(),
    });
    let tape = keep_tape.then_some(Tape { layers: tapes, x_final: x, rstd_final, scored_hidden, lse, softmax });
    (out, tape, cache)
}

/// Sequences that share a prefix with sequences of a cached pass: only the tokens after the prefix are run.
#[derive(Debug, Clone, Default)]
pub struct ContinuationBatch {
    tokens: Vec<u32>,
    positions: Vec<u32>,
    seq_starts: Vec<usize>,
    /// Per sequence: (first row of its base sequence in the cache, prefix length).
    prefix: Vec<(usize, usize)>,
    /// Per scored position: row of its hidden state (in the cache when `from_cache`), target, sequence.
    scored_rows: Vec<(bool, usize)>,
    scored_targets: Vec<u32>,
    scored_seq: Vec<usize>,
}

impl ContinuationBatch {
    /// `seqs[s] = (base sequence in `cache`, prefix length, full ids, full completion mask)`; the first
    /// `prefix length` ids must be the base sequence's first tokens.
    pub fn new(cache: &PrefixCache, seqs: &[(usize, usize, &[u32], &[bool])]) -> Self {
        let mut b = ContinuationBatch { seq_starts: vec![0], ..Default::default() };
        for (s, &(base, plen, ids, mask)) in seqs.iter().enumerate() {
            let base_start = cache.seq_starts[base];
            assert!(plen <= cache.seq_starts[base + 1] - base_start && plen <= ids.len(), "prefix longer than a sequence");
            assert_eq!(&cache.tokens[base_start..base_start + plen], &ids[..plen], "prefix differs from the cached tokens");
            let own_start = b.tokens.len();
            b.tokens.extend_from_slice(&ids[plen..]);
            b.positions.extend(plen as u32..ids.len() as u32);
            for t in 0..ids.len().saturating_sub(1) {
                if mask[t + 1] {
                    let row = if t < plen {
                        // The main pass kept final hidden states only at its scored rows.
                        let kept = cache.hidden_rows.binary_search(&(base_start + t));
                        (true, kept.expect("a continued sequence scores a prefix row the cached pass did not score"))
                    } else {
                        (false, own_start + t - plen)
                    };
                    b.scored_rows.push(row);
                    b.scored_targets.push(ids[t + 1]);
                    b.scored_seq.push(s);
                }
            }
            b.prefix.push((base_start, plen));
            b.seq_starts.push(b.tokens.len());
        }
        b
    }
}

/// A no-gradient forward of sequences that continue cached prefixes: equal to `forward` on the full sequences,
/// without recomputing the prefix.
/// `adapters` must be what the cached pass used.
pub fn forward_continuation(model: &Model, batch: &ContinuationBatch, cache: &PrefixCache, adapters: bool) -> ScoredOutput {
    let keys = Keys::Continuation { seq_starts: &batch.seq_starts, cache, prefix: &batch.prefix };
    let (x, _, _) = run_layers(model, &batch.tokens, &batch.positions, keys, false, false, adapters, false, None);
    let (xf, _) = final_norm(model, &x);
    let hd = model.spec.hidden;
    let mut hidden = Buf::scratch(batch.scored_rows.len() * hd);
    hidden.par_chunks_mut(hd).zip(batch.scored_rows.par_iter()).for_each(|(d, &(from_cache, r))| {
        let src = if from_cache { &cache.final_hidden } else { &xf };
        d.copy_from_slice(&src[r * hd..][..hd]);
    });
    score(model, &hidden, &batch.scored_targets, &batch.scored_seq, batch.seq_starts.len() - 1, None).0
}

/// Keys and values of sequences being generated: per layer, `capacity` rows per sequence of the fused q|k|v
/// rows, filled as `extend` runs tokens through the model (a KV cache, in the layout `forward_continuation`
/// reads).
pub struct KvCache {
    /// Apply the model's LoRA adapters (false: its frozen base, KTO's reference under LoRA).
    pub adapters: bool,
    capacity: usize,
    lens: Vec<usize>,
    cache: PrefixCache,
}

impl KvCache {
    /// Room for `n_seqs` sequences of at most `capacity` tokens each.
    pub fn new(model: &Model, n_seqs: usize, capacity: usize) -> Self {
        let spec = &model.spec;
        let w = (spec.heads + 2 * spec.kv_heads) * spec.head_dim;
        let qkv = (0..spec.layers).map(|_| Buf::zeros(n_seqs * capacity * w)).collect();
        let seq_starts = (0..=n_seqs).map(|s| s * capacity).collect();
        let cache = PrefixCache { seq_starts, tokens: Vec::new(), qkv, final_hidden: Buf::default(), hidden_rows: Vec::new() };
        KvCache { adapters: true, capacity, lens: vec![0; n_seqs], cache }
    }

    /// Tokens held for sequence `s`.
    pub fn len(&self, s: usize) -> usize {
        self.lens[s]
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

/// Runs `new_tokens[s]` after what the cache holds for sequence `s` (an empty slice leaves it alone), stores
/// their keys and values, and returns the next-token logits after each sequence's last new token
/// (`[vocab]` per sequence; empty for sequences given no tokens). Panics past the cache's capacity.
pub fn extend_kv(model: &Model, cache: &mut KvCache, new_tokens: &[&[u32]]) -> Vec<Vec<f32>> {
    assert_eq!(new_tokens.len(), cache.lens.len(), "one token slice per cached sequence");
    let (mut tokens, mut positions, mut seq_starts, mut prefix) = (Vec::new(), Vec::new(), vec![0], Vec::new());
    let active: Vec<usize> = (0..new_tokens.len()).filter(|&s| !new_tokens[s].is_empty()).collect();
    for &s in &active {
        let (len, add) = (cache.lens[s], new_tokens[s].len());
        assert!(len + add <= cache.capacity, "sequence {s} would exceed the KV cache's {} tokens", cache.capacity);
        tokens.extend_from_slice(new_tokens[s]);
        positions.extend(len as u32..(len + add) as u32);
        seq_starts.push(tokens.len());
        prefix.push((s * cache.capacity, len));
    }
    let mut logits = vec![Vec::new(); new_tokens.len()];
    if active.is_empty() {
        return logits;
    }
    let keys = Keys::Continuation { seq_starts: &seq_starts, cache: &cache.cache, prefix: &prefix };
    let (x, _, kept_qkv) = run_layers(model, &tokens, &positions, keys, false, true, cache.adapters, false, None);
    let w = (model.spec.heads + 2 * model.spec.kv_heads) * model.spec.head_dim;
    for (layer, rows) in cache.cache.qkv.iter_mut().zip(&kept_qkv) {
        for (i, &s) in active.iter().enumerate() {
            let (from, to) = (seq_starts[i], seq_starts[i + 1]);
            let dst = (s * cache.capacity + cache.lens[s]) * w;
            layer[dst..dst + (to - from) * w].copy_from_slice(&rows[from * w..to * w]);
        }
    }
    let (xf, _) = final_norm(model, &x);
    let last_rows: Vec<usize> = seq_starts[1..].iter().map(|&e| e - 1).collect();
    let hidden = gather_rows(&xf, &last_rows, model.spec.hidden);
    let (hd, vocab) = (model.spec.hidden, model.spec.vocab_size);
    let mut all = vec![0f32; active.len() * vocab];
    gemm(active.len(), hd, vocab, &hidden, false, &model.params[model.layout.lm_head..][..vocab * hd], true, &mut all, false);
    for (i, &s) in active.iter().enumerate() {
        cache.lens[s] += new_tokens[s].len();
        logits[s] = all[i * vocab..(i + 1) * vocab].to_vec();
    }
    logits
}

/// Logits of the scored rows, one block of rows at a time, reduced to log p(target), entropy, mean logit and
/// log-sum-exp; the full `[M, vocab]` logits never exist at once unless `softmax` asks to keep them (then it
/// receives the normalised probabilities).
fn lm_head_forward(
    model: &Model,
    hidden: &[f32],
    targets: &[u32],
    out: &mut ScoredOutput,
    lse: &mut [f32],
    mut softmax: Option<&mut [f32]>,
) {
    let (hd, vocab) = (model.spec.hidden, model.spec.vocab_size);
    let w = &model.params[model.layout.lm_head..][..vocab * hd];
    let m = targets.len();
    let keep = softmax.is_some();
    let mut scratch = if keep { Buf::default() } else { Buf::zeros(LM_HEAD_ROWS.min(m) * vocab) };
    for r0 in (0..m).step_by(LM_HEAD_ROWS) {
        let nr = LM_HEAD_ROWS.min(m - r0);
        let z = match softmax.as_deref_mut() {
            Some(all) => &mut all[r0 * vocab..(r0 + nr) * vocab],
            None => &mut scratch[..nr * vocab],
        };
        gemm(nr, hd, vocab, &hidden[r0 * hd..], false, w, true, z, false);
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

/// Backward pass: `dlogp[s]` is ∂loss/∂(sequence log-prob of s). Gradients are added into `grads`: with LoRA
/// adapters, in the adapters' layout (the base is frozen and its weight gradients are never formed); otherwise
/// in the model's parameter layout.
pub fn backward(model: &Model, batch: &SeqBatch, mut tape: Tape, dlogp: &[f32], grads: &mut [f32]) {
    let lora = model.lora.as_ref();
    let (mut base, mut adapter_grads): (Option<&mut [f32]>, Option<&mut [f32]>) =
        if lora.is_some() { (None, Some(grads)) } else { (Some(grads), None) };
    // Frozen base: norm-weight gradients go to a scratch row nobody reads.
    let mut norm_scratch = vec![0f32; model.spec.hidden.max(model.spec.head_dim)];
    let spec = &model.spec;
    let lay = &model.layout;
    let p = &model.params;
    let (n, hd, vocab) = (batch.n_tokens(), spec.hidden, spec.vocab_size);
    let (qd, kvd, inter) = (spec.q_dim(), spec.kv_dim(), spec.intermediate);
    let m = batch.scored_rows.len();
    let rope = Rope::cached(spec.head_dim, &spec.rope, batch.max_len().max(1));
    let qkv_w = (spec.heads + 2 * spec.kv_heads) * spec.head_dim;

    // lm_head: dz = g · (onehot(target) − softmax(z)), from the kept softmax or recomputing z block by block.
    let w_lm = &p[lay.lm_head..][..vocab * hd];
    let mut d_hidden = Buf::zeros(m * hd);
    let mut kept = tape.softmax.take();
    let mut scratch = if kept.is_some() { Buf::default() } else { Buf::zeros(LM_HEAD_ROWS.min(m) * vocab) };
    for r0 in (0..m).step_by(LM_HEAD_ROWS) {
        let nr = LM_HEAD_ROWS.min(m - r0);
        let xs = &tape.scored_hidden[r0 * hd..][..nr * hd];
        let z = match kept.as_deref_mut() {
            Some(all) => &mut all[r0 * vocab..(r0 + nr) * vocab],
            None => {
                let z = &mut scratch[..nr * vocab];
                gemm(nr, hd, vocab, xs, false, w_lm, true, z, false);
                z.par_chunks_mut(vocab).enumerate().for_each(|(i, zr)| {
                    let l = tape.lse[r0 + i];
                    zr.iter_mut().for_each(|v| *v = kernels::exp_f32(*v - l));
                });
                z
            }
        };
        z.par_chunks_mut(vocab).enumerate().for_each(|(i, zr)| {
            let row = r0 + i;
            let g = dlogp[batch.scored_seq[row]];
            zr.iter_mut().for_each(|v| *v *= -g);
            zr[batch.scored_targets[row] as usize] += g;
        });
        gemm(nr, vocab, hd, z, false, w_lm, false, &mut d_hidden[r0 * hd..][..nr * hd], false);
        if let Some(g) = base.as_deref_mut() {
            gemm(vocab, nr, hd, z, true, xs, false, &mut g[lay.lm_head..][..vocab * hd], true);
        }
    }
    // The final norm and the last layer's output exist only at the scored rows (`m` of them).
    let mut dx = Buf::zeros(m * hd);
    kernels::rmsnorm_backward(
        &d_hidden,
        &tape.x_final,
        &p[lay.final_norm..][..hd],
        &tape.rstd_final,
        &mut dx,
        match base.as_deref_mut() {
            Some(g) => &mut g[lay.final_norm..][..hd],
            None => &mut norm_scratch[..hd],
        },
    );

    let records = std::mem::take(&mut tape.layers);
    for (l, (lo, record)) in lay.layers.iter().zip(records).enumerate().rev() {
        let t = match record {
            LayerRecord::Full(t) => t,
            LayerRecord::Checkpoint(x_in) => {
                // Gradient checkpointing: rebuild this layer's tape from its input.
                let mut x = x_in;
                let keys = Keys::Causal { seq_starts: &batch.seq_starts };
                let rows = (l + 1 == lay.layers.len()).then_some(batch.scored_rows.as_slice());
                layer_forward(model, l, &mut x, &batch.positions, &keys, true, false, true, rows).0.expect("a tape")
            }
        };
        let t = &t;
        let shape = AttnShape {
            seq_starts: &batch.seq_starts,
            heads: spec.heads,
            kv_heads: spec.kv_heads,
            head_dim: spec.head_dim,
            window: spec.layer_windows[l],
        };
        // MLP block: x_out = x_mid + down(swiglu(gate(xn2), up(xn2))). A layer that kept only `out_rows` past
        // attention runs this block and the output projection on those rows (`dx` has just them).
        let nr = t.out_rows.as_ref().map_or(n, |r| r.len());
        let att_in = if t.out_rows.is_some() { &t.att_out } else { &t.att };
        let mut dh = Buf::scratch(nr * inter);
        let adapters_of = |targets: &[Target]| -> Vec<(usize, &LoraModule)> {
            lora.map(|lr| lr.layers[l].iter().enumerate().filter(|(_, m)| targets.contains(&m.target)).collect())
                .unwrap_or_default()
        };
        gemm(nr, hd, inter, &dx, false, &p[lo.down..], false, &mut dh, false);
        if let Some(g) = base.as_deref_mut() {
            gemm(hd, nr, inter, &dx, true, &t.h, false, &mut g[lo.down..][..hd * inter], true);
        }
        for (i, m) in adapters_of(&[Target::Down]) {
            let ag = adapter_grads.as_deref_mut().expect("adapter gradients");
            lora_backward(lora.unwrap(), m, &dx, hd, &t.h, &t.lora_u[i], nr, ag, &mut dh);
        }
        let mut dgate_up = Buf::scratch(nr * 2 * inter);
        kernels::swiglu_backward(&dh, &t.gate_up, inter, &mut dgate_up);
        let mut dxn2 = Buf::scratch(nr * hd);
        gemm(nr, 2 * inter, hd, &dgate_up, false, &p[lo.gate..], false, &mut dxn2, false);
        if let Some(g) = base.as_deref_mut() {
            gemm(2 * inter, nr, hd, &dgate_up, true, &t.xn2, false, &mut g[lo.gate..][..2 * inter * hd], true);
        }
        for (i, m) in adapters_of(&[Target::Gate, Target::Up]) {
            let ag = adapter_grads.as_deref_mut().expect("adapter gradients");
            lora_backward(lora.unwrap(), m, &dgate_up, 2 * inter, &t.xn2, &t.lora_u[i], nr, ag, &mut dxn2);
        }
        let dw_post = match base.as_deref_mut() {
            Some(g) => &mut g[lo.post_norm..][..hd],
            None => &mut norm_scratch[..hd],
        };
        kernels::rmsnorm_backward(&dxn2, &t.x_mid, &p[lo.post_norm..][..hd], &t.rstd2, &mut dx, dw_post);

        // Attention block: x_mid = x_in + o(attention(rope(q(xn1)), rope(k(xn1)), v(xn1))).
        let mut datt = Buf::scratch(nr * qd);
        gemm(nr, hd, qd, &dx, false, &p[lo.o..], false, &mut datt, false);
        if let Some(g) = base.as_deref_mut() {
            gemm(hd, nr, qd, &dx, true, att_in, false, &mut g[lo.o..][..hd * qd], true);
        }
        for (i, m) in adapters_of(&[Target::O]) {
            let ag = adapter_grads.as_deref_mut().expect("adapter gradients");
            lora_backward(lora.unwrap(), m, &dx, hd, att_in, &t.lora_u[i], nr, ag, &mut datt);
        }
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
            let (wq, wk) = (&p[qn..][..d], &p[kn..][..d]);
            kernels::head_rmsnorm_backward(
                &mut dqkv, &t.qk_pre, qkv_w, spec.heads, spec.kv_heads, wq, wk, &t.qk_rstd, &mut dwq, &mut dwk,
            );
            if let Some(g) = base.as_deref_mut() {
                g[qn..qn + d].iter_mut().zip(&dwq).for_each(|(a, b)| *a += b);
                g[kn..kn + d].iter_mut().zip(&dwk).for_each(|(a, b)| *a += b);
            }
        }
        if let (Some(b), Some(g)) = (lo.qkv_bias, base.as_deref_mut()) {
            kernels::bias_backward(&dqkv, qkv_w, &mut g[b..b + qkv_w]);
        }
        let mut dxn1 = Buf::scratch(n * hd);
        gemm(n, qkv_w, hd, &dqkv, false, &p[lo.q..], false, &mut dxn1, false);
        if let Some(g) = base.as_deref_mut() {
            gemm(qkv_w, n, hd, &dqkv, true, &t.xn1, false, &mut g[lo.q..][..qkv_w * hd], true);
        }
        for (i, m) in adapters_of(&[Target::Q, Target::K, Target::V]) {
            let ag = adapter_grads.as_deref_mut().expect("adapter gradients");
            lora_backward(lora.unwrap(), m, &dqkv, qkv_w, &t.xn1, &t.lora_u[i], n, ag, &mut dxn1);
        }
        let dw_in = match base.as_deref_mut() {
            Some(g) => &mut g[lo.input_norm..][..hd],
            None => &mut norm_scratch[..hd],
        };
        kernels::rmsnorm_backward(&dxn1, &t.x_in, &p[lo.input_norm..][..hd], &t.rstd1, &mut dx, dw_in);
    }
    // Embedding rows gather the gradient of every token that used them.
    if let Some(g) = base.as_deref_mut() {
        for (r, &tok) in batch.tokens.iter().enumerate() {
            let row = &mut g[lay.embed + tok as usize * hd..][..hd];
            row.iter_mut().zip(&dx[r * hd..][..hd]).for_each(|(a, b)| *a += b);
        }
    }
}
