//! LoRA adapters (PEFT's layout and names) on the decoder's linear layers: `y = x·Wᵀ + (α/r)·(x·Aᵀ)·Bᵀ`, with the
//! base weights frozen and only A and B trained. Saved and loaded as PEFT does (`adapter_config.json` +
//! `adapter_model.safetensors`), and mergeable into the base weights.
use super::{LayerOffsets, Model, ModelSpec, TensorSlot};
use crate::error::{Error, Result};
use crate::files::write_atomic;
use safetensors::Dtype;
use std::collections::HashMap;
use std::path::Path;

/// The linear layers an adapter can sit on, by PEFT's module names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Target {
    pub const ALL: [Target; 7] = [Target::Q, Target::K, Target::V, Target::O, Target::Gate, Target::Up, Target::Down];

    pub fn name(self) -> &'static str {
        match self {
            Target::Q => "q_proj",
            Target::K => "k_proj",
            Target::V => "v_proj",
            Target::O => "o_proj",
            Target::Gate => "gate_proj",
            Target::Up => "up_proj",
            Target::Down => "down_proj",
        }
    }

    fn path(self) -> &'static str {
        match self {
            Target::Q | Target::K | Target::V | Target::O => "self_attn",
            _ => "mlp",
        }
    }

    pub fn parse(name: &str) -> Option<Target> {
        Target::ALL.into_iter().find(|t| t.name() == name)
    }

    /// (input width, output width, first output column inside the fused GEMM the layer belongs to).
    pub fn geometry(self, s: &ModelSpec) -> (usize, usize, usize) {
        let (h, q, kv, i) = (s.hidden, s.q_dim(), s.kv_dim(), s.intermediate);
        match self {
            Target::Q => (h, q, 0),
            Target::K => (h, kv, q),
            Target::V => (h, kv, q + kv),
            Target::O => (q, h, 0),
            Target::Gate => (h, i, 0),
            Target::Up => (h, i, i),
            Target::Down => (i, h, 0),
        }
    }

    /// The base weight of this layer in the flat parameter buffer.
    fn base_offset(self, lo: &LayerOffsets) -> usize {
        match self {
            Target::Q => lo.q,
            Target::K => lo.k,
            Target::V => lo.v,
            Target::O => lo.o,
            Target::Gate => lo.gate,
            Target::Up => lo.up,
            Target::Down => lo.down,
        }
    }
}

/// PEFT's default targets for the families here (`q_proj`, `v_proj`).
pub const DEFAULT_TARGETS: [Target; 2] = [Target::Q, Target::V];

/// One adapter: where its A `[r, in]` and B `[out, r]` sit in the adapter buffer.
#[derive(Debug, Clone)]
pub struct LoraModule {
    pub target: Target,
    pub a: usize,
    pub b: usize,
    pub in_dim: usize,
    pub out_dim: usize,
    /// First output column inside the fused q|k|v or gate|up product.
    pub out_col: usize,
}

#[derive(Debug, Clone)]
pub struct Lora {
    pub r: usize,
    pub alpha: f64,
    pub targets: Vec<Target>,
    /// Per layer, its adapters.
    pub layers: Vec<Vec<LoraModule>>,
    /// Every A and B as PEFT names them, for saving and the optimizer.
    pub tensors: Vec<TensorSlot>,
    pub params: crate::engine::Buffer,
}

impl Lora {
    /// New adapters as PEFT initialises them: A ~ U(−1/√in, 1/√in) (kaiming-uniform with a = √5), B = 0, so
    /// the adapted model starts equal to the base.
    pub fn new(spec: &ModelSpec, r: usize, alpha: f64, targets: &[Target], seed: u64) -> Lora {
        let mut tensors = Vec::new();
        let mut layers = Vec::new();
        let mut total = 0usize;
        for l in 0..spec.layers {
            let mut modules = Vec::new();
            for &t in Target::ALL.iter().filter(|t| targets.contains(t)) {
                let (in_dim, out_dim, out_col) = t.geometry(spec);
                let prefix = format!("base_model.model.model.layers.{l}.{}.{}", t.path(), t.name());
                let a = total;
                tensors.push(TensorSlot { name: format!("{prefix}.lora_A.weight"), shape: vec![r, in_dim], offset: a, decay: true });
                total += r * in_dim;
                let b = total;
                tensors.push(TensorSlot { name: format!("{prefix}.lora_B.weight"), shape: vec![out_dim, r], offset: b, decay: true });
                total += out_dim * r;
                modules.push(LoraModule { target: t, a, b, in_dim, out_dim, out_col });
            }
            layers.push(modules);
        }
        let mut params = vec![0f32; total];
        // Deterministic and dependency-free; PEFT's exact draws would need torch's generator.
        let mut rng = crate::rng::Rng::from_state(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        for m in layers.iter().flatten() {
            let bound = 1.0 / (m.in_dim as f64).sqrt();
            for v in &mut params[m.a..m.a + r * m.in_dim] {
                *v = ((2.0 * rng.uniform() - 1.0) * bound) as f32;
            }
        }
        Lora { r, alpha, targets: targets.to_vec(), layers, tensors, params: crate::engine::Buffer::from_host(params) }
    }

    /// `α / r`, the factor on the adapter's output.
    pub fn scale(&self) -> f32 {
        (self.alpha / self.r as f64) as f32
    }

    pub fn num_parameters(&self) -> usize {
        self.params.len()
    }

    /// Writes `adapter_config.json` and `adapter_model.safetensors` as PEFT saves a LoRA adapter.
    pub fn save_peft(&self, dir: &Path, base_model: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::file(dir, format!("cannot create folder: {e}")))?;
        let params = self.params.to_host();
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = self
            .tensors
            .iter()
            .map(|t| {
                let bytes = super::weights::f32_slice_as_bytes(&params[t.range()]);
                let view = safetensors::tensor::TensorView::new(Dtype::F32, t.shape.clone(), bytes)
                    .map_err(|e| Error::Train(format!("tensor {}: {e}", t.name)))?;
                Ok((t.name.clone(), view))
            })
            .collect::<Result<_>>()?;
        let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
        crate::files::write_safetensors(&dir.join("adapter_model.safetensors"), views, Some(metadata))?;
        let config = serde_json::json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model.display().to_string(),
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": 0.0,
            "target_modules": self.targets.iter().map(|t| t.name()).collect::<Vec<_>>(),
            "bias": "none",
            "fan_in_fan_out": false,
            "use_rslora": false,
            "use_dora": false,
            "inference_mode": true,
            "init_lora_weights": true,
            "modules_to_save": null,
        });
        let text = serde_json::to_string_pretty(&config).map_err(|e| Error::Train(e.to_string()))? + "\n";
        write_atomic(&dir.join("adapter_config.json"), text.as_bytes())
    }

    /// Loads a PEFT LoRA adapter folder for a model of `spec`.
    pub fn load_peft(dir: &Path, spec: &ModelSpec) -> Result<Lora> {
        let cfg_path = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::file(&cfg_path, e))?;
        let cfg: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::file(&cfg_path, format!("invalid JSON: {e}")))?;
        let bad = |m: &str| Error::file(&cfg_path, m);
        if cfg.get("peft_type").and_then(|v| v.as_str()) != Some("LORA") {
            return Err(bad("peft_type must be \"LORA\""));
        }
        let r = cfg.get("r").and_then(|v| v.as_u64()).ok_or_else(|| bad("no integer \"r\""))? as usize;
        let alpha = cfg.get("lora_alpha").and_then(|v| v.as_f64()).ok_or_else(|| bad("no \"lora_alpha\""))?;
        if cfg.get("use_rslora").and_then(|v| v.as_bool()) == Some(true) || cfg.get("use_dora").and_then(|v| v.as_bool()) == Some(true) {
            return Err(bad("rsLoRA and DoRA adapters are not supported"));
        }
        let names: Vec<String> = match cfg.get("target_modules") {
            Some(serde_json::Value::Array(a)) => a.iter().filter_map(|v| v.as_str().map(String::from)).collect(),
            Some(serde_json::Value::String(s)) => vec![s.clone()],
            _ => return Err(bad("no \"target_modules\" list")),
        };
        let targets = parse_targets(&names).map_err(|m| bad(&m))?;
        let mut lora = Lora::new(spec, r, alpha, &targets, 0);
        let path = dir.join("adapter_model.safetensors");
        let bytes = std::fs::read(&path).map_err(|e| Error::file(&path, e))?;
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| Error::file(&path, format!("invalid safetensors: {e}")))?;
        let mut values = vec![0f32; lora.params.len()];
        for t in &lora.tensors {
            // PEFT saves without the adapter name; some writers keep ".default".
            let view = st
                .tensor(&t.name)
                .or_else(|_| st.tensor(&t.name.replace(".weight", ".default.weight")))
                .map_err(|_| Error::file(&path, format!("tensor {} is missing", t.name)))?;
            if view.shape() != t.shape.as_slice() {
                return Err(Error::file(&path, format!("tensor {} has shape {:?}, expected {:?}", t.name, view.shape(), t.shape)));
            }
            let dst = &mut values[t.range()];
            super::weights::convert_to_f32(&path, &t.name, view.dtype(), view.data(), dst)?;
        }
        lora.params.upload(&values);
        Ok(lora)
    }
}

/// PEFT module names to targets; `"all-linear"` means every linear layer but the lm_head.
pub fn parse_targets(names: &[String]) -> std::result::Result<Vec<Target>, String> {
    if names.len() == 1 && names[0] == "all-linear" {
        return Ok(Target::ALL.to_vec());
    }
    names
        .iter()
        .map(|n| {
            Target::parse(n).ok_or_else(|| {
                format!(
                    "target module {n:?} is not supported; use any of {} or \"all-linear\"",
                    Target::ALL.map(|t| t.name()).join(", ")
                )
            })
        })
        .collect()
}

impl Model {
    /// Folds the adapters into the base weights (`W += (α/r)·B·A`) and drops them.
    pub fn merge_lora(&mut self) {
        let Some(lora) = self.lora.take() else { return };
        let s = lora.scale();
        let adapters = lora.params.to_host();
        self.params.with_host_mut(|params| {
        for (lo, modules) in self.layout.layers.iter().zip(&lora.layers) {
            for m in modules {
                let w = &mut params[m.target.base_offset(lo)..][..m.out_dim * m.in_dim];
                let (a, b) = (&adapters[m.a..][..lora.r * m.in_dim], &adapters[m.b..][..m.out_dim * lora.r]);
                for o in 0..m.out_dim {
                    for k in 0..lora.r {
                        let bk = s * b[o * lora.r + k];
                        if bk != 0.0 {
                            w[o * m.in_dim..(o + 1) * m.in_dim].iter_mut().zip(&a[k * m.in_dim..(k + 1) * m.in_dim]).for_each(|(w, a)| *w += bk * a);
                        }
                    }
                }
            }
        }
        });
    }
}
