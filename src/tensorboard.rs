//! A TensorBoard event file writer (`report_to = "tensorboard"`): scalars as TFRecord-framed `Event` protobufs,
//! encoded by hand (the format is three small messages), so no protobuf or TensorFlow dependency is needed.
use crate::error::{Error, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

/// CRC-32C (Castagnoli), bitwise; event files are small, so speed does not matter.
pub fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0x82F6_3B78 } else { crc >> 1 };
        }
    }
    !crc
}

/// TFRecord's masked CRC.
pub fn masked_crc(data: &[u8]) -> u32 {
    let c = crc32c(data);
    (c.rotate_right(15)).wrapping_add(0xA282_EAD8)
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn length_delimited(field: u32, bytes: &[u8], out: &mut Vec<u8>) {
    varint(((field << 3) | 2) as u64, out);
    varint(bytes.len() as u64, out);
    out.extend_from_slice(bytes);
}

/// `Event { wall_time = 1 (double), step = 2 (int64), file_version = 3 | summary = 5 }`.
fn event(wall_time: f64, step: i64, file_version: Option<&str>, scalars: &[(String, f32)]) -> Vec<u8> {
    let mut e = Vec::new();
    varint((1 << 3) | 1, &mut e);
    e.extend_from_slice(&wall_time.to_le_bytes());
    varint(2 << 3, &mut e);
    varint(step as u64, &mut e);
    if let Some(v) = file_version {
        length_delimited(3, v.as_bytes(), &mut e);
    } else {
        // Summary { repeated Value value = 1 }, Value { string tag = 1; float simple_value = 2 }.
        let mut summary = Vec::new();
        for (tag, value) in scalars {
            let mut v = Vec::new();
            length_delimited(1, tag.as_bytes(), &mut v);
            varint((2 << 3) | 5, &mut v);
            v.extend_from_slice(&value.to_le_bytes());
            length_delimited(1, &v, &mut summary);
        }
        length_delimited(5, &summary, &mut e);
    }
    e
}

/// Appends records to `OUTPUT_DIR/runs/events.out.tfevents.<time>.kto`.
pub struct EventWriter {
    file: std::fs::File,
    pub path: PathBuf,
}

impl EventWriter {
    pub fn create(output_dir: &Path) -> Result<Self> {
        let dir = output_dir.join("runs");
        std::fs::create_dir_all(&dir).map_err(|e| Error::file(&dir, format!("cannot create: {e}")))?;
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let path = dir.join(format!("events.out.tfevents.{now}.kto"));
        let file = std::fs::File::create(&path).map_err(|e| Error::file(&path, e))?;
        let mut w = EventWriter { file, path };
        w.record(&event(wall_time(), 0, Some("brain.Event:2"), &[]))?;
        Ok(w)
    }

    /// `create` for a run that continues from a checkpoint: its earlier event files go, and the log entries
    /// `metrics.jsonl` kept up to the checkpoint are written again, so no step appears twice. (Their wall times
    /// are the time of the replay.)
    pub fn create_replaying(output_dir: &Path, kept: &[serde_json::Map<String, serde_json::Value>]) -> Result<Self> {
        if !kept.is_empty() {
            let dir = output_dir.join("runs");
            for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                let name = entry.file_name().to_string_lossy().to_string();
                if name.starts_with("events.out.tfevents.") && name.ends_with(".kto") {
                    std::fs::remove_file(entry.path()).map_err(|e| Error::file(entry.path(), format!("cannot replace: {e}")))?;
                }
            }
        }
        let mut w = Self::create(output_dir)?;
        for entry in kept {
            if let Some(step) = entry.get("step").and_then(|s| s.as_u64()) {
                w.scalars(step as usize, entry)?;
            }
        }
        Ok(w)
    }

    /// One event with every numeric entry of a log line as a scalar (`step` is the event's step).
    pub fn scalars(&mut self, step: usize, entry: &serde_json::Map<String, serde_json::Value>) -> Result<()> {
        let scalars: Vec<(String, f32)> = entry
            .iter()
            .filter(|(k, _)| *k != "step")
            .filter_map(|(k, v)| v.as_f64().map(|x| (scalar_tag(k), x as f32)))
            .collect();
        self.record(&event(wall_time(), step as i64, None, &scalars))
    }

    fn record(&mut self, data: &[u8]) -> Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        let mut buf = Vec::with_capacity(data.len() + 16);
        buf.extend_from_slice(&len);
        buf.extend_from_slice(&masked_crc(&len).to_le_bytes());
        buf.extend_from_slice(data);
        buf.extend_from_slice(&masked_crc(data).to_le_bytes());
        self.file.write_all(&buf).and_then(|_| self.file.flush()).map_err(|e| Error::file(&self.path, e))
    }
}

/// TensorBoard groups by the part before `/`: `train/loss`, `eval/loss`, as transformers' callback names them.
fn scalar_tag(key: &str) -> String {
    match key.strip_prefix("eval_") {
        Some(rest) => format!("eval/{rest}"),
        None => format!("train/{key}"),
    }
}

fn wall_time() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    }
}
