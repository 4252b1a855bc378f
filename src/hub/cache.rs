//! The Hugging Face cache as `huggingface_hub` lays it out, so transformers, datasets and kto share one:
//! `{models|datasets}--org--name/` with `refs/<revision>` (the commit a branch or tag pointed at),
//! `blobs/<etag>` (each file's bytes once) and `snapshots/<commit>/<path>` (links to the blobs).
use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

/// Whether a repository holds a model or a data set (they live in different namespaces).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepoKind {
    Model,
    Dataset,
}

impl RepoKind {
    /// The folder prefix in the cache and the word in API paths.
    pub fn plural(self) -> &'static str {
        match self {
            RepoKind::Model => "models",
            RepoKind::Dataset => "datasets",
        }
    }
}

/// One repository's folder in the cache.
pub struct RepoCache {
    pub dir: PathBuf,
}

impl RepoCache {
    pub fn new(cache: &Path, kind: RepoKind, id: &str) -> RepoCache {
        RepoCache { dir: cache.join(format!("{}--{}", kind.plural(), id.replace('/', "--"))) }
    }

    /// The commit `revision` names: itself when it is a commit hash, else what `refs/<revision>` holds.
    pub fn commit_of(&self, revision: &str) -> Option<String> {
        if is_commit(revision) {
            return Some(revision.to_string());
        }
        let text = std::fs::read_to_string(self.dir.join("refs").join(revision)).ok()?;
        Some(text.trim().to_string()).filter(|c| is_commit(c))
    }

    pub fn set_ref(&self, revision: &str, commit: &str) -> Result<()> {
        if revision == commit {
            return Ok(());
        }
        let path = self.dir.join("refs").join(revision);
        make_dir(path.parent().unwrap_or(&self.dir))?;
        crate::files::write_atomic(&path, commit.as_bytes())
    }

    pub fn snapshot(&self, commit: &str) -> PathBuf {
        self.dir.join("snapshots").join(commit)
    }

    pub fn blob(&self, etag: &str) -> PathBuf {
        self.dir.join("blobs").join(etag)
    }

    /// Holds huggingface_hub's lock of a blob (`<cache>/.locks/<repo folder>/<etag>.lock`) until dropped,
    /// waiting while another process holds it.
    pub fn lock(&self, cache: &Path, etag: &str) -> Result<std::fs::File> {
        let folder = self.dir.file_name().unwrap_or_default();
        let path = cache.join(".locks").join(folder).join(format!("{etag}.lock"));
        make_dir(path.parent().unwrap_or(cache))?;
        let file = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&path).map_err(|e| Error::file(&path, e))?;
        file.lock().map_err(|e| Error::file(&path, format!("cannot lock: {e}")))?;
        Ok(file)
    }

    /// Makes `snapshots/<commit>/<file>` point at `blobs/<etag>` (a relative link, as huggingface_hub makes
    /// it, so the cache can be moved).
    pub fn link(&self, commit: &str, file: &str, etag: &str) -> Result<PathBuf> {
        let path = self.snapshot(commit).join(file);
        make_dir(path.parent().unwrap_or(&self.dir))?;
        let up = "../".repeat(file.matches('/').count() + 2);
        let target = PathBuf::from(format!("{up}blobs/{etag}"));
        let tmp = path.with_file_name(format!(".{}.link-{}", path.file_name().unwrap_or_default().to_string_lossy(), std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        symlink(&target, &tmp).and_then(|_| std::fs::rename(&tmp, &path)).map_err(|e| Error::file(&path, format!("cannot link to the cached file: {e}")))?;
        Ok(path)
    }

    /// The files of a snapshot, as repository paths (`data/train-00000-of-00001.parquet`), sorted.
    pub fn snapshot_files(&self, commit: &str) -> Vec<String> {
        walk(&self.snapshot(commit))
    }
}

/// The files under `root` (links followed), as `/`-separated paths relative to it, sorted.
pub fn walk(root: &Path) -> Vec<String> {
    let mut files = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else if let (true, Ok(rel)) = (path.is_file(), path.strip_prefix(root)) {
                files.push(rel.to_string_lossy().replace('\\', "/"));
            }
        }
    }
    files.sort();
    files
}

/// A 40-digit hexadecimal commit hash.
pub fn is_commit(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

pub fn make_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::file(dir, format!("cannot create folder: {e}")))
}

#[cfg(unix)]
fn symlink(target: &Path, link: &Path) -> std::io::Result<()> {
    std::os::unix::fs::symlink(target, link)
}

#[cfg(not(unix))]
fn symlink(target: &Path, link: &Path) -> std::io::Result<()> {
    // Without symbolic links (as huggingface_hub on Windows without developer mode) the snapshot holds a copy.
    let blob = link.parent().map(|p| p.join(target)).unwrap_or_else(|| target.to_path_buf());
    std::fs::copy(blob, link).map(|_| ())
}
