//! RabbitMQ through lapin: one connection per pipeline, named after the engine and the pipeline
//! so that it can be told apart in the management view; the topology declared at every connect;
//! reconnects with exponential backoff and jitter. Publishing always uses publisher confirms.

pub mod config;
pub mod publish;
pub mod topology;

use lapin::options::ConfirmSelectOptions;
use lapin::{Connection, ConnectionProperties};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
pub use topology::Topology;

#[derive(Debug, Clone, thiserror::Error)]
pub enum AmqpError {
    #[error("cannot connect to RabbitMQ at {url}: {message}")]
    Connect { url: String, message: String },
    #[error("{0}")]
    Topology(String),
    #[error("RabbitMQ connection lost: {0}")]
    Lost(String),
    #[error("the broker refused the message: {0}")]
    Refused(String),
}

impl AmqpError {
    /// Worth connecting again for (as opposed to a topology the broker refuses).
    pub fn is_connection(&self) -> bool {
        matches!(self, AmqpError::Connect { .. } | AmqpError::Lost(_))
    }
}

/// AMQP short strings hold at most 255 bytes.
pub const MAX_SHORT: usize = 255;

/// A name (exchange, queue, routing key) as AMQP carries it, or why it cannot be.
pub fn short_name(s: &str, what: &str) -> Result<lapin::types::ShortString, AmqpError> {
    lapin::types::ShortString::try_new(s)
        .map_err(|_| AmqpError::Refused(format!("the {what} is {} bytes long; RabbitMQ takes at most {MAX_SHORT}", s.len())))
}

/// An id (message id, correlation id, consumer tag) as AMQP carries it: a longer one is cut at a
/// character boundary and ends with a hash of the whole, so that different ids stay different.
pub fn short_id(s: &str) -> lapin::types::ShortString {
    if s.len() <= MAX_SHORT {
        return lapin::types::ShortString::try_new(s).expect("checked length");
    }
    let mut end = MAX_SHORT - 17;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    let cut = format!("{}~{:016x}", &s[..end], xxhash_rust::xxh3::xxh3_64(s.as_bytes()));
    lapin::types::ShortString::try_new(cut).expect("cut to length")
}

/// The URL as it may be shown: without its password. A URL that does not parse is not shown
/// at all (where its password is cannot be told).
pub fn redact(url: &str) -> String {
    if url.parse::<lapin::uri::AMQPUri>().is_err() {
        return "(a URL that does not parse as amqp://user:password@host:port/vhost; not shown, it may hold a password)".to_string();
    }
    let Some(scheme_end) = url.find("://") else { return url.to_string() };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => {
            let userinfo = &rest[..at];
            let user = userinfo.split(':').next().unwrap_or("");
            let masked = if userinfo.contains(':') { format!("{user}:***") } else { user.to_string() };
            format!("{}{masked}{}", &url[..scheme_end + 3], &rest[at..])
        }
        None => url.to_string(),
    }
}

/// How often a wait on the broker looks at the connection.
const LIVENESS_CHECK: Duration = Duration::from_millis(250);
/// How long a wait on the broker may go unanswered on a connection that looks up and that the
/// broker does not block (a memory or disk alarm blocks publishers for as long as it lasts).
const ANSWER_LIMIT: Duration = Duration::from_secs(30);

/// Waits for `fut`, a wait on the broker, unless the connection is lost first. lapin can leave
/// such a wait pending for ever when the broker closes the connection (amqp-rs/lapin#409), so
/// the connection's status is looked at every 250 ms, and a wait unanswered for 30 s while the
/// connection is not blocked counts as a lost connection too: what is in hand is then
/// delivered again by the broker, never dropped.
pub async fn unless_lost<F: std::future::Future>(status: &lapin::ConnectionStatus, what: &str, fut: F) -> Result<F::Output, AmqpError> {
    use futures_util::FutureExt;
    let mut fut = std::pin::pin!(fut);
    // Most waits are answered at once: no timer for those.
    if let Some(out) = fut.as_mut().now_or_never() {
        return Ok(out);
    }
    let started = std::time::Instant::now();
    let mut unblocked_since = started;
    loop {
        tokio::select! {
            out = fut.as_mut() => return Ok(out),
            _ = tokio::time::sleep(LIVENESS_CHECK) => {
                if !status.connected() {
                    return Err(AmqpError::Lost(format!("the connection closed while {what}")));
                }
                if status.blocked() {
                    unblocked_since = std::time::Instant::now();
                } else if unblocked_since.elapsed() > ANSWER_LIMIT {
                    return Err(AmqpError::Lost(format!("no answer from the broker in {} s while {what}", ANSWER_LIMIT.as_secs())));
                }
            }
        }
    }
}

/// Closes a connection given up on, without waiting long for the broker's answer (a closed
/// socket may never give one).
async fn close_quietly(connection: &lapin::Connection) {
    let _ = tokio::time::timeout(Duration::from_secs(2), connection.close(320, "reconnecting".into())).await;
}

/// A live connection with its publishing channel (in confirm mode).
#[derive(Clone)]
pub struct Session {
    pub connection: Arc<Connection>,
    pub publish: Arc<publish::Publisher>,
    pub generation: u64,
}

impl Session {
    pub fn is_alive(&self) -> bool {
        self.connection.status().connected() && self.publish.is_open()
    }
}

/// The broker as a pipeline uses it: connects on demand, again after a failure.
pub struct Broker {
    url: String,
    shown: String,
    name: String,
    heartbeat: u16,
    topology: Arc<Topology>,
    session: tokio::sync::Mutex<Option<Session>>,
    generation: AtomicU64,
}

impl Broker {
    pub fn new(url: &str, heartbeat: Duration, pipeline: &str, topology: Arc<Topology>) -> Broker {
        let host = std::env::var("HOSTNAME").ok().or_else(|| std::fs::read_to_string("/etc/hostname").ok()).unwrap_or_default();
        Broker {
            url: url.to_string(),
            shown: redact(url),
            name: format!("switchyard {pipeline} on {} pid {}", host.trim(), std::process::id()),
            heartbeat: heartbeat.as_secs().clamp(1, u16::MAX as u64) as u16,
            topology,
            session: tokio::sync::Mutex::new(None),
            generation: AtomicU64::new(0),
        }
    }

    /// The URL without its password.
    pub fn shown_url(&self) -> &str {
        &self.shown
    }

    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// The current session, or a new one (one attempt).
    pub async fn session(&self) -> Result<Session, AmqpError> {
        let mut guard = self.session.lock().await;
        if let Some(s) = guard.as_ref()
            && s.is_alive()
        {
            return Ok(s.clone());
        }
        if let Some(old) = guard.take() {
            // Whatever is left of it goes; its unacknowledged deliveries return to their queues.
            close_quietly(&old.connection).await;
        }
        let s = self.connect().await?;
        *guard = Some(s.clone());
        Ok(s)
    }

    /// A session, trying again with exponential backoff and jitter (0.2 s up to 10 s) until one
    /// is up or `stop` turns true. A topology the broker refuses is reported and tried again
    /// more slowly: someone may be fixing it.
    pub async fn session_retrying(&self, stop: &mut tokio::sync::watch::Receiver<bool>) -> Option<Session> {
        let mut delay = Duration::from_millis(200);
        let mut failures = 0u32;
        loop {
            if *stop.borrow() {
                return None;
            }
            match self.session().await {
                Ok(s) => {
                    if failures > 0 {
                        tracing::warn!(broker = %self.shown, attempts = failures + 1, "connected to RabbitMQ again");
                    }
                    return Some(s);
                }
                Err(e) => {
                    failures += 1;
                    let cap = if e.is_connection() { Duration::from_secs(10) } else { Duration::from_secs(30) };
                    if failures == 1 || failures.is_multiple_of(10) {
                        tracing::error!(error = %e, attempts = failures, "RabbitMQ is not available; trying again");
                    }
                    let jittered = delay.mul_f64(0.5 + fastrand::f64());
                    tokio::select! {
                        _ = tokio::time::sleep(jittered) => {}
                        _ = stop.changed() => {}
                    }
                    delay = (delay * 2).min(cap);
                }
            }
        }
    }

    /// Forgets a session that failed, so the next call connects again.
    pub async fn broken(&self, generation: u64) {
        let mut guard = self.session.lock().await;
        if guard.as_ref().is_some_and(|s| s.generation == generation)
            && let Some(old) = guard.take()
        {
            close_quietly(&old.connection).await;
        }
    }

    async fn connect(&self) -> Result<Session, AmqpError> {
        let fail = |message: String| AmqpError::Connect { url: self.shown.clone(), message };
        // The parser's message quotes the URL, password and all: not passed on.
        let mut uri: lapin::uri::AMQPUri = self.url.parse().map_err(|_: String| fail("not an AMQP URL".into()))?;
        uri.query.heartbeat.get_or_insert(self.heartbeat);
        uri.query.connection_timeout.get_or_insert(5_000);
        let props = ConnectionProperties::default().with_connection_name(self.name.clone().into());
        let connection = Connection::connect_uri(uri, props).await.map_err(|e| fail(lapin_message(&e)))?;
        let status = connection.status().clone();
        unless_lost(&status, "declaring the topology", self.topology.declare(&connection)).await??;
        let publish = unless_lost(&status, "opening a channel", connection.create_channel()).await?.map_err(|e| fail(lapin_message(&e)))?;
        unless_lost(&status, "opening a channel", publish.confirm_select(ConfirmSelectOptions::default()))
            .await?
            .map_err(|e| fail(lapin_message(&e)))?;
        let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        tracing::info!(broker = %self.shown, name = %self.name, "connected to RabbitMQ");
        Ok(Session { connection: Arc::new(connection), publish: Arc::new(publish::Publisher::new(publish, status)), generation })
    }

    /// Closes the connection at the end of a run.
    pub async fn close(&self) {
        if let Some(s) = self.session.lock().await.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), s.connection.close(200, "switchyard stopping".into())).await;
        }
    }
}

/// lapin's error in words, never with the URL (which holds the password).
pub fn lapin_message(e: &lapin::Error) -> String {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(p) => format!("{} ({})", p.get_message(), p.get_id()),
        lapin::ErrorKind::IOError(io) => io.to_string(),
        other => format!("{other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_shown_without_their_password() {
        assert_eq!(redact("amqp://guest:s3cret@10.0.0.1:5672/%2f"), "amqp://guest:***@10.0.0.1:5672/%2f");
        assert_eq!(redact("amqps://user@host/vhost"), "amqps://user@host/vhost");
        assert_eq!(redact("amqp://host"), "amqp://host");
        assert!(!redact("amqp:user:s3cret@host").contains("s3cret"), "an unparseable URL is not shown");
        assert!(!redact("amqp://user:pa/ss@host").contains("pa/ss"));
    }

    #[test]
    fn long_ids_are_cut_and_stay_distinct() {
        let a = "x".repeat(300);
        let b = format!("{}y", "x".repeat(299));
        assert!(short_id(&a).as_str().len() <= MAX_SHORT);
        assert_ne!(short_id(&a), short_id(&b));
        assert_eq!(short_id("m-1").as_str(), "m-1");
        assert!(short_name(&a, "routing key").is_err());
    }
}
