//! What operators ask of the store: queue depths, exception records, replay and discard.

use super::queue::{NewMessage, REPLAY_QUEUE, ensure_stream, insert_one};
use super::{StoreError, StoreResult, now_micros};
use crate::message::ExceptionRecord;
use rusqlite::{Connection, OptionalExtension, params};

/// One stream of a queue as `switchyard queues` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct QueueStats {
    pub queue: String,
    /// The pipeline that consumes this stream; empty for messages waiting for a first subscriber.
    pub consumer: String,
    /// Visible now.
    pub ready: i64,
    /// Leased by a running engine.
    pub in_flight: i64,
    /// Waiting for a retry time.
    pub delayed: i64,
    /// Age of the oldest message, in microseconds.
    pub oldest_age_micros: Option<i64>,
}

pub fn queue_stats(conn: &Connection) -> StoreResult<Vec<QueueStats>> {
    let now = now_micros();
    let rows = conn
        .prepare(
            "SELECT s.queue, s.consumer,
                    coalesce(sum(m.visible_at <= ?1), 0),
                    coalesce(sum(m.visible_at > ?1 AND m.owner IS NOT NULL), 0),
                    coalesce(sum(m.visible_at > ?1 AND m.owner IS NULL), 0),
                    min(m.enqueued_at)
             FROM streams s LEFT JOIN messages m ON m.stream = s.id
             GROUP BY s.id ORDER BY s.queue, s.consumer",
        )?
        .query_map([now], |r| {
            Ok(QueueStats {
                queue: r.get(0)?,
                consumer: r.get(1)?,
                ready: r.get(2)?,
                in_flight: r.get(3)?,
                delayed: r.get(4)?,
                oldest_age_micros: r.get::<_, Option<i64>>(5)?.map(|t| (now - t).max(0)),
            })
        })?
        .collect::<Result<_, _>>()?;
    Ok(rows)
}

/// Which exception records a command applies to.
#[derive(Debug, Clone, Default)]
pub struct ExceptionFilter {
    pub id: Option<String>,
    pub pipeline: Option<String>,
    pub reason: Option<String>,
    /// Failed at or after (µs since the epoch).
    pub since: Option<i64>,
    /// `open`, `replayed`, `discarded`, `superseded`; any when `None`.
    pub status: Option<String>,
    pub limit: Option<usize>,
}

/// A value a filter compares with.
#[derive(Debug, Clone)]
pub(super) enum FilterArg {
    Text(String),
    Int(i64),
}

impl ExceptionFilter {
    /// `FROM <table> WHERE ... ORDER BY ... LIMIT ...` with numbered placeholders written by
    /// `placeholder` (SQLite `?1`, PostgreSQL `$1`), and their values.
    pub(super) fn clauses(&self, table: &str, placeholder: &str) -> (String, Vec<FilterArg>) {
        let mut clauses = Vec::new();
        let mut args: Vec<FilterArg> = Vec::new();
        let mut add = |clause: &str, v: FilterArg| {
            args.push(v);
            clauses.push(clause.replace('?', &format!("{placeholder}{}", args.len())));
        };
        if let Some(v) = &self.id {
            add("id = ?", FilterArg::Text(v.clone()));
        }
        if let Some(v) = &self.pipeline {
            add("pipeline = ?", FilterArg::Text(v.clone()));
        }
        if let Some(v) = &self.reason {
            add("reason = ?", FilterArg::Text(v.clone()));
        }
        if let Some(v) = self.since {
            add("failed_at >= ?", FilterArg::Int(v));
        }
        if let Some(v) = &self.status {
            add("status = ?", FilterArg::Text(v.clone()));
        }
        let mut sql = format!(" FROM {table}");
        if !clauses.is_empty() {
            sql.push_str(" WHERE ");
            sql.push_str(&clauses.join(" AND "));
        }
        sql.push_str(" ORDER BY failed_at, id");
        if let Some(n) = self.limit {
            sql.push_str(&format!(" LIMIT {n}"));
        }
        (sql, args)
    }

    fn sql(&self) -> (String, Vec<rusqlite::types::Value>) {
        use rusqlite::types::Value;
        let (sql, args) = self.clauses("exceptions", "?");
        let args = args
            .into_iter()
            .map(|a| match a {
                FilterArg::Text(s) => Value::Text(s),
                FilterArg::Int(n) => Value::Integer(n),
            })
            .collect();
        (sql, args)
    }
}

/// An exception record as stored, with its status.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StoredException {
    pub status: String,
    /// When the status last changed (µs), for replayed and discarded records.
    pub status_at: Option<i64>,
    pub replayable: bool,
    #[serde(flatten)]
    pub record: ExceptionRecord,
    #[serde(skip)]
    pub headers: String,
}

pub fn exceptions(conn: &Connection, filter: &ExceptionFilter) -> StoreResult<Vec<StoredException>> {
    let (sql, args) = filter.sql();
    let rows: Vec<(String, Option<i64>, bool, String, String)> = conn
        .prepare(&format!("SELECT status, status_at, replayable, headers, record{sql}"))?
        .query_map(rusqlite::params_from_iter(args), |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)))?
        .collect::<Result<_, _>>()?;
    rows.into_iter()
        .map(|(status, status_at, replayable, headers, record)| stored(status, status_at, replayable, headers, &record))
        .collect()
}

/// A stored record from its columns.
pub(super) fn stored(
    status: String,
    status_at: Option<i64>,
    replayable: bool,
    headers: String,
    record: &str,
) -> StoreResult<StoredException> {
    let record: ExceptionRecord =
        serde_json::from_str(record).map_err(|e| StoreError::Sql(format!("an exception record cannot be read: {e}")))?;
    Ok(StoredException { status, status_at, replayable, record, headers })
}

/// The headers a replayed message is sent with: those it arrived with, and which record it replays.
pub(super) fn replay_headers(e: &StoredException) -> String {
    let mut headers: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&e.headers).unwrap_or_default();
    headers.insert("replay_of".into(), e.record.exception_id.clone().into());
    serde_json::Value::Object(headers).to_string()
}

/// Why a record is not replayed, if it is not.
pub(super) fn not_replayable(e: &StoredException) -> Option<String> {
    if e.status != "open" {
        Some(format!("not replayed: it is already {}", e.status))
    } else if !e.replayable {
        Some("not replayed: there is no message to replay (the input could not be read); fix the source and send it again".into())
    } else {
        None
    }
}

/// What replay or discard did with one record.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Disposition {
    pub exception_id: String,
    pub pipeline: String,
    /// `replayed`, `discarded`, or why nothing was done.
    pub result: String,
    pub done: bool,
}

/// Sends the original payload of each open, matching record back through its pipeline (the
/// version that is running when it is processed) and marks the record `replayed`. A record that
/// is not open is left alone, so replaying twice gives one output.
pub fn replay(conn: &Connection, filter: &ExceptionFilter) -> StoreResult<Vec<Disposition>> {
    let now = now_micros();
    let mut out = Vec::new();
    for e in exceptions(conn, filter)? {
        let r = &e.record;
        let mut d = Disposition { exception_id: r.exception_id.clone(), pipeline: r.pipeline.clone(), result: String::new(), done: false };
        if let Some(why) = not_replayable(&e) {
            d.result = why;
        } else {
            let stream = ensure_stream(conn, REPLAY_QUEUE, &r.pipeline)?;
            let m = NewMessage { message_id: r.message_id.clone(), headers: replay_headers(&e), body: r.original.to_bytes() };
            insert_one(conn, stream, &m)?;
            let changed = conn.execute(
                "UPDATE exceptions SET status = 'replayed', status_at = ?1 WHERE id = ?2 AND status = 'open'",
                params![now, r.exception_id],
            )?;
            if changed != 1 {
                return Err(StoreError::Refused(format!("exception {} changed while it was being replayed; try again", r.exception_id)));
            }
            d.result = "replayed".into();
            d.done = true;
        }
        out.push(d);
    }
    Ok(out)
}

/// Marks matching open records `discarded`: looked at, nothing to do.
pub fn discard(conn: &Connection, filter: &ExceptionFilter) -> StoreResult<Vec<Disposition>> {
    let now = now_micros();
    let mut out = Vec::new();
    for e in exceptions(conn, filter)? {
        let r = &e.record;
        let done = e.status == "open"
            && conn.execute(
                "UPDATE exceptions SET status = 'discarded', status_at = ?1 WHERE id = ?2 AND status = 'open'",
                params![now, r.exception_id],
            )? == 1;
        out.push(discarded(&e, done));
    }
    Ok(out)
}

/// What discarding a record did.
pub(super) fn discarded(e: &StoredException, done: bool) -> Disposition {
    Disposition {
        exception_id: e.record.exception_id.clone(),
        pipeline: e.record.pipeline.clone(),
        result: if done { "discarded".into() } else { format!("not discarded: it is already {}", e.status) },
        done,
    }
}

/// Whether an exception record with this id exists.
pub fn exception_exists(conn: &Connection, id: &str) -> StoreResult<bool> {
    Ok(conn.query_row("SELECT 1 FROM exceptions WHERE id = ?1", [id], |_| Ok(())).optional()?.is_some())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::super::queue::*;
    use super::super::tests::temp_store;
    use super::*;
    use crate::message::{ErrorDetail, OriginalPayload, Stage};

    pub(crate) fn record(id: &str, reason: &str) -> ExceptionRecord {
        let now = chrono::Utc::now();
        ExceptionRecord {
            exception_id: id.into(),
            pipeline: "p".into(),
            pipeline_version: "1".into(),
            stage: Stage::Map,
            step: None,
            reason: reason.into(),
            errors: vec![ErrorDetail::input("/sku", "unknown")],
            hint: None,
            message_id: format!("m-{id}"),
            correlation_id: "c".into(),
            idempotency_key: None,
            channel: None,
            received_at: now,
            failed_at: now,
            attempt: 1,
            origin: None,
            mapping_versions: Default::default(),
            original: OriginalPayload::from_bytes(b"{\"sku\": \"X\"}"),
        }
    }

    #[test]
    fn replay_sends_the_original_bytes_once_and_discard_closes_a_record() {
        let (_d, store) = temp_store();
        store
            .submit_blocking(|c| {
                let rows = [record("e1", "unknown_sku"), record("e2", "unknown_sku"), record("e3", "schema_violation")]
                    .map(|record| ExceptionRow { record, headers: "{\"correlation_id\":\"c\"}".into(), replayable: true });
                settle(
                    c,
                    &[Settlement { input: None, outcome: Settle::Done { outputs: vec![], exceptions: rows.to_vec(), key: None } }],
                    None,
                    &[],
                )?;
                let by_reason = ExceptionFilter { reason: Some("unknown_sku".into()), ..Default::default() };
                let first = replay(c, &by_reason)?;
                assert_eq!(first.iter().filter(|d| d.done).count(), 2);
                let again = replay(c, &by_reason)?;
                assert!(again.iter().all(|d| !d.done && d.result.contains("already replayed")), "{again:?}");
                let s = ensure_stream(c, REPLAY_QUEUE, "p")?;
                let leased = lease(c, s, 0, 10, 1_000_000, 1)?;
                assert_eq!(leased.len(), 2, "one message per record, however often replayed");
                assert_eq!(leased[0].body, b"{\"sku\": \"X\"}");
                assert_eq!(leased[0].message_id, "m-e1");
                assert!(leased[0].headers.contains("\"replay_of\":\"e1\""));
                let d = discard(c, &ExceptionFilter { id: Some("e3".into()), ..Default::default() })?;
                assert!(d[0].done);
                let open = exceptions(c, &ExceptionFilter { status: Some("open".into()), ..Default::default() })?;
                assert!(open.is_empty());
                Ok(())
            })
            .unwrap();
    }
}
