//! Data-parallel training on 2 MPI ranks (`mpirun -np 2 kto train`), built with `--features mpi` and run by
//! `.ci/run` (which installs Open MPI). Checked against single-process computations on the fixture:
//! - `apo_zero_unpaired` (no KL term): the same loss, grad_norm, learning rate, token count and epoch at every
//!   step as one process with `gradient_accumulation_steps` doubled, the same final weights (SGD), and the
//!   gathered metrics equal to the two micro-batches' sums combined as TRL gathers them;
//! - `kto`: the logged `kl` at every step is the clamped mean of the two ranks' batch KL means, each computed by
//!   a single process on that rank's batch with the weights of the step;
//! - resuming a 2-rank checkpoint with 1 process (same global batch) ends where the 1-process run ends;
//! - a rank killed mid-run stops the whole job instead of hanging;
//! - tokenization is split over the ranks.
#![cfg(feature = "mpi")]
mod common;
use common::{fixture_toml, LoggedChild};
use kto::config::TrainConfig;
use kto::data::Batch;
use kto::model::Model;
use kto::train::{Silent, Trainer};
use serde_json::{Map, Value};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const BASE: &[&str] = &["optim=sgd", "max_steps=3", "save_steps=1", "learning_rate=1e-3"];

fn overrides(extra: &[&str]) -> Vec<String> {
    BASE.iter().chain(extra).map(|s| s.to_string()).collect()
}

fn write_config(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("kto.toml");
    std::fs::write(&path, fixture_toml(dir)).unwrap();
    path
}

fn set_args(extra: &[&str]) -> Vec<String> {
    overrides(extra).into_iter().flat_map(|o| ["--set".to_string(), o]).collect()
}

fn mpirun(np: usize, config: &Path, extra: &[&str]) -> std::process::Output {
    Command::new("mpirun")
        .args(["--allow-run-as-root", "--oversubscribe", "-np", &np.to_string()])
        .arg(env!("CARGO_BIN_EXE_kto"))
        .arg("train")
        .arg(config)
        .args(set_args(extra))
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .expect("mpirun (Open MPI) on PATH")
}

fn single(config: &Path, extra: &[&str]) {
    let out = Command::new(env!("CARGO_BIN_EXE_kto")).arg("train").arg(config).args(set_args(extra)).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

fn metrics(dir: &Path) -> Vec<Map<String, Value>> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Map<String, Value>>(l).unwrap())
        .filter(|m| m.contains_key("loss"))
        .collect()
}

fn near(got: f64, want: f64) -> bool {
    (got - want).abs() <= 1e-5 * want.abs().max(1e-3)
}

/// A library trainer with the run's config and the weights of `weights` (a checkpoint, or the initial policy).
fn trainer_at(config_dir: &Path, extra: &[&str], weights: Option<&Path>) -> Trainer {
    let cfg = TrainConfig::from_toml(&fixture_toml(config_dir), &overrides(extra)).unwrap();
    let mut t = Trainer::new(cfg, &Silent).unwrap();
    if let Some(w) = weights {
        t.policy.params = Model::load(w).unwrap().params;
    }
    t
}

fn weights_before(dir: &Path, step: usize) -> Option<std::path::PathBuf> {
    (step > 1).then(|| dir.join(format!("checkpoint-{}", step - 1)))
}

/// Scored positions of a batch's main sequences whose row has label `want`.
fn scored_positions(b: &Batch, want: bool) -> f64 {
    b.main.iter().zip(&b.labels).filter(|(_, l)| **l == want).map(|((_, m), _)| m.iter().skip(1).filter(|c| **c).count()).sum::<usize>() as f64
}

#[test]
fn apo_on_two_ranks_equals_one_process_with_doubled_accumulation() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path());
    let (two, one) = (dir.path().join("two"), dir.path().join("one"));
    let apo = "loss_type=\"apo_zero_unpaired\"";
    let out = mpirun(2, &config, &[apo, &format!("output_dir=\"{}\"", two.display())]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // Tokenization was split over the ranks (and gave the same rows: the numbers below depend on them).
    assert!(stderr.contains("24 rows tokenized over 2 ranks"), "{stderr}");
    single(&config, &[apo, "gradient_accumulation_steps=2", &format!("output_dir=\"{}\"", one.display())]);

    let (got, want) = (metrics(&two), metrics(&one));
    assert_eq!(got.len(), 3);
    assert_eq!(want.len(), 3);
    for (s, (g, w)) in got.iter().zip(&want).enumerate() {
        for key in ["loss", "grad_norm", "learning_rate", "num_tokens", "epoch", "kl"] {
            let (gv, wv) = (g[key].as_f64().unwrap(), w[key].as_f64().unwrap());
            assert!(near(gv, wv), "step {} {key}: 2 ranks {gv} vs 1 process {wv}", s + 1);
        }
        // The gathered metrics: the two micro-batches of the step (rank 0's and rank 1's), recomputed by one
        // process with the step's weights, their sums combined.
        let t = trainer_at(dir.path(), &[apo, "gradient_accumulation_steps=2"], weights_before(&one, s + 1).as_deref());
        let batches = t.epoch_batches();
        let pair: Vec<Batch> = (0..2).map(|r| t.collate(&batches[2 * s + r])).collect();
        let recs: Vec<_> = pair.iter().map(|b| t.micro_batch(b, 0, None, &mut Default::default())).collect();
        let metric = |rec: &kto::train::MicroBatchRecord, k: &str| rec.metrics.iter().find(|(n, _)| *n == k).map(|(_, v)| *v);
        let tokens: Vec<f64> = recs.iter().map(|r| r.scored_tokens as f64).collect();
        let entropy = (metric(&recs[0], "entropy").unwrap() * tokens[0] + metric(&recs[1], "entropy").unwrap() * tokens[1])
            / (tokens[0] + tokens[1]);
        let mut expected = vec![("entropy", entropy)];
        for (want_label, lk, rk, pk) in [(true, "logits/chosen", "rewards/chosen", "logps/chosen"), (false, "logits/rejected", "rewards/rejected", "logps/rejected")] {
            let counts: Vec<f64> = pair.iter().map(|b| scored_positions(b, want_label)).collect();
            let logit_sum: f64 = recs.iter().zip(&counts).map(|(r, c)| metric(r, lk).unwrap_or(0.0) * c).sum();
            expected.push((lk, logit_sum / counts.iter().sum::<f64>()));
            let (mut reward, mut logps, mut n) = (0.0, 0.0, 0.0);
            for r in &recs {
                for i in 0..r.labels.len() {
                    if r.labels[i] == want_label {
                        reward += 0.1 * (r.policy_logps[i] - r.reference_logps[i]);
                        logps += r.policy_logps[i];
                        n += 1.0;
                    }
                }
            }
            expected.push((rk, reward / n));
            expected.push((pk, logps / n));
        }
        for (key, want_v) in expected {
            let gv = g[key].as_f64().unwrap();
            assert!(near(gv, want_v), "step {} {key}: 2 ranks {gv} vs gathered {want_v}", s + 1);
        }
    }
    // SGD: the same final weights (within 1e-5 of each tensor's scale; the order of gradient sums differs).
    let (a, b) = (Model::load(&two).unwrap(), Model::load(&one).unwrap());
    for t in &b.layout.tensors {
        let (x, y) = (&a.params.to_host()[t.range()], &b.params.to_host()[t.range()]);
        let scale = y.iter().fold(0f32, |m, v| m.max(v.abs()));
        let diff = x.iter().zip(y).fold(0f32, |m, (p, q)| m.max((p - q).abs()));
        assert!(diff <= 1e-5 * scale, "{}: {diff} vs scale {scale}", t.name);
    }
}

#[test]
fn kto_kl_is_the_clamped_mean_of_the_ranks_batch_means() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path());
    let two = dir.path().join("two");
    let out = mpirun(2, &config, &[&format!("output_dir=\"{}\"", two.display())]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let got = metrics(&two);
    assert_eq!(got.len(), 3);
    let mut unclamped_seen = false;
    for (s, entry) in got.iter().enumerate() {
        let t = trainer_at(dir.path(), &[], weights_before(&two, s + 1).as_deref());
        let batches = t.epoch_batches();
        let means: Vec<f64> = (0..2)
            .map(|r| {
                let rec = t.micro_batch(&t.collate(&batches[2 * s + r]), 0, None, &mut Default::default());
                let n = rec.labels.len() as f64;
                rec.policy_kl_logps.iter().zip(&rec.reference_kl_logps).map(|(p, q)| p - q).sum::<f64>() / n
            })
            .collect();
        let want = ((means[0] + means[1]) / 2.0).max(0.0);
        let kl = entry["kl"].as_f64().unwrap();
        assert!((kl - want).abs() <= 1e-5 * want.abs() + 1e-9, "step {}: kl {kl} vs clamp(mean({means:?})) = {want}", s + 1);
        unclamped_seen |= want > 0.0 && (means[0] - means[1]).abs() > 1e-3;
    }
    assert!(unclamped_seen, "some step must have a positive KL with different rank means, or the check proves little");
}

#[test]
fn a_two_rank_checkpoint_resumes_in_one_process() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path());
    let apo = "loss_type=\"apo_zero_unpaired\"";
    let (mixed, one) = (dir.path().join("mixed"), dir.path().join("one"));
    let out = mpirun(2, &config, &[apo, "max_steps=2", &format!("output_dir=\"{}\"", mixed.display())]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // The same global batch (4 rows × 2 micro-batches) with one process: gradient_accumulation_steps = 2.
    let out_dir = format!("output_dir=\"{}\"", mixed.display());
    single(&config, &[apo, "gradient_accumulation_steps=2", "max_steps=4", "resume_from_checkpoint=true", &out_dir]);
    single(&config, &[apo, "gradient_accumulation_steps=2", "max_steps=4", &format!("output_dir=\"{}\"", one.display())]);
    let (got, want) = (metrics(&mixed), metrics(&one));
    assert_eq!(got.len(), 4);
    for (g, w) in got.iter().zip(&want) {
        assert!(near(g["loss"].as_f64().unwrap(), w["loss"].as_f64().unwrap()), "{g:?} vs {w:?}");
    }
    let (a, b) = (Model::load(&mixed).unwrap(), Model::load(&one).unwrap());
    let worst = a.params.to_host().iter().zip(b.params.to_host().iter()).fold(0f32, |m, (p, q)| m.max((p - q).abs()));
    assert!(worst < 1e-5, "weights differ by {worst}");
}

#[test]
fn a_killed_rank_stops_the_job_instead_of_hanging() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path());
    let mut mpirun = Command::new("mpirun");
    mpirun
        .args(["--allow-run-as-root", "--oversubscribe", "-np", "2"])
        .arg(env!("CARGO_BIN_EXE_kto"))
        .arg("train")
        .arg(&config)
        .args(set_args(&["max_steps=100000", "save_steps=100000", "num_train_epochs=1000"]))
        .env("RAYON_NUM_THREADS", "1");
    // Rank 0 logs a line at every step: its stderr goes to a file, which never blocks mpirun as a full pipe did.
    let mut job = LoggedChild::spawn(&mut mpirun, &dir.path().join("stderr.log"));
    // Find rank 1 (a kto process whose environment says so) once it is training, and kill it.
    let start = Instant::now();
    let victim = loop {
        assert!(start.elapsed() < Duration::from_secs(60), "rank 1 never started");
        let found = std::fs::read_dir("/proc").unwrap().filter_map(|e| e.ok()).find_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let environ = std::fs::read(e.path().join("environ")).ok()?;
            let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
            let is_kto = String::from_utf8_lossy(&cmd).contains(config.to_str()?);
            let rank1 = environ.split(|b| *b == 0).any(|kv| kv == b"OMPI_COMM_WORLD_RANK=1");
            (is_kto && rank1).then_some(pid)
        });
        if let Some(pid) = found {
            std::thread::sleep(Duration::from_secs(2));
            break pid;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    Command::new("kill").args(["-9", &victim.to_string()]).status().unwrap();
    let status = job.wait_for(Duration::from_secs(60));
    let stderr = job.stderr();
    let status = status.unwrap_or_else(|| panic!("the job hung after rank 1 was killed: {stderr}"));
    assert!(!status.success(), "the job must fail when a rank dies");
    assert!(stderr.to_lowercase().contains("signal 9") || stderr.contains("killed"), "mpirun says which rank died: {stderr}");
}
