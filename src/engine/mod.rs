//! The compute engine: explicit forward and backward kernels of the decoder on the CPU. Knows nothing of KTO.
pub mod buffers;
pub mod decoder;
pub mod gemm;
pub mod isa;
pub mod kernels;
pub mod reference;
pub mod update;
#[cfg(target_arch = "x86_64")]
mod sgemm_avx2;

pub use decoder::{
    backward, extend_kv, forward, Pass, forward_continuation, forward_logits, forward_with_cache, ContinuationBatch, KvCache, PrefixCache, ScoredOutput, SeqBatch, Tape,
};
