//! Generation with a KV cache: cached logits equal a full forward at every step, and greedy decoding equals
//! transformers' `generate` (tests/data/generation/greedy.json, made by scripts/make_generation_fixture.py).
use kto::engine::{extend_kv, forward_logits, KvCache};
use kto::generate::{generate_ids, SamplingOptions};
use kto::model::Model;
use serde_json::Value;
use std::path::PathBuf;

fn data(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(path)
}

fn greedy_fixture() -> serde_json::Map<String, Value> {
    serde_json::from_str(&std::fs::read_to_string(data("generation/greedy.json")).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

#[test]
fn kv_cache_logits_equal_a_full_forward_at_every_step() {
    // Every family, including Mistral's sliding window of 5 (shorter than the sequences).
    for name in ["trl-tiny/policy", "arch/qwen2/policy", "arch/qwen3/policy", "arch/mistral/policy", "arch/llama3/policy", "arch/gemma2/policy", "arch/gemma3/policy"] {
        let model = Model::load(&data(name)).unwrap();
        let seqs: Vec<Vec<u32>> = vec![(3..20).collect(), (40..49).rev().collect(), vec![7, 7, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]];
        let full = forward_logits(&model, &seqs.iter().map(|s| s.as_slice()).collect::<Vec<_>>());
        let vocab = model.spec.vocab_size;
        let mut cache = KvCache::new(&model, seqs.len(), 20);
        // A first chunk of different lengths per sequence, then one token at a time (some sequences idle).
        let mut fed = vec![0usize; seqs.len()];
        let first = [5usize, 1, 7];
        let mut worst = 0f32;
        for step in 0.. {
            let chunks: Vec<&[u32]> = (0..seqs.len())
                .map(|s| {
                    let take = if step == 0 { first[s] } else if step % (s + 1) == 0 { 1 } else { 0 };
                    let end = (fed[s] + take).min(seqs[s].len());
                    &seqs[s][fed[s]..end]
                })
                .collect();
            if chunks.iter().all(|c| c.is_empty()) && fed.iter().zip(&seqs).all(|(f, s)| *f == s.len()) {
                break;
            }
            let logits = extend_kv(&model, &mut cache, &chunks);
            for s in 0..seqs.len() {
                if chunks[s].is_empty() {
                    assert!(logits[s].is_empty());
                    continue;
                }
                fed[s] += chunks[s].len();
                assert_eq!(cache.len(s), fed[s]);
                let want = &full[s][(fed[s] - 1) * vocab..fed[s] * vocab];
                for (g, w) in logits[s].iter().zip(want) {
                    let err = (g - w).abs() / (1.0 + w.abs());
                    worst = worst.max(err);
                }
            }
        }
        assert!(worst < 1e-5, "{name}: cached logits differ from the full forward by {worst}");
    }
}

/// Prompts that start alike: the start copied from one sequence's cache gives the logits a full forward gives,
/// and greedy generation that shares the start (the batch) picks the tokens each prompt alone picks.
#[test]
fn a_shared_start_gives_what_each_prompt_alone_gives() {
    for name in ["trl-tiny/policy", "arch/qwen2/policy", "arch/gemma2/policy"] {
        let model = Model::load(&data(name)).unwrap();
        let start: Vec<u32> = (100..140).collect();
        let prompts: Vec<Vec<u32>> = (0..3u32).map(|i| start.iter().copied().chain(200 + i..203 + 2 * i).collect()).collect();
        let full = forward_logits(&model, &prompts.iter().map(|s| s.as_slice()).collect::<Vec<_>>());
        let mut cache = KvCache::new(&model, prompts.len(), 60);
        extend_kv(&model, &mut cache, &[&start[..], &[], &[]]);
        kto::engine::share_prefix(&mut cache, 0, &[1, 2], start.len());
        let rest: Vec<&[u32]> = prompts.iter().map(|p| &p[start.len()..]).collect();
        let logits = extend_kv(&model, &mut cache, &rest);
        let vocab = model.spec.vocab_size;
        for (s, p) in prompts.iter().enumerate() {
            assert_eq!(cache.len(s), p.len());
            let want = &full[s][(p.len() - 1) * vocab..p.len() * vocab];
            let worst = logits[s].iter().zip(want).map(|(g, w)| (g - w).abs() / (1.0 + w.abs())).fold(0f32, f32::max);
            assert!(worst < 1e-5, "{name}: sequence {s} after a shared start differs from the full forward by {worst}");
        }
        let opts = SamplingOptions { temperature: 0.0, max_new_tokens: 12, ..Default::default() };
        let alone = generate_ids(&model, &prompts, u32::MAX, &SamplingOptions { batch_size: 1, ..opts });
        assert_eq!(generate_ids(&model, &prompts, u32::MAX, &opts), alone, "{name}");
    }
}

#[test]
fn greedy_generation_equals_transformers_generate() {
    for (name, case) in greedy_fixture() {
        let model = Model::load(&data(case["model"].as_str().unwrap())).unwrap();
        let eos = case["eos_token_id"].as_u64().unwrap() as u32;
        let cases = case["cases"].as_array().unwrap();
        let prompts: Vec<Vec<u32>> = cases.iter().map(|c| ids(&c["prompt_ids"])).collect();
        let opts = SamplingOptions { temperature: 0.0, max_new_tokens: 24, ..Default::default() };
        let got = generate_ids(&model, &prompts, eos, &opts);
        for (c, g) in cases.iter().zip(&got) {
            let want = ids(&c["generated"]);
            // A step where the two implementations round a near-tie differently would end the comparison; check
            // that it is a genuine tie (logit gap below 1e-4) rather than a wrong token.
            let agree = g.iter().zip(&want).take_while(|(a, b)| a == b).count();
            if agree < want.len().max(g.len()) {
                let mut seq = c["prompt_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect::<Vec<_>>();
                seq.extend_from_slice(&want[..agree]);
                let logits = forward_logits(&model, &[seq.as_slice()]).remove(0);
                let vocab = model.spec.vocab_size;
                let last = &logits[(seq.len() - 1) * vocab..];
                let (a, b) = (g.get(agree).copied().unwrap_or(eos), want.get(agree).copied().unwrap_or(eos));
                let gap = (last[a as usize] - last[b as usize]).abs();
                panic!("{name} {:?}: diverged at token {agree} ({a} vs transformers' {b}, logit gap {gap}): {g:?} vs {want:?}", c["prompt"]);
            }
        }
    }
}

#[test]
fn sampling_is_reproducible_and_independent_of_the_batch() {
    let model = Model::load(&data("trl-tiny/policy")).unwrap();
    let prompts: Vec<Vec<u32>> = vec![vec![1, 447, 335, 81], vec![1, 5, 6], vec![1, 99, 98, 97, 96, 95]];
    let opts = SamplingOptions { temperature: 1.0, top_k: 20, top_p: 0.9, max_new_tokens: 16, seed: 3, ..Default::default() };
    let all = generate_ids(&model, &prompts, 2, &opts);
    assert_eq!(all, generate_ids(&model, &prompts, 2, &opts), "same seed, same samples");
    // The last prompt alone draws from the same stream only if its index is the same: generate it in place.
    let alone = generate_ids(&model, &prompts[..1], 2, &opts);
    assert_eq!(alone[0], all[0], "a prompt's sample does not depend on the prompts after it");
    let one_at_a_time = generate_ids(&model, &prompts, 2, &SamplingOptions { batch_size: 1, ..opts });
    assert_eq!(one_at_a_time, all, "each prompt alone (batch size 1) samples what it samples in the batch");
    let other = generate_ids(&model, &prompts, 2, &SamplingOptions { seed: 4, ..opts });
    assert_ne!(all, other, "another seed samples differently");
    assert!(all.iter().all(|g| g.len() <= 16 && !g.contains(&2)));
}

/// `kto bench --generate` times loading a folder and sampling from it, and reports every step it made.
#[test]
fn bench_generate_times_load_first_token_and_decoding() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kto"))
        .args(["bench", "--generate", "--batch", "3", "--prompt-len", "5", "--new-tokens", "4", "--model"])
        .arg(data("trl-tiny/policy"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(line["decode_steps"], 3, "{stdout}");
    assert_eq!(line["batch"], 3);
    for key in ["load_s", "first_token_s", "decode_tokens_per_s", "weights_read_gb_per_s", "copy_read_gb_per_s"] {
        assert!(line[key].as_f64().is_some_and(|v| v > 0.0 && v.is_finite()), "{key}: {stdout}");
    }
}
