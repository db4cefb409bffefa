//! What a running engine says about its sinks, for `switchyard status`: circuit breaker state,
//! failures in a row, a pause the receiver asked for, the last failure. Written on each change,
//! per engine (owner); rows of engines that are gone are dropped when their leases are freed.

use super::{StoreResult, now_micros};
use rusqlite::{Connection, params};
use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SinkStatus {
    pub pipeline: String,
    pub sink: String,
    /// `closed`, `open`, `half-open`.
    pub breaker: String,
    /// Until when an open breaker holds work back (µs since the epoch).
    pub open_until: Option<i64>,
    pub failures: i64,
    /// The rate limit, as configured (`10/s (burst 10)`), if any.
    pub rate_limit: Option<String>,
    /// Until when the receiver asked for a pause (`Retry-After`), µs since the epoch.
    pub paused_until: Option<i64>,
    /// The last failure, as logged (never a secret: sinks never put header values in errors).
    pub last_failure: Option<String>,
    pub updated_at: i64,
    #[serde(skip)]
    pub owner: i64,
}

pub fn record_sink_status(conn: &Connection, s: &SinkStatus) -> StoreResult<()> {
    conn.prepare_cached(
        "INSERT INTO sink_status (pipeline, sink, owner, breaker, open_until, failures, rate_limit, paused_until, last_failure, updated_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
         ON CONFLICT (pipeline, sink, owner) DO UPDATE SET breaker = excluded.breaker, open_until = excluded.open_until,
            failures = excluded.failures, rate_limit = excluded.rate_limit, paused_until = excluded.paused_until,
            last_failure = coalesce(excluded.last_failure, sink_status.last_failure), updated_at = excluded.updated_at",
    )?
    .execute(params![
        s.pipeline,
        s.sink,
        s.owner,
        s.breaker,
        s.open_until,
        s.failures,
        s.rate_limit,
        s.paused_until,
        s.last_failure,
        now_micros()
    ])?;
    Ok(())
}

/// Every sink's status, by pipeline and sink, for the engines in `owners`.
pub fn sink_statuses(conn: &Connection, owners: &[i64]) -> StoreResult<Vec<SinkStatus>> {
    let mut q = conn.prepare(
        "SELECT pipeline, sink, owner, breaker, open_until, failures, rate_limit, paused_until, last_failure, updated_at
         FROM sink_status ORDER BY pipeline, sink, owner",
    )?;
    let rows = q.query_map([], |r| {
        Ok(SinkStatus {
            pipeline: r.get(0)?,
            sink: r.get(1)?,
            owner: r.get(2)?,
            breaker: r.get(3)?,
            open_until: r.get(4)?,
            failures: r.get(5)?,
            rate_limit: r.get(6)?,
            paused_until: r.get(7)?,
            last_failure: r.get(8)?,
            updated_at: r.get(9)?,
        })
    })?;
    Ok(rows.collect::<Result<Vec<_>, _>>()?.into_iter().filter(|s| owners.contains(&s.owner)).collect())
}

/// Drops the rows of an engine that is gone.
pub fn forget_owner_status(conn: &Connection, owner: i64) -> StoreResult<()> {
    conn.prepare_cached("DELETE FROM sink_status WHERE owner = ?1")?.execute([owner])?;
    Ok(())
}
