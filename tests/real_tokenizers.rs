//! Released models' real tokenizers (tests/data/real-tokenizers, made by the shared fixtures' `make_run.py` with
//! TRL 1.16 and transformers 5.23): a tiny random Llama over each vocabulary, conversational rows (system
//! prompts, multi-turn, unicode) rendered with the model's own chat template, and TRL's metrics at every step of
//! 3 SGD steps. Qwen2.5 (byte-level BPE, `Qwen2Tokenizer`), Phi-3 (SentencePiece-style BPE, `LlamaTokenizer`:
//! transformers prepends "▁" only at the start of the input, not after each special token as the file's own
//! normalizer would) and SmolLM2 (`GPT2Tokenizer`; its pad token is its EOS, so the embedding row of
//! `pad_token_id` gets no gradient from the lookup, as `nn.Embedding(padding_idx)` does); and the Qwen2.5 tokenizer
//! with Qwen3's template, whose empty `<think>` block belongs to the completion.
mod common;
use common::assert_logs_match;
use kto::config::TrainConfig;
use kto::train::{Silent, Trainer};
use serde_json::Value;
use std::path::PathBuf;

const TOKENIZERS: &[&str] = &["qwen2.5-0.5b-instruct", "phi-3-mini-4k-instruct", "smollm2-135m-instruct", "qwen3-template"];

fn dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/real-tokenizers").join(name)
}

/// The run's TOML: the hyperparameters TRL was given, key for key, as TOML values.
fn config(name: &str, e: &Value, out: &std::path::Path) -> String {
    let mut toml = format!(
        "model = {:?}\ntrain_dataset = {:?}\noutput_dir = {:?}\nsave_strategy = \"no\"\n",
        dir(name).join("policy").display().to_string(),
        dir(name).join("data.jsonl").display().to_string(),
        out.display().to_string()
    );
    for (key, value) in e["hyperparameters"].as_object().unwrap() {
        toml += &format!("{key} = {value}\n");
    }
    toml
}

#[test]
fn real_tokenizers_give_trls_metrics_at_every_step() {
    for name in TOKENIZERS {
        let e: Value = serde_json::from_str(&std::fs::read_to_string(dir(name).join("expected.json")).unwrap()).unwrap();
        let out = tempfile::tempdir().unwrap();
        let cfg = TrainConfig::from_toml(&config(name, &e, &out.path().join("run")), &[]).unwrap();
        let mut trainer = Trainer::new(cfg, &Silent).unwrap();
        let logs = trainer.train(&Silent).unwrap().log_history;
        eprintln!("{name}: {} steps", logs.len() - 1);
        assert_logs_match(&logs, e["log_history"].as_array().unwrap());
    }
}
