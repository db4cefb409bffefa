//! Sinks: named outputs that routes refer to. Kinds (see `registry.rs`): `file` (NDJSON under the
//! data directory), `stdout`, `queue`, `amqp`, `http` (one request per message).

pub mod file;
pub mod http;
pub mod http_auth;
pub mod queue;
pub mod stdout;

use crate::message::Output;
use async_trait::async_trait;
use schemars::JsonSchema;
use serde::Deserialize;
use std::path::PathBuf;
use std::time::Duration;

/// What a sink writes for each message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum OutputFormat {
    /// `{"metadata": {...}, "payload": {...}}`: ids, versions and times travel with the record.
    #[default]
    Envelope,
    /// The payload alone.
    Payload,
}

impl OutputFormat {
    pub fn render(self, output: &Output) -> Vec<u8> {
        match self {
            OutputFormat::Envelope => {
                let mut out = Vec::with_capacity(512);
                out.extend_from_slice(b"{\"metadata\":");
                serde_json::to_writer(&mut out, &output.metadata).expect("metadata serializes");
                out.extend_from_slice(b",\"payload\":");
                output.payload.write_json(&mut out);
                out.push(b'}');
                out
            }
            OutputFormat::Payload => output.payload.to_json_bytes(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("cannot write {}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Broker(String),
    /// A delivery the other side did not take. `message` says what was sent where and what came
    /// back (never header values, query strings or credentials); `transient` says whether the
    /// same message may go through later (a timeout, a 503) or never will as it is (a 422).
    #[error("{message}")]
    Delivery {
        message: String,
        transient: bool,
        /// How long the other side asked to wait (`Retry-After`), capped.
        retry_after: Option<Duration>,
        /// The HTTP status, when there was an answer.
        status: Option<u16>,
    },
    /// The sink could not be set up at start.
    #[error("{0}")]
    Start(String),
}

impl SinkError {
    /// Whether the failure may pass: the same message may be delivered by a later attempt.
    /// Files and the broker fail for passing reasons (a full disk, a lost connection); a
    /// delivery says for itself.
    pub fn is_transient(&self) -> bool {
        match self {
            SinkError::Io { .. } | SinkError::Broker(_) => true,
            SinkError::Delivery { transient, .. } => *transient,
            SinkError::Start(_) => false,
        }
    }

    /// How long the other side asked to wait before the next attempt, when it said.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            SinkError::Delivery { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// A running sink. Contract: `write` returns only when the message is accepted by the sink's
/// medium (for files: handed to the OS; `flush` makes it durable).
#[async_trait]
pub trait Sink: Send + Sync {
    async fn write(&self, output: &Output) -> Result<(), SinkError>;
    /// As `write`; a sink with a `reply:` gives back the record with what the receiver answered,
    /// to go on to the reply's sink.
    async fn write_with_reply(&self, output: &Output) -> Result<Option<Output>, SinkError> {
        self.write(output).await.map(|()| None)
    }
    async fn flush(&self) -> Result<(), SinkError>;
    /// Where the output goes, for summaries.
    fn describe(&self) -> String;
    /// For sinks that append to a file: its key and how long it was at the last flush. The
    /// runtime stores this in the commit that settles the messages flushed; at the next start,
    /// whatever lies beyond was written for messages never settled (they are delivered again),
    /// and is cut off, so a crash leaves no duplicate in the file.
    fn mark(&self) -> Option<(String, u64)> {
        None
    }
    /// For sinks that append to a file with no committed length on record yet: where the file
    /// ends before this engine writes anything. The runtime records it before the first message
    /// is processed, so a crash before the first settle is cut back to it too.
    fn baseline(&self) -> Option<std::io::Result<(String, u64)>> {
        None
    }
    /// A RabbitMQ sink, which a RabbitMQ-fed worker drives directly (confirms per batch).
    fn as_amqp(&self) -> Option<&crate::amqp::publish::AmqpSink> {
        None
    }
}

/// What a runtime sink needs from the engine.
pub struct SinkContext {
    pub data_dir: PathBuf,
    /// File lengths committed with settled messages, by file (see [`Sink::mark`]).
    pub committed: std::collections::HashMap<String, u64>,
}
