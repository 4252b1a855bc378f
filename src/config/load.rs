//! Reading a config: the TOML file, `--set KEY=VALUE` overrides, the per-task defaults, then the range checks
//! that make a bad value a one-line error naming its key.
use super::{Purpose, Strategy, TrainConfig};
use crate::objective::LossType;
use crate::error::{Error, Result};
use serde::Deserialize;
use std::path::Path;

/// Parses a `--set KEY=VALUE` value as TOML (numbers, booleans, quoted strings, arrays); anything that is not
/// valid TOML is taken as a bare string, so `--set optim=sgd` works.
fn parse_override_value(raw: &str) -> toml::Value {
    match toml::from_str::<toml::Table>(&format!("v = {raw}")) {
        Ok(mut t) => t.remove("v").unwrap_or_else(|| toml::Value::String(raw.into())),
        Err(_) => toml::Value::String(raw.into()),
    }
}

impl TrainConfig {
    /// Reads a TOML file and applies `KEY=VALUE` overrides.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self> {
        Self::load_for(Purpose::Kto, path, overrides)
    }

    /// `load` for `kto sft`: SFTConfig's `learning_rate = 2e-5` unless the file or an override sets it, and no
    /// KTO-only checks.
    pub fn load_sft(path: &Path, overrides: &[String]) -> Result<Self> {
        Self::load_for(Purpose::Sft, path, overrides)
    }

    /// Reads a TOML file, or a TRL YAML recipe (`.yaml`, `.yml`), and applies the overrides.
    pub fn load_for(purpose: Purpose, path: &Path, overrides: &[String]) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::file(path, format!("cannot read: {e}")))?;
        let yaml = path.extension().is_some_and(|e| e == "yaml" || e == "yml");
        let table = if yaml { yaml_table(&text) } else { toml_table(&text) };
        table.and_then(|t| Self::from_table_for(purpose, t, overrides)).map_err(|e| match e {
            Error::Config(msg) => Error::file(path, msg),
            other => other,
        })
    }

    pub fn from_toml(text: &str, overrides: &[String]) -> Result<Self> {
        Self::from_toml_for(Purpose::Kto, text, overrides)
    }

    pub fn from_toml_for(purpose: Purpose, text: &str, overrides: &[String]) -> Result<Self> {
        Self::from_table_for(purpose, toml_table(text)?, overrides)
    }

    /// The config of the keys in `table` (TRL's keys kto does not implement taken out, see `trl_keys`) and
    /// the overrides, after the range checks.
    pub fn from_table_for(purpose: Purpose, mut table: toml::Table, overrides: &[String]) -> Result<Self> {
        let defaults = match purpose {
            Purpose::Kto => vec![],
            Purpose::Sft => vec![("learning_rate", toml::Value::Float(2e-5))],
        };
        for (key, value) in &defaults {
            table.entry(key.to_string()).or_insert_with(|| value.clone());
        }
        for item in overrides {
            let (key, value) = item
                .split_once('=')
                .ok_or_else(|| Error::Config(format!("--set {item:?}: expected KEY=VALUE")))?;
            table.insert(key.trim().to_string(), parse_override_value(value.trim()));
        }
        let ignored = super::trl_keys::adapt(&mut table)?;
        let mut cfg: TrainConfig =
            TrainConfig::deserialize(table).map_err(|e| Error::Config(one_line(&e.to_string())))?;
        cfg.purpose = purpose;
        cfg.ignored_trl_keys = ignored;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if self.per_device_train_batch_size == 0 {
            return bad("per_device_train_batch_size must be at least 1".into());
        }
        if self.purpose == Purpose::Kto && self.loss_type == LossType::Kto && self.per_device_train_batch_size < 2 {
            return bad("per_device_train_batch_size must be > 1 for loss_type \"kto\": with one row the KL term equals the implied reward (TRL refuses it too)".into());
        }
        if self.purpose == Purpose::Kto && self.loss_type == LossType::Kto && self.train_sampling_strategy != "sequential" {
            return bad(format!(
                "train_sampling_strategy {:?}: loss_type \"kto\" needs \"sequential\" (the KL pairs are chunks of consecutive rows)",
                self.train_sampling_strategy
            ));
        }
        if self.gradient_accumulation_steps == 0 {
            return bad("gradient_accumulation_steps must be at least 1".into());
        }
        if self.logging_steps == 0 {
            return bad("logging_steps must be at least 1".into());
        }
        let finite = |key: &str, v: f64, ok: bool, range: &str| -> Result<()> {
            if v.is_finite() && ok {
                Ok(())
            } else {
                Err(Error::Config(format!("{key} must be {range}, got {v}")))
            }
        };
        finite("beta", self.beta, self.beta > 0.0, "positive")?;
        finite("learning_rate", self.learning_rate, self.learning_rate >= 0.0, "at least 0")?;
        finite("warmup_steps", self.warmup_steps, self.warmup_steps >= 0.0, "at least 0")?;
        finite("warmup_ratio", self.warmup_ratio, (0.0..=1.0).contains(&self.warmup_ratio), "in [0, 1]")?;
        finite("weight_decay", self.weight_decay, self.weight_decay >= 0.0, "at least 0")?;
        finite("adam_beta1", self.adam_beta1, (0.0..1.0).contains(&self.adam_beta1), "in [0, 1)")?;
        finite("adam_beta2", self.adam_beta2, (0.0..1.0).contains(&self.adam_beta2), "in [0, 1)")?;
        finite("adam_epsilon", self.adam_epsilon, self.adam_epsilon > 0.0, "positive")?;
        finite("max_grad_norm", self.max_grad_norm, self.max_grad_norm >= 0.0, "at least 0 (0 disables clipping)")?;
        finite("desirable_weight", self.desirable_weight, self.desirable_weight >= 0.0, "at least 0")?;
        finite("undesirable_weight", self.undesirable_weight, self.undesirable_weight >= 0.0, "at least 0")?;
        finite("num_train_epochs", self.num_train_epochs, self.num_train_epochs >= 0.0, "at least 0")?;
        if self.use_peft {
            finite("lora_alpha", self.lora_alpha, self.lora_alpha > 0.0, "positive")?;
            finite("lora_dropout", self.lora_dropout, (0.0..1.0).contains(&self.lora_dropout), "in [0, 1)")?;
        }
        if self.max_steps == 0 || self.max_steps < -1 {
            return bad(format!("max_steps must be positive or -1, got {}", self.max_steps));
        }
        if self.max_steps == -1 && !(self.num_train_epochs > 0.0) {
            return bad(format!("num_train_epochs must be positive, got {}", self.num_train_epochs));
        }
        if self.dataset_num_proc.is_some_and(|n| n > 1) {
            return bad("dataset_num_proc > 1 is not supported: TRL would then rotate KL pairs inside shards".into());
        }
        let schedule = crate::schedule::LrSchedule {
            kind: self.lr_scheduler_type,
            kwargs: self.lr_scheduler_kwargs.clone(),
            base_lr: self.learning_rate,
            warmup: 0,
            total: 0,
        };
        schedule.check().map_err(Error::Config)?;
        if self.load_best_model_at_end {
            if self.eval_strategy == Strategy::No || self.eval_strategy != self.save_strategy {
                return bad("load_best_model_at_end = true needs eval_strategy and save_strategy to be the same, \"steps\" or \"epoch\"".into());
            }
            let eval_every = self.eval_steps.unwrap_or(self.logging_steps);
            if self.save_strategy == Strategy::Steps && eval_every > 0 && self.save_steps % eval_every != 0 {
                return bad(format!("load_best_model_at_end = true needs save_steps ({}) to be a multiple of eval_steps ({eval_every})", self.save_steps));
            }
        }
        if self.train_dataset.as_os_str().is_empty() == self.dataset_name.is_none() {
            return bad("set train_dataset (a file or folder) or dataset_name (a hub data set), one of them".into());
        }
        // dataset_name's test split becomes the eval set when evaluation is on.
        let evaluated = self.eval_dataset.is_some() || (self.dataset_name.is_some() && self.eval_strategy != Strategy::No);
        if self.eval_on_start && !evaluated {
            return bad("eval_on_start = true needs an eval_dataset".into());
        }
        if self.generate_during_eval && !evaluated {
            return bad("generate_during_eval = true needs an eval_dataset".into());
        }
        if self.eval_strategy != Strategy::No && !evaluated {
            let name = serde_json::to_value(self.eval_strategy).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default();
            return bad(format!("eval_strategy = \"{name}\" needs an eval_dataset"));
        }
        if self.eval_steps == Some(0) || self.per_device_eval_batch_size == 0 {
            return bad("eval_steps and per_device_eval_batch_size must be at least 1".into());
        }
        if self.save_steps == 0 {
            return bad("save_steps must be at least 1".into());
        }
        if self.use_peft {
            if self.lora_r == 0 {
                return bad("lora_r must be at least 1".into());
            }
            if self.lora_dropout > 0.0 && !self.disable_dropout {
                return bad("lora_dropout > 0 with disable_dropout = false is not supported (TRL's default disable_dropout = true zeroes it)".into());
            }
            if let Some(t) = &self.lora_target_modules {
                crate::model::lora::parse_targets(t).map_err(|m| Error::Config(format!("lora_target_modules: {m}")))?;
            }
        }
        if self.fp16 {
            return bad("fp16 = true is not supported: compute is fp32 on the CPU".into());
        }
        Ok(())
    }
}

fn toml_table(text: &str) -> Result<toml::Table> {
    toml::from_str(text).map_err(|e| Error::Config(one_line(&e.to_string())))
}

/// A TRL YAML recipe as a table of keys. As TRL's parser: `env` sets environment variables first, and a key
/// at `null` keeps its default (`max_length: null` is TRL's "no limit", kto's 0). PyYAML reads `5e-7` as a
/// string that argparse then converts, so such numbers are taken as numbers.
fn yaml_table(text: &str) -> Result<toml::Table> {
    let value: serde_json::Value = serde_yaml_ng::from_str(text).map_err(|e| Error::Config(one_line(&e.to_string())))?;
    let serde_json::Value::Object(map) = value else {
        return Err(Error::Config("a YAML recipe is a mapping of keys to values".into()));
    };
    let mut table = toml::Table::new();
    for (key, value) in map {
        let value = match (key.as_str(), value) {
            ("env", serde_json::Value::Object(vars)) => {
                for (name, v) in vars {
                    let v = v.as_str().map(String::from).unwrap_or_else(|| v.to_string());
                    std::env::set_var(name, v);
                }
                continue;
            }
            ("max_length", serde_json::Value::Null) => serde_json::Value::from(0),
            (_, serde_json::Value::Null) => continue,
            (_, serde_json::Value::String(s)) if looks_like_exponent(&s) => s.parse::<f64>().map(serde_json::Value::from).unwrap_or(serde_json::Value::String(s)),
            (_, v) => v,
        };
        let value = toml::Value::try_from(&value).map_err(|e| Error::Config(format!("{key}: {e}")))?;
        table.insert(key, value);
    }
    Ok(table)
}

/// `5e-7`, `1.5E+3`: floats YAML 1.1 leaves as strings.
fn looks_like_exponent(s: &str) -> bool {
    let Some((mantissa, exponent)) = s.split_once(['e', 'E']) else { return false };
    let digits = |t: &str| !t.is_empty() && t.chars().all(|c| c.is_ascii_digit());
    let mantissa = mantissa.trim_start_matches(['+', '-']);
    let (whole, fraction) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    digits(whole) && (fraction.is_empty() || digits(fraction)) && digits(exponent.trim_start_matches(['+', '-']))
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}
