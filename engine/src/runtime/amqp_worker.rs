//! A worker fed by a RabbitMQ queue. A delivery is acknowledged only once every output it made
//! is confirmed by the broker (or written by an outside sink), or once it is safely in a retry
//! queue or the dead-letter queue, itself confirmed. Batches are pipelined: while the broker
//! confirms one batch, the next is processed; acks go in delivery order, one `multiple` ack per
//! batch. A lost connection or a consumer cancelled by the broker leads to a new connection and
//! a new consumer; what was not acknowledged comes back from the broker.

use super::{Counted, OrderAction, PipelineRun, RunError, Shared, Verdict, process_guarded};
use crate::amqp::publish::{Confirm, Publisher, confirmed, headers};
use crate::amqp::topology::SourcePlan;
use crate::amqp::unless_lost;
use crate::amqp::{AmqpError, Broker, Session, lapin_message};
use crate::message::{ErrorDetail, ExceptionRecord, Failure, RawMessage, Stage, reason};
use crate::pipeline::{Duplicates, Outcome, Pipeline};
use crate::runtime::RuntimeSink;
use futures_util::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel};
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// Longest a batch waits for rate limits in all, its deliveries in hand: well within RabbitMQ's
/// consumer timeout (30 minutes by default). Past it, what a limit holds back goes back to the
/// queue.
const BATCH_RATE_WAIT: Duration = Duration::from_secs(600);
/// Longest pause at once for a sink that holds messages back.
const MAX_HELD_PAUSE: Duration = Duration::from_secs(5);

/// Batches whose confirms are awaited while the next one is processed.
const BATCHES_IN_FLIGHT: usize = 2;
/// With `--once`: the queue counts as drained after this long without a delivery.
const ONCE_IDLE: Duration = Duration::from_millis(300);
/// How often an idle consumer looks at its connection.
const LIVENESS_CHECK: Duration = Duration::from_millis(500);

/// One delivery and what became of it.
struct InBatch {
    delivery: Delivery,
    /// Confirms of its outputs, with their sink (none: its trip to the dead-letter queue).
    confirms: Vec<(Option<usize>, Confirm)>,
    /// Outside sinks (files) it was written to.
    outside: Vec<usize>,
    /// A sink refused it: retried later, or dead-lettered after the last retry.
    failed: Option<String>,
    /// The failure was a refusal for good (no retry), by this sink (whose policy applies).
    permanent: bool,
    failed_sink: Option<usize>,
    /// Held back by a sink (a circuit open) until then: given back to the queue, not attempted.
    held: Option<std::time::Instant>,
    counted: Counted,
    attempt: u32,
    /// Its idempotency key, recorded once its outputs are confirmed, before the ack.
    key: Option<crate::store::KeyRecord>,
    /// Its entity and version (ordering), applied once delivered.
    applied: Option<(String, String)>,
    /// Waiting for an earlier event of its entity: through the retry queues, not a failure.
    parked: bool,
    /// What the pipeline made of it (its keys, channel, versions), for the exception record of a
    /// sink failure or a wait that ran out.
    metadata: Option<crate::message::Metadata>,
    /// Its exception record, for a shared store: written there before the ack (instead of the
    /// dead-letter queue).
    exception: Option<crate::store::ExceptionRow>,
    /// `track: true`: its status events so far (milestones reached, or its failure), written
    /// before the ack.
    tracked: bool,
    track: Vec<crate::store::TrackEvent>,
}

pub(super) async fn run(run: Arc<PipelineRun>, shared: Arc<Shared>) -> Result<(), RunError> {
    let broker = run.broker.clone().expect("amqp sources have a broker");
    let plan = run.pipeline.broker.as_ref().and_then(|b| b.source.clone()).expect("amqp sources have a plan");
    let mut stop = shared.shutdown.clone();
    // With `--once`, the run waits for this worker as for a source being read.
    if shared.once {
        shared.ingesting.fetch_add(1, Ordering::SeqCst);
        shared.amqp_consuming.fetch_add(1, Ordering::SeqCst);
    }
    let mut failures = 0u32;
    let result = loop {
        let Some(session) = broker.session_retrying(&mut stop).await else { break Ok(()) };
        match consume(&run, &shared, &broker, &plan, &session, &mut stop).await {
            Ok(()) => break Ok(()),
            Err(e) => {
                failures += 1;
                tracing::warn!(pipeline = %run.pipeline.name, error = %e, "RabbitMQ consumer interrupted; unacknowledged messages come back; reconnecting");
                broker.broken(session.generation).await;
                // A short pause so that a broker refusing every consumer is not hammered.
                let pause = Duration::from_millis(100 * u64::from(failures.min(20))).mul_f64(0.5 + fastrand::f64());
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = stop.changed() => {}
                }
            }
        }
    };
    if shared.once {
        shared.amqp_consuming.fetch_sub(1, Ordering::SeqCst);
        shared.ingesting.fetch_sub(1, Ordering::SeqCst);
    }
    result
}

async fn consume(
    run: &Arc<PipelineRun>,
    shared: &Arc<Shared>,
    broker: &Broker,
    plan: &SourcePlan,
    session: &Session,
    stop: &mut tokio::sync::watch::Receiver<bool>,
) -> Result<(), AmqpError> {
    let lost = |e: lapin::Error| AmqpError::Lost(lapin_message(&e));
    let status = session.connection.status();
    let channel = unless_lost(status, "opening a channel", session.connection.create_channel()).await?.map_err(lost)?;
    unless_lost(status, "setting the prefetch", channel.basic_qos(plan.prefetch, BasicQosOptions::default())).await?.map_err(lost)?;
    let tag = format!("switchyard-{}-{}-{}", run.pipeline.name, std::process::id(), session.generation);
    let subscribe = channel.basic_consume(
        crate::amqp::short_name(&plan.queue, "queue name")?,
        crate::amqp::short_id(&tag),
        BasicConsumeOptions::default(),
        FieldTable::default(),
    );
    let mut consumer = unless_lost(status, "subscribing", subscribe).await?.map_err(lost)?;
    tracing::info!(pipeline = %run.pipeline.name, queue = %plan.queue, broker = %broker.shown_url(), "consuming");
    let batch_size = run.pipeline.runtime.batch_size;
    let mut in_flight: VecDeque<tokio::task::JoinHandle<Result<(), AmqpError>>> = VecDeque::new();

    let mut previous: Option<tokio::sync::oneshot::Receiver<bool>> = None;
    let outcome = loop {
        if *stop.borrow() {
            break Ok(());
        }
        // The first delivery of a batch is waited for; the rest are what is already here.
        let first = tokio::select! {
            d = consumer.next() => d,
            _ = stop.changed() => continue,
            // lapin may not end the consumer when the broker closes the connection (amqp-rs/lapin#409).
            _ = tokio::time::sleep(LIVENESS_CHECK), if !shared.once => {
                if !status.connected() {
                    break Err(AmqpError::Lost("the connection closed".into()));
                }
                continue;
            }
            _ = tokio::time::sleep(ONCE_IDLE), if shared.once => {
                while in_flight.front().is_some_and(|h| h.is_finished()) {
                    let done = in_flight.pop_front().expect("non-empty");
                    done.await.map_err(|e| AmqpError::Lost(e.to_string()))??;
                }
                if !status.connected() {
                    break Err(AmqpError::Lost("the connection closed".into()));
                }
                if in_flight.is_empty() && shared.others_done().await.unwrap_or(false) && unless_lost(status, "looking at the queues", drained(&channel, plan)).await?? {
                    break Ok(());
                }
                continue;
            }
        };
        let mut deliveries = Vec::with_capacity(batch_size);
        match first {
            Some(Ok(d)) => deliveries.push(d),
            Some(Err(e)) => break Err(lost(e)),
            // The broker cancelled the consumer (queue deleted, node down): subscribe again.
            None => break Err(AmqpError::Lost("the broker cancelled the consumer".into())),
        }
        while deliveries.len() < batch_size {
            match consumer.next().now_or_never() {
                Some(Some(Ok(d))) => deliveries.push(d),
                _ => break,
            }
        }
        // Counted as in hand until settled, so that `--once` consumers downstream wait for it.
        let taken = deliveries.len() as i64;
        shared.in_flight.fetch_add(taken, Ordering::SeqCst);
        let (batch, marks) = match process_batch(run, plan, session, shared, deliveries).await {
            Ok(b) => b,
            Err(e) => {
                shared.in_flight.fetch_sub(taken, Ordering::SeqCst);
                break Err(e);
            }
        };
        // Only the keys of messages on their way out stay in hand until they are settled; one
        // that failed or is held back is not delivered now: a copy may go.
        let (keys, not_out): (Vec<_>, Vec<_>) = batch
            .iter()
            .filter_map(|i| i.key.as_ref().map(|k| (k.key.clone(), i)))
            .partition(|(_, i)| i.failed.is_none() && i.held.is_none());
        let keys: Vec<String> = keys.into_iter().map(|(k, _)| k).collect();
        run.release_keys(&not_out.into_iter().map(|(k, _)| k).collect::<Vec<_>>());
        let (versions_in_hand, versions_not_out): (Vec<_>, Vec<_>) =
            batch.iter().filter_map(|i| i.applied.clone().map(|v| (v, i))).partition(|(_, i)| i.failed.is_none() && i.held.is_none());
        let versions_in_hand: Vec<(String, String)> = versions_in_hand.into_iter().map(|(v, _)| v).collect();
        run.settle_versions(&*shared.state, Vec::new(), &versions_not_out.into_iter().map(|(v, _)| v).collect::<Vec<_>>()).await;
        // A sink holds messages back (its circuit is open): they go back to the queue, and this
        // consumer takes no more until the sink may take them (the rest wait in the broker).
        let pause =
            batch.iter().filter_map(|i| i.held).min().map(|t| t.saturating_duration_since(std::time::Instant::now()).min(MAX_HELD_PAUSE));
        let (run2, plan2, publish, shared2) = (run.clone(), plan.clone(), session.publish.clone(), shared.clone());
        // Acks go in delivery order: a `multiple` ack of this batch must not cover the one before.
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let before = previous.replace(done_rx);
        in_flight.push_back(tokio::spawn(async move {
            let r = settle(&run2, &plan2, &publish, &shared2, batch, marks, before).await;
            // Recorded, retried or to be delivered again by the broker: either way no longer in hand.
            run2.release_keys(&keys);
            run2.settle_versions(&*shared2.state, Vec::new(), &versions_in_hand).await;
            shared2.in_flight.fetch_sub(taken, Ordering::SeqCst);
            let _ = done_tx.send(r.is_ok());
            r
        }));
        while in_flight.len() >= BATCHES_IN_FLIGHT {
            let done = in_flight.pop_front().expect("non-empty");
            if let Err(e) = done.await.map_err(|e| AmqpError::Lost(e.to_string()))? {
                // Later batches are not acknowledged either (each waits for the one before): the
                // broker delivers them again.
                for h in in_flight {
                    let _ = h.await;
                }
                return Err(e);
            }
        }
        if let Some(pause) = pause {
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = stop.changed() => {}
            }
        }
    };
    // Finish what is in hand, in order.
    let mut result = outcome;
    for h in in_flight {
        match h.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                result = result.and(Err(e));
                break;
            }
            Err(e) => {
                result = result.and(Err(AmqpError::Lost(e.to_string())));
                break;
            }
        }
    }
    if result.is_ok() {
        let _ = unless_lost(
            status,
            "cancelling the consumer",
            channel.basic_cancel(crate::amqp::short_id(&tag), BasicCancelOptions::default()),
        )
        .await;
        let _ = unless_lost(status, "closing the channel", channel.close(200, "stopping".into())).await;
    }
    result
}

/// With `--once`: nothing ready in the queue nor waiting in its retry queues.
async fn drained(channel: &Channel, plan: &SourcePlan) -> Result<bool, AmqpError> {
    for q in std::iter::once(&plan.queue).chain(plan.retries.iter().map(|r| &r.queue)) {
        let declared = channel
            .queue_declare(
                crate::amqp::short_name(q, "queue name")?,
                QueueDeclareOptions { passive: true, ..Default::default() },
                FieldTable::default(),
            )
            .await
            .map_err(|e| AmqpError::Lost(lapin_message(&e)))?;
        if declared.message_count() > 0 {
            return Ok(false);
        }
    }
    Ok(true)
}

/// The attempt this delivery is: 1 plus the trips it made through the retry queues
/// (`x-death`), or the quorum queue's delivery count when that is higher.
fn attempt_of(d: &Delivery, plan: &SourcePlan) -> u32 {
    let Some(h) = d.properties.headers() else { return 1 };
    let mut retried = 0u64;
    if let Some(AMQPValue::FieldArray(deaths)) = h.inner().get("x-death") {
        for death in deaths.as_slice() {
            let AMQPValue::FieldTable(t) = death else { continue };
            let queue = match t.inner().get("queue") {
                Some(AMQPValue::LongString(s)) => s.to_string(),
                Some(AMQPValue::ShortString(s)) => s.to_string(),
                _ => continue,
            };
            if plan.retries.iter().any(|r| r.queue == queue) {
                retried = retried.saturating_add(match t.inner().get("count") {
                    Some(AMQPValue::LongLongInt(n)) => (*n).max(0) as u64,
                    Some(AMQPValue::LongInt(n)) => (*n).max(0) as u64,
                    Some(AMQPValue::LongUInt(n)) => u64::from(*n),
                    _ => 1,
                });
            }
        }
    }
    let delivered = match h.inner().get("x-delivery-count") {
        Some(AMQPValue::LongLongInt(n)) => (*n).max(0) as u64,
        Some(AMQPValue::LongInt(n)) => (*n).max(0) as u64,
        _ => 0,
    };
    // Our own count, stamped on each retry: brokers have not always kept a client's x-death.
    let stamped = match h.inner().get(headers::ATTEMPT) {
        Some(AMQPValue::LongLongInt(n)) => (*n).max(0) as u64,
        Some(AMQPValue::LongString(s)) => s.to_string().parse().unwrap_or(0),
        _ => 0,
    };
    retried.max(delivered).saturating_add(1).max(stamped).clamp(1, u64::from(u32::MAX)) as u32
}

fn text(v: &AMQPValue) -> Option<String> {
    match v {
        AMQPValue::LongString(s) => Some(s.to_string()),
        AMQPValue::ShortString(s) => Some(s.to_string()),
        AMQPValue::Boolean(b) => Some(b.to_string()),
        AMQPValue::LongLongInt(n) => Some(n.to_string()),
        AMQPValue::LongInt(n) => Some(n.to_string()),
        AMQPValue::LongUInt(n) => Some(n.to_string()),
        AMQPValue::ShortInt(n) => Some(n.to_string()),
        AMQPValue::ShortUInt(n) => Some(n.to_string()),
        AMQPValue::Timestamp(n) => Some(n.to_string()),
        _ => None,
    }
}

/// The message a pipeline processes, from a delivery: properties and headers become transport
/// headers (`amqp.routing_key`, `amqp.exchange`, `amqp.redelivered`, each header by its name);
/// the envelope an upstream Switchyard pipeline set is taken up.
fn to_raw(d: &Delivery, attempt: u32) -> RawMessage {
    let p = &d.properties;
    let h = transport_headers(d);
    // Back from a retry queue: when it first arrived. Else a Switchyard pipeline upstream
    // stamped when the message first entered (to the second).
    let received_at = h
        .get(headers::RECEIVED_AT)
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .map(|t| t.with_timezone(&chrono::Utc))
        .or_else(|| p.timestamp().filter(|_| h.contains_key(headers::PIPELINE)).and_then(|t| chrono::DateTime::from_timestamp(t as i64, 0)))
        .or_else(|| Some(chrono::Utc::now()));
    RawMessage {
        body: d.data.clone(),
        parsed: None,
        origin: Some(format!("amqp {}", d.routing_key)),
        received_at,
        message_id: p.message_id().as_ref().map(|m| m.to_string()),
        correlation_id: p.correlation_id().as_ref().map(|c| c.to_string()),
        idempotency_key: h.get(headers::IDEMPOTENCY_KEY).cloned(),
        channel: h.get(headers::CHANNEL).cloned(),
        attempt,
        decode_error: None,
        headers: h,
    }
}

/// A delivery's properties and headers as the pipeline reads them.
fn transport_headers(d: &Delivery) -> BTreeMap<String, String> {
    let p = &d.properties;
    let mut h: BTreeMap<String, String> = BTreeMap::new();
    h.insert("amqp.exchange".into(), d.exchange.to_string());
    h.insert("amqp.routing_key".into(), d.routing_key.to_string());
    h.insert("amqp.redelivered".into(), d.redelivered.to_string());
    if let Some(t) = p.content_type() {
        h.insert("amqp.content_type".into(), t.to_string());
    }
    if let Some(t) = p.message_id() {
        h.insert("amqp.message_id".into(), t.to_string());
    }
    if let Some(t) = p.correlation_id() {
        h.insert("amqp.correlation_id".into(), t.to_string());
    }
    if let Some(t) = p.app_id() {
        h.insert("amqp.app_id".into(), t.to_string());
    }
    if let Some(table) = p.headers() {
        for (k, v) in table {
            if let Some(s) = text(v) {
                h.insert(k.as_str().to_ascii_lowercase(), s);
            }
        }
    }
    // Back from a retry queue or replayed (both come through the default exchange): where it
    // first came from, as a mapping or route saw it then. Not taken from a message that came
    // through a named exchange: a producer cannot pass for another exchange that way.
    if d.exchange.as_str().is_empty() {
        for (from, to) in [(headers::FIRST_EXCHANGE, "amqp.exchange"), (headers::FIRST_ROUTING_KEY, "amqp.routing_key")] {
            if let Some(v) = h.get(from).cloned() {
                h.insert(to.into(), v);
            }
        }
    }
    h
}

/// An exception record for a shared store, with what a replay sends again: the message's
/// properties and headers, without this delivery's attempt count.
fn exception_row(record: ExceptionRecord, d: &Delivery) -> crate::store::ExceptionRow {
    let mut h = transport_headers(d);
    for k in ["amqp.redelivered", "x-delivery-count", headers::ATTEMPT, headers::RECEIVED_AT] {
        h.remove(k);
    }
    let headers = serde_json::to_string(&h).unwrap_or_else(|_| "{}".into());
    crate::store::ExceptionRow { record, headers, replayable: true }
}

/// Publishes a replay (queued in a shared store) to the pipeline's queue, with the properties
/// and headers its message arrived with and `x-switchyard-replay-of`, and waits for the
/// broker's confirm.
pub(super) async fn publish_replay(run: &PipelineRun, replay: &crate::store::QueuedReplay) -> Result<(), AmqpError> {
    let broker = run.broker.as_ref().ok_or_else(|| AmqpError::Lost("the pipeline has no broker".into()))?;
    let plan = run.pipeline.broker.as_ref().and_then(|b| b.source.as_ref()).ok_or_else(|| AmqpError::Lost("no source plan".into()))?;
    let mut saved: BTreeMap<String, String> = serde_json::from_str(&replay.headers).unwrap_or_default();
    let mut props = BasicProperties::default().with_delivery_mode(2);
    if let Some(v) = saved.remove("amqp.message_id") {
        props = props.with_message_id(crate::amqp::short_id(&v));
    }
    if let Some(v) = saved.remove("amqp.correlation_id") {
        props = props.with_correlation_id(crate::amqp::short_id(&v));
    }
    if let Some(v) = saved.remove("amqp.content_type") {
        props = props.with_content_type(crate::amqp::short_id(&v));
    }
    if let Some(v) = saved.remove("amqp.app_id") {
        props = props.with_app_id(crate::amqp::short_id(&v));
    }
    let mut table = FieldTable::default();
    for (k, to) in [("amqp.exchange", headers::FIRST_EXCHANGE), ("amqp.routing_key", headers::FIRST_ROUTING_KEY)] {
        if let Some(v) = saved.get(k) {
            table.insert(to.into(), AMQPValue::LongString(LongString::from(v.clone())));
        }
    }
    for (k, v) in saved.into_iter().filter(|(k, _)| !k.starts_with("amqp.") && k != "replay_of") {
        table.insert(k.into(), AMQPValue::LongString(LongString::from(v)));
    }
    table.insert(headers::REPLAY_OF.into(), AMQPValue::LongString(LongString::from(replay.exception_id.clone())));
    let session = broker.session().await?;
    let c = session.publish.publish("", &plan.queue, true, replay.body.clone(), props.with_headers(table))?;
    confirmed(c).await
}

/// Processes a batch: each delivery's outcome, and the file sinks' lengths once flushed.
async fn process_batch(
    run: &PipelineRun,
    plan: &SourcePlan,
    session: &Session,
    shared: &Shared,
    deliveries: Vec<Delivery>,
) -> Result<(Vec<InBatch>, Vec<(String, u64)>), AmqpError> {
    let current = run.current();
    let p: &Pipeline = &current;
    let mut batch = Vec::with_capacity(deliveries.len());
    let mut outside_used = std::collections::BTreeSet::new();
    // Every message through the pipeline first: duplicates are looked up once for the batch.
    // Err: held back by the source's rate limit until then, not processed.
    let mut processed: Vec<(Delivery, u32, Result<Outcome, std::time::Instant>)> = Vec::with_capacity(deliveries.len());
    let waits_until = std::time::Instant::now() + BATCH_RATE_WAIT;
    let rate_wait = || waits_until.saturating_duration_since(std::time::Instant::now());
    for delivery in deliveries {
        let attempt = attempt_of(&delivery, plan);
        // `runtime.rate_limit`: the consumer takes no faster than that (the broker keeps the rest).
        if let Some(limit) = &run.pipeline.source_rate
            && let Err(until) = limit.admit(rate_wait()).await
        {
            processed.push((delivery, attempt, Err(until)));
            continue;
        }
        let outcome = process_guarded(p, to_raw(&delivery, attempt), &delivery.data);
        processed.push((delivery, attempt, Ok(outcome)));
    }
    let routed: Vec<Option<&crate::message::Metadata>> = processed
        .iter()
        .map(|(_, _, o)| match o {
            Ok(Outcome::Routed { output, .. }) => Some(&output.metadata),
            _ => None,
        })
        .collect();
    // A state store that cannot be read: nothing goes out unchecked, and no attempt is spent.
    // The batch is not acknowledged; the consumer starts again after a pause and the broker
    // delivers it again.
    let state = &*shared.state;
    let verdicts = super::verdicts(run, p, state, &routed)
        .await
        .map_err(|e| AmqpError::Lost(format!("the idempotency keys cannot be checked in {}: {e}", state.describe())))?;
    let deliverable: Vec<Option<&crate::message::Metadata>> =
        routed.iter().zip(&verdicts).map(|(m, v)| if matches!(v, Verdict::Deliver(_)) { *m } else { None }).collect();
    let orders = match super::order_verdicts(run, p, state, &deliverable).await {
        Ok(o) => o,
        Err(e) => {
            run.release_keys(&super::keys_to_deliver(&verdicts));
            return Err(AmqpError::Lost(format!("the event versions cannot be checked in {}: {e}", state.describe())));
        }
    };
    for (k, (delivery, attempt, outcome)) in processed.into_iter().enumerate() {
        let mut item = InBatch {
            delivery,
            confirms: Vec::new(),
            outside: Vec::new(),
            failed: None,
            permanent: false,
            failed_sink: None,
            held: None,
            counted: Counted::Routed(vec![]),
            attempt,
            key: None,
            applied: None,
            parked: false,
            metadata: None,
            exception: None,
            tracked: p.track,
            track: Vec::new(),
        };
        let outcome = match outcome {
            Err(until) => {
                item.held = Some(until);
                batch.push(item);
                continue;
            }
            Ok(Outcome::Failed(r)) => Outcome::Failed(r),
            Ok(Outcome::Routed { output, sinks }) => match &verdicts[k] {
                Verdict::Deliver(key) => {
                    let action = super::order_action(p, &output.metadata, &orders[k]);
                    // Only a message on its way out keeps its key (recorded once delivered).
                    match (&action, key) {
                        (OrderAction::Deliver, _) => item.key = key.clone(),
                        (_, Some(key)) => run.release_keys(std::slice::from_ref(&key.key)),
                        (_, None) => {}
                    }
                    match action {
                        OrderAction::Deliver => {
                            item.applied = output.metadata.entity.as_ref().map(|e| (e.key.clone(), e.version.clone()));
                            Outcome::Routed { output, sinks }
                        }
                        OrderAction::Drop => {
                            item.counted = Counted::Stale;
                            batch.push(item);
                            continue;
                        }
                        OrderAction::Fail(f) => Outcome::Failed(Box::new(p.exception(
                            output.metadata,
                            &item.delivery.data,
                            Stage::Source,
                            Some("ordering".into()),
                            f,
                        ))),
                        OrderAction::Park => {
                            let entity = output.metadata.entity.as_ref().map(|e| e.key.as_str()).unwrap_or_default();
                            item.failed = Some(format!("waiting for an earlier event of `{entity}`"));
                            item.parked = true;
                            item.counted = Counted::Parked;
                            item.metadata = Some(output.metadata);
                            batch.push(item);
                            continue;
                        }
                    }
                }
                Verdict::Duplicate => match p.idempotency.as_ref().map(|i| i.duplicates) {
                    Some(Duplicates::Sink(i)) => {
                        item.counted = Counted::Duplicate(Some(i));
                        Outcome::Routed { output, sinks: vec![i] }
                    }
                    _ => {
                        item.counted = Counted::Duplicate(None);
                        batch.push(item);
                        continue;
                    }
                },
                Verdict::InHand => {
                    // A copy is being delivered: back to the queue, to be looked at once it is settled.
                    item.held = Some(std::time::Instant::now() + super::KEY_IN_HAND_WAIT);
                    batch.push(item);
                    continue;
                }
                Verdict::NoKey => Outcome::Failed(Box::new(p.exception(
                    output.metadata,
                    &item.delivery.data,
                    Stage::Source,
                    Some("idempotency".into()),
                    super::no_key_failure(),
                ))),
            },
        };
        match outcome {
            Outcome::Failed(record) => {
                tracing::info!(pipeline = %p.name, correlation_id = %record.correlation_id, reason = %record.reason, stage = record.stage.as_str(), "message sent to exceptions");
                match to_exceptions(&*shared.state, &session.publish, plan, &mut item, *record).await {
                    Ok(Some(c)) => item.confirms.push((None, c)),
                    Ok(None) => {}
                    Err(e) => item.failed = Some(e.to_string()),
                }
            }
            Outcome::Routed { output, sinks } => {
                if !matches!(item.counted, Counted::Duplicate(_)) {
                    item.counted = Counted::Routed(sinks.clone());
                }
                // Held before any sink is written, so that a hold never writes a sink twice (the
                // sinks replies go on to included).
                let replies_to = sinks.iter().filter_map(|&i| p.reply_to.get(i).copied().flatten());
                item.held = sinks.iter().copied().chain(replies_to).filter_map(|i| run.delivery(i).would_hold()).max();
                let mut deliveries = super::Deliveries::new(&sinks, item.held.is_some());
                while let Some((i, reply)) = deliveries.next() {
                    let output = reply.as_ref().unwrap_or(&output);
                    let RuntimeSink::External(sink) = &run.sinks[i] else {
                        item.failed =
                            Some(format!("sink `{}`: an embedded queue cannot be written from a RabbitMQ pipeline", p.sink_name(i)));
                        break;
                    };
                    // A rate limit is waited out here (the broker keeps the rest); an open
                    // circuit gives the message back to the queue.
                    if let Err(until) = run.admit(i, rate_wait(), shared).await {
                        item.held = Some(until);
                        break;
                    }
                    let written = match sink.as_amqp() {
                        Some(a) => match a.send(output).await {
                            Ok(c) => {
                                item.confirms.push((Some(i), c));
                                Ok(())
                            }
                            Err(e) => Err(run.publish_failed(i, e.to_string(), shared)),
                        },
                        None => run.judge(i, sink.write_with_reply(output).await, shared).map(|reply| {
                            item.outside.push(i);
                            if p.track {
                                item.track.push(super::worker::milestone(p, i, output, reply.as_ref()));
                            }
                            if let (Some(r), Some(to)) = (reply, p.reply_to.get(i).copied().flatten()) {
                                if let Counted::Routed(counted) = &mut item.counted {
                                    counted.push(to);
                                }
                                deliveries.reply(to, r);
                            }
                        }),
                    };
                    if let Err(f) = written {
                        item.failed = Some(f.message);
                        item.permanent = f.permanent;
                        item.failed_sink = Some(i);
                        break;
                    }
                }
                outside_used.extend(item.outside.iter().copied());
                item.metadata = Some(output.metadata);
            }
        }
        batch.push(item);
    }
    // Outside sinks hold what they were given before anything is acknowledged.
    let mut marks = Vec::new();
    for i in outside_used {
        if let RuntimeSink::External(sink) = &run.sinks[i] {
            match sink.flush().await {
                Ok(()) => marks.extend(sink.mark()),
                Err(e) => {
                    for item in batch.iter_mut().filter(|b| b.outside.contains(&i)) {
                        item.failed.get_or_insert_with(|| format!("sink `{}`: {e}", p.sink_name(i)));
                    }
                }
            }
        }
    }
    Ok((batch, marks))
}

/// Waits for the batch's confirms; sends what failed to a retry queue or, after the last
/// retry, to the dead-letter queue; then acknowledges the batch.
async fn settle(
    run: &PipelineRun,
    plan: &SourcePlan,
    publisher: &Publisher,
    shared: &Shared,
    mut batch: Vec<InBatch>,
    marks: Vec<(String, u64)>,
    before: Option<tokio::sync::oneshot::Receiver<bool>>,
) -> Result<(), AmqpError> {
    let (store, state) = (&shared.store, &*shared.state);
    if batch.is_empty() {
        return Ok(());
    }
    for item in &mut batch {
        for (sink, c) in std::mem::take(&mut item.confirms) {
            let result = match confirmed(c).await {
                Err(e) if e.is_connection() => return Err(e),
                other => other.map_err(|e| e.to_string()),
            };
            let result = match sink {
                Some(i) => run.judge_publish(i, result, shared).map_err(|f| f.message),
                None => result,
            };
            if let Err(why) = result
                && item.failed.is_none()
            {
                item.failed = Some(why);
                item.failed_sink = sink;
            }
        }
    }
    let p = run.current();
    let mut second = Vec::new();
    for item in batch.iter_mut().filter(|i| i.held.is_none()) {
        let Some(why) = item.failed.clone() else { continue };
        // The retry queues' delays apply; a sink's policy may allow fewer attempts, and a
        // refusal for good gets none.
        let allowed = item.failed_sink.map_or(u32::MAX, |i| run.delivery(i).retry.max_attempts);
        // An event waiting for its predecessor goes round the first (shortest) tier until
        // `wait_for_previous` has passed since it arrived: then it is a `missing_predecessor`
        // exception (see `order_action`).
        let retry = if item.parked {
            plan.retries.first()
        } else {
            plan.retries.get((item.attempt as usize).saturating_sub(1)).filter(|_| !item.permanent && item.attempt < allowed)
        };
        let confirm = match retry {
            Some(tier) => {
                if item.parked {
                    tracing::debug!(pipeline = %p.name, attempt = item.attempt, retry_in = ?tier.delay, why = %why, "an event waits for its predecessor");
                } else {
                    tracing::warn!(pipeline = %p.name, attempt = item.attempt, retry_in = ?tier.delay, error = %why, "a sink failed; the message will be retried");
                    // Counted when it comes back, whatever it was to be (an exception whose trip
                    // to the dead-letter queue was refused).
                    item.counted = Counted::Retried;
                }
                let mut h = item.delivery.properties.headers().clone().unwrap_or_default();
                h.insert(headers::ATTEMPT.into(), AMQPValue::LongLongInt(i64::from(item.attempt) + 1));
                // Where it first came from, kept across its trips (back through the default
                // exchange): routes and a later replay read that, not the retry queue.
                for (key, v) in
                    [(headers::FIRST_EXCHANGE, &item.delivery.exchange), (headers::FIRST_ROUTING_KEY, &item.delivery.routing_key)]
                {
                    if !h.contains_key(key) {
                        h.insert(key.into(), AMQPValue::LongString(v.as_str().into()));
                    }
                }
                // When it first arrived, kept across its trips (waits and exception records use it).
                if !h.contains_key(headers::RECEIVED_AT) {
                    let at = item.metadata.as_ref().map_or_else(chrono::Utc::now, |m| m.received_at);
                    h.insert(headers::RECEIVED_AT.into(), AMQPValue::LongString(crate::message::rfc3339::format(&at).into()));
                }
                let props = item.delivery.properties.clone().with_headers(h);
                publisher.publish("", &tier.queue, true, item.delivery.data.clone(), props)?
            }
            None => {
                let why_code = if item.parked {
                    reason::MISSING_PREDECESSOR
                } else if item.permanent {
                    reason::SINK_REJECTED
                } else {
                    reason::SINK_FAILED
                };
                let failure = Failure::one(why_code, ErrorDetail::record("", why));
                let stage = if item.parked { Stage::Source } else { Stage::Sink };
                let record = match item.metadata.take() {
                    Some(mut m) => {
                        m.attempt = item.attempt;
                        p.exception(m, &item.delivery.data, stage, None, failure)
                    }
                    None => p.failure_record(&to_raw(&item.delivery, item.attempt), stage, failure),
                };
                match to_exceptions(state, publisher, plan, item, record).await? {
                    Some(c) => c,
                    None => continue,
                }
            }
        };
        second.push((retry.is_some() && !item.parked, confirm));
    }
    let mut retried = 0;
    for (is_retry, c) in second {
        confirmed(c).await?;
        retried += u64::from(is_retry);
    }
    if let Some(before) = before
        && before.await != Ok(true)
    {
        return Err(AmqpError::Lost("an earlier batch was not acknowledged".into()));
    }
    // A file written for these messages keeps what they added across a crash: its length is
    // committed before the broker forgets them (else the restart would cut acknowledged output).
    // The keys of the delivered messages are recorded in the same commit, before the ack: a
    // crash in between delivers them again, and the redelivery is then a duplicate.
    // Not those held back: they go back to the queue undelivered.
    let mut keys: Vec<crate::store::KeyRecord> =
        batch.iter().filter(|i| i.failed.is_none() && i.held.is_none()).filter_map(|i| i.key.clone()).collect();
    // Exception records in a shared store: written before the ack. If that fails, the batch is
    // not acknowledged: the broker delivers it again (and the store keeps one open record per
    // message).
    let rows: Vec<crate::store::ExceptionRow> = batch.iter_mut().filter_map(|i| i.exception.take()).collect();
    if !rows.is_empty() {
        state
            .record_exceptions(rows)
            .await
            .map_err(|e| AmqpError::Lost(format!("the exception records cannot be written to {}: {e}", state.describe())))?;
    }
    // Keys shared in PostgreSQL: recorded there before the ack. If that fails, the batch is not
    // acknowledged: the broker delivers it again (its outputs go out again, with the same keys).
    if state.embedded().is_none() && !keys.is_empty() {
        let there = state
            .record_keys(std::mem::take(&mut keys))
            .await
            .map_err(|e| AmqpError::Lost(format!("the idempotency keys cannot be recorded in {}: {e}", state.describe())))?;
        if !there.is_empty() {
            tracing::warn!(pipeline = %p.name, messages = there.len(), "another engine delivered the same keys at the same time: receivers got them twice (they carry the same idempotency key)");
        }
    }
    // Versions of the events delivered (ordering): recorded before the ack, like the keys.
    let applied: Vec<(String, String)> =
        batch.iter().filter(|i| i.failed.is_none() && i.held.is_none()).filter_map(|i| i.applied.clone()).collect();
    if let Some(o) = &p.ordering
        && !applied.is_empty()
    {
        state
            .record_versions(o.scope.clone(), applied)
            .await
            .map_err(|e| AmqpError::Lost(format!("the event versions cannot be recorded in {}: {e}", state.describe())))?;
    }
    // Status events (`track: true`): failures, and milestones of what is delivered (or
    // `delivered` with its sinks); nothing yet for what is retried or held back.
    let mut tracking = Vec::new();
    for item in batch.iter_mut().filter(|i| i.tracked && i.held.is_none()) {
        let delivered = item.failed.is_none() && !matches!(item.counted, Counted::Exception(_));
        if matches!(item.counted, Counted::Exception(_)) {
            tracking.append(&mut item.track);
        } else if delivered {
            let has_milestone = item.track.iter().any(|e| e.event != "failed");
            if has_milestone {
                tracking.extend(item.track.drain(..).filter(|e| e.event != "failed"));
            } else if let (Counted::Routed(sinks), Some(m)) = (&item.counted, &item.metadata) {
                tracking.push(super::worker::delivered_event(&p, &m.correlation_id, sinks));
            }
        }
    }
    // With a shared store, the status events go there (before the ack; a failure is only said).
    if state.embedded().is_none() && !tracking.is_empty() {
        let events = std::mem::take(&mut tracking);
        match tokio::time::timeout(std::time::Duration::from_secs(5), state.record_tracking(events)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(pipeline = %p.name, error = %e, "the status events could not be recorded"),
            Err(_) => tracing::warn!(pipeline = %p.name, "the status events could not be recorded within 5 s"),
        }
    }
    if !marks.is_empty() || !keys.is_empty() || !tracking.is_empty() {
        let twice = store
            .submit(move |c| {
                crate::store::record_tracking(c, &tracking)?;
                crate::store::record_marks(c, &marks)?;
                let mut twice = 0;
                for k in &keys {
                    twice += usize::from(!crate::store::record_key(c, k)?);
                }
                Ok(twice)
            })
            .await
            .map_err(|e| AmqpError::Lost(format!("cannot record the file sinks' lengths and the idempotency keys: {e}")))?;
        if twice > 0 {
            tracing::warn!(pipeline = %p.name, messages = twice, "another consumer delivered the same keys at the same time: receivers got them twice (they carry the same idempotency key)");
        }
    }
    // Held back: back to the queue, ahead of the ack that covers the rest of the batch.
    let lost = |e: lapin::Error| AmqpError::Lost(lapin_message(&e));
    for item in batch.iter().filter(|i| i.held.is_some()) {
        let nack = item.delivery.acker.nack(BasicNackOptions { multiple: false, requeue: true });
        if !unless_lost(publisher.connection(), "giving a message back", nack).await?.map_err(lost)? {
            return Err(AmqpError::Lost("the channel closed before a held-back message was given back".into()));
        }
    }
    // `false`: the channel is gone, the broker delivers the batch again.
    if let Some(last) = batch.iter().rev().find(|i| i.held.is_none())
        && !unless_lost(publisher.connection(), "acknowledging", last.delivery.acker.ack(BasicAckOptions { multiple: true }))
            .await?
            .map_err(lost)?
    {
        return Err(AmqpError::Lost("the channel closed before the batch was acknowledged".into()));
    }
    // Delivered again after an earlier delivery of it may have left an exception record.
    if state.embedded().is_none() {
        let again: Vec<String> = batch
            .iter()
            .filter(|i| i.failed.is_none() && i.held.is_none() && !matches!(i.counted, Counted::Exception(_)))
            .filter(|i| i.delivery.redelivered || i.attempt > 1)
            .filter_map(|i| i.metadata.as_ref().map(|m| m.message_id.clone()))
            .collect();
        run.supersede(shared, again).await;
    }
    run.stats.retried.fetch_add(retried, Ordering::Relaxed);
    for item in batch {
        if item.held.is_some() {
            run.stats.count(Counted::Held);
            continue;
        }
        // One sent to a retry queue is counted when it comes back (a parked one as parked now).
        if item.failed.is_none() || matches!(item.counted, Counted::Exception(_) | Counted::Parked) {
            run.stats.count(item.counted);
        }
    }
    Ok(())
}

/// Sends a failed delivery to the exception store, counted as an exception: with a shared store
/// its record is kept in the item, to be written there before the ack; else the message goes to
/// the dead-letter queue, whose confirm is returned.
async fn to_exceptions(
    state: &dyn crate::store::StateStore,
    publisher: &Publisher,
    plan: &SourcePlan,
    item: &mut InBatch,
    record: ExceptionRecord,
) -> Result<Option<Confirm>, AmqpError> {
    item.counted = Counted::Exception(record.reason.clone());
    if item.tracked {
        // A second try at the dead-letter queue replaces the first's event.
        item.track.retain(|e| e.event != "failed");
        item.track.push(super::worker::failed_event(&record));
    }
    if state.embedded().is_none() {
        item.exception = Some(exception_row(record, &item.delivery));
        return Ok(None);
    }
    dead_letter(publisher, plan, &item.delivery, &record).map(Some)
}

/// Publishes the original message to the dead-letter queue, with why it failed in its headers.
fn dead_letter(publisher: &Publisher, plan: &SourcePlan, d: &Delivery, record: &ExceptionRecord) -> Result<Confirm, AmqpError> {
    let mut table = d.properties.headers().clone().unwrap_or_default();
    let mut put = |k: &str, v: String| {
        table.insert(k.into(), AMQPValue::LongString(LongString::from(v)));
    };
    put(headers::REASON, record.reason.clone());
    put(headers::STAGE, record.stage.as_str().to_string());
    put(headers::ATTEMPT, record.attempt.to_string());
    put(headers::PIPELINE, record.pipeline.clone());
    put(headers::PIPELINE_VERSION, record.pipeline_version.clone());
    put(headers::EXCEPTION_ID, record.exception_id.clone());
    put(headers::FAILED_AT, crate::message::rfc3339::format(&record.failed_at));
    put(headers::ERRORS, serde_json::to_string(&record.errors).unwrap_or_default());
    if let Some(hint) = &record.hint {
        put(headers::HINT, hint.clone());
    }
    let props: BasicProperties = d
        .properties
        .clone()
        .with_headers(table)
        .with_delivery_mode(2)
        .with_message_id(crate::amqp::short_id(&record.message_id))
        .with_correlation_id(crate::amqp::short_id(&record.correlation_id));
    publisher.publish("", &plan.dead_letter_queue, true, d.data.clone(), props)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::amqp::topology::RetryTier;
    use lapin::types::{FieldArray, ShortString};

    fn plan() -> SourcePlan {
        SourcePlan {
            queue: "orders".into(),
            prefetch: 10,
            retries: ["1s", "10s"]
                .iter()
                .map(|d| RetryTier { queue: format!("orders.retry.{d}"), delay: humantime::parse_duration(d).unwrap() })
                .collect(),
            dead_letter_queue: "orders.dlq".into(),
        }
    }

    fn death(queue: &str, count: i64) -> AMQPValue {
        let mut t = FieldTable::default();
        t.insert("queue".into(), AMQPValue::LongString(queue.into()));
        t.insert("reason".into(), AMQPValue::LongString("expired".into()));
        t.insert("count".into(), AMQPValue::LongLongInt(count));
        AMQPValue::FieldTable(t)
    }

    fn delivery(headers: FieldTable) -> Delivery {
        let mut d = Delivery::mock(1, ShortString::from(""), ShortString::from("orders"), false, b"{}".to_vec());
        d.properties = BasicProperties::default().with_headers(headers).with_message_id("m-1".into());
        d
    }

    #[test]
    fn the_attempt_counts_trips_through_our_retry_queues_only() {
        assert_eq!(attempt_of(&delivery(FieldTable::default()), &plan()), 1);
        let mut h = FieldTable::default();
        h.insert(
            "x-death".into(),
            AMQPValue::FieldArray(FieldArray::from(vec![death("orders.retry.1s", 1), death("orders.retry.10s", 1), death("elsewhere", 5)])),
        );
        assert_eq!(attempt_of(&delivery(h), &plan()), 3, "two retries, the foreign dead-lettering does not count");
        let mut quorum = FieldTable::default();
        quorum.insert("x-delivery-count".into(), AMQPValue::LongLongInt(4));
        assert_eq!(attempt_of(&delivery(quorum), &plan()), 5, "a quorum queue's redeliveries count too");
    }

    #[test]
    fn properties_and_headers_become_transport_headers_and_the_envelope() {
        let mut h = FieldTable::default();
        h.insert(headers::IDEMPOTENCY_KEY.into(), AMQPValue::LongString("shopify:1".into()));
        h.insert(headers::CHANNEL.into(), AMQPValue::LongString("shopify".into()));
        h.insert("X-Tenant".into(), AMQPValue::LongString("acme".into()));
        let raw = to_raw(&delivery(h), 2);
        assert_eq!(raw.message_id.as_deref(), Some("m-1"));
        assert_eq!(raw.idempotency_key.as_deref(), Some("shopify:1"));
        assert_eq!(raw.channel.as_deref(), Some("shopify"));
        assert_eq!(raw.headers.get("x-tenant").map(String::as_str), Some("acme"), "names are lowercase");
        assert_eq!(raw.headers.get("amqp.routing_key").map(String::as_str), Some("orders"));
        assert_eq!(raw.attempt, 2);
    }
}
