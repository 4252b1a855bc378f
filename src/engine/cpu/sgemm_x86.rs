//! SGEMM for x86-64, BLIS-style: B is packed into NR-column panels, A into MR-row panels, and a register-blocked
//! micro-kernel does the work: 6×16 with AVX2+FMA (12 accumulators, two B loads and six broadcasts per k),
//! 12×32 with AVX-512 (24 accumulators of 16 lanes). matrixmultiply's 8×8 kernel needs nine loads per eight FMAs
//! and stops near 70% of the FMA peak on a 2-core EPYC; these are FMA-bound. The driver (blocking, packing,
//! threads) is one generic function over the `MicroKernel`.
//!
//! Only `c = a·b + beta·c` with beta 0 or 1 is needed by the engine.
#![cfg(target_arch = "x86_64")]

use std::arch::x86_64::*;
use super::kernels::SharedMut;
use rayon::prelude::*;
use std::cell::RefCell;
use std::sync::Mutex;

/// Rows of A packed at once (MC×KC floats, under 100 KiB): stays in L2 while every B micro-panel passes over it.
/// A multiple of every kernel's MR.
const MC: usize = 96;
/// Columns of B packed at once (KC×NC floats, about 1 MiB, shared by the threads in L3).
const NC: usize = 1024;
/// The largest MR×NR tile of any kernel (edge tiles are computed into one of these).
const MAX_TILE: usize = 12 * 32;

/// A register-blocked `c[MR,NR] (+)= alpha · a[MR,kc] · b_panel[kc,NR]`.
pub trait MicroKernel {
    const MR: usize;
    const NR: usize;
    /// Depth of one packed block: a B micro-panel (KC×NR floats) stays in L1.
    const KC: usize;
    /// Element (i, p) of `a` is at `a[i*a_rs + p*a_ks]` (a packed panel (1, MR), or rows read in place (row
    /// stride, 1)); `b` is a packed panel, row p at `b[p*NR]`; `c` has row stride `rsc`.
    ///
    /// # Safety
    /// The CPU runs the kernel's instruction set; the pointers address MR×kc, kc×NR and MR×NR valid elements.
    #[allow(clippy::too_many_arguments)]
    unsafe fn run(kc: usize, a: *const f32, a_rs: usize, a_ks: usize, b: *const f32, c: *mut f32, rsc: usize, alpha: f32, accumulate: bool);
}

thread_local! {
    static PACK_A: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// Packed B of single-threaded products (the many small ones inside attention tasks): no lock.
    static PACK_B: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Packed-B buffers, taken and returned by each product (a pool, not a thread-local: a thread waiting for its
/// tasks may run another product's task).
static PACK_B_POOL: Mutex<Vec<Vec<f32>>> = Mutex::new(Vec::new());

/// Read-only pointer that tasks may share.
#[derive(Clone, Copy)]
struct SharedConst(*const f32);
// SAFETY: only read, while the owner waits for the tasks.
unsafe impl Send for SharedConst {}
unsafe impl Sync for SharedConst {}
impl SharedConst {
    fn ptr(self) -> *const f32 {
        self.0
    }
}

/// `c[m,n] = alpha·a·b + (accumulate ? c : 0)` on strided views (element (i,j) of a at `a[i*rsa + j*csa]`, likewise
/// b; c row-major with row stride `rsc`). With `parallel`, B is packed once per block and the rayon threads
/// share it, each packing and multiplying its own rows of A.
///
/// # Safety
/// The CPU must run the kernel's instruction set; the pointers with their strides must address valid memory for the shapes, and
/// no other thread may touch the elements of `c` meanwhile.
#[allow(clippy::too_many_arguments)]
pub unsafe fn sgemm<K: MicroKernel>(
    m: usize,
    k: usize,
    n: usize,
    a: *const f32,
    rsa: usize,
    csa: usize,
    b: *const f32,
    rsb: usize,
    csb: usize,
    alpha: f32,
    accumulate: bool,
    c: *mut f32,
    rsc: usize,
    parallel: bool,
) {
    let mut pb = if parallel {
        PACK_B_POOL.lock().unwrap_or_else(|e| e.into_inner()).pop().unwrap_or_default()
    } else {
        PACK_B.with(|p| std::mem::take(&mut *p.borrow_mut()))
    };
    let (a, b, c) = (SharedConst(a), SharedConst(b), SharedMut(c));
    let threads = if parallel { rayon::current_num_threads() } else { 1 };
    for jc in (0..n).step_by(NC) {
        let nc = NC.min(n - jc);
        let (mr_k, nr_k) = (K::MR, K::NR);
        let panels = nc.div_ceil(nr_k);
        for pc in (0..k).step_by(K::KC) {
            let kc = K::KC.min(k - pc);
            let acc = accumulate || pc > 0;
            pb.resize(panels * nr_k * kc, 0.0);
            let pack_ptr = SharedMut(pb.as_mut_ptr());
            let pack_one = |panel: usize| {
                let j0 = panel * nr_k;
                let src = b.ptr().add(pc * rsb + (jc + j0) * csb);
                pack_panel(kc, nr_k.min(nc - j0), nr_k, src, csb, rsb, pack_ptr.ptr().add(panel * nr_k * kc));
            };
            if threads > 1 {
                (0..panels).into_par_iter().with_min_len(4).for_each(pack_one);
            } else {
                (0..panels).for_each(pack_one);
            }
            // Tasks: blocks of MC rows × groups of B panels, at least four per thread for balance.
            let row_blocks = m.div_ceil(MC);
            let groups = if threads > 1 { (4 * threads).div_ceil(row_blocks).min(panels) } else { 1 };
            let per_group = panels.div_ceil(groups);
            let packed_b = SharedConst(pb.as_ptr());
            let task = |t: usize| {
                let (ib, g) = (t / groups, t % groups);
                let (ic, mc) = (ib * MC, MC.min(m - ib * MC));
                let first = g * per_group;
                let last = panels.min(first + per_group);
                if first >= last {
                    return;
                }
                // A with contiguous rows is read in place (six row streams stay in L1 beside the B panel);
                // other layouts, and the last partial panel of rows, are packed first.
                let direct_a = csa == 1;
                PACK_A.with(|pa| {
                    let mut pa = pa.borrow_mut();
                    let packed_rows = if direct_a { mr_k } else { mc.div_ceil(mr_k) * mr_k };
                    pa.resize(packed_rows * kc, 0.0);
                    if !direct_a {
                        for (panel, i0) in (0..mc).step_by(mr_k).enumerate() {
                            let src = a.ptr().add((ic + i0) * rsa + pc * csa);
                            pack_panel(kc, mr_k.min(mc - i0), mr_k, src, rsa, csa, pa.as_mut_ptr().add(panel * mr_k * kc));
                        }
                    }
                    // The partial panel of rows (direct A only): packed once, zero-padded to MR rows.
                    let tail = mc % mr_k;
                    if direct_a && tail != 0 {
                        let src = a.ptr().add((ic + mc - tail) * rsa + pc);
                        pack_panel(kc, tail, mr_k, src, rsa, 1, pa.as_mut_ptr());
                    }
                    for panel in first..last {
                        let jr = panel * nr_k;
                        let nr = nr_k.min(nc - jr);
                        let bp = packed_b.ptr().add(panel * nr_k * kc);
                        for ir in (0..mc).step_by(mr_k) {
                            let mr = mr_k.min(mc - ir);
                            // (pointer to element (ir, 0) of this block, row step, depth step)
                            let (ap, a_rs, a_ks) = if !direct_a {
                                (pa.as_ptr().add(ir * kc), 1, mr_k)
                            } else if mr == mr_k {
                                (a.ptr().add((ic + ir) * rsa + pc), rsa, 1)
                            } else {
                                (pa.as_ptr(), 1, mr_k)
                            };
                            // SAFETY: task (ib, g) writes only rows ic..ic+mc, columns of its panels.
                            let cp = c.ptr().add((ic + ir) * rsc + jc + jr);
                            if mr == mr_k && nr == nr_k {
                                K::run(kc, ap, a_rs, a_ks, bp, cp, rsc, alpha, acc);
                            } else {
                                // Edge tile: compute into a full tile, copy the valid part.
                                let mut tile = [0f32; MAX_TILE];
                                K::run(kc, ap, a_rs, a_ks, bp, tile.as_mut_ptr(), nr_k, alpha, false);
                                for i in 0..mr {
                                    for j in 0..nr {
                                        let dst = cp.add(i * rsc + j);
                                        *dst = if acc { *dst + tile[i * nr_k + j] } else { tile[i * nr_k + j] };
                                    }
                                }
                            }
                        }
                    }
                });
            };
            if threads > 1 {
                (0..row_blocks * groups).into_par_iter().for_each(task);
            } else {
                (0..row_blocks * groups).for_each(task);
            }
        }
    }
    if parallel {
        PACK_B_POOL.lock().unwrap_or_else(|e| e.into_inner()).push(pb);
    } else {
        PACK_B.with(|p| *p.borrow_mut() = pb);
    }
}

/// Writes `dst[p*width + j] = src[j*lane_stride + p*depth_stride]` for `j < lanes` (zero for `lanes..width`),
/// `p < kc`: the one packing loop of both operands, with a fast path for each memory order.
unsafe fn pack_panel(kc: usize, lanes: usize, width: usize, src: *const f32, lane_stride: usize, depth_stride: usize, dst: *mut f32) {
    if lanes < width {
        std::ptr::write_bytes(dst, 0, kc * width);
    }
    if lane_stride == 1 {
        // The lanes are contiguous: one copy per depth step (of a constant length when full, so that it is
        // two vector moves rather than a call to memmove).
        if lanes == 16 && width == 16 {
            for p in 0..kc {
                std::ptr::copy_nonoverlapping(src.add(p * depth_stride), dst.add(p * width), 16);
            }
        } else if lanes == 32 && width == 32 {
            for p in 0..kc {
                std::ptr::copy_nonoverlapping(src.add(p * depth_stride), dst.add(p * width), 32);
            }
        } else {
            for p in 0..kc {
                std::ptr::copy_nonoverlapping(src.add(p * depth_stride), dst.add(p * width), lanes);
            }
        }
    } else if depth_stride == 1 {
        // Each lane is a contiguous row: a transpose. Whole 8×8 blocks go through AVX registers.
        let blocks = if width % 8 == 0 { lanes / 8 } else { 0 };
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
                *dst.add(p * width + j) = *s.add(p);
            }
        }
    } else {
        for p in 0..kc {
            for j in 0..lanes {
                *dst.add(p * width + j) = *src.add(j * lane_stride + p * depth_stride);
            }
        }
    }
}

/// `dst[q*rsd + r] = src[r*rss + q]` for r, q < 8.
#[target_feature(enable = "avx2")]
unsafe fn transpose_8x8(src: *const f32, rss: usize, dst: *mut f32, rsd: usize) {
    let r: [__m256; 8] = std::array::from_fn(|i| _mm256_loadu_ps(src.add(i * rss)));
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

