//! A worker: lease a batch, process it, write outside sinks and make them durable, settle the
//! batch in one store commit. The next batch is leased while this one is processed, and up to two
//! commits are in the writer's hands; they commit in order, so a worker keeps its queue's order.

use super::envelope::{StoredHeaders, to_raw};
use super::{Counted, Order, OrderAction, PipelineRun, RunError, RuntimeSink, Shared, SinkFailure, Verdict, process_guarded};
use crate::message::{ErrorDetail, ExceptionRecord, Failure, Stage, reason};
use crate::pipeline::{Duplicates, Outcome, Pipeline};
use crate::store::{self, ExceptionRow, Leased, NewMessage, Pending, Settle, SettleReport, Settlement, Target, now_micros};
use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// Entity versions (key, version) of a batch: those delivered, to record once committed, and
/// all those it holds in hand.
type BatchVersions = (Vec<(String, String)>, Vec<(String, String)>);

/// A batch on its way to the store.
struct InCommit {
    commit: Pending<SettleReport>,
    counted: Vec<Counted>,
    /// Idempotency keys held in hand until the commit is done.
    keys: Vec<String>,
    /// Keys to record in a shared state store outside the embedded one, once the commit is
    /// done (by settlement index).
    to_record: Vec<(usize, store::KeyRecord)>,
    /// Entity versions delivered (to record) and held in hand (to let go), once it is done.
    versions: BatchVersions,
    /// Messages delivered on a later delivery (by settlement index), whose exception records in
    /// a shared store are closed once the commit is done.
    superseding: Vec<(usize, String)>,
    /// Status events (by settlement index) for a shared state store, written once the commit
    /// is done (the embedded store writes them in the commit).
    tracking: Vec<(usize, store::TrackEvent)>,
}

/// A lease on its way: where it started, and the batch with how many replays lead it.
type LeaseAhead = (i64, Pending<(Vec<Leased>, usize)>);

/// Most settle commits a worker leaves in flight.
const MAX_PENDING_COMMITS: usize = 2;
/// How often a worker also looks behind its cursor, for messages given back or whose lease ran out.
const RESCAN: Duration = Duration::from_secs(1);
/// Longest idle wait between looks at an empty queue (other processes do not wake us).
const MAX_IDLE: Duration = Duration::from_millis(100);
/// Replays taken per batch before the queue's own messages, so a backlog does not hold them up.
const REPLAYS_PER_BATCH: usize = 16;

/// Where the next lease starts. Normally after the cursor: ids only grow, so everything stored
/// since is there. Once a second it goes through the queue from the start, batch by batch, for
/// messages given back for a retry or whose lease ran out.
struct Cursor {
    after: i64,
    rescan: Option<i64>,
    last_rescan: Instant,
}

impl Cursor {
    fn new() -> Self {
        // The first lease reads from the start anyway.
        Cursor { after: 0, rescan: None, last_rescan: Instant::now() }
    }

    fn next_from(&mut self) -> i64 {
        if self.rescan.is_none() && self.last_rescan.elapsed() >= RESCAN {
            self.rescan = Some(0);
            self.last_rescan = Instant::now();
        }
        self.rescan.unwrap_or(self.after)
    }

    /// Records what a lease starting at `from` returned (ids of the queue's own stream).
    fn leased(&mut self, from: i64, last_id: Option<i64>, full: bool) {
        if self.rescan == Some(from) {
            self.rescan = match last_id {
                Some(id) if full && id < self.after => Some(id),
                _ => None,
            };
        }
        if let Some(id) = last_id {
            self.after = self.after.max(id);
        }
    }
}

pub(super) async fn run(run: Arc<PipelineRun>, shared: Arc<Shared>) -> Result<(), RunError> {
    let settings = &run.pipeline.runtime;
    let lease_micros = settings.visibility_timeout.as_micros() as i64;
    let mut cursor = Cursor::new();
    let mut idle = Duration::from_millis(2);
    let mut pending: VecDeque<InCommit> = VecDeque::new();
    // The next batch, leased while this one is processed: the store and the pipeline work at once.
    let mut next: Option<LeaseAhead> = None;
    let mut back_pressure = BackPressure::default();
    let waker = shared.store.waker(&run.input_queue);
    let mut shutdown = shared.shutdown.clone();
    let lease = |from: i64| -> LeaseAhead {
        let (stream, replay, limit, owner) = (run.stream, run.replay_stream, settings.batch_size, shared.owner);
        // Counted as in flight before it exists, so `--once` never sees a batch nowhere.
        shared.in_flight.fetch_add(1, Ordering::SeqCst);
        let pending = shared.store.submit(move |c| {
            let mut batch = store::lease(c, replay, 0, REPLAYS_PER_BATCH.min(limit), lease_micros, owner)?;
            let replays = batch.len();
            batch.extend(store::lease(c, stream, from, limit - replays, lease_micros, owner)?);
            Ok((batch, replays))
        });
        (from, pending)
    };
    let result = async {
        loop {
            if *shutdown.borrow() && next.is_none() {
                return Ok(());
            }
            // RabbitMQ down: wait for it here (backoff and jitter) rather than spend the
            // messages' attempts on a sink that cannot be reached.
            if next.is_none()
                && let Some(b) = &run.broker
                && b.session_retrying(&mut shutdown).await.is_none()
            {
                return Ok(());
            }
            if next.is_none()
                && let Some(queue) = back_pressure.blocked_by(&run, &shared).await?
            {
                tracing::debug!(pipeline = %run.pipeline.name, queue = %queue, "waiting: the queue it writes is full");
                finish(&run, &shared, &mut pending, 0).await?;
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    _ = shutdown.changed() => {}
                }
                continue;
            }
            let (from, batch) = match next.take() {
                Some(n) => n,
                None => lease(cursor.next_from()),
            };
            let (batch, replays) = match batch.await {
                Ok(b) => b,
                Err(e) => {
                    shared.in_flight.fetch_sub(1, Ordering::SeqCst);
                    return Err(e.into());
                }
            };
            shared.in_flight.fetch_add(batch.len() as i64 - 1, Ordering::SeqCst);
            if replays > 0 {
                // A replay follows a fix: it goes through the pipeline as its files are now.
                shared.refresh().await;
            }
            let own = &batch[replays..];
            cursor.leased(from, own.last().map(|l| l.id), own.len() == settings.batch_size - replays);
            if batch.is_empty() {
                finish(&run, &shared, &mut pending, 0).await?;
                if cursor.rescan.is_some() {
                    continue;
                }
                tokio::select! {
                    _ = tokio::time::sleep(idle) => {}
                    _ = waker.notified() => {}
                    _ = shutdown.changed() => {}
                }
                idle = (idle * 2).min(MAX_IDLE);
                continue;
            }
            idle = Duration::from_millis(2);
            if !*shutdown.borrow() && back_pressure.last.is_none() {
                next = Some(lease(cursor.next_from()));
            }
            // Delivered before, at least in part: with a shared store, an exception recorded then
            // may be superseded now.
            let again: Vec<(i64, String)> = if shared.state.embedded().is_none() {
                batch.iter().filter(|l| l.attempts > 1).map(|l| (l.id, l.message_id.clone())).collect()
            } else {
                Vec::new()
            };
            let Processed { mut settlements, mut counted, marks, keys, versions, mut tracking } =
                process_batch(&run, &shared, batch).await?;
            let mut superseding = Vec::new();
            if shared.state.embedded().is_none() {
                // Before the records are taken out of the settlements.
                superseding = delivered_again(&settlements, &again);
                record_shared_exceptions(&run, &shared, &mut settlements, &mut counted).await;
            }
            let to_record = if shared.state.embedded().is_some() { Vec::new() } else { take_keys(&mut settlements) };
            // Held back by a sink: pause until it may take messages again, rather than lease
            // and give back the rest of the queue meanwhile.
            let pause = settlements
                .iter()
                .zip(&counted)
                .filter_map(|(s, c)| match s.outcome {
                    Settle::GiveBack { visible_at } if *c == Counted::Held => Some(visible_at),
                    _ => None,
                })
                .min()
                .map(|at| Duration::from_micros((at - now_micros()).max(0) as u64).min(MAX_HELD_PAUSE));
            // Status events: in the commit with the embedded store, after it with a shared one.
            // Only the messages settled now (a record the shared store did not take sends its
            // message back to the queue: no event for it yet).
            tracking.retain(|(k, _)| matches!(settlements[*k].outcome, Settle::Done { .. }));
            let (in_commit, shared_tracking) =
                if shared.state.embedded().is_some() { (tracking, Vec::new()) } else { (Vec::new(), tracking) };
            pending.push_back(InCommit {
                commit: shared.store.submit(move |c| {
                    let report = store::settle(c, &settlements, None, &marks)?;
                    // Not for a message whose lease went to another engine meanwhile.
                    let kept: Vec<store::TrackEvent> =
                        in_commit.into_iter().filter(|(k, _)| !report.lost_leases.contains(k)).map(|(_, e)| e).collect();
                    store::record_tracking(c, &kept)?;
                    Ok(report)
                }),
                tracking: shared_tracking,
                counted,
                keys,
                to_record,
                versions,
                superseding,
            });
            finish(&run, &shared, &mut pending, MAX_PENDING_COMMITS).await?;
            if let Some(pause) = pause {
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = shutdown.changed() => {}
                }
            }
        }
    }
    .await;
    let drained = finish(&run, &shared, &mut pending, 0).await;
    // A batch leased ahead when an error stopped the worker goes back at once.
    if let Some((_, p)) = next
        && let Ok((batch, _)) = p.await
    {
        shared.in_flight.fetch_add(batch.len() as i64 - 1, Ordering::SeqCst);
        let n = batch.len() as i64;
        let back: Vec<Settlement> =
            batch.iter().map(|l| Settlement { input: Some((l.id, l.attempts)), outcome: Settle::Retry { visible_at: 0 } }).collect();
        let _ = shared.store.submit(move |c| store::settle(c, &back, None, &[])).await;
        shared.in_flight.fetch_sub(n, Ordering::SeqCst);
    }
    result.and(drained)
}

/// Whether a queue this pipeline writes is full for one of the pipelines of this engine that read
/// it, looked at no more than four times a second. Readers in other engines, or none, do not hold
/// the pipeline back: their messages wait in the store.
#[derive(Default)]
struct BackPressure {
    checked: Option<Instant>,
    last: Option<Arc<str>>,
}

impl BackPressure {
    async fn blocked_by(&mut self, run: &PipelineRun, shared: &Shared) -> Result<Option<Arc<str>>, RunError> {
        if self.checked.is_some_and(|t| t.elapsed() < Duration::from_millis(250)) {
            return Ok(self.last.clone());
        }
        self.last = None;
        for s in &run.sinks {
            if let RuntimeSink::Queue { queue, max_depth, .. } = s {
                let q = queue.clone();
                let depths = shared.store.submit(move |c| store::depths(c, &q)).await?;
                if depths.iter().any(|(consumer, depth)| *depth as u64 >= *max_depth && shared.consumers.contains(consumer)) {
                    self.last = Some(queue.clone());
                    break;
                }
            }
        }
        self.checked = Some(Instant::now());
        Ok(self.last.clone())
    }
}

/// Waits for commits until at most `keep` are pending, and counts what they did.
async fn finish(run: &PipelineRun, shared: &Shared, pending: &mut VecDeque<InCommit>, keep: usize) -> Result<(), RunError> {
    while pending.len() > keep {
        let InCommit { commit, counted, keys, to_record, versions, superseding, tracking } = pending.pop_front().expect("non-empty");
        let result = commit.await;
        let (delivered, in_hand) = versions;
        run.settle_versions(&*shared.state, if result.is_ok() { delivered } else { Vec::new() }, &in_hand).await;
        if let Ok(report) = &result
            && !to_record.is_empty()
        {
            // After the commit: the outputs are delivered and the inputs gone. A key that cannot be
            // recorded now only lets a later copy through again.
            let records: Vec<store::KeyRecord> =
                to_record.into_iter().filter(|(i, _)| !report.lost_leases.contains(i)).map(|(_, k)| k).collect();
            match shared.state.record_keys(records).await {
                Ok(there) if !there.is_empty() => {
                    tracing::warn!(pipeline = %run.pipeline.name, messages = there.len(), "another engine delivered the same keys at the same time: receivers got them twice (they carry the same idempotency key)")
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(pipeline = %run.pipeline.name, error = %e, "delivered, but the idempotency keys could not be recorded: a copy sent again would be delivered again")
                }
            }
        }
        if let Ok(report) = &result
            && !tracking.is_empty()
        {
            // In the background: a slow shared store does not hold the pipeline up for them.
            let events: Vec<store::TrackEvent> =
                tracking.into_iter().filter(|(k, _)| !report.lost_leases.contains(k)).map(|(_, e)| e).collect();
            let (state, name) = (shared.state.clone(), run.pipeline.name.clone());
            tokio::spawn(async move {
                if let Err(e) = state.record_tracking(events).await {
                    tracing::warn!(pipeline = %name, error = %e, "delivered, but the status events could not be recorded");
                }
            });
        }
        if let Ok(report) = &result
            && !superseding.is_empty()
        {
            let ids: Vec<String> = superseding.into_iter().filter(|(i, _)| !report.lost_leases.contains(i)).map(|(_, m)| m).collect();
            run.supersede(shared, ids).await;
        }
        run.release_keys(&keys);
        shared.in_flight.fetch_sub(counted.len() as i64, Ordering::SeqCst);
        let report = result?;
        for q in &report.queues {
            shared.store.wake(q);
        }
        if !report.lost_leases.is_empty() {
            tracing::warn!(pipeline = %run.pipeline.name, messages = report.lost_leases.len(),
                "messages took longer than the visibility timeout and went to another consumer; raise `runtime.visibility_timeout`");
        }
        let lost: BTreeSet<usize> = report.lost_leases.into_iter().collect();
        if !report.duplicates.is_empty() {
            // Another worker delivered the same key between our look-up and this commit: the
            // queue outputs were not stored; a file or RabbitMQ sink did get it twice.
            tracing::info!(pipeline = %run.pipeline.name, messages = report.duplicates.len(), "duplicates found at commit: their queue outputs were not stored");
        }
        for (i, c) in counted.into_iter().enumerate() {
            if lost.contains(&i) {
                continue;
            }
            run.stats.count(if report.duplicates.contains(&i) { Counted::Duplicate(None) } else { c });
        }
    }
    Ok(())
}

/// With a shared store, exception records are written there before their messages leave the
/// queue (the commit that follows). When it cannot be reached, those messages go back to their
/// queue without spending an attempt, and fail again later.
async fn record_shared_exceptions(run: &PipelineRun, shared: &Shared, settlements: &mut [Settlement], counted: &mut [Counted]) {
    let mut rows = Vec::new();
    let mut at = Vec::new();
    for (i, s) in settlements.iter_mut().enumerate() {
        if let Settle::Done { exceptions, .. } = &mut s.outcome
            && !exceptions.is_empty()
        {
            rows.append(exceptions);
            at.push(i);
        }
    }
    if rows.is_empty() {
        return;
    }
    if let Err(e) = shared.state.record_exceptions(rows).await {
        tracing::warn!(pipeline = %run.pipeline.name, error = %e, store = %shared.state.describe(), messages = at.len(),
            "exception records cannot be written to the shared store; their messages wait in the queue");
        let visible_at = now_micros() + STATE_AWAY_PAUSE.as_micros() as i64;
        for i in at {
            settlements[i].outcome = Settle::GiveBack { visible_at };
            counted[i] = Counted::Held;
        }
    }
}

/// The messages of `again` (leased id, message id) that this batch settles without an exception.
fn delivered_again(settlements: &[Settlement], again: &[(i64, String)]) -> Vec<(usize, String)> {
    if again.is_empty() {
        return Vec::new();
    }
    settlements
        .iter()
        .enumerate()
        .filter_map(|(k, s)| match (&s.outcome, s.input) {
            (Settle::Done { exceptions, .. }, Some((id, _))) if exceptions.is_empty() => {
                again.iter().find(|(a, _)| *a == id).map(|(_, m)| (k, m.clone()))
            }
            _ => None,
        })
        .collect()
}

fn exception_row(record: ExceptionRecord, leased: &Leased) -> ExceptionRow {
    ExceptionRow { record, headers: leased.headers.clone(), replayable: true }
}

fn done_with_exception(input: Option<(i64, u32)>, row: ExceptionRow) -> (Settlement, Counted) {
    let counted = Counted::Exception(row.record.reason.clone());
    (Settlement { input, outcome: Settle::Done { outputs: vec![], exceptions: vec![row], key: None } }, counted)
}

/// A sink that could not take the message: it is retried later, or after its last attempt it
/// becomes a `sink_failed` exception.
/// A sink that did not take the message: retried later by the sink's retry policy, or an
/// exception: `sink_rejected` at once when the receiver refused it for good, `sink_failed`
/// after the last attempt.
fn sink_failure(
    run: &PipelineRun,
    p: &Pipeline,
    sink: usize,
    leased: &Leased,
    mut metadata: crate::message::Metadata,
    f: SinkFailure,
) -> (Settlement, Counted) {
    let input = Some((leased.id, leased.attempts));
    let policy = &run.delivery(sink).retry;
    if !f.permanent && leased.attempts < policy.max_attempts {
        let wait = policy.delay(leased.attempts).max(f.retry_after.unwrap_or_default());
        tracing::warn!(pipeline = %p.name, attempt = leased.attempts, retry_in = ?wait, error = %f.message, "a sink failed; the message will be retried");
        let visible_at = now_micros() + wait.as_micros() as i64;
        return (Settlement { input, outcome: Settle::Retry { visible_at } }, Counted::Retried);
    }
    let why = if f.permanent { reason::SINK_REJECTED } else { reason::SINK_FAILED };
    metadata.attempt = leased.attempts;
    let record = p.exception(metadata, &leased.body, Stage::Sink, None, Failure::one(why, ErrorDetail::record("", f.message)));
    done_with_exception(input, exception_row(record, leased))
}

/// A message held back (a circuit open, a rate limit, a copy being delivered): back in its
/// queue until then, no attempt spent.
fn held_back(leased: &Leased, until: Instant) -> (Settlement, Counted) {
    let visible_at = now_micros() + until.saturating_duration_since(Instant::now()).as_micros() as i64;
    (Settlement { input: Some((leased.id, leased.attempts)), outcome: Settle::GiveBack { visible_at } }, Counted::Held)
}

/// Longest wait for a further sink's rate limit once a sink of the message has it.
const HELD_AFTER_WRITE_WAIT: Duration = Duration::from_secs(10);

/// Longest a worker pauses at once for a sink that holds messages back.
const MAX_HELD_PAUSE: Duration = Duration::from_secs(5);

/// Longest a worker waits for a rate limit with the batch in hand; past it, the message goes
/// back to its queue (its lease must not run out meanwhile).
const INLINE_RATE_WAIT: Duration = Duration::from_secs(1);

/// A processed batch: what to settle, what to count, the file sinks' lengths once flushed, and
/// the idempotency keys it holds in hand.
struct Processed {
    settlements: Vec<Settlement>,
    counted: Vec<Counted>,
    marks: Vec<(String, u64)>,
    /// Idempotency keys held in hand.
    keys: Vec<String>,
    /// Entity versions (key, version) delivered, to record once committed, and all those held
    /// in hand by this batch.
    versions: BatchVersions,
    /// Status events (`track: true`) by settlement index, written with the batch's commit.
    tracking: Vec<(usize, store::TrackEvent)>,
}

impl Processed {
    fn given_back(batch: &[Leased]) -> Processed {
        let visible_at = now_micros();
        let settlements: Vec<Settlement> =
            batch.iter().map(|l| Settlement { input: Some((l.id, l.attempts)), outcome: Settle::GiveBack { visible_at } }).collect();
        let counted = vec![Counted::Retried; settlements.len()];
        Processed { settlements, counted, marks: Vec::new(), keys: Vec::new(), versions: Default::default(), tracking: Vec::new() }
    }
}

/// How long an event waits before it looks for its predecessor again.
const PARK_DELAY: Duration = Duration::from_secs(1);

/// Takes the idempotency keys out of the settlements, with their indexes.
fn take_keys(settlements: &mut [Settlement]) -> Vec<(usize, store::KeyRecord)> {
    let mut keys = Vec::new();
    for (i, s) in settlements.iter_mut().enumerate() {
        if let Settle::Done { key, .. } = &mut s.outcome
            && let Some(k) = key.take()
        {
            keys.push((i, k));
        }
    }
    keys
}

/// How long a batch waits when the shared state store cannot be reached.
const STATE_AWAY_PAUSE: Duration = Duration::from_secs(2);

/// Processes a batch.
async fn process_batch(run: &PipelineRun, shared: &Shared, batch: Vec<Leased>) -> Result<Processed, RunError> {
    let state = &*shared.state;
    // The version in force when the batch starts: a reload applies from the next batch.
    let current = run.current();
    let p: &Pipeline = &current;
    let max_attempts = run.max_attempts(p);
    // Rate-limit waits with the batch in hand end a third of the way through its lease (the next
    // batch is leased meanwhile): past that, what a limit holds back goes back to the queue, and
    // no lease runs out.
    let waits_until = Instant::now() + run.pipeline.runtime.visibility_timeout / 3;
    let rate_wait = |most: Duration| most.min(waits_until.saturating_duration_since(Instant::now()));
    // First every message through the pipeline (Err: it is settled already), so that duplicates
    // are looked up once for the batch, before anything is written.
    let mut outcomes: Vec<Result<Outcome, (Settlement, Counted)>> = Vec::with_capacity(batch.len());
    for leased in &batch {
        let input = Some((leased.id, leased.attempts));
        let raw = to_raw(leased);
        if leased.attempts > max_attempts {
            let f = Failure::one(
                reason::TOO_MANY_ATTEMPTS,
                ErrorDetail::input(
                    "",
                    format!(
                        "delivered {} times without being settled (the limit is {max_attempts}): an engine may have stopped while processing it",
                        leased.attempts - 1
                    ),
                ),
            );
            outcomes.push(Err(done_with_exception(input, exception_row(p.failure_record(&raw, Stage::Source, f), leased))));
            continue;
        }
        // `runtime.rate_limit`: taken no faster than that; past a short wait, back to the queue.
        if let Some(limit) = &run.pipeline.source_rate
            && let Err(until) = limit.admit(rate_wait(INLINE_RATE_WAIT)).await
        {
            outcomes.push(Err(held_back(leased, until)));
            continue;
        }
        outcomes.push(Ok(process_guarded(p, raw, &leased.body)));
    }
    let routed: Vec<Option<&crate::message::Metadata>> = outcomes
        .iter()
        .map(|o| match o {
            Ok(Outcome::Routed { output, .. }) => Some(&output.metadata),
            _ => None,
        })
        .collect();
    // PostgreSQL away: nothing is delivered unchecked; the batch goes back without spending an
    // attempt, and the worker pauses.
    let batch_ref = &batch;
    let away = |e: store::StoreError| async move {
        if state.embedded().is_some() {
            return Err(RunError::from(e));
        }
        tracing::warn!(pipeline = %p.name, error = %e, store = %state.describe(), "the shared state store cannot be reached; the batch waits");
        tokio::time::sleep(STATE_AWAY_PAUSE).await;
        Ok(Processed::given_back(batch_ref))
    };
    let verdicts = match super::verdicts(run, p, state, &routed).await {
        Ok(v) => v,
        Err(e) => return away(e).await,
    };
    let held = super::keys_to_deliver(&verdicts);
    let deliverable: Vec<Option<&crate::message::Metadata>> =
        routed.iter().zip(&verdicts).map(|(m, v)| if matches!(v, Verdict::Deliver(_)) { *m } else { None }).collect();
    let orders = match super::order_verdicts(run, p, state, &deliverable).await {
        Ok(o) => o,
        Err(e) => {
            run.release_keys(&held);
            return away(e).await;
        }
    };
    let versions_in_hand: Vec<(String, String)> = deliverable
        .iter()
        .zip(&orders)
        .filter(|(_, o)| **o == Order::Apply)
        .filter_map(|(m, _)| m.and_then(|m| m.entity.as_ref()).map(|e| (e.key.clone(), e.version.clone())))
        .collect();
    let mut applied: Vec<(usize, String, String)> = Vec::new();
    let mut counted = Vec::with_capacity(batch.len());
    let mut done = Vec::with_capacity(batch.len());
    // Per settlement: the message's envelope and the outside sinks it wrote, which must hold the
    // output before the commit.
    let mut wrote_outside: Vec<Option<(crate::message::Metadata, Vec<usize>)>> = Vec::with_capacity(batch.len());
    // RabbitMQ sinks: each publish's confirm, with its message (index) and sink, awaited below.
    let mut confirms: Vec<(usize, usize, crate::amqp::publish::Confirm)> = Vec::new();
    // `track: true`: the milestones reached (per settlement index) and the correlation id of
    // each routed message, turned into events once the batch's outcome is final.
    let mut milestones: Vec<(usize, store::TrackEvent)> = Vec::new();
    let mut routed_ids: Vec<(usize, String)> = Vec::new();
    for (((leased, outcome), verdict), order) in batch.iter().zip(outcomes).zip(verdicts).zip(orders) {
        let input = Some((leased.id, leased.attempts));
        let (settlement, count, outside) = match outcome {
            Err((s, c)) => (s, c, None),
            Ok(Outcome::Failed(record)) => {
                tracing::info!(pipeline = %p.name, correlation_id = %record.correlation_id, reason = %record.reason, stage = record.stage.as_str(), "message sent to exceptions");
                let (s, c) = done_with_exception(input, exception_row(*record, leased));
                (s, c, None)
            }
            Ok(Outcome::Routed { output, sinks }) => {
                if matches!(verdict, Verdict::Deliver(_))
                    && let Some(entity) = output.metadata.entity.clone()
                {
                    let parked = match super::order_action(p, &output.metadata, &order) {
                        OrderAction::Deliver => {
                            applied.push((done.len(), entity.key.clone(), entity.version.clone()));
                            None
                        }
                        OrderAction::Drop => Some(Ok((
                            Settlement { input, outcome: Settle::Done { outputs: vec![], exceptions: vec![], key: None } },
                            Counted::Stale,
                        ))),
                        OrderAction::Fail(f) => Some(Err(f)),
                        OrderAction::Park => {
                            let visible_at = now_micros() + PARK_DELAY.as_micros() as i64;
                            Some(Ok((Settlement { input, outcome: Settle::GiveBack { visible_at } }, Counted::Parked)))
                        }
                    };
                    match parked {
                        None => {}
                        Some(Ok((s, c))) => {
                            settlements_push(&mut done, &mut counted, &mut wrote_outside, s, c, None);
                            continue;
                        }
                        Some(Err(f)) => {
                            let record = p.exception(output.metadata, &leased.body, Stage::Source, Some("ordering".into()), f);
                            let (s, c) = done_with_exception(input, exception_row(record, leased));
                            settlements_push(&mut done, &mut counted, &mut wrote_outside, s, c, None);
                            continue;
                        }
                    }
                }
                let (sinks, key, count) = match verdict {
                    Verdict::Deliver(key) => (sinks.clone(), key, Counted::Routed(sinks)),
                    Verdict::Duplicate => {
                        tracing::debug!(pipeline = %p.name, correlation_id = %output.metadata.correlation_id, "duplicate: already delivered");
                        match p.idempotency.as_ref().map(|i| i.duplicates) {
                            Some(Duplicates::Sink(i)) => (vec![i], None, Counted::Duplicate(Some(i))),
                            _ => (vec![], None, Counted::Duplicate(None)),
                        }
                    }
                    Verdict::InHand => {
                        tracing::debug!(pipeline = %p.name, correlation_id = %output.metadata.correlation_id, "a copy is being delivered: waits for it");
                        let (s, c) = held_back(leased, Instant::now() + super::KEY_IN_HAND_WAIT);
                        settlements_push(&mut done, &mut counted, &mut wrote_outside, s, c, None);
                        continue;
                    }
                    Verdict::NoKey => {
                        let record =
                            p.exception(output.metadata, &leased.body, Stage::Source, Some("idempotency".into()), super::no_key_failure());
                        let (s, c) = done_with_exception(input, exception_row(record, leased));
                        settlements_push(&mut done, &mut counted, &mut wrote_outside, s, c, None);
                        continue;
                    }
                };
                let mut outputs = Vec::new();
                let mut outside = Vec::new();
                let mut failed: Option<(usize, SinkFailure)> = None;
                let external = |i: &usize| matches!(run.sinks[*i], RuntimeSink::External(_));
                // Held before any sink is written, so that a hold never writes a sink twice.
                // The sinks a reply goes on to count too: an order posted must not wait for its
                // acknowledgement's sink (it would be posted again).
                let replies_to = sinks.iter().filter_map(|&i| p.reply_to.get(i).copied().flatten());
                let mut held = sinks.iter().copied().chain(replies_to).filter(external).filter_map(|i| run.delivery(i).would_hold()).max();
                let mut wrote_one = false;
                let mut deliveries = super::Deliveries::new(&sinks, held.is_some());
                let mut replied = Vec::new();
                while let Some((i, reply)) = deliveries.next() {
                    let output = reply.as_ref().unwrap_or(&output);
                    if external(&i) {
                        // Once one sink has it, the others' rate limits are waited out here.
                        let wait = if wrote_one { HELD_AFTER_WRITE_WAIT } else { INLINE_RATE_WAIT };
                        if let Err(until) = run.admit(i, rate_wait(wait), shared).await {
                            held = Some(until);
                            break;
                        }
                        wrote_one = true;
                    }
                    match &run.sinks[i] {
                        RuntimeSink::Queue { queue, format, .. } => outputs.push((
                            Target::Queue(queue.clone()),
                            NewMessage {
                                message_id: output.metadata.message_id.clone(),
                                headers: StoredHeaders::of_output(&output.metadata).to_json(),
                                body: format.render(output),
                            },
                        )),
                        RuntimeSink::External(sink) => match sink.as_amqp() {
                            // Confirms are this batch's own: never another worker's flush.
                            Some(amqp) => match amqp.send(output).await {
                                Ok(c) => confirms.push((done.len(), i, c)),
                                Err(e) => {
                                    failed = Some((i, run.publish_failed(i, e.to_string(), shared)));
                                    break;
                                }
                            },
                            None => match run.judge(i, sink.write_with_reply(output).await, shared) {
                                Ok(reply) => {
                                    outside.push(i);
                                    if p.track {
                                        milestones.push((done.len(), milestone(p, i, output, reply.as_ref())));
                                    }
                                    if let (Some(r), Some(to)) = (reply, p.reply_to.get(i).copied().flatten()) {
                                        replied.push(to);
                                        deliveries.reply(to, r);
                                    }
                                }
                                Err(f) => {
                                    failed = Some((i, f));
                                    break;
                                }
                            },
                        },
                    }
                }
                match (held, failed) {
                    (Some(until), _) => {
                        let (s, c) = held_back(leased, until);
                        (s, c, None)
                    }
                    (None, None) => (
                        Settlement { input, outcome: Settle::Done { outputs, exceptions: vec![], key } },
                        match count {
                            Counted::Routed(mut to) if !replied.is_empty() => {
                                to.extend(replied);
                                Counted::Routed(to)
                            }
                            other => other,
                        },
                        Some((output.metadata, outside)),
                    ),
                    (None, Some((i, f))) => {
                        let (s, c) = sink_failure(run, p, i, leased, output.metadata, f);
                        (s, c, None)
                    }
                }
            }
        };
        if p.track
            && let Some((meta, _)) = &outside
        {
            routed_ids.push((done.len(), meta.correlation_id.clone()));
        }
        settlements_push(&mut done, &mut counted, &mut wrote_outside, settlement, count, outside);
    }
    let mut settlements = done;
    // Outside sinks must hold what they were given before the inputs leave their queue.
    let used: BTreeSet<usize> = wrote_outside.iter().flatten().flat_map(|(_, sinks)| sinks.iter().copied()).collect();
    let mut flush_failed: Vec<(usize, String)> = Vec::new();
    let mut marks = Vec::new();
    for i in used {
        if let RuntimeSink::External(sink) = &run.sinks[i] {
            match sink.flush().await {
                Ok(()) => marks.extend(sink.mark()),
                Err(e) => flush_failed.push((i, format!("sink `{}`: {e}", p.sink_name(i)))),
            }
        }
    }
    let mut refused: Vec<(usize, usize, SinkFailure)> = Vec::new();
    for (k, i, c) in confirms {
        let confirmed = crate::amqp::publish::confirmed(c).await.map_err(|e| e.to_string());
        if let Err(f) = run.judge_publish(i, confirmed, shared)
            && !refused.iter().any(|(r, _, _)| *r == k)
        {
            refused.push((k, i, f));
        }
    }
    for (k, i, f) in refused {
        // Still `Done` (not already a sink failure): the publish was refused after the fact.
        if matches!(settlements[k].outcome, Settle::Done { .. })
            && let Some((metadata, _)) = wrote_outside[k].clone()
        {
            (settlements[k], counted[k]) = sink_failure(run, p, i, &batch[k], metadata, f);
            wrote_outside[k] = None;
        }
    }
    if !flush_failed.is_empty() {
        for (k, outside) in wrote_outside.into_iter().enumerate() {
            let Some((metadata, sinks)) = outside else { continue };
            if let Some((i, message)) = flush_failed.iter().find(|(i, _)| sinks.contains(i)) {
                (settlements[k], counted[k]) = sink_failure(run, p, *i, &batch[k], metadata, SinkFailure::passing(message.clone()));
            }
        }
    }
    // Only the keys of messages on their way out stay in hand until the commit. A message
    // retried, given back or failed is not delivered: its key goes now (before its commit makes
    // it visible again, so that it never finds its own key in hand), and a copy may go.
    let delivering: BTreeSet<&str> = settlements
        .iter()
        .filter_map(|s| match &s.outcome {
            Settle::Done { key: Some(k), .. } => Some(k.key.as_str()),
            _ => None,
        })
        .collect();
    let (held, not_out): (Vec<String>, Vec<String>) = held.into_iter().partition(|k| delivering.contains(k.as_str()));
    run.release_keys(&not_out);
    let delivered: Vec<(String, String)> = applied
        .into_iter()
        .filter(|(k, ..)| matches!(&settlements[*k].outcome, Settle::Done { exceptions, .. } if exceptions.is_empty()))
        .map(|(_, key, version)| (key, version))
        .collect();
    // Likewise the versions: only those of events on their way out stay in hand.
    let mut not_out = versions_in_hand;
    for v in &delivered {
        if let Some(at) = not_out.iter().position(|x| x == v) {
            not_out.swap_remove(at);
        }
    }
    run.settle_versions(state, Vec::new(), &not_out).await;
    let tracking = if p.track { track_events(p, &settlements, &counted, milestones, routed_ids) } else { Vec::new() };
    Ok(Processed { settlements, counted, marks, keys: held, versions: (delivered.clone(), delivered), tracking })
}

/// The event of a delivery to sink `i` (an outside sink): its milestone (an http sink's
/// `milestone:`, else `delivered`), with what the receiver answered (the `reply:` fields).
pub(super) fn milestone(
    p: &Pipeline,
    i: usize,
    output: &crate::message::Output,
    reply: Option<&crate::message::Output>,
) -> store::TrackEvent {
    let name = p.sink_name(i);
    let target = p.http_targets.get(name);
    let mut detail = serde_json::json!({"sink": name});
    if let (Some(t), Some(r)) = (target, reply) {
        for field in t.reply_fields() {
            detail[field] = r.payload.get(field).map(|v| v.to_json()).unwrap_or_default();
        }
    }
    let event = target.and_then(|t| t.milestone.clone()).unwrap_or_else(|| "delivered".to_string());
    store::TrackEvent::now(&output.metadata.correlation_id, &p.name, &event, detail)
}

/// The status events of a settled batch: each exception record's failure, and each delivered
/// message's milestones (or `delivered` with its sinks). Retries and messages given back say
/// nothing yet.
fn track_events(
    p: &Pipeline,
    settlements: &[Settlement],
    counted: &[Counted],
    milestones: Vec<(usize, store::TrackEvent)>,
    routed_ids: Vec<(usize, String)>,
) -> Vec<(usize, store::TrackEvent)> {
    let mut events = Vec::new();
    for (k, s) in settlements.iter().enumerate() {
        let Settle::Done { exceptions, .. } = &s.outcome else { continue };
        if !exceptions.is_empty() {
            events.extend(exceptions.iter().map(|row| (k, failed_event(&row.record))));
            continue;
        }
        let reached: Vec<&store::TrackEvent> = milestones.iter().filter(|(i, _)| *i == k).map(|(_, e)| e).collect();
        if !reached.is_empty() {
            events.extend(reached.into_iter().map(|e| (k, e.clone())));
        } else if let (Some((_, id)), Counted::Routed(sinks)) = (routed_ids.iter().find(|(i, _)| *i == k), &counted[k]) {
            events.push((k, delivered_event(p, id, sinks)));
        }
    }
    events
}

/// The status event of an exception record.
pub(super) fn failed_event(r: &crate::message::ExceptionRecord) -> store::TrackEvent {
    let first = r.errors.first().map(|e| e.message.clone()).unwrap_or_default();
    let detail = serde_json::json!({"reason": r.reason, "stage": r.stage.as_str(), "message": first, "hint": r.hint, "exception_id": r.exception_id});
    store::TrackEvent::now(&r.correlation_id, &r.pipeline, "failed", detail)
}

/// The status event of a message delivered to sinks without milestones.
pub(super) fn delivered_event(p: &Pipeline, correlation_id: &str, sinks: &[usize]) -> store::TrackEvent {
    let names: Vec<&str> = sinks.iter().map(|&i| p.sink_name(i)).collect();
    store::TrackEvent::now(correlation_id, &p.name, "delivered", serde_json::json!({"sinks": names}))
}

fn settlements_push(
    done: &mut Vec<Settlement>,
    counted: &mut Vec<Counted>,
    wrote_outside: &mut Vec<Option<(crate::message::Metadata, Vec<usize>)>>,
    s: Settlement,
    c: Counted,
    outside: Option<(crate::message::Metadata, Vec<usize>)>,
) {
    done.push(s);
    counted.push(c);
    wrote_outside.push(outside);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rescan_walks_the_whole_queue_batch_by_batch_then_returns_to_the_cursor() {
        let mut c = Cursor::new();
        assert_eq!(c.next_from(), 0);
        c.leased(0, Some(500), true);
        assert_eq!(c.next_from(), 500);
        c.last_rescan -= RESCAN;
        assert_eq!(c.next_from(), 0, "a rescan starts from the beginning");
        c.leased(0, Some(100), true);
        assert_eq!(c.next_from(), 100, "a full batch behind the cursor: the rescan goes on");
        c.leased(100, Some(200), false);
        assert_eq!(c.next_from(), 500, "a short batch ends it");
        c.leased(500, Some(700), true);
        assert_eq!(c.next_from(), 700);
    }

    #[test]
    fn only_messages_delivered_again_supersede_their_records() {
        let done = |id: i64, failed: bool| Settlement {
            input: Some((id, 2)),
            outcome: Settle::Done {
                outputs: vec![],
                exceptions: if failed {
                    vec![ExceptionRow { record: crate::store::tests_record("x", "sink_failed"), headers: "{}".into(), replayable: true }]
                } else {
                    vec![]
                },
                key: None,
            },
        };
        let settlements = vec![
            done(1, false),
            done(2, true),
            Settlement { input: Some((3, 2)), outcome: Settle::Retry { visible_at: 0 } },
            done(4, false),
        ];
        let again = vec![(1, "m1".to_string()), (2, "m2".to_string()), (3, "m3".to_string())];
        assert_eq!(
            delivered_again(&settlements, &again),
            [(0, "m1".to_string())],
            "delivered, not failed again nor retried; 4 was a first delivery"
        );
        assert!(delivered_again(&settlements, &[]).is_empty());
    }
}
