// Measurement aid: GB/s of weight read and GFLOP/s of the decode products (a few rows against a bf16 weight
// stored [n,k], as `kto generate` runs them) at Qwen2.5-0.5B's shapes, for each kernel set this CPU runs.
// cargo run --release --example decode_shapes [ROWS...]; DECODE_DTYPE=f32 for an fp32 checkpoint's weights;
// DECODE_MODEL=1 for whole decode steps of the model's products (bf16) instead of one shape at a time.
use kto::engine::cpu::gemm::{gemm_bf16_with, gemm_with};
use kto::engine::cpu::isa::Isa;
use kto::engine::cpu::memory::zeroed;
use std::time::Instant;
fn main() {
    let rows: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let rows = if rows.is_empty() { vec![1, 4, 32] } else { rows };
    if std::env::var("DECODE_MODEL").is_ok() {
        return rows.into_iter().for_each(model_step);
    }
    // (name, k, n): the weight's shape, out = n.
    let f32_weights = std::env::var("DECODE_DTYPE").is_ok_and(|d| d == "f32");
    let bytes = if f32_weights { 4 } else { 2 };
    let shapes = [("q|k|v", 896, 1152), ("gate|up", 896, 9728), ("down", 4864, 896), ("lm_head", 896, 151936)];
    for m in rows {
        for (name, k, n) in shapes {
            let a: Vec<f32> = (0..m * k).map(|i| (i % 13) as f32 * 0.1).collect();
            // Enough copies of the weight that the set read per product exceeds the caches, as in a model
            // (DECODE_MB=0: one copy, which may stay in cache: the kernel's rate without the memory).
            let copies = std::env::var("DECODE_MB").map_or(256, |v| v.parse().unwrap()) * (1 << 20) / (2 * k * n) + 1;
            // In huge pages, as a model's weights are (`memory::zeroed`): with 4 KiB pages the TLB, not the
            // kernel, would set the rate.
            let mut b = zeroed::<u16>(copies * k * n);
            b.iter_mut().enumerate().for_each(|(i, v)| *v = 0x3F80 + (i % 7) as u16);
            let mut b32 = zeroed::<f32>(if f32_weights { b.len() } else { 0 });
            b32.iter_mut().zip(&b).for_each(|(d, &v)| *d = f32::from_bits((v as u32) << 16));
            let mut c = vec![0f32; m * n];
            let mut line = format!("m={m:<3} {name:<8} {k:>5} x {n:>6}");
            // DECODE_SETS=avx512,avx2 measures only those.
            let only = std::env::var("DECODE_SETS").ok();
            for isa in Isa::available().into_iter().filter(|i| only.as_ref().is_none_or(|o| o.split(',').any(|s| s == i.name()))) {
                let mut best = f64::MAX;
                for round in 0..6 {
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

/// `DECODE_MODEL=1`: one token's products through a whole Qwen2.5-0.5B-shaped model (24 layers of distinct
/// weights, then the vocabulary), as a decode step runs them: best and median of 12 tokens, and GB/s of weights.
fn model_step(m: usize) {
    let layer = [(896, 1152, false), (896, 896, true), (896, 9728, false), (4864, 896, true)];
    let per_layer: usize = layer.iter().map(|&(k, n, _)| k * n).sum();
    let total = 24 * per_layer + 896 * 151936;
    let mut w = zeroed::<u16>(total);
    w.iter_mut().enumerate().for_each(|(i, v)| *v = 0x3F80 + (i % 7) as u16);
    let x: Vec<f32> = (0..m * 9728).map(|i| (i % 13) as f32 * 0.01).collect();
    let mut c = vec![0f32; m * 151936];
    let isa = kto::engine::cpu::isa::active();
    let mut times = Vec::new();
    for _ in 0..12 {
        let t = Instant::now();
        let mut at = 0;
        for _ in 0..24 {
            for &(k, n, acc) in &layer {
                gemm_bf16_with(isa, m, k, n, &x, false, &w[at..at + k * n], true, &mut c, acc);
                at += k * n;
            }
        }
        gemm_bf16_with(isa, m, 896, 151936, &x, false, &w[at..], true, &mut c, false);
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let (best, median) = (times[0], times[times.len() / 2]);
    let gb = |t: f64| (2 * total) as f64 / t / 1e9;
    println!("model m={m}: {:.1} ms a token (median {:.1}), {:.1} GB/s (median {:.1})", best * 1e3, median * 1e3, gb(best), gb(median));
}
