//! Sampling from a model with a KV cache: temperature, top-k, top-p, a token budget, stop at EOS. Each prompt
//! draws from its own random stream (seed, prompt index), so a completion does not depend on which other
//! prompts share its batch.
use crate::data::{Content, TextTokenizer};
use crate::engine::cpu::kernels::exp_f32;
use crate::engine::{extend_kv_into, share_prefix, KvCache, StepLogits};
use crate::model::Model;
use crate::rng::SplitMix;

#[derive(Debug, Clone, Copy)]
pub struct SamplingOptions {
    /// 0: greedy (always the most likely token).
    pub temperature: f32,
    /// Keep the smallest set of most likely tokens whose probability reaches `top_p` (1: all).
    pub top_p: f32,
    /// Keep the `top_k` most likely tokens (0: all).
    pub top_k: usize,
    pub max_new_tokens: usize,
    pub seed: u64,
    /// Prompts sampled together, 1 to `GENERATION_BATCH` (fewer hold a smaller KV cache). A completion's draws
    /// come from its own stream whatever the batch.
    pub batch_size: usize,
}

impl Default for SamplingOptions {
    /// transformers' `generate` defaults for sampling, with a short budget.
    fn default() -> Self {
        SamplingOptions { temperature: 1.0, top_p: 1.0, top_k: 50, max_new_tokens: 64, seed: 0, batch_size: GENERATION_BATCH }
    }
}

impl SamplingOptions {
    /// The prompts of one pass through the model: `batch_size` kept within 1..=GENERATION_BATCH.
    fn batch(&self) -> usize {
        self.batch_size.clamp(1, GENERATION_BATCH)
    }
}

/// Prompts run through the model together (bounds the KV cache's memory; a larger batch would gain nothing:
/// at this many rows decoding is bound by arithmetic, not by reading the weights).
pub const GENERATION_BATCH: usize = crate::engine::cpu::skinny::SKINNY_ROWS;

/// Token ids from the most to the least likely (ties: lower id first), the first `top_k` of them (0: all).
/// Sorting one u64 per token (the logit's order-preserving bits above the id) is several times faster than a
/// comparator over indices, and with `top_k` only the top is sorted; the order is the same either way.
fn candidates(logits: &[f32], top_k: usize) -> Vec<usize> {
    let mut keys: Vec<u64> = logits.iter().enumerate().map(|(id, &v)| descending_key(v, id)).collect();
    if top_k > 0 && top_k < keys.len() {
        keys.select_nth_unstable(top_k - 1);
        keys.truncate(top_k);
    }
    keys.sort_unstable();
    keys.into_iter().map(|k| (k & 0xFFFF_FFFF) as usize).collect()
}

/// A key whose ascending order is `f32::total_cmp` descending, then the id ascending.
fn descending_key(logit: f32, id: usize) -> u64 {
    let bits = logit.to_bits();
    let ascending = if bits >> 31 == 1 { !bits } else { bits | 0x8000_0000 };
    ((!ascending as u64) << 32) | id as u64
}

/// Picks the next token from `logits` as `opts` says: the draw walks the kept tokens from the most to the
/// least likely. Without top-k or top-p only the part of that order the draw lands in is sorted, not the
/// whole vocabulary.
fn sample(logits: &[f32], opts: &SamplingOptions, stream: &mut SplitMix) -> u32 {
    if opts.temperature <= 0.0 {
        return logits.iter().enumerate().fold((0, f32::NEG_INFINITY), |b, (i, &v)| if v > b.1 { (i, v) } else { b }).0 as u32;
    }
    if opts.top_k == 0 && opts.top_p >= 1.0 {
        return sample_unfiltered(logits, opts.temperature, stream);
    }
    let order = candidates(logits, opts.top_k);
    let max = logits[order[0]];
    let mut probs: Vec<f64> = order.iter().map(|&i| weight(logits[i], max, opts.temperature) as f64).collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if opts.top_p < 1.0 {
        // transformers: drop tokens once the probability before them already reaches top_p (keep at least one).
        let (mut cum, mut keep) = (0.0, 0);
        for p in &probs {
            if keep > 0 && cum >= opts.top_p as f64 {
                break;
            }
            cum += p;
            keep += 1;
        }
        probs.truncate(keep);
    }
    let total: f64 = probs.iter().sum();
    let mut u = stream.uniform() * total;
    for (i, p) in probs.iter().enumerate() {
        if u < *p {
            return order[i] as u32;
        }
        u -= p;
    }
    order[probs.len() - 1] as u32
}

/// A token's unnormalised probability `exp((logit − max) / temperature)`, by the engine's f32 `exp` (within 2 ulp
/// of libm's, and vectorisable: sampling takes one for every logit, 4.9 million a step for 32 prompts of a
/// 150k vocabulary). Below `e^-87` it stays at about 1e-38 rather than going to zero (no draw can tell), but a
/// logit of −∞ (a token ruled out) weighs exactly zero.
#[inline(always)]
fn weight(logit: f32, max: f32, temperature: f32) -> f32 {
    let w = exp_f32((logit - max) / temperature);
    if logit > f32::NEG_INFINITY { w } else { 0.0 }
}

/// Buckets per nat of `sample_unfiltered`'s coarse order, and how many (the last holds the rest of the tail).
const BUCKETS_PER_NAT: f64 = 16.0;
const BUCKETS: usize = 1024;

/// `sample` over the whole vocabulary, walking from the most likely token down without sorting it all: the
/// tokens fall into buckets by how far below the maximum their scaled logit is (monotone in the logit), the
/// walk passes whole buckets by their summed weight, and only the bucket the draw lands in is sorted.
fn sample_unfiltered(logits: &[f32], temperature: f32, stream: &mut SplitMix) -> u32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let scale = BUCKETS_PER_NAT as f32 / temperature;
    // Monotone in the logit, and plain f32 arithmetic so that the block loops below vectorise.
    let bucket = |v: f32| {
        let b = ((max - v) * scale).max(0.0).min((BUCKETS - 1) as f32);
        // SAFETY: f32::max and min turn NaN into 0 and clamp, so `b` is an integer-convertible value in 0..BUCKETS.
        unsafe { b.to_int_unchecked::<u32>() }
    };
    let mut mass = vec![0f64; BUCKETS];
    let mut total = 0.0;
    // Weights and buckets a block at a time, in a loop of their own that the compiler vectorises; the sums after.
    const BLOCK: usize = 256;
    let (mut weights, mut buckets) = ([0f32; BLOCK], [0u32; BLOCK]);
    for block in logits.chunks(BLOCK) {
        for ((w, b), &v) in weights.iter_mut().zip(buckets.iter_mut()).zip(block) {
            (*w, *b) = (weight(v, max, temperature), bucket(v));
        }
        for (&w, &b) in weights.iter().zip(&buckets).take(block.len()) {
            mass[b as usize] += w as f64;
            total += w as f64;
        }
    }
    let mut u = stream.uniform() * total;
    let mut landed = BUCKETS - 1;
    for (b, &m) in mass.iter().enumerate() {
        if m > 0.0 {
            landed = b;
            if u < m {
                break;
            }
            u -= m;
        }
    }
    let mut keys = Vec::new();
    for (first, block) in (0..).step_by(BLOCK).zip(logits.chunks(BLOCK)) {
        for (b, &v) in buckets.iter_mut().zip(block) {
            *b = bucket(v);
        }
        for (i, (&b, &v)) in buckets.iter().zip(block).enumerate() {
            if b as usize == landed {
                keys.push(descending_key(v, first + i));
            }
        }
    }
    keys.sort_unstable();
    let mut last = 0;
    for key in keys {
        last = (key & 0xFFFF_FFFF) as usize;
        let w = weight(logits[last], max, temperature) as f64;
        if u < w {
            break;
        }
        u -= w;
    }
    last as u32
}

/// Continues each prompt (token ids) until `eos_id` or `max_new_tokens`; returns the new tokens of each, the
/// EOS left out.
pub fn generate_ids(model: &Model, prompts: &[Vec<u32>], eos_id: u32, opts: &SamplingOptions) -> Vec<Vec<u32>> {
    generate_ids_with(model, true, prompts, eos_id, opts)
}

/// `generate_ids`; `adapters: false` samples from the model's frozen base when it carries LoRA adapters.
pub fn generate_ids_with(model: &Model, adapters: bool, prompts: &[Vec<u32>], eos_id: u32, opts: &SamplingOptions) -> Vec<Vec<u32>> {
    let mut out = Vec::with_capacity(prompts.len());
    for (chunk_index, chunk) in prompts.chunks(opts.batch()).enumerate() {
        out.extend(generate_batch(model, adapters, chunk, chunk_index * opts.batch(), eos_id, opts));
    }
    out
}

/// The next token of every sequence given logits this step, each from its own stream, the sequences split over
/// one thread per core (sampling takes an exponential of every logit: for a batch of prompts, a share of a
/// decode step).
fn sample_each(logits: &StepLogits, opts: &SamplingOptions, streams: &mut [SplitMix]) -> Vec<Option<u32>> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut tokens = vec![None; streams.len()];
    let mut work: Vec<(&mut Option<u32>, &mut SplitMix, &[f32])> = Vec::new();
    for ((s, token), stream) in tokens.iter_mut().enumerate().zip(streams.iter_mut()) {
        if let Some(row) = logits.of(s) {
            work.push((token, stream, row));
        }
    }
    let share = work.len().div_ceil(threads).max(1);
    if share >= work.len() {
        // One sequence (or one core): no thread to start for every token.
        for (token, stream, row) in work {
            *token = Some(sample(row, opts, stream));
        }
        return tokens;
    }
    std::thread::scope(|scope| {
        for part in work.chunks_mut(share) {
            scope.spawn(move || {
                for (token, stream, row) in part.iter_mut() {
                    **token = Some(sample(row, opts, stream));
                }
            });
        }
    });
    tokens
}

/// One batch of prompts through the KV cache; `first` is the index of its first prompt (its random stream).
fn generate_batch(model: &Model, adapters: bool, chunk: &[Vec<u32>], first: usize, eos_id: u32, opts: &SamplingOptions) -> Vec<Vec<u32>> {
    generate_batch_observed(model, adapters, chunk, first, eos_id, opts, &mut || {})
}

/// `generate_ids` for at most one generation batch of prompts, calling `on_step` after each token is sampled
/// for every sequence still running (the first call ends the prompt's pass: time to first token).
pub fn generate_ids_observed(model: &Model, prompts: &[Vec<u32>], eos_id: u32, opts: &SamplingOptions, on_step: &mut dyn FnMut()) -> Vec<Vec<u32>> {
    assert!(prompts.len() <= GENERATION_BATCH, "at most {GENERATION_BATCH} prompts are sampled together");
    generate_batch_observed(model, true, prompts, 0, eos_id, opts, on_step)
}

#[allow(clippy::too_many_arguments)]
fn generate_batch_observed(
    model: &Model,
    adapters: bool,
    chunk: &[Vec<u32>],
    first: usize,
    eos_id: u32,
    opts: &SamplingOptions,
    on_step: &mut dyn FnMut(),
) -> Vec<Vec<u32>> {
    {
        let capacity = chunk.iter().map(|p| p.len()).max().unwrap_or(0) + opts.max_new_tokens;
        let mut cache = KvCache::new(model, chunk.len(), capacity.max(1));
        cache.adapters = adapters;
        let mut streams: Vec<SplitMix> = (0..chunk.len()).map(|i| SplitMix::new(opts.seed, (first + i) as u64)).collect();
        let mut generated: Vec<Vec<u32>> = vec![Vec::new(); chunk.len()];
        let mut done: Vec<bool> = chunk.iter().map(|p| p.is_empty() || opts.max_new_tokens == 0).collect();
        let mut feed: Vec<Vec<u32>> = chunk.iter().map(|p| if p.is_empty() { Vec::new() } else { p.clone() }).collect();
        let mut logits = StepLogits::default();
        if let Some((lead, len)) = shared_start(chunk).filter(|_| opts.max_new_tokens > 0) {
            let mut start: Vec<&[u32]> = vec![&[]; chunk.len()];
            start[lead] = &chunk[lead][..len];
            extend_kv_into(model, &mut cache, &start, &mut logits);
            let others: Vec<usize> = (0..chunk.len()).filter(|&s| s != lead && !chunk[s].is_empty()).collect();
            share_prefix(&mut cache, lead, &others, len);
            for (feed, prompt) in feed.iter_mut().zip(chunk).filter(|(_, p)| !p.is_empty()) {
                *feed = prompt[len..].to_vec();
            }
        }
        while done.iter().any(|d| !d) {
            let slices: Vec<&[u32]> = feed.iter().map(|f| f.as_slice()).collect();
            extend_kv_into(model, &mut cache, &slices, &mut logits);
            let tokens = sample_each(&logits, opts, &mut streams);
            on_step();
            for s in 0..chunk.len() {
                feed[s].clear();
                let Some(token) = tokens[s] else { continue };
                if token == eos_id {
                    done[s] = true;
                    continue;
                }
                generated[s].push(token);
                if generated[s].len() == opts.max_new_tokens {
                    done[s] = true;
                } else {
                    feed[s].push(token);
                }
            }
        }
        generated
    }
}

/// Rows a shared start must save before it gets a pass of its own: that pass reads every weight once more,
/// about what a few dozen rows of a batched prompt pass cost.
const SHARED_START_MIN_ROWS: usize = 64;

/// The first non-empty prompt and how many tokens every non-empty prompt starts with (each keeping at least
/// one of its own, whose logits it samples from), when running that start once saves enough rows: a chat
/// template's system turn, or a fixed instruction before each question. Its keys and values are computed in a
/// pass of one sequence and copied to the others, so a prompt's logits can differ in their last bits from a
/// batch that does not share its start (the products of a short pass sum in another order).
fn shared_start(prompts: &[Vec<u32>]) -> Option<(usize, usize)> {
    let mut non_empty = prompts.iter().enumerate().filter(|(_, p)| !p.is_empty());
    let (lead, first) = non_empty.next()?;
    let (mut len, mut others) = (first.len() - 1, 0);
    for (_, p) in non_empty {
        len = len.min(p.len() - 1).min(first.iter().zip(p).take_while(|(a, b)| a == b).count());
        others += 1;
    }
    (others * len >= SHARED_START_MIN_ROWS).then_some((lead, len))
}

/// Token ids of a prompt exactly as training tokenizes prompts: text through the tokenizer (with its special
/// tokens), message lists through the chat template with the generation prompt. With `chat` and a tokenizer
/// that has a chat template, a text prompt is sent as one user message.
pub fn prompt_ids(tok: &TextTokenizer, prompt: &Content, chat: bool) -> Result<Vec<u32>, String> {
    match prompt {
        Content::Text(text) if chat && tok.has_chat_template() => {
            let message = serde_json::json!({"role": "user", "content": text});
            tok.encode(&tok.render_chat(&[message], true, None, None)?, false)
        }
        Content::Text(text) => tok.encode(text, true),
        Content::Messages(messages) => tok.encode(&tok.render_chat(messages, true, None, None)?, false),
    }
}

/// Samples a completion (decoded text, special tokens dropped) for each prompt.
pub fn generate_texts(
    model: &Model,
    tok: &TextTokenizer,
    prompts: &[Content],
    chat: bool,
    opts: &SamplingOptions,
) -> Result<Vec<String>, String> {
    let mut texts = Vec::with_capacity(prompts.len());
    generate_texts_streaming(model, tok, prompts, chat, opts, &mut |_, batch| {
        texts.extend_from_slice(batch);
        true
    })?;
    Ok(texts)
}

/// `generate_texts` a batch at a time: `sink` gets each batch's completions (the index of its first prompt,
/// the texts) as soon as they are sampled, and returns false to stop before the next batch. Returns how many
/// completions were made.
pub fn generate_texts_streaming(
    model: &Model,
    tok: &TextTokenizer,
    prompts: &[Content],
    chat: bool,
    opts: &SamplingOptions,
    sink: &mut dyn FnMut(usize, &[String]) -> bool,
) -> Result<usize, String> {
    let ids = prompts.iter().map(|p| prompt_ids(tok, p, chat)).collect::<Result<Vec<_>, _>>()?;
    let mut made = 0;
    for (chunk_index, chunk) in ids.chunks(opts.batch()).enumerate() {
        let first = chunk_index * opts.batch();
        let texts = generate_batch(model, true, chunk, first, tok.eos_id, opts)
            .iter()
            .map(|g| tok.decode(g))
            .collect::<Result<Vec<_>, _>>()?;
        made += texts.len();
        if !sink(first, &texts) {
            break;
        }
    }
    Ok(made)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The keyed order is exactly a stable sort by descending `total_cmp` (ties, signed zeros, infinities).
    #[test]
    fn candidate_order_is_a_stable_descending_sort() {
        let mut logits: Vec<f32> = (0..997).map(|i| ((i * 7919) % 61) as f32 / 7.0 - 4.0).collect();
        logits.extend([0.0, -0.0, f32::INFINITY, f32::NEG_INFINITY, 3.0, 3.0, -1e-30, 1e-30]);
        let mut want: Vec<usize> = (0..logits.len()).collect();
        want.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        assert_eq!(candidates(&logits, 0), want);
        for k in [1, 2, 50, 1004, 1005, 5000] {
            assert_eq!(candidates(&logits, k), want[..k.min(want.len())], "top_k {k}");
        }
    }

    /// The bucketed walk over the whole vocabulary draws what the fully sorted walk draws (top_k = vocab
    /// sorts all of it), over many buckets, ties and a far tail.
    #[test]
    fn the_unfiltered_walk_draws_what_the_sorted_walk_draws() {
        let mut logits: Vec<f32> = (0..1000).map(|i| ((i * 7919) % 61) as f32 / 15.0).collect();
        logits[17] = -200.0;
        let (mut a, mut b) = (SplitMix::new(9, 2), SplitMix::new(9, 2));
        let full = SamplingOptions { top_k: 0, ..Default::default() };
        let sorted = SamplingOptions { top_k: logits.len(), ..Default::default() };
        for draw in 0..3000 {
            assert_eq!(sample(&logits, &full, &mut a), sample(&logits, &sorted, &mut b), "draw {draw}");
        }
    }

    /// A common start runs once only when it saves enough rows; each prompt keeps a token of its own, and
    /// empty prompts neither count nor lead.
    #[test]
    fn a_shared_start_is_taken_when_it_saves_enough_rows() {
        let start: Vec<u32> = (0..40).collect();
        let with = |tail: &[u32]| start.iter().chain(tail).copied().collect::<Vec<u32>>();
        let prompts = vec![vec![], with(&[7, 8]), with(&[9]), with(&[5, 5, 5])];
        assert_eq!(shared_start(&prompts), Some((1, 40)));
        // Two others × 32 tokens = 64 rows: the threshold; one token fewer is not worth a pass.
        let short: Vec<Vec<u32>> = prompts.iter().map(|p| p.iter().skip(8).copied().collect()).collect();
        assert_eq!(shared_start(&short), Some((1, 32)));
        let shorter: Vec<Vec<u32>> = prompts.iter().map(|p| p.iter().skip(9).copied().collect()).collect();
        assert_eq!(shared_start(&shorter), None);
        // A prompt that is the whole start keeps its last token for its own pass.
        assert_eq!(shared_start(&[with(&[]), with(&[1]), with(&[2])]), Some((0, 39)));
        assert_eq!(shared_start(&[with(&[1])]), None, "one prompt shares with no one");
        assert_eq!(shared_start(&[vec![3; 50], vec![4; 50], vec![3; 50]]), None, "no common start");
    }

    #[test]
    fn greedy_picks_the_maximum_and_top_k_one_is_greedy() {
        let logits = [0.1f32, 2.0, -1.0, 1.9];
        let mut s = SplitMix::new(1, 0);
        let greedy = SamplingOptions { temperature: 0.0, ..Default::default() };
        assert_eq!(sample(&logits, &greedy, &mut s), 1);
        let top1 = SamplingOptions { top_k: 1, ..Default::default() };
        for _ in 0..20 {
            assert_eq!(sample(&logits, &top1, &mut s), 1);
        }
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        // Probabilities ~ [0.64, 0.24, 0.09, 0.03]: top_p 0.7 keeps the first two.
        let logits = [3.0f32, 2.0, 1.0, 0.0];
        let opts = SamplingOptions { top_p: 0.7, top_k: 0, ..Default::default() };
        let mut s = SplitMix::new(7, 3);
        let mut seen = [0usize; 4];
        for _ in 0..2000 {
            seen[sample(&logits, &opts, &mut s) as usize] += 1;
        }
        assert_eq!(seen[2] + seen[3], 0, "{seen:?}");
        let ratio = seen[0] as f64 / seen[1] as f64;
        assert!((ratio - std::f64::consts::E).abs() < 0.4, "p0/p1 = {ratio}, want e");
    }

    #[test]
    fn sampling_follows_the_softmax() {
        let logits = [0.0f32, (3.0f32).ln()];
        let opts = SamplingOptions { top_k: 0, ..Default::default() };
        let mut s = SplitMix::new(11, 0);
        let ones = (0..4000).filter(|_| sample(&logits, &opts, &mut s) == 1).count();
        assert!((ones as f64 / 4000.0 - 0.75).abs() < 0.03, "{ones}");
        // Temperature 0.5 squares the odds: 9:1.
        let cold = SamplingOptions { temperature: 0.5, ..opts };
        let ones = (0..4000).filter(|_| sample(&logits, &cold, &mut s) == 1).count();
        assert!((ones as f64 / 4000.0 - 0.9).abs() < 0.03, "{ones}");
    }
}

/// Prompts of a data file (JSON Lines, JSON or Parquet): the `column` of every row, text or a message list.
pub fn read_prompts(path: &std::path::Path, column: &str) -> crate::Result<Vec<Content>> {
    let (rows, _) = crate::data::read_dataset(path, false)?;
    rows.iter()
        .map(|row| match row.fields.get(column) {
            Some(serde_json::Value::String(s)) => Ok(Content::Text(s.clone())),
            Some(serde_json::Value::Array(m)) => Ok(Content::Messages(m.clone())),
            Some(other) => Err(row.error(format!("\"{column}\" must be a string or a list of messages, found {other}"))),
            None => Err(row.error(format!("missing key \"{column}\""))),
        })
        .collect()
}

/// A prompt as JSON (text, or its message list).
pub fn content_json(c: &Content) -> serde_json::Value {
    match c {
        Content::Text(s) => serde_json::Value::String(s.clone()),
        Content::Messages(m) => serde_json::Value::Array(m.clone()),
    }
}
