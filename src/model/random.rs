//! Randomly initialised models, for `kto bench` and the demo (transformers' initialisation, from a seed).
use super::{Model, ModelSpec, ParamLayout};
use crate::rng::Rng;

/// A Llama initialised as transformers does (normal(0, 0.02) matrices, unit norm weights).
pub fn random_model(spec: &ModelSpec, seed: u64) -> Model {
    let layout = ParamLayout::new(spec);
    let mut rng = Rng::from_state(seed.wrapping_mul(0x9E3779B97F4A7C15));
    let mut params = crate::engine::cpu::memory::zeroed(layout.total);
    for t in &layout.tensors {
        let norm = t.shape.len() == 1;
        for v in &mut params[t.range()] {
            *v = if norm { 1.0 } else { (0.02 * rng.normal()) as f32 };
        }
    }
    Model { spec: spec.clone(), layout, params: crate::engine::Buffer::from_host(params), lora: None }
}

/// `random_model` with each weight rounded to the nearest bf16, as a checkpoint on the hub stores it, and held
/// in bf16 as `kto train` holds a frozen bf16 model (a 7B shape's LoRA base fits in 15 GB, not 30);
/// `Buffer::thawed` makes it trainable.
pub fn random_bf16_model(spec: &ModelSpec, seed: u64) -> Model {
    let layout = ParamLayout::new(spec);
    let mut rng = Rng::from_state(seed.wrapping_mul(0x9E3779B97F4A7C15));
    let mut params = vec![0u16; layout.total];
    for t in &layout.tensors {
        let norm = t.shape.len() == 1;
        for v in &mut params[t.range()] {
            *v = half::bf16::from_f32(if norm { 1.0 } else { (0.02 * rng.normal()) as f32 }).to_bits();
        }
    }
    Model { spec: spec.clone(), layout, params: crate::engine::Buffer::from_bf16_bits(params), lora: None }
}
