//! Checkpoints: `OUTPUT_DIR/checkpoint-N/` with the model (or adapter), the optimizer state and the run state,
//! written into a temporary folder and renamed into place, so a kill at any moment leaves the previous
//! checkpoints intact and never a half-written one.
use crate::error::{Error, Result};
use crate::output::remove_dir_whole;
use crate::run_identity::RunIdentity;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Everything besides weights and optimizer moments that a resumed run needs to continue bit for bit.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct RunState {
    /// Optimizer steps done.
    pub global_step: usize,
    pub num_tokens: usize,
    pub loss_since_log: f64,
    pub steps_since_log: usize,
    pub total_loss: f64,
    pub epoch_progress: f64,
    /// Per-micro-batch metric values since the last log, in first-insertion order.
    pub pending_metrics: Vec<(String, Vec<f64>)>,
    /// The optimizer's step counter (AdamW bias correction).
    pub optimizer_steps: u64,
    /// The best value of `metric_for_best_model` so far, and the step it was evaluated at.
    #[serde(default)]
    pub best_metric: Option<f64>,
    #[serde(default)]
    pub best_global_step: Option<usize>,
}

pub const STATE_FILE: &str = "trainer_state.json";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";

pub fn checkpoint_dir(output_dir: &Path, step: usize) -> PathBuf {
    output_dir.join(format!("checkpoint-{step}"))
}

/// The completed checkpoints in `output_dir`, oldest first.
pub fn list(output_dir: &Path) -> Vec<(usize, PathBuf)> {
    let mut found: Vec<(usize, PathBuf)> = std::fs::read_dir(output_dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let step = name.strip_prefix("checkpoint-")?.parse::<usize>().ok()?;
            let path = e.path();
            path.join(STATE_FILE).is_file().then_some((step, path))
        })
        .collect();
    found.sort();
    found
}

/// Writes a checkpoint through `write_contents` (which fills the given folder) into a temporary folder, then
/// renames it to `checkpoint-N`; keeps at most `keep` checkpoints (oldest removed), never the best one
/// (`state.best_global_step`): as transformers, it counts as the newest, and with `keep = 1` two are kept while the
/// best is not the newest.
pub fn save(
    output_dir: &Path,
    state: &RunState,
    keep: Option<usize>,
    write_contents: impl FnOnce(&Path) -> Result<()>,
) -> Result<PathBuf> {
    let final_dir = checkpoint_dir(output_dir, state.global_step);
    let tmp = output_dir.join(format!(".checkpoint-{}.tmp-{}", state.global_step, std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| Error::file(&tmp, format!("cannot create: {e}")))?;
    write_contents(&tmp)?;
    let text = serde_json::to_string_pretty(state).map_err(|e| Error::Train(e.to_string()))?;
    crate::files::write_atomic(&tmp.join(STATE_FILE), text.as_bytes())?;
    if final_dir.exists() {
        remove_dir_whole(&final_dir)?;
    }
    std::fs::rename(&tmp, &final_dir).map_err(|e| Error::file(&final_dir, format!("cannot rename checkpoint into place: {e}")))?;
    if let Some(keep) = keep {
        let mut all = list(output_dir);
        let mut keep = keep.max(1);
        if let Some(best) = all.iter().position(|(step, _)| Some(*step) == state.best_global_step) {
            if keep == 1 && best + 1 != all.len() {
                keep = 2;
            }
            let entry = all.remove(best);
            all.push(entry);
        }
        for (_, old) in all.iter().take(all.len().saturating_sub(keep)) {
            remove_dir_whole(old)?;
        }
    }
    Ok(final_dir)
}

pub fn load_state(dir: &Path) -> Result<RunState> {
    let path = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| Error::file(&path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::file(&path, format!("invalid trainer state: {e}")))
}

/// Which checkpoint `resume_from_checkpoint` names: a path, or `true` for the latest in `output_dir`; either way
/// it must belong to the run `identity` describes.
pub fn resolve(setting: &toml::Value, output_dir: &Path, identity: &RunIdentity) -> Result<Option<PathBuf>> {
    let dir = match setting {
        toml::Value::Boolean(false) => return Ok(None),
        toml::Value::Boolean(true) => match list(output_dir).pop() {
            Some((_, dir)) => dir,
            None => {
                return Err(Error::Config(format!(
                    "resume_from_checkpoint = true but {} holds no checkpoint",
                    output_dir.display()
                )))
            }
        },
        toml::Value::String(p) => {
            let dir = PathBuf::from(p);
            if !dir.join(STATE_FILE).is_file() {
                return Err(Error::file(&dir, format!("not a checkpoint (no {STATE_FILE})")));
            }
            dir
        }
        other => return Err(Error::Config(format!("resume_from_checkpoint must be a path or true, got {other}"))),
    };
    identity.check_checkpoint(&dir)?;
    Ok(Some(dir))
}
