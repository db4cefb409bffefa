//! Ingesters: read a pipeline's outside source (files, stdin) into its inbox in the store.
//!
//! A file is stored in chunks, each committed with a checkpoint (canonical path, modification
//! time, the bytes read so far and their hash, records stored), so a restart resumes after the
//! last chunk: nothing skipped, nothing stored twice. A file whose first part is unchanged and
//! that gained lines (an NDJSON log, a CSV export) is read on from where it was; a file touched
//! but unchanged is not read again; any other change makes it a new version, read whole.
//!
//! A file may still be being written. While running continuously, an NDJSON line is read once it
//! ends with a newline, and a last line without one, or a JSON or CSV file, once the file has not
//! changed for [`settle_time`].

use super::envelope::StoredHeaders;
use super::{PipelineRun, RunError, Shared};
use crate::message::{ExceptionRecord, RawMessage};
use crate::registry::SourceConfig;
use crate::source::file::{FileSourceConfig, NdjsonLines, format_of, list_files, split};
use crate::source::poll::{self, MAX_PAGES, PollCursor, PollPlan, advance};
use crate::source::stdin::StdinSourceConfig;
use crate::source::{Format, SourceError};
use crate::store::{self, Checkpoint, CheckpointWrite, ExceptionRow, NewMessage, Settle, Settlement, StoreError, Target};
use std::collections::HashSet;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::sync::mpsc;

/// Messages stored per commit while ingesting.
const CHUNK: usize = 1000;
/// Ingestion waits while the inbox holds this many messages: reading ahead of the workers
/// without limit would only grow the store.
pub(super) const INBOX_HIGH_WATER: i64 = 20_000;

pub(super) struct Ingester {
    run: Arc<PipelineRun>,
    shared: Arc<Shared>,
    kind: Kind,
}

enum Kind {
    Files { config: FileSourceConfig, path: PathBuf },
    Stdin(StdinSourceConfig),
    Poll(Arc<crate::source::poll::PollPlan>),
}

/// How far into a file a reader got: bytes read and their hash.
#[derive(Debug, Clone, Copy, Default)]
struct Progress {
    consumed: u64,
    hash: i64,
}

/// What a reader thread hands the ingester.
enum Piece {
    /// Messages, and how far the file was read once they were taken.
    Chunk(Vec<RawMessage>, Progress),
    /// The end of what can be read now; `complete` when that is the whole file.
    End {
        at: Progress,
        complete: bool,
    },
    Failed(std::io::Error),
}

/// How long a file must stay unchanged before a part that may be unfinished is read.
fn settle_time(poll: Duration) -> Duration {
    (poll * 2).max(Duration::from_secs(2))
}

/// A reader that hashes what passes through it.
struct Hashing<R> {
    inner: R,
    hasher: xxhash_rust::xxh3::Xxh3,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

fn hash_of(bytes: &[u8]) -> i64 {
    xxhash_rust::xxh3::xxh3_64(bytes) as i64
}

/// The hash of a file's first `len` bytes, and whether they end a line.
fn prefix_hash(path: &Path, len: u64) -> std::io::Result<(i64, bool)> {
    let mut r = Hashing { inner: std::fs::File::open(path)?.take(len), hasher: Default::default() };
    let mut last = [0u8; 1];
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            break;
        }
        last[0] = buf[n - 1];
    }
    Ok((r.hasher.digest() as i64, last[0] == b'\n'))
}

/// Where to start reading a file, given what was stored of it before.
#[derive(Debug, PartialEq)]
enum Start {
    /// Already stored whole, nothing to do.
    Done,
    /// Touched, same content: only the checkpoint's time changes.
    Touched,
    /// Skip this many records (an interrupted read, or lines appended to a file read before).
    At(usize),
}

/// `len` and `modified` are the file's now; the checkpoint's `size` is the bytes read before.
fn start_of(seen: Option<&Checkpoint>, len: i64, modified: i64, format: Format, path: &Path) -> Start {
    let Some(c) = seen else { return Start::At(0) };
    if c.complete && c.size == len && c.modified == modified {
        return Start::Done;
    }
    if len < c.size {
        return Start::At(0);
    }
    let Ok((hash, ends_line)) = prefix_hash(path, c.size as u64) else { return Start::At(0) };
    if hash != c.content_hash {
        return Start::At(0);
    }
    if !c.complete {
        // Interrupted, or lines held back: go on from there.
        return Start::At(c.records as usize);
    }
    if len == c.size {
        return Start::Touched;
    }
    // Grown: lines appended to a file whose old part ended a line are read on from there.
    if format != Format::Json && (ends_line || c.size == 0) { Start::At(c.records as usize) } else { Start::At(0) }
}

impl Ingester {
    pub fn for_pipeline(run: Arc<PipelineRun>, shared: Arc<Shared>) -> Option<Ingester> {
        let kind = match &run.pipeline.source {
            SourceConfig::File(c) => {
                Kind::Files { path: crate::build::normalize(&run.pipeline.dir.join(&c.path.value)), config: c.clone() }
            }
            SourceConfig::Stdin(c) => Kind::Stdin(c.clone()),
            SourceConfig::HttpPoll(_) => Kind::Poll(run.pipeline.poll_source.clone()?),
            SourceConfig::Queue(_) | SourceConfig::Amqp(_) | SourceConfig::Http(_) => return None,
        };
        Some(Ingester { run, shared, kind })
    }

    pub async fn run(self) -> Result<(), RunError> {
        let result = match &self.kind {
            Kind::Files { config, path } => self.files(config, path).await,
            Kind::Stdin(config) => self.stdin(config).await,
            Kind::Poll(plan) => self.poll(plan).await,
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
                    let seen = self.shared.store.submit(move |c| store::checkpoints(c, &name)).await?;
                    for file in files {
                        if self.stopping() {
                            return Ok(());
                        }
                        // The checkpoint key: the same file however the pipeline was named or run.
                        let key = std::fs::canonicalize(&file).unwrap_or_else(|_| file.clone()).display().to_string();
                        let Ok(meta) = std::fs::metadata(&file) else { continue };
                        let size = meta.len() as i64;
                        let modified_at = meta.modified().ok();
                        let modified =
                            modified_at.and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map_or(0, |d| d.as_nanos() as i64);
                        if reported.contains(&(key.clone(), size, modified)) {
                            continue;
                        }
                        let format = config.format.or_else(|| format_of(&file)).unwrap_or(Format::Json);
                        // Running continuously, a file may still be being written.
                        let settled = self.shared.once
                            || modified_at.and_then(|t| t.elapsed().ok()).is_some_and(|age| age >= settle_time(p.runtime.poll_interval));
                        if !settled && format != Format::Ndjson {
                            continue;
                        }
                        let before = seen.get(&key).cloned();
                        let start = start_of(before.as_ref(), size, modified, format, &file);
                        let new = |records: i64, complete: bool, at: Progress| Checkpoint {
                            pipeline: p.name.clone(),
                            path: key.clone(),
                            size: at.consumed as i64,
                            modified,
                            records,
                            complete,
                            content_hash: at.hash,
                        };
                        let shown = file.strip_prefix(&display_base).unwrap_or(&file).display().to_string();
                        let outcome = match start {
                            Start::Done => continue,
                            Start::Touched => {
                                let c = before.clone().expect("touched means seen");
                                let w = CheckpointWrite { new: Checkpoint { modified, ..c }, seen: before };
                                self.store_chunk(Vec::new(), w).await
                            }
                            Start::At(skip) => {
                                let read =
                                    FileRead { file: &file, shown: &shown, format, skip, whole_lines_only: !settled, config, new: &new };
                                self.read_file(read, before).await
                            }
                        };
                        match outcome {
                            Ok(()) => {}
                            Err(RunError::Store(StoreError::Refused(why))) => {
                                tracing::warn!(pipeline = %p.name, "{why}; leaving it to that engine");
                            }
                            Err(RunError::Source { source, .. }) => {
                                reported.insert((key, size, modified));
                                self.store_exception(p.source_failure(&source)).await?;
                            }
                            Err(e) => return Err(e),
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

    /// Stores a file's records from `skip` on, chunk by chunk, each with its checkpoint.
    async fn read_file(&self, read: FileRead<'_>, before: Option<Checkpoint>) -> Result<(), RunError> {
        let source_error = |e: std::io::Error| RunError::Source {
            pipeline: self.run.pipeline.name.clone(),
            source: SourceError::Read { path: read.file.to_path_buf(), source: e },
        };
        let (tx, mut rx) = mpsc::channel::<Piece>(2);
        let (path, shown, format, csv) =
            (read.file.to_path_buf(), read.shown.to_string(), read.format, read.config.csv.clone().unwrap_or_default());
        let (skip, whole_lines_only) = (read.skip, read.whole_lines_only);
        // Reading and splitting happen off the async threads; NDJSON is streamed.
        std::thread::spawn(move || {
            let send = |piece| tx.blocking_send(piece).is_ok();
            let label = |mut m: RawMessage| {
                m.headers.insert("file.path".into(), shown.clone());
                if let Some(n) = path.file_name() {
                    m.headers.insert("file.name".into(), n.to_string_lossy().to_string());
                }
                m
            };
            match format {
                Format::Ndjson => {
                    let file = match std::fs::File::open(&path) {
                        Ok(f) => f,
                        Err(e) => return send(Piece::Failed(e)),
                    };
                    let mut lines = NdjsonLines::new(std::io::BufReader::new(file), shown.clone()).whole_lines_only(whole_lines_only);
                    let at = |l: &NdjsonLines<_>| Progress { consumed: l.consumed(), hash: l.hash() };
                    let mut chunk = Vec::with_capacity(CHUNK);
                    let mut index = 0;
                    while let Some(m) = lines.next() {
                        index += 1;
                        match m {
                            Ok(_) if index <= skip => continue,
                            Ok(m) => chunk.push(label(m)),
                            Err(e) => return send(Piece::Failed(e)),
                        }
                        if chunk.len() == CHUNK && !send(Piece::Chunk(std::mem::take(&mut chunk), at(&lines))) {
                            return false;
                        }
                    }
                    let end = at(&lines);
                    send(Piece::Chunk(chunk, end)) && send(Piece::End { at: end, complete: !lines.held_back })
                }
                Format::Json | Format::Csv => {
                    let content = match std::fs::read(&path) {
                        Ok(c) => c,
                        Err(e) => return send(Piece::Failed(e)),
                    };
                    let whole = Progress { consumed: content.len() as u64, hash: hash_of(&content) };
                    let messages: Vec<RawMessage> = split(&content, format, &shown, &csv).into_iter().skip(skip).map(label).collect();
                    drop(content);
                    let mut rest = messages.into_iter().peekable();
                    while rest.peek().is_some() {
                        if !send(Piece::Chunk(rest.by_ref().take(CHUNK).collect(), whole)) {
                            return false;
                        }
                    }
                    send(Piece::End { at: whole, complete: true })
                }
            }
        });
        let mut seen = before;
        let mut stored = skip as i64;
        let mut held: Option<(Vec<RawMessage>, Progress)> = None;
        while let Some(piece) = rx.recv().await {
            match piece {
                Piece::Failed(e) => return Err(source_error(e)),
                Piece::Chunk(chunk, at) => {
                    // Each chunk is stored when the next piece arrives, so the last one can carry
                    // the final checkpoint.
                    if let Some((prev, prev_at)) = held.replace((chunk, at))
                        && !prev.is_empty()
                    {
                        if self.stopping() {
                            return Ok(());
                        }
                        self.wait_for_room().await?;
                        stored += prev.len() as i64;
                        let w = CheckpointWrite { new: (read.new)(stored, false, prev_at), seen: seen.take() };
                        let next_seen = w.new.clone();
                        self.store_chunk(prev, w).await?;
                        seen = Some(next_seen);
                    }
                }
                Piece::End { at, complete } => {
                    let last = held.take().map(|(c, _)| c).unwrap_or_default();
                    let new = (read.new)(stored + last.len() as i64, complete, at);
                    if last.is_empty() && seen.as_ref() == Some(&new) {
                        return Ok(());
                    }
                    self.wait_for_room().await?;
                    return self.store_chunk(last, CheckpointWrite { new, seen: seen.take() }).await;
                }
            }
        }
        Ok(())
    }

    async fn stdin(&self, config: &StdinSourceConfig) -> Result<(), RunError> {
        // Lines go one by one and are gathered into chunks on this side, so lines that arrive
        // slowly are processed as they come and a fast stream still commits in chunks.
        let (tx, mut rx) = mpsc::channel::<Piece>(CHUNK);
        let format = config.format.unwrap_or(Format::Ndjson);
        let csv = config.csv.clone().unwrap_or_default();
        // A plain thread: a read from stdin cannot be cancelled, and a stop must not wait for it.
        std::thread::spawn(move || {
            let send = |piece| tx.blocking_send(piece).is_ok();
            match format {
                Format::Ndjson => {
                    for m in NdjsonLines::new(std::io::stdin().lock(), "<stdin>") {
                        let piece = match m {
                            Ok(m) => Piece::Chunk(vec![m], Progress::default()),
                            Err(e) => return send(Piece::Failed(e)),
                        };
                        if !send(piece) {
                            return false;
                        }
                    }
                    send(Piece::End { at: Progress::default(), complete: true })
                }
                Format::Json | Format::Csv => {
                    let mut buf = Vec::new();
                    if let Err(e) = std::io::stdin().lock().read_to_end(&mut buf) {
                        return send(Piece::Failed(e));
                    }
                    send(Piece::Chunk(split(&buf, format, "<stdin>", &csv), Progress::default()))
                        && send(Piece::End { at: Progress::default(), complete: true })
                }
            }
        });
        let mut shutdown = self.shared.shutdown.clone();
        loop {
            let piece = tokio::select! {
                p = rx.recv() => p,
                _ = shutdown.changed() => return Ok(()),
            };
            match piece {
                None | Some(Piece::End { .. }) => return Ok(()),
                Some(Piece::Failed(source)) => {
                    let e = SourceError::Read { path: "<stdin>".into(), source };
                    return self.store_exception(self.run.pipeline.source_failure(&e)).await;
                }
                Some(Piece::Chunk(mut chunk, _)) => {
                    let mut end = false;
                    while chunk.len() < CHUNK {
                        match rx.try_recv() {
                            Ok(Piece::Chunk(more, _)) => chunk.extend(more),
                            Ok(Piece::End { .. }) => {
                                end = true;
                                break;
                            }
                            Ok(Piece::Failed(e)) => {
                                tracing::error!(error = %e, "standard input could not be read to its end");
                                end = true;
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    if chunk.is_empty() {
                        continue;
                    }
                    self.wait_for_room().await?;
                    let n = chunk.len() as u64;
                    let items = vec![to_inbox(&self.run, chunk)];
                    self.shared.store.submit(move |c| store::settle(c, &items, None, &[])).await?;
                    self.run.stats.ingested.fetch_add(n, Ordering::Relaxed);
                    self.shared.store.wake(&self.run.input_queue);
                    if end {
                        return Ok(());
                    }
                }
            }
        }
    }

    async fn store_chunk(&self, chunk: Vec<RawMessage>, checkpoint: CheckpointWrite) -> Result<(), RunError> {
        let n = chunk.len() as u64;
        let items = vec![to_inbox(&self.run, chunk)];
        self.shared.store.submit(move |c| store::settle(c, &items, Some(&checkpoint), &[])).await?;
        self.run.stats.ingested.fetch_add(n, Ordering::Relaxed);
        self.shared.store.wake(&self.run.input_queue);
        Ok(())
    }

    /// A source that cannot be read at all: an exception record with nothing to replay.
    async fn store_exception(&self, record: ExceptionRecord) -> Result<(), RunError> {
        tracing::warn!(pipeline = %record.pipeline, reason = %record.reason, origin = ?record.origin, "input sent to exceptions");
        let reason = record.reason.clone();
        let row = ExceptionRow { record, headers: "{}".into(), replayable: false };
        let state = &self.shared.state;
        if state.embedded().is_some() {
            let items = vec![Settlement { input: None, outcome: Settle::Done { outputs: vec![], exceptions: vec![row], key: None } }];
            self.shared.store.submit(move |c| store::settle(c, &items, None, &[])).await?;
        } else {
            // The shared store away: the source waits for it rather than lose the record.
            while let Err(e) = state.record_exceptions(vec![row.clone()]).await {
                if self.stopping() {
                    return Err(e.into());
                }
                tracing::warn!(pipeline = %self.run.pipeline.name, error = %e, store = %state.describe(), "an exception record cannot be written to the shared store; trying again");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
        *self.run.stats.exceptions.lock().expect("stats lock").entry(reason).or_default() += 1;
        self.run.stats.received.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Polls every `every` (once with `--once`); a failed poll is said and tried at the next.
    async fn poll(&self, plan: &PollPlan) -> Result<(), RunError> {
        let p = &self.run.pipeline;
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client =
            reqwest::Client::builder()
                .timeout(plan.timeout)
                // Redirects are followed on the same origin only: the credentials go with them.
                .redirect({
                    let origin = plan.base_url().origin();
                    reqwest::redirect::Policy::custom(move |a| {
                        if a.previous().len() >= 5 || a.url().origin() != origin { a.stop() } else { a.follow() }
                    })
                })
                .user_agent(crate::sink::http::USER_AGENT)
                .build()
                .map_err(|e| RunError::Source {
                    pipeline: p.name.clone(),
                    source: SourceError::Poll(format!("cannot start the HTTP client for GET {}: {e}", plan.shown)),
                })?;
        let mut shutdown = self.shared.shutdown.clone();
        let mut failures = 0u32;
        loop {
            if self.stopping() {
                return Ok(());
            }
            match self.poll_once(plan, &client).await {
                Ok((taken, skipped)) => {
                    if failures > 0 {
                        tracing::warn!(pipeline = %p.name, url = %plan.shown, "polling works again");
                    }
                    failures = 0;
                    tracing::info!(pipeline = %p.name, url = %plan.shown, taken, skipped, "polled");
                }
                Err(PollError::Store(e)) => return Err(e),
                Err(PollError::Source(why)) => {
                    failures += 1;
                    if failures == 1 || failures.is_multiple_of(10) {
                        tracing::error!(pipeline = %p.name, error = %why, failures, "a poll failed; nothing from it is stored, the next poll asks again from the same cursor");
                    }
                }
            }
            if self.shared.once {
                return Ok(());
            }
            tokio::select! {
                _ = tokio::time::sleep(plan.every) => {}
                _ = shutdown.changed() => {}
            }
        }
    }

    /// One poll: every page from the stored cursor, then the records and the new cursor in one
    /// commit. Returns the records taken and those skipped as already taken.
    async fn poll_once(&self, plan: &PollPlan, client: &reqwest::Client) -> Result<(usize, usize), PollError> {
        let (name, key) = (self.run.pipeline.name.clone(), plan.shown.clone());
        let stored = {
            let (name, key) = (name.clone(), key.clone());
            self.shared.store.submit(move |c| store::poll_cursor(c, &name, &key)).await.map_err(|e| PollError::Store(e.into()))?
        };
        let cursor = stored
            .map_or_else(|| PollCursor { value: plan.start.clone(), at_value: vec![] }, |(value, at_value)| PollCursor { value, at_value });
        let mut url = plan.first_url(&cursor.value);
        let (mut messages, mut taken, mut skipped) = (Vec::new(), Vec::new(), 0);
        // A record that shows on two pages of one poll (the list moved while paged) is taken once.
        let mut this_poll: std::collections::HashSet<(String, String)> = std::collections::HashSet::new();
        let mut cut = false;
        for n in 1..=MAX_PAGES {
            let (page, link) = get_page(client, plan, url.clone()).await.map_err(PollError::Source)?;
            let found = plan.records(&page, &cursor);
            skipped += found.skipped;
            if found.unkeyed > 0 {
                tracing::warn!(pipeline = %name, url = %plan.shown, records = found.unkeyed, "records without a cursor value or an id: taken, but the next poll may send them again");
            }
            for (body, value, id) in found.records {
                if !id.is_empty() && !this_poll.insert((value.clone(), id.clone())) {
                    skipped += 1;
                    continue;
                }
                let mut headers = std::collections::BTreeMap::new();
                headers.insert("http.poll_url".to_string(), plan.shown.clone());
                messages.push(RawMessage { headers, origin: Some(format!("GET {} page {n}", plan.shown)), ..RawMessage::json(body) });
                taken.push((value, id));
            }
            match plan.next_url(&page, link.as_deref()) {
                Some(next) if n < MAX_PAGES => url = next,
                Some(_) => cut = true,
                None => break,
            }
        }
        // Cut short, the cursor moves only if the pages came oldest first (what was not read is
        // newer): else unread older records would be skipped, so it stays, and the next poll
        // reads these again (duplicates are for the idempotency keys to stop).
        let values: Vec<&str> = taken.iter().map(|(v, _)| v.as_str()).filter(|v| !v.is_empty()).collect();
        let ascending = values.windows(2).all(|w| poll::compare(w[0], w[1]).is_le());
        if cut && !ascending {
            // Newest first and more than a poll reads: moving the cursor would skip the older
            // records, keeping it would read the same pages for ever. Nothing is stored.
            return Err(PollError::Source(format!(
                "GET {}: more than {MAX_PAGES} pages since the cursor, listed newest first: ask the API for oldest first (a sort parameter in `query:`), or poll more often",
                plan.shown
            )));
        }
        let next = advance(&cursor, &taken);
        if cut {
            tracing::warn!(pipeline = %name, url = %plan.shown, pages = MAX_PAGES, "stopped after the most pages one poll reads; the next poll goes on from the cursor");
        }
        let count = messages.len();
        self.wait_for_room().await.map_err(PollError::Store)?;
        let items = vec![to_inbox(&self.run, messages)];
        self.shared
            .store
            .submit(move |c| {
                store::settle(c, &items, None, &[])?;
                store::save_poll_cursor(c, &name, &key, &next.value, &next.at_value)
            })
            .await
            .map_err(|e| PollError::Store(e.into()))?;
        self.run.stats.ingested.fetch_add(count as u64, Ordering::Relaxed);
        self.shared.store.wake(&self.run.input_queue);
        Ok((count, skipped))
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

enum PollError {
    /// The channel's API: said, and asked again at the next poll.
    Source(String),
    Store(RunError),
}

/// One page: GET with the source's headers and credentials (a 401 with OAuth2 fetches a new
/// token and asks once more), the body as JSON and the `Link` header.
async fn get_page(client: &reqwest::Client, plan: &PollPlan, url: reqwest::Url) -> Result<(crate::doc::Doc, Option<String>), String> {
    use crate::sink::http_auth::{Sent, send_authorized};
    let response = match send_authorized(plan.auth.as_ref(), client, || client.get(url.clone()).headers(plan.headers())).await {
        Sent::Answer(r) => r,
        Sent::Credentials(e) => return Err(e.to_string()),
        Sent::Send(e) => return Err(format!("GET {}: the request failed ({})", plan.shown, e.without_url())),
    };
    let status = response.status();
    let link = response.headers().get(reqwest::header::LINK).and_then(|v| v.to_str().ok()).map(str::to_string);
    let body = response.bytes().await.map_err(|e| format!("GET {}: the answer could not be read ({})", plan.shown, e.without_url()))?;
    if !status.is_success() {
        return Err(format!("GET {} answered {status}: {}", plan.shown, crate::sink::http::excerpt(&body)));
    }
    let page = crate::doc::Doc::parse_bytes(&body).map_err(|e| format!("GET {}: the answer is not JSON ({e})", plan.shown))?;
    Ok((page, link))
}

/// One file to read, and how its checkpoints are made.
struct FileRead<'a> {
    file: &'a Path,
    shown: &'a str,
    format: Format,
    skip: usize,
    /// Hold back a last line without its newline: the file may still be being written.
    whole_lines_only: bool,
    config: &'a FileSourceConfig,
    new: &'a (dyn Fn(i64, bool, Progress) -> Checkpoint + Sync),
}

pub(super) fn to_inbox(run: &PipelineRun, messages: Vec<RawMessage>) -> Settlement {
    let outputs = messages
        .into_iter()
        .map(|mut m| {
            m.received_at.get_or_insert_with(chrono::Utc::now);
            let message_id = m.message_id.clone().unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
            let headers = StoredHeaders::of_raw(&m).to_json();
            (Target::Stream(run.stream), NewMessage { message_id, headers, body: m.body })
        })
        .collect();
    Settlement { input: None, outcome: Settle::Done { outputs, exceptions: vec![], key: None } }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cp(size: i64, modified: i64, records: i64, complete: bool, content_hash: i64) -> Checkpoint {
        Checkpoint { pipeline: "p".into(), path: "f".into(), size, modified, records, complete, content_hash }
    }

    #[test]
    fn appended_lines_are_read_on_and_a_touched_file_is_not_read_again() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("a.ndjson");
        let old = b"{\"n\":1}\n{\"n\":2}\n";
        std::fs::write(&f, old).unwrap();
        let seen = cp(old.len() as i64, 1, 2, true, hash_of(old));
        assert_eq!(start_of(Some(&seen), old.len() as i64, 1, Format::Ndjson, &f), Start::Done);
        assert_eq!(start_of(Some(&seen), old.len() as i64, 2, Format::Ndjson, &f), Start::Touched);
        std::fs::write(&f, b"{\"n\":1}\n{\"n\":2}\n{\"n\":3}\n").unwrap();
        assert_eq!(start_of(Some(&seen), 24, 3, Format::Ndjson, &f), Start::At(2), "appended: read on after two records");
        assert_eq!(start_of(Some(&seen), 24, 3, Format::Json, &f), Start::At(0), "a JSON document that changed is a new version");
        std::fs::write(&f, b"{\"n\":9}\n{\"n\":2}\n{\"n\":3}\n").unwrap();
        assert_eq!(start_of(Some(&seen), 24, 4, Format::Ndjson, &f), Start::At(0), "the old part changed: a new version");
        let interrupted = cp(8, 4, 1, false, hash_of(b"{\"n\":9}\n"));
        assert_eq!(start_of(Some(&interrupted), 24, 4, Format::Ndjson, &f), Start::At(1), "an interrupted read resumes");
        assert_eq!(start_of(None, 24, 4, Format::Ndjson, &f), Start::At(0));
    }
}
