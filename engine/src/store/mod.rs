//! The embedded durable store: queues, exception records and source checkpoints in one SQLite
//! file, `<data dir>/switchyard.db`, in WAL mode. Operators can open it with `sqlite3`.
//!
//! One writer thread owns the write connection and commits whatever jobs are waiting in one
//! transaction (group commit): a job is a closure run inside its own savepoint, so one failing job
//! does not undo the others, and its caller hears back only after the commit is durable.
//!
//! Queues fan out: a message sent to queue `X` is stored once per *stream* `(X, consumer)`, one
//! stream per pipeline whose source is `X`. Messages sent before any pipeline subscribed wait in
//! the stream `(X, "")` and go to the first subscribers.

mod admin;
mod keys;
mod queue;
mod shared_exceptions;
mod state;
mod status;
mod tracking;

pub use admin::*;
pub use keys::*;
pub use queue::*;
pub use shared_exceptions::QueuedReplay;
pub use state::*;
pub use status::*;
pub use tracking::*;

/// An exception record for tests elsewhere in the engine.
#[cfg(test)]
pub(crate) use admin::tests::record as tests_record;

use rusqlite::Connection;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("the store at {path} cannot be opened: {message}")]
    Open { path: String, message: String },
    #[error("store error: {0}")]
    Sql(String),
    #[error("the store has stopped")]
    Stopped,
    #[error("{0}")]
    Refused(String),
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Sql(e.to_string())
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// How hard each commit is pushed to disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// fsync on every commit: nothing acknowledged is lost, even on power loss (the default).
    Full,
    /// fsync at WAL checkpoints only: safe when the process dies, may lose the last commits on
    /// power loss (SQLite `synchronous=NORMAL`).
    Normal,
}

impl Durability {
    /// From `SWITCHYARD_DURABILITY` (`full` or `normal`); full when unset.
    pub fn from_env() -> Result<Self, String> {
        match std::env::var("SWITCHYARD_DURABILITY").as_deref() {
            Err(_) | Ok("") | Ok("full") => Ok(Durability::Full),
            Ok("normal") => Ok(Durability::Normal),
            Ok(other) => Err(format!("SWITCHYARD_DURABILITY is `{other}`; expected `full` or `normal`")),
        }
    }
}

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS streams (
    id INTEGER PRIMARY KEY,
    queue TEXT NOT NULL,
    consumer TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    depth INTEGER NOT NULL DEFAULT 0,
    UNIQUE (queue, consumer)
);
-- Ids only grow (AUTOINCREMENT): a message stored later always sorts after a consumer's cursor.
-- The bodies live apart, so taking a lease rewrites a short row, not the payload.
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    stream INTEGER NOT NULL,
    enqueued_at INTEGER NOT NULL,
    visible_at INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    owner INTEGER,
    message_id TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_by_stream ON messages (stream, id, visible_at);
CREATE TABLE IF NOT EXISTS bodies (
    id INTEGER PRIMARY KEY,
    headers TEXT NOT NULL,
    body BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS exceptions (
    id TEXT PRIMARY KEY,
    pipeline TEXT NOT NULL,
    reason TEXT NOT NULL,
    stage TEXT NOT NULL,
    message_id TEXT NOT NULL,
    correlation_id TEXT NOT NULL,
    failed_at INTEGER NOT NULL,
    status TEXT NOT NULL DEFAULT 'open',
    status_at INTEGER,
    replayable INTEGER NOT NULL,
    headers TEXT NOT NULL,
    record TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS exceptions_by_time ON exceptions (failed_at);
CREATE INDEX IF NOT EXISTS exceptions_by_pipeline ON exceptions (pipeline, reason, failed_at);
CREATE TABLE IF NOT EXISTS file_checkpoints (
    pipeline TEXT NOT NULL,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    modified INTEGER NOT NULL,
    records INTEGER NOT NULL,
    complete INTEGER NOT NULL,
    content_hash INTEGER NOT NULL,
    PRIMARY KEY (pipeline, path)
);
-- Idempotency keys of delivered messages, per key space (scope), until they expire. A key is
-- written in the commit that settles its message, never before its outputs are delivered.
CREATE TABLE IF NOT EXISTS idempotency_keys (
    scope TEXT NOT NULL,
    key TEXT NOT NULL,
    message_id TEXT NOT NULL,
    recorded_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    PRIMARY KEY (scope, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS idempotency_keys_by_expiry ON idempotency_keys (expires_at);
-- The last version applied per entity, for ordering events (see `ordering:`).
CREATE TABLE IF NOT EXISTS entity_versions (
    scope TEXT NOT NULL,
    key TEXT NOT NULL,
    version TEXT NOT NULL,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (scope, key)
) WITHOUT ROWID;
-- What each running engine says about its sinks (`switchyard status`).
CREATE TABLE IF NOT EXISTS sink_status (
    pipeline TEXT NOT NULL,
    sink TEXT NOT NULL,
    owner INTEGER NOT NULL,
    breaker TEXT NOT NULL,
    open_until INTEGER,
    failures INTEGER NOT NULL,
    rate_limit TEXT,
    paused_until INTEGER,
    last_failure TEXT,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (pipeline, sink, owner)
);
-- How long each file sink's file was when messages written to it were settled.
CREATE TABLE IF NOT EXISTS sink_offsets (
    path TEXT PRIMARY KEY,
    length INTEGER NOT NULL
);
-- Where each `http_poll` source is: the greatest cursor value taken, and the ids of the records
-- at it (a JSON array); written in the commit that stores the records it covers.
CREATE TABLE IF NOT EXISTS poll_cursors (
    pipeline TEXT NOT NULL,
    source TEXT NOT NULL,
    cursor TEXT NOT NULL,
    at_cursor TEXT NOT NULL,
    polled_at INTEGER NOT NULL,
    PRIMARY KEY (pipeline, source)
);
-- Where each message of a tracked pipeline is, by correlation id (see store/tracking.rs).
CREATE TABLE IF NOT EXISTS tracking (
    correlation_id TEXT NOT NULL,
    at INTEGER NOT NULL,
    pipeline TEXT NOT NULL,
    event TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS tracking_by_id ON tracking (correlation_id, at);
CREATE INDEX IF NOT EXISTS tracking_by_time ON tracking (at);
INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', '2');
"#;

/// Microseconds since the Unix epoch: the store's clock.
pub fn now_micros() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

pub fn db_path(data_dir: &Path) -> PathBuf {
    data_dir.join("switchyard.db")
}

/// A read-only connection to the store of `data_dir`, for commands that only look.
pub fn open_reader(data_dir: &Path) -> StoreResult<Connection> {
    let path = db_path(data_dir);
    let err = |e: rusqlite::Error| StoreError::Open { path: path.display().to_string(), message: e.to_string() };
    let c = Connection::open_with_flags(&path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(err)?;
    c.busy_timeout(Duration::from_secs(30)).map_err(err)?;
    Ok(c)
}

fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(e.sqlite_error_code(), Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked))
}

fn open_connection(path: &Path, durability: Durability) -> StoreResult<Connection> {
    let err = |e: rusqlite::Error| StoreError::Open { path: path.display().to_string(), message: e.to_string() };
    let conn = Connection::open(path).map_err(err)?;
    conn.busy_timeout(Duration::from_secs(30)).map_err(err)?;
    // Switching a new file to WAL needs it alone; SQLite answers BUSY at once (without waiting)
    // when another process creates the store at the same moment: try again for a while.
    let started = std::time::Instant::now();
    while let Err(e) = conn.pragma_update(None, "journal_mode", "WAL") {
        if !is_busy(&e) || started.elapsed() > Duration::from_secs(30) {
            return Err(err(e));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    conn.pragma_update(None, "synchronous", if durability == Durability::Full { "FULL" } else { "NORMAL" }).map_err(err)?;
    Ok(conn)
}

/// What a job tells the writer: whether to keep its changes, and what to say to its caller once
/// the transaction's fate is known.
struct Done {
    /// The job's own error, if it failed; its changes are then rolled back.
    error: Option<StoreError>,
    reply: Box<dyn FnOnce(Option<StoreError>) + Send>,
}

/// A job gets the connection to run on, or `None` when the transaction could not even begin: then
/// it only says what to answer.
type Job = Box<dyn FnOnce(Option<&Connection>) -> Done + Send>;

/// Most jobs committed in one transaction.
const MAX_GROUP: usize = 512;

fn writer_loop(conn: Connection, jobs: mpsc::Receiver<Job>) {
    while let Ok(first) = jobs.recv() {
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match jobs.try_recv() {
                Ok(j) => group.push(j),
                Err(_) => break,
            }
        }
        let mut done = Vec::with_capacity(group.len());
        if let Err(e) = conn.execute_batch("BEGIN IMMEDIATE") {
            let e = StoreError::from(e);
            for job in group {
                (job(None).reply)(Some(e.clone()));
            }
            continue;
        }
        // Set when SQLite itself rolled the whole transaction back (disk full, I/O error): then
        // nothing of this group is stored, and every job hears so.
        let mut aborted: Option<StoreError> = None;
        for job in group {
            if let Some(e) = &aborted {
                (job(None).reply)(Some(e.clone()));
                continue;
            }
            if let Err(e) = conn.execute_batch("SAVEPOINT job") {
                done.push(fail_job(job(None), e.into()));
                continue;
            }
            let d = job(Some(&conn));
            if conn.is_autocommit() {
                let e = d.error.clone().unwrap_or_else(|| StoreError::Sql("the transaction was rolled back".into()));
                aborted = Some(e.clone());
                (d.reply)(Some(e));
                continue;
            }
            let d = if d.error.is_none() {
                match conn.execute_batch("RELEASE job") {
                    Ok(()) => d,
                    Err(e) => fail_job(d, e.into()),
                }
            } else {
                let _ = conn.execute_batch("ROLLBACK TO job; RELEASE job");
                d
            };
            done.push(d);
        }
        if let Some(e) = aborted {
            for d in done {
                (d.reply)(Some(e.clone()));
            }
            continue;
        }
        let committed = conn.execute_batch("COMMIT").map_err(StoreError::from);
        if committed.is_err() {
            let _ = conn.execute_batch("ROLLBACK");
        }
        for d in done {
            (d.reply)(committed.as_ref().err().cloned());
        }
    }
}

fn fail_job(d: Done, e: StoreError) -> Done {
    let reply = d.reply;
    Done { error: Some(e.clone()), reply: Box::new(move |_| reply(Some(e))) }
}

struct Inner {
    path: PathBuf,
    jobs: Mutex<Option<mpsc::SyncSender<Job>>>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Wakes the consumers of a queue when this process enqueued to it.
    wakers: Mutex<std::collections::HashMap<String, Arc<Notify>>>,
}

/// A handle to the store; cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Store({})", self.inner.path.display())
    }
}

impl Store {
    /// Opens (creating when needed) the store under `data_dir`.
    pub fn open(data_dir: &Path, durability: Durability) -> StoreResult<Store> {
        std::fs::create_dir_all(data_dir).map_err(|e| StoreError::Open { path: data_dir.display().to_string(), message: e.to_string() })?;
        let path = db_path(data_dir);
        let conn = open_connection(&path, durability)?;
        // In one immediate transaction: it waits for the write lock instead of failing when it
        // would have to upgrade a read lock while another process writes.
        conn.execute_batch(&format!("BEGIN IMMEDIATE; {SCHEMA} COMMIT;"))
            .map_err(|e| StoreError::Open { path: path.display().to_string(), message: e.to_string() })?;
        let (tx, rx) = mpsc::sync_channel::<Job>(4096);
        let writer = std::thread::Builder::new()
            .name("switchyard-store".into())
            .spawn(move || writer_loop(conn, rx))
            .map_err(|e| StoreError::Open { path: path.display().to_string(), message: e.to_string() })?;
        Ok(Store {
            inner: Arc::new(Inner {
                path,
                jobs: Mutex::new(Some(tx)),
                writer: Mutex::new(Some(writer)),
                wakers: Mutex::new(Default::default()),
            }),
        })
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// A read-only connection for queries that must not wait behind the writer.
    pub fn reader(&self) -> StoreResult<Connection> {
        open_reader(self.inner.path.parent().unwrap_or(Path::new(".")))
    }

    fn sender(&self) -> Option<mpsc::SyncSender<Job>> {
        self.inner.jobs.lock().expect("store lock").clone()
    }

    /// Runs `f` in the writer's next transaction; resolves after the commit.
    pub fn submit<T: Send + 'static>(&self, f: impl FnOnce(&Connection) -> StoreResult<T> + Send + 'static) -> Pending<T> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move |conn| {
            let result = match conn {
                Some(conn) => f(conn),
                None => Err(StoreError::Stopped),
            };
            Done {
                error: result.as_ref().err().cloned(),
                reply: Box::new(move |commit_error| {
                    let _ = tx.send(match commit_error {
                        Some(e) => Err(e),
                        None => result,
                    });
                }),
            }
        });
        let sent = self.sender().map(|s| s.send(job).is_ok()).unwrap_or(false);
        Pending(sent.then_some(rx))
    }

    /// `submit` for code outside the async runtime (the command line).
    pub fn submit_blocking<T: Send + 'static>(&self, f: impl FnOnce(&Connection) -> StoreResult<T> + Send + 'static) -> StoreResult<T> {
        let fut = self.submit(f);
        futures_lite_block_on(fut)
    }

    /// The notifier of `queue`'s consumers in this process.
    pub fn waker(&self, queue: &str) -> Arc<Notify> {
        self.inner.wakers.lock().expect("wakers lock").entry(queue.to_string()).or_default().clone()
    }

    pub(crate) fn wake(&self, queue: &str) {
        if let Some(n) = self.inner.wakers.lock().expect("wakers lock").get(queue) {
            n.notify_waiters();
        }
    }

    /// Stops the writer after the jobs already sent; later submissions fail with `Stopped`.
    pub fn close(&self) {
        self.inner.jobs.lock().expect("store lock").take();
        if let Some(w) = self.inner.writer.lock().expect("store lock").take() {
            let _ = w.join();
        }
    }
}

/// The answer to a submitted job: already on its way to the writer, awaited when convenient.
pub struct Pending<T>(Option<tokio::sync::oneshot::Receiver<StoreResult<T>>>);

impl<T> std::future::Future for Pending<T> {
    type Output = StoreResult<T>;
    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Self::Output> {
        match self.0.as_mut() {
            None => std::task::Poll::Ready(Err(StoreError::Stopped)),
            Some(rx) => std::pin::Pin::new(rx).poll(cx).map(|r| r.unwrap_or(Err(StoreError::Stopped))),
        }
    }
}

/// Waits for a future on the current thread; the store's futures need no reactor.
fn futures_lite_block_on<F: std::future::Future>(fut: F) -> F::Output {
    use std::task::{Context, Poll, Wake, Waker};
    struct Thread(std::thread::Thread);
    impl Wake for Thread {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(Thread(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut fut = std::pin::pin!(fut);
    loop {
        match fut.as_mut().poll(&mut cx) {
            Poll::Ready(v) => return v,
            Poll::Pending => std::thread::park(),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn temp_store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), Durability::Normal).unwrap();
        (dir, store)
    }

    #[test]
    fn a_failing_job_does_not_undo_the_others_in_its_group() {
        let (_dir, store) = temp_store();
        let a = store.submit(|c| {
            c.execute("INSERT INTO meta (key, value) VALUES ('a', '1')", [])?;
            Ok(())
        });
        let b = store.submit(|c| {
            c.execute("INSERT INTO meta (key, value) VALUES ('b', '1')", [])?;
            Err::<(), _>(StoreError::Refused("no".into()))
        });
        let c = store.submit(|c| {
            c.execute("INSERT INTO meta (key, value) VALUES ('c', '1')", [])?;
            Ok(())
        });
        assert!(futures_lite_block_on(a).is_ok());
        assert!(futures_lite_block_on(b).is_err());
        assert!(futures_lite_block_on(c).is_ok());
        let keys: Vec<String> = store
            .reader()
            .unwrap()
            .prepare("SELECT key FROM meta WHERE key IN ('a','b','c') ORDER BY key")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(keys, ["a", "c"]);
    }

    #[test]
    fn when_the_disk_is_full_every_answer_matches_what_was_stored() {
        let (_dir, store) = temp_store();
        let pages: i64 = store.submit_blocking(|c| Ok(c.query_row("PRAGMA page_count", [], |r| r.get(0))?)).unwrap();
        store.submit_blocking(move |c| Ok(c.query_row(&format!("PRAGMA max_page_count = {}", pages + 8), [], |_| Ok(()))?)).unwrap();
        let put = |key: &'static str, size: usize| {
            store.submit(move |c| {
                c.execute("INSERT INTO meta (key, value) VALUES (?1, ?2)", rusqlite::params![key, "x".repeat(size)])?;
                Ok(())
            })
        };
        // Three jobs in one group, most likely; the middle one cannot fit.
        let (a, b, c) = (put("a", 10), put("b", 1 << 20), put("c", 10));
        let answers = [("a", futures_lite_block_on(a)), ("b", futures_lite_block_on(b)), ("c", futures_lite_block_on(c))];
        assert!(answers[1].1.is_err(), "a megabyte does not fit in 8 pages");
        let reader = store.reader().unwrap();
        for (key, answer) in answers {
            let stored = reader.query_row("SELECT 1 FROM meta WHERE key = ?1", [key], |_| Ok(())).is_ok();
            assert_eq!(stored, answer.is_ok(), "job {key}: answered {answer:?} but stored = {stored}");
        }
    }
}
