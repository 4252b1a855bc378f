//! The engine's sequence log-probs against what TRL's own forward produced (fixture `expected_step0.json`).
use kto::engine::{forward, Pass, SeqBatch};
use kto::model::Model;
use serde_json::Value;
use std::path::PathBuf;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/trl-tiny").join(name)
}

fn ids(v: &Value) -> Vec<Vec<u32>> {
    v.as_array().unwrap().iter().map(|r| r.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()).collect()
}

/// Strips right padding (attention_mask 0) and returns (ids, completion mask) per row.
fn unpadded(batch: &Value, prefix: &str) -> Vec<(Vec<u32>, Vec<bool>)> {
    let input = ids(&batch[format!("{prefix}input_ids")]);
    let attn = ids(&batch[format!("{prefix}attention_mask")]);
    let cmask = ids(&batch[format!("{prefix}completion_mask")]);
    input
        .iter()
        .zip(&attn)
        .zip(&cmask)
        .map(|((i, a), c)| {
            let len = a.iter().filter(|&&x| x == 1).count();
            (i[..len].to_vec(), c[..len].iter().map(|&x| x == 1).collect())
        })
        .collect()
}

#[test]
fn step0_sequence_logps_match_trl_within_1e4() {
    let policy = Model::load(&fixture("policy")).unwrap();
    let reference = Model::load(&fixture("reference")).unwrap();
    let expected: Value = serde_json::from_str(&std::fs::read_to_string(fixture("expected_step0.json")).unwrap()).unwrap();
    let mut worst = 0f64;
    for batch in expected["batches"].as_array().unwrap() {
        for (prefix, key_suffix) in [("", "logps"), ("KL_", "KL_logps")] {
            let seqs = unpadded(batch, prefix);
            let refs: Vec<(&[u32], &[bool])> = seqs.iter().map(|(i, m)| (i.as_slice(), m.as_slice())).collect();
            let packed = SeqBatch::new(&refs);
            for (model, name) in [(&policy, "policy"), (&reference, "reference")] {
                let (out, _) = forward(model, &packed, false);
                let want: Vec<f64> =
                    batch[format!("{name}_{key_suffix}")].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
                for (g, w) in out.seq_logps.iter().zip(&want) {
                    worst = worst.max((g - w).abs());
                    assert!((g - w).abs() < 1e-4, "{name}_{key_suffix}: {g} vs {w}");
                }
            }
        }
    }
    eprintln!("worst |Δ logp| = {worst:.2e}");
}

#[test]
fn continuing_the_shared_prompt_equals_a_full_forward_of_the_kl_sequences() {
    use kto::engine::{forward_continuation, forward_with_cache, ContinuationBatch};
    let policy = Model::load(&fixture("policy")).unwrap();
    let expected: Value = serde_json::from_str(&std::fs::read_to_string(fixture("expected_step0.json")).unwrap()).unwrap();
    for batch in expected["batches"].as_array().unwrap() {
        let main = unpadded(batch, "");
        let kl = unpadded(batch, "KL_");
        let main_refs: Vec<(&[u32], &[bool])> = main.iter().map(|(i, m)| (i.as_slice(), m.as_slice())).collect();
        let (_, _, cache) = forward_with_cache(&policy, &SeqBatch::new(&main_refs), Pass { keep_cache: true, ..Pass::INFERENCE });
        let cache = cache.unwrap();
        // The shared prefix is the prompt: the tokens before the first completion token. Also try shorter
        // prefixes (0 and 1 tokens) to exercise the general path.
        for shorten in [None, Some(0), Some(1)] {
            let conts: Vec<(usize, usize, &[u32], &[bool])> = kl
                .iter()
                .enumerate()
                .map(|(s, (ids, mask))| {
                    let prompt = mask.iter().position(|&c| c).unwrap();
                    (s, shorten.unwrap_or(prompt).min(prompt), ids.as_slice(), mask.as_slice())
                })
                .collect();
            let got = forward_continuation(&policy, &ContinuationBatch::new(&cache, &conts), &cache, true);
            let kl_refs: Vec<(&[u32], &[bool])> = kl.iter().map(|(i, m)| (i.as_slice(), m.as_slice())).collect();
            let (full, _) = forward(&policy, &SeqBatch::new(&kl_refs), false);
            for (g, w) in got.seq_logps.iter().zip(&full.seq_logps) {
                assert!((g - w).abs() < 1e-4, "prefix {shorten:?}: continuation {g} vs full {w}");
            }
            let trl: Vec<f64> = batch["policy_KL_logps"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
            for (g, w) in got.seq_logps.iter().zip(&trl) {
                assert!((g - w).abs() < 1e-4, "continuation {g} vs TRL {w}");
            }
        }
    }
}
