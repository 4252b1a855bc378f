// Measurement aid: how should a GEMM be split over the rayon threads? Interleaved repetitions, minimum time.
// cargo run --release --example gemm_split
use std::time::Instant;
fn run(m: usize, k: usize, n: usize, at: bool, bt: bool, a: &[f32], b: &[f32], c: &mut [f32], blocks: usize) {
    use rayon::prelude::*;
    let (rsa, csa) = if at { (1isize, m as isize) } else { (k as isize, 1isize) };
    let (rsb, csb) = if bt { (1isize, k as isize) } else { (n as isize, 1isize) };
    let rpb = m.div_ceil(blocks);
    c.par_chunks_mut(rpb * n).enumerate().for_each(|(bi, cb)| unsafe {
        let rows = cb.len() / n;
        matrixmultiply::sgemm(rows, k, n, 1.0, a.as_ptr().offset((bi * rpb) as isize * rsa), rsa, csa, b.as_ptr(), rsb, csb, 0.0, cb.as_mut_ptr(), n as isize, 1);
    });
}
fn main() {
    let shapes = [
        ("qkv", 1024, 256, 512, false, true),
        ("gate_up", 1024, 256, 1408, false, true),
        ("down", 1024, 704, 256, false, true),
        ("dW gu", 1408, 1024, 256, true, false),
        ("dX gu", 1024, 1408, 256, false, false),
    ];
    let configs = [2usize, 4, 8, 16];
    for (name, m, k, n, at, bt) in shapes {
        let a: Vec<f32> = (0..m * k).map(|i| (i % 13) as f32 * 0.1).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i % 7) as f32 * 0.1).collect();
        let mut c = vec![0f32; m * n];
        let mut best = vec![f64::MAX; configs.len()];
        for _ in 0..30 {
            for (ci, &bl) in configs.iter().enumerate() {
                let t = Instant::now();
                run(m, k, n, at, bt, &a, &b, &mut c, bl);
                best[ci] = best[ci].min(t.elapsed().as_secs_f64());
            }
        }
        let line: Vec<String> = configs.iter().zip(&best).map(|(b, t)| format!("r{b}:{:6.1}", 2.0 * (m * n * k) as f64 / t / 1e9)).collect();
        println!("{name:<8} {m}x{k}x{n}: {}", line.join("  "));
    }
}
