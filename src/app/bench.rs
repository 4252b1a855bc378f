//! `kto bench`: KTO training steps on a randomly initialised Llama of the shape `shared/peer/bench_trl.py`
//! times, through the same trainer code path as `kto train`, with a per-phase split, achieved GFLOP/s against a
//! measured single-GEMM rate, and peak RSS.
use kto::config::TrainConfig;
use kto::data::{PrepareOptions, Prepared, TokenizedRow};
use kto::engine::cpu::gemm::gemm;
use kto::model::random::random_bf16_model;
use kto::model::ModelSpec;
use kto::rng::Rng;
use kto::train::{PhaseTimes, Trainer};
use serde_json::json;
use std::time::Instant;

/// A model shape and batch to bench: the bench model of `shared/peer/bench_trl.py`, or a released model's shape.
#[derive(Debug, Clone, Copy)]
pub struct Preset {
    pub name: &'static str,
    pub vocab: usize,
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub qkv_bias: bool,
    pub tied_embeddings: bool,
    pub rope_theta: f64,
    pub batch: usize,
    pub prompt_len: usize,
    pub completion_len: usize,
}

/// `--preset` names. The Qwen2.5 shapes are the released configs'; their batch (4 × 340 tokens) is what
/// `shared/peer/scale/` trains.
pub const PRESETS: [Preset; 4] = [
    Preset { name: "bench", vocab: 8192, hidden: 256, intermediate: 704, layers: 4, heads: 8, kv_heads: 4, qkv_bias: false, tied_embeddings: false, rope_theta: 10000.0, batch: 8, prompt_len: 64, completion_len: 64 },
    Preset { name: "qwen2.5-0.5b", vocab: 151936, hidden: 896, intermediate: 4864, layers: 24, heads: 14, kv_heads: 2, qkv_bias: true, tied_embeddings: true, rope_theta: 1e6, batch: 4, prompt_len: 170, completion_len: 170 },
    Preset { name: "qwen2.5-1.5b", vocab: 151936, hidden: 1536, intermediate: 8960, layers: 28, heads: 12, kv_heads: 2, qkv_bias: true, tied_embeddings: true, rope_theta: 1e6, batch: 4, prompt_len: 170, completion_len: 170 },
    Preset { name: "qwen2.5-7b", vocab: 152064, hidden: 3584, intermediate: 18944, layers: 28, heads: 28, kv_heads: 4, qkv_bias: true, tied_embeddings: false, rope_theta: 1e6, batch: 4, prompt_len: 170, completion_len: 170 },
];

#[derive(Debug, Clone, clap::Args)]
pub struct BenchOptions {
    /// The model shape and batch; the flags below override single values of it.
    #[arg(long, default_value = "bench", value_parser = ["bench", "qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-7b"])]
    pub preset: String,
    #[arg(long)]
    pub vocab: Option<usize>,
    #[arg(long)]
    pub hidden: Option<usize>,
    #[arg(long)]
    pub intermediate: Option<usize>,
    #[arg(long)]
    pub layers: Option<usize>,
    #[arg(long)]
    pub heads: Option<usize>,
    #[arg(long)]
    pub kv_heads: Option<usize>,
    /// Sequences per batch.
    #[arg(long)]
    pub batch: Option<usize>,
    /// Prompt tokens per sequence (BOS included).
    #[arg(long)]
    pub prompt_len: Option<usize>,
    /// Completion tokens per sequence.
    #[arg(long)]
    pub completion_len: Option<usize>,
    /// Timed steps (after the warm-up).
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// Worker threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// `online`: reference forwards every step (TRL's default); `precomputed`: reference log-probs computed once
    /// before the timed steps (`precompute_ref_log_probs`).
    #[arg(long, default_value = "online", value_parser = ["online", "precomputed"])]
    pub reference: String,
    /// Train LoRA adapters of this rank on all linear layers instead of the full model (0: full fine-tuning).
    #[arg(long, default_value_t = 0)]
    pub lora_r: usize,
    /// Gradient checkpointing (off by default, like bench_trl.py's KTO run).
    #[arg(long)]
    pub gradient_checkpointing: bool,
    /// Bench sampling instead of training: load time, time to first token, decode tokens/s and the bandwidth
    /// weights are read at (`--batch` defaults to 1 and `--prompt-len` to 32 here).
    #[arg(long)]
    pub generate: bool,
    /// With `--generate`: a model folder to load (timed) and sample from, instead of the preset's random model.
    #[arg(long, requires = "generate")]
    pub model: Option<std::path::PathBuf>,
    /// With `--generate`: tokens sampled after each prompt.
    #[arg(long, default_value_t = 64)]
    pub new_tokens: usize,
}

impl BenchOptions {
    /// The preset with the flags given on top of it.
    pub fn shape(&self) -> Preset {
        let p = *PRESETS.iter().find(|p| p.name == self.preset).unwrap_or(&PRESETS[0]);
        Preset {
            vocab: self.vocab.unwrap_or(p.vocab),
            hidden: self.hidden.unwrap_or(p.hidden),
            intermediate: self.intermediate.unwrap_or(p.intermediate),
            layers: self.layers.unwrap_or(p.layers),
            heads: self.heads.unwrap_or(p.heads),
            kv_heads: self.kv_heads.unwrap_or(p.kv_heads),
            batch: self.batch.unwrap_or(p.batch),
            prompt_len: self.prompt_len.unwrap_or(p.prompt_len),
            completion_len: self.completion_len.unwrap_or(p.completion_len),
            ..p
        }
    }

    /// The model of the preset and flags, or why it cannot be made.
    pub(super) fn spec(&self) -> anyhow::Result<ModelSpec> {
        let shape = self.shape();
        let mut spec = ModelSpec {
            vocab_size: shape.vocab,
            hidden: shape.hidden,
            intermediate: shape.intermediate,
            layers: shape.layers,
            heads: shape.heads,
            kv_heads: shape.kv_heads,
            head_dim: shape.hidden / shape.heads.max(1),
            rms_eps: 1e-6,
            rope: kto::model::RopeSpec::plain(shape.rope_theta),
            qkv_bias: shape.qkv_bias,
            qk_norm: false,
            layer_windows: Vec::new(),
            padding_idx: None,
            tied_embeddings: shape.tied_embeddings,
            norm_plus_one: false,
            embed_scale: None,
            sandwich_norms: false,
            activation: kto::model::Activation::Silu,
            attn_scale: 1.0 / ((shape.hidden / shape.heads.max(1)) as f32).sqrt(),
            sliding_rope: None,
            attn_softcap: None,
            final_softcap: None,
        };
        spec.check_dims().map_err(|e| anyhow::anyhow!("kto bench: {e}"))?;
        spec.layer_windows = vec![None; shape.layers];
        Ok(spec)
    }

    /// Options that could not make a model or a batch are refused before anything is allocated.
    pub(super) fn check(&self) -> anyhow::Result<()> {
        let s = self.shape();
        let at_least = [
            ("--vocab", s.vocab, 4),
            ("--hidden", s.hidden, 1),
            ("--intermediate", s.intermediate, 1),
            ("--layers", s.layers, 1),
            ("--heads", s.heads, 1),
            ("--kv-heads", s.kv_heads, 1),
            ("--batch", s.batch, if self.generate { 1 } else { 2 }),
            ("--prompt-len", s.prompt_len, 1),
            ("--completion-len", s.completion_len, 1),
            ("--steps", self.steps, 1),
        ];
        for (flag, value, min) in at_least {
            if value < min {
                anyhow::bail!("kto bench: {flag} must be at least {min}, got {value}");
            }
        }
        if s.heads % s.kv_heads != 0 {
            anyhow::bail!("kto bench: --heads {} is not a multiple of --kv-heads {}", s.heads, s.kv_heads);
        }
        if s.hidden % s.heads != 0 || (s.hidden / s.heads) % 2 != 0 {
            anyhow::bail!("kto bench: --hidden {} must split into --heads {} heads of even size", s.hidden, s.heads);
        }
        if self.threads == Some(0) {
            anyhow::bail!("kto bench: --threads must be at least 1");
        }
        Ok(())
    }
}

/// The CPU's model name, where the system says (Linux).
pub(super) fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| t.lines().find(|l| l.starts_with("model name")).and_then(|l| l.split(':').nth(1)).map(|s| s.trim().to_string()))
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

/// Total physical memory, where the system says (Linux).
fn physical_memory_bytes() -> Option<usize> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb: usize = text.lines().find(|l| l.starts_with("MemTotal:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).map(|l| l.to_string()))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|kb| kb.parse::<f64>().ok()))
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

/// GFLOP/s of one square single-precision GEMM of size n on this machine, best of a few runs.
pub fn gemm_peak_gflops(n: usize) -> f64 {
    let a: Vec<f32> = (0..n * n).map(|i| (i % 17) as f32 * 0.01).collect();
    let b = a.clone();
    let mut c = vec![0f32; n * n];
    gemm(n, n, n, &a, false, &b, false, &mut c, false);
    let mut best = f64::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        gemm(n, n, n, &a, false, &b, false, &mut c, false);
        best = best.min(t.elapsed().as_secs_f64());
    }
    2.0 * (n * n * n) as f64 / best / 1e9
}

/// FLOPs of one forward pass: `tokens` rows through the layers, `attention_pairs` (query, key) pairs per head,
/// and `scored` rows through the vocabulary projection.
fn forward_flops(s: &ModelSpec, tokens: usize, attention_pairs: usize, scored: usize) -> f64 {
    let (h, q, kv, i) = (s.hidden as f64, s.q_dim() as f64, s.kv_dim() as f64, s.intermediate as f64);
    let linear = 2.0 * tokens as f64 * h * (q + 2.0 * kv + q + 3.0 * i);
    let attention = 2.0 * 2.0 * attention_pairs as f64 * q;
    let lm_head = 2.0 * scored as f64 * h * s.vocab_size as f64;
    s.layers as f64 * (linear + attention) + lm_head
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

pub fn run(opts: &BenchOptions) -> anyhow::Result<()> {
    if opts.generate {
        return super::bench_generate::run(opts);
    }
    // Under `mpirun` (with the `mpi` feature) each rank takes an equal share of the batch and the gradients are
    // summed over the ranks every step: data-parallel scaling of the same global batch.
    let ranks = kto::dist::Ranks::from_launcher()?;
    let shape = opts.shape();
    if shape.batch % ranks.size() != 0 {
        anyhow::bail!("--batch {} does not split evenly over {} ranks", shape.batch, ranks.size());
    }
    if let Some(t) = opts.threads {
        kto::engine::cpu::update::set_threads(t).map_err(|e| anyhow::anyhow!("--threads: {e}"))?;
    }
    opts.check()?;
    let spec = opts.spec()?;
    // Full fine-tuning: the policy, its gradients and two AdamW moments in f32, the reference in bf16. LoRA: the
    // frozen base in bf16 (the adapters are small).
    let bytes_per_parameter = if opts.lora_r > 0 { 2 } else { 4 * 4 + 2 };
    let needed = spec.parameter_count().and_then(|n| n.checked_mul(bytes_per_parameter)).unwrap_or(usize::MAX);
    if let Some(total) = physical_memory_bytes().filter(|&t| needed > t) {
        anyhow::bail!(
            "kto bench: this shape needs at least {:.1} GB for weights, gradients and optimizer state; the machine has {:.1} GB",
            needed as f64 / 1e9,
            total as f64 / 1e9
        );
    }
    // Weights as a hub checkpoint holds them (bf16 values), frozen ones held in bf16, as `kto train` does.
    let policy = random_bf16_model(&spec, 0);
    let reference = if opts.lora_r > 0 { None } else { Some(random_bf16_model(&spec, 1)) };
    let len = shape.prompt_len + shape.completion_len;
    let mut rng = Rng::from_state(7);
    let rows: Vec<TokenizedRow> = (0..shape.batch)
        .map(|i| {
            let mut tok = |n: usize| (0..n).map(|_| 3 + (rng.next_u64() % (shape.vocab as u64 - 3)) as u32).collect::<Vec<_>>();
            let mut prompt_ids = tok(shape.prompt_len - 1);
            prompt_ids.insert(0, 1);
            TokenizedRow { prompt_ids, completion_ids: tok(shape.completion_len), kl_completion_ids: vec![], label: i % 3 != 0, source_row: i }
        })
        .collect();
    let mut prepared = Prepared { rows, dropped_source_rows: vec![], prefix_mismatches: 0 };
    let popts = PrepareOptions { max_length: Some(len), batch_size: shape.batch, with_kl: true };
    kto::data::prepare::rotate_kl_completions(&mut prepared.rows, popts.batch_size);
    let scratch = std::env::temp_dir().join(format!("kto-bench-{}", std::process::id()));
    let cfg = TrainConfig::from_toml(
        &format!(
            "model = \"bench\"\ntrain_dataset = \"bench\"\noutput_dir = {:?}\nper_device_train_batch_size = {}\nmax_length = {len}\noptim = \"adamw_torch\"\nlearning_rate = 1e-5\nlr_scheduler_type = \"constant\"\nmax_steps = {}\ngradient_checkpointing = {}\n",
            scratch.display().to_string(),
            shape.batch,
            opts.steps + opts.warmup,
            opts.gradient_checkpointing
        ),
        &[],
    )?;
    let mut policy = policy;
    if opts.lora_r > 0 {
        let all = kto::model::lora::Target::ALL;
        policy.lora = Some(kto::model::lora::Lora::new(&spec, opts.lora_r, 2.0 * opts.lora_r as f64, &all, 0));
    } else {
        policy.params = policy.params.thawed();
    }
    // Under LoRA the reference is the frozen base inside the policy (no second model), as `kto train` does
    // without `ref_model`.
    let mut trainer = Trainer::from_parts(cfg, policy, reference, prepared);
    let precomputed = opts.reference == "precomputed";
    if precomputed {
        let result = trainer.precompute_reference(&kto::train::Silent);
        let _ = std::fs::remove_dir_all(&scratch);
        result?;
    }
    let share = shape.batch / ranks.size();
    let batch = trainer.collate(&(ranks.rank() * share..(ranks.rank() + 1) * share).collect::<Vec<_>>());
    let mut grads = kto::engine::Buffer::zeros(trainer.trainable_params().len());
    let mut step_times = Vec::new();
    let mut phases = PhaseTimes::default();
    for it in 0..opts.warmup + opts.steps {
        let t = Instant::now();
        kto::engine::zero(&mut grads);
        let mut times = PhaseTimes::default();
        trainer.micro_batch_across(Some(&batch), 0, Some((&mut grads, ranks.size() as f64)), &mut times, &ranks);
        trainer.phases = PhaseTimes::default();
        if ranks.size() > 1 {
            ranks.sum_buffer(&mut grads);
        }
        trainer.apply_update(&grads, it);
        times.optimizer = trainer.phases.optimizer;
        if it >= opts.warmup {
            step_times.push(t.elapsed().as_secs_f64());
            phases.policy_kl_forward += times.policy_kl_forward;
            phases.policy_forward += times.policy_forward;
            phases.reference_forward += times.reference_forward;
            phases.backward += times.backward;
            phases.optimizer += times.optimizer;
        }
    }
    let n = opts.steps.max(1) as f64;
    let step_ms = median(&mut step_times) * 1e3;
    let tokens = (shape.batch * len) as f64;
    // The work the engine does per step: the main sequences forward (with tape) and backward (≈ 2× forward,
    // plus recomputing the vocabulary projection), and twice (policy, reference) a no-grad forward of the main
    // sequences and of the KL completions continuing the cached prompt.
    let (b, pl, cl) = (shape.batch, shape.prompt_len, shape.completion_len);
    let main = forward_flops(&spec, b * len, b * len * (len + 1) / 2, b * cl);
    let kl = forward_flops(&spec, b * cl, b * (cl * pl + cl * (cl + 1) / 2), b * cl);
    let kept_softmax = b * cl * spec.vocab_size * 4 <= kto::engine::cpu::decoder::softmax_cache_bytes();
    let lm_recompute =
        if kept_softmax { 0.0 } else { 2.0 * (b * cl) as f64 * spec.hidden as f64 * spec.vocab_size as f64 };
    let reference_flops = if precomputed { 0.0 } else { main + kl };
    let step_flops = 3.0 * main + lm_recompute + main + kl + reference_flops;
    let gflops = step_flops / (step_ms / 1e3) / 1e9;
    let peak = gemm_peak_gflops(1024);
    let rss = peak_rss_mb();
    let threads = kto::engine::cpu::update::threads();
    ranks.barrier();
    if !ranks.is_root() {
        return Ok(());
    }
    let mode = if opts.lora_r > 0 { format!("LoRA r={} all-linear", opts.lora_r) } else { "full fine-tuning".into() };
    println!("kto bench: preset {} (vocab {} hidden {} intermediate {} layers {} heads {}/{}; {} parameters, {} trainable), batch {} x {} tokens, kto, AdamW, {mode}, {} reference, gradient checkpointing {}, {} rank(s) x {threads} threads",
        opts.preset, spec.vocab_size, spec.hidden, spec.intermediate, spec.layers, spec.heads, spec.kv_heads, trainer.policy.num_parameters(), trainer.trainable_params().len(), shape.batch, len, opts.reference, if opts.gradient_checkpointing { "on" } else { "off" }, ranks.size());
    println!("cpu: {}; kernel set {} (KTO_ISA; this CPU runs {})", cpu_model(), kto::engine::cpu::isa::active().name(),
        kto::engine::cpu::isa::Isa::available().iter().map(|i| i.name()).collect::<Vec<_>>().join(", "));
    println!("{:<28} {:>10}", "phase (mean over steps)", "ms");
    for (name, t) in [
        ("policy KL forward", phases.policy_kl_forward),
        ("policy forward (tape)", phases.policy_forward),
        ("reference forwards (2)", phases.reference_forward),
        ("policy backward", phases.backward),
        ("clip + AdamW", phases.optimizer),
    ] {
        println!("{name:<28} {:>10.1}", t / n * 1e3);
    }
    println!("{:<28} {:>10.1}", "KTO step (median)", step_ms);
    println!("{:<28} {:>10.0}", "tokens/s (main sequences)", tokens / (step_ms / 1e3));
    println!("{:<28} {:>10.1}  ({:.0}% of the {peak:.1} GFLOP/s single-GEMM rate)", "GFLOP/s", gflops, 100.0 * gflops / peak);
    println!("{:<28} {:>10.0}", "peak RSS (MB)", rss);
    let line = json!({
        "kto_step_ms": step_ms,
        "tokens_per_s": tokens / (step_ms / 1e3),
        "gflops": gflops,
        "gemm_peak_gflops": peak,
        "peak_rss_mb": rss,
        "step_gflop": step_flops / 1e9,
        "threads": threads,
        "ranks": ranks.size(),
        "reference": opts.reference,
        "lora_r": opts.lora_r,
        "gradient_checkpointing": opts.gradient_checkpointing,
        "phases_ms": {
            "policy_kl_forward": phases.policy_kl_forward / n * 1e3,
            "policy_forward": phases.policy_forward / n * 1e3,
            "reference_forward": phases.reference_forward / n * 1e3,
            "backward": phases.backward / n * 1e3,
            "optimizer": phases.optimizer / n * 1e3,
        },
        "all_step_ms": step_times.iter().map(|t| t * 1e3).collect::<Vec<_>>(),
    });
    println!("{line}");
    Ok(())
}
