//! The `http` sink from the outside: `switchyard validate` accepts a pipeline with one, and
//! `switchyard run --once` delivers every message to a real HTTP receiver on 127.0.0.1, one
//! request per order on a URL naming it, with its idempotency key, correlation id and headers.

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::routing::any;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

const PIPELINE: &str = "tests/http/erp-orders.yaml";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("repo root").to_path_buf()
}

fn switchyard(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_switchyard"));
    c.args(args).current_dir(repo()).env("NO_COLOR", "1").env_remove("RUST_LOG").env_remove("ERP_URL").env_remove("ERP_TOKEN");
    c
}

#[test]
fn validate_accepts_a_pipeline_with_an_http_sink() {
    let out = switchyard(&["validate", PIPELINE, "--format", "json"]).output().unwrap();
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(0), "{report}");
    assert_eq!((&report["problems"], &report["warnings"]), (&serde_json::json!([]), &serde_json::json!([])));
}

type Log = Arc<Mutex<Vec<(Method, Uri, HeaderMap, Bytes)>>>;

async fn receive(State(log): State<Log>, method: Method, uri: Uri, headers: HeaderMap, body: Bytes) -> StatusCode {
    log.lock().unwrap().push((method, uri, headers, body));
    StatusCode::NO_CONTENT
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_once_delivers_every_order_to_a_real_receiver() {
    let log = Log::default();
    let app = Router::new().fallback(any(receive)).with_state(log.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let data = tempfile::tempdir().unwrap();
    let orders = "{\"order_id\": \"1001\", \"total\": \"21.67\"}\n{\"order_id\": \"1002\", \"total\": \"5.00\"}\n{\"order_id\": \"A/7\", \"total\": \"1.00\"}\n";
    let env = vec![("ERP_URL", base.clone()), ("ERP_TOKEN", "t0ken".to_string())];
    let d = data.path().to_path_buf();
    let out = tokio::task::spawn_blocking(move || run_stdin(&[PIPELINE], env, &d, orders.to_string())).await.unwrap();
    let summary = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{summary}");
    assert!(summary.contains(&format!("PUT {base}/orders/{{$.order_id}}")), "the summary names where the sink sends: {summary}");

    let got = log.lock().unwrap().clone();
    let mut paths: Vec<&str> = got.iter().map(|(_, uri, ..)| uri.path()).collect();
    paths.sort();
    assert_eq!(paths, ["/orders/1001", "/orders/1002", "/orders/A%2F7"], "each order once, its id one path segment");
    for (method, uri, headers, body) in &got {
        let id = uri.path().trim_start_matches("/orders/").replace("%2F", "/");
        let h = |n: &str| headers.get(n).and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
        assert_eq!(method, Method::PUT);
        assert_eq!(h("idempotency-key"), format!("shopify:{id}"));
        assert_eq!(h("x-correlation-id"), format!("shopify:{id}"));
        assert_eq!((h("x-tenant"), h("authorization")), ("shopify".to_string(), "Bearer t0ken".to_string()));
        assert_eq!(h("content-type"), "application/json");
        let payload: Value = serde_json::from_slice(body).unwrap();
        assert_eq!(payload["order_id"], id.as_str(), "the payload alone");
    }
}

/// A receiver that answers each order as its `answers` field asks, one answer per request for
/// that order (the last one repeats): `"200"`, `"503"`, `"422"`, `"429:1"` (with `Retry-After:
/// 1`). While `down` is set it answers 503 to everything. It records every request it gets.
#[derive(Clone, Default)]
struct Scripted {
    requests: Arc<Mutex<Vec<(String, std::time::Instant, u16)>>>,
    down: Arc<std::sync::atomic::AtomicBool>,
}

impl Scripted {
    async fn start(&self) -> String {
        async fn answer(State(s): State<Scripted>, uri: Uri, body: Bytes) -> axum::response::Response {
            use axum::response::IntoResponse;
            let id = uri.path().trim_start_matches("/orders/").to_string();
            let order: Value = serde_json::from_slice(&body).unwrap_or_default();
            let mut log = s.requests.lock().unwrap();
            let nth = log.iter().filter(|(i, ..)| *i == id).count();
            let script: Vec<String> =
                order["answers"].as_array().map(|a| a.iter().map(|v| v.as_str().unwrap().to_string()).collect()).unwrap_or_default();
            let wanted = if s.down.load(std::sync::atomic::Ordering::SeqCst) {
                "503".to_string()
            } else {
                script.get(nth).or(script.last()).cloned().unwrap_or_else(|| "200".into())
            };
            let (code, retry_after) = match wanted.split_once(':') {
                Some((c, r)) => (c.parse::<u16>().unwrap(), Some(r.to_string())),
                None => (wanted.parse::<u16>().unwrap(), None),
            };
            log.push((id, std::time::Instant::now(), code));
            let mut response = (StatusCode::from_u16(code).unwrap(), format!("answer {code}")).into_response();
            if let Some(r) = retry_after {
                response.headers_mut().insert("retry-after", r.parse().unwrap());
            }
            response
        }
        let app = Router::new().fallback(any(answer)).with_state(self.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        base
    }

    /// The answers given to one order, in order.
    fn answers(&self, id: &str) -> Vec<u16> {
        self.requests.lock().unwrap().iter().filter(|(i, ..)| i == id).map(|(.., c)| *c).collect()
    }

    fn times(&self, id: &str) -> Vec<std::time::Instant> {
        self.requests.lock().unwrap().iter().filter(|(i, ..)| i == id).map(|(_, t, _)| *t).collect()
    }
}

/// Runs a `switchyard` command in a blocking task, with the receiver's URL.
async fn sy(data: &Path, base: &str, args: &[&str], input: Option<String>) -> std::process::Output {
    let (data, base) = (data.to_path_buf(), base.to_string());
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut child = Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args(&args)
            .current_dir(repo())
            .env("SWITCHYARD_DATA_DIR", &data)
            .env("ERP_URL", &base)
            .env("NO_COLOR", "1")
            .env_remove("RUST_LOG")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        if let Some(i) = input {
            child.stdin.take().unwrap().write_all(i.as_bytes()).unwrap();
        }
        drop(child.stdin.take());
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap()
}

fn exceptions(data: &Path) -> Vec<Value> {
    let out = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["exceptions", "list", "--format", "json", "--data-dir"])
        .arg(data)
        .output()
        .unwrap();
    serde_json::from_slice::<Value>(&out.stdout).unwrap().as_array().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_answer_is_retried_refused_or_waited_for_as_the_sink_policy_says() {
    let receiver = Scripted::default();
    let base = receiver.start().await;
    let data = tempfile::tempdir().unwrap();
    let orders = [
        r#"{"order_id": "fine", "answers": ["200"]}"#,
        r#"{"order_id": "flaky", "answers": ["503", "503", "200"]}"#,
        r#"{"order_id": "refused", "answers": ["422"]}"#,
        r#"{"order_id": "doomed", "answers": ["500"]}"#,
        r#"{"order_id": "polite", "answers": ["429:1", "200"]}"#,
    ];
    let sent = sy(data.path(), &base, &["send", "http.retry.in"], Some(orders.join("\n") + "\n")).await;
    assert!(sent.status.success(), "{}", String::from_utf8_lossy(&sent.stderr));
    let run = sy(data.path(), &base, &["run", "tests/http/erp-retry.yaml", "--once"], None).await;
    let summary = String::from_utf8_lossy(&run.stderr).to_string();
    assert!(run.status.success(), "{summary}");
    assert!(summary.contains("total: 5 in = 3 routed + 2 exceptions"), "{summary}");

    assert_eq!(receiver.answers("fine"), [200]);
    assert_eq!(receiver.answers("flaky"), [503, 503, 200], "retried until it went through");
    assert_eq!(receiver.answers("refused"), [422], "a refusal is not retried");
    assert_eq!(receiver.answers("doomed"), [500, 500, 500, 500], "retry.max_attempts is 4");
    assert_eq!(receiver.answers("polite"), [429, 200]);
    let t = receiver.times("polite");
    assert!(t[1] - t[0] >= std::time::Duration::from_secs(1), "Retry-After: 1 is honoured: {:?}", t[1] - t[0]);

    let records = exceptions(data.path());
    let by = |reason: &str| records.iter().filter(|r| r["reason"] == reason).cloned().collect::<Vec<_>>();
    let (rejected, failed) = (by("sink_rejected"), by("sink_failed"));
    assert_eq!((rejected.len(), failed.len()), (1, 1), "{records:#?}");
    assert_eq!((rejected[0]["idempotency_key"].as_str(), rejected[0]["attempt"].as_u64()), (Some("web:refused"), Some(1)));
    assert!(rejected[0]["errors"][0]["message"].as_str().unwrap().contains("422"), "{rejected:?}");
    assert_eq!(
        (failed[0]["idempotency_key"].as_str(), failed[0]["attempt"].as_u64()),
        (Some("web:doomed"), Some(4)),
        "the attempt count is on the record"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_circuit_keeps_work_in_the_queue_until_the_sink_is_back_and_a_rate_limit_spaces_requests() {
    let receiver = Scripted::default();
    let base = receiver.start().await;
    let data = tempfile::tempdir().unwrap();
    receiver.down.store(true, std::sync::atomic::Ordering::SeqCst);
    let orders: String = (0..20).map(|i| format!("{{\"order_id\": \"o{i}\"}}\n")).collect();
    assert!(sy(data.path(), &base, &["send", "http.breaker.in"], Some(orders)).await.status.success());

    // The engine runs while the ERP is down.
    let engine = {
        let (data, base) = (data.path().to_path_buf(), base.clone());
        std::thread::spawn(move || {
            Command::new(env!("CARGO_BIN_EXE_switchyard"))
                .args(["run", "tests/http/erp-breaker.yaml"])
                .current_dir(repo())
                .env("SWITCHYARD_DATA_DIR", &data)
                .env("ERP_URL", &base)
                .env_remove("RUST_LOG")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .join()
        .unwrap()
    };
    tokio::time::sleep(std::time::Duration::from_millis(3500)).await;
    let status = sy(data.path(), &base, &["status"], None).await;
    let status = String::from_utf8_lossy(&status.stdout).to_string();
    let while_down = receiver.requests.lock().unwrap().len();
    // Three failures open it; then one probe a second (each failing opens it again).
    assert!((3..=8).contains(&while_down), "an open circuit stops the requests: {while_down}");
    assert!(status.contains("http-erp-breaker") && status.contains("open") && status.contains("10/s (burst 1)"), "{status}");

    receiver.down.store(false, std::sync::atomic::Ordering::SeqCst);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let delivered = || receiver.requests.lock().unwrap().iter().filter(|(.., c)| *c == 200).count();
    while delivered() < 20 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    // Stop the engine cleanly and read its summary.
    let pid = engine.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let out = tokio::task::spawn_blocking(move || engine.wait_with_output().unwrap()).await.unwrap();
    let summary = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(delivered(), 20, "every order delivered once the ERP is back: {summary}");
    for i in 0..20 {
        assert_eq!(receiver.answers(&format!("o{i}")).iter().filter(|c| **c == 200).count(), 1, "o{i} delivered once");
    }
    assert!(summary.contains("routed          20") && summary.contains("held back"), "{summary}");
    // 10 a second, one at a time: the 20 deliveries after the recovery take 1.9 s or more.
    let mut ok_times: Vec<std::time::Instant> =
        receiver.requests.lock().unwrap().iter().filter(|(.., c)| *c == 200).map(|(_, t, _)| *t).collect();
    ok_times.sort();
    assert!(ok_times[19] - ok_times[0] >= std::time::Duration::from_millis(1800), "rate limited: {:?}", ok_times[19] - ok_times[0]);
}

/// Copies of one order in the same batch: the second waits while the first is delivered. It is
/// then a duplicate if the first went through, and goes on its own if the first was refused (a
/// failed message records no key): each refused copy is its own exception, none is dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_waits_for_the_first_and_is_only_dropped_if_the_first_was_delivered() {
    let receiver = Scripted::default();
    let base = receiver.start().await;
    let data = tempfile::tempdir().unwrap();
    let (refused, flaky, fine) = (
        r#"{"order_id": "refused", "answers": ["422"]}"#,
        r#"{"order_id": "flaky", "answers": ["503", "200"]}"#,
        r#"{"order_id": "fine"}"#,
    );
    let orders = [refused, flaky, fine, refused, flaky, fine].join("\n") + "\n";
    let sent = sy(data.path(), &base, &["send", "http.dedup.in"], Some(orders)).await;
    assert!(sent.status.success(), "{}", String::from_utf8_lossy(&sent.stderr));
    let run = sy(data.path(), &base, &["run", "tests/http/erp-dedup.yaml", "--once"], None).await;
    let summary = String::from_utf8_lossy(&run.stderr).to_string();
    assert!(run.status.success(), "{summary}");
    assert!(summary.contains("total: 6 in = 2 routed + 2 exceptions + 2 duplicates"), "{summary}");
    assert_eq!(receiver.answers("refused"), [422, 422], "each copy of the refused order was tried");
    assert_eq!(receiver.answers("flaky"), [503, 200], "retried, then its copy dropped");
    assert_eq!(receiver.answers("fine"), [200]);
    let records = exceptions(data.path());
    assert_eq!(records.len(), 2, "{records:#?}");
    assert!(records.iter().all(|r| r["reason"] == "sink_rejected" && r["idempotency_key"] == "web:refused"), "{records:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_held_back_by_an_open_circuit_is_not_written_to_its_other_sinks_meanwhile() {
    let receiver = Scripted::default();
    let base = receiver.start().await;
    receiver.down.store(true, std::sync::atomic::Ordering::SeqCst);
    let data = tempfile::tempdir().unwrap();
    let orders: String = (0..3).map(|i| format!("{{\"order_id\": \"h{i}\"}}\n")).collect();
    assert!(sy(data.path(), &base, &["send", "http.audit.in"], Some(orders)).await.status.success());
    let mut engine = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["run", "tests/http/erp-audit-breaker.yaml"])
        .current_dir(repo())
        .env("SWITCHYARD_DATA_DIR", data.path())
        .env("ERP_URL", &base)
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Down for 4 s: the circuit opens after the first failure and probes once a second.
    tokio::time::sleep(std::time::Duration::from_secs(4)).await;
    engine.kill().unwrap();
    engine.wait().unwrap();
    let audit = std::fs::read_to_string(data.path().join("out/audit.ndjson")).unwrap_or_default();
    for i in 0..3 {
        let id = format!("h{i}");
        let written = audit.lines().filter(|l| l.contains(&format!("\"{id}\""))).count();
        let attempted = receiver.answers(&id).len();
        assert!(written <= attempted, "{id}: written to the audit file {written} times, attempted at the ERP {attempted} times:\n{audit}");
    }
}

/// A token endpoint and an ERP behind it: tokens `tok-1`, `tok-2`, ... for the right client id
/// and secret only; the ERP takes the newest token and, after its third order, revokes every
/// token issued so far (as an issuer does when a key rotates).
#[derive(Clone, Default)]
struct OAuthErp {
    issued: Arc<std::sync::atomic::AtomicU32>,
    revoked_up_to: Arc<std::sync::atomic::AtomicU32>,
    token_requests: Arc<Mutex<Vec<(HeaderMap, String)>>>,
    orders: Arc<Mutex<Vec<(String, u16, String)>>>,
}

const CLIENT_SECRET: &str = "cs-9f8e7d-test";

impl OAuthErp {
    async fn start(&self) -> String {
        use axum::response::IntoResponse;
        use std::sync::atomic::Ordering::SeqCst;
        async fn token(State(s): State<OAuthErp>, headers: HeaderMap, body: String) -> axum::response::Response {
            s.token_requests.lock().unwrap().push((headers.clone(), body.clone()));
            use base64::Engine as _;
            let expected =
                format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("switchyard-tests:{CLIENT_SECRET}")));
            let form_ok = body.contains("grant_type=client_credentials") && body.contains("scope=erp.orders.write");
            if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some(expected.as_str()) || !form_ok {
                return (StatusCode::UNAUTHORIZED, axum::Json(serde_json::json!({"error": "invalid_client"}))).into_response();
            }
            let n = s.issued.fetch_add(1, SeqCst) + 1;
            axum::Json(serde_json::json!({"access_token": format!("tok-{n}"), "token_type": "Bearer", "expires_in": 3600})).into_response()
        }
        async fn order(State(s): State<OAuthErp>, uri: Uri, headers: HeaderMap) -> StatusCode {
            let id = uri.path().trim_start_matches("/orders/").to_string();
            let auth = headers.get("authorization").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
            let n: u32 = auth.strip_prefix("Bearer tok-").and_then(|n| n.parse().ok()).unwrap_or(0);
            let code = if n == 0 || n <= s.revoked_up_to.load(SeqCst) { 401 } else { 204 };
            let mut orders = s.orders.lock().unwrap();
            orders.push((id, code, auth));
            if orders.iter().filter(|(_, c, _)| *c == 204).count() == 3 && s.revoked_up_to.load(SeqCst) == 0 {
                s.revoked_up_to.store(s.issued.load(SeqCst), SeqCst);
            }
            StatusCode::from_u16(code).unwrap()
        }
        let app = Router::new()
            .route("/oauth2/token", axum::routing::post(token))
            .route("/orders/{id}", axum::routing::put(order))
            .with_state(self.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        base
    }
}

/// `switchyard run PIPELINES --once` with `input` on its standard input.
fn run_stdin(pipelines: &[&str], env: Vec<(&'static str, String)>, data: &Path, input: String) -> std::process::Output {
    use std::io::Write;
    let mut c = switchyard(&["run"]);
    c.args(pipelines).args(["--once", "--data-dir"]);
    c.arg(data);
    for (k, v) in env {
        c.env(k, v);
    }
    let mut child = c.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oauth2_tokens_are_cached_and_fetched_again_when_the_erp_answers_401() {
    let erp = OAuthErp::default();
    let base = erp.start().await;
    let data = tempfile::tempdir().unwrap();
    let orders: String = (1..=6).map(|i| format!("{{\"order_id\": \"{i}\"}}\n")).collect();
    let env = vec![("ERP_URL", base.clone()), ("ERP_CLIENT_SECRET", CLIENT_SECRET.to_string())];
    let path = data.path().to_path_buf();
    let out = tokio::task::spawn_blocking(move || run_stdin(&["tests/http/erp-oauth.yaml"], env, &path, orders)).await.unwrap();
    let said = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(0), "{said}");
    assert!(said.contains("total: 6 in = 6 routed + 0 exceptions"), "{said}");

    let orders = erp.orders.lock().unwrap().clone();
    let delivered: Vec<&str> = orders.iter().filter(|(_, c, _)| *c == 204).map(|(id, ..)| id.as_str()).collect();
    assert_eq!(delivered.len(), 6, "each order once: {orders:?}");
    let refused: Vec<&(String, u16, String)> = orders.iter().filter(|(_, c, _)| *c == 401).collect();
    assert_eq!(refused.len(), 1, "one request met the revoked token: {orders:?}");
    assert_eq!(refused[0].2, "Bearer tok-1");
    assert!(
        orders.iter().filter(|(_, c, _)| *c == 204).take(3).all(|(.., a)| a == "Bearer tok-1"),
        "the first token is cached: {orders:?}"
    );
    assert!(orders.iter().filter(|(_, c, _)| *c == 204).skip(3).all(|(.., a)| a == "Bearer tok-2"), "then the new one: {orders:?}");
    assert_eq!(erp.token_requests.lock().unwrap().len(), 2, "one token, then one more after the 401");
    for secret in [CLIENT_SECRET, "tok-1", "tok-2"] {
        assert!(!said.contains(secret), "`{secret}` in the engine's output: {said}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_client_secret_sends_no_order_and_the_failure_names_the_issuers_error() {
    let erp = OAuthErp::default();
    let base = erp.start().await;
    let data = tempfile::tempdir().unwrap();
    let env = vec![("ERP_URL", base.clone()), ("ERP_CLIENT_SECRET", "wrong-secret".to_string())];
    let path = data.path().to_path_buf();
    let out = tokio::task::spawn_blocking(move || run_stdin(&["tests/http/erp-oauth.yaml"], env, &path, "{\"order_id\": \"1\"}\n".into()))
        .await
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(said.contains("cannot get an OAuth2 token from") && said.contains("invalid_client"), "{said}");
    assert!(said.contains("total: 1 in = 0 routed + 1 exceptions"), "after its attempts the order is an exception: {said}");
    assert!(!said.contains("wrong-secret"), "{said}");
    assert!(erp.orders.lock().unwrap().is_empty(), "no order is sent without a token");
}

/// An ERP that numbers the sales orders it takes (`SO-1`, `SO-2`, ...; the same number again for
/// an idempotency key it has seen) and a marketplace that records acknowledgements.
#[derive(Clone, Default)]
struct ErpAndMarketplace {
    numbers: Arc<Mutex<Vec<(String, String)>>>,
    acks: Arc<Mutex<Vec<(String, HeaderMap, Value)>>>,
}

impl ErpAndMarketplace {
    async fn start(&self) -> String {
        use axum::response::IntoResponse;
        async fn sales_order(State(s): State<ErpAndMarketplace>, headers: HeaderMap) -> axum::response::Response {
            let key = headers.get("idempotency-key").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
            let mut numbers = s.numbers.lock().unwrap();
            let (status, number) = match numbers.iter().find(|(k, _)| *k == key) {
                Some((_, n)) => (StatusCode::OK, n.clone()),
                None => {
                    let n = format!("SO-{}", numbers.len() + 1);
                    numbers.push((key, n.clone()));
                    (StatusCode::CREATED, n)
                }
            };
            (status, axum::Json(serde_json::json!({"number": number, "status": "open", "id": "6f1c"}))).into_response()
        }
        async fn ack(State(s): State<ErpAndMarketplace>, uri: Uri, headers: HeaderMap, body: Bytes) -> StatusCode {
            s.acks.lock().unwrap().push((uri.path().to_string(), headers, serde_json::from_slice(&body).unwrap_or_default()));
            StatusCode::NO_CONTENT
        }
        let app = Router::new()
            .route("/salesOrders", axum::routing::post(sales_order))
            .route("/orders/{id}/acknowledgement", axum::routing::post(ack))
            .with_state(self.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        base
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_erps_answer_goes_on_to_the_acknowledgement_pipeline() {
    let sides = ErpAndMarketplace::default();
    let base = sides.start().await;
    let data = tempfile::tempdir().unwrap();
    let orders: String = ["1001", "1002", "1003"].iter().map(|i| format!("{{\"order_id\": \"{i}\", \"total\": \"9.99\"}}\n")).collect();
    let env = vec![("ERP_URL", base.clone()), ("MARKETPLACE_URL", base.clone()), ("MARKETPLACE_TOKEN", "mk-token-3e1".to_string())];
    let d = data.path().to_path_buf();
    let pipelines = ["tests/http/erp-post.yaml", "tests/http/channel-ack.yaml"];
    let out = tokio::task::spawn_blocking(move || run_stdin(&pipelines, env, &d, orders)).await.unwrap();
    let said = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(0), "{said}");
    assert!(said.contains("total: 6 in = 6 routed + 0 exceptions"), "3 posted, 3 acknowledged: {said}");
    assert!(!said.contains("mk-token-3e1"), "{said}");

    let numbers = sides.numbers.lock().unwrap().clone();
    assert_eq!(numbers.len(), 3, "each order posted once: {numbers:?}");
    let mut acks = sides.acks.lock().unwrap().clone();
    acks.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(acks.len(), 3);
    for (path, headers, body) in &acks {
        let id = path.trim_start_matches("/orders/").trim_end_matches("/acknowledgement");
        let key = format!("shopify:{id}");
        let number = &numbers.iter().find(|(k, _)| *k == key).expect("posted").1;
        assert_eq!(body["erp_document_number"], number.as_str(), "the ack carries the ERP's number for this order: {body}");
        assert_eq!(body["erp_status"], "open");
        assert_eq!(body["order_id"], id);
        assert_eq!(headers.get("authorization").unwrap(), "Bearer mk-token-3e1");
        assert_eq!(headers.get("x-correlation-id").unwrap().to_str().unwrap(), key, "the correlation id travels through both pipelines");
    }
}
