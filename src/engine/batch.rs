//! What the trainer hands the engine and gets back, on the host whatever the backend: packed token batches,
//! what a pass keeps, and the scored outputs.

/// What a forward pass keeps and applies.
#[derive(Debug, Clone, Copy, Default)]
pub struct Pass {
    /// Keep the activations `backward` needs.
    pub keep_tape: bool,
    /// Keep what `forward_continuation` needs (each layer's q|k|v rows, the scored hidden states).
    pub keep_cache: bool,
    /// Apply the model's LoRA adapters (false: the frozen base, KTO's reference under LoRA).
    pub adapters: bool,
    /// Gradient checkpointing: the tape keeps only each layer's input and backward recomputes the rest (the
    /// same numbers).
    pub checkpoint: bool,
}

impl Pass {
    /// A pass that keeps nothing, adapters on.
    pub const INFERENCE: Pass = Pass { keep_tape: false, keep_cache: false, adapters: true, checkpoint: false };
}

/// Sequences packed end to end, with the positions whose next token is scored.
#[derive(Debug, Clone, Default)]
pub struct SeqBatch {
    pub tokens: Vec<u32>,
    pub positions: Vec<u32>,
    /// `seq_starts[s]..seq_starts[s+1]` are the rows of sequence `s`.
    pub seq_starts: Vec<usize>,
    /// Rows whose next token is a completion token, the token they predict, and their sequence.
    pub scored_rows: Vec<usize>,
    pub scored_targets: Vec<u32>,
    pub scored_seq: Vec<usize>,
}

impl SeqBatch {
    /// `seqs[s] = (input ids, completion mask)`. Position t is scored when token t+1 is a completion token,
    /// exactly TRL's `labels[:, 1:] != -100`.
    pub fn new(seqs: &[(&[u32], &[bool])]) -> Self {
        let mut b = SeqBatch { seq_starts: vec![0], ..Default::default() };
        for (s, (ids, mask)) in seqs.iter().enumerate() {
            assert_eq!(ids.len(), mask.len(), "ids and completion mask differ in length");
            let start = b.tokens.len();
            b.tokens.extend_from_slice(ids);
            b.positions.extend(0..ids.len() as u32);
            for t in 0..ids.len().saturating_sub(1) {
                if mask[t + 1] {
                    b.scored_rows.push(start + t);
                    b.scored_targets.push(ids[t + 1]);
                    b.scored_seq.push(s);
                }
            }
            b.seq_starts.push(b.tokens.len());
        }
        b
    }
    pub fn n_seqs(&self) -> usize {
        self.seq_starts.len() - 1
    }
    pub fn n_tokens(&self) -> usize {
        self.tokens.len()
    }
    pub(in crate::engine) fn max_len(&self) -> usize {
        self.seq_starts.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0)
    }
}

/// What a forward pass yields at the scored positions.
#[derive(Debug, Clone, Default)]
pub struct ScoredOutput {
    /// Per sequence: sum of the log-probabilities of its completion tokens.
    pub seq_logps: Vec<f64>,
    /// Per scored position: log p(target), entropy of the next-token distribution, mean logit over the vocabulary.
    pub token_logps: Vec<f32>,
    pub entropy: Vec<f32>,
    pub mean_logit: Vec<f32>,
    /// Per scored position: whether the target is the most likely token (SFT's token accuracy).
    pub target_is_argmax: Vec<bool>,
}

