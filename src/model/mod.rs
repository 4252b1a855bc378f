//! The decoder's shape (read from a Hugging Face `config.json`) and its parameters as one flat buffer.
//!
//! Parameters live in a single `Vec<f32>` (llm.c style) so that gradients, optimizer state, clipping and saving
//! are loops over one slice. `ParamLayout` maps each Hugging Face tensor name to its range in that buffer.
pub mod lora;
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
pub const SUPPORTED_MODEL_TYPES: &[&str] = &["llama", "mistral", "qwen2", "qwen3"];

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

/// The subset of `config.json` the engine reads. Unknown keys are ignored, as transformers does.
#[derive(Debug, Deserialize)]
struct HfConfig {
    model_type: Option<String>,
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
    rope_parameters: Option<RopeParameters>,
    rope_scaling: Option<RopeParameters>,
    #[serde(default)]
    tie_word_embeddings: bool,
    attention_bias: Option<bool>,
    #[serde(default)]
    mlp_bias: bool,
    hidden_act: Option<String>,
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
    max_window_layers: Option<usize>,
    layer_types: Option<Vec<String>>,
    pad_token_id: Option<Value>,
}

fn default_rms_eps() -> f64 {
    1e-6
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
}

impl ModelSpec {
    /// Reads `config.json` of a model folder and checks that the engine supports it.
    pub fn from_folder(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| Error::file(&path, e))?;
        Self::from_config_json(&text).map_err(|msg| Error::model(&path, msg))
    }

    pub fn from_config_json(text: &str) -> std::result::Result<Self, String> {
        let c: HfConfig = serde_json::from_str(text).map_err(|e| format!("invalid config.json: {e}"))?;
        let model_type = c.model_type.clone().unwrap_or_default();
        if !SUPPORTED_MODEL_TYPES.contains(&model_type.as_str()) {
            return Err(format!(
                "model_type {model_type:?} is not supported; supported: {}",
                SUPPORTED_MODEL_TYPES.join(", ")
            ));
        }
        if let Some(act) = &c.hidden_act {
            if act != "silu" {
                return Err(format!("hidden_act {act:?} is not supported for {model_type} (only \"silu\")"));
            }
        }
        if c.mlp_bias {
            return Err("mlp_bias is not supported".into());
        }
        let rope_cfg = c.rope_parameters.as_ref().or(c.rope_scaling.as_ref());
        let theta = rope_cfg.and_then(|r| r.rope_theta).or(c.rope_theta).unwrap_or(10000.0);
        let need = |v: Option<f64>, name: &str| v.ok_or_else(|| format!("rope scaling needs {name}"));
        let scaling = match rope_cfg.and_then(|r| r.rope_type.as_deref()).unwrap_or("default") {
            "default" => RopeScaling::Default,
            "linear" => RopeScaling::Linear { factor: need(rope_cfg.and_then(|r| r.factor), "factor")? },
            "llama3" => {
                let r = rope_cfg.expect("a rope_type implies rope parameters");
                RopeScaling::Llama3 {
                    factor: need(r.factor, "factor")?,
                    low_freq_factor: need(r.low_freq_factor, "low_freq_factor")?,
                    high_freq_factor: need(r.high_freq_factor, "high_freq_factor")?,
                    original_max_position_embeddings: need(r.original_max_position_embeddings, "original_max_position_embeddings")?,
                }
            }
            other => return Err(format!("rope_type {other:?} is not supported; supported: default, linear, llama3")),
        };
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
            rope: RopeSpec { theta, scaling },
            tied_embeddings: c.tie_word_embeddings,
            qkv_bias: model_type == "qwen2" || c.attention_bias == Some(true),
            qk_norm: model_type == "qwen3",
            layer_windows: Vec::new(),
            padding_idx: c.pad_token_id.as_ref().and_then(Value::as_u64).and_then(|id| u32::try_from(id).ok()),
        };
        if !(spec.rope.theta > 0.0 && spec.rope.theta.is_finite()) {
            return Err(format!("rope_theta must be positive, got {}", spec.rope.theta));
        }
        if !(c.rms_norm_eps >= 0.0 && c.rms_norm_eps.is_finite()) {
            return Err(format!("rms_norm_eps must be a non-negative number, got {}", c.rms_norm_eps));
        }
        spec.check_dims()?;
        // Sliding windows: explicit layer_types win; Mistral slides everywhere when sliding_window is set; Qwen
        // slides only with use_sliding_window, from max_window_layers on (transformers' defaults).
        let window = match model_type.as_str() {
            "qwen2" | "qwen3" if c.use_sliding_window != Some(true) => None,
            _ => c.sliding_window,
        };
        spec.layer_windows = match (&c.layer_types, window) {
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
        let norms = 2 * h + if self.qk_norm { 2 * self.head_dim } else { 0 };
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
    pub post_norm: usize,
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
    pub total: usize,
}

impl ParamLayout {
    pub fn new(spec: &ModelSpec) -> Self {
        let mut tensors = Vec::new();
        let mut total = 0usize;
        let mut add = |name: String, shape: Vec<usize>, decay: bool| -> usize {
            let offset = total;
            total += shape.iter().product::<usize>();
            tensors.push(TensorSlot { name, shape, offset, decay });
            offset
        };
        let (h, i, q, kv) = (spec.hidden, spec.intermediate, spec.q_dim(), spec.kv_dim());
        let embed = add("model.embed_tokens.weight".into(), vec![spec.vocab_size, h], true);
        let mut layers = Vec::with_capacity(spec.layers);
        for l in 0..spec.layers {
            let p = format!("model.layers.{l}.");
            let input_norm = add(format!("{p}input_layernorm.weight"), vec![h], false);
            let (wq, wk, wv) = (
                add(format!("{p}self_attn.q_proj.weight"), vec![q, h], true),
                add(format!("{p}self_attn.k_proj.weight"), vec![kv, h], true),
                add(format!("{p}self_attn.v_proj.weight"), vec![kv, h], true),
            );
            let qkv_bias = spec.qkv_bias.then(|| {
                let b = add(format!("{p}self_attn.q_proj.bias"), vec![q], false);
                add(format!("{p}self_attn.k_proj.bias"), vec![kv], false);
                add(format!("{p}self_attn.v_proj.bias"), vec![kv], false);
                b
            });
            let q_norm = spec.qk_norm.then(|| add(format!("{p}self_attn.q_norm.weight"), vec![spec.head_dim], false));
            let k_norm = spec.qk_norm.then(|| add(format!("{p}self_attn.k_norm.weight"), vec![spec.head_dim], false));
            layers.push(LayerOffsets {
                input_norm,
                q: wq,
                k: wk,
                v: wv,
                qkv_bias,
                q_norm,
                k_norm,
                o: add(format!("{p}self_attn.o_proj.weight"), vec![h, q], true),
                post_norm: add(format!("{p}post_attention_layernorm.weight"), vec![h], false),
                gate: add(format!("{p}mlp.gate_proj.weight"), vec![i, h], true),
                up: add(format!("{p}mlp.up_proj.weight"), vec![i, h], true),
                down: add(format!("{p}mlp.down_proj.weight"), vec![h, i], true),
            });
        }
        // The engine multiplies by the [q|k|v] and [gate|up] stacks in one GEMM each, so they must be adjacent.
        for lo in &layers {
            assert!(lo.k == lo.q + q * h && lo.v == lo.k + kv * h && lo.up == lo.gate + i * h);
        }
        let final_norm = add("model.norm.weight".into(), vec![h], false);
        let lm_head =
            if spec.tied_embeddings { embed } else { add("lm_head.weight".into(), vec![spec.vocab_size, h], true) };
        ParamLayout { tensors, embed, layers, final_norm, lm_head, total }
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
        self.layout.total
    }

    /// A copy that never trains (the reference model): no adapters, and its weights in bf16 when they all are
    /// bf16 values (a bf16 checkpoint), which halves its memory and changes no number.
    pub fn frozen_copy(&self) -> Model {
        Model { spec: self.spec.clone(), layout: self.layout.clone(), params: self.params.frozen_copy(), lora: None }
    }

    /// `frozen_copy`, consuming the model.
    pub fn frozen(self) -> Model {
        Model { params: self.params.frozen(), lora: None, ..self }
    }
}
