//! The Shopify pipeline over RabbitMQ (WORKLOAD.md "Over RabbitMQ"):
//! `cargo bench -p switchyard --bench amqp`.
//!
//! Each run preloads 100,000 persistent orders from `gen_orders.py` into a fresh durable classic
//! queue `orders.in.<suffix>` and measures, on the same broker and in the same run:
//!
//! 1. the release `switchyard` binary, `run --once` on `pipelines/shopify-amqp.yaml` (the Shopify
//!    reference chain: input schema, field map, reconcile, canonical schema, route US / other to
//!    `erp.us.<suffix>` / `erp.intl.<suffix>`, persistent and confirmed);
//! 2. a minimal hand-written lapin relay (prefetch 1000, persistent publish with confirms, each
//!    delivery acked after its confirm, pipelined): the broker's ceiling on this machine;
//! 3. the same relay acking with `multiple` after in-order confirms;
//! 4. only when `BENCH_SYSTEMS` names it (`relayenveloped`): the `multiple` relay publishing each
//!    message with the properties and headers the engine's outputs carry (message id,
//!    correlation id, content type, timestamp; idempotency key, channel, pipeline and mapping
//!    versions): what the broker's extra work on the engine's outputs costs.
//!
//! Throughput = orders / (time from the first message consumed, seen as the source queue's ready
//! count dropping, until both output queues together hold every order). CPU per message comes from
//! `/proc/<pid>/stat` over that window (the engine child, the broker's `beam.smp`, and this process
//! for the relay); peak RSS is the engine's `VmHWM`. Every output is drained afterwards and
//! checked: the two queues sum to exactly the orders sent, no order twice, and each engine output
//! carries the input's id, total, currency and country on the right queue. Queues are deleted at
//! the end of each run.
//!
//! `BENCH_ORDERS` (default 100000), `BENCH_RUNS` (default 3) and `SWITCHYARD_AMQP_URL` narrow or
//! redirect a run. `BENCH_OUTPUT_QUEUES=quorum` declares the two output queues of every system as
//! quorum queues instead of classic ones (the input queue stays classic, as WORKLOAD.md says).

mod common;
use common::{bin, repo, workload};
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use std::collections::{HashMap, HashSet};
use std::process::Command;
use std::time::{Duration, Instant};

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

fn url() -> String {
    std::env::var("SWITCHYARD_AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// What the checks need from an input order.
struct Expect {
    total: String,
    currency: String,
    country: String,
    lines: usize,
}

fn expectations(lines: &[Vec<u8>]) -> HashMap<String, Expect> {
    lines
        .iter()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_slice(l).expect("input is JSON");
            let id = format!("shopify:{}", v["id"]);
            let e = Expect {
                total: v["total_price"].as_str().expect("total_price").to_string(),
                currency: v["currency"].as_str().expect("currency").to_string(),
                country: v["shipping_address"]["country_code"].as_str().expect("country_code").to_string(),
                lines: v["line_items"].as_array().map_or(0, Vec::len),
            };
            (id, e)
        })
        .collect()
}

/// The relay's route: the first `country_code` after `shipping_address` (no JSON parse).
fn is_us(body: &[u8]) -> bool {
    fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
        hay.windows(needle.len()).position(|w| w == needle)
    }
    let Some(s) = find(body, b"\"shipping_address\"") else { return false };
    let rest = &body[s..];
    find(rest, b"\"country_code\":\"").is_some_and(|c| rest[c + 16..].starts_with(b"US\""))
}

/// CPU seconds (user + system) of a process, from `/proc/<pid>/stat`.
fn cpu_seconds(pid: &str, tick: f64) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return f64::NAN };
    let after = &stat[stat.rfind(')').map_or(0, |i| i + 2)..];
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 of stat (utime, stime), counted after the command name.
    (f[11].parse::<f64>().unwrap_or(0.0) + f[12].parse::<f64>().unwrap_or(0.0)) / tick
}

fn vm_hwm_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok()))
        .map_or(f64::NAN, |kib| kib / 1024.0)
}

fn broker_pid() -> Option<String> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let name = e.file_name().to_string_lossy().to_string();
        if !name.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
        (comm.trim() == "beam.smp").then_some(name)
    })
}

fn broker_connections() -> String {
    Command::new("rabbitmqctl")
        .args(["-q", "list_connections", "name"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).lines().filter(|l| !l.trim().is_empty() && !l.starts_with("name")).count().to_string())
        .unwrap_or_else(|_| "?".into())
}

struct Queues {
    input: String,
    us: String,
    intl: String,
}

impl Queues {
    fn new(suffix: &str) -> Self {
        Queues { input: format!("orders.in{suffix}"), us: format!("erp.us{suffix}"), intl: format!("erp.intl{suffix}") }
    }

    /// Everything a run may have declared, the engine's retry tiers and dead-letter queue included.
    fn all(&self) -> Vec<String> {
        let mut v = vec![self.input.clone(), self.us.clone(), self.intl.clone(), format!("{}.dlq", self.input)];
        v.extend(["1s", "10s", "1m"].iter().map(|d| format!("{}.retry.{d}", self.input)));
        v
    }
}

/// `BENCH_OUTPUT_QUEUES=quorum` makes the two output queues quorum queues (default classic); the
/// input queue stays the durable classic queue WORKLOAD.md names.
fn output_queue_type() -> String {
    let kind = std::env::var("BENCH_OUTPUT_QUEUES").unwrap_or_else(|_| "classic".into());
    assert!(kind == "classic" || kind == "quorum", "BENCH_OUTPUT_QUEUES is `{kind}`: expected classic or quorum");
    kind
}

async fn declare(ch: &Channel, q: &str, kind: &str) -> Res<()> {
    let mut args = FieldTable::default();
    if kind != "classic" {
        args.insert("x-queue-type".into(), lapin::types::AMQPValue::LongString(kind.into()));
    }
    ch.queue_declare(q.into(), QueueDeclareOptions { durable: true, ..Default::default() }, args).await?;
    Ok(())
}

async fn depth(ch: &Channel, q: &str) -> Res<u32> {
    Ok(ch
        .queue_declare(q.into(), QueueDeclareOptions { passive: true, ..Default::default() }, FieldTable::default())
        .await?
        .message_count())
}

/// Publishes every order, persistent, with confirms and a window of 1000.
async fn preload(conn: &Connection, q: &Queues, lines: &[Vec<u8>]) -> Res<()> {
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    declare(&ch, &q.input, "classic").await?;
    for q in [&q.us, &q.intl] {
        declare(&ch, q, &output_queue_type()).await?;
    }
    let mut window = std::collections::VecDeque::new();
    for l in lines {
        let c = ch
            .basic_publish(
                "".into(),
                q.input.as_str().into(),
                BasicPublishOptions::default(),
                l,
                BasicProperties::default().with_delivery_mode(2),
            )
            .await?;
        window.push_back(c);
        if window.len() >= 1000 {
            ensure_ack(window.pop_front().expect("non-empty").await?)?;
        }
    }
    for c in window {
        ensure_ack(c.await?)?;
    }
    let d = depth(&ch, &q.input).await? as usize;
    if d != lines.len() {
        return Err(format!("{d} messages in {} after the preload of {}", q.input, lines.len()).into());
    }
    ch.close(200, "done".into()).await?;
    Ok(())
}

fn ensure_ack(c: Confirmation) -> Res<()> {
    match c {
        Confirmation::Ack(None) => Ok(()),
        other => Err(format!("publish not confirmed: {other:?}").into()),
    }
}

/// Waits for the first consumed message, then for the outputs to hold `n`: (start, end).
async fn watch(
    conn: &Connection,
    q: &Queues,
    n: usize,
    limit: Duration,
    mut at_start: impl FnMut(),
    mut at_end: impl FnMut(),
) -> Res<(Instant, Instant)> {
    let ch = conn.create_channel().await?;
    let begun = Instant::now();
    let start = loop {
        if (depth(&ch, &q.input).await? as usize) < n {
            break Instant::now();
        }
        if begun.elapsed() > limit {
            return Err("nothing was consumed".into());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    at_start();
    let end = loop {
        let out = depth(&ch, &q.us).await? as usize + depth(&ch, &q.intl).await? as usize;
        if out >= n {
            break Instant::now();
        }
        if begun.elapsed() > limit {
            return Err(format!("only {out} of {n} arrived").into());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    at_end();
    ch.close(200, "done".into()).await?;
    Ok((start, end))
}

/// The properties of an engine output, with values of the same lengths, for the `RelayEnveloped`
/// system.
fn enveloped(i: usize) -> BasicProperties {
    let key = format!("shopify:{:013}", 5_000_000_000_000usize + i);
    let mut h = FieldTable::default();
    for (k, v) in [
        ("x-switchyard-idempotency-key", key.as_str()),
        ("x-switchyard-channel", "shopify"),
        ("x-switchyard-pipeline", "bench-shopify-amqp@1"),
        ("x-switchyard-mapping-versions", "shopify/order-to-canonical@1.2.0"),
    ] {
        h.insert(k.into(), lapin::types::AMQPValue::LongString(v.into()));
    }
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_message_id(key.as_str().into())
        .with_correlation_id(key.as_str().into())
        .with_content_type("application/json".into())
        .with_timestamp(1_790_000_000)
        .with_headers(h)
}

/// The minimal relay: consume, publish persistent with a confirm, ack after the confirm, pipelined.
async fn relay(conn: &Connection, q: &Queues, n: usize, sys: System) -> Res<()> {
    let multiple = sys != System::Relay;
    let consume = conn.create_channel().await?;
    consume.basic_qos(1000, BasicQosOptions::default()).await?;
    let publish = conn.create_channel().await?;
    publish.confirm_select(ConfirmSelectOptions::default()).await?;
    let mut consumer =
        consume.basic_consume(q.input.as_str().into(), "bench-relay".into(), BasicConsumeOptions::default(), FieldTable::default()).await?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(lapin::PublisherConfirm, lapin::Acker)>();
    let acks = tokio::spawn(async move {
        let (mut done, mut since) = (0, 0);
        while let Some((confirm, acker)) = rx.recv().await {
            ensure_ack(confirm.await?)?;
            done += 1;
            if !multiple {
                acker.ack(BasicAckOptions::default()).await?;
            } else {
                since += 1;
                // Confirms arrive in order: one ack(multiple) covers every delivery up to this one.
                if since >= 100 || rx.is_empty() || done == n {
                    acker.ack(BasicAckOptions { multiple: true }).await?;
                    since = 0;
                }
            }
            if done == n {
                break;
            }
        }
        Res::Ok(())
    });
    for i in 0..n {
        let d = consumer.next().await.ok_or("consumer cancelled")??;
        let key = if is_us(&d.data) { q.us.as_str() } else { q.intl.as_str() };
        let properties = if sys == System::RelayEnveloped { enveloped(i) } else { BasicProperties::default().with_delivery_mode(2) };
        let c = publish.basic_publish("".into(), key.into(), BasicPublishOptions::default(), &d.data, properties).await?;
        tx.send((c, d.acker)).map_err(|_| "ack task stopped")?;
    }
    acks.await??;
    consume.basic_cancel("bench-relay".into(), BasicCancelOptions::default()).await?;
    consume.close(200, "done".into()).await?;
    publish.close(200, "done".into()).await?;
    Ok(())
}

/// Drains both outputs and checks them: (US, intl).
async fn verify(conn: &Connection, q: &Queues, expect: &HashMap<String, Expect>, engine: bool) -> Res<(usize, usize)> {
    let ch = conn.create_channel().await?;
    let mut seen = HashSet::with_capacity(expect.len());
    let mut counts = [0usize; 2];
    for (i, queue) in [&q.us, &q.intl].into_iter().enumerate() {
        let total = depth(&ch, queue).await? as usize;
        counts[i] = total;
        if total == 0 {
            continue;
        }
        let tag = format!("bench-verify-{i}");
        let mut consumer = ch
            .basic_consume(
                queue.as_str().into(),
                tag.as_str().into(),
                BasicConsumeOptions { no_ack: true, ..Default::default() },
                FieldTable::default(),
            )
            .await?;
        for _ in 0..total {
            let d = consumer.next().await.ok_or("consumer cancelled")??;
            let v: serde_json::Value = serde_json::from_slice(&d.data)?;
            let (id, country) = if engine {
                let id = v["order_id"].as_str().ok_or("no order_id")?.to_string();
                let e = expect.get(&id).ok_or_else(|| format!("unknown order {id}"))?;
                // Money is compared as decimals, to the cent: "12.50" and "12.5" are one amount.
                let total: rust_decimal::Decimal = v["totals"]["total"]["amount"].as_str().ok_or("no total")?.parse()?;
                let want: rust_decimal::Decimal = e.total.parse()?;
                if total != want
                    || v["currency"] != e.currency.as_str()
                    || v["totals"]["total"]["currency"] != e.currency.as_str()
                    || v["channel"] != "shopify"
                    || v["lines"].as_array().map_or(0, Vec::len) != e.lines
                {
                    return Err(format!("{id}: output does not match its input: {v}").into());
                }
                (id, v["shipping_address"]["country"].as_str().ok_or("no country")?.to_string())
            } else {
                (format!("shopify:{}", v["id"]), v["shipping_address"]["country_code"].as_str().ok_or("no country")?.to_string())
            };
            let e = expect.get(&id).ok_or_else(|| format!("unknown order {id}"))?;
            if country != e.country || (i == 0) != (e.country == "US") {
                return Err(format!("{id} ({country}) is in {queue}").into());
            }
            if !seen.insert(id.clone()) {
                return Err(format!("{id} twice").into());
            }
        }
        ch.basic_cancel(tag.as_str().into(), BasicCancelOptions::default()).await?;
    }
    if seen.len() != expect.len() {
        return Err(format!("{} distinct orders out of {}", seen.len(), expect.len()).into());
    }
    ch.close(200, "done".into()).await?;
    Ok((counts[0], counts[1]))
}

async fn cleanup(conn: &Connection, q: &Queues) {
    if let Ok(ch) = conn.create_channel().await {
        for name in q.all() {
            let _ = ch.queue_delete(name.as_str().into(), QueueDeleteOptions::default()).await;
        }
        let _ = ch.close(200, "done".into()).await;
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum System {
    Engine,
    Relay,
    RelayMultiple,
    RelayEnveloped,
}

impl System {
    fn label(self) -> &'static str {
        match self {
            System::Engine => "switchyard `run --once`, pipelines/shopify-amqp.yaml",
            System::Relay => "lapin relay, ack each after its confirm (pipelined)",
            System::RelayMultiple => "lapin relay, `ack(multiple)` after in-order confirms",
            System::RelayEnveloped => "the `ack(multiple)` relay, outputs with the engine's properties and headers",
        }
    }
}

struct Sample {
    rate: f64,
    own_cpu_us: f64,
    broker_cpu_us: f64,
    rss_mib: f64,
}

async fn one(sys: System, run: usize, attempt: usize, lines: &[Vec<u8>], expect: &HashMap<String, Expect>, tick: f64) -> Res<Sample> {
    let suffix = format!(".bench{}.{run}.{attempt}.{}", std::process::id(), format!("{sys:?}").to_lowercase());
    let q = Queues::new(&suffix);
    let conn = Connection::connect(&url(), ConnectionProperties::default()).await?;
    let result = measure(&conn, sys, &q, &suffix, lines, expect, tick).await;
    let _ = conn.close(200, "done".into()).await;
    // On a fresh connection: the run's may have been closed under it.
    for _ in 0..30 {
        if let Ok(c) = Connection::connect(&url(), ConnectionProperties::default()).await {
            cleanup(&c, &q).await;
            let _ = c.close(200, "done".into()).await;
            break;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    result
}

async fn measure(
    conn: &Connection,
    sys: System,
    q: &Queues,
    suffix: &str,
    lines: &[Vec<u8>],
    expect: &HashMap<String, Expect>,
    tick: f64,
) -> Res<Sample> {
    let n = lines.len();
    preload(conn, q, lines).await?;
    let broker = broker_pid().unwrap_or_default();
    let limit = Duration::from_secs(300);
    let own = |pid: &str| cpu_seconds(pid, tick);
    let (mut cpu0, mut cpu1, mut b0, mut b1) = (0.0, 0.0, 0.0, 0.0);
    let mut rss = f64::NAN;
    let (start, end) = match sys {
        System::Engine => {
            let data = tempfile::tempdir_in(repo().join("target"))?;
            let log = std::fs::File::create(data.path().join("stderr.txt"))?;
            let out = std::fs::File::create(data.path().join("stdout.txt"))?;
            // `BENCH_ENGINE_WRAPPER`, e.g. `perf record -g -o target/amqp.perf.data --`, runs the
            // engine under a profiler (the CPU and RSS figures are then the wrapper's).
            let wrapper = std::env::var("BENCH_ENGINE_WRAPPER").unwrap_or_default();
            let mut argv: Vec<&str> = wrapper.split_whitespace().collect();
            argv.push(bin());
            let mut child = Command::new(argv[0])
                .args(&argv[1..])
                .args(["run", "engine/benches/pipelines/shopify-amqp.yaml", "--once", "--data-dir"])
                .arg(data.path())
                .current_dir(repo())
                .env("BENCH_SUFFIX", suffix)
                .env("BENCH_OUTPUT_QUEUES", output_queue_type())
                .env("SWITCHYARD_AMQP_URL", url())
                .stdout(out)
                .stderr(log)
                .spawn()?;
            let pid = child.id();
            let p = pid.to_string();
            let watched = watch(
                conn,
                q,
                n,
                limit,
                || {
                    cpu0 = own(&p);
                    b0 = own(&broker);
                },
                || {
                    cpu1 = own(&p);
                    b1 = own(&broker);
                    rss = vm_hwm_mib(pid);
                },
            )
            .await;
            let status = tokio::task::spawn_blocking(move || child.wait()).await??;
            let stdout = std::fs::read_to_string(data.path().join("stdout.txt")).unwrap_or_default();
            let stderr = std::fs::read_to_string(data.path().join("stderr.txt")).unwrap_or_default();
            let times = watched.map_err(|e| format!("{e}\nengine stdout:\n{stdout}\nengine stderr:\n{stderr}"))?;
            if !status.success() {
                return Err(format!("engine failed ({status}):\n{stdout}\n{stderr}").into());
            }
            let said = format!("{stdout}{stderr}");
            println!(
                "  engine: {}",
                said.trim().lines().rev().take(4).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n          ")
            );
            times
        }
        System::Relay | System::RelayMultiple | System::RelayEnveloped => {
            let me = std::process::id().to_string();
            let relayed = relay(conn, q, n, sys);
            let watched = watch(
                conn,
                q,
                n,
                limit,
                || {
                    cpu0 = own(&me);
                    b0 = own(&broker);
                },
                || {
                    cpu1 = own(&me);
                    b1 = own(&broker);
                },
            );
            let (r, w) = tokio::join!(relayed, watched);
            r?;
            w?
        }
    };
    let (us, intl) = verify(conn, q, expect, sys == System::Engine).await?;
    let secs = (end - start).as_secs_f64();
    let s = Sample {
        rate: n as f64 / secs,
        own_cpu_us: (cpu1 - cpu0) * 1e6 / n as f64,
        broker_cpu_us: (b1 - b0) * 1e6 / n as f64,
        rss_mib: rss,
    };
    println!(
        "  {sys:?}: {n} in {secs:.2} s = {:.0} msg/s; own CPU {:.1} us/msg, broker CPU {:.1} us/msg, peak RSS {:.0} MiB; verified {us} US + {intl} intl",
        s.rate, s.own_cpu_us, s.broker_cpu_us, s.rss_mib
    );
    Ok(s)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let n: usize = std::env::var("BENCH_ORDERS").ok().and_then(|v| v.parse().ok()).unwrap_or(100_000);
    let runs: usize = std::env::var("BENCH_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    let tick: f64 = Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0);
    let lines: Vec<Vec<u8>> =
        std::fs::read(workload(n)).expect("workload").split(|b| *b == b'\n').filter(|l| !l.is_empty()).map(<[u8]>::to_vec).collect();
    let expect = expectations(&lines);
    assert_eq!(expect.len(), n, "order ids are unique");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("tokio runtime");
    // `BENCH_SYSTEMS=engine` measures the engine alone (no ratios then); the enveloped relay runs
    // only when named (`BENCH_SYSTEMS=engine,relaymultiple,relayenveloped`).
    let only = std::env::var("BENCH_SYSTEMS").unwrap_or_default();
    let named = |s: &System| only.split(',').any(|o| o.trim().eq_ignore_ascii_case(&format!("{s:?}")));
    let systems: Vec<System> = [System::Engine, System::Relay, System::RelayMultiple, System::RelayEnveloped]
        .into_iter()
        .filter(|s| if only.is_empty() { *s != System::RelayEnveloped } else { named(s) })
        .collect();
    let mut samples: HashMap<System, Vec<Sample>> = HashMap::new();
    for run in 0..runs {
        for &sys in &systems {
            // A run disturbed by someone else's broker restarts is repeated.
            for attempt in 1..=5 {
                println!("run {} of {runs}, {sys:?} (attempt {attempt}; broker connections before: {})", run + 1, broker_connections());
                match rt.block_on(one(sys, run, attempt, &lines, &expect, tick)) {
                    Ok(s) => {
                        samples.entry(sys).or_default().push(s);
                        break;
                    }
                    Err(e) if attempt < 5 => {
                        println!("  disturbed, again in 10 s: {e}");
                        std::thread::sleep(Duration::from_secs(10));
                    }
                    Err(e) => panic!("{sys:?} failed 5 times: {e}"),
                }
            }
        }
    }
    let rate_of = |sys: System| samples.get(&sys).map_or(f64::NAN, |v| median(&mut v.iter().map(|s| s.rate).collect::<Vec<_>>()));
    let (relay, relay_multiple) = (rate_of(System::Relay), rate_of(System::RelayMultiple));
    println!(
        "\n{n} orders per run, {runs} runs; msg/s = orders / (first consumed -> both outputs hold all)\n\n\
         | system | msg/s median (min-max) | own CPU per msg | broker CPU per msg | peak RSS | vs relay | vs relay (multiple) |\n\
         |---|---|---|---|---|---|---|"
    );
    for &sys in &systems {
        let s = &samples[&sys];
        let mut rates: Vec<f64> = s.iter().map(|x| x.rate).collect();
        let m = median(&mut rates);
        let own = median(&mut s.iter().map(|x| x.own_cpu_us).collect::<Vec<_>>());
        let broker = median(&mut s.iter().map(|x| x.broker_cpu_us).collect::<Vec<_>>());
        let rss = s.iter().map(|x| x.rss_mib).fold(f64::NAN, f64::max);
        let rss = if rss.is_nan() { "-".to_string() } else { format!("{rss:.0} MiB") };
        println!(
            "| {} | {m:.0} ({:.0}-{:.0}) | {own:.1} us | {broker:.1} us | {rss} | {:.0} % | {:.0} % |",
            sys.label(),
            rates[0],
            rates[rates.len() - 1],
            100.0 * m / relay,
            100.0 * m / relay_multiple
        );
    }
}
