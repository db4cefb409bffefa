//! The `http_poll` source from the outside: `switchyard run --once` polls a local API shaped
//! like Amazon SP-API getOrders (LastUpdatedAfter, inclusive; NextToken pages of two), and the
//! cursor stored with the records makes later runs take only what is new: nothing skipped,
//! nothing twice, nothing stored from a poll that failed.

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("repo root").to_path_buf()
}

const TOKEN: &str = "atza-test-token-51c2";

/// The API: orders (id, last update), what it was asked, and whether it fails.
#[derive(Clone, Default)]
struct Api {
    orders: Arc<Mutex<Vec<(String, String)>>>,
    asked: Arc<Mutex<Vec<HashMap<String, String>>>>,
    failing: Arc<std::sync::atomic::AtomicBool>,
    base: Arc<Mutex<String>>,
}

async fn get_orders(State(api): State<Api>, headers: HeaderMap, Query(q): Query<HashMap<String, String>>) -> axum::response::Response {
    api.asked.lock().unwrap().push(q.clone());
    if headers.get("x-amz-access-token").and_then(|v| v.to_str().ok()) != Some(TOKEN) {
        return (StatusCode::FORBIDDEN, "no token").into_response();
    }
    if api.failing.load(std::sync::atomic::Ordering::SeqCst) {
        return (StatusCode::SERVICE_UNAVAILABLE, Json500).into_response();
    }
    if q.get("MarketplaceIds").map(String::as_str) != Some("ATVPDKIKX0DER") {
        return (StatusCode::BAD_REQUEST, "MarketplaceIds missing").into_response();
    }
    // A NextToken carries the window and the offset; the first page names the window.
    let (after, offset) = match q.get("NextToken") {
        Some(t) => {
            let (a, o) = t.split_once('|').unwrap();
            (a.to_string(), o.parse::<usize>().unwrap())
        }
        None => (q.get("LastUpdatedAfter").cloned().expect("LastUpdatedAfter on the first page"), 0),
    };
    let mut hits: Vec<(String, String)> = api.orders.lock().unwrap().iter().filter(|(_, at)| *at >= after).cloned().collect();
    hits.sort_by(|a, b| (&a.1, &a.0).cmp(&(&b.1, &b.0)));
    let page: Vec<Value> = hits.iter().skip(offset).take(2).map(|(id, at)| json!({"AmazonOrderId": id, "LastUpdateDate": at})).collect();
    let mut payload = json!({"Orders": page});
    if offset + 2 < hits.len() {
        payload["NextToken"] = json!(format!("{after}|{}", offset + 2));
    }
    axum::Json(json!({ "payload": payload })).into_response()
}

struct Json500;
impl IntoResponse for Json500 {
    fn into_response(self) -> axum::response::Response {
        axum::Json(json!({"errors": [{"code": "InternalFailure"}]})).into_response()
    }
}

fn run_once(base: &str, data: &Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["run", "tests/http/amazon-poll.yaml", "--once", "--log-level", "info", "--data-dir"])
        .arg(data)
        .current_dir(repo())
        .env("SP_API", base)
        .env("SP_TOKEN", TOKEN)
        .env("NO_COLOR", "1")
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{said}");
    assert!(!said.contains(TOKEN), "the token is not shown: {said}");
    said
}

fn taken(data: &Path) -> Vec<String> {
    std::fs::read_to_string(data.join("out/orders.ndjson"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["AmazonOrderId"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cursor_resumes_after_a_restart_without_skipping_or_repeating() {
    let api = Api::default();
    let t = |h: u32| format!("2026-11-27T{h:02}:00:00Z");
    *api.orders.lock().unwrap() =
        vec![("A".into(), t(10)), ("B".into(), t(10)), ("C".into(), t(11)), ("D".into(), t(12)), ("E".into(), t(12))];
    let app = Router::new().route("/orders/v0/orders", axum::routing::get(get_orders)).with_state(api.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let data = tempfile::tempdir().unwrap();
    let d = data.path().to_path_buf();
    let run = |base: String, d: PathBuf| tokio::task::spawn_blocking(move || run_once(&base, &d));

    // First run: from `start`, three pages of two.
    let said = run(base.clone(), d.clone()).await.unwrap();
    assert_eq!(taken(&d), ["A", "B", "C", "D", "E"], "{said}");
    assert!(said.contains("total: 5 in = 5 routed + 0 exceptions"), "{said}");
    let asked = api.asked.lock().unwrap().clone();
    assert_eq!(asked.len(), 3, "three pages: {asked:?}");
    assert_eq!(asked[0].get("LastUpdatedAfter").map(String::as_str), Some("2026-11-01T00:00:00Z"));
    assert!(asked[1].contains_key("NextToken") && !asked[1].contains_key("LastUpdatedAfter"), "{asked:?}");

    // Second run: F at the same instant as the cursor, G later. The API sends D and E again
    // (inclusive window): they are not taken twice.
    api.orders.lock().unwrap().extend([("F".to_string(), t(12)), ("G".to_string(), t(13))]);
    api.asked.lock().unwrap().clear();
    let said = run(base.clone(), d.clone()).await.unwrap();
    assert_eq!(api.asked.lock().unwrap()[0].get("LastUpdatedAfter").map(String::as_str), Some(t(12).as_str()), "resumed at the cursor");
    assert_eq!(taken(&d), ["A", "B", "C", "D", "E", "F", "G"], "{said}");
    assert!(said.contains("total: 2 in = 2 routed + 0 exceptions"), "{said}");

    // A failing API: nothing stored, the cursor stays, the failure is said.
    api.failing.store(true, std::sync::atomic::Ordering::SeqCst);
    api.orders.lock().unwrap().push(("H".to_string(), t(14)));
    let said = run(base.clone(), d.clone()).await.unwrap();
    assert!(said.contains("a poll failed") && said.contains("503"), "{said}");
    assert_eq!(taken(&d).len(), 7);

    // Back up: H is taken, and only H.
    api.failing.store(false, std::sync::atomic::Ordering::SeqCst);
    let said = run(base.clone(), d.clone()).await.unwrap();
    assert_eq!(taken(&d), ["A", "B", "C", "D", "E", "F", "G", "H"], "{said}");
}

/// Shopify's list endpoint: `updated_at_min` (inclusive), pages of `limit` linked by
/// `Link: <...page_info=...>; rel="next"`, and a next page that takes no other filter.
async fn shopify_orders(State(api): State<Api>, headers: HeaderMap, Query(q): Query<HashMap<String, String>>) -> axum::response::Response {
    api.asked.lock().unwrap().push(q.clone());
    if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some("Bearer shpat-test") {
        return (StatusCode::UNAUTHORIZED, "no token").into_response();
    }
    let (after, offset) = match q.get("page_info") {
        Some(p) => {
            if q.contains_key("updated_at_min") {
                return (StatusCode::BAD_REQUEST, "page_info takes no other filter").into_response();
            }
            let (a, o) = p.split_once('~').unwrap();
            (a.to_string(), o.parse::<usize>().unwrap())
        }
        None => (q.get("updated_at_min").cloned().unwrap(), 0),
    };
    let after = chrono::DateTime::parse_from_rfc3339(&after).unwrap();
    let mut hits: Vec<(String, String)> =
        api.orders.lock().unwrap().iter().filter(|(_, at)| chrono::DateTime::parse_from_rfc3339(at).unwrap() >= after).cloned().collect();
    hits.sort_by_key(|(id, at)| (chrono::DateTime::parse_from_rfc3339(at).unwrap(), id.clone()));
    let page: Vec<Value> =
        hits.iter().skip(offset).take(2).map(|(id, at)| json!({"id": id.parse::<u64>().unwrap(), "updated_at": at})).collect();
    let mut response = axum::Json(json!({ "orders": page })).into_response();
    if offset + 2 < hits.len() {
        let cursor = format!("{}~{}", after.to_rfc3339(), offset + 2);
        let link =
            format!("<{}/admin/api/2024-10/orders.json?limit=2&page_info={}>; rel=\"next\"", api.base.lock().unwrap(), urlencode(&cursor));
        response.headers_mut().insert("link", link.parse().unwrap());
    }
    response
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| if b.is_ascii_alphanumeric() || b"-._~".contains(&b) { (b as char).to_string() } else { format!("%{b:02X}") })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_header_pages_and_offsets_in_the_cursor() {
    let api = Api::default();
    // 10:00-05:00 and 15:00Z are the same instant.
    *api.orders.lock().unwrap() = vec![
        ("1".into(), "2026-11-27T10:00:00-05:00".into()),
        ("2".into(), "2026-11-27T15:00:00Z".into()),
        ("3".into(), "2026-11-27T16:00:00Z".into()),
        ("4".into(), "2026-11-27T17:30:00+01:00".into()),
        ("5".into(), "2026-11-27T16:30:00Z".into()),
    ];
    let app = Router::new().route("/admin/api/2024-10/orders.json", axum::routing::get(shopify_orders)).with_state(api.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    *api.base.lock().unwrap() = base.clone();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let data = tempfile::tempdir().unwrap();
    let run = |d: PathBuf, base: String| {
        tokio::task::spawn_blocking(move || {
            let out = Command::new(env!("CARGO_BIN_EXE_switchyard"))
                .args(["run", "tests/http/shopify-poll.yaml", "--once", "--data-dir"])
                .arg(&d)
                .current_dir(repo())
                .env("SHOP_API", base)
                .env("SHOP_TOKEN", "shpat-test")
                .output()
                .unwrap();
            let said = String::from_utf8_lossy(&out.stderr).to_string();
            assert!(out.status.success(), "{said}");
            assert!(!said.contains("shpat-test"), "{said}");
            said
        })
    };
    let ids = |d: &Path| -> Vec<u64> {
        std::fs::read_to_string(d.join("out/orders.ndjson"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap()["id"].as_u64().unwrap())
            .collect()
    };
    let said = run(data.path().to_path_buf(), base.clone()).await.unwrap();
    let mut got = ids(data.path());
    got.sort();
    assert_eq!(got, [1, 2, 3, 4, 5], "{said}");
    assert_eq!(api.asked.lock().unwrap().len(), 3, "three pages by the Link header");
    // 17:30+01:00 (16:30Z) and order 5 (16:30Z) are the latest instant: the next poll asks from
    // there, gets both again, and takes neither.
    api.asked.lock().unwrap().clear();
    let said = run(data.path().to_path_buf(), base.clone()).await.unwrap();
    assert_eq!(ids(data.path()).len(), 5, "nothing taken twice: {said}");
    let first = api.asked.lock().unwrap()[0].clone();
    let asked = chrono::DateTime::parse_from_rfc3339(first.get("updated_at_min").unwrap()).unwrap();
    assert_eq!(asked, chrono::DateTime::parse_from_rfc3339("2026-11-27T16:30:00Z").unwrap());
}
