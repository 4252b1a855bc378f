//! The trainer: the one place that knows the order of things. Loads everything, prepares the data, runs
//! micro-batches (policy KL forward, policy forward, reference forwards, objective, backward), accumulates,
//! clips, steps the optimizer and schedule, logs TRL's `log_history` to `metrics.jsonl` and saves the model.
//!
//! One file a job: `setup` (loading, data, the trainer's parts), `step` (a micro-batch and an update),
//! `reference` (reference log-probs, precomputed and cached), `eval` (evaluation and samples), `run` (the
//! training loop), `metrics` (where log entries go), `outputs` (the output folder, checkpoints, the saved
//! model), `memory` (the memory plan).
use crate::checkpoint::{self, RunState};
use crate::config::{Strategy, TrainConfig};
use crate::data::{self, Batch, PrepareOptions, Prepared, TextTokenizer};
use crate::dist::Ranks;
use crate::engine::{backward, forward_continuation, forward_with_cache, Buffer, ContinuationBatch, Pass, ScoredOutput, SeqBatch};
use crate::error::{Error, Result};
use crate::fingerprint::Fingerprint;
use crate::model::Model;
use crate::output::OutputDir;
use crate::run_identity::RunIdentity;
use crate::objective::{KtoObjective, MicroBatchLogps};
use crate::optim::{clip_coefficient, grad_norm, Optimizer};
use crate::schedule::{LrSchedule, Schedule};
use serde_json::{Map, Value};
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

mod eval;
mod memory;
mod metrics;
mod outputs;
mod reference;
mod run;
mod setup;
mod step;

pub use memory::MemoryPlan;
pub use setup::weight_balance_warning;
pub use step::MicroBatchRecord;
use metrics::MetricSinks;
use reference::data_fingerprint;
use setup::planned_steps;
use step::{packed, sequence_logps, MetricAccumulator};


/// Where the trainer reports what it does. The command line draws a progress bar; tests stay quiet.
pub trait Observer: Sync {
    fn info(&self, _msg: &str) {}
    /// Tokenization progress of a data set (called from worker threads).
    fn preparing(&self, _path: &std::path::Path, _done: usize, _total: usize) {}
    fn warn(&self, _msg: &str) {}
    /// Download progress of a hub file (`org/name/path`): bytes so far, and the size when known.
    fn downloading(&self, _file: &str, _done: u64, _total: Option<u64>) {}
    fn start(&self, _total_steps: usize) {}
    /// After each optimizer step.
    fn step(&self, _step: usize, _loss: f64) {}
    /// After each log entry is written.
    fn log(&self, _entry: &Map<String, Value>) {}
    fn finish(&self) {}
    /// Whether the user asked to stop (SIGINT/SIGTERM): long passes check it between batches, training after
    /// each optimizer step.
    fn stop_requested(&self) -> bool {
        false
    }
}

/// An observer that reports nothing.
pub struct Silent;

impl Observer for Silent {}

/// What a trainer optimises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    /// KTO (or APO-zero unpaired) against a reference model: `kto train`.
    Kto,
    /// Next-token loss on completion tokens, no reference: `kto sft`.
    Sft,
}

pub struct Trainer {
    pub cfg: TrainConfig,
    pub task: Task,
    /// The run's tokenizer (absent for trainers built `from_parts`); decodes `generate_during_eval` samples.
    pub tokenizer: Option<TextTokenizer>,
    pub objective: KtoObjective,
    pub policy: Model,
    /// The frozen reference model. `None` with LoRA and no `ref_model` (the reference is then the policy's
    /// frozen base, adapters off), and once reference log-probs are precomputed.
    pub reference: Option<Model>,
    /// Per training row: reference log-probs of the main and the KL sequence, when precomputed.
    pub precomputed_reference: Option<Vec<(f64, f64)>>,
    /// The held-out set, prepared like the training set (KL pairs in chunks of the *training* batch size, as TRL).
    pub eval_data: Option<Prepared>,
    /// Its reference log-probs when precomputed: its own cache, computed before training, never with the trained
    /// policy.
    pub precomputed_eval_reference: Option<Vec<(f64, f64)>>,
    pub data: Prepared,
    pub optimizer: Optimizer,
    schedule: Schedule,
    pub max_steps: usize,
    warmup: usize,
    /// Wall time of each phase, summed over the run (reported at the end, and by `kto bench`).
    pub phases: PhaseTimes,
    /// The output folder, claimed (locked) before anything is written to it; rank 0 alone holds it.
    output: Option<OutputDir>,
    /// What makes this run this run (written into every checkpoint, checked on resume).
    identity: Option<RunIdentity>,
    /// The checkpoint `resume_from_checkpoint` resolved to when the output folder was claimed.
    resume_from: Option<PathBuf>,
}

/// Seconds spent in each phase of training.
#[derive(Debug, Clone, Default)]
pub struct PhaseTimes {
    /// Policy forward on the KL sequences (no gradient).
    pub policy_kl_forward: f64,
    /// Policy forward on the main sequences, keeping activations.
    pub policy_forward: f64,
    /// Reference forwards on the main and KL sequences.
    pub reference_forward: f64,
    pub backward: f64,
    /// Clipping and the optimizer update.
    pub optimizer: f64,
}

impl PhaseTimes {
    pub fn total(&self) -> f64 {
        self.policy_kl_forward + self.policy_forward + self.reference_forward + self.backward + self.optimizer
    }
}

fn timed<T>(acc: &mut f64, f: impl FnOnce() -> T) -> T {
    let t = Instant::now();
    let r = f();
    *acc += t.elapsed().as_secs_f64();
    r
}

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct TrainSummary {
    pub log_history: Vec<Map<String, Value>>,
    pub steps: usize,
    pub train_loss: f64,
    pub runtime_s: f64,
}

impl Trainer {
    /// Whether batches carry KL sequences (KTO's `kto` loss).
    fn with_kl(&self) -> bool {
        self.task == Task::Kto && self.objective.loss_type.uses_kl()
    }

    /// Row indices of each micro-batch of one epoch (sequential, the last one may be short).
    pub fn epoch_batches(&self) -> Vec<Vec<usize>> {
        let n = self.data.rows.len();
        (0..n).collect::<Vec<_>>().chunks(self.cfg.per_device_train_batch_size).map(|c| c.to_vec()).collect()
    }

    pub fn collate(&self, rows: &[usize]) -> Batch {
        data::collate(&self.data.rows, rows, self.cfg.max_length(), self.with_kl())
    }

    /// Parameters that train: the LoRA adapters when there are any, else the whole policy.
    pub fn trainable_params(&self) -> &Buffer {
        match &self.policy.lora {
            Some(l) => &l.params,
            None => &self.policy.params,
        }
    }
}
