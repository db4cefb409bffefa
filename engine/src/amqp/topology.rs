//! The exchanges, queues and bindings a pipeline needs, checked at load and declared at every
//! connect. Declaring is idempotent; a queue or exchange that exists with other settings
//! (PRECONDITION_FAILED) is explained in words, with the way out.

use super::config::{AmqpSourceConfig, BrokerConfig, ExchangeType, HeadersMatch, Overflow, QueueType};
use super::{AmqpError, lapin_message};
use crate::build::BuildContext;
use crate::config::{DiagCode, Diagnostic, Spanned};
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Exchange {
    pub name: String,
    pub kind: ExchangeType,
    pub durable: bool,
    pub auto_delete: bool,
}

#[derive(Debug, Clone)]
pub struct Queue {
    pub name: String,
    pub durable: bool,
    pub arguments: Vec<(&'static str, Arg)>,
    /// Why the engine declares it, for people.
    pub role: &'static str,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Arg {
    Int(i64),
    Text(String),
    Bool(bool),
}

#[derive(Debug, Clone)]
pub struct Binding {
    pub exchange: String,
    pub queue: String,
    pub routing_key: String,
    pub arguments: Vec<(String, Arg)>,
}

/// Retry queue tiers of a source: name and delay.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryTier {
    pub queue: String,
    pub delay: Duration,
}

#[derive(Debug, Clone, Default)]
pub struct Topology {
    pub exchanges: Vec<Exchange>,
    pub queues: Vec<Queue>,
    pub bindings: Vec<Binding>,
    /// Exchanges sinks publish to that the pipeline does not declare: they must exist (a
    /// publish to a missing exchange closes the channel).
    pub expected_exchanges: Vec<String>,
}

/// What an `amqp` source consumes and where its failures go.
#[derive(Debug, Clone, PartialEq)]
pub struct SourcePlan {
    pub queue: String,
    pub prefetch: u16,
    pub retries: Vec<RetryTier>,
    pub dead_letter_queue: String,
}

pub const DEFAULT_RETRY_DELAYS: [Duration; 3] = [Duration::from_secs(1), Duration::from_secs(10), Duration::from_secs(60)];
pub const DEFAULT_PREFETCH: u16 = 1000;

fn duration(v: &Spanned<String>, key: &str, cx: &BuildContext, diags: &mut Vec<Diagnostic>) -> Option<Duration> {
    match humantime::parse_duration(v.value.trim()) {
        Ok(d) if !d.is_zero() => Some(d),
        Ok(_) => {
            diags.push(cx.diag(DiagCode::InvalidValue, v.span, key, "a duration of zero"));
            None
        }
        Err(e) => {
            diags.push(
                cx.diag(DiagCode::InvalidValue, v.span, key, format!("`{}` is not a duration: {e}", v.shown()))
                    .expected("a duration such as `500ms`, `10s`, `1h`"),
            );
            None
        }
    }
}

fn check_name(v: &Spanned<String>, key: &str, cx: &BuildContext, diags: &mut Vec<Diagnostic>) {
    let n = &v.value;
    if n.is_empty() || n.len() > 255 || n.chars().any(|c| c.is_control() || c.is_whitespace()) {
        diags.push(
            cx.diag(DiagCode::InvalidValue, v.span, key, format!("`{}` cannot name a RabbitMQ exchange or queue", v.shown()))
                .expected("1 to 255 characters without spaces, e.g. `orders.shopify`"),
        );
    } else if n.starts_with("amq.") {
        diags.push(
            cx.diag(DiagCode::InvalidValue, v.span, key, format!("`{n}`: names starting with `amq.` belong to RabbitMQ"))
                .hint("pick a name of your own; the built-in `amq.*` exchanges can be bound to without declaring them"),
        );
    }
}

impl Topology {
    /// The topology of `broker:` plus what the source needs: its queue (unless declared), its
    /// retry queues and its dead-letter queue.
    pub fn build(
        broker: &BrokerConfig,
        source: Option<&AmqpSourceConfig>,
        cx: &BuildContext,
        diags: &mut Vec<Diagnostic>,
    ) -> (Topology, Option<SourcePlan>) {
        let t = &broker.topology;
        let mut topo = Topology::default();
        for (i, e) in t.exchanges.iter().enumerate() {
            check_name(&e.name, &format!("broker.topology.exchanges[{i}].name"), cx, diags);
            topo.exchanges.push(Exchange {
                name: e.name.value.clone(),
                kind: e.kind,
                durable: e.durable.unwrap_or(true),
                auto_delete: e.auto_delete.unwrap_or(false),
            });
        }
        for (i, q) in t.queues.iter().enumerate() {
            let at = format!("broker.topology.queues[{i}]");
            check_name(&q.name, &format!("{at}.name"), cx, diags);
            let mut arguments = Vec::new();
            if q.kind == QueueType::Quorum {
                arguments.push(("x-queue-type", Arg::Text("quorum".into())));
                if q.durable == Some(false) {
                    diags.push(cx.diag(DiagCode::Conflict, q.name.span, &format!("{at}.durable"), "quorum queues are always durable"));
                }
            }
            if let Some(ttl) = &q.message_ttl
                && let Some(d) = duration(ttl, &format!("{at}.message_ttl"), cx, diags)
            {
                arguments.push(("x-message-ttl", Arg::Int(d.as_millis() as i64)));
            }
            if let Some(n) = q.max_length {
                arguments.push(("x-max-length", Arg::Int(n as i64)));
                let overflow = match q.overflow.unwrap_or(Overflow::RejectPublish) {
                    Overflow::RejectPublish => "reject-publish",
                    Overflow::DropHead => "drop-head",
                };
                arguments.push(("x-overflow", Arg::Text(overflow.into())));
            }
            if let Some(x) = &q.dead_letter_exchange {
                arguments.push(("x-dead-letter-exchange", Arg::Text(x.value.clone())));
            }
            if let Some(k) = &q.dead_letter_routing_key {
                arguments.push(("x-dead-letter-routing-key", Arg::Text(k.value.clone())));
            }
            if q.single_active_consumer == Some(true) {
                arguments.push(("x-single-active-consumer", Arg::Bool(true)));
            }
            topo.queues.push(Queue {
                name: q.name.value.clone(),
                durable: q.durable.unwrap_or(true) || q.kind == QueueType::Quorum,
                arguments,
                role: "declared by the pipeline",
            });
        }
        for (i, b) in t.bindings.iter().enumerate() {
            let at = format!("broker.topology.bindings[{i}]");
            let mut arguments = Vec::new();
            if let Some(h) = &b.headers {
                let m = match b.match_kind.unwrap_or(HeadersMatch::All) {
                    HeadersMatch::All => "all",
                    HeadersMatch::Any => "any",
                };
                arguments.push(("x-match".to_string(), Arg::Text(m.into())));
                arguments.extend(h.iter().map(|(k, v)| (k.clone(), Arg::Text(v.clone()))));
            }
            let declared_exchange = topo.exchanges.iter().find(|e| e.name == b.exchange.value);
            if declared_exchange.is_none() && !b.exchange.value.starts_with("amq.") {
                diags.push(
                    cx.diag(
                        DiagCode::UndeclaredExchange,
                        b.exchange.span,
                        &format!("{at}.exchange"),
                        format!("the binding names exchange `{}`, which `broker.topology.exchanges` does not declare", b.exchange.value),
                    )
                    .hint("declare it under `exchanges:` (declaring is idempotent, so pipelines sharing it may all declare it)"),
                );
            }
            if declared_exchange.is_some_and(|e| e.kind == ExchangeType::Headers) != b.headers.is_some() {
                diags.push(cx.diag(
                    DiagCode::Conflict,
                    b.exchange.span,
                    &format!("{at}.headers"),
                    "`headers:` goes with a headers exchange, and only there",
                ));
            }
            topo.bindings.push(Binding {
                exchange: b.exchange.value.clone(),
                queue: b.queue.value.clone(),
                routing_key: b.routing_key.clone().unwrap_or_default(),
                arguments,
            });
        }
        let plan = source.map(|s| {
            check_name(&s.queue, "source.queue", cx, diags);
            let prefetch = match &s.prefetch {
                Some(p) if (1..=65535).contains(&p.value) => p.value as u16,
                Some(p) => {
                    diags.push(
                        cx.diag(DiagCode::InvalidValue, p.span, "source.prefetch", format!("`prefetch` is {}", p.value))
                            .expected("a number from 1 to 65535"),
                    );
                    DEFAULT_PREFETCH
                }
                None => DEFAULT_PREFETCH,
            };
            let delays: Vec<Duration> = match &s.retry {
                None => DEFAULT_RETRY_DELAYS.to_vec(),
                Some(r) => r
                    .delays
                    .value
                    .iter()
                    .enumerate()
                    .filter_map(|(i, d)| duration(d, &format!("source.retry.delays[{i}]"), cx, diags))
                    .collect(),
            };
            topo.add_source(&s.queue.value, prefetch, &delays, s.dead_letter_queue.as_ref().map(|d| d.value.clone()))
        });
        (topo, plan)
    }

    /// Declares an exchange unless it already is.
    pub fn add_exchange(&mut self, name: &str, kind: ExchangeType) {
        if !self.exchanges.iter().any(|e| e.name == name) {
            self.exchanges.push(Exchange { name: name.to_string(), kind, durable: true, auto_delete: false });
        }
    }

    /// What a source consuming `queue` needs: the queue itself (unless declared), one retry
    /// queue per delay, whose TTL dead-letters back to it, and the dead-letter queue.
    pub fn add_source(&mut self, queue: &str, prefetch: u16, delays: &[Duration], dead_letter_queue: Option<String>) -> SourcePlan {
        let queue = queue.to_string();
        let retries: Vec<RetryTier> =
            delays.iter().map(|d| RetryTier { queue: format!("{queue}.retry.{}", humantime::format_duration(*d)), delay: *d }).collect();
        let dead_letter_queue = dead_letter_queue.unwrap_or_else(|| format!("{queue}.dlq"));
        if !self.queues.iter().any(|q| q.name == queue) {
            self.queues.push(Queue { name: queue.clone(), durable: true, arguments: vec![], role: "the source's queue" });
        }
        for r in &retries {
            self.queues.push(Queue {
                name: r.queue.clone(),
                durable: true,
                arguments: vec![
                    ("x-message-ttl", Arg::Int(r.delay.as_millis() as i64)),
                    ("x-dead-letter-exchange", Arg::Text(String::new())),
                    ("x-dead-letter-routing-key", Arg::Text(queue.clone())),
                ],
                role: "a retry delay: back to the source's queue when the time is up",
            });
        }
        if !self.queues.iter().any(|q| q.name == dead_letter_queue) {
            self.queues.push(Queue {
                name: dead_letter_queue.clone(),
                durable: true,
                arguments: vec![],
                role: "the dead-letter queue: messages that failed for good",
            });
        }
        SourcePlan { queue, prefetch, retries, dead_letter_queue }
    }

    /// Declares everything on a channel of its own (a refusal closes the channel).
    pub async fn declare(&self, connection: &lapin::Connection) -> Result<(), AmqpError> {
        let channel = connection.create_channel().await.map_err(|e| AmqpError::Lost(lapin_message(&e)))?;
        for e in &self.exchanges {
            let options = ExchangeDeclareOptions { durable: e.durable, auto_delete: e.auto_delete, ..Default::default() };
            channel
                .exchange_declare(name(&e.name)?, kind(e.kind), options, FieldTable::default())
                .await
                .map_err(|err| refused(&err, format!("exchange `{}` ({}, {})", e.name, e.kind.as_str(), durability(e.durable))))?;
        }
        for q in &self.queues {
            let options = QueueDeclareOptions { durable: q.durable, ..Default::default() };
            channel
                .queue_declare(name(&q.name)?, options, table(q.arguments.iter().map(|(k, v)| (*k, v))))
                .await
                .map_err(|err| refused(&err, format!("queue `{}` ({}{})", q.name, durability(q.durable), describe_args(&q.arguments))))?;
        }
        for b in &self.bindings {
            channel
                .queue_bind(
                    name(&b.queue)?,
                    name(&b.exchange)?,
                    name(&b.routing_key)?,
                    QueueBindOptions::default(),
                    table(b.arguments.iter().map(|(k, v)| (k.as_str(), v))),
                )
                .await
                .map_err(|err| refused(&err, format!("binding of queue `{}` to exchange `{}`", b.queue, b.exchange)))?;
        }
        let _ = channel.close(200, "declared".into()).await;
        for x in &self.expected_exchanges {
            if !exchange_exists(connection, x).await? {
                return Err(AmqpError::Topology(format!(
                    "a sink publishes to exchange `{x}`, which does not exist on the broker: declare it under \
                     `broker.topology.exchanges` (declaring is idempotent), or have it created"
                )));
            }
        }
        Ok(())
    }

    /// What is declared, one line each, for `switchyard topology`.
    pub fn lines(&self) -> Vec<String> {
        let mut out = Vec::new();
        for e in &self.exchanges {
            out.push(format!("exchange {} ({}, {})", e.name, e.kind.as_str(), durability(e.durable)));
        }
        for q in &self.queues {
            out.push(format!("queue    {} ({}{}): {}", q.name, durability(q.durable), describe_args(&q.arguments), q.role));
        }
        for x in &self.expected_exchanges {
            out.push(format!("exchange {x} (not declared here: must exist)"));
        }
        for b in &self.bindings {
            let key = if b.routing_key.is_empty() { String::new() } else { format!(" with key `{}`", b.routing_key) };
            out.push(format!("binding  {} -> {}{key}", b.exchange, b.queue));
        }
        out
    }
}

/// Whether an exchange exists (a passive declare on a channel of its own: a miss closes it).
pub async fn exchange_exists(connection: &lapin::Connection, exchange: &str) -> Result<bool, AmqpError> {
    let channel = connection.create_channel().await.map_err(|e| AmqpError::Lost(lapin_message(&e)))?;
    let options = ExchangeDeclareOptions { passive: true, ..Default::default() };
    match channel.exchange_declare(name(exchange)?, lapin::ExchangeKind::Direct, options, FieldTable::default()).await {
        Ok(()) => {
            let _ = channel.close(200, "checked".into()).await;
            Ok(true)
        }
        Err(e) if matches!(e.kind(), lapin::ErrorKind::ProtocolError(p) if p.get_id() == 404) => Ok(false),
        Err(e) => Err(AmqpError::Lost(lapin_message(&e))),
    }
}

/// A name RabbitMQ can take (at most 255 bytes), or the topology cannot be declared.
fn name(s: &str) -> Result<lapin::types::ShortString, AmqpError> {
    super::short_name(s, &format!("name `{s}`")).map_err(|e| AmqpError::Topology(e.to_string()))
}

fn durability(durable: bool) -> &'static str {
    if durable { "durable" } else { "transient" }
}

fn describe_args(args: &[(&'static str, Arg)]) -> String {
    args.iter()
        .map(|(k, v)| match v {
            Arg::Int(n) => format!(", {k}={n}"),
            Arg::Text(t) => format!(", {k}={t:?}"),
            Arg::Bool(b) => format!(", {k}={b}"),
        })
        .collect()
}

fn kind(k: ExchangeType) -> lapin::ExchangeKind {
    match k {
        ExchangeType::Direct => lapin::ExchangeKind::Direct,
        ExchangeType::Topic => lapin::ExchangeKind::Topic,
        ExchangeType::Headers => lapin::ExchangeKind::Headers,
        ExchangeType::Fanout => lapin::ExchangeKind::Fanout,
    }
}

fn table<'a>(args: impl Iterator<Item = (&'a str, &'a Arg)>) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in args {
        let value = match v {
            Arg::Int(n) => AMQPValue::LongLongInt(*n),
            Arg::Text(s) => AMQPValue::LongString(LongString::from(s.as_str())),
            Arg::Bool(b) => AMQPValue::Boolean(*b),
        };
        t.insert(k.into(), value);
    }
    t
}

/// A declaration the broker refused, in words.
fn refused(e: &lapin::Error, what: String) -> AmqpError {
    if let lapin::ErrorKind::ProtocolError(p) = e.kind() {
        if p.get_id() == 406 {
            return AmqpError::Topology(format!(
                "{what} already exists on the broker with other settings, so it cannot be declared as the pipeline says \
                 (the broker says: {}). Either make `broker.topology` match what exists (see it with `rabbitmqctl list_queues \
                 name durable arguments` or `list_exchanges`), or delete the old one so that the engine declares it anew \
                 (`rabbitmqctl delete_queue NAME` loses the messages in it)",
                p.get_message()
            ));
        }
        if p.get_id() == 403 {
            return AmqpError::Topology(format!(
                "the broker does not let this user declare {what} (the broker says: {}): grant the user configure permission on it, \
                 or have an administrator declare it",
                p.get_message()
            ));
        }
        return AmqpError::Topology(format!("the broker refused to declare {what}: {}", p.get_message()));
    }
    AmqpError::Lost(lapin_message(e))
}
