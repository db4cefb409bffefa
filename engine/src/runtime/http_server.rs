//! The engine's HTTP server: one POST path per pipeline with an `http` source.
//!
//! A request is answered only once its fate is known: `202` with the message and correlation
//! ids once the message is committed to the pipeline's inbox (what the sender may then forget),
//! or a problem (RFC 9457 `application/problem+json`) saying why nothing was stored: `401`
//! unauthenticated, `413` too large, `429` over the partner's rate (with `Retry-After`), `400`
//! not JSON, `422` failing the validate steps (with `reject_invalid`), `503` while the inbox is
//! full or the engine stops. Credentials never reach the stored message, a log or an answer.

use super::ingest::{INBOX_HIGH_WATER, to_inbox};
use super::{PipelineRun, RunError, Shared};
use crate::doc::Doc;
use crate::message::RawMessage;
use crate::source::http::{AuthFailure, HttpEndpoint};
use crate::store;
use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

/// Where the server listens when `--listen` is not given.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";

/// A bound server, ready to serve.
pub(super) struct HttpServer {
    listener: tokio::net::TcpListener,
    routes: HashMap<String, Arc<PipelineRun>>,
    /// `SWITCHYARD_STATUS_TOKEN`: the bearer token `GET /status/...` asks for, when set.
    status_token: Option<Vec<u8>>,
    /// Without a token the status API answers only on a loopback address.
    status_open: bool,
}

/// How long a request's body may take to arrive.
const BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// Partners remembered by a rate limit before the idle ones are forgotten.
const PARTNERS_KEPT: usize = 10_000;

/// The setting that protects the status API with a bearer token.
pub const STATUS_TOKEN_SETTING: &str = "SWITCHYARD_STATUS_TOKEN";

/// A problem answered to the sender: status, a short kind, what happened, and per-pointer errors.
struct Problem {
    status: StatusCode,
    kind: &'static str,
    title: &'static str,
    detail: String,
    errors: Vec<(String, String)>,
    retry_after: Option<u64>,
}

impl Problem {
    fn new(status: StatusCode, kind: &'static str, title: &'static str, detail: impl Into<String>) -> Problem {
        Problem { status, kind, title, detail: detail.into(), errors: Vec::new(), retry_after: None }
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let mut body = serde_json::json!({
            "type": format!("urn:switchyard:problem:{}", self.kind),
            "title": self.title,
            "status": self.status.as_u16(),
            "detail": self.detail,
        });
        if !self.errors.is_empty() {
            body["errors"] =
                self.errors.into_iter().map(|(pointer, detail)| serde_json::json!({"pointer": pointer, "detail": detail})).collect();
        }
        let mut r = (self.status, body.to_string()).into_response();
        r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/problem+json"));
        if let Some(s) = self.retry_after {
            r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        r
    }
}

impl HttpServer {
    /// Binds `addr` when some pipeline has an `http` source; two pipelines on one path are an
    /// error said at start.
    pub async fn bind(addr: Option<SocketAddr>, runs: &[Arc<PipelineRun>]) -> Result<Option<HttpServer>, RunError> {
        let mut routes: HashMap<String, Arc<PipelineRun>> = HashMap::new();
        for run in runs {
            let Some(endpoint) = &run.pipeline.http_source else { continue };
            if let Some(other) = routes.insert(endpoint.path.clone(), run.clone()) {
                return Err(RunError::Http(format!(
                    "pipelines {} and {} both take POST {}; give each its own `source.path`",
                    other.pipeline.name, run.pipeline.name, endpoint.path
                )));
            }
        }
        // The status API is served when a pipeline is tracked, even without an http source.
        if routes.is_empty() && !runs.iter().any(|r| r.pipeline.track) {
            return Ok(None);
        }
        let addr = addr.unwrap_or_else(|| DEFAULT_LISTEN.parse().expect("a valid address"));
        let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
            RunError::Http(format!("cannot listen on {addr}: {e}; choose another address with --listen (or SWITCHYARD_LISTEN)"))
        })?;
        let status_token = std::env::var(STATUS_TOKEN_SETTING).ok().filter(|t| !t.is_empty()).map(String::into_bytes);
        let status_open = status_token.is_some() || addr.ip().is_loopback();
        if !status_open {
            tracing::warn!(listen = %addr, "the status API is off: on an address other hosts reach it needs {STATUS_TOKEN_SETTING}");
        }
        Ok(Some(HttpServer { listener, routes, status_token, status_open }))
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// Serves until the engine stops; requests in progress are finished first.
    pub async fn serve(self, shared: Arc<Shared>) -> Result<(), RunError> {
        let addr = self.local_addr();
        for (path, run) in &self.routes {
            if let Some(e) = &run.pipeline.http_source {
                tracing::info!(pipeline = %run.pipeline.name, url = %format!("http://{}{path}", addr.map(|a| a.to_string()).unwrap_or_default()), auth = %e.describe_auth(), "taking POST requests");
            }
        }
        let state = Arc::new(ServerState {
            routes: self.routes,
            shared: shared.clone(),
            status_token: self.status_token,
            status_open: self.status_open,
        });
        let app = axum::Router::new().fallback(handle).with_state(state);
        let mut stop = shared.shutdown.clone();
        axum::serve(self.listener, app.into_make_service_with_connect_info::<SocketAddr>())
            .with_graceful_shutdown(async move {
                while !*stop.borrow() {
                    if stop.changed().await.is_err() {
                        return;
                    }
                }
            })
            .await
            .map_err(|e| RunError::Http(format!("the HTTP server stopped: {e}")))
    }
}

struct ServerState {
    routes: HashMap<String, Arc<PipelineRun>>,
    shared: Arc<Shared>,
    status_token: Option<Vec<u8>>,
    status_open: bool,
}

async fn handle(
    State(state): State<Arc<ServerState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    if let Some(rest) = uri.path().strip_prefix("/status/") {
        return status(&state, &method, &headers, rest).await;
    }
    let Some(run) = state.routes.get(uri.path()) else {
        return Problem::new(StatusCode::NOT_FOUND, "not-found", "Not Found", format!("nothing takes requests at {}", uri.path()))
            .into_response();
    };
    if method != Method::POST {
        let mut r = Problem::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method-not-allowed",
            "Method Not Allowed",
            format!("{} takes POST only", uri.path()),
        )
        .into_response();
        r.headers_mut().insert(header::ALLOW, HeaderValue::from_static("POST"));
        return r;
    }
    match take(&state.shared, run, peer, uri.path(), &headers, body).await {
        Ok(r) | Err(r) => r,
    }
}

/// The request's way in; `Err` is an answer that stored nothing.
async fn take(
    shared: &Shared,
    run: &PipelineRun,
    peer: SocketAddr,
    path: &str,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, Response> {
    let pipeline = run.current();
    let Some(endpoint) = pipeline.http_source.clone() else {
        return Err(
            Problem::new(StatusCode::NOT_FOUND, "not-found", "Not Found", format!("nothing takes requests at {path}")).into_response()
        );
    };
    if *shared.shutdown.borrow() {
        return Err(unavailable("the engine is stopping; send it again in a moment"));
    }
    // Keys and tokens are checked before the body is read: a stranger's body is never taken in.
    let early = (!endpoint.signs_body()).then(|| endpoint.authenticate(headers, &[]));
    if let Some(Err(f)) = &early {
        return Err(unauthenticated(&pipeline.name, peer, path, f));
    }
    let body = read_body(&endpoint, headers, body).await?;
    let authenticated = match early {
        Some(r) => r,
        None => endpoint.authenticate(headers, &body),
    };
    let partner = authenticated.map_err(|f| unauthenticated(&pipeline.name, peer, path, &f))?;
    let partner = match (endpoint.partner_header.as_ref().and_then(|h| headers.get(h)).and_then(|v| v.to_str().ok()), partner) {
        // A partner's own header only splits its own allowance: it cannot pass for another.
        (Some(h), Some(p)) => format!("{p}/{h}"),
        // Anonymous: the header splits the sender's address, it does not replace it.
        (Some(h), None) => format!("{}/{h}", peer.ip()),
        (None, Some(p)) => p,
        (None, None) => peer.ip().to_string(),
    };
    if let Some(limiter) = &endpoint.limiter
        && limiter.len() > PARTNERS_KEPT
        && endpoint.prune_due()
    {
        limiter.retain_recent();
    }
    if let Some(limiter) = &endpoint.limiter
        && let Err(not_until) = limiter.check_key(&partner)
    {
        use governor::clock::Clock;
        let wait = not_until.wait_time_from(governor::clock::DefaultClock::default().now());
        let mut p = Problem::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate-limited",
            "Too Many Requests",
            format!(
                "more than {} for partner `{partner}`; send it again after the Retry-After delay",
                endpoint.rate_described.as_deref().unwrap_or("")
            ),
        );
        p.retry_after = Some(wait.as_secs_f64().ceil().max(1.0) as u64);
        return Err(p.into_response());
    }
    let input = Doc::parse_bytes(&body).map_err(|e| {
        let mut p = Problem::new(StatusCode::BAD_REQUEST, "invalid-json", "Bad Request", "the body is not valid JSON");
        p.errors.push((String::new(), format!("not valid JSON: {e}")));
        p.into_response()
    })?;
    let mut raw = RawMessage {
        headers: kept_headers(&endpoint, headers, path, &partner),
        origin: Some(format!("POST {path} from {}", peer.ip())),
        received_at: Some(chrono::Utc::now()),
        ..RawMessage::json(body.to_vec())
    };
    if let Err(f) = pipeline.admit(&mut raw, &input, endpoint.reject_invalid) {
        let mut p = Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation-failed",
            "Unprocessable Content",
            format!("the message fails the pipeline's validation ({}); fix it and send it again", f.reason),
        );
        p.errors = f.errors.iter().map(|e| (e.pointer.clone(), e.message.clone())).collect();
        return Err(p.into_response());
    }
    let (message_id, correlation_id) = (raw.message_id.clone().unwrap_or_default(), raw.correlation_id.clone().unwrap_or_default());
    let stream = run.stream;
    let shared_state = shared.state.embedded().is_none();
    let received = pipeline.track.then(|| {
        let detail = serde_json::json!({"message_id": message_id, "partner": partner, "path": path});
        store::TrackEvent::now(&correlation_id, &pipeline.name, "received", detail)
    });
    let items = vec![to_inbox(run, vec![raw])];
    // The event goes in the commit with the embedded store; to the shared store after it.
    let (in_commit, later) = if shared_state { (None, received) } else { (received, None) };
    let stored = shared
        .store
        .submit(move |c| {
            if store::pending(c, &[stream])? >= INBOX_HIGH_WATER {
                return Ok(false);
            }
            store::settle(c, &items, None, &[])?;
            store::record_tracking(c, in_commit.as_slice())?;
            Ok(true)
        })
        .await;
    match stored {
        Ok(true) => {}
        Ok(false) => return Err(unavailable("the pipeline's inbox is full; send it again in a moment")),
        Err(e) => {
            tracing::error!(pipeline = %pipeline.name, error = %e, "a request could not be stored");
            return Err(unavailable("the message could not be stored; send it again"));
        }
    }
    run.stats.ingested.fetch_add(1, Ordering::Relaxed);
    shared.store.wake(&run.input_queue);
    // In the background: the sender's answer does not wait for a slow shared store.
    if let Some(event) = later {
        let (state, name) = (shared.state.clone(), pipeline.name.clone());
        tokio::spawn(async move {
            if let Err(e) = state.record_tracking(vec![event]).await {
                tracing::warn!(pipeline = %name, error = %e, "stored, but the `received` event could not be recorded");
            }
        });
    }
    let body = serde_json::json!({"status": "accepted", "message_id": message_id, "correlation_id": correlation_id});
    let mut r = (StatusCode::ACCEPTED, axum::Json(body)).into_response();
    if let Ok(v) = HeaderValue::from_str(&correlation_id) {
        r.headers_mut().insert("x-correlation-id", v);
    }
    Ok(r)
}

/// `GET /status/{correlation id}`, or `GET /status/orders/{channel}/{id}` for the correlation id
/// `{channel}:{id}` (as the reference pipelines build it): where the message is, from the events
/// of tracked pipelines, oldest first; `state` is the latest.
async fn status(state: &ServerState, method: &Method, headers: &HeaderMap, rest: &str) -> Response {
    if *method != Method::GET {
        let mut r =
            Problem::new(StatusCode::METHOD_NOT_ALLOWED, "method-not-allowed", "Method Not Allowed", "the status API takes GET only")
                .into_response();
        r.headers_mut().insert(header::ALLOW, HeaderValue::from_static("GET"));
        return r;
    }
    if !state.status_open {
        return Problem::new(
            StatusCode::FORBIDDEN,
            "status-off",
            "Forbidden",
            format!("the status API answers on other addresses than loopback only with {STATUS_TOKEN_SETTING} set"),
        )
        .into_response();
    }
    if let Some(token) = &state.status_token {
        use subtle::ConstantTimeEq;
        let given = headers.get(header::AUTHORIZATION).map(|v| v.as_bytes()).unwrap_or_default();
        let ok = crate::source::http::bearer_token(given).is_some_and(|t| bool::from(t.ct_eq(token)));
        if !ok {
            let mut r =
                Problem::new(StatusCode::UNAUTHORIZED, "credentials-invalid", "Unauthorized", "the status API needs its bearer token")
                    .into_response();
            r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return r;
        }
    }
    let decode = |s: &str| percent_encoding::percent_decode_str(s).decode_utf8_lossy().to_string();
    let id = match rest.strip_prefix("orders/").and_then(|r| r.split_once('/')) {
        Some((channel, id)) if !channel.is_empty() && !id.is_empty() => format!("{}:{}", decode(channel), decode(id)),
        _ => decode(rest),
    };
    let events = match state.shared.state.tracking_of(id.clone()).await {
        Ok(e) => e,
        Err(e) => {
            tracing::error!(error = %e, "the status API cannot read the store");
            return unavailable("the store cannot be read now");
        }
    };
    let Some(last) = events.last() else {
        return Problem::new(
            StatusCode::NOT_FOUND,
            "not-found",
            "Not Found",
            format!("nothing is known of `{id}`: not received by a tracked pipeline (`track: true`), or older than 30 days"),
        )
        .into_response();
    };
    let time = |at: i64| chrono::DateTime::from_timestamp_micros(at).map(|t| crate::message::rfc3339::format(&t)).unwrap_or_default();
    let list: Vec<serde_json::Value> = events
        .iter()
        .map(|e| {
            let mut v = serde_json::json!({"at": time(e.at), "pipeline": e.pipeline, "event": e.event});
            if let serde_json::Value::Object(detail) = &e.detail {
                for (k, x) in detail {
                    v[k] = x.clone();
                }
            }
            v
        })
        .collect();
    let state = state_of(events.iter().map(|e| e.event.as_str()));
    let body = serde_json::json!({"correlation_id": id, "state": state, "updated_at": time(last.at), "events": list});
    (StatusCode::OK, axum::Json(body)).into_response()
}

/// A request refused for its credentials: said in the log (never the credentials) and answered 401.
fn unauthenticated(pipeline: &str, peer: SocketAddr, path: &str, f: &AuthFailure) -> Response {
    tracing::warn!(pipeline, peer = %peer, path, why = %f.detail(), "request refused: not authenticated");
    let kind = match f {
        AuthFailure::Missing(_) => "credentials-missing",
        AuthFailure::Invalid(_) => "credentials-invalid",
    };
    let mut r = Problem::new(StatusCode::UNAUTHORIZED, kind, "Unauthorized", f.detail()).into_response();
    r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Switchyard"));
    r
}

fn unavailable(detail: &str) -> Response {
    let mut p = Problem::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "Service Unavailable", detail);
    p.retry_after = Some(5);
    p.into_response()
}

/// The body, up to the endpoint's limit: a larger one is refused without reading it all.
async fn read_body(endpoint: &HttpEndpoint, headers: &HeaderMap, body: Body) -> Result<Bytes, Response> {
    let too_large = || {
        Problem::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body-too-large",
            "Content Too Large",
            format!("the body is larger than the {} bytes this endpoint takes", endpoint.max_body),
        )
        .into_response()
    };
    let declared = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > endpoint.max_body) {
        return Err(too_large());
    }
    use http_body_util::BodyExt;
    let limited = http_body_util::Limited::new(body, endpoint.max_body);
    match tokio::time::timeout(BODY_TIMEOUT, limited.collect()).await {
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => Err(too_large()),
        Ok(Err(_)) => Err(Problem::new(StatusCode::BAD_REQUEST, "body-unreadable", "Bad Request", "the body could not be read to its end")
            .into_response()),
        Err(_) => Err(Problem::new(
            StatusCode::REQUEST_TIMEOUT,
            "body-too-slow",
            "Request Timeout",
            format!("the body did not arrive within {} s", BODY_TIMEOUT.as_secs()),
        )
        .into_response()),
    }
}

/// The request's headers as the pipeline reads them (`http.<name>`, lowercase), credentials
/// left out; with the path and the partner.
fn kept_headers(endpoint: &HttpEndpoint, headers: &HeaderMap, path: &str, partner: &str) -> BTreeMap<String, String> {
    let mut kept = BTreeMap::new();
    for (name, value) in headers {
        if endpoint.is_credential(name) {
            continue;
        }
        if let Ok(v) = value.to_str() {
            kept.insert(format!("http.{}", name.as_str()), v.to_string());
        }
    }
    kept.insert("http.path".to_string(), path.to_string());
    kept.insert("http.partner".to_string(), partner.to_string());
    kept
}

/// Where an order is, from its events in order. A channel re-sending an order already delivered
/// onward (a webhook retry, dropped as a duplicate) is recorded as `received` but does not move
/// the order back: it stays where its delivery got to. After a failure a new `received` counts.
fn state_of<'a>(events: impl Iterator<Item = &'a str>) -> &'a str {
    let mut state = "received";
    for e in events {
        if e != "received" || state == "failed" {
            state = e;
        }
    }
    state
}

#[cfg(test)]
mod tests {
    use super::state_of;

    #[test]
    fn a_repeat_of_a_delivered_order_does_not_move_it_back() {
        let s = |e: &[&'static str]| state_of(e.iter().copied());
        assert_eq!(s(&["received"]), "received");
        assert_eq!(s(&["received", "posted_to_erp", "acknowledged_to_channel", "received"]), "acknowledged_to_channel");
        assert_eq!(s(&["received", "delivered", "received", "posted_to_erp"]), "posted_to_erp");
        assert_eq!(s(&["received", "failed"]), "failed");
        assert_eq!(s(&["received", "failed", "received"]), "received", "a new try after a failure counts");
        assert_eq!(s(&["received", "failed", "received", "delivered"]), "delivered");
    }
}
