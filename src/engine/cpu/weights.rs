//! A model's weights as the CPU backend reads them: f32 (what trains), or bf16 (frozen weights kept in their
//! checkpoint's dtype, half the memory). bf16 widens to f32 exactly, so a product with bf16 weights gives the
//! bits the same product with their f32 values gives: the GEMM widens them while packing (`gemm::gemm_w`),
//! decoding reads them in place, and small tensors (norms, biases, embedding rows) are widened when read.
use std::borrow::Cow;

/// The flat parameter buffer of a model, or a part of it from some offset on.
#[derive(Clone, Copy)]
pub enum Weights<'a> {
    F32(&'a [f32]),
    Bf16(&'a [u16]),
}

/// An element that widens to f32 exactly.
pub trait Widen: Copy + Send + Sync + 'static {
    /// Whether the element is a bf16 (`u16`), else an f32: kernels that load vectors pick their load by it.
    const BF16: bool;
    fn widen(self) -> f32;
}

impl Widen for f32 {
    const BF16: bool = false;
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
}

impl Widen for u16 {
    const BF16: bool = true;
    /// A bf16 is the upper half of the f32 of the same value.
    #[inline(always)]
    fn widen(self) -> f32 {
        f32::from_bits((self as u32) << 16)
    }
}

/// `v` as a bf16, when that is exactly `v` (its low 16 bits are zero).
pub fn exact_bf16(v: f32) -> Option<u16> {
    let bits = v.to_bits();
    (bits & 0xFFFF == 0).then_some((bits >> 16) as u16)
}

impl<'a> Weights<'a> {
    pub fn len(self) -> usize {
        match self {
            Weights::F32(w) => w.len(),
            Weights::Bf16(w) => w.len(),
        }
    }

    pub fn is_empty(self) -> bool {
        self.len() == 0
    }

    /// The weights from `offset` on.
    pub fn at(self, offset: usize) -> Weights<'a> {
        match self {
            Weights::F32(w) => Weights::F32(&w[offset..]),
            Weights::Bf16(w) => Weights::Bf16(&w[offset..]),
        }
    }

    /// The `len` weights at `offset`.
    pub fn slice(self, offset: usize, len: usize) -> Weights<'a> {
        match self {
            Weights::F32(w) => Weights::F32(&w[offset..][..len]),
            Weights::Bf16(w) => Weights::Bf16(&w[offset..][..len]),
        }
    }

    /// The `len` weights at `offset` in f32: borrowed, or widened (for small tensors: norms, biases).
    pub fn f32s(self, offset: usize, len: usize) -> Cow<'a, [f32]> {
        match self {
            Weights::F32(w) => Cow::Borrowed(&w[offset..][..len]),
            Weights::Bf16(w) => Cow::Owned(w[offset..][..len].iter().map(|v| v.widen()).collect()),
        }
    }

    /// Writes the `dst.len()` weights at `offset` into `dst` (an embedding row).
    pub fn copy_into(self, offset: usize, dst: &mut [f32]) {
        let len = dst.len();
        match self {
            Weights::F32(w) => dst.copy_from_slice(&w[offset..][..len]),
            Weights::Bf16(w) => dst.iter_mut().zip(&w[offset..][..len]).for_each(|(d, s)| *d = s.widen()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_round_trips_only_values_it_holds() {
        for v in [0.0f32, -0.0, 1.0, -2.5, 2f32.powi(127), f32::INFINITY, f32::from_bits(0x0001_0000)] {
            let b = exact_bf16(v).expect("a bf16 value");
            assert_eq!(b.widen().to_bits(), v.to_bits());
        }
        assert_eq!(exact_bf16(1.0 + f32::EPSILON), None);
        assert_eq!(exact_bf16(0.1), None);
    }
}
