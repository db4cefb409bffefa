//! The runtime: runs pipelines continuously over the embedded durable store.
//!
//! Every pipeline consumes a stream of the store: its `queue` source, or, for outside sources
//! (files, stdin), an inbox the runtime fills from them with a checkpoint per file. Workers lease
//! a batch, process it, write outside sinks (files) and make them durable, then settle the batch
//! in one store commit: the inputs leave their queue in the same transaction that stores the
//! queue outputs and the exception records. A worker that dies leaves its lease to expire (or to
//! be reclaimed at once when its process is gone), so nothing is lost: at least once.

mod amqp_worker;
pub mod delivery;
pub mod envelope;
pub mod http_server;
mod ingest;
mod reload;
mod replays;
mod worker;

pub use reload::Reloader;

use crate::message::{ErrorDetail, Failure, Stage, reason};
use crate::pipeline::{Outcome, Pipeline};
use crate::registry::{SinkConfig, SourceConfig};
use crate::sink::file::FileSink;
use crate::sink::http::HttpSink;
use crate::sink::stdout::StdoutSink;
use crate::sink::{OutputFormat, Sink, SinkContext, SinkError};
use crate::source::SourceError;
use crate::store::{self, Durability, Store, StoreError, StreamId};
use indexmap::IndexMap;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::watch;

/// The stack of every thread that runs pipelines. Rhai measures, copies and drops a script's
/// lists, maps and closures recursively, a native frame or more per level of nesting (about 300
/// bytes per level of maps in a release build, 700 in a debug one), and a script can nest them
/// as deep as its operation and time limits let it: a few thousand levels overflow the 2 MiB a
/// thread gets by default, which aborts the process (no panic to catch) and, with at-least-once
/// delivery, aborts it again on every redelivery. The script limits' maximums
/// (`map::script::MOST_OPERATIONS`, `MOST_CALL_DEPTH`) are set to what this holds. The memory
/// is reserved, not used: a page costs only once a thread touches it.
pub const PIPELINE_THREAD_STACK: usize = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("pipeline {pipeline}: {source}")]
    Source { pipeline: String, source: SourceError },
    #[error("pipeline {pipeline}: {source}")]
    Sink { pipeline: String, source: SinkError },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("pipeline {pipeline}: {source}")]
    Broker { pipeline: String, source: crate::amqp::AmqpError },
    #[error("the shared state store cannot be used: {0}")]
    State(StoreError),
    #[error("cannot use the data directory {}: {source}", path.display())]
    DataDir { path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Http(String),
}

/// How to run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The store, file sink outputs and process locks live here.
    pub data_dir: PathBuf,
    /// Stop once every source is read and every queue of the pipelines is empty.
    pub once: bool,
    pub durability: Durability,
    /// Where shared state lives: a `postgres://` URL, or `None` for the embedded store.
    pub state_store: Option<String>,
    /// Where the HTTP server listens for the `http` sources (default 127.0.0.1:8080).
    pub listen: Option<std::net::SocketAddr>,
}

/// What one pipeline did in this run. `received = routed + exceptions + duplicates`; a message
/// that is retried is received again later.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Summary {
    pub pipeline: String,
    /// Messages the runtime read from the pipeline's files or stdin into its inbox.
    pub ingested: u64,
    pub received: u64,
    pub routed: u64,
    /// Messages written per sink (a message routed to two sinks counts in both).
    pub outputs: IndexMap<String, u64>,
    pub exceptions: BTreeMap<String, u64>,
    /// Deliveries that failed for a passing reason (a sink could not write) and come back later.
    pub retried: u64,
    /// Deliveries held back by a sink's open circuit or rate limit, or while a copy was being
    /// delivered: they wait in their queue (spending no attempt) and are received again later.
    pub held: u64,
    /// Events older than the last one applied for their entity, dropped (`ordering:`).
    pub stale: u64,
    /// Deliveries of events put back to wait for an earlier event of their entity.
    pub parked: u64,
    /// Messages whose idempotency key was already delivered: dropped, or sent to the
    /// `idempotency.duplicates` sink (counted in its outputs too).
    pub duplicates: u64,
    /// Sink name -> where it writes.
    pub targets: IndexMap<String, String>,
    /// Where the pipeline reads: a queue, or its inbox and the files behind it.
    pub input: String,
    /// Where its exception records go when not to the store: a RabbitMQ dead-letter queue.
    pub dead_letter_queue: Option<String>,
}

impl Summary {
    pub fn exception_count(&self) -> u64 {
        self.exceptions.values().sum()
    }
}

/// Counters a pipeline's workers update after each commit.
#[derive(Default)]
struct Stats {
    ingested: AtomicU64,
    received: AtomicU64,
    routed: AtomicU64,
    retried: AtomicU64,
    held: AtomicU64,
    stale: AtomicU64,
    parked: AtomicU64,
    duplicates: AtomicU64,
    outputs: Vec<AtomicU64>,
    exceptions: Mutex<BTreeMap<String, u64>>,
}

/// What one settled message adds to the counters.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Counted {
    /// Routed to these sinks.
    Routed(Vec<usize>),
    Exception(String),
    /// Given back for a later attempt.
    Retried,
    /// A duplicate: dropped, or written to this sink.
    Duplicate(Option<usize>),
    /// Held back (a circuit open, a rate limit): back in its queue, no attempt spent.
    Held,
    /// Older than the last event applied for its entity: dropped.
    Stale,
    /// Waiting for an earlier event of its entity: back in its queue for a while.
    Parked,
}

impl Stats {
    fn count(&self, c: Counted) {
        match c {
            Counted::Routed(sinks) => {
                self.received.fetch_add(1, Ordering::Relaxed);
                self.routed.fetch_add(1, Ordering::Relaxed);
                for i in sinks {
                    self.outputs[i].fetch_add(1, Ordering::Relaxed);
                }
            }
            Counted::Exception(r) => {
                self.received.fetch_add(1, Ordering::Relaxed);
                *self.exceptions.lock().expect("stats lock").entry(r).or_default() += 1;
            }
            Counted::Retried => {
                self.retried.fetch_add(1, Ordering::Relaxed);
            }
            Counted::Held => {
                self.held.fetch_add(1, Ordering::Relaxed);
            }
            Counted::Stale => {
                self.received.fetch_add(1, Ordering::Relaxed);
                self.stale.fetch_add(1, Ordering::Relaxed);
            }
            Counted::Parked => {
                self.parked.fetch_add(1, Ordering::Relaxed);
            }
            Counted::Duplicate(sink) => {
                self.received.fetch_add(1, Ordering::Relaxed);
                self.duplicates.fetch_add(1, Ordering::Relaxed);
                if let Some(i) = sink {
                    self.outputs[i].fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}

/// A sink as the runtime drives it.
pub(crate) enum RuntimeSink {
    /// Written in the store commit that settles the input.
    Queue { queue: Arc<str>, format: OutputFormat, max_depth: u64 },
    /// Written before the commit and made durable by `flush`.
    External(Box<dyn Sink>),
}

/// Builds the runtime sink of an outside sink config. `amqp` and `http` sinks start from what
/// their pipeline compiled at load (see `Runtime::open`); `queue` sinks are the store's.
pub fn build_sink(config: &SinkConfig, cx: &SinkContext) -> Option<Box<dyn Sink>> {
    match config {
        SinkConfig::File(c) => Some(Box::new(FileSink::new(c, cx))),
        SinkConfig::Stdout(c) => Some(Box::new(StdoutSink { format: c.format })),
        SinkConfig::Queue(_) | SinkConfig::Amqp(_) | SinkConfig::Http(_) => None,
    }
}

/// One pipeline in the runtime.
pub(crate) struct PipelineRun {
    /// The pipeline as started: its name, source, sinks and runtime settings.
    pub pipeline: Arc<Pipeline>,
    /// The version that processes messages: the one started, or one loaded since because a
    /// mapping, schema or table changed.
    current: std::sync::RwLock<Arc<Pipeline>>,
    pub sinks: Vec<RuntimeSink>,
    /// The queue its messages are taken from (its source queue or its inbox).
    pub input_queue: String,
    pub stream: StreamId,
    pub replay_stream: StreamId,
    /// RabbitMQ, for pipelines with an `amqp` source or sink: one connection per pipeline.
    pub broker: Option<Arc<crate::amqp::Broker>>,
    stats: Stats,
    /// Idempotency keys of messages this engine is delivering and has not settled yet: the store
    /// does not know them, and a copy in another batch must not go out meanwhile.
    keys_in_hand: Mutex<std::collections::HashSet<String>>,
    /// Entity versions applied by batches not settled yet (ordering).
    /// Each batch's own entries: one is let go by its batch without touching the others'.
    versions_in_hand: Mutex<std::collections::HashMap<String, Vec<String>>>,
}

/// The sinks a routed message is written to, in order, then the sinks replies go on to
/// (`reply.to` of an http sink) with the record the receiver's answer completed. Nothing is
/// allocated unless there is a reply.
pub(crate) struct Deliveries<'a> {
    routed: std::slice::Iter<'a, usize>,
    replies: std::collections::VecDeque<(usize, crate::message::Output)>,
}

impl<'a> Deliveries<'a> {
    /// The deliveries to `sinks`; none when the message is held back.
    pub fn new(sinks: &'a [usize], held: bool) -> Deliveries<'a> {
        Deliveries { routed: if held { [].iter() } else { sinks.iter() }, replies: Default::default() }
    }

    /// The next sink, with the record to write when it is a reply's.
    pub fn next(&mut self) -> Option<(usize, Option<crate::message::Output>)> {
        match self.routed.next() {
            Some(&i) => Some((i, None)),
            None => self.replies.pop_front().map(|(i, r)| (i, Some(r))),
        }
    }

    pub fn reply(&mut self, to: usize, record: crate::message::Output) {
        self.replies.push_back((to, record));
    }
}

/// A sink that did not take a message.
#[derive(Debug, Clone)]
pub(crate) struct SinkFailure {
    pub message: String,
    /// Never worth another attempt as it is (the receiver refused it).
    pub permanent: bool,
    /// How long the receiver asked to wait.
    pub retry_after: Option<std::time::Duration>,
}

impl SinkFailure {
    pub fn passing(message: String) -> SinkFailure {
        SinkFailure { message, permanent: false, retry_after: None }
    }
}

impl PipelineRun {
    /// What a RabbitMQ publish to sink `i` came to once confirmed, told to its circuit breaker:
    /// a refusal or a return is a failure worth another try. (A publish that could not even be
    /// sent is told with [`Self::publish_failed`]; one sent is judged only by its confirm.)
    pub(crate) fn judge_publish(&self, i: usize, confirmed: Result<(), String>, shared: &Shared) -> Result<(), SinkFailure> {
        match confirmed {
            Ok(()) => self.judge(i, Ok(()), shared),
            Err(message) => Err(self.publish_failed(i, message, shared)),
        }
    }

    /// A publish to sink `i` that failed, told to its circuit breaker.
    pub(crate) fn publish_failed(&self, i: usize, message: String, shared: &Shared) -> SinkFailure {
        let e = crate::sink::SinkError::Delivery { message, transient: true, retry_after: None, status: None };
        match self.judge(i, Err(e), shared) {
            Err(f) => f,
            Ok(()) => SinkFailure::passing(format!("sink `{}`: the publish failed", self.pipeline.sink_name(i))),
        }
    }

    /// Closes the open records of messages delivered after all, on a later delivery (a shared
    /// store); a failure leaves them open, which is said.
    pub(crate) async fn supersede(&self, shared: &Shared, message_ids: Vec<String>) {
        if message_ids.is_empty() {
            return;
        }
        let name = &self.pipeline.name;
        match shared.state.supersede_exceptions(name.clone(), message_ids).await {
            Ok(0) => {}
            Ok(n) => {
                tracing::info!(pipeline = %name, records = n, "messages with an exception record were delivered on a later delivery: their records are closed as superseded")
            }
            Err(e) => {
                tracing::warn!(pipeline = %name, error = %e, "messages with an exception record were delivered on a later delivery, but their records could not be closed")
            }
        }
    }

    /// The delivery settings of sink `i` (those of the version started: breaker and limiter
    /// state lives across reloads).
    pub(crate) fn delivery(&self, i: usize) -> &delivery::Delivery {
        &self.pipeline.deliveries[i]
    }

    /// Most attempts any sink of the pipeline allows, and at least the runtime's.
    pub(crate) fn max_attempts(&self, p: &Pipeline) -> u32 {
        self.pipeline.deliveries.iter().map(|d| d.retry.max_attempts).chain([p.runtime.max_attempts]).max().unwrap_or(1)
    }

    /// Whether a message may be written to sink `i` now: waits for the rate limit up to
    /// `inline_wait`; otherwise says until when the message is held back (a circuit open, a
    /// longer wait). Held-back work waits in its queue and spends no attempt.
    pub(crate) async fn admit(&self, i: usize, inline_wait: std::time::Duration, shared: &Shared) -> Result<(), std::time::Instant> {
        let d = self.delivery(i);
        d.rate.admit(inline_wait).await?;
        if let Some(b) = &d.breaker {
            let before = b.state();
            match b.gate() {
                delivery::Gate::Wait(until) => return Err(until),
                delivery::Gate::Open => {
                    if before != b.state() {
                        tracing::info!(pipeline = %self.pipeline.name, sink = %self.pipeline.sink_name(i), "circuit half-open: one probe goes to the sink");
                        self.record_status(i, None, shared);
                    }
                }
            }
        }
        Ok(())
    }

    /// What a write to sink `i` says: the breaker and the receiver's pause learn from it, and a
    /// failure is classified by the sink's retry policy.
    pub(crate) fn judge<T>(&self, i: usize, result: Result<T, crate::sink::SinkError>, shared: &Shared) -> Result<T, SinkFailure> {
        let d = self.delivery(i);
        let name = self.pipeline.sink_name(i);
        let e = match result {
            Ok(written) => {
                if let Some(b) = &d.breaker
                    && let Some(was) = b.success()
                {
                    tracing::info!(pipeline = %self.pipeline.name, sink = %name, was = was.name(), "circuit closed: the sink answers again");
                    self.record_status(i, None, shared);
                }
                return Ok(written);
            }
            Err(e) => e,
        };
        let transient = match &e {
            crate::sink::SinkError::Delivery { status: Some(s), .. } => d.retry.transient_status(*s),
            other => other.is_transient(),
        };
        let retry_after = e.retry_after().filter(|_| transient);
        let message = format!("sink `{name}`: {e}");
        if let Some(wait) = retry_after {
            d.rate.pause_for(wait);
            tracing::info!(pipeline = %self.pipeline.name, sink = %name, wait = ?wait, "the sink asked to wait (Retry-After): its messages are held back");
            self.record_status(i, Some(&message), shared);
        }
        if let Some(b) = &d.breaker {
            // A refusal is an answer: the receiver is up. A message that could not even be sent
            // (a URL that does not render) says nothing about the receiver.
            let answered = matches!(&e, crate::sink::SinkError::Delivery { status: Some(_), .. });
            let changed = if transient {
                b.failure()
            } else if answered {
                b.success()
            } else {
                None
            };
            if changed.is_some() {
                match b.state() {
                    delivery::BreakerState::Open { until } => tracing::warn!(
                        pipeline = %self.pipeline.name, sink = %name, retry_in = ?until.saturating_duration_since(std::time::Instant::now()), error = %e,
                        "circuit open: the sink failed too often in a row; its messages wait in the queue"
                    ),
                    s => tracing::info!(pipeline = %self.pipeline.name, sink = %name, state = s.name(), "circuit state changed"),
                }
                self.record_status(i, Some(&message), shared);
            }
        }
        Err(SinkFailure { message, permanent: !transient, retry_after })
    }

    /// Writes what `switchyard status` shows for sink `i` (in the background).
    fn record_status(&self, i: usize, last_failure: Option<&str>, shared: &Shared) {
        let d = self.delivery(i);
        let now = std::time::Instant::now();
        let at = |t: std::time::Instant| store::now_micros() + t.saturating_duration_since(now).as_micros() as i64;
        let (breaker, open_until, failures) = match &d.breaker {
            None => ("none".to_string(), None, 0),
            Some(b) => {
                let (state, failures) = b.snapshot();
                let until = match state {
                    delivery::BreakerState::Open { until } => Some(at(until)),
                    _ => None,
                };
                (state.name().to_string(), until, i64::from(failures))
            }
        };
        let status = store::SinkStatus {
            pipeline: self.pipeline.name.clone(),
            sink: self.pipeline.sink_name(i).to_string(),
            breaker,
            open_until,
            failures,
            rate_limit: (!d.rate.described.is_empty()).then(|| d.rate.described.clone()),
            paused_until: d.rate.paused_until().map(at),
            last_failure: last_failure.map(str::to_string),
            updated_at: 0,
            owner: shared.owner,
        };
        // Not awaited: the status is a view; the job runs with the next commit.
        drop(shared.store.submit(move |c| store::record_sink_status(c, &status)));
    }

    /// Status rows for every sink with a breaker or a limit, at start.
    fn record_initial_status(&self, shared: &Shared) {
        for (i, d) in self.pipeline.deliveries.iter().enumerate() {
            if d.breaker.is_some() || !d.rate.described.is_empty() {
                self.record_status(i, None, shared);
            }
        }
    }

    /// Lets go of keys once their messages are settled (delivered), or known not to go out now
    /// (retried, given back, failed).
    pub(crate) fn release_keys(&self, keys: &[String]) {
        if keys.is_empty() {
            return;
        }
        let mut held = self.keys_in_hand.lock().expect("keys in hand");
        for k in keys {
            held.remove(k);
        }
    }

    pub fn current(&self) -> Arc<Pipeline> {
        self.current.read().expect("pipeline lock").clone()
    }

    fn set_current(&self, p: Arc<Pipeline>) {
        *self.current.write().expect("pipeline lock") = p;
    }

    fn summary(&self) -> Summary {
        let p = &self.pipeline;
        let mut s = Summary {
            pipeline: p.name.clone(),
            ingested: self.stats.ingested.load(Ordering::Relaxed),
            received: self.stats.received.load(Ordering::Relaxed),
            routed: self.stats.routed.load(Ordering::Relaxed),
            retried: self.stats.retried.load(Ordering::Relaxed),
            duplicates: self.stats.duplicates.load(Ordering::Relaxed),
            held: self.stats.held.load(Ordering::Relaxed),
            stale: self.stats.stale.load(Ordering::Relaxed),
            parked: self.stats.parked.load(Ordering::Relaxed),
            exceptions: self.stats.exceptions.lock().expect("stats lock").clone(),
            dead_letter_queue: p.broker.as_ref().and_then(|b| b.source.as_ref()).map(|s| s.dead_letter_queue.clone()),
            input: match &p.source {
                SourceConfig::Queue(q) => format!("queue {}", q.queue.value),
                SourceConfig::File(f) => {
                    format!("{} (via {})", crate::build::normalize(&p.dir.join(&f.path.value)).display(), self.input_queue)
                }
                SourceConfig::Stdin(_) => format!("standard input (via {})", self.input_queue),
                SourceConfig::Http(h) => format!("POST {} (via {})", h.path.value.trim(), self.input_queue),
                SourceConfig::HttpPoll(_) => {
                    format!("GET {} (via {})", p.poll_source.as_ref().map(|s| s.shown.clone()).unwrap_or_default(), self.input_queue)
                }
                SourceConfig::Amqp(a) => format!(
                    "RabbitMQ queue {} at {}",
                    a.queue.value,
                    self.broker.as_ref().map(|b| b.shown_url().to_string()).unwrap_or_default()
                ),
            },
            ..Default::default()
        };
        for (i, (name, _)) in p.sinks.iter().enumerate() {
            s.outputs.insert(name.clone(), self.stats.outputs[i].load(Ordering::Relaxed));
            s.targets.insert(
                name.clone(),
                match &self.sinks[i] {
                    RuntimeSink::Queue { queue, .. } => format!("queue {queue}"),
                    RuntimeSink::External(sink) => sink.describe(),
                },
            );
        }
        s
    }
}

/// Forgets idempotency keys past their retention: at start, then every minute, a bounded
/// delete at a time so that the store's writer is never held up for long.
async fn purge_expired_keys(shared: Arc<Shared>) -> Result<(), RunError> {
    const AT_A_TIME: usize = 5_000;
    let mut shutdown = shared.shutdown.clone();
    loop {
        loop {
            let purged = match shared.state.purge_keys(AT_A_TIME).await {
                Ok(n) => n,
                // PostgreSQL away for a while: the keys are purged next time.
                Err(e) => {
                    tracing::warn!(error = %e, "expired idempotency keys could not be purged; trying again in a minute");
                    0
                }
            };
            if purged > 0 {
                tracing::debug!(keys = purged, "expired idempotency keys forgotten");
            }
            if purged < AT_A_TIME || *shutdown.borrow() {
                break;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_secs(60)) => {}
            _ = shutdown.changed() => return Ok(()),
        }
    }
}

/// Forgets status events past their retention, at start and every hour.
async fn purge_tracking(shared: Arc<Shared>) -> Result<(), RunError> {
    let mut shutdown = shared.shutdown.clone();
    loop {
        match shared.state.purge_tracking().await {
            Ok(n) if n > 0 => tracing::debug!(events = n, "status events past their retention forgotten"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "old status events could not be purged; trying again in an hour"),
        }
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_secs(3600)) => {}
            _ = shutdown.changed() => return Ok(()),
        }
    }
}

/// How long a message whose key is in hand (a copy being delivered) waits before it is looked
/// at again.
pub(crate) const KEY_IN_HAND_WAIT: std::time::Duration = std::time::Duration::from_millis(100);

/// What duplicate stopping decided for one message of a batch.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Verdict {
    /// Deliver it; record this key with it (when the pipeline stops duplicates).
    Deliver(Option<store::KeyRecord>),
    /// Its key was delivered before.
    Duplicate,
    /// Its key is in hand: a copy is being delivered (earlier in this batch, in a batch not
    /// settled yet). It waits in its queue until that one is settled, and is then a duplicate if
    /// the copy was delivered, or goes on its own if the copy failed or was put back.
    InHand,
    /// The pipeline stops duplicates but the message has no key.
    NoKey,
}

/// Duplicate stopping over a batch: the verdict for each message, given its envelope when it
/// was routed (`None`: it failed, nothing to deliver). One store look-up per batch. The keys to
/// deliver are held in hand until the caller releases them ([`PipelineRun::release_keys`]).
pub(crate) async fn verdicts(
    run: &PipelineRun,
    p: &Pipeline,
    state: &dyn store::StateStore,
    routed: &[Option<&crate::message::Metadata>],
) -> Result<Vec<Verdict>, StoreError> {
    let Some(idem) = &p.idempotency else { return Ok(vec![Verdict::Deliver(None); routed.len()]) };
    // Claim first, then look in the store: a key another worker records and lets go between
    // the two is then either still held (this copy waits) or recorded (a duplicate).
    let mut claimed: Vec<String> = Vec::new();
    let mut verdicts: Vec<Verdict> = {
        let mut held = run.keys_in_hand.lock().expect("keys in hand");
        routed
            .iter()
            .map(|m| match m {
                None => Verdict::Deliver(None),
                Some(m) => match &m.idempotency_key {
                    None => Verdict::NoKey,
                    // Held: being delivered earlier in this batch, or by a batch not settled yet.
                    Some(k) if !held.insert(k.clone()) => Verdict::InHand,
                    Some(k) => {
                        claimed.push(k.clone());
                        Verdict::Deliver(Some(store::KeyRecord {
                            scope: idem.scope.clone(),
                            key: k.clone(),
                            message_id: m.message_id.clone(),
                            expires_at: 0,
                        }))
                    }
                },
            })
            .collect()
    };
    let seen = if claimed.is_empty() {
        Default::default()
    } else {
        match state.seen_keys(idem.scope.clone(), claimed.clone()).await {
            Ok(s) => s,
            Err(e) => {
                run.release_keys(&claimed);
                return Err(e);
            }
        }
    };
    let expires_at = store::now_micros().saturating_add(idem.retention.as_micros().min(i64::MAX as u128) as i64);
    let mut delivered_before = Vec::new();
    for v in &mut verdicts {
        if let Verdict::Deliver(Some(k)) = v {
            if seen.contains(&k.key) {
                delivered_before.push(k.key.clone());
                *v = Verdict::Duplicate;
            } else {
                k.expires_at = expires_at;
            }
        }
    }
    run.release_keys(&delivered_before);
    Ok(verdicts)
}

/// The keys a batch's verdicts hold in hand (those of the messages to deliver).
pub(crate) fn keys_to_deliver(verdicts: &[Verdict]) -> Vec<String> {
    verdicts
        .iter()
        .filter_map(|v| match v {
            Verdict::Deliver(Some(k)) => Some(k.key.clone()),
            _ => None,
        })
        .collect()
}

/// The exception of a message without the key its pipeline needs to stop duplicates.
pub(crate) fn no_key_failure() -> Failure {
    Failure::one(
        reason::MISSING_IDEMPOTENCY_KEY,
        ErrorDetail::input(
            "",
            "the pipeline stops duplicates (`idempotency:`) but this message has no idempotency key: set `envelope.idempotency_key`, \
             or have the upstream pipeline set one",
        ),
    )
}

/// What ordering decided for one message of a batch.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Order {
    /// Deliver it; its entity's version is applied once delivered.
    Apply,
    /// Older than the last applied version of its entity.
    Stale { last: String },
    /// Needs an earlier event of its entity, which has not been applied yet.
    Wait,
}

/// Ordering over a batch, given the envelopes of the messages to deliver (`None`: not
/// delivered). One store look-up per batch; versions applied in the batch count for the
/// messages after them, and those of batches not settled yet are held in hand.
pub(crate) async fn order_verdicts(
    run: &PipelineRun,
    p: &Pipeline,
    state: &dyn store::StateStore,
    routed: &[Option<&crate::message::Metadata>],
) -> Result<Vec<Order>, StoreError> {
    let Some(ordering) = &p.ordering else { return Ok(vec![Order::Apply; routed.len()]) };
    let keys: Vec<String> = routed.iter().flatten().filter_map(|m| m.entity.as_ref().map(|e| e.key.clone())).collect();
    let mut last = if keys.is_empty() { Default::default() } else { state.last_versions(ordering.scope.clone(), keys).await? };
    let mut held = run.versions_in_hand.lock().expect("versions in hand");
    for (k, vs) in held.iter() {
        for v in vs {
            if last.get(k).is_none_or(|l| crate::pipeline::compare_versions(v, l).is_gt()) {
                last.insert(k.clone(), v.clone());
            }
        }
    }
    Ok(routed
        .iter()
        .map(|m| {
            let Some(e) = m.and_then(|m| m.entity.as_ref()) else { return Order::Apply };
            match last.get(&e.key) {
                None if e.needs_previous => Order::Wait,
                Some(l) if crate::pipeline::compare_versions(&e.version, l).is_lt() => Order::Stale { last: l.clone() },
                _ => {
                    last.insert(e.key.clone(), e.version.clone());
                    held.entry(e.key.clone()).or_default().push(e.version.clone());
                    Order::Apply
                }
            }
        })
        .collect())
}

/// What ordering does with a message about to be delivered.
pub(crate) enum OrderAction {
    Deliver,
    /// Stale: dropped (counted).
    Drop,
    /// An exception: stale (`ordering.stale: exception`) or its predecessor never came.
    Fail(Failure),
    /// Put back to wait for its predecessor.
    Park,
}

pub(crate) fn order_action(p: &Pipeline, meta: &crate::message::Metadata, order: &Order) -> OrderAction {
    let (Some(ordering), Some(entity)) = (&p.ordering, &meta.entity) else { return OrderAction::Deliver };
    match order {
        Order::Apply => OrderAction::Deliver,
        Order::Stale { last } if ordering.stale_to_exception => OrderAction::Fail(Failure::one(
            reason::STALE_EVENT,
            ErrorDetail::input("", format!("version {} of `{}` is older than the last one applied, {last}", entity.version, entity.key)),
        )),
        Order::Stale { .. } => {
            tracing::debug!(pipeline = %p.name, entity = %entity.key, version = %entity.version, "stale event dropped");
            OrderAction::Drop
        }
        Order::Wait => {
            let waited = (chrono::Utc::now() - meta.received_at).to_std().unwrap_or_default();
            if waited >= ordering.wait_for_previous {
                OrderAction::Fail(Failure::one(
                    reason::MISSING_PREDECESSOR,
                    ErrorDetail::input(
                        "",
                        format!(
                            "no earlier event of `{}` arrived within {}",
                            entity.key,
                            humantime::format_duration(ordering.wait_for_previous)
                        ),
                    ),
                ))
            } else {
                OrderAction::Park
            }
        }
    }
}

impl PipelineRun {
    /// Records the versions of delivered events, then lets go of those held in hand (all the
    /// batch's, delivered or not). A failure to record only weakens ordering for later events.
    pub(crate) async fn settle_versions(
        &self,
        state: &dyn store::StateStore,
        delivered: Vec<(String, String)>,
        in_hand: &[(String, String)],
    ) {
        // The version running now: a reload may have changed the ordering's scope.
        let current = self.current();
        if let Some(o) = &current.ordering
            && !delivered.is_empty()
            && let Err(e) = state.record_versions(o.scope.clone(), delivered).await
        {
            tracing::warn!(pipeline = %self.pipeline.name, error = %e, "the applied event versions could not be recorded: a later stale event may go through");
        }
        if in_hand.is_empty() {
            return;
        }
        let mut held = self.versions_in_hand.lock().expect("versions in hand");
        for (k, v) in in_hand {
            if let Some(vs) = held.get_mut(k) {
                if let Some(at) = vs.iter().position(|x| x == v) {
                    vs.swap_remove(at);
                }
                if vs.is_empty() {
                    held.remove(k);
                }
            }
        }
    }
}

/// What every task of a run shares.
pub(crate) struct Shared {
    pub store: Store,
    /// Idempotency keys: the embedded store, or PostgreSQL.
    pub state: Arc<dyn store::StateStore>,
    pub owner: i64,
    pub once: bool,
    pub shutdown: watch::Receiver<bool>,
    /// Ingesters still reading their sources (and, with `--once`, RabbitMQ consumers not done).
    pub ingesting: AtomicUsize,
    /// With `--once`: RabbitMQ consumers not done yet (counted in `ingesting` too).
    pub amqp_consuming: AtomicUsize,
    /// Messages leased and not yet settled, over all workers.
    pub in_flight: AtomicI64,
    /// The pipelines of this engine: back pressure applies to queues they read.
    pub consumers: std::collections::HashSet<String>,
    reloader: Option<Arc<Reloader>>,
    runs: Vec<Arc<PipelineRun>>,
}

impl Shared {
    /// With `--once`: whether the rest of the engine is done, so that a RabbitMQ consumer whose
    /// queue is empty gets nothing more from it: no source is being read, no batch is in hand,
    /// and the pipelines' stored queues are empty.
    pub async fn others_done(&self) -> Result<bool, RunError> {
        if self.ingesting.load(Ordering::SeqCst) > self.amqp_consuming.load(Ordering::SeqCst) || self.in_flight.load(Ordering::SeqCst) > 0 {
            return Ok(false);
        }
        let streams: Vec<StreamId> = self.runs.iter().flat_map(|r| [r.stream, r.replay_stream]).collect();
        Ok(self.store.submit(move |c| store::pending(c, &streams)).await? == 0)
    }

    /// Loads the pipelines again if one of their files changed (before replays are processed).
    pub async fn refresh(&self) {
        if let Some(r) = &self.reloader {
            r.refresh(&self.runs).await;
        }
    }
}

/// The process's claim on its leases: a locked file per running engine. A lock that can be
/// taken belongs to a process that is gone, so its leases can be freed at once.
struct OwnerLock {
    path: PathBuf,
    _file: std::fs::File,
}

impl OwnerLock {
    fn acquire(data_dir: &std::path::Path, store: &Store) -> Result<(i64, OwnerLock), RunError> {
        let dir = data_dir.join("owners");
        let io = |source| RunError::DataDir { path: dir.clone(), source };
        std::fs::create_dir_all(&dir).map_err(io)?;
        for entry in std::fs::read_dir(&dir).map_err(io)?.flatten() {
            let path = entry.path();
            let Some(id) = path.file_stem().and_then(|s| s.to_str()).and_then(|s| s.parse::<i64>().ok()) else { continue };
            let Ok(f) = std::fs::OpenOptions::new().write(true).open(&path) else { continue };
            if f.try_lock().is_ok() {
                let freed = store.submit_blocking(move |c| store::reclaim(c, id))?;
                if freed > 0 {
                    tracing::warn!(messages = freed, "an earlier engine stopped without settling its messages; they are delivered again");
                }
                let _ = std::fs::remove_file(&path);
            }
        }
        let id = (uuid::Uuid::now_v7().as_u128() as i64).abs();
        // Locked under a name other engines do not look at, then renamed: no engine starting at
        // the same moment can mistake this one for a dead one.
        let path = dir.join(format!("{id}.lock"));
        let taking = dir.join(format!("{id}.taking"));
        let file = std::fs::OpenOptions::new().create(true).truncate(true).write(true).open(&taking).map_err(io)?;
        file.lock().map_err(io)?;
        std::fs::rename(&taking, &path).map_err(io)?;
        Ok((id, OwnerLock { path, _file: file }))
    }
}

/// The engines running on a data directory: those whose lock is held.
pub fn running_engines(data_dir: &std::path::Path) -> Vec<i64> {
    let Ok(entries) = std::fs::read_dir(data_dir.join("owners")) else { return Vec::new() };
    entries
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "lock"))
        .filter_map(|e| {
            let id = e.path().file_stem()?.to_str()?.parse::<i64>().ok()?;
            let f = std::fs::File::open(e.path()).ok()?;
            // Held by a running engine: it cannot be taken (shared or not).
            matches!(f.try_lock_shared(), Err(std::fs::TryLockError::WouldBlock)).then_some(id)
        })
        .collect()
}

impl Drop for OwnerLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A running set of pipelines.
pub struct Runtime {
    store: Store,
    runs: Vec<Arc<PipelineRun>>,
    opts: RunOptions,
    reloader: Option<Arc<Reloader>>,
}

impl Runtime {
    /// Opens the store and subscribes every pipeline to its queues.
    pub fn open(pipelines: Vec<Pipeline>, opts: RunOptions) -> Result<Runtime, RunError> {
        let store = Store::open(&opts.data_dir, opts.durability)?;
        let committed = store.submit_blocking(store::sink_offsets)?;
        let cx = SinkContext { data_dir: opts.data_dir.clone(), committed };
        let mut pairs = Vec::new();
        for p in &pipelines {
            let input = match &p.source {
                SourceConfig::Queue(q) => q.queue.value.clone(),
                _ => store::inbox_queue(&p.name),
            };
            pairs.push((input, p.name.clone()));
            pairs.push((store::REPLAY_QUEUE.to_string(), p.name.clone()));
        }
        let subscribe = pairs.clone();
        let ids = store.submit_blocking(move |c| store::subscribe(c, &subscribe))?;
        let runs = pipelines
            .into_iter()
            .enumerate()
            .map(|(i, p)| {
                let broker =
                    p.broker.as_ref().map(|b| Arc::new(crate::amqp::Broker::new(&b.url, b.heartbeat, &p.name, b.topology.clone())));
                let sinks = p
                    .sinks
                    .iter()
                    .map(|(name, c)| {
                        Ok(match c {
                            SinkConfig::Amqp(_) => {
                                let (Some(broker), Some(plan)) = (&broker, &p.broker) else {
                                    unreachable!("checked at load: amqp sinks need a broker")
                                };
                                RuntimeSink::External(Box::new(crate::amqp::publish::AmqpSink::new(
                                    broker.clone(),
                                    plan.targets[name].clone(),
                                )))
                            }
                            SinkConfig::Http(_) => RuntimeSink::External(Box::new(HttpSink::start(p.http_targets[name].clone())?)),
                            SinkConfig::Queue(q) => RuntimeSink::Queue {
                                queue: Arc::from(q.queue.value.as_str()),
                                format: q.format.unwrap_or(OutputFormat::Payload),
                                max_depth: q.max_depth.unwrap_or(crate::sink::queue::DEFAULT_MAX_DEPTH),
                            },
                            other => RuntimeSink::External(build_sink(other, &cx).expect("not a queue sink")),
                        })
                    })
                    .collect::<Result<Vec<_>, SinkError>>()
                    .map_err(|source| RunError::Sink { pipeline: p.name.clone(), source })?;
                let stats = Stats { outputs: p.sinks.iter().map(|_| AtomicU64::new(0)).collect(), ..Default::default() };
                let p = Arc::new(p);
                Ok(Arc::new(PipelineRun {
                    input_queue: pairs[2 * i].0.clone(),
                    stream: ids[2 * i],
                    replay_stream: ids[2 * i + 1],
                    current: std::sync::RwLock::new(p.clone()),
                    pipeline: p,
                    sinks,
                    broker,
                    stats,
                    keys_in_hand: Mutex::default(),
                    versions_in_hand: Mutex::default(),
                }))
            })
            .collect::<Result<Vec<Arc<PipelineRun>>, RunError>>()?;
        // A file sink used for the first time here gets its committed length before anything
        // is written to it: a crash before its first settle then leaves no duplicate either.
        let mut baselines = Vec::new();
        for run in &runs {
            for s in &run.sinks {
                if let RuntimeSink::External(sink) = s
                    && let Some(b) = sink.baseline()
                {
                    baselines.push(b.map_err(|e| RunError::Sink {
                        pipeline: run.pipeline.name.clone(),
                        source: SinkError::Io { path: PathBuf::from(sink.describe()), source: e },
                    })?);
                }
            }
        }
        if !baselines.is_empty() {
            store.submit_blocking(move |c| store::record_marks(c, &baselines))?;
        }
        Ok(Runtime { store, runs, opts, reloader: None })
    }

    /// Watches the pipelines' files while running and loads them again when one changes.
    pub fn with_reloader(mut self, r: Reloader) -> Self {
        self.reloader = Some(Arc::new(r));
        self
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Counts so far, per pipeline.
    pub fn summaries(&self) -> Vec<Summary> {
        self.runs.iter().map(|r| r.summary()).collect()
    }

    /// Runs until `shutdown` turns true (or, with `once`, until everything is processed), then
    /// finishes the batches in hand and returns the counts.
    pub async fn run(&self, shutdown: watch::Receiver<bool>) -> Result<Vec<Summary>, RunError> {
        // RabbitMQ must be there at start: a wrong URL or a refused topology is said at once.
        // Later losses of the connection are waited out.
        for run in &self.runs {
            if let Some(b) = &run.broker {
                b.session().await.map_err(|source| RunError::Broker { pipeline: run.pipeline.name.clone(), source })?;
            }
        }
        // Shared state must be reachable at start too; later losses make batches retry.
        let state: Arc<dyn store::StateStore> = match &self.opts.state_store {
            None => Arc::new(self.store.clone()),
            Some(url) => {
                let pg = store::PostgresStore::connect(url).await.map_err(RunError::State)?;
                tracing::info!(store = %store::StateStore::describe(&pg), "idempotency keys are shared");
                Arc::new(pg)
            }
        };
        let (id, lock) = OwnerLock::acquire(&self.opts.data_dir, &self.store)?;
        // The `http` sources are served by a continuous run; `--once` processes what is stored.
        let server = if self.opts.once {
            if self.runs.iter().any(|r| r.pipeline.http_source.is_some()) {
                tracing::info!("run --once does not take HTTP requests: it processes the messages already stored");
            }
            None
        } else {
            http_server::HttpServer::bind(self.opts.listen, &self.runs).await?
        };
        // With `once`, the run stops itself through this second signal.
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut outer = shutdown.clone();
        let forward = stop_tx.clone();
        let forwarder = tokio::spawn(async move {
            while !*outer.borrow() {
                if outer.changed().await.is_err() {
                    return;
                }
            }
            let _ = forward.send(true);
        });
        let shared = Arc::new(Shared {
            store: self.store.clone(),
            state,
            owner: id,
            once: self.opts.once,
            shutdown: stop_rx,
            ingesting: AtomicUsize::new(0),
            amqp_consuming: AtomicUsize::new(0),
            in_flight: AtomicI64::new(0),
            consumers: self.runs.iter().map(|r| r.pipeline.name.clone()).collect(),
            reloader: self.reloader.clone(),
            runs: self.runs.clone(),
        });
        for run in &self.runs {
            run.record_initial_status(&shared);
        }
        let mut tasks = tokio::task::JoinSet::new();
        if shared.state.embedded().is_none() {
            if self.opts.once {
                // The replays queued now, before the workers look for work.
                replays::take_up(shared.clone(), true).await?;
            } else {
                tasks.spawn(replays::take_up(shared.clone(), false));
            }
        }
        if let Some(server) = server {
            tasks.spawn(server.serve(shared.clone()));
        }
        for run in &self.runs {
            if let Some(ingester) = ingest::Ingester::for_pipeline(run.clone(), shared.clone()) {
                shared.ingesting.fetch_add(1, Ordering::SeqCst);
                tasks.spawn(ingester.run());
            }
        }
        for run in &self.runs {
            for _ in 0..run.pipeline.runtime.concurrency {
                if matches!(run.pipeline.source, SourceConfig::Amqp(_)) {
                    tasks.spawn(amqp_worker::run(run.clone(), shared.clone()));
                } else {
                    tasks.spawn(worker::run(run.clone(), shared.clone()));
                }
            }
        }
        if let Some(r) = &self.reloader {
            let (r, shared) = (r.clone(), shared.clone());
            let mut shutdown = shared.shutdown.clone();
            tasks.spawn(async move {
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep(std::time::Duration::from_secs(2)) => r.refresh(&shared.runs).await,
                        _ = shutdown.changed() => return Ok(()),
                    }
                }
            });
        }
        if self.runs.iter().any(|r| r.pipeline.idempotency.is_some()) {
            tasks.spawn(purge_expired_keys(shared.clone()));
        }
        if !self.opts.once && self.runs.iter().any(|r| r.pipeline.track) {
            tasks.spawn(purge_tracking(shared.clone()));
        }
        if self.opts.once {
            let streams: Vec<StreamId> = self.runs.iter().flat_map(|r| [r.stream, r.replay_stream]).collect();
            tasks.spawn(stop_when_drained(shared.clone(), streams, stop_tx.clone()));
        }
        let mut first_error = None;
        while let Some(done) = tasks.join_next().await {
            match done {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "a runtime task failed; stopping");
                    let _ = stop_tx.send(true);
                    first_error.get_or_insert(e);
                }
                Err(join) => {
                    let _ = stop_tx.send(true);
                    first_error.get_or_insert(RunError::Store(StoreError::Sql(format!("a runtime task ended abnormally: {join}"))));
                }
            }
        }
        forwarder.abort();
        // Every worker of a pipeline is done with its connection only now.
        for run in &self.runs {
            if let Some(b) = &run.broker {
                b.close().await;
            }
        }
        for run in &self.runs {
            for s in &run.sinks {
                if let RuntimeSink::External(sink) = s
                    && let Err(source) = sink.flush().await
                {
                    first_error.get_or_insert(RunError::Sink { pipeline: run.pipeline.name.clone(), source });
                }
            }
        }
        let _ = self.store.submit(move |c| store::forget_owner_status(c, id)).await;
        drop(lock);
        match first_error {
            Some(e) => Err(e),
            None => Ok(self.summaries()),
        }
    }

    /// Messages still stored for the pipelines of this engine.
    pub fn left(&self) -> Result<i64, RunError> {
        let streams: Vec<StreamId> = self.runs.iter().flat_map(|r| [r.stream, r.replay_stream]).collect();
        Ok(self.store.submit_blocking(move |c| store::pending(c, &streams))?)
    }

    /// Stops the store's writer; call after `run`.
    pub fn close(&self) {
        self.store.close();
    }
}

/// For `--once`: stops the run when every source has been read and the pipelines' queues are
/// empty, leased messages included (so nothing is in a worker's hands either).
async fn stop_when_drained(shared: Arc<Shared>, streams: Vec<StreamId>, stop: watch::Sender<bool>) -> Result<(), RunError> {
    let mut shutdown = shared.shutdown.clone();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_millis(50)) => {}
            _ = shutdown.changed() => return Ok(()),
        }
        if shared.ingesting.load(Ordering::SeqCst) > 0 || shared.in_flight.load(Ordering::SeqCst) > 0 {
            continue;
        }
        let streams = streams.clone();
        let left = shared.store.submit(move |c| store::pending(c, &streams)).await?;
        if left == 0 && shared.in_flight.load(Ordering::SeqCst) == 0 {
            let _ = stop.send(true);
            return Ok(());
        }
    }
}

/// Runs the pipeline on one message; a bug that panics becomes that message's exception record
/// instead of ending the run.
pub fn process_guarded(p: &Pipeline, raw: crate::message::RawMessage, body: &[u8]) -> Outcome {
    let origin = raw.origin.clone();
    let message_id = raw.message_id.clone();
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
            raw.message_id = message_id;
            Outcome::Failed(Box::new(p.failure_record(&raw, Stage::Map, f)))
        }
    }
}
