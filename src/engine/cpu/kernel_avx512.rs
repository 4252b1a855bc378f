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

    unsafe fn run(kc: usize, a: *const f32, a_rs: usize, a_ks: usize, b: *const f32, c: *mut f32, rsc: usize, alpha: f32, accumulate: bool) {
        kernel_12x32(kc, a, a_rs, a_ks, b, c, rsc, alpha, accumulate)
    }
}

#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f")]
unsafe fn kernel_12x32(kc: usize, a: *const f32, a_rs: usize, a_ks: usize, b: *const f32, c: *mut f32, rsc: usize, alpha: f32, accumulate: bool) {
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    let (mut a, mut b) = (a, b);
    for _ in 0..kc {
        let b0 = _mm512_loadu_ps(b);
        let b1 = _mm512_loadu_ps(b.add(16));
        for (i, row) in acc.iter_mut().enumerate() {
            let ai = _mm512_set1_ps(*a.add(i * a_rs));
            row[0] = _mm512_fmadd_ps(ai, b0, row[0]);
            row[1] = _mm512_fmadd_ps(ai, b1, row[1]);
        }
        a = a.add(a_ks);
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
