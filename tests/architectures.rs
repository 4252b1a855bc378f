//! Each supported family against transformers itself (tests/data/arch, made by scripts/make_arch_fixtures.py):
//! logits and sequence log-probs on fixed inputs, PyTorch's gradient, and a 2-step real TRL run on
//! conversational data rendered with the family's own chat template.
mod common;
use common::assert_logs_match;
use kto::config::TrainConfig;
use kto::engine::{backward, forward, forward_logits, SeqBatch};
use kto::model::Model;
use kto::train::{Silent, Trainer};
use serde_json::Value;
use std::path::PathBuf;

const FAMILIES: &[&str] = &["qwen2", "qwen3", "mistral", "llama3", "gemma2", "gemma3"];

fn arch(family: &str, name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/arch").join(family).join(name)
}

fn expected(family: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(arch(family, "expected.json")).unwrap()).unwrap()
}

fn sequences(e: &Value) -> Vec<(Vec<u32>, Vec<bool>)> {
    let lens: Vec<usize> = e["prompt_lengths"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
    e["sequences"]
        .as_array()
        .unwrap()
        .iter()
        .zip(lens)
        .map(|(s, p)| {
            let ids: Vec<u32> = s.as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
            let mask = (0..ids.len()).map(|i| i >= p).collect();
            (ids, mask)
        })
        .collect()
}

#[test]
fn logits_and_sequence_logps_match_transformers() {
    for family in FAMILIES {
        let model = Model::load(&arch(family, "policy")).unwrap();
        let e = expected(family);
        let seqs = sequences(&e);
        let ids: Vec<&[u32]> = seqs.iter().map(|(i, _)| i.as_slice()).collect();
        let logits = forward_logits(&model, &ids);
        let mut worst = 0f64;
        for (got, want) in logits.iter().zip(e["logits"].as_array().unwrap()) {
            let want: Vec<f64> = want.as_array().unwrap().iter().flat_map(|row| row.as_array().unwrap().iter().map(|v| v.as_f64().unwrap())).collect();
            assert_eq!(got.len(), want.len(), "{family}: logits shape");
            for (g, w) in got.iter().zip(&want) {
                worst = worst.max((*g as f64 - w).abs());
            }
        }
        eprintln!("{family}: max |Δ logit| = {worst:.1e}");
        assert!(worst < 1e-4, "{family}: max |Δ logit| = {worst:e}");
        let refs: Vec<(&[u32], &[bool])> = seqs.iter().map(|(i, m)| (i.as_slice(), m.as_slice())).collect();
        let (out, _) = forward(&model, &SeqBatch::new(&refs), false);
        for (g, w) in out.seq_logps.iter().zip(e["sequence_logps"].as_array().unwrap()) {
            let w = w.as_f64().unwrap();
            assert!((g - w).abs() < 1e-4, "{family}: sequence logp {g} vs transformers {w}");
        }
    }
}

#[test]
fn gradients_match_pytorch_within_one_percent_per_tensor() {
    for family in FAMILIES {
        let model = Model::load(&arch(family, "policy")).unwrap();
        let e = expected(family);
        let seqs = sequences(&e);
        let refs: Vec<(&[u32], &[bool])> = seqs.iter().map(|(i, m)| (i.as_slice(), m.as_slice())).collect();
        let batch = SeqBatch::new(&refs);
        let coef: Vec<f32> = e["coefficients"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
        let (_, tape) = forward(&model, &batch, true);
        let mut buffer = kto::engine::Buffer::zeros(model.layout.total);
        backward(&model, &batch, tape.unwrap(), &coef, &mut buffer);
        let grads = buffer.to_host();
        let bytes = std::fs::read(arch(family, "grads.safetensors")).unwrap();
        let torch = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        for t in &model.layout.tensors {
            let view = torch.tensor(&t.name).unwrap_or_else(|_| panic!("{family}: no gradient for {}", t.name));
            let want: Vec<f32> = view.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
            let got = &grads[t.range()];
            let diff: f64 = got.iter().zip(&want).map(|(a, b)| ((a - b) as f64).powi(2)).sum::<f64>().sqrt();
            let norm: f64 = want.iter().map(|b| (*b as f64).powi(2)).sum::<f64>().sqrt();
            assert!(norm > 0.0, "{family} {}: zero reference gradient", t.name);
            assert!(diff <= 0.01 * norm, "{family} {}: relative gradient error {:.2e}", t.name, diff / norm);
        }
    }
}

#[test]
fn kto_runs_on_conversational_data_match_trl_for_every_family() {
    for family in FAMILIES {
        let e = expected(family);
        let dir = tempfile::tempdir().unwrap();
        let toml = format!(
            "model = {:?}\nref_model = {:?}\ntrain_dataset = {:?}\noutput_dir = {:?}\nper_device_train_batch_size = 4\nmax_length = 128\nlearning_rate = 1e-2\noptim = \"sgd\"\nlr_scheduler_type = \"constant\"\nmax_steps = 2\nlogging_steps = 1\nbeta = 0.1\nundesirable_weight = 1.33\n",
            arch(family, "policy").display().to_string(),
            arch(family, "reference").display().to_string(),
            arch(family, "conversational.jsonl").display().to_string(),
            dir.path().join("out").display().to_string(),
        );
        let mut t = Trainer::new(TrainConfig::from_toml(&toml, &[]).unwrap(), &Silent).unwrap();
        for (row, want) in t.data.rows.iter().zip(e["trl_prepared_rows"].as_array().unwrap()) {
            let ids = |k: &str| -> Vec<u32> { want[k].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect() };
            assert_eq!(row.prompt_ids, ids("prompt_ids"), "{family}: prompt ids");
            assert_eq!(row.completion_ids, ids("completion_ids"), "{family}: completion ids");
            assert_eq!(row.kl_completion_ids, ids("KL_completion_ids"), "{family}: KL ids");
        }
        let logs = t.train(&Silent).unwrap().log_history;
        assert_logs_match(&logs, e["trl_log_history"].as_array().unwrap());
        // The trained folder loads back with the same family and the same weights.
        let saved = Model::load(&dir.path().join("out")).unwrap();
        assert_eq!(saved.spec, t.policy.spec, "{family}: spec after save");
        assert_eq!(saved.params, t.policy.params, "{family}: weights after save");
    }
}

/// A Gemma 3 config as the hub holds it (google/gemma-3-1b-it, written before transformers 5: rope_theta,
/// rope_local_base_freq and sliding_window_pattern instead of per-layer-type entries; tied embeddings left to
/// the default) reads as transformers reads it; a soft-cap, when one is set, is read too.
#[test]
fn hub_gemma3_config_reads_as_transformers_reads_it() {
    let config = r#"{"architectures": ["Gemma3ForCausalLM"], "attention_bias": false, "attn_logit_softcapping": null,
        "bos_token_id": 2, "eos_token_id": [1, 106], "final_logit_softcapping": null, "head_dim": 256,
        "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 1152, "intermediate_size": 6912,
        "max_position_embeddings": 32768, "model_type": "gemma3_text", "num_attention_heads": 4, "num_hidden_layers": 26,
        "num_key_value_heads": 1, "pad_token_id": 0, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06,
        "rope_local_base_freq": 10000, "rope_scaling": null, "rope_theta": 1000000, "sliding_window": 512,
        "sliding_window_pattern": 6, "torch_dtype": "bfloat16", "vocab_size": 262144}"#;
    let spec = kto::model::ModelSpec::from_config_json(config).unwrap();
    // The published parameter count of Gemma 3 1B.
    assert_eq!(spec.parameter_count(), Some(999_885_952));
    assert!(spec.tied_embeddings && spec.qk_norm && spec.sandwich_norms && spec.norm_plus_one);
    assert_eq!(spec.activation, kto::model::Activation::GeluTanh);
    assert_eq!(spec.attn_scale, 1.0 / 16.0);
    assert_eq!(spec.embed_scale, Some(1152f32.sqrt()));
    let full: Vec<usize> = (0..26).filter(|&l| spec.layer_windows[l].is_none()).collect();
    assert_eq!(full, [5, 11, 17, 23]);
    assert!(spec.layer_windows.iter().flatten().all(|&w| w == 512));
    assert_eq!(spec.rope_of(0).theta, 10000.0);
    assert_eq!(spec.rope_of(5).theta, 1_000_000.0);
    assert_eq!((spec.attn_softcap, spec.final_softcap), (None, None));
    let capped = config.replace(r#""final_logit_softcapping": null"#, r#""final_logit_softcapping": 30.0"#);
    assert_eq!(kto::model::ModelSpec::from_config_json(&capped).unwrap().final_softcap, Some(30.0));
    let bad = config.replace(r#""final_logit_softcapping": null"#, r#""final_logit_softcapping": 0"#);
    let err = kto::model::ModelSpec::from_config_json(&bad).unwrap_err();
    assert!(err.contains("final_logit_softcapping must be positive"), "{err}");
}

/// Gemma 2's config as the hub holds it (google/gemma-2-2b-it, written before transformers 5: no layer_types,
/// so layers alternate sliding and full, as transformers' default).
#[test]
fn hub_gemma2_config_reads_as_transformers_reads_it() {
    let config = r#"{"architectures": ["Gemma2ForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
        "attn_logit_softcapping": 50.0, "bos_token_id": 2, "cache_implementation": "hybrid", "eos_token_id": [1, 107],
        "final_logit_softcapping": 30.0, "head_dim": 256, "hidden_act": "gelu_pytorch_tanh",
        "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 2304, "initializer_range": 0.02,
        "intermediate_size": 9216, "max_position_embeddings": 8192, "model_type": "gemma2", "num_attention_heads": 8,
        "num_hidden_layers": 26, "num_key_value_heads": 4, "pad_token_id": 0, "query_pre_attn_scalar": 256,
        "rms_norm_eps": 1e-06, "rope_theta": 10000.0, "sliding_window": 4096, "torch_dtype": "float32",
        "transformers_version": "4.42.4", "use_cache": true, "vocab_size": 256000}"#;
    let spec = kto::model::ModelSpec::from_config_json(config).unwrap();
    // The published parameter count of Gemma 2 2B.
    assert_eq!(spec.parameter_count(), Some(2_614_341_888));
    assert!(spec.tied_embeddings && spec.sandwich_norms && spec.norm_plus_one && !spec.qk_norm);
    assert_eq!(spec.activation, kto::model::Activation::GeluTanh);
    assert_eq!((spec.attn_softcap, spec.final_softcap), (Some(50.0), Some(30.0)));
    assert_eq!(spec.attn_scale, 1.0 / 16.0);
    assert_eq!(spec.embed_scale, Some(2304f32.sqrt()));
    let sliding: Vec<usize> = (0..26).filter(|&l| spec.layer_windows[l] == Some(4096)).collect();
    assert_eq!(sliding, (0..26).step_by(2).collect::<Vec<_>>());
    assert_eq!((spec.rope.theta, spec.sliding_rope.as_ref()), (10000.0, None));
}

/// A multimodal Gemma 3 checkpoint (4B and up) is refused with a line that says what it is.
#[test]
fn multimodal_gemma3_is_refused_by_name() {
    let err = kto::model::ModelSpec::from_config_json(r#"{"model_type": "gemma3", "text_config": {"hidden_size": 2560}}"#).unwrap_err();
    assert!(err.contains("Gemma3ForConditionalGeneration") && err.contains("gemma3_text"), "{err}");
}

/// Only Gemma's modelling code reads the soft-capping keys; for the other families transformers ignores them.
#[test]
fn soft_caps_are_gemmas_alone() {
    let llama = std::fs::read_to_string(arch("llama3", "policy/config.json")).unwrap();
    let capped = llama.replacen('{', r#"{"final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0, "#, 1);
    let spec = kto::model::ModelSpec::from_config_json(&capped).unwrap();
    assert_eq!((spec.attn_softcap, spec.final_softcap), (None, None));
}
