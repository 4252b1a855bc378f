//! One micro-batch (policy and reference log-probs, the objective, backward) and one optimizer update.
use super::*;

pub(super) fn packed(seqs: &[(Vec<u32>, Vec<bool>)]) -> SeqBatch {
    let refs: Vec<(&[u32], &[bool])> = seqs.iter().map(|(i, m)| (i.as_slice(), m.as_slice())).collect();
    SeqBatch::new(&refs)
}

/// Sequence log-probs of a micro-batch under `model`: the main sequences (keeping the tape when asked) and the
/// KL sequences, which continue the main pass's cached prompt instead of recomputing it (a KL sequence shares
/// its prompt with the main sequence of the same row): `pass.keep_cache` asks for them. `times` receives (main
/// pass, KL pass) seconds.
pub(super) fn sequence_logps(
    model: &Model,
    batch: &Batch,
    main: &SeqBatch,
    pass: Pass,
    times: (&mut f64, &mut f64),
) -> (crate::engine::ScoredOutput, Option<crate::engine::Tape>, Vec<f64>) {
    let adapters = pass.adapters;
    let (out, tape, cache) = timed(times.0, || forward_with_cache(model, main, pass));
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
pub(super) struct MetricAccumulator {
    pub(super) values: Vec<(String, Vec<f64>)>,
}

impl MetricAccumulator {
    pub(super) fn add(&mut self, key: &str, v: f64) {
        match self.values.iter_mut().find(|(k, _)| k == key) {
            Some((_, list)) if key == "num_tokens" => *list = vec![v],
            Some((_, list)) => list.push(v),
            None => self.values.push((key.to_string(), vec![v])),
        }
    }
    pub(super) fn drain_means(&mut self) -> Vec<(String, f64)> {
        self.values.drain(..).map(|(k, l)| (k, l.iter().sum::<f64>() / l.len() as f64)).collect()
    }
}

impl Trainer {
    /// Reference log-probs of a micro-batch's main and KL sequences: precomputed ones when the run has them,
    /// else a pass of the reference model.
    pub(super) fn reference_logps(&self, batch: &Batch, main: &SeqBatch) -> (Vec<f64>, Vec<f64>) {
        let table = if batch.eval { &self.precomputed_eval_reference } else { &self.precomputed_reference };
        if let Some(pre) = table {
            let with_kl = self.with_kl();
            let main_lp = batch.rows.iter().map(|&r| pre[r].0).collect();
            let kl_lp = if with_kl { batch.rows.iter().map(|&r| pre[r].1).collect() } else { Vec::new() };
            return (main_lp, kl_lp);
        }
        let (model, adapters) = self.reference_model();
        let (out, _, kl) =
            sequence_logps(model, batch, main, Pass { keep_cache: self.with_kl(), adapters, ..Pass::default() }, (&mut 0.0, &mut 0.0));
        (out.seq_logps, kl)
    }

    /// The model that computes reference log-probs, and whether its adapters are on.
    pub(super) fn reference_model(&self) -> (&Model, bool) {
        match &self.reference {
            Some(r) => (r, false),
            None => (&self.policy, false),
        }
    }

    /// Runs one micro-batch. With `grads`, backpropagates `loss / loss_divisor` into it.
    pub fn micro_batch(
        &self,
        batch: &Batch,
        num_tokens_before: usize,
        grads: Option<(&mut Buffer, f64)>,
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
        grads: Option<(&mut Buffer, f64)>,
        times: &mut PhaseTimes,
        ranks: &Ranks,
    ) -> MicroBatchRecord {
        let empty = Batch::default();
        let batch = batch.unwrap_or(&empty);
        let main = packed(&batch.main);
        let with_kl = self.with_kl();
        // The reference first: its passes' buffers go back to the pool before the policy's tape exists, rather
        // than adding to it (the numbers do not depend on the order).
        let (reference, reference_kl) = if self.task == Task::Sft || batch.rows.is_empty() {
            (Vec::new(), Vec::new())
        } else {
            timed(&mut times.reference_forward, || self.reference_logps(batch, &main))
        };
        let (policy_out, tape, policy_kl) = if batch.rows.is_empty() {
            (ScoredOutput::default(), None, Vec::new())
        } else {
            let keep_tape = grads.is_some();
            let pass = Pass { keep_tape, keep_cache: with_kl, adapters: true, checkpoint: keep_tape && self.cfg.gradient_checkpointing };
            sequence_logps(&self.policy, batch, &main, pass, (&mut times.policy_forward, &mut times.policy_kl_forward))
        };
        let mut tokens = [main.n_tokens() as f64];
        ranks.sum_f64(&mut tokens);
        let num_tokens = tokens[0] as usize;
        let sum_over_ranks = |v: &mut [f64]| ranks.sum_f64(v);
        let result = if self.task == Task::Sft {
            let total = (num_tokens_before + num_tokens) as f64;
            crate::objective::sft_loss_across(&policy_out, main.n_seqs(), total, &sum_over_ranks)
        } else {
            let lp = MicroBatchLogps {
                labels: &batch.labels,
                policy: &policy_out.seq_logps,
                reference: &reference,
                policy_kl: &policy_kl,
                reference_kl: &reference_kl,
            };
            let total = (num_tokens_before + num_tokens) as f64;
            self.objective.evaluate_across(&lp, &policy_out, &main.scored_seq, total, &sum_over_ranks)
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

    /// The learning-rate schedule over this run's steps (which a resume or a data-parallel run may change).
    pub fn lr_schedule(&self) -> LrSchedule {
        LrSchedule {
            kind: self.schedule,
            kwargs: self.cfg.lr_scheduler_kwargs.clone(),
            base_lr: self.cfg.learning_rate,
            warmup: self.warmup,
            total: self.max_steps,
        }
    }

    /// Clips `grads`, updates the policy with the learning rate of update number `step` (0-based), and returns
    /// (gradient norm before clipping, learning rate used).
    pub fn apply_update(&mut self, grads: &Buffer, step: usize) -> (f64, f64) {
        let t = Instant::now();
        let grad_norm = grad_norm(grads);
        let lr = self.cfg.learning_rate * self.lr_schedule().factor(step);
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
}
