// Measurement aid: GFLOP/s of the engine's GEMM with each kernel set this CPU runs, side by side, on
// gemm_peak.py's shapes and the bench model's backward shapes. cargo run --release --example gemm_shapes
use kto::engine::cpu::gemm::gemm_with;
use kto::engine::cpu::isa::Isa;
use std::time::Instant;
fn main() {
    // (name, m, k, n, a stored transposed, b stored transposed): gemm_peak.py's shapes (activations[m,k] times
    // weight[n,k]ᵀ), then the backward's shapes of the bench model.
    let shapes = [
        ("square 1024", 1024, 1024, 1024, false, true),
        ("bench q|k|v", 1024, 256, 512, false, true),
        ("bench gate|up", 1024, 256, 1408, false, true),
        ("bench down", 1024, 704, 256, false, true),
        ("bench lm_head", 512, 256, 8192, false, true),
        ("qwen0.5b q|k|v", 1400, 896, 1152, false, true),
        ("qwen0.5b gate|up", 1400, 896, 9728, false, true),
        ("qwen0.5b down", 1400, 4864, 896, false, true),
        ("qwen0.5b lm_head", 700, 896, 151936, false, true),
        ("bench dW gate|up", 1408, 1024, 256, true, false),
        ("bench dX gate|up", 1024, 1408, 256, false, false),
        ("bench dW lm_head", 8192, 512, 256, true, false),
    ];

    let sets = Isa::available();
    println!("{:<18} {:>20} {}", "GFLOP/s", "m x k x n", sets.iter().map(|i| format!("{:>9}", i.name())).collect::<String>());
    for (name, m, k, n, at, bt) in shapes {
        let a: Vec<f32> = (0..m * k).map(|i| (i % 13) as f32 * 0.1).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i % 7) as f32 * 0.1).collect();
        let mut c = vec![0f32; m * n];
        let mut row = String::new();
        for &isa in &sets {
            // As gemm_peak.py measures MKL: two warm-up products, then the mean rate over about a second.
            for _ in 0..2 {
                gemm_with(isa, m, k, n, &a, at, &b, bt, &mut c, false);
            }
            let (t, mut reps) = (Instant::now(), 0);
            while t.elapsed().as_secs_f64() < 1.0 {
                gemm_with(isa, m, k, n, &a, at, &b, bt, &mut c, false);
                reps += 1;
            }
            row += &format!("{:>9.1}", 2.0 * (m * n * k * reps) as f64 / t.elapsed().as_secs_f64() / 1e9);
        }
        println!("{name:<18} {:>20} {row}", format!("{m}x{k}x{n}"));
    }
}
