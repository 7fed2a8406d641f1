//! `cpt-worker train` and `cpt-worker prepare`: standalone runs with a live progress line.

use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use candle_core::Device;
use cpt_data::prepare::{prepare, PrepareConfig};
use cpt_protocol::{Event, JobSpec};
use cpt_train::{train, RunOptions, StopFlag};
use indicatif::{ProgressBar, ProgressStyle};

use crate::progress::Progress;

/// Appends events to `<run_dir>/events.jsonl`, one JSON object per line with `seq` (continuing
/// across resumes) and `time` (Unix milliseconds) beside the event's own fields.
pub struct EventLog {
    file: std::fs::File,
    seq: u64,
}

impl EventLog {
    pub fn open(run_dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
        let path = run_dir.join("events.jsonl");
        let seq = match std::fs::File::open(&path) {
            Ok(file) => BufReader::new(file).lines().count() as u64,
            Err(_) => 0,
        };
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        Ok(Self { file, seq })
    }

    pub fn append(&mut self, event: &Event) -> Result<()> {
        let mut value = serde_json::to_value(event)?;
        let time = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
        value["seq"] = self.seq.into();
        value["time"] = time.into();
        writeln!(self.file, "{value}")?;
        self.seq += 1;
        Ok(())
    }
}

/// Runs a job spec file in `run_dir`.
pub fn train_command(
    spec_path: &Path,
    run_dir: &Path,
    resume: bool,
    stop_after_steps: Option<u64>,
    device: Device,
) -> Result<()> {
    let text = std::fs::read_to_string(spec_path).with_context(|| format!("reading {}", spec_path.display()))?;
    let spec = JobSpec::from_json_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", spec_path.display()))?;
    let mut log = EventLog::open(run_dir)?;
    let progress = Progress::new(spec.total_steps());
    let stop = StopFlag::default();
    let options = RunOptions { resume, stop_after_steps, device };
    let mut failure = None;
    let outcome = train(&spec, run_dir, &options, &stop, |event| {
        if let Err(error) = log.append(&event) {
            failure.get_or_insert(error);
            stop.stop();
        }
        progress.show(&event);
    });
    progress.finish();
    if let Some(error) = failure {
        return Err(error.context("writing events.jsonl"));
    }
    let outcome = outcome?;
    let verb = match (outcome.paused, outcome.stopped) {
        (true, _) => "paused by a forgetting budget (resume with --resume)",
        (_, true) => "stopped",
        _ => "finished",
    };
    println!(
        "{verb} at step {} ({} tokens); checkpoint {}",
        outcome.step,
        outcome.tokens_total,
        outcome.checkpoint.display()
    );
    Ok(())
}

/// Tokenizes and packs text files into a dataset directory.
pub fn prepare_command(
    tokenizer: &Path,
    inputs: &[PathBuf],
    out: &Path,
    seq_len: Option<usize>,
    config: Option<&Path>,
) -> Result<()> {
    let mut prepare_config: PrepareConfig = match config {
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?
        }
        None => PrepareConfig::default(),
    };
    if let Some(seq_len) = seq_len {
        prepare_config.seq_len = seq_len;
    }
    if let Err(error) = prepare_config.validate() {
        let source = config.map_or("--seq-len".to_string(), |path| path.display().to_string());
        anyhow::bail!("{source}: {error}");
    }
    let bar = ProgressBar::new_spinner();
    bar.set_style(ProgressStyle::with_template("{spinner} {msg} [{elapsed_precise}]").expect("a valid template"));
    let started = std::time::Instant::now();
    let (manifest, report) = prepare(tokenizer, inputs, out, &prepare_config, |bytes| {
        bar.set_message(format!("{:.1} MB read", bytes as f64 / 1e6));
        bar.tick();
    })?;
    bar.finish_and_clear();
    // The readable report on stderr; the manifest (which embeds the report) as JSON on stdout.
    eprint!("{}", report.table());
    let seconds = started.elapsed().as_secs_f64();
    eprintln!("{} in {seconds:.1} s ({:.2} MB/s)", out.display(), report.bytes_read as f64 / 1e6 / seconds);
    println!("{}", serde_json::to_string_pretty(&manifest)?);
    Ok(())
}
