//! Commands that operate the runtime and its store: `run`, `send`, `queues`, `exceptions`.

use clap::{Args, Subcommand, ValueEnum};
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use switchyard::message::RawMessage;
use switchyard::runtime::envelope::StoredHeaders;
use switchyard::runtime::{Reloader, RunOptions, Runtime, Summary};
use switchyard::source::file::{NdjsonLines, split};
use switchyard::source::{CsvOptions, Format};
use switchyard::store::{self, Durability, ExceptionFilter, NewMessage, Store, StoredException};

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Listing {
    Human,
    Json,
}

fn durability() -> Result<Durability, ExitCode> {
    Durability::from_env().map_err(|e| {
        eprintln!("error: {e}");
        ExitCode::from(2)
    })
}

fn must_exist(data_dir: &Path) -> Result<(), ExitCode> {
    if store::db_path(data_dir).exists() {
        return Ok(());
    }
    eprintln!(
        "error: there is no store in {} yet; `switchyard run` or `switchyard send` creates it (or pass --data-dir)",
        data_dir.display()
    );
    Err(ExitCode::from(2))
}

/// Opens the store of a data directory that must already exist, to change it.
fn open_existing(data_dir: &Path) -> Result<Store, ExitCode> {
    must_exist(data_dir)?;
    Store::open(data_dir, durability()?).map_err(|e| {
        eprintln!("error: {e}");
        ExitCode::from(2)
    })
}

/// A read-only connection, for commands that only look: they neither wait for a running
/// engine's writes nor need permission to write.
fn look(data_dir: &Path) -> Result<rusqlite::Connection, ExitCode> {
    must_exist(data_dir)?;
    store::open_reader(data_dir).map_err(|e| {
        eprintln!("error: {e}");
        ExitCode::from(2)
    })
}

// ---------------------------------------------------------------- run

/// `shared`: exception records go to the shared store (`--store`).
fn print_summary(s: &Summary, version: &str, file: &Path, shared: bool) {
    eprintln!("{} {} ({})", s.pipeline, version, file.display());
    eprintln!("  from {}", s.input);
    if s.ingested > 0 {
        eprintln!("  ingested    {:>6}", s.ingested);
    }
    eprintln!("  in          {:>6}", s.received);
    eprintln!("  routed      {:>6}", s.routed);
    for (sink, n) in &s.outputs {
        eprintln!("    {sink:<22} {n:>6}  -> {}", s.targets[sink]);
    }
    match &s.dead_letter_queue {
        _ if shared => eprintln!(
            "  exceptions  {:>6}  -> the shared store: `switchyard exceptions list --pipeline {}` (with the same --store)",
            s.exception_count(),
            s.pipeline
        ),
        Some(q) => eprintln!("  exceptions  {:>6}  -> RabbitMQ dead-letter queue {q}", s.exception_count()),
        None => eprintln!("  exceptions  {:>6}  -> `switchyard exceptions list --pipeline {}`", s.exception_count(), s.pipeline),
    }
    for (reason, n) in &s.exceptions {
        eprintln!("    {reason:<22} {n:>6}");
    }
    if s.duplicates > 0 {
        eprintln!("  duplicates  {:>6}  (already delivered: not delivered again)", s.duplicates);
    }
    if s.retried > 0 {
        eprintln!("  retried     {:>6}  (delivered again later)", s.retried);
    }
    if s.stale > 0 {
        eprintln!("  stale       {:>6}  (older than the last event applied for their entity: dropped)", s.stale);
    }
    if s.parked > 0 {
        eprintln!("  waited      {:>6}  (deliveries put back to wait for an earlier event of their entity)", s.parked);
    }
    if s.held > 0 {
        eprintln!(
            "  held back   {:>6}  (a sink's circuit was open, its rate limit reached, or a copy was being delivered: they waited in the queue)",
            s.held
        );
    }
}

fn progress_line(summaries: &[Summary]) -> String {
    summaries
        .iter()
        .map(|s| {
            let mut duplicates = if s.duplicates > 0 { format!(", {} duplicates", s.duplicates) } else { String::new() };
            if s.stale > 0 {
                duplicates.push_str(&format!(", {} stale", s.stale));
            }
            format!("{}: {} in, {} routed, {} exceptions{duplicates}", s.pipeline, s.received, s.routed, s.exception_count())
        })
        .collect::<Vec<_>>()
        .join(" | ")
}

/// `switchyard run`'s options.
pub struct RunFlags {
    pub once: bool,
    pub data_dir: PathBuf,
    pub state_store: Option<String>,
    pub listen: std::net::SocketAddr,
}

pub fn run(pipelines: Vec<switchyard::pipeline::Pipeline>, paths: Vec<PathBuf>, flags: RunFlags) -> ExitCode {
    let RunFlags { once, data_dir, state_store, listen } = flags;
    let durability = match durability() {
        Ok(d) => d,
        Err(c) => return c,
    };
    let versions: Vec<(String, PathBuf)> = pipelines.iter().map(|p| (p.version.clone(), p.file.clone())).collect();
    let endpoints: Vec<String> = pipelines
        .iter()
        .filter_map(|p| p.http_source.as_ref().map(|e| format!("  {}: POST http://{listen}{} ({})", p.name, e.path, e.describe_auth())))
        .collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .thread_stack_size(switchyard::runtime::PIPELINE_THREAD_STACK)
        // Blocking threads (file syncs) get the same stack: fewer of them than tokio's 512 keeps
        // the address space reserved for stacks near 2 GiB.
        .max_blocking_threads(32)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let interrupted = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Signals are caught before anything else: a stop asked for at any moment is a clean stop.
    {
        let interrupted = interrupted.clone();
        let _guard = rt.enter();
        let first = signal_stream();
        rt.spawn(async move {
            let mut signals = first;
            signals.recv().await;
            interrupted.store(true, std::sync::atomic::Ordering::SeqCst);
            eprintln!(
                "switchyard: stopping; finishing the messages in hand (Ctrl-C again stops at once: they are delivered again next time)"
            );
            let _ = stop_tx.send(true);
            signals.recv().await;
            std::process::exit(130);
        });
    }
    let shared = state_store.is_some();
    let runtime =
        match Runtime::open(pipelines, RunOptions { data_dir: data_dir.clone(), once, durability, state_store, listen: Some(listen) }) {
            Ok(r) => std::sync::Arc::new(r.with_reloader(Reloader::new(paths, |said| eprintln!("switchyard: {said}")))),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(1);
            }
        };
    let result = rt.block_on(async {
        let mut helpers = Vec::new();
        if !once {
            eprintln!(
                "switchyard: running {} pipeline(s) on {} (Ctrl-C stops after the messages in hand)",
                versions.len(),
                runtime.store().path().display()
            );
            for e in &endpoints {
                eprintln!("{e}");
            }
            eprintln!("  from another terminal: `switchyard queues`, `switchyard exceptions list`, `switchyard send QUEUE FILE`");
            eprintln!("  a changed mapping, table or schema is loaded again while running");
            let r = runtime.clone();
            helpers.push(tokio::spawn(async move {
                let mut last = String::new();
                loop {
                    tokio::time::sleep(std::time::Duration::from_secs(5)).await;
                    let line = progress_line(&r.summaries());
                    if line != last {
                        eprintln!("[{}] {line}", chrono::Local::now().format("%H:%M:%S"));
                        last = line;
                    }
                }
            }));
        }
        let r = runtime.run(stop_rx).await;
        for h in helpers {
            h.abort();
        }
        r
    });
    let left = runtime.left().unwrap_or(0);
    runtime.close();
    let summaries = match result {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            for (s, (v, f)) in runtime.summaries().iter().zip(&versions) {
                print_summary(s, v, f, shared);
            }
            return ExitCode::from(1);
        }
    };
    // The summary goes to stderr: stdout belongs to pipelines that write there.
    let (mut total_in, mut total_out, mut total_exc, mut total_dup) = (0, 0, 0, 0);
    for (s, (v, f)) in summaries.iter().zip(&versions) {
        total_in += s.received;
        total_out += s.routed;
        total_exc += s.exception_count();
        total_dup += s.duplicates;
        print_summary(s, v, f, shared);
    }
    let total_stale: u64 = summaries.iter().map(|s| s.stale).sum();
    let mut total = format!("total: {total_in} in = {total_out} routed + {total_exc} exceptions");
    if total_dup > 0 {
        total.push_str(&format!(" + {total_dup} duplicates"));
    }
    if total_stale > 0 {
        total.push_str(&format!(" + {total_stale} stale"));
    }
    eprintln!("{total}");
    eprintln!("store: {} (`switchyard queues`, `switchyard exceptions list`)", store::db_path(&data_dir).display());
    if once && interrupted.load(std::sync::atomic::Ordering::SeqCst) && left > 0 {
        eprintln!("stopped before the end: {left} message(s) wait in the queues for the next run");
        return ExitCode::from(130);
    }
    ExitCode::SUCCESS
}

/// SIGINT and SIGTERM, as one stream of stop requests.
struct Signals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
}

impl Signals {
    async fn recv(&mut self) {
        #[cfg(unix)]
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Installs the handlers now (needs the runtime entered), so no signal is missed later.
fn signal_stream() -> Signals {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        Signals {
            term: signal(SignalKind::terminate()).expect("SIGTERM handler"),
            int: signal(SignalKind::interrupt()).expect("SIGINT handler"),
        }
    }
    #[cfg(not(unix))]
    Signals {}
}

// ---------------------------------------------------------------- send

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SendFormat {
    Json,
    Ndjson,
    Csv,
}

const SEND_CHUNK: usize = 1000;

fn stored(mut raw: RawMessage) -> NewMessage {
    raw.received_at = Some(chrono::Utc::now());
    NewMessage { message_id: uuid::Uuid::now_v7().to_string(), headers: StoredHeaders::of_raw(&raw).to_json(), body: raw.body }
}

/// Reads messages from one input and stores them in chunks; returns how many.
/// Where `send` puts messages: the embedded store, or RabbitMQ with `SWITCHYARD_BROKER`.
enum Destination {
    Store(Store),
    Broker { runtime: tokio::runtime::Runtime, broker: std::sync::Arc<switchyard::amqp::Broker> },
}

impl Destination {
    fn send(&self, queue: &str, chunk: Vec<NewMessage>) -> Result<(), String> {
        match self {
            Destination::Store(store) => {
                let q = queue.to_string();
                store.submit_blocking(move |c| store::enqueue(c, &q, &chunk)).map(|_| ()).map_err(|e| e.to_string())
            }
            Destination::Broker { runtime, broker } => runtime.block_on(async {
                use switchyard::amqp::publish::confirmed;
                let session = broker.session().await.map_err(|e| e.to_string())?;
                let mut confirms = Vec::with_capacity(chunk.len());
                for m in chunk {
                    let h = switchyard::runtime::envelope::StoredHeaders::parse(&m.headers);
                    // A CSV row travels as the record it was read into: RabbitMQ readers get JSON.
                    let body = h.parsed.clone().map(String::into_bytes).unwrap_or(m.body);
                    let props = lapin::BasicProperties::default()
                        .with_message_id(switchyard::amqp::short_id(&m.message_id))
                        .with_content_type("application/json".into())
                        .with_delivery_mode(2);
                    confirms.push(session.publish.publish(queue, "", true, body, props).map_err(|e| e.to_string())?);
                }
                for c in confirms {
                    confirmed(c).await.map_err(|e| match e {
                        switchyard::amqp::AmqpError::Refused(_) => format!(
                            "no pipeline reads `{queue}` on RabbitMQ yet (exchange `{queue}` has no queue bound): start `switchyard run` with the pipelines first ({e})"
                        ),
                        other => other.to_string(),
                    })?;
                }
                Ok(())
            }),
        }
    }

    fn close(&self) {
        match self {
            Destination::Store(store) => store.close(),
            Destination::Broker { runtime, broker } => runtime.block_on(broker.close()),
        }
    }
}

fn send_one(dest: &Destination, queue: &str, name: &str, reader: Box<dyn BufRead>, format: Format) -> Result<usize, String> {
    let send = |chunk: Vec<NewMessage>| dest.send(queue, chunk);
    let mut count = 0;
    match format {
        Format::Ndjson => {
            // Line by line: a file of a million orders is not held in memory.
            let mut chunk = Vec::with_capacity(SEND_CHUNK);
            for raw in NdjsonLines::new(reader, name) {
                let raw = raw.map_err(|e| format!("cannot read {name}: {e}"))?;
                chunk.push(stored(raw));
                if chunk.len() == SEND_CHUNK {
                    count += chunk.len();
                    send(std::mem::take(&mut chunk))?;
                }
            }
            count += chunk.len();
            send(chunk)?;
        }
        Format::Json | Format::Csv => {
            let mut content = Vec::new();
            let mut reader = reader;
            reader.read_to_end(&mut content).map_err(|e| format!("cannot read {name}: {e}"))?;
            for part in split(&content, format, name, &CsvOptions::default()).chunks(SEND_CHUNK) {
                count += part.len();
                send(part.iter().cloned().map(stored).collect())?;
            }
        }
    }
    Ok(count)
}

pub fn send(queue: String, files: Vec<PathBuf>, format: Option<SendFormat>, data_dir: PathBuf) -> ExitCode {
    if !switchyard::source::queue::valid_queue_name(&queue) {
        eprintln!("error: `{queue}` is not a valid queue name: lowercase letters, digits, `.`, `-` and `_`, not starting with `_`");
        return ExitCode::from(2);
    }
    let broker_url = std::env::var(switchyard::pipeline::BROKER_SETTING).ok().filter(|u| !u.trim().is_empty());
    let dest = match &broker_url {
        Some(url) => {
            let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(1);
                }
            };
            // Queue `X` on RabbitMQ is the fanout exchange `X` (see `switchyard topology`).
            let mut topology = switchyard::amqp::Topology::default();
            topology.add_exchange(&queue, switchyard::amqp::config::ExchangeType::Fanout);
            let broker = std::sync::Arc::new(switchyard::amqp::Broker::new(
                url.trim(),
                std::time::Duration::from_secs(30),
                "send",
                std::sync::Arc::new(topology),
            ));
            if let Err(e) = runtime.block_on(broker.session()) {
                eprintln!("error: {e}");
                return ExitCode::from(1);
            }
            Destination::Broker { runtime, broker }
        }
        None => {
            let durability = match durability() {
                Ok(d) => d,
                Err(c) => return c,
            };
            match Store::open(&data_dir, durability) {
                Ok(s) => Destination::Store(s),
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            }
        }
    };
    let format_for = |path: Option<&Path>| -> Format {
        match format {
            Some(SendFormat::Json) => Format::Json,
            Some(SendFormat::Ndjson) => Format::Ndjson,
            Some(SendFormat::Csv) => Format::Csv,
            None => {
                path.and_then(switchyard::source::file::format_of).unwrap_or(if path.is_some() { Format::Json } else { Format::Ndjson })
            }
        }
    };
    let mut total = 0;
    // Every file is opened before anything is sent: a typo in the last name sends nothing.
    let mut inputs: Vec<(Option<PathBuf>, String, Box<dyn BufRead>)> = Vec::new();
    if files.is_empty() {
        inputs.push((None, "<stdin>".into(), Box::new(std::io::stdin().lock())));
    }
    for p in files {
        match std::fs::File::open(&p) {
            Ok(f) => inputs.push((Some(p.clone()), p.display().to_string(), Box::new(std::io::BufReader::new(f)))),
            Err(e) => {
                eprintln!("error: cannot read {}: {e}; nothing was sent", p.display());
                dest.close();
                return ExitCode::from(1);
            }
        }
    }
    for (path, name, reader) in inputs {
        match send_one(&dest, &queue, &name, reader, format_for(path.as_deref())) {
            Ok(n) => total += n,
            Err(e) => {
                eprintln!("error: {e}");
                eprintln!("sent {total} message(s) before the error");
                dest.close();
                return ExitCode::from(1);
            }
        }
    }
    let store = match dest {
        Destination::Store(s) => s,
        Destination::Broker { .. } => {
            dest.close();
            eprintln!("sent {total} message(s) to `{queue}` on RabbitMQ (confirmed by the broker)");
            return ExitCode::SUCCESS;
        }
    };
    let subscribers: Vec<String> = store
        .reader()
        .and_then(|c| {
            let v = c
                .prepare("SELECT consumer FROM streams WHERE queue = ?1 AND consumer <> '' ORDER BY consumer")?
                .query_map([&queue], |r| r.get(0))?
                .collect::<Result<Vec<String>, _>>()?;
            Ok(v)
        })
        .unwrap_or_default();
    store.close();
    if subscribers.is_empty() {
        eprintln!("sent {total} message(s) to `{queue}`; no pipeline has read it yet, so they wait for the first one that does");
    } else {
        eprintln!("sent {total} message(s) to `{queue}`, read by: {}", subscribers.join(", "));
    }
    ExitCode::SUCCESS
}

// ---------------------------------------------------------------- queues

fn age(micros: Option<i64>) -> String {
    match micros {
        None => "-".into(),
        Some(m) => {
            let s = m / 1_000_000;
            if s < 120 {
                format!("{s}s")
            } else if s < 7200 {
                format!("{}m", s / 60)
            } else if s < 172_800 {
                format!("{}h", s / 3600)
            } else {
                format!("{}d", s / 86_400)
            }
        }
    }
}

pub fn status(format: Listing, data_dir: PathBuf) -> ExitCode {
    let conn = match look(&data_dir) {
        Ok(c) => c,
        Err(c) => return c,
    };
    let engines = switchyard::runtime::running_engines(&data_dir);
    let rows = match store::sink_statuses(&conn, &engines) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
    };
    if format == Listing::Json {
        let out = serde_json::json!({"engines_running": engines.len(), "sinks": rows});
        println!("{}", serde_json::to_string_pretty(&out).expect("JSON"));
        return ExitCode::SUCCESS;
    }
    println!("engines running on {}: {}", data_dir.display(), engines.len());
    if rows.is_empty() {
        println!("no sink with a circuit breaker or a rate limit is running");
        return ExitCode::SUCCESS;
    }
    let time = |us: i64| {
        chrono::DateTime::from_timestamp_micros(us)
            .map(|t| t.with_timezone(&chrono::Local).format("%H:%M:%S").to_string())
            .unwrap_or_default()
    };
    let now = store::now_micros();
    let pw = rows.iter().map(|r| r.pipeline.len()).max().unwrap_or(0).max(8);
    let sw = rows.iter().map(|r| r.sink.len()).max().unwrap_or(0).max(4);
    println!(
        "{:<pw$}  {:<sw$}  {:<22}  {:>8}  {:<18}  {:<14}  LAST FAILURE",
        "PIPELINE", "SINK", "CIRCUIT", "FAILURES", "RATE LIMIT", "PAUSED UNTIL"
    );
    for r in &rows {
        let circuit = match (r.breaker.as_str(), r.open_until) {
            ("open", Some(u)) if u > now => format!("open until {}", time(u)),
            ("open", _) => "open (probe due)".to_string(),
            (b, _) => b.to_string(),
        };
        let paused = r.paused_until.filter(|u| *u > now).map(time).unwrap_or_else(|| "-".into());
        println!(
            "{:<pw$}  {:<sw$}  {:<22}  {:>8}  {:<18}  {:<14}  {}",
            r.pipeline,
            r.sink,
            circuit,
            r.failures,
            r.rate_limit.as_deref().unwrap_or("-"),
            paused,
            r.last_failure.as_deref().unwrap_or("-")
        );
    }
    ExitCode::SUCCESS
}

#[derive(Subcommand)]
pub enum KeysCommand {
    /// Whether a key was delivered (and is still remembered). Exit 0 if so, 1 if not.
    Show {
        /// The key space: the pipeline's name, or its `idempotency.scope`.
        scope: String,
        key: String,
    },
    /// Forget a delivered key, so that the next copy of its message is delivered again.
    Forget { scope: String, key: String },
}

pub fn keys(command: KeysCommand, data_dir: PathBuf, state_store: Option<String>) -> ExitCode {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
    rt.block_on(async {
        let state: Box<dyn store::StateStore> = match &state_store {
            Some(url) => match connect_shared(url).await {
                Ok(pg) => Box::new(pg),
                Err(c) => return c,
            },
            None => match open_existing(&data_dir) {
                Ok(s) => Box::new(s),
                Err(c) => return c,
            },
        };
        let result = match &command {
            KeysCommand::Show { scope, key } => {
                state.seen_keys(std::sync::Arc::from(scope.as_str()), vec![key.clone()]).await.map(|s| !s.is_empty())
            }
            KeysCommand::Forget { scope, key } => state.forget_key(scope.clone(), key.clone()).await,
        };
        match (command, result) {
            (_, Err(e)) => {
                eprintln!("error: {e}");
                ExitCode::from(2)
            }
            (KeysCommand::Show { scope, key }, Ok(true)) => {
                println!("`{key}` was delivered (scope {scope}, {}): a copy is a duplicate", state.describe());
                ExitCode::SUCCESS
            }
            (KeysCommand::Show { scope, key }, Ok(false)) => {
                println!("`{key}` is not recorded (scope {scope}, {}): a copy would be delivered", state.describe());
                ExitCode::from(1)
            }
            (KeysCommand::Forget { scope, key }, Ok(true)) => {
                println!("forgot `{key}` (scope {scope}): the next copy of its message is delivered");
                ExitCode::SUCCESS
            }
            (KeysCommand::Forget { scope, key }, Ok(false)) => {
                eprintln!("error: `{key}` is not recorded in scope {scope} ({})", state.describe());
                ExitCode::from(1)
            }
        }
    })
}

#[derive(Subcommand)]
pub enum QueuesCommand {
    /// Stop delivering a queue to a pipeline that no longer reads it, dropping what waits for it.
    Unsubscribe {
        queue: String,
        /// The pipeline (consumer) to unsubscribe.
        pipeline: String,
        /// Confirm dropping the messages waiting for it, when there are any.
        #[arg(long)]
        drop_messages: bool,
    },
}

pub fn unsubscribe(queue: String, pipeline: String, drop_messages: bool, data_dir: PathBuf) -> ExitCode {
    let store = match open_existing(&data_dir) {
        Ok(s) => s,
        Err(c) => return c,
    };
    let (q, p) = (queue.clone(), pipeline.clone());
    let result = store.submit_blocking(move |c| {
        let waiting: Option<i64> = c.query_row("SELECT depth FROM streams WHERE queue = ?1 AND consumer = ?2", [&q, &p], |r| r.get(0)).ok();
        match waiting {
            Some(n) if n > 0 && !drop_messages => Err(store::StoreError::Refused(format!(
                "{n} message(s) wait for `{p}` on `{q}`; add --drop-messages to drop them with the subscription"
            ))),
            _ => store::unsubscribe(c, &q, &p),
        }
    });
    store.close();
    match result {
        Ok(Some(n)) => {
            eprintln!(
                "`{pipeline}` no longer receives `{queue}`; {n} waiting message(s) dropped. A run of that pipeline subscribes it again."
            );
            ExitCode::SUCCESS
        }
        Ok(None) => {
            eprintln!("error: `{pipeline}` is not subscribed to `{queue}` (see `switchyard queues`)");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

pub fn queues(format: Listing, data_dir: PathBuf) -> ExitCode {
    if let Ok(url) = std::env::var(switchyard::pipeline::BROKER_SETTING)
        && !url.trim().is_empty()
    {
        // The embedded store still holds the inboxes of file sources; the queues between
        // pipelines are RabbitMQ's.
        eprintln!(
            "note: {} is set: the queues between pipelines are on RabbitMQ at {} (`rabbitmqctl list_queues name messages messages_unacknowledged`, `switchyard topology` for their names); below, the embedded store's",
            switchyard::pipeline::BROKER_SETTING,
            switchyard::amqp::redact(url.trim())
        );
    }
    let conn = match look(&data_dir) {
        Ok(c) => c,
        Err(c) => return c,
    };
    let stats = match store::queue_stats(&conn) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
    };
    // Replay streams matter only while they hold something.
    let stats: Vec<_> = stats.into_iter().filter(|s| s.queue != store::REPLAY_QUEUE || s.ready + s.in_flight + s.delayed > 0).collect();
    if format == Listing::Json {
        println!("{}", serde_json::to_string_pretty(&stats).expect("JSON"));
        return ExitCode::SUCCESS;
    }
    let qw = stats.iter().map(|s| s.queue.len()).max().unwrap_or(0).max(5);
    let cw = stats.iter().map(|s| s.consumer.len()).max().unwrap_or(0).max(8);
    println!("{:<qw$}  {:<cw$}  {:>8}  {:>9}  {:>7}  {:>6}", "QUEUE", "CONSUMER", "READY", "IN FLIGHT", "DELAYED", "OLDEST");
    for s in &stats {
        let consumer = if s.consumer.is_empty() { "(none yet)" } else { s.consumer.as_str() };
        println!(
            "{:<qw$}  {:<cw$}  {:>8}  {:>9}  {:>7}  {:>6}",
            s.queue,
            consumer,
            s.ready,
            s.in_flight,
            s.delayed,
            age(s.oldest_age_micros)
        );
    }
    if stats.is_empty() {
        println!("(no queues yet)");
    }
    ExitCode::SUCCESS
}

// ---------------------------------------------------------------- exceptions

#[derive(Subcommand)]
pub enum ExceptionsCommand {
    /// List exception records (default: the open ones).
    List {
        #[command(flatten)]
        filter: FilterArgs,
        /// open, replayed, discarded, superseded (delivered after all, with a shared store) or all.
        #[arg(long, default_value = "open")]
        status: String,
        #[arg(long, value_enum, default_value = "human")]
        format: Listing,
        /// At most this many, oldest first.
        #[arg(long, default_value_t = 200)]
        limit: usize,
    },
    /// Show one exception record in full, with its original payload.
    Show { id: String },
    /// Send messages of open exception records through their pipeline again (its current version).
    Replay {
        /// One exception id; or select with --pipeline, --reason, --since.
        id: Option<String>,
        #[command(flatten)]
        filter: FilterArgs,
    },
    /// Close open exception records without replaying them.
    Discard {
        id: Option<String>,
        #[command(flatten)]
        filter: FilterArgs,
    },
    /// Write exception records as NDJSON to stdout (all statuses unless --status).
    Export {
        #[command(flatten)]
        filter: FilterArgs,
        #[arg(long)]
        status: Option<String>,
        /// The only format for now: one JSON record per line.
        #[arg(long, value_parser = ["ndjson"], default_value = "ndjson")]
        format: String,
    },
}

#[derive(Args, Clone, Default)]
pub struct FilterArgs {
    #[arg(long)]
    pub pipeline: Option<String>,
    #[arg(long)]
    pub reason: Option<String>,
    /// Failed at or after: RFC 3339 (`2026-11-27T10:00:00Z`) or an age (`30m`, `2h`, `7d`).
    #[arg(long)]
    pub since: Option<String>,
}

fn parse_since(s: &str) -> Result<i64, String> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Ok(t.timestamp_micros());
    }
    if let Ok(d) = chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        return Ok(d.and_hms_opt(0, 0, 0).expect("midnight").and_utc().timestamp_micros());
    }
    match humantime::parse_duration(s) {
        Ok(d) => Ok(store::now_micros() - d.as_micros() as i64),
        Err(_) => Err(format!("--since `{s}`: expected a time (`2026-11-27T10:00:00Z`, `2026-11-27`) or an age (`30m`, `2h`, `7d`)")),
    }
}

fn filter_of(f: &FilterArgs, id: Option<String>, status: Option<String>) -> Result<ExceptionFilter, String> {
    let status = match status.as_deref() {
        None | Some("all") => None,
        Some(s @ ("open" | "replayed" | "discarded" | "superseded")) => Some(s.to_string()),
        Some(other) => return Err(format!("--status `{other}`: expected open, replayed, discarded, superseded or all")),
    };
    Ok(ExceptionFilter {
        id,
        pipeline: f.pipeline.clone(),
        reason: f.reason.clone(),
        since: f.since.as_deref().map(parse_since).transpose()?,
        status,
        limit: None,
    })
}

fn first_error(e: &StoredException) -> String {
    e.record
        .errors
        .first()
        .map(|d| if d.pointer.is_empty() { d.message.clone() } else { format!("{} {}", d.pointer, d.message) })
        .unwrap_or_default()
}

/// Where exception records are: the embedded store of a data directory, or a shared store.
enum ExceptionStore {
    Local(PathBuf),
    Shared(store::PostgresStore),
}

impl ExceptionStore {
    async fn open(data_dir: PathBuf, state_store: Option<String>) -> Result<Self, ExitCode> {
        match state_store {
            Some(url) => Ok(ExceptionStore::Shared(connect_shared(&url).await?)),
            None => {
                must_exist(&data_dir)?;
                Ok(ExceptionStore::Local(data_dir))
            }
        }
    }

    /// The matching records; the embedded store is only read (no wait for a running engine).
    async fn records(&self, f: ExceptionFilter) -> Result<Vec<StoredException>, String> {
        match self {
            ExceptionStore::Local(dir) => {
                let conn = store::open_reader(dir).map_err(|e| e.to_string())?;
                store::exceptions(&conn, &f).map_err(|e| e.to_string())
            }
            ExceptionStore::Shared(pg) => store::StateStore::exceptions(pg, f).await.map_err(|e| e.to_string()),
        }
    }

    async fn dispose(&self, f: ExceptionFilter, replay: bool) -> Result<Vec<store::Disposition>, String> {
        let state: &dyn store::StateStore;
        let local;
        match self {
            ExceptionStore::Local(dir) => {
                local = Store::open(dir, Durability::from_env()?).map_err(|e| e.to_string())?;
                state = &local;
            }
            ExceptionStore::Shared(pg) => state = pg,
        }
        let done = if replay { state.replay(f).await } else { state.discard(f).await };
        if let Some(s) = state.embedded() {
            s.close();
        }
        done.map_err(|e| e.to_string())
    }
}

/// Connects to a shared store given by `--store` (or `SWITCHYARD_STORE`).
async fn connect_shared(url: &str) -> Result<store::PostgresStore, ExitCode> {
    store::PostgresStore::connect(url).await.map_err(|e| {
        eprintln!("error: {e}");
        ExitCode::from(2)
    })
}

pub fn exceptions(cmd: ExceptionsCommand, data_dir: PathBuf, state_store: Option<String>) -> ExitCode {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
    rt.block_on(async {
        let at = match ExceptionStore::open(data_dir, state_store).await {
            Ok(s) => s,
            Err(c) => return c,
        };
        exceptions_in(cmd, &at).await
    })
}

async fn exceptions_in(cmd: ExceptionsCommand, at: &ExceptionStore) -> ExitCode {
    let fail = |e: String| {
        eprintln!("error: {e}");
        ExitCode::from(2)
    };
    match cmd {
        ExceptionsCommand::Replay { id, filter } | ExceptionsCommand::Discard { id, filter }
            if id.is_none() && filter.pipeline.is_none() && filter.reason.is_none() && filter.since.is_none() =>
        {
            fail("say which records: an exception id, or --pipeline, --reason or --since".into())
        }
        ExceptionsCommand::Replay { id, filter } => dispose(at, &filter, id, true).await,
        ExceptionsCommand::Discard { id, filter } => dispose(at, &filter, id, false).await,
        ExceptionsCommand::List { filter, status, format, limit } => {
            let mut f = match filter_of(&filter, None, Some(status)) {
                Ok(f) => f,
                Err(e) => return fail(e),
            };
            // One more than shown, to say that there are more.
            f.limit = Some(limit + 1);
            let mut rows = match at.records(f).await {
                Ok(r) => r,
                Err(e) => return fail(e),
            };
            let more = rows.len() > limit;
            rows.truncate(limit);
            if format == Listing::Json {
                println!("{}", serde_json::to_string_pretty(&rows).expect("JSON"));
                return ExitCode::SUCCESS;
            }
            for e in &rows {
                let r = &e.record;
                println!(
                    "{}  {}  {:<9}  {}  {}/{}  {}",
                    r.exception_id,
                    switchyard::message::rfc3339::format(&r.failed_at),
                    e.status,
                    r.pipeline,
                    r.stage.as_str(),
                    r.reason,
                    first_error(e)
                );
            }
            if more {
                eprintln!(
                    "the first {} exception record(s) are shown; there are more (--limit, or `switchyard exceptions export`)",
                    rows.len()
                );
            } else {
                eprintln!("{} exception record(s); `switchyard exceptions show ID` shows one in full", rows.len());
            }
            ExitCode::SUCCESS
        }
        ExceptionsCommand::Show { id } => {
            let f = ExceptionFilter { id: Some(id.clone()), ..Default::default() };
            match at.records(f).await {
                Ok(rows) if rows.is_empty() => fail(format!("no exception record `{id}` (see `switchyard exceptions list --status all`)")),
                Ok(rows) => {
                    println!("{}", serde_json::to_string_pretty(&rows[0]).expect("JSON"));
                    ExitCode::SUCCESS
                }
                Err(e) => fail(e),
            }
        }
        ExceptionsCommand::Export { filter, status, .. } => {
            let f = match filter_of(&filter, None, status) {
                Ok(f) => f,
                Err(e) => return fail(e),
            };
            match at.records(f).await {
                Ok(rows) => {
                    use std::io::Write;
                    let mut out = std::io::stdout().lock();
                    for r in &rows {
                        let _ = writeln!(out, "{}", serde_json::to_string(r).expect("JSON"));
                    }
                    eprintln!("{} exception record(s) exported", rows.len());
                    ExitCode::SUCCESS
                }
                Err(e) => fail(e),
            }
        }
    }
}

async fn dispose(at: &ExceptionStore, filter: &FilterArgs, id: Option<String>, replay: bool) -> ExitCode {
    // Without an id, only open records are selected; with one, the command says why it did nothing.
    let status = if id.is_some() { None } else { Some("open".to_string()) };
    let f = match filter_of(filter, id.clone(), status) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    match at.dispose(f, replay).await {
        Ok(done) if done.is_empty() => match id {
            Some(id) => {
                eprintln!("error: no exception record `{id}` (see `switchyard exceptions list --status all`)");
                ExitCode::from(2)
            }
            None => {
                eprintln!("no open exception records match");
                ExitCode::from(1)
            }
        },
        Ok(done) => {
            for d in &done {
                println!("{}  {}  {}", d.exception_id, d.pipeline, d.result);
            }
            let n = done.iter().filter(|d| d.done).count();
            if replay {
                eprintln!("{n} message(s) queued for replay; the running engine (or the next `switchyard run`) processes them");
            } else {
                eprintln!("{n} exception record(s) discarded");
            }
            if n == done.len() { ExitCode::SUCCESS } else { ExitCode::from(1) }
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}
