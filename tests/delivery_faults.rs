//! Fault tests with counts (issue 5), on the embedded queue and on RabbitMQ, with the shared state
//! (idempotency keys, exception records) in the data directory (SQLite) or in PostgreSQL. 10,000 orders go through a pipeline with
//! one `http` sink (tests/faults/) to a flaky receiver in this process: random 500s, 429s with
//! `Retry-After`, answers slower than the sink's timeout (the order is taken all the same), slow
//! answers, one outage of 1.5 s (503 to everything: the sink's circuit opens and work is held
//! back), and a fixed set of orders refused for good (422). About one order in ten is sent two
//! to five times, the copies spread through the stream; the orders go in four chunks while the
//! engine runs, and the engine is killed (SIGKILL) and restarted twice mid-run, then `run --once`
//! drains the rest. Afterwards:
//!
//! - the receiver took every order that is not refused exactly once as a first delivery (it
//!   answers a repeated `Idempotency-Key` with 200 and counts it: at-least-once redeliveries after
//!   a kill or a timeout), and none of the refused ones;
//! - the exception store (PostgreSQL when shared; else the data directory, or a RabbitMQ-fed
//!   pipeline's dead-letter queue) holds exactly the refused orders, one `sink_rejected` record
//!   per copy sent (a failed message records no key); over RabbitMQ a message dead-lettered again
//!   after a kill (same message id) is counted once; PostgreSQL keeps one open record per message;
//! - received = delivered + exceptions + duplicates dropped, the duplicates being the copies of
//!   the delivered orders; the test prints those counts.
//!
//! RabbitMQ (127.0.0.1:5672, or `SWITCHYARD_AMQP_URL`) and PostgreSQL (`test_postgres_url()`)
//! cases print `skipped: ...` without their server, unless `SWITCHYARD_REQUIRE_BROKER=1`. Other
//! test binaries may restart RabbitMQ meanwhile: the engine reconnects by itself, an engine that
//! found it away at start is started again, and a case whose `switchyard send` was cut off
//! (how many messages went in is then unknown) starts again with new queues.
//! `SWITCHYARD_FAULT_SEED` picks another set of orders and faults; `SWITCHYARD_FAULT_KEEP=1`
//! keeps each case's inputs, data directory and engine logs.
#![cfg(unix)]

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use lapin::options::{
    BasicAckOptions, BasicGetOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Distinct orders.
const ORDERS: usize = 10_000;
/// Orders whose number is a multiple of this are refused for good (422): 99 of them.
const REFUSED_EVERY: usize = 101;
/// About one order in this many is sent two to five times.
const REPEATED_ONE_IN: u32 = 10;
const CHUNKS: usize = 4;
const DEFAULT_SEED: u64 = 5;
/// The longest a case waits for any one step (a chunk of progress, the final drain).
const STEP_LIMIT: Duration = Duration::from_secs(120);
const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
/// The retry tiers of tests/faults/rabbitmq.yaml, as RabbitMQ queue name suffixes.
const RETRY_TIERS: [&str; 3] = ["200ms", "500ms", "1s"];

// What the receiver does with a request, by a roll of its seeded generator. A `Retry-After`
// holds back every message of the sink for its duration (1 s at least), so 429s are rarer than
// the other faults: at a few percent of some 13,000 requests they alone would take minutes.
const P_500: f64 = 0.08;
const P_429: f64 = 0.0015;
/// The order is recorded, then the answer comes after the sink's `timeout` (300ms): the engine
/// gives up and tries again, and the receiver gets it twice.
const P_TIMEOUT: f64 = 0.02;
const P_SLOW: f64 = 0.05;
const TIMEOUT_SLEEP: Duration = Duration::from_millis(450);
/// Once, mid-run, the receiver answers 503 to everything for this long: the sink's circuit opens
/// (5 failures in a row) and its messages are held back in their queue.
const OUTAGE: Duration = Duration::from_millis(1500);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("repo root").to_path_buf()
}

fn seed() -> u64 {
    std::env::var("SWITCHYARD_FAULT_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(DEFAULT_SEED)
}

fn order_id(i: usize) -> String {
    format!("SO{:05}", i + 1)
}

/// The order index of an id, if it is one of ours.
fn order_index(id: &str) -> Option<usize> {
    id.strip_prefix("SO").and_then(|n| n.parse::<usize>().ok()).filter(|n| (1..=ORDERS).contains(n)).map(|n| n - 1)
}

fn refused(i: usize) -> bool {
    (i + 1).is_multiple_of(REFUSED_EVERY)
}

fn key(i: usize) -> String {
    format!("web:{}", order_id(i))
}

// ---------------------------------------------------------------------------------------------
// The orders sent.

/// How many copies of each order are sent, and the order of the stream.
struct Plan {
    copies: Vec<u32>,
    /// Order index of each message, in the order sent.
    stream: Vec<usize>,
}

impl Plan {
    fn new(seed: u64) -> Plan {
        let mut rng = fastrand::Rng::with_seed(seed);
        let copies: Vec<u32> = (0..ORDERS).map(|_| if rng.u32(0..REPEATED_ONE_IN) == 0 { rng.u32(2..=5) } else { 1 }).collect();
        let mut stream: Vec<usize> = copies.iter().enumerate().flat_map(|(i, &c)| std::iter::repeat_n(i, c as usize)).collect();
        rng.shuffle(&mut stream);
        // Copies spread through the stream: never two of one order side by side.
        for _ in 0..100 {
            let mut moved = false;
            for k in 1..stream.len() {
                if stream[k] == stream[k - 1] {
                    let other = rng.usize(..stream.len());
                    stream.swap(k, other);
                    moved = true;
                }
            }
            if !moved {
                break;
            }
        }
        assert!(stream.windows(2).all(|w| w[0] != w[1]), "copies are spread");
        let plan = Plan { copies, stream };
        assert!((0..ORDERS).any(|i| refused(i) && plan.copies[i] > 1), "seed {seed}: some refused order is sent more than once");
        plan
    }

    fn chunk_files(&self, dir: &Path) -> Vec<PathBuf> {
        let size = self.stream.len().div_ceil(CHUNKS);
        self.stream
            .chunks(size)
            .enumerate()
            .map(|(k, part)| {
                let path = dir.join(format!("chunk-{k}.ndjson"));
                let text: String = part
                    .iter()
                    .map(|&i| format!("{{\"order_id\": \"{}\", \"total\": \"{}.{:02}\"}}\n", order_id(i), 10 + i % 90, i % 100))
                    .collect();
                std::fs::write(&path, text).unwrap();
                path
            })
            .collect()
    }

    fn sent(&self) -> usize {
        self.stream.len()
    }
}

// ---------------------------------------------------------------------------------------------
// The flaky receiver (the ERP side of the test).

#[derive(Debug, Default, Clone)]
struct Tally {
    requests: u64,
    e500: u64,
    e429: u64,
    timeouts: u64,
    slow: u64,
    refusals: u64,
    /// 503s during the outage.
    outage: u64,
    /// Requests without the key of the order they name (must stay 0).
    bad: u64,
}

/// Keeps each order once by its `Idempotency-Key`; answers with faults chosen at random.
struct Flaky {
    /// Key -> 2xx answers given for it (the first delivery, then repeats).
    taken: Mutex<HashMap<String, u32>>,
    first: AtomicUsize,
    tally: Mutex<Tally>,
    rng: Mutex<fastrand::Rng>,
    /// Until then everything is answered 503 (the ERP is down: the sink's circuit opens).
    down_until: Mutex<Option<Instant>>,
}

impl Flaky {
    fn new(seed: u64) -> Arc<Flaky> {
        Arc::new(Flaky {
            taken: Mutex::default(),
            first: AtomicUsize::new(0),
            tally: Mutex::default(),
            rng: Mutex::new(fastrand::Rng::with_seed(seed ^ 0x5eed)),
            down_until: Mutex::default(),
        })
    }

    async fn start(self: &Arc<Self>) -> String {
        async fn answer(State(f): State<Arc<Flaky>>, uri: Uri, headers: HeaderMap) -> Response {
            let id = uri.path().strip_prefix("/orders/").unwrap_or_default().to_string();
            let key = headers.get("idempotency-key").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
            let (roll, slow_ms) = {
                let mut r = f.rng.lock().unwrap();
                (r.f64(), r.u64(30..=80))
            };
            let tally = |t: fn(&mut Tally)| {
                let mut g = f.tally.lock().unwrap();
                g.requests += 1;
                t(&mut g);
            };
            let Some(i) = order_index(&id).filter(|&i| key == self::key(i)) else {
                tally(|t| t.bad += 1);
                return (StatusCode::BAD_REQUEST, format!("no key for order {id}: {key:?}")).into_response();
            };
            if f.down_until.lock().unwrap().is_some_and(|t| Instant::now() < t) {
                tally(|t| t.outage += 1);
                return (StatusCode::SERVICE_UNAVAILABLE, "down for maintenance").into_response();
            }
            if roll < P_500 {
                tally(|t| t.e500 += 1);
                return (StatusCode::INTERNAL_SERVER_ERROR, "try again").into_response();
            }
            if roll < P_500 + P_429 {
                tally(|t| t.e429 += 1);
                return (StatusCode::TOO_MANY_REQUESTS, [("retry-after", "1")], "slow down").into_response();
            }
            if refused(i) {
                tally(|t| t.refusals += 1);
                return (StatusCode::UNPROCESSABLE_ENTITY, format!("order {id} cannot be booked")).into_response();
            }
            {
                let mut taken = f.taken.lock().unwrap();
                let n = taken.entry(key).or_default();
                *n += 1;
                if *n == 1 {
                    f.first.fetch_add(1, Ordering::SeqCst);
                }
            }
            let after = roll - P_500 - P_429;
            if after < P_TIMEOUT {
                tally(|t| t.timeouts += 1);
                tokio::time::sleep(TIMEOUT_SLEEP).await;
            } else if after < P_TIMEOUT + P_SLOW {
                tally(|t| t.slow += 1);
                tokio::time::sleep(Duration::from_millis(slow_ms)).await;
            } else {
                tally(|_| {});
            }
            StatusCode::NO_CONTENT.into_response()
        }
        let app = Router::new().fallback(any(answer)).with_state(self.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        base
    }

    /// Answers 503 to everything for a while.
    fn go_down(&self, d: Duration) {
        *self.down_until.lock().unwrap() = Some(Instant::now() + d);
    }

    fn first_deliveries(&self) -> usize {
        self.first.load(Ordering::SeqCst)
    }
}

// ---------------------------------------------------------------------------------------------
// Transports and stores.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    Embedded,
    RabbitMq,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyStore {
    Sqlite,
    Postgres,
}

fn amqp_url() -> String {
    std::env::var("SWITCHYARD_AMQP_URL").ok().filter(|u| !u.is_empty()).unwrap_or_else(|| DEFAULT_AMQP_URL.to_string())
}

/// The broker URL, or None (printed) when there is none; panics then with
/// SWITCHYARD_REQUIRE_BROKER=1, after waiting a minute for it (another test may be restarting it).
fn broker_or_skip() -> Option<String> {
    let required = std::env::var("SWITCHYARD_REQUIRE_BROKER").as_deref() == Ok("1");
    let deadline = Instant::now() + if required { Duration::from_secs(60) } else { Duration::ZERO };
    loop {
        let reachable = std::net::TcpStream::connect_timeout(&"127.0.0.1:5672".parse().unwrap(), Duration::from_secs(2)).is_ok()
            || std::env::var("SWITCHYARD_AMQP_URL").is_ok_and(|u| !u.is_empty());
        if reachable {
            return Some(amqp_url());
        }
        if Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    assert!(!required, "no RabbitMQ at 127.0.0.1:5672 and SWITCHYARD_REQUIRE_BROKER=1");
    println!("skipped: no RabbitMQ at 127.0.0.1:5672");
    None
}

/// Runs `f` on a channel of a fresh connection; None when the broker did not answer in time
/// (restarting, say): the caller tries again.
fn with_broker<T, F, Fut>(rt: &tokio::runtime::Runtime, f: F) -> Option<T>
where
    F: FnOnce(lapin::Channel) -> Fut,
    Fut: std::future::Future<Output = lapin::Result<T>>,
{
    rt.block_on(async {
        let work = async {
            let conn = lapin::Connection::connect(
                &amqp_url(),
                lapin::ConnectionProperties::default().with_connection_name("delivery_faults test".into()),
            )
            .await?;
            let out = f(conn.create_channel().await?).await;
            let _ = conn.close(200, "done".into()).await;
            out
        };
        tokio::time::timeout(Duration::from_secs(20), work).await.ok()?.ok()
    })
}

/// Tries `f` until it answers, for up to a minute.
fn broker_retrying<T, F, Fut>(rt: &tokio::runtime::Runtime, what: &str, f: F) -> T
where
    F: Fn(lapin::Channel) -> Fut,
    Fut: std::future::Future<Output = lapin::Result<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(v) = with_broker(rt, &f) {
            return v;
        }
        assert!(Instant::now() < deadline, "RabbitMQ did not answer for a minute: {what}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// One case's names, directories and servers; removes its queues and PostgreSQL schema when
/// dropped, pass or fail.
struct Scene {
    label: String,
    transport: Transport,
    dir: tempfile::TempDir,
    prefix: String,
    base: String,
    postgres: Option<String>,
    rt: tokio::runtime::Runtime,
}

impl Scene {
    fn pipeline(&self) -> PathBuf {
        repo().join(match self.transport {
            Transport::Embedded => "tests/faults/embedded.yaml",
            Transport::RabbitMq => "tests/faults/rabbitmq.yaml",
        })
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The queue `switchyard send` writes: the embedded queue, or the RabbitMQ exchange.
    fn send_queue(&self) -> String {
        match self.transport {
            Transport::Embedded => "faults.orders".into(),
            Transport::RabbitMq => format!("{}.orders", self.prefix),
        }
    }

    fn work_queue(&self) -> String {
        format!("{}.orders.work", self.prefix)
    }

    fn dlq(&self) -> String {
        format!("{}.dlq", self.work_queue())
    }

    /// The work queue and its retry queues.
    fn pending_queues(&self) -> Vec<String> {
        let w = self.work_queue();
        std::iter::once(w.clone()).chain(RETRY_TIERS.iter().map(|t| format!("{w}.retry.{t}"))).collect()
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_switchyard"));
        c.args(args)
            .current_dir(repo())
            .env("SWITCHYARD_DATA_DIR", self.data())
            .env("FAULT_URL", &self.base)
            .env("FAULT_PREFIX", &self.prefix)
            .env("NO_COLOR", "1")
            .env_remove("RUST_LOG")
            .env_remove("SWITCHYARD_STORE")
            .env_remove("SWITCHYARD_BROKER")
            .stdin(Stdio::null());
        if let Some(store) = &self.postgres {
            c.env("SWITCHYARD_STORE", store);
        }
        if self.transport == Transport::RabbitMq {
            c.env("SWITCHYARD_BROKER", amqp_url());
        }
        c
    }

    /// `switchyard run PIPELINE [--once]`, its output appended to `<name>.log`.
    fn spawn(&self, name: &str, once: bool) -> Child {
        std::fs::create_dir_all(self.data()).unwrap();
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.log_path(name)).unwrap();
        let pipeline = self.pipeline();
        let mut args = vec!["run", pipeline.to_str().unwrap(), "--log-level", "warn"];
        if once {
            args.push("--once");
        }
        self.command(&args).stdout(log.try_clone().unwrap()).stderr(log).spawn().unwrap()
    }

    fn log_path(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.log"))
    }

    /// The end of an engine's output (the retries logged before it can be many).
    fn log(&self, name: &str) -> String {
        let text = std::fs::read_to_string(self.log_path(name)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    }

    /// `switchyard send QUEUE FILE`. A send that could not connect (RabbitMQ restarting) sent
    /// nothing and is tried again; one cut off midway may have sent any part of the file: how
    /// many messages went in is unknown, and the case starts again (Err).
    fn send(&self, file: &Path) -> Result<(), String> {
        let deadline = Instant::now() + STEP_LIMIT;
        loop {
            let out = self.command(&["send", &self.send_queue(), file.to_str().unwrap()]).output().unwrap();
            if out.status.success() {
                return Ok(());
            }
            let said = String::from_utf8_lossy(&out.stderr).to_string();
            let unsent = self.transport == Transport::RabbitMq && said.contains("cannot connect to RabbitMQ");
            if self.transport == Transport::RabbitMq && said.contains("before the error") {
                return Err(format!("`switchyard send` was cut off by RabbitMQ: {}", said.trim()));
            }
            assert!(unsent && Instant::now() < deadline, "{}: send {} failed: {said}", self.label, file.display());
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Declares what `switchyard send` publishes to (tests/faults/rabbitmq.yaml declares the
    /// same): sending never races the engine's first connection.
    fn declare(&self) {
        if self.transport != Transport::RabbitMq {
            return;
        }
        let (exchange, queue) = (self.send_queue(), self.work_queue());
        broker_retrying(&self.rt, "declaring the topology", |ch| {
            let (exchange, queue) = (exchange.clone(), queue.clone());
            async move {
                let durable = ExchangeDeclareOptions { durable: true, ..Default::default() };
                ch.exchange_declare(exchange.as_str().into(), lapin::ExchangeKind::Fanout, durable, FieldTable::default()).await?;
                let durable = QueueDeclareOptions { durable: true, ..Default::default() };
                ch.queue_declare(queue.as_str().into(), durable, FieldTable::default()).await?;
                ch.queue_bind(queue.as_str().into(), exchange.as_str().into(), "".into(), Default::default(), FieldTable::default()).await
            }
        });
    }

    /// Exception records (the shared store, or the embedded one) or dead-lettered messages
    /// (RabbitMQ without a shared store).
    fn exceptions(&self) -> Vec<Failed> {
        match (self.transport, &self.postgres) {
            (Transport::RabbitMq, None) => self.dead_lettered(),
            _ => {
                let out = self.command(&["exceptions", "list", "--format", "json", "--limit", "100000"]).output().unwrap();
                assert!(out.status.success(), "exceptions list: {}", String::from_utf8_lossy(&out.stderr));
                let records: Value = serde_json::from_slice(&out.stdout).unwrap();
                let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
                records
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|r| {
                        let payload: Value = serde_json::from_str(r["original_payload"].as_str().unwrap_or("null")).unwrap_or(Value::Null);
                        Failed {
                            order: order_index(payload["order_id"].as_str().unwrap_or_default()),
                            reason: text(&r["reason"]),
                            key: text(&r["idempotency_key"]),
                            message_id: text(&r["message_id"]),
                        }
                    })
                    .collect()
            }
        }
    }

    /// The messages in the dead-letter queue (taken from it).
    fn dead_lettered(&self) -> Vec<Failed> {
        match self.transport {
            Transport::Embedded => Vec::new(),
            Transport::RabbitMq => {
                let dlq = self.dlq();
                // Taken unacknowledged, then acknowledged at once: a broker restart meanwhile
                // gives them all back, and the count starts again.
                broker_retrying(&self.rt, "reading the dead-letter queue", |ch| {
                    let dlq = dlq.clone();
                    async move {
                        let mut out = Vec::new();
                        let mut last = None;
                        while let Some(m) = ch.basic_get(dlq.as_str().into(), BasicGetOptions { no_ack: false }).await? {
                            let d = m.delivery;
                            let body: Value = serde_json::from_slice(&d.data).unwrap_or(Value::Null);
                            let order = order_index(body["order_id"].as_str().unwrap_or_default());
                            let reason = match d.properties.headers().as_ref().and_then(|h| h.inner().get("x-switchyard-reason")) {
                                Some(AMQPValue::LongString(s)) => s.to_string(),
                                other => format!("{other:?}"),
                            };
                            // The key is not a header of dead letters: the one its order makes.
                            let key = order.map(key).unwrap_or_default();
                            let message_id = d.properties.message_id().as_ref().map(|m| m.to_string()).unwrap_or_default();
                            out.push(Failed { order, reason, key, message_id });
                            last = Some(d.acker);
                        }
                        if let Some(acker) = last {
                            acker.ack(BasicAckOptions { multiple: true }).await?;
                        }
                        Ok(out)
                    }
                })
            }
        }
    }

    /// Messages still waiting to be processed (queued, delayed for a retry, in flight).
    fn left(&self) -> u64 {
        match self.transport {
            Transport::Embedded => {
                let out = self.command(&["queues", "--format", "json"]).output().unwrap();
                assert!(out.status.success(), "queues: {}", String::from_utf8_lossy(&out.stderr));
                let v: Value = serde_json::from_slice(&out.stdout).unwrap();
                let mut total = 0;
                count_fields(&v, &["ready", "in_flight", "delayed"], &mut total);
                total
            }
            Transport::RabbitMq => {
                let queues = self.pending_queues();
                broker_retrying(&self.rt, "counting the queues", |ch| {
                    let queues = queues.clone();
                    async move {
                        let mut n = 0;
                        for q in &queues {
                            let opts = QueueDeclareOptions { passive: true, ..Default::default() };
                            n += u64::from(ch.queue_declare(q.as_str().into(), opts, FieldTable::default()).await?.message_count());
                        }
                        Ok(n)
                    }
                })
            }
        }
    }
}

/// An exception record, or a dead-lettered message.
struct Failed {
    order: Option<usize>,
    reason: String,
    key: String,
    /// The id the message was sent with (`switchyard send` gives each message its own).
    message_id: String,
}

/// Sums the numeric fields of these names anywhere in `v`.
fn count_fields(v: &Value, names: &[&str], total: &mut u64) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                match x.as_u64() {
                    Some(n) if names.contains(&k.as_str()) => *total += n,
                    _ => count_fields(x, names, total),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|x| count_fields(x, names, total)),
        _ => {}
    }
}

impl Drop for Scene {
    fn drop(&mut self) {
        if self.transport == Transport::RabbitMq {
            let mut queues = self.pending_queues();
            queues.push(self.dlq());
            let exchange = self.send_queue();
            let deleted = (0..60).any(|_| {
                let (queues, exchange) = (queues.clone(), exchange.clone());
                let done = with_broker(&self.rt, |ch| async move {
                    for q in &queues {
                        ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default()).await?;
                    }
                    ch.exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default()).await?;
                    Ok(())
                });
                done.is_some() || {
                    std::thread::sleep(Duration::from_secs(1));
                    false
                }
            });
            if !deleted {
                eprintln!("{}: could not delete the queues {queues:?}", self.label);
            }
        }
        if let Some(url) = &self.postgres {
            let dropped = self.rt.block_on(async { switchyard::store::PostgresStore::connect(url).await?.drop_schema().await });
            if let Err(e) = dropped {
                eprintln!("{}: could not drop the PostgreSQL schema: {e}", self.label);
            }
        }
    }
}

/// A running engine, SIGKILLed when dropped.
struct Engine<'a> {
    scene: &'a Scene,
    name: &'static str,
    once: bool,
    child: Option<Child>,
    /// Where this process's output starts in the log.
    log_from: usize,
}

impl<'a> Engine<'a> {
    fn start(scene: &'a Scene, name: &'static str, once: bool) -> Engine<'a> {
        let log_from = std::fs::read(scene.log_path(name)).map_or(0, |l| l.len());
        Engine { scene, name, once, child: Some(scene.spawn(name, once)), log_from }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// The exit status once it stopped. An engine that stopped because RabbitMQ was away when it
    /// started (another test restarting the broker) is started again: None.
    fn exited(&mut self) -> Option<ExitStatus> {
        let status = self.child.as_mut().and_then(|c| c.try_wait().unwrap())?;
        self.child = None;
        let log = std::fs::read(self.scene.log_path(self.name)).unwrap_or_default();
        let own = String::from_utf8_lossy(&log[self.log_from.min(log.len())..]).to_string();
        if !status.success() && self.scene.transport == Transport::RabbitMq && own.contains("cannot connect to RabbitMQ") {
            eprintln!("{}: engine {} could not reach RabbitMQ at start; starting it again", self.scene.label, self.name);
            std::thread::sleep(Duration::from_secs(1));
            *self = Engine::start(self.scene, self.name, self.once);
            return None;
        }
        Some(status)
    }
}

impl Drop for Engine<'_> {
    fn drop(&mut self) {
        self.kill();
    }
}

// ---------------------------------------------------------------------------------------------
// The driver.

/// Runs one case. Over RabbitMQ, a `switchyard send` cut off by a broker restart (another test
/// binary restarts it) leaves the number of messages sent unknown: the case then starts again
/// with new queues, at most three times.
fn drive(transport: Transport, store: KeyStore) {
    let label = format!(
        "{}+{}",
        match transport {
            Transport::Embedded => "embedded",
            Transport::RabbitMq => "rabbitmq",
        },
        match store {
            KeyStore::Sqlite => "sqlite",
            KeyStore::Postgres => "postgres",
        }
    );
    if transport == Transport::RabbitMq && broker_or_skip().is_none() {
        return;
    }
    let postgres = match store {
        KeyStore::Sqlite => None,
        KeyStore::Postgres => match switchyard::store::test_postgres_url() {
            Some(url) => Some(url),
            None => return,
        },
    };
    for attempt in 1..=3 {
        match run_case(&label, transport, postgres.as_deref()) {
            Ok(()) => return,
            Err(why) => eprintln!("{label}: {why}; the case starts again ({attempt} of 3)"),
        }
    }
    panic!("{label}: RabbitMQ cut the sends off three times");
}

fn run_case(label: &str, transport: Transport, postgres: Option<&str>) -> Result<(), String> {
    let unique = format!(
        "{}x{}x{}",
        std::process::id(),
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_micros() % 1_000_000_000,
        label.replace('+', "x")
    );
    let started = Instant::now();
    let seed = seed();
    let plan = Plan::new(seed);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let receiver = Flaky::new(seed);
    let base = rt.block_on(receiver.start());
    let mut dir = tempfile::tempdir().unwrap();
    if std::env::var("SWITCHYARD_FAULT_KEEP").is_ok() {
        dir.disable_cleanup(true);
        eprintln!("{label}: data, logs and inputs kept in {}", dir.path().display());
    }
    let scene = Scene {
        label: label.to_string(),
        transport,
        dir,
        prefix: format!("delivery-faults.{unique}"),
        base,
        postgres: postgres.map(|url| format!("{url}?schema=sy_faults_{unique}")),
        rt,
    };
    let chunks = plan.chunk_files(scene.dir.path());
    let expected: usize = (0..ORDERS).filter(|&i| !refused(i)).count();
    let at = |percent: usize| expected * percent / 100;

    // Waits until the receiver took `n` orders for the first time, while `engine` runs.
    let wait_for = |n: usize, engine: &mut Engine| {
        let deadline = Instant::now() + STEP_LIMIT;
        while receiver.first_deliveries() < n {
            if let Some(status) = engine.exited() {
                panic!("{label}: engine {} stopped ({status}) before {n} orders were taken: {}", engine.name, scene.log(engine.name));
            }
            assert!(
                Instant::now() < deadline,
                "{label}: {} of {n} orders taken after {STEP_LIMIT:?}: {}",
                receiver.first_deliveries(),
                scene.log(engine.name)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };

    // First engine: the first three chunks go in while it runs; killed at ~30 %.
    scene.declare();
    let mut e1 = Engine::start(&scene, "e1", false);
    scene.send(&chunks[0])?;
    wait_for(at(10), &mut e1);
    scene.send(&chunks[1])?;
    wait_for(at(20), &mut e1);
    scene.send(&chunks[2])?;
    wait_for(at(30), &mut e1);
    e1.kill();
    let first_kill = receiver.first_deliveries();

    // Second engine: the last chunk, and the ERP down for a while (the circuit opens, work is
    // held back); killed at ~60 %.
    let mut e2 = Engine::start(&scene, "e2", false);
    wait_for(at(40), &mut e2);
    scene.send(&chunks[3])?;
    wait_for(at(45), &mut e2);
    receiver.go_down(OUTAGE);
    wait_for(at(60), &mut e2);
    e2.kill();
    let second_kill = receiver.first_deliveries();

    // Then `run --once` takes what is left, retries included, and exits.
    let mut e3 = Engine::start(&scene, "e3", true);
    let deadline = Instant::now() + STEP_LIMIT;
    let status = loop {
        if let Some(s) = e3.exited() {
            break s;
        }
        if Instant::now() > deadline {
            e3.kill();
            panic!(
                "{label}: `run --once` did not finish within {STEP_LIMIT:?} ({} of {expected} orders taken): {}",
                receiver.first_deliveries(),
                scene.log("e3")
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{label}: run --once exited with {status}: {}", scene.log("e3"));

    // Where every message went.
    let taken = receiver.taken.lock().unwrap().clone();
    let tally = receiver.tally.lock().unwrap().clone();
    assert_eq!(tally.bad, 0, "{label}: every request carried its order's idempotency key");
    let mut missing: Vec<String> = Vec::new();
    let mut wrong: Vec<String> = Vec::new();
    for i in 0..ORDERS {
        match (refused(i), taken.contains_key(&key(i))) {
            (false, false) => missing.push(order_id(i)),
            (true, true) => wrong.push(order_id(i)),
            _ => {}
        }
    }
    let exceptions = scene.exceptions();
    let mut dead: BTreeMap<usize, u32> = BTreeMap::new();
    let mut dead_ids: HashMap<&str, u32> = HashMap::new();
    for f in &exceptions {
        let Some(i) = f.order.filter(|&i| refused(i)) else {
            panic!("{label}: only refused orders are exceptions, not {} ({})", f.key, f.reason)
        };
        assert_eq!((f.reason.as_str(), f.key.as_str()), ("sink_rejected", key(i).as_str()), "{label}: the exception of {}", order_id(i));
        assert!(!f.message_id.is_empty(), "{label}: the exception of {} carries its message id", order_id(i));
        let n = dead_ids.entry(&f.message_id).or_default();
        *n += 1;
        if *n == 1 {
            *dead.entry(i).or_default() += 1;
        }
    }
    // The same message dead-lettered again: killed after the dead-letter queue confirmed it and
    // before the acknowledgement (at least once, with its message id). The embedded store
    // commits a record with the removal of its message, PostgreSQL keeps one open record per
    // message: once.
    let dead_repeats: u32 = dead_ids.values().map(|n| n - 1).sum();
    if transport == Transport::Embedded || postgres.is_some() {
        assert_eq!(dead_repeats, 0, "{label}: each failed message is recorded once");
    }
    if postgres.is_some() {
        let dead = scene.dead_lettered();
        assert!(dead.is_empty(), "{label}: with a shared store nothing goes to the dead-letter queue, yet {} did", dead.len());
        // A refused order is refused on every delivery: none of its records is closed as delivered.
        let out = scene.command(&["exceptions", "list", "--status", "superseded", "--format", "json"]).output().unwrap();
        let closed: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        assert_eq!(closed.as_array().map(Vec::len), Some(0), "{label}: no record superseded: {closed}");
    }
    let left = scene.left();

    let received = plan.sent();
    let delivered = taken.len();
    let excepted = dead_ids.len();
    let dropped = received as i64 - delivered as i64 - excepted as i64;
    let repeats: u32 = taken.values().map(|n| n - 1).sum();
    let counts = format!(
        "{label}: received {received} = delivered {delivered} + exceptions {excepted} + duplicates dropped {dropped}; \
         receiver repeats {repeats} (at-least-once redeliveries after kills/timeouts){}; {} requests: 500s {}, 429s {}, timeouts {}, slow {}, \
         refusals {}, 503s in an outage {}; killed at {first_kill} and {second_kill} orders taken; {:.1?}",
        if transport == Transport::RabbitMq { format!(", dead-letter repeats {dead_repeats}") } else { String::new() },
        tally.requests,
        tally.e500,
        tally.e429,
        tally.timeouts,
        tally.slow,
        tally.refusals,
        tally.outage,
        started.elapsed()
    );
    // Straight to stderr, not through the test harness's capture: `cargo test` shows it for a
    // test that passes too.
    let _ = writeln!(std::io::stderr().lock(), "{counts}");

    assert!(
        missing.is_empty(),
        "{label}: {} order(s) never reached the receiver, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(20)]
    );
    assert!(wrong.is_empty(), "{label}: refused orders were taken: {wrong:?}");
    assert_eq!(delivered, expected, "{label}: each order that is not refused taken once");
    let want_dead: BTreeMap<usize, u32> = (0..ORDERS).filter(|&i| refused(i)).map(|i| (i, plan.copies[i])).collect();
    assert_eq!(dead, want_dead, "{label}: one exception per copy of each refused order, nothing else");
    let copies_of_delivered: i64 = (0..ORDERS).filter(|&i| !refused(i)).map(|i| i64::from(plan.copies[i]) - 1).sum();
    assert_eq!(dropped, copies_of_delivered, "{label}: the duplicates dropped are the extra copies of the delivered orders");
    assert_eq!(left, 0, "{label}: nothing is left in the queues");
    assert!(first_kill < expected && second_kill < expected, "{label}: the kills struck while orders were flowing");
    Ok(())
}

#[test]
fn embedded_queue_sqlite_keys() {
    drive(Transport::Embedded, KeyStore::Sqlite);
}

#[test]
fn embedded_queue_postgres_keys() {
    drive(Transport::Embedded, KeyStore::Postgres);
}

#[test]
fn rabbitmq_sqlite_keys() {
    drive(Transport::RabbitMq, KeyStore::Sqlite);
}

#[test]
fn rabbitmq_postgres_keys() {
    drive(Transport::RabbitMq, KeyStore::Postgres);
}
