//! Tokenizing a data set over the ranks of a data-parallel run: each rank takes a share, then all exchange
//! the results so every rank holds every row (the ranks then train on their own micro-batches).
use super::prepare::{tokenize_rows, Tokenized};
use super::{Example, TextTokenizer};
use crate::dist::Ranks;
use crate::error::{Error, Result};

/// Each rank tokenizes every `ranks`-th example; the ranks then exchange lengths and token ids (as f32, exact
/// below 2^24) with sums, so every rank ends with every example tokenized.
pub fn tokenize_over_ranks(
    examples: &[Example],
    tokenizer: &TextTokenizer,
    path: &std::path::Path,
    ranks: &Ranks,
) -> Result<Vec<Tokenized>> {
    let n = examples.len();
    let mine: Vec<usize> = (ranks.rank()..n).step_by(ranks.size()).collect();
    let local = tokenize_rows(examples, &mine, tokenizer, path, &|_| true);
    // [prompt length, completion length, prompt cut] per example, then a failure count.
    let mut meta = vec![0f64; 3 * n + 1];
    match &local {
        Ok(rows) => {
            for (&i, (p, c, cut)) in mine.iter().zip(rows) {
                meta[3 * i] = p.len() as f64;
                meta[3 * i + 1] = c.len() as f64;
                meta[3 * i + 2] = *cut as u8 as f64;
            }
        }
        Err(_) => meta[3 * n] = 1.0,
    }
    ranks.sum_f64(&mut meta);
    let local = match local {
        Err(e) => return Err(e),
        Ok(_) if meta[3 * n] > 0.0 => {
            return Err(Error::Train(format!("{}: another rank could not tokenize its rows (its error is printed above)", path.display())))
        }
        Ok(rows) => rows,
    };
    let mut offsets = Vec::with_capacity(n + 1);
    offsets.push(0usize);
    for i in 0..n {
        offsets.push(offsets[i] + meta[3 * i] as usize + meta[3 * i + 1] as usize);
    }
    let mut ids = vec![0f32; offsets[n]];
    for (&i, (p, c, _)) in mine.iter().zip(&local) {
        for (slot, &t) in ids[offsets[i]..offsets[i + 1]].iter_mut().zip(p.iter().chain(c)) {
            if t >= 1 << 24 {
                return Err(Error::Train(format!("token id {t} is too large to exchange between ranks")));
            }
            *slot = t as f32;
        }
    }
    ranks.sum_f32(&mut ids);
    Ok((0..n)
        .map(|i| {
            let row: Vec<u32> = ids[offsets[i]..offsets[i + 1]].iter().map(|&t| t as u32).collect();
            let plen = meta[3 * i] as usize;
            (row[..plen].to_vec(), row[plen..].to_vec(), meta[3 * i + 2] > 0.0)
        })
        .collect())
}
