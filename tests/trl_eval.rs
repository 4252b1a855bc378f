//! Evaluation against real TRL 1.16 (tests/data/eval, made by scripts/make_eval_fixture.py): the Qwen2-style policy
//! and separate reference of tests/data/arch/qwen2, conversational rows, 10 eval rows in batches of 4, 4 and 2,
//! gradient accumulation 2, `eval_on_start` and an evaluation every 2 steps, with the reference online and
//! precomputed. Every logged key of every entry equals TRL's (timings only present).
mod common;
use common::close;
use kto::config::TrainConfig;
use kto::train::{Silent, Trainer};
use serde_json::Value;
use std::path::PathBuf;

fn data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(name)
}

fn is_timing(key: &str) -> bool {
    key.ends_with("_runtime") || key.ends_with("_per_second")
}

#[test]
fn evaluation_matches_trl_at_every_evaluation() {
    let fixture: Value = serde_json::from_str(&std::fs::read_to_string(data("eval/expected.json")).unwrap()).unwrap();
    for mode in ["online", "precomputed"] {
        let run = &fixture[mode];
        let out = tempfile::tempdir().unwrap();
        let mut toml = format!(
            "model = {:?}\nref_model = {:?}\ntrain_dataset = {:?}\neval_dataset = {:?}\noutput_dir = {:?}\nsave_strategy = \"no\"\n",
            data("arch/qwen2/policy").display().to_string(),
            data("arch/qwen2/reference").display().to_string(),
            data("eval/train.jsonl").display().to_string(),
            data("eval/eval.jsonl").display().to_string(),
            out.path().join("run").display().to_string()
        );
        for (key, value) in run["hyperparameters"].as_object().unwrap() {
            toml += &format!("{key} = {value}\n");
        }
        let mut trainer = Trainer::new(TrainConfig::from_toml(&toml, &[]).unwrap(), &Silent).unwrap();
        let got = trainer.train(&Silent).unwrap().log_history;
        let want = run["log_history"].as_array().unwrap();
        assert_eq!(got.len(), want.len(), "{mode}: log entries");
        let evaluations = want.iter().filter(|w| w.get("eval_loss").is_some()).count();
        assert_eq!(evaluations, 3, "{mode}: the fixture evaluates at steps 0, 2 and 4");
        for (g, w) in got.iter().zip(want) {
            let step = &w["step"];
            if w.get("train_runtime").is_some() {
                // The run's summary: its keys are another matter (TRL's total_flos); its mean loss is not.
                let (gv, wv) = (g["train_loss"].as_f64().unwrap(), w["train_loss"].as_f64().unwrap());
                assert!(close(gv, wv), "{mode}: train_loss ours {gv} vs TRL {wv}");
                continue;
            }
            let mut keys: Vec<&String> = g.keys().collect();
            let mut want_keys: Vec<&String> = w.as_object().unwrap().keys().collect();
            keys.sort();
            want_keys.sort();
            assert_eq!(keys, want_keys, "{mode} step {step}: keys");
            for (k, wv) in w.as_object().unwrap().iter().filter(|(k, _)| !is_timing(k)) {
                let (gv, wv) = (g[k].as_f64().unwrap(), wv.as_f64().unwrap());
                assert!(close(gv, wv), "{mode} step {step} {k}: ours {gv} vs TRL {wv}");
            }
        }
    }
}
