//! The output folder: claiming it, the run's identity, checkpoints written and restored, the saved model,
//! `metrics.jsonl`.
use super::*;

pub(super) fn f32_view(v: &[f32]) -> Result<safetensors::tensor::TensorView<'_>> {
    safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![v.len()], crate::model::weights::f32_slice_as_bytes(v))
        .map_err(|e| Error::Train(e.to_string()))
}

impl Trainer {
    /// Writes `checkpoint-N` (model or adapter, optimizer moments, run state) into the output folder.
    pub(super) fn write_checkpoint(&mut self, state: &RunState) -> Result<PathBuf> {
        let mut state = state.clone();
        state.optimizer_steps = self.optimizer.steps;
        let out = self.cfg.output_dir.clone();
        let keep = self.cfg.save_total_limit;
        checkpoint::save(&out, &state, keep, |dir| {
            self.save(dir)?;
            if let Some(identity) = &self.identity {
                identity.write(dir)?;
            }
            if !self.optimizer.exp_avg.is_empty() && !self.cfg.save_only_model {
                let (m, v) = (self.optimizer.exp_avg.to_host(), self.optimizer.exp_avg_sq.to_host());
                let views = vec![
                    ("exp_avg".to_string(), f32_view(&m)?),
                    ("exp_avg_sq".to_string(), f32_view(&v)?),
                ];
                crate::files::write_safetensors(&dir.join(checkpoint::OPTIMIZER_FILE), views, None)?;
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
                    identity.planned_steps, theirs.planned_steps, serde_json::to_value(self.cfg.lr_scheduler_type).unwrap_or_default()
                ));
            }
        }
        self.output = output;
        self.resume_from = resume;
        self.identity = Some(identity);
        Ok(())
    }

    /// This run's identity: defining settings, and fingerprints of the training data and the initial weights.
    pub(super) fn run_identity(&self, world: usize) -> RunIdentity {
        let mut data = Fingerprint::default();
        data_fingerprint(&mut data, &self.data);
        let weights = |m: &Model| {
            let mut h = Fingerprint::default();
            m.fingerprint_weights(&mut h);
            h.hex()
        };
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
    pub(super) fn load_checkpoint(&mut self, dir: &std::path::Path) -> Result<RunState> {
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
            if !path.exists() {
                return Err(Error::file(
                    dir,
                    "holds no optimizer state (saved with save_only_model = true), so this AdamW run cannot continue from it; start a new run with model set to this folder",
                ));
            }
            let bytes = std::fs::read(&path).map_err(|e| Error::file(&path, e))?;
            let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| Error::file(&path, e))?;
            for (name, dst) in [("exp_avg", &mut self.optimizer.exp_avg), ("exp_avg_sq", &mut self.optimizer.exp_avg_sq)] {
                let view = st.tensor(name).map_err(|_| Error::file(&path, format!("tensor {name} is missing")))?;
                if view.data().len() != dst.len() * 4 {
                    return Err(Error::file(&path, format!("tensor {name} has the wrong size")));
                }
                let values: Vec<f32> = view.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
                dst.upload(&values);
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
