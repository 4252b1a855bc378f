//! Real chat templates (TRL 1.16's copies of the models' own, tests/data/chat-templates, rendered by
//! scripts/make_chat_template_fixtures.py with transformers) render byte for byte as transformers renders them,
//! and refuse the conversations transformers refuses with the same message.
use kto::data::chat_template::{pin_now, ChatTemplate};
use serde_json::{Map, Value};
use std::collections::BTreeSet;
use std::path::PathBuf;

fn data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/chat-templates").join(name)
}

#[test]
fn real_templates_render_as_transformers_renders_them() {
    let fixture: Value = serde_json::from_str(&std::fs::read_to_string(data("cases.json")).unwrap()).unwrap();
    pin_now(Some(chrono::NaiveDateTime::parse_from_str(fixture["date"].as_str().unwrap(), "%Y-%m-%dT%H:%M:%S").unwrap()));
    let special: Map<String, Value> = fixture["special_tokens"].as_object().unwrap().clone();
    let conversations = fixture["conversations"].as_array().unwrap();
    let (mut checked, mut failures) = (BTreeSet::new(), Vec::new());
    for case in fixture["cases"].as_array().unwrap() {
        let name = case["template"].as_str().unwrap();
        let source = std::fs::read_to_string(data(&format!("{name}.jinja"))).unwrap();
        let template = ChatTemplate::new(source).unwrap_or_else(|e| panic!("{name}: {e}"));
        let conv = &conversations[case["conversation"].as_u64().unwrap() as usize];
        let got = template.render(
            conv["messages"].as_array().unwrap(),
            conv["add_generation_prompt"].as_bool().unwrap(),
            conv.get("tools"),
            &special,
            None,
        );
        let want = match (case.get("rendered"), case.get("error")) {
            (Some(text), _) => Ok(text.as_str().unwrap().to_string()),
            (_, Some(msg)) => Err(msg.as_str().unwrap().to_string()),
            _ => panic!("a case without an outcome"),
        };
        if got != want {
            failures.push(format!("{name} conversation {}:\n  ours {got:?}\n  want {want:?}", case["conversation"]));
        }
        checked.insert(name.to_string());
    }
    assert!(failures.is_empty(), "{} of the cases differ:\n{}", failures.len(), failures.join("\n"));
    assert!(checked.len() >= 12, "only {} templates checked", checked.len());
}
