//! `kto bench --generate`: sampling speed. Loads a model folder (`--model`, timed) or makes the preset's random
//! bf16 model, samples `--new-tokens` tokens after random prompts of `--prompt-len` tokens for `--batch`
//! sequences together (temperature 1, the full distribution, no stop token), and prints the load time, the
//! time to first token, decode tokens/s, and the bandwidth the decode steps read weights at beside a measured
//! copy rate of the same machine.
use super::bench::{cpu_model, BenchOptions};
use kto::generate::{generate_ids_observed, SamplingOptions, GENERATION_BATCH};
use kto::model::random::random_bf16_model;
use kto::model::Model;
use kto::rng::Rng;
use rayon::prelude::*;
use serde_json::json;
use std::time::Instant;

/// Bytes per second a large copy moves on this machine (read side; both cores), best of a few rounds.
fn copy_rate() -> f64 {
    const BYTES: usize = 512 << 20;
    let src = vec![1u8; BYTES];
    let mut dst = vec![0u8; BYTES];
    let mut best = f64::MAX;
    for _ in 0..4 {
        let t = Instant::now();
        dst.par_chunks_mut(1 << 20).zip(src.par_chunks(1 << 20)).for_each(|(d, s)| d.copy_from_slice(s));
        best = best.min(t.elapsed().as_secs_f64());
    }
    std::hint::black_box(&dst);
    BYTES as f64 / best
}

pub fn run(opts: &BenchOptions) -> anyhow::Result<()> {
    if let Some(t) = opts.threads {
        kto::engine::cpu::update::set_threads(t).map_err(|e| anyhow::anyhow!("--threads: {e}"))?;
    }
    let batch = opts.batch.unwrap_or(1);
    let prompt_len = opts.prompt_len.unwrap_or(32);
    if batch == 0 || batch > GENERATION_BATCH || prompt_len == 0 || opts.new_tokens == 0 {
        anyhow::bail!("kto bench --generate: --batch must be 1..={GENERATION_BATCH}, --prompt-len and --new-tokens at least 1");
    }
    let t = Instant::now();
    let (model, source) = match &opts.model {
        Some(dir) => (Model::load_frozen(dir)?, dir.display().to_string()),
        None => {
            opts.check()?;
            (random_bf16_model(&opts.spec()?, 0), format!("preset {} (random bf16 weights)", opts.preset))
        }
    };
    let load_s = t.elapsed().as_secs_f64();
    let vocab = model.spec.vocab_size as u64;
    let mut rng = Rng::from_state(7);
    let prompts: Vec<Vec<u32>> = (0..batch).map(|_| (0..prompt_len).map(|_| (rng.next_u64() % vocab) as u32).collect()).collect();
    let sampling = SamplingOptions { temperature: 1.0, top_p: 1.0, top_k: 0, max_new_tokens: opts.new_tokens, seed: 0, batch_size: batch };
    let start = Instant::now();
    let mut step_ends = Vec::with_capacity(opts.new_tokens);
    // No stop token: every sequence makes all its tokens, as generate_speed.py's min_new_tokens asks.
    generate_ids_observed(&model, &prompts, u32::MAX, &sampling, &mut || step_ends.push(start.elapsed().as_secs_f64()));
    let first_token_s = step_ends[0];
    let decode_s = step_ends.last().unwrap() - first_token_s;
    let decode_steps = step_ends.len() - 1;
    let tokens_per_s = (decode_steps * batch) as f64 / decode_s;
    let weight_bytes = model.weight_bytes();
    let read_rate = weight_bytes as f64 * decode_steps as f64 / decode_s;
    let copy = copy_rate();
    println!(
        "kto bench --generate: {source}; {} parameters held in {} ({:.2} GB); batch {batch} x {prompt_len} prompt tokens + {} new tokens, temperature 1, {} threads",
        model.num_parameters(),
        if weight_bytes < model.num_parameters() * 4 { "bf16" } else { "f32" },
        weight_bytes as f64 / 1e9,
        opts.new_tokens,
        kto::engine::cpu::update::threads()
    );
    println!("cpu: {}; kernel set {}", cpu_model(), kto::engine::cpu::isa::active().name());
    println!("{:<32} {:>10.2}", "load (s)", load_s);
    println!("{:<32} {:>10.3}", "time to first token (s)", first_token_s);
    println!("{:<32} {:>10.1}", "decode tokens/s (all sequences)", tokens_per_s);
    println!("{:<32} {:>10.1}", "decode ms per step", decode_s / decode_steps.max(1) as f64 * 1e3);
    println!("{:<32} {:>10.1}  ({:.0}% of a {:.1} GB/s copy's read rate)", "weights read (GB/s)", read_rate / 1e9, 100.0 * read_rate / copy, copy / 1e9);
    println!(
        "{}",
        json!({
            "load_s": load_s,
            "first_token_s": first_token_s,
            "decode_tokens_per_s": tokens_per_s,
            "decode_steps": decode_steps,
            "decode_s": decode_s,
            "batch": batch,
            "prompt_len": prompt_len,
            "new_tokens": opts.new_tokens,
            "weight_bytes": weight_bytes,
            "weights_read_gb_per_s": read_rate / 1e9,
            "copy_read_gb_per_s": copy / 1e9,
        })
    );
    Ok(())
}
