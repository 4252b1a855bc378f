//! The engine's sequence log-probs against what TRL's own forward produced (fixture `expected_step0.json`).
use kto::engine::{forward, SeqBatch};
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
