//! The `kto` binary end to end: fixture runs through the command line match TRL's log_history, the saved
//! model reloads, and bad input gives one line naming the culprit and a non-zero exit, never a panic.
mod common;
use common::{assert_logs_match, assert_one_line_error, fixture, fixture_toml, json, kto};
use serde_json::{Map, Value};
use std::path::Path;

fn read_metrics(dir: &Path) -> Vec<Map<String, Value>> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn fixture_runs_through_the_command_line_match_trl() {
    for (optim, extra, expected) in [
        ("sgd", vec![], "expected_trl_sgd.json"),
        ("adamw_torch", vec![], "expected_trl_adamw.json"),
        ("sgd", vec!["--set", "gradient_accumulation_steps=2", "--set", "max_steps=2"], "expected_trl_sgd_ga2.json"),
        ("sgd", vec!["--set", "loss_type=\"apo_zero_unpaired\""], "expected_trl_sgd_apo.json"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("run.toml");
        std::fs::write(&cfg, fixture_toml(&dir.path().join("out"))).unwrap();
        let opt = format!("optim={optim}");
        let mut args = vec!["train", cfg.to_str().unwrap(), "--set", &opt];
        args.extend(extra.iter().copied());
        let (ok, stderr) = kto(&args);
        assert!(ok, "{expected}: {stderr}");
        let logs = read_metrics(&dir.path().join("out"));
        assert_logs_match(&logs, json(expected)["log_history"].as_array().unwrap());
        assert!(logs.last().unwrap().contains_key("train_loss"), "summary line at the end");
        // The saved folder loads again and carries the files transformers needs.
        let saved = kto::model::Model::load(&dir.path().join("out")).unwrap();
        assert_eq!(saved.num_parameters(), 158_016);
        for f in ["config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"] {
            assert!(dir.path().join("out").join(f).is_file(), "{f} missing");
        }
    }
}

/// Writes a config whose data set is `data` (a file's content) and runs `kto train` on it.
fn train_on_data(data: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let data_path = dir.path().join("bad.jsonl");
    std::fs::write(&data_path, data).unwrap();
    let cfg = dir.path().join("run.toml");
    std::fs::write(&cfg, fixture_toml(&dir.path().join("out"))).unwrap();
    let set = format!("train_dataset=\"{}\"", data_path.display());
    let r = kto(&["train", cfg.to_str().unwrap(), "--set", &set]);
    assert!(!dir.path().join("out/model.safetensors").exists(), "no model may be written on bad input");
    r
}

const GOOD: &str = "{\"prompt\": \"Hi\", \"completion\": \" there\", \"label\": true}\n";

#[test]
fn malformed_json_names_file_and_line() {
    assert_one_line_error(train_on_data(&format!("{GOOD}{GOOD}{{\"prompt\": \"x\",\n")), &["bad.jsonl", "row 3", "invalid JSON"]);
}

#[test]
fn missing_column_is_named() {
    assert_one_line_error(train_on_data(&format!("{GOOD}{{\"prompt\": \"x\", \"label\": false}}\n")), &["row 2", "\"completion\""]);
}

#[test]
fn non_boolean_label_is_refused() {
    assert_one_line_error(
        train_on_data(&format!("{GOOD}{{\"prompt\": \"x\", \"completion\": \"y\", \"label\": \"yes\"}}\n")),
        &["row 2", "label"],
    );
}

#[test]
fn empty_completion_is_refused() {
    assert_one_line_error(
        train_on_data(&format!("{GOOD}{{\"prompt\": \"x\", \"completion\": \"\", \"label\": true}}\n")),
        &["row 2", "empty"],
    );
}

#[test]
fn model_folder_without_weights_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("empty_model");
    std::fs::create_dir(&model).unwrap();
    std::fs::copy(fixture("policy/config.json"), model.join("config.json")).unwrap();
    let cfg = dir.path().join("run.toml");
    std::fs::write(&cfg, fixture_toml(&dir.path().join("out"))).unwrap();
    let set = format!("model=\"{}\"", model.display());
    let tok = format!("tokenizer=\"{}\"", fixture("tokenizer").display());
    assert_one_line_error(kto(&["train", cfg.to_str().unwrap(), "--set", &set, "--set", &tok]), &["empty_model", "model.safetensors"]);
}

#[test]
fn unknown_config_key_and_missing_file_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("run.toml");
    std::fs::write(&cfg, fixture_toml(&dir.path().join("out")) + "learning_rat = 1.0\n").unwrap();
    // The line lists the keys that are accepted, so a user sees at once what a pasted TRL recipe lacks.
    assert_one_line_error(
        kto(&["train", cfg.to_str().unwrap()]),
        &["run.toml", "learning_rat", "expected one of", "learning_rate", "lr_scheduler_kwargs", "load_best_model_at_end"],
    );
    assert_one_line_error(kto(&["train", "/nonexistent/run.toml"]), &["/nonexistent/run.toml"]);
    std::fs::write(&cfg, fixture_toml(&dir.path().join("out"))).unwrap();
    assert_one_line_error(
        kto(&["train", cfg.to_str().unwrap(), "--set", "train_dataset=\"/nonexistent/data.jsonl\""]),
        &["/nonexistent/data.jsonl"],
    );
}
