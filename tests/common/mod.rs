//! Helpers shared by the integration tests: fixture paths and TRL log comparison.
#![allow(dead_code)]
use serde_json::{Map, Value};
use std::path::PathBuf;

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/trl-tiny").join(name)
}

pub fn json(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(name)).unwrap()).unwrap()
}

/// The issue's tolerance for logged metrics: 1e-4 + 1e-3·|value|.
pub fn close(got: f64, want: f64) -> bool {
    (got - want).abs() <= 1e-4 + 1e-3 * want.abs()
}

/// The fixture's KTOConfig (its README, "Reference runs") as TOML, writing to `out`.
pub fn fixture_toml(out: &std::path::Path) -> String {
    format!(
        r#"
model = "{policy}"
ref_model = "{reference}"
train_dataset = "{data}"
output_dir = "{out}"
beta = 0.1
desirable_weight = 1.0
undesirable_weight = 1.33
per_device_train_batch_size = 4
max_length = 64
learning_rate = 1e-3
lr_scheduler_type = "constant"
max_steps = 3
logging_steps = 1
seed = 0
bf16 = false
gradient_checkpointing = false
"#,
        policy = fixture("policy").display(),
        reference = fixture("reference").display(),
        data = fixture("kto.jsonl").display(),
        out = out.display()
    )
}

/// Two runs logged the same values at every entry, bit for bit (`train_*` timings aside), in the same number of
/// entries.
pub fn assert_same_logs(a: &[Map<String, Value>], b: &[Map<String, Value>]) {
    assert_eq!(a.len(), b.len(), "log entries");
    for (x, y) in a.iter().zip(b) {
        for (k, v) in x.iter().filter(|(k, _)| !k.starts_with("train_")) {
            assert_eq!(v, &y[k], "{k}");
        }
    }
}

/// Every per-step entry of TRL's log_history has exactly the same keys in ours, each value within tolerance.
pub fn assert_logs_match(got: &[Map<String, Value>], want: &[Value]) {
    let want_steps: Vec<&Map<String, Value>> =
        want.iter().map(|v| v.as_object().unwrap()).filter(|m| !m.contains_key("train_runtime")).collect();
    let got_steps: Vec<&Map<String, Value>> = got.iter().filter(|m| !m.contains_key("train_runtime")).collect();
    assert_eq!(got_steps.len(), want_steps.len(), "number of log entries");
    for (g, w) in got_steps.iter().zip(&want_steps) {
        let step = w["step"].as_u64().unwrap();
        let mut gk: Vec<&String> = g.keys().collect();
        let mut wk: Vec<&String> = w.keys().collect();
        gk.sort();
        wk.sort();
        assert_eq!(gk, wk, "keys at step {step}");
        for (k, wv) in w.iter() {
            let (gv, wv) = (g[k].as_f64().unwrap(), wv.as_f64().unwrap());
            assert!(close(gv, wv), "step {step} {k}: ours {gv} vs TRL {wv}");
        }
    }
}

/// A small deterministic generator (xorshift) for test tensors: values in [-1, 1).
pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    pub fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| scale * self.next()).collect()
    }
}

/// A child process whose stderr goes to a file, never to a pipe: a pipe nobody reads while the test waits fills
/// (64 KiB) once the child has logged enough, and then the child, and whatever waits for it, blocks for ever.
pub struct LoggedChild {
    pub child: std::process::Child,
    log: PathBuf,
}

impl LoggedChild {
    /// Spawns `cmd` with stdout discarded and stderr written to `log`.
    pub fn spawn(cmd: &mut std::process::Command, log: &std::path::Path) -> LoggedChild {
        let file = std::fs::File::create(log).unwrap();
        let child = cmd.stdout(std::process::Stdio::null()).stderr(file).spawn().unwrap();
        LoggedChild { child, log: log.to_path_buf() }
    }

    /// What the child has written to stderr so far.
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.log).unwrap_or_default()).into_owned()
    }

    /// Waits up to `limit` for the child to exit; `None` (after killing it) if it did not.
    pub fn wait_for(&mut self, limit: std::time::Duration) -> Option<std::process::ExitStatus> {
        let start = std::time::Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if start.elapsed() > limit {
                self.child.kill().ok();
                self.child.wait().ok();
                return None;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
}

/// Runs the `kto` binary: (success, stderr). A panic is never an answer to any input.
pub fn kto(args: &[&str]) -> (bool, String) {
    kto_with_env(args, &[])
}

pub fn kto_with_env(args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kto")).args(args).envs(env.iter().copied()).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!stderr.contains("panicked"), "kto panicked: {stderr}");
    (out.status.success(), stderr)
}

/// A failure whose last line is `kto: error: ...` mentioning each of `must_contain`.
pub fn assert_one_line_error(result: (bool, String), must_contain: &[&str]) {
    let (ok, stderr) = result;
    assert!(!ok, "expected failure, got success: {stderr}");
    let last = stderr.lines().last().unwrap_or("");
    assert!(last.starts_with("kto: error: "), "{stderr}");
    for m in must_contain {
        assert!(last.contains(m), "error line {last:?} should mention {m:?}");
    }
}

/// Our log history against TRL's, entry for entry: a step or evaluation entry has exactly TRL's keys, each value
/// within tolerance (timings only present); the run's summary has every key of TRL's but `total_flos`
/// (`train_loss`, and the metrics of steps after the last logged one), timings again only present.
pub fn assert_history_matches(got: &[Map<String, Value>], want: &[Value], label: &str) {
    let timing = |k: &str| k.ends_with("_runtime") || k.ends_with("_per_second");
    assert_eq!(got.len(), want.len(), "{label}: log entries");
    for (g, w) in got.iter().zip(want) {
        let (w, step) = (w.as_object().unwrap(), &w["step"]);
        let summary = w.contains_key("train_runtime");
        if !summary {
            let mut keys: Vec<&String> = g.keys().collect();
            let mut want_keys: Vec<&String> = w.keys().collect();
            keys.sort();
            want_keys.sort();
            assert_eq!(keys, want_keys, "{label} step {step}: keys");
        }
        for (k, wv) in w.iter().filter(|(k, _)| !(summary && *k == "total_flos")) {
            let gv = g.get(k).unwrap_or_else(|| panic!("{label} step {step}: no {k}"));
            if !timing(k) {
                let (gv, wv) = (gv.as_f64().unwrap(), wv.as_f64().unwrap());
                assert!(close(gv, wv), "{label} step {step} {k}: ours {gv} vs TRL {wv}");
            }
        }
    }
}
