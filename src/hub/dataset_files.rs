//! Which files of a data set repository hold a split, found as `datasets` finds them: the dataset card's
//! `configs:` (`data_files` per split, glob patterns), else the naming convention (`data/train-00000-of-00001.parquet`,
//! `train.jsonl`, `train/…`), else (by the caller) the hub's Parquet conversion on `refs/convert/parquet`
//! (`{config}/{split}/0000.parquet`).
use serde_json::Value;

/// File kinds kto reads.
const DATA_EXTENSIONS: &[&str] = &[".parquet", ".jsonl", ".json"];

/// The split's files by the card or the naming convention: `Ok(None)` when neither names any (the caller tries
/// the Parquet conversion), `Err` for a card that cannot be followed (an unknown config, a split it lacks).
pub fn split_files(card: Option<&str>, files: &[String], config: Option<&str>, split: &str) -> Result<Option<Vec<String>>, String> {
    if let Some(configs) = card.and_then(card_configs) {
        let chosen = choose_config(&configs, config)?;
        let patterns = split_patterns(chosen, split).ok_or_else(|| {
            let name = chosen.get("config_name").and_then(Value::as_str).unwrap_or("default");
            format!("the dataset card's config {name:?} has no split {split:?} (its splits: {})", split_names(chosen).join(", "))
        })?;
        let found: Vec<String> = files.iter().filter(|f| patterns.iter().any(|p| glob_match(p, f))).cloned().collect();
        if found.is_empty() {
            return Err(format!("no file matches the dataset card's data_files {patterns:?} for split {split:?}"));
        }
        return Ok(Some(found));
    }
    let data: Vec<&String> = files.iter().filter(|f| is_data_file(f)).collect();
    let found: Vec<String> = data.iter().filter(|f| names_split(f, split)).map(|f| f.to_string()).collect();
    Ok((!found.is_empty()).then_some(found))
}

/// The split's files in the hub's Parquet conversion of the data set.
pub fn converted_split_files(files: &[String], config: Option<&str>, split: &str) -> Vec<String> {
    let config = config.unwrap_or("default");
    files
        .iter()
        .filter(|f| f.ends_with(".parquet"))
        .filter(|f| {
            let parts: Vec<&str> = f.split('/').collect();
            match parts.as_slice() {
                [c, s, _] => *c == config && (*s == split || *s == format!("partial-{split}")),
                // The older layout: `{config}/{name}-{split}.parquet` or `-{split}-00000-of-00002.parquet`.
                [c, name] => *c == config && (name.ends_with(&format!("-{split}.parquet")) || name.contains(&format!("-{split}-"))),
                _ => false,
            }
        })
        .cloned()
        .collect()
}

pub fn is_data_file(f: &str) -> bool {
    DATA_EXTENSIONS.iter().any(|e| f.ends_with(e))
}

/// The `configs:` list of a dataset card's YAML header.
fn card_configs(card: &str) -> Option<Vec<Value>> {
    let body = card.strip_prefix("---")?;
    let end = body.find("\n---")?;
    let header: Value = serde_yaml_ng::from_str(&body[..end]).ok()?;
    header.get("configs")?.as_array().cloned().filter(|c| !c.is_empty())
}

fn config_name(c: &Value) -> &str {
    c.get("config_name").and_then(Value::as_str).unwrap_or("default")
}

fn choose_config<'a>(configs: &'a [Value], wanted: Option<&str>) -> Result<&'a Value, String> {
    let names: Vec<&str> = configs.iter().map(config_name).collect();
    let found = match wanted {
        Some(w) => configs.iter().find(|c| config_name(c) == w),
        None => configs
            .iter()
            .find(|c| c.get("default").and_then(Value::as_bool) == Some(true))
            .or_else(|| configs.iter().find(|c| config_name(c) == "default"))
            .or_else(|| (configs.len() == 1).then(|| &configs[0])),
    };
    found.ok_or_else(|| match wanted {
        Some(w) => format!("the dataset card has no config {w:?} (its configs: {})", names.join(", ")),
        None => format!("the data set has several configs ({}): set dataset_config to one", names.join(", ")),
    })
}

/// `data_files` entries as `(split, patterns)`: a string or list means the split "train".
fn data_files(config: &Value) -> Vec<(String, Vec<String>)> {
    let strings = |v: &Value| -> Vec<String> {
        match v {
            Value::String(s) => vec![s.clone()],
            Value::Array(a) => a.iter().filter_map(|s| s.as_str().map(String::from)).collect(),
            _ => Vec::new(),
        }
    };
    match config.get("data_files") {
        Some(Value::Array(entries)) if entries.iter().all(Value::is_object) => entries
            .iter()
            .map(|e| (e.get("split").and_then(Value::as_str).unwrap_or("train").to_string(), e.get("path").map(strings).unwrap_or_default()))
            .collect(),
        Some(Value::Object(by_split)) => by_split.iter().map(|(s, p)| (s.clone(), strings(p))).collect(),
        Some(other) => vec![("train".to_string(), strings(other))],
        None => Vec::new(),
    }
}

fn split_patterns(config: &Value, split: &str) -> Option<Vec<String>> {
    data_files(config).into_iter().find(|(s, _)| s == split).map(|(_, p)| p)
}

fn split_names(config: &Value) -> Vec<String> {
    data_files(config).into_iter().map(|(s, _)| s).collect()
}

/// The names `datasets` takes for a split in file and folder names (its `SPLIT_KEYWORDS`).
fn split_aliases(split: &str) -> Vec<&str> {
    match split {
        "train" => vec!["train", "training"],
        "validation" => vec!["validation", "valid", "dev", "val"],
        "test" => vec!["test", "testing", "eval", "evaluation"],
        other => vec![other],
    }
}

/// Whether a file's path names the split: a folder of that name, or a file name that is the name followed
/// by `-`, `_`, `.` or a digit (`train-00000-of-00001.parquet`, `train.jsonl`).
fn names_split(path: &str, split: &str) -> bool {
    let mut parts: Vec<&str> = path.split('/').collect();
    let file = parts.pop().unwrap_or("");
    split_aliases(split).iter().any(|name| {
        parts.iter().any(|d| d == name)
            || file.strip_prefix(name).and_then(|rest| rest.chars().next()).is_some_and(|c| "-_.".contains(c) || c.is_ascii_digit())
    })
}

/// `pattern` matches `path` as a glob: `*` any characters within a path segment, `**` any segments, `?` one
/// character.
pub fn glob_match(pattern: &str, path: &str) -> bool {
    fn segments(p: &[&str], s: &[&str]) -> bool {
        match (p.first(), s.first()) {
            (None, None) => true,
            (Some(&"**"), _) => segments(&p[1..], s) || (!s.is_empty() && segments(p, &s[1..])),
            (Some(pp), Some(ss)) => segment(pp.as_bytes(), ss.as_bytes()) && segments(&p[1..], &s[1..]),
            _ => false,
        }
    }
    fn segment(p: &[u8], s: &[u8]) -> bool {
        match (p.first(), s.first()) {
            (None, None) => true,
            (Some(b'*'), _) => segment(&p[1..], s) || (!s.is_empty() && segment(p, &s[1..])),
            (Some(b'?'), Some(_)) => segment(&p[1..], &s[1..]),
            (Some(a), Some(b)) => a == b && segment(&p[1..], &s[1..]),
            _ => false,
        }
    }
    let p: Vec<&str> = pattern.trim_start_matches("./").split('/').collect();
    let s: Vec<&str> = path.split('/').collect();
    segments(&p, &s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_cards_configs_pick_the_files() {
        let card = "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: data/train-*\n  - split: test\n    path: data/test-*\n---\n# card";
        let all = files(&["README.md", "data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet", "data/test-00000-of-00001.parquet"]);
        assert_eq!(split_files(Some(card), &all, None, "train").unwrap().unwrap(), all[1..3].to_vec());
        assert_eq!(split_files(Some(card), &all, None, "test").unwrap().unwrap(), all[3..].to_vec());
        let missing = split_files(Some(card), &all, None, "validation").unwrap_err();
        assert!(missing.contains("no split \"validation\"") && missing.contains("train, test"), "{missing}");
        let unknown = split_files(Some(card), &all, Some("other"), "train").unwrap_err();
        assert!(unknown.contains("no config \"other\""), "{unknown}");
    }

    #[test]
    fn several_configs_need_one_named() {
        let card = "---\nconfigs:\n- config_name: a\n  data_files: a/*.jsonl\n- config_name: b\n  data_files:\n    train: b/train.jsonl\n---\n";
        let all = files(&["a/x.jsonl", "b/train.jsonl"]);
        assert!(split_files(Some(card), &all, None, "train").unwrap_err().contains("set dataset_config"));
        assert_eq!(split_files(Some(card), &all, Some("a"), "train").unwrap().unwrap(), files(&["a/x.jsonl"]));
        assert_eq!(split_files(Some(card), &all, Some("b"), "train").unwrap().unwrap(), files(&["b/train.jsonl"]));
    }

    #[test]
    fn without_configs_the_names_decide() {
        let all = files(&["README.md", "train.jsonl", "test.jsonl", "extra/notes.json", "training_data.parquet", "dev/0.parquet"]);
        assert_eq!(split_files(Some("# no header"), &all, None, "train").unwrap().unwrap(), files(&["train.jsonl", "training_data.parquet"]));
        assert_eq!(split_files(None, &all, None, "validation").unwrap().unwrap(), files(&["dev/0.parquet"]));
        assert_eq!(split_files(None, &files(&["README.md", "trainer.jsonl"]), None, "train").unwrap(), None);
    }

    #[test]
    fn the_parquet_conversion_is_laid_out_by_config_and_split() {
        let all = files(&["default/train/0000.parquet", "default/train/0001.parquet", "default/test/0000.parquet", "other/train/0000.parquet", "default/partial-validation/0000.parquet"]);
        assert_eq!(converted_split_files(&all, None, "train"), all[..2].to_vec());
        assert_eq!(converted_split_files(&all, Some("other"), "train"), files(&["other/train/0000.parquet"]));
        assert_eq!(converted_split_files(&all, None, "validation"), files(&["default/partial-validation/0000.parquet"]));
        assert_eq!(converted_split_files(&files(&["plain/ds-test.parquet"]), Some("plain"), "test"), files(&["plain/ds-test.parquet"]));
    }

    #[test]
    fn globs() {
        assert!(glob_match("data/train-*", "data/train-00000-of-00001.parquet"));
        assert!(!glob_match("data/train-*", "data/test-00000-of-00001.parquet"));
        assert!(!glob_match("*.parquet", "data/x.parquet"));
        assert!(glob_match("**/*.parquet", "data/x.parquet"));
        assert!(glob_match("**/*.parquet", "x.parquet"));
        assert!(glob_match("data/?.json", "data/a.json"));
    }
}
