//! The command line: a thin shell over the library. Errors come back as one line and a non-zero exit.
use kto::config::TrainConfig;
use kto::train::{Observer, Task, Trainer};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Map, Value};
use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "kto", version, about = "KTO alignment of causal language models, step for step like TRL's KTOTrainer")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// A config file and keys given on the command line, in any order; later ones win.
#[derive(clap::Args)]
pub struct ConfigArgs {
    /// `[CONFIG] [--config FILE] [--set KEY=VALUE]... [--KEY VALUE | --KEY=VALUE | --FLAG]...`: CONFIG is a TOML
    /// file or a TRL YAML recipe (.yaml/.yml); `--KEY VALUE` sets a key as TRL's command line does (a flag
    /// alone is true, several values a list), `--set KEY=VALUE` as TOML.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, value_name = "ARGS")]
    args: Vec<String>,
}

impl ConfigArgs {
    fn load(&self, purpose: kto::config::Purpose) -> anyhow::Result<TrainConfig> {
        let (file, overrides) = parse_config_args(&self.args)?;
        Ok(match file {
            Some(path) => TrainConfig::load_for(purpose, &path, &overrides)?,
            None if overrides.is_empty() => anyhow::bail!(
                "give a config file (TOML, or a TRL YAML recipe) or TRL-style keys, e.g. --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --dataset_name trl-lib/kto-mix-14k"
            ),
            None => TrainConfig::from_table_for(purpose, toml::Table::new(), &overrides)?,
        })
    }
}

/// The config file and the `KEY=VALUE` overrides in `args` (see `ConfigArgs`).
fn parse_config_args(args: &[String]) -> anyhow::Result<(Option<PathBuf>, Vec<String>)> {
    let (mut file, mut overrides) = (None::<PathBuf>, Vec::new());
    let mut i = 0;
    while i < args.len() {
        let arg = &args[i];
        i += 1;
        let Some(flag) = arg.strip_prefix("--") else {
            if file.is_some() {
                anyhow::bail!("unexpected argument {arg:?}: one config file, then --KEY VALUE pairs");
            }
            file = Some(PathBuf::from(arg));
            continue;
        };
        let (key, inline) = match flag.split_once('=') {
            Some((k, v)) => (k.replace('-', "_"), Some(v.to_string())),
            None => (flag.replace('-', "_"), None),
        };
        let mut values: Vec<String> = inline.into_iter().collect();
        if values.is_empty() {
            while i < args.len() && !args[i].starts_with("--") {
                values.push(args[i].clone());
                i += 1;
            }
        }
        match (key.as_str(), values.as_slice()) {
            ("config", [path]) if file.is_none() => file = Some(PathBuf::from(path)),
            ("config", _) => anyhow::bail!("--config takes one file (and only one config file is read)"),
            ("set", [kv]) => overrides.push(kv.clone()),
            ("set", _) => anyhow::bail!("--set takes one KEY=VALUE"),
            ("", _) => anyhow::bail!("unexpected argument \"--\""),
            (_, []) => overrides.push(format!("{key}=true")),
            (_, [one]) => overrides.push(format!("{key}={one}")),
            (_, many) => overrides.push(format!("{key}=[{}]", many.iter().map(|v| Value::String(v.clone()).to_string()).collect::<Vec<_>>().join(", "))),
        }
    }
    Ok((file, overrides))
}

#[derive(Subcommand)]
pub enum Command {
    /// Train a policy with KTO from a config whose keys are TRL's (KTOConfig, ModelConfig, ScriptArguments): a
    /// TOML file, a TRL YAML recipe, or TRL-style flags, e.g.
    /// `kto train --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --dataset_name trl-lib/kto-mix-14k`.
    Train(ConfigArgs),
    /// Sample completions from a model (KV cache; temperature, top-k, top-p): for one prompt, printed; for a data
    /// file of prompts, written as JSON Lines `{prompt, completion}`.
    Generate(GenerateArgs),
    /// Supervised fine-tuning (next-token loss on completion tokens) from the same TOML config as `train`
    /// ({prompt, completion} rows; learning_rate defaults to SFTConfig's 2e-5).
    Sft(ConfigArgs),
    /// Draw a run's curves (loss, KL, rewards, margins, eval) from OUTPUT_DIR/metrics.jsonl to OUTPUT_DIR/metrics.svg.
    Plot {
        /// The run's output folder.
        output_dir: PathBuf,
    },
    /// The built-in demonstration: a synthetic task judged by a rule; SFT base model, KTO, KTO with 10% of the
    /// desirable answers, SFT on desirable answers; desirable rates on held-out prompts, per seed.
    Demo {
        /// Where to write everything (data, models, metrics, figures, results).
        #[arg(long, default_value = "runs/demo")]
        out: PathBuf,
        /// Seeds to run, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "0,1,2")]
        seeds: Vec<u64>,
    },
    /// Time KTO training steps on a random Llama of the shape shared/peer/bench_trl.py uses.
    Bench(crate::app::bench::BenchOptions),
    /// Fold a LoRA adapter (a PEFT folder, as `kto train` with `use_peft` writes) into its base model and write
    /// a full Hugging Face model folder.
    Merge {
        /// The base model folder.
        #[arg(long)]
        base: PathBuf,
        /// The adapter folder (`adapter_config.json` + `adapter_model.safetensors`).
        #[arg(long)]
        adapter: PathBuf,
        /// Where to write the merged model.
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(clap::Args)]
pub struct GenerateArgs {
    /// The model folder (Hugging Face layout).
    pub model: PathBuf,
    /// A LoRA adapter folder to apply (as `kto train` with `use_peft` writes it).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// One prompt.
    #[arg(long, conflicts_with = "prompts", required_unless_present = "prompts")]
    pub prompt: Option<String>,
    /// A data file of prompts (.jsonl, .json or .parquet), one per row.
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// The column holding each row's prompt (text or a message list).
    #[arg(long, default_value = "prompt")]
    pub prompt_column: String,
    /// Where to write `{prompt, completion}` lines (default: standard output).
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// 0 decodes greedily.
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// 0 keeps the whole vocabulary.
    #[arg(long, default_value_t = 50)]
    pub top_k: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Send text prompts as they are even when the tokenizer has a chat template.
    #[arg(long)]
    pub no_chat_template: bool,
    /// Prompts sampled together (1 to 32): each decode step reads the weights once for all of them.
    #[arg(long, default_value_t = kto::generate::GENERATION_BATCH)]
    pub batch_size: usize,
}

fn run_generate(args: &GenerateArgs) -> anyhow::Result<()> {
    use kto::generate::{content_json, generate_texts, generate_texts_streaming, read_prompts, SamplingOptions};
    use std::io::Write;
    if !(args.temperature >= 0.0 && args.top_p > 0.0 && args.top_p <= 1.0) {
        anyhow::bail!("--temperature must be >= 0 and --top-p in (0, 1]");
    }
    if !(1..=kto::generate::GENERATION_BATCH).contains(&args.batch_size) {
        anyhow::bail!("--batch-size must be 1 to {}", kto::generate::GENERATION_BATCH);
    }
    // Sampling never trains: bf16 weights stay bf16 (the same numbers, half the bytes a token reads).
    let mut model = kto::model::Model::load_frozen(&args.model)?;
    if let Some(adapter) = &args.adapter {
        model.lora = Some(kto::model::lora::Lora::load_peft(adapter, &model.spec)?);
    }
    let tok_dir = match &args.adapter {
        Some(a) if a.join("tokenizer.json").is_file() => a,
        _ => &args.model,
    };
    let tok = kto::data::TextTokenizer::load(tok_dir)?;
    tok.check_fits(model.spec.vocab_size, &args.model)?;
    let prompts = match (&args.prompt, &args.prompts) {
        (Some(p), _) => vec![kto::data::Content::Text(p.clone())],
        (None, Some(path)) => read_prompts(path, &args.prompt_column)?,
        (None, None) => anyhow::bail!("give --prompt TEXT or --prompts FILE"),
    };
    let opts = SamplingOptions {
        temperature: args.temperature,
        top_p: args.top_p,
        top_k: args.top_k,
        max_new_tokens: args.max_new_tokens,
        seed: args.seed,
        batch_size: args.batch_size,
    };
    let chat = !args.no_chat_template;
    if args.prompt.is_some() && args.out.is_none() {
        let completions = generate_texts(&model, &tok, &prompts, chat, &opts).map_err(|e| anyhow::anyhow!("{}: {e}", tok_dir.display()))?;
        println!("{}", completions[0]);
        return Ok(());
    }
    // Lines go out batch by batch: to standard output, or to OUT.partial, renamed to OUT when all are done, so
    // an interrupted run keeps what it sampled and never leaves a file that looks complete.
    let stop = stop_on_signals()?;
    let partial = args.out.as_ref().map(|p| {
        let mut name = p.file_name().unwrap_or_default().to_os_string();
        name.push(".partial");
        p.with_file_name(name)
    });
    let mut file = match &partial {
        Some(p) => Some(std::fs::File::create(p).map_err(|e| kto::Error::file(p, format!("cannot write: {e}")))?),
        None => None,
    };
    let mut write_error = None;
    let mut sink = |first: usize, texts: &[String]| {
        let mut lines = String::new();
        for (p, c) in prompts[first..].iter().zip(texts) {
            lines += &serde_json::json!({"prompt": content_json(p), "completion": c}).to_string();
            lines.push('\n');
        }
        let written = match &mut file {
            Some(f) => f.write_all(lines.as_bytes()).and_then(|_| f.flush()),
            None => std::io::stdout().write_all(lines.as_bytes()),
        };
        if let Err(e) = written {
            write_error = Some(e);
            return false;
        }
        !stop.load(Ordering::SeqCst)
    };
    let made = generate_texts_streaming(&model, &tok, &prompts, chat, &opts, &mut sink)
        .map_err(|e| anyhow::anyhow!("{}: {e}", tok_dir.display()))?;
    let shown = |p: &Option<PathBuf>| p.as_ref().map_or("standard output".to_string(), |p| p.display().to_string());
    if let Some(e) = write_error {
        anyhow::bail!("{}: cannot write: {e}", shown(&partial));
    }
    if made < prompts.len() {
        return Err(kto::Error::StoppedEarly(format!("after {made} of {} completions; they are in {}", prompts.len(), shown(&partial))).into());
    }
    if let (Some(partial), Some(out)) = (&partial, &args.out) {
        std::fs::rename(partial, out).map_err(|e| kto::Error::file(out, format!("cannot move into place: {e}")))?;
        eprintln!("kto: {made} completions written to {}", out.display());
    }
    Ok(())
}

/// Progress on a terminal: a bar with loss and step rate; elsewhere one plain line per log entry, as TRL prints
/// a dict per log step. It also carries the stop request of SIGINT/SIGTERM to the trainer.
struct Console {
    bar: Option<ProgressBar>,
    stop: Arc<AtomicBool>,
    /// The hub file being downloaded, so that without a bar each file is announced once.
    downloading: std::sync::Mutex<String>,
}

/// SIGINT / SIGTERM: the first sets the returned flag (the run stops at the next safe point, with a checkpoint
/// if it has started training) and is acknowledged on stderr; a second one ends the process at once (exit 130).
fn stop_on_signals() -> anyhow::Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        // Registered first, so it sees the flag as the previous signal left it.
        signal_hook::flag::register_conditional_shutdown(signal, 130, stop.clone())?;
        signal_hook::flag::register(signal, stop.clone())?;
    }
    let seen = stop.clone();
    std::thread::spawn(move || {
        while !seen.load(Ordering::SeqCst) {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        eprintln!("kto: stopping at the next safe point (a checkpoint is written if training has started); signal again to stop at once");
    });
    Ok(stop)
}

/// What ranks other than 0 report: nothing, but they stop when asked.
struct QuietRank(Arc<AtomicBool>);
impl Observer for QuietRank {
    fn stop_requested(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

impl Console {
    fn new(enabled: bool) -> Self {
        Self::with_stop(enabled, Arc::new(AtomicBool::new(false)))
    }

    fn with_stop(enabled: bool, stop: Arc<AtomicBool>) -> Self {
        let bar = (enabled && std::io::stderr().is_terminal()).then(|| {
            let bar = ProgressBar::new(0);
            bar.set_style(
                ProgressStyle::with_template("{bar:30} {pos}/{len}  {per_sec}  eta {eta}  {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            bar
        });
        Console { bar, stop, downloading: Default::default() }
    }
    fn line(&self, s: &str) {
        match &self.bar {
            Some(b) => b.println(s),
            None => eprintln!("{s}"),
        }
    }
}

fn fmt_entry(entry: &Map<String, Value>) -> String {
    entry
        .iter()
        .map(|(k, v)| match v.as_f64() {
            Some(x) if v.is_f64() => format!("{k}={x:.6}"),
            _ => format!("{k}={v}"),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

impl Observer for Console {
    fn preparing(&self, path: &std::path::Path, done: usize, total: usize) {
        if let Some(b) = &self.bar {
            if done == 0 {
                b.set_length(total as u64);
                b.set_message(format!("tokenizing {}", path.display()));
            }
            b.set_position(done as u64);
        }
    }
    fn info(&self, msg: &str) {
        self.line(&format!("kto: {msg}"));
    }
    fn warn(&self, msg: &str) {
        self.line(&format!("kto: warning: {msg}"));
    }
    fn downloading(&self, file: &str, done: u64, total: Option<u64>) {
        let size = |t: u64| indicatif::HumanBytes(t).to_string();
        if let Some(b) = &self.bar {
            b.set_length(total.unwrap_or(done));
            b.set_position(done);
            b.set_message(format!("downloading {file} ({} of {})", size(done), total.map(size).unwrap_or("?".into())));
            return;
        }
        let mut last = self.downloading.lock().unwrap_or_else(|e| e.into_inner());
        if *last != file {
            *last = file.to_string();
            eprintln!("kto: downloading {file}{}", total.map(|t| format!(" ({})", size(t))).unwrap_or_default());
        }
    }
    fn start(&self, total: usize) {
        if let Some(b) = &self.bar {
            b.set_length(total as u64);
            b.set_position(0);
            b.reset_eta();
            b.set_message("training");
        }
    }
    fn step(&self, step: usize, loss: f64) {
        if let Some(b) = &self.bar {
            b.set_position(step as u64);
            b.set_message(format!("loss {loss:.4}"));
        }
    }
    fn log(&self, entry: &Map<String, Value>) {
        if self.bar.is_none() {
            self.line(&fmt_entry(entry));
        }
    }
    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
    fn stop_requested(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }
}

/// `kto train` and `kto sft`: load, train with a progress bar, stop cleanly on SIGINT/SIGTERM. Under `mpirun`
/// (with the `mpi` feature) every rank runs this; rank 0 alone reports and writes.
fn run_training(task: Task, cfg: TrainConfig) -> anyhow::Result<()> {
    let ranks = kto::dist::Ranks::from_launcher()?;
    let result = train_on_ranks(task, cfg, &ranks);
    // Only a stop the ranks agreed on (after the same step) ends them all cleanly; any other stops them all.
    let interrupted = |e: &anyhow::Error| matches!(e.downcast_ref::<kto::Error>(), Some(kto::Error::Interrupted { .. }));
    if let (Err(e), true) = (&result, ranks.size() > 1) {
        if interrupted(e) {
            // Every rank stopped after the same step (they agree on it); nothing to abort.
            return result;
        }
        // The other ranks would wait forever in the next collective: stop them all with this error.
        eprintln!("kto: error on rank {} of {}: {e:#}", ranks.rank(), ranks.size());
        ranks.abort(1);
    }
    result
}

fn train_on_ranks(task: Task, cfg: TrainConfig, ranks: &kto::dist::Ranks) -> anyhow::Result<()> {
    // Every rank watches the signals (mpirun forwards SIGTERM to all); the ranks agree on the stop each step.
    let stop = stop_on_signals()?;
    let console = Console::with_stop(!cfg.disable_tqdm && ranks.is_root(), stop.clone());
    let quiet = QuietRank(stop);
    let obs: &dyn Observer = if ranks.is_root() { &console } else { &quiet };
    if ranks.size() > 1 {
        obs.info(&format!("data-parallel over {} MPI ranks", ranks.size()));
    }
    let mut trainer = Trainer::new_on(task, cfg, obs, ranks)?;
    let summary = trainer.train_on(obs, ranks)?;
    let out = trainer.cfg.output_dir.display();
    obs.info(&format!(
        "trained {} steps in {:.1} s, train_loss {:.6}; model and metrics.jsonl in {out}",
        summary.steps, summary.runtime_s, summary.train_loss
    ));
    Ok(())
}

/// The base an adapter names (`base_model_name_or_path`), when it is a folder on this machine (a hub ID cannot
/// be compared with a folder here).
fn adapter_base(adapter: &std::path::Path) -> Option<PathBuf> {
    let text = std::fs::read_to_string(adapter.join("adapter_config.json")).ok()?;
    let v: Value = serde_json::from_str(&text).ok()?;
    let named = PathBuf::from(v.get("base_model_name_or_path")?.as_str()?);
    named.is_dir().then_some(named)
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Train(args) => run_training(Task::Kto, args.load(kto::config::Purpose::Kto)?),
        Command::Sft(args) => run_training(Task::Sft, args.load(kto::config::Purpose::Sft)?),
        Command::Generate(args) => run_generate(&args),
        Command::Demo { out, seeds } => {
            let console = Console::new(false);
            let t = std::time::Instant::now();
            let results = crate::app::demo::run(&crate::app::demo::DemoOptions { out: out.clone(), seeds }, &console)?;
            println!("{}", crate::app::demo::table(&results));
            eprintln!(
                "kto: demo finished in {:.0} s; results.md, results.json, desirable_rates.svg and each seed's runs (seed-N/kto/metrics.svg) in {}",
                t.elapsed().as_secs_f64(),
                out.display()
            );
            Ok(())
        }
        Command::Plot { output_dir } => {
            let path = crate::app::plot::plot_run(&output_dir)?;
            eprintln!("kto: wrote {}", path.display());
            Ok(())
        }
        Command::Bench(opts) => crate::app::bench::run(&opts),
        Command::Merge { base, adapter, out } => {
            for (flag, input) in [("--base", &base), ("--adapter", &adapter)] {
                if kto::output::same_folder(&out, input) {
                    anyhow::bail!("{}: --out is the {flag} folder; write the merged model elsewhere", out.display());
                }
            }
            if let Some(named) = adapter_base(&adapter).filter(|named| !kto::output::same_folder(named, &base)) {
                eprintln!(
                    "kto: warning: {} was trained on {}, not {} (adapter_config.json's base_model_name_or_path); the merge is only right on the same base",
                    adapter.display(),
                    named.display(),
                    base.display()
                );
            }
            let mut model = kto::model::Model::load(&base)?;
            model.lora = Some(kto::model::lora::Lora::load_peft(&adapter, &model.spec)?);
            model.merge_lora();
            // Tokenizer files: the adapter folder's if it has them, else the base model's.
            let tok_dir = if adapter.join("tokenizer.json").is_file() { &adapter } else { &base };
            model.save_pretrained(&out, &base, tok_dir)?;
            eprintln!("kto: merged {} into {}: {}", adapter.display(), base.display(), out.display());
            Ok(())
        }
    }
}
