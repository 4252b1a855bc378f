//! The trainer: the one place that knows the order of things. Loads everything, prepares the data, runs
//! micro-batches (policy KL forward, policy forward, reference forwards, objective, backward), accumulates,
//! clips, steps the optimizer and schedule, logs TRL's `log_history` to `metrics.jsonl` and saves the model.
use crate::checkpoint::{self, RunState};
use crate::config::TrainConfig;
use crate::data::{self, Batch, PrepareOptions, Prepared, TextTokenizer};
use crate::dist::Ranks;
use crate::engine::{backward, forward_continuation, forward_with_cache, ContinuationBatch, ScoredOutput, SeqBatch};
use crate::error::{Error, Result};
use crate::fingerprint::Fingerprint;
use crate::model::Model;
use crate::output::OutputDir;
use crate::run_identity::RunIdentity;
use crate::objective::{KtoObjective, MicroBatchLogps};
use crate::optim::{clip_coefficient, grad_norm, Optimizer, Schedule};
use rayon::prelude::*;
use serde_json::{Map, Value};
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

/// Where the trainer reports what it does. The command line draws a progress bar; tests stay quiet.
pub trait Observer: Sync {
    fn info(&self, _msg: &str) {}
    /// Tokenization progress of a data set (called from worker threads).
    fn preparing(&self, _path: &std::path::Path, _done: usize, _total: usize) {}
    fn warn(&self, _msg: &str) {}
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

fn packed(seqs: &[(Vec<u32>, Vec<bool>)]) -> SeqBatch {
    let refs: Vec<(&[u32], &[bool])> = seqs.iter().map(|(i, m)| (i.as_slice(), m.as_slice())).collect();
    SeqBatch::new(&refs)
}

/// Sequence log-probs of a micro-batch under `model`: the main sequences (keeping the tape when asked) and the
/// KL sequences, which continue the main pass's cached prompt instead of recomputing it (a KL sequence shares
/// its prompt with the main sequence of the same row). `times` receives (main pass, KL pass) seconds.
fn sequence_logps(
    model: &Model,
    adapters: bool,
    batch: &Batch,
    main: &SeqBatch,
    with_kl: bool,
    keep_tape: bool,
    checkpoint: bool,
    times: (&mut f64, &mut f64),
) -> (crate::engine::ScoredOutput, Option<crate::engine::Tape>, Vec<f64>) {
    let (out, tape, cache) =
        timed(times.0, || forward_with_cache(model, main, keep_tape, with_kl, adapters, keep_tape && checkpoint));
    let kl = timed(times.1, || match &cache {
        Some(c) => {
            let seqs: Vec<(usize, usize, &[u32], &[bool])> = batch
                .kl
                .iter()
                .zip(&batch.main)
                .enumerate()
                .map(|(s, ((ids, mask), (_, main_mask)))| {
                    let prompt = main_mask.iter().take_while(|c| !**c).count();
                    let shared = prompt.min(mask.iter().take_while(|c| !**c).count());
                    (s, shared, ids.as_slice(), mask.as_slice())
                })
                .collect();
            forward_continuation(model, &ContinuationBatch::new(c, &seqs), c, adapters).seq_logps
        }
        None => Vec::new(),
    });
    (out, tape, kl)
}

/// A fingerprint of everything the precomputed reference log-probs depend on.
fn reference_cache_key(model: &Model, data: &Prepared, max_length: Option<usize>, with_kl: bool) -> u64 {
    let mut h = Fingerprint::default();
    h.f32s(&model.params).bytes(format!("{:?}", model.spec).as_bytes());
    h.u64(max_length.unwrap_or(0) as u64).u64(with_kl as u64);
    data_fingerprint(&mut h, data);
    h.finish()
}

/// The tokenized rows in order: ids of prompt, completion and KL completion, and the label.
fn data_fingerprint(h: &mut Fingerprint, data: &Prepared) {
    for r in &data.rows {
        h.u32s(&r.prompt_ids).u32s(&r.completion_ids).u32s(&r.kl_completion_ids).u64(r.label as u64);
    }
}

fn f32_view(v: &[f32]) -> Result<safetensors::tensor::TensorView<'_>> {
    safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![v.len()], crate::model::weights::f32_slice_as_bytes(v))
        .map_err(|e| Error::Train(e.to_string()))
}

/// Opens `metrics.jsonl`: a fresh run starts it empty; a resumed one keeps the entries up to the checkpoint's
/// step (later ones are logged again) and appends. Returns the file and the entries kept.
fn open_metrics(path: &std::path::Path, resume_step: Option<usize>) -> Result<(std::fs::File, Vec<Map<String, Value>>)> {
    if let Some(step) = resume_step {
        let kept: Vec<Map<String, Value>> = std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .filter_map(|line| serde_json::from_str::<Map<String, Value>>(line).ok())
            .filter(|v| !v.contains_key("train_runtime") && v.get("step").and_then(|s| s.as_u64()).is_some_and(|s| s as usize <= step))
            .collect();
        let text: String = kept.iter().map(|v| format!("{}\n", Value::Object(v.clone()))).collect();
        crate::files::write_atomic(path, text.as_bytes())?;
        let file = std::fs::OpenOptions::new().append(true).open(path).map_err(|e| Error::file(path, e))?;
        return Ok((file, kept));
    }
    Ok((std::fs::File::create(path).map_err(|e| Error::file(path, e))?, Vec::new()))
}

/// Reads, maps, validates and prepares one data set as the config says.
fn load_data(
    cfg: &TrainConfig,
    task: Task,
    path: &std::path::Path,
    tokenizer: &TextTokenizer,
    obs: &dyn Observer,
    ranks: &Ranks,
) -> Result<Prepared> {
    let (mut rows, mut skipped) = data::read_dataset(path, cfg.skip_invalid_rows)?;
    use data::read::ColumnMapping;
    let mut mapping = vec![
        ColumnMapping { from: &cfg.prompt_column, to: "prompt", key: "prompt_column" },
        ColumnMapping { from: &cfg.completion_column, to: "completion", key: "completion_column" },
    ];
    if task == Task::Kto {
        mapping.push(ColumnMapping { from: &cfg.label_column, to: "label", key: "label_column" });
    }
    data::rename_columns(&mut rows, &mapping)?;
    if task == Task::Sft {
        // SFT learns every {prompt, completion} row; a label, if present, is not a filter.
        if let Some(first) = rows.first() {
            if !first.fields.contains_key("prompt") || !first.fields.contains_key("completion") {
                return Err(first.error("kto sft expects keys {prompt, completion}"));
            }
            if first.fields.contains_key("label") {
                obs.warn(&format!("{}: kto sft trains on every row; the \"label\" column is ignored (filter the file to keep only desirable rows)", path.display()));
            }
        }
        for row in &mut rows {
            row.fields.insert("label".into(), Value::Bool(true));
        }
    }
    let examples = if rows.is_empty() && !skipped.is_empty() {
        Vec::new()
    } else {
        let (examples, _, bad) = data::examples_from_rows_skipping(&rows, cfg.skip_invalid_rows)?;
        skipped.extend(bad);
        examples
    };
    if examples.is_empty() && !skipped.is_empty() {
        return Err(Error::Train(format!(
            "{}: all {} rows are invalid (skip_invalid_rows = true); first: {}",
            path.display(),
            skipped.len(),
            skipped[0]
        )));
    }
    if !skipped.is_empty() {
        obs.warn(&format!("{}: skipped {} invalid rows (skip_invalid_rows = true); first: {}", path.display(), skipped.len(), skipped[0]));
    }
    let opts = PrepareOptions {
        max_length: cfg.max_length(),
        batch_size: cfg.per_device_train_batch_size,
        with_kl: task == Task::Kto && cfg.loss_type().expect("validated").uses_kl(),
    };
    obs.preparing(path, 0, examples.len());
    if ranks.size() == 1 {
        return data::prepare::prepare_with_progress(&examples, tokenizer, opts, path, &|n| {
            obs.preparing(path, n, examples.len());
            !obs.stop_requested()
        });
    }
    let tokenized = tokenize_over_ranks(&examples, tokenizer, path, ranks)?;
    obs.info(&format!("{}: {} rows tokenized over {} ranks", path.display(), examples.len(), ranks.size()));
    data::prepare::assemble(&examples, tokenized, opts, path)
}

/// Each rank tokenizes every `ranks`-th example; the ranks then exchange lengths and token ids (as f32, exact
/// below 2^24) with sums, so every rank ends with every example tokenized.
fn tokenize_over_ranks(
    examples: &[data::Example],
    tokenizer: &TextTokenizer,
    path: &std::path::Path,
    ranks: &Ranks,
) -> Result<Vec<data::prepare::Tokenized>> {
    let n = examples.len();
    let mine: Vec<usize> = (ranks.rank()..n).step_by(ranks.size()).collect();
    let local = data::prepare::tokenize_rows(examples, &mine, tokenizer, path, &|_| true);
    // [prompt length, completion length, prompt cut] per example, then a failure count.
    let mut meta = vec![0f64; 3 * n + 1];
    match &local {
        Ok(rows) => {
            for (&i, (p, c, cut)) in mine.iter().zip(rows) {
                meta[3 * i] = p.len() as f64;
                meta[3 * i + 1] = c.len() as f64;
                meta[3 * i + 2] = *cut as u8 as f64;
            }
        }
        Err(_) => meta[3 * n] = 1.0,
    }
    ranks.sum_f64(&mut meta);
    let local = match local {
        Err(e) => return Err(e),
        Ok(_) if meta[3 * n] > 0.0 => {
            return Err(Error::Train(format!("{}: another rank could not tokenize its rows (its error is printed above)", path.display())))
        }
        Ok(rows) => rows,
    };
    let mut offsets = Vec::with_capacity(n + 1);
    offsets.push(0usize);
    for i in 0..n {
        offsets.push(offsets[i] + meta[3 * i] as usize + meta[3 * i + 1] as usize);
    }
    let mut ids = vec![0f32; offsets[n]];
    for (&i, (p, c, _)) in mine.iter().zip(&local) {
        for (slot, &t) in ids[offsets[i]..offsets[i + 1]].iter_mut().zip(p.iter().chain(c)) {
            if t >= 1 << 24 {
                return Err(Error::Train(format!("token id {t} is too large to exchange between ranks")));
            }
            *slot = t as f32;
        }
    }
    ranks.sum_f32(&mut ids);
    Ok((0..n)
        .map(|i| {
            let row: Vec<u32> = ids[offsets[i]..offsets[i + 1]].iter().map(|&t| t as u32).collect();
            let plen = meta[3 * i] as usize;
            (row[..plen].to_vec(), row[plen..].to_vec(), meta[3 * i + 2] > 0.0)
        })
        .collect())
}

/// An observer that reports nothing.
pub struct Silent;
impl Observer for Silent {}

/// Everything one micro-batch produced, for the trainer and for tests.
#[derive(Debug, Clone)]
pub struct MicroBatchRecord {
    pub rows: Vec<usize>,
    pub labels: Vec<bool>,
    pub policy_logps: Vec<f64>,
    pub reference_logps: Vec<f64>,
    pub policy_kl_logps: Vec<f64>,
    pub reference_kl_logps: Vec<f64>,
    pub loss: f64,
    pub kl: f64,
    pub metrics: Vec<(&'static str, f64)>,
    /// Tokens of the main sequences (TRL's `attention_mask` sum), over all ranks of a data-parallel run.
    pub num_tokens: usize,
    /// Completion tokens scored (SFT weighs micro-batches by them).
    pub scored_tokens: usize,
}

/// TRL's per-log aggregation: every metric is the unweighted mean of its per-micro-batch values since the last
/// log, keys in first-insertion order; `num_tokens` is a running total, assigned rather than appended.
#[derive(Default)]
struct MetricAccumulator {
    values: Vec<(String, Vec<f64>)>,
}

impl MetricAccumulator {
    fn add(&mut self, key: &str, v: f64) {
        match self.values.iter_mut().find(|(k, _)| k == key) {
            Some((_, list)) if key == "num_tokens" => *list = vec![v],
            Some((_, list)) => list.push(v),
            None => self.values.push((key.to_string(), vec![v])),
        }
    }
    fn drain_means(&mut self) -> Vec<(String, f64)> {
        self.values.drain(..).map(|(k, l)| (k, l.iter().sum::<f64>() / l.len() as f64)).collect()
    }
}

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

/// What a run will hold in memory (the log states it before the first step).
#[derive(Debug, Clone)]
pub struct MemoryPlan {
    pub parameters: usize,
    pub trainable: usize,
    pub weight_bytes: usize,
    pub gradient_bytes: usize,
    pub optimizer_bytes: usize,
    /// The training tape of the largest micro-batch.
    pub activation_bytes: usize,
}

impl std::fmt::Display for MemoryPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mb = |b: usize| b as f64 / (1024.0 * 1024.0);
        write!(
            f,
            "memory plan: {} parameters ({} trainable); weights {:.1} MB, gradients {:.1} MB, optimizer state {:.1} MB, activations {:.1} MB",
            self.parameters,
            self.trainable,
            mb(self.weight_bytes),
            mb(self.gradient_bytes),
            mb(self.optimizer_bytes),
            mb(self.activation_bytes)
        )
    }
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
    /// Loads tokenizer, models and data, prepares the data set as TRL does, and checks the run can start.
    pub fn new(cfg: TrainConfig, obs: &dyn Observer) -> Result<Self> {
        Self::new_for(Task::Kto, cfg, obs)
    }

    /// `new` for a task: SFT loads no reference model and needs no labels.
    pub fn new_for(task: Task, cfg: TrainConfig, obs: &dyn Observer) -> Result<Self> {
        Self::new_on(task, cfg, obs, &Ranks::single())
    }

    /// `new_for` on one rank of a data-parallel run (the reference precomputation is split over the ranks).
    pub fn new_on(task: Task, cfg: TrainConfig, obs: &dyn Observer, ranks: &Ranks) -> Result<Self> {
        if task == Task::Sft && cfg.precompute_ref_log_probs {
            return Err(Error::Config("precompute_ref_log_probs: kto sft has no reference model".into()));
        }
        if cfg.bf16 == Some(true) {
            obs.warn("bf16 = true: kto computes in fp32 on the CPU (like TRL with bf16 = false)");
        }
        check_inputs_exist(&cfg)?;
        let tokenizer = TextTokenizer::load(cfg.tokenizer_dir())?;
        let mut policy = Model::load(&cfg.model)?;
        if cfg.use_peft {
            let lora = crate::model::lora::Lora::new(&policy.spec, cfg.lora_r, cfg.lora_alpha, &cfg.lora_targets(), cfg.seed);
            obs.info(&format!(
                "LoRA r={} alpha={} on {}: {} trainable parameters of {}",
                cfg.lora_r,
                cfg.lora_alpha,
                cfg.lora_targets().iter().map(|t| t.name()).collect::<Vec<_>>().join(", "),
                lora.num_parameters(),
                policy.num_parameters()
            ));
            policy.lora = Some(lora);
        }
        let reference = match &cfg.ref_model {
            Some(dir) => {
                let r = Model::load(dir)?;
                if r.spec.vocab_size != policy.spec.vocab_size {
                    return Err(Error::model(
                        dir,
                        format!("vocab_size {} differs from the policy's {}", r.spec.vocab_size, policy.spec.vocab_size),
                    ));
                }
                Some(r)
            }
            // SFT has no reference; under LoRA the reference is the frozen base inside the policy: no second copy.
            None if cfg.use_peft || task == Task::Sft => None,
            None => Some(Model { lora: None, ..policy.clone() }),
        };
        tokenizer.check_fits(policy.spec.vocab_size, &cfg.model)?;
        let prepared = load_data(&cfg, task, &cfg.train_dataset, &tokenizer, obs, ranks)?;
        let eval_data = match &cfg.eval_dataset {
            Some(path) => Some(load_data(&cfg, task, path, &tokenizer, obs, ranks)?),
            None => None,
        };
        if prepared.prefix_mismatches > 0 {
            obs.warn(&format!(
                "{} rows: the prompt's tokens are not a prefix of the prompt+completion tokens (e.g. a prompt ending in a space); the extra tokens move to the completion, as in TRL",
                prepared.prefix_mismatches
            ));
        }
        if !prepared.dropped_source_rows.is_empty() {
            obs.warn(&format!(
                "dropped {} rows whose prompt alone has at least max_length = {} tokens",
                prepared.dropped_source_rows.len(),
                cfg.max_length
            ));
        }
        if prepared.rows.is_empty() {
            return Err(Error::Train(format!("{}: no rows left to train on", cfg.train_dataset.display())));
        }
        if task == Task::Kto {
            if let Some(msg) = weight_balance_warning(&prepared, cfg.desirable_weight, cfg.undesirable_weight) {
                obs.warn(&msg);
            }
        }
        let mut t = Self::from_parts(cfg, policy, reference, prepared);
        t.task = task;
        t.tokenizer = Some(tokenizer);
        t.eval_data = eval_data;
        obs.info(&t.memory_plan().to_string());
        if t.cfg.precompute_ref_log_probs {
            t.precompute_reference_on(obs, ranks)?;
        }
        let rows = match task {
            Task::Kto => format!("{} rows ({} desirable)", t.data.rows.len(), t.data.rows.iter().filter(|r| r.label).count()),
            Task::Sft => format!("{} rows", t.data.rows.len()),
        };
        obs.info(&format!("{rows}, {} parameters, {} optimizer steps", t.policy.num_parameters(), t.max_steps));
        Ok(t)
    }

    /// A trainer over models and prepared data already in memory (`cfg` must have passed validation).
    /// `reference: None` requires LoRA adapters on the policy (the reference is then its base).
    pub fn from_parts(cfg: TrainConfig, policy: Model, reference: Option<Model>, prepared: Prepared) -> Self {
        let loss_type = cfg.loss_type().expect("validated");
        let max_steps = planned_steps(&cfg, prepared.rows.len(), 1);
        let trainable = match &policy.lora {
            Some(l) => &l.tensors,
            None => &policy.layout.tensors,
        };
        let optimizer = Optimizer::new(
            cfg.optim_kind().expect("validated"),
            trainable,
            cfg.adam_beta1,
            cfg.adam_beta2,
            cfg.adam_epsilon,
            cfg.weight_decay,
        );
        let objective = KtoObjective {
            loss_type,
            beta: cfg.beta,
            desirable_weight: cfg.desirable_weight,
            undesirable_weight: cfg.undesirable_weight,
        };
        Trainer {
            task: Task::Kto,
            tokenizer: None,
            schedule: cfg.schedule().expect("validated"),
            warmup: cfg.warmup_for(max_steps),
            cfg,
            objective,
            policy,
            reference,
            precomputed_reference: None,
            eval_data: None,
            precomputed_eval_reference: None,
            data: prepared,
            optimizer,
            max_steps,
            phases: PhaseTimes::default(),
            output: None,
            identity: None,
            resume_from: None,
        }
    }

    /// Planned memory of the run, before the first step.
    pub fn memory_plan(&self) -> MemoryPlan {
        let spec = &self.policy.spec;
        let f = 4usize;
        let trainable = self.trainable_params().len();
        let reference = self.reference.as_ref().map_or(0, |r| r.num_parameters());
        let lora_extra = self.policy.lora.as_ref().map_or(0, |l| l.num_parameters());
        let state_per_param = match self.optimizer.kind {
            crate::optim::OptimKind::AdamW => 2,
            crate::optim::OptimKind::Sgd => 0,
        };
        // The largest micro-batch: its tokens N and scored positions M bound the tape.
        let (mut n, mut m) = (0usize, 0usize);
        for rows in self.epoch_batches() {
            let b = self.collate(&rows);
            n = n.max(b.main.iter().map(|(i, _)| i.len()).sum());
            m = m.max(b.main.iter().map(|(_, c)| c.iter().skip(1).filter(|x| **x).count()).sum());
        }
        let (h, i, qd) = (spec.hidden, spec.intermediate, spec.q_dim());
        let qkv_w = qd + 2 * spec.kv_dim();
        let lora_r = self.policy.lora.as_ref().map_or(0, |l| l.r * l.layers.first().map_or(0, |x| x.len()));
        let qk = if spec.qk_norm { qkv_w + spec.heads + spec.kv_heads } else { 0 };
        let per_token_layer = 4 * h + qkv_w + spec.heads + qd + 3 * i + 2 + qk + lora_r;
        let layers = if self.cfg.gradient_checkpointing {
            n * h * spec.layers + n * per_token_layer
        } else {
            n * per_token_layer * spec.layers
        };
        let softmax = if m * spec.vocab_size * f <= crate::engine::decoder::softmax_cache_bytes() { m * spec.vocab_size } else { 0 };
        MemoryPlan {
            parameters: self.policy.num_parameters() + lora_extra,
            trainable,
            weight_bytes: (self.policy.num_parameters() + lora_extra + reference) * f,
            gradient_bytes: trainable * f,
            optimizer_bytes: state_per_param * trainable * f,
            activation_bytes: (layers + n * (h + 1) + m * (h + 1) + softmax) * f,
        }
    }

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

    /// Collates rows of the eval set.
    pub fn collate_eval(&self, rows: &[usize]) -> Batch {
        let eval = self.eval_data.as_ref().expect("an eval set");
        let mut b = data::collate(&eval.rows, rows, self.cfg.max_length(), self.with_kl());
        b.eval = true;
        b
    }

    /// Runs the eval set in batches of `per_device_eval_batch_size` without gradients: TRL's eval metrics with an
    /// `eval_` prefix (unweighted means over eval batches) and `eval_loss`.
    pub fn evaluate(&self) -> Map<String, Value> {
        self.evaluate_unless_stopped(&Silent).unwrap_or_default()
    }

    /// `evaluate`, checking between eval batches whether the user asked to stop (then `None`).
    pub fn evaluate_unless_stopped(&self, obs: &dyn Observer) -> Option<Map<String, Value>> {
        let mut entry = Map::new();
        let Some(eval) = &self.eval_data else { return Some(entry) };
        let t = Instant::now();
        let mut acc = MetricAccumulator::default();
        let mut losses = Vec::new();
        let rows: Vec<usize> = (0..eval.rows.len()).collect();
        for chunk in rows.chunks(self.cfg.per_device_eval_batch_size) {
            if obs.stop_requested() {
                return None;
            }
            let rec = self.micro_batch(&self.collate_eval(chunk), 0, None, &mut PhaseTimes::default());
            losses.push(rec.loss);
            for (k, v) in &rec.metrics {
                if *k != "num_tokens" {
                    acc.add(k, *v);
                }
            }
        }
        let secs = t.elapsed().as_secs_f64();
        entry.insert("eval_loss".into(), (losses.iter().sum::<f64>() / losses.len().max(1) as f64).into());
        for (k, v) in acc.drain_means() {
            entry.insert(format!("eval_{k}"), v.into());
        }
        entry.insert("eval_runtime".into(), secs.into());
        entry.insert("eval_samples_per_second".into(), (eval.rows.len() as f64 / secs).into());
        entry.insert("eval_steps_per_second".into(), (losses.len() as f64 / secs).into());
        Some(entry)
    }

    /// Reference log-probs of a micro-batch's main and KL sequences: precomputed ones when the run has them,
    /// else a pass of the reference model.
    fn reference_logps(&self, batch: &Batch, main: &SeqBatch) -> (Vec<f64>, Vec<f64>) {
        let table = if batch.eval { &self.precomputed_eval_reference } else { &self.precomputed_reference };
        if let Some(pre) = table {
            let with_kl = self.with_kl();
            let main_lp = batch.rows.iter().map(|&r| pre[r].0).collect();
            let kl_lp = if with_kl { batch.rows.iter().map(|&r| pre[r].1).collect() } else { Vec::new() };
            return (main_lp, kl_lp);
        }
        let (model, adapters) = self.reference_model();
        let (out, _, kl) =
            sequence_logps(model, adapters, batch, main, self.with_kl(), false, false, (&mut 0.0, &mut 0.0));
        (out.seq_logps, kl)
    }

    /// The model that computes reference log-probs, and whether its adapters are on.
    fn reference_model(&self) -> (&Model, bool) {
        match &self.reference {
            Some(r) => (r, false),
            None => (&self.policy, false),
        }
    }

    /// Parameters that train: the LoRA adapters when there are any, else the whole policy.
    pub fn trainable_params(&self) -> &[f32] {
        match &self.policy.lora {
            Some(l) => &l.params,
            None => &self.policy.params,
        }
    }

    /// `precompute_ref_log_probs`: one pass of the reference over the whole data set before training, in batches
    /// of `precompute_ref_batch_size` (default: the training batch size), cached on disk in `output_dir` keyed
    /// by the reference weights, the tokenized rows and the settings. The reference model is then released.
    pub fn precompute_reference(&mut self, obs: &dyn Observer) -> Result<()> {
        self.precompute_reference_on(obs, &Ranks::single())
    }

    /// `precompute_reference` split over the ranks of a data-parallel run: each computes every `ranks`-th
    /// batch, the tables are summed over the ranks, and rank 0 writes the cache.
    pub fn precompute_reference_on(&mut self, obs: &dyn Observer, ranks: &Ranks) -> Result<()> {
        // Before the long pass: a folder that cannot be written, is in use or holds another run fails now.
        self.claim_output(obs, ranks)?;
        if self.precomputed_reference.is_none() {
            self.precomputed_reference = Some(self.precompute_split(false, obs, ranks)?);
        }
        if self.eval_data.is_some() && self.precomputed_eval_reference.is_none() {
            self.precomputed_eval_reference = Some(self.precompute_split(true, obs, ranks)?);
        }
        self.reference = None;
        Ok(())
    }

    fn precompute_split(&self, eval: bool, obs: &dyn Observer, ranks: &Ranks) -> Result<Vec<(f64, f64)>> {
        let with_kl = self.with_kl();
        let data = if eval { self.eval_data.as_ref().expect("an eval set") } else { &self.data };
        let key = reference_cache_key(self.reference_model().0, data, self.cfg.max_length(), with_kl);
        let name = if eval { "eval_ref_logps" } else { "ref_logps" };
        let path = self.cfg.output_dir.join(format!("{name}-{key:016x}.json"));
        if let Ok(text) = std::fs::read_to_string(&path) {
            if let Ok(values) = serde_json::from_str::<Vec<(f64, f64)>>(&text) {
                if values.len() == data.rows.len() {
                    obs.info(&format!("reference log-probs reused from {}", path.display()));
                    return Ok(values);
                }
            }
        }
        let t = Instant::now();
        let bs = self.cfg.precompute_ref_batch_size.unwrap_or(self.cfg.per_device_train_batch_size).max(1);
        // Flat [main, kl] per row; each rank fills its batches, the sum over ranks completes the table.
        let mut flat = vec![0f64; 2 * data.rows.len()];
        let rows: Vec<usize> = (0..data.rows.len()).collect();
        for chunk in rows.chunks(bs).skip(ranks.rank()).step_by(ranks.size()) {
            if obs.stop_requested() {
                return Err(Error::StoppedEarly("during the reference precomputation, before the first step; no checkpoint was written".into()));
            }
            let batch = if eval { self.collate_eval(chunk) } else { self.collate(chunk) };
            let main = packed(&batch.main);
            let (model, adapters) = self.reference_model();
            let (out, _, kl) = sequence_logps(model, adapters, &batch, &main, with_kl, false, false, (&mut 0.0, &mut 0.0));
            for (i, (&row, lp)) in chunk.iter().zip(&out.seq_logps).enumerate() {
                flat[2 * row] = *lp;
                flat[2 * row + 1] = if with_kl { kl[i] } else { 0.0 };
            }
        }
        ranks.sum_f64(&mut flat);
        let values: Vec<(f64, f64)> = flat.chunks(2).map(|c| (c[0], c[1])).collect();
        if ranks.is_root() {
            std::fs::create_dir_all(&self.cfg.output_dir).map_err(|e| Error::file(&self.cfg.output_dir, e))?;
            let text = serde_json::to_string(&values).map_err(|e| Error::Train(e.to_string()))?;
            crate::files::write_atomic(&path, text.as_bytes())?;
        }
        obs.info(&format!(
            "reference log-probs of {} {} rows precomputed in {:.1} s, cached in {}",
            values.len(),
            if eval { "eval" } else { "training" },
            t.elapsed().as_secs_f64(),
            path.display()
        ));
        Ok(values)
    }

    /// Runs one micro-batch. With `grads`, backpropagates `loss / loss_divisor` into it.
    pub fn micro_batch(
        &self,
        batch: &Batch,
        num_tokens_before: usize,
        grads: Option<(&mut [f32], f64)>,
        times: &mut PhaseTimes,
    ) -> MicroBatchRecord {
        self.micro_batch_across(Some(batch), num_tokens_before, grads, times, &Ranks::single())
    }

    /// `micro_batch` on one rank of a data-parallel run, in step with the other ranks' micro-batches: the KL
    /// reference point, the metrics and the token count are combined over the ranks as TRL gathers them. A rank
    /// with no micro-batch at this place of the step (`None`, a short last step) still takes part.
    pub fn micro_batch_across(
        &self,
        batch: Option<&Batch>,
        num_tokens_before: usize,
        grads: Option<(&mut [f32], f64)>,
        times: &mut PhaseTimes,
        ranks: &Ranks,
    ) -> MicroBatchRecord {
        let empty = Batch::default();
        let batch = batch.unwrap_or(&empty);
        let main = packed(&batch.main);
        let with_kl = self.with_kl();
        let (policy_out, tape, policy_kl) = if batch.rows.is_empty() {
            (ScoredOutput::default(), None, Vec::new())
        } else {
            sequence_logps(
                &self.policy,
                true,
                batch,
                &main,
                with_kl,
                grads.is_some(),
                self.cfg.gradient_checkpointing,
                (&mut times.policy_forward, &mut times.policy_kl_forward),
            )
        };
        let mut tokens = [main.n_tokens() as f64];
        ranks.sum_f64(&mut tokens);
        let num_tokens = tokens[0] as usize;
        let sum_over_ranks = |v: &mut [f64]| ranks.sum_f64(v);
        let (reference, reference_kl, result) = if self.task == Task::Sft {
            let total = (num_tokens_before + num_tokens) as f64;
            (Vec::new(), Vec::new(), crate::objective::sft_loss_across(&policy_out, main.n_seqs(), total, &sum_over_ranks))
        } else {
            let (reference, reference_kl) = if batch.rows.is_empty() {
                (Vec::new(), Vec::new())
            } else {
                timed(&mut times.reference_forward, || self.reference_logps(batch, &main))
            };
            let lp = MicroBatchLogps {
                labels: &batch.labels,
                policy: &policy_out.seq_logps,
                reference: &reference,
                policy_kl: &policy_kl,
                reference_kl: &reference_kl,
            };
            let total = (num_tokens_before + num_tokens) as f64;
            let result = self.objective.evaluate_across(&lp, &policy_out, &main.scored_seq, total, &sum_over_ranks);
            (reference, reference_kl, result)
        };
        if let (Some((g, divisor)), Some(tape)) = (grads, tape) {
            let d: Vec<f32> = result.dloss_dlogp.iter().map(|v| (v / divisor) as f32).collect();
            timed(&mut times.backward, || backward(&self.policy, &main, tape, &d, g));
        }
        MicroBatchRecord {
            rows: batch.rows.clone(),
            labels: batch.labels.clone(),
            policy_logps: policy_out.seq_logps,
            reference_logps: reference,
            policy_kl_logps: policy_kl,
            reference_kl_logps: reference_kl,
            loss: result.loss,
            kl: result.kl,
            metrics: result.metrics,
            num_tokens,
            scored_tokens: main.scored_rows.len(),
        }
    }

    /// Clips `grads`, updates the policy with the learning rate of update number `step` (0-based), and returns
    /// (gradient norm before clipping, learning rate used).
    pub fn apply_update(&mut self, grads: &[f32], step: usize) -> (f64, f64) {
        let t = Instant::now();
        let grad_norm = grad_norm(grads);
        let lr = self.cfg.learning_rate * self.schedule.factor(step, self.warmup, self.max_steps);
        if grad_norm.is_finite() {
            let coef = clip_coefficient(grad_norm, self.cfg.max_grad_norm);
            let params = match &mut self.policy.lora {
                Some(l) => &mut l.params,
                None => &mut self.policy.params,
            };
            self.optimizer.step(params, grads, lr, coef);
        }
        self.phases.optimizer += t.elapsed().as_secs_f64();
        (grad_norm, lr)
    }

    /// Trains for `max_steps` optimizer steps, writing `metrics.jsonl` and finally the model to `output_dir`.
    pub fn train(&mut self, obs: &dyn Observer) -> Result<TrainSummary> {
        self.train_on(obs, &Ranks::single())
    }

    /// `train` as one rank of a data-parallel run. An optimizer step takes `gradient_accumulation_steps ×
    /// ranks` consecutive micro-batches; rank r runs those at places r, r + ranks, ...; gradients and losses are
    /// summed over the ranks before the update, so every rank keeps the same weights, and the run equals one
    /// process with `gradient_accumulation_steps × ranks` (up to the KL point and metrics, which TRL gathers per
    /// micro-batch across ranks). Rank 0 alone writes logs, checkpoints and the model.
    pub fn train_on(&mut self, obs: &dyn Observer, ranks: &Ranks) -> Result<TrainSummary> {
        let world = ranks.size();
        if world > 1 {
            self.max_steps = planned_steps(&self.cfg, self.data.rows.len(), world);
            self.warmup = self.cfg.warmup_for(self.max_steps);
        }
        let root = ranks.is_root();
        self.claim_output(obs, ranks)?;
        let out_dir = self.cfg.output_dir.clone();
        let metrics_path = out_dir.join("metrics.jsonl");
        let resume = self.resume_from.clone();
        let mut state = RunState::default();
        if let Some(dir) = &resume {
            state = self.load_checkpoint(dir)?;
            if state.global_step > self.max_steps {
                return Err(Error::file(
                    dir,
                    format!("is at step {}, past this run's {} steps (max_steps)", state.global_step, self.max_steps),
                ));
            }
            obs.info(&format!("resuming from {} (step {})", dir.display(), state.global_step));
        }
        let (mut metrics_file, kept_entries) = if root {
            let (file, kept) = open_metrics(&metrics_path, resume.as_ref().map(|_| state.global_step))?;
            (Some(file), kept)
        } else {
            (None, Vec::new())
        };
        let mut events = match self.cfg.report_to.as_str() {
            // A resumed run's events are those metrics.jsonl keeps, replayed: none past the checkpoint repeat.
            "tensorboard" | "all" if root => Some(crate::tensorboard::EventWriter::create_replaying(&out_dir, &kept_entries)?),
            _ => None,
        };
        let mut write_entry = |entry: &Map<String, Value>| -> Result<()> {
            let Some(metrics_file) = metrics_file.as_mut() else { return Ok(()) };
            let line = serde_json::to_string(entry).map_err(|e| Error::Train(e.to_string()))?;
            writeln!(metrics_file, "{line}").and_then(|_| metrics_file.flush()).map_err(|e| Error::file(&metrics_path, e))?;
            if let (Some(ev), Some(step)) = (events.as_mut(), entry.get("step").and_then(|s| s.as_u64())) {
                ev.scalars(step as usize, entry)?;
            }
            Ok(())
        };

        let start = Instant::now();
        let epoch_batches = self.epoch_batches();
        let batches_per_epoch = epoch_batches.len();
        let ga = self.cfg.gradient_accumulation_steps;
        // Micro-batches of one optimizer step, over all ranks.
        let per_step = ga * world;
        let updates_per_epoch = batches_per_epoch.div_ceil(per_step);
        let mut grads = vec![0f32; self.trainable_params().len()];
        let mut acc = MetricAccumulator { values: std::mem::take(&mut state.pending_metrics) };
        let mut log_history = Vec::new();
        let mut step = state.global_step;
        let mut epoch = step / updates_per_epoch;
        let mut skip_groups = step % updates_per_epoch;
        obs.start(self.max_steps);
        'run: while step < self.max_steps {
            for (g, group) in epoch_batches.chunks(per_step).enumerate().skip(skip_groups) {
                grads.par_iter_mut().for_each(|v| *v = 0.0);
                let mut step_loss = 0.0;
                // This rank's micro-batches: places rank, rank + world, ... of the step (None past a short end).
                let batches: Vec<Option<Batch>> = (0..group.len().div_ceil(world))
                    .map(|k| group.get(k * world + ranks.rank()).map(|rows| self.collate(rows)))
                    .collect();
                // KTO averages the micro-batch losses of a step; SFT averages over all the step's tokens.
                let scored = |b: &Option<Batch>| {
                    b.as_ref().map_or(0, |b| b.main.iter().map(|(_, m)| m.iter().skip(1).filter(|c| **c).count()).sum::<usize>())
                };
                let mut step_tokens = [batches.iter().map(scored).sum::<usize>() as f64];
                ranks.sum_f64(&mut step_tokens);
                for batch in &batches {
                    let divisor = match self.task {
                        Task::Kto => group.len() as f64,
                        Task::Sft => step_tokens[0].max(1.0) / scored(batch).max(1) as f64,
                    };
                    let mut times = std::mem::take(&mut self.phases);
                    let rec = self.micro_batch_across(batch.as_ref(), state.num_tokens, Some((&mut grads, divisor)), &mut times, ranks);
                    self.phases = times;
                    state.num_tokens += rec.num_tokens;
                    if batch.is_some() {
                        step_loss += rec.loss / divisor;
                    }
                    for (k, v) in &rec.metrics {
                        acc.add(k, *v);
                    }
                }
                state.epoch_progress = epoch as f64 + (g * per_step + group.len()) as f64 / batches_per_epoch as f64;
                if world > 1 {
                    ranks.sum_f32(&mut grads);
                    let mut l = [step_loss];
                    ranks.sum_f64(&mut l);
                    step_loss = l[0];
                }
                let diverged = |what: &str| {
                    let kept = match checkpoint::list(&out_dir).last() {
                        Some((_, dir)) => format!("the last checkpoint, {}, is kept", dir.display()),
                        None => "no checkpoint was written yet".into(),
                    };
                    let rows = group.iter().flatten().collect::<Vec<_>>();
                    Error::Train(format!("non-finite {what} at step {} (rows {rows:?}); {kept}", step + 1))
                };
                if !step_loss.is_finite() {
                    return Err(diverged("loss"));
                }
                let (grad_norm, lr) = self.apply_update(&grads, step);
                if !grad_norm.is_finite() {
                    return Err(diverged("gradient norm"));
                }
                step += 1;
                state.loss_since_log += step_loss;
                state.steps_since_log += 1;
                state.total_loss += step_loss;
                obs.step(step, step_loss);
                if step % self.cfg.logging_steps == 0 {
                    let mut entry = Map::new();
                    entry.insert("loss".into(), (state.loss_since_log / state.steps_since_log as f64).into());
                    entry.insert("grad_norm".into(), grad_norm.into());
                    entry.insert("learning_rate".into(), lr.into());
                    for (k, v) in acc.drain_means() {
                        entry.insert(k, v.into());
                    }
                    entry.insert("epoch".into(), state.epoch_progress.into());
                    entry.insert("step".into(), step.into());
                    write_entry(&entry)?;
                    obs.log(&entry);
                    log_history.push(entry);
                    state.loss_since_log = 0.0;
                    state.steps_since_log = 0;
                }
                let eval_every = self.cfg.eval_steps.unwrap_or(self.cfg.logging_steps);
                // A stop during evaluation drops that evaluation; the step itself is done and checkpointed.
                let mut stopped_in_eval = false;
                if self.cfg.eval_strategy == "steps" && step % eval_every == 0 {
                    match self.evaluate_unless_stopped(obs) {
                        Some(mut entry) => {
                            entry.insert("epoch".into(), state.epoch_progress.into());
                            entry.insert("step".into(), step.into());
                            write_entry(&entry)?;
                            obs.log(&entry);
                            log_history.push(entry);
                            if self.cfg.generate_during_eval && root {
                                self.write_eval_generations(step)?;
                            }
                        }
                        None => stopped_in_eval = true,
                    }
                }
                let stop_requested = stopped_in_eval || obs.stop_requested();
                let interrupted = if world > 1 { ranks.any(stop_requested) } else { stop_requested };
                let periodic = self.cfg.save_strategy == "steps" && step % self.cfg.save_steps == 0;
                if periodic || interrupted || (step == self.max_steps && self.cfg.save_strategy == "steps") {
                    state.global_step = step;
                    state.pending_metrics = acc.values.clone();
                    let dir = if root { self.write_checkpoint(&state)? } else { checkpoint::checkpoint_dir(&out_dir, step) };
                    // No rank runs ahead of a checkpoint that is not written yet (a resume must find it).
                    ranks.barrier();
                    if interrupted {
                        obs.finish();
                        return Err(Error::Interrupted { step, checkpoint: dir });
                    }
                }
                if step == self.max_steps {
                    break 'run;
                }
            }
            skip_groups = 0;
            epoch += 1;
        }
        let runtime = start.elapsed().as_secs_f64();
        let train_loss = state.total_loss / step.max(1) as f64;
        let samples = step * per_step * self.cfg.per_device_train_batch_size;
        let mut summary = Map::new();
        summary.insert("train_runtime".into(), runtime.into());
        summary.insert("train_samples_per_second".into(), (samples as f64 / runtime).into());
        summary.insert("train_steps_per_second".into(), (step as f64 / runtime).into());
        summary.insert("train_tokens".into(), state.num_tokens.into());
        summary.insert("train_loss".into(), train_loss.into());
        summary.insert("epoch".into(), state.epoch_progress.into());
        summary.insert("step".into(), step.into());
        // The model first: a summary line in metrics.jsonl means the final model is in place.
        if let Some(output) = &self.output {
            output.publish_final(|dir| self.save(dir).map(|_| ()))?;
        }
        write_entry(&summary)?;
        log_history.push(summary);
        ranks.barrier();
        obs.finish();
        Ok(TrainSummary { log_history, steps: step, train_loss, runtime_s: runtime })
    }

    /// `generate_during_eval`: completions of the first eval prompts sampled from the policy and from the
    /// reference (when one is still in memory) into `OUTPUT_DIR/eval_generations/step-N.jsonl`.
    pub fn write_eval_generations(&self, step: usize) -> Result<PathBuf> {
        use crate::generate::{generate_ids_with, SamplingOptions};
        let (Some(eval), Some(tok)) = (&self.eval_data, &self.tokenizer) else {
            return Err(Error::Train("generate_during_eval needs an eval set and the run's tokenizer".into()));
        };
        let rows = &eval.rows[..self.cfg.generate_eval_prompts.min(eval.rows.len())];
        let prompts: Vec<Vec<u32>> = rows.iter().map(|r| r.prompt_ids.clone()).collect();
        let longest = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
        let budget = match self.cfg.max_length() {
            Some(m) => self.cfg.generate_max_new_tokens.min(m.saturating_sub(longest)),
            None => self.cfg.generate_max_new_tokens,
        };
        let opts = SamplingOptions { max_new_tokens: budget, seed: self.cfg.seed.wrapping_add(step as u64), ..Default::default() };
        let policy = generate_ids_with(&self.policy, true, &prompts, tok.eos_id, &opts);
        // The reference: a separate model, the frozen base under LoRA, or gone once precomputed.
        let reference = match (&self.reference, &self.policy.lora, self.task) {
            (Some(r), _, Task::Kto) => Some(generate_ids_with(r, false, &prompts, tok.eos_id, &opts)),
            (None, Some(_), Task::Kto) => Some(generate_ids_with(&self.policy, false, &prompts, tok.eos_id, &opts)),
            _ => None,
        };
        let decode = |ids: &[u32]| tok.decode(ids).map_err(|e| Error::Train(format!("decoding a sample: {e}")));
        let mut text = String::new();
        for (i, row) in rows.iter().enumerate() {
            let mut line = Map::new();
            line.insert("step".into(), step.into());
            line.insert("prompt".into(), decode(&row.prompt_ids)?.into());
            line.insert("policy".into(), decode(&policy[i])?.into());
            if let Some(r) = &reference {
                line.insert("reference".into(), decode(&r[i])?.into());
            }
            text += &Value::Object(line).to_string();
            text.push('\n');
        }
        let dir = self.cfg.output_dir.join("eval_generations");
        std::fs::create_dir_all(&dir).map_err(|e| Error::file(&dir, e))?;
        let path = dir.join(format!("step-{step}.jsonl"));
        crate::files::write_atomic(&path, text.as_bytes())?;
        Ok(path)
    }

    /// Writes `checkpoint-N` (model or adapter, optimizer moments, run state) into the output folder.
    fn write_checkpoint(&mut self, state: &RunState) -> Result<PathBuf> {
        let mut state = state.clone();
        state.optimizer_steps = self.optimizer.steps;
        let out = self.cfg.output_dir.clone();
        let keep = self.cfg.save_total_limit;
        checkpoint::save(&out, &state, keep, |dir| {
            self.save(dir)?;
            if let Some(identity) = &self.identity {
                identity.write(dir)?;
            }
            if !self.optimizer.exp_avg.is_empty() {
                let views = vec![
                    ("exp_avg".to_string(), f32_view(&self.optimizer.exp_avg)?),
                    ("exp_avg_sq".to_string(), f32_view(&self.optimizer.exp_avg_sq)?),
                ];
                let bytes = safetensors::serialize(views, None).map_err(|e| Error::Train(e.to_string()))?;
                crate::files::write_atomic(&dir.join(checkpoint::OPTIMIZER_FILE), &bytes)?;
            }
            Ok(())
        })
    }

    /// Claims the output folder before anything is written there (rank 0 takes its lock), fixes this run's
    /// identity (before any checkpoint's weights are loaded: it fingerprints the initial ones), and decides what
    /// the run continues: the checkpoint `resume_from_checkpoint` names, which must be of the same run; or
    /// nothing, in a folder that holds no other run (`overwrite_output_dir = true` clears one). Idempotent.
    pub fn claim_output(&mut self, obs: &dyn Observer, ranks: &Ranks) -> Result<()> {
        if self.identity.is_some() {
            return Ok(());
        }
        let out = self.cfg.output_dir.clone();
        let inputs = [Some(&self.cfg.model), self.cfg.ref_model.as_ref(), self.cfg.tokenizer.as_ref()];
        if let Some(input) = inputs.into_iter().flatten().find(|d| crate::output::same_folder(d, &out)) {
            return Err(Error::file(&out, format!("output_dir is an input folder ({}); choose another", input.display())));
        }
        let identity = self.run_identity(ranks.size());
        let output = if ranks.is_root() { Some(OutputDir::claim(&out)?) } else { None };
        let resume = match &self.cfg.resume_from_checkpoint {
            Some(setting) => checkpoint::resolve(setting, &out, &identity)?,
            None => None,
        };
        if let (Some(output), None) = (&output, &resume) {
            let earlier = output.earlier_run();
            if !earlier.is_empty() && !self.cfg.overwrite_output_dir {
                return Err(Error::file(
                    &out,
                    format!(
                        "holds another run ({}); set resume_from_checkpoint = true to continue it, overwrite_output_dir = true to replace it, or choose another output_dir",
                        earlier.join(", ")
                    ),
                ));
            }
            if !earlier.is_empty() {
                obs.warn(&format!("overwrite_output_dir = true: removing the earlier run in {} ({})", out.display(), earlier.join(", ")));
                output.clear_earlier_run()?;
            }
        }
        if let Some(dir) = &resume {
            let theirs = crate::run_identity::RunIdentity::read(dir)?;
            let decays = !matches!(self.schedule, Schedule::Constant | Schedule::ConstantWithWarmup);
            if theirs.planned_steps != identity.planned_steps && decays {
                obs.warn(&format!(
                    "the run now has {} steps instead of {}: the {} schedule is recomputed over the new length",
                    identity.planned_steps, theirs.planned_steps, self.cfg.lr_scheduler_type
                ));
            }
        }
        self.output = output;
        self.resume_from = resume;
        self.identity = Some(identity);
        Ok(())
    }

    /// This run's identity: defining settings, and fingerprints of the training data and the initial weights.
    fn run_identity(&self, world: usize) -> RunIdentity {
        let mut data = Fingerprint::default();
        data_fingerprint(&mut data, &self.data);
        let weights = |m: &Model| Fingerprint::default().f32s(&m.params).hex();
        let policy = weights(&self.policy);
        let reference = match (&self.reference, self.task) {
            (_, Task::Sft) => "none".to_string(),
            (Some(r), _) => weights(r),
            // LoRA without ref_model: the frozen base, which is the policy's base.
            (None, _) => policy.clone(),
        };
        let task = match self.task {
            Task::Kto => "kto train",
            Task::Sft => "kto sft",
        };
        RunIdentity::new(task, &self.cfg, world, [data.hex(), policy, reference], self.max_steps)
    }

    /// Restores weights (or adapters), optimizer moments and run state from a checkpoint folder.
    fn load_checkpoint(&mut self, dir: &std::path::Path) -> Result<RunState> {
        let state = checkpoint::load_state(dir)?;
        match &mut self.policy.lora {
            Some(lora) => {
                let saved = crate::model::lora::Lora::load_peft(dir, &self.policy.spec)?;
                if saved.params.len() != lora.params.len() {
                    return Err(Error::file(dir, "the checkpoint's adapters do not match this config's LoRA settings"));
                }
                lora.params = saved.params;
            }
            None => {
                let saved = Model::load(dir)?;
                if saved.spec != self.policy.spec {
                    return Err(Error::file(dir, "the checkpoint's model differs from this config's model"));
                }
                self.policy.params = saved.params;
            }
        }
        if !self.optimizer.exp_avg.is_empty() {
            let path = dir.join(checkpoint::OPTIMIZER_FILE);
            let bytes = std::fs::read(&path).map_err(|e| Error::file(&path, e))?;
            let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| Error::file(&path, e))?;
            for (name, dst) in [("exp_avg", &mut self.optimizer.exp_avg), ("exp_avg_sq", &mut self.optimizer.exp_avg_sq)] {
                let view = st.tensor(name).map_err(|_| Error::file(&path, format!("tensor {name} is missing")))?;
                if view.data().len() != dst.len() * 4 {
                    return Err(Error::file(&path, format!("tensor {name} has the wrong size")));
                }
                for (d, c) in dst.iter_mut().zip(view.data().chunks_exact(4)) {
                    *d = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
        }
        self.optimizer.steps = state.optimizer_steps;
        Ok(state)
    }

    /// Writes the policy as a Hugging Face folder (weights, config, tokenizer files), or with LoRA the adapter
    /// as PEFT saves it (plus the tokenizer files); `kto merge` turns that into a full model.
    pub fn save(&self, dir: &std::path::Path) -> Result<PathBuf> {
        match &self.policy.lora {
            Some(lora) => {
                lora.save_peft(dir, &self.cfg.model)?;
                crate::model::weights::copy_tokenizer_files(self.cfg.tokenizer_dir(), dir)?;
            }
            None => self.policy.save_pretrained(dir, &self.cfg.model, self.cfg.tokenizer_dir())?,
        }
        Ok(dir.to_path_buf())
    }
}

/// Names the first input that is not there, before anything slow is loaded.
fn check_inputs_exist(cfg: &TrainConfig) -> Result<()> {
    let folders = [("model", Some(&cfg.model)), ("ref_model", cfg.ref_model.as_ref()), ("tokenizer", cfg.tokenizer.as_ref())];
    for (key, dir) in folders {
        if let Some(dir) = dir.filter(|d| !d.is_dir()) {
            return Err(Error::file(dir, format!("no such folder ({key})")));
        }
    }
    for (key, path) in [("train_dataset", Some(&cfg.train_dataset)), ("eval_dataset", cfg.eval_dataset.as_ref())] {
        if let Some(path) = path.filter(|p| !p.exists()) {
            return Err(Error::file(path, format!("no such file or folder ({key})")));
        }
    }
    Ok(())
}

/// Optimizer steps of a run: `max_steps`, else `num_train_epochs` of steps of `gradient_accumulation_steps ×
/// world` micro-batches.
fn planned_steps(cfg: &TrainConfig, rows: usize, world: usize) -> usize {
    let batches_per_epoch = rows.div_ceil(cfg.per_device_train_batch_size);
    let updates_per_epoch = batches_per_epoch.div_ceil(cfg.gradient_accumulation_steps * world);
    if cfg.max_steps > 0 {
        cfg.max_steps as usize
    } else {
        (cfg.num_train_epochs * updates_per_epoch as f64).ceil().max(1.0) as usize
    }
}

/// TRL's recommendation when desirable and undesirable rows are unbalanced and the weights do not make up for
/// it (KTO paper: λD·nD / (λU·nU) should lie in [1, 4/3]).
pub fn weight_balance_warning(data: &Prepared, wd: f64, wu: f64) -> Option<String> {
    let n = data.rows.len();
    let nd = data.rows.iter().filter(|r| r.label).count().max(1);
    let nu = n.saturating_sub(nd).max(1);
    if nd == nu {
        return None;
    }
    let round2 = |x: f64| (x * 100.0).round() / 100.0;
    let (nd, nu) = (nd as f64, nu as f64);
    let d_lo = round2(nu * wu / nd);
    let d_hi = round2(1.33 * nu * wu / nd);
    let u_lo = round2(nd * wd / (1.33 * nu));
    let u_hi = round2(nd * wd / nu);
    let d_ok = d_lo <= wd && wd <= d_hi;
    let u_ok = u_lo <= wu && wu <= u_hi;
    if d_ok || u_ok {
        return None;
    }
    Some(format!(
        "desirable and undesirable rows are unbalanced ({} vs {}) and the weights do not compensate: set EITHER desirable_weight in [{d_lo}, {d_hi}] OR undesirable_weight in [{u_lo}, {u_hi}] (not both)",
        nd as usize, nu as usize
    ))
}
