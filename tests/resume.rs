//! Runs that survive: a real SIGKILL mid-training, then `resume_from_checkpoint = true`, gives the same
//! `metrics.jsonl` lines and bit-identical final weights as an uninterrupted run; SIGTERM stops cleanly with a
//! checkpoint and a message that says how to resume.
mod common;
use common::{fixture_toml, LoggedChild};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const STEPS: &str = "max_steps=200";

fn write_config(dir: &Path) -> std::path::PathBuf {
    let cfg = dir.join("run.toml");
    std::fs::write(&cfg, fixture_toml(&dir.join("out"))).unwrap();
    cfg
}

fn args<'a>(cfg: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec![
        "train", cfg, "--set", "optim=adamw_torch", "--set", STEPS, "--set", "logging_steps=5", "--set", "save_steps=7",
        "--set", "save_total_limit=2", "--set", "gradient_accumulation_steps=2", "--set", "learning_rate=1e-4",
    ];
    a.extend_from_slice(extra);
    a
}

/// metrics.jsonl without the run-time summary line (its timings differ by nature).
fn step_lines(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("out/metrics.jsonl")).unwrap().lines().filter(|l| !l.contains("train_runtime")).map(String::from).collect()
}

fn uninterrupted() -> (tempfile::TempDir, Vec<String>, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path());
    let out = Command::new(env!("CARGO_BIN_EXE_kto")).args(args(cfg.to_str().unwrap(), &[])).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines = step_lines(dir.path());
    let weights = std::fs::read(dir.path().join("out/model.safetensors")).unwrap();
    (dir, lines, weights)
}

/// Starts a run, waits until it has written at least `checkpoints` checkpoints, then sends `signal`.
fn start_and_signal(dir: &Path, signal: &str, checkpoints: usize) -> (std::process::ExitStatus, String) {
    let cfg = write_config(dir);
    let mut job = LoggedChild::spawn(
        Command::new(env!("CARGO_BIN_EXE_kto")).args(args(cfg.to_str().unwrap(), &[])),
        &dir.join("stderr.log"),
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let done = kto::checkpoint::list(&dir.join("out")).last().map(|(s, _)| *s).unwrap_or(0);
        if done >= 7 * checkpoints {
            break;
        }
        assert!(Instant::now() < deadline, "no checkpoint appeared");
        std::thread::sleep(Duration::from_millis(5));
    }
    let status = Command::new("kill").args([signal, &job.child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let status = job.wait_for(Duration::from_secs(120)).expect("the run stops after the signal");
    (status, job.stderr())
}

fn resume(dir: &Path) {
    let cfg = dir.join("run.toml");
    let out = Command::new(env!("CARGO_BIN_EXE_kto"))
        .args(args(cfg.to_str().unwrap(), &["--set", "resume_from_checkpoint=true"]))
        .output()
        .unwrap();
    assert!(out.status.success(), "resume failed: {}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn sigkill_then_resume_is_bit_identical_to_an_uninterrupted_run() {
    let (_ref_dir, want_lines, want_weights) = uninterrupted();
    let dir = tempfile::tempdir().unwrap();
    let (killed, _) = start_and_signal(dir.path(), "-KILL", 2);
    assert!(!killed.success(), "the run should have been killed mid-way");
    let last = kto::checkpoint::list(&dir.path().join("out")).last().unwrap().0;
    assert!(last < 200, "killed before the end (last checkpoint {last})");
    resume(dir.path());
    assert_eq!(step_lines(dir.path()), want_lines, "metrics.jsonl after resume");
    assert_eq!(std::fs::read(dir.path().join("out/model.safetensors")).unwrap(), want_weights, "final weights");
    assert!(kto::checkpoint::list(&dir.path().join("out")).len() <= 2, "save_total_limit keeps two");
}

#[test]
fn sigterm_writes_a_checkpoint_and_says_how_to_resume() {
    let (_ref_dir, want_lines, want_weights) = uninterrupted();
    let dir = tempfile::tempdir().unwrap();
    let (stopped, stderr) = start_and_signal(dir.path(), "-TERM", 1);
    assert_eq!(stopped.code(), Some(130), "{stderr}");
    assert!(stderr.contains("resume_from_checkpoint=true"), "{stderr}");
    resume(dir.path());
    assert_eq!(step_lines(dir.path()), want_lines);
    assert_eq!(std::fs::read(dir.path().join("out/model.safetensors")).unwrap(), want_weights);
}
