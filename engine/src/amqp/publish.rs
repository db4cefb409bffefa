//! Publishing: persistent by default, always with publisher confirms, `mandatory` by default so
//! that a message no queue takes comes back and counts as a failure. Confirms are collected and
//! awaited together (pipelined): awaiting each one would cost five times the throughput.

use super::config::AmqpSinkConfig;
use super::{AmqpError, Broker, lapin_message};
use crate::build::BuildContext;
use crate::config::{DiagCode, Diagnostic};
use crate::jsonpath::Scope;
use crate::map::meta_var;
use crate::message::{Metadata, Output};
use crate::sink::{OutputFormat, Sink, SinkError};
use crate::template::{Template, Vars};
use async_trait::async_trait;
use lapin::Confirmation;
use lapin::options::BasicPublishOptions;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel};
use std::sync::Arc;

/// Header names Switchyard sets on what it publishes, and reads back on what it consumes.
pub mod headers {
    pub const IDEMPOTENCY_KEY: &str = "x-switchyard-idempotency-key";
    pub const CHANNEL: &str = "x-switchyard-channel";
    /// `name@version` of the pipeline that published it.
    pub const PIPELINE: &str = "x-switchyard-pipeline";
    /// On dead letters: the version of the pipeline that failed it.
    pub const PIPELINE_VERSION: &str = "x-switchyard-pipeline-version";
    /// `name@version,...` of the mapping files that made it.
    pub const MAPPING_VERSIONS: &str = "x-switchyard-mapping-versions";
    pub const ATTEMPT: &str = "x-switchyard-attempt";
    pub const REASON: &str = "x-switchyard-reason";
    pub const STAGE: &str = "x-switchyard-stage";
    pub const ERRORS: &str = "x-switchyard-errors";
    pub const HINT: &str = "x-switchyard-hint";
    pub const EXCEPTION_ID: &str = "x-switchyard-exception-id";
    pub const FAILED_AT: &str = "x-switchyard-failed-at";
    /// On a message sent to a retry queue: when it first arrived (RFC 3339).
    pub const RECEIVED_AT: &str = "x-switchyard-received-at";
    /// On a replayed message: the exchange and routing key it first came with (a pipeline reads
    /// them as `amqp.exchange` and `amqp.routing_key`, as on its first delivery).
    pub const FIRST_EXCHANGE: &str = "x-switchyard-first-exchange";
    pub const FIRST_ROUTING_KEY: &str = "x-switchyard-first-routing-key";
    /// On a message sent again by `switchyard exceptions replay`: the record it replays.
    pub const REPLAY_OF: &str = "x-switchyard-replay-of";
}

/// Where a sink publishes: fixed, or rendered from each message.
#[derive(Debug, Clone)]
enum Name {
    Fixed(ShortString),
    Template(Template, String),
}

impl Name {
    fn build(v: Option<&crate::config::Spanned<String>>, key: &str, cx: &BuildContext) -> Result<Name, Diagnostic> {
        match v {
            None => Ok(Name::Fixed("".into())),
            Some(s) if !s.value.contains('{') && !s.value.trim_start().starts_with('$') => {
                super::short_name(&s.value, key).map(Name::Fixed).map_err(|e| cx.diag(DiagCode::InvalidValue, s.span, key, e.to_string()))
            }
            Some(s) => Ok(Name::Template(cx.template(s, key)?, s.value.clone())),
        }
    }

    fn render(&self, output: &Output) -> Result<ShortString, String> {
        match self {
            Name::Fixed(s) => Ok(s.clone()),
            Name::Template(t, text) => t
                .render(Scope::root(&output.payload), &MetaVars(&output.metadata))
                .ok_or_else(|| format!("the template `{text}` has no value for this message"))
                .and_then(|s| super::short_name(&s, "rendered name").map_err(|e| e.to_string())),
        }
    }
}

struct MetaVars<'a>(&'a Metadata);

impl Vars for MetaVars<'_> {
    fn var(&self, name: &str) -> Option<&str> {
        meta_var(self.0, name)
    }
}

/// An `amqp` sink, checked.
#[derive(Debug, Clone)]
pub struct PublishTarget {
    exchange: Name,
    routing_key: Name,
    persistent: bool,
    mandatory: bool,
    format: OutputFormat,
}

impl PublishTarget {
    pub fn build(c: &AmqpSinkConfig, at: &str, cx: &BuildContext) -> Result<PublishTarget, Vec<Diagnostic>> {
        let exchange = Name::build(c.exchange.as_ref(), &format!("{at}.exchange"), cx);
        let routing_key = Name::build(c.routing_key.as_ref(), &format!("{at}.routing_key"), cx);
        match (exchange, routing_key) {
            (Ok(exchange), Ok(routing_key)) => Ok(PublishTarget {
                exchange,
                routing_key,
                persistent: c.persistent.unwrap_or(true),
                mandatory: c.mandatory.unwrap_or(true),
                format: c.format.unwrap_or(OutputFormat::Payload),
            }),
            (a, b) => Err([a.err(), b.err()].into_iter().flatten().collect()),
        }
    }

    /// A fixed exchange and routing key, persistent and mandatory.
    pub fn fixed(exchange: &str, routing_key: &str, format: OutputFormat) -> PublishTarget {
        PublishTarget {
            exchange: Name::Fixed(exchange.into()),
            routing_key: Name::Fixed(routing_key.into()),
            persistent: true,
            mandatory: true,
            format,
        }
    }

    /// The exchange when it is fixed and not the default one.
    pub fn fixed_exchange(&self) -> Option<&str> {
        match &self.exchange {
            Name::Fixed(s) if !s.as_str().is_empty() => Some(s.as_str()),
            _ => None,
        }
    }

    /// Exchange and routing key as written, for summaries.
    pub fn describe(&self) -> String {
        let show = |n: &Name| match n {
            Name::Fixed(s) => s.to_string(),
            Name::Template(_, t) => t.clone(),
        };
        let exchange = show(&self.exchange);
        format!("exchange `{}` key `{}`", if exchange.is_empty() { "(default)" } else { &exchange }, show(&self.routing_key))
    }
}

/// The properties of a published output: ids and the first receipt time as AMQP properties, the
/// rest of the envelope in as few headers as say it: RabbitMQ decodes every header table it
/// routes, so each header costs broker CPU on every message (measured: 8 headers instead of 5
/// cost 7 % of the throughput).
pub fn output_properties(meta: &Metadata, persistent: bool) -> BasicProperties {
    let mut h = FieldTable::default();
    let mut text = |k: &str, v: &str| {
        h.insert(k.into(), AMQPValue::LongString(LongString::from(v)));
    };
    if let Some(k) = &meta.idempotency_key {
        text(headers::IDEMPOTENCY_KEY, k);
    }
    if let Some(c) = &meta.channel {
        text(headers::CHANNEL, c);
    }
    text(headers::PIPELINE, &format!("{}@{}", meta.pipeline, meta.pipeline_version));
    if !meta.mapping_versions.is_empty() {
        let versions: Vec<String> = meta.mapping_versions.iter().map(|(n, v)| format!("{n}@{v}")).collect();
        text(headers::MAPPING_VERSIONS, &versions.join(","));
    }
    // The idempotency key is the message id when there is one: receivers that deduplicate by
    // message id (an inbox table, MassTransit, NServiceBus) then stop the same order twice.
    BasicProperties::default()
        .with_message_id(super::short_id(meta.idempotency_key.as_ref().unwrap_or(&meta.message_id)))
        .with_correlation_id(super::short_id(&meta.correlation_id))
        .with_content_type("application/json".into())
        .with_delivery_mode(if persistent { 2 } else { 1 })
        .with_timestamp(meta.received_at.timestamp().max(0) as u64)
        .with_headers(h)
}

/// The broker's answer to one publish, once known.
pub type Confirm = tokio::sync::oneshot::Receiver<Result<(), AmqpError>>;

/// What identifies a publish in a returned message: message id, exchange and routing key.
type PublishKey = (String, String, String);

/// A publish handed to lapin: its frames are queued; it resolves to the broker's confirm once
/// they are written and the broker answered.
type InFlight = std::pin::Pin<Box<dyn std::future::Future<Output = lapin::Result<Confirmation>> + Send>>;

type Published = (PublishKey, InFlight, tokio::sync::oneshot::Sender<Result<(), AmqpError>>);

/// Publishes on one channel in confirm mode and tells each publish its own outcome.
///
/// lapin hands a returned (unroutable) message to whichever confirm completes next, which with
/// the broker's `multiple` acks may be another message's. So confirms are examined in publish
/// order by one task, and a publish counts as returned when any confirm brought back a message
/// with its message id, exchange and routing key: a return always reaches the client before
/// the ack of the same message. (An id header would say it too, but every header costs broker
/// CPU on every message.)
pub struct Publisher {
    channel: Channel,
    connection: lapin::ConnectionStatus,
    /// Set when a wait on the broker was given up (the connection looked up but did not answer):
    /// the session is then dead whatever lapin says, and the next one connects again.
    gave_up: Arc<std::sync::atomic::AtomicBool>,
    /// Held while a publish takes its sequence number and is handed to the collector (never
    /// across an await).
    order: std::sync::Mutex<()>,
    collector: tokio::sync::mpsc::UnboundedSender<Published>,
}

impl Publisher {
    pub fn is_open(&self) -> bool {
        self.channel.status().connected() && !self.gave_up.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The status of the connection it publishes on.
    pub fn connection(&self) -> &lapin::ConnectionStatus {
        &self.connection
    }

    pub fn new(channel: Channel, connection: lapin::ConnectionStatus) -> Publisher {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let gave_up = Arc::new(std::sync::atomic::AtomicBool::new(false));
        tokio::spawn(collect(rx, connection.clone(), gave_up.clone()));
        Publisher { channel, connection, gave_up, order: std::sync::Mutex::new(()), collector: tx }
    }

    /// Publishes one message; its confirm is awaited later, with others (pipelined). A message
    /// without a message id gets one, so that a return can be told apart.
    ///
    /// The publish is not awaited here either: lapin resolves a publish only once its I/O thread
    /// has written the frames, and waiting for that per message cost a thread hand-off each
    /// (the engine spent as much CPU per message as a relay that acks each message). Its first
    /// poll takes the confirm's sequence number and queues the frames, in the order the lock
    /// gives; the collector awaits the rest, so the frames of a whole batch go out together.
    pub fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        mandatory: bool,
        body: Vec<u8>,
        mut properties: BasicProperties,
    ) -> Result<Confirm, AmqpError> {
        let message_id = match properties.message_id() {
            Some(id) => id.to_string(),
            None => {
                let id = uuid::Uuid::now_v7().to_string();
                properties = properties.with_message_id(id.as_str().into());
                id
            }
        };
        let (exchange_name, key_name) = (super::short_name(exchange, "exchange name")?, super::short_name(routing_key, "routing key")?);
        let channel = self.channel.clone();
        let mut publish: InFlight = Box::pin(async move {
            let options = BasicPublishOptions { mandatory, ..Default::default() };
            let written = channel.basic_publish(exchange_name, key_name, options, &body, properties).await;
            // lapin wrote its own copy: the body is not held until the confirm.
            drop(body);
            written?.await
        });
        // Held until the confirm is queued, so that the collector sees publish order.
        let _order = self.order.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut first_poll = std::task::Context::from_waker(std::task::Waker::noop());
        if let std::task::Poll::Ready(answer) = publish.as_mut().poll(&mut first_poll) {
            // Answered at once: refused before anything was sent (a closed channel), or already
            // written and confirmed.
            let answer = answer.map_err(|e| AmqpError::Lost(lapin_message(&e)))?;
            publish = Box::pin(std::future::ready(Ok(answer)));
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        let key = (message_id, exchange.to_string(), routing_key.to_string());
        self.collector.send((key, publish, tx)).map_err(|_| AmqpError::Lost("the publisher stopped".into()))?;
        Ok(rx)
    }
}

/// Waits for a publish's confirm: a nack, or the message returned as unroutable, is a failure.
pub async fn confirmed(confirm: Confirm) -> Result<(), AmqpError> {
    confirm.await.unwrap_or_else(|_| Err(AmqpError::Lost("the connection closed before the broker confirmed".into())))
}

fn returned_key(m: &lapin::message::BasicReturnMessage) -> PublishKey {
    (
        m.delivery.properties.message_id().as_ref().map(|s| s.to_string()).unwrap_or_default(),
        m.delivery.exchange.to_string(),
        m.delivery.routing_key.to_string(),
    )
}

fn returned_error(returned: &lapin::message::BasicReturnMessage) -> AmqpError {
    AmqpError::Refused(format!(
        "no queue took the message published to exchange `{}` with routing key `{}` ({}: {}); bind a queue for it",
        if returned.delivery.exchange.as_str().is_empty() { "(default)" } else { returned.delivery.exchange.as_str() },
        returned.delivery.routing_key,
        returned.reply_code,
        returned.reply_text
    ))
}

/// A confirm once resolved, its returned message (if it carried one) taken out.
enum Resolved {
    Ack,
    Nack,
    Failed(String),
}

/// The collector: confirms in publish order; before answering one, every confirm already
/// resolved is looked at too, for returned messages it may carry for others.
async fn collect(
    mut rx: tokio::sync::mpsc::UnboundedReceiver<Published>,
    connection: lapin::ConnectionStatus,
    gave_up: Arc<std::sync::atomic::AtomicBool>,
) {
    use futures_util::FutureExt;
    let mut queue: std::collections::VecDeque<(Published, Option<Resolved>)> = std::collections::VecDeque::new();
    // Returns not yet matched to their publish, by key (with how many).
    let mut returned: std::collections::HashMap<PublishKey, (usize, AmqpError)> = std::collections::HashMap::new();
    let mut lost: Option<String> = None;
    fn harvest(result: lapin::Result<Confirmation>, returned: &mut std::collections::HashMap<PublishKey, (usize, AmqpError)>) -> Resolved {
        let (resolved, message) = match result {
            Ok(Confirmation::Ack(m)) => (Resolved::Ack, m),
            Ok(Confirmation::NotRequested) => (Resolved::Ack, None),
            Ok(Confirmation::Nack(m)) => (Resolved::Nack, m),
            Err(e) => (Resolved::Failed(lapin_message(&e)), None),
        };
        if let Some(m) = message {
            returned.entry(returned_key(&m)).or_insert_with(|| (0, returned_error(&m))).0 += 1;
        }
        resolved
    }
    loop {
        if queue.is_empty() {
            match rx.recv().await {
                Some(p) => queue.push_back((p, None)),
                None => return,
            }
        }
        while let Ok(p) = rx.try_recv() {
            queue.push_back((p, None));
        }
        let front = queue.front_mut().expect("non-empty");
        if front.1.is_none() {
            // Once the connection is found lost, the confirms still unanswered fail at once.
            let answer = match &lost {
                None => super::unless_lost(&connection, "waiting for a publisher confirm", &mut front.0.1).await,
                Some(why) => (&mut front.0.1).now_or_never().ok_or_else(|| AmqpError::Lost(why.clone())),
            };
            front.1 = Some(match answer {
                Ok(result) => harvest(result, &mut returned),
                Err(e) => {
                    let why = match e {
                        AmqpError::Lost(why) => why,
                        other => other.to_string(),
                    };
                    lost = Some(why.clone());
                    gave_up.store(true, std::sync::atomic::Ordering::SeqCst);
                    Resolved::Failed(why)
                }
            });
        }
        for ((_, confirm, _), resolved) in queue.iter_mut().skip(1) {
            if resolved.is_none() {
                *resolved = confirm.now_or_never().map(|r| harvest(r, &mut returned));
            }
        }
        // Answer the resolved prefix.
        while queue.front().is_some_and(|(_, r)| r.is_some()) {
            let ((key, _, reply), resolved) = queue.pop_front().expect("non-empty");
            let was_returned = match returned.get_mut(&key) {
                Some((n, e)) => {
                    *n -= 1;
                    let e = e.clone();
                    if *n == 0 {
                        returned.remove(&key);
                    }
                    Some(e)
                }
                None => None,
            };
            let outcome = match (was_returned, resolved.expect("resolved")) {
                (Some(e), _) => Err(e),
                (None, Resolved::Ack) => Ok(()),
                (None, Resolved::Nack) => Err(AmqpError::Refused(
                    "the broker did not store the message (nack): a queue may be full or the broker short of resources".into(),
                )),
                (None, Resolved::Failed(e)) => Err(AmqpError::Lost(e)),
            };
            let _ = reply.send(outcome);
        }
    }
}

/// The `amqp` sink as the runtime drives it: `write` publishes, `flush` awaits the confirms.
pub struct AmqpSink {
    broker: Arc<Broker>,
    target: PublishTarget,
    pending: tokio::sync::Mutex<Vec<Confirm>>,
    /// Rendered exchanges found to exist, with the connection (generation) that checked them.
    checked: tokio::sync::Mutex<std::collections::HashMap<String, u64>>,
}

impl AmqpSink {
    pub fn new(broker: Arc<Broker>, target: PublishTarget) -> AmqpSink {
        AmqpSink { broker, target, pending: tokio::sync::Mutex::new(Vec::new()), checked: Default::default() }
    }

    /// Publishes `output`, returning its confirm to await.
    pub async fn send(&self, output: &Output) -> Result<Confirm, AmqpError> {
        let exchange = self.target.exchange.render(output).map_err(AmqpError::Refused)?;
        let routing_key = self.target.routing_key.render(output).map_err(AmqpError::Refused)?;
        let body = self.target.format.render(output);
        let session = self.broker.session().await?;
        // A rendered exchange is checked once per connection: publishing to a missing one would
        // close the channel under every message in flight.
        if matches!(self.target.exchange, Name::Template(..)) && !exchange.as_str().is_empty() {
            let known = self.checked.lock().await.get(exchange.as_str()).copied() == Some(session.generation);
            if !known {
                if !super::topology::exchange_exists(&session.connection, exchange.as_str()).await? {
                    return Err(AmqpError::Refused(format!("exchange `{exchange}` does not exist on the broker")));
                }
                self.checked.lock().await.insert(exchange.to_string(), session.generation);
            }
        }
        session.publish.publish(
            exchange.as_str(),
            routing_key.as_str(),
            self.target.mandatory,
            body,
            output_properties(&output.metadata, self.target.persistent),
        )
    }
}

fn sink_error(e: AmqpError) -> SinkError {
    SinkError::Broker(e.to_string())
}

#[async_trait]
impl Sink for AmqpSink {
    async fn write(&self, output: &Output) -> Result<(), SinkError> {
        let confirm = self.send(output).await.map_err(sink_error)?;
        self.pending.lock().await.push(confirm);
        Ok(())
    }

    async fn flush(&self) -> Result<(), SinkError> {
        let pending = std::mem::take(&mut *self.pending.lock().await);
        let mut first = None;
        for c in pending {
            if let Err(e) = confirmed(c).await {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), |e| Err(sink_error(e)))
    }

    fn as_amqp(&self) -> Option<&AmqpSink> {
        Some(self)
    }

    fn describe(&self) -> String {
        format!("RabbitMQ {} at {}", self.target.describe(), self.broker.shown_url())
    }
}
