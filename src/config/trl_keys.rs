//! TRL's keys that kto does not implement (from `ScriptArguments`, `ModelConfig`, `KTOConfig` and
//! `TrainingArguments` of TRL 1.16), so that a TRL recipe runs unchanged: keys that cannot change kto's numbers
//! are taken out and named in one warning; keys that would change them, set away from TRL's default, are an
//! error. Any other unknown key stays an error (a typo must not pass silently).
use crate::error::{Error, Result};
use toml::Value;

/// Keys that change no number kto computes (devices, speed, logging integrations, the hub, quantization
/// settings used only when quantizing, ...).
const IGNORED: &[&str] = &[
    "accelerator_config", "activation_checkpointing", "activation_checkpointing_kwargs", "activation_offloading",
    "attn_implementation", "auto_find_batch_size", "average_tokens_across_devices", "batch_eval_metrics",
    "bf16_full_eval", "bnb_4bit_quant_storage", "bnb_4bit_quant_type", "data_seed", "dataloader_in_order",
    "dataloader_multiprocessing_context", "dataloader_num_workers", "dataloader_persistent_workers",
    "dataloader_pin_memory", "dataloader_prefetch_factor", "dataset_streaming", "ddp_backend", "ddp_broadcast_buffers",
    "ddp_bucket_cap_mb", "ddp_find_unused_parameters", "ddp_static_graph", "ddp_timeout", "debug", "deepspeed",
    "do_eval", "do_predict", "do_train", "dtype", "torch_dtype", "enable_jit_checkpoint", "eval_accumulation_steps",
    "eval_delay", "eval_do_concat_batches", "eval_use_gather_object", "fp16_full_eval", "fsdp", "fsdp_config",
    "full_determinism", "gradient_checkpointing_kwargs", "gradient_checkpointing_use_reentrant", "hub_always_push",
    "hub_model_id", "hub_private_repo", "hub_revision", "hub_strategy", "hub_token", "ignore_bias_buffers",
    "ignore_data_skip", "include_for_metrics", "include_num_input_tokens_seen", "label_names",
    "label_smoothing_factor", "length_column_name", "liger_kernel_config", "local_rank", "log_level",
    "log_level_replica", "log_on_each_node", "logging_dir", "logging_nan_inf_filter", "lora_task_type",
    "model_init_kwargs", "optim_args", "optim_target_modules", "pad_to_multiple_of", "parallelism_config",
    "prediction_loss_only", "project", "push_to_hub", "ref_model_mixup_alpha", "ref_model_sync_steps",
    "remove_unused_columns", "restore_callback_states_from_checkpoint", "router_aux_loss_coef", "run_name",
    "save_on_each_node", "save_safetensors", "skip_memory_metrics", "tf32", "torch_compile", "torch_compile_backend",
    "torch_compile_mode", "torch_empty_cache_steps", "trackio_bucket_id", "trackio_space_id",
    "trackio_static_space_id", "trust_remote_code", "use_cache", "use_cpu", "use_liger_kernel",
];

/// Keys whose TRL default kto follows and whose other values would change the results, with that default.
fn refused_unless(key: &str) -> Option<Option<Value>> {
    let no = Some(Value::Boolean(false));
    Some(match key {
        "use_dora" | "use_rslora" | "load_in_4bit" | "load_in_8bit" | "use_bnb_nested_quant" | "sync_ref_model" | "dataloader_drop_last" => no,
        // None in TRL: any value is a change.
        "neftune_noise_alpha" | "lora_modules_to_save" | "lora_target_parameters" => None,
        _ => return None,
    })
}

/// What `report_to` names that kto writes (TensorBoard event files).
const REPORTS: &[&str] = &["none", "tensorboard", "all"];

/// Takes TRL's keys out of `table` as above, returning the warning's notes (empty: nothing to say).
pub fn adapt(table: &mut toml::Table) -> Result<Vec<String>> {
    let mut notes = Vec::new();
    if let Some(Value::String(s)) = table.get("lora_target_modules") {
        // TRL takes one module name, often "all-linear", without a list.
        let one = Value::Array(vec![Value::String(s.clone())]);
        table.insert("lora_target_modules".into(), one);
    }
    if let Some(report) = table.get("report_to").cloned() {
        let names: Vec<String> = match &report {
            Value::String(s) => vec![s.clone()],
            Value::Array(a) => a.iter().filter_map(|v| v.as_str().map(String::from)).collect(),
            _ => Vec::new(),
        };
        let (kept, dropped): (Vec<String>, Vec<String>) = names.into_iter().partition(|n| REPORTS.contains(&n.as_str()));
        if !dropped.is_empty() {
            notes.push(format!("report_to {} (kto writes TensorBoard files only)", dropped.join(", ")));
            let kept = if kept.iter().any(|k| k != "none") { "tensorboard" } else { "none" };
            table.insert("report_to".into(), Value::String(kept.into()));
        } else if let [one] = kept.as_slice() {
            table.insert("report_to".into(), Value::String(one.clone()));
        }
    }
    let keys: Vec<String> = table.keys().cloned().collect();
    for key in keys {
        if let Some(default) = refused_unless(&key) {
            let value = table.remove(&key).expect("listed key");
            if Some(&value) != default.as_ref() {
                return Err(Error::Config(format!("{key} = {value}: kto does not implement it, and ignoring it would change the results")));
            }
            notes.push(key);
        } else if IGNORED.contains(&key.as_str()) {
            table.remove(&key);
            notes.push(key);
        }
    }
    Ok(notes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(text: &str) -> toml::Table {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn harmless_keys_are_named_and_result_changing_ones_refused() {
        let mut t = table("push_to_hub = true\nrun_name = \"x\"\nuse_dora = false\nlearning_rate = 1e-6");
        let notes = adapt(&mut t).unwrap();
        assert_eq!(t, table("learning_rate = 1e-6"));
        assert_eq!(notes.len(), 3, "{notes:?}");
        let err = adapt(&mut table("use_dora = true")).unwrap_err().to_string();
        assert!(err.contains("use_dora = true") && err.contains("change the results"), "{err}");
        assert!(adapt(&mut table("neftune_noise_alpha = 5")).is_err());
    }

    #[test]
    fn report_to_keeps_what_kto_writes() {
        let mut t = table("report_to = [\"wandb\", \"tensorboard\"]\nlora_target_modules = \"all-linear\"");
        let notes = adapt(&mut t).unwrap();
        assert_eq!(t, table("report_to = \"tensorboard\"\nlora_target_modules = [\"all-linear\"]"));
        assert!(notes[0].contains("wandb"), "{notes:?}");
        let mut t = table("report_to = \"wandb\"");
        adapt(&mut t).unwrap();
        assert_eq!(t, table("report_to = \"none\""));
    }
}
