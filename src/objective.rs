//! The KTO objective of TRL's `_compute_loss`: from sequence log-probs to the micro-batch loss, its gradient
//! with respect to each policy log-prob, and the metrics TRL logs. Knows nothing of files or kernels.
use crate::engine::ScoredOutput;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LossType {
    /// `1 − σ(β(r − kl))` for desirable rows, `1 − σ(β(kl − r))` for undesirable ones.
    Kto,
    /// APO-zero without pairs: `1 − σ(βr)` and `σ(βr)`; no KL term.
    ApoZeroUnpaired,
}

impl LossType {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "kto" => Some(LossType::Kto),
            "apo_zero_unpaired" => Some(LossType::ApoZeroUnpaired),
            _ => None,
        }
    }
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
        let n = lp.labels.len();
        let beta = self.beta;
        // KL reference point: batch mean over all rows of both labels, detached, clamped at 0 (§4.3).
        let kl = if self.loss_type.uses_kl() && n > 0 {
            let mean = lp.policy_kl.iter().zip(lp.reference_kl).map(|(p, r)| p - r).sum::<f64>() / n as f64;
            mean.max(0.0)
        } else {
            0.0
        };
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

        let mut metrics: Vec<(&'static str, f64)> = vec![("kl", kl)];
        let ntok = policy_out.entropy.len();
        let entropy = if ntok > 0 { policy_out.entropy.iter().map(|&e| e as f64).sum::<f64>() / ntok as f64 } else { 0.0 };
        metrics.push(("entropy", entropy));
        metrics.push(("num_tokens", num_tokens_so_far));
        for (key, want) in [("logits/chosen", true), ("logits/rejected", false)] {
            let (mut sum, mut count) = (0.0, 0usize);
            for (t, &s) in scored_seq.iter().enumerate() {
                if lp.labels[s] == want {
                    sum += policy_out.mean_logit[t] as f64;
                    count += 1;
                }
            }
            if count > 0 {
                metrics.push((key, sum / count as f64));
            }
        }
        let mut group_rewards = [None, None];
        for (g, want, rk, lk) in [(0, true, "rewards/chosen", "logps/chosen"), (1, false, "rewards/rejected", "logps/rejected")] {
            let rows: Vec<usize> = (0..n).filter(|&i| lp.labels[i] == want).collect();
            if rows.is_empty() {
                continue;
            }
            let reward = rows.iter().map(|&i| beta * (lp.policy[i] - lp.reference[i])).sum::<f64>() / rows.len() as f64;
            let logps = rows.iter().map(|&i| lp.policy[i]).sum::<f64>() / rows.len() as f64;
            metrics.push((rk, reward));
            metrics.push((lk, logps));
            group_rewards[g] = Some(reward);
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
    let ntok = policy_out.token_logps.len();
    let mean = |sum: f64| if ntok > 0 { sum / ntok as f64 } else { 0.0 };
    let loss = mean(-policy_out.token_logps.iter().map(|&v| v as f64).sum::<f64>());
    let entropy = mean(policy_out.entropy.iter().map(|&e| e as f64).sum());
    let accuracy = mean(policy_out.target_is_argmax.iter().filter(|h| **h).count() as f64);
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
