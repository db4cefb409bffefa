//! A worker: lease a batch, process it, write outside sinks and make them durable, settle the
//! batch in one store commit. Up to two commits are in the writer's hands while the next batch is
//! processed; they commit in order, so a worker keeps its queue's order.

use super::envelope::{StoredHeaders, to_raw};
use super::{PipelineRun, RunError, RuntimeSink, Shared, process_guarded};
use crate::message::{ErrorDetail, Failure, Stage, reason};
use crate::pipeline::Outcome;
use crate::store::{self, ExceptionRow, Leased, NewMessage, Pending, Settle, SettleReport, Settlement, Target, now_micros};
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// What a batch will add to the counters once its commit is through.
#[derive(Default)]
struct BatchCounts {
    leased: i64,
    received: u64,
    routed: u64,
    retried: u64,
    outputs: Vec<u64>,
    exceptions: BTreeMap<String, u64>,
}

/// Most settle commits a worker leaves in flight.
const MAX_PENDING_COMMITS: usize = 2;
/// How often a worker also looks behind its cursor, for messages given back or whose lease ran out.
const RESCAN: Duration = Duration::from_secs(1);
/// Longest idle wait between looks at an empty queue (other processes do not wake us).
const MAX_IDLE: Duration = Duration::from_millis(100);

pub(super) async fn run(run: Arc<PipelineRun>, shared: Arc<Shared>) -> Result<(), RunError> {
    let settings = &run.pipeline.runtime;
    let lease_micros = settings.visibility_timeout.as_micros() as i64;
    let mut cursor = 0i64;
    let mut last_rescan = Instant::now();
    let mut idle = Duration::from_millis(2);
    let mut pending: VecDeque<(Pending<SettleReport>, BatchCounts)> = VecDeque::new();
    // The next batch is leased while this one is processed, so the store and the pipeline work
    // at the same time.
    let mut next: Option<Pending<Vec<Leased>>> = None;
    let mut back_pressure = BackPressure::default();
    let waker = shared.store.waker(&run.input_queue);
    let mut shutdown = shared.shutdown.clone();
    let lease = |after: i64| -> Pending<Vec<Leased>> {
        let (stream, replay, limit, owner) = (run.stream, run.replay_stream, settings.batch_size, shared.owner);
        // Counted as in flight before it exists, so `--once` never sees a batch nowhere.
        shared.in_flight.fetch_add(1, Ordering::SeqCst);
        shared.store.submit(move |c| {
            let mut batch = store::lease(c, stream, after, limit, lease_micros, owner)?;
            if batch.len() < limit {
                batch.extend(store::lease(c, replay, 0, limit - batch.len(), lease_micros, owner)?);
            }
            Ok(batch)
        })
    };
    let result = async {
        loop {
            let stopping = *shutdown.borrow();
            if stopping && next.is_none() {
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
            let batch = match next.take() {
                Some(p) => p.await,
                None => lease(lease_after(&mut last_rescan, cursor)).await,
            };
            let batch = match batch {
                Ok(b) => b,
                Err(e) => {
                    shared.in_flight.fetch_sub(1, Ordering::SeqCst);
                    return Err(e.into());
                }
            };
            shared.in_flight.fetch_add(batch.len() as i64 - 1, Ordering::SeqCst);
            if let Some(last) = batch.iter().map(|l| l.id).max() {
                cursor = cursor.max(last);
            }
            if batch.is_empty() {
                finish(&run, &shared, &mut pending, 0).await?;
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
                next = Some(lease(lease_after(&mut last_rescan, cursor)));
            }
            let (settlements, counts) = process_batch(&run, batch).await;
            pending.push_back((shared.store.submit(move |c| store::settle(c, &settlements, None)), counts));
            finish(&run, &shared, &mut pending, MAX_PENDING_COMMITS).await?;
        }
    }
    .await;
    let drained = finish(&run, &shared, &mut pending, 0).await;
    // A batch leased ahead when an error stopped the worker goes back at once.
    if let Some(p) = next
        && let Ok(batch) = p.await
    {
        shared.in_flight.fetch_add(batch.len() as i64 - 1, Ordering::SeqCst);
        let n = batch.len() as i64;
        let back: Vec<Settlement> =
            batch.iter().map(|l| Settlement { input: Some((l.id, l.attempts)), outcome: Settle::Retry { visible_at: 0 } }).collect();
        let _ = shared.store.submit(move |c| store::settle(c, &back, None)).await;
        shared.in_flight.fetch_sub(n, Ordering::SeqCst);
    }
    result.and(drained)
}

/// Where the next lease starts: after the cursor, or, once a second, from the start of the queue
/// for messages given back for retry or whose lease ran out.
fn lease_after(last_rescan: &mut Instant, cursor: i64) -> i64 {
    if last_rescan.elapsed() >= RESCAN {
        *last_rescan = Instant::now();
        0
    } else {
        cursor
    }
}

/// Which queue this pipeline writes is full, looked at no more than every quarter second: a
/// count over a long queue is not free.
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
                let depth = shared.store.submit(move |c| store::depth(c, &q)).await?;
                if depth as u64 >= *max_depth {
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
async fn finish(
    run: &PipelineRun,
    shared: &Shared,
    pending: &mut VecDeque<(Pending<SettleReport>, BatchCounts)>,
    keep: usize,
) -> Result<(), RunError> {
    while pending.len() > keep {
        let (commit, counts) = pending.pop_front().expect("non-empty");
        let result = commit.await;
        shared.in_flight.fetch_sub(counts.leased, Ordering::SeqCst);
        let report = result?;
        for q in &report.queues {
            shared.store.wake(q);
        }
        if report.lost_leases > 0 {
            tracing::warn!(pipeline = %run.pipeline.name, messages = report.lost_leases,
                "messages took longer than the visibility timeout and went to another consumer; raise `runtime.visibility_timeout`");
        }
        let s = &run.stats;
        s.received.fetch_add(counts.received, Ordering::Relaxed);
        s.routed.fetch_add(counts.routed, Ordering::Relaxed);
        s.retried.fetch_add(counts.retried, Ordering::Relaxed);
        for (i, n) in counts.outputs.iter().enumerate() {
            s.outputs[i].fetch_add(*n, Ordering::Relaxed);
        }
        if !counts.exceptions.is_empty() {
            let mut e = s.exceptions.lock().expect("stats lock");
            for (r, n) in counts.exceptions {
                *e.entry(r).or_default() += n;
            }
        }
    }
    Ok(())
}

/// Delay before retry `attempt` (1-based): 1 s, 2 s, 4 s ... up to a minute.
fn backoff(attempt: u32) -> Duration {
    Duration::from_secs(1u64 << attempt.saturating_sub(1).min(6)).min(Duration::from_secs(60))
}

async fn process_batch(run: &PipelineRun, batch: Vec<Leased>) -> (Vec<Settlement>, BatchCounts) {
    let p = &run.pipeline;
    let max_attempts = p.runtime.max_attempts;
    let mut counts = BatchCounts { leased: batch.len() as i64, outputs: vec![0; run.sinks.len()], ..Default::default() };
    let mut settlements = Vec::with_capacity(batch.len());
    // Per settlement: the outside sinks it wrote, which must be durable before the commit.
    let mut wrote_outside: Vec<Vec<usize>> = Vec::with_capacity(batch.len());
    for leased in batch {
        let input = Some((leased.id, leased.attempts));
        let raw = to_raw(&leased);
        let exception =
            |record: crate::message::ExceptionRecord| ExceptionRow { record, headers: leased.headers.clone(), replayable: true };
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
            let record = p.failure_record(&raw, Stage::Source, f);
            *counts.exceptions.entry(record.reason.clone()).or_default() += 1;
            counts.received += 1;
            settlements.push(Settlement { input, outcome: Settle::Done { outputs: vec![], exceptions: vec![exception(record)] } });
            wrote_outside.push(vec![]);
            continue;
        }
        let body = raw.body.clone();
        match process_guarded(p, raw, &body) {
            Outcome::Failed(record) => {
                tracing::info!(pipeline = %p.name, correlation_id = %record.correlation_id, reason = %record.reason, stage = record.stage.as_str(), "message sent to exceptions");
                *counts.exceptions.entry(record.reason.clone()).or_default() += 1;
                counts.received += 1;
                settlements.push(Settlement { input, outcome: Settle::Done { outputs: vec![], exceptions: vec![exception(*record)] } });
                wrote_outside.push(vec![]);
            }
            Outcome::Routed { output, sinks } => {
                let mut outputs = Vec::new();
                let mut outside = Vec::new();
                let mut failed = None;
                for &i in &sinks {
                    match &run.sinks[i] {
                        RuntimeSink::Queue { queue, format, .. } => outputs.push((
                            Target::Queue(queue.clone()),
                            NewMessage {
                                message_id: output.metadata.message_id.clone(),
                                headers: StoredHeaders::of_output(&output.metadata).to_json(),
                                body: format.render(&output),
                            },
                        )),
                        RuntimeSink::External(sink) => match sink.write(&output).await {
                            Ok(()) => outside.push(i),
                            Err(e) => {
                                failed = Some(format!("sink `{}`: {e}", p.sink_name(i)));
                                break;
                            }
                        },
                    }
                }
                match failed {
                    None => {
                        counts.received += 1;
                        counts.routed += 1;
                        for &i in &sinks {
                            counts.outputs[i] += 1;
                        }
                        settlements.push(Settlement { input, outcome: Settle::Done { outputs, exceptions: vec![] } });
                    }
                    Some(message) => {
                        settlements.push(sink_failure(run, &mut counts, input, &leased, output.metadata, &body, message));
                    }
                }
                wrote_outside.push(outside);
            }
        }
    }
    // Outside sinks must hold what they were given before the inputs leave their queue.
    let mut flush_failed: BTreeMap<usize, String> = BTreeMap::new();
    let used: std::collections::BTreeSet<usize> = wrote_outside.iter().flatten().copied().collect();
    for i in used {
        if let RuntimeSink::External(sink) = &run.sinks[i]
            && let Err(e) = sink.flush().await
        {
            flush_failed.insert(i, format!("sink `{}`: {e}", p.sink_name(i)));
        }
    }
    if !flush_failed.is_empty() {
        for (s, wrote) in settlements.iter_mut().zip(&wrote_outside) {
            if let Some(i) = wrote.iter().find(|i| flush_failed.contains_key(i))
                && let (Some((id, attempts)), Settle::Done { .. }) = (s.input, &s.outcome)
            {
                tracing::warn!(pipeline = %p.name, error = %flush_failed[i], "a sink could not make its output durable; the message will be retried");
                // Counted as routed above; it is not.
                counts.received -= 1;
                counts.routed -= 1;
                counts.retried += 1;
                *s = Settlement {
                    input: Some((id, attempts)),
                    outcome: Settle::Retry { visible_at: now_micros() + backoff(attempts).as_micros() as i64 },
                };
            }
        }
    }
    (settlements, counts)
}

/// A sink that could not take the message: retried later, or an exception after the last attempt.
fn sink_failure(
    run: &PipelineRun,
    counts: &mut BatchCounts,
    input: Option<(i64, u32)>,
    leased: &Leased,
    metadata: crate::message::Metadata,
    body: &[u8],
    message: String,
) -> Settlement {
    let p = &run.pipeline;
    if leased.attempts < p.runtime.max_attempts {
        tracing::warn!(pipeline = %p.name, attempt = leased.attempts, error = %message, "a sink failed; the message will be retried");
        counts.retried += 1;
        return Settlement { input, outcome: Settle::Retry { visible_at: now_micros() + backoff(leased.attempts).as_micros() as i64 } };
    }
    let record = p.exception(metadata, body, Stage::Sink, None, Failure::one(reason::SINK_FAILED, ErrorDetail::record("", message)));
    *counts.exceptions.entry(record.reason.clone()).or_default() += 1;
    counts.received += 1;
    Settlement {
        input,
        outcome: Settle::Done {
            outputs: vec![],
            exceptions: vec![ExceptionRow { record, headers: leased.headers.clone(), replayable: true }],
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_a_minute() {
        assert_eq!([1, 2, 3, 7, 8, 30].map(|a| backoff(a).as_secs()), [1, 2, 4, 60, 60, 60]);
    }
}
