//! Each supported family against transformers itself (tests/data/arch, made by scripts/make_arch_fixtures.py):
//! logits and sequence log-probs on fixed inputs, PyTorch's gradient, and a 2-step real TRL run on
//! conversational data rendered with the family's own chat template.
mod common;
use common::assert_logs_match;
use kto::config::TrainConfig;
use kto::engine::{backward, forward, forward_logits, SeqBatch};
use kto::model::Model;
use kto::train::{Silent, Trainer};
use serde_json::Value;
use std::path::PathBuf;

const FAMILIES: &[&str] = &["qwen2", "qwen3", "mistral", "llama3"];

fn arch(family: &str, name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/arch").join(family).join(name)
}

fn expected(family: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(arch(family, "expected.json")).unwrap()).unwrap()
}

fn sequences(e: &Value) -> Vec<(Vec<u32>, Vec<bool>)> {
    let lens: Vec<usize> = e["prompt_lengths"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
    e["sequences"]
        .as_array()
        .unwrap()
        .iter()
        .zip(lens)
        .map(|(s, p)| {
            let ids: Vec<u32> = s.as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
            let mask = (0..ids.len()).map(|i| i >= p).collect();
            (ids, mask)
        })
        .collect()
}

#[test]
fn logits_and_sequence_logps_match_transformers() {
    for family in FAMILIES {
        let model = Model::load(&arch(family, "policy")).unwrap();
        let e = expected(family);
        let seqs = sequences(&e);
        let ids: Vec<&[u32]> = seqs.iter().map(|(i, _)| i.as_slice()).collect();
        let logits = forward_logits(&model, &ids);
        let mut worst = 0f64;
        for (got, want) in logits.iter().zip(e["logits"].as_array().unwrap()) {
            let want: Vec<f64> = want.as_array().unwrap().iter().flat_map(|row| row.as_array().unwrap().iter().map(|v| v.as_f64().unwrap())).collect();
            assert_eq!(got.len(), want.len(), "{family}: logits shape");
            for (g, w) in got.iter().zip(&want) {
                worst = worst.max((*g as f64 - w).abs());
            }
        }
        eprintln!("{family}: max |Δ logit| = {worst:.1e}");
        assert!(worst < 1e-4, "{family}: max |Δ logit| = {worst:e}");
        let refs: Vec<(&[u32], &[bool])> = seqs.iter().map(|(i, m)| (i.as_slice(), m.as_slice())).collect();
        let (out, _) = forward(&model, &SeqBatch::new(&refs), false);
        for (g, w) in out.seq_logps.iter().zip(e["sequence_logps"].as_array().unwrap()) {
            let w = w.as_f64().unwrap();
            assert!((g - w).abs() < 1e-4, "{family}: sequence logp {g} vs transformers {w}");
        }
    }
}

#[test]
fn gradients_match_pytorch_within_one_percent_per_tensor() {
    for family in FAMILIES {
        let model = Model::load(&arch(family, "policy")).unwrap();
        let e = expected(family);
        let seqs = sequences(&e);
        let refs: Vec<(&[u32], &[bool])> = seqs.iter().map(|(i, m)| (i.as_slice(), m.as_slice())).collect();
        let batch = SeqBatch::new(&refs);
        let coef: Vec<f32> = e["coefficients"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
        let (_, tape) = forward(&model, &batch, true);
        let mut buffer = kto::engine::Buffer::zeros(model.layout.total);
        backward(&model, &batch, tape.unwrap(), &coef, &mut buffer);
        let grads = buffer.to_host();
        let bytes = std::fs::read(arch(family, "grads.safetensors")).unwrap();
        let torch = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        for t in &model.layout.tensors {
            let view = torch.tensor(&t.name).unwrap_or_else(|_| panic!("{family}: no gradient for {}", t.name));
            let want: Vec<f32> = view.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
            let got = &grads[t.range()];
            let diff: f64 = got.iter().zip(&want).map(|(a, b)| ((a - b) as f64).powi(2)).sum::<f64>().sqrt();
            let norm: f64 = want.iter().map(|b| (*b as f64).powi(2)).sum::<f64>().sqrt();
            assert!(norm > 0.0, "{family} {}: zero reference gradient", t.name);
            assert!(diff <= 0.01 * norm, "{family} {}: relative gradient error {:.2e}", t.name, diff / norm);
        }
    }
}

#[test]
fn kto_runs_on_conversational_data_match_trl_for_every_family() {
    for family in FAMILIES {
        let e = expected(family);
        let dir = tempfile::tempdir().unwrap();
        let toml = format!(
            "model = {:?}\nref_model = {:?}\ntrain_dataset = {:?}\noutput_dir = {:?}\nper_device_train_batch_size = 4\nmax_length = 128\nlearning_rate = 1e-2\noptim = \"sgd\"\nlr_scheduler_type = \"constant\"\nmax_steps = 2\nlogging_steps = 1\nbeta = 0.1\nundesirable_weight = 1.33\n",
            arch(family, "policy").display().to_string(),
            arch(family, "reference").display().to_string(),
            arch(family, "conversational.jsonl").display().to_string(),
            dir.path().join("out").display().to_string(),
        );
        let mut t = Trainer::new(TrainConfig::from_toml(&toml, &[]).unwrap(), &Silent).unwrap();
        for (row, want) in t.data.rows.iter().zip(e["trl_prepared_rows"].as_array().unwrap()) {
            let ids = |k: &str| -> Vec<u32> { want[k].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect() };
            assert_eq!(row.prompt_ids, ids("prompt_ids"), "{family}: prompt ids");
            assert_eq!(row.completion_ids, ids("completion_ids"), "{family}: completion ids");
            assert_eq!(row.kl_completion_ids, ids("KL_completion_ids"), "{family}: KL ids");
        }
        let logs = t.train(&Silent).unwrap().log_history;
        assert_logs_match(&logs, e["trl_log_history"].as_array().unwrap());
        // The trained folder loads back with the same family and the same weights.
        let saved = Model::load(&dir.path().join("out")).unwrap();
        assert_eq!(saved.spec, t.policy.spec, "{family}: spec after save");
        assert_eq!(saved.params, t.policy.params, "{family}: weights after save");
    }
}
