//! A pipeline: its YAML format, how it is built (structure, then context: files, JSONPaths,
//! scripts, schemas), and how it processes one message: parse -> validate -> map -> route.

pub mod load;

use crate::build::{BuildContext, Diags};
use crate::config::{DiagCode, Diagnostic, Spanned, yaml};
use crate::doc::Doc;
use crate::jsonpath::{CompiledPath, Scope};
use crate::map::fields::ApiVersion;
use crate::map::{MapStep, MapStepConfig, StepInput, build_schema_check};
use crate::message::{Document, ErrorDetail, ExceptionRecord, Failure, Metadata, OriginalPayload, Output, RawMessage, Stage, reason};
use crate::registry::{Component, SinkConfig, SourceConfig, ValidateStepConfig};
use crate::route::{RouteConfig, Router};
use crate::sink::http::HttpTarget;
use crate::template::Template;
use crate::validate::SchemaCheck;
use chrono::Utc;
use indexmap::IndexMap;
use schemars::JsonSchema;
use serde::Deserialize;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
pub enum PipelineKind {
    Pipeline,
}

/// Where a value of the envelope comes from: a JSONPath, a header, or a template.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ValueFrom {
    #[serde(default)]
    pub path: Option<Spanned<String>>,
    /// A transport header or property, e.g. `x-correlation-id`.
    #[serde(default)]
    pub header: Option<String>,
    #[serde(default)]
    pub template: Option<Spanned<String>>,
}

#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EnvelopeConfig {
    /// Where the correlation id comes from; generated when absent or empty.
    #[serde(default)]
    pub correlation_id: Option<Spanned<ValueFrom>>,
    /// Template of the idempotency key, e.g. `{channel}:{$.id}`. A message without one fails.
    #[serde(default)]
    pub idempotency_key: Option<Spanned<String>>,
}

#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExceptionPolicy {
    /// Remediation hint per reason code, copied onto each exception record with that reason.
    #[serde(default)]
    pub hints: IndexMap<String, Spanned<String>>,
    /// Hint for reasons without their own.
    #[serde(default)]
    pub default_hint: Option<String>,
}

/// Duplicate stopping: a message whose idempotency key (`envelope.idempotency_key`, or the key
/// an upstream pipeline gave it) was already delivered is not delivered again.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct IdempotencyConfig {
    /// What becomes of a duplicate: `drop` (counted, the default) or the name of a sink that
    /// gets it instead of the route's sinks (an audit file, say).
    #[serde(default)]
    pub duplicates: Option<Spanned<String>>,
    /// How long a delivered key is remembered (default `30d`). A duplicate arriving later is
    /// delivered again.
    #[serde(default)]
    pub retention: Option<Spanned<String>>,
    /// The key space: pipelines with the same scope stop each other's duplicates (a webhook and a
    /// poller of the same orders). Default: the pipeline's name.
    #[serde(default)]
    pub scope: Option<Spanned<String>>,
}

/// What becomes of a duplicate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Duplicates {
    Drop,
    /// To this sink (an index into `Pipeline::sinks`) instead of the route's.
    Sink(usize),
}

/// Duplicate stopping, checked and with defaults applied.
#[derive(Debug, Clone, PartialEq)]
pub struct Idempotency {
    pub scope: Arc<str>,
    pub retention: std::time::Duration,
    pub duplicates: Duplicates,
}

impl Idempotency {
    const DEFAULT_RETENTION: std::time::Duration = std::time::Duration::from_secs(30 * 24 * 3600);

    fn build(
        c: &Spanned<IdempotencyConfig>,
        config: &PipelineConfig,
        source: Option<&SourceConfig>,
        sink_names: &[String],
        cx: &BuildContext,
        diags: &mut Diags,
    ) -> Option<Idempotency> {
        // Messages from a queue may carry the key an upstream pipeline gave them.
        let keyed_upstream = matches!(source, Some(SourceConfig::Queue(_) | SourceConfig::Amqp(_)));
        let before = diags.0.len();
        if config.envelope.idempotency_key.is_none() && !keyed_upstream {
            diags.push(
                cx.diag(DiagCode::MissingKey, c.span, "idempotency", "duplicate stopping needs an idempotency key")
                    .hint("add the key under `envelope:`, e.g.\nenvelope:\n  idempotency_key: \"{channel}:{$.id}\""),
            );
        }
        let duplicates = match &c.value.duplicates {
            None => Duplicates::Drop,
            Some(d) if d.value == "drop" => Duplicates::Drop,
            Some(d) => match sink_names.iter().position(|s| *s == d.value) {
                Some(i) => Duplicates::Sink(i),
                None => {
                    let mut known: Vec<&str> = vec!["drop"];
                    known.extend(sink_names.iter().map(String::as_str));
                    diags.push(
                        cx.diag(
                            DiagCode::UndeclaredSink,
                            d.span,
                            "idempotency.duplicates",
                            format!("`{}` is neither `drop` nor a sink declared under `sinks:`", d.shown()),
                        )
                        .expected(format!("`drop` or a declared sink: {}", crate::config::diag::one_of(&known[1..])))
                        .hint_opt(crate::config::diag::suggestion(&d.value, known.iter().copied())),
                    );
                    Duplicates::Drop
                }
            },
        };
        let retention = c
            .value
            .retention
            .as_ref()
            .and_then(|r| {
                let range = std::time::Duration::from_secs(1)..=std::time::Duration::MAX;
                diags.take(cx.duration(r, "idempotency.retention", range, "a duration such as `7d`, `30d` or `12h`"))
            })
            .unwrap_or(Self::DEFAULT_RETENTION);
        let scope = match &c.value.scope {
            None => config.name.value.clone(),
            Some(s) if !s.value.trim().is_empty() => s.value.trim().to_string(),
            Some(s) => {
                diags.push(
                    cx.diag(DiagCode::InvalidValue, s.span, "idempotency.scope", "the scope is empty")
                        .expected("a name, e.g. `shopify-orders`"),
                );
                String::new()
            }
        };
        if diags.0.len() > before {
            return None;
        }
        Some(Idempotency { scope: Arc::from(scope), retention, duplicates })
    }
}

/// Event ordering per entity: an event older than the last one applied for its entity is stale;
/// an event that needs an earlier one (a cancellation before its order) waits for it.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OrderingConfig {
    /// Template of the entity key, e.g. `"{channel}:{$.order_id}"`.
    pub key: Spanned<String>,
    /// JSONPath to the event's version or time in the input: a number (a sequence, a version)
    /// or a date-time (`updated_at`).
    pub version: Spanned<String>,
    /// What becomes of a stale event: `drop` (counted, the default) or `exception` (kept as a
    /// `stale_event` record, which can be looked at and replayed).
    #[serde(default)]
    pub stale: Option<Spanned<String>>,
    /// A JSONPath condition on the input for events that need an earlier event of their entity,
    /// e.g. `$.kind == 'cancellation'`. They wait until one was applied.
    #[serde(default)]
    pub needs_previous: Option<Spanned<String>>,
    /// How long such an event waits (default `10m`); then it is a `missing_predecessor` exception.
    #[serde(default)]
    pub wait_for_previous: Option<Spanned<String>>,
    /// The key space (default: the pipeline's name): pipelines with the same scope order events
    /// of the same entities together.
    #[serde(default)]
    pub scope: Option<Spanned<String>>,
}

/// Event ordering, built.
pub struct Ordering {
    pub scope: Arc<str>,
    key: Template,
    version: CompiledPath,
    pub stale_to_exception: bool,
    needs_previous: Option<crate::jsonpath::Condition>,
    pub wait_for_previous: std::time::Duration,
}

impl Ordering {
    fn build(c: &OrderingConfig, name: &str, cx: &BuildContext, diags: &mut Diags) -> Option<Ordering> {
        let key = diags.take(cx.template(&c.key, "ordering.key"));
        let version = diags.take(cx.jsonpath(&c.version, "ordering.version"));
        let needs_previous = c.needs_previous.as_ref().map(|n| diags.take(cx.condition(n, "ordering.needs_previous")));
        let stale_to_exception = match &c.stale {
            None => false,
            Some(s) if s.value == "drop" => false,
            Some(s) if s.value == "exception" => true,
            Some(s) => {
                diags.push(
                    cx.diag(
                        DiagCode::InvalidValue,
                        s.span,
                        "ordering.stale",
                        format!("`{}` is not what to do with a stale event", s.shown()),
                    )
                    .expected("`drop` or `exception`")
                    .hint_opt(crate::config::diag::suggestion(&s.value, ["drop", "exception"])),
                );
                false
            }
        };
        let wait_for_previous = c
            .wait_for_previous
            .as_ref()
            .and_then(|w| {
                let range = std::time::Duration::from_millis(1)..=std::time::Duration::MAX;
                diags.take(cx.duration(w, "ordering.wait_for_previous", range, "a duration such as `30s`, `10m`, `1h`"))
            })
            .unwrap_or(std::time::Duration::from_secs(600));
        let scope = c.scope.as_ref().map(|s| s.value.trim().to_string()).filter(|s| !s.is_empty()).unwrap_or_else(|| name.to_string());
        Some(Ordering {
            scope: Arc::from(scope),
            key: key?,
            version: version?,
            stale_to_exception,
            needs_previous: match needs_previous {
                None => None,
                Some(n) => Some(n?),
            },
            wait_for_previous,
        })
    }
}

/// How two versions of an entity compare: as numbers when both are, as date-times when both
/// are, else as text.
pub fn compare_versions(a: &str, b: &str) -> std::cmp::Ordering {
    if let (Ok(x), Ok(y)) = (a.parse::<rust_decimal::Decimal>(), b.parse::<rust_decimal::Decimal>()) {
        return x.cmp(&y);
    }
    if let (Ok(x), Ok(y)) = (chrono::DateTime::parse_from_rfc3339(a), chrono::DateTime::parse_from_rfc3339(b)) {
        return x.cmp(&y);
    }
    a.cmp(b)
}

/// How the runtime runs a pipeline. Every setting has a default.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RuntimeConfig {
    /// Batches this pipeline processes at once (default 1, which keeps the order of its queue).
    #[serde(default)]
    pub concurrency: Option<Spanned<u32>>,
    /// Messages taken from the queue at a time (default 256).
    #[serde(default)]
    pub batch_size: Option<Spanned<u32>>,
    /// How long a message being processed stays hidden; one not settled by then (its engine died)
    /// is delivered again (default `30s`).
    #[serde(default)]
    pub visibility_timeout: Option<Spanned<String>>,
    /// Deliveries before a message that never completes goes to exceptions as
    /// `too_many_attempts` (default 5).
    #[serde(default)]
    pub max_attempts: Option<Spanned<u32>>,
    /// How often a `file` source looks for new files (default `1s`).
    #[serde(default)]
    pub poll_interval: Option<Spanned<String>>,
    /// At most this many messages per second, minute or hour taken from the source (a partner's
    /// share); the rest wait in the queue.
    #[serde(default)]
    pub rate_limit: Option<crate::runtime::delivery::RateLimitConfig>,
}

/// The runtime settings, checked and with defaults applied.
#[derive(Debug, Clone, PartialEq)]
pub struct RuntimeSettings {
    pub concurrency: usize,
    pub batch_size: usize,
    pub visibility_timeout: std::time::Duration,
    pub max_attempts: u32,
    pub poll_interval: std::time::Duration,
}

impl Default for RuntimeSettings {
    fn default() -> Self {
        RuntimeSettings {
            concurrency: 1,
            batch_size: 256,
            visibility_timeout: std::time::Duration::from_secs(30),
            max_attempts: 5,
            poll_interval: std::time::Duration::from_secs(1),
        }
    }
}

impl RuntimeSettings {
    fn build(c: &RuntimeConfig, cx: &BuildContext, diags: &mut Diags) -> RuntimeSettings {
        let mut s = RuntimeSettings::default();
        let mut int = |v: &Option<Spanned<u32>>, key: &str, range: std::ops::RangeInclusive<u32>| -> Option<u32> {
            let v = v.as_ref()?;
            if range.contains(&v.value) {
                Some(v.value)
            } else {
                diags.push(cx.out_of_range(v.span, &format!("runtime.{key}"), key, v.value, range));
                None
            }
        };
        if let Some(n) = int(&c.concurrency, "concurrency", 1..=64) {
            s.concurrency = n as usize;
        }
        if let Some(n) = int(&c.batch_size, "batch_size", 1..=10_000) {
            s.batch_size = n as usize;
        }
        if let Some(n) = int(&c.max_attempts, "max_attempts", 1..=1000) {
            s.max_attempts = n;
        }
        let mut duration = |v: &Option<Spanned<String>>, key: &str| -> Option<std::time::Duration> {
            let v = v.as_ref()?;
            match humantime::parse_duration(v.value.trim()) {
                Ok(d) if !d.is_zero() => Some(d),
                Ok(_) => {
                    diags.push(cx.diag(DiagCode::InvalidValue, v.span, &format!("runtime.{key}"), format!("`{key}` cannot be zero")));
                    None
                }
                Err(e) => {
                    diags.push(
                        cx.diag(
                            DiagCode::InvalidValue,
                            v.span,
                            &format!("runtime.{key}"),
                            format!("`{}` is not a duration: {e}", v.shown()),
                        )
                        .expected("a duration such as `500ms`, `30s`, `5m`"),
                    );
                    None
                }
            }
        };
        if let Some(d) = duration(&c.visibility_timeout, "visibility_timeout") {
            s.visibility_timeout = d;
        }
        if let Some(d) = duration(&c.poll_interval, "poll_interval") {
            s.poll_interval = d;
        }
        s
    }
}

/// A pipeline file.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(title = "Switchyard pipeline", description = "One pipeline: source -> validate -> map -> route -> sinks.")]
pub struct PipelineConfig {
    #[serde(rename = "apiVersion")]
    pub api_version: ApiVersion,
    pub kind: PipelineKind,
    /// Unique name: lowercase letters, digits, `-` and `_`.
    pub name: Spanned<String>,
    /// Version of this pipeline, stamped on every output.
    pub version: String,
    pub description: String,
    /// Who answers for this pipeline (team or person).
    pub owner: String,
    /// The channel its messages come from (shopify, amazon, pos ...), stamped on every message.
    #[serde(default)]
    pub channel: Option<String>,
    pub source: Component<SourceConfig>,
    /// RabbitMQ, for `amqp` sources and sinks: the URL and the topology to declare.
    #[serde(default)]
    pub broker: Option<crate::amqp::config::BrokerConfig>,
    #[serde(default)]
    pub envelope: EnvelopeConfig,
    /// Stops duplicates by their idempotency key.
    #[serde(default)]
    pub idempotency: Option<Spanned<IdempotencyConfig>>,
    /// Orders events per entity: stale ones are dropped, early ones wait for their predecessor.
    #[serde(default)]
    pub ordering: Option<OrderingConfig>,
    /// `true`: record where each message is, by correlation id (received, delivered with its
    /// sinks' milestones, failed with its reason), for `GET /status/...` on the engine's HTTP
    /// server. Events are kept 30 days.
    #[serde(default)]
    pub track: Option<bool>,
    /// Checks of the message as received.
    #[serde(default)]
    pub validate: Vec<Component<ValidateStepConfig>>,
    /// Steps that build the output record, in order.
    #[serde(default)]
    pub map: Vec<Component<MapStepConfig>>,
    /// Which sinks get the record; may be left out when there is one sink.
    #[serde(default)]
    pub route: Option<RouteConfig>,
    /// Named outputs.
    pub sinks: Spanned<IndexMap<String, Component<SinkConfig>>>,
    #[serde(default)]
    pub exceptions: ExceptionPolicy,
    /// How the runtime runs it: concurrency, batch size, redelivery.
    #[serde(default)]
    pub runtime: RuntimeConfig,
}

enum Correlation {
    Generated,
    Path(CompiledPath),
    Header(String),
    Template(Template),
}

/// Warnings for `exceptions.hints` keys that no part of the pipeline gives as a reason: a
/// misspelt key would otherwise silently never apply.
fn unknown_hint_reasons(config: &PipelineConfig, steps: &[Box<dyn MapStep>], cx: &BuildContext) -> Vec<Diagnostic> {
    let mut reasons = crate::map::Reasons::default();
    for s in steps {
        s.reasons(&mut reasons);
    }
    if reasons.open {
        return Vec::new();
    }
    let mut known: Vec<&str> = reason::ENGINE.to_vec();
    for r in &reasons.names {
        if !known.contains(&r.as_str()) {
            known.push(r);
        }
    }
    // The key, not the value: a hint is often a multi-line block.
    let tree = yaml::parse_plain(&cx.file).ok();
    config
        .exceptions
        .hints
        .iter()
        .filter(|(k, _)| !known.contains(&k.as_str()))
        .map(|(k, v)| {
            let key_path = format!("exceptions.hints.{k}");
            let suggestion = crate::config::diag::suggestion(k, known.iter().copied());
            let span = tree.as_ref().and_then(|t| t.span_of_path(&key_path)).unwrap_or(v.span);
            cx.diag(
                DiagCode::UnknownReason,
                span,
                &key_path,
                format!("no step of this pipeline fails with reason `{k}`, so this hint never applies"),
            )
            .hint(suggestion.unwrap_or_else(|| format!("reasons this pipeline gives: {}", known.join(", "))))
            .warning()
        })
        .collect()
}

/// A built pipeline, ready to process messages.
pub struct Pipeline {
    pub name: String,
    pub version: String,
    pub description: String,
    pub owner: String,
    pub channel: Option<String>,
    pub file: PathBuf,
    /// Folder of the pipeline file: relative source paths start here.
    pub dir: PathBuf,
    pub source: SourceConfig,
    pub sinks: Vec<(String, SinkConfig)>,
    /// RabbitMQ, when the source or a sink is `amqp`.
    pub broker: Option<BrokerPlan>,
    /// The `http` source, compiled.
    pub http_source: Option<Arc<crate::source::http::HttpEndpoint>>,
    /// The `http_poll` source, compiled.
    pub poll_source: Option<Arc<crate::source::poll::PollPlan>>,
    /// Per sink (as `sinks`): where the record goes next once an `http` sink's receiver answered
    /// (its `reply.to`).
    pub reply_to: Vec<Option<usize>>,
    /// The `http` sinks by name, compiled.
    pub http_targets: IndexMap<String, Arc<HttpTarget>>,
    /// Per sink (as `sinks`): retry policy, circuit breaker and rate limit. The runtime keeps
    /// the ones of the version it started (their state lives across reloads).
    pub deliveries: Vec<Arc<crate::runtime::delivery::Delivery>>,
    correlation: Correlation,
    idempotency_key: Option<Template>,
    /// Duplicate stopping, when declared.
    pub idempotency: Option<Idempotency>,
    /// Event ordering, when declared.
    pub ordering: Option<Ordering>,
    /// `track: true`: events for the status API.
    pub track: bool,
    /// `runtime.rate_limit`: how fast messages are taken from the source. The runtime keeps the
    /// one of the version it started.
    pub source_rate: Option<Arc<crate::runtime::delivery::RateLimit>>,
    validate: Vec<SchemaCheck>,
    steps: Vec<Box<dyn MapStep>>,
    router: Router,
    hints: IndexMap<String, String>,
    default_hint: Option<String>,
    /// Problems that do not stop the pipeline, e.g. a hint for a reason nothing gives.
    pub warnings: Vec<Diagnostic>,
    pub runtime: RuntimeSettings,
    pub mapping_versions: Arc<IndexMap<String, String>>,
    /// Name, version and channel as every message's metadata shares them.
    shared_meta: (Arc<str>, Arc<str>, Option<Arc<str>>),
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Pipeline({}@{})", self.name, self.version)
    }
}

/// What became of one message.
// Routing is the common case: boxing it would cost an allocation per message.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Outcome {
    /// The record, and the sinks (indexes into `Pipeline::sinks`) it goes to.
    Routed {
        output: Output,
        sinks: Vec<usize>,
    },
    Failed(Box<ExceptionRecord>),
}

/// The setting that carries every `queue` source and sink over RabbitMQ instead of the embedded
/// store: `SWITCHYARD_BROKER=amqp://...`.
pub const BROKER_SETTING: &str = "SWITCHYARD_BROKER";

impl Pipeline {
    /// The pipeline with its `queue` source and sinks carried by RabbitMQ at `url`. Queue `X` is
    /// a fanout exchange `X`; each pipeline reading `X` has its own queue `X.<pipeline>` bound to
    /// it (so every reader gets every message, as on the embedded store), with retry queues and a
    /// dead-letter queue. A pipeline with its own `broker:` keeps its URL.
    pub fn over_broker(mut self, url: &str) -> Pipeline {
        use crate::amqp::config::{AmqpSinkConfig, AmqpSourceConfig, ExchangeType};
        use crate::amqp::topology::{Binding, DEFAULT_PREFETCH, DEFAULT_RETRY_DELAYS};
        let reads_queue = matches!(self.source, SourceConfig::Queue(_));
        if !reads_queue && !self.sinks.iter().any(|(_, s)| matches!(s, SinkConfig::Queue(_))) {
            return self;
        }
        let mut plan = self.broker.take().unwrap_or_else(|| BrokerPlan {
            url: url.to_string(),
            heartbeat: std::time::Duration::from_secs(30),
            topology: Arc::default(),
            source: None,
            targets: IndexMap::new(),
        });
        let mut topology = (*plan.topology).clone();
        if let SourceConfig::Queue(q) = &self.source {
            let exchange = q.queue.value.clone();
            let queue = format!("{exchange}.{}", self.name);
            topology.add_exchange(&exchange, ExchangeType::Fanout);
            plan.source = Some(topology.add_source(&queue, DEFAULT_PREFETCH, &DEFAULT_RETRY_DELAYS, None));
            topology.bindings.push(Binding { exchange, queue: queue.clone(), routing_key: String::new(), arguments: vec![] });
            self.source =
                SourceConfig::Amqp(AmqpSourceConfig { queue: Spanned::new(queue), prefetch: None, retry: None, dead_letter_queue: None });
        }
        for (name, sink) in &mut self.sinks {
            if let SinkConfig::Queue(q) = sink {
                let exchange = q.queue.value.clone();
                let format = q.format.unwrap_or(crate::sink::OutputFormat::Payload);
                topology.add_exchange(&exchange, ExchangeType::Fanout);
                plan.targets.insert(name.clone(), crate::amqp::publish::PublishTarget::fixed(&exchange, "", format));
                *sink = SinkConfig::Amqp(Box::new(AmqpSinkConfig {
                    exchange: Some(Spanned::new(exchange)),
                    routing_key: None,
                    persistent: None,
                    mandatory: None,
                    format: Some(format),
                    retry: None,
                    circuit_breaker: None,
                    rate_limit: None,
                }));
            }
        }
        plan.topology = Arc::new(topology);
        self.broker = Some(plan);
        self
    }
}

fn no_broker(cx: &BuildContext, span: crate::config::Span, at: &str) -> Diagnostic {
    cx.diag(DiagCode::MissingKey, span, at, "an `amqp` source or sink needs the pipeline's `broker:`")
        .hint("add at the top level:\nbroker:\n  url: ${SWITCHYARD_AMQP_URL}")
}

/// RabbitMQ as a pipeline uses it.
#[derive(Debug, Clone)]
pub struct BrokerPlan {
    /// The URL with its password: never shown (see [`crate::amqp::redact`]).
    pub url: String,
    pub heartbeat: std::time::Duration,
    pub topology: Arc<crate::amqp::Topology>,
    pub source: Option<crate::amqp::topology::SourcePlan>,
    /// Each `amqp` sink's target, by sink name.
    pub targets: IndexMap<String, crate::amqp::publish::PublishTarget>,
}

impl BrokerPlan {
    fn build(
        b: &crate::amqp::config::BrokerConfig,
        source: Option<&crate::amqp::config::AmqpSourceConfig>,
        cx: &BuildContext,
        diags: &mut Diags,
    ) -> BrokerPlan {
        let url = b.url.value.trim().to_string();
        if !(url.starts_with("amqp://") || url.starts_with("amqps://")) || url.parse::<lapin::uri::AMQPUri>().is_err() {
            diags.push(
                cx.diag(
                    DiagCode::InvalidValue,
                    b.url.span,
                    "broker.url",
                    format!("`{}` is not an AMQP URL", crate::amqp::redact(b.url.shown())),
                )
                .expected("amqp://user:password@host:5672/vhost (amqps:// for TLS), e.g. ${SWITCHYARD_AMQP_URL}"),
            );
        }
        let heartbeat = match &b.heartbeat {
            None => std::time::Duration::from_secs(30),
            Some(h) => match humantime::parse_duration(h.value.trim()) {
                Ok(d) if d >= std::time::Duration::from_secs(1) => d,
                _ => {
                    diags.push(
                        cx.diag(DiagCode::InvalidValue, h.span, "broker.heartbeat", format!("`{}` is not a heartbeat interval", h.shown()))
                            .expected("a duration of a second or more, e.g. `30s`"),
                    );
                    std::time::Duration::from_secs(30)
                }
            },
        };
        let mut found = Vec::new();
        let (topology, source) = crate::amqp::Topology::build(b, source, cx, &mut found);
        diags.extend(found);
        BrokerPlan { url, heartbeat, topology: Arc::new(topology), source, targets: IndexMap::new() }
    }
}

fn check_queue_name(name: &Spanned<String>, key_path: &str, cx: &BuildContext, diags: &mut Diags) {
    if !crate::source::queue::valid_queue_name(&name.value) {
        diags.push(
            cx.diag(DiagCode::InvalidValue, name.span, key_path, format!("`{}` is not a valid queue name", name.shown()))
                .expected("lowercase letters, digits, `.`, `-` and `_`, not starting with `_`, e.g. `orders.canonical`"),
        );
    }
}

fn valid_name(s: &str) -> bool {
    s.chars().next().is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
}

impl Pipeline {
    /// Builds a pipeline from its parsed config: resolves every component and compiles every
    /// JSONPath, template, schema and script. Every problem is reported.
    pub fn build(config: &PipelineConfig, cx: &BuildContext) -> Result<Pipeline, Vec<Diagnostic>> {
        let mut diags = Diags::default();
        let file = &cx.file;
        if !valid_name(&config.name.value) {
            diags.push(
                cx.diag(
                    DiagCode::InvalidValue,
                    config.name.span,
                    "name",
                    format!("`{}` is not a valid pipeline name", config.name.shown()),
                )
                .expected("lowercase letters, digits, `-` and `_`, e.g. `shopify-orders`"),
            );
        }
        let source = diags.take_all(config.source.resolve(file));
        if let Some(SourceConfig::File(f)) = &source {
            let path = cx.resolve(&f.path.value);
            if !path.exists() {
                diags.push(
                    cx.diag(DiagCode::FileNotFound, f.path.span, "source.path", format!("source path `{}` does not exist", f.path.shown()))
                        .hint(format!("paths are relative to the folder of {}", file.path.display())),
                );
            }
        }
        if let Some(SourceConfig::Queue(q)) = &source {
            check_queue_name(&q.queue, "source.queue", cx, &mut diags);
        }
        let http_source = match &source {
            Some(SourceConfig::Http(h)) => {
                crate::source::http::HttpEndpoint::build(h, config.channel.as_deref(), cx, &mut diags).map(Arc::new)
            }
            _ => None,
        };
        let poll_source = match &source {
            Some(SourceConfig::HttpPoll(c)) => crate::source::poll::PollPlan::build(c, cx, &mut diags).map(Arc::new),
            _ => None,
        };
        let runtime = RuntimeSettings::build(&config.runtime, cx, &mut diags);
        let mut broker = config.broker.as_ref().map(|b| {
            let source = match &source {
                Some(SourceConfig::Amqp(s)) => Some(s),
                _ => None,
            };
            BrokerPlan::build(b, source, cx, &mut diags)
        });
        if broker.is_none()
            && let Some(SourceConfig::Amqp(s)) = &source
        {
            diags.push(no_broker(cx, s.queue.span, "source"));
        }
        let mut sinks = Vec::new();
        let mut deliveries = Vec::new();
        let mut http_targets = IndexMap::new();
        for (name, c) in config.sinks.iter() {
            if !valid_name(name) {
                diags.push(
                    cx.diag(
                        DiagCode::InvalidValue,
                        c.raw.node.span,
                        &format!("sinks.{name}"),
                        format!("`{name}` is not a valid sink name"),
                    )
                    .expected("lowercase letters, digits, `-` and `_`"),
                );
            }
            if let Some(s) = diags.take_all(c.resolve(file)) {
                if let SinkConfig::Amqp(a) = &s {
                    match broker.as_mut() {
                        None => diags.push(no_broker(cx, c.raw.node.span, &format!("sinks.{name}"))),
                        Some(b) => {
                            if let Some(t) = diags.take_all(crate::amqp::publish::PublishTarget::build(a, &format!("sinks.{name}"), cx)) {
                                if let Some(x) = t.fixed_exchange()
                                    && !x.starts_with("amq.")
                                    && !b.topology.exchanges.iter().any(|e| e.name == x)
                                {
                                    Arc::make_mut(&mut b.topology).expected_exchanges.push(x.to_string());
                                }
                                b.targets.insert(name.clone(), t);
                            }
                        }
                    }
                }
                if let SinkConfig::Http(h) = &s
                    && let Some(t) = diags.take_all(HttpTarget::build(h, &format!("sinks.{name}"), cx))
                {
                    http_targets.insert(name.clone(), Arc::new(t));
                }
                use crate::runtime::delivery::Delivery;
                deliveries.push(Arc::new(match s.delivery_config() {
                    Some(c) => Delivery::build(&c, &format!("sinks.{name}"), runtime.max_attempts, cx, &mut diags),
                    None => Delivery::plain(runtime.max_attempts),
                }));
                if let SinkConfig::Queue(q) = &s {
                    check_queue_name(&q.queue, &format!("sinks.{name}.queue"), cx, &mut diags);
                    // Outputs of a RabbitMQ-fed pipeline are acknowledged through the broker; the
                    // embedded queues are written in the store's commits. With SWITCHYARD_BROKER
                    // set, queues are RabbitMQ's too.
                    if matches!(source, Some(SourceConfig::Amqp(_)))
                        && cx.shared.env.var(BROKER_SETTING).is_none_or(|u| u.trim().is_empty())
                    {
                        diags.push(
                            cx.diag(
                                DiagCode::Conflict,
                                q.queue.span,
                                &format!("sinks.{name}.queue"),
                                "a pipeline with an `amqp` source cannot write an embedded `queue`",
                            )
                            .hint("publish with an `amqp` sink instead, or set SWITCHYARD_BROKER so that queues are RabbitMQ's"),
                        );
                    }
                    if let Some(SourceConfig::Queue(src)) = &source
                        && src.queue.value == q.queue.value
                    {
                        diags.push(
                            cx.diag(
                                DiagCode::Conflict,
                                q.queue.span,
                                &format!("sinks.{name}.queue"),
                                "this sink writes the queue the pipeline reads",
                            )
                            .hint("a pipeline that feeds itself never ends; write another queue"),
                        );
                    }
                }
                sinks.push((name.clone(), s));
            }
        }
        // `reply.to` of an http sink: another declared sink.
        let mut reply_to = vec![None; sinks.len()];
        for (i, (name, s)) in sinks.iter().enumerate() {
            let SinkConfig::Http(h) = s else { continue };
            let Some(r) = &h.reply else { continue };
            let chained = |j: usize| matches!(&sinks[j].1, SinkConfig::Http(t) if t.reply.is_some());
            match sinks.iter().position(|(n, _)| *n == r.to.value) {
                Some(j) if j != i && chained(j) => diags.push(
                    cx.diag(DiagCode::Conflict, r.to.span, &format!("sinks.{name}.reply.to"), format!("`{}` has a `reply:` of its own", r.to.value))
                        .hint("replies do not chain (two could send each other's answers for ever): send the reply to a queue, and let the next pipeline post it"),
                ),
                Some(j) if j != i => reply_to[i] = Some(j),
                Some(_) => diags.push(
                    cx.diag(
                        DiagCode::Conflict,
                        r.to.span,
                        &format!("sinks.{name}.reply.to"),
                        "the reply goes back to the sink that sent it",
                    )
                    .hint("name another sink, e.g. a queue that an acknowledgement pipeline reads"),
                ),
                None => {
                    let names: Vec<&str> = sinks.iter().map(|(n, _)| n.as_str()).collect();
                    let mut d = cx.diag(
                        DiagCode::UndeclaredSink,
                        r.to.span,
                        &format!("sinks.{name}.reply.to"),
                        format!("no sink is named `{}`", r.to.shown()),
                    );
                    if let Some(s) = crate::config::diag::suggestion(&r.to.value, names.iter().copied()) {
                        d = d.hint(s);
                    }
                    diags.push(d.expected(crate::config::diag::one_of(&names)));
                }
            }
        }
        if config.sinks.is_empty() {
            diags.push(
                cx.diag(DiagCode::MissingKey, config.sinks.span, "sinks", "the pipeline declares no sinks")
                    .hint("add at least one under `sinks:`"),
            );
        }
        let correlation = match &config.envelope.correlation_id {
            None => Some(Correlation::Generated),
            Some(v) => match (&v.path, &v.header, &v.template) {
                (Some(p), None, None) => diags.take(cx.jsonpath(p, "envelope.correlation_id.path")).map(Correlation::Path),
                (None, Some(h), None) => Some(Correlation::Header(h.to_ascii_lowercase())),
                (None, None, Some(t)) => diags.take(cx.template(t, "envelope.correlation_id.template")).map(Correlation::Template),
                _ => {
                    diags.push(cx.diag(
                        DiagCode::Conflict,
                        v.span,
                        "envelope.correlation_id",
                        "give exactly one of `path`, `header` or `template`",
                    ));
                    None
                }
            },
        };
        let idempotency_key = config.envelope.idempotency_key.as_ref().and_then(|t| diags.take(cx.template(t, "envelope.idempotency_key")));
        let mut validate = Vec::new();
        for (i, c) in config.validate.iter().enumerate() {
            if let Some(ValidateStepConfig::JsonSchema(s)) = diags.take_all(c.resolve(file))
                && let Some(check) = diags.take(build_schema_check(&s.schema, cx, &format!("validate[{i}].schema"), Document::Input))
            {
                validate.push(check);
            }
        }
        let mut steps = Vec::new();
        for (i, c) in config.map.iter().enumerate() {
            if let Some(step) = diags.take_all(c.resolve(file))
                && let Some(built) = diags.take_all(step.build(cx, &format!("map[{i}]")))
            {
                steps.push(built);
            }
        }
        let sink_names: Vec<String> = config.sinks.keys().cloned().collect();
        let router = match &config.route {
            Some(r) => diags.take_all(Router::build(r, &sink_names, cx)),
            None if sink_names.len() <= 1 => diags.take_all(Router::build(
                &RouteConfig {
                    default: sink_names.first().map(|s| Spanned::new(crate::route::SinkRefs::One(s.clone()))),
                    ..Default::default()
                },
                &sink_names,
                cx,
            )),
            None => {
                diags.push(
                    cx.diag(DiagCode::MissingKey, config.sinks.span, "route", "the pipeline has several sinks but no `route:`")
                        .hint("add `route:` with rules naming the sinks, or a `default:`"),
                );
                None
            }
        };
        let idempotency =
            config.idempotency.as_ref().and_then(|c| Idempotency::build(c, config, source.as_ref(), &sink_names, cx, &mut diags));
        let ordering = config.ordering.as_ref().and_then(|c| Ordering::build(c, &config.name.value, cx, &mut diags));
        let source_rate = config
            .runtime
            .rate_limit
            .as_ref()
            .and_then(|r| crate::runtime::delivery::RateLimit::build(r, "runtime.rate_limit", cx, &mut diags))
            .map(Arc::new);
        let mut versions = IndexMap::new();
        for s in &steps {
            for (n, v) in s.versions() {
                versions.insert(n, v);
            }
        }
        // A part that could not be built has either a diagnostic here, or one from the structure
        // check (it was malformed); either way there is no pipeline.
        let (Some(source), Some(correlation), Some(router)) = (source, correlation, router) else {
            return Err(diags.0);
        };
        if !diags.is_empty() {
            return Err(diags.0);
        }
        let mut warnings = unknown_hint_reasons(config, &steps, cx);
        warnings.extend(cx.take_warnings());
        // A reply's sink that fails sends the whole message again, the receiver's request too:
        // only an idempotency key lets the receiver know it.
        if reply_to.iter().any(Option::is_some) && idempotency_key.is_none() {
            for (name, s) in &sinks {
                if let SinkConfig::Http(h) = s
                    && let Some(r) = &h.reply
                {
                    warnings.push(
                        cx.diag(DiagCode::MissingKey, r.to.span, &format!("sinks.{name}.reply"), "the pipeline has no `envelope.idempotency_key`")
                            .hint("if the reply's sink fails, the message is sent again, this request too: give it a key, e.g. `erp:{$.order_id}`, so that the receiver takes it once")
                            .warning(),
                    );
                }
            }
        }
        Ok(Pipeline {
            name: config.name.value.clone(),
            version: config.version.clone(),
            description: config.description.clone(),
            owner: config.owner.clone(),
            channel: config.channel.clone(),
            file: file.path.clone(),
            dir: cx.dir.clone(),
            source,
            sinks,
            broker,
            http_targets,
            reply_to,
            track: config.track.unwrap_or(false),
            http_source,
            poll_source,
            deliveries,
            correlation,
            idempotency_key,
            idempotency,
            ordering,
            source_rate,
            validate,
            steps,
            router,
            hints: config.exceptions.hints.iter().map(|(k, v)| (k.clone(), v.value.clone())).collect(),
            warnings,
            runtime,
            default_hint: config.exceptions.default_hint.clone(),
            mapping_versions: Arc::new(versions),
            shared_meta: (
                Arc::from(config.name.value.as_str()),
                Arc::from(config.version.as_str()),
                config.channel.as_deref().map(Arc::from),
            ),
        })
    }

    fn metadata(&self, raw: &RawMessage) -> Metadata {
        let message_id = raw.message_id.clone().unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
        Metadata {
            correlation_id: raw.correlation_id.clone().filter(|c| !c.is_empty()).unwrap_or_else(|| message_id.clone()),
            message_id,
            idempotency_key: raw.idempotency_key.clone(),
            channel: self.shared_meta.2.clone().or_else(|| raw.channel.as_deref().map(Arc::from)),
            received_at: raw.received_at.unwrap_or_else(Utc::now),
            pipeline: self.shared_meta.0.clone(),
            pipeline_version: self.shared_meta.1.clone(),
            mapping_versions: self.mapping_versions.clone(),
            attempt: raw.attempt.max(1),
            origin: raw.origin.clone(),
            headers: if raw.headers.is_empty() { Arc::default() } else { Arc::new(raw.headers.clone()) },
            entity: None,
        }
    }

    /// The correlation id the pipeline's `envelope.correlation_id` gives this input, if any.
    fn configured_correlation(&self, input: &Doc, meta: &Metadata) -> Option<String> {
        let scope = Scope::root(input);
        let correlation = match &self.correlation {
            Correlation::Generated => None,
            Correlation::Path(p) => p.first(scope).and_then(|v| match v {
                Doc::String(s) => Some(s.to_string()),
                Doc::Number(n) => Some(n.to_string()),
                _ => None,
            }),
            Correlation::Header(h) => meta.headers.get(h).cloned(),
            Correlation::Template(t) => t.render(scope, &crate::map::StepInput::new(meta, Document::Input)),
        };
        correlation.filter(|c| !c.is_empty())
    }

    /// What a source that answers its sender (the `http` source) knows before the message is
    /// processed: its message id and correlation id, as processing will see them (they are
    /// set on `raw`), and, when `validate_now`, the validate steps' verdict on it.
    pub fn admit(&self, raw: &mut RawMessage, input: &Doc, validate_now: bool) -> Result<(), Failure> {
        let meta = self.metadata(raw);
        raw.correlation_id = Some(self.configured_correlation(input, &meta).unwrap_or(meta.correlation_id));
        raw.message_id = Some(meta.message_id);
        if validate_now {
            for check in &self.validate {
                check.check(input)?;
            }
        }
        Ok(())
    }

    /// Processes one message. Bad data never errors: it comes back as [`Outcome::Failed`].
    pub fn process(&self, raw: RawMessage) -> Outcome {
        let mut meta = self.metadata(&raw);
        if let Some((r, message)) = &raw.decode_error {
            return self.failed(meta, &raw.body, Stage::Source, None, Failure::one(r.clone(), ErrorDetail::input("", message.clone())));
        }
        let input = match raw.parsed {
            Some(ref v) => v.clone(),
            None => match Doc::parse_bytes(&raw.body) {
                Ok(v) => v,
                Err(e) => {
                    let f = Failure::one(reason::INVALID_JSON, ErrorDetail::input("", format!("not valid JSON: {e}")));
                    return self.failed(meta, &raw.body, Stage::Source, None, f);
                }
            },
        };
        // Envelope: correlation id and idempotency key come from the input as received.
        let scope = Scope::root(&input);
        if let Some(c) = self.configured_correlation(&input, &meta) {
            meta.correlation_id = c;
        }
        if let Some(t) = &self.idempotency_key {
            match t.render(scope, &StepInput::new(&meta, Document::Input)) {
                Some(k) => meta.idempotency_key = Some(k),
                None => {
                    let pointer = t.first_path().map(|p| p.nominal_pointer()).unwrap_or_default();
                    let f = Failure::one(
                        reason::MISSING_REQUIRED_FIELD,
                        ErrorDetail::input(pointer, "the idempotency key cannot be built: a value it needs is missing"),
                    );
                    return self.failed(meta, &raw.body, Stage::Source, Some("envelope.idempotency_key".into()), f);
                }
            }
        }
        if let Some(o) = &self.ordering {
            let version = o.version.first(scope).and_then(|v| match v {
                Doc::String(s) => Some(s.to_string()),
                Doc::Number(n) => Some(n.to_string()),
                _ => None,
            });
            let key = o.key.render(scope, &StepInput::new(&meta, Document::Input));
            match (key, version) {
                (Some(key), Some(version)) => {
                    let needs_previous = o.needs_previous.as_ref().is_some_and(|c| c.matches(scope));
                    meta.entity = Some(Arc::new(crate::message::Entity { key, version, needs_previous }));
                }
                (key, _) => {
                    let (what, pointer) = match key {
                        None => ("key", o.key.first_path().map(|p| p.nominal_pointer()).unwrap_or_default()),
                        Some(_) => ("version", o.version.nominal_pointer()),
                    };
                    let f = Failure::one(
                        reason::MISSING_REQUIRED_FIELD,
                        ErrorDetail::input(pointer, format!("the event's ordering {what} cannot be read: a value it needs is missing")),
                    );
                    return self.failed(meta, &raw.body, Stage::Source, Some(format!("ordering.{what}")), f);
                }
            }
        }
        for (i, check) in self.validate.iter().enumerate() {
            if let Err(f) = check.check(&input) {
                return self.failed(meta, &raw.body, Stage::Validate, Some(format!("validate[{i}]")), f);
            }
        }
        let mut record = input;
        let mut document = Document::Input;
        for (i, step) in self.steps.iter().enumerate() {
            let step_input = StepInput::new(&meta, document);
            record = match step.apply(record, &step_input) {
                Ok(r) => r,
                Err(f) => return self.failed(meta, &raw.body, Stage::Map, Some(format!("map[{i}] {}", step.label())), f),
            };
            if step.restructures() {
                document = Document::Record;
            }
        }
        match self.router.route(&record, &StepInput::new(&meta, document)) {
            Ok(sinks) => Outcome::Routed { output: Output { metadata: meta, payload: record }, sinks },
            Err(f) => self.failed(meta, &raw.body, Stage::Route, None, f),
        }
    }

    /// The exception record of a message that failed outside `process` (an input that could not
    /// be read, a crash).
    pub fn failure_record(&self, raw: &RawMessage, stage: Stage, failure: Failure) -> ExceptionRecord {
        self.exception(self.metadata(raw), &raw.body, stage, None, failure)
    }

    /// The exception record of an input the source could not read: the input stays where it is.
    pub fn source_failure(&self, e: &crate::source::SourceError) -> ExceptionRecord {
        let origin = match e {
            crate::source::SourceError::Read { path, .. } => path.display().to_string(),
            crate::source::SourceError::Poll(_) => String::new(),
        };
        let raw = RawMessage { origin: Some(origin).filter(|o| !o.is_empty()), attempt: 1, ..Default::default() };
        self.failure_record(&raw, Stage::Source, Failure::one(reason::UNREADABLE_INPUT, ErrorDetail::input("", e.to_string())))
    }

    /// The exception record of a message that failed a stage, with the configured hint.
    pub fn failed(&self, meta: Metadata, body: &[u8], stage: Stage, step: Option<String>, failure: Failure) -> Outcome {
        Outcome::Failed(Box::new(self.exception(meta, body, stage, step, failure)))
    }

    pub fn exception(&self, meta: Metadata, body: &[u8], stage: Stage, step: Option<String>, failure: Failure) -> ExceptionRecord {
        let hint = self.hints.get(&failure.reason).or(self.default_hint.as_ref()).cloned();
        ExceptionRecord {
            exception_id: uuid::Uuid::now_v7().to_string(),
            pipeline: meta.pipeline.to_string(),
            pipeline_version: meta.pipeline_version.to_string(),
            stage,
            step,
            reason: failure.reason,
            errors: failure.errors,
            hint,
            message_id: meta.message_id,
            correlation_id: meta.correlation_id,
            idempotency_key: meta.idempotency_key,
            channel: meta.channel.as_deref().map(str::to_string),
            received_at: meta.received_at,
            failed_at: Utc::now(),
            attempt: meta.attempt,
            origin: meta.origin,
            mapping_versions: meta.mapping_versions,
            original: OriginalPayload::from_bytes(body),
        }
    }

    pub fn sink_name(&self, index: usize) -> &str {
        &self.sinks[index].0
    }
}
