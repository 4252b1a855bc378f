//! Reading data rows from JSON Lines or JSON array files. Each row is a JSON object; errors name file and row.
use crate::error::{Error, Result};
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};

/// One row as read, with where it came from.
#[derive(Debug, Clone)]
pub struct RawRow {
    pub fields: Map<String, Value>,
    pub path: PathBuf,
    /// 1-based line (JSON Lines) or element (JSON array) number.
    pub row: usize,
}

impl RawRow {
    pub fn error(&self, msg: impl std::fmt::Display) -> Error {
        Error::Row { path: self.path.clone(), row: self.row, msg: msg.to_string() }
    }
}

/// Reads a `.jsonl` file (one object a line, blank lines skipped) or a `.json` file holding an array of objects.
pub fn read_rows(path: &Path) -> Result<Vec<RawRow>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::file(path, format!("cannot read: {e}")))?;
    let first = text.trim_start().chars().next();
    if first == Some('[') {
        let values: Vec<Value> =
            serde_json::from_str(&text).map_err(|e| Error::file(path, format!("invalid JSON: {e}")))?;
        values
            .into_iter()
            .enumerate()
            .map(|(i, v)| into_row(v, path, i + 1))
            .collect()
    } else {
        let mut rows = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let v: Value = serde_json::from_str(line).map_err(|e| Error::Row {
                path: path.to_path_buf(),
                row: i + 1,
                msg: format!("invalid JSON: {e}"),
            })?;
            rows.push(into_row(v, path, i + 1)?);
        }
        if rows.is_empty() {
            return Err(Error::file(path, "no rows"));
        }
        Ok(rows)
    }
}

fn into_row(v: Value, path: &Path, row: usize) -> Result<RawRow> {
    match v {
        Value::Object(fields) => Ok(RawRow { fields, path: path.to_path_buf(), row }),
        other => Err(Error::Row {
            path: path.to_path_buf(),
            row,
            msg: format!("expected a JSON object, found {}", kind(&other)),
        }),
    }
}

pub fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}
