//! What makes a run the run it is: the settings that change its numbers, a fingerprint of its tokenized training
//! data and of its initial (and reference) weights. Every checkpoint carries it (`run_identity.json`); resuming
//! compares it with the config at hand and refuses, naming the keys, when they differ. Keys that only extend or
//! observe a run (its length, logging, saving, evaluation, where it writes) may change between a run and its
//! resumption.
use crate::config::TrainConfig;
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::path::Path;

pub const IDENTITY_FILE: &str = "run_identity.json";

/// Config keys that may differ when a run resumes. Paths of inputs are here because their contents are
/// fingerprinted instead (a moved data file is the same data); every other key defines the run.
const MAY_CHANGE: &[&str] = &[
    "model",
    "ref_model",
    "tokenizer",
    "train_dataset",
    "model_revision",
    "dataset_name",
    "dataset_config",
    "dataset_train_split",
    "dataset_test_split",
    "prompt_column",
    "completion_column",
    "label_column",
    "skip_invalid_rows",
    "output_dir",
    "overwrite_output_dir",
    "resume_from_checkpoint",
    "max_steps",
    "num_train_epochs",
    "logging_steps",
    "logging_strategy",
    "save_strategy",
    "save_steps",
    "save_total_limit",
    "save_only_model",
    "load_best_model_at_end",
    "metric_for_best_model",
    "greater_is_better",
    "eval_dataset",
    "eval_strategy",
    "eval_steps",
    "eval_on_start",
    "logging_first_step",
    "per_device_eval_batch_size",
    "report_to",
    "disable_tqdm",
    "generate_during_eval",
    "generate_eval_prompts",
    "generate_max_new_tokens",
    "precompute_ref_log_probs",
    "precompute_ref_batch_size",
    "gradient_checkpointing",
    "bf16",
    // Replaced by the product below: 2 ranks × 1 equals 1 process × 2.
    "gradient_accumulation_steps",
];

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RunIdentity {
    /// `kto train` or `kto sft`.
    pub task: String,
    /// The defining config keys and their values.
    pub settings: Map<String, Value>,
    /// Fingerprint of the tokenized training rows (ids, labels, KL completions, order).
    pub train_data: String,
    /// Fingerprint of the policy's weights before the first step.
    pub initial_weights: String,
    /// Fingerprint of the reference weights (`none` without a reference).
    pub reference_weights: String,
    /// Planned optimizer steps (may change on resume; a schedule that decays over them then changes course).
    pub planned_steps: usize,
}

impl RunIdentity {
    pub fn new(task: &str, cfg: &TrainConfig, world: usize, fingerprints: [String; 3], planned_steps: usize) -> Self {
        let mut settings = match serde_json::to_value(cfg) {
            Ok(Value::Object(m)) => m,
            _ => Map::new(),
        };
        settings.retain(|k, _| !MAY_CHANGE.contains(&k.as_str()));
        settings.insert("gradient_accumulation_steps × ranks".into(), (cfg.gradient_accumulation_steps * world).into());
        let [train_data, initial_weights, reference_weights] = fingerprints;
        RunIdentity { task: task.into(), settings, train_data, initial_weights, reference_weights, planned_steps }
    }

    /// What differs from `other`, as names a user can act on; empty when the runs are the same.
    pub fn differences(&self, other: &RunIdentity) -> Vec<String> {
        let mut diff = Vec::new();
        if self.task != other.task {
            diff.push(format!("command ({} vs {})", other.task, self.task));
        }
        let mut keys: Vec<&String> = self.settings.keys().chain(other.settings.keys()).collect();
        keys.sort();
        keys.dedup();
        for k in keys {
            let (a, b) = (other.settings.get(k), self.settings.get(k));
            // A key newer than one side's kto, at its empty default on the other, is the same run.
            let unset = |v: Option<&Value>| match v {
                None | Some(Value::Null) | Some(Value::Bool(false)) => true,
                Some(Value::Object(m)) => m.values().all(Value::is_null),
                _ => false,
            };
            if a != b && !(unset(a) && unset(b)) {
                let show = |v: Option<&Value>| v.map_or("unset".to_string(), |v| v.to_string());
                diff.push(format!("{k} ({} vs {})", show(a), show(b)));
            }
        }
        if self.train_data != other.train_data {
            diff.push("the tokenized training data (train_dataset, its columns, the tokenizer or max_length)".into());
        }
        if self.initial_weights != other.initial_weights {
            diff.push("the initial weights (model)".into());
        }
        if self.reference_weights != other.reference_weights {
            diff.push("the reference weights (ref_model)".into());
        }
        diff
    }

    pub fn write(&self, dir: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self).map_err(|e| Error::Train(e.to_string()))?;
        crate::files::write_atomic(&dir.join(IDENTITY_FILE), text.as_bytes())
    }

    /// The identity a checkpoint records; an error for a checkpoint without one (written by an older kto).
    pub fn read(checkpoint: &Path) -> Result<RunIdentity> {
        let path = checkpoint.join(IDENTITY_FILE);
        let text = std::fs::read_to_string(&path)
            .map_err(|_| Error::file(checkpoint, format!("no {IDENTITY_FILE}: written by an older kto, so it cannot be checked against this config")))?;
        serde_json::from_str(&text).map_err(|e| Error::file(&path, format!("invalid run identity: {e}")))
    }

    /// Refuses `checkpoint` unless it belongs to this run.
    pub fn check_checkpoint(&self, checkpoint: &Path) -> Result<RunIdentity> {
        let theirs = RunIdentity::read(checkpoint)?;
        let diff = self.differences(&theirs);
        if !diff.is_empty() {
            return Err(Error::file(
                checkpoint,
                format!(
                    "belongs to another run: {} differ{} (checkpoint vs config); resume with the same settings, or start anew with overwrite_output_dir = true or another output_dir",
                    diff.join(", "),
                    if diff.len() == 1 { "s" } else { "" }
                ),
            ));
        }
        Ok(theirs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(settings: Value) -> RunIdentity {
        RunIdentity {
            task: "train".into(),
            settings: settings.as_object().unwrap().clone(),
            train_data: "d".into(),
            initial_weights: "w".into(),
            reference_weights: "none".into(),
            planned_steps: 3,
        }
    }

    /// A checkpoint written before a key existed resumes when the key is at its empty default; a set value
    /// still differs.
    #[test]
    fn a_key_newer_than_the_checkpoint_differs_only_when_set() {
        let old = identity(serde_json::json!({"beta": 0.1}));
        let unset = identity(serde_json::json!({"beta": 0.1, "lr_scheduler_kwargs": {"num_cycles": null}, "new_flag": false}));
        assert!(unset.differences(&old).is_empty(), "{:?}", unset.differences(&old));
        let set = identity(serde_json::json!({"beta": 0.1, "lr_scheduler_kwargs": {"num_cycles": 2.0}}));
        assert_eq!(set.differences(&old), ["lr_scheduler_kwargs (unset vs {\"num_cycles\":2.0})"]);
    }
}
