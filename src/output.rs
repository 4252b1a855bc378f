//! A run's output folder, kept whole: one process writes it at a time (an OS lock on `.kto.lock`, released by the
//! kernel when the process dies, so a stale lock cannot block), temporaries a killed run left are removed when the
//! next run claims the folder, folders are deleted by renaming them away first, and the final model is moved in
//! with its weights file last, so a weights file in the folder means the folder is complete.
use crate::error::{Error, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

pub const LOCK_FILE: &str = ".kto.lock";

/// Files of a final model folder whose presence means the folder is complete (each is moved in last).
const WEIGHT_FILES: &[&str] = &["model.safetensors", "adapter_model.safetensors"];

/// What an earlier run leaves in an output folder.
const RUN_FILES: &[&str] = &["metrics.jsonl", "metrics.svg", "model.safetensors", "adapter_model.safetensors"];
const RUN_FOLDERS: &[&str] = &["runs", "eval_generations"];

/// The claimed output folder; the lock is held while this lives.
#[derive(Debug)]
pub struct OutputDir {
    pub path: PathBuf,
    _lock: std::fs::File,
}

impl OutputDir {
    /// Creates the folder if needed, takes its lock (failing at once when another process holds it) and removes
    /// the temporaries of killed runs.
    pub fn claim(path: &Path) -> Result<OutputDir> {
        if path.exists() && !path.is_dir() {
            return Err(Error::file(path, "output_dir is a file, not a folder"));
        }
        std::fs::create_dir_all(path).map_err(|e| Error::file(path, format!("cannot create output_dir: {e}")))?;
        let lock_path = path.join(LOCK_FILE);
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(|e| Error::file(&lock_path, format!("cannot write in output_dir: {e}")))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let holder = std::fs::read_to_string(&lock_path).unwrap_or_default();
                let holder = holder.trim();
                return Err(Error::file(
                    path,
                    format!("in use by another kto run{}; wait for it or choose another output_dir", if holder.is_empty() { String::new() } else { format!(" (process {holder})") }),
                ));
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(Error::file(&lock_path, format!("cannot lock: {e}"))),
        }
        file.set_len(0)
            .and_then(|_| write!(file, "{}", std::process::id()))
            .and_then(|_| file.flush())
            .map_err(|e| Error::file(&lock_path, format!("cannot write: {e}")))?;
        let dir = OutputDir { path: path.to_path_buf(), _lock: file };
        dir.remove_stale_temporaries();
        Ok(dir)
    }

    /// Temporaries are dot-names with `.tmp-` (files and checkpoint folders being written) or `.removing-`
    /// (folders being deleted); only the lock holder writes here, so every one of them is a dead run's.
    fn remove_stale_temporaries(&self) {
        for entry in std::fs::read_dir(&self.path).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            if name.starts_with('.') && (name.contains(".tmp-") || name.starts_with(".removing-")) {
                let p = entry.path();
                let _ = if p.is_dir() { std::fs::remove_dir_all(&p) } else { std::fs::remove_file(&p) };
            }
        }
    }

    /// What of an earlier run the folder holds (names, for a message); empty for a fresh folder.
    pub fn earlier_run(&self) -> Vec<String> {
        let mut found: Vec<String> = RUN_FILES.iter().filter(|f| self.path.join(f).is_file()).map(|f| f.to_string()).collect();
        found.extend(crate::checkpoint::list(&self.path).into_iter().map(|(s, _)| format!("checkpoint-{s}")));
        found
    }

    /// `overwrite_output_dir`: removes everything an earlier run left (checkpoints, metrics, final model,
    /// TensorBoard events, samples); other files (the config, reference caches keyed by content) stay.
    pub fn clear_earlier_run(&self) -> Result<()> {
        for (_, dir) in crate::checkpoint::list(&self.path) {
            remove_dir_whole(&dir)?;
        }
        for f in WEIGHT_FILES.iter().chain(RUN_FILES) {
            let p = self.path.join(f);
            if p.is_file() {
                std::fs::remove_file(&p).map_err(|e| Error::file(&p, format!("cannot remove: {e}")))?;
            }
        }
        for d in RUN_FOLDERS {
            let p = self.path.join(d);
            if p.is_dir() {
                remove_dir_whole(&p)?;
            }
        }
        Ok(())
    }

    /// Writes the final model: `write` fills a temporary sibling folder, whose files are then moved into the
    /// output folder with the weights file last. An earlier weights file is removed first, so at every moment
    /// a weights file in the folder belongs to a complete set.
    pub fn publish_final(&self, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
        let tmp = self.path.join(format!(".final.tmp-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(|e| Error::file(&tmp, format!("cannot create: {e}")))?;
        write(&tmp)?;
        crate::fault::pause_point("final-save");
        for f in WEIGHT_FILES {
            let p = self.path.join(f);
            if p.is_file() {
                std::fs::remove_file(&p).map_err(|e| Error::file(&p, format!("cannot replace: {e}")))?;
            }
        }
        let mut names: Vec<std::ffi::OsString> = std::fs::read_dir(&tmp)
            .map_err(|e| Error::file(&tmp, e))?
            .filter_map(|e| e.ok().map(|e| e.file_name()))
            .collect();
        // Weights last; the rest in name order.
        names.sort_by_key(|n| (WEIGHT_FILES.iter().any(|w| n.as_os_str() == *w), n.clone()));
        for name in names {
            let to = self.path.join(&name);
            std::fs::rename(tmp.join(&name), &to).map_err(|e| Error::file(&to, format!("cannot move into place: {e}")))?;
        }
        std::fs::remove_dir(&tmp).map_err(|e| Error::file(&tmp, e))
    }
}

/// Deletes a folder so that a kill at any moment leaves it whole or gone: renamed to a `.removing-` name first
/// (which no reader takes for a checkpoint, and the next claim cleans up), then deleted.
pub fn remove_dir_whole(dir: &Path) -> Result<()> {
    let name = dir.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    let away = dir.with_file_name(format!(".removing-{name}-{}", std::process::id()));
    std::fs::rename(dir, &away).map_err(|e| Error::file(dir, format!("cannot remove: {e}")))?;
    crate::fault::pause_point("rotation");
    std::fs::remove_dir_all(&away).map_err(|e| Error::file(&away, format!("cannot remove: {e}")))
}

/// Two paths that name the same folder (after resolving links), for refusing to write over an input.
pub fn same_folder(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}
