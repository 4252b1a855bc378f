//! A tokenizer whose class (`tokenizer_config.json`'s `tokenizer_class`) builds its own pipeline encodes and decodes
//! as transformers 5 does, whatever the file's own pipeline says (tests/data/tokenizer-classes, made by
//! scripts/make_tokenizer_class_fixture.py).
use kto::data::TextTokenizer;
use serde_json::Value;
use std::path::PathBuf;

#[test]
fn gemma_tokenizer_encodes_and_decodes_as_transformers() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/tokenizer-classes/gemma");
    let tok = TextTokenizer::load(&dir).unwrap();
    let cases: Vec<Value> = serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let ids = |v: &Value| -> Vec<u32> { v.as_array().unwrap().iter().map(|i| i.as_u64().unwrap() as u32).collect() };
    for c in &cases {
        let text = c["text"].as_str().unwrap();
        assert_eq!(tok.encode(text, true).unwrap(), ids(&c["ids"]), "{text:?} with special tokens");
        assert_eq!(tok.encode(text, false).unwrap(), ids(&c["ids_plain"]), "{text:?}");
        assert_eq!(tok.decode(&ids(&c["ids"])).unwrap(), c["decoded"].as_str().unwrap(), "decoding {text:?}");
    }
}
