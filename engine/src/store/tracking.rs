//! Where each message of a tracked pipeline (`track: true`) is, by correlation id: received at
//! the HTTP edge, delivered by a pipeline (with the milestone its sink names, e.g.
//! `posted_to_erp`, and what the receiver answered), or failed with its reason. Events are written
//! in the commits that store or settle their messages; `GET /status/...` reads them.

use super::{StoreResult, now_micros};
use rusqlite::{Connection, params};

/// How long events are kept.
pub const TRACKING_RETENTION: std::time::Duration = std::time::Duration::from_secs(30 * 24 * 3600);

#[derive(Debug, Clone, PartialEq)]
pub struct TrackEvent {
    pub correlation_id: String,
    /// Microseconds since the epoch.
    pub at: i64,
    pub pipeline: String,
    /// `received`, `delivered`, `failed`, or a sink's milestone.
    pub event: String,
    /// A JSON object: what else is known (sinks, reason and message, the receiver's answer).
    pub detail: serde_json::Value,
}

impl TrackEvent {
    pub fn now(correlation_id: &str, pipeline: &str, event: &str, detail: serde_json::Value) -> TrackEvent {
        TrackEvent {
            correlation_id: correlation_id.to_string(),
            at: now_micros(),
            pipeline: pipeline.to_string(),
            event: event.to_string(),
            detail,
        }
    }
}

pub fn record_tracking(conn: &Connection, events: &[TrackEvent]) -> StoreResult<()> {
    // Called in every settle commit: nothing prepared when there is nothing to write.
    if events.is_empty() {
        return Ok(());
    }
    let mut insert =
        conn.prepare_cached("INSERT INTO tracking (correlation_id, at, pipeline, event, detail) VALUES (?1, ?2, ?3, ?4, ?5)")?;
    for e in events {
        insert.execute(params![e.correlation_id, e.at, e.pipeline, e.event, e.detail.to_string()])?;
    }
    Ok(())
}

/// The events of one correlation id, oldest first.
pub fn tracking_of(conn: &Connection, correlation_id: &str) -> StoreResult<Vec<TrackEvent>> {
    let rows = conn
        .prepare_cached("SELECT at, pipeline, event, detail FROM tracking WHERE correlation_id = ?1 ORDER BY at, rowid")?
        .query_map([correlation_id], |r| {
            let detail: String = r.get(3)?;
            Ok(TrackEvent {
                correlation_id: correlation_id.to_string(),
                at: r.get(0)?,
                pipeline: r.get(1)?,
                event: r.get(2)?,
                detail: serde_json::from_str(&detail).unwrap_or_default(),
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

/// Forgets events older than the retention; returns how many.
pub fn purge_tracking(conn: &Connection) -> StoreResult<usize> {
    let before = now_micros() - TRACKING_RETENTION.as_micros() as i64;
    Ok(conn.prepare_cached("DELETE FROM tracking WHERE at < ?1")?.execute([before])?)
}
