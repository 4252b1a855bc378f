//! Preprocessing against TRL's own output: tokenized ids, dropped rows, KL partners, unpairing, chat templates.
use kto::data::{examples_from_rows, prepare, read_rows, Content, PrepareOptions, TextTokenizer};
use serde_json::Value;
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/trl-tiny").join(name)
}

fn json(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(name)).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn prepared(file: &str, batch_size: usize, max_length: Option<usize>) -> (kto::data::Prepared, Vec<kto::data::Example>) {
    let tok = TextTokenizer::load(&fixture("tokenizer")).unwrap();
    let rows = read_rows(&fixture(file)).unwrap();
    let (examples, _) = examples_from_rows(&rows).unwrap();
    let opts = PrepareOptions { max_length, batch_size, with_kl: true };
    (prepare(&examples, &tok, opts, Path::new(file)).unwrap(), examples)
}

fn assert_rows_equal(got: &kto::data::Prepared, want: &[Value]) {
    assert_eq!(got.rows.len(), want.len(), "row count");
    for (i, (g, w)) in got.rows.iter().zip(want).enumerate() {
        assert_eq!(g.prompt_ids, ids(&w["prompt_ids"]), "row {i} prompt_ids");
        assert_eq!(g.completion_ids, ids(&w["completion_ids"]), "row {i} completion_ids");
        assert_eq!(g.kl_completion_ids, ids(&w["KL_completion_ids"]), "row {i} KL_completion_ids");
        assert_eq!(g.label, w["label"].as_bool().unwrap(), "row {i} label");
    }
}

#[test]
fn unpaired_rows_match_trl_exactly() {
    let want = json("expected_preprocessed.json");
    let (got, _) = prepared("kto.jsonl", 4, Some(64));
    assert_rows_equal(&got, want["rows"].as_array().unwrap());
    let dropped: Vec<usize> = ids(&want["dropped_source_rows"]).into_iter().map(|x| x as usize).collect();
    assert_eq!(got.dropped_source_rows, dropped);
    let sources: Vec<usize> = want["rows"].as_array().unwrap().iter().map(|r| r["source_row"].as_u64().unwrap() as usize).collect();
    assert_eq!(got.rows.iter().map(|r| r.source_row).collect::<Vec<_>>(), sources);
    // Row 6's prompt ends in a space that joint tokenization moves into the completion.
    assert!(got.prefix_mismatches >= 1);
}

#[test]
fn paired_rows_unpair_in_trl_order_and_prepare_exactly() {
    let want = json("expected_paired_unpaired.json");
    let (got, examples) = prepared("paired.jsonl", 4, Some(64));
    let unpaired = want["unpaired_rows"].as_array().unwrap();
    assert_eq!(examples.len(), unpaired.len());
    for (e, w) in examples.iter().zip(unpaired) {
        assert_eq!(e.prompt, Content::Text(w["prompt"].as_str().unwrap().into()));
        assert_eq!(e.completion, Content::Text(w["completion"].as_str().unwrap().into()));
        assert_eq!(e.label, w["label"].as_bool().unwrap());
    }
    assert_rows_equal(&got, want["prepared_rows"].as_array().unwrap());
}

#[test]
fn conversational_rows_use_the_chat_template_like_trl() {
    let want = json("expected_conversational.json");
    let (got, _) = prepared("kto_conversational.jsonl", 4, Some(64));
    assert_rows_equal(&got, want["prepared_rows"].as_array().unwrap());
    let tok = TextTokenizer::load(&fixture("tokenizer")).unwrap();
    let msgs: Vec<Value> = serde_json::from_str(r#"[{"role":"user","content":"What color is the sky?"}]"#).unwrap();
    assert_eq!(tok.render_chat(&msgs, true, None, None).unwrap(), want["rendered_prompt_example"].as_str().unwrap());
}

#[test]
fn kl_rotation_follows_batch_size_and_self_pairs_a_single_last_row() {
    // 23 rows with B=2: the last chunk has one row, which is paired with itself (spec §8.2).
    let (got, _) = prepared("kto.jsonl", 2, Some(64));
    assert_eq!(got.rows.len(), 23);
    assert_eq!(got.rows[0].kl_completion_ids, got.rows[1].completion_ids);
    assert_eq!(got.rows[1].kl_completion_ids, got.rows[0].completion_ids);
    assert_eq!(got.rows[22].kl_completion_ids, got.rows[22].completion_ids);
    // B=3 is a 3-cycle: row 0 gets row 2's completion.
    let (got, _) = prepared("kto.jsonl", 3, Some(64));
    assert_eq!(got.rows[0].kl_completion_ids, got.rows[2].completion_ids);
    assert_eq!(got.rows[1].kl_completion_ids, got.rows[0].completion_ids);
}
