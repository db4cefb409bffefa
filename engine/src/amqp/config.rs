//! What a pipeline says about RabbitMQ: the `broker:` block (URL and topology), the `amqp`
//! source and the `amqp` sink.

use crate::config::Spanned;
use crate::sink::OutputFormat;
use schemars::JsonSchema;
use serde::Deserialize;

/// The RabbitMQ broker a pipeline's `amqp` source and sinks use, and what it declares there.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BrokerConfig {
    /// `amqp://user:password@host:5672/vhost` or `amqps://...` for TLS; usually
    /// `${SWITCHYARD_AMQP_URL}` so that the password stays out of the file.
    pub url: Spanned<String>,
    /// How often the engine and the broker check that the connection is alive (default `30s`).
    #[serde(default)]
    pub heartbeat: Option<Spanned<String>>,
    /// Exchanges, queues and bindings the engine declares at start (idempotently).
    #[serde(default)]
    pub topology: TopologyConfig,
}

#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TopologyConfig {
    #[serde(default)]
    pub exchanges: Vec<ExchangeDecl>,
    #[serde(default)]
    pub queues: Vec<QueueDecl>,
    #[serde(default)]
    pub bindings: Vec<BindingDecl>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ExchangeType {
    Direct,
    Topic,
    Headers,
    Fanout,
}

impl ExchangeType {
    pub fn as_str(self) -> &'static str {
        match self {
            ExchangeType::Direct => "direct",
            ExchangeType::Topic => "topic",
            ExchangeType::Headers => "headers",
            ExchangeType::Fanout => "fanout",
        }
    }
}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExchangeDecl {
    pub name: Spanned<String>,
    #[serde(rename = "type")]
    pub kind: ExchangeType,
    /// Survives a broker restart (default true).
    #[serde(default)]
    pub durable: Option<bool>,
    /// Deleted when its last binding goes (default false).
    #[serde(default)]
    pub auto_delete: Option<bool>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum QueueType {
    /// RabbitMQ's default queue type.
    #[default]
    Classic,
    /// Replicated (Raft); counts deliveries, so a message that keeps crashing consumers stops.
    Quorum,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Overflow {
    /// Refuse new messages when full: publishers see a nack, nothing is lost.
    RejectPublish,
    /// Dead-letter (or drop) the oldest message when full.
    DropHead,
}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct QueueDecl {
    pub name: Spanned<String>,
    #[serde(rename = "type", default)]
    pub kind: QueueType,
    /// Survives a broker restart (default true; quorum queues always are).
    #[serde(default)]
    pub durable: Option<bool>,
    /// How long a message may wait in the queue, e.g. `1h` (`x-message-ttl`).
    #[serde(default)]
    pub message_ttl: Option<Spanned<String>>,
    /// Most messages the queue holds (`x-max-length`); see `overflow`.
    #[serde(default)]
    pub max_length: Option<u64>,
    /// What happens when `max_length` is reached (default `reject-publish`: nothing is dropped).
    #[serde(default)]
    pub overflow: Option<Overflow>,
    /// Where expired, rejected or dropped messages go (`x-dead-letter-exchange`).
    #[serde(default)]
    pub dead_letter_exchange: Option<Spanned<String>>,
    #[serde(default)]
    pub dead_letter_routing_key: Option<Spanned<String>>,
    /// Only one consumer at a time gets messages, the others wait: the queue's order is kept
    /// across several engines (`x-single-active-consumer`).
    #[serde(default)]
    pub single_active_consumer: Option<bool>,
}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BindingDecl {
    pub exchange: Spanned<String>,
    pub queue: Spanned<String>,
    /// Routing key or pattern (`orders.*.us` on a topic exchange); empty by default.
    #[serde(default)]
    pub routing_key: Option<String>,
    /// For headers exchanges: the header values to match.
    #[serde(default)]
    pub headers: Option<indexmap::IndexMap<String, String>>,
    /// For headers exchanges: `all` (default) or `any` of `headers` must match.
    #[serde(default, rename = "match")]
    pub match_kind: Option<HeadersMatch>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum HeadersMatch {
    All,
    Any,
}

/// Consumes a RabbitMQ queue with manual acknowledgements.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AmqpSourceConfig {
    /// The queue to consume. Declared (durable, classic) at start unless `broker.topology`
    /// declares it.
    pub queue: Spanned<String>,
    /// Messages the broker hands this engine before any is acknowledged (default 1000).
    #[serde(default)]
    pub prefetch: Option<Spanned<u32>>,
    /// Delayed redelivery after a failure that may pass (a sink down): one retry queue per
    /// delay, declared by the engine. After the last one the message is dead-lettered.
    #[serde(default)]
    pub retry: Option<RetryConfig>,
    /// Where messages that failed for good go, with the reason, stage and attempts in their
    /// headers (default `<queue>.dlq`, declared by the engine).
    #[serde(default)]
    pub dead_letter_queue: Option<Spanned<String>>,
}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// Waits before each new attempt, e.g. `[1s, 10s, 60s]` (the default): 3 retries.
    pub delays: Spanned<Vec<Spanned<String>>>,
}

/// Publishes to RabbitMQ with publisher confirms.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AmqpSinkConfig {
    /// The exchange to publish to; a template such as `orders.{channel}` is allowed. Empty (the
    /// default) is the default exchange, where the routing key names the queue.
    #[serde(default)]
    pub exchange: Option<Spanned<String>>,
    /// The routing key; a template such as `erp.{$.ship_to.country}` is allowed.
    #[serde(default)]
    pub routing_key: Option<Spanned<String>>,
    /// Stored on disk by the broker (default true).
    #[serde(default)]
    pub persistent: Option<bool>,
    /// A message no queue takes is returned and counts as a failure (default true). Set false
    /// only where dropping unroutable messages is intended.
    #[serde(default)]
    pub mandatory: Option<bool>,
    /// `payload` (default): the record alone, ids and versions in headers; `envelope`:
    /// metadata and payload together in the body.
    #[serde(default)]
    pub format: Option<OutputFormat>,
    /// Attempts and backoff when the broker refuses or returns a message (`transient_statuses`
    /// does not apply: every refusal is worth another try).
    #[serde(default)]
    pub retry: Option<crate::runtime::delivery::RetryConfig>,
    /// Stops publishing after refusals in a row, so that work waits in its queue; a probe later.
    #[serde(default)]
    pub circuit_breaker: Option<crate::runtime::delivery::CircuitBreakerConfig>,
    /// At most this many messages per second, minute or hour (a slow consumer downstream).
    #[serde(default)]
    pub rate_limit: Option<crate::runtime::delivery::RateLimitConfig>,
}
