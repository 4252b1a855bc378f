//! TRL's `_prepare_dataset` and collator: EOS appended as text, joint tokenization split at the common prefix,
//! rows whose prompt alone reaches `max_length` dropped, KL completions rotated inside chunks of the batch size,
//! and keep-start truncation at collation.
use super::format::{Content, Example};
use super::tokenizer::TextTokenizer;
use crate::error::{Error, Result};
use std::path::Path;

/// One training row as the trainer holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenizedRow {
    pub prompt_ids: Vec<u32>,
    pub completion_ids: Vec<u32>,
    /// The completion of this row's KL partner (empty for `apo_zero_unpaired`, which has no KL term).
    pub kl_completion_ids: Vec<u32>,
    pub label: bool,
    pub source_row: usize,
}

#[derive(Debug, Clone)]
pub struct Prepared {
    pub rows: Vec<TokenizedRow>,
    /// Source rows dropped because their prompt alone reached `max_length`.
    pub dropped_source_rows: Vec<usize>,
    /// Rows whose prompt tokens were not a prefix of the joint prompt+completion tokens.
    pub prefix_mismatches: usize,
}

#[derive(Debug, Clone, Copy)]
pub struct PrepareOptions {
    /// `None`: no truncation and no filtering.
    pub max_length: Option<usize>,
    /// `per_device_train_batch_size`: the chunk size of the KL rotation.
    pub batch_size: usize,
    /// Build KL completions (`loss_type = "kto"`).
    pub with_kl: bool,
}

fn common_prefix_length(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Tokenizes one example the way TRL does; returns (prompt_ids, completion_ids, prompt was cut).
pub fn tokenize_example(tok: &TextTokenizer, ex: &Example) -> std::result::Result<(Vec<u32>, Vec<u32>, bool), String> {
    let (prompt_ids, full_ids) = match (&ex.prompt, &ex.completion) {
        (Content::Text(p), Content::Text(c)) => {
            // TRL appends the EOS string (not id) unless the completion already ends with it.
            let mut completion = c.clone();
            if !completion.ends_with(&tok.eos_token) {
                completion.push_str(&tok.eos_token);
            }
            (tok.encode(p, true)?, tok.encode(&format!("{p}{completion}"), true)?)
        }
        (Content::Messages(p), Content::Messages(c)) => {
            let kwargs = ex.template_kwargs.as_ref();
            let prompt_text = tok.render_chat(p, true, ex.tools.as_ref(), kwargs)?;
            let all: Vec<_> = p.iter().chain(c).cloned().collect();
            let full_text = tok.render_chat(&all, false, ex.tools.as_ref(), kwargs)?;
            (tok.encode(&prompt_text, false)?, tok.encode(&full_text, false)?)
        }
        _ => return Err("prompt and completion must both be text or both be message lists".into()),
    };
    let l = common_prefix_length(&prompt_ids, &full_ids);
    let cut = l < prompt_ids.len();
    Ok((prompt_ids[..l].to_vec(), full_ids[l..].to_vec(), cut))
}

/// Runs TRL's preprocessing over all examples. `path` names the data file in errors.
pub fn prepare(examples: &[Example], tok: &TextTokenizer, opts: PrepareOptions, path: &Path) -> Result<Prepared> {
    prepare_with_progress(examples, tok, opts, path, &|_| true)
}

/// `prepare`, calling `progress(rows tokenized so far)` every 1,024 rows (from worker threads); when it returns
/// false (the user asked to stop) tokenization ends with `Error::StoppedEarly`.
pub fn prepare_with_progress(
    examples: &[Example],
    tok: &TextTokenizer,
    opts: PrepareOptions,
    path: &Path,
    progress: &(dyn Fn(usize) -> bool + Sync),
) -> Result<Prepared> {
    let all: Vec<usize> = (0..examples.len()).collect();
    let tokenized = tokenize_rows(examples, &all, tok, path, progress)?;
    assemble(examples, tokenized, opts, path)
}

/// Tokenized examples: (prompt ids, completion ids, whether the prompt was cut).
pub type Tokenized = (Vec<u32>, Vec<u32>, bool);

/// Tokenizes the examples at `indices` the way TRL does, on one thread per core (each a contiguous share, so
/// results and the first error come back in row order).
pub fn tokenize_rows(
    examples: &[Example],
    indices: &[usize],
    tok: &TextTokenizer,
    path: &Path,
    progress: &(dyn Fn(usize) -> bool + Sync),
) -> Result<Vec<Tokenized>> {
    let done = std::sync::atomic::AtomicUsize::new(0);
    let one = |i: usize| {
        let ex = &examples[i];
        let n = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        if n % 1024 == 0 && !progress(n) {
            return Err(Error::StoppedEarly(format!("while tokenizing {}, before the first step; no checkpoint was written", path.display())));
        }
        tokenize_example(tok, ex).map_err(|msg| Error::Row { path: path.to_path_buf(), row: ex.line, msg })
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let share = indices.len().div_ceil(threads).max(1);
    let parts: Vec<Result<Vec<Tokenized>>> = std::thread::scope(|scope| {
        let workers: Vec<_> = indices.chunks(share).map(|part| scope.spawn(|| part.iter().map(|&i| one(i)).collect())).collect();
        workers.into_iter().map(|w| w.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))).collect()
    });
    let mut tokenized = Vec::with_capacity(indices.len());
    for part in parts {
        tokenized.extend(part?);
    }
    progress(indices.len());
    Ok(tokenized)
}

/// TRL's steps after tokenization: rows whose prompt alone reaches `max_length` dropped, KL completions rotated.
/// `tokenized[i]` belongs to `examples[i]`.
pub fn assemble(examples: &[Example], tokenized: Vec<Tokenized>, opts: PrepareOptions, path: &Path) -> Result<Prepared> {
    let mut rows = Vec::with_capacity(examples.len());
    let mut dropped_source_rows = Vec::new();
    let mut prefix_mismatches = 0;
    for (ex, (prompt_ids, completion_ids, cut)) in examples.iter().zip(tokenized) {
        prefix_mismatches += cut as usize;
        if opts.max_length.is_some_and(|m| prompt_ids.len() >= m) {
            dropped_source_rows.push(ex.source_row);
            continue;
        }
        if completion_ids.is_empty() {
            return Err(Error::Row { path: path.to_path_buf(), row: ex.line, msg: "the completion tokenizes to nothing".into() });
        }
        rows.push(TokenizedRow { prompt_ids, completion_ids, kl_completion_ids: Vec::new(), label: ex.label, source_row: ex.source_row });
    }
    if opts.with_kl {
        rotate_kl_completions(&mut rows, opts.batch_size);
    }
    Ok(Prepared { rows, dropped_source_rows, prefix_mismatches })
}

/// Row i of each consecutive chunk of `batch_size` rows takes the completion of row i−1; the chunk's first row
/// takes its last row's (TRL's `[completion_ids[-1]] + completion_ids[:-1]` per map batch).
pub fn rotate_kl_completions(rows: &mut [TokenizedRow], batch_size: usize) {
    for chunk in rows.chunks_mut(batch_size.max(1)) {
        let n = chunk.len();
        let completions: Vec<Vec<u32>> = chunk.iter().map(|r| r.completion_ids.clone()).collect();
        for (i, row) in chunk.iter_mut().enumerate() {
            row.kl_completion_ids = completions[(i + n - 1) % n].clone();
        }
    }
}

/// One collated micro-batch: per row the main and KL sequences (ids and completion mask, truncated, unpadded).
#[derive(Debug, Clone, Default)]
pub struct Batch {
    /// Row indices into the data set the batch came from (the training set, or the eval set when `eval`).
    pub rows: Vec<usize>,
    pub eval: bool,
    pub labels: Vec<bool>,
    pub main: Vec<(Vec<u32>, Vec<bool>)>,
    pub kl: Vec<(Vec<u32>, Vec<bool>)>,
}

fn sequence(prompt: &[u32], completion: &[u32], max_length: Option<usize>) -> (Vec<u32>, Vec<bool>) {
    let mut ids: Vec<u32> = prompt.iter().chain(completion).copied().collect();
    let mut mask: Vec<bool> = std::iter::repeat_n(false, prompt.len()).chain(std::iter::repeat_n(true, completion.len())).collect();
    if let Some(m) = max_length {
        ids.truncate(m);
        mask.truncate(m);
    }
    (ids, mask)
}

/// Collates rows `indices` like TRL's `DataCollatorForUnpairedPreference` (keep-start truncation; the padding
/// it adds is not needed by the packed engine).
pub fn collate(rows: &[TokenizedRow], indices: &[usize], max_length: Option<usize>, with_kl: bool) -> Batch {
    let mut b = Batch { rows: indices.to_vec(), eval: false, labels: Vec::new(), main: Vec::new(), kl: Vec::new() };
    for &i in indices {
        let r = &rows[i];
        b.labels.push(r.label);
        b.main.push(sequence(&r.prompt_ids, &r.completion_ids, max_length));
        if with_kl {
            b.kl.push(sequence(&r.prompt_ids, &r.kl_completion_ids, max_length));
        }
    }
    b
}
