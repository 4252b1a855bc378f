//! Trainer options against real TRL 1.16 (tests/data/options, made by scripts/make_option_fixtures.py) on the
//! trl-tiny fixture: every learning-rate schedule with its `lr_scheduler_kwargs`, `logging_first_step` (5 steps
//! logged every 2: the summary then carries step 5's metrics, as TRL's does), `max_grad_norm = 0`, the last
//! step's evaluation under `eval_strategy = "steps"`, and `logging_strategy` / `eval_strategy` = `"epoch"` over
//! two whole epochs and over one cut short by `max_steps`; `load_best_model_at_end` with rotation
//! (`save_total_limit`).
mod common;
use common::{assert_history_matches, fixture};
use kto::config::TrainConfig;
use kto::train::{Silent, Trainer};
use serde_json::Value;

#[test]
fn options_match_trl_runs() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/options/expected.json");
    let runs: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    assert_eq!(runs.as_object().unwrap().len(), 13, "the fixture's option sets");
    for (name, run) in runs.as_object().unwrap() {
        let out = tempfile::tempdir().unwrap();
        let mut toml = format!(
            "model = {:?}\nref_model = {:?}\ntokenizer = {:?}\ntrain_dataset = {:?}\noutput_dir = {:?}\n",
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
        if let Some(best) = run.get("best") {
            // load_best_model_at_end: TRL's best step's checkpoint survives the rotation and is the final model.
            let run_dir = out.path().join("run");
            let mut kept: Vec<String> = std::fs::read_dir(&run_dir)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("checkpoint-"))
                .collect();
            kept.sort();
            let want: Vec<&str> = best["checkpoints"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
            assert_eq!(kept, want, "{name}: checkpoints kept");
            let best_dir = run_dir.join(format!("checkpoint-{}", best["step"]));
            let weights = |d: &std::path::Path| kto::model::Model::load(d).unwrap().params.to_host().into_owned();
            assert!(weights(&run_dir) == weights(&best_dir), "{name}: the final model is not the best checkpoint's");
            assert!(weights(&run_dir) != weights(&run_dir.join("checkpoint-5")), "{name}: the last step is not the best here");
        }
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

/// `load_best_model_at_end` needs evaluation and saving on one schedule, and a metric the evaluation logs.
#[test]
fn load_best_model_at_end_is_checked() {
    let base = format!(
        "model = {:?}\ntrain_dataset = {:?}\neval_dataset = {:?}\nload_best_model_at_end = true\n",
        fixture("policy").display().to_string(),
        fixture("kto.jsonl").display().to_string(),
        fixture("kto.jsonl").display().to_string()
    );
    let load = |extra: &str| TrainConfig::from_toml(&format!("{base}{extra}"), &[]);
    let err = load("eval_strategy = \"steps\"\nsave_strategy = \"epoch\"\n").unwrap_err().to_string();
    assert!(err.contains("eval_strategy and save_strategy"), "{err}");
    let err = load("eval_strategy = \"steps\"\neval_steps = 2\nsave_steps = 3\n").unwrap_err().to_string();
    assert!(err.contains("multiple of eval_steps"), "{err}");
    let cfg = load("eval_strategy = \"steps\"\neval_steps = 2\nsave_steps = 4\nmetric_for_best_model = \"rewards/margins\"\n").unwrap();
    assert_eq!(cfg.best_metric(), Some(("eval_rewards/margins".to_string(), true)));
    let cfg = load("eval_strategy = \"epoch\"\nsave_strategy = \"epoch\"\n").unwrap();
    assert_eq!(cfg.best_metric(), Some(("eval_loss".to_string(), false)));
}
