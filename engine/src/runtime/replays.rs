//! Replays queued in a shared store: `switchyard exceptions replay --store postgres://...` can
//! run on any machine, so the message waits in PostgreSQL until an engine that runs its pipeline
//! takes it into that pipeline's queue (its embedded replay queue, or its RabbitMQ queue).
//! Taken first, forgotten once it is in the queue: a crash in between replays it twice, never
//! not at all.

use super::{RunError, Shared};
use crate::registry::SourceConfig;
use crate::store::{self, NewMessage, QueuedReplay};
use std::sync::Arc;
use std::time::Duration;

/// Replays taken at a time.
const AT_A_TIME: usize = 500;
/// How often the shared store is asked for replays.
const EVERY: Duration = Duration::from_secs(1);

/// Takes up replays until the run stops; with `once`, the ones queued now only.
pub(super) async fn take_up(shared: Arc<Shared>, once: bool) -> Result<(), RunError> {
    let mut shutdown = shared.shutdown.clone();
    loop {
        loop {
            match move_replays(&shared).await {
                Ok(n) if n == AT_A_TIME && !*shutdown.borrow() => continue,
                Ok(_) => break,
                // PostgreSQL or RabbitMQ away: the replays wait where they are.
                Err(e) => {
                    tracing::warn!(error = %e, "replays queued in the shared store cannot be taken now; trying again");
                    break;
                }
            }
        }
        if once {
            return Ok(());
        }
        tokio::select! {
            _ = tokio::time::sleep(EVERY) => {}
            _ = shutdown.changed() => return Ok(()),
        }
    }
}

/// Moves one lot of replays into the pipelines' queues; how many it took.
async fn move_replays(shared: &Shared) -> Result<usize, String> {
    let pipelines: Vec<String> = shared.runs.iter().map(|r| r.pipeline.name.clone()).collect();
    let taken = shared.state.take_replays(pipelines, AT_A_TIME).await.map_err(|e| e.to_string())?;
    if taken.is_empty() {
        return Ok(0);
    }
    let mut handed = Vec::new();
    let mut local: Vec<(store::StreamId, NewMessage)> = Vec::new();
    let mut local_ids = Vec::new();
    let mut woken = Vec::new();
    for r in &taken {
        let Some(run) = shared.runs.iter().find(|x| x.pipeline.name == r.pipeline) else { continue };
        if matches!(run.pipeline.source, SourceConfig::Amqp(_)) {
            // One by one: a broker away leaves the rest for the next look (those published
            // before it are handed on, not published again).
            if let Err(e) = super::amqp_worker::publish_replay(run, r).await {
                let _ = shared.state.replays_handed(handed).await;
                return Err(format!("pipeline `{}`: {e}", r.pipeline));
            }
            handed.push(r.id);
        } else {
            local.push((run.replay_stream, stored(r)));
            local_ids.push(r.id);
            woken.push(run.input_queue.clone());
        }
    }
    if !local.is_empty() {
        shared
            .store
            .submit(move |c| {
                for (stream, m) in &local {
                    store::insert_one(c, *stream, m)?;
                }
                Ok(())
            })
            .await
            .map_err(|e| e.to_string())?;
        handed.extend(local_ids);
        // Workers wait on their input queue; replays lead their next batch.
        for q in &woken {
            shared.store.wake(q);
        }
    }
    let n = taken.len();
    shared.state.replays_handed(handed).await.map_err(|e| e.to_string())?;
    tracing::info!(messages = n, "replays taken from the shared store");
    Ok(n)
}

fn stored(r: &QueuedReplay) -> NewMessage {
    NewMessage { message_id: r.message_id.clone(), headers: r.headers.clone(), body: r.body.clone() }
}
