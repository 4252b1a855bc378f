//! A chat template (Jinja) rendered as transformers' `apply_chat_template(..., tokenize=False)` renders it:
//! `trim_blocks`, `lstrip_blocks`, loop controls, `raise_exception`, `strftime_now` (the local date and time, as
//! `datetime.now().strftime`), `tojson` as Python's `json.dumps`, Python's string and dict methods, the tokenizer's
//! special tokens in the context, and a message's reasoning under each name templates read it by.
use super::python_json::{dumps, Style};
use minijinja::value::Kwargs;
use serde_json::{Map, Value};
use std::sync::Mutex;

pub struct ChatTemplate {
    env: minijinja::Environment<'static>,
}

/// The moment `strftime_now` renders, when pinned (tests, reproducible data); `None`: the clock.
static PINNED_NOW: Mutex<Option<chrono::NaiveDateTime>> = Mutex::new(None);

/// Pins what `strftime_now` returns in every template of this process (`None`: the local clock again).
pub fn pin_now(now: Option<chrono::NaiveDateTime>) {
    *PINNED_NOW.lock().unwrap_or_else(|e| e.into_inner()) = now;
}

fn now() -> chrono::NaiveDateTime {
    PINNED_NOW.lock().unwrap_or_else(|e| e.into_inner()).unwrap_or_else(|| chrono::Local::now().naive_local())
}

impl ChatTemplate {
    /// Compiles `source`; `Err` is the template's syntax error.
    pub fn new(source: String) -> Result<Self, String> {
        let mut env = minijinja::Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        });
        env.add_function("strftime_now", |format: String| -> Result<String, minijinja::Error> {
            let mut text = String::new();
            std::fmt::write(&mut text, format_args!("{}", now().format(&format))).map_err(|_| {
                minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, format!("strftime_now: bad format {format:?}"))
            })?;
            Ok(text)
        });
        // transformers' own `tojson` (Python's json.dumps) and Python's idea of iterable (not None).
        env.add_filter("tojson", tojson);
        env.add_test("iterable", |v: &minijinja::Value| {
            use minijinja::value::ValueKind::*;
            matches!(v.kind(), String | Bytes | Seq | Map | Iterable | Undefined)
        });
        env.add_template_owned("chat", source).map_err(|e| e.to_string())?;
        Ok(ChatTemplate { env })
    }

    /// The messages rendered with `special_tokens` (`bos_token`, ...) and `kwargs` in the context; `tools` as the
    /// template's `tools` (or none). A template's `raise_exception` comes back as its message.
    pub fn render(
        &self,
        messages: &[Value],
        add_generation_prompt: bool,
        tools: Option<&Value>,
        special_tokens: &Map<String, Value>,
        kwargs: Option<&Map<String, Value>>,
    ) -> Result<String, String> {
        let mut ctx = special_tokens.clone();
        if let Some(kw) = kwargs {
            ctx.extend(kw.clone());
        }
        ctx.insert("messages".into(), Value::Array(messages.iter().map(alias_reasoning).collect()));
        ctx.insert("documents".into(), Value::Null);
        ctx.insert("add_generation_prompt".into(), Value::Bool(add_generation_prompt));
        ctx.insert("tools".into(), tools.cloned().unwrap_or(Value::Null));
        let template = self.env.get_template("chat").map_err(|e| e.to_string())?;
        template.render(minijinja::Value::from_serialize(&ctx)).map_err(|e| match e.kind() {
            minijinja::ErrorKind::InvalidOperation => e.detail().unwrap_or("raise_exception").to_string(),
            _ => e.to_string(),
        })
    }
}

/// transformers' `_alias_reasoning_fields`: a message's reasoning (`reasoning_content`, `thinking` or `reasoning`,
/// the first set) is also given as `thinking` (gpt-oss templates) and `reasoning_content`.
fn alias_reasoning(message: &Value) -> Value {
    let Some(fields) = message.as_object() else { return message.clone() };
    let Some(reasoning) = ["reasoning_content", "thinking", "reasoning"].iter().find_map(|k| fields.get(*k).filter(|v| !v.is_null())) else {
        return message.clone();
    };
    let mut aliased = Map::new();
    aliased.insert("thinking".into(), reasoning.clone());
    aliased.extend(fields.clone());
    aliased.insert("reasoning_content".into(), reasoning.clone());
    Value::Object(aliased)
}

/// `tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)` as transformers defines it.
fn tojson(value: minijinja::Value, kwargs: Kwargs) -> Result<String, minijinja::Error> {
    let bad = |what: &str| minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, format!("tojson: {what}"));
    let indent = match kwargs.get::<Option<minijinja::Value>>("indent")? {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) if v.as_str().is_some() => Some(v.as_str().unwrap_or_default().to_string()),
        Some(v) => Some(" ".repeat(usize::try_from(v).map_err(|_| bad("indent must be a number or a string"))?)),
    };
    let mut style = Style::new(indent);
    if let Some(separators) = kwargs.get::<Option<Vec<String>>>("separators")? {
        let [item, key] = <[String; 2]>::try_from(separators).map_err(|_| bad("separators must be two strings"))?;
        (style.item_separator, style.key_separator) = (item, key);
    }
    style.ensure_ascii = kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false);
    style.sort_keys = kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false);
    kwargs.assert_all_used()?;
    let json = serde_json::to_value(&value).map_err(|e| bad(&e.to_string()))?;
    Ok(dumps(&json, &style))
}
