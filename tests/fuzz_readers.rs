//! Fuzzing the readers with proptest (bounded, in CI): no input file, config or Parquet bytes may panic or hang;
//! each either loads or gives an error.
mod common;
use common::fixture;
use kto::data::{examples_from_rows, prepare, read_dataset, PrepareOptions, TextTokenizer};
use proptest::prelude::*;

/// Fragments that make the structured cases look like real rows, with the ways they go wrong.
fn json_line() -> impl Strategy<Value = String> {
    let value = prop_oneof![
        Just("\"text\"".to_string()),
        Just("\"\"".to_string()),
        Just("true".to_string()),
        Just("1".to_string()),
        Just("null".to_string()),
        Just("[{\"role\": \"user\", \"content\": \"hi\"}]".to_string()),
        Just("[{\"content\": 3}]".to_string()),
        Just("[]".to_string()),
        "\\PC{0,12}".prop_map(|s| serde_json::to_string(&s).unwrap()),
    ];
    let key = prop_oneof![
        Just("prompt"), Just("completion"), Just("label"), Just("chosen"), Just("rejected"), Just("messages"), Just("tools"),
    ];
    prop_oneof![
        prop::collection::vec((key, value), 0..5).prop_map(|kv| {
            let body: Vec<String> = kv.into_iter().map(|(k, v)| format!("\"{k}\": {v}")).collect();
            format!("{{{}}}", body.join(", "))
        }),
        "\\PC{0,40}",
    ]
}

fn load(text: &str, ext: &str, tok: &TextTokenizer) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(format!("data.{ext}"));
    std::fs::write(&path, text).unwrap();
    for skip in [false, true] {
        if let Ok((rows, _)) = read_dataset(&path, skip) {
            if let Ok((examples, _)) = examples_from_rows(&rows) {
                let opts = PrepareOptions { max_length: Some(32), batch_size: 2, with_kl: true };
                let _ = prepare(&examples, tok, opts, &path);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn jsonl_files_never_panic(lines in prop::collection::vec(json_line(), 0..6)) {
        let tok = TextTokenizer::load(&fixture("tokenizer")).unwrap();
        load(&lines.join("\n"), "jsonl", &tok);
        load(&format!("[{}]", lines.join(",")), "json", &tok);
    }

    #[test]
    fn parquet_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        let tok = TextTokenizer::load(&fixture("tokenizer")).unwrap();
        // Random bytes, and a real file with bytes flipped.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data.parquet");
        std::fs::write(&path, &bytes).unwrap();
        let _ = read_dataset(&path, true);
        let mut real = std::fs::read(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/parquet/kto.parquet")).unwrap();
        for (i, b) in bytes.iter().enumerate() {
            let n = real.len();
            real[(i * 7919 + *b as usize) % n] ^= b;
        }
        std::fs::write(&path, &real).unwrap();
        let _ = read_dataset(&path, false);
        let _ = tok;
    }

    #[test]
    fn configs_never_panic(text in "\\PC{0,80}", key in "[a-z_]{1,20}", value in "\\PC{0,10}") {
        let _ = kto::config::TrainConfig::from_toml(&text, &[]);
        let _ = kto::config::TrainConfig::from_toml("model = \"m\"\ntrain_dataset = \"d\"\n", &[format!("{key}={value}")]);
    }
}
