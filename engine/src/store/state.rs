//! Shared state: what several engine processes must agree on (idempotency keys, entity versions,
//! exception records; inventory positions later), behind one trait with two implementations:
//! the embedded store (SQLite, the default, one data directory) and PostgreSQL
//! (`SWITCHYARD_STORE=postgres://...`), for engines on several machines.

use super::{
    Disposition, ExceptionFilter, ExceptionRow, KeyRecord, QueuedReplay, Store, StoreError, StoreResult, StoredException, TrackEvent,
    now_micros,
};
use async_trait::async_trait;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

/// Where idempotency keys, entity versions and exception records live.
#[async_trait]
pub trait StateStore: Send + Sync {
    /// Where it is, for logs and summaries (never a password).
    fn describe(&self) -> String;
    /// The embedded store, when the state lives in it: keys are then recorded in the same
    /// transaction that settles their messages (see [`super::Settle::Done`]).
    fn embedded(&self) -> Option<&Store>;
    /// The keys of `keys` already delivered in `scope` and not expired.
    async fn seen_keys(&self, scope: Arc<str>, keys: Vec<String>) -> StoreResult<HashSet<String>>;
    /// Records delivered keys; returns the keys that were already there (delivered by someone
    /// else meanwhile).
    async fn record_keys(&self, keys: Vec<KeyRecord>) -> StoreResult<Vec<String>>;
    /// Deletes up to `limit` expired keys; how many.
    async fn purge_keys(&self, limit: usize) -> StoreResult<usize>;
    /// Forgets one key; false if it was not there.
    async fn forget_key(&self, scope: String, key: String) -> StoreResult<bool>;
    /// The last applied version of each entity of `keys` that has one.
    async fn last_versions(&self, scope: Arc<str>, keys: Vec<String>) -> StoreResult<HashMap<String, String>>;
    /// Records applied versions (entity key, version), keeping the later one per entity.
    async fn record_versions(&self, scope: Arc<str>, versions: Vec<(String, String)>) -> StoreResult<()>;
    /// Records exception records; how many were new. Outside the embedded store a record is
    /// written before its message leaves its queue, so a crash in between makes the message
    /// fail again: a message has one open record per pipeline all the same.
    async fn record_exceptions(&self, rows: Vec<ExceptionRow>) -> StoreResult<usize>;
    /// The matching records, oldest first.
    async fn exceptions(&self, filter: ExceptionFilter) -> StoreResult<Vec<StoredException>>;
    /// Sends the messages of the matching open records through their pipelines again and marks
    /// the records `replayed` (see [`super::replay`]).
    async fn replay(&self, filter: ExceptionFilter) -> StoreResult<Vec<Disposition>>;
    /// Marks the matching open records `discarded`.
    async fn discard(&self, filter: ExceptionFilter) -> StoreResult<Vec<Disposition>>;
    /// Replays queued for these pipelines, taken for a minute (another engine takes them after
    /// that unless they were handed on). Always empty for the embedded store, whose replays go
    /// straight into the pipelines' queues.
    async fn take_replays(&self, pipelines: Vec<String>, limit: usize) -> StoreResult<Vec<QueuedReplay>>;
    /// Forgets replays once they are in an engine's queue.
    async fn replays_handed(&self, ids: Vec<i64>) -> StoreResult<()>;
    /// Closes the open records of these messages as `superseded`: delivered after all, on a
    /// later delivery. Nothing to do for the embedded store, which records an exception in the
    /// commit that settles its message.
    async fn supersede_exceptions(&self, pipeline: String, message_ids: Vec<String>) -> StoreResult<usize>;
    /// Status events of tracked pipelines (the embedded store also writes them in its commits).
    async fn record_tracking(&self, events: Vec<TrackEvent>) -> StoreResult<()>;
    /// The status events of one correlation id, oldest first.
    async fn tracking_of(&self, correlation_id: String) -> StoreResult<Vec<TrackEvent>>;
    /// Forgets status events past their retention.
    async fn purge_tracking(&self) -> StoreResult<usize>;
}

#[async_trait]
impl StateStore for Store {
    fn describe(&self) -> String {
        "the embedded store".into()
    }
    fn embedded(&self) -> Option<&Store> {
        Some(self)
    }
    async fn seen_keys(&self, scope: Arc<str>, keys: Vec<String>) -> StoreResult<HashSet<String>> {
        self.submit(move |c| super::seen_keys(c, &scope, &keys)).await
    }
    async fn record_keys(&self, keys: Vec<KeyRecord>) -> StoreResult<Vec<String>> {
        self.submit(move |c| {
            let mut there = Vec::new();
            for k in &keys {
                if !super::record_key(c, k)? {
                    there.push(k.key.clone());
                }
            }
            Ok(there)
        })
        .await
    }
    async fn purge_keys(&self, limit: usize) -> StoreResult<usize> {
        self.submit(move |c| super::purge_keys(c, limit)).await
    }
    async fn forget_key(&self, scope: String, key: String) -> StoreResult<bool> {
        self.submit(move |c| super::forget_key(c, &scope, &key)).await
    }
    async fn last_versions(&self, scope: Arc<str>, keys: Vec<String>) -> StoreResult<HashMap<String, String>> {
        self.submit(move |c| super::last_versions(c, &scope, &keys)).await
    }
    async fn record_versions(&self, scope: Arc<str>, versions: Vec<(String, String)>) -> StoreResult<()> {
        self.submit(move |c| super::record_versions(c, &scope, &versions)).await
    }
    async fn record_exceptions(&self, rows: Vec<ExceptionRow>) -> StoreResult<usize> {
        self.submit(move |c| {
            for row in &rows {
                super::queue::insert_exception(c, row)?;
            }
            Ok(rows.len())
        })
        .await
    }
    async fn exceptions(&self, filter: ExceptionFilter) -> StoreResult<Vec<StoredException>> {
        self.submit(move |c| super::exceptions(c, &filter)).await
    }
    async fn replay(&self, filter: ExceptionFilter) -> StoreResult<Vec<Disposition>> {
        self.submit(move |c| super::replay(c, &filter)).await
    }
    async fn discard(&self, filter: ExceptionFilter) -> StoreResult<Vec<Disposition>> {
        self.submit(move |c| super::discard(c, &filter)).await
    }
    async fn take_replays(&self, _pipelines: Vec<String>, _limit: usize) -> StoreResult<Vec<QueuedReplay>> {
        Ok(Vec::new())
    }
    async fn replays_handed(&self, _ids: Vec<i64>) -> StoreResult<()> {
        Ok(())
    }
    async fn supersede_exceptions(&self, _pipeline: String, _message_ids: Vec<String>) -> StoreResult<usize> {
        Ok(0)
    }
    async fn record_tracking(&self, events: Vec<TrackEvent>) -> StoreResult<()> {
        self.submit(move |c| super::record_tracking(c, &events)).await
    }
    async fn tracking_of(&self, correlation_id: String) -> StoreResult<Vec<TrackEvent>> {
        self.submit(move |c| super::tracking_of(c, &correlation_id)).await
    }
    async fn purge_tracking(&self) -> StoreResult<usize> {
        self.submit(super::purge_tracking).await
    }
}

/// The setting that puts shared state in PostgreSQL.
pub const STORE_SETTING: &str = "SWITCHYARD_STORE";

/// PostgreSQL: tables in one schema (default `switchyard`; `?schema=NAME` in the URL picks
/// another), created at connect if missing. A small pool of connections, re-made when lost.
pub struct PostgresStore {
    pool: deadpool_postgres::Pool,
    pub(super) schema: String,
    shown: String,
}

pub(super) fn pg_error(e: impl std::error::Error) -> StoreError {
    StoreError::Sql(format!("PostgreSQL: {}", with_causes(&e)))
}

/// An error with what caused it (the driver's top-level messages say little on their own).
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut said = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let c_said = c.to_string();
        if !said.contains(&c_said) {
            said = format!("{said}: {c_said}");
        }
        cause = c.source();
    }
    said
}

/// A URL as it may be shown: without its password, and without its query (where a password
/// may be given too, as `?password=`).
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return "(not a URL)".into() };
    let rest = rest.split(['?', '#']).next().unwrap_or_default();
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let authority = match authority.rsplit_once('@') {
        Some((user, host)) => {
            let user = user.split_once(':').map(|(u, _)| format!("{u}:***")).unwrap_or_else(|| user.to_string());
            format!("{user}@{host}")
        }
        None => authority.to_string(),
    };
    let dropped = if url.contains('?') { "?..." } else { "" };
    format!("{scheme}://{authority}{path}{dropped}")
}

/// Splits `schema=NAME` off a URL's query: it is ours, not the driver's.
fn take_schema(url: &str) -> (String, Option<String>) {
    let Some((base, query)) = url.split_once('?') else { return (url.to_string(), None) };
    let mut schema = None;
    let rest: Vec<&str> = query
        .split('&')
        .filter(|p| match p.strip_prefix("schema=") {
            Some(s) => {
                schema = Some(s.to_string());
                false
            }
            None => true,
        })
        .collect();
    let url = if rest.is_empty() { base.to_string() } else { format!("{base}?{}", rest.join("&")) };
    (url, schema)
}

fn valid_schema(s: &str) -> bool {
    !s.is_empty() && s.len() <= 63 && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

impl PostgresStore {
    /// Connects and creates the tables if missing. The URL is never shown with its password.
    pub async fn connect(url: &str) -> StoreResult<PostgresStore> {
        let shown = redact_url(url);
        let refused = |e: String| StoreError::Open { path: shown.clone(), message: e };
        let (driver_url, schema) = take_schema(url);
        let schema = schema.unwrap_or_else(|| "switchyard".into());
        if !valid_schema(&schema) {
            return Err(refused(format!("`{schema}` is not a schema name (lowercase letters, digits and `_`)")));
        }
        let config: tokio_postgres::Config = driver_url.parse().map_err(|e| refused(format!("not a PostgreSQL URL: {e}")))?;
        let manager = deadpool_postgres::Manager::from_config(
            config,
            tokio_postgres::NoTls,
            deadpool_postgres::ManagerConfig { recycling_method: deadpool_postgres::RecyclingMethod::Fast },
        );
        let pool = deadpool_postgres::Pool::builder(manager)
            .max_size(4)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(std::time::Duration::from_secs(30)))
            .create_timeout(Some(std::time::Duration::from_secs(10)))
            .build()
            .map_err(|e| refused(e.to_string()))?;
        let store = PostgresStore { pool, schema, shown: shown.clone() };
        store.create_tables().await.map_err(|e| match e {
            StoreError::Sql(m) => refused(m),
            other => other,
        })?;
        Ok(store)
    }

    pub(super) async fn client(&self) -> StoreResult<deadpool_postgres::Object> {
        self.pool.get().await.map_err(|e| StoreError::Sql(format!("PostgreSQL: no connection to {}: {}", self.shown, with_causes(&e))))
    }

    async fn create_tables(&self) -> StoreResult<()> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(pg_error)?;
        // Engines starting together would race on CREATE ... IF NOT EXISTS: one at a time.
        tx.execute("SELECT pg_advisory_xact_lock(7239105512)", &[]).await.map_err(pg_error)?;
        let s = &self.schema;
        tx.batch_execute(&format!(
            "CREATE SCHEMA IF NOT EXISTS {s};
             CREATE TABLE IF NOT EXISTS {s}.idempotency_keys (
                 scope TEXT NOT NULL,
                 key TEXT NOT NULL,
                 message_id TEXT NOT NULL,
                 recorded_at BIGINT NOT NULL,
                 expires_at BIGINT NOT NULL,
                 PRIMARY KEY (scope, key)
             );
             CREATE INDEX IF NOT EXISTS idempotency_keys_by_expiry ON {s}.idempotency_keys (expires_at);
             CREATE TABLE IF NOT EXISTS {s}.entity_versions (
                 scope TEXT NOT NULL,
                 key TEXT NOT NULL,
                 version TEXT NOT NULL,
                 updated_at BIGINT NOT NULL,
                 PRIMARY KEY (scope, key)
             );
             CREATE TABLE IF NOT EXISTS {s}.tracking (
                 id BIGSERIAL PRIMARY KEY,
                 correlation_id TEXT NOT NULL,
                 at BIGINT NOT NULL,
                 pipeline TEXT NOT NULL,
                 event TEXT NOT NULL,
                 detail TEXT NOT NULL
             );
             CREATE INDEX IF NOT EXISTS tracking_by_id ON {s}.tracking (correlation_id, at);
             CREATE INDEX IF NOT EXISTS tracking_by_time ON {s}.tracking (at);
             {}",
            super::shared_exceptions::tables(s)
        ))
        .await
        .map_err(pg_error)?;
        tx.commit().await.map_err(pg_error)
    }
}

#[async_trait]
impl StateStore for PostgresStore {
    fn describe(&self) -> String {
        format!("PostgreSQL {} (schema {})", self.shown, self.schema)
    }
    fn embedded(&self) -> Option<&Store> {
        None
    }
    async fn seen_keys(&self, scope: Arc<str>, keys: Vec<String>) -> StoreResult<HashSet<String>> {
        let c = self.client().await?;
        let q = format!("SELECT key FROM {}.idempotency_keys WHERE scope = $1 AND key = ANY($2) AND expires_at > $3", self.schema);
        let stmt = c.prepare_cached(&q).await.map_err(pg_error)?;
        let rows = c.query(&stmt, &[&scope.as_ref(), &keys, &now_micros()]).await.map_err(pg_error)?;
        Ok(rows.into_iter().map(|r| r.get(0)).collect())
    }
    async fn record_keys(&self, keys: Vec<KeyRecord>) -> StoreResult<Vec<String>> {
        let c = self.client().await?;
        // One statement per scope and batch; a live key is left alone (not returned), an expired
        // one taken over.
        let q = format!(
            "INSERT INTO {s}.idempotency_keys AS k (scope, key, message_id, recorded_at, expires_at)
             SELECT $1, u.key, u.message_id, $2, u.expires_at FROM UNNEST($3::text[], $4::text[], $5::bigint[]) AS u(key, message_id, expires_at)
             ON CONFLICT (scope, key) DO UPDATE SET message_id = excluded.message_id, recorded_at = excluded.recorded_at,
                 expires_at = excluded.expires_at
             WHERE k.expires_at <= excluded.recorded_at
             RETURNING key",
            s = self.schema
        );
        let stmt = c.prepare_cached(&q).await.map_err(pg_error)?;
        let mut by_scope: indexmap::IndexMap<Arc<str>, indexmap::IndexMap<String, &KeyRecord>> = indexmap::IndexMap::new();
        for k in &keys {
            by_scope.entry(k.scope.clone()).or_default().entry(k.key.clone()).or_insert(k);
        }
        let mut there = Vec::new();
        for (scope, ks) in by_scope {
            let names: Vec<&str> = ks.keys().map(String::as_str).collect();
            let ids: Vec<&str> = ks.values().map(|k| k.message_id.as_str()).collect();
            let expiries: Vec<i64> = ks.values().map(|k| k.expires_at).collect();
            let rows = c.query(&stmt, &[&scope.as_ref(), &now_micros(), &names, &ids, &expiries]).await.map_err(pg_error)?;
            let recorded: HashSet<String> = rows.into_iter().map(|r| r.get(0)).collect();
            there.extend(names.iter().filter(|n| !recorded.contains(**n)).map(|n| n.to_string()));
        }
        Ok(there)
    }
    async fn purge_keys(&self, limit: usize) -> StoreResult<usize> {
        let c = self.client().await?;
        let q = format!(
            "DELETE FROM {s}.idempotency_keys WHERE ctid IN (SELECT ctid FROM {s}.idempotency_keys WHERE expires_at <= $1 LIMIT $2)",
            s = self.schema
        );
        let n = c.execute(&q, &[&now_micros(), &(limit as i64)]).await.map_err(pg_error)?;
        Ok(n as usize)
    }
    async fn forget_key(&self, scope: String, key: String) -> StoreResult<bool> {
        let c = self.client().await?;
        let q = format!("DELETE FROM {}.idempotency_keys WHERE scope = $1 AND key = $2", self.schema);
        Ok(c.execute(&q, &[&scope, &key]).await.map_err(pg_error)? == 1)
    }
    async fn last_versions(&self, scope: Arc<str>, keys: Vec<String>) -> StoreResult<HashMap<String, String>> {
        let c = self.client().await?;
        let q = format!("SELECT key, version FROM {}.entity_versions WHERE scope = $1 AND key = ANY($2)", self.schema);
        let stmt = c.prepare_cached(&q).await.map_err(pg_error)?;
        let rows = c.query(&stmt, &[&scope.as_ref(), &keys]).await.map_err(pg_error)?;
        Ok(rows.into_iter().map(|r| (r.get(0), r.get(1))).collect())
    }
    async fn record_versions(&self, scope: Arc<str>, versions: Vec<(String, String)>) -> StoreResult<()> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(pg_error)?;
        // The rows are locked while compared, so that engines recording at once keep the later.
        // Rows are locked and inserted in key order, the same in every engine: no deadlock.
        let mut versions = versions;
        versions.sort_by(|a, b| a.0.cmp(&b.0));
        let keys: Vec<&str> = versions.iter().map(|(k, _)| k.as_str()).collect();
        let q =
            format!("SELECT key, version FROM {}.entity_versions WHERE scope = $1 AND key = ANY($2) ORDER BY key FOR UPDATE", self.schema);
        let known: HashMap<String, String> =
            tx.query(&q, &[&scope.as_ref(), &keys]).await.map_err(pg_error)?.into_iter().map(|r| (r.get(0), r.get(1))).collect();
        let s = &self.schema;
        let insert = format!(
            "INSERT INTO {s}.entity_versions (scope, key, version, updated_at) VALUES ($1, $2, $3, $4) ON CONFLICT (scope, key) DO NOTHING"
        );
        let update = format!("UPDATE {s}.entity_versions SET version = $3, updated_at = $4 WHERE scope = $1 AND key = $2");
        let lock_one = format!("SELECT version FROM {s}.entity_versions WHERE scope = $1 AND key = $2 FOR UPDATE");
        let mut known = known;
        for (k, v) in &versions {
            let later = |old: &String| crate::pipeline::compare_versions(v, old).is_gt();
            match known.get(k) {
                Some(old) if !later(old) => continue,
                Some(_) => {
                    tx.execute(&update, &[&scope.as_ref(), k, v, &now_micros()]).await.map_err(pg_error)?;
                }
                None => {
                    // Another engine may insert the first version of this entity at the same
                    // moment: then its row is locked and compared like the others.
                    if tx.execute(&insert, &[&scope.as_ref(), k, v, &now_micros()]).await.map_err(pg_error)? == 0 {
                        let old: String = tx.query_one(&lock_one, &[&scope.as_ref(), k]).await.map_err(pg_error)?.get(0);
                        if !later(&old) {
                            known.insert(k.clone(), old);
                            continue;
                        }
                        tx.execute(&update, &[&scope.as_ref(), k, v, &now_micros()]).await.map_err(pg_error)?;
                    }
                }
            }
            known.insert(k.clone(), v.clone());
        }
        tx.commit().await.map_err(pg_error)
    }
    async fn record_exceptions(&self, rows: Vec<ExceptionRow>) -> StoreResult<usize> {
        self.insert_exceptions(rows).await
    }
    async fn exceptions(&self, filter: ExceptionFilter) -> StoreResult<Vec<StoredException>> {
        self.select_exceptions(filter).await
    }
    async fn replay(&self, filter: ExceptionFilter) -> StoreResult<Vec<Disposition>> {
        self.replay_exceptions(filter).await
    }
    async fn discard(&self, filter: ExceptionFilter) -> StoreResult<Vec<Disposition>> {
        self.discard_exceptions(filter).await
    }
    async fn take_replays(&self, pipelines: Vec<String>, limit: usize) -> StoreResult<Vec<QueuedReplay>> {
        self.lease_replays(pipelines, limit).await
    }
    async fn replays_handed(&self, ids: Vec<i64>) -> StoreResult<()> {
        self.forget_replays(ids).await
    }
    async fn supersede_exceptions(&self, pipeline: String, message_ids: Vec<String>) -> StoreResult<usize> {
        self.close_superseded(pipeline, message_ids).await
    }
    async fn record_tracking(&self, events: Vec<TrackEvent>) -> StoreResult<()> {
        if events.is_empty() {
            return Ok(());
        }
        let c = self.client().await?;
        let q = format!(
            "INSERT INTO {}.tracking (correlation_id, at, pipeline, event, detail)
             SELECT * FROM UNNEST($1::text[], $2::bigint[], $3::text[], $4::text[], $5::text[])",
            self.schema
        );
        let ids: Vec<&str> = events.iter().map(|e| e.correlation_id.as_str()).collect();
        let at: Vec<i64> = events.iter().map(|e| e.at).collect();
        let pipelines: Vec<&str> = events.iter().map(|e| e.pipeline.as_str()).collect();
        let names: Vec<&str> = events.iter().map(|e| e.event.as_str()).collect();
        let details: Vec<String> = events.iter().map(|e| e.detail.to_string()).collect();
        c.execute(&q, &[&ids, &at, &pipelines, &names, &details]).await.map_err(pg_error)?;
        Ok(())
    }
    async fn tracking_of(&self, correlation_id: String) -> StoreResult<Vec<TrackEvent>> {
        let c = self.client().await?;
        let q = format!("SELECT at, pipeline, event, detail FROM {}.tracking WHERE correlation_id = $1 ORDER BY at, id", self.schema);
        let rows = c.query(&q, &[&correlation_id]).await.map_err(pg_error)?;
        Ok(rows
            .into_iter()
            .map(|r| TrackEvent {
                correlation_id: correlation_id.clone(),
                at: r.get(0),
                pipeline: r.get(1),
                event: r.get(2),
                detail: serde_json::from_str(r.get::<_, &str>(3)).unwrap_or_default(),
            })
            .collect())
    }
    async fn purge_tracking(&self) -> StoreResult<usize> {
        let c = self.client().await?;
        let before = now_micros() - super::TRACKING_RETENTION.as_micros() as i64;
        let n = c.execute(&format!("DELETE FROM {}.tracking WHERE at < $1", self.schema), &[&before]).await.map_err(pg_error)?;
        Ok(n as usize)
    }
}

/// For tests: the PostgreSQL of this machine (`SWITCHYARD_TEST_POSTGRES`, default
/// `postgres://postgres@127.0.0.1:5432/test`), or `None` with a `skipped:` line when there is none,
/// unless `SWITCHYARD_REQUIRE_BROKER=1`, which makes its absence a failure.
pub fn test_postgres_url() -> Option<String> {
    let url = std::env::var("SWITCHYARD_TEST_POSTGRES").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    if std::net::TcpStream::connect_timeout(&"127.0.0.1:5432".parse().expect("address"), std::time::Duration::from_secs(2)).is_ok()
        || std::env::var("SWITCHYARD_TEST_POSTGRES").is_ok()
    {
        return Some(url);
    }
    assert!(
        std::env::var("SWITCHYARD_REQUIRE_BROKER").as_deref() != Ok("1"),
        "no PostgreSQL at 127.0.0.1:5432 and SWITCHYARD_REQUIRE_BROKER=1"
    );
    println!("skipped: no PostgreSQL at 127.0.0.1:5432");
    None
}

impl PostgresStore {
    /// Drops the store's schema and everything in it (tests clean up with it).
    pub async fn drop_schema(&self) -> StoreResult<()> {
        self.client().await?.batch_execute(&format!("DROP SCHEMA IF EXISTS {} CASCADE", self.schema)).await.map_err(pg_error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(scope: &str, k: &str, expires_at: i64) -> KeyRecord {
        KeyRecord { scope: Arc::from(scope), key: k.into(), message_id: format!("m-{k}"), expires_at }
    }

    /// What every implementation must do.
    async fn conformance(s: &dyn StateStore) {
        // Status events: in the order they happened, per correlation id; old ones purged.
        let event = |id: &str, at: i64, name: &str| TrackEvent {
            correlation_id: id.into(),
            at,
            pipeline: "p".into(),
            event: name.into(),
            detail: serde_json::json!({"n": name}),
        };
        let now = now_micros();
        let ancient = now - super::super::TRACKING_RETENTION.as_micros() as i64 - 1;
        s.record_tracking(vec![event("x:1", now + 2, "posted"), event("x:1", now + 1, "received"), event("x:2", now, "received")])
            .await
            .unwrap();
        s.record_tracking(vec![event("x:3", ancient, "received")]).await.unwrap();
        let x1 = s.tracking_of("x:1".into()).await.unwrap();
        assert_eq!(x1.iter().map(|e| e.event.as_str()).collect::<Vec<_>>(), ["received", "posted"]);
        assert_eq!(x1[1].detail["n"], "posted");
        assert_eq!(s.purge_tracking().await.unwrap(), 1);
        assert!(s.tracking_of("x:3".into()).await.unwrap().is_empty());
        let later = now_micros() + 60_000_000;
        let keys = |ks: &[&str]| ks.iter().map(|k| k.to_string()).collect::<Vec<_>>();
        assert!(s.seen_keys(Arc::from("orders"), keys(&["a"])).await.unwrap().is_empty());
        let there = s.record_keys(vec![key("orders", "a", later), key("orders", "b", later), key("other", "a", later)]).await.unwrap();
        assert!(there.is_empty(), "{there:?}");
        let seen = s.seen_keys(Arc::from("orders"), keys(&["a", "b", "c"])).await.unwrap();
        assert_eq!(seen, HashSet::from(["a".to_string(), "b".to_string()]));
        // Recorded by someone else meanwhile: reported, not overwritten.
        let there = s.record_keys(vec![key("orders", "b", later), key("orders", "c", later)]).await.unwrap();
        assert_eq!(there, ["b"]);
        // Expired keys are not seen, are taken over, and are purged.
        s.record_keys(vec![key("orders", "old", now_micros() - 1)]).await.unwrap();
        assert!(s.seen_keys(Arc::from("orders"), keys(&["old"])).await.unwrap().is_empty());
        assert!(s.record_keys(vec![key("orders", "old", now_micros() - 1)]).await.unwrap().is_empty(), "an expired key is taken over");
        assert_eq!(s.purge_keys(100).await.unwrap(), 1);
        assert!(s.forget_key("orders".into(), "a".into()).await.unwrap());
        assert!(!s.forget_key("orders".into(), "a".into()).await.unwrap());
        assert_eq!(s.seen_keys(Arc::from("other"), keys(&["a"])).await.unwrap().len(), 1, "scopes are apart");

        // Entity versions: the later one is kept, compared as numbers or date-times.
        let scope: Arc<str> = Arc::from("orders");
        let v = |k: &str, v: &str| (k.to_string(), v.to_string());
        s.record_versions(scope.clone(), vec![v("o1", "9"), v("o2", "2026-11-27T10:00:00Z")]).await.unwrap();
        s.record_versions(scope.clone(), vec![v("o1", "10"), v("o2", "2026-11-27T09:00:00+00:00")]).await.unwrap();
        let last = s.last_versions(scope.clone(), keys(&["o1", "o2", "o3"])).await.unwrap();
        assert_eq!(last.get("o1").map(String::as_str), Some("10"), "10 is after 9 as a number, not as text");
        assert_eq!(last.get("o2").map(String::as_str), Some("2026-11-27T10:00:00Z"), "an earlier time does not replace a later one");
        assert!(!last.contains_key("o3"));

        // Exception records: kept, listed by filter, discarded, replayed once.
        let row = |id: &str, reason: &str| ExceptionRow {
            record: super::super::admin::tests::record(id, reason),
            headers: "{\"correlation_id\":\"c\"}".into(),
            replayable: true,
        };
        let by = |reason: Option<&str>, status: Option<&str>| ExceptionFilter {
            reason: reason.map(String::from),
            status: status.map(String::from),
            ..Default::default()
        };
        assert_eq!(
            s.record_exceptions(vec![row("e1", "unknown_sku"), row("e2", "unknown_sku"), row("e3", "schema_violation")]).await.unwrap(),
            3
        );
        let listed = s.exceptions(by(Some("unknown_sku"), None)).await.unwrap();
        assert_eq!(listed.iter().map(|e| e.record.exception_id.as_str()).collect::<Vec<_>>(), ["e1", "e2"]);
        assert!(listed.iter().all(|e| e.status == "open" && e.replayable && e.record.original.to_bytes() == b"{\"sku\": \"X\"}"));
        let d = s.discard(ExceptionFilter { id: Some("e3".into()), ..Default::default() }).await.unwrap();
        assert!(d[0].done && d[0].result == "discarded", "{d:?}");
        let first = s.replay(by(Some("unknown_sku"), None)).await.unwrap();
        assert_eq!(first.iter().filter(|d| d.done).count(), 2, "{first:?}");
        let again = s.replay(by(None, None)).await.unwrap();
        assert!(again.iter().all(|d| !d.done && d.result.contains("already")), "{again:?}");
        assert!(s.exceptions(by(None, Some("open"))).await.unwrap().is_empty());
        assert_eq!(s.exceptions(by(None, Some("replayed"))).await.unwrap().len(), 2);
    }

    #[tokio::test]
    async fn the_embedded_store_keeps_keys() {
        let (_dir, store) = super::super::tests::temp_store();
        conformance(&store).await;
    }

    #[tokio::test]
    async fn postgresql_keeps_keys_and_says_where_it_is_without_the_password() {
        let Some(url) = test_postgres_url() else { return };
        let schema = format!("sy_state_{}_{}", std::process::id(), now_micros() % 1_000_000);
        let url = format!("{url}?schema={schema}");
        // Two engines starting together both create the tables.
        let (a, b) = tokio::join!(PostgresStore::connect(&url), PostgresStore::connect(&url));
        let pg = PostgresStore::connect(&url).await.unwrap();
        a.unwrap();
        let b = b.unwrap();
        conformance(&pg).await;
        assert!(pg.describe().contains(&schema));

        // Replays wait in PostgreSQL for an engine of their pipeline; one engine takes them.
        let taken = pg.take_replays(vec!["other".into()], 10).await.unwrap();
        assert!(taken.is_empty(), "only the pipelines asked for");
        let taken = pg.take_replays(vec!["p".into()], 10).await.unwrap();
        assert_eq!(taken.iter().map(|r| r.exception_id.as_str()).collect::<Vec<_>>(), ["e1", "e2"]);
        assert_eq!(taken[0].body, b"{\"sku\": \"X\"}");
        assert_eq!(taken[0].message_id, "m-e1");
        assert!(taken[0].headers.contains("\"replay_of\":\"e1\"") && taken[0].headers.contains("\"correlation_id\":\"c\""));
        assert!(b.take_replays(vec!["p".into()], 10).await.unwrap().is_empty(), "taken by one engine, not by two");
        pg.replays_handed(taken.iter().map(|r| r.id).collect()).await.unwrap();

        // A message failing again after a crash (recorded, not yet out of its queue) keeps one
        // open record; once replayed, a new failure is a new record.
        let again = |id: &str, message: &str| {
            let mut record = super::super::admin::tests::record(id, "sink_failed");
            record.message_id = message.into();
            ExceptionRow { record, headers: "{}".into(), replayable: true }
        };
        assert_eq!(pg.record_exceptions(vec![again("r1", "m-9")]).await.unwrap(), 1);
        assert_eq!(pg.record_exceptions(vec![again("r2", "m-9")]).await.unwrap(), 0, "one open record per message");
        pg.replay(ExceptionFilter { id: Some("r1".into()), ..Default::default() }).await.unwrap();
        assert_eq!(pg.record_exceptions(vec![again("r3", "m-9")]).await.unwrap(), 1);
        // Delivered on a later delivery after all: its open record is closed.
        assert_eq!(pg.supersede_exceptions("p".into(), vec!["m-9".into(), "m-none".into()]).await.unwrap(), 1);
        let r3 = pg.exceptions(ExceptionFilter { id: Some("r3".into()), ..Default::default() }).await.unwrap();
        assert_eq!(r3[0].status, "superseded");

        // Two engines applying the first versions of the same entities at once: the later wins.
        let scope: Arc<str> = Arc::from("race");
        let entities: Vec<String> = (0..200).map(|i| format!("e{i}")).collect();
        let of = |v: &str| entities.iter().map(|k| (k.clone(), v.to_string())).collect::<Vec<_>>();
        let (x, y) = tokio::join!(pg.record_versions(scope.clone(), of("5")), b.record_versions(scope.clone(), of("3")));
        x.unwrap();
        y.unwrap();
        let last = pg.last_versions(scope, entities.clone()).await.unwrap();
        assert!(entities.iter().all(|k| last.get(k).map(String::as_str) == Some("5")), "{last:?}");
        pg.drop_schema().await.unwrap();
    }

    #[tokio::test]
    async fn an_unreachable_postgresql_is_said_without_its_password() {
        let err = PostgresStore::connect("postgres://app:s3cret@127.0.0.1:1/db").await.err().expect("nothing listens on port 1");
        let said = err.to_string();
        assert!(said.contains("app:***@127.0.0.1:1") && !said.contains("s3cret"), "{said}");
    }

    #[test]
    fn the_schema_is_taken_off_the_url_and_passwords_are_never_shown() {
        assert_eq!(
            take_schema("postgres://u:pw@h/db?schema=sy_1&sslmode=disable"),
            ("postgres://u:pw@h/db?sslmode=disable".to_string(), Some("sy_1".to_string()))
        );
        assert_eq!(take_schema("postgres://h/db"), ("postgres://h/db".to_string(), None));
        assert_eq!(redact_url("postgres://u:secret@h:5432/db"), "postgres://u:***@h:5432/db");
        assert_eq!(redact_url("postgres://h/db"), "postgres://h/db");
        assert_eq!(redact_url("postgres://app@h/db?password=s3cret&application_name=a@b"), "postgres://app@h/db?...");
        assert!(!valid_schema("x; DROP TABLE y"));
    }
}
