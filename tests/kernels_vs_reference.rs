//! The fast kernels against the simple reference kernels: max |fast − reference| ≤ 1e-5 · max |reference|.
use kto::engine::cpu::kernels::{attention_backward, attention_forward, AttnShape};
use kto::engine::cpu::reference::{attention_backward_naive, attention_forward_naive};
mod common;
use common::Rng;


fn assert_close(name: &str, fast: &[f32], reference: &[f32]) {
    assert!(reference.iter().any(|v| *v != 0.0), "{name}: reference is all zeros");
    assert_eq!(fast.len(), reference.len(), "{name}: length");
    let scale = reference.iter().fold(0f32, |m, v| m.max(v.abs()));
    let worst = fast.iter().zip(reference).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(worst <= 1e-5 * scale, "{name}: max diff {worst:e} vs scale {scale:e}");
}

#[test]
fn attention_forward_and_backward_match_the_reference() {
    for window in [None, Some(5), Some(70)] {
        attention_case(window, None);
    }
    // Gemma 2's soft-capped scores, with a cap the scores reach (q and k are drawn at scale 2, d = 8).
    attention_case(Some(70), Some(1.5));
}

fn attention_case(window: Option<usize>, softcap: Option<f32>) {
    // Lengths around the kernels' 64-row query blocks.
    let lens = [5usize, 17, 64, 1, 33, 65, 150];
    let mut starts = vec![0];
    for l in lens {
        starts.push(starts.last().unwrap() + l);
    }
    let n = *starts.last().unwrap();
    let (heads, kv_heads, d) = (6, 2, 8);
    let shape = AttnShape { seq_starts: &starts, heads, kv_heads, head_dim: d, window, scale: 1.0 / (d as f32).sqrt(), softcap };
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let q = rng.vec(n * heads * d, 2.0);
    let k = rng.vec(n * kv_heads * d, 2.0);
    let v = rng.vec(n * kv_heads * d, 1.0);
    let dout = rng.vec(n * heads * d, 1.0);
    let total = shape.prob_offsets().1;

    // The fast kernel reads q, k and v fused in one row per token.
    let (qw, kw) = (heads * d, kv_heads * d);
    let w = qw + 2 * kw;
    let mut qkv = vec![0f32; n * w];
    for r in 0..n {
        qkv[r * w..r * w + qw].copy_from_slice(&q[r * qw..(r + 1) * qw]);
        qkv[r * w + qw..r * w + qw + kw].copy_from_slice(&k[r * kw..(r + 1) * kw]);
        qkv[r * w + qw + kw..(r + 1) * w].copy_from_slice(&v[r * kw..(r + 1) * kw]);
    }
    let (mut out_f, mut lse) = (vec![0f32; n * heads * d], vec![0f32; n * heads]);
    let (mut out_r, mut p_r) = (vec![0f32; n * heads * d], vec![0f32; total]);
    attention_forward(&shape, &qkv, &mut out_f, &mut lse);
    attention_forward_naive(&shape, &q, &k, &v, &mut out_r, &mut p_r);
    assert_close("attention out", &out_f, &out_r);

    let (mut dq, mut dk, mut dv) = (vec![0f32; q.len()], vec![0f32; k.len()], vec![0f32; v.len()]);
    attention_backward_naive(&shape, &dout, &q, &k, &v, &p_r, &mut dq, &mut dk, &mut dv);
    let mut dqkv = vec![0f32; n * w];
    attention_backward(&shape, &dout, &qkv, &out_f, &lse, &mut dqkv);
    let column = |lo: usize, hi: usize| -> Vec<f32> { (0..n).flat_map(|r| dqkv[r * w + lo..r * w + hi].to_vec()).collect() };
    assert_close("attention dq", &column(0, qw), &dq);
    assert_close("attention dk", &column(qw, qw + kw), &dk);
    assert_close("attention dv", &column(qw + kw, w), &dv);
}

#[test]
fn fast_exp_matches_std_exp() {
    let mut worst = 0f32;
    for i in 0..200_000 {
        let x = -87.0 + i as f32 * (87.0 + 88.0) / 200_000.0;
        let (fast, exact) = (kto::engine::cpu::kernels::exp_f32(x), x.exp());
        worst = worst.max((fast - exact).abs() / exact);
    }
    assert!(worst < 4.0 * f32::EPSILON, "max relative error {worst:e}");
    // Far below the range (masked scores, -inf) it underflows to (almost) zero instead of producing garbage.
    assert!(kto::engine::cpu::kernels::exp_f32(f32::NEG_INFINITY) < 1e-37);
}
