//! SGEMM for x86-64, BLIS-style: B is packed into NR-column panels, A into MR-row panels, and a register-blocked
//! micro-kernel does the work: 6×16 with AVX2+FMA (12 accumulators, two B loads and six broadcasts per k),
//! 12×32 with AVX-512 (24 accumulators of 16 lanes). matrixmultiply's 8×8 kernel needs nine loads per eight FMAs
//! and stops near 70% of the FMA peak on a 2-core EPYC; these are FMA-bound. The driver (blocking, packing,
//! threads) is one generic function over the `MicroKernel`.
//!
//! B is packed into cache-line-aligned buffers (a 64-byte load split across two lines costs a second load on
//! Intel). A with contiguous rows (activations, all forward products) is read in place: packing it would cost
//! a transpose of every element per block, up to a tenth of the time when B is narrow; other layouts, and
//! the last partial panel of rows, are packed.
//!
//! Only `c = a·b + beta·c` with beta 0 or 1 is needed by the engine.
#![cfg(target_arch = "x86_64")]

use std::arch::x86_64::*;
use super::kernels::SharedMut;
use super::weights::Widen;
use rayon::prelude::*;
use std::cell::RefCell;
use std::sync::Mutex;

/// Most rows of A one task packs (with KC, under 200 KiB): they stay in L2 while every B micro-panel of the
/// block passes over them.
const MC: usize = 192;
/// Columns of B packed at once (KC×NC floats, 1 MiB a block, shared by the threads in L3).
const NC: usize = 1024;
/// KC blocks of B packed at once (8 MiB at NC columns and KC 256). The threads meet twice per span of blocks
/// (after packing B, after multiplying), not twice per block.
const SPAN_BLOCKS: usize = 8;
/// The largest MR×NR tile of any kernel (edge tiles are computed into one of these).
const MAX_TILE: usize = 12 * 32;

/// A register-blocked `c[MR,NR] (+)= alpha · a_panel[kc,MR] · b_panel[kc,NR]`.
pub trait MicroKernel {
    const MR: usize;
    const NR: usize;
    /// Depth of one packed block: a B micro-panel (KC×NR floats) stays in L1.
    const KC: usize;
    /// `a` is a packed panel, element (i, p) at `a[p*MR + i]`; `b` a packed panel on a 64-byte boundary, element
    /// (p, j) at `b[p*NR + j]`; `c` has row stride `rsc`.
    ///
    /// # Safety
    /// The CPU runs the kernel's instruction set; the pointers address MR×kc, kc×NR and MR×NR valid elements.
    unsafe fn run(kc: usize, a: *const f32, b: *const f32, c: *mut f32, rsc: usize, alpha: f32, accumulate: bool);
    /// `run` with A's rows read in place: element (i, p) at `a[i*a_rs + p]`.
    ///
    /// # Safety
    /// As `run`.
    #[allow(clippy::too_many_arguments)]
    unsafe fn run_direct(kc: usize, a: *const f32, a_rs: usize, b: *const f32, c: *mut f32, rsc: usize, alpha: f32, accumulate: bool);
}

thread_local! {
    static PACK_A: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// Packed B of single-threaded products (the many small ones inside attention tasks, and each thread's
    /// columns of a wide product): no lock.
    static PACK_B: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Packed-B buffers shared by the threads of one product, taken and returned by each product (a pool, not a
/// thread-local: a thread waiting for its tasks may run another product's task).
static PACK_B_POOL: Mutex<Vec<Vec<f32>>> = Mutex::new(Vec::new());

/// Read-only pointer that tasks may share.
struct SharedConst<T>(*const T);
impl<T> Clone for SharedConst<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for SharedConst<T> {}
// SAFETY: only read, while the owner waits for the tasks.
unsafe impl<T> Send for SharedConst<T> {}
unsafe impl<T> Sync for SharedConst<T> {}
impl<T> SharedConst<T> {
    fn ptr(self) -> *const T {
        self.0
    }
}

/// What B may be stored as: f32, or bf16 (frozen weights), widened to f32 exactly while it is packed, so the
/// product is the one of the widened values, bit for bit.
pub trait PackSource: Widen {
    /// The eight elements at `p` in f32.
    ///
    /// # Safety
    /// The CPU runs AVX2; `p` addresses eight valid elements.
    unsafe fn load8(p: *const Self) -> __m256;
    /// `dst[..len] = src[..len]` in f32.
    ///
    /// # Safety
    /// The CPU runs AVX2; both address `len` valid elements and do not overlap.
    unsafe fn copy_widened(src: *const Self, dst: *mut f32, len: usize);
}

impl PackSource for f32 {
    #[inline(always)]
    unsafe fn load8(p: *const f32) -> __m256 {
        _mm256_loadu_ps(p)
    }
    #[inline(always)]
    unsafe fn copy_widened(src: *const f32, dst: *mut f32, len: usize) {
        std::ptr::copy_nonoverlapping(src, dst, len)
    }
}

impl PackSource for u16 {
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn load8(p: *const u16) -> __m256 {
        let halves = _mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i));
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(halves))
    }
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn copy_widened(src: *const u16, dst: *mut f32, len: usize) {
        let whole = len / 8 * 8;
        for i in (0..whole).step_by(8) {
            _mm256_storeu_ps(dst.add(i), Self::load8(src.add(i)));
        }
        for i in whole..len {
            *dst.add(i) = (*src.add(i)).widen();
        }
    }
}

/// `c[m,n] = alpha·a·b + (accumulate ? c : 0)` on strided views (element (i,j) of a at `a[i*rsa + j*csa]`, likewise
/// b; c row-major with row stride `rsc`), on the rayon threads when `parallel`.
///
/// A wide product (the vocabulary projection, gate|up) gives each thread its own columns, which it packs and
/// multiplies alone: no thread waits for another, and one thread's packing (from memory) overlaps the
/// other's arithmetic. Otherwise B is packed once per block and shared, and the threads split the rows.
///
/// # Safety
/// The CPU must run the kernel's instruction set; the pointers with their strides must address valid memory for the shapes, and
/// no other thread may touch the elements of `c` meanwhile.
#[allow(clippy::too_many_arguments)]
pub unsafe fn sgemm<K: MicroKernel, T: PackSource>(
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
    let threads = if parallel { rayon::current_num_threads() } else { 1 };
    let view = View { m, k, a: SharedConst(a), rsa, csa, rsb, csb, alpha, accumulate, rsc };
    if threads > 1 && n >= threads * NC {
        let cols = n.div_ceil(threads).next_multiple_of(K::NR);
        let (b, c) = (SharedConst(b), SharedMut(c));
        (0..threads).into_par_iter().for_each(|t| {
            let j0 = t * cols;
            if j0 < n {
                // SAFETY: thread t writes only columns j0..j0+cols of c; b's columns j0.. lie inside b.
                unsafe { blocked::<K, T>(&view, cols.min(n - j0), b.ptr().add(j0 * csb), c.ptr().add(j0), 1) };
            }
        });
    } else {
        blocked::<K, T>(&view, n, b, c, threads);
    }
}

/// The parts of a product that do not change when its columns are split.
struct View {
    m: usize,
    k: usize,
    a: SharedConst<f32>,
    rsa: usize,
    csa: usize,
    rsb: usize,
    csb: usize,
    alpha: f32,
    accumulate: bool,
    rsc: usize,
}

/// The blocked product of `v`'s rows with `n` columns of B (at `b`) into `c`, on `threads` rayon threads (1: on
/// this thread). Per block of NC columns and SPAN_BLOCKS·KC depth: B is packed (by all threads), then tasks, each a run
/// of whole micro-panels of rows (and, when there are few rows, a group of B panels), pack their A one KC
/// block at a time and multiply. Tasks are equal to within one micro-panel and a multiple of the threads in number, so that the
/// threads finish together.
unsafe fn blocked<K: MicroKernel, T: PackSource>(v: &View, n: usize, b: *const T, c: *mut f32, threads: usize) {
    let (m, k, mr_k, nr_k) = (v.m, v.k, K::MR, K::NR);
    let mut pb = if threads > 1 {
        PACK_B_POOL.lock().unwrap_or_else(|e| e.into_inner()).pop().unwrap_or_default()
    } else {
        PACK_B.with(|p| std::mem::take(&mut *p.borrow_mut()))
    };
    let (a, b, c) = (v.a, SharedConst(b), SharedMut(c));
    let micro_rows = m.div_ceil(mr_k);
    let direct_a = v.csa == 1;
    let wanted = m.div_ceil(MC).next_multiple_of(threads);
    let row_parts = wanted.min(micro_rows);
    // Shared B is not cut into NC-column blocks: each B micro-panel is read by each task once per span either
    // way, and cutting would make the threads meet twice more per block (the products that share B have
    // fewer than threads·NC columns).
    let block_cols = if threads > 1 { n } else { NC };
    for jc in (0..n).step_by(block_cols) {
        let nc = block_cols.min(n - jc);
        let panels = nc.div_ceil(nr_k);
        let groups = wanted.div_ceil(row_parts).min(panels);
        for span in (0..k).step_by(SPAN_BLOCKS * K::KC) {
            // The span's B blocks, one after another: block q (depth span + q·KC) at q·panels·NR·KC.
            let depth = (SPAN_BLOCKS * K::KC).min(k - span);
            let blocks = depth.div_ceil(K::KC);
            let block_floats = panels * nr_k * K::KC;
            let packed_b = SharedMut(aligned(&mut pb, blocks * block_floats));
            let pack_one = |t: usize| {
                let (q, panel) = (t / panels, t % panels);
                let (pc, j0) = (span + q * K::KC, panel * nr_k);
                let kc = K::KC.min(k - pc);
                let src = b.ptr().add(pc * v.rsb + (jc + j0) * v.csb);
                pack_panel(kc, nr_k.min(nc - j0), nr_k, src, v.csb, v.rsb, packed_b.ptr().add(q * block_floats + panel * nr_k * kc));
            };
            if threads > 1 {
                (0..blocks * panels).into_par_iter().with_min_len(4).for_each(pack_one);
            } else {
                (0..blocks * panels).for_each(pack_one);
            }
            let task = |t: usize| {
                let (part, g) = (t / groups, t % groups);
                // Micro-panels [p0, p1) of rows, B panels [first, last): balanced splits.
                let (p0, p1) = (part * micro_rows / row_parts, (part + 1) * micro_rows / row_parts);
                let (first, last) = (g * panels / groups, (g + 1) * panels / groups);
                let (ic, mc) = (p0 * mr_k, (p1 * mr_k).min(m) - p0 * mr_k);
                PACK_A.with(|pa| {
                    let mut pa = pa.borrow_mut();
                    let pa = aligned(&mut pa, (p1 - p0) * mr_k * K::KC);
                    let mut tile = [0f32; MAX_TILE];
                    for q in 0..blocks {
                        let pc = span + q * K::KC;
                        let kc = K::KC.min(k - pc);
                        let acc = v.accumulate || pc > 0;
                        for (panel, i0) in (0..mc).step_by(mr_k).enumerate() {
                            if direct_a && i0 + mr_k <= mc {
                                continue;
                            }
                            let src = a.ptr().add((ic + i0) * v.rsa + pc * v.csa);
                            pack_panel(kc, mr_k.min(mc - i0), mr_k, src, v.rsa, v.csa, pa.add(panel * mr_k * kc));
                        }
                        for panel in first..last {
                            let jr = panel * nr_k;
                            let nr = nr_k.min(nc - jr);
                            let bp = packed_b.ptr().add(q * block_floats + panel * nr_k * kc) as *const f32;
                            for ir in (0..mc).step_by(mr_k) {
                                let mr = mr_k.min(mc - ir);
                                // SAFETY: the task writes only its rows ic..ic+mc, columns of its panels.
                                let cp = c.ptr().add((ic + ir) * v.rsc + jc + jr);
                                let edge = mr < mr_k || nr < nr_k;
                                // An edge tile is computed into a full tile and its valid part copied out.
                                let (dst, rs_dst, acc_dst) = if edge { (tile.as_mut_ptr(), nr_k, false) } else { (cp, v.rsc, acc) };
                                if direct_a && mr == mr_k {
                                    K::run_direct(kc, a.ptr().add((ic + ir) * v.rsa + pc), v.rsa, bp, dst, rs_dst, v.alpha, acc_dst);
                                } else {
                                    K::run(kc, pa.add(ir * kc), bp, dst, rs_dst, v.alpha, acc_dst);
                                }
                                if edge {
                                    for i in 0..mr {
                                        for j in 0..nr {
                                            let dst = cp.add(i * v.rsc + j);
                                            *dst = if acc { *dst + tile[i * nr_k + j] } else { tile[i * nr_k + j] };
                                        }
                                    }
                                }
                            }
                        }
                    }
                });
            };
            if threads > 1 {
                (0..row_parts * groups).into_par_iter().for_each(task);
            } else {
                (0..row_parts * groups).for_each(task);
            }
        }
    }
    if threads > 1 {
        PACK_B_POOL.lock().unwrap_or_else(|e| e.into_inner()).push(pb);
    } else {
        PACK_B.with(|p| *p.borrow_mut() = pb);
    }
}

/// A pointer to `len` floats of `buf` at a 64-byte boundary (grown as needed): packed panels aligned to cache
/// lines, so that no 64-byte load of the kernel splits across two lines (which costs a second load on Intel).
fn aligned(buf: &mut Vec<f32>, len: usize) -> *mut f32 {
    const LINE_FLOATS: usize = 16;
    if buf.len() < len + LINE_FLOATS {
        buf.resize(len + LINE_FLOATS, 0.0);
    }
    let offset = buf.as_ptr().align_offset(64);
    // SAFETY: offset < LINE_FLOATS, and the buffer holds len + LINE_FLOATS floats.
    unsafe { buf.as_mut_ptr().add(offset) }
}

/// Writes `dst[p*width + j] = src[j*lane_stride + p*depth_stride]` for `j < lanes` (zero for `lanes..width`),
/// `p < kc`: the one packing loop of both operands, with a fast path for each memory order.
unsafe fn pack_panel<T: PackSource>(kc: usize, lanes: usize, width: usize, src: *const T, lane_stride: usize, depth_stride: usize, dst: *mut f32) {
    if lanes < width {
        std::ptr::write_bytes(dst, 0, kc * width);
    }
    if lane_stride == 1 {
        // The lanes are contiguous: one copy per depth step (of a constant length when full, so that it is
        // two vector moves rather than a call to memmove).
        if lanes == 16 && width == 16 {
            for p in 0..kc {
                T::copy_widened(src.add(p * depth_stride), dst.add(p * width), 16);
            }
        } else if lanes == 32 && width == 32 {
            for p in 0..kc {
                T::copy_widened(src.add(p * depth_stride), dst.add(p * width), 32);
            }
        } else {
            for p in 0..kc {
                T::copy_widened(src.add(p * depth_stride), dst.add(p * width), lanes);
            }
        }
    } else if depth_stride == 1 {
        // Each lane is a contiguous row: a transpose. Whole 8×8 blocks go through AVX registers.
        let blocks = lanes / 8;
        let depth8 = kc / 8 * 8;
        for g in 0..blocks {
            for p in (0..depth8).step_by(8) {
                transpose_8x8(src.add(g * 8 * lane_stride + p), lane_stride, dst.add(p * width + g * 8), width);
            }
        }
        for j in 0..lanes {
            let s = src.add(j * lane_stride);
            let first = if j < blocks * 8 { depth8 } else { 0 };
            for p in first..kc {
                *dst.add(p * width + j) = (*s.add(p)).widen();
            }
        }
    } else {
        for p in 0..kc {
            for j in 0..lanes {
                *dst.add(p * width + j) = (*src.add(j * lane_stride + p * depth_stride)).widen();
            }
        }
    }
}

/// `dst[q*rsd + r] = src[r*rss + q]` for r, q < 8.
#[target_feature(enable = "avx2")]
unsafe fn transpose_8x8<T: PackSource>(src: *const T, rss: usize, dst: *mut f32, rsd: usize) {
    let r: [__m256; 8] = std::array::from_fn(|i| T::load8(src.add(i * rss)));
    let t0 = _mm256_unpacklo_ps(r[0], r[1]);
    let t1 = _mm256_unpackhi_ps(r[0], r[1]);
    let t2 = _mm256_unpacklo_ps(r[2], r[3]);
    let t3 = _mm256_unpackhi_ps(r[2], r[3]);
    let t4 = _mm256_unpacklo_ps(r[4], r[5]);
    let t5 = _mm256_unpackhi_ps(r[4], r[5]);
    let t6 = _mm256_unpacklo_ps(r[6], r[7]);
    let t7 = _mm256_unpackhi_ps(r[6], r[7]);
    let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
    let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
    let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
    let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
    let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
    let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
    let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
    let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
    let out = [
        _mm256_permute2f128_ps::<0x20>(u0, u4),
        _mm256_permute2f128_ps::<0x20>(u1, u5),
        _mm256_permute2f128_ps::<0x20>(u2, u6),
        _mm256_permute2f128_ps::<0x20>(u3, u7),
        _mm256_permute2f128_ps::<0x31>(u0, u4),
        _mm256_permute2f128_ps::<0x31>(u1, u5),
        _mm256_permute2f128_ps::<0x31>(u2, u6),
        _mm256_permute2f128_ps::<0x31>(u3, u7),
    ];
    for (q, v) in out.iter().enumerate() {
        _mm256_storeu_ps(dst.add(q * rsd), *v);
    }
}

