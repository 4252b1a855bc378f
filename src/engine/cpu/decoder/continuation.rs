//! Passes that continue cached ones: KL sequences continuing the main pass's prompts, and generation with a KV
//! cache.
use super::*;
use crate::engine::cpu::pool::Buf;
use crate::model::Model;
use rayon::prelude::*;

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
    let (x, _, _) = run_layers(model, &batch.tokens, &batch.positions, keys, Pass { adapters, ..Pass::default() }, None);
    let (xf, _) = final_norm(model, &x);
    let hd = model.spec.hidden;
    let mut hidden = Buf::scratch(batch.scored_rows.len() * hd);
    hidden.par_chunks_mut(hd).zip(batch.scored_rows.par_iter()).for_each(|(d, &(from_cache, r))| {
        let src = if from_cache { &cache.final_hidden } else { &xf };
        d.copy_from_slice(&src[r * hd..][..hd]);
    });
    score(model, &hidden, &batch.scored_targets, &batch.scored_seq, batch.seq_starts.len() - 1, None).0
}

/// Keys and values of sequences being generated: per layer, `capacity` k|v rows per sequence, filled as
/// `extend` runs tokens through the model (a KV cache, in the layout `forward_continuation` reads).
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
        let kv = (0..spec.layers).map(|_| Buf::zeros(n_seqs * capacity * 2 * spec.kv_dim())).collect();
        let seq_starts = (0..=n_seqs).map(|s| s * capacity).collect();
        let cache = PrefixCache { seq_starts, tokens: Vec::new(), kv, final_hidden: Buf::default(), hidden_rows: Vec::new() };
        KvCache { adapters: true, capacity, lens: vec![0; n_seqs], cache }
    }

    /// Tokens held for sequence `s`.
    pub fn len(&self, s: usize) -> usize {
        self.lens[s]
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Gives each sequence of `to` (all empty) the first `len` tokens sequence `from` holds: a token's keys and
    /// values depend only on the tokens before it, so prompts that start alike can run their common start once.
    pub fn share_prefix(&mut self, from: usize, to: &[usize], len: usize) {
        assert!(len <= self.lens[from], "sequence {from} holds {} tokens, not {len}", self.lens[from]);
        let row = self.cache.kv.first().map_or(0, |l| l.len() / (self.lens.len() * self.capacity));
        let src = from * self.capacity * row..(from * self.capacity + len) * row;
        for &s in to {
            assert!(self.lens[s] == 0 && s != from, "sequence {s} is not empty");
            for layer in &mut self.cache.kv {
                layer.copy_within(src.clone(), s * self.capacity * row);
            }
            self.lens[s] = len;
        }
    }
}

/// The next-token logits of one `extend_kv_into` step: row `i` of `values` (`vocab` wide) follows the last new
/// token of sequence `seqs[i]`. Kept by the caller across steps, so that a decode step neither allocates nor
/// copies its logits (for 32 sequences of a 150k vocabulary, 19 MB of fresh pages a step).
#[derive(Debug, Default)]
pub struct StepLogits {
    pub values: Vec<f32>,
    pub seqs: Vec<usize>,
    pub vocab: usize,
}

impl StepLogits {
    /// The logits after sequence `s`'s last new token, if it was given any.
    pub fn of(&self, s: usize) -> Option<&[f32]> {
        let row = self.seqs.iter().position(|&t| t == s)?;
        Some(&self.values[row * self.vocab..(row + 1) * self.vocab])
    }
}

/// Runs `new_tokens[s]` after what the cache holds for sequence `s` (an empty slice leaves it alone), stores
/// their keys and values, and returns the next-token logits after each sequence's last new token
/// (`[vocab]` per sequence; empty for sequences given no tokens). Panics past the cache's capacity.
pub fn extend_kv(model: &Model, cache: &mut KvCache, new_tokens: &[&[u32]]) -> Vec<Vec<f32>> {
    let mut step = StepLogits::default();
    extend_kv_into(model, cache, new_tokens, &mut step);
    (0..new_tokens.len()).map(|s| step.of(s).map_or_else(Vec::new, <[f32]>::to_vec)).collect()
}

/// `extend_kv` writing the logits into `out` (its buffer reused).
pub fn extend_kv_into(model: &Model, cache: &mut KvCache, new_tokens: &[&[u32]], out: &mut StepLogits) {
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
    let vocab = model.spec.vocab_size;
    out.vocab = vocab;
    out.seqs.clone_from(&active);
    out.values.resize(active.len() * vocab, 0.0);
    if active.is_empty() {
        return;
    }
    let keys = Keys::Continuation { seq_starts: &seq_starts, cache: &cache.cache, prefix: &prefix };
    let (x, _, kept_kv) = run_layers(model, &tokens, &positions, keys, Pass { keep_cache: true, adapters: cache.adapters, ..Pass::default() }, None);
    let w = 2 * model.spec.kv_dim();
    for (layer, rows) in cache.cache.kv.iter_mut().zip(&kept_kv) {
        for (i, &s) in active.iter().enumerate() {
            let (from, to) = (seq_starts[i], seq_starts[i + 1]);
            let dst = (s * cache.capacity + cache.lens[s]) * w;
            layer[dst..dst + (to - from) * w].copy_from_slice(&rows[from * w..to * w]);
        }
    }
    let (xf, _) = final_norm(model, &x);
    let last_rows: Vec<usize> = seq_starts[1..].iter().map(|&e| e - 1).collect();
    let hidden = gather_rows(&xf, &last_rows, model.spec.hidden);
    head::vocab_logits(model, active.len(), &hidden, &mut out.values);
    for &s in &active {
        cache.lens[s] += new_tokens[s].len();
    }
}
