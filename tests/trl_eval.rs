//! Evaluation against real TRL 1.16 (tests/data/eval, made by scripts/make_eval_fixture.py): the Qwen2-style policy
//! and separate reference of tests/data/arch/qwen2, conversational rows, 10 eval rows in batches of 4, 4 and 2,
//! gradient accumulation 2, `eval_on_start` and an evaluation every 2 steps, with the reference online and
//! precomputed. Every logged key of every entry equals TRL's (timings only present).
mod common;
use common::assert_history_matches;
use kto::config::TrainConfig;
use kto::train::{Silent, Trainer};
use serde_json::Value;
use std::path::PathBuf;

fn data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(name)
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
        let evaluations = want.iter().filter(|w| w.get("eval_loss").is_some()).count();
        assert_eq!(evaluations, 3, "{mode}: the fixture evaluates at steps 0, 2 and 4");
        assert_history_matches(&got, want, mode);
    }
}
