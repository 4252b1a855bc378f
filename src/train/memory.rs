//! What a run will hold in memory, stated before the first step.
use super::*;

/// What a run will hold in memory (the log states it before the first step).
#[derive(Debug, Clone)]
pub struct MemoryPlan {
    pub parameters: usize,
    pub trainable: usize,
    pub weight_bytes: usize,
    pub gradient_bytes: usize,
    pub optimizer_bytes: usize,
    /// The training tape of the largest micro-batch.
    pub activation_bytes: usize,
}

impl std::fmt::Display for MemoryPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mb = |b: usize| b as f64 / (1024.0 * 1024.0);
        write!(
            f,
            "memory plan: {} parameters ({} trainable); weights {:.1} MB, gradients {:.1} MB, optimizer state {:.1} MB, activations {:.1} MB",
            self.parameters,
            self.trainable,
            mb(self.weight_bytes),
            mb(self.gradient_bytes),
            mb(self.optimizer_bytes),
            mb(self.activation_bytes)
        )
    }
}

impl Trainer {
    /// Planned memory of the run, before the first step.
    pub fn memory_plan(&self) -> MemoryPlan {
        let f = 4usize;
        let trainable = self.trainable_params().len();
        // The frozen reference (and a LoRA base) in the dtype it is held in (bf16 when its checkpoint is).
        let reference_bytes = self.reference.as_ref().map_or(0, |r| r.weight_bytes());
        let lora_extra = self.policy.lora.as_ref().map_or(0, |l| l.num_parameters());
        let state_per_param = match self.optimizer.kind {
            crate::optim::OptimKind::AdamW => 2,
            crate::optim::OptimKind::Sgd => 0,
        };
        // The largest micro-batch: its tokens N and scored positions M bound the tape.
        let (mut n, mut m) = (0usize, 0usize);
        for rows in self.epoch_batches() {
            let b = self.collate(&rows);
            n = n.max(b.main.iter().map(|(i, _)| i.len()).sum());
            m = m.max(b.main.iter().map(|(_, c)| c.iter().skip(1).filter(|x| **x).count()).sum());
        }
        let activations = crate::engine::tape_bytes(&self.policy, n, m, self.cfg.gradient_checkpointing);
        MemoryPlan {
            parameters: self.policy.num_parameters() + lora_extra,
            trainable,
            weight_bytes: self.policy.weight_bytes() + lora_extra * f + reference_bytes,
            gradient_bytes: trainable * f,
            optimizer_bytes: state_per_param * trainable * f,
            activation_bytes: activations,
        }
    }
}
