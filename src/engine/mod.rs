//! The compute engine, behind one seam. Knows nothing of KTO.
//!
//! Everything the trainer and the sampler ask of a device is here: forward passes (scoring, continuing a
//! cached prefix, sampling with a KV cache), backward into a gradient buffer, the optimizer's element-wise
//! updates, the gradient's sum of squares, and buffers (`Buffer`) that hold parameters, gradients and optimizer
//! state with upload, download and a host hook for MPI's all-reduce. Activations (`Tape`, `PrefixCache`,
//! `KvCache`) never leave the engine. What crosses the seam on the host is small: token batches (`SeqBatch`),
//! per-sequence log-probs (`ScoredOutput`) and sampled logits.
//!
//! `cpu` is the one backend today. A device backend adds a variant to `Buffer`'s storage and to the activation
//! types, and these functions dispatch on it (the README's "How it is built" draws what a CUDA backend needs).
mod batch;
mod buffer;
pub mod cpu;

pub use batch::{Pass, ScoredOutput, SeqBatch};
pub use buffer::Buffer;
pub use cpu::decoder::{ContinuationBatch, KvCache, PrefixCache, StepLogits, Tape};
pub use cpu::update::AdamWStep;

use crate::model::Model;
use std::ops::Range;

/// Scores `batch` (per-sequence completion log-probs and per-token statistics). With `pass.keep_tape` the
/// activations `backward` needs come back, with `pass.keep_cache` what `forward_continuation` continues.
pub fn forward_with_cache(model: &Model, batch: &SeqBatch, pass: Pass) -> (ScoredOutput, Option<Tape>, Option<PrefixCache>) {
    cpu::decoder::forward_with_cache(model, batch, pass)
}

/// `forward_with_cache` keeping at most the tape.
pub fn forward(model: &Model, batch: &SeqBatch, keep_tape: bool) -> (ScoredOutput, Option<Tape>) {
    cpu::decoder::forward(model, batch, keep_tape)
}

/// Scores sequences that continue a cached pass's prompts without recomputing them.
pub fn forward_continuation(model: &Model, batch: &ContinuationBatch, cache: &PrefixCache, adapters: bool) -> ScoredOutput {
    cpu::decoder::forward_continuation(model, batch, cache, adapters)
}

/// Full logits of every position (checks against other implementations; training never forms them).
pub fn forward_logits(model: &Model, seqs: &[&[u32]]) -> Vec<Vec<f32>> {
    cpu::decoder::forward_logits(model, seqs)
}

/// Appends tokens to each sequence of a KV cache; returns the logits after each sequence's last new token.
pub fn extend_kv(model: &Model, cache: &mut KvCache, new_tokens: &[&[u32]]) -> Vec<Vec<f32>> {
    cpu::decoder::extend_kv(model, cache, new_tokens)
}

/// `extend_kv` into a buffer the caller keeps across steps (decoding allocates no logits).
pub fn extend_kv_into(model: &Model, cache: &mut KvCache, new_tokens: &[&[u32]], out: &mut StepLogits) {
    cpu::decoder::extend_kv_into(model, cache, new_tokens, out)
}

/// Copies the first `len` cached tokens of sequence `from` to the empty sequences `to` (a common start of
/// prompts, run once).
pub fn share_prefix(cache: &mut KvCache, from: usize, to: &[usize], len: usize) {
    cache.share_prefix(from, to, len)
}

/// Adds the gradient of `Σ dlogp[s] · logp[s]` into `grads` (the adapters' layout with LoRA, else the model's).
pub fn backward(model: &Model, batch: &SeqBatch, tape: Tape, dlogp: &[f32], grads: &mut Buffer) {
    cpu::decoder::backward(model, batch, tape, dlogp, grads.host_mut())
}

/// Bytes of the tape a training forward of `n_tokens` tokens with `n_scored` scored positions keeps.
pub fn tape_bytes(model: &Model, n_tokens: usize, n_scored: usize, checkpoint: bool) -> usize {
    cpu::decoder::tape_floats(model, n_tokens, n_scored, checkpoint) * std::mem::size_of::<f32>()
}

/// AdamW on the elements `range` of `params` (state `m`, `v`).
pub fn adamw(params: &mut Buffer, grads: &Buffer, m: &mut Buffer, v: &mut Buffer, range: Range<usize>, step: AdamWStep) {
    let (m, v) = (&mut m.host_mut()[range.clone()], &mut v.host_mut()[range.clone()]);
    cpu::update::adamw(&mut params.host_mut()[range.clone()], &grads.host()[range], m, v, step)
}

/// `p −= lr · (grad_scale · g + weight_decay · p)` on the elements `range`.
pub fn sgd(params: &mut Buffer, grads: &Buffer, range: Range<usize>, lr: f32, weight_decay: f32, grad_scale: f32) {
    cpu::update::sgd(&mut params.host_mut()[range.clone()], &grads.host()[range], lr, weight_decay, grad_scale)
}

/// `Σ g²` in f64, the same bits whatever the thread schedule.
pub fn sum_of_squares(grads: &Buffer) -> f64 {
    cpu::update::sum_of_squares(grads.host())
}

pub fn zero(buf: &mut Buffer) {
    cpu::update::zero(buf.host_mut())
}
