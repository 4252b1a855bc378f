//! Trainer options against real TRL 1.16 (tests/data/options, made by scripts/make_option_fixtures.py) on the
//! trl-tiny fixture: every learning-rate schedule with its `lr_scheduler_kwargs`, `logging_first_step` (5 steps
//! logged every 2: the summary then carries step 5's metrics, as TRL's does), `max_grad_norm = 0`, the last
//! step's evaluation under `eval_strategy = "steps"`, and `logging_strategy` / `eval_strategy` = `"epoch"` over
//! two whole epochs and over one cut short by `max_steps`.
mod common;
use common::{assert_history_matches, fixture};
use kto::config::TrainConfig;
use kto::train::{Silent, Trainer};
use serde_json::Value;

#[test]
fn options_match_trl_runs() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/options/expected.json");
    let runs: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    assert_eq!(runs.as_object().unwrap().len(), 12, "the fixture's option sets");
    for (name, run) in runs.as_object().unwrap() {
        let out = tempfile::tempdir().unwrap();
        let mut toml = format!(
            "model = {:?}\nref_model = {:?}\ntokenizer = {:?}\ntrain_dataset = {:?}\noutput_dir = {:?}\nsave_strategy = \"no\"\n",
            fixture("policy").display().to_string(),
            fixture("reference").display().to_string(),
            fixture("tokenizer").display().to_string(),
            fixture("kto.jsonl").display().to_string(),
            out.path().join("run").display().to_string()
        );
        if run["eval"] == true {
            toml += &format!("eval_dataset = {:?}\n", fixture("kto.jsonl").display().to_string());
        }
        for (key, value) in run["hyperparameters"].as_object().unwrap() {
            // A JSON object is written as a TOML inline table.
            let value = match value {
                Value::Object(m) => format!("{{ {} }}", m.iter().map(|(k, v)| format!("{k} = {v}")).collect::<Vec<_>>().join(", ")),
                v => v.to_string(),
            };
            toml += &format!("{key} = {value}\n");
        }
        let cfg = TrainConfig::from_toml(&toml, &[]).unwrap_or_else(|e| panic!("{name}: {e}"));
        let got = Trainer::new(cfg, &Silent).unwrap().train(&Silent).unwrap().log_history;
        assert_history_matches(&got, run["log_history"].as_array().unwrap(), name);
    }
}

#[test]
fn schedule_kwargs_are_checked_and_also_read_from_a_json_string() {
    let base = format!(
        "model = {:?}\ntrain_dataset = {:?}\n",
        fixture("policy").display().to_string(),
        fixture("kto.jsonl").display().to_string()
    );
    let load = |extra: &str| TrainConfig::from_toml(&format!("{base}{extra}"), &[]).map(|c| c.lr_scheduler_kwargs);
    let from_json = load("lr_scheduler_type = \"cosine\"\nlr_scheduler_kwargs = '{\"num_cycles\": 2}'\n").unwrap();
    assert_eq!(from_json.num_cycles, Some(2.0));
    let refused = [
        ("lr_scheduler_type = \"linear\"\nlr_scheduler_kwargs = { num_cycles = 2 }\n", "num_cycles"),
        ("lr_scheduler_type = \"cosine_with_min_lr\"\n", "min_lr"),
        ("lr_scheduler_type = \"polynomial\"\nlearning_rate = 1e-8\n", "lr_end"),
        ("lr_scheduler_type = \"warmup_stable_decay\"\n", "num_decay_steps"),
        ("lr_scheduler_kwargs = { nonsense = 1 }\n", "nonsense"),
    ];
    for (extra, named) in refused {
        let err = load(extra).expect_err(extra).to_string();
        assert!(err.contains(named) && !err.contains('\n'), "{extra}: {err}");
    }
}

/// `save_strategy = "epoch"` checkpoints at the end of each epoch (transformers' `on_epoch_end`), the one cut short
/// by `max_steps` included: 23 rows in batches of 4 make 6 steps an epoch.
#[test]
fn epoch_saving_checkpoints_at_each_epoch_end() {
    let out = tempfile::tempdir().unwrap();
    let toml = format!(
        "model = {:?}\ntrain_dataset = {:?}\noutput_dir = {:?}\noptim = \"sgd\"\nper_device_train_batch_size = 4\nmax_length = 64\nmax_steps = 8\nsave_strategy = \"epoch\"\nlogging_steps = 1\n",
        fixture("policy").display().to_string(),
        fixture("kto.jsonl").display().to_string(),
        out.path().join("run").display().to_string()
    );
    Trainer::new(TrainConfig::from_toml(&toml, &[]).unwrap(), &Silent).unwrap().train(&Silent).unwrap();
    let mut saved: Vec<String> = std::fs::read_dir(out.path().join("run"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("checkpoint-"))
        .collect();
    saved.sort();
    assert_eq!(saved, ["checkpoint-6", "checkpoint-8"]);
}

/// `save_only_model = true`: checkpoints hold the model but no optimizer state, and resuming an AdamW run from one
/// is refused in one line that says why and what to do instead.
#[test]
fn save_only_model_checkpoints_cannot_continue_adamw() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("run.toml");
    std::fs::write(&cfg, common::fixture_toml(&dir.path().join("out"))).unwrap();
    let cfg = cfg.to_str().unwrap();
    let run = |extra: &[&str]| {
        let mut args = vec!["train", cfg, "--set", "optim=adamw_torch", "--set", "save_steps=1", "--set", "save_only_model=true"];
        args.extend_from_slice(extra);
        common::kto(&args)
    };
    let (ok, stderr) = run(&["--set", "max_steps=2"]);
    assert!(ok, "{stderr}");
    let checkpoint = dir.path().join("out/checkpoint-2");
    assert!(checkpoint.join("model.safetensors").is_file() && checkpoint.join("trainer_state.json").is_file());
    assert!(!checkpoint.join("optimizer.safetensors").exists(), "save_only_model wrote the optimizer state");
    let resumed = run(&["--set", "max_steps=3", "--set", "resume_from_checkpoint=true"]);
    common::assert_one_line_error(resumed, &["checkpoint-2", "save_only_model", "no optimizer state"]);
    // SGD keeps no state: such checkpoints resume.
    let (ok, stderr) = run(&["--set", "optim=sgd", "--set", "overwrite_output_dir=true", "--set", "max_steps=2"]);
    assert!(ok, "{stderr}");
    let again = ["--set", "optim=sgd", "--set", "max_steps=3", "--set", "resume_from_checkpoint=true"];
    let (ok, stderr) = run(&again);
    assert!(ok && stderr.contains("resuming from"), "{stderr}");
}
