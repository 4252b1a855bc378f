//! Writing files so that a crash leaves the old file or the new one, never a torn one.
use crate::error::{Error, Result};
use std::io::Write;
use std::path::Path;

/// Writes `bytes` to a temporary file beside `path`, flushes it to disk, then renames it over `path`.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |tmp| std::fs::File::create(tmp)?.write_all(bytes))
}

/// `write_atomic` for a writer that creates the file itself: `write` gets the temporary path, and the file is
/// synced and renamed over `path` only when it succeeds.
pub fn write_atomic_with(path: &Path, write: impl FnOnce(&Path) -> std::io::Result<()>) -> Result<()> {
    let name = path.file_name().ok_or_else(|| Error::file(path, "not a file path"))?;
    let tmp = path.with_file_name(format!(".{}.tmp-{}", name.to_string_lossy(), std::process::id()));
    let result = (|| -> std::io::Result<()> {
        write(&tmp)?;
        std::fs::File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::file(path, format!("cannot write: {e}")));
    }
    Ok(())
}

/// A safetensors file streamed from the tensors' own memory (no serialized copy: a 0.5B model's weights or
/// AdamW moments would otherwise double in memory while saving), written atomically.
pub fn write_safetensors(
    path: &Path,
    tensors: Vec<(String, safetensors::tensor::TensorView<'_>)>,
    metadata: Option<std::collections::HashMap<String, String>>,
) -> Result<()> {
    write_atomic_with(path, |tmp| {
        safetensors::serialize_to_file(tensors, metadata, tmp).map_err(|e| std::io::Error::other(e.to_string()))
    })
}
