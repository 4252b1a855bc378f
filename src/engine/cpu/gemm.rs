//! Row-major single-precision matrix products, split over rayon threads by output rows (or columns). Each
//! thread's block runs the kernel of the active instruction set (`isa`): our AVX2/FMA or AVX-512 kernel (`sgemm_x86`),
//! or `matrixmultiply` for `portable` (`KTO_ISA=portable` forces it, for measuring one against the other).
//!
//! We parallelise ourselves (rather than with the GEMM crate's own threads) so that one rayon pool owns the
//! cores and kernels that already run in parallel never oversubscribe them.
use super::isa::{self, Isa};
use super::kernels::SharedMut;
use super::skinny::{skinny, SKINNY_ROWS};
use super::weights::{Weights, Widen};
use rayon::prelude::*;

/// Below this many multiply-adds a product runs on one thread: splitting costs more than it saves.
const PARALLEL_MIN_FLOPS: usize = 1 << 18;

/// `c[m,n] = a[m,k] · b[k,n]` (or `+=` when `accumulate`). `a_t`: `a` is stored as `[k,m]`;
/// `b_t`: `b` is stored as `[n,k]`. All buffers are dense row-major.
#[allow(clippy::too_many_arguments)]
pub fn gemm(m: usize, k: usize, n: usize, a: &[f32], a_t: bool, b: &[f32], b_t: bool, c: &mut [f32], accumulate: bool) {
    gemm_with(isa::active(), m, k, n, a, a_t, b, b_t, c, accumulate)
}

/// `gemm` with the kernels of `isa` (which this CPU must support), for testing each set.
#[allow(clippy::too_many_arguments)]
pub fn gemm_with(isa: Isa, m: usize, k: usize, n: usize, a: &[f32], a_t: bool, b: &[f32], b_t: bool, c: &mut [f32], accumulate: bool) {
    if trivial(isa, m, k, n, a, b.len(), c, accumulate) {
        return;
    }
    if m <= SKINNY_ROWS && !a_t && b_t {
        return skinny(isa, m, k, n, a, b, c, accumulate);
    }
    let (rsa, csa) = if a_t { (1, m) } else { (k, 1) };
    let (rsb, csb) = if b_t { (1, k) } else { (n, 1) };
    let threads = rayon::current_num_threads();
    #[cfg(target_arch = "x86_64")]
    if isa != Isa::Portable {
        let parallel = m * n * k >= PARALLEL_MIN_FLOPS && threads > 1;
        // SAFETY: the strides describe exactly the buffers checked above; the CPU runs `isa` (asserted above).
        unsafe { x86(isa, m, k, n, a.as_ptr(), rsa, csa, b.as_ptr(), rsb, csb, 1.0, accumulate, c.as_mut_ptr(), n, parallel) };
        return;
    }
    let beta = if accumulate { 1.0 } else { 0.0 };
    if m * n * k < PARALLEL_MIN_FLOPS || threads == 1 {
        // SAFETY: the strides describe exactly the buffers checked above.
        unsafe { sgemm_strided_with(isa, m, k, n, 1.0, a.as_ptr(), rsa, csa, b.as_ptr(), rsb, csb, beta, c.as_mut_ptr(), n, 1) };
        return;
    }
    if n > m {
        // Wide outputs (the vocabulary projection): split the columns, so each thread packs only its share of
        // the large right-hand matrix instead of all of it.
        let cols_per_block = n.div_ceil(threads);
        let c_ptr = SharedMut(c.as_mut_ptr());
        (0..threads).into_par_iter().for_each(|bi| {
            let c0 = bi * cols_per_block;
            if c0 >= n {
                return;
            }
            let cols = cols_per_block.min(n - c0);
            // SAFETY: block bi writes only columns c0..c0+cols of c; b's columns c0.. lie inside b.
            unsafe {
                sgemm_strided_with(isa, m, k, cols, 1.0, a.as_ptr(), rsa, csa, b.as_ptr().add(c0 * csb), rsb, csb, beta, c_ptr.ptr().add(c0), n, 1)
            };
        });
        return;
    }
    let blocks = (threads * 4).min(m);
    let rows_per_block = m.div_ceil(blocks);
    c[..m * n].par_chunks_mut(rows_per_block * n).enumerate().for_each(|(bi, c_block)| {
        let row0 = bi * rows_per_block;
        let rows = c_block.len() / n;
        // SAFETY: the strides describe exactly the buffers checked above; row0 + rows <= m.
        unsafe {
            sgemm_strided_with(isa, rows, k, n, 1.0, a.as_ptr().add(row0 * rsa), rsa, csa, b.as_ptr(), rsb, csb, beta, c_block.as_mut_ptr(), n, 1)
        };
    });
}

/// `gemm` with B a model's weights: f32, or bf16 widened while packed (the bits their f32 values give).
#[allow(clippy::too_many_arguments)]
pub fn gemm_w(m: usize, k: usize, n: usize, a: &[f32], a_t: bool, b: Weights, b_t: bool, c: &mut [f32], accumulate: bool) {
    match b {
        Weights::F32(b) => gemm(m, k, n, a, a_t, b, b_t, c, accumulate),
        Weights::Bf16(b) => gemm_bf16_with(isa::active(), m, k, n, a, a_t, b, b_t, c, accumulate),
    }
}

/// `gemm_with` for B in bf16.
#[allow(clippy::too_many_arguments)]
pub fn gemm_bf16_with(isa: Isa, m: usize, k: usize, n: usize, a: &[f32], a_t: bool, b: &[u16], b_t: bool, c: &mut [f32], accumulate: bool) {
    if trivial(isa, m, k, n, a, b.len(), c, accumulate) {
        return;
    }
    if m <= SKINNY_ROWS && !a_t && b_t {
        return skinny(isa, m, k, n, a, b, c, accumulate);
    }
    let (rsa, csa) = if a_t { (1, m) } else { (k, 1) };
    #[cfg(target_arch = "x86_64")]
    if isa != Isa::Portable {
        let (rsb, csb) = if b_t { (1, k) } else { (n, 1) };
        let parallel = m * n * k >= PARALLEL_MIN_FLOPS && rayon::current_num_threads() > 1;
        // SAFETY: as in `gemm_with`.
        unsafe { x86(isa, m, k, n, a.as_ptr(), rsa, csa, b.as_ptr(), rsb, csb, 1.0, accumulate, c.as_mut_ptr(), n, parallel) };
        return;
    }
    // Portable: blocks of columns widened into a scratch and multiplied by matrixmultiply, whose sums do not
    // depend on how the columns are split (as in `gemm_with`).
    const WIDE_COLS: usize = 256;
    let beta = if accumulate { 1.0 } else { 0.0 };
    let c_ptr = SharedMut(c.as_mut_ptr());
    (0..n.div_ceil(WIDE_COLS)).into_par_iter().for_each(|t| {
        let (j0, cols) = (t * WIDE_COLS, WIDE_COLS.min(n - t * WIDE_COLS));
        let wide: Vec<f32> = if b_t {
            b[j0 * k..(j0 + cols) * k].iter().map(|v| v.widen()).collect()
        } else {
            (0..k).flat_map(|p| b[p * n + j0..][..cols].iter().map(|v| v.widen())).collect()
        };
        let (rsb, csb) = if b_t { (1, k) } else { (cols, 1) };
        // SAFETY: block t writes only columns j0..j0+cols of c; `wide` holds the k×cols block of B.
        unsafe { sgemm_strided_with(isa, m, k, cols, 1.0, a.as_ptr(), rsa, csa, wide.as_ptr(), rsb, csb, beta, c_ptr.ptr().add(j0), n, 1) };
    });
}

/// Checks the shapes, and does the whole of a product with no rows, columns or depth: true when done.
#[allow(clippy::too_many_arguments)]
fn trivial(isa: Isa, m: usize, k: usize, n: usize, a: &[f32], b_len: usize, c: &mut [f32], accumulate: bool) -> bool {
    assert!(isa.supported(), "gemm_with: this CPU cannot run {}", isa.name());
    assert!(a.len() >= m * k && b_len >= k * n && c.len() >= m * n, "gemm: buffer too small");
    if m == 0 || n == 0 {
        return true;
    }
    if k == 0 {
        if !accumulate {
            c[..m * n].fill(0.0);
        }
        return true;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(m: usize, k: usize, n: usize, a: &[f32], a_t: bool, b: &[f32], b_t: bool) -> Vec<f32> {
        let mut c = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0f64;
                for p in 0..k {
                    let av = if a_t { a[p * m + i] } else { a[i * k + p] };
                    let bv = if b_t { b[j * k + p] } else { b[p * n + j] };
                    s += av as f64 * bv as f64;
                }
                c[i * n + j] = s as f32;
            }
        }
        c
    }

    #[test]
    fn all_transpose_combinations_match_naive() {
        check_shape(67, 45, 129);
    }

    /// The AVX2 and AVX-512 kernels share the depth of a block, so each element of C is the same FMA chain:
    /// their products are bit for bit the same (a run does not depend on which of the two the CPU has).
    #[test]
    fn x86_kernel_sets_agree_bit_for_bit() {
        let sets: Vec<Isa> = Isa::available().into_iter().filter(|&i| i != Isa::Portable).collect();
        let (m, k, n) = (199, 301, 1041);
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 7919) % 101) as f32 / 50.0 - 1.0).collect();
        let b: Vec<f32> = (0..k * n).map(|i| ((i * 104729) % 97) as f32 / 48.0 - 1.0).collect();
        for (a_t, b_t) in [(false, true), (true, false), (false, false)] {
            let results: Vec<Vec<f32>> = sets
                .iter()
                .map(|&isa| {
                    let mut c = vec![0f32; m * n];
                    gemm_with(isa, m, k, n, &a, a_t, &b, b_t, &mut c, false);
                    c
                })
                .collect();
            for (isa, c) in sets.iter().zip(&results).skip(1) {
                assert!(c.iter().zip(&results[0]).all(|(x, y)| x.to_bits() == y.to_bits()), "{} differs from {}", isa.name(), sets[0].name());
            }
        }
    }

    /// Decoding's products (a few rows against a weight) take the skinny path.
    #[test]
    fn skinny_products_match_naive() {
        for m in 1..=SKINNY_ROWS {
            check_shape(m, 301, 77);
        }
    }

    /// Crosses every blocking boundary of the x86 kernels (KC = 256, MC = 192, NC = 1024) with edge tiles, and
    /// is large enough to run in parallel; the second shape is wide enough for each thread to take its own
    /// columns (n ≥ 2·NC), with a ragged last share.
    #[test]
    fn blocked_shapes_match_naive() {
        check_shape(199, 301, 1041);
        check_shape(37, 70, 2100);
    }

    /// Weights held in bf16 give, on every kernel set, the bits their widened f32 values give: frozen weights in
    /// their checkpoint's dtype change no number. Shapes: skinny, blocked, wide per thread, odd edges.
    #[test]
    fn bf16_weights_give_the_bits_of_their_f32_values() {
        for (m, k, n) in [(3, 301, 77), (199, 301, 1041), (37, 70, 2100), (5, 9, 300)] {
            let a: Vec<f32> = (0..m * k).map(|i| ((i * 7919) % 101) as f32 / 50.0 - 1.0).collect();
            let b16: Vec<u16> = (0..k * n).map(|i| ((0.02 * (((i * 104729) % 997) as f32 - 498.0)).to_bits() >> 16) as u16).collect();
            let b32: Vec<f32> = b16.iter().map(|v| v.widen()).collect();
            for isa in Isa::available() {
                for (a_t, b_t) in [(false, true), (false, false), (true, false), (true, true)] {
                    let mut want = vec![0.5f32; m * n];
                    gemm_with(isa, m, k, n, &a, a_t, &b32, b_t, &mut want, true);
                    let mut got = vec![0.5f32; m * n];
                    gemm_bf16_with(isa, m, k, n, &a, a_t, &b16, b_t, &mut got, true);
                    let same = got.iter().zip(&want).all(|(g, w)| g.to_bits() == w.to_bits());
                    assert!(same, "{} m={m} k={k} n={n} a_t={a_t} b_t={b_t}", isa.name());
                }
            }
        }
    }

    fn check_shape(m: usize, k: usize, n: usize) {
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 7919) % 101) as f32 / 50.0 - 1.0).collect();
        let b: Vec<f32> = (0..k * n).map(|i| ((i * 104729) % 97) as f32 / 48.0 - 1.0).collect();
        for a_t in [false, true] {
            for b_t in [false, true] {
                let want = naive(m, k, n, &a, a_t, &b, b_t);
                for isa in Isa::available() {
                    let mut got = vec![1f32; m * n];
                    gemm_with(isa, m, k, n, &a, a_t, &b, b_t, &mut got, false);
                    for (g, w) in got.iter().zip(&want) {
                        assert!((g - w).abs() < 1e-4 * (k as f32 / 45.0), "{isa:?} a_t={a_t} b_t={b_t}: {g} vs {w}");
                    }
                    gemm_with(isa, m, k, n, &a, a_t, &b, b_t, &mut got, true);
                    for (g, w) in got.iter().zip(&want) {
                        assert!((g - 2.0 * w).abs() < 2e-4 * (k as f32 / 45.0), "{isa:?} accumulate a_t={a_t} b_t={b_t}");
                    }
                }
            }
        }
    }
}

/// Single-threaded `c = alpha·a·b + beta·c` on strided views, for kernels that already run one task per thread.
///
/// # Safety
/// Each pointer with its strides must address valid memory for the given shape (`a`: m×k, `b`: k×n, `c`: m×n),
/// and no other thread may write the elements of `c` meanwhile.
#[allow(clippy::too_many_arguments)]
pub unsafe fn sgemm_strided(
    m: usize,
    k: usize,
    n: usize,
    alpha: f32,
    a: *const f32,
    rsa: usize,
    csa: usize,
    b: *const f32,
    rsb: usize,
    csb: usize,
    beta: f32,
    c: *mut f32,
    rsc: usize,
    csc: usize,
) {
    sgemm_strided_with(isa::active(), m, k, n, alpha, a, rsa, csa, b, rsb, csb, beta, c, rsc, csc)
}

/// `sgemm_strided` with the kernels of `isa`.
///
/// # Safety
/// As `sgemm_strided`, and the CPU must run `isa`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn sgemm_strided_with(
    isa: Isa,
    m: usize,
    k: usize,
    n: usize,
    alpha: f32,
    a: *const f32,
    rsa: usize,
    csa: usize,
    b: *const f32,
    rsb: usize,
    csb: usize,
    beta: f32,
    c: *mut f32,
    rsc: usize,
    csc: usize,
) {
    #[cfg(target_arch = "x86_64")]
    if isa != Isa::Portable && csc == 1 && (beta == 0.0 || beta == 1.0) && m > 0 && n > 0 && k > 0 {
        return x86(isa, m, k, n, a, rsa, csa, b, rsb, csb, alpha, beta == 1.0, c, rsc, false);
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = isa; // only the portable set exists here
    matrixmultiply::sgemm(
        m, k, n, alpha, a, rsa as isize, csa as isize, b, rsb as isize, csb as isize, beta, c, rsc as isize, csc as isize,
    );
}

/// The x86 driver with the micro-kernel of `isa` (not `Portable`).
///
/// # Safety
/// As `sgemm_x86::sgemm`.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe fn x86<T: super::sgemm_x86::PackSource>(
    isa: Isa,
    m: usize,
    k: usize,
    n: usize,
    a: *const f32,
    rsa: usize,
    csa: usize,
    b: *const T,
    rsb: usize,
    csb: usize,
    alpha: f32,
    accumulate: bool,
    c: *mut f32,
    rsc: usize,
    parallel: bool,
) {
    use super::sgemm_x86::sgemm;
    match isa {
        Isa::Avx512 => sgemm::<super::kernel_avx512::Avx512, T>(m, k, n, a, rsa, csa, b, rsb, csb, alpha, accumulate, c, rsc, parallel),
        _ => sgemm::<super::kernel_avx2::Avx2, T>(m, k, n, a, rsa, csa, b, rsb, csb, alpha, accumulate, c, rsc, parallel),
    }
}
