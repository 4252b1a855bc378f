//! Models and data sets named by Hugging Face hub ID (`org/name`), as users' other tools find them: a local
//! path first; then the Hugging Face cache (`HF_HUB_CACHE`, else `HF_HOME/hub`, else
//! `~/.cache/huggingface/hub`); then, unless `HF_HUB_OFFLINE` is set, a download from `HF_ENDPOINT` (default
//! the public hub) with `HF_TOKEN`, into that same cache (`cache`), resumable (`http`). Data sets resolve to
//! the files of one split (`dataset_files`).
pub mod cache;
pub mod dataset_files;
mod http;
mod inputs;

pub use cache::RepoKind;
pub use inputs::resolve_inputs;

use crate::error::{Error, Result};
use crate::train::Observer;
use cache::{make_dir, RepoCache};
use http::{Client, Failure, RepoInfo};
use std::path::{Path, PathBuf};

/// Where the hub is and how to reach it, from the environment as huggingface_hub reads it.
pub struct Hub {
    pub endpoint: String,
    pub token: Option<String>,
    pub offline: bool,
    pub cache: PathBuf,
}

/// Files of a model repository kto reads: config, tokenizer and generation files, chat templates and the
/// safetensors weights (not `.bin`, ONNX or GGUF copies).
fn wanted_model_file(f: &str) -> bool {
    !f.contains('/') && [".json", ".safetensors", ".jinja", ".txt"].iter().any(|e| f.ends_with(e))
}

impl Hub {
    pub fn from_env() -> Hub {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        let home = var("HF_HOME").map(PathBuf::from).unwrap_or_else(|| {
            let base = var("XDG_CACHE_HOME").map(PathBuf::from).or_else(|| var("HOME").map(|h| Path::new(&h).join(".cache")));
            base.unwrap_or_else(|| PathBuf::from(".cache")).join("huggingface")
        });
        let token_file = var("HF_TOKEN_PATH").map(PathBuf::from).unwrap_or_else(|| home.join("token"));
        let token = var("HF_TOKEN").or_else(|| std::fs::read_to_string(token_file).ok().map(|t| t.trim().to_string()).filter(|t| !t.is_empty()));
        let offline = var("HF_HUB_OFFLINE").is_some_and(|v| ["1", "on", "yes", "true"].contains(&v.to_ascii_lowercase().as_str()));
        Hub {
            endpoint: var("HF_ENDPOINT").unwrap_or_else(|| "https://huggingface.co".into()).trim_end_matches('/').to_string(),
            token,
            offline,
            cache: var("HF_HUB_CACHE").map(PathBuf::from).unwrap_or_else(|| home.join("hub")),
        }
    }

    /// The local folder of model `id` at `revision` (its snapshot in the cache), downloaded if need be.
    pub fn model(&self, id: &str, revision: &str, obs: &dyn Observer) -> Result<PathBuf> {
        let repo = RepoCache::new(&self.cache, RepoKind::Model, id);
        let cached = || repo.commit_of(revision).map(|c| repo.snapshot(&c)).filter(|s| s.join("config.json").is_file());
        let Some(info) = self.revision_or_cache(RepoKind::Model, id, revision, &repo, || cached().is_some(), obs)? else {
            return Ok(cached().expect("checked by revision_or_cache"));
        };
        let files: Vec<&String> = info.files.iter().filter(|f| wanted_model_file(f)).collect();
        if !files.iter().any(|f| f.ends_with(".safetensors")) {
            return Err(hub_error(id, "has no .safetensors weights (kto reads only safetensors checkpoints)"));
        }
        let client = self.client();
        for file in files {
            self.fetch(&client, &repo, RepoKind::Model, id, &info.commit, file, obs)?;
        }
        Ok(repo.snapshot(&info.commit))
    }

    /// The data files of one split of data set `id` (a local folder laid out as a hub data set also works):
    /// one file, or a pattern (`…/data/train-*`) that `data::read_dataset` expands.
    pub fn dataset_split(&self, id: &str, config: Option<&str>, split: &str, obs: &dyn Observer) -> Result<PathBuf> {
        let local = Path::new(id);
        // One local file is the "train" split, as `datasets` loads a data file.
        if local.is_file() {
            return match split {
                "train" => Ok(local.to_path_buf()),
                _ => Err(Error::file(local, format!("one data file holds only the \"train\" split, not {split:?}; name a folder, or set train_dataset/eval_dataset"))),
            };
        }
        if local.is_dir() {
            let files = cache::walk(local);
            let card = std::fs::read_to_string(local.join("README.md")).ok();
            let found = dataset_files::split_files(card.as_deref(), &files, config, split).map_err(|m| Error::file(local, m))?;
            let found = found.ok_or_else(|| Error::file(local, format!("no data file of split {split:?} (data/{split}-*.parquet, {split}.jsonl, ...)")))?;
            return files_as_path(local, &found, &files).map_err(|m| Error::file(local, m));
        }
        let repo = RepoCache::new(&self.cache, RepoKind::Dataset, id);
        let revision = "main";
        let cached_commit = || repo.commit_of(revision).filter(|c| repo.snapshot(c).is_dir());
        let info = match self.revision_or_cache(RepoKind::Dataset, id, revision, &repo, || cached_commit().is_some(), obs)? {
            Some(info) => info,
            None => {
                // From the cache alone: the split's files as the snapshot holds them.
                let commit = cached_commit().expect("checked by revision_or_cache");
                let files = repo.snapshot_files(&commit);
                let card = std::fs::read_to_string(repo.snapshot(&commit).join("README.md")).ok();
                let found = dataset_files::split_files(card.as_deref(), &files, config, split).map_err(|m| hub_error(id, m))?;
                let found = found.ok_or_else(|| hub_error(id, format!("split {split:?} is not in the cache ({}) and HF_HUB_OFFLINE is set", repo.dir.display())))?;
                return files_as_path(&repo.snapshot(&commit), &found, &files).map_err(|m| hub_error(id, m));
            }
        };
        let client = self.client();
        let card = match info.files.iter().any(|f| f == "README.md") {
            true => std::fs::read_to_string(self.fetch(&client, &repo, RepoKind::Dataset, id, &info.commit, "README.md", obs)?).ok(),
            false => None,
        };
        let (info, found) = match dataset_files::split_files(card.as_deref(), &info.files, config, split).map_err(|m| hub_error(id, m))? {
            Some(found) => (info, found),
            None => {
                // No data files by card or name: the hub's own Parquet conversion of the data set.
                let converted = "refs/convert/parquet";
                let parquet = client.revision(RepoKind::Dataset, id, converted).map_err(|f| self.describe(id, converted, f))?;
                let found = dataset_files::converted_split_files(&parquet.files, config, split);
                if found.is_empty() {
                    return Err(hub_error(id, format!("no data files of split {split:?}{} (by its card, file names or Parquet conversion)", config.map(|c| format!(" in config {c:?}")).unwrap_or_default())));
                }
                repo.set_ref(converted, &parquet.commit)?;
                (parquet, found)
            }
        };
        for file in &found {
            if !dataset_files::is_data_file(file) {
                return Err(hub_error(id, format!("{file}: kto reads .parquet, .jsonl and .json data files")));
            }
            self.fetch(&client, &repo, RepoKind::Dataset, id, &info.commit, file, obs)?;
        }
        files_as_path(&repo.snapshot(&info.commit), &found, &info.files).map_err(|m| hub_error(id, m))
    }

    fn client(&self) -> Client {
        Client::new(&self.endpoint, self.token.clone())
    }

    /// The repository at `revision` from the hub, recording the commit in the cache; `None` when the cache
    /// serves it instead (offline, or the hub cannot be reached and `in_cache()`).
    fn revision_or_cache(&self, kind: RepoKind, id: &str, revision: &str, repo: &RepoCache, in_cache: impl Fn() -> bool, obs: &dyn Observer) -> Result<Option<RepoInfo>> {
        if self.offline {
            if in_cache() {
                return Ok(None);
            }
            return Err(hub_error(id, format!("not in the Hugging Face cache ({}) and HF_HUB_OFFLINE is set: run once online, or unset HF_HUB_OFFLINE", repo.dir.display())));
        }
        match self.client().revision(kind, id, revision) {
            Ok(info) => {
                repo.set_ref(revision, &info.commit)?;
                Ok(Some(info))
            }
            Err(Failure::Network(e)) if in_cache() => {
                obs.warn(&format!("{id}: cannot reach {} ({e}); using the cached copy", self.endpoint));
                Ok(None)
            }
            Err(failure) => Err(self.describe(id, revision, failure)),
        }
    }

    /// `snapshots/<commit>/<file>`, downloaded into a blob first when the snapshot lacks it.
    #[allow(clippy::too_many_arguments)]
    fn fetch(&self, client: &Client, repo: &RepoCache, kind: RepoKind, id: &str, commit: &str, file: &str, obs: &dyn Observer) -> Result<PathBuf> {
        let in_snapshot = repo.snapshot(commit).join(file);
        if in_snapshot.is_file() {
            return Ok(in_snapshot);
        }
        let url = client.file_url(kind, id, commit, file);
        let meta = client.file_meta(&url).map_err(|f| self.describe(&format!("{id}/{file}"), commit, f))?;
        let blob = repo.blob(&meta.etag);
        let complete = || std::fs::metadata(&blob).is_ok_and(|m| meta.size.is_none_or(|s| m.len() == s));
        // Another process downloading the same file (kto, or transformers: huggingface_hub locks the same
        // file with flock) finishes first; the blob is then there.
        let _lock = if complete() { None } else { Some(repo.lock(&self.cache, &meta.etag)?) };
        if !complete() {
            make_dir(blob.parent().unwrap_or(&repo.dir))?;
            let partial = blob.with_file_name(format!("{}.incomplete", meta.etag));
            let name = format!("{id}/{file}");
            client.download(&url, &partial, |done, total| obs.downloading(&name, done, total.or(meta.size))).map_err(|f| self.describe(&name, commit, f))?;
            let got = std::fs::metadata(&partial).map(|m| m.len()).unwrap_or(0);
            if meta.size.is_some_and(|s| s != got) {
                return Err(hub_error(&name, format!("downloaded {got} bytes, the hub announced {}; run again to resume", meta.size.unwrap_or(0))));
            }
            std::fs::rename(&partial, &blob).map_err(|e| Error::file(&blob, format!("cannot move the download into place: {e}")))?;
        }
        repo.link(commit, file, &meta.etag)
    }

    /// A failed request as one line that says what to do.
    fn describe(&self, what: &str, revision: &str, failure: Failure) -> Error {
        let msg = match failure {
            Failure::Status(401) => "the hub refused access (401): the repository is private or gated, or does not exist; set HF_TOKEN to a token that may read it".to_string(),
            Failure::Status(403) => format!("access denied (403): a gated repository; accept its conditions on {}/{} and set HF_TOKEN", self.endpoint, what),
            Failure::Status(404) => format!("not on {} (404) at revision {revision:?}, and no such local folder: check the ID and the revision", self.endpoint),
            Failure::Status(s) => format!("the hub at {} answered {s}", self.endpoint),
            Failure::Interrupted(e) => format!("{e}; run again to resume it"),
            Failure::Network(e) => format!("cannot reach {} ({e}): check the connection and HF_ENDPOINT, or set HF_HUB_OFFLINE=1 to use only the cache", self.endpoint),
        };
        hub_error(what, msg)
    }
}

/// `owner/name` as the hub spells repository IDs (and not a path that merely has one slash, like `./x`).
pub fn is_hub_id(s: &str) -> bool {
    let ok = |part: &str| !part.is_empty() && !part.starts_with('.') && part.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    matches!(s.split_once('/'), Some((owner, name)) if ok(owner) && ok(name) && !name.contains('/'))
}

fn hub_error(what: &str, msg: impl std::fmt::Display) -> Error {
    Error::Hub { id: what.to_string(), msg: msg.to_string() }
}

/// The split's files (repository paths under `root`) as one path: the file itself, or `dir/prefix*` when
/// that pattern names exactly them among `all` files.
fn files_as_path(root: &Path, found: &[String], all: &[String]) -> std::result::Result<PathBuf, String> {
    if let [one] = found {
        return Ok(root.join(one));
    }
    let dir = |f: &str| f.rsplit_once('/').map(|(d, _)| d.to_string()).unwrap_or_default();
    let first_dir = dir(&found[0]);
    let names: Vec<&str> = found.iter().map(|f| f.rsplit('/').next().unwrap_or(f)).collect();
    let mut prefix = names[0].to_string();
    for n in &names[1..] {
        while !n.starts_with(&prefix) {
            prefix.pop();
        }
    }
    let pattern = |prefix: &str| if first_dir.is_empty() { format!("{prefix}*") } else { format!("{first_dir}/{prefix}*") };
    let names_exactly = |pattern: &str| all.iter().filter(|f| dataset_files::glob_match(pattern, f) && dataset_files::is_data_file(f)).count() == found.len();
    if found.iter().any(|f| dir(f) != first_dir) || !names_exactly(&pattern(&prefix)) {
        return Err(format!("the split's {} files ({}, ...) are not one folder's files of one name prefix, which kto cannot read yet", found.len(), found[0]));
    }
    // `train-*` rather than `train-0000*`, when it names the same files.
    let word = prefix.find(['-', '_', '.']).map(|i| &prefix[..=i]).filter(|w| names_exactly(&pattern(w)));
    Ok(root.join(pattern(word.unwrap_or(&prefix))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids() {
        assert!(is_hub_id("Qwen/Qwen2.5-0.5B-Instruct"));
        assert!(is_hub_id("trl-lib/kto-mix-14k"));
        for not in ["./model", "../x/y", "/abs/path", "model", "a/b/c", "a/", "x/.hidden"] {
            assert!(!is_hub_id(not), "{not}");
        }
    }

    #[test]
    fn split_files_become_one_path() {
        let all: Vec<String> = ["data/train-0-of-2.parquet", "data/train-1-of-2.parquet", "data/test-0-of-1.parquet"].map(String::from).to_vec();
        let root = Path::new("/snap");
        assert_eq!(files_as_path(root, &all[2..], &all).unwrap(), root.join("data/test-0-of-1.parquet"));
        assert_eq!(files_as_path(root, &all[..2], &all).unwrap(), root.join("data/train-*"));
        let mixed: Vec<String> = ["a/train.jsonl", "b/train.jsonl"].map(String::from).to_vec();
        assert!(files_as_path(root, &mixed, &mixed).is_err());
    }
}
