//! The KTO objective of TRL's `_compute_loss`: from sequence log-probs to the micro-batch loss, its gradient
//! with respect to each policy log-prob, and the metrics TRL logs. Knows nothing of files or kernels.
use crate::engine::ScoredOutput;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LossType {
    /// `1 − σ(β(r − kl))` for desirable rows, `1 − σ(β(kl − r))` for undesirable ones.
    Kto,
    /// APO-zero without pairs: `1 − σ(βr)` and `σ(βr)`; no KL term.
    ApoZeroUnpaired,
}

impl LossType {
    pub fn uses_kl(self) -> bool {
        self == LossType::Kto
    }
}

#[derive(Debug, Clone, Copy)]
pub struct KtoObjective {
    pub loss_type: LossType,
    pub beta: f64,
    pub desirable_weight: f64,
    pub undesirable_weight: f64,
}

/// Sequence log-probs of one micro-batch. The KL slices are empty for `apo_zero_unpaired`.
pub struct MicroBatchLogps<'a> {
    pub labels: &'a [bool],
    pub policy: &'a [f64],
    pub reference: &'a [f64],
    pub policy_kl: &'a [f64],
    pub reference_kl: &'a [f64],
}

#[derive(Debug, Clone)]
pub struct MicroBatchLoss {
    /// `Σ wᵢℓᵢ / N` over the micro-batch, before division for gradient accumulation.
    pub loss: f64,
    /// ∂loss/∂(policy log-prob of row i).
    pub dloss_dlogp: Vec<f64>,
    /// The clamped KL estimate (0 for apo).
    pub kl: f64,
    /// TRL's per-micro-batch metrics, in the order TRL inserts them (absent keys left out).
    pub metrics: Vec<(&'static str, f64)>,
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

impl KtoObjective {
    /// Computes loss, gradient and metrics. `policy_out` and `scored_seq` (the sequence of each scored
    /// position) give the per-token entropy and mean logits of the policy's main forward.
    pub fn evaluate(
        &self,
        lp: &MicroBatchLogps,
        policy_out: &ScoredOutput,
        scored_seq: &[usize],
        num_tokens_so_far: f64,
    ) -> MicroBatchLoss {
        self.evaluate_across(lp, policy_out, scored_seq, num_tokens_so_far, &|_| {})
    }

    /// `evaluate` for one rank of a data-parallel run: `sum_over_ranks` adds a vector element-wise over the
    /// ranks (in place; the identity for one process). As TRL gathers them: the KL reference point is the
    /// mean of the ranks' batch means, then clamped at 0; each metric is a ratio of sums gathered over ranks.
    pub fn evaluate_across(
        &self,
        lp: &MicroBatchLogps,
        policy_out: &ScoredOutput,
        scored_seq: &[usize],
        num_tokens_so_far: f64,
        sum_over_ranks: &dyn Fn(&mut [f64]),
    ) -> MicroBatchLoss {
        let n = lp.labels.len();
        let beta = self.beta;
        // Sufficient statistics, summed over ranks in one collective: [Σ batch KL means, ranks with rows,
        // then (sum, count) of entropy, logits/chosen, logits/rejected, rewards/chosen, logps/chosen,
        // rewards/rejected, logps/rejected].
        let mut sums = [0f64; 16];
        if self.loss_type.uses_kl() && n > 0 {
            sums[0] = lp.policy_kl.iter().zip(lp.reference_kl).map(|(p, r)| p - r).sum::<f64>() / n as f64;
        }
        sums[1] = (n > 0) as u8 as f64;
        sums[2] = policy_out.entropy.iter().map(|&e| e as f64).sum();
        sums[3] = policy_out.entropy.len() as f64;
        for (t, &s) in scored_seq.iter().enumerate() {
            let slot = if lp.labels[s] { 4 } else { 6 };
            sums[slot] += policy_out.mean_logit[t] as f64;
            sums[slot + 1] += 1.0;
        }
        for i in 0..n {
            let slot = if lp.labels[i] { 8 } else { 12 };
            sums[slot] += beta * (lp.policy[i] - lp.reference[i]);
            sums[slot + 1] += 1.0;
            sums[slot + 2] += lp.policy[i];
            sums[slot + 3] += 1.0;
        }
        sum_over_ranks(&mut sums);
        // KL reference point: the (mean over ranks of) batch mean over all rows of both labels, detached,
        // clamped at 0 (§4.3).
        let kl = if self.loss_type.uses_kl() && sums[1] > 0.0 { (sums[0] / sums[1]).max(0.0) } else { 0.0 };
        let mut loss_sum = 0.0;
        let mut dloss = vec![0.0; n];
        for i in 0..n {
            let r = lp.policy[i] - lp.reference[i];
            let (weight, x, sign) = match (self.loss_type, lp.labels[i]) {
                (LossType::Kto, true) => (self.desirable_weight, beta * (r - kl), -1.0),
                (LossType::Kto, false) => (self.undesirable_weight, beta * (kl - r), 1.0),
                (LossType::ApoZeroUnpaired, true) => (self.desirable_weight, beta * r, -1.0),
                (LossType::ApoZeroUnpaired, false) => (self.undesirable_weight, beta * r, 1.0),
            };
            let s = sigmoid(x);
            let l = match (self.loss_type, lp.labels[i]) {
                (LossType::ApoZeroUnpaired, false) => s,
                _ => 1.0 - s,
            };
            loss_sum += weight * l;
            // d/dr of each form is ±β·σ(x)(1−σ(x)).
            dloss[i] = weight * sign * beta * s * (1.0 - s) / n as f64;
        }
        let loss = if n > 0 { loss_sum / n as f64 } else { 0.0 };

        let ratio = |slot: usize| (sums[slot + 1] > 0.0).then(|| sums[slot] / sums[slot + 1]);
        let mut metrics: Vec<(&'static str, f64)> = vec![("kl", kl)];
        metrics.push(("entropy", ratio(2).unwrap_or(0.0)));
        metrics.push(("num_tokens", num_tokens_so_far));
        for (key, slot) in [("logits/chosen", 4), ("logits/rejected", 6)] {
            if let Some(v) = ratio(slot) {
                metrics.push((key, v));
            }
        }
        let mut group_rewards = [None, None];
        for (g, slot, rk, lk) in [(0, 8, "rewards/chosen", "logps/chosen"), (1, 12, "rewards/rejected", "logps/rejected")] {
            if let (Some(reward), Some(logps)) = (ratio(slot), ratio(slot + 2)) {
                metrics.push((rk, reward));
                metrics.push((lk, logps));
                group_rewards[g] = Some(reward);
            }
        }
        if let [Some(c), Some(r)] = group_rewards {
            metrics.push(("rewards/margins", c - r));
        }
        MicroBatchLoss { loss, dloss_dlogp: dloss, kl, metrics }
    }
}

/// Supervised fine-tuning on completion tokens, as TRL's `SFTTrainer` with `completion_only_loss`: the mean
/// negative log-prob of the micro-batch's completion tokens (the trainer weights micro-batches by their token
/// counts, so an optimizer step averages over all its tokens), and TRL's SFT metrics.
pub fn sft_loss(policy_out: &ScoredOutput, n_seqs: usize, num_tokens_so_far: f64) -> MicroBatchLoss {
    sft_loss_across(policy_out, n_seqs, num_tokens_so_far, &|_| {})
}

/// `sft_loss` for one rank of a data-parallel run: entropy and accuracy are ratios of sums over the ranks.
pub fn sft_loss_across(
    policy_out: &ScoredOutput,
    n_seqs: usize,
    num_tokens_so_far: f64,
    sum_over_ranks: &dyn Fn(&mut [f64]),
) -> MicroBatchLoss {
    let ntok = policy_out.token_logps.len();
    let mean = |sum: f64| if ntok > 0 { sum / ntok as f64 } else { 0.0 };
    let loss = mean(-policy_out.token_logps.iter().map(|&v| v as f64).sum::<f64>());
    let mut sums = [
        policy_out.entropy.iter().map(|&e| e as f64).sum(),
        policy_out.target_is_argmax.iter().filter(|h| **h).count() as f64,
        ntok as f64,
    ];
    sum_over_ranks(&mut sums);
    let gathered = |v: f64| if sums[2] > 0.0 { v / sums[2] } else { 0.0 };
    let (entropy, accuracy) = (gathered(sums[0]), gathered(sums[1]));
    // loss = −Σ token log-probs / ntok, and a sequence's log-prob is the sum of its tokens'.
    let d = if ntok > 0 { -1.0 / ntok as f64 } else { 0.0 };
    MicroBatchLoss {
        loss,
        dloss_dlogp: vec![d; n_seqs],
        kl: 0.0,
        metrics: vec![("entropy", entropy), ("num_tokens", num_tokens_so_far), ("mean_token_accuracy", accuracy)],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out() -> ScoredOutput {
        ScoredOutput::default()
    }

    #[test]
    fn gradient_matches_finite_difference_for_both_loss_types() {
        let labels = [true, false, true, false];
        let policy = [-10.0, -12.0, -8.5, -20.0];
        let reference = [-10.5, -11.0, -9.0, -19.0];
        let policy_kl = [-11.0, -13.0, -9.0, -18.0];
        let reference_kl = [-12.0, -13.5, -9.0, -18.2];
        for loss_type in [LossType::Kto, LossType::ApoZeroUnpaired] {
            let obj = KtoObjective { loss_type, beta: 0.3, desirable_weight: 1.0, undesirable_weight: 1.33 };
            let eval = |p: &[f64]| {
                let lp = MicroBatchLogps { labels: &labels, policy: p, reference: &reference, policy_kl: &policy_kl, reference_kl: &reference_kl };
                obj.evaluate(&lp, &out(), &[], 0.0)
            };
            let base = eval(&policy);
            for i in 0..4 {
                let h = 1e-5;
                let (mut up, mut dn) = (policy, policy);
                up[i] += h;
                dn[i] -= h;
                let fd = (eval(&up).loss - eval(&dn).loss) / (2.0 * h);
                assert!((fd - base.dloss_dlogp[i]).abs() < 1e-8, "{loss_type:?} row {i}: {fd} vs {}", base.dloss_dlogp[i]);
            }
        }
    }

    #[test]
    fn kl_is_clamped_and_missing_groups_drop_their_keys() {
        let obj = KtoObjective { loss_type: LossType::Kto, beta: 0.1, desirable_weight: 1.0, undesirable_weight: 1.0 };
        let lp = MicroBatchLogps {
            labels: &[true, true],
            policy: &[-1.0, -2.0],
            reference: &[-1.5, -2.0],
            policy_kl: &[-5.0, -5.0],
            reference_kl: &[-4.0, -4.0],
        };
        let r = obj.evaluate(&lp, &out(), &[], 7.0);
        assert_eq!(r.kl, 0.0);
        let keys: Vec<&str> = r.metrics.iter().map(|(k, _)| *k).collect();
        assert_eq!(keys, ["kl", "entropy", "num_tokens", "rewards/chosen", "logps/chosen"]);
        let reward = r.metrics.iter().find(|(k, _)| *k == "rewards/chosen").unwrap().1;
        assert!((reward - 0.1 * 0.25).abs() < 1e-12);
    }
}
