//! Whole training runs against the real TRL runs of the fixture: step-0 log-probs and metrics, logged metrics
//! of the SGD, AdamW, GA=2 and apo runs at every step, and the trained weights.
use kto::config::TrainConfig;
use kto::model::Model;
use kto::train::{Silent, Trainer};
use serde_json::{Map, Value};
mod common;
use common::{assert_logs_match, assert_same_logs, close, fixture, fixture_toml, json};

/// The fixture's KTOConfig plus `extra` overrides.
fn fixture_config(out: &std::path::Path, extra: &[&str]) -> TrainConfig {
    let overrides: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    TrainConfig::from_toml(&fixture_toml(out), &overrides).unwrap()
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
    let diff: f64 = ours.params.to_host().iter().zip(trl.params.to_host().iter()).map(|(a, b)| ((a - b) as f64).powi(2)).sum::<f64>().sqrt();
    let update: f64 = trl.params.to_host().iter().zip(init.params.to_host().iter()).map(|(a, b)| ((a - b) as f64).powi(2)).sum::<f64>().sqrt();
    diff / update
}

#[test]
fn step0_batches_match_trl() {
    let dir = tempfile::tempdir().unwrap();
    let t = Trainer::new(fixture_config(dir.path(), &["optim=sgd"]), &Silent).unwrap();
    let want = json("expected_step0.json");
    let mut num_tokens = 0;
    for (rows, wb) in t.epoch_batches().iter().zip(want["batches"].as_array().unwrap()) {
        let rec = t.micro_batch(&t.collate(rows), num_tokens, None, &mut Default::default());
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

#[test]
fn precomputed_reference_gives_the_same_run_and_is_cached() {
    let (t, logs, dir) = run("precompute", &["optim=sgd", "precompute_ref_log_probs=true", "precompute_ref_batch_size=5"]);
    assert!(t.reference.is_none(), "the reference model is released after precomputing");
    assert_logs_match(&logs, json("expected_trl_sgd.json")["log_history"].as_array().unwrap());
    let cached: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("ref_logps-"))
        .collect();
    assert_eq!(cached.len(), 1, "one cache file");
    // A second run over the same output folder reuses the cache: corrupting its values must show in the loss,
    // which proves the values are read rather than recomputed.
    let path = cached[0].path();
    let mut values: Vec<(f64, f64)> = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    values.iter_mut().for_each(|v| v.0 -= 10.0);
    std::fs::write(&path, serde_json::to_string(&values).unwrap()).unwrap();
    // The first trainer releases the folder; the second replaces its run, and keeps the cache (keyed by content).
    drop(t);
    let cfg = fixture_config(dir.path(), &["optim=sgd", "precompute_ref_log_probs=true", "max_steps=1", "overwrite_output_dir=true"]);
    let mut again = Trainer::new(cfg, &Silent).unwrap();
    let logs2 = again.train(&Silent).unwrap().log_history;
    let first = json("expected_trl_sgd.json")["log_history"][0]["rewards/chosen"].as_f64().unwrap();
    let got = logs2[0]["rewards/chosen"].as_f64().unwrap();
    assert!((got - (first + 1.0)).abs() < 1e-3, "cached reference values were not used: {got} vs {first} + 1");
}

#[test]
fn gradient_checkpointing_changes_no_number() {
    let (plain, logs_plain, _d1) = run("plain", &["optim=adamw_torch", "gradient_checkpointing=false"]);
    let (ckpt, logs_ckpt, _d2) = run("checkpointed", &["optim=adamw_torch", "gradient_checkpointing=true"]);
    assert_eq!(plain.policy.params, ckpt.policy.params, "weights after 3 AdamW steps");
    assert_same_logs(&logs_plain, &logs_ckpt);
}

/// A reference whose weights are all bf16 values is held in bf16 (half its memory) and gives the run it gives
/// held in f32, bit for bit: every product widens it exactly.
#[test]
fn a_reference_held_in_bf16_changes_no_number() {
    let train = |frozen: bool| {
        let dir = tempfile::tempdir().unwrap();
        let mut t = Trainer::new(fixture_config(dir.path(), &["optim=adamw_torch"]), &Silent).unwrap();
        let r = t.reference.take().expect("a reference model");
        let truncated: Vec<f32> = r.params.to_host().iter().map(|v| f32::from_bits(v.to_bits() & 0xFFFF_0000)).collect();
        let f32_copy = Model { params: kto::engine::Buffer::from_host(truncated), ..r };
        let reference = if frozen { f32_copy.frozen() } else { f32_copy };
        let bytes = reference.params.bytes();
        t.reference = Some(reference);
        let logs = t.train(&Silent).unwrap().log_history;
        (t.policy.params, logs, bytes)
    };
    let (f32_weights, f32_logs, f32_bytes) = train(false);
    let (bf16_weights, bf16_logs, bf16_bytes) = train(true);
    assert_eq!(bf16_bytes * 2, f32_bytes, "the frozen copy is held in bf16");
    assert_eq!(f32_weights, bf16_weights, "weights after 3 AdamW steps");
    assert_same_logs(&f32_logs, &bf16_logs);
}

#[test]
fn evaluation_logs_eval_metrics_and_precomputed_eval_reference_agrees() {
    let data = fixture("kto.jsonl").display().to_string();
    let eval_keys = [
        "optim=sgd".to_string(),
        "max_steps=2".to_string(),
        "eval_strategy=\"steps\"".to_string(),
        "eval_steps=1".to_string(),
        "per_device_eval_batch_size=4".to_string(),
        format!("eval_dataset={data:?}"),
    ];
    let extra: Vec<&str> = eval_keys.iter().map(|s| s.as_str()).collect();
    let (t, logs, _dir) = run("eval", &extra);
    let evals: Vec<_> = logs.iter().filter(|e| e.contains_key("eval_loss")).collect();
    assert_eq!(evals.len(), 2, "one evaluation per step");
    let e = evals[1];
    for k in ["eval_kl", "eval_entropy", "eval_rewards/chosen", "eval_rewards/margins", "eval_logps/rejected", "eval_runtime"] {
        assert!(e.contains_key(k), "{k} missing from {e:?}");
    }
    // TRL logs the training tokens seen so far under eval_num_tokens (tests/trl_eval.rs checks it against TRL).
    let train_tokens = logs.iter().rev().find_map(|m| m.get("num_tokens")).unwrap();
    assert_eq!(e["eval_num_tokens"].as_f64(), train_tokens.as_f64(), "eval_num_tokens is the training count");
    // The eval set equals the training set here, in the same batches (the last one short: 23 rows): eval_loss is
    // the micro-batch losses under the final weights, each counted once per row, as transformers' loop takes it.
    let (mut weighted, mut rows_seen) = (0.0, 0);
    for rows in t.epoch_batches() {
        weighted += t.micro_batch(&t.collate_eval(&rows), 0, None, &mut Default::default()).loss * rows.len() as f64;
        rows_seen += rows.len();
    }
    let mean = weighted / rows_seen as f64;
    assert!((e["eval_loss"].as_f64().unwrap() - mean).abs() < 1e-12, "{} vs {mean}", e["eval_loss"]);

    // With precomputed reference log-probs the eval set gets its own cache and the same numbers.
    let mut with_pre = extra.clone();
    with_pre.push("precompute_ref_log_probs=true");
    let (_, logs_pre, dir) = run("eval-precomputed", &with_pre);
    let pre: Vec<_> = logs_pre.iter().filter(|e| e.contains_key("eval_loss")).collect();
    for (a, b) in evals.iter().zip(&pre) {
        for (k, v) in a.iter().filter(|(k, _)| !k.contains("runtime") && !k.contains("per_second")) {
            let (x, y) = (v.as_f64().unwrap(), b[k].as_f64().unwrap());
            assert!((x - y).abs() <= 1e-9 * x.abs().max(1.0), "{k}: {x} vs {y}");
        }
    }
    assert!(std::fs::read_dir(dir.path()).unwrap().any(|e| e.unwrap().file_name().to_string_lossy().starts_with("eval_ref_logps-")));
}

#[test]
fn tensorboard_event_file_has_valid_records_with_the_logged_scalars() {
    let (_, logs, dir) = run("tensorboard", &["optim=sgd", "report_to=\"tensorboard\""]);
    let events: Vec<_> = std::fs::read_dir(dir.path().join("runs")).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(events.len(), 1);
    let bytes = std::fs::read(&events[0]).unwrap();
    let (mut pos, mut records) = (0, Vec::new());
    while pos < bytes.len() {
        let len_bytes = &bytes[pos..pos + 8];
        let len = u64::from_le_bytes(len_bytes.try_into().unwrap()) as usize;
        let crc = u32::from_le_bytes(bytes[pos + 8..pos + 12].try_into().unwrap());
        assert_eq!(crc, kto::tensorboard::masked_crc(len_bytes), "length CRC");
        let data = &bytes[pos + 12..pos + 12 + len];
        let dcrc = u32::from_le_bytes(bytes[pos + 12 + len..pos + 16 + len].try_into().unwrap());
        assert_eq!(dcrc, kto::tensorboard::masked_crc(data), "data CRC");
        records.push(data.to_vec());
        pos += 16 + len;
    }
    // The version record, then one per metrics.jsonl line (3 steps and the summary).
    assert_eq!(records.len(), 1 + logs.len());
    assert!(records[0].windows(13).any(|w| w == b"brain.Event:2"));
    let loss = logs[0]["loss"].as_f64().unwrap() as f32;
    let needle: Vec<u8> = [b"train/loss".as_slice(), &[0x15], &loss.to_le_bytes()].concat();
    assert!(records[1].windows(needle.len()).any(|w| w == needle.as_slice()), "step 1's loss as a scalar");
}
