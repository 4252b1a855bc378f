// Measurement aid: GB/s of weight read and GFLOP/s of the decode products (a few rows against a bf16 weight
// stored [n,k], as `kto generate` runs them) at Qwen2.5-0.5B's shapes, for each kernel set this CPU runs.
// cargo run --release --example decode_shapes [ROWS...]; DECODE_DTYPE=f32 for an fp32 checkpoint's weights.
use kto::engine::cpu::gemm::{gemm_bf16_with, gemm_with};
use kto::engine::cpu::isa::Isa;
use std::time::Instant;
fn main() {
    let rows: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let rows = if rows.is_empty() { vec![1, 4, 32] } else { rows };
    // (name, k, n): the weight's shape, out = n.
    let f32_weights = std::env::var("DECODE_DTYPE").is_ok_and(|d| d == "f32");
    let bytes = if f32_weights { 4 } else { 2 };
    let shapes = [("q|k|v", 896, 1152), ("gate|up", 896, 9728), ("down", 4864, 896), ("lm_head", 896, 151936)];
    for m in rows {
        for (name, k, n) in shapes {
            let a: Vec<f32> = (0..m * k).map(|i| (i % 13) as f32 * 0.1).collect();
            // Enough copies of the weight that the set read per product exceeds the caches, as in a model.
            let copies = (256 << 20) / (2 * k * n) + 1;
            let b: Vec<u16> = (0..copies * k * n).map(|i| 0x3F80 + (i % 7) as u16).collect();
            let b32: Vec<f32> = if f32_weights { b.iter().map(|&v| f32::from_bits((v as u32) << 16)).collect() } else { Vec::new() };
            let mut c = vec![0f32; m * n];
            let mut line = format!("m={m:<3} {name:<8} {k:>5} x {n:>6}");
            // DECODE_SETS=avx512,avx2 measures only those.
            let only = std::env::var("DECODE_SETS").ok();
            for isa in Isa::available().into_iter().filter(|i| only.as_ref().is_none_or(|o| o.split(',').any(|s| s == i.name()))) {
                let mut best = f64::MAX;
                for round in 0..3 {
                    let t = Instant::now();
                    if f32_weights {
                        for w in b32.chunks_exact(k * n) {
                            gemm_with(isa, m, k, n, &a, false, w, true, &mut c, false);
                        }
                    } else {
                        for w in b.chunks_exact(k * n) {
                            gemm_bf16_with(isa, m, k, n, &a, false, w, true, &mut c, false);
                        }
                    }
                    if round > 0 {
                        best = best.min(t.elapsed().as_secs_f64() / copies as f64);
                    }
                }
                line += &format!("  {}: {:6.1} GB/s {:6.1} GFLOP/s", isa.name(), (bytes * k * n) as f64 / best / 1e9, (2 * m * k * n) as f64 / best / 1e9);
            }
            println!("{line}");
        }
    }
}
