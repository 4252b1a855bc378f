//! The CPU backend: explicit forward and backward kernels of the decoder over host memory, split over rayon's
//! threads, with SIMD micro-kernels picked at start-up from the CPU's instruction sets (`isa`). The only place
//! in kto with rayon, raw pointers or `std::arch`.
pub mod decoder;
pub mod gemm;
pub mod isa;
pub mod kernels;
pub mod mapped;
pub mod memory;
pub mod pool;
pub mod reference;
pub mod skinny;
pub mod update;
pub mod weights;
#[cfg(target_arch = "x86_64")]
mod kernel_avx2;
#[cfg(target_arch = "x86_64")]
mod kernel_avx512;
#[cfg(target_arch = "x86_64")]
mod sgemm_x86;
