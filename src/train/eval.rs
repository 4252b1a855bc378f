//! Evaluation on the held-out set, and samples of the policy and reference at each evaluation.
use super::*;

impl Trainer {
    /// Collates rows of the eval set.
    pub fn collate_eval(&self, rows: &[usize]) -> Batch {
        let eval = self.eval_data.as_ref().expect("an eval set");
        let mut b = data::collate(&eval.rows, rows, self.cfg.max_length(), self.with_kl());
        b.eval = true;
        b
    }

    /// Runs the eval set in batches of `per_device_eval_batch_size` without gradients: TRL's eval metrics with an
    /// `eval_` prefix (unweighted means over eval batches), `eval_loss` as transformers' evaluation loop takes it
    /// (each batch's loss repeated once per row, then the mean: a short last batch weighs less), and
    /// `eval_num_tokens`, which TRL sets to the training tokens seen so far (`num_tokens_so_far`), not the eval
    /// set's.
    pub fn evaluate(&self, num_tokens_so_far: usize) -> Map<String, Value> {
        self.evaluate_unless_stopped(num_tokens_so_far, &Silent).unwrap_or_default()
    }

    /// `evaluate`, checking between eval batches whether the user asked to stop (then `None`).
    pub fn evaluate_unless_stopped(&self, num_tokens_so_far: usize, obs: &dyn Observer) -> Option<Map<String, Value>> {
        let mut entry = Map::new();
        let Some(eval) = &self.eval_data else { return Some(entry) };
        let t = Instant::now();
        let mut acc = MetricAccumulator::default();
        let mut losses = Vec::new();
        let mut loss_sum = 0.0;
        let rows: Vec<usize> = (0..eval.rows.len()).collect();
        for chunk in rows.chunks(self.cfg.per_device_eval_batch_size) {
            if obs.stop_requested() {
                return None;
            }
            let rec = self.micro_batch(&self.collate_eval(chunk), 0, None, &mut PhaseTimes::default());
            losses.push(rec.loss);
            loss_sum += rec.loss * chunk.len() as f64;
            for (k, v) in &rec.metrics {
                if *k != "num_tokens" {
                    acc.add(k, *v);
                }
            }
        }
        let secs = t.elapsed().as_secs_f64();
        entry.insert("eval_loss".into(), (loss_sum / eval.rows.len().max(1) as f64).into());
        let mut metrics = acc.drain_means();
        // In TRL's key order: num_tokens comes after entropy.
        let at = metrics.iter().position(|(k, _)| k == "entropy").map_or(metrics.len(), |i| i + 1);
        metrics.insert(at, ("num_tokens".to_string(), num_tokens_so_far as f64));
        for (k, v) in metrics {
            entry.insert(format!("eval_{k}"), v.into());
        }
        entry.insert("eval_runtime".into(), secs.into());
        entry.insert("eval_samples_per_second".into(), (eval.rows.len() as f64 / secs).into());
        entry.insert("eval_steps_per_second".into(), (losses.len() as f64 / secs).into());
        Some(entry)
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
}
