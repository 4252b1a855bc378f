//! Products of a few rows against a weight stored `[n, k]`: a decode step (one row per sequence being sampled)
//! or any pass of at most `SKINNY_ROWS` rows. Packing the weight for so few rows would cost more than the
//! product, so each weight row is read once against all rows of A: in place (bf16 widened in registers), or
//! for more than `IN_PLACE_ROWS` rows copied (and widened) into a small f32 tile that stays in cache.
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
/// Products with at most this many rows read the weights in place (bf16 widened in registers); larger ones
/// copy each tile of weights once into an aligned f32 tile that every row group then reads from L1.
const IN_PLACE_ROWS: usize = 8;
/// Rows of A multiplied by the tile together (AVX-512: 24 accumulators and 8 weight vectors in registers).
const ROW_GROUP: usize = 3;

/// `c[m,n] (+)= a[m,k] · bᵀ` for `b` stored `[n,k]`, the columns split over the threads. The caller has
/// checked the shapes (`m, n, k > 0`, buffers large enough).
pub fn skinny<T: Widen>(isa: Isa, m: usize, k: usize, n: usize, a: &[f32], b: &[T], c: &mut [f32], accumulate: bool) {
    // Above IN_PLACE_ROWS rows every row of A is read once per tile of weights: from a copy on a cache line when
    // it does not start on one (activations come from malloc, 16 bytes past a line, so every 64-byte load of
    // them straddled two lines: a 32-prompt decode step took 6% longer in `examples/decode_shapes`).
    if m > IN_PLACE_ROWS && a.as_ptr().align_offset(64) != 0 {
        let copied = ALIGNED_A.with(|copy| {
            // Busy only if a product ran inside another's task on this thread: that one reads A where it is.
            let mut copy = copy.try_borrow_mut().ok()?;
            if copy.len() < m * k + LANES {
                copy.resize(m * k + LANES, 0.0);
            }
            let start = copy.as_ptr().align_offset(64).min(LANES);
            let aligned = &mut copy[start..start + m * k];
            aligned.copy_from_slice(&a[..m * k]);
            columns_over_threads(isa, m, k, n, aligned, b, c, accumulate);
            Some(())
        });
        if copied.is_some() {
            return;
        }
    }
    columns_over_threads(isa, m, k, n, a, b, c, accumulate)
}

/// `skinny`, the columns split over the threads.
#[allow(clippy::too_many_arguments)]
fn columns_over_threads<T: Widen>(isa: Isa, m: usize, k: usize, n: usize, a: &[f32], b: &[T], c: &mut [f32], accumulate: bool) {
    let threads = rayon::current_num_threads();
    let cols_per_task = n.div_ceil(threads * 8).next_multiple_of(TILE_COLS).max(16);
    let c_ptr = SharedMut(c.as_mut_ptr());
    (0..n.div_ceil(cols_per_task)).into_par_iter().for_each(|t| {
        let out = Columns { c: c_ptr, n, j0: t * cols_per_task, j1: (t * cols_per_task + cols_per_task).min(n), accumulate };
        // f32 weights too: read in place, each row group fetched the tile's 8 rows from L2 again (32 rows:
        // 84-160 GFLOP/s in `examples/decode_shapes`, 143-184 from the tile).
        let tiled = m > IN_PLACE_ROWS;
        SCRATCH.with(|scratch| {
            let (tile_alloc, acc) = &mut *scratch.borrow_mut();
            let tile_len = if tiled { TILE_COLS * k + LANES } else { 0 };
            if tile_alloc.len() < tile_len {
                tile_alloc.resize(tile_len, 0.0);
            }
            if acc.len() < m * TILE_COLS {
                acc.resize(m * TILE_COLS, [0.0; LANES]);
            }
            // The tile starts on a cache line, so its 64-byte loads never straddle two.
            let start = tile_alloc.as_ptr().align_offset(64).min(tile_alloc.len());
            let scratch = Scratch { tile: tiled.then_some(&mut tile_alloc[start..]), acc: &mut acc[..m * TILE_COLS] };
            #[cfg(target_arch = "x86_64")]
            if isa != Isa::Portable {
                // SAFETY: the CPU runs AVX2 and FMA (every x86 set but portable needs them).
                return unsafe { columns_avx2(isa, m, k, a, b, out, scratch) };
            }
            columns(isa, m, k, a, b, out, scratch)
        })
    });
}

thread_local! {
    /// The calling thread's copy of A on a cache line (see `skinny`).
    static ALIGNED_A: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    /// Each thread's widened tile and sums, kept across products: a decode step makes about a hundred, and
    /// allocating and zeroing them in each (up to 155 KB for the tile) showed as 4% of a 32-prompt decode's
    /// profile.
    static SCRATCH: std::cell::RefCell<(Vec<f32>, Vec<Lanes>)> = const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// A task's working memory: the tile of weights in f32 (TILE_COLS·k floats on a cache line; only above
/// `IN_PLACE_ROWS` rows) and the sums of the rows against a tile.
struct Scratch<'a> {
    tile: Option<&'a mut [f32]>,
    acc: &'a mut [Lanes],
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

/// One task's columns, a tile of them at a time. Their weights are read in place, except when multiplied by
/// more than `IN_PLACE_ROWS` rows: then they are copied (bf16 widened) once into the scratch's f32 tile, which
/// every row group reads (widening them again for each group would cost more than the copy).
#[inline(always)]
fn columns<T: Widen>(isa: Isa, m: usize, k: usize, a: &[f32], b: &[T], out: Columns, scratch: Scratch) {
    let Scratch { mut tile, acc } = scratch;
    for jt in (out.j0..out.j1).step_by(TILE_COLS) {
        let cols = TILE_COLS.min(out.j1 - jt);
        // A short last tile repeats its first column; the repeats are not written.
        let weights: [&[T]; TILE_COLS] = std::array::from_fn(|u| &b[(jt + if u < cols { u } else { 0 }) * k..][..k]);
        // The next tile's weights are fetched from memory while this one is multiplied.
        let next = &b[(jt + TILE_COLS).min(out.j1) * k..(jt + 2 * TILE_COLS).min(out.j1) * k];
        let tile_out = Columns { j0: jt, j1: jt + cols, ..out };
        if let Some(tile) = tile.as_deref_mut() {
            for (dst, src) in tile.chunks_exact_mut(k).zip(weights) {
                widen_row(isa, src, dst);
            }
            let widened: [&[f32]; TILE_COLS] = std::array::from_fn(|u| &tile[u * k..][..k]);
            tile_product(isa, m, k, a, widened, next, acc, tile_out);
        } else {
            tile_product(isa, m, k, a, weights, next, acc, tile_out);
        }
    }
}

/// Columns `out.j0..out.j1` (at most a tile; `weights[u]` holds column `j0 + u`) of every row of A.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn tile_product<W: Widen, T>(isa: Isa, m: usize, k: usize, a: &[f32], weights: [&[W]; TILE_COLS], next: &[T], acc: &mut [Lanes], out: Columns) {
    let full = k / LANES * LANES;
    if full == 0 {
        acc.fill([0.0; LANES]);
    }
    // A share of the next tile is fetched before each block of work: fetching it only when it is reached
    // would leave the memory idle meanwhile.
    // (A share's bounds step by a fixed length: two divisions a call were a measurable part of a call's cost.)
    // (No call at all below 16 positions: `full` is 0 there.)
    let calls = (full.div_ceil(BLOCK_DEPTH) * m.div_ceil(ROW_GROUP)).max(1);
    let share = next.len().div_ceil(calls).max(1);
    let mut shares = next.chunks(share);
    for p0 in (0..full).step_by(BLOCK_DEPTH) {
        let depth = BLOCK_DEPTH.min(full - p0);
        for (g, acc) in acc.chunks_mut(ROW_GROUP * TILE_COLS).enumerate() {
            prefetch(shares.next().unwrap_or_default());
            lanes(isa, &a[g * ROW_GROUP * k..], k, weights, p0, depth, acc);
        }
    }
    for (i, acc) in acc.chunks_exact(TILE_COLS).enumerate().take(m) {
        let x = &a[i * k..(i + 1) * k];
        for (u, w) in weights.iter().enumerate().take(out.j1 - out.j0) {
            let sum = tail(x, w, full, reduce(&acc[u]));
            // SAFETY: only this task writes columns j0..j1 of c, inside the m×n checked by the caller.
            unsafe {
                let dst = out.c.ptr().add(i * out.n + out.j0 + u);
                *dst = if out.accumulate { *dst + sum } else { sum };
            }
        }
    }
}

/// `columns` compiled for AVX2 and FMA: widening, the lane tree and the tail vectorised or fused in hardware.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn columns_avx2<T: Widen>(isa: Isa, m: usize, k: usize, a: &[f32], b: &[T], out: Columns, scratch: Scratch) {
    columns(isa, m, k, a, b, out, scratch)
}

/// `dst = src` in f32. The tile's copy showed as 17% of a 32-prompt decode's profile as the compiler's AVX2
/// loop (8 values a step); widened 16 at a time with AVX-512 it showed as 9%.
#[inline(always)]
fn widen_row<T: Widen>(isa: Isa, src: &[T], dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512 {
        // SAFETY: the CPU runs AVX-512 (the caller checked `isa.supported()`).
        return unsafe { widen_row_avx512(src, dst) };
    }
    let _ = isa;
    dst.iter_mut().zip(src).for_each(|(d, s)| *d = s.widen());
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn widen_row_avx512<T: Widen>(src: &[T], dst: &mut [f32]) {
    let len = src.len().min(dst.len());
    let whole = len / LANES * LANES;
    for i in (0..whole).step_by(LANES) {
        _mm512_storeu_ps(dst.as_mut_ptr().add(i), load16(src.as_ptr().add(i)));
    }
    dst[whole..len].iter_mut().zip(&src[whole..len]).for_each(|(d, s)| *d = s.widen());
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

/// For the rows `r` of `xs` (row `r` at `r·k`; `acc.len() / TILE_COLS` of them) and the tile's columns `u`:
/// lane `l` of `acc[r·TILE_COLS + u]` adds `x_r[p] · w_u[p]` by fused multiply-add for `p ≡ l (mod 16)` in
/// `p0..p0 + depth` (a multiple of 16), in increasing `p`. The sums start from zero at `p0 = 0`, whatever `acc`
/// held (the scratch is reused across products and never cleared).
fn lanes<W: Widen>(isa: Isa, xs: &[f32], k: usize, weights: [&[W]; TILE_COLS], p0: usize, depth: usize, acc: &mut [Lanes]) {
    let rows = acc.len() / TILE_COLS;
    assert!(xs.len() >= (rows - 1) * k + p0 + depth && weights.iter().all(|w| w.len() == k) && p0 + depth <= k);
    #[cfg(target_arch = "x86_64")]
    {
        let w = weights.map(|w| w.as_ptr());
        match isa {
            // SAFETY: the CPU runs the set (the caller checked `isa.supported()`); the bounds are asserted above.
            Isa::Avx512 => {
                return unsafe {
                    match rows {
                        1 => lanes_avx512::<1, W>(xs.as_ptr(), k, w, p0, depth, acc),
                        2 => lanes_avx512::<2, W>(xs.as_ptr(), k, w, p0, depth, acc),
                        _ => lanes_avx512::<ROW_GROUP, W>(xs.as_ptr(), k, w, p0, depth, acc),
                    }
                };
            }
            Isa::Avx2 => return unsafe { lanes_avx2(xs.as_ptr(), k, w, p0, depth, acc) },
            Isa::Portable => {}
        }
    }
    let _ = isa;
    for (r, acc) in acc.chunks_exact_mut(TILE_COLS).enumerate() {
        let x = &xs[r * k..][p0..p0 + depth];
        for (lanes, w) in acc.iter_mut().zip(weights) {
            if p0 == 0 {
                *lanes = [0.0; LANES];
            }
            for (xc, wc) in x.chunks_exact(LANES).zip(w[p0..p0 + depth].chunks_exact(LANES)) {
                for l in 0..LANES {
                    lanes[l] = xc[l].mul_add(wc[l].widen(), lanes[l]);
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
fn tail<W: Widen>(x: &[f32], w: &[W], from: usize, mut sum: f32) -> f32 {
    for p in from..x.len() {
        sum = x[p].mul_add(w[p].widen(), sum);
    }
    sum
}

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// 16 weights as f32: loaded, or bf16 loaded and widened (a bf16 is the upper half of its f32).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn load16<W: Widen>(w: *const W) -> __m512 {
    if W::BF16 {
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(_mm256_loadu_si256(w.cast()))))
    } else {
        _mm512_loadu_ps(w.cast())
    }
}

/// 8 weights as f32, as `load16`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn load8<W: Widen>(w: *const W) -> __m256 {
    if W::BF16 {
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(_mm_loadu_si128(w.cast()))))
    } else {
        _mm256_loadu_ps(w.cast())
    }
}

/// `lanes` for R rows: R × 8 accumulators and the 8 weight vectors of a step in registers, one load of A per
/// row and step.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn lanes_avx512<const R: usize, W: Widen>(xs: *const f32, k: usize, ws: [*const W; TILE_COLS], p0: usize, depth: usize, acc: &mut [Lanes]) {
    let load = |r: usize, u: usize| if p0 == 0 { _mm512_setzero_ps() } else { _mm512_loadu_ps(acc[r * TILE_COLS + u].as_ptr()) };
    let mut sums: [[__m512; TILE_COLS]; R] = std::array::from_fn(|r| std::array::from_fn(|u| load(r, u)));
    for p in (p0..p0 + depth).step_by(LANES) {
        // R rows of A and one weight vector at a time: with all 8 weight vectors held, 3 rows' 24 sums would
        // need 33 registers of 32.
        let x: [__m512; R] = std::array::from_fn(|r| _mm512_loadu_ps(xs.add(r * k + p)));
        for (u, w) in ws.iter().enumerate() {
            let w = load16(w.add(p));
            for (sums, x) in sums.iter_mut().zip(&x) {
                sums[u] = _mm512_fmadd_ps(*x, w, sums[u]);
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
unsafe fn lanes_avx2<W: Widen>(xs: *const f32, k: usize, ws: [*const W; TILE_COLS], p0: usize, depth: usize, acc: &mut [Lanes]) {
    for (r, acc) in acc.chunks_exact_mut(TILE_COLS).enumerate() {
        for (h, half) in acc.chunks_exact_mut(TILE_COLS / 2).enumerate() {
            let u0 = h * TILE_COLS / 2;
            let load = |at: *const f32| if p0 == 0 { _mm256_setzero_ps() } else { _mm256_loadu_ps(at) };
            let mut sums: [[__m256; 2]; TILE_COLS / 2] = std::array::from_fn(|u| [load(half[u].as_ptr()), load(half[u].as_ptr().add(8))]);
            for p in (p0..p0 + depth).step_by(LANES) {
                let (x0, x1) = (_mm256_loadu_ps(xs.add(r * k + p)), _mm256_loadu_ps(xs.add(r * k + p + 8)));
                for (u, s) in sums.iter_mut().enumerate() {
                    let w = ws[u0 + u].add(p);
                    s[0] = _mm256_fmadd_ps(x0, load8(w), s[0]);
                    s[1] = _mm256_fmadd_ps(x1, load8(w.add(8)), s[1]);
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
        // The same weights in bf16 (their upper halves): read in place up to IN_PLACE_ROWS rows, widened into
        // the tile above.
        let b16: Vec<u16> = b.iter().map(|v| (v.to_bits() >> 16) as u16).collect();
        check_sets(m, k, n, &a, &b);
        check_sets(m, k, n, &a, &b16);
    }

    fn check_sets<T: Widen>(m: usize, k: usize, n: usize, a: &[f32], b: &[T]) {
        let mut want = vec![0f32; m * n];
        skinny(Isa::Portable, m, k, n, a, b, &mut want, false);
        let same = |x: &[f32], y: &[f32]| x.iter().zip(y).all(|(x, y)| x.to_bits() == y.to_bits());
        for isa in Isa::available() {
            let mut all = vec![0f32; m * n];
            skinny(isa, m, k, n, a, b, &mut all, false);
            assert!(same(&all, &want), "{} differs from portable (bf16: {})", isa.name(), T::BF16);
            for rows in [1, 3, 5, IN_PLACE_ROWS + 1] {
                let mut some = vec![0f32; rows * n];
                skinny(isa, rows, k, n, &a[(m - rows) * k..], b, &mut some, false);
                let (name, bf16) = (isa.name(), T::BF16);
                assert!(same(&some, &want[(m - rows) * n..]), "{name}: the last {rows} rows alone differ from the full batch (bf16: {bf16})");
            }
        }
    }
}
