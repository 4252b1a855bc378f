//! Where log entries go: `metrics.jsonl` (TRL's `log_history`, one entry a line), TensorBoard event files and
//! the observer (the console). One trait, one list: the training loop writes each entry once.
use super::*;

/// A destination for log entries.
pub(super) trait MetricSink {
    fn write(&mut self, entry: &Map<String, Value>) -> Result<()>;
}

/// `metrics.jsonl`, flushed after every entry so a crash loses nothing logged.
struct Jsonl {
    file: std::fs::File,
    path: PathBuf,
}

impl MetricSink for Jsonl {
    fn write(&mut self, entry: &Map<String, Value>) -> Result<()> {
        let line = serde_json::to_string(entry).map_err(|e| Error::Train(e.to_string()))?;
        writeln!(self.file, "{line}").and_then(|_| self.file.flush()).map_err(|e| Error::file(&self.path, e))
    }
}

/// TensorBoard scalars at the entry's step (an entry without one has no place on the time axis).
impl MetricSink for crate::tensorboard::EventWriter {
    fn write(&mut self, entry: &Map<String, Value>) -> Result<()> {
        match entry.get("step").and_then(|s| s.as_u64()) {
            Some(step) => self.scalars(step as usize, entry),
            None => Ok(()),
        }
    }
}

/// The observer's `log` (the console prints entries when it draws no progress bar).
struct ToObserver<'a>(&'a dyn Observer);

impl MetricSink for ToObserver<'_> {
    fn write(&mut self, entry: &Map<String, Value>) -> Result<()> {
        self.0.log(entry);
        Ok(())
    }
}

/// Every sink of a run, and the entries written so far (the summary's `log_history`).
pub(super) struct MetricSinks<'a> {
    sinks: Vec<Box<dyn MetricSink + 'a>>,
    pub(super) history: Vec<Map<String, Value>>,
}

impl<'a> MetricSinks<'a> {
    /// The sinks of a run on this rank: rank 0 writes `metrics.jsonl` (a resumed run keeps its entries up to the
    /// checkpoint, and TensorBoard replays them) and TensorBoard when `report_to` asks; every rank tells `obs`.
    pub(super) fn open(cfg: &TrainConfig, root: bool, resume_step: Option<usize>, obs: &'a dyn Observer) -> Result<Self> {
        let mut sinks: Vec<Box<dyn MetricSink + 'a>> = Vec::new();
        if root {
            let path = cfg.output_dir.join("metrics.jsonl");
            let (file, kept) = open_metrics(&path, resume_step)?;
            sinks.push(Box::new(Jsonl { file, path }));
            if cfg.report_to.tensorboard() {
                sinks.push(Box::new(crate::tensorboard::EventWriter::create_replaying(&cfg.output_dir, &kept)?));
            }
        }
        sinks.push(Box::new(ToObserver(obs)));
        Ok(MetricSinks { sinks, history: Vec::new() })
    }

    pub(super) fn write(&mut self, entry: Map<String, Value>) -> Result<()> {
        for sink in &mut self.sinks {
            sink.write(&entry)?;
        }
        self.history.push(entry);
        Ok(())
    }
}

/// Opens `metrics.jsonl`: a fresh run starts it empty; a resumed one keeps the entries up to the checkpoint's
/// step (later ones are logged again) and appends. Returns the file and the entries kept.
fn open_metrics(path: &std::path::Path, resume_step: Option<usize>) -> Result<(std::fs::File, Vec<Map<String, Value>>)> {
    if let Some(step) = resume_step {
        let kept: Vec<Map<String, Value>> = std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .filter_map(|line| serde_json::from_str::<Map<String, Value>>(line).ok())
            .filter(|v| !v.contains_key("train_runtime") && v.get("step").and_then(|s| s.as_u64()).is_some_and(|s| s as usize <= step))
            .collect();
        let text: String = kept.iter().map(|v| format!("{}\n", Value::Object(v.clone()))).collect();
        crate::files::write_atomic(path, text.as_bytes())?;
        let file = std::fs::OpenOptions::new().append(true).open(path).map_err(|e| Error::file(path, e))?;
        return Ok((file, kept));
    }
    Ok((std::fs::File::create(path).map_err(|e| Error::file(path, e))?, Vec::new()))
}
