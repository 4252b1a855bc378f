//! Loading a Hugging Face model folder into a `Model`, and writing one back so transformers loads it.
use super::{Model, ModelSpec, ParamLayout};
use crate::error::{Error, Result};
use crate::files::write_atomic;
use safetensors::{Dtype, SafeTensors};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The safetensors files of a folder: `model.safetensors`, or the shards named by `model.safetensors.index.json`.
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let text = std::fs::read_to_string(&index).map_err(|e| Error::file(&index, e))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::file(&index, format!("invalid JSON: {e}")))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::file(&index, "no \"weight_map\" object"))?;
        let mut files: Vec<PathBuf> = Vec::new();
        for shard in map.values() {
            let shard = shard.as_str().ok_or_else(|| Error::file(&index, "weight_map values must be file names"))?;
            let p = dir.join(shard);
            if !files.contains(&p) {
                files.push(p);
            }
        }
        return Ok(files);
    }
    Err(Error::model(dir, "no model.safetensors or model.safetensors.index.json in the folder"))
}

/// How many values the tensors of a safetensors file hold, from its header alone (8 bytes of length, then JSON).
fn stored_elements(file: &Path) -> Result<usize> {
    use std::io::Read;
    let bad = |msg: String| Error::model(file, format!("invalid safetensors file: {msg}"));
    let mut f = std::fs::File::open(file).map_err(|e| Error::file(file, e))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(|e| bad(format!("no header ({e})")))?;
    let len = u64::from_le_bytes(len);
    let size = f.metadata().map_err(|e| Error::file(file, e))?.len();
    if len > size.saturating_sub(8) || len > 100 << 20 {
        return Err(bad(format!("header of {len} bytes in a file of {size}")));
    }
    let mut header = vec![0u8; len as usize];
    f.read_exact(&mut header).map_err(|e| bad(e.to_string()))?;
    let header: HashMap<String, serde_json::Value> = serde_json::from_slice(&header).map_err(|e| bad(e.to_string()))?;
    let mut total = 0usize;
    for (name, info) in header.iter().filter(|(k, _)| k.as_str() != "__metadata__") {
        let shape = info.get("shape").and_then(|s| s.as_array()).ok_or_else(|| bad(format!("tensor {name} has no shape")))?;
        let n = shape.iter().try_fold(1usize, |acc, d| d.as_u64().and_then(|d| acc.checked_mul(d as usize)));
        total = total.saturating_add(n.ok_or_else(|| bad(format!("tensor {name} has an invalid shape")))?);
    }
    Ok(total)
}

/// Converts one stored tensor to f32 into `dst`.
pub(crate) fn convert_to_f32(file: &Path, name: &str, dtype: Dtype, data: &[u8], dst: &mut [f32]) -> Result<()> {
    let width = match dtype {
        Dtype::F32 => 4,
        Dtype::BF16 | Dtype::F16 => 2,
        other => return Err(Error::model(file, format!("tensor {name}: dtype {other:?} is not supported (f32, bf16, f16)"))),
    };
    if data.len() != dst.len() * width {
        return Err(Error::model(file, format!("tensor {name}: {} bytes for {} elements", data.len(), dst.len())));
    }
    for (d, chunk) in dst.iter_mut().zip(data.chunks_exact(width)) {
        *d = match dtype {
            Dtype::F32 => f32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]),
            Dtype::BF16 => half::bf16::from_le_bytes([chunk[0], chunk[1]]).to_f32(),
            _ => half::f16::from_le_bytes([chunk[0], chunk[1]]).to_f32(),
        };
    }
    Ok(())
}

impl Model {
    /// Loads `config.json` and the safetensors weights of a Hugging Face model folder; computes in f32.
    pub fn load(dir: &Path) -> Result<Model> {
        if !dir.is_dir() {
            return Err(Error::model(dir, "not a folder"));
        }
        let spec = ModelSpec::from_folder(dir)?;
        let files = weight_files(dir)?;
        // Before anything of the config's size is allocated: the files must hold at least that many values.
        let mut stored = 0usize;
        for file in &files {
            stored = stored.saturating_add(stored_elements(file)?);
        }
        let wanted = spec.parameter_count().unwrap_or(usize::MAX);
        if wanted > stored {
            return Err(Error::model(
                dir,
                format!("config.json implies {wanted} parameters but the safetensors files hold {stored} values"),
            ));
        }
        let layout = ParamLayout::new(&spec);
        let mut params = crate::engine::cpu::memory::zeroed(layout.total);
        let mut found = vec![false; layout.tensors.len()];
        let by_name: HashMap<&str, usize> =
            layout.tensors.iter().enumerate().map(|(i, t)| (t.name.as_str(), i)).collect();
        for file in files {
            let bytes = std::fs::read(&file).map_err(|e| Error::file(&file, e))?;
            let st = SafeTensors::deserialize(&bytes)
                .map_err(|e| Error::model(&file, format!("invalid safetensors file: {e}")))?;
            for (name, view) in st.tensors() {
                // Tied checkpoints sometimes carry lm_head.weight anyway; the embedding is the one used.
                let Some(&i) = by_name.get(name.as_str()) else {
                    if name == "lm_head.weight" && spec.tied_embeddings {
                        continue;
                    }
                    if name.ends_with("rotary_emb.inv_freq") {
                        continue;
                    }
                    return Err(Error::model(&file, format!("unexpected tensor {name} for this architecture")));
                };
                let slot = &layout.tensors[i];
                if view.shape() != slot.shape.as_slice() {
                    return Err(Error::model(
                        &file,
                        format!("tensor {name} has shape {:?}, config.json implies {:?}", view.shape(), slot.shape),
                    ));
                }
                let dst = &mut params[slot.range()];
                convert_to_f32(&file, &name, view.dtype(), view.data(), dst)?;
                if let Some(bad) = dst.iter().find(|v| !v.is_finite()) {
                    return Err(Error::model(&file, format!("tensor {name} holds a non-finite value ({bad})")));
                }
                found[i] = true;
            }
        }
        if let Some(i) = found.iter().position(|f| !f) {
            return Err(Error::model(dir, format!("tensor {} is missing from the weights", layout.tensors[i].name)));
        }
        Ok(Model { spec, layout, params: crate::engine::Buffer::from_host(params), lora: None })
    }

    /// Writes the weights as a safetensors file in f32 with `{"format": "pt"}` metadata, as `save_pretrained`
    /// writes them.
    pub fn write_safetensors(&self, path: &Path) -> Result<()> {
        let params = self.params.to_host();
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = self
            .layout
            .tensors
            .iter()
            .map(|t| {
                let data: &[f32] = &params[t.range()];
                let bytes = f32_slice_as_bytes(data);
                let view = safetensors::tensor::TensorView::new(Dtype::F32, t.shape.clone(), bytes)
                    .map_err(|e| Error::Train(format!("tensor {}: {e}", t.name)))?;
                Ok((t.name.clone(), view))
            })
            .collect::<Result<_>>()?;
        let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
        crate::files::write_safetensors(path, views, Some(metadata))
    }

    /// Writes a Hugging Face folder: `model.safetensors`, `config.json` (from `source_dir`, dtype set to float32),
    /// and the other small files (generation config, tokenizer files) copied from `source_dir` and `tokenizer_dir`.
    /// Every file is written atomically.
    pub fn save_pretrained(&self, out: &Path, source_dir: &Path, tokenizer_dir: &Path) -> Result<()> {
        std::fs::create_dir_all(out).map_err(|e| Error::file(out, format!("cannot create folder: {e}")))?;
        self.write_safetensors(&out.join("model.safetensors"))?;
        let cfg_path = source_dir.join("config.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::file(&cfg_path, e))?;
        let mut cfg: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::file(&cfg_path, format!("invalid JSON: {e}")))?;
        if let Some(obj) = cfg.as_object_mut() {
            obj.insert("dtype".into(), "float32".into());
            if obj.contains_key("torch_dtype") {
                obj.insert("torch_dtype".into(), "float32".into());
            }
        }
        let cfg_text = serde_json::to_string_pretty(&cfg).map_err(|e| Error::Train(e.to_string()))? + "\n";
        write_atomic(&out.join("config.json"), cfg_text.as_bytes())?;
        copy_files(source_dir, out, &["generation_config.json"])?;
        copy_tokenizer_files(tokenizer_dir, out)
    }
}

/// Copies the tokenizer files that exist in `from` to `to`, each atomically.
pub fn copy_tokenizer_files(from: &Path, to: &Path) -> Result<()> {
    copy_files(from, to, &["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"])
}

fn copy_files(from: &Path, to: &Path, names: &[&str]) -> Result<()> {
    for name in names {
        let src = from.join(name);
        if src.is_file() {
            let bytes = std::fs::read(&src).map_err(|e| Error::file(&src, e))?;
            write_atomic(&to.join(name), &bytes)?;
        }
    }
    Ok(())
}

/// The bytes of `data` as they lie in memory, without a copy (bytemuck checks the cast is sound).
pub(crate) fn f32_slice_as_bytes(data: &[f32]) -> &[u8] {
    // safetensors is little-endian, as are the targets we build for.
    #[cfg(not(target_endian = "little"))]
    compile_error!("kto writes safetensors by reinterpreting f32 memory, which needs a little-endian target");
    bytemuck::cast_slice(data)
}
