//! Bad input of every kind ends in one line naming the culprit and a non-zero exit, never a panic, a hang or an
//! allocation abort: malformed model shapes (train and generate), `kto bench` options, config values out of range
//! (a property test), models that do not fit their tokenizer or hold non-finite weights, data-set mistakes, and
//! outputs that would overwrite an input.
mod common;
use common::{assert_one_line_error, fixture, fixture_toml, kto};
use kto::config::TrainConfig;
use kto::model::{Model, ModelSpec, ParamLayout};
use proptest::prelude::*;
use std::path::{Path, PathBuf};

/// A copy of the fixture policy folder, with `edit` applied to its config.json.
fn policy_copy(dir: &Path, name: &str, edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) -> PathBuf {
    let to = dir.join(name);
    std::fs::create_dir_all(&to).unwrap();
    for e in std::fs::read_dir(fixture("policy")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
    let path = to.join("config.json");
    let mut cfg: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(&path, serde_json::to_string(&cfg).unwrap()).unwrap();
    to
}

fn train_with(dir: &Path, sets: &[&str]) -> (bool, String) {
    let cfg = dir.join("run.toml");
    std::fs::write(&cfg, fixture_toml(&dir.join("out"))).unwrap();
    let mut args = vec!["train", cfg.to_str().unwrap()];
    for s in sets {
        args.extend(["--set", s]);
    }
    kto(&args)
}

#[test]
fn malformed_shapes_are_refused_before_anything_is_allocated() {
    let dir = tempfile::tempdir().unwrap();
    for (key, value, named) in [
        ("num_hidden_layers", serde_json::json!(0), "num_hidden_layers"),
        ("num_hidden_layers", serde_json::json!(1_000_000_000_000u64), "parameters"),
        ("intermediate_size", serde_json::json!(0), "intermediate_size"),
        ("vocab_size", serde_json::json!(1u64 << 40), "parameters"),
        ("vocab_size", serde_json::json!(0), "vocab_size"),
        ("num_attention_heads", serde_json::json!(0), "num_attention_heads"),
        ("num_key_value_heads", serde_json::json!(3), "num_key_value_heads"),
        ("head_dim", serde_json::json!(15), "head_dim"),
        ("rope_parameters", serde_json::json!({"rope_theta": 0.0, "rope_type": "default"}), "rope_theta"),
    ] {
        let model = policy_copy(dir.path(), &format!("{key}-{value}").replace(['{', '}', '"', ':', ','], ""), |c| {
            c.insert(key.into(), value.clone());
        });
        let m = format!("model=\"{}\"", model.display());
        assert_one_line_error(train_with(dir.path(), &[&m]), &["config.json", named]);
        assert_one_line_error(kto(&["generate", model.to_str().unwrap(), "--prompt", "hi"]), &["config.json", named]);
    }
}

#[test]
fn impossible_bench_options_name_the_flag() {
    for (args, flag) in [
        (vec!["--heads", "0"], "--heads"),
        (vec!["--kv-heads", "0"], "--kv-heads"),
        (vec!["--heads", "3"], "--heads"),
        (vec!["--hidden", "250"], "--hidden"),
        (vec!["--layers", "0"], "--layers"),
        (vec!["--vocab", "0"], "--vocab"),
        (vec!["--prompt-len", "0"], "--prompt-len"),
        (vec!["--batch", "1"], "--batch"),
        (vec!["--layers", "100000000000"], "parameters"),
        (vec!["--layers", "20000"], "GB"),
    ] {
        let mut all = vec!["bench", "--steps", "1", "--warmup", "0"];
        all.extend(args);
        assert_one_line_error(kto(&all), &[flag]);
    }
}

/// `(key, value)` pairs that are out of range, or at the edge of it.
fn range_cases() -> impl Strategy<Value = (&'static str, f64)> {
    let keys = prop::sample::select(vec![
        "beta",
        "learning_rate",
        "warmup_steps",
        "warmup_ratio",
        "weight_decay",
        "adam_beta1",
        "adam_beta2",
        "adam_epsilon",
        "max_grad_norm",
        "desirable_weight",
        "undesirable_weight",
        "num_train_epochs",
    ]);
    let values = prop_oneof![
        Just(f64::INFINITY),
        Just(f64::NEG_INFINITY),
        Just(f64::NAN),
        Just(0.0),
        Just(1.0),
        Just(-1e-12),
        -10.0..10.0f64,
    ];
    (keys, values)
}

/// The range each key documents (src/config.rs).
fn in_range(key: &str, v: f64) -> bool {
    v.is_finite()
        && match key {
            "beta" | "adam_epsilon" => v > 0.0,
            "warmup_ratio" => (0.0..=1.0).contains(&v),
            "adam_beta1" | "adam_beta2" => (0.0..1.0).contains(&v),
            "num_train_epochs" => v > 0.0,
            _ => v >= 0.0,
        }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]
    #[test]
    fn config_values_load_only_in_range_and_errors_name_the_key((key, v) in range_cases()) {
        let toml_value = if v.is_nan() { "nan".to_string() } else if v.is_infinite() { if v > 0.0 { "inf".into() } else { "-inf".into() } } else { format!("{v:?}") };
        let text = format!("model = \"m\"\ntrain_dataset = \"d.jsonl\"\n{key} = {toml_value}\n");
        match TrainConfig::from_toml(&text, &[]) {
            Ok(_) => prop_assert!(in_range(key, v), "{key} = {v} was accepted"),
            Err(e) => {
                prop_assert!(!in_range(key, v), "{key} = {v} was refused: {e}");
                prop_assert!(e.to_string().contains(key), "{e}");
            }
        }
    }
}

#[test]
fn sft_accepts_one_row_per_batch() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("run.toml");
    std::fs::write(&cfg, fixture_toml(&dir.path().join("out"))).unwrap();
    let (ok, stderr) = kto(&["sft", cfg.to_str().unwrap(), "--set", "per_device_train_batch_size=1", "--set", "max_steps=2"]);
    assert!(ok, "{stderr}");
    assert_one_line_error(kto(&["train", cfg.to_str().unwrap(), "--set", "per_device_train_batch_size=1"]), &["per_device_train_batch_size"]);
}

/// Writes `model` as a Hugging Face folder with the fixture's tokenizer and a config.json of its vocabulary size.
fn write_model(model: &Model, to: &Path) {
    let src = policy_copy(to.parent().unwrap(), to.file_name().unwrap().to_str().unwrap(), |c| {
        c.insert("vocab_size".into(), model.spec.vocab_size.into());
    });
    model.write_safetensors(&src.join("model.safetensors")).unwrap();
}

#[test]
fn generate_refuses_a_model_smaller_than_its_tokenizer_and_non_finite_weights() {
    let dir = tempfile::tempdir().unwrap();
    let policy = Model::load(&fixture("policy")).unwrap();
    // The same model with 256 embedding rows: consistent weights, but the tokenizer has 512 ids.
    let spec = ModelSpec { vocab_size: 256, ..policy.spec.clone() };
    let layout = ParamLayout::new(&spec);
    let mut params = vec![0f32; layout.total];
    for (small, full) in layout.tensors.iter().zip(&policy.layout.tensors) {
        let n = small.len();
        params[small.range()].copy_from_slice(&policy.params.to_host()[full.offset..full.offset + n]);
    }
    let small = dir.path().join("small");
    write_model(&Model { spec, layout, params: kto::engine::Buffer::from_host(params), lora: None }, &small);
    assert_one_line_error(kto(&["generate", small.to_str().unwrap(), "--prompt", "hi"]), &["512 tokens", "vocab_size is 256"]);
    // A NaN in one tensor: named, whatever the command.
    let mut broken = policy.clone();
    let slot = broken.layout.tensors[3].clone();
    broken.params.with_host_mut(|p| p[slot.offset + 1] = f32::NAN);
    let nan = dir.path().join("nan");
    write_model(&broken, &nan);
    assert_one_line_error(kto(&["generate", nan.to_str().unwrap(), "--prompt", "hi"]), &[&slot.name, "non-finite"]);
    let m = format!("model=\"{}\"", nan.display());
    assert_one_line_error(train_with(dir.path(), &[&m]), &[&slot.name, "non-finite"]);
}

fn data_file(dir: &Path, name: &str, bytes: &[u8]) -> String {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    format!("train_dataset=\"{}\"", p.display())
}

const ROW: &str = "{\"prompt\": \"Hi\", \"completion\": \" there\", \"label\": true}\n";

#[test]
fn data_mistakes_are_named_as_the_user_wrote_them() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let rows = ROW.repeat(4);
    let data = data_file(d, "good.jsonl", rows.as_bytes());
    assert_one_line_error(train_with(d, &[&data, "completion_column=answer"]), &["row 1", "no column \"answer\"", "completion_column"]);
    assert_one_line_error(train_with(d, &[&data, "label_column=rating"]), &["row 1", "no column \"rating\"", "label_column"]);
    let null_label = data_file(d, "null.jsonl", format!("{ROW}{{\"prompt\": \"x\", \"completion\": \"y\", \"label\": null}}\n").as_bytes());
    assert_one_line_error(train_with(d, &[&null_label]), &["row 2", "\"label\" is null"]);
    let bom = data_file(d, "bom.jsonl", [b"\xEF\xBB\xBF".as_slice(), rows.as_bytes()].concat().as_slice());
    let (ok, stderr) = train_with(d, &[&bom, "max_steps=1", "overwrite_output_dir=true"]);
    assert!(ok, "a byte-order mark is not an error: {stderr}");
    let latin1 = data_file(d, "latin1.jsonl", [ROW.as_bytes(), b"{\"prompt\": \"caf\xE9\", \"completion\": \"y\", \"label\": true}\n"].concat().as_slice());
    assert_one_line_error(train_with(d, &[&latin1]), &["latin1.jsonl", "row 2", "invalid UTF-8"]);
    let all_bad = data_file(d, "bad.jsonl", b"{\"prompt\": \"x\", \"completion\": \"\", \"label\": true}\n[1]\n");
    assert_one_line_error(train_with(d, &[&all_bad, "skip_invalid_rows=true"]), &["all 2 rows are invalid"]);
    assert_one_line_error(train_with(d, &["model=\"/nonexistent/model\""]), &["/nonexistent/model", "no such folder"]);
    let file_out = d.join("a-file");
    std::fs::write(&file_out, "").unwrap();
    let out = format!("output_dir=\"{}\"", file_out.display());
    assert_one_line_error(train_with(d, &[&out]), &["a-file", "is a file"]);
    // A folder that cannot be made is reported before the reference pass, not after it.
    let unwritable = format!("output_dir=\"{}\"", file_out.join("sub").display());
    let (ok, stderr) = train_with(d, &[&unwritable, "precompute_ref_log_probs=true"]);
    assert!(!ok && stderr.contains("cannot create output_dir") && !stderr.contains("precomputed"), "{stderr}");
    let bad_template = policy_copy(d, "bad-template", |_| {});
    std::fs::write(bad_template.join("chat_template.jinja"), "{% for %}").unwrap();
    let m = format!("model=\"{}\"", bad_template.display());
    assert_one_line_error(train_with(d, &[&m]), &["chat_template.jinja"]);
}

#[test]
fn a_diverging_first_step_does_not_promise_a_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let r = train_with(dir.path(), &["optim=sgd", "learning_rate=1e30", "max_steps=5", "max_grad_norm=0"]);
    assert_one_line_error(r, &["non-finite", "no checkpoint was written yet"]);
}

#[test]
fn outputs_never_overwrite_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let model = policy_copy(dir.path(), "model", |_| {});
    let before = std::fs::read(model.join("model.safetensors")).unwrap();
    let (m, out) = (format!("model=\"{}\"", model.display()), format!("output_dir=\"{}\"", model.display()));
    assert_one_line_error(train_with(dir.path(), &[&m, &out, "overwrite_output_dir=true"]), &["input folder"]);
    assert_eq!(std::fs::read(model.join("model.safetensors")).unwrap(), before);
    // An adapter to merge.
    let (lora_out, ok) = {
        let o = dir.path().join("lora");
        let out = format!("output_dir=\"{}\"", o.display());
        let r = train_with(dir.path(), &[&m, &out, "use_peft=true", "max_steps=1"]);
        (o, r.0)
    };
    assert!(ok);
    let (base, adapter) = (model.to_str().unwrap(), lora_out.to_str().unwrap());
    assert_one_line_error(kto(&["merge", "--base", base, "--adapter", adapter, "--out", base]), &["--base"]);
    assert_eq!(std::fs::read(model.join("model.safetensors")).unwrap(), before);
    // Another base of the same shapes merges, with a warning that the adapter names a different one.
    let other = policy_copy(dir.path(), "other", |_| {});
    let merged = dir.path().join("merged");
    let (ok, stderr) = kto(&["merge", "--base", other.to_str().unwrap(), "--adapter", adapter, "--out", merged.to_str().unwrap()]);
    assert!(ok && stderr.contains("warning") && stderr.contains("base_model_name_or_path"), "{stderr}");
}

#[test]
fn generate_writes_its_file_only_when_complete_and_plot_ends_on_any_range() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("prompts.jsonl");
    std::fs::write(&prompts, "{\"prompt\": \"a\"}\n{\"prompt\": \"b\"}\n").unwrap();
    let out = dir.path().join("out.jsonl");
    let policy = fixture("policy");
    let args = ["generate", policy.to_str().unwrap(), "--prompts", prompts.to_str().unwrap(), "--out", out.to_str().unwrap(), "--max-new-tokens", "4"];
    let (ok, stderr) = kto(&args);
    assert!(ok, "{stderr}");
    assert_eq!(std::fs::read_to_string(&out).unwrap().lines().count(), 2);
    assert!(!dir.path().join("out.jsonl.partial").exists());
    // Metrics whose range overflows f64 still draw (and end).
    std::fs::write(dir.path().join("metrics.jsonl"), "{\"loss\":1e308,\"step\":1}\n{\"loss\":-1e308,\"step\":2}\n").unwrap();
    let (ok, stderr) = kto(&["plot", dir.path().to_str().unwrap()]);
    assert!(ok, "{stderr}");
}
