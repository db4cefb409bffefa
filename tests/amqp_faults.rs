//! RabbitMQ faults: 10,000 messages go file -> RabbitMQ (tests/amqp/producer.yaml) -> consumer
//! pipeline (tests/amqp/consumer.yaml) -> a file, while the broker closes every connection, the
//! broker application restarts, the consumer engine is killed with SIGKILL, or two and three
//! engines compete for the queue. Afterwards every message is in an output file or in the
//! dead-letter queue (the planned failures, multiples of 97, with their reason header): none lost.
//! A clean run writes each message once; under faults a message may be written again
//! (at-least-once) but always with the message id it was sent with.
//!
//! Needs RabbitMQ at 127.0.0.1:5672 (or SWITCHYARD_AMQP_URL). Without one the tests print
//! `skipped: ...` and pass, unless SWITCHYARD_REQUIRE_BROKER=1 (CI) makes them fail.
#![cfg(unix)]

use lapin::options::{BasicGetOptions, ExchangeDeleteOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, ConnectionProperties};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{OnceLock, RwLock};
use std::time::{Duration, Instant};

const MESSAGES: u64 = 10_000;
/// Multiples of 97 below 10,000 fail on purpose: 0, 97, ..., 9991.
const UNLUCKY: u64 = (MESSAGES - 1) / 97 + 1;
/// Each scenario gives up waiting after this long.
const LIMIT: Duration = Duration::from_secs(120);
/// Messages per second the fault scenes' consumer takes: 10,000 take about 10 s, so each fault
/// finds messages still waiting (unpaced, a fast run could drain the queue between two looks).
const PACE: u32 = 1000;
const DEFAULT_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// Scenarios that close every connection or restart the broker take this for writing; the others
/// share it, so a broker restart never hits a test that does not expect it.
static BROKER: RwLock<()> = RwLock::new(());

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("repo root").to_path_buf()
}

fn url() -> String {
    std::env::var("SWITCHYARD_AMQP_URL").ok().filter(|u| !u.is_empty()).unwrap_or_else(|| DEFAULT_URL.to_string())
}

/// `host:port` of the broker URL.
fn host_port() -> String {
    let u = url();
    let rest = u.split_once("://").map_or(u.as_str(), |(_, r)| r);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
    let host = rest.split(['/', '?']).next().unwrap_or("127.0.0.1:5672");
    if host.rsplit_once(':').is_some_and(|(_, p)| p.chars().all(|c| c.is_ascii_digit())) && !host.ends_with(']') {
        host.to_string()
    } else {
        format!("{host}:5672")
    }
}

/// True when RabbitMQ answers; otherwise skips (prints and returns false), or panics when
/// SWITCHYARD_REQUIRE_BROKER=1.
fn broker_or_skip() -> bool {
    use std::net::{TcpStream, ToSocketAddrs};
    let at = host_port();
    let up = at
        .to_socket_addrs()
        .map(|addrs| addrs.into_iter().any(|a| TcpStream::connect_timeout(&a, Duration::from_secs(2)).is_ok()))
        .unwrap_or(false);
    if up {
        return true;
    }
    if std::env::var("SWITCHYARD_REQUIRE_BROKER").as_deref() == Ok("1") {
        panic!("no RabbitMQ at {at}, and SWITCHYARD_REQUIRE_BROKER=1");
    }
    println!("skipped: no RabbitMQ at {at}");
    false
}

fn rt() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap())
}

/// Runs `f` on a channel of a fresh connection, with a time limit; None when the broker did not
/// answer (down, restarting, or the channel was closed by an error).
fn with_broker<T, F, Fut>(f: F) -> Option<T>
where
    F: FnOnce(lapin::Channel) -> Fut,
    Fut: std::future::Future<Output = lapin::Result<T>>,
{
    rt().block_on(async {
        let work = async {
            let conn = Connection::connect(&url(), ConnectionProperties::default().with_connection_name("amqp_faults test".into())).await?;
            let out = f(conn.create_channel().await?).await;
            let _ = conn.close(200, "done".into()).await;
            out
        };
        tokio::time::timeout(Duration::from_secs(10), work).await.ok()?.ok()
    })
}

/// Ready messages and consumers of a queue (passive declare); None while it cannot be told.
fn queue_state(queue: &str) -> Option<(u64, u64)> {
    let queue = queue.to_string();
    with_broker(|ch| async move {
        let q = ch
            .queue_declare(queue.as_str().into(), QueueDeclareOptions { passive: true, ..Default::default() }, FieldTable::default())
            .await?;
        Ok((u64::from(q.message_count()), u64::from(q.consumer_count())))
    })
}

fn depth(queues: &[String]) -> Option<u64> {
    queues.iter().map(|q| queue_state(q).map(|s| s.0)).sum()
}

/// Asks again every 300 ms for up to 30 s while the broker does not answer: on a busy machine one
/// connection can take longer than `with_broker`'s limit, which says nothing about the queues.
fn within_30s<T>(ask: impl Fn() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match ask() {
            None if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(300)),
            answer => return answer,
        }
    }
}

/// [`within_30s`], for an answer the test needs.
fn patiently<T>(what: &str, ask: impl Fn() -> Option<T>) -> T {
    within_30s(ask).unwrap_or_else(|| panic!("the broker did not answer for 30 s: {what}"))
}

/// One message taken from the dead-letter queue.
struct Dead {
    seq: u64,
    id: String,
    reason: String,
    stage: String,
}

fn header(h: &FieldTable, name: &str) -> String {
    match h.inner().get(name) {
        Some(AMQPValue::LongString(s)) => s.to_string(),
        Some(AMQPValue::ShortString(s)) => s.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

/// Takes every message off the dead-letter queue.
fn drain_dead(queue: &str) -> Vec<Dead> {
    patiently(&format!("reading the dead-letter queue {queue}"), || {
        let q = queue.to_string();
        with_broker(|ch| async move {
            let mut out = Vec::new();
            while let Some(m) = ch.basic_get(q.as_str().into(), BasicGetOptions { no_ack: true }).await? {
                let d = m.delivery;
                let body: Value = serde_json::from_slice(&d.data).unwrap_or(Value::Null);
                let h = d.properties.headers().clone().unwrap_or_default();
                out.push(Dead {
                    seq: body["seq"].as_u64().unwrap_or(u64::MAX),
                    id: d.properties.message_id().as_ref().map(|m| m.to_string()).unwrap_or_default(),
                    reason: header(&h, "x-switchyard-reason"),
                    stage: header(&h, "x-switchyard-stage"),
                });
            }
            Ok(out)
        })
    })
}

fn rabbitmqctl(args: &[&str]) {
    let out = Command::new("rabbitmqctl").args(args).output().expect("rabbitmqctl");
    assert!(out.status.success(), "rabbitmqctl {args:?}: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}

/// Starts the broker application again when dropped, even when the test fails.
struct BrokerBack;
impl Drop for BrokerBack {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl").arg("start_app").output();
        let _ = Command::new("rabbitmqctl").args(["-t", "60", "await_startup"]).output();
    }
}

/// One test's queues, exchange, fixtures and data directories; deletes its queues when dropped.
struct Scene {
    prefix: String,
    dir: tempfile::TempDir,
}

impl Scene {
    /// `prefetch` and `batch` make the consumer work in small steps; `rate` (messages per
    /// second) paces it, so that faults land while messages flow however fast the machine is.
    fn new(name: &str, prefetch: u32, batch: u32, rate: Option<u32>) -> Scene {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
        let prefix = format!("amqp-faults.{name}.{}.{nanos}", std::process::id());
        let dir = tempfile::tempdir().unwrap();
        let fixture = |file: &str| std::fs::read_to_string(repo().join("tests/amqp").join(file)).unwrap().replace("@P@", &prefix);
        std::fs::write(dir.path().join("producer.yaml"), fixture("producer.yaml")).unwrap();
        let consumer = fixture("consumer.yaml")
            .replace("prefetch: 200", &format!("prefetch: {prefetch}"))
            .replace("batch_size: 100", &format!("batch_size: {batch}"))
            .replace(
                "concurrency: 1}",
                &rate.map_or("concurrency: 1}".to_string(), |r| format!("concurrency: 1, rate_limit: {{rate: {r}/s}}}}")),
            );
        std::fs::write(dir.path().join("consumer.yaml"), consumer).unwrap();
        let lines: String = (0..MESSAGES).map(|i| format!("{{\"seq\": {i}}}\n")).collect();
        std::fs::write(dir.path().join("in.ndjson"), lines).unwrap();
        println!("{name}: queues {prefix}.*");
        Scene { prefix, dir }
    }

    fn work(&self) -> String {
        format!("{}.work", self.prefix)
    }

    fn dlq(&self) -> String {
        format!("{}.work.dlq", self.prefix)
    }

    /// The work queue and its retry queues: empty once everything is through.
    fn pending(&self) -> Vec<String> {
        let w = self.work();
        vec![format!("{w}.retry.200ms"), format!("{w}.retry.400ms"), w]
    }

    fn data(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn done(&self, data: &str) -> PathBuf {
        self.data(data).join("out/done.ndjson")
    }

    /// Publishes the 10,000 messages (file -> RabbitMQ, with confirms) and waits for the end.
    fn feed(&self) -> Child {
        switchyard(&[self.dir.path().join("producer.yaml")], &self.data("feed"), true)
    }

    fn feed_all(&self) {
        let mut feed = self.feed();
        let status = wait_exit(&mut feed, Duration::from_secs(60));
        assert!(status.success(), "the feed failed: {}", log(&self.data("feed")));
    }

    /// The message id each seq was sent with.
    fn sent(&self) -> BTreeMap<u64, String> {
        let (seen, _) = read_outputs(&[self.data("feed").join("out/sent.ndjson")], true);
        assert_eq!(seen.len() as u64, MESSAGES, "the feed sent every message");
        seen.into_iter().map(|(seq, ids)| (seq, ids.into_iter().next().unwrap())).collect()
    }

    fn consumer(&self, data: &str) -> Engine {
        Engine { child: Some(switchyard(&[self.dir.path().join("consumer.yaml")], &self.data(data), false)), data: self.data(data) }
    }
}

impl Drop for Scene {
    fn drop(&mut self) {
        let mut queues = self.pending();
        queues.push(self.dlq());
        let exchange = format!("{}.x", self.prefix);
        // Not `patiently`: a panic in a drop while a failed test unwinds would abort the run.
        let deleted = within_30s(|| {
            let (queues, exchange) = (queues.clone(), exchange.clone());
            with_broker(|ch| async move {
                for q in &queues {
                    ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default()).await?;
                }
                ch.exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default()).await?;
                Ok(())
            })
        });
        if deleted.is_none() {
            eprintln!("could not delete the queues {queues:?}");
        }
    }
}

/// `switchyard run FILES --data-dir DATA [--once]`, its output appended to DATA/run.log.
fn switchyard(files: &[PathBuf], data: &Path, once: bool) -> Child {
    std::fs::create_dir_all(data).unwrap();
    let log = std::fs::OpenOptions::new().create(true).append(true).open(data.join("run.log")).unwrap();
    let mut c = Command::new(env!("CARGO_BIN_EXE_switchyard"));
    c.arg("run").args(files).arg("--data-dir").arg(data).args(["--log-level", "warn"]);
    if once {
        c.arg("--once");
    }
    c.current_dir(repo()).env_remove("RUST_LOG").stdin(Stdio::null()).stdout(log.try_clone().unwrap()).stderr(log).spawn().unwrap()
}

fn log(data: &Path) -> String {
    std::fs::read_to_string(data.join("run.log")).unwrap_or_default()
}

fn wait_exit(child: &mut Child, limit: Duration) -> ExitStatus {
    wait_exit_said(child, limit, Path::new(""))
}

/// As `wait_exit`, with what the process said (its log) when it does not exit.
fn wait_exit_said(child: &mut Child, limit: Duration, said: &Path) -> ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the engine did not exit within {limit:?}: {}", if said.as_os_str().is_empty() { String::new() } else { log(said) });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A continuous consumer engine; SIGKILLed when dropped.
struct Engine {
    child: Option<Child>,
    data: PathBuf,
}

impl Engine {
    fn running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.try_wait().unwrap().is_none())
    }

    /// SIGTERM: a clean drain, exit 0.
    fn stop(&mut self) {
        let mut child = self.child.take().expect("running");
        Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
        let status = wait_exit_said(&mut child, Duration::from_secs(60), &self.data);
        assert!(status.success(), "SIGTERM stops the engine cleanly ({status}): {}", log(&self.data));
    }

    fn sigkill(&mut self) {
        let mut child = self.child.take().expect("running");
        child.kill().unwrap();
        child.wait().unwrap();
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Seq -> the message ids it was written with, and the number of lines; `strict` fails on a
/// line that is not whole JSON, otherwise such a line (being written) is left out.
fn read_outputs(files: &[PathBuf], strict: bool) -> (BTreeMap<u64, BTreeSet<String>>, usize) {
    let mut seen: BTreeMap<u64, BTreeSet<String>> = BTreeMap::new();
    let mut lines = 0;
    for file in files {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        for line in text.split_inclusive('\n') {
            let v: Value = match serde_json::from_str(line) {
                Ok(v) if line.ends_with('\n') => v,
                _ if strict => panic!("a whole JSON line in {}: {line:?}", file.display()),
                _ => continue,
            };
            lines += 1;
            let seq = v["payload"]["seq"].as_u64().unwrap();
            seen.entry(seq).or_default().insert(v["metadata"]["message_id"].as_str().unwrap().to_string());
        }
    }
    (seen, lines)
}

/// Messages written so far (distinct seqs).
fn written(files: &[PathBuf]) -> u64 {
    read_outputs(files, false).0.len() as u64
}

/// Waits until at most `at_most` of the messages that pass are not written yet; returns how
/// many are not. It reads the consumer's output file, not the broker: asking the broker takes a
/// connection, which on a busy machine took longer than the whole run once.
fn wait_left(files: &[PathBuf], at_most: u64, started: Instant) -> u64 {
    loop {
        // Lines, not distinct messages: cheap to count, and the few repeats do not matter here.
        let lines: u64 = files.iter().map(|f| std::fs::read(f).map_or(0, |b| b.iter().filter(|&&c| c == b'\n').count() as u64)).sum();
        let left = (MESSAGES - UNLUCKY).saturating_sub(lines);
        if left <= at_most {
            return left;
        }
        assert!(started.elapsed() < LIMIT, "fewer than {} messages written within {LIMIT:?}", MESSAGES - UNLUCKY - at_most);
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until every message is written or dead-lettered and the queues are empty; gives up
/// after LIMIT, or after 20 s without progress (then the check tells what is missing).
fn wait_through(scene: &Scene, files: &[PathBuf], started: Instant) {
    let mut last = (0, 0, 0);
    let mut moved = Instant::now();
    loop {
        let now = (written(files), queue_state(&scene.dlq()).map_or(0, |s| s.0), depth(&scene.pending()).unwrap_or(u64::MAX));
        if now.0 + UNLUCKY >= MESSAGES && now.1 >= UNLUCKY && now.2 == 0 {
            return;
        }
        if now != last {
            last = now;
            moved = Instant::now();
        }
        if started.elapsed() > LIMIT || moved.elapsed() > Duration::from_secs(20) {
            println!(
                "gave up waiting after {:?}: {} written, {} dead-lettered, {} left in the queues",
                started.elapsed(),
                now.0,
                now.1,
                now.2
            );
            return;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Where every message ended; panics on a loss, a wrong id or reason, or (when
/// `duplicates_allowed` is false) a message handled twice. Returns the duplicate count.
fn check(scene: &Scene, files: &[PathBuf], duplicates_allowed: bool) -> usize {
    let sent = scene.sent();
    let (out, lines) = read_outputs(files, true);
    let dead = drain_dead(&scene.dlq());
    let mut dead_seqs: BTreeMap<u64, usize> = BTreeMap::new();
    for d in &dead {
        assert_eq!(d.reason, "unlucky_number", "only the planned failures are dead-lettered (seq {}, stage {})", d.seq, d.stage);
        assert!(!d.stage.is_empty(), "seq {} carries x-switchyard-stage", d.seq);
        assert_eq!(d.seq % 97, 0, "seq {} was dead-lettered", d.seq);
        assert_eq!(sent.get(&d.seq), Some(&d.id), "the dead-lettered seq {} keeps the message id it was sent with", d.seq);
        *dead_seqs.entry(d.seq).or_default() += 1;
    }
    for (seq, ids) in &out {
        assert_ne!(seq % 97, 0, "seq {seq} should have failed");
        assert_eq!(ids.iter().collect::<Vec<_>>(), vec![&sent[seq]], "seq {seq} written with the message id it was sent with");
    }
    let missing: Vec<u64> = (0..MESSAGES).filter(|s| !out.contains_key(s) && !dead_seqs.contains_key(s)).collect();
    let duplicates = (lines - out.len()) + (dead.len() - dead_seqs.len());
    let left = patiently("the depth of the work and retry queues", || depth(&scene.pending()));
    println!(
        "{MESSAGES} sent: {} written ({lines} lines), {} dead-lettered ({} messages), {} missing, {duplicates} duplicate(s), {left} left in the queues",
        out.len(),
        dead_seqs.len(),
        dead.len(),
        missing.len()
    );
    assert!(missing.is_empty(), "{} message(s) lost, e.g. seqs {:?}", missing.len(), &missing[..missing.len().min(20)]);
    assert_eq!(dead_seqs.len() as u64, UNLUCKY, "every multiple of 97 is dead-lettered");
    assert_eq!(left, 0, "the work and retry queues are empty");
    if !duplicates_allowed {
        assert_eq!(duplicates, 0, "a clean run handles each message once");
    }
    duplicates
}

fn pause_broker_tests() -> std::sync::RwLockReadGuard<'static, ()> {
    BROKER.read().unwrap_or_else(|e| e.into_inner())
}

/// a. A clean run: the feed, then the consumer drains the queue with --once.
#[test]
fn conformance_every_message_written_or_dead_lettered_once() {
    if !broker_or_skip() {
        return;
    }
    let _shared = pause_broker_tests();
    let scene = Scene::new("conformance", 200, 100, None);
    let started = Instant::now();
    scene.feed_all();
    assert_eq!(patiently("the depth of the work queue", || depth(&[scene.work()])), MESSAGES, "the feed put every message in the queue");
    let mut once = switchyard(&[scene.dir.path().join("consumer.yaml")], &scene.data("c1"), true);
    let status = wait_exit(&mut once, LIMIT);
    assert!(status.success(), "run --once drains the queue: {}", log(&scene.data("c1")));
    let summary = log(&scene.data("c1"));
    assert!(summary.contains("total: 10000 in = 9896 routed + 104 exceptions"), "{summary}");
    check(&scene, &[scene.done("c1")], false);
    println!("conformance in {:?}", started.elapsed());
}

/// b, c. The broker closes every connection, then its application restarts, while a continuous
/// consumer works through the queue. These hit every connection, so they run alone.
#[test]
fn broker_faults_lose_no_message() {
    if !broker_or_skip() {
        return;
    }
    let _alone = BROKER.write().unwrap_or_else(|e| e.into_inner());

    // b. close_all_connections, three times while messages flow.
    let dup = through_faults(&Scene::new("close", 10, 5, Some(PACE)), &[8_500, 6_000, 3_500], |scene, _engine, left| {
        rabbitmqctl(&["close_all_connections", "amqp_faults test"]);
        println!("close: closed every connection with {left} message(s) not yet written, {} written", written(&[scene.done("c1")]));
    });
    println!("close: {dup} duplicate(s)");

    // c. stop_app, 2 s, start_app while messages flow.
    let dup = through_faults(&Scene::new("restart", 10, 5, Some(PACE)), &[7_000], |scene, _engine, left| {
        let _back = BrokerBack;
        rabbitmqctl(&["stop_app"]);
        println!("restart: broker application stopped with {left} message(s) not yet written, {} written", written(&[scene.done("c1")]));
        std::thread::sleep(Duration::from_secs(2));
    });
    println!("restart: {dup} duplicate(s)");
}

/// Feeds the scene and starts its consumer `c1`; each time the messages not yet written go down
/// to one of `at`, `fault` strikes. A fault counts as mid-flow when messages were still to be
/// written: at least two must be, or the only one. Then every message must come through, none lost; returns the duplicates.
fn through_faults(scene: &Scene, at: &[u64], mut fault: impl FnMut(&Scene, &mut Engine, u64)) -> usize {
    let started = Instant::now();
    scene.feed_all();
    let files = [scene.done("c1")];
    let mut engine = scene.consumer("c1");
    let mut mid_flow = 0;
    for &a in at {
        let left = wait_left(&files, a, started);
        mid_flow += usize::from(left > 0);
        fault(scene, &mut engine, left);
    }
    assert!(mid_flow >= at.len().min(2), "the faults struck while messages were flowing");
    wait_through(scene, &files, started);
    assert!(engine.running(), "the engine is still running (it reconnected instead of exiting): {}", log(&scene.data("c1")));
    engine.stop();
    let dup = check(scene, &files, true);
    println!("{dup} duplicate(s) in {:?}", started.elapsed());
    dup
}

/// d. The consumer engine is SIGKILLed three times mid-flow and restarted.
#[test]
fn sigkill_consumer_loses_no_message() {
    if !broker_or_skip() {
        return;
    }
    let _shared = pause_broker_tests();
    let dup = through_faults(&Scene::new("sigkill", 10, 5, Some(PACE)), &[8_500, 6_000, 3_500], |scene, engine, left| {
        engine.sigkill();
        println!("sigkill: killed with {left} message(s) not yet written, {} written", written(&[scene.done("c1")]));
        *engine = scene.consumer("c1");
    });
    println!("sigkill: {dup} duplicate(s)");
}

/// e. Two, then three engines consume the same queue: every message once, each did some work.
#[test]
fn competing_consumers_share_the_work() {
    if !broker_or_skip() {
        return;
    }
    let _shared = pause_broker_tests();
    for k in [2usize, 3] {
        let scene = Scene::new(&format!("compete{k}"), 20, 10, None);
        let started = Instant::now();
        let names: Vec<String> = (1..=k).map(|i| format!("c{i}")).collect();
        let mut engines: Vec<Engine> = names.iter().map(|n| scene.consumer(n)).collect();
        // Every engine subscribed before the first message arrives.
        loop {
            if queue_state(&scene.work()).is_some_and(|s| s.1 == k as u64) {
                break;
            }
            assert!(started.elapsed() < Duration::from_secs(30), "{k} consumers subscribed");
            for e in &mut engines {
                assert!(e.running(), "{}", log(&e.data));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        scene.feed_all();
        let files: Vec<PathBuf> = names.iter().map(|n| scene.done(n)).collect();
        wait_through(&scene, &files, started);
        for e in &mut engines {
            e.stop();
        }
        check(&scene, &files, false);
        let shares: Vec<usize> = files.iter().map(|f| read_outputs(std::slice::from_ref(f), true).1).collect();
        println!("compete{k}: lines per engine {shares:?} in {:?}", started.elapsed());
        for (name, share) in names.iter().zip(&shares) {
            assert!(*share > 0, "engine {name} did some of the work: {shares:?}");
        }
    }
}
