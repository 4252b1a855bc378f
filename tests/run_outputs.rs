//! Runs that cannot be mixed, torn or hung (the output folder's rules, README "Checkpoints and resuming"):
//! a folder holding another run is refused unless `overwrite_output_dir`; resuming refuses a checkpoint of another
//! run and names what differs; a real SIGKILL in the final save or in checkpoint rotation leaves whole units that
//! the next run cleans up and continues from; a second process cannot write into a folder in use; TensorBoard
//! events do not repeat after a resume; a stop request ends evaluation and the reference precomputation.
mod common;
use common::{assert_one_line_error, fixture, fixture_toml, kto, LoggedChild};
use kto::config::TrainConfig;
use kto::train::{Observer, Trainer};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

struct Run {
    _dir: tempfile::TempDir,
    cfg: PathBuf,
    out: PathBuf,
}

impl Run {
    fn new() -> Run {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let cfg = dir.path().join("run.toml");
        std::fs::write(&cfg, fixture_toml(&out)).unwrap();
        Run { cfg, out, _dir: dir }
    }

    fn args<'a>(&'a self, sets: &[&'a str]) -> Vec<&'a str> {
        let mut a = vec!["train", self.cfg.to_str().unwrap()];
        for s in sets {
            a.extend(["--set", s]);
        }
        a
    }

    fn train(&self, sets: &[&str]) -> (bool, String) {
        kto(&self.args(sets))
    }

    fn spawn(&self, sets: &[&str], env: &[(&str, &str)]) -> LoggedChild {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_kto"));
        cmd.args(self.args(sets)).envs(env.iter().copied());
        LoggedChild::spawn(&mut cmd, &self.out.with_extension("log"))
    }

    fn checkpoints(&self) -> Vec<usize> {
        kto::checkpoint::list(&self.out).into_iter().map(|(s, _)| s).collect()
    }

    fn metrics(&self) -> Vec<String> {
        std::fs::read_to_string(self.out.join("metrics.jsonl")).unwrap_or_default().lines().map(String::from).collect()
    }

    /// Names in the output folder that start with `prefix`.
    fn entries(&self, prefix: &str) -> Vec<String> {
        std::fs::read_dir(&self.out)
            .unwrap()
            .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().to_string()))
            .filter(|n| n.starts_with(prefix))
            .collect()
    }
}

fn wait_for_line(job: &LoggedChild, needle: &str) {
    let start = Instant::now();
    while !job.stderr().contains(needle) {
        assert!(start.elapsed() < Duration::from_secs(60), "never printed {needle:?}: {}", job.stderr());
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn kill9(job: &mut LoggedChild) {
    Command::new("kill").args(["-9", &job.child.id().to_string()]).status().unwrap();
    let status = job.wait_for(Duration::from_secs(30)).expect("killed");
    assert!(!status.success());
}

const SHORT: &[&str] = &["max_steps=6", "save_steps=2", "optim=adamw_torch"];

#[test]
fn a_used_folder_is_refused_and_overwrite_replaces_the_whole_earlier_run() {
    let run = Run::new();
    assert!(run.train(SHORT).0);
    assert_eq!(run.checkpoints(), vec![2, 4, 6]);
    // The same folder again, another learning rate: refused, nothing touched.
    let before = std::fs::read(run.out.join("model.safetensors")).unwrap();
    assert_one_line_error(run.train(&["max_steps=3", "learning_rate=1e-4"]), &["holds another run", "checkpoint-6", "overwrite_output_dir"]);
    assert_eq!(std::fs::read(run.out.join("model.safetensors")).unwrap(), before);
    // Replaced: none of the old run's checkpoints survive rotation in place of the new run's.
    let (ok, stderr) = run.train(&["max_steps=3", "save_steps=1", "save_total_limit=2", "learning_rate=1e-4", "overwrite_output_dir=true"]);
    assert!(ok, "{stderr}");
    assert_eq!(run.checkpoints(), vec![2, 3], "the new run's last two");
    assert_eq!(run.metrics().len(), 4, "3 steps and a summary, nothing of the old run");
    // Resuming it with the old run's learning rate is refused, and says which key differs.
    assert_one_line_error(run.train(&["max_steps=3", "resume_from_checkpoint=true"]), &["another run", "learning_rate"]);
}

#[test]
fn resuming_refuses_changed_settings_and_names_them_but_may_extend() {
    let run = Run::new();
    assert!(run.train(&["max_steps=4", "save_steps=2"]).0);
    let data = run.out.with_file_name("changed.jsonl");
    let text = std::fs::read_to_string(fixture("kto.jsonl")).unwrap();
    std::fs::write(&data, text.replacen("\"label\": true", "\"label\": false", 1)).unwrap();
    let data_set = format!("train_dataset=\"{}\"", data.display());
    for (change, named) in [
        ("learning_rate=2e-3", "learning_rate"),
        ("per_device_train_batch_size=2", "per_device_train_batch_size"),
        ("gradient_accumulation_steps=2", "gradient_accumulation_steps"),
        ("optim=sgd", "optim"),
        ("beta=0.2", "beta"),
        ("lr_scheduler_type=linear", "lr_scheduler_type"),
        (data_set.as_str(), "training data"),
    ] {
        assert_one_line_error(run.train(&["max_steps=4", "resume_from_checkpoint=true", change]), &["another run", named]);
    }
    assert_one_line_error(run.train(&["max_steps=2", "resume_from_checkpoint=true"]), &["checkpoint-4", "past", "max_steps"]);
    // Extending and observing are allowed: two more steps, logged every step, continue the same run.
    let (ok, stderr) = run.train(&["max_steps=6", "save_steps=2", "resume_from_checkpoint=true"]);
    assert!(ok, "{stderr}");
    assert_eq!(run.checkpoints(), vec![2, 4, 6]);
    let lines = run.metrics();
    assert_eq!(lines.len(), 7, "steps 1-6 once each and one summary: {lines:?}");
}

/// The final model and metrics of an uninterrupted run of `sets`.
fn uninterrupted(sets: &[&str]) -> (Vec<u8>, Vec<String>) {
    let run = Run::new();
    let (ok, stderr) = run.train(sets);
    assert!(ok, "{stderr}");
    (std::fs::read(run.out.join("model.safetensors")).unwrap(), run.metrics())
}

#[test]
fn a_kill_in_the_final_save_claims_no_finished_run_and_the_resume_completes_it() {
    let (want_model, want_metrics) = uninterrupted(SHORT);
    let run = Run::new();
    let mut job = run.spawn(SHORT, &[("KTO_TEST_PAUSE", "final-save")]);
    wait_for_line(&job, "paused at final-save");
    kill9(&mut job);
    assert!(!run.out.join("model.safetensors").exists(), "no weights file before the whole folder is in place");
    assert!(run.metrics().iter().all(|l| !l.contains("train_runtime")), "no summary line without a model");
    assert_eq!(run.entries(".final.tmp-").len(), 1, "the torn final save is a temporary");
    let (ok, stderr) = run.train(&[SHORT, &["resume_from_checkpoint=true"]].concat());
    assert!(ok, "{stderr}");
    assert!(run.entries(".final.tmp-").is_empty(), "the next run removed the stale temporary");
    for f in ["model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"] {
        assert!(run.out.join(f).is_file(), "{f}");
    }
    assert_eq!(std::fs::read(run.out.join("model.safetensors")).unwrap(), want_model);
    let steps = |m: &[String]| m.iter().filter(|l| !l.contains("train_runtime")).cloned().collect::<Vec<_>>();
    assert_eq!(steps(&run.metrics()), steps(&want_metrics));
    assert_eq!(run.metrics().iter().filter(|l| l.contains("train_runtime")).count(), 1);
}

#[test]
fn a_kill_in_checkpoint_rotation_leaves_only_whole_checkpoints() {
    let sets = ["max_steps=6", "save_steps=1", "save_total_limit=1", "optim=adamw_torch"];
    let (want_model, _) = uninterrupted(&sets);
    let run = Run::new();
    let mut job = run.spawn(&sets, &[("KTO_TEST_PAUSE", "rotation")]);
    wait_for_line(&job, "paused at rotation");
    kill9(&mut job);
    assert_eq!(run.entries(".removing-").len(), 1, "the checkpoint being deleted was renamed away first");
    for (_, dir) in kto::checkpoint::list(&run.out) {
        for f in ["trainer_state.json", "optimizer.safetensors", "model.safetensors", "run_identity.json"] {
            assert!(dir.join(f).is_file(), "{} lacks {f}", dir.display());
        }
    }
    let (ok, stderr) = run.train(&[&sets[..], &["resume_from_checkpoint=true"]].concat());
    assert!(ok, "{stderr}");
    assert!(run.entries(".removing-").is_empty());
    assert_eq!(std::fs::read(run.out.join("model.safetensors")).unwrap(), want_model);
}

#[test]
fn a_folder_in_use_is_refused_and_a_dead_runs_lock_does_not_block() {
    let run = Run::new();
    // The first run holds its folder while it waits in the final save.
    let mut first = run.spawn(SHORT, &[("KTO_TEST_PAUSE", "final-save")]);
    wait_for_line(&first, "paused at final-save");
    let pid = first.child.id().to_string();
    assert_one_line_error(run.train(&[SHORT, &["overwrite_output_dir=true"]].concat()), &["in use by another kto run", &pid]);
    assert_one_line_error(run.train(&[SHORT, &["resume_from_checkpoint=true"]].concat()), &["in use"]);
    kill9(&mut first);
    // Its lock file stays behind, but the lock died with the process.
    assert!(run.out.join(".kto.lock").is_file());
    let (ok, stderr) = run.train(&[SHORT, &["resume_from_checkpoint=true"]].concat());
    assert!(ok, "{stderr}");
}

#[test]
fn a_second_stop_signal_ends_the_process_at_once() {
    let run = Run::new();
    let mut job = run.spawn(SHORT, &[("KTO_TEST_PAUSE", "final-save")]);
    wait_for_line(&job, "paused at final-save");
    let pid = job.child.id().to_string();
    Command::new("kill").args(["-INT", &pid]).status().unwrap();
    wait_for_line(&job, "signal again to stop at once");
    assert!(job.child.try_wait().unwrap().is_none(), "the first signal waits for a safe point");
    Command::new("kill").args(["-INT", &pid]).status().unwrap();
    let status = job.wait_for(Duration::from_secs(10)).expect("the second signal ends the process");
    assert_eq!(status.code(), Some(130));
}

/// The records of a TFRecord file (u64 length, u32 CRC, data, u32 CRC).
fn tfrecords(path: &Path) -> usize {
    let bytes = std::fs::read(path).unwrap();
    let (mut at, mut n) = (0, 0);
    while at < bytes.len() {
        let len = u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap()) as usize;
        at += 8 + 4 + len + 4;
        n += 1;
    }
    assert_eq!(at, bytes.len(), "whole records");
    n
}

#[test]
fn tensorboard_events_do_not_repeat_after_a_resume() {
    let run = Run::new();
    let sets = ["max_steps=6", "save_steps=3", "report_to=tensorboard"];
    assert!(run.train(&sets).0);
    let checkpoint = format!("resume_from_checkpoint=\"{}\"", run.out.join("checkpoint-3").display());
    let (ok, stderr) = run.train(&[&sets[..], &[checkpoint.as_str()]].concat());
    assert!(ok, "{stderr}");
    let events: Vec<PathBuf> = std::fs::read_dir(run.out.join("runs")).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(events.len(), 1, "one event file: {events:?}");
    // The file-version record, then one event per metrics.jsonl line (steps 1-6 once, and the summary).
    assert_eq!(run.metrics().len(), 7);
    assert_eq!(tfrecords(&events[0]), 1 + 7);
}

/// An observer that asks to stop from the start.
struct StopNow;
impl Observer for StopNow {
    fn stop_requested(&self) -> bool {
        true
    }
}

#[test]
fn a_stop_request_ends_the_precomputation_and_evaluation() {
    let dir = tempfile::tempdir().unwrap();
    let base = fixture_toml(&dir.path().join("out"));
    let cfg = TrainConfig::from_toml(&base, &["precompute_ref_log_probs=true".into()]).unwrap();
    let e = Trainer::new(cfg, &StopNow).err().expect("stopped");
    assert!(e.is_interruption() && e.to_string().contains("reference precomputation"), "{e}");
    // Evaluation after step 1 stops, and the step is kept as a checkpoint.
    let eval = format!("eval_dataset=\"{}\"", fixture("kto.jsonl").display());
    let sets: Vec<String> = [eval.as_str(), "eval_strategy=steps", "eval_steps=1", "max_steps=3"].iter().map(|s| s.to_string()).collect();
    let mut t = Trainer::new(TrainConfig::from_toml(&base, &sets).unwrap(), &kto::train::Silent).unwrap();
    assert!(t.evaluate_unless_stopped(0, &StopNow).is_none());
    match t.train(&StopNow) {
        Err(kto::Error::Interrupted { step: 1, checkpoint }) => assert!(checkpoint.ends_with("checkpoint-1")),
        other => panic!("expected a stop after step 1, got {:?}", other.map(|s| s.steps)),
    }
    let lines = std::fs::read_to_string(dir.path().join("out/metrics.jsonl")).unwrap();
    assert!(!lines.contains("eval_loss"), "the interrupted evaluation is not logged");
}
