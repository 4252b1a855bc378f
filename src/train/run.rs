//! The training loop: optimizer steps over the epochs, logging, evaluation, checkpoints, stops, the summary.
use super::*;

impl Trainer {
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
        let mut metrics = MetricSinks::open(&self.cfg, root, resume.as_ref().map(|_| state.global_step), obs)?;

        let start = Instant::now();
        let epoch_batches = self.epoch_batches();
        let batches_per_epoch = epoch_batches.len();
        let ga = self.cfg.gradient_accumulation_steps;
        // Micro-batches of one optimizer step, over all ranks.
        let per_step = ga * world;
        let updates_per_epoch = batches_per_epoch.div_ceil(per_step);
        let mut grads = crate::engine::Buffer::zeros(self.trainable_params().len());
        let mut acc = MetricAccumulator { values: std::mem::take(&mut state.pending_metrics) };
        let mut step = state.global_step;
        let mut epoch = step / updates_per_epoch;
        let mut skip_groups = step % updates_per_epoch;
        obs.start(self.max_steps);
        if self.cfg.eval_on_start {
            let Some(mut entry) = self.evaluate_unless_stopped(state.num_tokens, obs) else {
                obs.finish();
                return Err(Error::StoppedEarly("during the evaluation before training (eval_on_start); no step was taken".into()));
            };
            entry.insert("epoch".into(), state.epoch_progress.into());
            entry.insert("step".into(), step.into());
            metrics.write(entry)?;
        }
        'run: while step < self.max_steps {
            for (g, group) in epoch_batches.chunks(per_step).enumerate().skip(skip_groups) {
                crate::engine::zero(&mut grads);
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
                    ranks.sum_buffer(&mut grads);
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
                // transformers' DefaultFlowCallback: "steps" strategies act every N steps (evaluation and saving
                // also at the last step), "epoch" ones at the end of each epoch, the last one cut short included.
                let epoch_ends = g + 1 == updates_per_epoch || step == self.max_steps;
                let due = |strategy: Strategy, every: usize| match strategy {
                    Strategy::No => false,
                    Strategy::Steps => step % every == 0,
                    Strategy::Epoch => epoch_ends,
                };
                if due(self.cfg.logging_strategy, self.cfg.logging_steps) || (step == 1 && self.cfg.logging_first_step) {
                    let mut entry = Map::new();
                    entry.insert("loss".into(), (state.loss_since_log / state.steps_since_log as f64).into());
                    entry.insert("grad_norm".into(), grad_norm.into());
                    entry.insert("learning_rate".into(), lr.into());
                    for (k, v) in acc.drain_means() {
                        entry.insert(k, v.into());
                    }
                    entry.insert("epoch".into(), state.epoch_progress.into());
                    entry.insert("step".into(), step.into());
                    metrics.write(entry)?;
                    state.loss_since_log = 0.0;
                    state.steps_since_log = 0;
                }
                let eval_every = self.cfg.eval_steps.unwrap_or(self.cfg.logging_steps);
                // A stop during evaluation drops that evaluation; the step itself is done and checkpointed.
                let mut stopped_in_eval = false;
                let final_step = step == self.max_steps && self.cfg.eval_strategy == Strategy::Steps;
                if due(self.cfg.eval_strategy, eval_every) || final_step {
                    match self.evaluate_unless_stopped(state.num_tokens, obs) {
                        Some(mut entry) => {
                            self.track_best(&entry, step, &mut state)?;
                            entry.insert("epoch".into(), state.epoch_progress.into());
                            entry.insert("step".into(), step.into());
                            metrics.write(entry)?;
                            if self.cfg.generate_during_eval && root {
                                self.write_eval_generations(step)?;
                            }
                        }
                        None => stopped_in_eval = true,
                    }
                }
                let stop_requested = stopped_in_eval || obs.stop_requested();
                let interrupted = if world > 1 { ranks.any(stop_requested) } else { stop_requested };
                let periodic = due(self.cfg.save_strategy, self.cfg.save_steps);
                let last = step == self.max_steps && self.cfg.save_strategy == Strategy::Steps;
                if periodic || interrupted || last {
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
        if self.cfg.load_best_model_at_end {
            self.load_best(&state, obs)?;
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
        // As TRL: metrics of steps after the last logged one go into the summary (their means).
        for (k, v) in acc.drain_means() {
            summary.insert(k, v.into());
        }
        summary.insert("epoch".into(), state.epoch_progress.into());
        summary.insert("step".into(), step.into());
        // The model first: a summary line in metrics.jsonl means the final model is in place.
        if let Some(output) = &self.output {
            output.publish_final(|dir| self.save(dir).map(|_| ()))?;
        }
        metrics.write(summary)?;
        ranks.barrier();
        obs.finish();
        Ok(TrainSummary { log_history: metrics.history, steps: step, train_loss, runtime_s: runtime })
    }
}

impl Trainer {
    /// transformers' `_determine_best_metric`: a strictly better `metric_for_best_model` makes this step the best.
    fn track_best(&self, evaluation: &Map<String, Value>, step: usize, state: &mut RunState) -> Result<()> {
        let Some((name, greater)) = self.cfg.best_metric() else { return Ok(()) };
        let Some(value) = evaluation.get(&name).and_then(Value::as_f64) else {
            let known: Vec<&str> = evaluation.keys().map(String::as_str).collect();
            return Err(Error::Config(format!("metric_for_best_model: {name} is not an evaluation metric; they are {}", known.join(", "))));
        };
        let better = match state.best_metric {
            None => true,
            Some(best) if greater => value > best,
            Some(best) => value < best,
        };
        if better {
            state.best_metric = Some(value);
            state.best_global_step = Some(step);
        }
        Ok(())
    }

    /// `load_best_model_at_end`: the weights (or adapters) of the best step's checkpoint, when it was saved.
    fn load_best(&mut self, state: &RunState, obs: &dyn Observer) -> Result<()> {
        let Some(step) = state.best_global_step else { return Ok(()) };
        let dir = checkpoint::checkpoint_dir(&self.cfg.output_dir, step);
        if !dir.join(checkpoint::STATE_FILE).is_file() {
            return Ok(());
        }
        obs.info(&format!("loading the best model from {} ({} = {})", dir.display(), self.cfg.best_metric().map(|m| m.0).unwrap_or_default(), state.best_metric.unwrap_or(f64::NAN)));
        match &mut self.policy.lora {
            Some(lora) => lora.params = crate::model::lora::Lora::load_peft(&dir, &self.policy.spec)?.params,
            None => self.policy.params = Model::load(&dir)?.params,
        }
        Ok(())
    }
}
