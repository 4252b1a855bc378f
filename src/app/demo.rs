//! `kto demo`: a task whose answers a rule can judge, end to end, to show KTO moving a model toward desirable
//! outputs. Everything is made from a seed: a character tokenizer, a small random Llama, the data.
//!
//! The task: a prompt is a lowercase word and `=` (`"kfmq="`); the desirable answer is the word in capitals
//! (`"KFMQ"`). Per seed:
//! 1. `kto sft` teaches a random model on a mix of answers: 35% right, 35% the word unchanged (lowercase), 30%
//!    the capitals reversed. The base model learns the three habits.
//! 2. The base model answers training prompts; the rule labels each answer desirable or not (`kto.jsonl`).
//! 3. Three runs from the base: `kto train` on all labelled answers; `kto train` keeping only 10% of the
//!    desirable answers (the paper's imbalance setting, `desirable_weight` raised to compensate); `kto sft` on
//!    the desirable answers alone.
//! 4. Each model answers held-out prompts (words never seen in training); the desirable rate is measured.
use kto::rng::Rng;
use kto::config::TrainConfig;
use kto::error::{Error, Result};
use kto::generate::{generate_ids, SamplingOptions};
use kto::model::{Model, ModelSpec};
use kto::train::{Observer, Silent, Task, Trainer};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub out: PathBuf,
    pub seeds: Vec<u64>,
}

/// The four models compared, in table order.
pub const VARIANTS: [&str; 4] = ["base (SFT on mixed answers)", "KTO", "KTO, 10% of desirable kept", "SFT on desirable only"];

/// Desirable rate of each variant for one seed, and the rate of answers in capitals at all (right or not): the
/// format alone.
#[derive(Debug, Clone)]
pub struct SeedResult {
    pub seed: u64,
    pub rates: [f64; 4],
    pub capitals: [f64; 4],
    pub kto_rows: usize,
    pub kto_desirable: usize,
    pub seconds: f64,
}

// Sizes: chosen so three seeds run in a few minutes on two cores.
const SFT_ROWS: usize = 20000;
const KTO_PROMPTS: usize = 1500;
const HELD_OUT: usize = 300;
const SAMPLES_PER_HELD_OUT: usize = 4;
const MIN_WORD: usize = 3;
const MAX_WORD: usize = 6;

/// The demo's only source of randomness, from its seed.
fn demo_rng(seed: u64) -> Rng {
    Rng::from_state(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03)
}

/// The rule: the answer is the prompt's word in capitals.
pub fn is_desirable(prompt: &str, answer: &str) -> bool {
    let word = prompt.trim_end_matches('=');
    answer == word.to_uppercase()
}

fn random_word(rng: &mut Rng) -> String {
    let len = MIN_WORD + rng.below(MAX_WORD - MIN_WORD + 1);
    (0..len).map(|_| (b'a' + rng.below(26) as u8) as char).collect()
}

/// Disjoint sets of training and held-out words.
fn words(rng: &mut Rng, train: usize, held_out: usize) -> (Vec<String>, Vec<String>) {
    let mut seen = BTreeSet::new();
    let mut all = Vec::new();
    while all.len() < train + held_out {
        let w = random_word(rng);
        if seen.insert(w.clone()) {
            all.push(w);
        }
    }
    let held = all.split_off(train);
    (all, held)
}

/// One SFT answer from the mix the base model learns.
fn mixed_answer(rng: &mut Rng, word: &str) -> String {
    let u = rng.uniform();
    if u < 0.35 {
        word.to_uppercase()
    } else if u < 0.70 {
        word.to_string()
    } else {
        word.to_uppercase().chars().rev().collect()
    }
}

const PAD: &str = "<pad>";
const EOS: &str = "</s>";

/// A character-level tokenizer (BPE with single-character tokens and no merges) as Hugging Face files.
fn write_tokenizer(dir: &Path) -> Result<usize> {
    let mut vocab = serde_json::Map::new();
    vocab.insert(PAD.into(), 0.into());
    vocab.insert(EOS.into(), 1.into());
    let chars: Vec<char> = ('a'..='z').chain('A'..='Z').chain(['=']).collect();
    for (i, c) in chars.iter().enumerate() {
        vocab.insert(c.to_string(), (i + 2).into());
    }
    let special = |id: usize, content: &str| {
        json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true})
    };
    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [special(0, PAD), special(1, EOS)],
        "normalizer": null,
        "pre_tokenizer": null,
        "post_processor": null,
        "decoder": {"type": "Fuse"},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": []}
    });
    let config = json!({"eos_token": EOS, "pad_token": PAD, "bos_token": null, "model_max_length": 64,
                        "tokenizer_class": "PreTrainedTokenizerFast"});
    write_json(&dir.join("tokenizer.json"), &tokenizer)?;
    write_json(&dir.join("tokenizer_config.json"), &config)?;
    Ok(chars.len() + 2)
}

fn write_json(path: &Path, v: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(v).map_err(|e| Error::Train(e.to_string()))? + "\n";
    kto::files::write_atomic(path, text.as_bytes())
}

fn write_jsonl(path: &Path, rows: &[Value]) -> Result<()> {
    let text: String = rows.iter().map(|r| r.to_string() + "\n").collect();
    kto::files::write_atomic(path, text.as_bytes())
}

/// A random 2-layer Llama with the demo tokenizer, saved as a Hugging Face folder.
fn write_random_model(dir: &Path, vocab: usize, seed: u64) -> Result<()> {
    let (hidden, inter, layers, heads, kv_heads) = (64, 192, 2, 4, 2);
    let config = json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab, "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "head_dim": hidden / heads, "hidden_act": "silu", "max_position_embeddings": 64,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": false, "attention_bias": false,
        "mlp_bias": false, "bos_token_id": null, "eos_token_id": 1, "pad_token_id": 0, "dtype": "float32"
    });
    write_json(&dir.join("config.json"), &config)?;
    let spec = ModelSpec::from_config_json(&config.to_string()).map_err(|e| Error::model(dir, e))?;
    let model = kto::model::random::random_model(&spec, seed);
    model.write_safetensors(&dir.join("model.safetensors"))
}

fn train(task: Task, toml: &str) -> Result<PathBuf> {
    let cfg = TrainConfig::from_toml(toml, &[])?;
    let out = cfg.output_dir.clone();
    let mut trainer = Trainer::new_for(task, cfg, &Silent)?;
    trainer.train(&Silent)?;
    Ok(out)
}

fn path_str(p: &Path) -> String {
    p.display().to_string().replace('\\', "/")
}

/// SFT settings shared by the base model and the desirable-only baseline.
fn sft_toml(model: &Path, data: &Path, out: &Path, seed: u64, epochs: f64) -> String {
    format!(
        "model = \"{}\"\ntrain_dataset = \"{}\"\noutput_dir = \"{}\"\noverwrite_output_dir = true\nper_device_train_batch_size = 32\n\
         learning_rate = 3e-3\nlr_scheduler_type = \"cosine\"\nwarmup_ratio = 0.05\nnum_train_epochs = {epochs}\n\
         max_length = 32\nlogging_steps = 10\nsave_strategy = \"no\"\nseed = {seed}\ngradient_checkpointing = false\n\
         disable_tqdm = true\n",
        path_str(model),
        path_str(data),
        path_str(out)
    )
}

fn kto_toml(model: &Path, data: &Path, eval: &Path, out: &Path, seed: u64, desirable_weight: f64) -> String {
    format!(
        "model = \"{m}\"\nref_model = \"{m}\"\ntrain_dataset = \"{}\"\neval_dataset = \"{}\"\noutput_dir = \"{}\"\noverwrite_output_dir = true\n\
         beta = 0.1\ndesirable_weight = {desirable_weight}\nundesirable_weight = 1.0\nper_device_train_batch_size = 32\n\
         learning_rate = 1e-3\nlr_scheduler_type = \"linear\"\nwarmup_ratio = 0.1\nnum_train_epochs = 5\n\
         max_length = 32\nlogging_steps = 5\neval_strategy = \"steps\"\neval_steps = 20\nsave_strategy = \"no\"\n\
         generate_during_eval = true\ngenerate_max_new_tokens = 8\n\
         seed = {seed}\ngradient_checkpointing = false\ndisable_tqdm = true\n",
        path_str(data),
        path_str(eval),
        path_str(out),
        m = path_str(model)
    )
}

/// Samples answers for `prompts` from the model in `dir` (temperature 1, full distribution).
fn answers(dir: &Path, prompts: &[String], samples: usize, seed: u64) -> Result<Vec<(String, String)>> {
    let model = Model::load(dir)?;
    let tok = kto::data::TextTokenizer::load(dir)?;
    let mut ids = Vec::with_capacity(prompts.len() * samples);
    let mut texts = Vec::with_capacity(prompts.len() * samples);
    for p in prompts {
        let encoded = tok.encode(p, true).map_err(|e| Error::Train(format!("demo prompt {p:?}: {e}")))?;
        for _ in 0..samples {
            ids.push(encoded.clone());
            texts.push(p.clone());
        }
    }
    let opts = SamplingOptions { temperature: 1.0, top_k: 0, top_p: 1.0, max_new_tokens: MAX_WORD + 2, seed, ..Default::default() };
    let generated = generate_ids(&model, &ids, tok.eos_id, &opts);
    texts
        .into_iter()
        .zip(generated)
        .map(|(p, g)| Ok((p, tok.decode(&g).map_err(|e| Error::Train(e.to_string()))?)))
        .collect()
}

/// (desirable rate, rate of non-empty answers all in capitals).
fn rates(pairs: &[(String, String)]) -> (f64, f64) {
    let n = pairs.len().max(1) as f64;
    let good = pairs.iter().filter(|(p, a)| is_desirable(p, a)).count() as f64;
    let caps = pairs.iter().filter(|(_, a)| !a.is_empty() && a.chars().all(|c| c.is_ascii_uppercase())).count() as f64;
    (good / n, caps / n)
}

/// Runs the whole demonstration for one seed in `dir`.
pub fn run_seed(dir: &Path, seed: u64, obs: &dyn Observer) -> Result<SeedResult> {
    let t0 = Instant::now();
    let mut rng = demo_rng(seed);
    std::fs::create_dir_all(dir).map_err(|e| Error::file(dir, e))?;
    let init = dir.join("init");
    std::fs::create_dir_all(&init).map_err(|e| Error::file(&init, e))?;
    let vocab = write_tokenizer(&init)?;
    write_random_model(&init, vocab, seed)?;

    let (train_words, held_words) = words(&mut rng, SFT_ROWS.max(KTO_PROMPTS), HELD_OUT);
    let prompt = |w: &String| format!("{w}=");
    let sft_rows: Vec<Value> =
        train_words.iter().take(SFT_ROWS).map(|w| json!({"prompt": prompt(w), "completion": mixed_answer(&mut rng, w)})).collect();
    let sft_path = dir.join("sft_mixed.jsonl");
    write_jsonl(&sft_path, &sft_rows)?;
    let held_prompts: Vec<String> = held_words.iter().map(prompt).collect();

    obs.info(&format!("seed {seed}: SFT of a random model on {} mixed answers", sft_rows.len()));
    let base = train(Task::Sft, &sft_toml(&init, &sft_path, &dir.join("base"), seed, 3.0))?;
    let base_rate = rates(&answers(&base, &held_prompts, SAMPLES_PER_HELD_OUT, seed ^ 0xE7A1)?);

    // The base model answers training prompts (other words than the SFT ones where there are enough); the rule labels.
    let kto_prompts: Vec<String> = train_words.iter().rev().take(KTO_PROMPTS).map(prompt).collect();
    let sampled = answers(&base, &kto_prompts, 1, seed ^ 0x5A3)?;
    let mut kto_rows: Vec<Value> =
        sampled.iter().map(|(p, a)| json!({"prompt": p, "completion": a, "label": is_desirable(p, a)})).collect();
    // Empty answers cannot be trained on (KTO needs a completion): the base model almost never gives one.
    kto_rows.retain(|r| !r["completion"].as_str().unwrap_or("").is_empty());
    rng.shuffle(&mut kto_rows);
    let kto_path = dir.join("kto.jsonl");
    write_jsonl(&kto_path, &kto_rows)?;
    let n_desirable = kto_rows.iter().filter(|r| r["label"] == true).count();
    let n_undesirable = kto_rows.len() - n_desirable;
    // Held-out prompts with the base model's labelled answers: the eval curves of the KTO runs.
    let eval_pairs = answers(&base, &held_prompts[..100], 1, seed ^ 0xE7A2)?;
    let eval_rows: Vec<Value> = eval_pairs
        .iter()
        .filter(|(_, a)| !a.is_empty())
        .map(|(p, a)| json!({"prompt": p, "completion": a, "label": is_desirable(p, a)}))
        .collect();
    let eval_path = dir.join("kto_eval.jsonl");
    write_jsonl(&eval_path, &eval_rows)?;

    obs.info(&format!("seed {seed}: KTO on {} labelled answers ({n_desirable} desirable)", kto_rows.len()));
    let kto = train(Task::Kto, &kto_toml(&base, &kto_path, &eval_path, &dir.join("kto"), seed, 1.0))?;
    crate::app::plot::plot_run(&kto)?;
    let kto_rate = rates(&answers(&kto, &held_prompts, SAMPLES_PER_HELD_OUT, seed ^ 0xE7A1)?);

    // Imbalance: keep every undesirable answer and one desirable in ten; weight desirable rows so that
    // desirable_weight·n_D / n_U = 1 (the paper's recommended range is [1, 4/3]).
    let mut kept = 0usize;
    let imbalanced: Vec<Value> = kto_rows
        .iter()
        .filter(|r| {
            if r["label"] == true {
                kept += 1;
                kept % 10 == 1
            } else {
                true
            }
        })
        .cloned()
        .collect();
    let kept_desirable = imbalanced.iter().filter(|r| r["label"] == true).count().max(1);
    let weight = (n_undesirable as f64 / kept_desirable as f64).max(1.0);
    let imb_path = dir.join("kto_10pct.jsonl");
    write_jsonl(&imb_path, &imbalanced)?;
    obs.info(&format!("seed {seed}: KTO with {kept_desirable} desirable answers kept, desirable_weight {weight:.2}"));
    let kto10 = train(Task::Kto, &kto_toml(&base, &imb_path, &eval_path, &dir.join("kto_10pct"), seed, weight))?;
    let kto10_rate = rates(&answers(&kto10, &held_prompts, SAMPLES_PER_HELD_OUT, seed ^ 0xE7A1)?);

    let good: Vec<Value> = kto_rows
        .iter()
        .filter(|r| r["label"] == true)
        .map(|r| json!({"prompt": r["prompt"], "completion": r["completion"]}))
        .collect();
    let good_path = dir.join("sft_desirable.jsonl");
    write_jsonl(&good_path, &good)?;
    obs.info(&format!("seed {seed}: SFT of the base model on the {} desirable answers alone", good.len()));
    let sft_good = train(Task::Sft, &sft_toml(&base, &good_path, &dir.join("sft_desirable"), seed, 2.0))?;
    let sft_rate = rates(&answers(&sft_good, &held_prompts, SAMPLES_PER_HELD_OUT, seed ^ 0xE7A1)?);

    let result = SeedResult {
        seed,
        rates: [base_rate.0, kto_rate.0, kto10_rate.0, sft_rate.0],
        capitals: [base_rate.1, kto_rate.1, kto10_rate.1, sft_rate.1],
        kto_rows: kto_rows.len(),
        kto_desirable: n_desirable,
        seconds: t0.elapsed().as_secs_f64(),
    };
    obs.info(&format!(
        "seed {seed}: desirable rate on held-out prompts: base {:.3}, KTO {:.3}, KTO 10% {:.3}, SFT desirable {:.3} ({:.0} s)",
        result.rates[0], result.rates[1], result.rates[2], result.rates[3], result.seconds
    ));
    Ok(result)
}

/// Mean and (population) standard deviation.
fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len().max(1) as f64;
    let mean = v.iter().sum::<f64>() / n;
    (mean, (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n).sqrt())
}

/// The results table (Markdown), as printed and written to `results.md`.
pub fn table(results: &[SeedResult]) -> String {
    let seeds: Vec<String> = results.iter().map(|r| r.seed.to_string()).collect();
    let mut s = format!(
        "| model | desirable rate (mean ± sd) | per seed ({}) | answers in capitals (mean) |\n|---|---|---|---|\n",
        seeds.join(", ")
    );
    for (i, name) in VARIANTS.iter().enumerate() {
        let rates: Vec<f64> = results.iter().map(|r| r.rates[i]).collect();
        let caps: Vec<f64> = results.iter().map(|r| r.capitals[i]).collect();
        let (m, sd) = mean_std(&rates);
        let per: Vec<String> = rates.iter().map(|r| format!("{r:.3}")).collect();
        s += &format!("| {name} | {m:.3} ± {sd:.3} | {} | {:.3} |\n", per.join(" / "), mean_std(&caps).0);
    }
    s
}

/// Runs every seed into `opts.out/seed-N`, then writes `results.json`, `results.md` and `desirable_rates.svg`.
pub fn run(opts: &DemoOptions, obs: &dyn Observer) -> Result<Vec<SeedResult>> {
    std::fs::create_dir_all(&opts.out).map_err(|e| Error::file(&opts.out, e))?;
    let mut results = Vec::new();
    for &seed in &opts.seeds {
        results.push(run_seed(&opts.out.join(format!("seed-{seed}")), seed, obs)?);
    }
    let json_rows: Vec<Value> = results
        .iter()
        .map(|r| {
            let rates: serde_json::Map<String, Value> = VARIANTS.iter().zip(r.rates).map(|(k, v)| (k.to_string(), v.into())).collect();
            let caps: serde_json::Map<String, Value> = VARIANTS.iter().zip(r.capitals).map(|(k, v)| (k.to_string(), v.into())).collect();
            json!({"seed": r.seed, "desirable_rate": rates, "capitals_rate": caps, "kto_rows": r.kto_rows,
                   "kto_desirable": r.kto_desirable, "seconds": r.seconds})
        })
        .collect();
    write_json(&opts.out.join("results.json"), &Value::Array(json_rows))?;
    kto::files::write_atomic(&opts.out.join("results.md"), table(&results).as_bytes())?;
    let groups: Vec<(String, Vec<f64>)> = ["base", "KTO", "KTO 10% desirable", "SFT desirable"]
        .iter()
        .enumerate()
        .map(|(i, l)| (l.to_string(), results.iter().map(|r| r.rates[i]).collect()))
        .collect();
    crate::app::plot::plot_rates(&opts.out.join("desirable_rates.svg"), "capitalise the word: desirable answers on held-out prompts", &groups)?;
    Ok(results)
}
