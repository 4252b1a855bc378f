//! Forward and backward of the Llama-family decoder over a packed batch, llm.c style: every layer's forward
//! saves what its backward needs on a `Tape`, and the backward walks the layers in reverse.
//!
//! Sequences are packed without padding: each token row knows its position, and attention never crosses a
//! sequence. That equals Hugging Face's right-padded forward at every real token (padding never changes a real
//! token's output), and the padding positions are never scored.
use super::pool::Buf;
use crate::engine::{Pass, ScoredOutput, SeqBatch};
use super::kernels::{self, Rope};
use crate::model::Model;

mod adapters;
mod continuation;
mod head;
mod layer;

pub use continuation::{extend_kv, extend_kv_into, forward_continuation, ContinuationBatch, KvCache, StepLogits};
use adapters::{lora_backward, lora_forward};
use head::{final_norm, gather_rows, keeps_softmax, lm_head_backward, scatter_rows, score, vocab_logits};
use layer::{layer_backward, layer_forward, run_layers, LayerRecord};

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

impl Tape {
    /// Floats held (the check on `tape_floats`).
    pub fn floats(&self) -> usize {
        let layers: usize = self.layers.iter().map(|r| match r {
            LayerRecord::Full(t) => t.floats(),
            LayerRecord::Checkpoint(x) => x.len(),
        }).sum();
        let head = [&self.x_final, &self.rstd_final, &self.scored_hidden, &self.lse].iter().map(|b| b.len()).sum::<usize>();
        layers + head + self.softmax.as_ref().map_or(0, |s| s.len())
    }
}

/// Floats a training forward keeps on its tape for `n` tokens with `m` scored positions (with `checkpoint`, also
/// the one layer backward rebuilds at a time): what the memory plan states before the first step.
pub fn tape_floats(model: &Model, n: usize, m: usize, checkpoint: bool) -> usize {
    let (layers, hd) = (model.layout.layers.len(), model.spec.hidden);
    let layer_floats: usize = if checkpoint {
        let rebuilt = (0..layers).map(|l| layer::layer_tape_floats(model, l, n, n, false)).max().unwrap_or(0);
        layers * n * hd + rebuilt
    } else {
        (0..layers).map(|l| {
            let last = l + 1 == layers;
            layer::layer_tape_floats(model, l, n, if last { m } else { n }, last)
        }).sum()
    };
    let softmax = if keeps_softmax(model, m) { m * model.spec.vocab_size } else { 0 };
    layer_floats + 2 * m * (hd + 1) + softmax
}

/// Hidden states and keys/values of a finished pass that later passes may continue from (see
/// `forward_continuation`): per layer the keys and values of every row (the k|v part of the fused q|k|v rows,
/// `2·kv_heads·head_dim` wide), and the final-normed hidden states of the scored rows.
pub struct PrefixCache {
    seq_starts: Vec<usize>,
    tokens: Vec<u32>,
    kv: Vec<Buf>,
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

/// Full logits `[len, vocab]` of every position of each sequence (for checks against other implementations and
/// for sampling; training never builds them).
pub fn forward_logits(model: &Model, seqs: &[&[u32]]) -> Vec<Vec<f32>> {
    let masks: Vec<Vec<bool>> = seqs.iter().map(|s| vec![false; s.len()]).collect();
    let pairs: Vec<(&[u32], &[bool])> = seqs.iter().zip(&masks).map(|(s, m)| (*s, m.as_slice())).collect();
    let batch = SeqBatch::new(&pairs);
    let keys = Keys::Causal { seq_starts: &batch.seq_starts };
    let (x, _, _) = run_layers(model, &batch.tokens, &batch.positions, keys, Pass::INFERENCE, None);
    let (xf, _) = final_norm(model, &x);
    let (hd, vocab) = (model.spec.hidden, model.spec.vocab_size);
    batch
        .seq_starts
        .windows(2)
        .map(|r| {
            let rows = r[1] - r[0];
            let mut logits = vec![0f32; rows * vocab];
            vocab_logits(model, rows, &xf[r[0] * hd..r[1] * hd], &mut logits);
            logits
        })
        .collect()
}

/// Runs the decoder. With `keep_tape` the activations are kept for `backward`.
pub fn forward(model: &Model, batch: &SeqBatch, keep_tape: bool) -> (ScoredOutput, Option<Tape>) {
    let (out, tape, _) = forward_with_cache(model, batch, Pass { keep_tape, ..Pass::INFERENCE });
    (out, tape)
}

/// `forward` as `pass` says, also returning (with `pass.keep_cache`) what `forward_continuation` needs to
/// continue this pass's sequences.
pub fn forward_with_cache(model: &Model, batch: &SeqBatch, pass: Pass) -> (ScoredOutput, Option<Tape>, Option<PrefixCache>) {
    let (keep_tape, keep_cache) = (pass.keep_tape, pass.keep_cache);
    let keys = Keys::Causal { seq_starts: &batch.seq_starts };
    // The last layer runs only the scored rows past attention: the hidden state comes back with just them.
    let rows = Some(batch.scored_rows.as_slice());
    let (x, tapes, kv) =
        run_layers(model, &batch.tokens, &batch.positions, keys, pass, rows);
    let (scored_hidden, rstd_final) = final_norm(model, &x);
    let m = batch.scored_rows.len();
    let mut softmax = (keep_tape && keeps_softmax(model, m))
        .then(|| Buf::zeros(m * model.spec.vocab_size));
    let (out, lse) =
        score(model, &scored_hidden, &batch.scored_targets, &batch.scored_seq, batch.n_seqs(), softmax.as_deref_mut().map(|v| v.as_mut_slice()));
    let cache = keep_cache.then(|| PrefixCache {
        seq_starts: batch.seq_starts.clone(),
        tokens: batch.tokens.clone(),
        kv,
        final_hidden: Buf::copy_of(&scored_hidden),
        hidden_rows: batch.scored_rows.clone(),
    });
    let tape = keep_tape.then_some(Tape { layers: tapes, x_final: x, rstd_final, scored_hidden, lse, softmax });
    (out, tape, cache)
}

/// Backward pass: `dlogp[s]` is ∂loss/∂(sequence log-prob of s). Gradients are added into `grads`: with LoRA
/// adapters, in the adapters' layout (the base is frozen and its weight gradients are never formed); otherwise
/// in the model's parameter layout.
pub fn backward(model: &Model, batch: &SeqBatch, mut tape: Tape, dlogp: &[f32], grads: &mut [f32]) {
    let mut sink = GradSink::new(model, grads);
    let (spec, lay) = (&model.spec, &model.layout);
    let hd = spec.hidden;
    let softmax = tape.softmax.take();
    let d_hidden = lm_head_backward(model, batch, &tape.scored_hidden, &tape.lse, softmax, dlogp, sink.base.as_deref_mut());
    // The final norm and the last layer's output exist only at the scored rows (`m` of them).
    let mut dx = Buf::zeros(batch.scored_rows.len() * hd);
    let w_final = &norm_weight(model, lay.final_norm, hd);
    kernels::rmsnorm_backward(&d_hidden, &tape.x_final, w_final, &tape.rstd_final, &mut dx, sink.norm_weights(lay.final_norm, hd));
    let records = std::mem::take(&mut tape.layers);
    for (l, record) in records.into_iter().enumerate().rev() {
        let t = match record {
            LayerRecord::Full(t) => t,
            LayerRecord::Checkpoint(x_in) => {
                // Gradient checkpointing: rebuild this layer's tape from its input.
                let mut x = x_in;
                let keys = Keys::Causal { seq_starts: &batch.seq_starts };
                let rows = (l + 1 == lay.layers.len()).then_some(batch.scored_rows.as_slice());
                layer_forward(model, l, &mut x, &batch.positions, &keys, Pass { keep_tape: true, ..Pass::INFERENCE }, rows).0.expect("a tape")
            }
        };
        let rope = Rope::cached(&spec.rope_of(l).inv_freq(spec.head_dim), batch.max_len().max(1));
        dx = layer_backward(model, batch, l, &t, &rope, dx, &mut sink);
    }
    // Embedding rows gather the gradient of every token that used them, except the padding row (transformers'
    // `nn.Embedding(padding_idx = pad_token_id)`), which the lookup never updates.
    // Gemma scales the looked-up rows, so their gradient carries the same factor.
    if let Some(g) = sink.base.as_deref_mut() {
        let scale = spec.embed_scale.unwrap_or(1.0);
        for (r, &tok) in batch.tokens.iter().enumerate().filter(|&(_, &tok)| Some(tok) != spec.padding_idx) {
            let row = &mut g[lay.embed + tok as usize * hd..][..hd];
            row.iter_mut().zip(&dx[r * hd..][..hd]).for_each(|(a, b)| *a += b * scale);
        }
    }
}

/// The weights a norm at `offset` multiplies by: as stored, or Gemma's `1 + w` (in f32, as transformers).
/// Its gradient is the stored weights' gradient either way.
pub(super) fn norm_weight(model: &Model, offset: usize, len: usize) -> std::borrow::Cow<'_, [f32]> {
    let w = model.params.weights().f32s(offset, len);
    match model.spec.norm_plus_one {
        false => w,
        true => std::borrow::Cow::Owned(w.iter().map(|v| 1.0 + v).collect()),
    }
}

/// Where a backward pass adds its weight gradients.
pub(super) struct GradSink<'a> {
    /// The model's weights' gradients (full fine-tuning); `None` with LoRA, whose base is frozen.
    base: Option<&'a mut [f32]>,
    /// The adapters' gradients (LoRA).
    adapters: Option<&'a mut [f32]>,
    /// Frozen base: norm-weight gradients go to a scratch row nobody reads.
    norm_scratch: Vec<f32>,
}

impl<'a> GradSink<'a> {
    fn new(model: &Model, grads: &'a mut [f32]) -> Self {
        let norm_scratch = vec![0f32; model.spec.hidden.max(model.spec.head_dim)];
        match model.lora {
            Some(_) => GradSink { base: None, adapters: Some(grads), norm_scratch },
            None => GradSink { base: Some(grads), adapters: None, norm_scratch },
        }
    }

    /// Where the gradient of the norm weights at `offset` goes.
    fn norm_weights(&mut self, offset: usize, len: usize) -> &mut [f32] {
        match self.base.as_deref_mut() {
            Some(g) => &mut g[offset..][..len],
            None => &mut self.norm_scratch[..len],
        }
    }
}
