//! Exception records in PostgreSQL, for engines that share a store: any engine records them,
//! `switchyard exceptions` lists, replays and discards them from any machine, and a replay is
//! taken up by whichever running engine has the pipeline.

use super::admin::{FilterArg, discarded, not_replayable, replay_headers, stored};
use super::state::{PostgresStore, pg_error};
use super::{Disposition, ExceptionFilter, ExceptionRow, StoreResult, StoredException, now_micros};
use tokio_postgres::types::ToSql;

/// A replay waiting for an engine that runs its pipeline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedReplay {
    pub id: i64,
    pub pipeline: String,
    pub exception_id: String,
    pub message_id: String,
    /// The headers the message arrived with (JSON), with `replay_of`.
    pub headers: String,
    pub body: Vec<u8>,
}

/// How long an engine holds replays it took before another engine may take them.
const REPLAY_LEASE_MICROS: i64 = 60_000_000;

/// The tables, created with the others.
pub(super) fn tables(s: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {s}.exceptions (
             id TEXT PRIMARY KEY,
             pipeline TEXT NOT NULL,
             reason TEXT NOT NULL,
             stage TEXT NOT NULL,
             message_id TEXT NOT NULL,
             correlation_id TEXT NOT NULL,
             failed_at BIGINT NOT NULL,
             status TEXT NOT NULL DEFAULT 'open',
             status_at BIGINT,
             replayable BOOLEAN NOT NULL,
             headers TEXT NOT NULL,
             record TEXT NOT NULL
         );
         CREATE INDEX IF NOT EXISTS exceptions_by_time ON {s}.exceptions (failed_at);
         CREATE INDEX IF NOT EXISTS exceptions_by_pipeline ON {s}.exceptions (pipeline, reason, failed_at);
         -- A record is written before its message leaves its queue; a crash in between makes the
         -- message fail again: one open record per message and pipeline all the same.
         CREATE UNIQUE INDEX IF NOT EXISTS exceptions_open_once ON {s}.exceptions (pipeline, message_id) WHERE status = 'open';
         CREATE TABLE IF NOT EXISTS {s}.replays (
             id BIGSERIAL PRIMARY KEY,
             pipeline TEXT NOT NULL,
             exception_id TEXT NOT NULL,
             message_id TEXT NOT NULL,
             headers TEXT NOT NULL,
             body BYTEA NOT NULL,
             queued_at BIGINT NOT NULL,
             taken_until BIGINT NOT NULL DEFAULT 0
         );
         CREATE INDEX IF NOT EXISTS replays_by_pipeline ON {s}.replays (pipeline, id);"
    )
}

fn params(args: &[FilterArg]) -> Vec<Box<dyn ToSql + Sync + Send>> {
    args.iter()
        .map(|a| -> Box<dyn ToSql + Sync + Send> {
            match a {
                FilterArg::Text(s) => Box::new(s.clone()),
                FilterArg::Int(n) => Box::new(*n),
            }
        })
        .collect()
}

fn refs(p: &[Box<dyn ToSql + Sync + Send>]) -> Vec<&(dyn ToSql + Sync)> {
    p.iter().map(|b| b.as_ref() as &(dyn ToSql + Sync)).collect()
}

/// The selected records, locked for an update when `lock`.
async fn select(
    c: &impl deadpool_postgres::GenericClient,
    schema: &str,
    filter: &ExceptionFilter,
    lock: bool,
) -> StoreResult<Vec<StoredException>> {
    let (sql, args) = filter.clauses(&format!("{schema}.exceptions"), "$");
    let q = format!("SELECT status, status_at, replayable, headers, record{sql}{}", if lock { " FOR UPDATE" } else { "" });
    let p = params(&args);
    let rows = c.query(&q, &refs(&p)).await.map_err(pg_error)?;
    rows.into_iter().map(|r| stored(r.get(0), r.get(1), r.get(2), r.get(3), r.get::<_, &str>(4))).collect()
}

impl PostgresStore {
    pub(super) async fn insert_exceptions(&self, rows: Vec<ExceptionRow>) -> StoreResult<usize> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(pg_error)?;
        let q = format!(
            "INSERT INTO {}.exceptions (id, pipeline, reason, stage, message_id, correlation_id, failed_at, replayable, headers, record)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) ON CONFLICT DO NOTHING",
            self.schema
        );
        let stmt = tx.prepare_cached(&q).await.map_err(pg_error)?;
        let mut added = 0;
        for e in &rows {
            let r = &e.record;
            let json = serde_json::to_string(r).map_err(|e| super::StoreError::Sql(e.to_string()))?;
            added += tx
                .execute(
                    &stmt,
                    &[
                        &r.exception_id,
                        &r.pipeline,
                        &r.reason,
                        &r.stage.as_str(),
                        &r.message_id,
                        &r.correlation_id,
                        &r.failed_at.timestamp_micros(),
                        &e.replayable,
                        &e.headers,
                        &json,
                    ],
                )
                .await
                .map_err(pg_error)? as usize;
        }
        tx.commit().await.map_err(pg_error)?;
        Ok(added)
    }

    pub(super) async fn select_exceptions(&self, filter: ExceptionFilter) -> StoreResult<Vec<StoredException>> {
        select(&self.client().await?, &self.schema, &filter, false).await
    }

    /// Marks each open, replayable record `replayed` and queues its message for the engines,
    /// in one transaction.
    pub(super) async fn replay_exceptions(&self, filter: ExceptionFilter) -> StoreResult<Vec<Disposition>> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(pg_error)?;
        let s = &self.schema;
        let queue = format!(
            "INSERT INTO {s}.replays (pipeline, exception_id, message_id, headers, body, queued_at) VALUES ($1, $2, $3, $4, $5, $6)"
        );
        let mark = format!("UPDATE {s}.exceptions SET status = 'replayed', status_at = $1 WHERE id = $2 AND status = 'open'");
        let now = now_micros();
        let mut out = Vec::new();
        for e in select(&tx, s, &filter, true).await? {
            let r = &e.record;
            let mut d =
                Disposition { exception_id: r.exception_id.clone(), pipeline: r.pipeline.clone(), result: String::new(), done: false };
            if let Some(why) = not_replayable(&e) {
                d.result = why;
            } else {
                let body = r.original.to_bytes();
                tx.execute(&queue, &[&r.pipeline, &r.exception_id, &r.message_id, &replay_headers(&e), &body, &now])
                    .await
                    .map_err(pg_error)?;
                tx.execute(&mark, &[&now, &r.exception_id]).await.map_err(pg_error)?;
                d.result = "replayed".into();
                d.done = true;
            }
            out.push(d);
        }
        tx.commit().await.map_err(pg_error)?;
        Ok(out)
    }

    pub(super) async fn discard_exceptions(&self, filter: ExceptionFilter) -> StoreResult<Vec<Disposition>> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(pg_error)?;
        let mark = format!("UPDATE {}.exceptions SET status = 'discarded', status_at = $1 WHERE id = $2 AND status = 'open'", self.schema);
        let now = now_micros();
        let mut out = Vec::new();
        for e in select(&tx, &self.schema, &filter, true).await? {
            let done = e.status == "open" && tx.execute(&mark, &[&now, &e.record.exception_id]).await.map_err(pg_error)? == 1;
            out.push(discarded(&e, done));
        }
        tx.commit().await.map_err(pg_error)?;
        Ok(out)
    }

    /// Takes up to `limit` queued replays of these pipelines for a while; another engine takes
    /// them only if they are not handed on ([`Self::replays_handed`]) meanwhile.
    pub(super) async fn lease_replays(&self, pipelines: Vec<String>, limit: usize) -> StoreResult<Vec<QueuedReplay>> {
        let c = self.client().await?;
        let s = &self.schema;
        // The server's clock, the same for every engine whatever theirs say.
        let now = "(extract(epoch from clock_timestamp()) * 1000000)::bigint";
        let q = format!(
            "UPDATE {s}.replays SET taken_until = {now} + $1 WHERE id IN (
                 SELECT id FROM {s}.replays WHERE pipeline = ANY($2) AND taken_until < {now} ORDER BY id LIMIT $3 FOR UPDATE SKIP LOCKED)
             RETURNING id, pipeline, exception_id, message_id, headers, body"
        );
        let rows = c.query(&q, &[&REPLAY_LEASE_MICROS, &pipelines, &(limit as i64)]).await.map_err(pg_error)?;
        let mut out: Vec<QueuedReplay> = rows
            .into_iter()
            .map(|r| QueuedReplay {
                id: r.get(0),
                pipeline: r.get(1),
                exception_id: r.get(2),
                message_id: r.get(3),
                headers: r.get(4),
                body: r.get(5),
            })
            .collect();
        out.sort_by_key(|r| r.id);
        Ok(out)
    }

    pub(super) async fn close_superseded(&self, pipeline: String, message_ids: Vec<String>) -> StoreResult<usize> {
        let c = self.client().await?;
        let q = format!(
            "UPDATE {}.exceptions SET status = 'superseded', status_at = $1 WHERE pipeline = $2 AND message_id = ANY($3) AND status = 'open'",
            self.schema
        );
        Ok(c.execute(&q, &[&now_micros(), &pipeline, &message_ids]).await.map_err(pg_error)? as usize)
    }

    pub(super) async fn forget_replays(&self, ids: Vec<i64>) -> StoreResult<()> {
        let c = self.client().await?;
        c.execute(&format!("DELETE FROM {}.replays WHERE id = ANY($1)", self.schema), &[&ids]).await.map_err(pg_error)?;
        Ok(())
    }
}
