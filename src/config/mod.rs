//! The training configuration: a TOML file whose keys carry TRL's `KTOConfig` / `TrainingArguments` names and
//! defaults (compute is always fp32 on the CPU). Unknown keys and wrong types are errors that name the key.
//! The keys and their defaults are here; reading, overrides and range checks are in `load`.
use crate::objective::LossType;
use crate::optim::{OptimKind, OptimName};
use crate::schedule::{Schedule, ScheduleKwargs};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

mod load;
mod trl_keys;

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    // ---- what to train on ----
    /// The policy: a Hugging Face model folder (`config.json`, safetensors weights, tokenizer files) or a hub
    /// ID (`Qwen/Qwen2.5-0.5B-Instruct`), found in the Hugging Face cache or downloaded into it. TRL's name
    /// `model_name_or_path` is taken too.
    #[serde(alias = "model_name_or_path")]
    pub model: PathBuf,
    /// The branch, tag or commit of hub IDs (`model`, `ref_model`, `tokenizer`).
    #[serde(default = "d_revision")]
    pub model_revision: String,
    /// Model folder of the frozen reference. Unset: a frozen copy of the initial policy (TRL reloads it from disk).
    #[serde(default)]
    pub ref_model: Option<PathBuf>,
    /// Folder with `tokenizer.json` / `tokenizer_config.json`. Unset: the model folder.
    #[serde(default)]
    pub tokenizer: Option<PathBuf>,
    /// JSON Lines, JSON or Parquet file (or a folder of them, or `folder/prefix*`) of
    /// `{prompt, completion, label}`, `{prompt, chosen, rejected}` or `{chosen, rejected}`. Or `dataset_name`.
    #[serde(default)]
    pub train_dataset: PathBuf,
    /// A data set by hub ID (`trl-lib/kto-mix-14k`) or a local folder laid out like one: its
    /// `dataset_train_split` trains, its `dataset_test_split` evaluates (when `eval_strategy` is not "no"
    /// and no `eval_dataset` is set), as TRL's scripts take them.
    #[serde(default)]
    pub dataset_name: Option<String>,
    /// The data set's config (subset), when its card has several.
    #[serde(default)]
    pub dataset_config: Option<String>,
    #[serde(default = "d_train_split")]
    pub dataset_train_split: String,
    #[serde(default = "d_test_split")]
    pub dataset_test_split: String,
    /// Held-out data in the same formats; evaluated every `eval_steps` with `eval_strategy = "steps"` (and at the
    /// last step), or at the end of each epoch with `"epoch"`.
    #[serde(default)]
    pub eval_dataset: Option<PathBuf>,
    /// `"no"` (transformers' default), `"steps"` or `"epoch"`.
    #[serde(default)]
    pub eval_strategy: Strategy,
    /// Default: `logging_steps`.
    #[serde(default)]
    pub eval_steps: Option<usize>,
    #[serde(default = "d_batch")]
    pub per_device_eval_batch_size: usize,
    /// Evaluate once before the first step (logged at the step training starts from), as transformers'
    /// `eval_on_start`.
    #[serde(default)]
    pub eval_on_start: bool,
    /// Column names in the data files, mapped to TRL's `prompt`, `completion` and `label`.
    #[serde(default = "d_prompt_col")]
    pub prompt_column: String,
    #[serde(default = "d_completion_col")]
    pub completion_column: String,
    #[serde(default = "d_label_col")]
    pub label_column: String,
    /// Skip malformed rows (counted and reported in the log) instead of stopping at the first.
    #[serde(default)]
    pub skip_invalid_rows: bool,
    /// Where `metrics.jsonl` and the trained model go.
    #[serde(default = "d_output_dir")]
    pub output_dir: PathBuf,
    /// A new run into an `output_dir` that holds another run's checkpoints, metrics or model is refused unless
    /// this is true; then those are removed first (TrainingArguments' name).
    #[serde(default)]
    pub overwrite_output_dir: bool,

    // ---- the KTO objective ----
    /// β: temperature of the log-ratio against the reference.
    #[serde(default = "d_beta")]
    pub beta: f64,
    /// `"kto"` or `"apo_zero_unpaired"`.
    #[serde(default = "d_loss_type")]
    pub loss_type: LossType,
    /// λD, the weight of desirable rows' losses.
    #[serde(default = "d_one")]
    pub desirable_weight: f64,
    /// λU, the weight of undesirable rows' losses.
    #[serde(default = "d_one")]
    pub undesirable_weight: f64,
    /// Maximum tokens of prompt+completion; rows whose prompt alone reaches it are dropped. 0: no limit
    /// (TRL's `None`).
    #[serde(default = "d_max_length")]
    pub max_length: usize,

    // ---- batching, optimizer and schedule ----
    #[serde(default = "d_batch")]
    pub per_device_train_batch_size: usize,
    #[serde(default = "d_one_usize")]
    pub gradient_accumulation_steps: usize,
    #[serde(default = "d_lr")]
    pub learning_rate: f64,
    /// `"adamw_torch_fused"` (default), `"adamw_torch"` or `"sgd"`.
    #[serde(default = "d_optim")]
    pub optim: OptimName,
    /// transformers' names: `"linear"` (default), `"constant"`, `"constant_with_warmup"`, `"cosine"`,
    /// `"cosine_with_restarts"`, `"polynomial"`, `"inverse_sqrt"`, `"cosine_with_min_lr"`,
    /// `"cosine_warmup_with_min_lr"`, `"warmup_stable_decay"`.
    #[serde(default = "d_sched")]
    pub lr_scheduler_type: Schedule,
    /// The schedule function's own arguments (`num_cycles`, `lr_end`, `power`, `timescale`, `min_lr`, ...): a
    /// table, or a JSON object in a string as transformers also takes it.
    #[serde(default, deserialize_with = "schedule_kwargs")]
    pub lr_scheduler_kwargs: ScheduleKwargs,
    /// Warm-up in optimizer steps; a value below 1 is a fraction of the total steps (transformers 5).
    #[serde(default)]
    pub warmup_steps: f64,
    /// Warm-up as a fraction of the total steps (older transformers name).
    #[serde(default)]
    pub warmup_ratio: f64,
    #[serde(default)]
    pub weight_decay: f64,
    #[serde(default = "d_beta1")]
    pub adam_beta1: f64,
    #[serde(default = "d_beta2")]
    pub adam_beta2: f64,
    #[serde(default = "d_eps")]
    pub adam_epsilon: f64,
    /// Global L2 gradient clipping; 0 disables it.
    #[serde(default = "d_one")]
    pub max_grad_norm: f64,
    #[serde(default = "d_epochs")]
    pub num_train_epochs: f64,
    /// Optimizer steps to run; -1: `num_train_epochs` decides.
    #[serde(default = "d_max_steps")]
    pub max_steps: i64,
    #[serde(default = "d_seed")]
    pub seed: u64,
    #[serde(default = "d_logging_steps")]
    pub logging_steps: usize,
    /// `"steps"` (default: every `logging_steps`), `"epoch"` (at the end of each epoch) or `"no"`.
    #[serde(default = "d_save_strategy")]
    pub logging_strategy: Strategy,
    /// Also log the first step (transformers' `logging_first_step`).
    #[serde(default)]
    pub logging_first_step: bool,
    /// Must be `"sequential"` for `kto`: the KL pairs are fixed chunks of consecutive rows.
    #[serde(default = "d_sampling")]
    pub train_sampling_strategy: String,

    // ---- checkpoints ----
    /// `"steps"`: a checkpoint every `save_steps` optimizer steps and at the end; `"no"`: only the final model.
    #[serde(default = "d_save_strategy")]
    pub save_strategy: Strategy,
    #[serde(default = "d_save_steps")]
    pub save_steps: usize,
    /// Keep at most this many checkpoints (the oldest go first).
    #[serde(default)]
    pub save_total_limit: Option<usize>,
    /// Checkpoints without the optimizer state (transformers' `save_only_model`): smaller, and a resume from one
    /// refuses to continue an AdamW run, whose moments are gone (its model can still start a new run).
    #[serde(default)]
    pub save_only_model: bool,
    /// At the end, load the checkpoint whose evaluation scored best on `metric_for_best_model` and save that as
    /// the final model (transformers' `load_best_model_at_end`; evaluation and saving must be on the same
    /// schedule).
    #[serde(default)]
    pub load_best_model_at_end: bool,
    /// An evaluation metric, with or without its `eval_` prefix; default `"loss"` when `load_best_model_at_end`.
    #[serde(default)]
    pub metric_for_best_model: Option<String>,
    /// Default: true unless the metric's name ends in `loss`.
    #[serde(default)]
    pub greater_is_better: Option<bool>,
    /// A checkpoint folder to continue from, or `true` for the latest in `output_dir`.
    #[serde(default)]
    pub resume_from_checkpoint: Option<toml::Value>,

    // ---- LoRA (TRL's ModelConfig names and defaults) ----
    /// Train LoRA adapters instead of the full model; without `ref_model` the reference is the frozen base.
    #[serde(default)]
    pub use_peft: bool,
    #[serde(default = "d_lora_r")]
    pub lora_r: usize,
    #[serde(default = "d_lora_alpha")]
    pub lora_alpha: f64,
    /// TRL's `disable_dropout = true` (the default) also zeroes PEFT's LoRA dropout, so it has no effect then;
    /// LoRA dropout with `disable_dropout = false` is not supported.
    #[serde(default = "d_lora_dropout")]
    pub lora_dropout: f64,
    /// PEFT module names (`q_proj`, ..., `down_proj`) or `["all-linear"]`; default `["q_proj", "v_proj"]`.
    #[serde(default)]
    pub lora_target_modules: Option<Vec<String>>,

    // ---- accepted for compatibility with TRL configs ----
    /// The engine has no dropout modules; accepted so TRL configs load.
    #[serde(default = "d_true")]
    pub disable_dropout: bool,
    /// Keep only each layer's input during the training forward and recompute the rest in backward: less
    /// activation memory, about one more forward of compute, the same numbers. TRL's default is true.
    #[serde(default = "d_true")]
    pub gradient_checkpointing: bool,
    /// Compute is fp32 on the CPU; `bf16 = true` is accepted with a warning.
    #[serde(default)]
    pub bf16: Option<bool>,
    #[serde(default)]
    pub fp16: bool,
    /// Compute the reference log-probs of every row once before training (cached in `output_dir`), then train
    /// without a reference model in memory. Same numbers as the online reference.
    #[serde(default)]
    pub precompute_ref_log_probs: bool,
    /// Batch size of that pass (default: `per_device_train_batch_size`).
    #[serde(default)]
    pub precompute_ref_batch_size: Option<usize>,
    /// Only 1 (or unset) is supported: TRL with several processes rotates KL pairs inside shards.
    #[serde(default)]
    pub dataset_num_proc: Option<usize>,
    /// `"none"` (default here) or `"tensorboard"` (event file in `OUTPUT_DIR/runs/`); `"all"` means tensorboard.
    #[serde(default)]
    pub report_to: ReportTo,
    /// No progress bar even on a terminal.
    #[serde(default)]
    pub disable_tqdm: bool,
    /// At each evaluation, sample completions of the first `generate_eval_prompts` eval prompts from the policy
    /// and the reference into `OUTPUT_DIR/eval_generations/step-N.jsonl` (TRL 0.x's key; TRL 1.x dropped it).
    #[serde(default)]
    pub generate_during_eval: bool,
    #[serde(default = "d_generate_eval_prompts")]
    pub generate_eval_prompts: usize,
    /// Token budget of those completions (also bounded by `max_length`).
    #[serde(default = "d_generate_max_new_tokens")]
    pub generate_max_new_tokens: usize,

    /// Which command the config is for (set by the loader, not a key): the KL checks are KTO's alone.
    #[serde(skip_serializing, skip_deserializing)]
    pub purpose: Purpose,
    /// TRL keys of the config file that kto does not implement and that change nothing it computes (warned
    /// about when training starts).
    #[serde(skip_serializing, skip_deserializing)]
    pub ignored_trl_keys: Vec<String>,
}

/// `logging_strategy` / `eval_strategy` / `save_strategy`: transformers' `IntervalStrategy`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    #[default]
    No,
    Steps,
    Epoch,
}

/// `report_to`: where metrics go besides `metrics.jsonl`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReportTo {
    #[default]
    None,
    Tensorboard,
    /// Every integration kto has: TensorBoard.
    All,
}

impl ReportTo {
    pub fn tensorboard(self) -> bool {
        self != ReportTo::None
    }
}

/// What a config is loaded for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Purpose {
    /// `kto train`: the KTO objective and its batch rules.
    #[default]
    Kto,
    /// `kto sft`: next-token loss; no reference, no KL pairs, SFTConfig's learning rate by default.
    Sft,
}

fn d_generate_eval_prompts() -> usize {
    4
}
fn d_generate_max_new_tokens() -> usize {
    64
}

fn d_output_dir() -> PathBuf {
    PathBuf::from("trainer_output")
}
fn d_beta() -> f64 {
    0.1
}
fn d_loss_type() -> LossType {
    LossType::Kto
}
fn d_one() -> f64 {
    1.0
}
fn d_one_usize() -> usize {
    1
}
fn d_max_length() -> usize {
    1024
}
fn d_batch() -> usize {
    8
}
fn d_lr() -> f64 {
    1e-6
}
fn d_optim() -> OptimName {
    OptimName::AdamwTorchFused
}
/// `lr_scheduler_kwargs` as a table or as a string holding a JSON object.
fn schedule_kwargs<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<ScheduleKwargs, D::Error> {
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum TableOrJson {
        Json(String),
        Table(toml::Table),
    }
    use serde::de::Error as _;
    let value = match TableOrJson::deserialize(d)? {
        TableOrJson::Json(text) => serde_json::from_str::<serde_json::Value>(&text).map_err(D::Error::custom)?,
        TableOrJson::Table(t) => serde_json::to_value(t).map_err(D::Error::custom)?,
    };
    serde_json::from_value(value).map_err(D::Error::custom)
}

fn d_sched() -> Schedule {
    Schedule::Linear
}
fn d_beta1() -> f64 {
    0.9
}
fn d_beta2() -> f64 {
    0.999
}
fn d_eps() -> f64 {
    1e-8
}
fn d_epochs() -> f64 {
    3.0
}
fn d_max_steps() -> i64 {
    -1
}
fn d_seed() -> u64 {
    42
}
fn d_logging_steps() -> usize {
    10
}
fn d_sampling() -> String {
    "sequential".into()
}

fn d_revision() -> String {
    "main".into()
}
fn d_train_split() -> String {
    "train".into()
}
fn d_test_split() -> String {
    "test".into()
}
fn d_prompt_col() -> String {
    "prompt".into()
}
fn d_completion_col() -> String {
    "completion".into()
}
fn d_label_col() -> String {
    "label".into()
}
/// `"steps"`: transformers' default for logging and saving.
fn d_save_strategy() -> Strategy {
    Strategy::Steps
}
fn d_save_steps() -> usize {
    500
}
fn d_lora_r() -> usize {
    16
}
fn d_lora_alpha() -> f64 {
    32.0
}
fn d_lora_dropout() -> f64 {
    0.05
}
fn d_true() -> bool {
    true
}

impl TrainConfig {
    pub fn optim_kind(&self) -> OptimKind {
        self.optim.kind()
    }
    /// The LoRA targets this config asks for.
    pub fn lora_targets(&self) -> Vec<crate::model::lora::Target> {
        match &self.lora_target_modules {
            Some(t) => crate::model::lora::parse_targets(t).unwrap_or_default(),
            None => crate::model::lora::DEFAULT_TARGETS.to_vec(),
        }
    }

    pub fn max_length(&self) -> Option<usize> {
        (self.max_length > 0).then_some(self.max_length)
    }
    pub fn tokenizer_dir(&self) -> &Path {
        self.tokenizer.as_deref().unwrap_or(&self.model)
    }
    /// The metric that picks the best checkpoint (`eval_`-prefixed) and whether more is better, when one is tracked.
    pub fn best_metric(&self) -> Option<(String, bool)> {
        let name = match &self.metric_for_best_model {
            Some(m) => m.clone(),
            None if self.load_best_model_at_end => "loss".into(),
            None => return None,
        };
        let name = if name.starts_with("eval_") { name } else { format!("eval_{name}") };
        let greater = self.greater_is_better.unwrap_or(!name.ends_with("loss"));
        Some((name, greater))
    }

    /// Warm-up steps for a run of `total` optimizer steps, as transformers' `get_warmup_steps`.
    pub fn warmup_for(&self, total: usize) -> usize {
        if self.warmup_steps >= 1.0 {
            self.warmup_steps as usize
        } else if self.warmup_steps > 0.0 {
            (self.warmup_steps * total as f64).ceil() as usize
        } else {
            (self.warmup_ratio * total as f64).ceil() as usize
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = "model = \"m\"\ntrain_dataset = \"d.jsonl\"\n";

    #[test]
    fn defaults_are_trls() {
        let c = TrainConfig::from_toml(MIN, &[]).unwrap();
        assert_eq!(c.learning_rate, 1e-6);
        assert_eq!(c.logging_steps, 10);
        assert_eq!(c.max_length(), Some(1024));
        assert_eq!(c.lr_scheduler_type, Schedule::Linear);
        assert_eq!(c.max_grad_norm, 1.0);
    }

    #[test]
    fn unknown_keys_and_wrong_types_name_the_key() {
        let e = TrainConfig::from_toml(&format!("{MIN}betta = 0.2\n"), &[]).unwrap_err().to_string();
        assert!(e.contains("betta"), "{e}");
        let e = TrainConfig::from_toml(&format!("{MIN}beta = \"high\"\n"), &[]).unwrap_err().to_string();
        assert!(e.contains("beta"), "{e}");
        let e = TrainConfig::from_toml(MIN, &["per_device_train_batch_size=1".into()]).unwrap_err().to_string();
        assert!(e.contains("per_device_train_batch_size"), "{e}");
    }

    #[test]
    fn overrides_parse_as_toml_or_bare_strings() {
        let c = TrainConfig::from_toml(MIN, &["optim=sgd".into(), "beta=0.5".into(), "max_steps=3".into()]).unwrap();
        assert_eq!(c.optim, OptimName::Sgd);
        assert_eq!(c.beta, 0.5);
        assert_eq!(c.max_steps, 3);
    }
}
