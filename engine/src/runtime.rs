//! Running pipelines. This runtime is `run --once`: read the available input, process
//! it, write outputs and exception records, and report counts that add up.

use crate::message::{ErrorDetail, ExceptionRecord, Failure, Stage, reason};
use crate::pipeline::{Outcome, Pipeline};
use crate::registry::{SinkConfig, SourceConfig};
use crate::sink::file::{FileSink, open_append};
use crate::sink::stdout::StdoutSink;
use crate::sink::{Sink, SinkContext, SinkError};
use crate::source::file::FileSource;
use crate::source::stdin::StdinSource;
use crate::source::{Delivery, Source, SourceError};
use indexmap::IndexMap;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tokio::io::AsyncWriteExt;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("pipeline {pipeline}: {source}")]
    Source { pipeline: String, source: SourceError },
    #[error("pipeline {pipeline}: {source}")]
    Sink { pipeline: String, source: SinkError },
    #[error("pipeline {pipeline}: cannot write exception records to {}: {source}", path.display())]
    Exceptions { pipeline: String, path: PathBuf, source: std::io::Error },
}

/// What one run of one pipeline did. `received = routed + exceptions`.
#[derive(Debug, Default, Clone)]
pub struct Summary {
    pub pipeline: String,
    pub received: u64,
    pub routed: u64,
    /// Messages written per sink (a message routed to two sinks counts in both).
    pub outputs: IndexMap<String, u64>,
    pub exceptions: BTreeMap<String, u64>,
    pub exceptions_file: PathBuf,
    /// Sink name -> where it writes.
    pub targets: IndexMap<String, String>,
}

impl Summary {
    pub fn exception_count(&self) -> u64 {
        self.exceptions.values().sum()
    }
}

/// Where the runtime keeps its files: outputs of relative file sinks and exception records.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub data_dir: PathBuf,
}

/// The exception output of a pipeline: NDJSON under `<data dir>/exceptions/`.
pub fn exceptions_path(data_dir: &Path, pipeline: &str) -> PathBuf {
    data_dir.join("exceptions").join(format!("{pipeline}.ndjson"))
}

fn build_source(p: &Pipeline) -> Result<Box<dyn Source>, SourceError> {
    Ok(match &p.source {
        SourceConfig::File(c) => Box::new(FileSource::new(c, crate::build::normalize(&p.dir.join(&c.path.value)))?),
        SourceConfig::Stdin(c) => Box::new(StdinSource::new(c)),
    })
}

/// Builds the runtime sink of a sink config.
pub fn build_sink(config: &SinkConfig, cx: &SinkContext) -> Box<dyn Sink> {
    match config {
        SinkConfig::File(c) => Box::new(FileSink::new(c, cx)),
        SinkConfig::Stdout(c) => Box::new(StdoutSink { format: c.format }),
    }
}

struct ExceptionWriter {
    path: PathBuf,
    file: Option<tokio::io::BufWriter<tokio::fs::File>>,
}

impl ExceptionWriter {
    async fn write(&mut self, record: &ExceptionRecord) -> std::io::Result<()> {
        if self.file.is_none() {
            self.file = Some(tokio::io::BufWriter::new(open_append(&self.path).await?));
        }
        let mut line = serde_json::to_vec(record).expect("exception records serialize");
        line.push(b'\n');
        self.file.as_mut().expect("opened").write_all(&line).await
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        if let Some(f) = self.file.as_mut() {
            f.flush().await?;
            f.get_ref().sync_data().await?;
        }
        Ok(())
    }
}

/// Processes everything the pipeline's source holds now, then returns the counts. Whatever
/// happens, what was written is flushed before returning.
pub async fn run_once(p: &Pipeline, opts: &RunOptions) -> Result<Summary, RunError> {
    let mut source = build_source(p).map_err(|source| RunError::Source { pipeline: p.name.clone(), source })?;
    let cx = SinkContext { data_dir: opts.data_dir.clone() };
    let sinks: Vec<Box<dyn Sink>> = p.sinks.iter().map(|(_, c)| build_sink(c, &cx)).collect();
    let mut summary = Summary { pipeline: p.name.clone(), exceptions_file: exceptions_path(&opts.data_dir, &p.name), ..Default::default() };
    for ((name, _), sink) in p.sinks.iter().zip(&sinks) {
        summary.outputs.insert(name.clone(), 0);
        summary.targets.insert(name.clone(), sink.describe());
    }
    let mut exceptions = ExceptionWriter { path: summary.exceptions_file.clone(), file: None };
    let result = drain(p, source.as_mut(), &sinks, &mut exceptions, &mut summary).await;
    // Flush on every path: messages already counted as routed must be in their files.
    let mut flushed = Ok(());
    for (sink, (name, _)) in sinks.iter().zip(&p.sinks) {
        if let Err(source) = sink.flush().await {
            flushed = flushed.and(Err(RunError::Sink { pipeline: name.clone(), source }));
        }
    }
    if let Err(source) = exceptions.flush().await {
        flushed = flushed.and(Err(RunError::Exceptions { pipeline: p.name.clone(), path: summary.exceptions_file.clone(), source }));
    }
    result.and(flushed).map(|()| summary)
}

async fn drain(
    p: &Pipeline,
    source: &mut dyn Source,
    sinks: &[Box<dyn Sink>],
    exceptions: &mut ExceptionWriter,
    summary: &mut Summary,
) -> Result<(), RunError> {
    let path = exceptions.path.clone();
    let exc_err = |source| RunError::Exceptions { pipeline: p.name.clone(), path: path.clone(), source };
    while let Some(next) = source.next().await {
        summary.received += 1;
        let incoming = match next {
            Ok(i) => i,
            // An input that cannot be read is recorded, and the rest is still processed.
            Err(e) => {
                let record = p.source_failure(&e);
                exceptions.write(&record).await.map_err(exc_err)?;
                *summary.exceptions.entry(record.reason.clone()).or_default() += 1;
                continue;
            }
        };
        let body = incoming.raw.body.clone();
        let record = match process_guarded(p, incoming.raw, &body) {
            Outcome::Routed { output, sinks: targets } => {
                let mut failed = None;
                for &i in &targets {
                    match sinks[i].write(&output).await {
                        Ok(()) => *summary.outputs.get_mut(p.sink_name(i)).expect("every sink is counted") += 1,
                        Err(e) => {
                            failed =
                                Some(Failure::one(reason::SINK_FAILED, ErrorDetail::record("", format!("sink `{}`: {e}", p.sink_name(i)))));
                            break;
                        }
                    }
                }
                match failed {
                    None => {
                        summary.routed += 1;
                        None
                    }
                    Some(f) => Some(p.exception(output.metadata, &body, Stage::Sink, None, f)),
                }
            }
            Outcome::Failed(record) => Some(*record),
        };
        if let Some(record) = record {
            tracing::info!(pipeline = %p.name, correlation_id = %record.correlation_id, reason = %record.reason, stage = record.stage.as_str(), "message sent to exceptions");
            exceptions.write(&record).await.map_err(exc_err)?;
            *summary.exceptions.entry(record.reason.clone()).or_default() += 1;
        }
        incoming.ack.ack(Delivery::Delivered).await;
    }
    Ok(())
}

/// Runs the pipeline on one message; a bug that panics becomes that message's exception record
/// instead of ending the run.
pub fn process_guarded(p: &Pipeline, raw: crate::message::RawMessage, body: &[u8]) -> Outcome {
    let origin = raw.origin.clone();
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| p.process(raw))) {
        Ok(outcome) => outcome,
        Err(panic) => {
            let what =
                panic.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| panic.downcast_ref::<String>().cloned()).unwrap_or_default();
            let f = Failure::one(
                reason::INTERNAL_ERROR,
                ErrorDetail::input("", format!("Switchyard failed on this message (a bug; please report it): {what}")),
            );
            let mut raw = crate::message::RawMessage::json(body.to_vec());
            raw.origin = origin;
            Outcome::Failed(Box::new(p.failure_record(&raw, Stage::Map, f)))
        }
    }
}
