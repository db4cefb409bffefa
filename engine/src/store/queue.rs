//! Queue operations, run inside the writer's transaction: subscribe, enqueue, lease, settle.

use super::{StoreError, StoreResult, now_micros};
use crate::message::ExceptionRecord;
use rusqlite::{Connection, OptionalExtension, params};
use std::collections::HashMap;
use std::sync::Arc;

pub type StreamId = i64;

/// The queue replays go to: every pipeline also consumes its stream of it.
pub const REPLAY_QUEUE: &str = "_replay";

/// The queue a pipeline with an outside source (files, stdin) ingests into.
pub fn inbox_queue(pipeline: &str) -> String {
    format!("_inbox.{pipeline}")
}

/// A message to store.
#[derive(Debug, Clone)]
pub struct NewMessage {
    pub message_id: String,
    /// A JSON object of text values: the envelope that travels with the body.
    pub headers: String,
    pub body: Vec<u8>,
}

/// A message leased to this process.
#[derive(Debug, Clone)]
pub struct Leased {
    pub id: i64,
    /// How many times it has been leased, this time included: the lease's token.
    pub attempts: u32,
    pub message_id: String,
    pub headers: String,
    pub body: Vec<u8>,
    pub enqueued_at: i64,
}

/// Where an output goes.
#[derive(Debug, Clone)]
pub enum Target {
    /// Every pipeline subscribed to the queue.
    Queue(Arc<str>),
    /// One stream (a replay to one pipeline).
    Stream(StreamId),
}

/// An exception record and what replaying it needs.
#[derive(Debug, Clone)]
pub struct ExceptionRow {
    pub record: ExceptionRecord,
    /// The headers the message arrived with, restored on replay.
    pub headers: String,
    /// False when there is nothing to replay (an input that could not be read).
    pub replayable: bool,
}

/// What became of one leased message; with no input, outputs to store (ingestion).
#[derive(Debug, Clone)]
pub struct Settlement {
    /// The leased message: id and lease token (its attempt count).
    pub input: Option<(i64, u32)>,
    pub outcome: Settle,
}

#[derive(Debug, Clone)]
pub enum Settle {
    /// Done: the input leaves its queue, the outputs and exception records are stored. With a
    /// key, the key is recorded with them; if another consumer recorded it first, the message is
    /// a duplicate: its queue outputs are not stored.
    Done { outputs: Vec<(Target, NewMessage)>, exceptions: Vec<ExceptionRow>, key: Option<super::KeyRecord> },
    /// Try again later: the input becomes visible again at the time given (µs).
    Retry { visible_at: i64 },
    /// Not processed at all (something it needs is away): visible again at the time given,
    /// and this delivery does not count as an attempt.
    GiveBack { visible_at: i64 },
}

/// How far a pipeline has read a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub pipeline: String,
    /// The file's canonical path.
    pub path: String,
    pub size: i64,
    pub modified: i64,
    /// Records of the file already stored.
    pub records: i64,
    pub complete: bool,
    /// A hash of the file's bytes when it was read: an appended file still starts with them.
    pub content_hash: i64,
}

/// A checkpoint to write, and the one this reader last saw: if the row changed since (another
/// engine reads the same file), the write is refused instead of storing the records twice.
#[derive(Debug, Clone)]
pub struct CheckpointWrite {
    pub new: Checkpoint,
    pub seen: Option<Checkpoint>,
}

/// What a settle call did.
#[derive(Debug, Default, Clone)]
pub struct SettleReport {
    /// Inputs (indexes into the settlements) whose lease had expired and gone to another
    /// consumer: their outputs were not written (the other consumer writes them).
    pub lost_leases: Vec<usize>,
    /// Queues that received messages, to wake their consumers.
    pub queues: Vec<Arc<str>>,
    /// Inputs (indexes) found to be duplicates at the commit: their key was recorded meanwhile.
    pub duplicates: Vec<usize>,
}

pub fn ensure_stream(conn: &Connection, queue: &str, consumer: &str) -> StoreResult<StreamId> {
    conn.prepare_cached("INSERT OR IGNORE INTO streams (queue, consumer, created_at) VALUES (?1, ?2, ?3)")?.execute(params![
        queue,
        consumer,
        now_micros()
    ])?;
    Ok(conn
        .prepare_cached("SELECT id FROM streams WHERE queue = ?1 AND consumer = ?2")?
        .query_row(params![queue, consumer], |r| r.get(0))?)
}

/// The streams a message sent to `queue` goes to: one per subscriber, or the waiting stream.
fn streams_of(conn: &Connection, queue: &str) -> StoreResult<Vec<StreamId>> {
    let ids: Vec<StreamId> = conn
        .prepare_cached("SELECT id FROM streams WHERE queue = ?1 AND consumer <> '' ORDER BY id")?
        .query_map([queue], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    if ids.is_empty() { Ok(vec![ensure_stream(conn, queue, "")?]) } else { Ok(ids) }
}

/// Keeps `streams.depth` in step with the rows: depth is read before every batch, a count is not.
#[derive(Default)]
struct Depths(HashMap<StreamId, i64>);

impl Depths {
    fn add(&mut self, stream: StreamId, n: i64) {
        *self.0.entry(stream).or_default() += n;
    }
    fn apply(self, conn: &Connection) -> StoreResult<()> {
        for (s, n) in self.0 {
            if n != 0 {
                conn.prepare_cached("UPDATE streams SET depth = depth + ?1 WHERE id = ?2")?.execute(params![n, s])?;
            }
        }
        Ok(())
    }
}

/// Subscribes each consumer to its queue. The first subscribers of a queue take the messages
/// that waited for them; later ones see only what is sent after they joined.
pub fn subscribe(conn: &Connection, pairs: &[(String, String)]) -> StoreResult<Vec<StreamId>> {
    let mut by_queue: indexmap::IndexMap<&str, Vec<&str>> = indexmap::IndexMap::new();
    for (q, c) in pairs {
        by_queue.entry(q.as_str()).or_default().push(c.as_str());
    }
    let mut ids = HashMap::new();
    let mut depths = Depths::default();
    for (queue, consumers) in by_queue {
        let had_subscribers: bool = conn
            .prepare_cached("SELECT EXISTS (SELECT 1 FROM streams WHERE queue = ?1 AND consumer <> '')")?
            .query_row([queue], |r| r.get(0))?;
        let mut waiting: Option<StreamId> = if had_subscribers {
            None
        } else {
            conn.prepare_cached("SELECT id FROM streams WHERE queue = ?1 AND consumer = ''")?.query_row([queue], |r| r.get(0)).optional()?
        };
        let mut first_taker: Option<StreamId> = None;
        for c in consumers {
            let existed: Option<StreamId> = conn
                .prepare_cached("SELECT id FROM streams WHERE queue = ?1 AND consumer = ?2")?
                .query_row([queue, c], |r| r.get(0))
                .optional()?;
            let id = match existed {
                Some(id) => id,
                None => match waiting.take() {
                    // The first new subscriber takes the waiting stream over as its own: no row
                    // moves, however many messages wait.
                    Some(w) => {
                        conn.execute("UPDATE streams SET consumer = ?1 WHERE id = ?2", params![c, w])?;
                        first_taker = Some(w);
                        w
                    }
                    None => {
                        let id = ensure_stream(conn, queue, c)?;
                        // Others subscribing at the same moment get copies.
                        if let Some(first) = first_taker {
                            let rows: Vec<(i64, String, i64)> = conn
                                .prepare("SELECT id, message_id, enqueued_at FROM messages WHERE stream = ?1 ORDER BY id")?
                                .query_map([first], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                                .collect::<Result<_, _>>()?;
                            for (old, message_id, enqueued_at) in rows {
                                conn.prepare_cached(
                                    "INSERT INTO messages (stream, enqueued_at, visible_at, attempts, message_id) VALUES (?1, ?2, 0, 0, ?3)",
                                )?
                                .execute(params![id, enqueued_at, message_id])?;
                                conn.prepare_cached(
                                    "INSERT INTO bodies (id, headers, body) SELECT ?1, headers, body FROM bodies WHERE id = ?2",
                                )?
                                .execute(params![conn.last_insert_rowid(), old])?;
                                depths.add(id, 1);
                            }
                        }
                        id
                    }
                },
            };
            ids.insert((queue.to_string(), c.to_string()), id);
        }
    }
    depths.apply(conn)?;
    Ok(pairs.iter().map(|(q, c)| ids[&(q.clone(), c.clone())]).collect())
}

fn insert(conn: &Connection, stream: StreamId, m: &NewMessage, now: i64, depths: &mut Depths) -> StoreResult<()> {
    conn.prepare_cached("INSERT INTO messages (stream, enqueued_at, visible_at, attempts, message_id) VALUES (?1, ?2, 0, 0, ?3)")?
        .execute(params![stream, now, m.message_id])?;
    conn.prepare_cached("INSERT INTO bodies (id, headers, body) VALUES (?1, ?2, ?3)")?.execute(params![
        conn.last_insert_rowid(),
        m.headers,
        m.body
    ])?;
    depths.add(stream, 1);
    Ok(())
}

/// Stores one message in one stream (a replay to one pipeline).
pub fn insert_one(conn: &Connection, stream: StreamId, m: &NewMessage) -> StoreResult<()> {
    let mut depths = Depths::default();
    insert(conn, stream, m, now_micros(), &mut depths)?;
    depths.apply(conn)
}

/// Sends messages to a queue (to each subscriber); returns how many rows were written.
pub fn enqueue(conn: &Connection, queue: &str, messages: &[NewMessage]) -> StoreResult<usize> {
    let now = now_micros();
    let streams = streams_of(conn, queue)?;
    let mut depths = Depths::default();
    for m in messages {
        for s in &streams {
            insert(conn, *s, m, now, &mut depths)?;
        }
    }
    depths.apply(conn)?;
    Ok(messages.len() * streams.len())
}

/// Leases up to `limit` visible messages of a stream with an id above `after`, for `lease_micros`.
pub fn lease(conn: &Connection, stream: StreamId, after: i64, limit: usize, lease_micros: i64, owner: i64) -> StoreResult<Vec<Leased>> {
    let now = now_micros();
    let mut out: Vec<Leased> = conn
        .prepare_cached(
            "UPDATE messages SET visible_at = ?1, attempts = attempts + 1, owner = ?2
             WHERE id IN (SELECT id FROM messages WHERE stream = ?3 AND id > ?4 AND visible_at <= ?5 ORDER BY id LIMIT ?6)
             RETURNING id, attempts, message_id, enqueued_at",
        )?
        .query_map(params![now + lease_micros, owner, stream, after, now, limit as i64], |r| {
            Ok(Leased {
                id: r.get(0)?,
                attempts: r.get(1)?,
                message_id: r.get(2)?,
                enqueued_at: r.get(3)?,
                headers: String::new(),
                body: Vec::new(),
            })
        })?
        .collect::<Result<_, _>>()?;
    out.sort_by_key(|l| l.id);
    let mut get = conn.prepare_cached("SELECT headers, body FROM bodies WHERE id = ?1")?;
    for l in &mut out {
        (l.headers, l.body) = get.query_row([l.id], |r| Ok((r.get(0)?, r.get(1)?)))?;
    }
    Ok(out)
}

pub(super) fn insert_exception(conn: &Connection, e: &ExceptionRow) -> StoreResult<()> {
    let r = &e.record;
    let json = serde_json::to_string(r).map_err(|e| StoreError::Sql(e.to_string()))?;
    conn.prepare_cached(
        "INSERT INTO exceptions (id, pipeline, reason, stage, message_id, correlation_id, failed_at, status, replayable, headers, record)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 'open', ?8, ?9, ?10)",
    )?
    .execute(params![
        r.exception_id,
        r.pipeline,
        r.reason,
        r.stage.as_str(),
        r.message_id,
        r.correlation_id,
        r.failed_at.timestamp_micros(),
        e.replayable,
        e.headers,
        json
    ])?;
    Ok(())
}

/// Settles leased messages and stores outputs, exception records and a file checkpoint, all in
/// the writer's current transaction. An input whose lease was lost is left alone, and so are
/// its outputs: whoever holds it now writes them.
/// `marks`: file sinks' lengths after the flush that made these messages' outputs durable.
pub fn settle(
    conn: &Connection,
    items: &[Settlement],
    checkpoint: Option<&CheckpointWrite>,
    marks: &[(String, u64)],
) -> StoreResult<SettleReport> {
    let now = now_micros();
    let mut report = SettleReport::default();
    let mut streams: HashMap<Arc<str>, Vec<StreamId>> = HashMap::new();
    let mut depths = Depths::default();
    for (index, item) in items.iter().enumerate() {
        match &item.outcome {
            Settle::Retry { visible_at } => {
                if let Some((id, attempts)) = item.input {
                    conn.prepare_cached("UPDATE messages SET visible_at = ?1, owner = NULL WHERE id = ?2 AND attempts = ?3")?
                        .execute(params![visible_at, id, attempts])?;
                }
            }
            Settle::GiveBack { visible_at } => {
                if let Some((id, attempts)) = item.input {
                    conn.prepare_cached(
                        "UPDATE messages SET visible_at = ?1, owner = NULL, attempts = attempts - 1 WHERE id = ?2 AND attempts = ?3",
                    )?
                    .execute(params![visible_at, id, attempts])?;
                }
            }
            Settle::Done { outputs, exceptions, key } => {
                if let Some((id, attempts)) = item.input {
                    let stream: Option<StreamId> = conn
                        .prepare_cached("DELETE FROM messages WHERE id = ?1 AND attempts = ?2 RETURNING stream")?
                        .query_row(params![id, attempts], |r| r.get(0))
                        .optional()?;
                    let Some(stream) = stream else {
                        report.lost_leases.push(index);
                        continue;
                    };
                    conn.prepare_cached("DELETE FROM bodies WHERE id = ?1")?.execute([id])?;
                    depths.add(stream, -1);
                }
                if let Some(k) = key
                    && !super::record_key(conn, k)?
                {
                    report.duplicates.push(index);
                    continue;
                }
                for (target, m) in outputs {
                    match target {
                        Target::Stream(s) => insert(conn, *s, m, now, &mut depths)?,
                        Target::Queue(q) => {
                            if !streams.contains_key(q) {
                                streams.insert(q.clone(), streams_of(conn, q)?);
                                report.queues.push(q.clone());
                            }
                            for s in &streams[q] {
                                insert(conn, *s, m, now, &mut depths)?;
                            }
                        }
                    }
                }
                for e in exceptions {
                    insert_exception(conn, e)?;
                }
            }
        }
    }
    depths.apply(conn)?;
    if let Some(w) = checkpoint {
        write_checkpoint(conn, w)?;
    }
    record_marks(conn, marks)?;
    Ok(report)
}

/// Stores file sinks' committed lengths (see [`settle`]).
pub fn record_marks(conn: &Connection, marks: &[(String, u64)]) -> StoreResult<()> {
    for (path, length) in marks {
        conn.prepare_cached(
            "INSERT INTO sink_offsets (path, length) VALUES (?1, ?2) ON CONFLICT (path) DO UPDATE SET length = max(length, excluded.length)",
        )?
        .execute(params![path, *length as i64])?;
    }
    Ok(())
}

/// The committed length of every file sink's file.
pub fn sink_offsets(conn: &Connection) -> StoreResult<HashMap<String, u64>> {
    let rows: Vec<(String, i64)> =
        conn.prepare("SELECT path, length FROM sink_offsets")?.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect::<Result<_, _>>()?;
    Ok(rows.into_iter().map(|(p, l)| (p, l.max(0) as u64)).collect())
}

fn write_checkpoint(conn: &Connection, w: &CheckpointWrite) -> StoreResult<()> {
    let c = &w.new;
    let changed = match &w.seen {
        None => conn
            .prepare_cached(
                "INSERT OR IGNORE INTO file_checkpoints (pipeline, path, size, modified, records, complete, content_hash)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?
            .execute(params![c.pipeline, c.path, c.size, c.modified, c.records, c.complete, c.content_hash])?,
        Some(s) => conn
            .prepare_cached(
                "UPDATE file_checkpoints SET size = ?3, modified = ?4, records = ?5, complete = ?6, content_hash = ?7
                 WHERE pipeline = ?1 AND path = ?2 AND size = ?8 AND modified = ?9 AND records = ?10",
            )?
            .execute(params![
                c.pipeline,
                c.path,
                c.size,
                c.modified,
                c.records,
                c.complete,
                c.content_hash,
                s.size,
                s.modified,
                s.records
            ])?,
    };
    if changed == 1 {
        Ok(())
    } else {
        Err(StoreError::Refused(format!("{}: another engine is reading this file for pipeline {}", c.path, c.pipeline)))
    }
}

/// Makes the messages leased by a dead process visible again at once.
pub fn reclaim(conn: &Connection, owner: i64) -> StoreResult<usize> {
    super::forget_owner_status(conn, owner)?;
    Ok(conn.execute("UPDATE messages SET visible_at = 0, owner = NULL WHERE owner = ?1", [owner])?)
}

/// The checkpoints of a pipeline's files.
/// The stored cursor of a pipeline's `http_poll` source: value and the ids at it.
pub fn poll_cursor(conn: &Connection, pipeline: &str, source: &str) -> StoreResult<Option<(String, Vec<String>)>> {
    let row: Option<(String, String)> = conn
        .prepare_cached("SELECT cursor, at_cursor FROM poll_cursors WHERE pipeline = ?1 AND source = ?2")?
        .query_row(params![pipeline, source], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    Ok(row.map(|(c, at)| (c, serde_json::from_str(&at).unwrap_or_default())))
}

/// Records a poll's cursor; call in the transaction that stores the records it covers.
pub fn save_poll_cursor(conn: &Connection, pipeline: &str, source: &str, cursor: &str, at_cursor: &[String]) -> StoreResult<()> {
    conn.prepare_cached(
        "INSERT INTO poll_cursors (pipeline, source, cursor, at_cursor, polled_at) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (pipeline, source) DO UPDATE SET cursor = ?3, at_cursor = ?4, polled_at = ?5",
    )?
    .execute(params![pipeline, source, cursor, serde_json::to_string(at_cursor).unwrap_or_default(), now_micros()])?;
    Ok(())
}

pub fn checkpoints(conn: &Connection, pipeline: &str) -> StoreResult<HashMap<String, Checkpoint>> {
    let rows = conn
        .prepare_cached("SELECT path, size, modified, records, complete, content_hash FROM file_checkpoints WHERE pipeline = ?1")?
        .query_map([pipeline], |r| {
            Ok(Checkpoint {
                pipeline: pipeline.to_string(),
                path: r.get(0)?,
                size: r.get(1)?,
                modified: r.get(2)?,
                records: r.get(3)?,
                complete: r.get(4)?,
                content_hash: r.get(5)?,
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows.into_iter().map(|c| (c.path.clone(), c)).collect())
}

/// Messages stored for each consumer of a queue.
pub fn depths(conn: &Connection, queue: &str) -> StoreResult<Vec<(String, i64)>> {
    Ok(conn
        .prepare_cached("SELECT consumer, depth FROM streams WHERE queue = ?1")?
        .query_map([queue], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?)
}

/// Messages stored in the given streams, leased or not.
pub fn pending(conn: &Connection, streams: &[StreamId]) -> StoreResult<i64> {
    let mut total = 0;
    for s in streams {
        total += conn.prepare_cached("SELECT depth FROM streams WHERE id = ?1")?.query_row([s], |r| r.get::<_, i64>(0))?;
    }
    Ok(total)
}

/// Removes a consumer's subscription to a queue, and the messages waiting for it.
pub fn unsubscribe(conn: &Connection, queue: &str, consumer: &str) -> StoreResult<Option<i64>> {
    let Some(id): Option<StreamId> =
        conn.query_row("SELECT id FROM streams WHERE queue = ?1 AND consumer = ?2", [queue, consumer], |r| r.get(0)).optional()?
    else {
        return Ok(None);
    };
    conn.execute("DELETE FROM bodies WHERE id IN (SELECT id FROM messages WHERE stream = ?1)", [id])?;
    let dropped = conn.execute("DELETE FROM messages WHERE stream = ?1", [id])?;
    conn.execute("DELETE FROM streams WHERE id = ?1", [id])?;
    Ok(Some(dropped as i64))
}

#[cfg(test)]
mod tests {
    use super::super::tests::temp_store;
    use super::*;

    fn msg(id: &str) -> NewMessage {
        NewMessage { message_id: id.into(), headers: "{}".into(), body: format!("{{\"id\":\"{id}\"}}").into_bytes() }
    }

    #[test]
    fn messages_wait_for_the_first_subscribers_then_fan_out() {
        let (_d, store) = temp_store();
        store
            .submit_blocking(|c| {
                enqueue(c, "orders", &[msg("early")])?;
                let ids = subscribe(c, &[("orders".into(), "a".into()), ("orders".into(), "b".into())])?;
                enqueue(c, "orders", &[msg("later")])?;
                let late = subscribe(c, &[("orders".into(), "c".into())])?[0];
                enqueue(c, "orders", &[msg("last")])?;
                let names =
                    |s| -> StoreResult<Vec<String>> { Ok(lease(c, s, 0, 10, 1_000_000, 1)?.into_iter().map(|l| l.message_id).collect()) };
                assert_eq!(names(ids[0])?, ["early", "later", "last"]);
                assert_eq!(names(ids[1])?, ["early", "later", "last"]);
                assert_eq!(names(late)?, ["last"]);
                Ok(())
            })
            .unwrap();
    }

    #[test]
    fn a_lease_hides_a_message_until_settled_or_expired_and_a_lost_lease_writes_nothing() {
        let (_d, store) = temp_store();
        store
            .submit_blocking(|c| {
                let s = subscribe(c, &[("in".into(), "p".into())])?[0];
                let out = subscribe(c, &[("out".into(), "q".into())])?[0];
                enqueue(c, "in", &[msg("m1")])?;
                let first = lease(c, s, 0, 10, 0, 1)?; // expires at once
                assert_eq!(first.len(), 1);
                let second = lease(c, s, 0, 10, 60_000_000, 2)?;
                assert_eq!((second.len(), second[0].attempts), (1, 2));
                assert!(lease(c, s, 0, 10, 60_000_000, 3)?.is_empty(), "leased for a minute");
                // The first holder settles late: its lease is gone, so its output is not written.
                let done = |l: &Leased| Settlement {
                    input: Some((l.id, l.attempts)),
                    outcome: Settle::Done { outputs: vec![(Target::Queue("out".into()), msg("o"))], exceptions: vec![], key: None },
                };
                let r = settle(c, &[done(&first[0])], None, &[])?;
                assert_eq!(r.lost_leases, [0]);
                assert_eq!(pending(c, &[out])?, 0);
                let r = settle(c, &[done(&second[0])], None, &[])?;
                assert_eq!((r.lost_leases.len(), pending(c, &[s])?, pending(c, &[out])?), (0, 0, 1));
                Ok(())
            })
            .unwrap();
    }

    #[test]
    fn retry_makes_a_message_visible_later_and_reclaim_frees_a_dead_owners_leases() {
        let (_d, store) = temp_store();
        store
            .submit_blocking(|c| {
                let s = subscribe(c, &[("in".into(), "p".into())])?[0];
                enqueue(c, "in", &[msg("m1"), msg("m2")])?;
                let l = lease(c, s, 0, 1, 60_000_000, 7)?;
                settle(
                    c,
                    &[Settlement {
                        input: Some((l[0].id, l[0].attempts)),
                        outcome: Settle::Retry { visible_at: now_micros() + 60_000_000 },
                    }],
                    None,
                    &[],
                )?;
                let l2 = lease(c, s, 0, 10, 60_000_000, 7)?;
                assert_eq!(l2.iter().map(|l| l.message_id.as_str()).collect::<Vec<_>>(), ["m2"], "m1 waits for its retry time");
                assert!(lease(c, s, 0, 10, 60_000_000, 8)?.is_empty());
                assert_eq!(reclaim(c, 7)?, 1);
                assert_eq!(lease(c, s, 0, 10, 60_000_000, 8)?[0].message_id, "m2");
                Ok(())
            })
            .unwrap();
    }

    #[test]
    fn a_key_recorded_by_another_consumer_first_makes_the_commit_a_duplicate_that_stores_no_output() {
        let (_d, store) = temp_store();
        store
            .submit_blocking(|c| {
                let s = subscribe(c, &[("in".into(), "p".into())])?[0];
                let out = subscribe(c, &[("out".into(), "q".into())])?[0];
                enqueue(c, "in", &[msg("first"), msg("second")])?;
                let leased = lease(c, s, 0, 10, 60_000_000, 1)?;
                let key = super::super::KeyRecord {
                    scope: Arc::from("p"),
                    key: "shop:1".into(),
                    message_id: "m".into(),
                    expires_at: now_micros() + 60_000_000,
                };
                // Both looked the key up before either committed; both come to settle.
                let done = |l: &Leased| Settlement {
                    input: Some((l.id, l.attempts)),
                    outcome: Settle::Done {
                        outputs: vec![(Target::Queue("out".into()), msg("o"))],
                        exceptions: vec![],
                        key: Some(key.clone()),
                    },
                };
                let r = settle(c, &[done(&leased[0]), done(&leased[1])], None, &[])?;
                assert_eq!(r.duplicates, [1], "the second commit finds the key recorded");
                assert_eq!(pending(c, &[out])?, 1, "only the first delivery's output is stored");
                assert_eq!(pending(c, &[s])?, 0, "the duplicate input is settled too");
                Ok(())
            })
            .unwrap();
    }
}
