//! The fast kernels against the simple reference kernels: max |fast − reference| ≤ 1e-5 · max |reference|.
use kto::engine::kernels::{attention_backward, attention_forward, AttnShape};
use kto::engine::reference::{attention_backward_naive, attention_forward_naive};

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| scale * self.next()).collect()
    }
}

fn assert_close(name: &str, fast: &[f32], reference: &[f32]) {
    assert_eq!(fast.len(), reference.len(), "{name}: length");
    let scale = reference.iter().fold(0f32, |m, v| m.max(v.abs()));
    let worst = fast.iter().zip(reference).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(worst <= 1e-5 * scale, "{name}: max diff {worst:e} vs scale {scale:e}");
}

#[test]
fn attention_forward_and_backward_match_the_reference() {
    let lens = [5usize, 17, 64, 1, 33];
    let mut starts = vec![0];
    for l in lens {
        starts.push(starts.last().unwrap() + l);
    }
    let n = *starts.last().unwrap();
    let (heads, kv_heads, d) = (6, 2, 8);
    let shape = AttnShape { seq_starts: &starts, heads, kv_heads, head_dim: d };
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let q = rng.vec(n * heads * d, 2.0);
    let k = rng.vec(n * kv_heads * d, 2.0);
    let v = rng.vec(n * kv_heads * d, 1.0);
    let dout = rng.vec(n * heads * d, 1.0);
    let total = shape.prob_offsets().1;

    let (mut out_f, mut p_f) = (vec![0f32; n * heads * d], vec![0f32; total]);
    let (mut out_r, mut p_r) = (vec![0f32; n * heads * d], vec![0f32; total]);
    attention_forward(&shape, &q, &k, &v, &mut out_f, &mut p_f);
    attention_forward_naive(&shape, &q, &k, &v, &mut out_r, &mut p_r);
    assert_close("attention out", &out_f, &out_r);
    assert_close("attention probs", &p_f, &p_r);

    let grads = |f: &dyn Fn(&mut [f32], &mut [f32], &mut [f32])| {
        let (mut dq, mut dk, mut dv) = (vec![0f32; q.len()], vec![0f32; k.len()], vec![0f32; v.len()]);
        f(&mut dq, &mut dk, &mut dv);
        (dq, dk, dv)
    };
    let fast = grads(&|dq, dk, dv| attention_backward(&shape, &dout, &q, &k, &v, &p_r, dq, dk, dv));
    let slow = grads(&|dq, dk, dv| attention_backward_naive(&shape, &dout, &q, &k, &v, &p_r, dq, dk, dv));
    assert_close("attention dq", &fast.0, &slow.0);
    assert_close("attention dk", &fast.1, &slow.1);
    assert_close("attention dv", &fast.2, &slow.2);
}
