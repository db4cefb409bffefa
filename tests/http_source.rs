//! The `http` source from the outside: a real `switchyard run` serving tests/http/webhooks.yaml
//! (Shopify-style HMAC signatures) and tests/http/pos-sales.yaml (API keys, a rate limit per
//! store, synchronous validation), driven over real HTTP on 127.0.0.1.

use base64::Engine as _;
use hmac::{KeyInit, Mac};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const SECRET: &str = "whsec-test-4f1b7c";
const OLD_SECRET: &str = "whsec-old-9a2e0d";
const KEY_12: &str = "pos-key-store12-77aa";
const KEY_14: &str = "pos-key-store14-0b3c";
const ORDERS: &str = "/ingest/shopify/orders";
const SALES: &str = "/ingest/pos/sales";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("repo root").to_path_buf()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A continuous `switchyard run` of both fixtures; killed when dropped.
struct Engine {
    child: Option<Child>,
    data: PathBuf,
    base: String,
}

impl Engine {
    fn start(data: &Path) -> Engine {
        std::fs::create_dir_all(data).unwrap();
        let port = free_port();
        let log = std::fs::OpenOptions::new().create(true).append(true).open(data.join("run.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args(["run", "tests/http/webhooks.yaml", "tests/http/pos-sales.yaml", "--log-level", "info", "--data-dir"])
            .arg(data)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .current_dir(repo())
            .env_remove("RUST_LOG")
            .env("NO_COLOR", "1")
            .env("SHOPIFY_WEBHOOK_SECRET", SECRET)
            .env("SHOPIFY_WEBHOOK_OLD_SECRET", OLD_SECRET)
            .env("POS_KEY_STORE_12", KEY_12)
            .env("POS_KEY_STORE_14", KEY_14)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut engine = Engine { child: Some(child), data: data.to_path_buf(), base: format!("http://127.0.0.1:{port}") };
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(engine.running(), "the engine exited at start: {}", engine.log());
            assert!(Instant::now() < deadline, "the engine did not listen within 30 s: {}", engine.log());
            std::thread::sleep(Duration::from_millis(50));
        }
        engine
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.data.join("run.log")).unwrap_or_default()
    }

    fn running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.try_wait().unwrap().is_none())
    }

    /// SIGTERM, a clean exit; what it said.
    fn stop(&mut self) -> String {
        let mut child = self.child.take().expect("running");
        Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            assert!(Instant::now() < deadline, "no exit within 30 s of SIGTERM: {}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(status.success(), "SIGTERM stops the engine cleanly: {}", self.log());
        self.log()
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

fn sign(secret: &str, body: &[u8]) -> String {
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(body);
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// An answer: status, headers we look at, and the body as JSON (Null when it is not).
struct Answer {
    status: u16,
    content_type: String,
    retry_after: Option<u64>,
    json: Value,
}

fn post(base: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Answer {
    request("POST", base, path, headers, body)
}

fn request(method: &str, base: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Answer {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::new();
        let mut r = client.request(method.parse().unwrap(), format!("{base}{path}")).body(body.to_vec());
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        let resp = r.send().await.unwrap();
        let status = resp.status().as_u16();
        let h = |n: &str| resp.headers().get(n).and_then(|v| v.to_str().ok()).map(str::to_string);
        let content_type = h("content-type").unwrap_or_default();
        let retry_after = h("retry-after").and_then(|v| v.parse().ok());
        let bytes = resp.bytes().await.unwrap();
        Answer { status, content_type, retry_after, json: serde_json::from_slice(&bytes).unwrap_or(Value::Null) }
    })
}

fn signed(secret: &str, body: &str) -> Vec<(&'static str, String)> {
    vec![("X-Shopify-Hmac-Sha256", sign(secret, body.as_bytes())), ("Content-Type", "application/json".into())]
}

fn as_refs<'a>(h: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    h.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

fn lines(file: &Path) -> Vec<Value> {
    std::fs::read_to_string(file).unwrap_or_default().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn wait_lines(file: &Path, n: usize, engine: &Engine) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = lines(file);
        if got.len() >= n {
            return got;
        }
        assert!(Instant::now() < deadline, "{} of {n} records in {} after 30 s: {}", got.len(), file.display(), engine.log());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Every file under `dir`, as bytes (the store included).
fn all_bytes(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(all_bytes(&p));
        } else if let Ok(b) = std::fs::read(&p) {
            out.push((p, b));
        }
    }
    out
}

fn assert_nowhere(dir: &Path, secrets: &[&str]) {
    for (path, bytes) in all_bytes(dir) {
        for s in secrets {
            assert!(!bytes.windows(s.len()).any(|w| w == s.as_bytes()), "the secret `{s}` is in {}", path.display());
        }
    }
}

#[test]
fn signed_webhooks_are_answered_once_stored_and_bad_ones_store_nothing() {
    let data = tempfile::tempdir().unwrap();
    let mut engine = Engine::start(data.path());
    let base = engine.base.clone();

    // Signed with the current secret, then with the previous one (rotation).
    let one = r#"{"id": 1001, "total": "21.67"}"#;
    let a = post(&base, ORDERS, &as_refs(&signed(SECRET, one)), one.as_bytes());
    assert_eq!(a.status, 202, "{}", a.json);
    assert_eq!(a.json["status"], "accepted");
    assert_eq!(a.json["correlation_id"], "shopify:1001", "the pipeline's correlation template, answered at once");
    let first_id = a.json["message_id"].as_str().unwrap().to_string();
    let two = r#"{"id": 1002, "total": "5.00"}"#;
    assert_eq!(post(&base, ORDERS, &as_refs(&signed(OLD_SECRET, two)), two.as_bytes()).status, 202);

    // Refused: wrong secret, body changed after signing, no signature. 401, problem details.
    let three = r#"{"id": 1003, "total": "1.00"}"#;
    let wrong = post(&base, ORDERS, &as_refs(&signed("not-the-secret", three)), three.as_bytes());
    assert_eq!((wrong.status, wrong.content_type.as_str()), (401, "application/problem+json"));
    assert_eq!(wrong.json["type"], "urn:switchyard:problem:credentials-invalid");
    assert_eq!(wrong.json["status"], 401);
    let tampered = post(&base, ORDERS, &as_refs(&signed(SECRET, three)), br#"{"id": 1003, "total": "0.01"}"#);
    assert_eq!(tampered.status, 401, "{}", tampered.json);
    let unsigned = post(&base, ORDERS, &[("Content-Type", "application/json")], three.as_bytes());
    assert_eq!((unsigned.status, unsigned.json["type"].as_str()), (401, Some("urn:switchyard:problem:credentials-missing")));
    let garbled = post(&base, ORDERS, &[("X-Shopify-Hmac-Sha256", "not base64 at all!")], three.as_bytes());
    assert_eq!(garbled.status, 401);

    // Signed but not JSON: 400 with the parser's word. Too large: 413 (limit 4KiB).
    let not_json = "{\"id\": 1004,";
    let bad = post(&base, ORDERS, &as_refs(&signed(SECRET, not_json)), not_json.as_bytes());
    assert_eq!((bad.status, bad.json["type"].as_str()), (400, Some("urn:switchyard:problem:invalid-json")), "{}", bad.json);
    assert_eq!(bad.json["errors"][0]["pointer"], "");
    let big = format!(r#"{{"id": 1005, "total": "1.00", "note": "{}"}}"#, "x".repeat(5000));
    assert_eq!(post(&base, ORDERS, &as_refs(&signed(SECRET, &big)), big.as_bytes()).status, 413);
    // Wrong method, unknown path.
    let get = request("GET", &base, ORDERS, &[], b"");
    assert_eq!(get.status, 405);
    assert_eq!(post(&base, "/ingest/nothing", &[], b"{}").status, 404);

    // Well-formed JSON that fails the schema: taken (no reject_invalid), then an exception.
    let invalid = r#"{"id": "1006", "total": "abc"}"#;
    assert_eq!(post(&base, ORDERS, &as_refs(&signed(SECRET, invalid)), invalid.as_bytes()).status, 202);

    let out = wait_lines(&data.path().join("out/webhook-orders.ndjson"), 2, &engine);
    let ids: Vec<i64> = out.iter().map(|r| r["payload"]["id"].as_i64().unwrap()).collect();
    assert_eq!(ids, [1001, 1002], "only the two signed, valid orders come out");
    assert_eq!(out[0]["metadata"]["message_id"], first_id.as_str(), "the id answered is the message's id");
    assert_eq!(out[0]["metadata"]["correlation_id"], "shopify:1001");
    assert_eq!(out[0]["metadata"]["origin"], format!("POST {ORDERS} from 127.0.0.1"));

    let said = engine.stop();
    assert!(said.contains("webhook-orders: POST http://127.0.0.1:"), "the banner names the endpoint: {said}");
    assert!(said.contains("total: 3 in = 2 routed + 1 exceptions"), "{said}");
    let list = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["exceptions", "export", "--data-dir"])
        .arg(data.path())
        .current_dir(repo())
        .output()
        .unwrap();
    let exported = String::from_utf8_lossy(&list.stdout);
    assert!(exported.contains("schema_violation") && exported.contains("/total"), "{exported}");
    // The secrets are nowhere: not in the log, the outputs, the exception record or the store.
    assert_nowhere(data.path(), &[SECRET, OLD_SECRET]);
    assert!(!exported.contains(SECRET) && !said.contains(SECRET));
}

#[test]
fn api_keys_rate_limit_each_store_and_invalid_sales_are_refused_with_every_pointer() {
    let data = tempfile::tempdir().unwrap();
    let mut engine = Engine::start(data.path());
    let base = engine.base.clone();
    let sale = |id: i64| format!(r#"{{"id": {id}, "total": "9.99"}}"#);

    // Burst 3, then 1 per second, per store.
    for id in 1..=3 {
        let a = post(&base, SALES, &[("X-Api-Key", KEY_12)], sale(id).as_bytes());
        assert_eq!(a.status, 202, "sale {id}: {}", a.json);
    }
    let limited = post(&base, SALES, &[("X-Api-Key", KEY_12)], sale(4).as_bytes());
    assert_eq!((limited.status, limited.json["type"].as_str()), (429, Some("urn:switchyard:problem:rate-limited")));
    assert!(limited.retry_after.is_some_and(|s| (1..=2).contains(&s)), "Retry-After in seconds: {:?}", limited.retry_after);
    assert!(limited.json["detail"].as_str().unwrap().contains("store-12"), "{}", limited.json);
    // Another store has its own allowance.
    assert_eq!(post(&base, SALES, &[("X-Api-Key", KEY_14)], sale(5).as_bytes()).status, 202);
    // A key nobody was given.
    let stranger = post(&base, SALES, &[("X-Api-Key", "guess")], sale(6).as_bytes());
    assert_eq!(stranger.status, 401);
    // After the Retry-After delay, store 12 may send again.
    std::thread::sleep(Duration::from_secs(limited.retry_after.unwrap()) + Duration::from_millis(100));
    assert_eq!(post(&base, SALES, &[("X-Api-Key", KEY_12)], sale(4).as_bytes()).status, 202);

    // Synchronous validation: every violation, each with its pointer; nothing stored.
    let invalid = r#"{"id": "seven", "total": "9.9"}"#;
    let r = post(&base, SALES, &[("X-Api-Key", KEY_14)], invalid.as_bytes());
    assert_eq!((r.status, r.json["type"].as_str()), (422, Some("urn:switchyard:problem:validation-failed")), "{}", r.json);
    let mut pointers: Vec<&str> = r.json["errors"].as_array().unwrap().iter().map(|e| e["pointer"].as_str().unwrap()).collect();
    pointers.sort();
    assert_eq!(pointers, ["/id", "/total"], "{}", r.json);

    let out = wait_lines(&data.path().join("out/pos-sales.ndjson"), 5, &engine);
    let mut ids: Vec<i64> = out.iter().map(|r| r["payload"]["id"].as_i64().unwrap()).collect();
    ids.sort();
    assert_eq!(ids, [1, 2, 3, 4, 5]);
    let said = engine.stop();
    assert!(said.contains("pos-sales 1"), "{said}");
    assert!(said.contains("total: 5 in = 5 routed + 0 exceptions"), "nothing refused was stored: {said}");
    assert_nowhere(data.path(), &[KEY_12, KEY_14]);
}

#[test]
fn an_accepted_webhook_survives_a_crash_right_after_its_202() {
    let data = tempfile::tempdir().unwrap();
    let mut engine = Engine::start(data.path());
    let base = engine.base.clone();
    let mut answered = Vec::new();
    for id in 1..=30 {
        let body = format!(r#"{{"id": {id}, "total": "1.00"}}"#);
        let a = post(&base, ORDERS, &as_refs(&signed(SECRET, &body)), body.as_bytes());
        assert_eq!(a.status, 202);
        answered.push(a.json["message_id"].as_str().unwrap().to_string());
    }
    engine.sigkill();
    // Processed by the next run (a --once run serves no HTTP; it processes what is stored).
    let out = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["run", "tests/http/webhooks.yaml", "--once", "--data-dir"])
        .arg(data.path())
        .current_dir(repo())
        .env("SHOPIFY_WEBHOOK_SECRET", SECRET)
        .env("SHOPIFY_WEBHOOK_OLD_SECRET", OLD_SECRET)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let records = lines(&data.path().join("out/webhook-orders.ndjson"));
    let mut got: Vec<String> = records.iter().map(|r| r["metadata"]["message_id"].as_str().unwrap().to_string()).collect();
    got.sort();
    got.dedup();
    answered.sort();
    assert_eq!(got, answered, "every message answered 202 is delivered, whether before or after the crash");
}

/// An ERP numbering sales orders (`SO-1`...) and a marketplace taking acknowledgements, on a
/// thread of their own; returns the base URL.
fn erp_and_marketplace() -> String {
    use axum::http::StatusCode;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let n = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
            let app = axum::Router::new()
                .route(
                    "/salesOrders",
                    axum::routing::post(move || {
                        let k = n.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                        async move { (StatusCode::CREATED, axum::Json(serde_json::json!({"number": format!("SO-{k}")}))) }
                    }),
                )
                .route("/orders/{id}/acknowledgement", axum::routing::post(|| async { StatusCode::NO_CONTENT }));
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(format!("http://{}", listener.local_addr().unwrap())).unwrap();
            axum::serve(listener, app).await.unwrap();
        });
    });
    rx.recv().unwrap()
}

#[test]
fn the_status_api_says_where_an_order_is_from_webhook_to_acknowledgement() {
    tracked_flow(&repo().join("tests/http"), None, None);
}

/// With a shared store (`--store postgres://...`) the events are there, for every engine.
#[test]
fn the_status_api_reads_a_shared_store() {
    let Some(url) = switchyard::store::test_postgres_url() else { return };
    let unique = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() % 1_000_000;
    let store = format!("{url}?schema=sy_hs_{}_{unique}", std::process::id());
    tracked_flow(&repo().join("tests/http"), None, Some(&store));
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let pg = switchyard::store::PostgresStore::connect(&store).await.unwrap();
        use switchyard::store::StateStore;
        let events = pg.tracking_of("shopify:77".into()).await.unwrap();
        let names: Vec<&str> = events.iter().map(|e| e.event.as_str()).collect();
        assert_eq!(names, ["received", "posted_to_erp", "acknowledged_to_channel"], "in PostgreSQL");
        pg.drop_schema().await.unwrap();
    });
}

/// The same over RabbitMQ (`SWITCHYARD_BROKER`): the acknowledgement pipeline is fed by the
/// broker, and records its events too.
#[test]
fn the_status_api_follows_orders_through_rabbitmq_fed_pipelines() {
    let url = std::env::var("SWITCHYARD_AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    if std::net::TcpStream::connect_timeout(&"127.0.0.1:5672".parse().unwrap(), Duration::from_secs(2)).is_err() {
        assert!(
            std::env::var("SWITCHYARD_REQUIRE_BROKER").as_deref() != Ok("1"),
            "no RabbitMQ at 127.0.0.1:5672 and SWITCHYARD_REQUIRE_BROKER=1"
        );
        println!("skipped: no RabbitMQ at 127.0.0.1:5672");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let prefix =
        format!("hs{}x{}", std::process::id(), std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis());
    for f in ["tracked-orders.yaml", "tracked-acks.yaml", "order.schema.json"] {
        let text = std::fs::read_to_string(repo().join("tests/http").join(f)).unwrap();
        std::fs::write(dir.path().join(f), text.replace("erp.tracked.confirmed", &format!("{prefix}.confirmed"))).unwrap();
    }
    tracked_flow(dir.path(), Some(&url), None);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let conn = lapin::Connection::connect(&url, lapin::ConnectionProperties::default()).await.unwrap();
        let base = format!("{prefix}.confirmed.tracked-acks");
        for q in [base.clone(), format!("{base}.retry.1s"), format!("{base}.retry.10s"), format!("{base}.retry.1m"), format!("{base}.dlq")]
        {
            let ch = conn.create_channel().await.unwrap();
            let _ = ch.queue_delete(q.as_str().into(), lapin::options::QueueDeleteOptions::default()).await;
        }
        let ch = conn.create_channel().await.unwrap();
        let _ = ch.exchange_delete(format!("{prefix}.confirmed").as_str().into(), lapin::options::ExchangeDeleteOptions::default()).await;
    });
}

/// Asks the status API at `path` until the order is in `state`.
fn state_within_30s(engine: &Engine, path: &str, auth: &[(&str, &str)], state: &str) -> Answer {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = request("GET", &engine.base, path, auth, b"");
        if s.json["state"] == state {
            return s;
        }
        assert!(Instant::now() < deadline, "{path} not {state} within 30 s: {} {}", s.json, engine.log());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs tracked-orders.yaml and tracked-acks.yaml from `dir` (over RabbitMQ with `broker`), posts
/// a good and a bad order, and follows both through the status API.
fn tracked_flow(dir: &Path, broker: Option<&str>, store: Option<&str>) {
    let base = erp_and_marketplace();
    let data = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(data.path()).unwrap();
    let port = free_port();
    let log = std::fs::File::create(data.path().join("run.log")).unwrap();
    let mut c = Command::new(env!("CARGO_BIN_EXE_switchyard"));
    c.args(["run", "tracked-orders.yaml", "tracked-acks.yaml", "--data-dir"])
        .arg(data.path())
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .current_dir(dir)
        .env_remove("RUST_LOG")
        .env_remove("SWITCHYARD_BROKER")
        .env("SHOPIFY_WEBHOOK_SECRET", SECRET)
        .env("ERP_URL", &base)
        .env("SWITCHYARD_STATUS_TOKEN", "status-token-7");
    if let Some(url) = broker {
        c.env("SWITCHYARD_BROKER", url);
    }
    match store {
        Some(s) => c.env("SWITCHYARD_STORE", s),
        None => c.env_remove("SWITCHYARD_STORE"),
    };
    let child = c.stdin(Stdio::null()).stdout(log.try_clone().unwrap()).stderr(log).spawn().unwrap();
    let mut engine = Engine { child: Some(child), data: data.path().to_path_buf(), base: format!("http://127.0.0.1:{port}") };
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(engine.running() && Instant::now() < deadline, "the engine did not listen: {}", engine.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let api = engine.base.clone();
    let good = r#"{"id": 77, "total": "12.50"}"#;
    assert_eq!(post(&api, "/ingest/tracked/orders", &as_refs(&signed(SECRET, good)), good.as_bytes()).status, 202);
    let bad = r#"{"id": 78, "total": "twelve"}"#;
    assert_eq!(post(&api, "/ingest/tracked/orders", &as_refs(&signed(SECRET, bad)), bad.as_bytes()).status, 202);

    let auth = [("Authorization", "Bearer status-token-7")];
    let status = state_within_30s(&engine, "/status/orders/shopify/77", &auth, "acknowledged_to_channel");
    let events: Vec<&str> = status.json["events"].as_array().unwrap().iter().map(|e| e["event"].as_str().unwrap()).collect();
    assert_eq!(events, ["received", "posted_to_erp", "acknowledged_to_channel"], "{}", status.json);
    assert_eq!(status.json["correlation_id"], "shopify:77");
    assert_eq!(status.json["events"][1]["erp_document_number"], "SO-1", "the ERP's number: {}", status.json);
    assert_eq!(status.json["events"][1]["pipeline"], "tracked-orders");
    assert_eq!(status.json["events"][2]["pipeline"], "tracked-acks");

    // 78 may settle in a later batch than 77, so its failure can trail 77's acknowledgement.
    let failed = state_within_30s(&engine, "/status/shopify:78", &auth, "failed");
    assert_eq!(failed.json["events"][1]["reason"], "schema_violation");
    assert!(failed.json["events"][1]["exception_id"].is_string());
    // The status API wants its token; an unknown order is a 404 problem.
    assert_eq!(request("GET", &api, "/status/shopify:77", &[], b"").status, 401);
    let unknown = request("GET", &api, "/status/orders/shopify/404404", &auth, b"");
    assert_eq!((unknown.status, unknown.content_type.as_str()), (404, "application/problem+json"));
    let said = engine.stop();
    assert!(said.contains("total: 3 in = 2 routed + 1 exceptions"), "{said}");
    if broker.is_some() {
        assert!(said.contains("from RabbitMQ queue"), "the acknowledgements came over RabbitMQ: {said}");
    }
    assert_nowhere(data.path(), &[SECRET, "status-token-7"]);
}
