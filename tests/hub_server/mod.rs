//! A loopback stand-in for the Hugging Face hub, serving the endpoints kto calls as the hub answers them:
//! `/api/{models|datasets}/{id}/revision/{rev}` (commit and `siblings`), `HEAD`/`GET`
//! `/[datasets/]{id}/resolve/{commit}/{path}` (small files directly with `etag` and `x-repo-commit`; weights and
//! Parquet files as the hub's LFS files: a redirect to a CDN address with `x-linked-etag` and `x-linked-size`),
//! and the CDN (`Range` answered with 206). Repositories can require a token (401 without, 403 with another),
//! and a file's next download can be cut off halfway, as a dropped connection would.
#![allow(dead_code)]
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

pub struct Repo {
    /// "models" or "datasets".
    pub kind: &'static str,
    pub id: String,
    pub commit: String,
    pub files: Vec<(String, Vec<u8>)>,
    pub token: Option<String>,
}

#[derive(Default)]
pub struct State {
    pub repos: Vec<Repo>,
    /// Every request as `METHOD path [range]`.
    pub log: Vec<String>,
    /// The path of a file whose next CDN download stops after half its bytes.
    pub cut_next: Option<String>,
}

pub struct HubServer {
    pub url: String,
    pub state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
}

impl HubServer {
    pub fn start(repos: Vec<Repo>) -> HubServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(State { repos, ..Default::default() }));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st, base) = (state.clone(), stop.clone(), url.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if st.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(stream) = stream {
                    let _ = serve(stream, &s, &base);
                }
            }
        });
        HubServer { url, state, stop }
    }

    pub fn log(&self) -> Vec<String> {
        self.state.lock().unwrap().log.clone()
    }

    pub fn clear_log(&self) {
        self.state.lock().unwrap().log.clear();
    }
}

impl Drop for HubServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.url.trim_start_matches("http://"));
    }
}

/// A content hash as a blob name (the hub's is a sha256; any stable name serves).
pub fn etag(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for &b in bytes {
        h = (h ^ b as u64).wrapping_mul(0x100000001b3);
    }
    format!("{h:016x}{:08x}", bytes.len())
}

fn is_lfs(path: &str) -> bool {
    path.ends_with(".safetensors") || path.ends_with(".parquet")
}

fn serve(mut stream: TcpStream, state: &Mutex<State>, base: &str) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or("").to_string(), parts.next().unwrap_or("").to_string());
    let (mut auth, mut range) = (None, None);
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            match k.trim().to_ascii_lowercase().as_str() {
                "authorization" => auth = Some(v.trim().to_string()),
                "range" => range = Some(v.trim().to_string()),
                _ => {}
            }
        }
    }
    let mut st = state.lock().unwrap();
    st.log.push(format!("{method} {path}{}", range.as_ref().map(|r| format!(" {r}")).unwrap_or_default()));
    let head = method == "HEAD";
    let reply = |stream: &mut TcpStream, status: &str, headers: &[(String, String)], body: &[u8], send: usize| -> std::io::Result<()> {
        let mut out = format!("HTTP/1.1 {status}\r\nconnection: close\r\ncontent-length: {}\r\n", body.len());
        for (k, v) in headers {
            out.push_str(&format!("{k}: {v}\r\n"));
        }
        out.push_str("\r\n");
        stream.write_all(out.as_bytes())?;
        if !head {
            stream.write_all(&body[..send])?;
        }
        stream.flush()
    };
    let not_found = |stream: &mut TcpStream| reply(stream, "404 Not Found", &[], b"{\"error\":\"Repository not found\"}", 32);
    if let Some(blob) = path.strip_prefix("/cdn/") {
        let found = st.repos.iter().flat_map(|r| r.files.iter()).find(|(_, b)| etag(b) == blob).map(|(p, b)| (p.clone(), b.clone()));
        let Some((file, bytes)) = found else { return not_found(&mut stream) };
        let from: usize = range.as_deref().and_then(|r| r.strip_prefix("bytes=")).and_then(|r| r.trim_end_matches('-').parse().ok()).unwrap_or(0);
        let body = &bytes[from.min(bytes.len())..];
        let cut = st.cut_next.as_deref() == Some(file.as_str());
        if cut {
            st.cut_next = None;
        }
        drop(st);
        let send = if cut { body.len() / 2 } else { body.len() };
        let status = if from > 0 { "206 Partial Content" } else { "200 OK" };
        let headers = [("content-range".to_string(), format!("bytes {from}-{}/{}", bytes.len().saturating_sub(1), bytes.len()))];
        return reply(&mut stream, status, if from > 0 { &headers } else { &[] }, body, send);
    }
    let (kind, rest) = match path.strip_prefix("/api/") {
        Some(api) => match api.split_once('/') {
            Some((kind, rest)) => (kind.to_string(), format!("api:{rest}")),
            None => return not_found(&mut stream),
        },
        None => match path.strip_prefix("/datasets/") {
            Some(rest) => ("datasets".to_string(), rest.to_string()),
            None => ("models".to_string(), path[1..].to_string()),
        },
    };
    let api = rest.starts_with("api:");
    let rest = rest.trim_start_matches("api:");
    let segments: Vec<&str> = rest.splitn(5, '/').collect();
    let (id, verb, rev, file) = match segments.as_slice() {
        [org, name, verb, rev, file] => (format!("{org}/{name}"), *verb, *rev, Some(*file)),
        [org, name, verb, rev] => (format!("{org}/{name}"), *verb, *rev, None),
        _ => return not_found(&mut stream),
    };
    let Some(repo) = st.repos.iter().find(|r| r.kind == kind && r.id == id && (r.commit == rev || rev == "main")) else {
        return not_found(&mut stream);
    };
    if let Some(token) = &repo.token {
        match &auth {
            None => return reply(&mut stream, "401 Unauthorized", &[], b"", 0),
            Some(a) if *a != format!("Bearer {token}") => return reply(&mut stream, "403 Forbidden", &[], b"", 0),
            _ => {}
        }
    }
    let commit = ("x-repo-commit".to_string(), repo.commit.clone());
    match (api, verb, file) {
        (true, "revision", None) => {
            let siblings: Vec<String> = repo.files.iter().map(|(p, _)| format!("{{\"rfilename\":\"{p}\"}}")).collect();
            let body = format!("{{\"id\":\"{id}\",\"sha\":\"{}\",\"siblings\":[{}]}}", repo.commit, siblings.join(","));
            let len = body.len();
            reply(&mut stream, "200 OK", &[], body.as_bytes(), len)
        }
        (false, "resolve", Some(file)) => {
            let Some((_, bytes)) = repo.files.iter().find(|(p, _)| p == file) else { return not_found(&mut stream) };
            let tag = etag(bytes);
            if is_lfs(file) {
                let headers = [
                    commit,
                    ("x-linked-etag".to_string(), format!("\"{tag}\"")),
                    ("x-linked-size".to_string(), bytes.len().to_string()),
                    ("location".to_string(), format!("{base}/cdn/{tag}")),
                ];
                return reply(&mut stream, "302 Found", &headers, b"", 0);
            }
            let bytes = bytes.clone();
            drop(st);
            reply(&mut stream, "200 OK", &[commit, ("etag".to_string(), format!("\"{tag}\""))], &bytes, bytes.len())
        }
        _ => not_found(&mut stream),
    }
}
