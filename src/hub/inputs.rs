//! A config's inputs named by hub ID, replaced by the local paths they resolve to before anything is read.
use super::{is_hub_id, Hub};
use crate::config::{Strategy, TrainConfig};
use crate::dist::Ranks;
use crate::error::Result;
use crate::train::Observer;
use std::path::PathBuf;

/// Resolves `model`, `ref_model` and `tokenizer` (at `model_revision`) when they are hub IDs and not local
/// folders, and `dataset_name`'s splits into `train_dataset` and (when evaluation is on and no
/// `eval_dataset` is set) `eval_dataset`. Over MPI the first rank downloads while the others wait, then
/// they read its cache.
pub fn resolve_inputs(cfg: &mut TrainConfig, obs: &dyn Observer, ranks: &Ranks) -> Result<()> {
    if !needs_hub(cfg) {
        return Ok(());
    }
    let mut hub = Hub::from_env();
    if ranks.size() > 1 {
        let root_result = if ranks.is_root() { resolve(cfg, &hub, obs) } else { Ok(()) };
        // Every rank reaches the barrier, so a failed download on the first does not leave the others waiting.
        ranks.barrier();
        if ranks.is_root() {
            return root_result;
        }
        hub.offline = true;
    }
    resolve(cfg, &hub, obs)
}

fn needs_hub(cfg: &TrainConfig) -> bool {
    let remote = |p: &PathBuf| !p.exists() && is_hub_id(&p.to_string_lossy());
    cfg.dataset_name.is_some() || remote(&cfg.model) || cfg.ref_model.as_ref().is_some_and(remote) || cfg.tokenizer.as_ref().is_some_and(remote)
}

fn resolve(cfg: &mut TrainConfig, hub: &Hub, obs: &dyn Observer) -> Result<()> {
    let revision = cfg.model_revision.clone();
    let model = |p: &mut PathBuf| -> Result<()> {
        let id = p.to_string_lossy().to_string();
        if !p.exists() && is_hub_id(&id) {
            *p = hub.model(&id, &revision, obs)?;
            obs.info(&format!("{id}: {}", p.display()));
        }
        Ok(())
    };
    model(&mut cfg.model)?;
    if let Some(p) = cfg.ref_model.as_mut() {
        model(p)?;
    }
    if let Some(p) = cfg.tokenizer.as_mut() {
        model(p)?;
    }
    if let Some(name) = cfg.dataset_name.clone() {
        let config = cfg.dataset_config.clone();
        cfg.train_dataset = hub.dataset_split(&name, config.as_deref(), &cfg.dataset_train_split, obs)?;
        if cfg.eval_strategy != Strategy::No && cfg.eval_dataset.is_none() {
            cfg.eval_dataset = Some(hub.dataset_split(&name, config.as_deref(), &cfg.dataset_test_split, obs)?);
        }
    }
    Ok(())
}
