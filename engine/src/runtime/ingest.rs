//! Ingesters: read a pipeline's outside source (files, stdin) into its inbox in the store. A file
//! is stored in chunks, each committed with a checkpoint (path, size, modification time, records
//! stored), so a restart resumes after the last chunk: nothing skipped, nothing stored twice.
//! A file whose size or modification time changes is read again as a new version.

use super::envelope::StoredHeaders;
use super::{PipelineRun, RunError, Shared};
use crate::message::{ExceptionRecord, RawMessage};
use crate::registry::SourceConfig;
use crate::source::file::{FileSourceConfig, format_of, list_files, split};
use crate::source::stdin::StdinSourceConfig;
use crate::source::{Format, SourceError};
use crate::store::{self, Checkpoint, ExceptionRow, NewMessage, Settle, Settlement, Target};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// Messages stored per commit while ingesting.
const CHUNK: usize = 1000;
/// Ingestion waits while the inbox holds this many messages: reading ahead of the workers
/// without limit would only grow the store.
const INBOX_HIGH_WATER: i64 = 20_000;

pub(super) struct Ingester {
    run: Arc<PipelineRun>,
    shared: Arc<Shared>,
    kind: Kind,
}

enum Kind {
    Files { config: FileSourceConfig, path: PathBuf },
    Stdin(StdinSourceConfig),
}

impl Ingester {
    pub fn for_pipeline(run: Arc<PipelineRun>, shared: Arc<Shared>) -> Option<Ingester> {
        let kind = match &run.pipeline.source {
            SourceConfig::File(c) => {
                Kind::Files { path: crate::build::normalize(&run.pipeline.dir.join(&c.path.value)), config: c.clone() }
            }
            SourceConfig::Stdin(c) => Kind::Stdin(c.clone()),
            SourceConfig::Queue(_) => return None,
        };
        Some(Ingester { run, shared, kind })
    }

    pub async fn run(self) -> Result<(), RunError> {
        let result = match &self.kind {
            Kind::Files { config, path } => self.files(config, path).await,
            Kind::Stdin(config) => self.stdin(config).await,
        };
        self.shared.ingesting.fetch_sub(1, Ordering::SeqCst);
        result
    }

    fn stopping(&self) -> bool {
        *self.shared.shutdown.borrow()
    }

    async fn files(&self, config: &FileSourceConfig, path: &Path) -> Result<(), RunError> {
        let p = &self.run.pipeline;
        let display_base = std::env::current_dir().unwrap_or_default();
        let csv = config.csv.clone().unwrap_or_default();
        // Unreadable files are reported once per version, not at every look.
        let mut reported: HashSet<(String, i64, i64)> = HashSet::new();
        let mut listing_failed = false;
        let mut shutdown = self.shared.shutdown.clone();
        loop {
            match list_files(path, config.pattern.as_deref(), config.format) {
                Err(e) => {
                    if !listing_failed {
                        let e = SourceError::Read { path: path.to_path_buf(), source: e };
                        tracing::error!(pipeline = %p.name, error = %e, "cannot list the source; trying again");
                        if self.shared.once {
                            self.store_exception(p.source_failure(&e)).await?;
                        }
                    }
                    listing_failed = true;
                }
                Ok(files) => {
                    listing_failed = false;
                    let name = p.name.clone();
                    let done = self.shared.store.submit(move |c| store::checkpoints(c, &name)).await?;
                    for file in files {
                        if self.stopping() {
                            return Ok(());
                        }
                        let shown = file.strip_prefix(&display_base).unwrap_or(&file).display().to_string();
                        let key = file.display().to_string();
                        let Ok(meta) = std::fs::metadata(&file) else { continue };
                        let size = meta.len() as i64;
                        let modified = meta
                            .modified()
                            .ok()
                            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                            .map_or(0, |d| d.as_nanos() as i64);
                        let same = done.get(&key).filter(|c| c.size == size && c.modified == modified);
                        if same.is_some_and(|c| c.complete) || reported.contains(&(key.clone(), size, modified)) {
                            continue;
                        }
                        let skip = same.map_or(0, |c| c.records as usize);
                        let content = match tokio::fs::read(&file).await {
                            Ok(c) => c,
                            Err(source) => {
                                reported.insert((key, size, modified));
                                let e = SourceError::Read { path: file.clone(), source };
                                self.store_exception(p.source_failure(&e)).await?;
                                continue;
                            }
                        };
                        let format = config.format.or_else(|| format_of(&file)).unwrap_or(Format::Json);
                        let mut messages = split(&content, format, &shown, &csv);
                        drop(content);
                        for m in &mut messages {
                            m.headers.insert("file.path".into(), shown.clone());
                            if let Some(n) = file.file_name() {
                                m.headers.insert("file.name".into(), n.to_string_lossy().to_string());
                            }
                        }
                        let checkpoint = |records: usize, complete: bool| Checkpoint {
                            pipeline: p.name.clone(),
                            path: key.clone(),
                            size,
                            modified,
                            records: records as i64,
                            complete,
                        };
                        if messages.len() <= skip {
                            self.store_chunk(Vec::new(), checkpoint(messages.len(), true)).await?;
                            continue;
                        }
                        let total = messages.len();
                        let mut stored = skip;
                        let mut rest = messages.split_off(skip);
                        while !rest.is_empty() {
                            if self.stopping() {
                                return Ok(());
                            }
                            self.wait_for_room().await?;
                            let tail = rest.split_off(rest.len().min(CHUNK));
                            let chunk = std::mem::replace(&mut rest, tail);
                            stored += chunk.len();
                            self.store_chunk(chunk, checkpoint(stored, stored == total)).await?;
                        }
                    }
                }
            }
            if self.shared.once {
                return Ok(());
            }
            tokio::select! {
                _ = tokio::time::sleep(p.runtime.poll_interval) => {}
                _ = shutdown.changed() => return Ok(()),
            }
        }
    }

    async fn stdin(&self, config: &StdinSourceConfig) -> Result<(), RunError> {
        use tokio::io::AsyncReadExt;
        let mut buf = Vec::new();
        if let Err(source) = tokio::io::stdin().read_to_end(&mut buf).await {
            let e = SourceError::Read { path: "<stdin>".into(), source };
            return self.store_exception(self.run.pipeline.source_failure(&e)).await;
        }
        let csv = config.csv.clone().unwrap_or_default();
        let mut messages = split(&buf, config.format.unwrap_or(Format::Ndjson), "<stdin>", &csv);
        while !messages.is_empty() {
            self.wait_for_room().await?;
            let tail = messages.split_off(messages.len().min(CHUNK));
            let chunk = std::mem::replace(&mut messages, tail);
            let n = chunk.len() as u64;
            let items = vec![to_inbox(&self.run, chunk)];
            self.shared.store.submit(move |c| store::settle(c, &items, None)).await?;
            self.run.stats.ingested.fetch_add(n, Ordering::Relaxed);
            self.shared.store.wake(&self.run.input_queue);
        }
        Ok(())
    }

    async fn store_chunk(&self, chunk: Vec<RawMessage>, checkpoint: Checkpoint) -> Result<(), RunError> {
        let n = chunk.len() as u64;
        let items = vec![to_inbox(&self.run, chunk)];
        self.shared.store.submit(move |c| store::settle(c, &items, Some(&checkpoint))).await?;
        self.run.stats.ingested.fetch_add(n, Ordering::Relaxed);
        self.shared.store.wake(&self.run.input_queue);
        Ok(())
    }

    /// A source that cannot be read at all: an exception record with nothing to replay.
    async fn store_exception(&self, record: ExceptionRecord) -> Result<(), RunError> {
        tracing::warn!(pipeline = %record.pipeline, reason = %record.reason, origin = ?record.origin, "input sent to exceptions");
        let reason = record.reason.clone();
        let row = ExceptionRow { record, headers: "{}".into(), replayable: false };
        let items = vec![Settlement { input: None, outcome: Settle::Done { outputs: vec![], exceptions: vec![row] } }];
        self.shared.store.submit(move |c| store::settle(c, &items, None)).await?;
        *self.run.stats.exceptions.lock().expect("stats lock").entry(reason).or_default() += 1;
        self.run.stats.received.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    async fn wait_for_room(&self) -> Result<(), RunError> {
        loop {
            let stream = self.run.stream;
            let depth = self.shared.store.submit(move |c| store::pending(c, &[stream])).await?;
            if depth < INBOX_HIGH_WATER || self.stopping() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn to_inbox(run: &PipelineRun, messages: Vec<RawMessage>) -> Settlement {
    let outputs = messages
        .into_iter()
        .map(|mut m| {
            m.received_at.get_or_insert_with(chrono::Utc::now);
            let message_id = m.message_id.clone().unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
            let headers = StoredHeaders::of_raw(&m).to_json();
            (Target::Stream(run.stream), NewMessage { message_id, headers, body: m.body })
        })
        .collect();
    Settlement { input: None, outcome: Settle::Done { outputs, exceptions: vec![] } }
}
