//! kto: KTO alignment of causal language models, matching TRL's `KTOTrainer`, on its own CPU engine.
//!
//! The flow, one module a stage: `config` → `data` (rows → formatted → tokenized → KL pairs → batches) →
//! `model` (Hugging Face folder ↔ flat parameters) → `engine` (forward/backward kernels) → `objective`
//! (sequence log-probs → KTO loss and metrics) → `optim` → `train` (the only place that knows the order).
//! Around the run: `output` (the output folder's lock and whole-unit writes), `checkpoint` and `run_identity`
//! (what a resume may continue), `tensorboard`, `dist` (MPI ranks), `generate` (sampling). The `kto` binary's
//! commands live outside the library, in `src/app`.
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod dist;
pub mod engine;
pub mod error;
pub mod fault;
pub mod files;
pub mod fingerprint;
pub mod generate;
pub mod hub;
pub mod model;
pub mod objective;
pub mod optim;
pub mod output;
pub mod rng;
pub mod run_identity;
pub mod schedule;
pub mod tensorboard;
pub mod train;

pub use error::{Error, Result};
