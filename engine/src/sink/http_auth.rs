//! How the `http` sink authenticates: a bearer token, basic credentials, or OAuth2 client
//! credentials (RFC 6749 §4.4) with the token cached until shortly before it expires and fetched
//! again when the receiver answers 401. Secret values are marked sensitive in every header and
//! never put in a message.
//!
//! OAuth2 is written here rather than taken from the `oauth2` crate: the client-credentials
//! grant is one form POST, and that crate brings its own (older) reqwest.

use super::SinkError;
use crate::build::BuildContext;
use crate::config::{DiagCode, Diagnostic, Spanned};
use base64::Engine;
use reqwest::header::HeaderValue;
use schemars::JsonSchema;
use serde::Deserialize;
use std::time::{Duration, Instant};

/// A token is fetched again this long before the expiry its issuer gave.
const EXPIRY_MARGIN: Duration = Duration::from_secs(30);
/// When the token endpoint gives no `expires_in`.
const DEFAULT_TOKEN_LIFE: Duration = Duration::from_secs(300);

/// `auth:` of an `http` sink: exactly one of its keys.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HttpSinkAuthConfig {
    /// `Authorization: Bearer <token>`, e.g. `${env:ERP_TOKEN}`.
    #[serde(default)]
    pub bearer: Option<Spanned<String>>,
    /// `Authorization: Basic ...` from a user name and a password.
    #[serde(default)]
    pub basic: Option<BasicAuthConfig>,
    /// OAuth2 client credentials: a token from `token_url`, cached, fetched again before it
    /// expires and when the receiver answers 401.
    #[serde(default)]
    pub oauth2: Option<OAuth2Config>,
}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BasicAuthConfig {
    pub username: Spanned<String>,
    pub password: Spanned<String>,
}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OAuth2Config {
    /// The token endpoint, e.g. `https://login.microsoftonline.com/<tenant>/oauth2/v2.0/token`.
    pub token_url: Spanned<String>,
    pub client_id: Spanned<String>,
    /// e.g. `${env:ERP_CLIENT_SECRET}` or `${file:/run/secrets/erp}`.
    pub client_secret: Spanned<String>,
    /// Space-separated scopes, e.g. `https://api.businesscentral.dynamics.com/.default`.
    #[serde(default)]
    pub scope: Option<Spanned<String>>,
    /// Some issuers (Auth0) want the API named.
    #[serde(default)]
    pub audience: Option<Spanned<String>>,
    /// How the client authenticates to the token endpoint: `basic` (default, RFC 6749's
    /// `client_secret_basic`) or `body` (`client_secret_post`).
    #[serde(default)]
    pub client_auth: Option<ClientAuth>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuth {
    Basic,
    Body,
}

/// A checked `auth:`. Its `Debug` shows no secret.
pub enum SinkAuth {
    /// The whole `Authorization` value (bearer or basic), sensitive.
    Fixed(HeaderValue),
    OAuth2(Box<OAuth2>),
}

impl std::fmt::Debug for SinkAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SinkAuth::Fixed(_) => write!(f, "fixed credentials"),
            SinkAuth::OAuth2(o) => write!(f, "OAuth2 client credentials from {}", o.token_url),
        }
    }
}

pub struct OAuth2 {
    token_url: reqwest::Url,
    client_id: String,
    client_secret: String,
    scope: Option<String>,
    audience: Option<String>,
    client_auth: ClientAuth,
    cached: tokio::sync::Mutex<Option<Token>>,
    /// Tokens fetched so far (for tests and the status).
    pub fetched: std::sync::atomic::AtomicU64,
}

#[derive(Clone)]
struct Token {
    header: HeaderValue,
    good_until: Instant,
}

fn secret(s: &Spanned<String>, key: &str, cx: &BuildContext, diags: &mut Vec<Diagnostic>) -> Option<String> {
    cx.secret(s, key).map_err(|d| diags.push(d)).ok()
}

fn sensitive(text: &str) -> Option<HeaderValue> {
    let mut v = HeaderValue::from_str(text).ok()?;
    v.set_sensitive(true);
    Some(v)
}

impl SinkAuth {
    /// Checks `auth:` of the sink at `at` (its span: where to point when the choice is wrong).
    pub fn build(a: &Spanned<HttpSinkAuthConfig>, at: &str, cx: &BuildContext, diags: &mut Vec<Diagnostic>) -> Option<SinkAuth> {
        let c = &a.value;
        let chosen = [c.bearer.is_some(), c.basic.is_some(), c.oauth2.is_some()].iter().filter(|x| **x).count();
        if chosen != 1 {
            diags.push(
                cx.diag(
                    DiagCode::InvalidValue,
                    a.span,
                    &format!("{at}.auth"),
                    if chosen == 0 { "`auth:` names no way to authenticate" } else { "`auth:` names more than one way to authenticate" },
                )
                .expected("exactly one of `bearer:`, `basic:`, `oauth2:`"),
            );
            return None;
        }
        let unsendable = |span, key: &str, diags: &mut Vec<Diagnostic>| {
            diags.push(
                cx.diag(DiagCode::InvalidValue, span, key, "the credentials cannot be sent in a header")
                    .expected("text without line breaks"),
            );
        };
        if let Some(t) = &c.bearer {
            let key = format!("{at}.auth.bearer");
            let token = secret(t, &key, cx, diags)?;
            return match sensitive(&format!("Bearer {token}")) {
                Some(v) => Some(SinkAuth::Fixed(v)),
                None => {
                    unsendable(t.span, &key, diags);
                    None
                }
            };
        }
        if let Some(b) = &c.basic {
            let password = secret(&b.password, &format!("{at}.auth.basic.password"), cx, diags)?;
            let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{}:{password}", b.username.value));
            return match sensitive(&format!("Basic {encoded}")) {
                Some(v) => Some(SinkAuth::Fixed(v)),
                None => {
                    unsendable(b.username.span, &format!("{at}.auth.basic"), diags);
                    None
                }
            };
        }
        let o = c.oauth2.as_ref()?;
        let key = format!("{at}.auth.oauth2.token_url");
        let token_url = match reqwest::Url::parse(o.token_url.value.trim()) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host_str().is_some() => Some(u),
            _ => {
                diags.push(
                    cx.diag(DiagCode::InvalidValue, o.token_url.span, &key, format!("`{}` is not an http(s) URL", o.token_url.shown()))
                        .expected("the token endpoint, e.g. `https://login.example.com/oauth2/token`"),
                );
                None
            }
        };
        let client_secret = secret(&o.client_secret, &format!("{at}.auth.oauth2.client_secret"), cx, diags);
        Some(SinkAuth::OAuth2(Box::new(OAuth2 {
            token_url: token_url?,
            client_id: o.client_id.value.clone(),
            client_secret: client_secret?,
            scope: o.scope.as_ref().map(|s| s.value.clone()),
            audience: o.audience.as_ref().map(|s| s.value.clone()),
            client_auth: o.client_auth.unwrap_or(ClientAuth::Basic),
            cached: tokio::sync::Mutex::new(None),
            fetched: Default::default(),
        })))
    }

    /// The `Authorization` value for the next request.
    pub async fn header(&self, client: &reqwest::Client) -> Result<HeaderValue, SinkError> {
        match self {
            SinkAuth::Fixed(v) => Ok(v.clone()),
            SinkAuth::OAuth2(o) => o.token(client).await,
        }
    }

    /// The receiver answered 401 to `used`: a cached OAuth2 token that is still `used` is
    /// dropped, and whether asking again may help (only with OAuth2).
    pub async fn rejected(&self, used: &HeaderValue) -> bool {
        match self {
            SinkAuth::Fixed(_) => false,
            SinkAuth::OAuth2(o) => {
                let mut cached = o.cached.lock().await;
                if cached.as_ref().is_some_and(|t| t.header == *used) {
                    *cached = None;
                }
                true
            }
        }
    }
}

/// How a request with credentials went: `Credentials` when none could be had (the OAuth2 token
/// endpoint failed), `Send` when the request itself failed.
pub enum Sent {
    Answer(reqwest::Response),
    Credentials(SinkError),
    Send(reqwest::Error),
}

/// Sends `request()` with `auth`'s credentials. With OAuth2, a 401 may mean the token was revoked
/// or expired early: the token is dropped and the request sent once more with a new one.
pub async fn send_authorized(auth: Option<&SinkAuth>, client: &reqwest::Client, request: impl Fn() -> reqwest::RequestBuilder) -> Sent {
    let mut tries_left = 2;
    loop {
        tries_left -= 1;
        let credentials = match auth {
            Some(a) => match a.header(client).await {
                Ok(v) => Some(v),
                Err(e) => return Sent::Credentials(e),
            },
            None => None,
        };
        let mut r = request();
        if let Some(v) = &credentials {
            // `headers` replaces: the credentials win over an Authorization header given too.
            r = r.headers(reqwest::header::HeaderMap::from_iter([(reqwest::header::AUTHORIZATION, v.clone())]));
        }
        let response = match r.send().await {
            Ok(r) => r,
            Err(e) => return Sent::Send(e),
        };
        if response.status() == reqwest::StatusCode::UNAUTHORIZED
            && tries_left > 0
            && let (Some(a), Some(used)) = (auth, &credentials)
            && a.rejected(used).await
        {
            tracing::info!("the receiver answered 401: fetching a new OAuth2 token and sending again");
            continue;
        }
        return Sent::Answer(response);
    }
}

impl OAuth2 {
    fn shown_url(&self) -> String {
        super::http::without_secrets(self.token_url.as_str())
    }

    /// The cached token, or a new one. One fetch at a time: the others wait for its token.
    async fn token(&self, client: &reqwest::Client) -> Result<HeaderValue, SinkError> {
        let mut cached = self.cached.lock().await;
        if let Some(t) = cached.as_ref()
            && Instant::now() < t.good_until
        {
            return Ok(t.header.clone());
        }
        let t = self.fetch(client).await?;
        *cached = Some(t.clone());
        Ok(t.header)
    }

    async fn fetch(&self, client: &reqwest::Client) -> Result<Token, SinkError> {
        let failed = |what: String, transient: bool| SinkError::Delivery {
            message: format!("cannot get an OAuth2 token from {}: {what}", self.shown_url()),
            transient,
            retry_after: None,
            status: None,
        };
        let mut pairs = vec![("grant_type", "client_credentials")];
        pairs.extend(self.scope.as_deref().map(|s| ("scope", s)));
        pairs.extend(self.audience.as_deref().map(|a| ("audience", a)));
        let mut request = client.post(self.token_url.clone()).header(reqwest::header::ACCEPT, "application/json");
        match self.client_auth {
            ClientAuth::Basic => {
                // RFC 6749 §2.3.1: the id and secret are form-encoded before the basic encoding.
                let enc = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
                let pair = format!("{}:{}", enc(&self.client_id), enc(&self.client_secret));
                let value = sensitive(&format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(pair)))
                    .ok_or_else(|| failed("the client id cannot be sent".into(), false))?;
                request = request.header(reqwest::header::AUTHORIZATION, value);
            }
            ClientAuth::Body => pairs.extend([("client_id", self.client_id.as_str()), ("client_secret", self.client_secret.as_str())]),
        }
        let form = form_urlencoded::Serializer::new(String::new()).extend_pairs(pairs).finish();
        let response = request
            .header(reqwest::header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(form)
            .send()
            .await
            .map_err(|e| failed(format!("the request failed ({})", e.without_url()), true))?;
        let status = response.status();
        let body = response.bytes().await.map_err(|e| failed(format!("the answer could not be read ({})", e.without_url()), true))?;
        if !status.is_success() {
            // The error code the issuer gives (`invalid_client`, ...) tells the analyst what to fix.
            let code = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
                .unwrap_or_else(|| super::http::excerpt(&body));
            return Err(failed(format!("answered {status} ({code})"), true));
        }
        #[derive(Deserialize)]
        struct Answer {
            access_token: String,
            #[serde(default)]
            token_type: Option<String>,
            /// A number, or a string of one (Azure AD v1 sends `"3599"`).
            #[serde(default)]
            expires_in: Option<serde_json::Value>,
        }
        let a: Answer = serde_json::from_slice(&body).map_err(|_| failed("the answer has no `access_token`".into(), true))?;
        if a.token_type.as_deref().is_some_and(|t| !t.eq_ignore_ascii_case("bearer")) {
            return Err(failed(format!("the token is of type `{}`, not a bearer token", a.token_type.unwrap_or_default()), false));
        }
        let seconds = match &a.expires_in {
            Some(serde_json::Value::Number(n)) => n.as_u64(),
            Some(serde_json::Value::String(s)) => s.trim().parse().ok(),
            _ => None,
        };
        // A day at most: a longer life is refreshed daily all the same (and never overflows).
        let life = seconds.map_or(DEFAULT_TOKEN_LIFE, |s| Duration::from_secs(s.min(86_400)));
        let header =
            sensitive(&format!("Bearer {}", a.access_token)).ok_or_else(|| failed("the token cannot be sent in a header".into(), true))?;
        self.fetched.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // Fetched again a little before the issuer's expiry (half the life for short ones).
        Ok(Token { header, good_until: Instant::now() + life.saturating_sub(EXPIRY_MARGIN.min(life / 2)) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A token endpoint giving tokens that live `life` seconds; returns its URL.
    async fn issuer(life: u64, issued: Arc<AtomicU32>) -> reqwest::Url {
        let app = axum::Router::new().route(
            "/token",
            axum::routing::post(move || {
                let n = issued.fetch_add(1, Ordering::SeqCst) + 1;
                async move { axum::Json(serde_json::json!({"access_token": format!("t{n}"), "token_type": "bearer", "expires_in": life})) }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/token", listener.local_addr().unwrap()).parse().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        url
    }

    fn oauth(token_url: reqwest::Url) -> SinkAuth {
        SinkAuth::OAuth2(Box::new(OAuth2 {
            token_url,
            client_id: "c".into(),
            client_secret: "s".into(),
            scope: None,
            audience: None,
            client_auth: ClientAuth::Body,
            cached: Default::default(),
            fetched: Default::default(),
        }))
    }

    #[tokio::test]
    async fn a_token_is_reused_until_shortly_before_it_expires_and_dropped_on_401() {
        let issued = Arc::new(AtomicU32::new(0));
        let auth = oauth(issuer(2, issued.clone()).await);
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::new();
        let first = auth.header(&client).await.unwrap();
        assert_eq!(auth.header(&client).await.unwrap(), first, "cached");
        assert_eq!(issued.load(Ordering::SeqCst), 1);
        assert!(first.is_sensitive());
        // A 2 s token is used for half its life, then fetched again.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let second = auth.header(&client).await.unwrap();
        assert_ne!(second, first);
        assert_eq!(issued.load(Ordering::SeqCst), 2);
        // A 401 to an older token does not drop the newer one; a 401 to the current one does.
        assert!(auth.rejected(&first).await);
        assert_eq!(auth.header(&client).await.unwrap(), second);
        assert!(auth.rejected(&second).await);
        assert_ne!(auth.header(&client).await.unwrap(), second);
        assert_eq!(issued.load(Ordering::SeqCst), 3);
        assert!(format!("{auth:?}").starts_with("OAuth2 client credentials from http://127.0.0.1:"), "Debug shows the issuer only");
    }
}
