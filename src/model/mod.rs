//! The decoder's shape (read from a Hugging Face `config.json`) and its parameters as one flat buffer.
//!
//! Parameters live in a single `Vec<f32>` (llm.c style) so that gradients, optimizer state, clipping and saving
//! are loops over one slice. `ParamLayout` maps each Hugging Face tensor name to its range in that buffer.
pub mod weights;

use crate::error::{Error, Result};
use serde::Deserialize;
use std::path::Path;

/// The model families the engine runs. Each difference between families is a named field of `ModelSpec`.
pub const SUPPORTED_MODEL_TYPES: &[&str] = &["llama"];

#[derive(Debug, Deserialize)]
struct RopeParameters {
    rope_theta: Option<f64>,
    rope_type: Option<String>,
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
    rope_scaling: Option<serde_json::Value>,
    #[serde(default)]
    tie_word_embeddings: bool,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    mlp_bias: bool,
    hidden_act: Option<String>,
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
    pub rope_theta: f64,
    pub tied_embeddings: bool,
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
                return Err(format!("hidden_act {act:?} is not supported for llama (only \"silu\")"));
            }
        }
        if c.attention_bias || c.mlp_bias {
            return Err("attention_bias / mlp_bias are not supported yet".into());
        }
        let rope_type = c.rope_parameters.as_ref().and_then(|r| r.rope_type.clone());
        if rope_type.as_deref().is_some_and(|t| t != "default") || c.rope_scaling.as_ref().is_some_and(|v| !v.is_null()) {
            return Err("rope scaling is not supported yet (only rope_type \"default\")".into());
        }
        let rope_theta = c
            .rope_parameters
            .as_ref()
            .and_then(|r| r.rope_theta)
            .or(c.rope_theta)
            .unwrap_or(10000.0);
        let heads = c.num_attention_heads;
        let kv_heads = c.num_key_value_heads.unwrap_or(heads);
        if heads == 0 || kv_heads == 0 || heads % kv_heads != 0 {
            return Err(format!("num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"));
        }
        let head_dim = c.head_dim.unwrap_or(c.hidden_size / heads);
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(format!("head_dim {head_dim} must be even and positive"));
        }
        Ok(ModelSpec {
            vocab_size: c.vocab_size,
            hidden: c.hidden_size,
            intermediate: c.intermediate_size,
            layers: c.num_hidden_layers,
            heads,
            kv_heads,
            head_dim,
            rms_eps: c.rms_norm_eps as f32,
            rope_theta,
            tied_embeddings: c.tie_word_embeddings,
        })
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
            layers.push(LayerOffsets {
                input_norm: add(format!("{p}input_layernorm.weight"), vec![h], false),
                q: add(format!("{p}self_attn.q_proj.weight"), vec![q, h], true),
                k: add(format!("{p}self_attn.k_proj.weight"), vec![kv, h], true),
                v: add(format!("{p}self_attn.v_proj.weight"), vec![kv, h], true),
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
    pub params: Vec<f32>,
}

impl Model {
    pub fn num_parameters(&self) -> usize {
        self.layout.total
    }
}
