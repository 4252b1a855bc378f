//! Model folders: sharded checkpoints with an index, bf16/f16 weights, tied embeddings, and save → load.
mod common;
use common::fixture;
use kto::model::Model;
use safetensors::{tensor::TensorView, Dtype};
use std::collections::HashMap;

fn write_shard(path: &std::path::Path, tensors: &[(String, Vec<usize>, Vec<u8>, Dtype)]) {
    let views: Vec<(String, TensorView)> =
        tensors.iter().map(|(n, s, b, d)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap())).collect();
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

#[test]
fn sharded_bf16_and_f16_checkpoint_loads_like_the_f32_one() {
    let m = Model::load(&fixture("policy")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(fixture("policy/config.json"), dir.path().join("config.json")).unwrap();
    let mut shards: [Vec<(String, Vec<usize>, Vec<u8>, Dtype)>; 2] = [Vec::new(), Vec::new()];
    let mut weight_map = serde_json::Map::new();
    for (i, t) in m.layout.tensors.iter().enumerate() {
        let data = &m.params.to_host()[t.range()];
        let (bytes, dtype): (Vec<u8>, Dtype) = if i % 2 == 0 {
            (data.iter().flat_map(|v| half::bf16::from_f32(*v).to_le_bytes()).collect(), Dtype::BF16)
        } else {
            (data.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect(), Dtype::F16)
        };
        let shard = i % 2;
        weight_map.insert(t.name.clone(), format!("model-0000{}-of-00002.safetensors", shard + 1).into());
        shards[shard].push((t.name.clone(), t.shape.clone(), bytes, dtype));
    }
    for (s, tensors) in shards.iter().enumerate() {
        write_shard(&dir.path().join(format!("model-0000{}-of-00002.safetensors", s + 1)), tensors);
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(dir.path().join("model.safetensors.index.json"), index.to_string()).unwrap();
    let loaded = Model::load(dir.path()).unwrap();
    for (a, b) in loaded.params.to_host().iter().zip(m.params.to_host().iter()) {
        assert!((a - b).abs() <= b.abs() / 128.0 + 1e-6, "{a} vs {b}");
    }
}

/// A checkpoint stored all in bf16 loads for sampling as bf16 (half the bytes) with exactly the values `load`
/// widens it to, and its sequence log-probs are the same bits; one tensor in f32 keeps the whole model in f32.
#[test]
fn a_bf16_checkpoint_loads_frozen_in_bf16_with_the_same_values() {
    let m = Model::load(&fixture("policy")).unwrap();
    // `f32_tensor`: that tensor stored in f32, holding its bf16 values, or (with `exact_f32`) values bf16 cannot.
    let write = |f32_tensor: Option<usize>, exact_f32: bool| {
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(fixture("policy/config.json"), dir.path().join("config.json")).unwrap();
        let tensors: Vec<_> = m
            .layout
            .tensors
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let data = &m.params.to_host()[t.range()];
                let bf16: Vec<f32> = data.iter().map(|v| half::bf16::from_f32(*v).to_f32()).collect();
                let (bytes, dtype): (Vec<u8>, Dtype) = match (Some(i) == f32_tensor, exact_f32) {
                    (true, false) => (bf16.iter().flat_map(|v| v.to_le_bytes()).collect(), Dtype::F32),
                    (true, true) => (data.iter().flat_map(|v| v.to_le_bytes()).collect(), Dtype::F32),
                    _ => (bf16.iter().flat_map(|v| half::bf16::from_f32(*v).to_le_bytes()).collect(), Dtype::BF16),
                };
                (t.name.clone(), t.shape.clone(), bytes, dtype)
            })
            .collect();
        write_shard(&dir.path().join("model.safetensors"), &tensors);
        dir
    };
    let all_bf16 = write(None, false);
    let trainable = Model::load(all_bf16.path()).unwrap();
    let frozen = Model::load_frozen(all_bf16.path()).unwrap();
    assert_eq!(frozen.weight_bytes() * 2, trainable.weight_bytes(), "held in bf16");
    assert_eq!(tensor_values(&frozen), tensor_values(&trainable));
    let seqs: [&[u32]; 2] = [&[1, 5, 9, 2, 7], &[3, 4]];
    let logits = |model: &Model| kto::engine::forward_logits(model, &seqs);
    assert_eq!(logits(&frozen), logits(&trainable), "the same bits from bf16 weights");
    // A tensor saved again in f32 still holds bf16 values: still bf16, still the same values.
    let upcast = Model::load_frozen(write(Some(3), false).path()).unwrap();
    assert_eq!(upcast.weight_bytes(), frozen.weight_bytes(), "f32 holding bf16 values is held in bf16");
    assert_eq!(tensor_values(&upcast), tensor_values(&trainable));
    // One holding values that bf16 cannot: the model keeps f32, with those values.
    assert!(m.params.to_host()[m.layout.tensors[3].range()].iter().any(|v| half::bf16::from_f32(*v).to_f32() != *v));
    let mixed = Model::load_frozen(write(Some(3), true).path()).unwrap();
    assert_eq!(mixed.weight_bytes(), trainable.weight_bytes(), "a tensor of true f32 values keeps f32");
    assert_eq!(tensor_values(&mixed)[3], tensor_values(&m)[3]);
}

#[test]
fn tied_embeddings_load_without_lm_head_and_round_trip() {
    let m = Model::load(&fixture("policy")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("policy/config.json")).unwrap()).unwrap();
    cfg["tie_word_embeddings"] = true.into();
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
    let tensors: Vec<(String, Vec<usize>, Vec<u8>, Dtype)> = m
        .layout
        .tensors
        .iter()
        .filter(|t| t.name != "lm_head.weight")
        .map(|t| (t.name.clone(), t.shape.clone(), m.params.to_host()[t.range()].iter().flat_map(|v| v.to_le_bytes()).collect(), Dtype::F32))
        .collect();
    write_shard(&dir.path().join("model.safetensors"), &tensors);
    let tied = Model::load(dir.path()).unwrap();
    assert_eq!(tied.layout.lm_head, tied.layout.embed);
    assert_eq!(tied.num_parameters(), m.num_parameters() - 512 * 64);

    // Save and load again: bit-identical parameters, no lm_head tensor written, format metadata present.
    let out = dir.path().join("saved");
    tied.save_pretrained(&out, dir.path(), &fixture("tokenizer")).unwrap();
    let again = Model::load(&out).unwrap();
    assert_eq!(again.params, tied.params);
    let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(meta.metadata().as_ref().and_then(|m| m.get("format")).map(String::as_str), Some("pt"));
    let names: HashMap<_, _> = meta.tensors();
    assert!(!names.contains_key("lm_head.weight"));
}

#[test]
fn unsupported_architecture_lists_the_supported_ones() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        r#"{"model_type": "gpt2", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2}"#,
    )
    .unwrap();
    let e = Model::load(dir.path()).unwrap_err().to_string();
    assert!(e.contains("gpt2") && e.contains("llama"), "{e}");
}

/// Each tensor's values, tensor after tensor, whatever gaps the model's layout leaves between them.
fn tensor_values(m: &Model) -> Vec<Vec<f32>> {
    let all = m.params.to_host();
    m.layout.tensors.iter().map(|t| all[t.range()].to_vec()).collect()
}

fn weights_fingerprint(m: &Model) -> u64 {
    let mut h = kto::fingerprint::Fingerprint::default();
    m.fingerprint_weights(&mut h);
    h.finish()
}

/// Frozen weights stored in the dtype they are held in are read where they lie in their mapped file (on Linux),
/// [q|k|v] copied beside it. The model holds the same values as one
/// loaded by copying, gives the same bits, fingerprints the same, and a non-finite value in a mapped tensor
/// is still refused, named.
#[test]
fn frozen_weights_mapped_from_their_file_are_the_copied_ones() {
    let policy = Model::load(&fixture("policy")).unwrap();
    // 16384 × 64 embedding rows: a file of several huge pages.
    let spec = kto::model::ModelSpec { vocab_size: 16384, ..policy.spec.clone() };
    let random = kto::model::random::random_model(&spec, 7);
    let dir = tempfile::tempdir().unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("policy/config.json")).unwrap()).unwrap();
    cfg["vocab_size"] = 16384.into();
    let write = |name: &str, dtype: Dtype, poison: Option<usize>| {
        let folder = dir.path().join(name);
        std::fs::create_dir(&folder).unwrap();
        std::fs::write(folder.join("config.json"), cfg.to_string()).unwrap();
        let mut values = tensor_values(&random);
        if let Some(t) = poison {
            values[t][1000] = f32::INFINITY;
        }
        let tensors: Vec<_> = random
            .layout
            .tensors
            .iter()
            .zip(&values)
            .map(|(t, v)| {
                let bytes: Vec<u8> = match dtype {
                    Dtype::BF16 => v.iter().flat_map(|x| half::bf16::from_f32(*x).to_le_bytes()).collect(),
                    _ => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                };
                (t.name.clone(), t.shape.clone(), bytes, dtype)
            })
            .collect();
        write_shard(&folder.join("model.safetensors"), &tensors);
        folder
    };
    let seqs: [&[u32]; 2] = [&[1, 5, 9, 2, 7, 16000], &[3, 4]];
    for (dtype, value_bytes) in [(Dtype::F32, 4), (Dtype::BF16, 2)] {
        let folder = write(&format!("{dtype:?}"), dtype, None);
        let copied = Model::load(&folder).unwrap();
        let mapped = Model::load_frozen(&folder).unwrap();
        if cfg!(target_os = "linux") {
            assert!(format!("{:?}", mapped.params).contains("mapped from files"), "{dtype:?}: {:?}", mapped.params);
            assert!(mapped.layout.total > mapped.layout.parameters, "{dtype:?}: the layout spans the file and the copies");
        }
        assert_eq!(mapped.num_parameters(), copied.num_parameters());
        assert_eq!(mapped.weight_bytes(), copied.num_parameters() * value_bytes, "{dtype:?}");
        assert_eq!(tensor_values(&mapped), tensor_values(&copied), "{dtype:?}");
        assert_eq!(weights_fingerprint(&mapped), weights_fingerprint(&copied), "{dtype:?}");
        let logits = |model: &Model| kto::engine::forward_logits(model, &seqs);
        assert_eq!(logits(&mapped), logits(&copied), "{dtype:?}: the same bits from mapped weights");
        // The embedding (mapped) holding an infinity: refused, named.
        let poisoned = write(&format!("{dtype:?}-inf"), dtype, Some(0));
        let e = Model::load_frozen(&poisoned).unwrap_err().to_string();
        assert!(e.contains("model.embed_tokens.weight") && e.contains("non-finite"), "{e}");
    }
}
