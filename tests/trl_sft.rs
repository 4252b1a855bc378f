//! `kto sft` against TRL's SFTTrainer on the trl-tiny fixture (tests/data/sft, made by scripts/make_sft_fixture.py):
//! the same tokenized rows and the same logged metrics (loss, grad_norm, entropy, mean_token_accuracy, num_tokens)
//! at each step of an AdamW run with gradient accumulation.
mod common;
use common::{close, fixture_toml};
use kto::config::TrainConfig;
use kto::train::{Silent, Task, Trainer};
use serde_json::Value;

fn expected() -> Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/sft/expected_sft_adamw.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn sft_trainer(out: &std::path::Path) -> Trainer {
    let overrides: Vec<String> =
        ["optim=adamw_torch", "max_steps=4", "gradient_accumulation_steps=2", "learning_rate=1e-3"].iter().map(|s| s.to_string()).collect();
    let cfg = TrainConfig::from_toml(&fixture_toml(out), &overrides).unwrap();
    Trainer::new_for(Task::Sft, cfg, &Silent).unwrap()
}

#[test]
fn sft_tokenizes_like_trl() {
    let dir = tempfile::tempdir().unwrap();
    let t = sft_trainer(dir.path());
    let want = expected();
    let first = &want["first_row"];
    let ids: Vec<u32> = first["input_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    let row = &t.data.rows[0];
    let ours: Vec<u32> = row.prompt_ids.iter().chain(&row.completion_ids).copied().collect();
    assert_eq!(ours, ids);
    // TRL's labels mask the prompt with -100.
    let labels = first["labels"].as_array().unwrap();
    let masked = labels.iter().take_while(|v| v.as_i64() == Some(-100)).count();
    assert_eq!(masked, row.prompt_ids.len());
    // The row whose prompt alone fills max_length has no completion token left: TRL drops it, so do we.
    assert_eq!(t.data.rows.len(), 23);
}

#[test]
fn sft_run_matches_trl_logs() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = sft_trainer(dir.path());
    let summary = t.train(&Silent).unwrap();
    let want = expected();
    let want_steps: Vec<&Value> = want["log_history"].as_array().unwrap().iter().filter(|e| e.get("loss").is_some()).collect();
    let got_steps: Vec<_> = summary.log_history.iter().filter(|e| e.contains_key("loss")).collect();
    assert_eq!(got_steps.len(), 4);
    assert_eq!(want_steps.len(), 4);
    for (g, w) in got_steps.iter().zip(&want_steps) {
        let step = w["step"].as_u64().unwrap();
        let mut keys: Vec<&String> = g.keys().collect();
        keys.sort();
        let mut want_keys: Vec<&String> = w.as_object().unwrap().keys().collect();
        want_keys.sort();
        assert_eq!(keys, want_keys, "keys at step {step}");
        for key in ["loss", "grad_norm", "learning_rate", "entropy", "mean_token_accuracy", "num_tokens", "epoch"] {
            let (gv, wv) = (g[key].as_f64().unwrap(), w[key].as_f64().unwrap());
            assert!(close(gv, wv), "step {step} {key}: {gv} vs TRL {wv}");
        }
    }
    let train_loss = want["log_history"].as_array().unwrap().last().unwrap()["train_loss"].as_f64().unwrap();
    assert!(close(summary.train_loss, train_loss), "train_loss {} vs {}", summary.train_loss, train_loss);
}
