//! The tokenizer of a Hugging Face folder (`tokenizer.json` + `tokenizer_config.json`) and its chat template,
//! rendered with minijinja the way transformers renders it.
use super::chat_template::ChatTemplate;
use crate::error::{Error, Result};
use serde_json::Value;
use std::path::Path;

pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    pub bos_token: Option<String>,
    pub eos_token: String,
    pub eos_id: u32,
    pub pad_id: u32,
    /// The chat template and the file it came from (named in its errors).
    chat: Option<(ChatTemplate, std::path::PathBuf)>,
    special_tokens: serde_json::Map<String, Value>,
}

/// A special token in `tokenizer_config.json` is a string or an `AddedToken` object with `"content"`.
pub(super) fn token_string(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(String::from),
        _ => None,
    }
}

impl TextTokenizer {
    /// Loads `tokenizer.json`, the special tokens of `tokenizer_config.json` and the chat template
    /// (`chat_template.jinja`, else `tokenizer_config.json`'s `chat_template`) from `dir`.
    pub fn load(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::file(dir, "no such folder (the tokenizer's, by default the model's)"));
        }
        let tok_path = dir.join("tokenizer.json");
        if !tok_path.is_file() {
            return Err(Error::file(&tok_path, "not found (a Hugging Face fast tokenizer file is required)"));
        }
        let mut inner = tokenizers::Tokenizer::from_file(&tok_path).map_err(|e| Error::file(&tok_path, e))?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: serde_json::Map<String, Value> = if cfg_path.is_file() {
            let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::file(&cfg_path, e))?;
            serde_json::from_str(&text).map_err(|e| Error::file(&cfg_path, format!("invalid JSON: {e}")))?
        } else {
            Default::default()
        };
        super::tokenizer_class::apply_class(&mut inner, &cfg).map_err(|e| Error::file(&cfg_path, e))?;
        let bos_token = token_string(cfg.get("bos_token"));
        let eos_token = token_string(cfg.get("eos_token"))
            .ok_or_else(|| Error::file(&cfg_path, "no \"eos_token\": KTO appends it to every completion"))?;
        let id_of = |t: &str| inner.token_to_id(t);
        let eos_id =
            id_of(&eos_token).ok_or_else(|| Error::file(&tok_path, format!("eos_token {eos_token:?} is not in the vocabulary")))?;
        // TRL: a tokenizer without a pad token pads with EOS.
        let pad_id = token_string(cfg.get("pad_token")).and_then(|t| id_of(&t)).unwrap_or(eos_id);
        let mut special_tokens = serde_json::Map::new();
        for key in ["bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token"] {
            if let Some(s) = token_string(cfg.get(key)) {
                special_tokens.insert(key.into(), Value::String(s));
            }
        }
        let jinja_path = dir.join("chat_template.jinja");
        let (template, template_path) = if jinja_path.is_file() {
            (Some(std::fs::read_to_string(&jinja_path).map_err(|e| Error::file(&jinja_path, e))?), &jinja_path)
        } else {
            let t = 
            match cfg.get("chat_template") {
                Some(Value::String(s)) => Some(s.clone()),
                // A list of named templates: use "default".
                Some(Value::Array(list)) => list
                    .iter()
                    .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                    .and_then(|t| t.get("template").and_then(|s| s.as_str()).map(String::from)),
                _ => None,
            };
            (t, &cfg_path)
        };
        let chat = match template {
            Some(src) => Some((
                ChatTemplate::new(src).map_err(|e| Error::file(template_path, format!("chat template: {e}")))?,
                template_path.clone(),
            )),
            None => None,
        };
        Ok(TextTokenizer { inner, bos_token, eos_token, eos_id, pad_id, chat, special_tokens })
    }

    pub fn encode(&self, text: &str, add_special_tokens: bool) -> std::result::Result<Vec<u32>, String> {
        self.inner.encode(text, add_special_tokens).map(|e| e.get_ids().to_vec()).map_err(|e| e.to_string())
    }

    /// Text of `ids`, special tokens left out.
    pub fn decode(&self, ids: &[u32]) -> std::result::Result<String, String> {
        self.inner.decode(ids, true).map_err(|e| e.to_string())
    }

    pub fn has_chat_template(&self) -> bool {
        self.chat.is_some()
    }

    /// Refuses a model whose embedding has fewer rows than this tokenizer has ids (an id past `vocab_size`
    /// would read another tensor's weights).
    pub fn check_fits(&self, vocab_size: usize, model_dir: &Path) -> Result<()> {
        if self.vocab_size() > vocab_size {
            return Err(Error::model(
                model_dir,
                format!("the tokenizer has {} tokens but vocab_size is {vocab_size}", self.vocab_size()),
            ));
        }
        Ok(())
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Renders messages with the chat template, as `apply_chat_template(..., tokenize=False)`.
    pub fn render_chat(
        &self,
        messages: &[Value],
        add_generation_prompt: bool,
        tools: Option<&Value>,
        kwargs: Option<&serde_json::Map<String, Value>>,
    ) -> std::result::Result<String, String> {
        let (chat, path) = self.chat.as_ref().ok_or("the tokenizer has no chat_template, so message lists cannot be used")?;
        chat.render(messages, add_generation_prompt, tools, &self.special_tokens, kwargs)
            .map_err(|e| format!("chat template {}: {e}", path.display()))
    }
}
