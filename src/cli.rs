//! The command line: a thin shell over the library. Errors come back as one line and a non-zero exit.
use crate::config::TrainConfig;
use crate::train::{Observer, Trainer};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Map, Value};
use std::io::IsTerminal;
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "kto", version, about = "KTO alignment of causal language models, step for step like TRL's KTOTrainer")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Train a policy with KTO from a TOML config whose keys are TRL's KTOConfig names.
    Train {
        /// The TOML config file.
        config: PathBuf,
        /// Override a config key, e.g. `--set learning_rate=5e-7` (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
    },
    /// Time KTO training steps on a random Llama of the shape shared/peer/bench_trl.py uses.
    Bench(crate::bench::BenchOptions),
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

/// Progress on a terminal: a bar with loss and step rate; elsewhere one plain line per log entry.
struct Console {
    bar: Option<ProgressBar>,
}

impl Console {
    fn new(enabled: bool) -> Self {
        let bar = (enabled && std::io::stderr().is_terminal()).then(|| {
            let bar = ProgressBar::new(0);
            bar.set_style(
                ProgressStyle::with_template("{bar:30} {pos}/{len}  {per_sec}  eta {eta}  {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            bar
        });
        Console { bar }
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
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Train { config, overrides } => {
            let cfg = TrainConfig::load(&config, &overrides)?;
            let console = Console::new(!cfg.disable_tqdm);
            let mut trainer = Trainer::new(cfg, &console)?;
            // Ctrl-C / SIGTERM: finish the current optimizer step, write a checkpoint, stop.
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
                signal_hook::flag::register(signal, stop.clone())?;
            }
            trainer.stop = Some(stop);
            let summary = trainer.train(&console)?;
            let out = trainer.cfg.output_dir.display();
            console.info(&format!(
                "trained {} steps in {:.1} s, train_loss {:.6}; model and metrics.jsonl in {out}",
                summary.steps, summary.runtime_s, summary.train_loss
            ));
            Ok(())
        }
        Command::Bench(opts) => crate::bench::run(&opts),
        Command::Merge { base, adapter, out } => {
            let mut model = crate::model::Model::load(&base)?;
            model.lora = Some(crate::model::lora::Lora::load_peft(&adapter, &model.spec)?);
            model.merge_lora();
            // Tokenizer files: the adapter folder's if it has them, else the base model's.
            let tok_dir = if adapter.join("tokenizer.json").is_file() { &adapter } else { &base };
            model.save_pretrained(&out, &base, tok_dir)?;
            eprintln!("kto: merged {} into {}: {}", adapter.display(), base.display(), out.display());
            Ok(())
        }
    }
}
