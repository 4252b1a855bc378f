//! transformers 5 builds a tokenizer from its class (`tokenizer_config.json`'s `tokenizer_class`): a class with its
//! own constructor takes only the vocabulary, merges, added tokens and post-processor from `tokenizer.json` and
//! sets the normalizer, pre-tokenizer and decoder itself (`TokenizersBackend.convert_to_native_format`). Where the
//! file says otherwise the class wins: Phi-3's file prepends "▁" to every piece of text, while the class
//! (`LlamaTokenizer`, not legacy) prepends it only at the start of the input, never after a special token
//! (`GemmaTokenizer`: never). Classes
//! without a constructor of their own (`PreTrainedTokenizerFast`, `TokenizersBackend`: Llama 3, ...) use the file
//! as it is, and so do classes not listed here.
//!
//! The post-processor follows `TokenizersBackend.__init__`: rebuilt from `add_bos_token` / `add_eos_token` when the
//! config sets either (or the file has none), else the file's.
use serde_json::{Map, Value};
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::normalizers::replace::Replace;
use tokenizers::normalizers::unicode::NFC;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{NormalizerWrapper, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer};

/// transformers' `Qwen2Tokenizer.PRETOKENIZE_REGEX`.
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn flag(cfg: &Map<String, Value>, key: &str) -> Option<bool> {
    cfg.get(key).and_then(Value::as_bool)
}

/// Sets `tok`'s pipeline as transformers' class constructor does; `Err` names what could not be built.
pub fn apply_class(tok: &mut Tokenizer, cfg: &Map<String, Value>) -> Result<(), String> {
    let class = cfg.get("tokenizer_class").and_then(Value::as_str).unwrap_or("");
    match class.strip_suffix("Fast").unwrap_or(class) {
        "LlamaTokenizer" => {
            let prefix = flag(cfg, "add_prefix_space").unwrap_or(true);
            let scheme = match (prefix, flag(cfg, "legacy").unwrap_or(false)) {
                (false, _) => PrependScheme::Never,
                (true, true) => PrependScheme::Always,
                (true, false) => PrependScheme::First,
            };
            tok.with_normalizer(None::<NormalizerWrapper>);
            tok.with_pre_tokenizer(Some(Metaspace::new('▁', scheme, false)));
            let mut steps: Vec<DecoderWrapper> =
                vec![Replace::new("▁", " ").map_err(|e| e.to_string())?.into(), ByteFallback::new().into(), Fuse::new().into()];
            if prefix {
                steps.push(Strip::new(' ', 1, 0).into());
            }
            tok.with_decoder(Some(DecoderSequence::new(steps)));
        }
        "GemmaTokenizer" => {
            // Spaces become "▁" before the split on " " (which then finds none): no prefix space anywhere.
            let split = Split::new(SplitPattern::String(" ".into()), SplitDelimiterBehavior::MergedWithPrevious, false)
                .map_err(|e| e.to_string())?;
            tok.with_normalizer(Some(Replace::new(" ", "▁").map_err(|e| e.to_string())?));
            tok.with_pre_tokenizer(Some(split));
            let steps: Vec<DecoderWrapper> =
                vec![Replace::new("▁", " ").map_err(|e| e.to_string())?.into(), ByteFallback::new().into(), Fuse::new().into()];
            tok.with_decoder(Some(DecoderSequence::new(steps)));
        }
        "GPT2Tokenizer" => {
            tok.with_normalizer(None::<NormalizerWrapper>);
            tok.with_pre_tokenizer(Some(ByteLevel::new(flag(cfg, "add_prefix_space").unwrap_or(false), true, true)));
            tok.with_decoder(Some(ByteLevelDecoder::default()));
        }
        "Qwen2Tokenizer" => {
            let split = Split::new(SplitPattern::Regex(QWEN2_SPLIT.into()), SplitDelimiterBehavior::Isolated, false)
                .map_err(|e| e.to_string())?;
            let bytes = ByteLevel::new(flag(cfg, "add_prefix_space").unwrap_or(false), true, false);
            tok.with_normalizer(Some(NFC));
            tok.with_pre_tokenizer(Some(PreSequence::new(vec![PreTokenizerWrapper::from(split), bytes.into()])));
            tok.with_decoder(Some(ByteLevelDecoder::default()));
        }
        _ => {}
    }
    let (add_bos, add_eos) = (flag(cfg, "add_bos_token"), flag(cfg, "add_eos_token"));
    if add_bos.is_some() || add_eos.is_some() || tok.get_post_processor().is_none() {
        let template = bos_eos_template(tok, cfg, add_bos.unwrap_or(false), add_eos.unwrap_or(false))?;
        tok.with_post_processor(Some(template));
    }
    Ok(())
}

/// `TokenizersBackend.update_post_processor`: `bos $A eos` (each only when asked for and defined).
fn bos_eos_template(tok: &Tokenizer, cfg: &Map<String, Value>, add_bos: bool, add_eos: bool) -> Result<TemplateProcessing, String> {
    let special = |key: &str, wanted: bool| -> Result<Option<(String, u32)>, String> {
        let Some(token) = super::tokenizer::token_string(cfg.get(key)).filter(|_| wanted) else { return Ok(None) };
        let id = tok.token_to_id(&token).ok_or_else(|| format!("{key} {token:?} is not in the vocabulary"))?;
        Ok(Some((token, id)))
    };
    let (bos, eos) = (special("bos_token", add_bos)?, special("eos_token", add_eos)?);
    let piece = |t: &Option<(String, u32)>, type_id: u32| t.as_ref().map(|(s, _)| format!("{s}:{type_id} ")).unwrap_or_default();
    let tail = |t: &Option<(String, u32)>, type_id: u32| t.as_ref().map(|(s, _)| format!(" {s}:{type_id}")).unwrap_or_default();
    let single = format!("{}$A:0{}", piece(&bos, 0), tail(&eos, 0));
    let pair = format!("{single} {}$B:1{}", piece(&bos, 1), tail(&eos, 1));
    let specials: Vec<(String, u32)> = bos.iter().chain(eos.iter()).cloned().collect();
    TemplateProcessing::builder()
        .try_single(single.as_str())
        .and_then(|b| b.try_pair(pair.as_str()))
        .map_err(|e| e.to_string())?
        .special_tokens(specials)
        .build()
        .map_err(|e| e.to_string())
}
