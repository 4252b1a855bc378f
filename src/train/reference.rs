//! Reference log-probs computed once before training (`precompute_ref_log_probs`), cached on disk by content.
use super::*;

/// A fingerprint of everything the precomputed reference log-probs depend on.
pub(super) fn reference_cache_key(model: &Model, data: &Prepared, max_length: Option<usize>, with_kl: bool) -> u64 {
    let mut h = Fingerprint::default();
    model.fingerprint_weights(&mut h);
    h.bytes(format!("{:?}", model.spec).as_bytes());
    h.u64(max_length.unwrap_or(0) as u64).u64(with_kl as u64);
    data_fingerprint(&mut h, data);
    h.finish()
}

/// The tokenized rows in order: ids of prompt, completion and KL completion, and the label.
pub(super) fn data_fingerprint(h: &mut Fingerprint, data: &Prepared) {
    for r in &data.rows {
        h.u32s(&r.prompt_ids).u32s(&r.completion_ids).u32s(&r.kl_completion_ids).u64(r.label as u64);
    }
}

impl Trainer {
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

    pub(super) fn precompute_split(&self, eval: bool, obs: &dyn Observer, ranks: &Ranks) -> Result<Vec<(f64, f64)>> {
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
            let (out, _, kl) = sequence_logps(model, &batch, &main, Pass { keep_cache: with_kl, adapters, ..Pass::default() }, (&mut 0.0, &mut 0.0));
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
}
