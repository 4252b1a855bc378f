//! From raw rows to unpaired examples, in TRL's order: prompt extraction for `{chosen, rejected}` rows,
//! unpairing of paired rows (chosen block then rejected block per 1,000 rows), label checks.
use super::read::{kind, RawRow};
use crate::error::{Error, Result};
use serde_json::Value;

/// A prompt or completion: plain text, or a list of chat messages (`{"role", "content"}` objects).
#[derive(Debug, Clone, PartialEq)]
pub enum Content {
    Text(String),
    Messages(Vec<Value>),
}

/// One unpaired example: a prompt, a completion and whether the completion is desirable.
#[derive(Debug, Clone)]
pub struct Example {
    pub prompt: Content,
    pub completion: Content,
    pub label: bool,
    /// Per-row `tools` and `chat_template_kwargs`, forwarded to the chat template as TRL does.
    pub tools: Option<Value>,
    pub template_kwargs: Option<serde_json::Map<String, Value>>,
    /// 0-based index of the row in the file it came from, and its 1-based line (or array element) there.
    pub source_row: usize,
    pub line: usize,
}

/// The layouts TRL accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// `{prompt, completion, label}`
    Unpaired,
    /// `{prompt, chosen, rejected}`
    Paired,
    /// `{chosen, rejected}` with the prompt as their common prefix
    PairedImplicitPrompt,
}

/// Decides the layout from the first row's keys, as TRL does from the dataset's columns.
pub fn detect_layout(first: &RawRow) -> Result<Layout> {
    let has = |k: &str| first.fields.contains_key(k);
    if has("prompt") && has("chosen") && has("rejected") {
        Ok(Layout::Paired)
    } else if has("prompt") {
        Ok(Layout::Unpaired)
    } else if has("chosen") && has("rejected") {
        Ok(Layout::PairedImplicitPrompt)
    } else if has("messages") {
        Err(first.error(
            "the \"messages\" layout is not supported (TRL rejects it too); use {prompt, completion, label} with message lists",
        ))
    } else {
        Err(first.error("expected keys {prompt, completion, label}, {prompt, chosen, rejected} or {chosen, rejected}"))
    }
}

fn field<'a>(row: &'a RawRow, key: &str) -> Result<&'a Value> {
    match row.fields.get(key) {
        Some(Value::Null) => Err(row.error(format!("key \"{key}\" is null"))),
        Some(v) => Ok(v),
        None => Err(row.error(format!("missing key \"{key}\""))),
    }
}

fn content(row: &RawRow, key: &str, conversational: bool) -> Result<Content> {
    let v = field(row, key)?;
    match (v, conversational) {
        (Value::String(s), false) => Ok(Content::Text(s.clone())),
        (Value::Array(items), true) => {
            for (i, m) in items.iter().enumerate() {
                let ok = m.as_object().is_some_and(|o| o.get("role").is_some_and(|r| r.is_string()));
                if !ok {
                    return Err(row.error(format!("\"{key}\"[{i}] is not a message object with a \"role\"")));
                }
            }
            Ok(Content::Messages(items.clone()))
        }
        (_, false) => Err(row.error(format!(
            "\"{key}\" must be a string like the first row's, found {}",
            kind(v)
        ))),
        (_, true) => Err(row.error(format!(
            "\"{key}\" must be a list of messages like the first row's, found {}",
            kind(v)
        ))),
    }
}

fn label(row: &RawRow) -> Result<bool> {
    match field(row, "label")? {
        Value::Bool(b) => Ok(*b),
        // Many exported data sets store the label as 0/1.
        Value::Number(n) if n.as_f64() == Some(1.0) => Ok(true),
        Value::Number(n) if n.as_f64() == Some(0.0) => Ok(false),
        other => Err(row.error(format!("\"label\" must be true or false (or 1 or 0), found {}", kind(other)))),
    }
}

fn is_empty(c: &Content) -> bool {
    match c {
        Content::Text(s) => s.is_empty(),
        Content::Messages(m) => m.is_empty(),
    }
}

/// Longest common prefix of chosen and rejected as the prompt, exactly as TRL's `extract_prompt`
/// (including its step back over one space, and its quirk when one side is a prefix of the other).
fn extract_prompt(row: &RawRow, chosen: Content, rejected: Content) -> Result<(Content, Content, Content)> {
    fn split<T: PartialEq + Clone>(c: &[T], r: &[T], is_space: impl Fn(&T) -> bool) -> Option<usize> {
        let n = c.len().min(r.len());
        if n == 0 {
            return None;
        }
        let mut idx = n - 1;
        for i in 0..n {
            if c[i] != r[i] {
                idx = i;
                if i > 0 && is_space(&c[i - 1]) {
                    idx -= 1;
                }
                break;
            }
        }
        Some(idx)
    }
    let fail = || row.error("\"chosen\" or \"rejected\" is empty, so no prompt can be extracted");
    match (chosen, rejected) {
        (Content::Text(c), Content::Text(r)) => {
            let (cc, rc): (Vec<char>, Vec<char>) = (c.chars().collect(), r.chars().collect());
            let idx = split(&cc, &rc, |ch| *ch == ' ').ok_or_else(fail)?;
            let s = |v: &[char]| v.iter().collect::<String>();
            Ok((Content::Text(s(&cc[..idx])), Content::Text(s(&cc[idx..])), Content::Text(s(&rc[idx..]))))
        }
        (Content::Messages(c), Content::Messages(r)) => {
            let idx = split(&c, &r, |_| false).ok_or_else(fail)?;
            Ok((Content::Messages(c[..idx].to_vec()), Content::Messages(c[idx..].to_vec()), Content::Messages(r[idx..].to_vec())))
        }
        _ => Err(row.error("\"chosen\" and \"rejected\" must both be strings or both be message lists")),
    }
}

/// Rows per `datasets.map` batch in TRL's `unpair_preference_dataset`: the unit of its chosen-then-rejected order.
const UNPAIR_MAP_BATCH: usize = 1000;

/// Turns rows of any accepted layout into unpaired examples, in the order TRL's trainer holds them.
pub fn examples_from_rows(rows: &[RawRow]) -> Result<(Vec<Example>, bool)> {
    examples_from_rows_skipping(rows, false).map(|(e, c, _)| (e, c))
}

/// `examples_from_rows`; with `skip_invalid`, a malformed row is left out and its error returned instead.
pub fn examples_from_rows_skipping(rows: &[RawRow], skip_invalid: bool) -> Result<(Vec<Example>, bool, Vec<Error>)> {
    let mut skipped = Vec::new();
    let rows: Vec<RawRow> = if skip_invalid {
        // Validate each row alone first; keep the ones that pass.
        let first = rows.first().ok_or_else(|| Error::Train("the data set has no rows".into()))?;
        let layout = detect_layout(first)?;
        let conv_key = if layout == Layout::PairedImplicitPrompt { "chosen" } else { "prompt" };
        let conversational = first.fields.get(conv_key).is_some_and(|v| v.is_array());
        rows.iter()
            .filter(|r| match check_row(r, layout, conversational) {
                Ok(()) => true,
                Err(e) => {
                    skipped.push(e);
                    false
                }
            })
            .cloned()
            .collect()
    } else {
        rows.to_vec()
    };
    if rows.is_empty() && !skipped.is_empty() {
        // Every row was invalid: the caller, who knows of rows skipped earlier too, reports it.
        return Ok((Vec::new(), false, skipped));
    }
    let (examples, conversational) = examples_from_valid_rows(&rows)?;
    Ok((examples, conversational, skipped))
}

/// The checks `examples_from_valid_rows` makes on one row.
fn check_row(row: &RawRow, layout: Layout, conversational: bool) -> Result<()> {
    match layout {
        Layout::Unpaired => {
            content(row, "prompt", conversational)?;
            if is_empty(&content(row, "completion", conversational)?) {
                return Err(row.error("\"completion\" is empty"));
            }
            label(row)?;
        }
        Layout::Paired | Layout::PairedImplicitPrompt => {
            let (c, r) = (content(row, "chosen", conversational)?, content(row, "rejected", conversational)?);
            let (c, r) = if layout == Layout::Paired {
                content(row, "prompt", conversational)?;
                (c, r)
            } else {
                let (_, c, r) = extract_prompt(row, c, r)?;
                (c, r)
            };
            if is_empty(&c) || is_empty(&r) {
                return Err(row.error("\"chosen\" or \"rejected\" completion is empty"));
            }
        }
    }
    Ok(())
}

fn examples_from_valid_rows(rows: &[RawRow]) -> Result<(Vec<Example>, bool)> {
    let first = rows.first().ok_or_else(|| Error::Train("the data set has no rows".into()))?;
    let layout = detect_layout(first)?;
    let conv_key = if layout == Layout::PairedImplicitPrompt { "chosen" } else { "prompt" };
    let conversational = first.fields.get(conv_key).is_some_and(|v| v.is_array());
    let extras = |row: &RawRow| {
        let tools = row.fields.get("tools").filter(|v| !v.is_null()).map(|v| match v {
            // TRL accepts tools as a JSON string too.
            Value::String(s) => serde_json::from_str(s).unwrap_or(Value::String(s.clone())),
            other => other.clone(),
        });
        let kwargs = row.fields.get("chat_template_kwargs").and_then(|v| v.as_object()).cloned();
        (tools, kwargs)
    };
    let mut out = Vec::with_capacity(rows.len() * if layout == Layout::Unpaired { 1 } else { 2 });
    match layout {
        Layout::Unpaired => {
            for (i, row) in rows.iter().enumerate() {
                let prompt = content(row, "prompt", conversational)?;
                let completion = content(row, "completion", conversational)?;
                if is_empty(&completion) {
                    return Err(row.error("\"completion\" is empty"));
                }
                let (tools, template_kwargs) = extras(row);
                out.push(Example { prompt, completion, label: label(row)?, tools, template_kwargs, source_row: i, line: row.row });
            }
        }
        Layout::Paired | Layout::PairedImplicitPrompt => {
            let mut pairs = Vec::with_capacity(rows.len());
            for row in rows {
                let chosen = content(row, "chosen", conversational)?;
                let rejected = content(row, "rejected", conversational)?;
                let (prompt, chosen, rejected) = if layout == Layout::Paired {
                    (content(row, "prompt", conversational)?, chosen, rejected)
                } else {
                    extract_prompt(row, chosen, rejected)?
                };
                if is_empty(&chosen) || is_empty(&rejected) {
                    return Err(row.error("\"chosen\" or \"rejected\" completion is empty"));
                }
                pairs.push((prompt, chosen, rejected));
            }
            for (b, block) in pairs.chunks(UNPAIR_MAP_BATCH).enumerate() {
                for pass in [true, false] {
                    for (j, (prompt, chosen, rejected)) in block.iter().enumerate() {
                        let i = b * UNPAIR_MAP_BATCH + j;
                        let (tools, template_kwargs) = extras(&rows[i]);
                        let completion = if pass { chosen.clone() } else { rejected.clone() };
                        out.push(Example { prompt: prompt.clone(), completion, label: pass, tools, template_kwargs, source_row: i, line: rows[i].row });
                    }
                }
            }
        }
    }
    Ok((out, conversational))
}
