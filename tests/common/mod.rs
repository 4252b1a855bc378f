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
