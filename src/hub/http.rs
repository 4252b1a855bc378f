//! The hub's HTTP endpoints as huggingface_hub calls them: a repository at a revision
//! (`/api/{models|datasets}/{id}/revision/{rev}`: its commit and files), a file's metadata (a `HEAD` of
//! `/{id}/resolve/{commit}/{path}` that follows only same-host redirects: `x-linked-etag` or `etag` names the
//! blob) and its bytes (the same URL, redirects followed, resumed with `Range` from a partial file).
use super::cache::RepoKind;
use serde::Deserialize;
use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;
use ureq::Agent;

/// Why a request failed: the server's status, or no answer at all.
#[derive(Debug)]
pub enum Failure {
    Status(u16),
    Network(String),
    /// A download stopped partway; what arrived is kept for the next attempt.
    Interrupted(String),
}

/// A repository at a revision.
pub struct RepoInfo {
    pub commit: String,
    pub files: Vec<String>,
}

/// A file's metadata: the blob name its etag gives, and its size when the hub says it.
pub struct FileMeta {
    pub etag: String,
    pub size: Option<u64>,
}

pub struct Client {
    endpoint: String,
    token: Option<String>,
    /// Follows no redirect: `HEAD` stops at the CDN's address with the hub's own headers.
    direct: Agent,
    /// Follows redirects (to the CDN for large files).
    follow: Agent,
}

impl Client {
    pub fn new(endpoint: &str, token: Option<String>) -> Client {
        let agent = |redirects: u32| -> Agent {
            Agent::config_builder()
                .http_status_as_error(false)
                .max_redirects(redirects)
                .user_agent(concat!("kto/", env!("CARGO_PKG_VERSION")))
                .timeout_connect(Some(Duration::from_secs(20)))
                .timeout_recv_response(Some(Duration::from_secs(60)))
                .build()
                .into()
        };
        Client { endpoint: endpoint.trim_end_matches('/').to_string(), token, direct: agent(0), follow: agent(10) }
    }

    fn authorized<B>(&self, request: ureq::RequestBuilder<B>) -> ureq::RequestBuilder<B> {
        match &self.token {
            Some(token) => request.header("Authorization", format!("Bearer {token}")),
            None => request,
        }
    }

    /// The commit `revision` points at and the repository's files there.
    pub fn revision(&self, kind: RepoKind, id: &str, revision: &str) -> Result<RepoInfo, Failure> {
        #[derive(Deserialize)]
        struct Sibling {
            rfilename: String,
        }
        #[derive(Deserialize)]
        struct Info {
            sha: String,
            #[serde(default)]
            siblings: Vec<Sibling>,
        }
        let url = format!("{}/api/{}/{id}/revision/{}", self.endpoint, kind.plural(), encode(revision, false));
        let mut response = self.authorized(self.follow.get(&url)).call().map_err(network)?;
        status_ok(response.status().as_u16())?;
        let unreadable = |e: String| Failure::Network(format!("unreadable answer from {url}: {e}"));
        let text = response.body_mut().read_to_string().map_err(|e| unreadable(e.to_string()))?;
        let info: Info = serde_json::from_str(&text).map_err(|e| unreadable(e.to_string()))?;
        Ok(RepoInfo { commit: info.sha, files: info.siblings.into_iter().map(|s| s.rfilename).collect() })
    }

    pub fn file_url(&self, kind: RepoKind, id: &str, commit: &str, file: &str) -> String {
        let prefix = if kind == RepoKind::Dataset { "datasets/" } else { "" };
        format!("{}/{prefix}{id}/resolve/{commit}/{}", self.endpoint, encode(file, true))
    }

    pub fn file_meta(&self, url: &str) -> Result<FileMeta, Failure> {
        let mut url = url.to_string();
        for _ in 0..5 {
            let response = self.authorized(self.direct.head(&url)).header("Accept-Encoding", "identity").call().map_err(network)?;
            let status = response.status().as_u16();
            let header = |name: &str| response.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
            if (300..400).contains(&status) {
                // A relative redirect stays on the hub (a renamed repository): its answer carries the headers.
                if let Some(next) = header("location").filter(|l| l.starts_with('/')) {
                    url = format!("{}{next}", self.endpoint);
                    continue;
                }
            } else {
                status_ok(status)?;
            }
            let etag = header("x-linked-etag").or_else(|| header("etag")).ok_or_else(|| Failure::Network(format!("{url}: the answer has no etag")))?;
            let etag = etag.trim_start_matches("W/").trim_matches('"').to_string();
            let size = header("x-linked-size").or_else(|| header("content-length")).and_then(|s| s.parse().ok());
            return Ok(FileMeta { etag, size });
        }
        Err(Failure::Network(format!("{url}: too many redirects")))
    }

    /// Appends the bytes of `url` after those `partial` already holds (the whole file when the server ignores
    /// the range), calling `progress(bytes so far, total)`.
    pub fn download(&self, url: &str, partial: &Path, mut progress: impl FnMut(u64, Option<u64>)) -> Result<(), Failure> {
        let have = std::fs::metadata(partial).map(|m| m.len()).unwrap_or(0);
        let mut request = self.authorized(self.follow.get(url)).header("Accept-Encoding", "identity");
        if have > 0 {
            request = request.header("Range", format!("bytes={have}-"));
        }
        let response = request.call().map_err(network)?;
        let status = response.status().as_u16();
        if status == 416 {
            // The partial file is not a prefix of this one: start again.
            std::fs::remove_file(partial).map_err(|e| Failure::Network(format!("{}: {e}", partial.display())))?;
            return self.download(url, partial, progress);
        }
        status_ok(status)?;
        let resumed = status == 206;
        let length: Option<u64> = response.headers().get("content-length").and_then(|v| v.to_str().ok()).and_then(|s| s.parse().ok());
        let start = if resumed { have } else { 0 };
        let total = length.map(|l| l + start);
        let local = |e: std::io::Error| Failure::Network(format!("{}: {e}", partial.display()));
        let mut file = std::fs::OpenOptions::new().create(true).append(resumed).write(true).truncate(!resumed).open(partial).map_err(local)?;
        let mut body = response.into_body().into_reader();
        let (mut done, mut buf) = (start, vec![0u8; 1 << 16]);
        progress(done, total);
        loop {
            let n = body.read(&mut buf).map_err(|e| Failure::Interrupted(format!("the download broke off after {done} bytes ({e})")))?;
            if n == 0 {
                break;
            }
            file.write_all(&buf[..n]).map_err(local)?;
            done += n as u64;
            progress(done, total);
        }
        file.sync_all().map_err(local)?;
        match total {
            Some(t) if t != done => Err(Failure::Interrupted(format!("the download broke off at {done} of {t} bytes"))),
            _ => Ok(()),
        }
    }
}

fn status_ok(status: u16) -> Result<(), Failure> {
    if (200..300).contains(&status) {
        Ok(())
    } else {
        Err(Failure::Status(status))
    }
}

fn network(e: ureq::Error) -> Failure {
    Failure::Network(e.to_string())
}

/// Percent-encodes a revision or a file path for a URL (`/` kept in paths).
fn encode(s: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) || (keep_slash && b == b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
