//! Whole training runs against the real TRL runs of the fixture: step-0 log-probs and metrics, logged metrics
//! of the SGD, AdamW, GA=2 and apo runs at every step, and the trained weights.
use kto::config::TrainConfig;
use kto::model::Model;
use kto::train::{Silent, Trainer};
use serde_json::{Map, Value};
use std::path::PathBuf;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/trl-tiny").join(name)
}

fn json(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(name)).unwrap()).unwrap()
}

/// The fixture's KTOConfig (README "Reference runs") plus `extra` overrides.
fn fixture_config(out: &std::path::Path, extra: &[&str]) -> TrainConfig {
    let toml = format!(
        r#"
model = "{policy}"
ref_model = "{reference}"
train_dataset = "{data}"
output_dir = "{out}"
beta = 0.1
desirable_weight = 1.0
undesirable_weight = 1.33
per_device_train_batch_size = 4
max_length = 64
learning_rate = 1e-3
lr_scheduler_type = "constant"
max_steps = 3
logging_steps = 1
seed = 0
bf16 = false
gradient_checkpointing = false
"#,
        policy = fixture("policy").display(),
        reference = fixture("reference").display(),
        data = fixture("kto.jsonl").display(),
        out = out.display()
    );
    let overrides: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    TrainConfig::from_toml(&toml, &overrides).unwrap()
}

fn close(got: f64, want: f64) -> bool {
    (got - want).abs() <= 1e-4 + 1e-3 * want.abs()
}

/// Every per-step entry of TRL's log_history has the same keys in ours, each value within tolerance.
fn assert_logs_match(got: &[Map<String, Value>], want: &[Value]) {
    let want_steps: Vec<&Map<String, Value>> =
        want.iter().map(|v| v.as_object().unwrap()).filter(|m| !m.contains_key("train_runtime")).collect();
    let got_steps: Vec<&Map<String, Value>> = got.iter().filter(|m| !m.contains_key("train_runtime")).collect();
    assert_eq!(got_steps.len(), want_steps.len(), "number of log entries");
    for (g, w) in got_steps.iter().zip(&want_steps) {
        let step = w["step"].as_u64().unwrap();
        let mut gk: Vec<&String> = g.keys().collect();
        let mut wk: Vec<&String> = w.keys().collect();
        gk.sort();
        wk.sort();
        assert_eq!(gk, wk, "keys at step {step}");
        for (k, wv) in w.iter() {
            let (gv, wv) = (g[k].as_f64().unwrap(), wv.as_f64().unwrap());
            assert!(close(gv, wv), "step {step} {k}: ours {gv} vs TRL {wv}");
        }
    }
}

fn run(name: &str, extra: &[&str]) -> (Trainer, Vec<Map<String, Value>>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = fixture_config(dir.path(), extra);
    let mut t = Trainer::new(cfg, &Silent).unwrap_or_else(|e| panic!("{name}: {e}"));
    let summary = t.train(&Silent).unwrap();
    (t, summary.log_history, dir)
}

/// ‖θ_ours − θ_trl‖ / ‖θ_trl − θ_0‖: our update's distance from TRL's, relative to TRL's update.
fn relative_update_error(ours: &Model, trl_dir: &str) -> f64 {
    let trl = Model::load(&fixture(trl_dir)).unwrap();
    let init = Model::load(&fixture("policy")).unwrap();
    let diff: f64 = ours.params.iter().zip(&trl.params).map(|(a, b)| ((a - b) as f64).powi(2)).sum::<f64>().sqrt();
    let update: f64 = trl.params.iter().zip(&init.params).map(|(a, b)| ((a - b) as f64).powi(2)).sum::<f64>().sqrt();
    diff / update
}

#[test]
fn step0_batches_match_trl() {
    let dir = tempfile::tempdir().unwrap();
    let t = Trainer::new(fixture_config(dir.path(), &["optim=sgd"]), &Silent).unwrap();
    let want = json("expected_step0.json");
    let mut num_tokens = 0;
    for (rows, wb) in t.epoch_batches().iter().zip(want["batches"].as_array().unwrap()) {
        let rec = t.micro_batch(&t.collate(rows), num_tokens, None);
        num_tokens += rec.num_tokens;
        let expect = |key: &str| -> Vec<f64> { wb[key].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect() };
        for (got, key) in [
            (&rec.policy_logps, "policy_logps"),
            (&rec.reference_logps, "reference_logps"),
            (&rec.policy_kl_logps, "policy_KL_logps"),
            (&rec.reference_kl_logps, "reference_KL_logps"),
        ] {
            for (g, w) in got.iter().zip(expect(key)) {
                assert!((g - w).abs() < 1e-4, "batch {rows:?} {key}: {g} vs {w}");
            }
        }
        assert!(close(rec.loss, wb["loss"].as_f64().unwrap()), "loss {} vs {}", rec.loss, wb["loss"]);
        let wm = wb["metrics"].as_object().unwrap();
        assert_eq!(rec.metrics.len(), wm.len(), "metric keys of batch {rows:?}");
        for (k, v) in &rec.metrics {
            let w = wm[*k].as_f64().unwrap();
            assert!(close(*v, w), "batch {rows:?} {k}: {v} vs {w}");
        }
    }
}

#[test]
fn sgd_run_matches_trl_metrics_and_weights() {
    let (t, logs, _dir) = run("sgd", &["optim=sgd"]);
    assert_logs_match(&logs, json("expected_trl_sgd.json")["log_history"].as_array().unwrap());
    let err = relative_update_error(&t.policy, "trained_sgd");
    eprintln!("SGD relative update error {err:.2e}");
    assert!(err < 0.01, "SGD weights: relative update error {err}");
}

#[test]
fn adamw_run_matches_trl_metrics_and_weights() {
    let (t, logs, _dir) = run("adamw", &["optim=adamw_torch"]);
    assert_logs_match(&logs, json("expected_trl_adamw.json")["log_history"].as_array().unwrap());
    let err = relative_update_error(&t.policy, "trained_adamw");
    eprintln!("AdamW relative update error {err:.2e}");
    assert!(err < 0.01, "AdamW weights: relative update error {err}");
}

#[test]
fn gradient_accumulation_run_matches_trl() {
    let (_, logs, _dir) = run("ga2", &["optim=sgd", "gradient_accumulation_steps=2", "max_steps=2"]);
    assert_logs_match(&logs, json("expected_trl_sgd_ga2.json")["log_history"].as_array().unwrap());
}

#[test]
fn apo_zero_unpaired_run_matches_trl() {
    let (_, logs, _dir) = run("apo", &["optim=sgd", "loss_type=apo_zero_unpaired"]);
    assert_logs_match(&logs, json("expected_trl_sgd_apo.json")["log_history"].as_array().unwrap());
}
