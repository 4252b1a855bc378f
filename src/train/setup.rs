//! Building a trainer: models, tokenizer and data loaded and checked as the config says.
use super::*;

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
    pub fn new_on(task: Task, mut cfg: TrainConfig, obs: &dyn Observer, ranks: &Ranks) -> Result<Self> {
        if task == Task::Sft && cfg.precompute_ref_log_probs {
            return Err(Error::Config("precompute_ref_log_probs: kto sft has no reference model".into()));
        }
        if cfg.bf16 == Some(true) {
            obs.warn("bf16 = true: kto computes in fp32 on the CPU (like TRL with bf16 = false)");
        }
        if !cfg.ignored_trl_keys.is_empty() {
            obs.warn(&format!("TRL keys kto does not implement, ignored (they change none of its numbers): {}", cfg.ignored_trl_keys.join(", ")));
        }
        crate::hub::resolve_inputs(&mut cfg, obs, ranks)?;
        check_inputs_exist(&cfg)?;
        let tokenizer = TextTokenizer::load(cfg.tokenizer_dir())?;
        // Under LoRA the base never trains: loaded as frozen weights (bf16 when its checkpoint is, no number
        // changes), so a 7B base never exists in f32.
        let mut policy = if cfg.use_peft { Model::load_frozen(&cfg.model)?.frozen() } else { Model::load(&cfg.model)? };
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
                let r = Model::load_frozen(dir)?.frozen();
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
            None => Some(policy.frozen_copy()),
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
        let loss_type = cfg.loss_type;
        let max_steps = planned_steps(&cfg, prepared.rows.len(), 1);
        let trainable = match &policy.lora {
            Some(l) => &l.tensors,
            None => &policy.layout.tensors,
        };
        let optimizer = Optimizer::new(
            cfg.optim_kind(),
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
            schedule: cfg.lr_scheduler_type,
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
}

/// Reads, maps, validates and prepares one data set as the config says.
pub(super) fn load_data(
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
        with_kl: task == Task::Kto && cfg.loss_type.uses_kl(),
    };
    obs.preparing(path, 0, examples.len());
    if ranks.size() == 1 {
        return data::prepare::prepare_with_progress(&examples, tokenizer, opts, path, &|n| {
            obs.preparing(path, n, examples.len());
            !obs.stop_requested()
        });
    }
    let tokenized = data::over_ranks::tokenize_over_ranks(&examples, tokenizer, path, ranks)?;
    obs.info(&format!("{}: {} rows tokenized over {} ranks", path.display(), examples.len(), ranks.size()));
    data::prepare::assemble(&examples, tokenized, opts, path)
}

/// Names the first input that is not there, before anything slow is loaded.
pub(super) fn check_inputs_exist(cfg: &TrainConfig) -> Result<()> {
    let folders = [("model", Some(&cfg.model)), ("ref_model", cfg.ref_model.as_ref()), ("tokenizer", cfg.tokenizer.as_ref())];
    for (key, dir) in folders {
        if let Some(dir) = dir.filter(|d| !d.is_dir()) {
            return Err(Error::file(dir, format!("no such folder ({key})")));
        }
    }
    for (key, path) in [("train_dataset", Some(&cfg.train_dataset)), ("eval_dataset", cfg.eval_dataset.as_ref())] {
        if let Some(path) = path.filter(|p| !data::read::dataset_exists(p)) {
            return Err(Error::file(path, format!("no such file or folder ({key})")));
        }
    }
    Ok(())
}

/// Optimizer steps of a run: `max_steps`, else `num_train_epochs` of steps of `gradient_accumulation_steps ×
/// world` micro-batches.
pub(super) fn planned_steps(cfg: &TrainConfig, rows: usize, world: usize) -> usize {
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
