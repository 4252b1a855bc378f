//! Models and data sets by hub ID, against a loopback stand-in for the hub (tests/hub_server): the quick start
//! as a TRL user types it trains from downloads, then again offline from the cache, with the numbers of the same
//! files given as local paths; TRL's YAML recipe runs unchanged; an interrupted download resumes; offline
//! misses, gated and missing repositories are one-line errors.
mod hub_server;

use hub_server::{HubServer, Repo};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const MODEL: &str = "Qwen/Qwen2.5-0.5B-Instruct";
const DATASET: &str = "trl-lib/kto-mix-14k";
const MODEL_COMMIT: &str = "7ae557604adf67be50417f59c2c2f167def9a775";
const DATA_COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

fn data(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(path)
}

fn read(path: PathBuf) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

/// The two repositories of the quick start in miniature: the tiny Llama's files under Qwen's ID (with an ONNX
/// copy kto must not fetch), and conversational KTO rows in kto-mix-14k's layout and card.
fn quick_start_repos() -> Vec<Repo> {
    let mut model_files: Vec<(String, Vec<u8>)> = std::fs::read_dir(data("trl-tiny/policy"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .map(|p| (p.file_name().unwrap().to_string_lossy().to_string(), read(p)))
        .collect();
    model_files.push(("onnx/model.onnx".into(), vec![7; 1000]));
    model_files.push(("README.md".into(), b"# a model card".to_vec()));
    let card = "---\nlicense: mit\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: data/train-*\n  - split: test\n    path: data/test-*\n---\n# kto-mix-14k\n";
    let rows = read(data("parquet/conversational.parquet"));
    let data_files = vec![
        ("README.md".to_string(), card.as_bytes().to_vec()),
        ("data/train-00000-of-00001.parquet".to_string(), rows.clone()),
        ("data/test-00000-of-00001.parquet".to_string(), rows),
    ];
    vec![
        Repo { kind: "models", id: MODEL.into(), commit: MODEL_COMMIT.into(), files: model_files, token: None },
        Repo { kind: "datasets", id: DATASET.into(), commit: DATA_COMMIT.into(), files: data_files, token: None },
    ]
}

/// `kto` with a clean hub environment: this server, this cache, no token, online unless `offline`.
fn kto(server: &HubServer, cache: &Path, offline: bool, args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kto"));
    cmd.args(args).env("HF_ENDPOINT", &server.url).env("HF_HUB_CACHE", cache).env_remove("HF_TOKEN").env("HF_HOME", cache.join("home"));
    if offline {
        cmd.env("HF_HUB_OFFLINE", "1");
    } else {
        cmd.env_remove("HF_HUB_OFFLINE");
    }
    cmd.output().unwrap()
}

fn metrics(dir: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    text.lines().map(|l| serde_json::from_str::<Value>(l).unwrap()).collect()
}

/// The logged numbers of a run, without the timings that differ between runs.
fn numbers(dir: &Path) -> Vec<Value> {
    metrics(dir)
        .into_iter()
        .map(|mut m| {
            let o = m.as_object_mut().unwrap();
            o.retain(|k, _| !k.contains("runtime") && !k.contains("per_second"));
            m
        })
        .collect()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_string()
}

#[test]
fn the_quick_start_trains_from_the_hub_then_offline_with_the_local_numbers() {
    let server = HubServer::start(quick_start_repos());
    let tmp = tempfile::tempdir().unwrap();
    let (cache, online, offline, local) = (tmp.path().join("hub"), tmp.path().join("online"), tmp.path().join("offline"), tmp.path().join("local"));
    let flags = ["--per_device_train_batch_size", "2", "--learning_rate=1e-3", "--max_length", "64", "--max_steps", "3", "--logging_steps", "1"];
    let quick_start = |out: &Path| -> Vec<String> {
        let mut a = vec!["train", "--model_name_or_path", MODEL, "--dataset_name", DATASET, "--output_dir"].into_iter().map(String::from).collect::<Vec<_>>();
        a.push(out.to_string_lossy().into());
        a.extend(flags.iter().map(|s| s.to_string()));
        a
    };
    let args = quick_start(&online);
    let out = kto(&server, &cache, false, &args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(out.status.success(), "{}", stderr(&out));
    let log = server.log();
    assert!(log.iter().any(|l| l.starts_with("GET /api/models/Qwen/Qwen2.5-0.5B-Instruct/revision/main")), "{log:?}");
    assert!(log.iter().any(|l| l.starts_with("GET /datasets/trl-lib/kto-mix-14k/resolve/") && l.contains("README.md")), "{log:?}");
    assert!(!log.iter().any(|l| l.contains("onnx") || l.contains("test-00000")), "fetched what it does not read: {log:?}");

    // The cache is huggingface_hub's: the ref, the snapshot's links into the blobs.
    let repo = cache.join("models--Qwen--Qwen2.5-0.5B-Instruct");
    assert_eq!(std::fs::read_to_string(repo.join("refs/main")).unwrap(), MODEL_COMMIT);
    let weights = repo.join("snapshots").join(MODEL_COMMIT).join("model.safetensors");
    assert!(std::fs::symlink_metadata(&weights).unwrap().file_type().is_symlink());
    assert_eq!(read(weights), read(data("trl-tiny/policy/model.safetensors")));
    assert!(cache.join("datasets--trl-lib--kto-mix-14k/snapshots").join(DATA_COMMIT).join("data/train-00000-of-00001.parquet").is_file());

    server.clear_log();
    let args = quick_start(&offline);
    let out = kto(&server, &cache, true, &args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(server.log(), Vec::<String>::new(), "offline, the hub is not asked");

    let policy = data("trl-tiny/policy");
    let rows = data("parquet/conversational.parquet");
    let mut args: Vec<String> = ["train", "--model", policy.to_str().unwrap(), "--train_dataset", rows.to_str().unwrap(), "--output_dir", local.to_str().unwrap()].map(String::from).to_vec();
    args.extend(flags.iter().map(|s| s.to_string()));
    let out = kto(&server, &cache, true, &args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(out.status.success(), "{}", stderr(&out));
    let want = numbers(&local);
    assert_eq!(want.len(), 4, "3 logged steps and the summary");
    assert_eq!(numbers(&online), want);
    assert_eq!(numbers(&offline), want);
}

/// TRL's CLI documentation's recipe (`trl kto --config kto_config.yaml`), with the output folder given as a flag
/// as TRL's example config does; evaluation on its test split through `dataset_test_split`.
#[test]
fn a_trl_yaml_recipe_runs_unchanged() {
    let server = HubServer::start(quick_start_repos());
    let tmp = tempfile::tempdir().unwrap();
    let recipe = tmp.path().join("kto_config.yaml");
    std::fs::write(&recipe, format!("# kto_config.yaml\nmodel_name_or_path: {MODEL}\ndataset_name: {DATASET}\nreport_to: none\n")).unwrap();
    let out_dir = tmp.path().join("run");
    let cache = tmp.path().join("hub");
    let out = kto(&server, &cache, false, &["train", "--config", recipe.to_str().unwrap(), "--output_dir", out_dir.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    // TRL's defaults: 3 epochs of one batch of the 4 rows, learning rate 1e-6.
    let m = metrics(&out_dir);
    assert_eq!(m.last().unwrap()["step"], 3);

    let with_eval = tmp.path().join("with_eval.yaml");
    let text = format!("model_name_or_path: {MODEL}\nmodel_revision: {MODEL_COMMIT}\ndataset_name: {DATASET}\neval_strategy: steps\neval_steps: 1\nlearning_rate: 5e-7\nmax_steps: 2\nbf16: true\npush_to_hub: false\nrun_name: recipe\noutput_dir: {}\n", tmp.path().join("eval").display());
    std::fs::write(&with_eval, text).unwrap();
    let out = kto(&server, &cache, false, &["train", with_eval.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("ignored (they change none of its numbers): push_to_hub, run_name"), "{}", stderr(&out));
    let evals: Vec<Value> = metrics(&tmp.path().join("eval")).into_iter().filter(|m| m.get("eval_loss").is_some()).collect();
    assert_eq!(evals.len(), 2, "evaluated at steps 1 and 2 on the test split");
    assert!(server.log().iter().any(|l| l.contains("test-00000-of-00001.parquet")));
}

#[test]
fn an_interrupted_download_resumes_where_it_stopped() {
    let server = HubServer::start(quick_start_repos());
    server.state.lock().unwrap().cut_next = Some("model.safetensors".into());
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("hub");
    let out_dir = tmp.path().join("run");
    let args = ["train", "--model_name_or_path", MODEL, "--dataset_name", DATASET, "--max_steps", "1", "--output_dir", out_dir.to_str().unwrap()];
    let out = kto(&server, &cache, false, &args);
    assert!(!out.status.success());
    let err = stderr(&out);
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("kto: error:")).collect();
    assert!(errors.len() == 1 && errors[0].contains("Qwen/Qwen2.5-0.5B-Instruct/model.safetensors") && errors[0].contains("run again to resume"), "{err}");
    let weights = read(data("trl-tiny/policy/model.safetensors"));
    let blobs = cache.join("models--Qwen--Qwen2.5-0.5B-Instruct/blobs");
    let partial = blobs.join(format!("{}.incomplete", hub_server::etag(&weights)));
    let kept = std::fs::metadata(&partial).unwrap().len() as usize;
    assert!(kept > 0 && kept < weights.len(), "kept {kept} of {} bytes", weights.len());
    assert!(!out_dir.join("model.safetensors").exists(), "no output from a failed start");

    server.clear_log();
    let out = kto(&server, &cache, false, &args);
    assert!(out.status.success(), "{}", stderr(&out));
    let range = format!("bytes={kept}-");
    assert!(server.log().iter().any(|l| l.starts_with("GET /cdn/") && l.ends_with(&range)), "{:?}", server.log());
    assert_eq!(read(blobs.join(hub_server::etag(&weights))), weights);
    assert!(!partial.exists());
}

#[test]
fn offline_misses_gated_and_missing_repositories_are_one_line_errors() {
    let mut repos = quick_start_repos();
    repos.push(Repo { kind: "models", id: "meta-llama/Gated".into(), commit: MODEL_COMMIT.into(), files: repos[0].files.clone(), token: Some("secret".into()) });
    let server = HubServer::start(repos);
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("hub");
    let run = |model: &str, offline: bool| -> String {
        let out = kto(&server, &cache, offline, &["train", "--model_name_or_path", model, "--dataset_name", DATASET, "--output_dir", tmp.path().join("x").to_str().unwrap()]);
        assert!(!out.status.success());
        let err = stderr(&out);
        assert_eq!(err.lines().filter(|l| l.starts_with("kto: error:")).count(), 1, "{err}");
        err
    };
    let err = run(MODEL, true);
    assert!(err.contains(MODEL) && err.contains("HF_HUB_OFFLINE"), "{err}");
    let err = run("meta-llama/Gated", false);
    assert!(err.contains("meta-llama/Gated") && err.contains("401") && err.contains("HF_TOKEN"), "{err}");
    let err = run("nobody/nothing", false);
    assert!(err.contains("nobody/nothing") && err.contains("404"), "{err}");

    // With the token the gated model downloads (and a wrong one is told apart).
    let hub = |token: &str| kto::hub::Hub { endpoint: server.url.clone(), token: Some(token.into()), offline: false, cache: cache.clone() };
    let folder = hub("secret").model("meta-llama/Gated", "main", &kto::train::Silent).unwrap();
    assert!(folder.join("config.json").is_file());
    let err = hub("wrong").model("meta-llama/Gated", "main", &kto::train::Silent).unwrap_err().to_string();
    assert!(err.contains("403"), "{err}");
}

#[test]
fn a_local_folder_laid_out_as_a_hub_data_set_gives_its_splits() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("my-data");
    std::fs::create_dir_all(root.join("data")).unwrap();
    for name in ["train-00000-of-00002.parquet", "train-00001-of-00002.parquet", "test-00000-of-00001.parquet"] {
        std::fs::copy(data("parquet/conversational.parquet"), root.join("data").join(name)).unwrap();
    }
    let hub = kto::hub::Hub { endpoint: "http://127.0.0.1:9".into(), token: None, offline: true, cache: tmp.path().join("hub") };
    let split = |s: &str| hub.dataset_split(root.to_str().unwrap(), None, s, &kto::train::Silent);
    let train = split("train").unwrap();
    assert_eq!(train, root.join("data/train-*"));
    let (rows, _) = kto::data::read_dataset(&train, false).unwrap();
    assert_eq!(rows.len(), 8, "both shards of 4 rows");
    assert_eq!(split("test").unwrap(), root.join("data/test-00000-of-00001.parquet"));
    assert!(split("validation").unwrap_err().to_string().contains("no data file of split \"validation\""));
}

#[test]
fn a_local_data_file_is_the_train_split() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = kto::hub::Hub { endpoint: "http://127.0.0.1:9".into(), token: None, offline: true, cache: tmp.path().join("hub") };
    let file = data("parquet/conversational.parquet");
    let split = |s: &str| hub.dataset_split(file.to_str().unwrap(), None, s, &kto::train::Silent);
    assert_eq!(split("train").unwrap(), file);
    let err = split("test").unwrap_err().to_string();
    assert!(err.contains("conversational.parquet") && err.contains("only the \"train\" split"), "{err}");
}
