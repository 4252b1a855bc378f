//! The AVX-512 micro-kernel: 12 rows × 32 columns, 24 accumulators of 16 lanes (of the 32 zmm registers, two
//! hold the B row and one the broadcast A element).
use super::sgemm_x86::MicroKernel;
use std::arch::x86_64::*;

pub struct Avx512;

const MR: usize = 12;
const NR: usize = 32;

impl MicroKernel for Avx512 {
    const MR: usize = MR;
    const NR: usize = NR;
    /// The AVX2 kernel's depth, so that every element of C is the same chain of FMAs in the same order and the
    /// two sets give bit-identical products (the demo's table does not depend on the CPU). 32 KiB B panels.
    const KC: usize = 256;

    unsafe fn run(kc: usize, a: *const f32, b: *const f32, c: *mut f32, rsc: usize, alpha: f32, accumulate: bool) {
        kernel_12x32::<false>(kc, a, 0, b, c, rsc, alpha, accumulate)
    }

    unsafe fn run_direct(kc: usize, a: *const f32, a_rs: usize, b: *const f32, c: *mut f32, rsc: usize, alpha: f32, accumulate: bool) {
        kernel_12x32::<true>(kc, a, a_rs, b, c, rsc, alpha, accumulate)
    }
}

/// One k step: `acc[i] += a(i, u) · b row u`, where row i of A is at `rows[i]` and `ks` apart in depth.
macro_rules! step {
    ($acc:ident, $rows:ident, $u:expr, $ks:ident, $b:ident) => {
        let b0 = _mm512_load_ps($b.add($u * NR));
        let b1 = _mm512_load_ps($b.add($u * NR + 16));
        for (i, row) in $acc.iter_mut().enumerate() {
            let ai = _mm512_set1_ps(*$rows[i].add($u * $ks));
            row[0] = _mm512_fmadd_ps(ai, b0, row[0]);
            row[1] = _mm512_fmadd_ps(ai, b1, row[1]);
        }
    };
}

/// `c[12,32] (+)= alpha · a[12,kc] · b_panel[kc,32]` (B packed, 64-byte aligned). A is a packed panel (element
/// (i, p) at `a[p*12 + i]`) or, with `DIRECT`, rows read in place `a_rs` apart. k is unrolled by four so that
/// the twelve row addresses are formed once per four steps: forming them in every step chains eleven
/// dependent adds through it, as long as its 24 FMAs take.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f")]
unsafe fn kernel_12x32<const DIRECT: bool>(kc: usize, a: *const f32, a_rs: usize, b: *const f32, c: *mut f32, rsc: usize, alpha: f32, accumulate: bool) {
    // (row step, depth step) of A
    let (rs, ks) = if DIRECT { (a_rs, 1) } else { (1, MR) };
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    // The tile of C is read (or written) only after the k loop: ask for its lines now, so that they arrive
    // from L3 or memory while the FMAs run instead of stalling the stores.
    for i in 0..MR {
        _mm_prefetch::<_MM_HINT_T0>(c.add(i * rsc) as *const i8);
        _mm_prefetch::<_MM_HINT_T0>(c.add(i * rsc + 16) as *const i8);
    }
    let (mut a, mut b) = (a, b);
    for _ in 0..kc / 4 {
        let rows: [*const f32; MR] = std::array::from_fn(|i| a.add(i * rs));
        for u in 0..4 {
            step!(acc, rows, u, ks, b);
        }
        a = a.add(4 * ks);
        b = b.add(4 * NR);
    }
    for _ in 0..kc % 4 {
        let rows: [*const f32; MR] = std::array::from_fn(|i| a.add(i * rs));
        step!(acc, rows, 0, ks, b);
        a = a.add(ks);
        b = b.add(NR);
    }
    if alpha != 1.0 {
        let s = _mm512_set1_ps(alpha);
        for row in acc.iter_mut() {
            row[0] = _mm512_mul_ps(row[0], s);
            row[1] = _mm512_mul_ps(row[1], s);
        }
    }
    for (i, row) in acc.iter().enumerate() {
        let ci = c.add(i * rsc);
        if accumulate {
            _mm512_storeu_ps(ci, _mm512_add_ps(_mm512_loadu_ps(ci), row[0]));
            _mm512_storeu_ps(ci.add(16), _mm512_add_ps(_mm512_loadu_ps(ci.add(16)), row[1]));
        } else {
            _mm512_storeu_ps(ci, row[0]);
            _mm512_storeu_ps(ci.add(16), row[1]);
        }
    }
}
