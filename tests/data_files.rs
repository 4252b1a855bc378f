//! Real data files: Parquet written by pyarrow (tests/data/parquet, scripts/make_parquet_fixtures.py), folders
//! of shards, mapped column names, 0/1 labels, and skipping invalid rows.
mod common;
use common::{fixture, fixture_toml, json};
use kto::config::TrainConfig;
use kto::data::{examples_from_rows, prepare, read_dataset, PrepareOptions, TextTokenizer};
use kto::train::{Silent, Trainer};
use std::path::PathBuf;

fn parquet(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/parquet").join(name)
}

fn trainer_on(data: &std::path::Path, extra: &[&str]) -> kto::Result<Trainer> {
    let dir = tempfile::tempdir().unwrap();
    let mut overrides: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    overrides.push(format!("train_dataset={:?}", data.display().to_string()));
    Trainer::new(TrainConfig::from_toml(&fixture_toml(dir.path()), &overrides).unwrap(), &Silent)
}

#[test]
fn parquet_file_and_folder_of_shards_prepare_exactly_like_the_jsonl() {
    let want = json("expected_preprocessed.json");
    for data in [parquet("kto.parquet"), parquet("shards")] {
        let t = trainer_on(&data, &[]).unwrap();
        let rows = want["rows"].as_array().unwrap();
        assert_eq!(t.data.rows.len(), rows.len(), "{}", data.display());
        for (g, w) in t.data.rows.iter().zip(rows) {
            let ids = |k: &str| -> Vec<u32> { w[k].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect() };
            assert_eq!(g.prompt_ids, ids("prompt_ids"));
            assert_eq!(g.completion_ids, ids("completion_ids"));
            assert_eq!(g.kl_completion_ids, ids("KL_completion_ids"));
        }
    }
}

#[test]
fn conversational_parquet_uses_the_chat_template() {
    let want = json("expected_conversational.json");
    let tok = TextTokenizer::load(&fixture("tokenizer")).unwrap();
    let (rows, skipped) = read_dataset(&parquet("conversational.parquet"), false).unwrap();
    assert!(skipped.is_empty());
    let (examples, conversational) = examples_from_rows(&rows).unwrap();
    assert!(conversational);
    let opts = PrepareOptions { max_length: Some(64), batch_size: 4, with_kl: true };
    let prepared = prepare(&examples, &tok, opts, &parquet("conversational.parquet")).unwrap();
    for (g, w) in prepared.rows.iter().zip(want["prepared_rows"].as_array().unwrap()) {
        let ids: Vec<u32> = w["completion_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        assert_eq!(g.completion_ids, ids);
    }
}

#[test]
fn mapped_columns_and_integer_labels() {
    let t = trainer_on(
        &parquet("mapped.parquet"),
        &["prompt_column=\"question\"", "completion_column=\"answer\"", "label_column=\"thumbs_up\""],
    )
    .unwrap();
    let labels: Vec<bool> = t.data.rows.iter().map(|r| r.label).collect();
    assert_eq!(labels, vec![true, false, true, false, true, true, false, true]);
    // Without the mapping the missing column is named.
    let e = trainer_on(&parquet("mapped.parquet"), &[]).err().unwrap().to_string();
    assert!(e.contains("mapped.parquet") && e.contains("prompt"), "{e}");
}

#[test]
fn invalid_rows_are_skipped_and_counted_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("mixed.jsonl");
    let good = "{\"prompt\": \"Hi\", \"completion\": \" there\", \"label\": true}";
    let good2 = "{\"prompt\": \"Yo\", \"completion\": \" you\", \"label\": 0}";
    std::fs::write(&data, format!("{good}\n{{broken\n{good2}\n{{\"prompt\": \"x\", \"label\": true}}\n[1,2]\n{good}\n")).unwrap();
    let e = trainer_on(&data, &[]).err().unwrap().to_string();
    assert!(e.contains("row 2"), "{e}");
    let t = trainer_on(&data, &["skip_invalid_rows=true"]).unwrap();
    assert_eq!(t.data.rows.len(), 3, "three valid rows remain");
    let (_, skipped) = read_dataset(&data, true).unwrap();
    assert_eq!(skipped.len(), 2, "two lines are not JSON objects");
}
