//! The `http_poll` source: a scheduled GET of a channel's API for what changed since the last
//! look (Amazon SP-API `getOrders` with `LastUpdatedAfter`, Shopify `orders.json` with
//! `updated_at_min`), page after page (a next-page token, or the `Link: <...>; rel="next"` header).
//!
//! The cursor (the greatest value of the records' cursor field seen so far, and the ids of the
//! records at exactly that value) lives in the store and is written in the same commit as the
//! records it covers: a crash before that commit polls the same window again with nothing
//! stored from it, a crash after finds both. APIs take the cursor inclusively, so the records at
//! the cursor come back on the next poll: their ids are remembered, and they are not taken twice.

use crate::build::{BuildContext, Diags};
use crate::config::{DiagCode, Spanned};
use crate::doc::Doc;
use crate::jsonpath::{CompiledPath, Scope};
use crate::sink::http_auth::{HttpSinkAuthConfig, SinkAuth};
use indexmap::IndexMap;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use schemars::JsonSchema;
use serde::Deserialize;
use std::time::Duration;

/// Pages one poll may read, at most: a runaway pagination stops here (and is said).
pub const MAX_PAGES: usize = 1000;

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HttpPollSourceConfig {
    /// What to GET, e.g. `${AMAZON_SP_API}/orders/v0/orders`.
    pub url: Spanned<String>,
    /// Query parameters sent with every poll, e.g. `MarketplaceIds: ATVPDKIKX0DER`.
    #[serde(default)]
    pub query: IndexMap<String, Spanned<String>>,
    /// Request headers, e.g. `x-amz-access-token: ${env:AMAZON_TOKEN}` (sent as sensitive).
    #[serde(default)]
    pub headers: IndexMap<String, Spanned<String>>,
    /// `bearer:`, `basic:` or `oauth2:`, as for the `http` sink.
    #[serde(default)]
    pub auth: Option<Spanned<HttpSinkAuthConfig>>,
    /// How often to poll (default `60s`).
    #[serde(default)]
    pub every: Option<Spanned<String>>,
    /// How long one request may take (default `30s`).
    #[serde(default)]
    pub timeout: Option<Spanned<String>>,
    /// Where the records are in a page, e.g. `$.payload.Orders[*]` (Amazon) or `$.orders[*]`
    /// (Shopify). Each one becomes a message.
    pub records: Spanned<String>,
    pub cursor: CursorConfig,
    /// How to get the next page; without it, one page per poll.
    #[serde(default)]
    pub next_page: Option<NextPageConfig>,
}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CursorConfig {
    /// The query parameter that carries the cursor, e.g. `LastUpdatedAfter`, `updated_at_min`.
    pub param: Spanned<String>,
    /// Each record's value the cursor moves to (the greatest seen), e.g. `$.LastUpdateDate`.
    /// Dates are compared as instants, numbers as numbers.
    pub field: Spanned<String>,
    /// Each record's id, e.g. `$.AmazonOrderId`: a record at exactly the cursor (sent again by
    /// the next poll) is not taken twice.
    pub id: Spanned<String>,
    /// The cursor of the very first poll, e.g. `2026-11-01T00:00:00Z`.
    pub start: Spanned<String>,
}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NextPageConfig {
    /// Where the next page's token is in a page, e.g. `$.payload.NextToken` (Amazon).
    #[serde(default)]
    pub token: Option<Spanned<String>>,
    /// The query parameter that sends it back, e.g. `NextToken`. The next page is asked with the
    /// `query:` parameters and the token, without the cursor.
    #[serde(default)]
    pub param: Option<Spanned<String>>,
    /// `true`: follow the `Link: <url>; rel="next"` header as it is (Shopify, GitHub).
    #[serde(default)]
    pub link_header: Option<bool>,
}

/// How the next page is found.
#[derive(Debug)]
enum NextPage {
    None,
    Token { path: CompiledPath, param: String },
    Link,
}

/// A checked `http_poll` source.
pub struct PollPlan {
    url: reqwest::Url,
    /// The URL without query or credentials: what messages and the cursor's key say.
    pub shown: String,
    query: Vec<(String, String)>,
    headers: HeaderMap,
    pub auth: Option<SinkAuth>,
    pub every: Duration,
    pub timeout: Duration,
    records: CompiledPath,
    cursor_param: String,
    cursor_field: CompiledPath,
    id: CompiledPath,
    pub start: String,
    next: NextPage,
}

impl std::fmt::Debug for PollPlan {
    // Headers and credentials stay out.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PollPlan(GET {} every {:?})", self.shown, self.every)
    }
}

/// Where the poll is: the greatest cursor value taken, and the ids of the records at it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PollCursor {
    pub value: String,
    pub at_value: Vec<String>,
}

/// What one page gave.
pub struct Page {
    /// Records new to the cursor: their bytes, with their cursor value and id.
    pub records: Vec<(Vec<u8>, String, String)>,
    /// Records the cursor had already taken (sent again by an inclusive API).
    pub skipped: usize,
    /// Records without a cursor value or an id: taken, but they do not move the cursor.
    pub unkeyed: usize,
}

impl PollPlan {
    pub fn build(c: &HttpPollSourceConfig, cx: &BuildContext, diags: &mut Diags) -> Option<PollPlan> {
        let url = match reqwest::Url::parse(c.url.value.trim()) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host_str().is_some() => Some(u),
            _ => {
                diags.push(
                    cx.diag(DiagCode::InvalidValue, c.url.span, "source.url", format!("`{}` is not an http(s) URL", c.url.shown()))
                        .expected("e.g. `https://sellingpartnerapi-na.amazon.com/orders/v0/orders`"),
                );
                None
            }
        };
        let mut headers = HeaderMap::new();
        for (name, value) in &c.headers {
            let key = format!("source.headers.{name}");
            match (HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_str(&value.value)) {
                (Ok(n), Ok(mut v)) => {
                    v.set_sensitive(true);
                    headers.insert(n, v);
                }
                _ => diags.push(
                    cx.diag(DiagCode::InvalidValue, value.span, &key, format!("`{name}` cannot be sent as a header"))
                        .expected("a header name of letters, digits and `-`, and a value without line breaks"),
                ),
            }
        }
        let mut errors = Vec::new();
        let auth = c.auth.as_ref().and_then(|a| SinkAuth::build(a, "source", cx, &mut errors));
        diags.extend(errors);
        let every = match &c.every {
            None => Some(Duration::from_secs(60)),
            Some(e) => diags.take(cx.duration(
                e,
                "source.every",
                Duration::from_millis(100)..=Duration::from_secs(86_400),
                "a duration from 100ms to 1d, e.g. `60s`",
            )),
        };
        let timeout = match &c.timeout {
            None => Some(Duration::from_secs(30)),
            Some(t) => diags.take(cx.duration(
                t,
                "source.timeout",
                Duration::from_millis(100)..=Duration::from_secs(600),
                "a duration such as `30s`",
            )),
        };
        let records = diags.take(cx.jsonpath(&c.records, "source.records"));
        let cursor_field = diags.take(cx.jsonpath(&c.cursor.field, "source.cursor.field"));
        let id = diags.take(cx.jsonpath(&c.cursor.id, "source.cursor.id"));
        let next = match &c.next_page {
            None => Some(NextPage::None),
            Some(n) => match (&n.token, &n.param, n.link_header.unwrap_or(false)) {
                (Some(t), Some(p), false) => {
                    diags.take(cx.jsonpath(t, "source.next_page.token")).map(|path| NextPage::Token { path, param: p.value.clone() })
                }
                (None, None, true) => Some(NextPage::Link),
                _ => {
                    let span = n.token.as_ref().or(n.param.as_ref()).map_or(c.records.span, |s| s.span);
                    diags.push(
                        cx.diag(
                            DiagCode::InvalidValue,
                            span,
                            "source.next_page",
                            "the next page is named in more than one way, or half of one",
                        )
                        .expected("`token:` and `param:` together (a next-page token), or `link_header: true`"),
                    );
                    None
                }
            },
        };
        Some(PollPlan {
            shown: crate::sink::http::without_secrets(url.as_ref()?.as_str()),
            url: url?,
            query: c.query.iter().map(|(k, v)| (k.clone(), v.value.clone())).collect(),
            headers,
            auth,
            every: every?,
            timeout: timeout?,
            records: records?,
            cursor_param: c.cursor.param.value.clone(),
            cursor_field: cursor_field?,
            id: id?,
            start: c.cursor.start.value.clone(),
            next: next?,
        })
    }

    /// The polled URL with the `query:` parameters and one more.
    fn url_with(&self, param: &str, value: &str) -> reqwest::Url {
        let mut u = self.url.clone();
        u.query_pairs_mut().extend_pairs(&self.query).append_pair(param, value);
        u
    }

    /// The URL of the first page for a cursor.
    pub fn first_url(&self, cursor: &str) -> reqwest::Url {
        self.url_with(&self.cursor_param, cursor)
    }

    /// The next page's URL, from a page and its `Link` header.
    pub fn next_url(&self, page: &Doc, link: Option<&str>) -> Option<reqwest::Url> {
        match &self.next {
            NextPage::None => None,
            NextPage::Token { path, param } => {
                let token = path.first(Scope::root(page)).and_then(Doc::as_str).filter(|t| !t.is_empty())?;
                Some(self.url_with(param, token))
            }
            // Only on the same origin: the credentials go with the request.
            NextPage::Link => link.and_then(next_link).and_then(|l| self.url.join(&l).ok()).filter(|u| self.same_origin(u)),
        }
    }

    /// The polled URL, without `query:` or cursor.
    pub fn base_url(&self) -> &reqwest::Url {
        &self.url
    }

    /// Whether `u` is on the polled URL's scheme, host and port.
    pub fn same_origin(&self, u: &reqwest::Url) -> bool {
        u.origin() == self.url.origin()
    }

    /// The request headers (credentials added by the caller).
    pub fn headers(&self) -> HeaderMap {
        self.headers.clone()
    }

    /// The records of a page that the cursor has not taken.
    pub fn records(&self, page: &Doc, cursor: &PollCursor) -> Page {
        let mut found = Vec::new();
        self.records.all(Scope::root(page), &mut found);
        let mut out = Page { records: Vec::with_capacity(found.len()), skipped: 0, unkeyed: 0 };
        for r in found {
            let scope = Scope::root(r);
            let value = self.cursor_field.first(scope).and_then(text_of);
            let id = self.id.first(scope).and_then(text_of);
            match (value, id) {
                (Some(v), Some(id)) => {
                    if compare(&v, &cursor.value) == std::cmp::Ordering::Equal && cursor.at_value.contains(&id) {
                        out.skipped += 1;
                    } else {
                        out.records.push((r.to_json_bytes(), v, id));
                    }
                }
                _ => {
                    out.unkeyed += 1;
                    out.records.push((r.to_json_bytes(), String::new(), String::new()));
                }
            }
        }
        out
    }
}

fn text_of(d: &Doc) -> Option<String> {
    match d {
        Doc::String(s) => Some(s.to_string()),
        Doc::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Cursor values in order: as instants when both are RFC 3339 dates, as numbers when both are
/// numbers, else as text.
pub fn compare(a: &str, b: &str) -> std::cmp::Ordering {
    if let (Ok(x), Ok(y)) = (chrono::DateTime::parse_from_rfc3339(a), chrono::DateTime::parse_from_rfc3339(b)) {
        return x.cmp(&y);
    }
    if let (Ok(x), Ok(y)) = (a.parse::<rust_decimal::Decimal>(), b.parse::<rust_decimal::Decimal>()) {
        return x.cmp(&y);
    }
    a.cmp(b)
}

/// The cursor after taking these records (value and id each; unkeyed ones have neither).
pub fn advance(cursor: &PollCursor, taken: &[(String, String)]) -> PollCursor {
    let mut next = cursor.clone();
    for (value, id) in taken.iter().filter(|(v, _)| !v.is_empty()) {
        match compare(value, &next.value) {
            std::cmp::Ordering::Greater => {
                next.value = value.clone();
                next.at_value = vec![id.clone()];
            }
            std::cmp::Ordering::Equal if !next.at_value.contains(id) => next.at_value.push(id.clone()),
            _ => {}
        }
    }
    next
}

/// The `rel="next"` target of a `Link` header (RFC 8288).
pub fn next_link(header: &str) -> Option<String> {
    header.split(',').find_map(|part| {
        let (target, params) = part.trim().split_once(';')?;
        let target = target.trim().strip_prefix('<')?.strip_suffix('>')?;
        let is_next = params.split(';').any(|p| {
            let p = p.trim();
            p.strip_prefix("rel=").is_some_and(|v| v.trim_matches('"').split_whitespace().any(|r| r.eq_ignore_ascii_case("next")))
        });
        is_next.then(|| target.to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cursor_moves_to_the_greatest_instant_and_remembers_who_is_at_it() {
        let c = PollCursor { value: "2026-11-01T00:00:00Z".into(), at_value: vec![] };
        let taken = vec![
            ("2026-11-02T10:00:00-05:00".to_string(), "A".to_string()),
            ("2026-11-02T15:00:00Z".to_string(), "B".to_string()),
            ("2026-11-02T14:59:59Z".to_string(), "C".to_string()),
            (String::new(), String::new()),
        ];
        let next = advance(&c, &taken);
        // 10:00-05:00 is 15:00Z: A and B are at the cursor.
        assert_eq!(compare("2026-11-02T10:00:00-05:00", "2026-11-02T15:00:00Z"), std::cmp::Ordering::Equal);
        assert_eq!(next.value, "2026-11-02T10:00:00-05:00");
        assert_eq!(next.at_value, ["A", "B"]);
        assert_eq!(compare("9", "10"), std::cmp::Ordering::Less, "numbers as numbers");
    }

    #[test]
    fn link_headers_give_their_next_target() {
        let h = r#"<https://shop.example/admin/api/2024-10/orders.json?page_info=abc&limit=50>; rel="previous", <https://shop.example/admin/api/2024-10/orders.json?page_info=def&limit=50>; rel="next""#;
        assert_eq!(next_link(h).as_deref(), Some("https://shop.example/admin/api/2024-10/orders.json?page_info=def&limit=50"));
        assert_eq!(next_link(r#"<https://x/a>; rel="previous""#), None);
    }
}
