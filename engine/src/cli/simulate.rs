//! `switchyard simulate`: an ERP and a marketplace on one port, for demos and tests: the other
//! side of the HTTP edges. The ERP is shaped like Business Central's `salesOrders` API behind an
//! OAuth2 client-credentials token endpoint, and keeps one sales order per idempotency key (a
//! duplicate gets the first one's number back, `200` instead of `201`); the marketplace takes
//! order acknowledgements with a bearer token. Latency, an error rate (`503`) and a rate limit
//! (`429` with `Retry-After`) are set on the command line, so that the engine's retries,
//! breakers and limits can be watched at work.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What the simulator is asked to be (`switchyard simulate`'s options).
#[derive(Debug, Clone, clap::Args)]
pub struct Simulation {
    #[arg(long, default_value = "127.0.0.1:8090")]
    pub listen: std::net::SocketAddr,
    /// Mean answer time (each request waits 0.5 to 1.5 times it), e.g. `20ms`.
    #[arg(long, default_value = "20ms", value_parser = humantime::parse_duration)]
    pub latency: Duration,
    /// The share of POST requests answered 503, from 0 to 1.
    #[arg(long, default_value_t = 0.0, value_parser = share)]
    pub error_rate: f64,
    /// Also answer every n-th POST 503 (failures for certain, for tests).
    #[arg(long, default_value_t = 0)]
    pub fail_every: u64,
    /// Requests per second taken; more are answered 429 with Retry-After.
    #[arg(long)]
    pub rate_limit: Option<u32>,
    #[arg(long, env = "SIM_CLIENT_ID", default_value = "switchyard-demo")]
    pub client_id: String,
    #[arg(long, env = "SIM_CLIENT_SECRET", default_value = "demo-client-secret", hide_env_values = true)]
    pub client_secret: String,
    #[arg(long, env = "SIM_MARKETPLACE_TOKEN", default_value = "demo-marketplace-token", hide_env_values = true)]
    pub marketplace_token: String,
    /// How long an ERP token lives.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    pub token_ttl: Duration,
}

/// A share from 0 to 1, e.g. `0.05`.
fn share(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if (0.0..=1.0).contains(&x) => Ok(x),
        _ => Err("a share from 0 to 1, e.g. 0.05".to_string()),
    }
}

#[derive(Default)]
struct Books {
    /// Live tokens and when they expire.
    tokens: HashMap<String, Instant>,
    /// Sales orders in the order they were made.
    orders: Vec<Value>,
    /// Idempotency key (or external document number) -> index in `orders`.
    by_key: HashMap<String, usize>,
    acks: Vec<Value>,
    acked: HashMap<String, usize>,
    duplicates: u64,
    errors_injected: u64,
    rate_limited: u64,
    posts: u64,
}

struct Sim {
    config: Simulation,
    books: Mutex<Books>,
    limiter: Option<governor::DefaultDirectRateLimiter>,
}

type Shared = Arc<Sim>;

pub fn simulate(config: Simulation) -> ExitCode {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    rt.block_on(async move {
        let limiter =
            config.rate_limit.and_then(std::num::NonZeroU32::new).map(|n| governor::RateLimiter::direct(governor::Quota::per_second(n)));
        let sim = Arc::new(Sim { config: config.clone(), books: Mutex::new(Books::default()), limiter });
        let app = axum::Router::new()
            .route("/erp/oauth2/token", axum::routing::post(token))
            .route("/erp/companies/{company}/salesOrders", axum::routing::post(create_order).get(list_orders))
            .route("/marketplace/orders/{id}/acknowledgement", axum::routing::post(acknowledge))
            .route("/marketplace/acknowledgements", axum::routing::get(list_acks))
            .route("/stats", axum::routing::get(stats))
            .layer(axum::middleware::from_fn_with_state(sim.clone(), faults))
            .with_state(sim);
        let listener = match tokio::net::TcpListener::bind(config.listen).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("error: cannot listen on {}: {e}", config.listen);
                return ExitCode::from(1);
            }
        };
        eprintln!("switchyard simulate: ERP and marketplace on http://{}", config.listen);
        eprintln!("  ERP token:     POST /erp/oauth2/token (client credentials: {})", config.client_id);
        eprintln!("  ERP orders:    POST|GET /erp/companies/{{company}}/salesOrders (one per Idempotency-Key)");
        eprintln!("  marketplace:   POST /marketplace/orders/{{id}}/acknowledgement, GET /marketplace/acknowledgements");
        eprintln!("  counts:        GET /stats");
        eprintln!(
            "  latency {}, error rate {:.0} %{}, rate limit {}",
            humantime::format_duration(config.latency),
            config.error_rate * 100.0,
            if config.fail_every > 0 { format!(" and every {}th POST", config.fail_every) } else { String::new() },
            config.rate_limit.map_or("none".to_string(), |r| format!("{r}/s"))
        );
        let stop = async {
            let _ = tokio::signal::ctrl_c().await;
        };
        match axum::serve(listener, app).with_graceful_shutdown(stop).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(1)
            }
        }
    })
}

fn problem(status: StatusCode, detail: &str) -> Response {
    let mut r = (status, Json(json!({"error": status.canonical_reason().unwrap_or(""), "detail": detail}))).into_response();
    if status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::SERVICE_UNAVAILABLE {
        r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    r
}

/// Latency, then the rate limit, then injected errors, on every request but the counts.
async fn faults(State(sim): State<Shared>, request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let path = request.uri().path().to_string();
    let method = request.method().clone();
    if path == "/stats" {
        return next.run(request).await;
    }
    let c = &sim.config;
    if !c.latency.is_zero() {
        tokio::time::sleep(c.latency.mul_f64(0.5 + fastrand::f64())).await;
    }
    if let Some(l) = &sim.limiter
        && l.check().is_err()
    {
        sim.books.lock().expect("books").rate_limited += 1;
        eprintln!("{method} {path} -> 429 (rate limit)");
        return problem(StatusCode::TOO_MANY_REQUESTS, "slow down");
    }
    let fail = method == Method::POST && {
        let mut books = sim.books.lock().expect("books");
        books.posts += 1;
        let fail = fastrand::f64() < c.error_rate || (c.fail_every > 0 && books.posts.is_multiple_of(c.fail_every));
        books.errors_injected += u64::from(fail);
        fail
    };
    if fail {
        eprintln!("{method} {path} -> 503 (injected)");
        return problem(StatusCode::SERVICE_UNAVAILABLE, "the service is having a moment");
    }
    let r = next.run(request).await;
    eprintln!("{method} {path} -> {}", r.status().as_u16());
    r
}

/// The client-credentials grant: id and secret by basic authentication or in the form.
async fn token(State(sim): State<Shared>, headers: HeaderMap, body: String) -> Response {
    use base64::Engine;
    let form: HashMap<String, String> = form_urlencoded::parse(body.as_bytes()).into_owned().collect();
    let from_basic = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|pair| pair.split_once(':').map(|(i, s)| (form_decoded(i), form_decoded(s))));
    let (id, secret) = from_basic
        .unwrap_or_else(|| (form.get("client_id").cloned().unwrap_or_default(), form.get("client_secret").cloned().unwrap_or_default()));
    if form.get("grant_type").map(String::as_str) != Some("client_credentials") {
        return (StatusCode::BAD_REQUEST, Json(json!({"error": "unsupported_grant_type"}))).into_response();
    }
    if id != sim.config.client_id || secret != sim.config.client_secret {
        return (StatusCode::UNAUTHORIZED, Json(json!({"error": "invalid_client"}))).into_response();
    }
    let token = format!("sim-{}", uuid::Uuid::now_v7().simple());
    sim.books.lock().expect("books").tokens.insert(token.clone(), Instant::now() + sim.config.token_ttl);
    Json(json!({"access_token": token, "token_type": "Bearer", "expires_in": sim.config.token_ttl.as_secs()})).into_response()
}

/// A form-encoded value decoded (RFC 6749 §2.3.1 encodes the basic credentials so).
fn form_decoded(s: &str) -> String {
    form_urlencoded::parse(s.as_bytes()).next().map(|(k, _)| k.into_owned()).unwrap_or_default()
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "))
}

/// A sales order, once per idempotency key (or external document number without one).
async fn create_order(State(sim): State<Shared>, Path(company): Path<String>, headers: HeaderMap, body: String) -> Response {
    let mut books = sim.books.lock().expect("books");
    let live = bearer(&headers).and_then(|t| books.tokens.get(t)).is_some_and(|until| Instant::now() < *until);
    if !live {
        return (StatusCode::UNAUTHORIZED, Json(json!({"error": "invalid_token"}))).into_response();
    }
    let Ok(order) = serde_json::from_str::<Value>(&body) else {
        return problem(StatusCode::BAD_REQUEST, "the body is not JSON");
    };
    let external = order.get("externalDocumentNumber").and_then(Value::as_str).unwrap_or_default().to_string();
    let key = headers.get("idempotency-key").and_then(|v| v.to_str().ok()).map(str::to_string).unwrap_or_else(|| format!("doc:{external}"));
    if let Some(&at) = books.by_key.get(&key) {
        books.duplicates += 1;
        let mut r = (StatusCode::OK, Json(books.orders[at].clone())).into_response();
        r.headers_mut().insert("x-duplicate", HeaderValue::from_static("true"));
        return r;
    }
    let number = format!("SO-{}", 100_001 + books.orders.len());
    let doc = json!({
        "id": uuid::Uuid::now_v7().to_string(),
        "number": number,
        "status": "Open",
        "company": company,
        "externalDocumentNumber": external,
        "customerNumber": order.get("customerNumber").cloned().unwrap_or(Value::Null),
        "lines": order.get("salesOrderLines").and_then(Value::as_array).map_or(0, Vec::len),
    });
    let at = books.orders.len();
    books.orders.push(doc.clone());
    books.by_key.insert(key, at);
    (StatusCode::CREATED, Json(doc)).into_response()
}

async fn list_orders(State(sim): State<Shared>, Path(company): Path<String>) -> Response {
    let books = sim.books.lock().expect("books");
    let value: Vec<&Value> = books.orders.iter().filter(|o| o["company"] == company.as_str()).collect();
    Json(json!({ "value": value })).into_response()
}

/// An order's acknowledgement, taken once (again: 200, not recorded twice).
async fn acknowledge(State(sim): State<Shared>, Path(id): Path<String>, headers: HeaderMap, body: String) -> Response {
    if bearer(&headers) != Some(sim.config.marketplace_token.as_str()) {
        return (StatusCode::UNAUTHORIZED, Json(json!({"error": "invalid_token"}))).into_response();
    }
    let Ok(ack) = serde_json::from_str::<Value>(&body) else {
        return problem(StatusCode::BAD_REQUEST, "the body is not JSON");
    };
    let mut books = sim.books.lock().expect("books");
    if books.acked.contains_key(&id) {
        books.duplicates += 1;
        return (StatusCode::OK, Json(json!({"order_id": id, "status": "already acknowledged"}))).into_response();
    }
    let at = books.acks.len();
    books.acks.push(json!({"order_id": id, "acknowledgement": ack}));
    books.acked.insert(id.clone(), at);
    (StatusCode::CREATED, Json(json!({"order_id": id, "status": "acknowledged"}))).into_response()
}

async fn list_acks(State(sim): State<Shared>) -> Response {
    Json(json!({ "value": sim.books.lock().expect("books").acks })).into_response()
}

async fn stats(State(sim): State<Shared>) -> Response {
    let b = sim.books.lock().expect("books");
    Json(json!({
        "sales_orders": b.orders.len(),
        "acknowledgements": b.acks.len(),
        "duplicates": b.duplicates,
        "errors_injected": b.errors_injected,
        "rate_limited": b.rate_limited,
    }))
    .into_response()
}
