//! The `http` sink: one request per message (POST by default) to a URL rendered from it, carrying
//! the message's idempotency key and correlation id as headers. `write` returns once the answer
//! is in. A 2xx answer is a delivery; a timeout, a connection failure, 5xx, 408 and 429 may pass
//! (with the `Retry-After` the other side asked for); any other answer is a refusal that sending
//! the same message again does not change. What happens next is the runtime's decision.
//!
//! Errors name the method and the URL without its query string or credentials (secrets hide
//! there), the status and the start of the answer; never a header value.

use super::{OutputFormat, Sink, SinkError};
use crate::build::BuildContext;
use crate::config::{DiagCode, Diagnostic, Spanned, yaml};
use crate::jsonpath::Scope;
use crate::message::{Metadata, Output};
use crate::template::{Template, Vars};
use async_trait::async_trait;
use indexmap::IndexMap;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue, LOCATION, RETRY_AFTER};
use reqwest::{StatusCode, Url};
use schemars::JsonSchema;
use serde::Deserialize;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// Header names the sink sets on every request (HTTP header names are case-insensitive).
pub mod headers {
    use reqwest::header::HeaderName;
    /// `Idempotency-Key`: the message's idempotency key, unless `idempotency_header` names another.
    pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
    /// `X-Correlation-Id`: the message's correlation id.
    pub const CORRELATION_ID: HeaderName = HeaderName::from_static("x-correlation-id");
}

pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest wait a `Retry-After` may ask for; a longer one is cut to this.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);
/// How much of an answer's body an error quotes, in characters.
pub const EXCERPT_CHARS: usize = 300;
/// A successful answer's body is read up to this many bytes, so that its connection can serve
/// the next request; past it, the connection is dropped instead.
const DRAIN_BYTES: usize = 64 * 1024;
/// The most of a successful answer's body a `reply:` reads.
const REPLY_BYTES: usize = 1024 * 1024;
pub const USER_AGENT: &str = concat!("switchyard/", env!("CARGO_PKG_VERSION"));
/// Headers the HTTP client owns.
const MANAGED_HEADERS: &[&str] = &["host", "content-length", "transfer-encoding", "connection"];
/// What a placeholder value is percent-encoded with: all but RFC 3986's unreserved characters, so
/// an id holding `/`, `?`, `#` or `&` stays one path segment or one query value.
const URL_VALUE: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');

/// The request method.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, JsonSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum HttpMethod {
    #[default]
    Post,
    Put,
    Patch,
}

impl HttpMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            HttpMethod::Post => "POST",
            HttpMethod::Put => "PUT",
            HttpMethod::Patch => "PATCH",
        }
    }

    fn to_reqwest(self) -> reqwest::Method {
        match self {
            HttpMethod::Post => reqwest::Method::POST,
            HttpMethod::Put => reqwest::Method::PUT,
            HttpMethod::Patch => reqwest::Method::PATCH,
        }
    }
}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HttpSinkConfig {
    /// Where each message goes: an `http://` or `https://` URL, a template such as
    /// `https://erp.example.com/orders/{$.order_id}` (placeholders read the output record and
    /// `{channel}`, `{correlation_id}`, ...). Scheme and host are written out; placeholder values
    /// are percent-encoded, so an id holding `/` or `?` stays one path segment.
    pub url: Spanned<String>,
    /// `POST` (default), `PUT` or `PATCH`.
    #[serde(default)]
    pub method: Option<HttpMethod>,
    /// Request headers, name -> template, e.g. `X-Tenant: '{channel}'` or
    /// `Authorization: 'Bearer ${ERP_TOKEN}'`. Their values never appear in errors or logs.
    #[serde(default)]
    pub headers: IndexMap<String, Spanned<String>>,
    /// How long one request may take, answer included (default `10s`). A request that takes
    /// longer failed for a passing reason.
    #[serde(default)]
    pub timeout: Option<Spanned<String>>,
    /// `payload` (default): the record alone, as JSON; `envelope`: metadata and payload together.
    #[serde(default)]
    pub format: Option<OutputFormat>,
    /// The header that carries the message's idempotency key, when it has one (default
    /// `Idempotency-Key`): the receiver can then drop a delivery it already took.
    #[serde(default)]
    pub idempotency_header: Option<Spanned<String>>,
    /// What a delivery here means for the status API of a tracked pipeline, e.g. `posted_to_erp`,
    /// `acknowledged_to_channel` (default `delivered`).
    #[serde(default)]
    pub milestone: Option<Spanned<String>>,
    /// What the receiver's answer adds to the record, and the sink the record then goes to: e.g.
    /// the ERP's sales order number, on to a queue that an acknowledgement pipeline reads.
    #[serde(default)]
    pub reply: Option<ReplyConfig>,
    /// How the sink authenticates: `bearer:`, `basic:` or `oauth2:` (client credentials, the
    /// token cached and fetched again before it expires or when the receiver answers 401).
    #[serde(default)]
    pub auth: Option<Spanned<super::http_auth::HttpSinkAuthConfig>>,
    /// Attempts, backoff and which answers are worth another try.
    #[serde(default)]
    pub retry: Option<crate::runtime::delivery::RetryConfig>,
    /// Stops sending after failures in a row, so that work waits in its queue; a probe later.
    #[serde(default)]
    pub circuit_breaker: Option<crate::runtime::delivery::CircuitBreakerConfig>,
    /// At most this many requests per second, minute or hour (the receiver's quota).
    #[serde(default)]
    pub rate_limit: Option<crate::runtime::delivery::RateLimitConfig>,
}

impl HttpSinkConfig {
    /// Every setting, for noticing a change on reload (compared, never shown: a header value may
    /// be a secret).
    pub fn wiring(&self) -> String {
        let headers: Vec<(&str, &str)> = self.headers.iter().map(|(k, v)| (k.as_str(), v.value.as_str())).collect();
        format!(
            "{:?} {} {headers:?} {:?} {:?} {:?} {:?} {:?} {:?} {:?}",
            self.method,
            self.url.value,
            self.auth.as_ref().map(|a| format!("{:?}", a.value)),
            self.timeout.as_ref().map(|t| &t.value),
            self.format,
            self.idempotency_header.as_ref().map(|h| &h.value),
            self.retry,
            self.circuit_breaker,
            self.rate_limit
        )
    }
}

/// `reply:` of an `http` sink.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReplyConfig {
    /// Field -> JSONPath into the answer's JSON body, e.g. `erp_document_number: $.number`. Each
    /// is added to the record's top level (`null` when the answer does not have it).
    pub fields: IndexMap<String, Spanned<String>>,
    /// The sink of this pipeline the record goes to, with these fields, once the receiver took it.
    pub to: Spanned<String>,
}

/// A header value: written out, or rendered from each message.
enum HeaderSource {
    Fixed(HeaderValue),
    Template(Template),
}

/// An `http` sink, checked and compiled at load.
pub struct HttpTarget {
    method: HttpMethod,
    url: Template,
    /// The URL template (its `${VAR}`s filled in), without query string or credentials.
    url_shown: String,
    /// Each header, with its name as written for messages.
    headers: Vec<(HeaderName, String, HeaderSource)>,
    timeout: Duration,
    format: OutputFormat,
    idempotency_header: HeaderName,
    auth: Option<super::http_auth::SinkAuth>,
    /// Fields read from a 2xx answer (`reply:`), and the sink the record then goes to.
    reply: Option<(Vec<(String, crate::jsonpath::CompiledPath)>, String)>,
    pub milestone: Option<String>,
}

impl std::fmt::Debug for HttpTarget {
    // Header values stay out: they may be secrets.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HttpTarget({} {})", self.method.as_str(), self.url_shown)
    }
}

impl HttpTarget {
    /// The names of the fields its `reply:` reads.
    pub fn reply_fields(&self) -> Vec<&str> {
        self.reply.as_ref().map(|(f, _)| f.iter().map(|(n, _)| n.as_str()).collect()).unwrap_or_default()
    }

    /// The sink its `reply:` sends the record on to.
    pub fn reply_to(&self) -> Option<(&str, &str)> {
        self.reply.as_ref().map(|(_, to)| (to.as_str(), self.url_shown.as_str()))
    }

    /// The record with the `reply:` fields read from the answer's body (`null` for each the
    /// answer does not give, or when it is not JSON: the receiver took the message all the same).
    fn replied(&self, output: &Output, body: &[u8]) -> Output {
        let mut out = output.clone();
        let Some((fields, _)) = &self.reply else { return out };
        let answer = crate::doc::Doc::parse_bytes(body).unwrap_or_else(|_| {
            tracing::warn!(url = %self.url_shown, correlation_id = %output.metadata.correlation_id, bytes = body.len(),
                "the receiver took the message, but its answer is not JSON (or over 1 MiB): the reply's fields are null");
            crate::doc::Doc::Null
        });
        if let crate::doc::Doc::Object(record) = &mut out.payload {
            for (name, path) in fields {
                let value = path.first(Scope::root(&answer)).cloned().unwrap_or_else(|| {
                    if !answer.is_null() {
                        tracing::warn!(url = %self.url_shown, correlation_id = %output.metadata.correlation_id, field = %name,
                            "the receiver's answer has no value for this reply field: it is null");
                    }
                    crate::doc::Doc::Null
                });
                record.insert(name.as_str(), value);
            }
        } else {
            tracing::warn!(url = %self.url_shown, "the record is not an object: the reply's fields cannot be added to it");
        }
        out
    }

    /// Checks the config and compiles its templates; `at` is the sink's key path, e.g. `sinks.erp`.
    pub fn build(c: &HttpSinkConfig, at: &str, cx: &BuildContext) -> Result<HttpTarget, Vec<Diagnostic>> {
        let mut diags = Vec::new();
        let url = check_url(&c.url, &format!("{at}.url"), cx).map_err(|d| diags.push(d)).ok();
        let timeout = match &c.timeout {
            None => DEFAULT_TIMEOUT,
            Some(t) => {
                let key = format!("{at}.timeout");
                match humantime::parse_duration(t.value.trim()) {
                    Ok(d) if !d.is_zero() => d,
                    Ok(_) => {
                        diags.push(cx.diag(DiagCode::InvalidValue, t.span, &key, "a timeout of zero").expected("a duration such as `10s`"));
                        DEFAULT_TIMEOUT
                    }
                    Err(e) => {
                        diags.push(
                            cx.diag(DiagCode::InvalidValue, t.span, &key, format!("`{}` is not a duration: {e}", t.shown()))
                                .expected("a duration such as `500ms`, `10s`, `1m`"),
                        );
                        DEFAULT_TIMEOUT
                    }
                }
            }
        };
        let idempotency_header = match &c.idempotency_header {
            None => headers::IDEMPOTENCY_KEY,
            Some(h) => match header_name(&h.value) {
                Some(n) if n == headers::CORRELATION_ID || MANAGED_HEADERS.contains(&n.as_str()) => {
                    diags.push(cx.diag(
                        DiagCode::Conflict,
                        h.span,
                        &format!("{at}.idempotency_header"),
                        format!("`{}` carries something else", h.value),
                    ));
                    n
                }
                Some(n) => n,
                None => {
                    diags.push(
                        cx.diag(
                            DiagCode::InvalidValue,
                            h.span,
                            &format!("{at}.idempotency_header"),
                            format!("`{}` is not a header name", h.shown()),
                        )
                        .expected("letters, digits and `-`, e.g. `Idempotency-Key`"),
                    );
                    headers::IDEMPOTENCY_KEY
                }
            },
        };
        let mut extra = Vec::new();
        for (name, value) in &c.headers {
            let key = format!("{at}.headers.{name}");
            // The key's own position: the value may be a long template or a secret.
            let key_span = || yaml::parse_plain(&cx.file).ok().and_then(|t| t.span_of_path(&key)).unwrap_or(value.span);
            let Some(header) = header_name(name) else {
                diags.push(
                    cx.diag(DiagCode::InvalidValue, key_span(), &key, format!("`{name}` is not a header name"))
                        .expected("letters, digits and `-`, e.g. `X-Tenant`"),
                );
                continue;
            };
            let hint = if MANAGED_HEADERS.contains(&header.as_str()) {
                Some("the HTTP client sets it for each request; leave this header out")
            } else if header == reqwest::header::AUTHORIZATION && c.auth.is_some() {
                Some("`auth:` sets the Authorization header; leave this header out")
            } else if header == idempotency_header || header == headers::CORRELATION_ID {
                Some(
                    "the idempotency key and the correlation id go with every message; leave this header out (`idempotency_header:` names the key's header)",
                )
            } else {
                None
            };
            if let Some(hint) = hint {
                diags.push(cx.diag(DiagCode::Conflict, key_span(), &key, format!("the sink sets `{name}` itself")).hint(hint));
                continue;
            }
            let Some(t) = cx.template(value, &key).map_err(|d| diags.push(d)).ok() else { continue };
            let source = if t.has_placeholders() {
                HeaderSource::Template(t)
            } else {
                match HeaderValue::from_str(t.literal_prefix()) {
                    Ok(mut v) => {
                        v.set_sensitive(true);
                        HeaderSource::Fixed(v)
                    }
                    Err(_) => {
                        diags.push(
                            cx.diag(DiagCode::InvalidValue, value.span, &key, format!("the value of header `{name}` cannot be sent"))
                                .expected("text without line breaks or control characters"),
                        );
                        continue;
                    }
                }
            };
            extra.push((header, name.clone(), source));
        }
        let auth = c.auth.as_ref().and_then(|a| super::http_auth::SinkAuth::build(a, at, cx, &mut diags));
        let reply = c.reply.as_ref().map(|r| {
            let fields: Vec<(String, crate::jsonpath::CompiledPath)> = r
                .fields
                .iter()
                .filter_map(|(name, path)| {
                    cx.jsonpath(path, &format!("{at}.reply.fields.{name}")).map_err(|d| diags.push(d)).ok().map(|p| (name.clone(), p))
                })
                .collect();
            (fields, r.to.value.clone())
        });
        match url {
            Some(url) if diags.is_empty() => Ok(HttpTarget {
                auth,
                reply,
                milestone: c.milestone.as_ref().map(|m| m.value.trim().to_string()).filter(|m| !m.is_empty()),
                method: c.method.unwrap_or_default(),
                url,
                url_shown: without_secrets(&c.url.value),
                headers: extra,
                timeout,
                format: c.format.unwrap_or(OutputFormat::Payload),
                idempotency_header,
            }),
            _ => Err(diags),
        }
    }

    /// A failure of this message alone, which no retry changes.
    fn refused(&self, what: impl std::fmt::Display) -> SinkError {
        SinkError::Delivery {
            message: format!("{} {}: {what}", self.method.as_str(), self.url_shown),
            transient: false,
            retry_after: None,
            status: None,
        }
    }

    /// The URL for one message, placeholder values percent-encoded.
    fn url_for(&self, output: &Output) -> Result<Url, SinkError> {
        let mut dot_segment = false;
        let text = self
            .url
            .render_with(Scope::root(&output.payload), &MetaVars(&output.metadata), |value, out| {
                dot_segment |= value == "." || value == "..";
                out.extend(utf8_percent_encode(value, URL_VALUE));
            })
            .ok_or_else(|| self.refused("the URL template has no value for this message"))?;
        if dot_segment {
            return Err(self.refused("a value placed in the URL is `.` or `..`, which would send the message to another path"));
        }
        let url = Url::parse(&text).map_err(|e| self.refused(format!("the URL rendered for this message is not valid ({e})")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(self.refused("the URL rendered for this message is not http:// or https://"));
        }
        Ok(url)
    }

    /// The request headers for one message.
    fn headers_for(&self, output: &Output) -> Result<HeaderMap, SinkError> {
        let mut map = HeaderMap::with_capacity(self.headers.len() + 3);
        map.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        let meta = &output.metadata;
        for (header, name, source) in &self.headers {
            let value = match source {
                HeaderSource::Fixed(v) => v.clone(),
                HeaderSource::Template(t) => {
                    let text = t
                        .render(Scope::root(&output.payload), &MetaVars(meta))
                        .ok_or_else(|| self.refused(format!("the header `{name}` has no value for this message")))?;
                    let mut v = HeaderValue::from_str(&text).map_err(|_| {
                        self.refused(format!("the value rendered for header `{name}` holds a line break or a control character"))
                    })?;
                    v.set_sensitive(true);
                    v
                }
            };
            map.insert(header.clone(), value);
        }
        let id = HeaderValue::from_str(&meta.correlation_id)
            .map_err(|_| self.refused("the correlation id holds a line break or a control character, which a header cannot carry"))?;
        map.insert(headers::CORRELATION_ID, id);
        if let Some(k) = &meta.idempotency_key {
            let key = HeaderValue::from_str(k)
                .map_err(|_| self.refused("the idempotency key holds a line break or a control character, which a header cannot carry"))?;
            map.insert(self.idempotency_header.clone(), key);
        }
        Ok(map)
    }

    /// What a failed request means: its message names the method and the URL without secrets.
    fn transport_error(&self, shown: &str, e: reqwest::Error) -> SinkError {
        let m = self.method.as_str();
        let e = e.without_url();
        let (message, transient) = if e.is_timeout() {
            (format!("{m} {shown}: no answer within {}", humantime::format_duration(self.timeout)), true)
        } else if e.is_connect() {
            (format!("{m} {shown}: cannot connect ({})", innermost(&e)), true)
        } else if e.is_builder() {
            (format!("{m} {shown}: the request cannot be made ({})", innermost(&e)), false)
        } else {
            (format!("{m} {shown}: the request failed ({})", innermost(&e)), true)
        };
        SinkError::Delivery { message, transient, retry_after: None, status: None }
    }
}

/// The URL template: compiled, with a written-out `http://` or `https://` scheme and a host that
/// parses.
fn check_url(url: &Spanned<String>, key: &str, cx: &BuildContext) -> Result<Template, Diagnostic> {
    let t = cx.template(url, key)?;
    let prefix = t.literal_prefix();
    let scheme_ok = ["http://", "https://"].iter().any(|s| prefix.get(..s.len()).is_some_and(|p| p.eq_ignore_ascii_case(s)));
    if !scheme_ok {
        return Err(cx
            .diag(DiagCode::InvalidValue, url.span, key, format!("`{}` is not an http:// or https:// URL", without_secrets(url.shown())))
            .expected("a URL starting with `http://` or `https://`, e.g. `https://erp.example.com/orders/{$.order_id}`")
            .hint("write the scheme and host out; placeholders fill in the path or the query"));
    }
    // Up to the first placeholder, the URL must already be well formed: `0` stands in for the
    // placeholder's value (it fits a host, a port, a path and a query alike).
    let sample = if t.has_placeholders() { format!("{prefix}0") } else { prefix.to_string() };
    match Url::parse(&sample) {
        Ok(u) if u.host_str().is_some_and(|h| !h.is_empty()) => Ok(t),
        Ok(_) => {
            Err(cx.diag(DiagCode::InvalidValue, url.span, key, "the URL has no host").expected("e.g. `https://erp.example.com/orders`"))
        }
        Err(e) => Err(cx
            .diag(DiagCode::InvalidValue, url.span, key, format!("`{}` is not a valid URL: {e}", without_secrets(url.shown())))
            .expected("e.g. `https://erp.example.com/orders/{$.order_id}`")),
    }
}

fn header_name(name: &str) -> Option<HeaderName> {
    HeaderName::from_bytes(name.as_bytes()).ok()
}

struct MetaVars<'a>(&'a Metadata);

impl Vars for MetaVars<'_> {
    fn var(&self, name: &str) -> Option<&str> {
        crate::map::meta_var(self.0, name)
    }
}

/// A URL or URL template without its credentials, query string and fragment, where secrets hide.
pub fn without_secrets(url: &str) -> String {
    let (scheme, rest) = match url.find("://") {
        Some(i) => url.split_at(i + 3),
        None => ("", url),
    };
    let rest = &rest[..rest.find(['?', '#']).unwrap_or(rest.len())];
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let rest = match rest[..authority_end].rfind('@') {
        Some(at) => &rest[at + 1..],
        None => rest,
    };
    format!("{scheme}{rest}")
}

/// The deepest cause of an error: the words that say what went wrong ("Connection refused").
fn innermost(e: &(dyn std::error::Error + 'static)) -> String {
    let mut last = e;
    while let Some(next) = last.source() {
        last = next;
    }
    last.to_string()
}

/// A `Retry-After` value: delta-seconds or an HTTP date; at most [`MAX_RETRY_AFTER`], zero for a
/// date already past, `None` when it is neither.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    let wait = if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // More digits than a u64 holds is still "a very long time".
        Duration::from_secs(value.parse::<u64>().unwrap_or(u64::MAX))
    } else {
        httpdate::parse_http_date(value).ok()?.duration_since(now).unwrap_or(Duration::ZERO)
    };
    Some(wait.min(MAX_RETRY_AFTER))
}

/// Whether a failing status may pass: the other side is down or busy (5xx), timed out waiting for
/// the request (408) or asks to slow down (429). Any other 4xx (and 3xx) refuses the message.
pub fn is_transient_status(status: u16) -> bool {
    status >= 500 || status == 408 || status == 429
}

/// The start of a body, on one line: at most [`EXCERPT_CHARS`] characters, control characters
/// and runs of whitespace as one space.
pub fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let cleaned: String = text.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    let line = cleaned.split_whitespace().collect::<Vec<_>>().join(" ");
    if line.chars().count() <= EXCERPT_CHARS {
        return line;
    }
    let mut cut: String = line.chars().take(EXCERPT_CHARS - 1).collect();
    cut.push('…');
    cut
}

/// What an answer means for the message: `Ok` for 2xx, else the error the runtime decides on.
/// `shown` is the URL without secrets; `location` the (secret-free) target of a redirect.
pub fn answer(
    method: &str,
    shown: &str,
    status: StatusCode,
    retry_after: Option<Duration>,
    location: Option<&str>,
    body: &str,
) -> Result<(), SinkError> {
    if status.is_success() {
        return Ok(());
    }
    let transient = is_transient_status(status.as_u16());
    let retry_after = retry_after.filter(|_| transient);
    let mut message = format!("{method} {shown} answered {status}");
    if let Some(wait) = retry_after {
        message.push_str(&format!(" (asked to wait {})", humantime::format_duration(wait)));
    }
    if status.is_redirection() {
        message.push_str("; redirects are not followed: point `url` at the final address");
        if let Some(l) = location {
            message.push_str(&format!(" ({l})"));
        }
    }
    if !body.is_empty() {
        message.push_str(": ");
        message.push_str(body);
    }
    Err(SinkError::Delivery { message, transient, retry_after, status: Some(status.as_u16()) })
}

/// A running `http` sink: its target and one client (one connection pool) for all its requests.
pub struct HttpSink {
    target: Arc<HttpTarget>,
    client: reqwest::Client,
}

impl HttpSink {
    pub fn start(target: Arc<HttpTarget>) -> Result<HttpSink, SinkError> {
        // The process's TLS provider is ring, as for RabbitMQ connections; one installed already
        // stays.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder()
            .timeout(target.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(USER_AGENT)
            .build()
            .map_err(|e| {
                SinkError::Start(format!(
                    "cannot start the HTTP client for {} {}: {}",
                    target.method.as_str(),
                    target.url_shown,
                    innermost(&e)
                ))
            })?;
        Ok(HttpSink { target, client })
    }
}

#[async_trait]
impl Sink for HttpSink {
    /// Sends the message and waits for the answer.
    async fn write(&self, output: &Output) -> Result<(), SinkError> {
        self.send(output).await.map(|_| ())
    }

    async fn write_with_reply(&self, output: &Output) -> Result<Option<Output>, SinkError> {
        self.send(output).await
    }

    /// Nothing to do: every write waited for its answer.
    async fn flush(&self) -> Result<(), SinkError> {
        Ok(())
    }

    fn describe(&self) -> String {
        format!("{} {}", self.target.method.as_str(), self.target.url_shown)
    }
}

impl HttpSink {
    /// Sends the message and waits for the answer; with `reply:`, the record with the answer's
    /// fields.
    async fn send(&self, output: &Output) -> Result<Option<Output>, SinkError> {
        let t = &*self.target;
        let url = t.url_for(output)?;
        let headers = t.headers_for(output)?;
        let shown = without_secrets(url.as_str());
        let body = t.format.render(output);
        let request = || self.client.request(t.method.to_reqwest(), url.clone()).headers(headers.clone()).body(body.clone());
        let mut response = match super::http_auth::send_authorized(t.auth.as_ref(), &self.client, request).await {
            super::http_auth::Sent::Answer(r) => r,
            super::http_auth::Sent::Credentials(e) => return Err(e),
            super::http_auth::Sent::Send(e) => return Err(t.transport_error(&shown, e)),
        };
        let status = response.status();
        if status.is_success() {
            // Read what little there is so that the connection serves the next request; what
            // the body holds, or whether it arrives, does not change the delivery.
            let (mut body, mut read) = (Vec::new(), 0);
            let keep = if t.reply.is_some() { REPLY_BYTES } else { 0 };
            while let Ok(Some(chunk)) = response.chunk().await {
                read += chunk.len();
                if read <= keep {
                    body.extend_from_slice(&chunk);
                }
                if read > DRAIN_BYTES.max(keep) {
                    break;
                }
            }
            return Ok(t.reply.is_some().then(|| t.replied(output, &body)));
        }
        let header = |name| response.headers().get(name).and_then(|v: &HeaderValue| v.to_str().ok()).map(str::to_string);
        let retry_after = header(RETRY_AFTER).and_then(|v| parse_retry_after(&v, SystemTime::now()));
        let location = header(LOCATION).map(|l| without_secrets(&l));
        let mut body = Vec::new();
        while body.len() < EXCERPT_CHARS * 4 {
            match response.chunk().await {
                Ok(Some(chunk)) => body.extend_from_slice(&chunk),
                _ => break,
            }
        }
        answer(t.method.as_str(), &shown, status, retry_after, location.as_deref(), &excerpt(&body)).map(|()| None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::Shared;
    use crate::config::SourceFile;
    use crate::pipeline::Pipeline;
    use std::collections::HashMap;

    fn load(sink: &str) -> Result<Pipeline, Vec<Diagnostic>> {
        let text = format!(
            "apiVersion: switchyard/v1\nkind: Pipeline\nname: t\nversion: '1'\ndescription: t\nowner: t\nchannel: shopify\nsource: {{type: stdin}}\nsinks:\n  erp:\n    type: http\n{sink}"
        );
        let env: HashMap<String, String> = [("ERP_TOKEN".to_string(), "s3cret-token".to_string())].into();
        crate::pipeline::load::load_source(SourceFile::new("p.yaml", text), &Shared::new(Box::new(env)))
    }

    fn target(sink: &str) -> Arc<HttpTarget> {
        let p = load(sink).unwrap_or_else(|d| panic!("{:?}", d.iter().map(|d| &d.message).collect::<Vec<_>>()));
        p.http_targets["erp"].clone()
    }

    /// (code, key path, line, column) of each problem.
    fn problems(sink: &str) -> Vec<(DiagCode, String, usize, usize)> {
        let diags = load(sink).expect_err("the pipeline is rejected");
        diags.iter().map(|d| (d.code, d.key_path.clone(), d.span.line, d.span.column)).collect()
    }

    fn output(payload: serde_json::Value, idempotency_key: Option<&str>) -> Output {
        serde_json::from_value(serde_json::json!({
            "payload": payload,
            "metadata": {"message_id": "m-1", "correlation_id": "shopify:1001", "idempotency_key": idempotency_key,
                         "channel": "shopify", "received_at": "2026-11-27T00:00:00Z",
                         "pipeline": "t", "pipeline_version": "1", "mapping_versions": {}, "attempt": 1}
        }))
        .unwrap()
    }

    fn delivery(e: &SinkError) -> (bool, Option<Duration>, Option<u16>, &str) {
        match e {
            SinkError::Delivery { message, transient, retry_after, status } => (*transient, *retry_after, *status, message),
            other => panic!("not a delivery error: {other:?}"),
        }
    }

    #[tokio::test]
    async fn bearer_and_basic_credentials_are_sensitive_headers_and_literal_secrets_are_refused() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::new();
        let bearer = target("    url: https://erp.example.com/o\n    auth: {bearer: \"${ERP_TOKEN}\"}\n");
        let v = bearer.auth.as_ref().unwrap().header(&client).await.unwrap();
        assert_eq!((v.to_str().unwrap(), v.is_sensitive()), ("Bearer s3cret-token", true));
        let basic = target("    url: https://erp.example.com/o\n    auth: {basic: {username: erp, password: \"${ERP_TOKEN}\"}}\n");
        let v = basic.auth.as_ref().unwrap().header(&client).await.unwrap();
        assert_eq!(v.to_str().unwrap(), "Basic ZXJwOnMzY3JldC10b2tlbg==", "base64 of erp:s3cret-token");
        assert!(format!("{basic:?}").find("s3cret").is_none());
        let refused = problems("    url: https://erp.example.com/o\n    auth: {bearer: written-out}\n");
        assert_eq!(refused, [(DiagCode::InvalidValue, "sinks.erp.auth.bearer".to_string(), 13, 20)]);
        let both = problems("    url: https://erp.example.com/o\n    headers: {Authorization: x}\n    auth: {bearer: \"${ERP_TOKEN}\"}\n");
        assert_eq!(both[0].0, DiagCode::Conflict);
    }

    #[test]
    fn every_config_problem_is_reported_where_it_is_written() {
        // The sink's `type: http` is line 11: its settings start on line 12. Structure first: a
        // sink that does not parse is reported as such, every problem of it.
        let found = problems("    url: https://erp.example.com/orders\n    method: GET\n    formt: payload\n");
        assert_eq!(
            found,
            [
                (DiagCode::InvalidValue, "sinks.erp.method".to_string(), 13, 13),
                (DiagCode::UnknownKey, "sinks.erp.formt".to_string(), 14, 5)
            ]
        );
        let diags = load("    url: https://erp.example.com/orders\n    method: get\n").unwrap_err();
        assert!(diags[0].expected.as_deref().is_some_and(|e| e.contains("POST")), "{:?}", diags[0]);
        // Then the values, every problem at once.
        let found = problems(
            "    url: ftp://erp.example.com/orders\n    timeout: soon\n    headers:\n      X Tenant: '{channel}'\n      X-Sig: '{$.a'\n      X-Line: \"a\\nb\"\n    idempotency_header: 'bad header'\n",
        );
        assert_eq!(
            found,
            [
                (DiagCode::InvalidValue, "sinks.erp.url".to_string(), 12, 10),
                (DiagCode::InvalidValue, "sinks.erp.timeout".to_string(), 13, 14),
                (DiagCode::InvalidValue, "sinks.erp.idempotency_header".to_string(), 18, 25),
                (DiagCode::InvalidValue, "sinks.erp.headers.X Tenant".to_string(), 15, 7),
                (DiagCode::JsonPathSyntax, "sinks.erp.headers.X-Sig".to_string(), 16, 15),
                (DiagCode::InvalidValue, "sinks.erp.headers.X-Line".to_string(), 17, 15),
            ]
        );
        // A header the sink sets itself conflicts (the default idempotency header, here).
        let found =
            problems("    url: https://erp.example.com/orders\n    headers:\n      Idempotency-Key: fixed\n      Content-Length: '3'\n");
        assert_eq!(
            found,
            [
                (DiagCode::Conflict, "sinks.erp.headers.Idempotency-Key".to_string(), 14, 7),
                (DiagCode::Conflict, "sinks.erp.headers.Content-Length".to_string(), 15, 7)
            ]
        );
        assert_eq!(
            problems("    url: https://erp.example.com/orders\n    idempotency_header: x-correlation-id\n"),
            [(DiagCode::Conflict, "sinks.erp.idempotency_header".to_string(), 13, 25)]
        );
        assert!(problems("    method: POST\n").iter().any(|(c, k, ..)| *c == DiagCode::MissingKey && k == "sinks.erp.url"));
    }

    #[test]
    fn the_url_must_be_http_or_https_with_the_scheme_and_host_written_out() {
        for bad in [
            "'{$.callback_url}'",
            "$.callback_url",
            "erp.example.com/orders",
            "'mailto:{$.email}'",
            "'http://bad host/{$.id}'",
            "'http://:8080/{$.id}'",
            "'https://erp.example.com:port/x'",
        ] {
            let found = problems(&format!("    url: {bad}\n"));
            assert_eq!(found, [(DiagCode::InvalidValue, "sinks.erp.url".to_string(), 12, 10)], "{bad}");
        }
        let diags = load("    url: 'ftp://user:pw@erp.example.com/x?key=s3cret'\n").unwrap_err();
        assert!(!diags[0].message.contains("s3cret") && !diags[0].message.contains("pw"), "{}", diags[0].message);
        for good in
            ["https://erp.example.com/orders/{$.id}?tenant={channel}", "HTTP://127.0.0.1:8080/orders", "http://{channel}.erp.local/o"]
        {
            target(&format!("    url: '{good}'\n"));
        }
    }

    #[test]
    fn describe_and_errors_show_no_query_string_credentials_or_header_values() {
        let t = target(
            "    url: 'https://bot:pw@erp.example.com/orders/{$.id}?api_key=${ERP_TOKEN}'\n    headers:\n      Authorization: 'Bearer ${ERP_TOKEN}'\n      X-Note: '{$.note}'\n",
        );
        assert_eq!(format!("{t:?}"), "HttpTarget(POST https://erp.example.com/orders/{$.id})");
        assert_eq!(without_secrets("https://u:p@h:8443/a/b@c?x=1#f"), "https://h:8443/a/b@c");
        assert_eq!(without_secrets("http://h"), "http://h");
        // A header value that cannot be sent is refused without being shown.
        let e = t.headers_for(&output(serde_json::json!({"id": 1, "note": "line\nbreak s3cret"}), None)).unwrap_err();
        let (transient, _, status, message) = delivery(&e);
        assert!(!transient && status.is_none());
        assert!(message.contains("X-Note") && !message.contains("s3cret") && !message.contains("api_key"), "{message}");
        let e = t.headers_for(&output(serde_json::json!({"id": 1}), None)).unwrap_err();
        assert!(delivery(&e).3.contains("the header `X-Note` has no value"), "{e}");
    }

    #[test]
    fn placeholder_values_are_percent_encoded_and_dot_segments_refused() {
        let t = target("    url: 'http://127.0.0.1:1/orders/{$.id}?channel={channel}'\n");
        let url = t.url_for(&output(serde_json::json!({"id": "A/B?c=d#e f"}), None)).unwrap();
        assert_eq!(url.as_str(), "http://127.0.0.1:1/orders/A%2FB%3Fc%3Dd%23e%20f?channel=shopify");
        assert_eq!(t.url_for(&output(serde_json::json!({"id": 1001}), None)).unwrap().path(), "/orders/1001");
        for bad in [serde_json::json!({"id": ".."}), serde_json::json!({"id": "."}), serde_json::json!({"no_id": 1})] {
            let e = t.url_for(&output(bad.clone(), None)).unwrap_err();
            let (transient, _, _, message) = delivery(&e);
            assert!(!transient, "{bad}: {message}");
            assert!(message.starts_with("POST http://127.0.0.1:1/orders/{$.id}: "), "{message}");
        }
    }

    #[test]
    fn retry_after_reads_delta_seconds_and_http_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        assert_eq!(parse_retry_after("2", now), Some(Duration::from_secs(2)));
        assert_eq!(parse_retry_after(" 120 ", now), Some(Duration::from_secs(120)));
        assert_eq!(parse_retry_after("0", now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("86400", now), Some(MAX_RETRY_AFTER), "capped");
        assert_eq!(parse_retry_after("99999999999999999999999", now), Some(MAX_RETRY_AFTER));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(90));
        assert_eq!(parse_retry_after(&later, now), Some(Duration::from_secs(90)), "{later}");
        let earlier = httpdate::fmt_http_date(now - Duration::from_secs(90));
        assert_eq!(parse_retry_after(&earlier, now), Some(Duration::ZERO), "a date already past: go now");
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after(&httpdate::fmt_http_date(now + Duration::from_secs(7 * 86400)), now), Some(MAX_RETRY_AFTER));
        for junk in ["", "soon", "-5", "1.5", "2 s", "Wed, 32 Oct 2015 07:28:00 GMT"] {
            assert_eq!(parse_retry_after(junk, now), None, "{junk:?}");
        }
    }

    #[test]
    fn answers_are_classified_delivered_transient_or_permanent() {
        // (status, delivered, transient)
        let table = [
            (200, true, false),
            (201, true, false),
            (202, true, false),
            (204, true, false),
            (301, false, false),
            (400, false, false),
            (401, false, false),
            (403, false, false),
            (404, false, false),
            (408, false, true),
            (409, false, false),
            (422, false, false),
            (429, false, true),
            (500, false, true),
            (502, false, true),
            (503, false, true),
            (504, false, true),
        ];
        for (code, delivered, transient) in table {
            let status = StatusCode::from_u16(code).unwrap();
            let got = answer("POST", "http://h/o", status, Some(Duration::from_secs(5)), None, "");
            assert_eq!(got.is_ok(), delivered, "{code}");
            if let Err(e) = got {
                assert_eq!(e.is_transient(), transient, "{code}");
                assert_eq!(delivery(&e).2, Some(code));
                assert_eq!(e.retry_after(), transient.then_some(Duration::from_secs(5)), "{code}: only a wait that may help is kept");
            }
        }
        let e = answer("PUT", "http://h/o/1", StatusCode::CONFLICT, None, None, "{\"error\":\"version\"}").unwrap_err();
        assert_eq!(e.to_string(), "PUT http://h/o/1 answered 409 Conflict: {\"error\":\"version\"}");
        let e = answer("POST", "http://h/o", StatusCode::MOVED_PERMANENTLY, None, Some("https://h/o"), "").unwrap_err();
        assert!(e.to_string().contains("redirects are not followed") && e.to_string().contains("(https://h/o)"), "{e}");
        // The other kinds of sink error.
        assert!(SinkError::Broker("x".into()).is_transient());
        assert!(SinkError::Io { path: "f".into(), source: std::io::Error::other("disk full") }.is_transient());
        assert_eq!(SinkError::Broker("x".into()).retry_after(), None);
    }

    #[test]
    fn excerpts_are_one_line_of_at_most_300_characters() {
        assert_eq!(excerpt(b"  {\"error\":\n\t\"bad sku\"}\r\n"), "{\"error\": \"bad sku\"}");
        let long = "é".repeat(1000);
        let cut = excerpt(long.as_bytes());
        assert_eq!(cut.chars().count(), EXCERPT_CHARS);
        assert!(cut.ends_with('…'));
        assert_eq!(excerpt(b"\x1b[31mred\x00"), "[31mred");
        assert_eq!(excerpt(&[0xff, b'o', b'k']), "\u{fffd}ok");
    }

    /// A real receiver on 127.0.0.1: records what arrives and answers as each path says.
    mod receiver {
        use axum::Router;
        use axum::body::Bytes;
        use axum::extract::State;
        use axum::http::{HeaderMap, Method, StatusCode, Uri};
        use axum::response::IntoResponse;
        use axum::routing::any;
        use std::sync::{Arc, Mutex};

        #[derive(Debug, Clone)]
        pub struct Received {
            pub method: Method,
            pub uri: Uri,
            pub headers: HeaderMap,
            pub body: Bytes,
        }

        pub type Log = Arc<Mutex<Vec<Received>>>;

        async fn record(State(log): State<Log>, method: Method, uri: Uri, headers: HeaderMap, body: Bytes) -> impl IntoResponse {
            log.lock().unwrap().push(Received { method, uri: uri.clone(), headers, body });
            match uri.path() {
                "/down" => (StatusCode::INTERNAL_SERVER_ERROR, [("retry-after", "x")], "database unavailable".to_string()).into_response(),
                "/busy" => (StatusCode::TOO_MANY_REQUESTS, [("retry-after", "2")], "slow down").into_response(),
                "/reject" => {
                    let detail = format!(
                        "{{\"errors\": [{{\"field\": \"lines[0].sku\", \"message\": \"unknown SKU\"}}], \"trace\": \"{}\"}}",
                        "x".repeat(2000)
                    );
                    (StatusCode::UNPROCESSABLE_ENTITY, detail).into_response()
                }
                "/slow" => {
                    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
                    StatusCode::OK.into_response()
                }
                _ => (StatusCode::CREATED, "{\"id\": \"SO-1\"}").into_response(),
            }
        }

        /// The receiver's address and what it has received.
        pub async fn start() -> (String, Log) {
            let log = Log::default();
            let app = Router::new().fallback(any(record)).with_state(log.clone());
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
            (format!("http://{addr}"), log)
        }
    }

    fn sink(sink_yaml: &str) -> HttpSink {
        HttpSink::start(target(sink_yaml)).unwrap()
    }

    #[tokio::test]
    async fn a_real_server_receives_the_body_and_headers_on_the_rendered_url() {
        let (base, log) = receiver::start().await;
        let s = sink(&format!(
            "    url: '{base}/orders/{{$.order_id}}?token=${{ERP_TOKEN}}'\n    method: PUT\n    headers:\n      X-Tenant: '{{channel}}-eu'\n      Authorization: 'Bearer ${{ERP_TOKEN}}'\n"
        ));
        assert_eq!(s.describe(), format!("PUT {base}/orders/{{$.order_id}}"), "no query string, so no token");
        let out = output(serde_json::json!({"order_id": "SO 1001", "total": {"amount": "21.67", "currency": "USD"}}), Some("shopify:1001"));
        s.write(&out).await.unwrap();
        s.flush().await.unwrap();
        let got = log.lock().unwrap().clone();
        assert_eq!(got.len(), 1);
        let r = &got[0];
        assert_eq!(r.method, axum::http::Method::PUT);
        assert_eq!(r.uri.path(), "/orders/SO%201001");
        assert_eq!(r.uri.query(), Some("token=s3cret-token"));
        let h = |n: &str| r.headers.get(n).and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
        assert_eq!(h("idempotency-key"), "shopify:1001");
        assert_eq!(h("x-correlation-id"), "shopify:1001");
        assert_eq!(h("x-tenant"), "shopify-eu");
        assert_eq!(h("authorization"), "Bearer s3cret-token");
        assert_eq!(h("content-type"), "application/json");
        assert!(h("user-agent").starts_with("switchyard/"));
        let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(body, serde_json::json!({"order_id": "SO 1001", "total": {"amount": "21.67", "currency": "USD"}}), "the payload alone");

        // The envelope format, another idempotency header; no key, no header.
        let s = sink(&format!("    url: '{base}/orders'\n    format: envelope\n    idempotency_header: X-Request-Id\n"));
        s.write(&output(serde_json::json!({"order_id": 2}), Some("k-2"))).await.unwrap();
        s.write(&output(serde_json::json!({"order_id": 3}), None)).await.unwrap();
        let got = log.lock().unwrap().clone();
        assert_eq!(got[1].method, axum::http::Method::POST);
        assert_eq!(got[1].headers["x-request-id"], "k-2");
        assert!(got[1].headers.get("idempotency-key").is_none());
        assert!(got[2].headers.get("x-request-id").is_none());
        let body: serde_json::Value = serde_json::from_slice(&got[1].body).unwrap();
        assert_eq!(
            (&body["payload"], &body["metadata"]["correlation_id"]),
            (&serde_json::json!({"order_id": 2}), &serde_json::json!("shopify:1001"))
        );
    }

    #[tokio::test]
    async fn a_500_is_transient() {
        let (base, _) = receiver::start().await;
        let e = sink(&format!("    url: '{base}/down?sig=s3cret'\n")).write(&output(serde_json::json!({}), None)).await.unwrap_err();
        let (transient, retry_after, status, message) = delivery(&e);
        assert!(transient);
        assert_eq!((retry_after, status), (None, Some(500)), "an unreadable Retry-After is no wait");
        assert_eq!(message, format!("POST {base}/down answered 500 Internal Server Error: database unavailable"));
    }

    #[tokio::test]
    async fn a_429_with_retry_after_is_transient_with_the_wait() {
        let (base, _) = receiver::start().await;
        let e = sink(&format!("    url: '{base}/busy'\n")).write(&output(serde_json::json!({}), None)).await.unwrap_err();
        assert!(e.is_transient());
        assert_eq!(e.retry_after(), Some(Duration::from_secs(2)));
        assert_eq!(e.to_string(), format!("POST {base}/busy answered 429 Too Many Requests (asked to wait 2s): slow down"));
    }

    #[tokio::test]
    async fn a_422_is_permanent_with_an_excerpt_of_the_body() {
        let (base, _) = receiver::start().await;
        let e = sink(&format!("    url: '{base}/reject'\n")).write(&output(serde_json::json!({}), None)).await.unwrap_err();
        let (transient, retry_after, status, message) = delivery(&e);
        assert!(!transient);
        assert_eq!((retry_after, status), (None, Some(422)));
        let prefix = format!("POST {base}/reject answered 422 Unprocessable Entity: ");
        assert!(message.starts_with(&prefix), "{message}");
        let quoted = &message[prefix.len()..];
        assert!(quoted.starts_with("{\"errors\": [{\"field\": \"lines[0].sku\", \"message\": \"unknown SKU\"}]"), "{quoted}");
        assert_eq!(quoted.chars().count(), EXCERPT_CHARS);
    }

    #[tokio::test]
    async fn a_receiver_slower_than_the_timeout_is_a_transient_timeout() {
        let (base, log) = receiver::start().await;
        let started = std::time::Instant::now();
        let e =
            sink(&format!("    url: '{base}/slow'\n    timeout: 300ms\n")).write(&output(serde_json::json!({}), None)).await.unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(2), "gave up at the timeout: {:?}", started.elapsed());
        let (transient, _, status, message) = delivery(&e);
        assert!(transient);
        assert_eq!(status, None);
        assert_eq!(message, format!("POST {base}/slow: no answer within 300ms"));
        assert_eq!(log.lock().unwrap().len(), 1, "the request did arrive");
    }

    #[tokio::test]
    async fn a_port_with_nothing_listening_is_a_transient_connection_error() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let e = sink(&format!("    url: 'http://127.0.0.1:{port}/orders?key=s3cret'\n"))
            .write(&output(serde_json::json!({}), None))
            .await
            .unwrap_err();
        let (transient, _, status, message) = delivery(&e);
        assert!(transient);
        assert_eq!(status, None);
        assert!(message.starts_with(&format!("POST http://127.0.0.1:{port}/orders: cannot connect (")), "{message}");
        assert!(message.to_lowercase().contains("refused"), "{message}");
        assert!(!message.contains("s3cret"));
    }

    #[tokio::test]
    async fn a_redirect_is_not_followed() {
        let (base, log) = receiver::start().await;
        // The fallback answers 201 to everything, so a followed redirect would pass.
        let app = axum::Router::new()
            .fallback(|| async { (axum::http::StatusCode::MOVED_PERMANENTLY, [("location", "http://127.0.0.1:9/new?sig=s3cret")]) });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        let e = sink(&format!("    url: 'http://{addr}/old'\n")).write(&output(serde_json::json!({}), None)).await.unwrap_err();
        assert!(!e.is_transient());
        assert!(
            e.to_string().contains("answered 301 Moved Permanently; redirects are not followed") && !e.to_string().contains("s3cret"),
            "{e}"
        );
        assert!(log.lock().unwrap().is_empty() && base.starts_with("http://"));
    }
}
