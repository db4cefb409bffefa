//! `SWITCHYARD_BROKER`: the same three-pipeline chain as the crash test (tests/crash/), its
//! queues carried by RabbitMQ instead of the embedded store by that one setting. Every message
//! ends in the final file or in a dead-letter queue, with the reason in its headers.
//! Needs RabbitMQ at 127.0.0.1:5672 (or `SWITCHYARD_AMQP_URL`); skipped without one unless
//! `SWITCHYARD_REQUIRE_BROKER=1`.

use lapin::options::{BasicGetOptions, ExchangeDeleteOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::{AMQPValue, FieldTable};
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("repo root").to_path_buf()
}

fn broker_url() -> Option<String> {
    let url = std::env::var("SWITCHYARD_AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let reachable = std::net::TcpStream::connect_timeout(&"127.0.0.1:5672".parse().unwrap(), std::time::Duration::from_secs(2)).is_ok()
        || std::env::var("SWITCHYARD_AMQP_URL").is_ok();
    if reachable {
        return Some(url);
    }
    assert!(
        std::env::var("SWITCHYARD_REQUIRE_BROKER").as_deref() != Ok("1"),
        "no RabbitMQ at 127.0.0.1:5672 and SWITCHYARD_REQUIRE_BROKER=1"
    );
    println!("skipped: no RabbitMQ at 127.0.0.1:5672");
    None
}

fn switchyard(dir: &Path, url: &str, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(args)
        .current_dir(dir)
        .env("SWITCHYARD_BROKER", url)
        .env("SWITCHYARD_DATA_DIR", dir.join("data"))
        .env("RUST_LOG", "warn")
        .output()
        .expect("switchyard runs")
}

#[test]
fn one_setting_moves_the_queues_between_pipelines_onto_rabbitmq() {
    let Some(url) = broker_url() else { return };
    let dir = tempfile::tempdir().unwrap();
    let prefix =
        format!("bs{}x{}", std::process::id(), std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis());
    for f in ["a.yaml", "b.yaml", "c.yaml", "b.rhai"] {
        let text = std::fs::read_to_string(repo().join("tests/crash").join(f)).unwrap();
        std::fs::write(dir.path().join(f), text.replace("crash.", &format!("{prefix}."))).unwrap();
    }
    let input: String = (0..1000).map(|i| format!("{{\"seq\": {i}, \"amount\": \"{i}.50\"}}\n")).collect();
    std::fs::write(dir.path().join("in.ndjson"), input).unwrap();

    // Nothing reads the queue yet: the send is refused, saying so, and nothing is lost.
    let early = switchyard(dir.path(), &url, &["send", &format!("{prefix}.in"), "in.ndjson"]);
    assert_eq!(early.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&early.stderr).contains("no pipeline reads"), "{}", String::from_utf8_lossy(&early.stderr));

    // A first run declares the topology; then the messages go in and a second run drains them.
    let first = switchyard(dir.path(), &url, &["run", ".", "--once"]);
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    let sent = switchyard(dir.path(), &url, &["send", &format!("{prefix}.in"), "in.ndjson"]);
    assert!(sent.status.success(), "{}", String::from_utf8_lossy(&sent.stderr));
    let run = switchyard(dir.path(), &url, &["run", ".", "--once"]);
    let said = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{said}");
    assert!(said.contains(&format!("RabbitMQ queue {prefix}.in.crash-a")), "{said}");

    let done = std::fs::read_to_string(dir.path().join("data/out/crash/done.ndjson")).unwrap();
    let mut seqs: Vec<u64> =
        done.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["payload"]["seq"].as_u64().unwrap()).collect();
    seqs.sort();
    let expected: Vec<u64> = (0..1000).filter(|s| s % 97 != 0).collect();
    assert_eq!(seqs, expected, "every message that passes reaches the file once");

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let conn = lapin::Connection::connect(&url, lapin::ConnectionProperties::default()).await.unwrap();
        let ch = conn.create_channel().await.unwrap();
        // The planned failures wait in crash-c's dead-letter queue, with their reason.
        let dlq = format!("{prefix}.mid2.crash-c.dlq");
        let mut reasons = Vec::new();
        while let Some(m) = ch.basic_get(dlq.as_str().into(), BasicGetOptions { no_ack: true }).await.unwrap() {
            let h = m.delivery.properties.headers().clone().unwrap_or_default();
            match h.inner().get("x-switchyard-reason") {
                Some(AMQPValue::LongString(s)) => reasons.push(s.to_string()),
                other => panic!("no reason header: {other:?}"),
            }
        }
        assert_eq!(reasons.len(), 11, "the multiples of 97 are dead-lettered");
        assert!(reasons.iter().all(|r| r == "unlucky_number"), "{reasons:?}");
        clean_up(&conn, &prefix, &[("in", "crash-a"), ("mid1", "crash-b"), ("mid2", "crash-c")]).await;
    });
}

/// Checks that each queue the `SWITCHYARD_BROKER` runs declared for `(queue, pipeline)` is empty,
/// then deletes them and the queue's exchange.
async fn clean_up(conn: &lapin::Connection, prefix: &str, readers: &[(&str, &str)]) {
    let ch = conn.create_channel().await.unwrap();
    for (queue, pipeline) in readers {
        let base = format!("{prefix}.{queue}.{pipeline}");
        for q in [base.clone(), format!("{base}.retry.1s"), format!("{base}.retry.10s"), format!("{base}.retry.1m"), format!("{base}.dlq")]
        {
            let left = ch
                .queue_declare(q.as_str().into(), QueueDeclareOptions { passive: true, ..Default::default() }, FieldTable::default())
                .await;
            if let Ok(left) = left {
                assert_eq!(left.message_count(), 0, "{q} is empty");
            }
            let ch2 = conn.create_channel().await.unwrap();
            let _ = ch2.queue_delete(q.as_str().into(), QueueDeleteOptions::default()).await;
        }
        let _ = ch.exchange_delete(format!("{prefix}.{queue}").as_str().into(), ExchangeDeleteOptions::default()).await;
    }
}

/// Duplicate stopping over RabbitMQ: the relay's key travels in the message (as its message id
/// and a header), the downstream pipeline drops the duplicate and acknowledges it, and a second
/// run remembers the keys delivered in the first. With PostgreSQL, the second run is another
/// engine with a data directory of its own (another machine): the keys are shared.
#[test]
fn duplicates_are_stopped_by_the_upstream_key_over_rabbitmq() {
    let Some(url) = broker_url() else { return };
    let dir = tempfile::tempdir().unwrap();
    let prefix =
        format!("bi{}x{}", std::process::id(), std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis());
    for f in ["idem-relay.yaml", "idem-downstream.yaml"] {
        let text = std::fs::read_to_string(repo().join("tests/runtime/idempotency").join(f)).unwrap();
        std::fs::write(dir.path().join(f), text.replace("queue: idem.", &format!("queue: {prefix}."))).unwrap();
    }
    let postgres = switchyard::store::test_postgres_url().map(|u| format!("{u}?schema=sy_{prefix}"));
    let engine = |machine: &str, args: &[&str]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_switchyard"));
        c.args(args).current_dir(dir.path()).env("SWITCHYARD_BROKER", &url).env("SWITCHYARD_DATA_DIR", dir.path().join(machine));
        if let Some(store) = &postgres {
            c.env("SWITCHYARD_STORE", store);
        }
        let out = c.env("RUST_LOG", "warn").output().expect("switchyard runs");
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let posted = |machine: &str| -> Vec<serde_json::Value> {
        std::fs::read_to_string(dir.path().join(machine).join("out/idem/posted.ndjson"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    engine("a", &["run", ".", "--once"]);
    std::fs::write(dir.path().join("in.ndjson"), "{\"id\":\"x1\"}\n{\"id\":\"x1\"}\n{\"id\":\"x2\"}\n").unwrap();
    engine("a", &["send", &format!("{prefix}.relay.in"), "in.ndjson"]);
    let said = engine("a", &["run", ".", "--once"]);
    assert!(said.contains("duplicates       1"), "{said}");
    let first: Vec<(String, String)> = posted("a")
        .iter()
        .map(|m| (m["payload"]["id"].as_str().unwrap().to_string(), m["metadata"]["message_id"].as_str().unwrap().to_string()))
        .collect();
    assert_eq!(first, [("x1".to_string(), "erp:x1".to_string()), ("x2".to_string(), "erp:x2".to_string())], "the key is the message id");

    let second = if postgres.is_some() { "b" } else { "a" };
    std::fs::write(dir.path().join("again.ndjson"), "{\"id\":\"x2\"}\n{\"id\":\"x3\"}\n").unwrap();
    engine(second, &["send", &format!("{prefix}.relay.in"), "again.ndjson"]);
    let said = engine(second, &["run", ".", "--once"]);
    assert!(said.contains("duplicates       1"), "x2 was delivered in the first run: {said}");
    let ids: Vec<String> = [posted("a"), if second == "b" { posted("b") } else { vec![] }]
        .concat()
        .iter()
        .map(|m| m["payload"]["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, ["x1", "x2", "x3"], "each order delivered once over both engines");

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let conn = lapin::Connection::connect(&url, lapin::ConnectionProperties::default()).await.unwrap();
        clean_up(&conn, &prefix, &[("relay.in", "idem-relay"), ("keyed", "idem-downstream")]).await;
        if let Some(store) = &postgres {
            switchyard::store::PostgresStore::connect(store).await.unwrap().drop_schema().await.unwrap();
        }
    });
}

/// With a shared store, a RabbitMQ-fed pipeline's exception records go to PostgreSQL (not to its
/// dead-letter queue); a replay asked for on a machine without broker or data directory goes
/// back to the pipeline's queue through whichever engine runs it next.
#[test]
fn exceptions_over_rabbitmq_go_to_the_shared_store_and_replays_go_back_to_the_queue() {
    let Some(url) = broker_url() else { return };
    let Some(pg) = switchyard::store::test_postgres_url() else { return };
    let dir = tempfile::tempdir().unwrap();
    let prefix =
        format!("bx{}x{}", std::process::id(), std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis());
    let store = format!("{pg}?schema=sy_{prefix}");
    let text = std::fs::read_to_string(repo().join("tests/runtime/sku/rt-sku-orders.yaml")).unwrap();
    // Where each message came from, as the pipeline reads it: a replay must read the same.
    let text = text
        .replace("queue: rt.sku.in", &format!("queue: {prefix}.sku.in"))
        .replace("      sku: $.sku\n", "      sku: $.sku\n      via: {template: \"{header.amqp.exchange}/{header.amqp.routing_key}\"}\n");
    std::fs::write(dir.path().join("sku.yaml"), text).unwrap();
    std::fs::copy(repo().join("tests/runtime/sku/skus.csv"), dir.path().join("skus.csv")).unwrap();
    let sy = |machine: &str, broker: bool, args: &[&str]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_switchyard"));
        c.args(args).current_dir(dir.path()).env("SWITCHYARD_DATA_DIR", dir.path().join(machine)).env("SWITCHYARD_STORE", &store);
        if broker {
            c.env("SWITCHYARD_BROKER", &url);
        }
        let out = c.env("RUST_LOG", "warn").output().expect("switchyard runs");
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        (String::from_utf8_lossy(&out.stdout).to_string(), String::from_utf8_lossy(&out.stderr).to_string())
    };
    let lines = |machine: &str| std::fs::read_to_string(dir.path().join(machine).join("out/sku/lines.ndjson")).unwrap_or_default();
    sy("a", true, &["run", ".", "--once"]);
    std::fs::write(dir.path().join("in.ndjson"), "{\"id\":\"1\",\"sku\":\"SKU-1\"}\n{\"id\":\"2\",\"sku\":\"SKU-9\"}\n").unwrap();
    sy("a", true, &["send", &format!("{prefix}.sku.in"), "in.ndjson"]);
    let (_, said) = sy("a", true, &["run", ".", "--once"]);
    assert!(said.contains("total: 2 in = 1 routed + 1 exceptions"), "{said}");

    let (listed, _) = sy("desk", false, &["exceptions", "list", "--format", "json"]);
    let records: Vec<serde_json::Value> = serde_json::from_str(&listed).unwrap();
    assert_eq!(records.len(), 1, "{records:#?}");
    assert_eq!(
        (records[0]["reason"].as_str(), records[0]["original_payload"].as_str()),
        (Some("unknown_sku"), Some("{\"id\":\"2\",\"sku\":\"SKU-9\"}"))
    );
    std::fs::write(dir.path().join("skus.csv"), "# version: 2\nsku,item_code\nSKU-1,ITM-001\nSKU-9,ITM-009\n").unwrap();
    let (replayed, _) = sy("desk", false, &["exceptions", "replay", records[0]["exception_id"].as_str().unwrap()]);
    assert!(replayed.contains("replayed"), "{replayed}");

    let (_, said) = sy("b", true, &["run", ".", "--once"]);
    assert!(said.contains("total: 1 in = 1 routed + 0 exceptions"), "the replay came back through the queue: {said}");
    let out: Vec<serde_json::Value> = lines("b").lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!((out.len(), out[0]["id"].as_str(), out[0]["item_code"].as_str()), (1, Some("2"), Some("ITM-009")));
    let first: Vec<serde_json::Value> = lines("a").lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(first.len(), 1);
    assert_eq!(first[0]["via"], format!("{prefix}.sku.in/"), "sent to the exchange with no routing key");
    assert_eq!(out[0]["via"], first[0]["via"], "the replay reads the exchange and routing key it first came with");

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let conn = lapin::Connection::connect(&url, lapin::ConnectionProperties::default()).await.unwrap();
        // Nothing went to the dead-letter queue (checked empty here), nothing is left.
        clean_up(&conn, &prefix, &[("sku.in", "rt-sku-orders")]).await;
        switchyard::store::PostgresStore::connect(&store).await.unwrap().drop_schema().await.unwrap();
    });
}

/// Mixed routable and unroutable outputs in the same batches: every unroutable one comes back
/// (mandatory), is retried, then dead-lettered as `sink_failed`; every routable one arrives once.
/// lapin hands a returned message to whichever confirm completes next, so this also checks that
/// returns are told apart per publish.
#[test]
fn unroutable_outputs_are_retried_then_dead_lettered_never_dropped() {
    let Some(url) = broker_url() else { return };
    let dir = tempfile::tempdir().unwrap();
    let p = format!("ur{}x{}", std::process::id(), std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis());
    let pipeline = format!(
        r#"apiVersion: switchyard/v1
kind: Pipeline
name: unroutable
version: "1"
description: half of the outputs have nowhere to go
owner: tests
broker:
  url: {url}
  topology:
    queues: [{{name: {p}.out}}]
source: {{type: amqp, queue: {p}.work, retry: {{delays: [100ms, 200ms]}}}}
sinks:
  out: {{type: amqp, routing_key: "{p}.{{$.dest}}"}}
runtime: {{batch_size: 50}}
"#
    );
    std::fs::write(dir.path().join("unroutable.yaml"), pipeline).unwrap();
    let feed = format!(
        r#"apiVersion: switchyard/v1
kind: Pipeline
name: feed
version: "1"
description: feeds the work queue
owner: tests
broker:
  url: {url}
  topology:
    queues: [{{name: {p}.work}}]
source: {{type: file, path: in.ndjson, format: ndjson}}
sinks:
  work: {{type: amqp, routing_key: {p}.work}}
"#
    );
    std::fs::write(dir.path().join("feed.yaml"), feed).unwrap();
    let input: String =
        (0..600).map(|i| format!("{{\"seq\": {i}, \"dest\": \"{}\"}}\n", if i % 2 == 0 { "out" } else { "nowhere" })).collect();
    std::fs::write(dir.path().join("in.ndjson"), input).unwrap();
    let run = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["run", "feed.yaml", "unroutable.yaml", "--once"])
        .current_dir(dir.path())
        .env("SWITCHYARD_DATA_DIR", dir.path().join("data"))
        .env("RUST_LOG", "error")
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{said}");
    assert!(said.contains("sink_failed               300"), "{said}");

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let conn = lapin::Connection::connect(&url, lapin::ConnectionProperties::default()).await.unwrap();
        let ch = conn.create_channel().await.unwrap();
        let take = |queue: String| {
            let ch = ch.clone();
            async move {
                let mut seqs = Vec::new();
                let mut attempts = Vec::new();
                while let Some(m) = ch.basic_get(queue.as_str().into(), BasicGetOptions { no_ack: true }).await.unwrap() {
                    let v: serde_json::Value = serde_json::from_slice(&m.delivery.data).unwrap();
                    seqs.push(v["seq"].as_u64().unwrap());
                    if let Some(AMQPValue::LongString(a)) =
                        m.delivery.properties.headers().as_ref().and_then(|h| h.inner().get("x-switchyard-attempt"))
                    {
                        attempts.push(a.to_string());
                    }
                }
                seqs.sort();
                (seqs, attempts)
            }
        };
        let (out, _) = take(format!("{p}.out")).await;
        assert_eq!(out, (0..600).filter(|s| s % 2 == 0).collect::<Vec<u64>>(), "routable outputs arrive once each");
        let (dead, attempts) = take(format!("{p}.work.dlq")).await;
        assert_eq!(dead, (0..600).filter(|s| s % 2 == 1).collect::<Vec<u64>>(), "unroutable ones are dead-lettered, none dropped");
        assert!(attempts.iter().all(|a| a == "3"), "after two retries: {attempts:?}");
        for q in [
            format!("{p}.out"),
            format!("{p}.work"),
            format!("{p}.work.retry.100ms"),
            format!("{p}.work.retry.200ms"),
            format!("{p}.work.dlq"),
        ] {
            let _ = ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default()).await;
        }
    });
}

/// A sink exchange that does not exist: a fixed one stops the run at start, saying which; a
/// rendered one is a sink failure for the messages that name it (retried, then dead-lettered),
/// while the others go through.
#[test]
fn missing_exchanges_are_said_at_start_or_dead_lettered() {
    let Some(url) = broker_url() else { return };
    let dir = tempfile::tempdir().unwrap();
    let p = format!("mx{}x{}", std::process::id(), std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis());
    let write = |name: &str, sink: &str| {
        let text = format!(
            r#"apiVersion: switchyard/v1
kind: Pipeline
name: {name}
version: "1"
description: publishes to exchanges that may not exist
owner: tests
broker:
  url: {url}
  topology:
    exchanges: [{{name: {p}.real, type: fanout}}]
    queues: [{{name: {p}.out}}, {{name: {p}.work}}]
    bindings: [{{exchange: {p}.real, queue: {p}.out}}]
source: {{type: amqp, queue: {p}.work, retry: {{delays: [100ms]}}}}
sinks:
  out: {sink}
"#
        );
        std::fs::write(dir.path().join(format!("{name}.yaml")), text).unwrap();
    };
    let run = |file: &str| {
        Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args(["run", file, "--once"])
            .current_dir(dir.path())
            .env("SWITCHYARD_DATA_DIR", dir.path().join("data"))
            .env("RUST_LOG", "error")
            .output()
            .unwrap()
    };
    write("fixed", &format!("{{type: amqp, exchange: {p}.missing}}"));
    let out = run("fixed.yaml");
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(said.contains(&format!("exchange `{p}.missing`, which does not exist")), "{said}");

    write("rendered", &format!("{{type: amqp, exchange: \"{p}.{{$.to}}\"}}"));
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let conn = lapin::Connection::connect(&url, lapin::ConnectionProperties::default()).await.unwrap();
        let ch = conn.create_channel().await.unwrap();
        ch.confirm_select(Default::default()).await.unwrap();
        for i in 0..100 {
            let body = format!("{{\"seq\": {i}, \"to\": \"{}\"}}", if i % 10 == 0 { "missing" } else { "real" });
            ch.basic_publish("".into(), format!("{p}.work").as_str().into(), Default::default(), body.as_bytes(), Default::default())
                .await
                .unwrap()
                .await
                .unwrap();
        }
    });
    let out = run("rendered.yaml");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    assert!(said.contains("total: 100 in = 90 routed + 10 exceptions"), "{said}");
    rt.block_on(async {
        let conn = lapin::Connection::connect(&url, lapin::ConnectionProperties::default()).await.unwrap();
        let ch = conn.create_channel().await.unwrap();
        let count = |q: String| {
            let ch = ch.clone();
            async move {
                ch.queue_declare(q.as_str().into(), QueueDeclareOptions { passive: true, ..Default::default() }, FieldTable::default())
                    .await
                    .unwrap()
                    .message_count()
            }
        };
        assert_eq!(count(format!("{p}.out")).await, 90);
        assert_eq!(count(format!("{p}.work.dlq")).await, 10);
        for q in [format!("{p}.out"), format!("{p}.work"), format!("{p}.work.retry.100ms"), format!("{p}.work.dlq")] {
            let _ = ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default()).await;
        }
        let _ = ch.exchange_delete(format!("{p}.real").as_str().into(), ExchangeDeleteOptions::default()).await;
    });
}

/// Ordering over RabbitMQ: a stale event is dropped, a cancellation that comes before its order
/// waits in the retry queues and is delivered after it.
#[test]
fn events_are_ordered_per_entity_over_rabbitmq() {
    let Some(url) = broker_url() else { return };
    let dir = tempfile::tempdir().unwrap();
    let prefix =
        format!("bo{}x{}", std::process::id(), std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis());
    let text = std::fs::read_to_string(repo().join("tests/runtime/ordering/ord-orders.yaml")).unwrap();
    // A short wait for predecessors: honoured over RabbitMQ too, whatever the retry tiers.
    let text = text.replace("queue: ord.", &format!("queue: {prefix}.")).replace("${ORD_WAIT:-10m}", "3s");
    std::fs::write(dir.path().join("ord-orders.yaml"), text).unwrap();
    let ok = |args: &[&str]| {
        let out = switchyard(dir.path(), &url, args);
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    ok(&["run", ".", "--once"]);
    let events = "{\"order_id\":\"o1\",\"seq\":1}\n{\"order_id\":\"o1\",\"seq\":3}\n{\"order_id\":\"o1\",\"seq\":2}\n\
                  {\"order_id\":\"o4\",\"seq\":2,\"kind\":\"cancellation\"}\n{\"order_id\":\"o4\",\"seq\":1,\"kind\":\"created\"}\n\
                  {\"order_id\":\"o9\",\"seq\":2,\"kind\":\"cancellation\"}\n";
    std::fs::write(dir.path().join("events.ndjson"), events).unwrap();
    ok(&["send", &format!("{prefix}.in"), "events.ndjson"]);
    let started = std::time::Instant::now();
    let said = ok(&["run", ".", "--once"]);
    assert!(said.contains("stale            1"), "{said}");
    assert!(said.contains("missing_predecessor") && said.contains("1 exceptions"), "o9's order never came: {said}");
    assert!(started.elapsed() < std::time::Duration::from_secs(10), "o9 waited 3 s, not the retry tiers (1s + 10s + 1m)");
    let delivered: Vec<(String, i64)> = std::fs::read_to_string(dir.path().join("data/out/ord/events.ndjson"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .map(|e| (e["order_id"].as_str().unwrap().to_string(), e["seq"].as_i64().unwrap()))
        .collect();
    let of = |id: &str| delivered.iter().filter(|(o, _)| o == id).map(|(_, s)| *s).collect::<Vec<_>>();
    assert_eq!((of("o1"), of("o4")), (vec![1, 3], vec![1, 2]), "in version order, the stale one dropped: {delivered:?}");
    assert!(of("o9").is_empty());

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let conn = lapin::Connection::connect(&url, lapin::ConnectionProperties::default()).await.unwrap();
        let ch = conn.create_channel().await.unwrap();
        let dlq = format!("{prefix}.in.ord-orders.dlq");
        let m = ch.basic_get(dlq.as_str().into(), BasicGetOptions { no_ack: true }).await.unwrap().expect("o9 is dead-lettered");
        let h = m.delivery.properties.headers().clone().unwrap_or_default();
        assert!(matches!(h.inner().get("x-switchyard-reason"), Some(AMQPValue::LongString(s)) if s.to_string() == "missing_predecessor"));
        assert!(String::from_utf8_lossy(&m.delivery.data).contains("o9"));
        clean_up(&conn, &prefix, &[("in", "ord-orders")]).await;
    });
}

/// A circuit breaker on a RabbitMQ sink: publishes the broker returns (no queue takes them) are
/// failures; after two in a row the circuit opens, `switchyard status` says so, and the messages
/// wait in their queue: no exception, nothing dropped.
#[test]
fn a_sink_the_broker_keeps_refusing_opens_its_circuit_and_work_waits_in_the_queue() {
    let Some(url) = broker_url() else { return };
    let dir = tempfile::tempdir().unwrap();
    let p = format!("cb{}x{}", std::process::id(), std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis());
    let pipeline = format!(
        r#"apiVersion: switchyard/v1
kind: Pipeline
name: breaker
version: "1"
description: every output is returned by the broker
owner: tests
broker:
  url: {url}
source: {{type: queue, queue: breaker.in}}
sinks:
  out:
    type: amqp
    routing_key: {p}.nowhere
    retry: {{max_attempts: 20, initial_delay: 50ms, max_delay: 100ms}}
    circuit_breaker: {{failures: 2, open_for: 1h}}
"#
    );
    std::fs::write(dir.path().join("breaker.yaml"), pipeline).unwrap();
    let input: String = (0..10).map(|i| format!("{{\"seq\": {i}}}\n")).collect();
    std::fs::write(dir.path().join("in.ndjson"), input).unwrap();
    let sy = |args: &[&str]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_switchyard"));
        c.args(args).current_dir(dir.path()).env("SWITCHYARD_DATA_DIR", dir.path().join("data")).env("RUST_LOG", "warn");
        c
    };
    let log = std::fs::File::create(dir.path().join("run.log")).unwrap();
    let mut engine = sy(&["run", "breaker.yaml"]).stdout(std::process::Stdio::null()).stderr(log).spawn().unwrap();
    let sent = sy(&["send", "breaker.in", "in.ndjson"]).output().unwrap();
    assert!(sent.status.success(), "{}", String::from_utf8_lossy(&sent.stderr));

    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let status = loop {
        let out = sy(&["status", "--format", "json"]).output().unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let open = v["sinks"].as_array().into_iter().flatten().find(|s| s["sink"] == "out" && s["breaker"] == "open").cloned();
        if let Some(s) = open {
            break s;
        }
        if std::time::Instant::now() > deadline {
            let _ = engine.kill();
            panic!("the circuit did not open: {v}\n{}", std::fs::read_to_string(dir.path().join("run.log")).unwrap_or_default());
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    assert!(status["last_failure"].as_str().is_some_and(|f| f.contains("sink `out`")), "{status}");
    assert!(status["failures"].as_i64().is_some_and(|n| n >= 2), "{status}");

    Command::new("kill").args(["-TERM", &engine.id().to_string()]).status().unwrap();
    let exit = engine.wait().unwrap();
    let said = std::fs::read_to_string(dir.path().join("run.log")).unwrap();
    assert!(exit.success(), "{said}");
    assert!(said.contains("circuit open: the sink failed too often in a row"), "the opening is logged: {said}");
    assert!(said.contains("0 exceptions"), "refusals while it is open are no exceptions: {said}");
    let queues = sy(&["queues", "--format", "json"]).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&queues.stdout).unwrap();
    let waiting: i64 = v
        .as_array()
        .unwrap()
        .iter()
        .filter(|q| q["queue"] == "breaker.in")
        .map(|q| q["ready"].as_i64().unwrap() + q["delayed"].as_i64().unwrap() + q["in_flight"].as_i64().unwrap())
        .sum();
    assert_eq!(waiting, 10, "every message waits in its queue: {v}");
}
