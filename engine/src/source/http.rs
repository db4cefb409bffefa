//! The `http` source: partners POST messages (marketplace webhooks, a POS pushing sales) to a
//! path of the engine's HTTP server. The sender proves who it is (an HMAC signature over the raw
//! body, an API key or a bearer token, compared in constant time); the answer is `202` with the
//! message and correlation ids only once the message is committed to the pipeline's inbox, so
//! a sender that got a 202 can forget the message. See `runtime::http_server` for the server.

use crate::build::{BuildContext, Diags};
use crate::config::{DiagCode, Spanned};
use crate::runtime::delivery::RateLimitConfig;
use hmac::{KeyInit, Mac};
use indexmap::IndexMap;
use schemars::JsonSchema;
use serde::Deserialize;
use subtle::ConstantTimeEq;

/// Default largest body: Shopify's largest order webhooks are a few hundred KiB.
pub const DEFAULT_MAX_BODY: usize = 1024 * 1024;

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HttpSourceConfig {
    /// The path partners POST to, e.g. `/ingest/shopify/orders`. One pipeline per path.
    pub path: Spanned<String>,
    /// How a sender proves who it is: `hmac`, `api_key` or `bearer`, or `anonymous: true` to
    /// take requests from anyone who can reach the port.
    pub auth: Spanned<HttpAuthConfig>,
    /// The largest body taken, e.g. `256KiB`, `2MiB` (default `1MiB`). A larger one is answered
    /// `413` and not read further.
    #[serde(default)]
    pub max_body: Option<Spanned<String>>,
    /// Requests per partner, e.g. `{rate: 40/s, burst: 80}`. Past it: `429` with `Retry-After`
    /// (webhook senders try again later), nothing stored.
    #[serde(default)]
    pub rate_limit: Option<RateLimitConfig>,
    /// The request header that names the partner for the rate limit, e.g.
    /// `X-Shopify-Shop-Domain`. Default: the name of the API key or token that authenticated it,
    /// else the `hmac` partner, else the sender's address.
    #[serde(default)]
    pub partner_header: Option<Spanned<String>>,
    /// `true`: the pipeline's `validate` steps run before the answer, and a message that fails
    /// them is answered `422` with every violation (JSON pointer and message) and not stored.
    /// Default `false`: every well-formed JSON body is taken (`202`) and a violation becomes an
    /// exception record, as for any source.
    #[serde(default)]
    pub reject_invalid: Option<bool>,
}

/// `auth:` of an `http` source: exactly one of its keys.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HttpAuthConfig {
    /// An HMAC-SHA256 signature of the raw body in a header (Shopify, WooCommerce, most
    /// marketplaces' webhooks).
    #[serde(default)]
    pub hmac: Option<HmacConfig>,
    /// A key in a header, one per partner.
    #[serde(default)]
    pub api_key: Option<ApiKeyConfig>,
    /// `Authorization: Bearer <token>`, one token per partner.
    #[serde(default)]
    pub bearer: Option<BearerConfig>,
    /// `true`: no authentication (a test bench, or behind a gateway that checks callers).
    #[serde(default)]
    pub anonymous: Option<bool>,
}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HmacConfig {
    /// The header holding the signature: `X-Shopify-Hmac-Sha256` (Shopify),
    /// `X-WC-Webhook-Signature` (WooCommerce).
    pub header: Spanned<String>,
    /// The shared secret, e.g. `${env:SHOPIFY_WEBHOOK_SECRET}` or `${file:/run/secrets/shopify}`.
    pub secret: Spanned<String>,
    /// Older secrets still accepted while senders move to the new one (rotation).
    #[serde(default)]
    pub previous_secrets: Vec<Spanned<String>>,
    /// How the signature is written: `base64` (default; Shopify, WooCommerce) or `hex`.
    #[serde(default)]
    pub encoding: Option<SignatureEncoding>,
    /// Text before the signature in the header, e.g. `sha256=` (GitHub-style senders).
    #[serde(default)]
    pub prefix: Option<Spanned<String>>,
    /// The partner's name, for the rate limit and the records (default: the pipeline's channel).
    #[serde(default)]
    pub partner: Option<Spanned<String>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum SignatureEncoding {
    Base64,
    Hex,
}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyConfig {
    /// The header holding the key (default `X-Api-Key`).
    #[serde(default)]
    pub header: Option<Spanned<String>>,
    /// Partner name -> its key, e.g. `acme-pos: ${env:ACME_POS_KEY}`.
    pub keys: IndexMap<String, Spanned<String>>,
}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BearerConfig {
    /// Partner name -> its token, e.g. `walmart: ${env:WALMART_TOKEN}`.
    pub tokens: IndexMap<String, Spanned<String>>,
}

/// How requests are authenticated, secrets as bytes. Its `Debug` shows no secret.
enum Auth {
    Hmac {
        header: http::HeaderName,
        keys: Vec<Vec<u8>>,
        encoding: SignatureEncoding,
        prefix: String,
        partner: String,
    },
    /// By a header's value (API keys) or the bearer token: partner name and secret.
    Secret {
        header: http::HeaderName,
        bearer: bool,
        secrets: Vec<(String, Vec<u8>)>,
    },
    Anonymous,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Auth::Hmac { header, .. } => write!(f, "hmac({header})"),
            Auth::Secret { header, bearer: true, .. } => write!(f, "bearer({header})"),
            Auth::Secret { header, .. } => write!(f, "api_key({header})"),
            Auth::Anonymous => write!(f, "anonymous"),
        }
    }
}

/// Why a request was not authenticated: said to the sender (never with a secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthFailure {
    Missing(String),
    Invalid(String),
}

impl AuthFailure {
    pub fn detail(&self) -> &str {
        match self {
            AuthFailure::Missing(s) | AuthFailure::Invalid(s) => s,
        }
    }
}

/// An `http` source, checked and compiled at load.
#[derive(Debug)]
pub struct HttpEndpoint {
    pub path: String,
    auth: Auth,
    pub max_body: usize,
    /// Requests per partner.
    pub limiter: Option<governor::DefaultKeyedRateLimiter<String>>,
    pub rate_described: Option<String>,
    pub partner_header: Option<http::HeaderName>,
    pub reject_invalid: bool,
    /// When the rate limit last forgot idle partners.
    pruned_at: std::sync::Mutex<std::time::Instant>,
}

impl HttpEndpoint {
    pub fn build(c: &HttpSourceConfig, channel: Option<&str>, cx: &BuildContext, diags: &mut Diags) -> Option<HttpEndpoint> {
        let path = c.path.value.trim().to_string();
        let path_ok = path.starts_with('/')
            && path.len() > 1
            && !path.ends_with('/')
            && path.split('/').skip(1).all(|seg| !seg.is_empty() && seg != "." && seg != "..")
            && path.chars().all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '/' | '-' | '_' | '.' | '~'));
        if !path_ok {
            diags.push(
                cx.diag(
                    DiagCode::InvalidValue,
                    c.path.span,
                    "source.path",
                    format!("`{}` is not a path the server can answer on", c.path.shown()),
                )
                .expected("a path starting with `/`, of letters, digits, `-`, `_`, `.` and `/`, e.g. `/ingest/shopify/orders`"),
            );
        }
        let auth = build_auth(&c.auth, channel, cx, diags);
        let max_body = match &c.max_body {
            None => Some(DEFAULT_MAX_BODY),
            Some(s) => match s.value.trim().parse::<bytesize::ByteSize>() {
                Ok(b) if b.as_u64() > 0 && b.as_u64() <= 64 * 1024 * 1024 => Some(b.as_u64() as usize),
                _ => {
                    diags.push(
                        cx.diag(DiagCode::InvalidValue, s.span, "source.max_body", format!("`{}` is not a body size", s.shown()))
                            .expected("a size from 1 byte up to 64MiB, e.g. `256KiB`, `2MiB`"),
                    );
                    None
                }
            },
        };
        let quota = c.rate_limit.as_ref().map(|r| r.quota("source.rate_limit", cx, diags));
        let partner_header = c.partner_header.as_ref().and_then(|h| header_name(h, "source.partner_header", cx, diags));
        let (limiter, rate_described) = match quota {
            Some(None) => return None,
            Some(Some((q, described))) => (Some(governor::RateLimiter::keyed(q)), Some(described)),
            None => (None, None),
        };
        Some(HttpEndpoint {
            path,
            auth: auth?,
            max_body: max_body?,
            limiter,
            rate_described,
            partner_header,
            reject_invalid: c.reject_invalid.unwrap_or(false),
            pruned_at: std::sync::Mutex::new(std::time::Instant::now()),
        })
        .filter(|_| path_ok)
    }

    /// Whether idle partners are due to be forgotten (at most once a minute).
    pub fn prune_due(&self) -> bool {
        let mut at = self.pruned_at.lock().expect("prune time");
        let due = at.elapsed() > std::time::Duration::from_secs(60);
        if due {
            *at = std::time::Instant::now();
        }
        due
    }

    /// Whether the credentials are a signature of the body (else they are checked first).
    pub fn signs_body(&self) -> bool {
        matches!(self.auth, Auth::Hmac { .. })
    }

    /// The headers that carry credentials: never stored with the message nor shown.
    pub fn is_credential(&self, name: &http::HeaderName) -> bool {
        let own = match &self.auth {
            Auth::Hmac { header, .. } | Auth::Secret { header, .. } => header == name,
            Auth::Anonymous => false,
        };
        own || *name == http::header::AUTHORIZATION || *name == http::header::COOKIE || *name == http::header::PROXY_AUTHORIZATION
    }

    /// Checks the request's credentials; the partner it authenticates, when it names one.
    pub fn authenticate(&self, headers: &http::HeaderMap, body: &[u8]) -> Result<Option<String>, AuthFailure> {
        match &self.auth {
            Auth::Anonymous => Ok(None),
            Auth::Hmac { header, keys, encoding, prefix, partner } => {
                let Some(given) = headers.get(header) else {
                    return Err(AuthFailure::Missing(format!("the `{header}` header with the body's signature is missing")));
                };
                let text = given.to_str().unwrap_or("").trim();
                let text = text.strip_prefix(prefix.as_str()).unwrap_or(text);
                let signature = match encoding {
                    SignatureEncoding::Base64 => base64_decode(text),
                    SignatureEncoding::Hex => hex_decode(text),
                };
                let Some(signature) = signature else {
                    return Err(AuthFailure::Invalid(format!("the `{header}` header is not a {encoding:?} signature").to_lowercase()));
                };
                // Every key is tried (rotation); each comparison is constant time.
                let mut good = false;
                for key in keys {
                    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(key).expect("HMAC takes any key length");
                    mac.update(body);
                    good |= mac.verify_slice(&signature).is_ok();
                }
                if good {
                    Ok(Some(partner.clone()))
                } else {
                    Err(AuthFailure::Invalid(format!("the signature in `{header}` does not match the body")))
                }
            }
            Auth::Secret { header, bearer, secrets } => {
                let Some(given) = headers.get(header) else {
                    return Err(AuthFailure::Missing(if *bearer {
                        "an `Authorization: Bearer <token>` header is needed".to_string()
                    } else {
                        format!("the `{header}` header with the API key is missing")
                    }));
                };
                let value = given.as_bytes();
                let value = if *bearer {
                    bearer_token(value)
                        .ok_or_else(|| AuthFailure::Invalid("the `Authorization` header is not `Bearer <token>`".to_string()))?
                } else {
                    value.trim_ascii()
                };
                // Every secret is compared, in constant time each, so timing tells nothing.
                let mut found: Option<&str> = None;
                for (partner, secret) in secrets {
                    if bool::from(secret.as_slice().ct_eq(value)) {
                        found = Some(partner);
                    }
                }
                match found {
                    Some(p) => Ok(Some(p.to_string())),
                    None if *bearer => Err(AuthFailure::Invalid("the bearer token is not one this endpoint takes".to_string())),
                    None => Err(AuthFailure::Invalid(format!("the key in `{header}` is not one this endpoint takes"))),
                }
            }
        }
    }

    /// How it authenticates, for summaries.
    pub fn describe_auth(&self) -> String {
        format!("{:?}", self.auth)
    }
}

/// The token of an `Authorization: Bearer <token>` value (the scheme in any case).
pub fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    value.get(..7).filter(|scheme| scheme.eq_ignore_ascii_case(b"bearer ")).map(|_| value[7..].trim_ascii())
}

fn header_name(h: &Spanned<String>, at: &str, cx: &BuildContext, diags: &mut Diags) -> Option<http::HeaderName> {
    match http::HeaderName::from_bytes(h.value.trim().as_bytes()) {
        Ok(n) => Some(n),
        Err(_) => {
            diags.push(
                cx.diag(DiagCode::InvalidValue, h.span, at, format!("`{}` is not a header name", h.shown()))
                    .expected("letters, digits and `-`, e.g. `X-Shopify-Hmac-Sha256`"),
            );
            None
        }
    }
}

fn secret(s: &Spanned<String>, at: &str, cx: &BuildContext, diags: &mut Diags) -> Option<Vec<u8>> {
    diags.take(cx.secret(s, at)).map(String::into_bytes)
}

fn build_auth(auth: &Spanned<HttpAuthConfig>, channel: Option<&str>, cx: &BuildContext, diags: &mut Diags) -> Option<Auth> {
    let a = &auth.value;
    let chosen = [a.hmac.is_some(), a.api_key.is_some(), a.bearer.is_some(), a.anonymous == Some(true)];
    if chosen.iter().filter(|c| **c).count() != 1 {
        diags.push(
            cx.diag(
                DiagCode::InvalidValue,
                auth.span,
                "source.auth",
                if chosen.iter().any(|c| *c) {
                    "`auth:` names more than one way to authenticate"
                } else {
                    "`auth:` names no way to authenticate"
                },
            )
            .expected("exactly one of `hmac:`, `api_key:`, `bearer:`, or `anonymous: true`"),
        );
        return None;
    }
    if let Some(h) = &a.hmac {
        let header = header_name(&h.header, "source.auth.hmac.header", cx, diags);
        let mut keys = vec![secret(&h.secret, "source.auth.hmac.secret", cx, diags)];
        for (i, s) in h.previous_secrets.iter().enumerate() {
            keys.push(secret(s, &format!("source.auth.hmac.previous_secrets[{i}]"), cx, diags));
        }
        let keys: Option<Vec<Vec<u8>>> = keys.into_iter().collect();
        return Some(Auth::Hmac {
            header: header?,
            keys: keys?,
            encoding: h.encoding.unwrap_or(SignatureEncoding::Base64),
            prefix: h.prefix.as_ref().map(|p| p.value.clone()).unwrap_or_default(),
            partner: h.partner.as_ref().map(|p| p.value.clone()).or_else(|| channel.map(str::to_string)).unwrap_or_default(),
        });
    }
    let (header, bearer, entries, at) = if let Some(k) = &a.api_key {
        let header = match &k.header {
            Some(h) => header_name(h, "source.auth.api_key.header", cx, diags),
            None => Some(http::HeaderName::from_static("x-api-key")),
        };
        (header, false, &k.keys, "source.auth.api_key.keys")
    } else if let Some(b) = &a.bearer {
        (Some(http::header::AUTHORIZATION), true, &b.tokens, "source.auth.bearer.tokens")
    } else {
        return Some(Auth::Anonymous);
    };
    if entries.is_empty() {
        diags.push(cx.diag(DiagCode::InvalidValue, auth.span, at, "no partner is listed").expected("partner name -> secret"));
        return None;
    }
    let secrets: Option<Vec<(String, Vec<u8>)>> =
        entries.iter().map(|(partner, s)| secret(s, &format!("{at}.{partner}"), cx, diags).map(|v| (partner.clone(), v))).collect();
    Some(Auth::Secret { header: header?, bearer, secrets: secrets? })
}

fn base64_decode(text: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(text).ok()
}

fn hex_decode(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(auth: Auth) -> HttpEndpoint {
        HttpEndpoint {
            path: "/in".into(),
            auth,
            max_body: DEFAULT_MAX_BODY,
            limiter: None,
            rate_described: None,
            partner_header: None,
            reject_invalid: false,
            pruned_at: std::sync::Mutex::new(std::time::Instant::now()),
        }
    }

    fn sign(key: &[u8], body: &[u8]) -> String {
        use base64::Engine;
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(key).unwrap();
        mac.update(body);
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    }

    fn headers(pairs: &[(&'static str, &str)]) -> http::HeaderMap {
        pairs.iter().map(|(k, v)| (http::HeaderName::from_static(k), http::HeaderValue::from_str(v).unwrap())).collect()
    }

    #[test]
    fn an_hmac_signature_is_checked_against_every_current_secret() {
        let e = endpoint(Auth::Hmac {
            header: http::HeaderName::from_static("x-shopify-hmac-sha256"),
            keys: vec![b"new".to_vec(), b"old".to_vec()],
            encoding: SignatureEncoding::Base64,
            prefix: String::new(),
            partner: "shopify".into(),
        });
        let body = br#"{"id":1}"#;
        assert_eq!(e.authenticate(&headers(&[("x-shopify-hmac-sha256", &sign(b"new", body))]), body), Ok(Some("shopify".into())));
        assert!(e.authenticate(&headers(&[("x-shopify-hmac-sha256", &sign(b"old", body))]), body).is_ok(), "a previous secret");
        let wrong = e.authenticate(&headers(&[("x-shopify-hmac-sha256", &sign(b"other", body))]), body);
        assert!(matches!(wrong, Err(AuthFailure::Invalid(_))), "{wrong:?}");
        let tampered = e.authenticate(&headers(&[("x-shopify-hmac-sha256", &sign(b"new", body))]), br#"{"id":2}"#);
        assert!(matches!(tampered, Err(AuthFailure::Invalid(_))));
        assert!(matches!(e.authenticate(&headers(&[]), body), Err(AuthFailure::Missing(_))));
        assert!(matches!(e.authenticate(&headers(&[("x-shopify-hmac-sha256", "%%%")]), body), Err(AuthFailure::Invalid(_))));
    }

    #[test]
    fn keys_and_tokens_name_their_partner() {
        let e = endpoint(Auth::Secret {
            header: http::header::AUTHORIZATION,
            bearer: true,
            secrets: vec![("acme".into(), b"t1".to_vec()), ("zeta".into(), b"t2".to_vec())],
        });
        assert_eq!(e.authenticate(&headers(&[("authorization", "Bearer t2")]), b""), Ok(Some("zeta".into())));
        assert_eq!(e.authenticate(&headers(&[("authorization", "bearer t1")]), b""), Ok(Some("acme".into())));
        assert!(matches!(e.authenticate(&headers(&[("authorization", "Bearer t3")]), b""), Err(AuthFailure::Invalid(_))));
        assert!(matches!(e.authenticate(&headers(&[("authorization", "Basic dDE=")]), b""), Err(AuthFailure::Invalid(_))));
        assert!(e.is_credential(&http::header::AUTHORIZATION));
        assert!(!format!("{e:?}").contains("t1"), "Debug shows no secret");
    }

    #[test]
    fn hex_signatures_with_a_prefix() {
        assert_eq!(hex_decode("00ff10"), Some(vec![0, 255, 16]));
        assert_eq!(hex_decode("0g"), None);
        assert_eq!(hex_decode("abc"), None);
    }
}
