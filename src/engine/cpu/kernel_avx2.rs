//! The AVX2+FMA micro-kernel: 6 rows × 16 columns, 12 accumulators.
use super::sgemm_x86::MicroKernel;
use std::arch::x86_64::*;

pub struct Avx2;

impl MicroKernel for Avx2 {
    const MR: usize = 6;
    const NR: usize = 16;
    /// 16 KiB B micro-panels. The AVX-512 kernel uses the same depth (bit-identical products).
    const KC: usize = 256;

    unsafe fn run(kc: usize, a: *const f32, b: *const f32, c: *mut f32, rsc: usize, alpha: f32, accumulate: bool) {
        kernel_6x16(kc, a, b, c, rsc, alpha, accumulate)
    }
}

const MR: usize = 6;
const NR: usize = 16;

/// `c[6,16] (+)= alpha · a_panel[kc,6] · b_panel[kc,16]` (packed panels, B 64-byte aligned).
#[target_feature(enable = "avx2,fma")]
unsafe fn kernel_6x16(kc: usize, a: *const f32, b: *const f32, c: *mut f32, rsc: usize, alpha: f32, accumulate: bool) {
    let mut acc = [[_mm256_setzero_ps(); 2]; MR];
    // The tile of C is read (or written) only after the k loop: ask for its lines now, so that they arrive
    // from L3 or memory while the FMAs run instead of stalling the stores.
    for i in 0..MR {
        _mm_prefetch::<_MM_HINT_T0>(c.add(i * rsc) as *const i8);
        _mm_prefetch::<_MM_HINT_T0>(c.add(i * rsc + 15) as *const i8);
    }
    let (mut a, mut b) = (a, b);
    for _ in 0..kc {
        let b0 = _mm256_load_ps(b);
        let b1 = _mm256_load_ps(b.add(8));
        for (i, row) in acc.iter_mut().enumerate() {
            let ai = _mm256_broadcast_ss(&*a.add(i));
            row[0] = _mm256_fmadd_ps(ai, b0, row[0]);
            row[1] = _mm256_fmadd_ps(ai, b1, row[1]);
        }
        a = a.add(MR);
        b = b.add(NR);
    }
    if alpha != 1.0 {
        let s = _mm256_set1_ps(alpha);
        for row in acc.iter_mut() {
            row[0] = _mm256_mul_ps(row[0], s);
            row[1] = _mm256_mul_ps(row[1], s);
        }
    }
    for (i, row) in acc.iter().enumerate() {
        let ci = c.add(i * rsc);
        if accumulate {
            _mm256_storeu_ps(ci, _mm256_add_ps(_mm256_loadu_ps(ci), row[0]));
            _mm256_storeu_ps(ci.add(8), _mm256_add_ps(_mm256_loadu_ps(ci.add(8)), row[1]));
        } else {
            _mm256_storeu_ps(ci, row[0]);
            _mm256_storeu_ps(ci.add(8), row[1]);
        }
    }
}
