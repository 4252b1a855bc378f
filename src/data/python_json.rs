//! `json.dumps` as Python writes it, for chat templates' `tojson` (transformers replaces Jinja's HTML-escaping
//! filter with `json.dumps(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`): keys in their
//! order, `", "` and `": "` between items (`","` once indented), non-ASCII kept unless `ensure_ascii`.
use serde_json::Value;

pub struct Style {
    pub indent: Option<String>,
    pub item_separator: String,
    pub key_separator: String,
    pub ensure_ascii: bool,
    pub sort_keys: bool,
}

impl Style {
    /// Python's defaults for the separators given the indent.
    pub fn new(indent: Option<String>) -> Self {
        let item_separator = if indent.is_some() { "," } else { ", " }.to_string();
        Style { indent, item_separator, key_separator: ": ".into(), ensure_ascii: false, sort_keys: false }
    }
}

pub fn dumps(value: &Value, style: &Style) -> String {
    let mut out = String::new();
    write(value, style, 0, &mut out);
    out
}

fn write(value: &Value, style: &Style, level: usize, out: &mut String) {
    match value {
        Value::String(s) => string(s, style.ensure_ascii, out),
        Value::Array(items) if !items.is_empty() => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                separate(style, level + 1, i == 0, out);
                write(item, style, level + 1, out);
            }
            close(style, level, out);
            out.push(']');
        }
        Value::Object(map) if !map.is_empty() => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            if style.sort_keys {
                entries.sort_by(|a, b| a.0.cmp(b.0));
            }
            out.push('{');
            for (i, (key, item)) in entries.into_iter().enumerate() {
                separate(style, level + 1, i == 0, out);
                string(key, style.ensure_ascii, out);
                out.push_str(&style.key_separator);
                write(item, style, level + 1, out);
            }
            close(style, level, out);
            out.push('}');
        }
        Value::Array(_) => out.push_str("[]"),
        Value::Object(_) => out.push_str("{}"),
        Value::Number(n) => out.push_str(&python_number(n)),
        other => out.push_str(&other.to_string()),
    }
}

/// Before an item: the separator (not before the first), then, when indented, a new line at `level`.
fn separate(style: &Style, level: usize, first: bool, out: &mut String) {
    if !first {
        out.push_str(&style.item_separator);
    }
    if let Some(indent) = &style.indent {
        out.push('\n');
        out.push_str(&indent.repeat(level));
    }
}

fn close(style: &Style, level: usize, out: &mut String) {
    if let Some(indent) = &style.indent {
        out.push('\n');
        out.push_str(&indent.repeat(level));
    }
}

/// Python's `repr` of a float where it differs from Rust's: an exponent is written `e+NN` / `e-NN`.
fn python_number(n: &serde_json::Number) -> String {
    let text = n.to_string();
    match text.split_once('e') {
        Some((mantissa, exp)) if !exp.starts_with('-') => format!("{mantissa}e+{}", exp.trim_start_matches('+')),
        _ => text,
    }
}

fn string(s: &str, ensure_ascii: bool, out: &mut String) {
    let quoted = serde_json::to_string(s).expect("a string serialises");
    if !ensure_ascii {
        out.push_str(&quoted);
        return;
    }
    for c in quoted.chars() {
        if c.is_ascii() {
            out.push(c);
        } else {
            let mut units = [0u16; 2];
            for unit in c.encode_utf16(&mut units) {
                out.push_str(&format!("\\u{unit:04x}"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What Python 3.11's json.dumps printed for the same value and arguments.
    #[test]
    fn writes_as_python_writes() {
        let v: Value = serde_json::from_str(r#"{"b": [1, 2.5, "é<>"], "a": {}, "c": [], "d": null, "e": 1e30}"#).unwrap();
        assert_eq!(dumps(&v, &Style::new(None)), r#"{"b": [1, 2.5, "é<>"], "a": {}, "c": [], "d": null, "e": 1e+30}"#);
        let indented = Style { sort_keys: true, ensure_ascii: true, ..Style::new(Some("  ".into())) };
        assert_eq!(
            dumps(&v, &indented),
            "{\n  \"a\": {},\n  \"b\": [\n    1,\n    2.5,\n    \"\\u00e9<>\"\n  ],\n  \"c\": [],\n  \"d\": null,\n  \"e\": 1e+30\n}"
        );
    }
}
