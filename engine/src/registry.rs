//! The registry: every kind of source, validate step, map step and sink, keyed by its `type:`.
//! A plain `match` per stage; adding a kind means adding a line here and its module.

use crate::amqp::config::{AmqpSinkConfig, AmqpSourceConfig};
use crate::config::de::{RawNode, display_path};
use crate::config::diag::{one_of, suggestion};
use crate::config::yaml::{Node, NodeValue};
use crate::config::{DiagCode, Diagnostic, PathPart, SourceFile, parse_node};
use crate::map::MapStepConfig;
use crate::sink::{file::FileSinkConfig, http::HttpSinkConfig, queue::QueueSinkConfig, stdout::StdoutSinkConfig};
use crate::source::{file::FileSourceConfig, http::HttpSourceConfig, queue::QueueSourceConfig, stdin::StdinSourceConfig};
use schemars::JsonSchema;
use serde::de::DeserializeOwned;
use std::marker::PhantomData;

/// A source, picked by `type:`.
#[derive(Debug, Clone, JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum SourceConfig {
    /// A file or folder of JSON, NDJSON or CSV files.
    File(FileSourceConfig),
    /// Standard input.
    Stdin(StdinSourceConfig),
    /// A queue: what other pipelines' `queue` sinks or `switchyard send` write.
    Queue(QueueSourceConfig),
    /// A RabbitMQ queue (needs `broker:`): manual acknowledgements, retries, a dead-letter queue.
    Amqp(AmqpSourceConfig),
    /// Requests partners POST to a path of the engine's HTTP server (webhooks), answered `202`
    /// once stored; authenticated by HMAC signature, API key or bearer token.
    Http(Box<HttpSourceConfig>),
    /// A channel's API polled on a schedule for what changed since the stored cursor, page
    /// after page (Amazon SP-API orders, Shopify orders).
    HttpPoll(Box<crate::source::poll::HttpPollSourceConfig>),
}

/// A sink, picked by `type:`.
#[derive(Debug, Clone, JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum SinkConfig {
    /// An NDJSON file under the data directory.
    File(FileSinkConfig),
    /// Standard output.
    Stdout(StdoutSinkConfig),
    /// A queue: feeds every pipeline whose source is that queue.
    Queue(QueueSinkConfig),
    /// A RabbitMQ exchange (needs `broker:`): persistent, confirmed, unroutable is a failure.
    Amqp(Box<AmqpSinkConfig>),
    /// An HTTP endpoint: one request per message, with its idempotency key. 2xx delivers;
    /// timeouts, connection failures, 5xx, 408 and 429 may pass; other answers refuse it.
    Http(Box<HttpSinkConfig>),
}

impl SinkConfig {
    /// Its `retry`, `circuit_breaker` and `rate_limit`, for the sinks that talk to a receiver.
    pub fn delivery_config(&self) -> Option<crate::runtime::delivery::DeliveryConfig<'_>> {
        use crate::runtime::delivery::DeliveryConfig;
        match self {
            SinkConfig::Http(h) => Some(DeliveryConfig {
                retry: h.retry.as_ref(),
                circuit_breaker: h.circuit_breaker.as_ref(),
                rate_limit: h.rate_limit.as_ref(),
            }),
            SinkConfig::Amqp(a) => Some(DeliveryConfig {
                retry: a.retry.as_ref(),
                circuit_breaker: a.circuit_breaker.as_ref(),
                rate_limit: a.rate_limit.as_ref(),
            }),
            SinkConfig::File(_) | SinkConfig::Stdout(_) | SinkConfig::Queue(_) => None,
        }
    }
}

/// A validate step, picked by `type:`.
#[derive(Debug, Clone, JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ValidateStepConfig {
    /// Check the message against a JSON Schema (draft 2020-12 unless `$schema` says otherwise).
    JsonSchema(crate::map::SchemaStepConfig),
}

/// A config chosen by its `type:` key.
pub trait Tagged: Sized {
    /// What the analyst calls it: "source", "map step", "sink".
    const WHAT: &'static str;
    const TYPES: &'static [&'static str];
    /// Parses the node (without its `type` key) as the config of kind `ty`, one of `TYPES`.
    fn parse_type(ty: &str, node: &Node, file: &SourceFile, prefix: &[PathPart]) -> Result<Self, Vec<Diagnostic>>;
}

fn p<T: DeserializeOwned>(node: &Node, file: &SourceFile, prefix: &[PathPart]) -> Result<T, Vec<Diagnostic>> {
    parse_node(node, file, prefix)
}

impl Tagged for SourceConfig {
    const WHAT: &'static str = "source";
    const TYPES: &'static [&'static str] = &["file", "stdin", "queue", "amqp", "http", "http_poll"];
    fn parse_type(ty: &str, node: &Node, file: &SourceFile, prefix: &[PathPart]) -> Result<Self, Vec<Diagnostic>> {
        Ok(match ty {
            "file" => SourceConfig::File(p(node, file, prefix)?),
            "stdin" => SourceConfig::Stdin(p(node, file, prefix)?),
            "queue" => SourceConfig::Queue(p(node, file, prefix)?),
            "amqp" => SourceConfig::Amqp(p(node, file, prefix)?),
            "http" => SourceConfig::Http(Box::new(p(node, file, prefix)?)),
            "http_poll" => SourceConfig::HttpPoll(Box::new(p(node, file, prefix)?)),
            _ => unreachable!("checked against TYPES"),
        })
    }
}

impl Tagged for SinkConfig {
    const WHAT: &'static str = "sink";
    const TYPES: &'static [&'static str] = &["file", "stdout", "queue", "amqp", "http"];
    fn parse_type(ty: &str, node: &Node, file: &SourceFile, prefix: &[PathPart]) -> Result<Self, Vec<Diagnostic>> {
        Ok(match ty {
            "file" => SinkConfig::File(p(node, file, prefix)?),
            "stdout" => SinkConfig::Stdout(p(node, file, prefix)?),
            "queue" => SinkConfig::Queue(p(node, file, prefix)?),
            "amqp" => SinkConfig::Amqp(Box::new(p(node, file, prefix)?)),
            "http" => SinkConfig::Http(Box::new(p(node, file, prefix)?)),
            _ => unreachable!("checked against TYPES"),
        })
    }
}

impl Tagged for ValidateStepConfig {
    const WHAT: &'static str = "validate step";
    const TYPES: &'static [&'static str] = &["json_schema"];
    fn parse_type(ty: &str, node: &Node, file: &SourceFile, prefix: &[PathPart]) -> Result<Self, Vec<Diagnostic>> {
        Ok(match ty {
            "json_schema" => ValidateStepConfig::JsonSchema(p(node, file, prefix)?),
            _ => unreachable!("checked against TYPES"),
        })
    }
}

impl Tagged for MapStepConfig {
    const WHAT: &'static str = "map step";
    const TYPES: &'static [&'static str] = &["fields", "script", "lookup", "validate", "reconcile", "assert"];
    fn parse_type(ty: &str, node: &Node, file: &SourceFile, prefix: &[PathPart]) -> Result<Self, Vec<Diagnostic>> {
        Ok(match ty {
            "fields" => MapStepConfig::Fields(p(node, file, prefix)?),
            "script" => MapStepConfig::Script(p(node, file, prefix)?),
            "lookup" => MapStepConfig::Lookup(p(node, file, prefix)?),
            "validate" => MapStepConfig::Validate(p(node, file, prefix)?),
            "reconcile" => MapStepConfig::Reconcile(p(node, file, prefix)?),
            "assert" => MapStepConfig::Assert(p(node, file, prefix)?),
            _ => unreachable!("checked against TYPES"),
        })
    }
}

/// A `type:`-tagged component as written, resolved in a second phase so that its keys keep their
/// positions (serde's tagged enums would lose them).
#[derive(Debug, Clone)]
pub struct Component<T> {
    pub raw: RawNode,
    _kind: PhantomData<T>,
}

impl<'de, T> serde::Deserialize<'de> for Component<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Component { raw: RawNode::deserialize(d)?, _kind: PhantomData })
    }
}

impl<T: JsonSchema> JsonSchema for Component<T> {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        T::schema_name()
    }
    fn schema_id() -> std::borrow::Cow<'static, str> {
        T::schema_id()
    }
    fn json_schema(g: &mut schemars::SchemaGenerator) -> schemars::Schema {
        T::json_schema(g)
    }
}

impl<T: Tagged> Component<T> {
    /// Reads `type:` and parses the rest as that kind's config.
    pub fn resolve(&self, file: &SourceFile) -> Result<T, Vec<Diagnostic>> {
        let node = &self.raw.node;
        let at = display_path(&self.raw.path);
        let entries = match &node.value {
            NodeValue::Map(e) => e,
            NodeValue::Poison => return Err(Vec::new()),
            _ => {
                return Err(vec![
                    Diagnostic::new(DiagCode::WrongType, file, node.span, at, format!("wrong type: found {}", node.describe()))
                        .expected(format!("a mapping with `type:` ({})", one_of(T::TYPES))),
                ]);
            }
        };
        let Some(ty_node) = node.get("type") else {
            return Err(vec![
                Diagnostic::new(DiagCode::MissingKey, file, node.span, format!("{at}.type"), format!("the {} has no `type:`", T::WHAT))
                    .expected(one_of(T::TYPES)),
            ]);
        };
        let ty = ty_node.as_str().unwrap_or("");
        if !T::TYPES.contains(&ty) {
            return Err(vec![
                Diagnostic::new(
                    DiagCode::UnknownType,
                    file,
                    ty_node.span,
                    format!("{at}.type"),
                    format!("unknown {} type `{}`", T::WHAT, ty_node.shown().unwrap_or(ty)),
                )
                .expected(one_of(T::TYPES))
                .hint_opt(suggestion(ty_node.shown().unwrap_or(ty), T::TYPES.iter().copied())),
            ]);
        }
        let rest =
            Node { span: node.span, value: NodeValue::Map(entries.iter().filter(|(k, _)| k.as_str() != Some("type")).cloned().collect()) };
        T::parse_type(ty, &rest, file, &self.raw.path)
    }
}
