//! Finite-difference checks of the engine's backward pass, one directional derivative per parameter tensor.
use kto::engine::{backward, forward, SeqBatch};
use kto::model::{Model, ModelSpec, ParamLayout};
mod common;
use common::Rng;


/// The family differences on top of the plain Llama block.
#[derive(Clone, Copy, Default)]
struct Variant {
    qkv_bias: bool,
    qk_norm: bool,
    window: Option<usize>,
    llama3_rope: bool,
    /// Gemma's branches: (1 + w) norms, scaled embeddings, sandwich norms, GELU-tanh, a query scale unlike
    /// head_dim's, and (Gemma 3) a RoPE of its own on the sliding layer.
    gemma: bool,
    /// Gemma 2's soft-caps of the attention scores and of the logits (instead of Gemma 3's sliding RoPE),
    /// small enough that tanh bends the values the tiny model produces.
    softcaps: Option<(f32, f32)>,
}

fn tiny_model(tied: bool, seed: u64) -> Model {
    tiny_variant(tied, seed, Variant::default())
}

fn tiny_variant(tied: bool, seed: u64, v: Variant) -> Model {
    let spec = ModelSpec {
        vocab_size: 29,
        hidden: 16,
        intermediate: 24,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        head_dim: 4,
        rms_eps: 1e-6,
        rope: if v.llama3_rope {
            kto::model::RopeSpec {
                theta: 500000.0,
                scaling: kto::model::RopeScaling::Llama3 {
                    factor: 8.0,
                    low_freq_factor: 1.0,
                    high_freq_factor: 4.0,
                    original_max_position_embeddings: 4.0,
                },
            }
        } else {
            kto::model::RopeSpec::plain(10000.0)
        },
        qkv_bias: v.qkv_bias,
        qk_norm: v.qk_norm,
        layer_windows: vec![v.window, None],
        padding_idx: None,
        tied_embeddings: tied,
        norm_plus_one: v.gemma,
        embed_scale: v.gemma.then_some(1.7),
        sandwich_norms: v.gemma,
        activation: if v.gemma { kto::model::Activation::GeluTanh } else { kto::model::Activation::Silu },
        attn_scale: if v.gemma { 0.3 } else { 0.5 },
        sliding_rope: (v.gemma && v.softcaps.is_none()).then(|| kto::model::RopeSpec::plain(100.0)),
        attn_softcap: v.softcaps.map(|c| c.0),
        final_softcap: v.softcaps.map(|c| c.1),
    };
    let layout = ParamLayout::new(&spec);
    let mut rng = Rng(seed);
    let mut params: Vec<f32> = (0..layout.total).map(|_| 0.4 * rng.next()).collect();
    for t in layout.tensors.iter().filter(|t| t.shape.len() == 1) {
        // Norm weights near 1: stored as such, or (Gemma's `1 + w`) as offsets near 0.
        let centre = if v.gemma { 0.0 } else { 1.0 };
        params[t.range()].iter_mut().for_each(|w| *w = centre + *w * 0.5);
    }
    Model { spec, layout, params: kto::engine::Buffer::from_host(params), lora: None }
}

fn batch() -> SeqBatch {
    let a: Vec<u32> = vec![1, 5, 9, 3, 17, 22, 4];
    let am = vec![false, false, false, true, true, true, true];
    let b: Vec<u32> = vec![1, 28, 2, 2, 11];
    let bm = vec![false, false, true, true, true];
    let c: Vec<u32> = vec![1, 7, 7, 13, 0, 6, 6, 19, 25];
    let cm = vec![false, false, false, false, false, true, true, true, true];
    SeqBatch::new(&[(&a, &am), (&b, &bm), (&c, &cm)])
}

/// loss = Σ_s coef[s] · logp[s], evaluated in f64 from the f32 forward.
fn loss(model: &Model, b: &SeqBatch, coef: &[f32]) -> f64 {
    let (out, _) = forward(model, b, false);
    out.seq_logps.iter().zip(coef).map(|(l, c)| l * *c as f64).sum()
}

fn check(tied: bool) {
    check_model(tiny_model(tied, 0x9e3779b97f4a7c15), &format!("tied={tied}"));
}

fn check_model(model: Model, label: &str) {
    let tied = label;
    let b = batch();
    let coef = [0.7f32, -1.3, 0.45];
    let (_, tape) = forward(&model, &b, true);
    let mut buffer = kto::engine::Buffer::zeros(model.layout.total);
    backward(&model, &b, tape.unwrap(), &coef, &mut buffer);
    let grads = buffer.to_host();
    let mut rng = Rng(42);
    // Central differences: h small enough that the O(h²) truncation stays below the tolerance, large enough
    // that f32 round-off (about 1e-6 of a loss near 20) does not dominate.
    let h = 2e-3f32;
    for t in &model.layout.tensors {
        let dir: Vec<f32> = (0..t.len()).map(|_| rng.next()).collect();
        let analytic: f64 = grads[t.range()].iter().zip(&dir).map(|(g, d)| *g as f64 * *d as f64).sum();
        let mut plus = model.clone();
        let mut minus = model.clone();
        for (i, d) in dir.iter().enumerate() {
            plus.params.with_host_mut(|p| p[t.offset + i] += h * d);
            minus.params.with_host_mut(|p| p[t.offset + i] -= h * d);
        }
        let fd = (loss(&plus, &b, &coef) - loss(&minus, &b, &coef)) / (2.0 * h as f64);
        let err = (fd - analytic).abs();
        assert!(
            err <= 2e-3 * analytic.abs().max(fd.abs()) + 2e-3,
            "{} (tied={tied}): finite difference {fd:.6} vs backward {analytic:.6}",
            t.name
        );
    }
}

#[test]
fn kept_and_recomputed_softmax_give_the_same_gradient() {
    let model = tiny_model(false, 7);
    let b = batch();
    let coef = [0.7f32, -1.3, 0.45];
    let grads_with = |cache_bytes: usize| {
        kto::engine::cpu::decoder::set_softmax_cache_bytes(cache_bytes);
        let (_, tape) = forward(&model, &b, true);
        let mut g = kto::engine::Buffer::zeros(model.layout.total);
        backward(&model, &b, tape.unwrap(), &coef, &mut g);
        g.to_host().into_owned()
    };
    let (kept, recomputed) = (grads_with(64 << 20), grads_with(0));
    kto::engine::cpu::decoder::set_softmax_cache_bytes(64 << 20);
    let scale = recomputed.iter().fold(0f32, |m, v| m.max(v.abs()));
    for (a, r) in kept.iter().zip(&recomputed) {
        assert!((a - r).abs() <= 1e-5 * scale, "{a} vs {r}");
    }
}

#[test]
fn every_parameter_tensor_matches_finite_differences_untied() {
    check(false);
}

#[test]
fn every_parameter_tensor_matches_finite_differences_tied() {
    check(true);
}

/// transformers' `nn.Embedding(padding_idx = pad_token_id)`: the lookup adds nothing to the padding token's row
/// (token 2 appears twice in the batch); the LM head's share still reaches it when the embeddings are tied; every
/// other row is unchanged.
#[test]
fn the_padding_row_gets_no_gradient_from_the_lookup() {
    let coef = [0.7f32, -1.3, 0.45];
    let b = batch();
    for tied in [false, true] {
        let grads = |padding_idx| {
            let mut model = tiny_model(tied, 11);
            model.spec.padding_idx = padding_idx;
            let (_, tape) = forward(&model, &b, true);
            let mut g = kto::engine::Buffer::zeros(model.layout.total);
            backward(&model, &b, tape.unwrap(), &coef, &mut g);
            (g.to_host().into_owned(), model)
        };
        let ((with, model), (without, _)) = (grads(Some(2)), grads(None));
        let embed = model.layout.tensors.iter().find(|t| t.name == "model.embed_tokens.weight").unwrap();
        let hd = model.spec.hidden;
        for tok in 0..model.spec.vocab_size {
            let row = embed.offset + tok * hd..embed.offset + (tok + 1) * hd;
            if tok != 2 {
                assert_eq!(with[row.clone()], without[row], "row {tok} changed (tied={tied})");
            } else if tied {
                // Only the LM head's share: what the lookup added is gone, so the row differs but is not zero.
                assert_ne!(with[row.clone()], without[row.clone()], "tied: the lookup's share was kept");
                assert!(with[row].iter().any(|g| *g != 0.0), "tied: the LM head's share was dropped");
            } else {
                assert!(with[row.clone()].iter().all(|g| *g == 0.0), "untied: the padding row has a gradient");
                assert!(without[row].iter().any(|g| *g != 0.0), "the batch does not use token 2");
            }
        }
    }
}

#[test]
fn family_branches_match_finite_differences() {
    // q/k/v biases (Qwen2), per-head q/k norms (Qwen3), a sliding window on layer 0 (Mistral), Llama 3 RoPE.
    let all = Variant { qkv_bias: true, qk_norm: true, window: Some(3), llama3_rope: true, ..Default::default() };
    check_model(tiny_variant(false, 0x5151, all), "all family branches");
    let gemma = Variant { qk_norm: true, window: Some(3), gemma: true, ..Default::default() };
    check_model(tiny_variant(true, 0x5153, gemma), "Gemma 3 branches, tied");
    let gemma2 = Variant { window: Some(3), gemma: true, softcaps: Some((0.6, 1.5)), ..Default::default() };
    let capped = tiny_variant(true, 0x5154, gemma2);
    // Each cap bends this model's values: without it, its logits move.
    let ids: &[u32] = &[1, 5, 9, 3, 17, 22, 4];
    let logits = |attn: Option<f32>, last: Option<f32>| {
        let mut m = capped.clone();
        (m.spec.attn_softcap, m.spec.final_softcap) = (attn, last);
        kto::engine::forward_logits(&m, &[ids]).remove(0)
    };
    let both = logits(capped.spec.attn_softcap, capped.spec.final_softcap);
    for (label, other) in [("attention", logits(None, capped.spec.final_softcap)), ("final", logits(capped.spec.attn_softcap, None))] {
        let moved = both.iter().zip(&other).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(moved > 0.05, "the {label} soft-cap does not bite: logits move by {moved}");
    }
    check_model(capped, "Gemma 2 branches (soft-caps), tied");
    check_model(tiny_variant(true, 0x5152, Variant { qkv_bias: true, ..Default::default() }), "qkv bias, tied");
}

/// The memory plan states the tape from `tape_bytes` before any pass runs: it must be what a training forward
/// keeps, buffer for buffer, for every family variant, with adapters, and with gradient checkpointing.
#[test]
fn planned_tape_is_the_tape_a_forward_keeps() {
    let b = batch();
    let variants = [
        Variant::default(),
        Variant { qkv_bias: true, qk_norm: true, window: Some(3), ..Variant::default() },
        Variant { qk_norm: true, window: Some(3), gemma: true, ..Variant::default() },
        Variant { window: Some(3), gemma: true, softcaps: Some((0.6, 1.5)), ..Variant::default() },
    ];
    for (k, v) in variants.into_iter().enumerate() {
        let mut model = tiny_variant(k == 1, 3 + k as u64, v);
        for adapters in [false, true] {
            if adapters {
                model.lora = Some(kto::model::lora::Lora::new(&model.spec, 2, 4.0, &kto::model::lora::Target::ALL, 1));
            }
            for checkpoint in [false, true] {
                let pass = kto::engine::Pass { keep_tape: true, adapters, checkpoint, ..Default::default() };
                let (_, tape, _) = kto::engine::forward_with_cache(&model, &b, pass);
                let kept = tape.unwrap().floats() * 4;
                let planned = kto::engine::tape_bytes(&model, b.n_tokens(), b.scored_rows.len(), checkpoint);
                if checkpoint {
                    // The plan adds the one layer backward rebuilds at a time; the forward keeps only inputs.
                    let inputs = model.spec.layers * b.n_tokens() * model.spec.hidden * 4;
                    assert!(planned > kept && kept > inputs, "variant {k}, adapters {adapters}: planned {planned}, kept {kept}");
                } else {
                    assert_eq!(planned, kept, "variant {k}, adapters {adapters}");
                }
            }
        }
    }
}
