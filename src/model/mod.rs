//! The decoder's shape (read from a Hugging Face `config.json`) and its parameters as one flat buffer.
//!
//! Parameters live in one flat buffer (llm.c style) so that gradients, optimizer state, clipping and saving
//! are loops over one slice. `ParamLayout` maps each Hugging Face tensor name to its range in that buffer; the
//! tensors lie one after another, except in frozen models read from their mapped files, whose layout puts each
//! tensor where it lies in its file (`mapped_weights`) and leaves gaps.
pub mod lora;
#[cfg(target_os = "linux")]
mod mapped_weights;
pub mod random;
pub mod weights;

use crate::error::{Error, Result};
use serde::Deserialize;
use std::path::Path;
use serde_json::Value;

/// The most parameters a model may have (4 TiB in f32): a bound that refuses absurd shapes (a `num_hidden_layers`
/// of 10^12) before anything of their size is allocated, far above any model a CPU trains.
pub const MAX_PARAMETERS: usize = 1 << 40;

/// The model families the engine runs. Each difference between families is a named field of `ModelSpec`.
pub const SUPPORTED_MODEL_TYPES: &[&str] = &["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text"];

/// The MLP's gate activation: `down(act(gate(x)) ⊙ up(x))`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Silu,
    /// GELU with the tanh approximation (transformers' `gelu_pytorch_tanh`, Gemma's `hidden_activation`).
    GeluTanh,
}

/// `rope_parameters` (transformers 5) or `rope_scaling` (older configs).
#[derive(Debug, Deserialize, Default)]
struct RopeParameters {
    rope_theta: Option<f64>,
    #[serde(alias = "type")]
    rope_type: Option<String>,
    factor: Option<f64>,
    low_freq_factor: Option<f64>,
    high_freq_factor: Option<f64>,
    original_max_position_embeddings: Option<f64>,
}

/// How rotary frequencies are derived from `rope_theta`, as transformers' `ROPE_INIT_FUNCTIONS`.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    Default,
    /// Positions divided by `factor` (frequencies divided by it).
    Linear { factor: f64 },
    /// Llama 3.1: low frequencies divided by `factor`, high ones kept, a smooth blend between.
    Llama3 { factor: f64, low_freq_factor: f64, high_freq_factor: f64, original_max_position_embeddings: f64 },
}

/// Rotary embedding parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeSpec {
    pub theta: f64,
    pub scaling: RopeScaling,
}

impl RopeSpec {
    pub fn plain(theta: f64) -> Self {
        RopeSpec { theta, scaling: RopeScaling::Default }
    }

    /// The inverse frequencies for a head of `head_dim`, computed in f32 as transformers does.
    pub fn inv_freq(&self, head_dim: usize) -> Vec<f32> {
        let base: Vec<f32> =
            (0..head_dim / 2).map(|j| 1.0 / (self.theta as f32).powf((2 * j) as f32 / head_dim as f32)).collect();
        match self.scaling {
            RopeScaling::Default => base,
            RopeScaling::Linear { factor } => base.iter().map(|f| f / factor as f32).collect(),
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings: old } => {
                let (factor, low, high, old) = (factor as f32, low_freq_factor as f32, high_freq_factor as f32, old as f32);
                let (low_wavelen, high_wavelen) = (old / low, old / high);
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f32::consts::PI / f;
                        let scaled = if wavelen > low_wavelen { f / factor } else { f };
                        let medium = !(wavelen < high_wavelen) && !(wavelen > low_wavelen);
                        if medium {
                            let smooth = (old / wavelen - low) / (high - low);
                            (1.0 - smooth) * scaled / factor + smooth * scaled
                        } else {
                            scaled
                        }
                    })
                    .collect()
            }
        }
    }
}

/// The subset of `config.json` the engine reads (`model_type` is read before it). Unknown keys are ignored, as
/// transformers does.
#[derive(Debug, Deserialize)]
struct HfConfig {
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    #[serde(default = "default_rms_eps")]
    rms_norm_eps: f64,
    rope_theta: Option<f64>,
    /// One `RopeParameters`, or (Gemma 3, transformers 5) one per layer type.
    rope_parameters: Option<Value>,
    rope_scaling: Option<RopeParameters>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    #[serde(default)]
    mlp_bias: bool,
    hidden_act: Option<String>,
    hidden_activation: Option<String>,
    query_pre_attn_scalar: Option<f64>,
    attn_logit_softcapping: Option<f64>,
    final_logit_softcapping: Option<f64>,
    use_bidirectional_attention: Option<bool>,
    /// Gemma 3 configs from before transformers 5: the local RoPE base and the sliding/full layer pattern.
    rope_local_base_freq: Option<f64>,
    sliding_window_pattern: Option<usize>,
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
    max_window_layers: Option<usize>,
    layer_types: Option<Vec<String>>,
    pad_token_id: Option<Value>,
}

fn default_rms_eps() -> f64 {
    1e-6
}

/// A `RopeSpec` from one set of rope parameters (absent: default RoPE at `theta`).
fn rope_spec(r: Option<&RopeParameters>, theta: f64) -> std::result::Result<RopeSpec, String> {
    let theta = r.and_then(|r| r.rope_theta).unwrap_or(theta);
    let need = |v: Option<f64>, name: &str| v.ok_or_else(|| format!("rope scaling needs {name}"));
    let scaling = match r.and_then(|r| r.rope_type.as_deref()).unwrap_or("default") {
        "default" => RopeScaling::Default,
        "linear" => RopeScaling::Linear { factor: need(r.and_then(|r| r.factor), "factor")? },
        "llama3" => {
            let r = r.expect("a rope_type implies rope parameters");
            RopeScaling::Llama3 {
                factor: need(r.factor, "factor")?,
                low_freq_factor: need(r.low_freq_factor, "low_freq_factor")?,
                high_freq_factor: need(r.high_freq_factor, "high_freq_factor")?,
                original_max_position_embeddings: need(r.original_max_position_embeddings, "original_max_position_embeddings")?,
            }
        }
        other => return Err(format!("rope_type {other:?} is not supported; supported: default, linear, llama3")),
    };
    Ok(RopeSpec { theta, scaling })
}

/// Shape and numerics of one decoder.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    pub vocab_size: usize,
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub rms_eps: f32,
    pub rope: RopeSpec,
    pub tied_embeddings: bool,
    /// Biases on the q, k and v projections (Qwen2; `attention_bias` elsewhere).
    pub qkv_bias: bool,
    /// RMSNorm over each query and key head before RoPE (Qwen3's `q_norm` / `k_norm`).
    pub qk_norm: bool,
    /// Per layer: the sliding attention window (a token sees itself and the `window − 1` before it), or `None`
    /// for full causal attention (Mistral's `sliding_window`, Qwen's `layer_types`).
    pub layer_windows: Vec<Option<usize>>,
    /// `config.json`'s `pad_token_id`: transformers builds the embedding as `nn.Embedding(padding_idx=...)`, whose
    /// row for that token gets no gradient from the lookup (with tied embeddings, the LM head's still reaches it).
    pub padding_idx: Option<u32>,
    /// Gemma: every RMSNorm (q/k norms included) scales by `1 + weight`, its weights stored centred on 0.
    pub norm_plus_one: bool,
    /// Gemma: embedding rows multiplied by `sqrt(hidden_size)` (as transformers' f32 buffer) on lookup; the
    /// tied LM head uses the unscaled matrix.
    pub embed_scale: Option<f32>,
    /// Gemma: four norms per layer. The attention and MLP outputs are normed before they join the residual
    /// stream (`post_attention_layernorm`, `post_feedforward_layernorm`), and the MLP's input norm is named
    /// `pre_feedforward_layernorm`.
    pub sandwich_norms: bool,
    pub activation: Activation,
    /// Scale of the attention scores: `head_dim^-1/2`, or Gemma's `query_pre_attn_scalar^-1/2`.
    pub attn_scale: f32,
    /// Gemma 3: the RoPE of the sliding-window layers (`rope_local_base_freq`), when it differs from `rope`
    /// (the global layers', which alone take `rope_scaling`).
    pub sliding_rope: Option<RopeSpec>,
    /// Gemma: attention scores (after scaling) become `cap · tanh(s / cap)` before the softmax.
    pub attn_softcap: Option<f32>,
    /// Gemma: logits become `cap · tanh(z / cap)` (the model's output, so log-probs and metrics see them).
    pub final_softcap: Option<f32>,
}

impl ModelSpec {
    /// Reads `config.json` of a model folder and checks that the engine supports it.
    pub fn from_folder(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| Error::file(&path, e))?;
        Self::from_config_json(&text).map_err(|msg| Error::model(&path, msg))
    }

    pub fn from_config_json(text: &str) -> std::result::Result<Self, String> {
        // The family first: an unsupported one is named even when its config lacks the keys ours have.
        let value: Value = serde_json::from_str(text).map_err(|e| format!("invalid config.json: {e}"))?;
        let model_type = value.get("model_type").and_then(Value::as_str).unwrap_or_default().to_string();
        if !SUPPORTED_MODEL_TYPES.contains(&model_type.as_str()) {
            // Gemma 3 from 4B up is an image-text model whose config nests the decoder's under text_config.
            let hint = match model_type.as_str() {
                "gemma3" => " (a multimodal Gemma3ForConditionalGeneration checkpoint; its text decoder alone is not loaded yet, only gemma3_text checkpoints such as Gemma 3 1B)",
                _ => "",
            };
            return Err(format!(
                "model_type {model_type:?} is not supported{hint}; supported: {}",
                SUPPORTED_MODEL_TYPES.join(", ")
            ));
        }
        let c: HfConfig = serde_json::from_value(value).map_err(|e| format!("invalid config.json: {e}"))?;
        let (gemma2, gemma3) = (model_type == "gemma2", model_type == "gemma3_text");
        let gemma = gemma2 || gemma3;
        let activation = match (gemma, c.hidden_activation.as_deref().or(c.hidden_act.as_deref())) {
            (false, None | Some("silu")) => Activation::Silu,
            (true, None | Some("gelu_pytorch_tanh")) => Activation::GeluTanh,
            (false, Some(act)) => return Err(format!("hidden_act {act:?} is not supported for {model_type} (only \"silu\")")),
            (true, Some(act)) => {
                return Err(format!("hidden_activation {act:?} is not supported for {model_type} (only \"gelu_pytorch_tanh\")"))
            }
        };
        if c.mlp_bias {
            return Err("mlp_bias is not supported".into());
        }
        // Only Gemma's modelling code reads the soft-capping keys; transformers ignores them for the others.
        let softcap = |key: &str, cap: Option<f64>| -> std::result::Result<Option<f32>, String> {
            match cap.filter(|_| gemma) {
                Some(c) if !(c > 0.0 && c.is_finite()) => Err(format!("{key} must be positive, got {c}")),
                cap => Ok(cap.map(|c| c as f32)),
            }
        };
        let attn_softcap = softcap("attn_logit_softcapping", c.attn_logit_softcapping)?;
        let final_softcap = softcap("final_logit_softcapping", c.final_logit_softcapping)?;
        if c.use_bidirectional_attention == Some(true) {
            return Err("use_bidirectional_attention is not supported (kto trains causal decoders)".into());
        }
        let parse_rope = |v: &Value| -> std::result::Result<RopeParameters, String> {
            serde_json::from_value(v.clone()).map_err(|e| format!("invalid rope_parameters: {e}"))
        };
        let (rope, sliding_rope) = if gemma3 {
            // transformers 5 keeps one entry per layer type; older configs have rope_theta, rope_scaling (global
            // layers only) and rope_local_base_freq.
            let per_type = |name: &str| c.rope_parameters.as_ref().and_then(|r| r.get(name)).map(parse_rope).transpose();
            let global = match per_type("full_attention")? {
                Some(r) => rope_spec(Some(&r), 1_000_000.0)?,
                None => rope_spec(c.rope_scaling.as_ref(), c.rope_theta.unwrap_or(1_000_000.0))?,
            };
            let local = match per_type("sliding_attention")? {
                Some(r) => rope_spec(Some(&r), 10_000.0)?,
                None => RopeSpec::plain(c.rope_local_base_freq.unwrap_or(10_000.0)),
            };
            (global, Some(local))
        } else {
            let params = c.rope_parameters.as_ref().map(parse_rope).transpose()?;
            let rope_cfg = params.as_ref().or(c.rope_scaling.as_ref());
            (rope_spec(rope_cfg, rope_cfg.and_then(|r| r.rope_theta).or(c.rope_theta).unwrap_or(10000.0))?, None)
        };
        let sliding_rope = sliding_rope.filter(|r| *r != rope);
        let heads = c.num_attention_heads;
        let kv_heads = c.num_key_value_heads.unwrap_or(heads);
        if heads == 0 {
            return Err("num_attention_heads must be at least 1".into());
        }
        let head_dim = c.head_dim.unwrap_or(c.hidden_size / heads);
        let layers = c.num_hidden_layers;
        let mut spec = ModelSpec {
            vocab_size: c.vocab_size,
            hidden: c.hidden_size,
            intermediate: c.intermediate_size,
            layers,
            heads,
            kv_heads,
            head_dim,
            rms_eps: c.rms_norm_eps as f32,
            rope,
            // transformers' default: Gemma ties its embeddings, the other families' configs say so when they do.
            tied_embeddings: c.tie_word_embeddings.unwrap_or(gemma),
            qkv_bias: model_type == "qwen2" || c.attention_bias == Some(true),
            qk_norm: model_type == "qwen3" || gemma3,
            layer_windows: Vec::new(),
            padding_idx: c.pad_token_id.as_ref().and_then(Value::as_u64).and_then(|id| u32::try_from(id).ok()),
            norm_plus_one: gemma,
            embed_scale: gemma.then(|| (c.hidden_size as f64).sqrt() as f32),
            sandwich_norms: gemma,
            activation,
            attn_scale: match (gemma, c.query_pre_attn_scalar) {
                (true, q) => q.unwrap_or(256.0).powf(-0.5) as f32,
                (false, _) => 1.0 / (head_dim as f32).sqrt(),
            },
            sliding_rope,
            attn_softcap,
            final_softcap,
        };
        for r in std::iter::once(&spec.rope).chain(&spec.sliding_rope) {
            if !(r.theta > 0.0 && r.theta.is_finite()) {
                return Err(format!("rope_theta must be positive, got {}", r.theta));
            }
        }
        if !(spec.attn_scale > 0.0 && spec.attn_scale.is_finite()) {
            return Err(format!("query_pre_attn_scalar must be positive, got {:?}", c.query_pre_attn_scalar));
        }
        if !(c.rms_norm_eps >= 0.0 && c.rms_norm_eps.is_finite()) {
            return Err(format!("rms_norm_eps must be a non-negative number, got {}", c.rms_norm_eps));
        }
        spec.check_dims()?;
        // Sliding windows: explicit layer_types win; Mistral slides everywhere when sliding_window is set; Qwen
        // slides only with use_sliding_window, from max_window_layers on (transformers' defaults).
        let window = match model_type.as_str() {
            "qwen2" | "qwen3" if c.use_sliding_window != Some(true) => None,
            "gemma2" | "gemma3_text" => Some(c.sliding_window.unwrap_or(4096)),
            _ => c.sliding_window,
        };
        // Gemma configs without layer_types slide on all layers but every k-th: Gemma 2 alternates, Gemma 3
        // takes `sliding_window_pattern`.
        let pattern = match (gemma2, gemma3) {
            (true, _) => Some(2),
            (_, true) => Some(c.sliding_window_pattern.unwrap_or(6).max(1)),
            _ => None,
        };
        let pattern_types: Option<Vec<String>> = pattern.map(|k| {
            (0..layers).map(|i| if (i + 1) % k == 0 { "full_attention" } else { "sliding_attention" }.to_string()).collect()
        });
        spec.layer_windows = match (c.layer_types.as_ref().or(pattern_types.as_ref()), window) {
            (_, None) => vec![None; layers],
            (Some(types), Some(w)) => {
                if types.len() != layers {
                    return Err(format!("layer_types has {} entries for {layers} layers", types.len()));
                }
                types.iter().map(|t| (t == "sliding_attention").then_some(w)).collect()
            }
            (None, Some(w)) if model_type == "mistral" || model_type == "llama" => vec![Some(w); layers],
            (None, Some(w)) => {
                let from = c.max_window_layers.unwrap_or(28);
                (0..layers).map(|i| (i >= from).then_some(w)).collect()
            }
        };
        Ok(spec)
    }

    /// Checks the shape before anything is allocated for it (see `check_dims`) and that every layer has its
    /// attention window.
    pub fn check(&self) -> std::result::Result<(), String> {
        self.check_dims()?;
        if self.layer_windows.len() != self.layers {
            return Err(format!("{} sliding-window entries for {} layers", self.layer_windows.len(), self.layers));
        }
        Ok(())
    }

    /// Every dimension at least 1, heads that group, and a parameter count that fits in memory arithmetic.
    pub fn check_dims(&self) -> std::result::Result<(), String> {
        let dims = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden),
            ("intermediate_size", self.intermediate),
            ("num_hidden_layers", self.layers),
            ("num_attention_heads", self.heads),
            ("num_key_value_heads", self.kv_heads),
            ("head_dim", self.head_dim),
        ];
        if let Some((name, _)) = dims.iter().find(|(_, v)| *v == 0) {
            return Err(format!("{name} must be at least 1"));
        }
        if self.heads % self.kv_heads != 0 {
            return Err(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.heads, self.kv_heads
            ));
        }
        if self.head_dim % 2 != 0 {
            return Err(format!("head_dim {} must be even (rotary embeddings rotate pairs)", self.head_dim));
        }
        match self.parameter_count() {
            Some(n) if n <= MAX_PARAMETERS => {}
            n => {
                let n = n.map_or("more".to_string(), |n| n.to_string());
                return Err(format!("the shape implies {n} parameters, beyond what kto holds (2^40)"));
            }
        }
        Ok(())
    }

    /// Parameters of a model of this shape (what `ParamLayout::new` lays out), or `None` on overflow: computed
    /// without building the layout, so an absurd `num_hidden_layers` costs nothing.
    pub fn parameter_count(&self) -> Option<usize> {
        let (h, i, q, kv) = (self.hidden, self.intermediate, self.q_dim(), self.kv_dim());
        let matrices = h.checked_mul(q.checked_mul(2)?.checked_add(kv.checked_mul(2)?)?)?.checked_add(h.checked_mul(i)?.checked_mul(3)?)?;
        let bias = if self.qkv_bias { q + 2 * kv } else { 0 };
        let norms = if self.sandwich_norms { 4 * h } else { 2 * h } + if self.qk_norm { 2 * self.head_dim } else { 0 };
        let layer = matrices.checked_add(bias)?.checked_add(norms)?;
        let embed = self.vocab_size.checked_mul(h)?;
        let heads = if self.tied_embeddings { embed } else { embed.checked_mul(2)? };
        layer.checked_mul(self.layers)?.checked_add(heads)?.checked_add(h)?.checked_mul(4).map(|bytes| bytes / 4)
    }

    /// A plain Llama block (no biases, no q/k norms, no sliding window, default RoPE).
    #[allow(clippy::too_many_arguments)]
    pub fn llama(
        vocab_size: usize,
        hidden: usize,
        intermediate: usize,
        layers: usize,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        tied_embeddings: bool,
    ) -> Self {
        ModelSpec {
            vocab_size,
            hidden,
            intermediate,
            layers,
            heads,
            kv_heads,
            head_dim,
            rms_eps: 1e-6,
            rope: RopeSpec::plain(10000.0),
            tied_embeddings,
            qkv_bias: false,
            qk_norm: false,
            layer_windows: vec![None; layers],
            padding_idx: None,
            norm_plus_one: false,
            embed_scale: None,
            sandwich_norms: false,
            activation: Activation::Silu,
            attn_scale: 1.0 / (head_dim as f32).sqrt(),
            sliding_rope: None,
            attn_softcap: None,
            final_softcap: None,
        }
    }

    /// The RoPE of layer `l`.
    pub fn rope_of(&self, l: usize) -> &RopeSpec {
        match (&self.sliding_rope, self.layer_windows.get(l)) {
            (Some(r), Some(Some(_))) => r,
            _ => &self.rope,
        }
    }

    pub fn q_dim(&self) -> usize {
        self.heads * self.head_dim
    }
    pub fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim
    }
}

/// Where each tensor of one decoder layer sits in the flat parameter buffer.
#[derive(Debug, Clone, Copy)]
pub struct LayerOffsets {
    pub input_norm: usize,
    pub q: usize,
    pub k: usize,
    pub v: usize,
    pub o: usize,
    /// The MLP's input norm (`post_attention_layernorm`; Gemma's `pre_feedforward_layernorm`).
    pub post_norm: usize,
    /// Gemma's norms of the attention and MLP outputs (`post_attention_layernorm`, `post_feedforward_layernorm`).
    pub attn_out_norm: Option<usize>,
    pub mlp_out_norm: Option<usize>,
    pub gate: usize,
    pub up: usize,
    pub down: usize,
    /// The q, k and v biases, consecutive (`[q | k | v]`), when the family has them.
    pub qkv_bias: Option<usize>,
    /// Per-head RMSNorm weights of queries and keys (`[head_dim]` each), when the family has them.
    pub q_norm: Option<usize>,
    pub k_norm: Option<usize>,
}

/// One named tensor of the flat buffer.
#[derive(Debug, Clone)]
pub struct TensorSlot {
    pub name: String,
    pub shape: Vec<usize>,
    pub offset: usize,
    /// Weight decay applies (false for norm weights and biases, as transformers' `get_decay_parameter_names`).
    pub decay: bool,
}

impl TensorSlot {
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn range(&self) -> std::ops::Range<usize> {
        self.offset..self.offset + self.len()
    }
}

/// The layout of all parameters of a decoder in one flat buffer, in Hugging Face names.
#[derive(Debug, Clone)]
pub struct ParamLayout {
    pub tensors: Vec<TensorSlot>,
    pub embed: usize,
    pub layers: Vec<LayerOffsets>,
    pub final_norm: usize,
    /// The lm_head matrix; equal to `embed` when the embeddings are tied.
    pub lm_head: usize,
    /// The buffer's length: the parameters, and the gaps a `Placement` left between them (none in `new`'s).
    pub total: usize,
    /// The number of parameters (the tensors' lengths summed).
    pub parameters: usize,
}

/// Where a layout puts its tensors. They come in stacks, in the layout's order: tensors that must lie adjacent
/// because one GEMM reads them as one matrix ([q|k|v], [gate|up], the q|k|v biases), else one tensor alone.
pub trait Placement {
    /// The offset of the stack's first tensor, given each tensor's name and length: anywhere no other tensor
    /// lies (before or after the stacks placed so far).
    fn place(&mut self, stack: &[(&str, usize)]) -> usize;
    /// The buffer's length once every stack is placed.
    fn end(&self) -> usize;
}

/// Tensors one after another with no gap: the layout of everything but frozen weights mapped from their files.
struct Packed(usize);

impl Placement for Packed {
    fn place(&mut self, stack: &[(&str, usize)]) -> usize {
        let offset = self.0;
        self.0 += stack.iter().map(|&(_, len)| len).sum::<usize>();
        offset
    }
    fn end(&self) -> usize {
        self.0
    }
}

/// Builds a layout's tensor list, stack by stack, where a `Placement` says.
struct Builder<'p> {
    tensors: Vec<TensorSlot>,
    placement: &'p mut dyn Placement,
}

impl Builder<'_> {
    /// Places the tensors `(name, shape, decay)` adjacent, in order; returns the first one's offset.
    fn stack(&mut self, parts: Vec<(String, Vec<usize>, bool)>) -> usize {
        let lens: Vec<(&str, usize)> = parts.iter().map(|(n, s, _)| (n.as_str(), s.iter().product())).collect();
        let first = self.placement.place(&lens);
        let mut offset = first;
        for (name, shape, decay) in parts {
            let slot = TensorSlot { name, shape, offset, decay };
            offset += slot.len();
            self.tensors.push(slot);
        }
        first
    }

    fn one(&mut self, name: String, shape: Vec<usize>, decay: bool) -> usize {
        self.stack(vec![(name, shape, decay)])
    }
}

impl ParamLayout {
    /// Every tensor right after the one before it.
    pub fn new(spec: &ModelSpec) -> Self {
        Self::placed(spec, &mut Packed(0))
    }

    /// The tensors in the same order, each stack where `placement` puts it.
    pub fn placed(spec: &ModelSpec, placement: &mut dyn Placement) -> Self {
        let mut b = Builder { tensors: Vec::new(), placement };
        let (h, i, q, kv) = (spec.hidden, spec.intermediate, spec.q_dim(), spec.kv_dim());
        let embed = b.one("model.embed_tokens.weight".into(), vec![spec.vocab_size, h], true);
        let mut layers = Vec::with_capacity(spec.layers);
        for l in 0..spec.layers {
            let p = format!("model.layers.{l}.");
            let input_norm = b.one(format!("{p}input_layernorm.weight"), vec![h], false);
            // The engine multiplies by the [q|k|v] and [gate|up] stacks in one GEMM each.
            let wq = b.stack(vec![
                (format!("{p}self_attn.q_proj.weight"), vec![q, h], true),
                (format!("{p}self_attn.k_proj.weight"), vec![kv, h], true),
                (format!("{p}self_attn.v_proj.weight"), vec![kv, h], true),
            ]);
            let qkv_bias = spec.qkv_bias.then(|| {
                b.stack(vec![
                    (format!("{p}self_attn.q_proj.bias"), vec![q], false),
                    (format!("{p}self_attn.k_proj.bias"), vec![kv], false),
                    (format!("{p}self_attn.v_proj.bias"), vec![kv], false),
                ])
            });
            let q_norm = spec.qk_norm.then(|| b.one(format!("{p}self_attn.q_norm.weight"), vec![spec.head_dim], false));
            let k_norm = spec.qk_norm.then(|| b.one(format!("{p}self_attn.k_norm.weight"), vec![spec.head_dim], false));
            let o = b.one(format!("{p}self_attn.o_proj.weight"), vec![h, q], true);
            let attn_out_norm = spec.sandwich_norms.then(|| b.one(format!("{p}post_attention_layernorm.weight"), vec![h], false));
            let post_norm = match spec.sandwich_norms {
                true => b.one(format!("{p}pre_feedforward_layernorm.weight"), vec![h], false),
                false => b.one(format!("{p}post_attention_layernorm.weight"), vec![h], false),
            };
            let mlp_out_norm = spec.sandwich_norms.then(|| b.one(format!("{p}post_feedforward_layernorm.weight"), vec![h], false));
            let gate = b.stack(vec![
                (format!("{p}mlp.gate_proj.weight"), vec![i, h], true),
                (format!("{p}mlp.up_proj.weight"), vec![i, h], true),
            ]);
            let down = b.one(format!("{p}mlp.down_proj.weight"), vec![h, i], true);
            layers.push(LayerOffsets {
                input_norm,
                q: wq,
                k: wq + q * h,
                v: wq + (q + kv) * h,
                qkv_bias,
                q_norm,
                k_norm,
                o,
                attn_out_norm,
                post_norm,
                mlp_out_norm,
                gate,
                up: gate + i * h,
                down,
            });
        }
        let final_norm = b.one("model.norm.weight".into(), vec![h], false);
        let lm_head =
            if spec.tied_embeddings { embed } else { b.one("lm_head.weight".into(), vec![spec.vocab_size, h], true) };
        let parameters = b.tensors.iter().map(TensorSlot::len).sum();
        let total = b.placement.end();
        // A placement may leave gaps and need not follow the layout's order; tensors must not overlap.
        let mut ranges: Vec<_> = b.tensors.iter().map(TensorSlot::range).collect();
        ranges.sort_by_key(|r| r.start);
        assert!(ranges.windows(2).all(|w| w[0].end <= w[1].start), "a placement put two tensors over each other");
        assert!(ranges.last().is_none_or(|r| r.end <= total), "a placement ended its buffer inside a tensor");
        ParamLayout { tensors: b.tensors, embed, layers, final_norm, lm_head, total, parameters }
    }
}

/// A decoder: its spec, layout and parameters.
#[derive(Debug, Clone)]
pub struct Model {
    pub spec: ModelSpec,
    pub layout: ParamLayout,
    /// The weights in `layout` order, held by the engine.
    pub params: crate::engine::Buffer,
    /// LoRA adapters: when present, they are what trains and the base parameters stay frozen.
    pub lora: Option<lora::Lora>,
}

impl Model {
    pub fn num_parameters(&self) -> usize {
        self.layout.parameters
    }

    /// A copy that never trains (the reference model): no adapters, and its weights in bf16 when they all are
    /// bf16 values (a bf16 checkpoint), which halves its memory and changes no number.
    pub fn frozen_copy(&self) -> Model {
        Model { spec: self.spec.clone(), layout: self.layout.clone(), params: self.params.frozen_copy(), lora: None }
    }

    /// Bytes the weights take in the dtype they are held in (not counting the gaps a mapped layout leaves: file
    /// bytes no tensor uses, and address space).
    pub fn weight_bytes(&self) -> usize {
        self.layout.parameters * self.params.value_bytes()
    }

    /// Adds the weights to `h`, tensor after tensor: the same fingerprint for the same values whatever gaps the
    /// layout leaves (a packed layout's is the whole buffer's).
    pub fn fingerprint_weights(&self, h: &mut crate::fingerprint::Fingerprint) {
        self.params.fingerprint_ranges(self.layout.tensors.iter().map(TensorSlot::range), h);
    }

    /// `frozen_copy`, consuming the model.
    pub fn frozen(self) -> Model {
        Model { params: self.params.frozen(), lora: None, ..self }
    }
}
