//! LoRA adapters: a zero-initialised B gives exactly the full model's step-0 numbers, adapter gradients match
//! finite differences, the reference under LoRA is the frozen base, and adapters save, load and merge.
mod common;
use common::{assert_same_logs, close, fixture, fixture_toml, json};
use kto::config::TrainConfig;
use kto::engine::{backward, forward, forward_logits, SeqBatch};
use kto::model::lora::{Lora, Target};
use kto::model::Model;
use kto::train::{Silent, Trainer};

fn config(out: &std::path::Path, extra: &[&str]) -> TrainConfig {
    let overrides: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    TrainConfig::from_toml(&fixture_toml(out), &overrides).unwrap()
}

#[test]
fn zero_b_adapters_reproduce_full_fine_tuning_at_step_0() {
    let dir = tempfile::tempdir().unwrap();
    let full = Trainer::new(config(dir.path(), &["optim=sgd"]), &Silent).unwrap();
    let lora = Trainer::new(config(dir.path(), &["optim=sgd", "use_peft=true", "lora_target_modules=[\"all-linear\"]"]), &Silent).unwrap();
    let want = json("expected_step0.json");
    for (rows, wb) in full.epoch_batches().iter().zip(want["batches"].as_array().unwrap()) {
        let a = full.micro_batch(&full.collate(rows), 0, None, &mut Default::default());
        let b = lora.micro_batch(&lora.collate(rows), 0, None, &mut Default::default());
        assert_eq!(a.policy_logps, b.policy_logps, "policy log-probs");
        assert_eq!(a.policy_kl_logps, b.policy_kl_logps, "policy KL log-probs");
        assert_eq!(a.loss, b.loss);
        assert!(close(b.loss, wb["loss"].as_f64().unwrap()));
    }
}

#[test]
fn lora_without_ref_model_uses_the_frozen_base_as_reference() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), &["optim=adamw_torch", "use_peft=true", "max_steps=2"]);
    cfg.ref_model = None;
    let mut t = Trainer::new(cfg, &Silent).unwrap();
    assert!(t.reference.is_none(), "no second copy of the model");
    let rows = &t.epoch_batches()[0];
    let rec = t.micro_batch(&t.collate(rows), 0, None, &mut Default::default());
    // B = 0: the adapted policy equals its base, so every implied reward is exactly zero.
    assert!(rec.policy_logps.iter().zip(&rec.reference_logps).all(|(p, r)| p == r));
    let logs = t.train(&Silent).unwrap().log_history;
    assert_eq!(logs[0]["rewards/chosen"].as_f64().unwrap(), 0.0);
    // After one AdamW step on the adapters the policy has moved away from the reference.
    assert!(logs[1]["rewards/chosen"].as_f64().unwrap().abs() > 1e-6);
    // Saved as a PEFT adapter, loadable again.
    let loaded = Lora::load_peft(&dir.path(), &t.policy.spec).unwrap();
    assert_eq!(loaded.params, t.policy.lora.as_ref().unwrap().params);
    assert!(!dir.path().join("model.safetensors").exists(), "LoRA runs save the adapter, not the full model");
}

#[test]
fn adapter_gradients_match_finite_differences() {
    // The Llama fixture, and Gemma 3's, whose o and down adapters feed its sandwich norms.
    let gemma3 = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/arch/gemma3/policy");
    for path in [fixture("policy"), gemma3] {
        adapter_gradients_match_finite_differences_on(&path);
    }
}

fn adapter_gradients_match_finite_differences_on(path: &std::path::Path) {
    let mut model = Model::load(path).unwrap();
    let mut lora = Lora::new(&model.spec, 4, 8.0, &Target::ALL, 3);
    // Non-zero B so that A's gradient is non-zero too.
    let mut params = lora.params.to_host().into_owned();
    for m in lora.layers.iter().flatten() {
        for (i, v) in params[m.b..m.b + m.out_dim * 4].iter_mut().enumerate() {
            *v = 0.05 * (((i * 7919) % 17) as f32 / 8.0 - 1.0);
        }
    }
    lora.params.upload(&params);
    model.lora = Some(lora);
    let seqs: Vec<(Vec<u32>, Vec<bool>)> =
        vec![(vec![1, 40, 77, 301, 5, 9, 12, 2], vec![false, false, false, true, true, true, true, true]), (vec![1, 300, 20, 2], vec![false, false, true, true])];
    let refs: Vec<(&[u32], &[bool])> = seqs.iter().map(|(i, m)| (i.as_slice(), m.as_slice())).collect();
    let batch = SeqBatch::new(&refs);
    let coef = [0.9f32, -0.6];
    let (_, tape) = forward(&model, &batch, true);
    let mut buffer = kto::engine::Buffer::zeros(model.lora.as_ref().unwrap().params.len());
    backward(&model, &batch, tape.unwrap(), &coef, &mut buffer);
    let grads = buffer.to_host();
    let loss = |m: &Model| -> f64 { forward(m, &batch, false).0.seq_logps.iter().zip(&coef).map(|(l, c)| l * *c as f64).sum() };
    let tensors = model.lora.as_ref().unwrap().tensors.clone();
    let h = 2e-3f32;
    for t in &tensors {
        let dir: Vec<f32> = (0..t.len()).map(|i| ((i * 104729) % 13) as f32 / 6.0 - 1.0).collect();
        let analytic: f64 = grads[t.range()].iter().zip(&dir).map(|(g, d)| *g as f64 * *d as f64).sum();
        let (mut plus, mut minus) = (model.clone(), model.clone());
        for (i, d) in dir.iter().enumerate() {
            plus.lora.as_mut().unwrap().params.with_host_mut(|p| p[t.offset + i] += h * d);
            minus.lora.as_mut().unwrap().params.with_host_mut(|p| p[t.offset + i] -= h * d);
        }
        let fd = (loss(&plus) - loss(&minus)) / (2.0 * h as f64);
        assert!((fd - analytic).abs() <= 2e-3 * fd.abs().max(analytic.abs()) + 2e-3, "{}: {}: fd {fd} vs backward {analytic}", path.display(), t.name);
    }
}

#[test]
fn merged_adapters_give_the_same_logits() {
    let mut model = Model::load(&fixture("policy")).unwrap();
    let mut lora = Lora::new(&model.spec, 8, 16.0, &Target::ALL, 5);
    lora.params.with_host_mut(|p| p.iter_mut().enumerate().for_each(|(i, v)| *v += 0.01 * (((i * 31) % 11) as f32 - 5.0) / 5.0));
    model.lora = Some(lora);
    let ids: Vec<u32> = vec![1, 447, 335, 81, 267, 333, 274, 286, 80, 94];
    let with_adapters = forward_logits(&model, &[&ids]);
    let mut merged = model.clone();
    merged.merge_lora();
    assert!(merged.lora.is_none());
    let after = forward_logits(&merged, &[&ids]);
    let worst = with_adapters[0].iter().zip(&after[0]).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(worst < 1e-4, "merged logits differ by {worst}");
}

#[test]
fn memory_plan_counts_what_each_mode_holds() {
    let dir = tempfile::tempdir().unwrap();
    let full = Trainer::new(config(dir.path(), &["optim=adamw_torch", "gradient_checkpointing=false"]), &Silent).unwrap();
    let ckpt = Trainer::new(config(dir.path(), &["optim=adamw_torch", "gradient_checkpointing=true"]), &Silent).unwrap();
    let mut lora_cfg = config(dir.path(), &["optim=adamw_torch", "use_peft=true", "gradient_checkpointing=false"]);
    lora_cfg.ref_model = None;
    let lora = Trainer::new(lora_cfg, &Silent).unwrap();
    let (pf, pc, pl) = (full.memory_plan(), ckpt.memory_plan(), lora.memory_plan());
    assert_eq!(pf.gradient_bytes, 4 * 158_016);
    assert_eq!(pf.optimizer_bytes, 2 * 4 * 158_016);
    assert_eq!(pf.weight_bytes, 2 * 4 * 158_016, "policy and reference");
    assert!(pc.activation_bytes < pf.activation_bytes, "checkpointing keeps less");
    let adapters = lora.trainable_params().len();
    assert_eq!(pl.gradient_bytes, 4 * adapters);
    assert_eq!(pl.weight_bytes, 4 * (158_016 + adapters), "no second copy for the reference");
}

/// A LoRA base whose weights are all bf16 values is held in bf16 and trains the adapters exactly as the same
/// base held in f32 does: the backward's products through the frozen weights widen them exactly too.
#[test]
fn a_lora_base_held_in_bf16_changes_no_number() {
    let train = |frozen: bool| {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path(), &["optim=adamw_torch", "use_peft=true", "max_steps=2"]);
        cfg.ref_model = None;
        let mut t = Trainer::new(cfg, &Silent).unwrap();
        let truncated: Vec<f32> = t.policy.params.to_host().iter().map(|v| f32::from_bits(v.to_bits() & 0xFFFF_0000)).collect();
        t.policy.params = kto::engine::Buffer::from_host(truncated);
        if frozen {
            t.policy.params = t.policy.params.frozen_copy();
        }
        let bytes = t.policy.params.bytes();
        let logs = t.train(&Silent).unwrap().log_history;
        (t.policy.lora.unwrap().params, logs, bytes)
    };
    let (f32_adapters, f32_logs, f32_bytes) = train(false);
    let (bf16_adapters, bf16_logs, bf16_bytes) = train(true);
    assert_eq!(bf16_bytes * 2, f32_bytes, "the base is held in bf16");
    assert_eq!(f32_adapters, bf16_adapters, "adapters after 2 AdamW steps");
    assert_same_logs(&f32_logs, &bf16_logs);
}
