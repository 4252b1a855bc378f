// Measurement aid: GFLOP/s of the engine's `gemm` on the training shapes of `kto bench` (best of 30).
// cargo run --release --example gemm_shapes; KTO_ISA=portable for the fallback kernel.
use kto::engine::cpu::gemm::gemm;
use std::time::Instant;
fn main() {
    let shapes = [
        ("qkv", 1024, 256, 512, false, true),
        ("gate_up", 1024, 256, 1408, false, true),
        ("down", 1024, 704, 256, false, true),
        ("lm_head", 512, 256, 8192, false, true),
        ("dW gu", 1408, 1024, 256, true, false),
        ("dX gu", 1024, 1408, 256, false, false),
        ("dW lm", 8192, 512, 256, true, false),
        ("square", 1024, 1024, 1024, false, false),
    ];
    println!("kernel set: {}", kto::engine::cpu::isa::active().name());
    for (name, m, k, n, at, bt) in shapes {
        let a: Vec<f32> = (0..m * k).map(|i| (i % 13) as f32 * 0.1).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i % 7) as f32 * 0.1).collect();
        let mut c = vec![0f32; m * n];
        let mut best = f64::MAX;
        for _ in 0..30 {
            let t = Instant::now();
            gemm(m, k, n, &a, at, &b, bt, &mut c, false);
            best = best.min(t.elapsed().as_secs_f64());
        }
        println!("{name:<8} {m}x{k}x{n}: {:6.1} GFLOP/s", 2.0 * (m * n * k) as f64 / best / 1e9);
    }
}
