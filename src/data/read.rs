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

/// Reads a data set: a `.jsonl`, `.json` or `.parquet` file, a folder of such files, or the files a pattern
/// in the last part of the path names (`data/train-*`, as a hub data set's split resolves); shards are read
/// in name order. With `skip_invalid`, rows that are not JSON objects are skipped and returned as errors
/// instead of failing.
pub fn read_dataset(path: &Path, skip_invalid: bool) -> Result<(Vec<RawRow>, Vec<Error>)> {
    if path.is_dir() || is_pattern(path) {
        let files = data_files(path)?;
        if files.is_empty() {
            let what = if is_pattern(path) { "no .jsonl, .json or .parquet file matches" } else { "no .jsonl, .json or .parquet files in the folder" };
            return Err(Error::file(path, what));
        }
        let (mut rows, mut skipped) = (Vec::new(), Vec::new());
        for f in files {
            let (r, s) = read_file(&f, skip_invalid)?;
            rows.extend(r);
            skipped.extend(s);
        }
        return Ok((rows, skipped));
    }
    read_file(path, skip_invalid)
}

/// Whether the path's last part is a pattern (`*` or `?`) rather than a name.
fn is_pattern(path: &Path) -> bool {
    path.file_name().is_some_and(|n| n.to_string_lossy().contains(['*', '?']))
}

/// The data files of a folder, or those a pattern names, sorted.
fn data_files(path: &Path) -> Result<Vec<PathBuf>> {
    let (dir, pattern) = match is_pattern(path) {
        true => (path.parent().unwrap_or(Path::new(".")), path.file_name().map(|n| n.to_string_lossy().to_string())),
        false => (path, None),
    };
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::file(dir, format!("cannot read folder: {e}")))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "jsonl" || x == "json" || x == "parquet"))
        .filter(|p| pattern.as_ref().is_none_or(|pat| crate::hub::dataset_files::glob_match(pat, &p.file_name().unwrap_or_default().to_string_lossy())))
        .collect();
    files.sort();
    Ok(files)
}

/// Whether a data set path names something to read (a pattern: at least one file).
pub fn dataset_exists(path: &Path) -> bool {
    if is_pattern(path) {
        return data_files(path).is_ok_and(|f| !f.is_empty());
    }
    path.exists()
}

fn read_file(path: &Path, skip_invalid: bool) -> Result<(Vec<RawRow>, Vec<Error>)> {
    if path.extension().is_some_and(|x| x == "parquet") {
        return read_parquet(path, skip_invalid);
    }
    if !skip_invalid {
        return read_rows(path).map(|r| (r, Vec::new()));
    }
    let text = read_text(path)?;
    if text.trim_start().starts_with('[') {
        return read_rows(path).map(|r| (r, Vec::new()));
    }
    let (mut rows, mut skipped) = (Vec::new(), Vec::new());
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let parsed = serde_json::from_str::<Value>(line)
            .map_err(|e| Error::Row { path: path.to_path_buf(), row: i + 1, msg: format!("invalid JSON: {e}") })
            .and_then(|v| into_row(v, path, i + 1));
        match parsed {
            Ok(r) => rows.push(r),
            Err(e) => skipped.push(e),
        }
    }
    Ok((rows, skipped))
}

/// Reads a Parquet file (what dataset hubs serve) through Arrow, one JSON object per row.
fn read_parquet(path: &Path, skip_invalid: bool) -> Result<(Vec<RawRow>, Vec<Error>)> {
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let bad = |e: &dyn std::fmt::Display| Error::file(path, format!("invalid Parquet: {e}"));
    let file = std::fs::File::open(path).map_err(|e| Error::file(path, format!("cannot read: {e}")))?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| bad(&e))?.build().map_err(|e| bad(&e))?;
    let (mut rows, mut skipped) = (Vec::new(), Vec::new());
    for batch in reader {
        let batch = batch.map_err(|e| bad(&e))?;
        let mut writer = arrow_json::ArrayWriter::new(Vec::new());
        writer.write(&batch).map_err(|e| bad(&e))?;
        writer.finish().map_err(|e| bad(&e))?;
        let bytes = writer.into_inner();
        let values: Vec<Value> = if bytes.is_empty() { Vec::new() } else { serde_json::from_slice(&bytes).map_err(|e| bad(&e))? };
        for v in values {
            let row = rows.len() + skipped.len() + 1;
            match into_row(v, path, row) {
                Ok(r) => rows.push(r),
                Err(e) if skip_invalid => skipped.push(e),
                Err(e) => return Err(e),
            }
        }
    }
    if rows.is_empty() && skipped.is_empty() {
        return Err(Error::file(path, "no rows"));
    }
    Ok((rows, skipped))
}

/// One configured column: its name in the files, the name TRL expects, and the config key that set it.
pub struct ColumnMapping<'a> {
    pub from: &'a str,
    pub to: &'a str,
    pub key: &'a str,
}

/// Renames mapped columns (`prompt_column = "question"`, ...) to the names TRL expects. A column the config
/// names must be in every row: falling back to a column of TRL's name would train on the wrong data.
pub fn rename_columns(rows: &mut [RawRow], mapping: &[ColumnMapping]) -> Result<()> {
    for row in rows {
        for m in mapping.iter().filter(|m| m.from != m.to) {
            match row.fields.remove(m.from) {
                Some(v) => {
                    row.fields.insert(m.to.to_string(), v);
                }
                None => return Err(row.error(format!("no column \"{}\" ({} = \"{}\")", m.from, m.key, m.from))),
            }
        }
    }
    Ok(())
}

/// A data file's text: a UTF-8 byte-order mark is dropped (editors on Windows write one); invalid UTF-8 is an
/// error that names the line.
fn read_text(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| Error::file(path, format!("cannot read: {e}")))?;
    let body = bytes.strip_prefix(b"\xEF\xBB\xBF".as_slice()).unwrap_or(&bytes);
    match std::str::from_utf8(body) {
        Ok(text) => Ok(text.to_string()),
        Err(e) => {
            let line = 1 + body[..e.valid_up_to()].iter().filter(|b| **b == b'\n').count();
            Err(Error::Row { path: path.to_path_buf(), row: line, msg: "invalid UTF-8".into() })
        }
    }
}

/// Reads a `.jsonl` file (one object a line, blank lines skipped) or a `.json` file holding an array of objects.
pub fn read_rows(path: &Path) -> Result<Vec<RawRow>> {
    let text = read_text(path)?;
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
