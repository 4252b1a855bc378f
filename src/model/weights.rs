//! Loading a Hugging Face model folder into a `Model`, and writing one back so transformers loads it. Weights that
//! train are converted into fresh memory; frozen ones stay where their files' pages lie when they can
//! (`mapped_weights`).
use super::{Model, ModelSpec, ParamLayout};
use crate::engine::cpu::weights::Widen;
use crate::engine::Buffer;
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

/// Converts one stored tensor to f32 into `dst`.
pub(crate) fn convert_to_f32(file: &Path, name: &str, dtype: Dtype, data: &[u8], dst: &mut [f32]) -> Result<()> {
    if !matches!(dtype, Dtype::F32 | Dtype::BF16 | Dtype::F16) {
        return Err(Error::model(file, format!("tensor {name}: dtype {dtype:?} is not supported (f32, bf16, f16)")));
    }
    if data.len() != dst.len() * stored_width(dtype) {
        return Err(Error::model(file, format!("tensor {name}: {} bytes for {} elements", data.len(), dst.len())));
    }
    widen_into(dtype, data, dst);
    Ok(())
}

/// Bytes a value of a supported dtype (f32, bf16, f16) takes.
fn stored_width(dtype: Dtype) -> usize {
    if dtype == Dtype::F32 {
        4
    } else {
        2
    }
}

/// `data` (values of `dtype`, little-endian, as many as `dst` holds) in f32.
fn widen_into(dtype: Dtype, data: &[u8], dst: &mut [f32]) {
    let width = stored_width(dtype);
    for (d, chunk) in dst.iter_mut().zip(data.chunks_exact(width)) {
        *d = match dtype {
            Dtype::F32 => f32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]),
            Dtype::BF16 => half::bf16::from_le_bytes([chunk[0], chunk[1]]).to_f32(),
            _ => half::f16::from_le_bytes([chunk[0], chunk[1]]).to_f32(),
        };
    }
}

/// A safetensors file mapped into memory: its tensors are read from the page cache where they lie, with no
/// copy of the file in between. The file stays open: frozen weights may keep its pages (`mapped_weights`).
fn map_file(file: &Path) -> Result<(std::fs::File, memmap2::Mmap)> {
    let f = std::fs::File::open(file).map_err(|e| Error::file(file, e))?;
    let mut options = memmap2::MmapOptions::new();
    #[cfg(target_os = "linux")]
    options.populate(); // one fault-in of the whole file instead of a fault per page
    // SAFETY: the map is read-only and lives only while the model loads; a file changed underneath gives wrong
    // values (then rejected or trained on), not undefined behaviour of ours beyond what reading it would give.
    let map = unsafe { options.map(&f) }.map_err(|e| Error::file(file, format!("cannot map: {e}")))?;
    Ok((f, map))
}

/// One stored tensor and the parameter slot it fills.
pub(super) struct Stored<'a> {
    pub file: &'a Path,
    /// Which of the checkpoint's files holds it, and where its bytes start in that file.
    pub file_index: usize,
    pub file_offset: usize,
    pub name: String,
    pub view: safetensors::tensor::TensorView<'a>,
    pub slot: usize,
}

/// Values converted at a time by one thread: a large tensor (the embedding) is split over the cores.
const CONVERT_CHUNK: usize = 1 << 20;

/// A dtype the engine holds weights in: f32, or bf16 as its bits (frozen weights that are all bf16 values).
pub(super) trait Held: Widen + bytemuck::Pod {
    /// The stored dtype whose bytes are already this type's values.
    const STORED: Dtype;
    /// The engine's buffer of these values.
    fn into_buffer(values: Vec<Self>) -> Buffer;
    /// Writes a stored tensor's values (`bytes` of `dtype`, as many as `dst` holds) into `dst`.
    fn convert(dtype: Dtype, bytes: &[u8], dst: &mut [Self]);
    fn all_finite(values: &[Self]) -> bool;
}

impl Held for f32 {
    const STORED: Dtype = Dtype::F32;
    fn into_buffer(values: Vec<f32>) -> Buffer {
        Buffer::from_host(values)
    }
    fn convert(dtype: Dtype, bytes: &[u8], dst: &mut [f32]) {
        widen_into(dtype, bytes, dst)
    }
    fn all_finite(values: &[f32]) -> bool {
        values.iter().all(|v| v.is_finite())
    }
}

impl Held for u16 {
    const STORED: Dtype = Dtype::BF16;
    fn into_buffer(values: Vec<u16>) -> Buffer {
        Buffer::from_bf16_bits(values)
    }
    /// Only for tensors that `holds_bf16_values`.
    fn convert(dtype: Dtype, bytes: &[u8], dst: &mut [u16]) {
        match dtype {
            Dtype::BF16 => dst.iter_mut().zip(bytes.chunks_exact(2)).for_each(|(d, b)| *d = u16::from_le_bytes([b[0], b[1]])),
            // An f32 whose low half is zero: its high half is the same value in bf16.
            _ => dst.iter_mut().zip(bytes.chunks_exact(4)).for_each(|(d, b)| *d = u16::from_le_bytes([b[2], b[3]])),
        }
    }
    fn all_finite(values: &[u16]) -> bool {
        // bf16 is finite unless its exponent bits are all ones.
        values.iter().all(|b| b & 0x7F80 != 0x7F80)
    }
}

/// Where a stored tensor's values go: written there from its stored bytes, or already there (its file's pages
/// mapped in place), to be checked only.
pub(super) enum Slot<'a, T> {
    Write(&'a mut [T]),
    InPlace(&'a [T]),
}

/// The tensors of a packed layout (`ParamLayout::new`: one after another) as slices of `params` to write.
fn packed_slots<'a, T>(params: &'a mut [T], layout: &ParamLayout) -> Vec<Option<Slot<'a, T>>> {
    let mut rest = params;
    let mut slots = Vec::with_capacity(layout.tensors.len());
    for t in &layout.tensors {
        let (head, tail) = std::mem::take(&mut rest).split_at_mut(t.len());
        slots.push(Some(Slot::Write(head)));
        rest = tail;
    }
    slots
}

/// Fills the slots (one a tensor of `layout`, the layout of the model in `dir`) from `stored`, the tensors in
/// parallel, and checks every value is finite.
pub(super) fn fill<T: Held>(dir: &Path, mut slots: Vec<Option<Slot<T>>>, layout: &ParamLayout, stored: &[Stored]) -> Result<()> {
    use rayon::prelude::*;
    let mut work = Vec::with_capacity(stored.len());
    for s in stored {
        let slot = slots[s.slot].take().ok_or_else(|| Error::model(s.file, format!("tensor {} is stored twice", s.name)))?;
        let (len, w) = (layout.tensors[s.slot].len(), stored_width(s.view.dtype()));
        if s.view.data().len() != len * w {
            return Err(Error::model(s.file, format!("tensor {}: {} bytes for {} elements", s.name, s.view.data().len(), len)));
        }
        let bytes = s.view.data().chunks(CONVERT_CHUNK * w);
        match slot {
            Slot::Write(dst) => work.extend(dst.chunks_mut(CONVERT_CHUNK).zip(bytes).map(|(d, b)| (s, Slot::Write(d), b))),
            Slot::InPlace(dst) => work.extend(dst.chunks(CONVERT_CHUNK).zip(bytes).map(|(d, b)| (s, Slot::InPlace(d), b))),
        }
    }
    if let Some(i) = slots.iter().position(|s| s.is_some()) {
        return Err(Error::model(dir, format!("tensor {} is missing from the weights", layout.tensors[i].name)));
    }
    work.into_par_iter().try_for_each(|(s, slot, bytes)| {
        let finite = match slot {
            Slot::Write(dst) => {
                T::convert(s.view.dtype(), bytes, dst);
                T::all_finite(dst)
            }
            Slot::InPlace(values) => T::all_finite(values),
        };
        if finite {
            Ok(())
        } else {
            Err(Error::model(s.file, format!("tensor {} holds a non-finite value", s.name)))
        }
    })
}

/// Whether every value of a stored tensor is exactly a bf16 value: stored as bf16, or as f32 with the low 16 bits
/// of each value zero (f16 values mostly are not).
fn holds_bf16_values(s: &Stored) -> bool {
    use rayon::prelude::*;
    match s.view.dtype() {
        Dtype::BF16 => true,
        Dtype::F32 => s.view.data().par_chunks(4 * CONVERT_CHUNK).all(|c| c.chunks(1 << 16).all(low_halves_zero)),
        _ => false,
    }
}

/// Whether the little-endian f32 values in `bytes` all have a zero low half: an OR over two values per word (a
/// loop the compiler vectorises), one test at the end.
fn low_halves_zero(bytes: &[u8]) -> bool {
    let words = bytes.chunks_exact(8);
    let tail = words.remainder().chunks_exact(4).fold(0u32, |acc, b| acc | u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    let all = words.fold(0u64, |acc, w| acc | u64::from_le_bytes(w.try_into().expect("8 bytes")));
    all & 0x0000_FFFF_0000_FFFF == 0 && tail & 0xFFFF == 0
}

/// The values of `stored` held as `T`: frozen ones on Linux in a region where the files' pages are mapped where
/// they can be (`mapped_weights`), else written into fresh memory in `layout`.
fn load_values<T: Held>(
    dir: &Path,
    spec: &ModelSpec,
    layout: ParamLayout,
    stored: &[Stored],
    files: &[(std::fs::File, memmap2::Mmap)],
    frozen: bool,
) -> Result<(ParamLayout, Buffer)> {
    #[cfg(target_os = "linux")]
    if frozen {
        return super::mapped_weights::load::<T>(dir, spec, stored, files);
    }
    let _ = (spec, files, frozen);
    let mut values = crate::engine::cpu::memory::zeroed::<T>(layout.total);
    fill(dir, packed_slots(&mut values, &layout), &layout, stored)?;
    Ok((layout, T::into_buffer(values)))
}

impl Model {
    /// Loads `config.json` and the safetensors weights of a Hugging Face model folder in f32 (trainable).
    pub fn load(dir: &Path) -> Result<Model> {
        Self::load_as(dir, false)
    }

    /// `load` for weights that never train (sampling, a reference): held in bf16 when every tensor is stored in
    /// bf16, as hub checkpoints are, or in f32 with values that bf16 holds exactly (a bf16 checkpoint saved again
    /// in f32, as `from_pretrained(dtype=float32).save_pretrained` does). The same values (the engine widens them
    /// exactly where it reads them) in half the memory, and half the bytes each decoded token reads.
    pub fn load_frozen(dir: &Path) -> Result<Model> {
        Self::load_as(dir, true)
    }

    fn load_as(dir: &Path, frozen: bool) -> Result<Model> {
        if !dir.is_dir() {
            return Err(Error::model(dir, "not a folder"));
        }
        let spec = ModelSpec::from_folder(dir)?;
        let files = weight_files(dir)?;
        let maps = files.iter().map(|f| map_file(f)).collect::<Result<Vec<_>>>()?;
        let tables = files
            .iter()
            .zip(&maps)
            .map(|(f, (_, m))| SafeTensors::deserialize(m).map_err(|e| Error::model(f, format!("invalid safetensors file: {e}"))))
            .collect::<Result<Vec<_>>>()?;
        // Before anything of the config's size is allocated: the files must hold at least that many values.
        let stored_values = tables.iter().flat_map(|t| t.tensors()).fold(0usize, |n, (_, v)| n.saturating_add(v.shape().iter().product()));
        let wanted = spec.parameter_count().unwrap_or(usize::MAX);
        if wanted > stored_values {
            return Err(Error::model(
                dir,
                format!("config.json implies {wanted} parameters but the safetensors files hold {stored_values} values"),
            ));
        }
        let layout = ParamLayout::new(&spec);
        let by_name: HashMap<&str, usize> =
            layout.tensors.iter().enumerate().map(|(i, t)| (t.name.as_str(), i)).collect();
        let mut stored = Vec::new();
        for (file_index, (file, table)) in files.iter().zip(&tables).enumerate() {
            for (name, view) in table.tensors() {
                // Tied checkpoints sometimes carry lm_head.weight anyway; the embedding is the one used.
                let Some(&slot) = by_name.get(name.as_str()) else {
                    if (name == "lm_head.weight" && spec.tied_embeddings) || name.ends_with("rotary_emb.inv_freq") {
                        continue;
                    }
                    return Err(Error::model(file, format!("unexpected tensor {name} for this architecture")));
                };
                if view.shape() != layout.tensors[slot].shape.as_slice() {
                    return Err(Error::model(
                        file,
                        format!("tensor {name} has shape {:?}, config.json implies {:?}", view.shape(), layout.tensors[slot].shape),
                    ));
                }
                if !matches!(view.dtype(), Dtype::F32 | Dtype::BF16 | Dtype::F16) {
                    return Err(Error::model(file, format!("tensor {name}: dtype {:?} is not supported (f32, bf16, f16)", view.dtype())));
                }
                let file_offset = view.data().as_ptr() as usize - maps[file_index].1.as_ptr() as usize;
                stored.push(Stored { file, file_index, file_offset, name, view, slot });
            }
        }
        let (layout, params) = if frozen && stored.iter().all(holds_bf16_values) {
            load_values::<u16>(dir, &spec, layout, &stored, &maps, frozen)?
        } else {
            load_values::<f32>(dir, &spec, layout, &stored, &maps, frozen)?
        };
        Ok(Model { spec, layout, params, lora: None })
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
