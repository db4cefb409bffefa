//! End-to-end durable benchmark (issue 3): `cargo bench -p switchyard --bench durable`.
//!
//! Drives the release `switchyard` binary as a user would, on the workload of WORKLOAD.md
//! (`gen_orders.py`, 100,000 Shopify-like orders), each scenario in a fresh data directory:
//!
//! 1. one pipeline: 100,000 orders preloaded in queue `orders.in`, `run --once` through the
//!    Shopify reference chain to queues `erp.us` / `erp.intl`: orders/s, peak RSS;
//! 2. latency: `run` waiting on an empty queue while this process sends orders at a steady rate;
//!    p50 and p99 from the send commit to the output commit;
//! 3. a chain of three pipelines (Shopify -> canonical -> ERP sales order -> acknowledgement);
//! 4. 1,000,000 orders queued: peak RSS of `send` and of `run --once` over all of them;
//! 5. the same Shopify chain in memory, one core, no store: the ceiling the store is measured against.
//!
//! `BENCH_ORDERS` (default 100000) and `BENCH_SCENARIOS` (e.g. `1,2`) narrow a run.

mod common;
use common::{bin, repo, workload};
use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use switchyard::store::{self, Durability, NewMessage, Store};

/// Runs a command under GNU time: (wall seconds, peak RSS in MiB, stderr).
fn timed(args: &[&str], data: &Path, env: &[(&str, &str)]) -> (f64, f64, String) {
    let report = data.join("time.txt");
    let out = Command::new("/usr/bin/time")
        .args(["-f", "%e %M", "-o"])
        .arg(&report)
        .arg(bin())
        .args(args)
        .current_dir(repo())
        .env("SWITCHYARD_DATA_DIR", data)
        .envs(env.iter().copied())
        .output()
        .expect("/usr/bin/time runs");
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{args:?} failed:\n{stderr}");
    let t = std::fs::read_to_string(&report).expect("time report");
    let mut parts = t.split_whitespace();
    let wall: f64 = parts.next().unwrap().parse().unwrap();
    let kib: f64 = parts.next().unwrap().parse().unwrap();
    (wall, kib / 1024.0, stderr)
}

fn count(data: &Path, queue: &str) -> i64 {
    let c = rusqlite::Connection::open(store::db_path(data)).unwrap();
    c.query_row("SELECT count(*) FROM messages JOIN streams ON streams.id = messages.stream WHERE queue = ?1", [queue], |r| r.get(0))
        .unwrap()
}

fn distinct_ids(data: &Path, queues: &[&str]) -> i64 {
    let c = rusqlite::Connection::open(store::db_path(data)).unwrap();
    let list = queues.iter().map(|q| format!("'{q}'")).collect::<Vec<_>>().join(",");
    c.query_row(
        &format!("SELECT count(DISTINCT message_id) FROM messages JOIN streams ON streams.id = messages.stream WHERE queue IN ({list})"),
        [],
        |r| r.get(0),
    )
    .unwrap()
}

struct Row {
    what: String,
    figure: String,
    detail: String,
}

fn single(orders: &Path, n: usize, rows: &mut Vec<Row>, durability: &str) {
    let data = tempfile::tempdir_in(repo().join("target")).unwrap();
    let env = [("SWITCHYARD_DURABILITY", durability)];
    let (send_wall, send_rss, _) = timed(&["send", "orders.in", orders.to_str().unwrap()], data.path(), &env);
    let (wall, rss, _) = timed(&["run", "engine/benches/pipelines/shopify-durable.yaml", "--once"], data.path(), &env);
    let (us, intl) = (count(data.path(), "erp.us"), count(data.path(), "erp.intl"));
    assert_eq!(us + intl, n as i64, "every order is in an output queue");
    assert_eq!(distinct_ids(data.path(), &["erp.us", "erp.intl"]), n as i64, "no duplicates");
    println!("single ({durability}): send {send_wall:.2}s, run {wall:.2}s, {us} US + {intl} intl, peak RSS {rss:.0} MiB");
    rows.push(Row {
        what: format!("Shopify pipeline, queue -> queues, `{durability}` durability"),
        figure: format!("{:.0} orders/s", n as f64 / wall),
        detail: format!(
            "{n} orders in {wall:.2} s; peak RSS {rss:.0} MiB; `send` enqueued them at {:.0}/s ({send_rss:.0} MiB)",
            n as f64 / send_wall
        ),
    });
}

fn latency(orders: &Path, rows: &mut Vec<Row>, rate: u64, seconds: u64) {
    let data = tempfile::tempdir_in(repo().join("target")).unwrap();
    let mut child = Command::new(bin())
        .args(["run", "engine/benches/pipelines/shopify-durable.yaml"])
        .current_dir(repo())
        .env("SWITCHYARD_DATA_DIR", data.path())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let store = Store::open(data.path(), Durability::Full).unwrap();
    let lines: Vec<Vec<u8>> = std::fs::read(orders).unwrap().split(|b| *b == b'\n').filter(|l| !l.is_empty()).map(<[u8]>::to_vec).collect();
    let mut sent_at: HashMap<String, i64> = HashMap::new();
    let per_tick = (rate / 100).max(1) as usize;
    let start = Instant::now();
    let mut i = 0;
    for tick in 0..(seconds * 100) {
        let due = start + Duration::from_millis(tick * 10);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let batch: Vec<NewMessage> = (0..per_tick)
            .map(|k| NewMessage { message_id: format!("lat-{}", i + k), headers: "{}".into(), body: lines[(i + k) % lines.len()].clone() })
            .collect();
        let ids: Vec<String> = batch.iter().map(|m| m.message_id.clone()).collect();
        store.submit_blocking(move |c| store::enqueue(c, "orders.in", &batch)).unwrap();
        let now = store::now_micros();
        for id in ids {
            sent_at.insert(id, now);
        }
        i += per_tick;
    }
    let achieved = i as f64 / start.elapsed().as_secs_f64();
    // Wait for the last outputs, then stop the engine as an operator would.
    let deadline = Instant::now() + Duration::from_secs(30);
    while count(data.path(), "erp.us") + count(data.path(), "erp.intl") < i as i64 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(child.wait().unwrap().success());
    store.close();
    let c = rusqlite::Connection::open(store::db_path(data.path())).unwrap();
    let mut lat: Vec<i64> = c
        .prepare("SELECT message_id, enqueued_at FROM messages JOIN streams ON streams.id = messages.stream WHERE queue IN ('erp.us', 'erp.intl')")
        .unwrap()
        .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
        .unwrap()
        .map(|r| {
            let (id, out) = r.unwrap();
            out - sent_at[&id]
        })
        .collect();
    assert_eq!(lat.len(), i, "every order came out");
    lat.sort_unstable();
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)] as f64 / 1000.0;
    println!("latency at {achieved:.0}/s: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms", pct(0.5), pct(0.99), pct(1.0));
    rows.push(Row {
        what: format!("Shopify pipeline latency at a steady {achieved:.0} orders/s ({seconds} s, sender in another process)"),
        figure: format!("p50 {:.1} ms, p99 {:.1} ms", pct(0.5), pct(0.99)),
        detail: format!("from the commit that enqueued the order to the commit of its output; max {:.1} ms", pct(1.0)),
    });
}

fn chain(orders: &Path, n: usize, rows: &mut Vec<Row>) {
    let data = tempfile::tempdir_in(repo().join("target")).unwrap();
    timed(&["send", "orders.in", orders.to_str().unwrap()], data.path(), &[]);
    let (wall, rss, _) = timed(
        &[
            "run",
            "engine/benches/pipelines/chain-1-shopify.yaml",
            "engine/benches/pipelines/chain-2-erp.yaml",
            "engine/benches/pipelines/chain-3-ack.yaml",
            "--once",
        ],
        data.path(),
        &[],
    );
    assert_eq!(count(data.path(), "bench.acks"), n as i64, "every order was acknowledged");
    println!("chain: {wall:.2}s, peak RSS {rss:.0} MiB");
    rows.push(Row {
        what: "chain of three pipelines: Shopify -> canonical Order -> ERP sales order -> acknowledgement, queue to queue".into(),
        figure: format!("{:.0} orders/s", n as f64 / wall),
        detail: format!("{n} orders ({} messages processed) in {wall:.2} s; peak RSS {rss:.0} MiB", 3 * n),
    });
}

fn million(orders: &Path, n: usize, rows: &mut Vec<Row>) {
    let data = tempfile::tempdir_in(repo().join("target")).unwrap();
    let copies = 1_000_000 / n;
    let files: Vec<&str> = std::iter::repeat_n(orders.to_str().unwrap(), copies).collect();
    let mut args = vec!["send", "orders.in"];
    args.extend(files);
    let (send_wall, send_rss, _) = timed(&args, data.path(), &[]);
    let queued = count(data.path(), "orders.in");
    let (wall, rss, _) = timed(&["run", "engine/benches/pipelines/shopify-durable.yaml", "--once"], data.path(), &[]);
    assert_eq!(count(data.path(), "erp.us") + count(data.path(), "erp.intl"), queued);
    let db = std::fs::metadata(store::db_path(data.path())).map(|m| m.len()).unwrap_or(0) as f64 / (1 << 30) as f64;
    println!("1M: send {send_wall:.1}s ({send_rss:.0} MiB), run {wall:.1}s, peak RSS {rss:.0} MiB, db {db:.1} GiB");
    rows.push(Row {
        what: format!("{queued} orders queued, then `run --once` over all of them"),
        figure: format!("peak RSS {rss:.0} MiB"),
        detail: format!(
            "{:.0} orders/s over the million; `send` of the million: {send_wall:.1} s, peak RSS {send_rss:.0} MiB; store file {db:.1} GiB",
            queued as f64 / wall
        ),
    });
}

fn in_memory(orders: &Path, rows: &mut Vec<Row>) {
    use switchyard::message::RawMessage;
    use switchyard::pipeline::{Outcome, load};
    let p = load::load_file(&repo().join("engine/benches/pipelines/shopify-durable.yaml"), &switchyard::build::Shared::with_process_env())
        .expect("bench pipeline loads");
    let lines: Vec<Vec<u8>> = std::fs::read(orders).unwrap().split(|b| *b == b'\n').filter(|l| !l.is_empty()).map(<[u8]>::to_vec).collect();
    let start = Instant::now();
    let mut bytes = 0;
    for l in &lines {
        if let Outcome::Routed { output, .. } = p.process(RawMessage::json(l.clone())) {
            bytes += output.payload.to_json_bytes().len();
        }
    }
    let wall = start.elapsed().as_secs_f64();
    assert!(bytes > 0);
    println!("in memory: {:.0}/s", lines.len() as f64 / wall);
    rows.push(Row {
        what: "the same Shopify chain in memory (no store), one core, bytes in, bytes out".into(),
        figure: format!("{:.0} orders/s", lines.len() as f64 / wall),
        detail: format!("{} orders in {wall:.2} s", lines.len()),
    });
}

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    // `cargo bench` passes `--bench`; nothing else to parse.
    let n: usize = std::env::var("BENCH_ORDERS").ok().and_then(|v| v.parse().ok()).unwrap_or(100_000);
    let scenarios: Vec<u32> = std::env::var("BENCH_SCENARIOS")
        .map(|s| s.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|_| vec![1, 2, 3, 4, 5]);
    let orders = workload(n);
    let mut rows = Vec::new();
    if scenarios.contains(&1) {
        single(&orders, n, &mut rows, "full");
        single(&orders, n, &mut rows, "normal");
    }
    if scenarios.contains(&2) {
        latency(&orders, &mut rows, 10_000, 10);
    }
    if scenarios.contains(&3) {
        chain(&orders, n, &mut rows);
    }
    if scenarios.contains(&4) {
        million(&orders, n, &mut rows);
    }
    if scenarios.contains(&5) {
        in_memory(&orders, &mut rows);
    }
    println!("\n| scenario | figure | detail |\n|---|---|---|");
    for r in rows {
        println!("| {} | {} | {} |", r.what, r.figure, r.detail);
    }
}
