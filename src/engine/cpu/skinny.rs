//! Products of a few rows against a weight stored `[n, k]`: a decode step (one row per sequence being sampled)
//! or any pass of at most `SKINNY_ROWS` rows. Packing the weight for so few rows would cost more than the
//! product, so each weight row is read once, in place (f32, or bf16 widened into a small f32 tile that stays
//! in cache), against all rows of A.
//!
//! Every output is summed in one order on every instruction set, so `avx512`, `avx2` and `portable` give the
//! same bits, and a row's result does not depend on how many other rows share the call (a sampled completion
//! does not depend on its batch): 16 lanes, lane `l` taking the positions `p ≡ l (mod 16)` below the last
//! multiple of 16 by fused multiply-add in increasing `p`; the lanes added as a tree (`l + 8`, then `+ 4`,
//! `+ 2`, `+ 1`); then the remaining positions by fused multiply-add.
use super::isa::Isa;
use super::kernels::SharedMut;
use super::weights::Widen;
use rayon::prelude::*;

/// Products with at most this many rows take `skinny` (the generation batch is as large).
pub const SKINNY_ROWS: usize = 32;

const LANES: usize = 16;
/// The 16 running sums of one output.
type Lanes = [f32; LANES];
/// Weight rows (output columns) widened and multiplied together: each row of A loaded serves all of them.
const TILE_COLS: usize = 8;
/// Depth of a block: the tile's slice of it (16 KiB) stays in L1 while every row of A passes over it.
const BLOCK_DEPTH: usize = 512;
/// Rows of A multiplied by the tile together (AVX-512: 24 accumulators and 8 weight vectors in registers).
const ROW_GROUP: usize = 3;

/// `c[m,n] (+)= a[m,k] · bᵀ` for `b` stored `[n,k]`, the columns split over the threads. The caller has
/// checked the shapes (`m, n, k > 0`, buffers large enough).
pub fn skinny<T: Widen>(isa: Isa, m: usize, k: usize, n: usize, a: &[f32], b: &[T], c: &mut [f32], accumulate: bool) {
    let threads = rayon::current_num_threads();
    let cols_per_task = n.div_ceil(threads * 8).next_multiple_of(TILE_COLS).max(16);
    let c_ptr = SharedMut(c.as_mut_ptr());
    (0..n.div_ceil(cols_per_task)).into_par_iter().for_each(|t| {
        let out = Columns { c: c_ptr, n, j0: t * cols_per_task, j1: (t * cols_per_task + cols_per_task).min(n), accumulate };
        #[cfg(target_arch = "x86_64")]
        if isa != Isa::Portable {
            // SAFETY: the CPU runs AVX2 and FMA (every x86 set but portable needs them).
            return unsafe { columns_avx2(isa, m, k, a, b, out) };
        }
        columns(isa, m, k, a, b, out)
    });
}

/// Where a task writes: columns `j0..j1` of the `[m, n]` output, which no other task writes.
#[derive(Clone, Copy)]
struct Columns {
    c: SharedMut,
    n: usize,
    j0: usize,
    j1: usize,
    accumulate: bool,
}

/// One task's columns, a tile of them at a time.
#[inline(always)]
fn columns<T: Widen>(isa: Isa, m: usize, k: usize, a: &[f32], b: &[T], out: Columns) {
    let full = k / LANES * LANES;
    let mut tile = vec![0f32; TILE_COLS * k];
    let mut acc = vec![[0f32; LANES]; m * TILE_COLS];
    for jt in (out.j0..out.j1).step_by(TILE_COLS) {
        let cols = TILE_COLS.min(out.j1 - jt);
        // A short last tile repeats its first column; the repeats are not written.
        for (u, dst) in tile.chunks_exact_mut(k).enumerate() {
            let j = jt + if u < cols { u } else { 0 };
            dst.iter_mut().zip(&b[j * k..(j + 1) * k]).for_each(|(d, s)| *d = s.widen());
        }
        acc.fill([0.0; LANES]);
        // The next tile's weights are fetched from memory while this one is multiplied, a share before each
        // block of work: fetching them only when they are widened would leave the memory idle meanwhile.
        let next = &b[(jt + TILE_COLS).min(out.j1) * k..(jt + 2 * TILE_COLS).min(out.j1) * k];
        let pieces = full.div_ceil(BLOCK_DEPTH) * m.div_ceil(ROW_GROUP);
        let mut piece = 0;
        for p0 in (0..full).step_by(BLOCK_DEPTH) {
            let depth = BLOCK_DEPTH.min(full - p0);
            for (g, acc) in acc.chunks_mut(ROW_GROUP * TILE_COLS).enumerate() {
                prefetch(&next[next.len() * piece / pieces..next.len() * (piece + 1) / pieces]);
                piece += 1;
                lanes(isa, &a[g * ROW_GROUP * k..], k, &tile, p0, depth, acc);
            }
        }
        for i in 0..m {
            let x = &a[i * k..(i + 1) * k];
            for u in 0..cols {
                let sum = tail(x, &tile[u * k..(u + 1) * k], full, reduce(&acc[i * TILE_COLS + u]));
                // SAFETY: only this task writes columns j0..j1 of c, inside the m×n checked by the caller.
                unsafe {
                    let dst = out.c.ptr().add(i * out.n + jt + u);
                    *dst = if out.accumulate { *dst + sum } else { sum };
                }
            }
        }
    }
}

/// `columns` compiled for AVX2 and FMA: widening, the lane tree and the tail vectorised or fused in hardware.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn columns_avx2<T: Widen>(isa: Isa, m: usize, k: usize, a: &[f32], b: &[T], out: Columns) {
    columns(isa, m, k, a, b, out)
}

/// Asks for the cache lines of `data` ahead of their use (only a hint).
fn prefetch<T>(data: &[T]) {
    #[cfg(target_arch = "x86_64")]
    {
        let (start, bytes) = (data.as_ptr() as *const i8, std::mem::size_of_val(data));
        for offset in (0..bytes).step_by(64) {
            // SAFETY: a prefetch of an address inside `data` (any address would do: it never faults).
            unsafe { _mm_prefetch::<_MM_HINT_T0>(start.add(offset)) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = data;
}

/// For the rows `r` of `xs` (row `r` at `r·k`; `acc.len() / TILE_COLS` of them) and the tile's rows `u`:
/// lane `l` of `acc[r·TILE_COLS + u]` adds `x_r[p] · w_u[p]` by fused multiply-add for `p ≡ l (mod 16)` in
/// `p0..p0 + depth` (a multiple of 16), in increasing `p`.
fn lanes(isa: Isa, xs: &[f32], k: usize, tile: &[f32], p0: usize, depth: usize, acc: &mut [Lanes]) {
    let rows = acc.len() / TILE_COLS;
    assert!(xs.len() >= (rows - 1) * k + p0 + depth && tile.len() == TILE_COLS * k && p0 + depth <= k);
    #[cfg(target_arch = "x86_64")]
    match isa {
        // SAFETY: the CPU runs the set (the caller checked `isa.supported()`); the bounds are asserted above.
        Isa::Avx512 => {
            return unsafe {
                match rows {
                    1 => lanes_avx512::<1>(xs.as_ptr(), k, tile.as_ptr(), p0, depth, acc),
                    2 => lanes_avx512::<2>(xs.as_ptr(), k, tile.as_ptr(), p0, depth, acc),
                    _ => lanes_avx512::<ROW_GROUP>(xs.as_ptr(), k, tile.as_ptr(), p0, depth, acc),
                }
            };
        }
        Isa::Avx2 => return unsafe { lanes_avx2(xs.as_ptr(), k, tile.as_ptr(), p0, depth, acc) },
        Isa::Portable => {}
    }
    let _ = isa;
    for (r, acc) in acc.chunks_exact_mut(TILE_COLS).enumerate() {
        let x = &xs[r * k..][p0..p0 + depth];
        for (u, lanes) in acc.iter_mut().enumerate() {
            let w = &tile[u * k..][p0..p0 + depth];
            for (xc, wc) in x.chunks_exact(LANES).zip(w.chunks_exact(LANES)) {
                for l in 0..LANES {
                    lanes[l] = xc[l].mul_add(wc[l], lanes[l]);
                }
            }
        }
    }
}

/// The 16 lanes added as a tree: `l + 8`, then `+ 4`, `+ 2`, `+ 1`.
#[inline(always)]
fn reduce(lanes: &Lanes) -> f32 {
    let r8: [f32; 8] = std::array::from_fn(|l| lanes[l] + lanes[l + 8]);
    let r4: [f32; 4] = std::array::from_fn(|l| r8[l] + r8[l + 4]);
    (r4[0] + r4[2]) + (r4[1] + r4[3])
}

/// The positions after the last multiple of 16, added to `sum` by fused multiply-add.
#[inline(always)]
fn tail(x: &[f32], w: &[f32], from: usize, mut sum: f32) -> f32 {
    for p in from..x.len() {
        sum = x[p].mul_add(w[p], sum);
    }
    sum
}

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// `lanes` for R rows: R × 8 accumulators and the 8 weight vectors of a step in registers, one load of A per
/// row and step.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn lanes_avx512<const R: usize>(xs: *const f32, k: usize, tile: *const f32, p0: usize, depth: usize, acc: &mut [Lanes]) {
    let mut sums: [[__m512; TILE_COLS]; R] = std::array::from_fn(|r| std::array::from_fn(|u| _mm512_loadu_ps(acc[r * TILE_COLS + u].as_ptr())));
    for p in (p0..p0 + depth).step_by(LANES) {
        let w: [__m512; TILE_COLS] = std::array::from_fn(|u| _mm512_loadu_ps(tile.add(u * k + p)));
        for (r, sums) in sums.iter_mut().enumerate() {
            let x = _mm512_loadu_ps(xs.add(r * k + p));
            for (s, w) in sums.iter_mut().zip(&w) {
                *s = _mm512_fmadd_ps(x, *w, *s);
            }
        }
    }
    for (r, sums) in sums.iter().enumerate() {
        for (u, s) in sums.iter().enumerate() {
            _mm512_storeu_ps(acc[r * TILE_COLS + u].as_mut_ptr(), *s);
        }
    }
}

/// `lanes` one row at a time: each output's 16 lanes are two 8-lane registers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn lanes_avx2(xs: *const f32, k: usize, tile: *const f32, p0: usize, depth: usize, acc: &mut [Lanes]) {
    for (r, acc) in acc.chunks_exact_mut(TILE_COLS).enumerate() {
        for (h, half) in acc.chunks_exact_mut(TILE_COLS / 2).enumerate() {
            let u0 = h * TILE_COLS / 2;
            let mut sums: [[__m256; 2]; TILE_COLS / 2] =
                std::array::from_fn(|u| [_mm256_loadu_ps(half[u].as_ptr()), _mm256_loadu_ps(half[u].as_ptr().add(8))]);
            for p in (p0..p0 + depth).step_by(LANES) {
                let (x0, x1) = (_mm256_loadu_ps(xs.add(r * k + p)), _mm256_loadu_ps(xs.add(r * k + p + 8)));
                for (u, s) in sums.iter_mut().enumerate() {
                    let w = tile.add((u0 + u) * k + p);
                    s[0] = _mm256_fmadd_ps(x0, _mm256_loadu_ps(w), s[0]);
                    s[1] = _mm256_fmadd_ps(x1, _mm256_loadu_ps(w.add(8)), s[1]);
                }
            }
            for (u, s) in sums.iter().enumerate() {
                _mm256_storeu_ps(half[u].as_mut_ptr(), s[0]);
                _mm256_storeu_ps(half[u].as_mut_ptr().add(8), s[1]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every set sums in the module's order (the portable code is its definition), and a row's result is the
    /// same whichever rows share the call: k and n off the lane and tile widths, m across row groups.
    #[test]
    fn every_set_and_every_batch_gives_the_same_bits() {
        let (m, k, n) = (SKINNY_ROWS, 16 * 7 + 5, 4 * 9 + 3);
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 7919) % 101) as f32 / 37.0 - 1.3).collect();
        let b: Vec<f32> = (0..k * n).map(|i| ((i * 104729) % 97) as f32 / 41.0 - 1.1).collect();
        let mut want = vec![0f32; m * n];
        skinny(Isa::Portable, m, k, n, &a, &b, &mut want, false);
        for isa in Isa::available() {
            let mut all = vec![0f32; m * n];
            skinny(isa, m, k, n, &a, &b, &mut all, false);
            assert!(all.iter().zip(&want).all(|(x, y)| x.to_bits() == y.to_bits()), "{} differs from portable", isa.name());
            for rows in [1, 3, 5] {
                let mut some = vec![0f32; rows * n];
                skinny(isa, rows, k, n, &a[(m - rows) * k..], &b, &mut some, false);
                let same = some.iter().zip(&want[(m - rows) * n..]).all(|(x, y)| x.to_bits() == y.to_bits());
                assert!(same, "{}: the last {rows} rows alone differ from the full batch", isa.name());
            }
        }
    }
}
