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
    let run = {
        let (base, data) = (base.clone(), data.path().to_path_buf());
        tokio::task::spawn_blocking(move || {
            use std::io::Write;
            let mut child = switchyard(&["run", PIPELINE, "--once", "--data-dir"])
                .arg(&data)
                .env("ERP_URL", &base)
                .env("ERP_TOKEN", "t0ken")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            child.stdin.take().unwrap().write_all(orders.as_bytes()).unwrap();
            child.wait_with_output().unwrap()
        })
    };
    let out = run.await.unwrap();
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
