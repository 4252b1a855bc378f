//! The demonstration end to end (`kto demo`, one seed): SFT base model, sampled answers labelled by the rule,
//! KTO, the 10%-desirable run, SFT on desirable answers; and the command-line tools it is built from (`kto sft`,
//! `kto generate`, `kto plot`, `generate_during_eval`).
mod common;
use common::{fixture, fixture_toml};
use std::process::Command;

fn kto(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_kto")).args(args).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!stderr.contains("panicked"), "kto panicked: {stderr}");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).to_string(), stderr)
}

/// The demo's rule, stated independently of its code: the answer is the prompt's word (before "=") in capitals.
fn follows_the_rule(prompt: &str, answer: &str) -> bool {
    answer == prompt.strip_suffix('=').unwrap_or(prompt).to_uppercase()
}

#[test]
fn demo_seed_shows_kto_raising_the_desirable_rate() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("demo");
    let (ok, stdout, stderr) = kto(&["demo", "--out", out.to_str().unwrap(), "--seeds", "0"]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("| KTO |"), "the table is printed: {stdout}");
    let results: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    let rates = &results[0]["desirable_rate"];
    let base = rates["base (SFT on mixed answers)"].as_f64().unwrap();
    let after = rates["KTO"].as_f64().unwrap();
    // The base model learned a mix with 35% right answers; KTO must move it clearly toward them.
    assert!((0.2..0.5).contains(&base), "base rate {base}");
    assert!(after > base + 0.2, "KTO {after} vs base {base}");
    // The labelled data follows the rule.
    let kto_rows = std::fs::read_to_string(out.join("seed-0/kto.jsonl")).unwrap();
    for line in kto_rows.lines() {
        let row: serde_json::Value = serde_json::from_str(line).unwrap();
        let (p, c) = (row["prompt"].as_str().unwrap(), row["completion"].as_str().unwrap());
        assert_eq!(row["label"].as_bool().unwrap(), follows_the_rule(p, c), "{line}");
    }
    for file in ["results.md", "desirable_rates.svg", "seed-0/kto/metrics.svg", "seed-0/kto/eval_generations/step-20.jsonl"] {
        assert!(out.join(file).is_file(), "{file} written");
    }
}

#[test]
fn generate_during_eval_writes_policy_and_reference_samples() {
    let dir = tempfile::tempdir().unwrap();
    let toml = fixture_toml(dir.path())
        + &format!(
            "eval_dataset = \"{}\"\neval_strategy = \"steps\"\neval_steps = 2\ngenerate_during_eval = true\ngenerate_eval_prompts = 3\n",
            fixture("kto.jsonl").display()
        );
    let cfg_path = dir.path().join("kto.toml");
    std::fs::write(&cfg_path, toml).unwrap();
    let (ok, _, stderr) = kto(&["train", cfg_path.to_str().unwrap(), "--set", "max_steps=4"]);
    assert!(ok, "{stderr}");
    for step in [2, 4] {
        let text = std::fs::read_to_string(dir.path().join(format!("eval_generations/step-{step}.jsonl"))).unwrap();
        let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0]["prompt"], "What color is the sky on a clear day?");
        assert!(lines.iter().all(|l| l["policy"].is_string() && l["reference"].is_string() && l["step"] == step));
    }
    // Without an eval set the key is refused up front, in one line.
    let plain = dir.path().join("plain.toml");
    std::fs::write(&plain, fixture_toml(dir.path())).unwrap();
    let (ok, _, stderr) = kto(&["train", plain.to_str().unwrap(), "--set", "generate_during_eval=true"]);
    assert!(!ok && stderr.contains("generate_during_eval") && stderr.lines().count() == 1, "{stderr}");
}

#[test]
fn plot_draws_every_logged_curve_and_reports_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let cfg_path = dir.path().join("kto.toml");
    std::fs::write(&cfg_path, fixture_toml(dir.path())).unwrap();
    assert!(kto(&["train", cfg_path.to_str().unwrap()]).0);
    let (ok, _, stderr) = kto(&["plot", dir.path().to_str().unwrap()]);
    assert!(ok, "{stderr}");
    let svg = std::fs::read_to_string(dir.path().join("metrics.svg")).unwrap();
    assert!(svg.starts_with("<svg"));
    for label in ["loss", "KL estimate", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen"] {
        assert!(svg.contains(label), "{label} drawn");
    }
    // Three steps were logged: every line series has three points.
    assert!(svg.matches("<polyline").count() >= 6);
    let (ok, _, stderr) = kto(&["plot", dir.path().join("nope").to_str().unwrap()]);
    assert!(!ok && stderr.contains("metrics.jsonl"), "{stderr}");
}

#[test]
fn generate_and_sft_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    // Greedy completions of the 24 fixture prompts into `out`, `batch` prompts at a time.
    let greedy = |out: &std::path::Path, batch: &str| {
        let (policy, prompts) = (fixture("policy"), fixture("kto.jsonl"));
        let args = ["generate", policy.to_str().unwrap(), "--prompts", prompts.to_str().unwrap(), "--temperature", "0"];
        let (ok, _, stderr) = kto(&[&args[..], &["--max-new-tokens", "5", "--batch-size", batch, "--out", out.to_str().unwrap()]].concat());
        assert!(ok, "{stderr}");
        std::fs::read_to_string(out).unwrap()
    };
    let out = dir.path().join("gen.jsonl");
    let text = greedy(&out, "32");
    let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 24);
    assert!(lines.iter().all(|l| l["completion"].is_string() && l["prompt"].is_string()));
    let (ok, _, stderr) = kto(&["generate", fixture("policy").to_str().unwrap(), "--prompt", "hi", "--top-p", "0"]);
    assert!(!ok && stderr.contains("--top-p"), "{stderr}");
    // Five prompts at a time (batches of 5, the last of 4): the same greedy completions.
    assert_eq!(greedy(&dir.path().join("gen5.jsonl"), "5"), text);
    for bad in ["0", "33"] {
        let (ok, _, stderr) = kto(&["generate", fixture("policy").to_str().unwrap(), "--prompt", "hi", "--batch-size", bad]);
        assert!(!ok && stderr.contains("--batch-size must be 1 to 32"), "{stderr}");
    }

    // kto sft on {prompt, completion} rows; a file without "completion" is refused with its name and row.
    let cfg_path = dir.path().join("sft.toml");
    std::fs::write(&cfg_path, fixture_toml(dir.path())).unwrap();
    let (ok, _, stderr) = kto(&["sft", cfg_path.to_str().unwrap()]);
    assert!(ok, "{stderr}");
    assert!(stderr.contains("label\" column is ignored"), "{stderr}");
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"prompt\": \"a\", \"answer\": \"b\"}\n").unwrap();
    let (ok, _, stderr) = kto(&["sft", cfg_path.to_str().unwrap(), "--set", &format!("train_dataset=\"{}\"", bad.display())]);
    assert!(!ok && stderr.contains("bad.jsonl") && stderr.contains("row 1"), "{stderr}");
}
