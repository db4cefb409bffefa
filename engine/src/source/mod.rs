//! Sources: where messages come from. A source hands over each message with an acknowledgement
//! handle; the runtime acknowledges only after the message's outputs or its exception record are
//! written. Kinds (see `registry.rs`): `file` (a file or folder of JSON, NDJSON or CSV), `stdin`,
//! `queue`, `amqp` and `http` (partners POST to the engine's server).

pub mod file;
pub mod http;
pub mod poll;
pub mod queue;
pub mod stdin;

use crate::message::RawMessage;
use async_trait::async_trait;
use schemars::JsonSchema;
use serde::Deserialize;
use std::path::PathBuf;

/// What became of a message, as the transport needs to know it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Every output (or the exception record) is written: the message may be forgotten.
    Delivered,
    /// A transient failure: deliver it again later.
    Retry,
    /// A permanent failure the pipeline could not record: dead-letter it.
    Reject,
}

/// Acknowledges one message to its transport.
#[async_trait]
pub trait Ack: Send {
    async fn ack(self: Box<Self>, outcome: Delivery);
}

/// Transports without acknowledgements (files, stdin) use this.
pub struct NoAck;

#[async_trait]
impl Ack for NoAck {
    async fn ack(self: Box<Self>, _outcome: Delivery) {}
}

/// A message and how to acknowledge it.
pub struct Incoming {
    pub raw: RawMessage,
    pub ack: Box<dyn Ack>,
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot read {}: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Poll(String),
}

/// A running source. Contract: `next` returns `None` when a bounded source is exhausted; bad
/// data is not an error here: it arrives as a message whose decoding failed, and becomes an
/// exception like any other bad message.
#[async_trait]
pub trait Source: Send {
    async fn next(&mut self) -> Option<Result<Incoming, SourceError>>;
}

/// How the bytes of a source are split into messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// One JSON document per file.
    Json,
    /// One JSON document per line.
    Ndjson,
    /// One message per row; the header row names the fields (all values are text).
    Csv,
}

/// CSV options, for legacy POS and ERP flat files.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CsvOptions {
    /// Field separator (default `,`).
    #[serde(default = "comma")]
    pub delimiter: char,
    /// Trim spaces around values (default true).
    #[serde(default = "yes")]
    pub trim: bool,
}

fn comma() -> char {
    ','
}
fn yes() -> bool {
    true
}

impl Default for CsvOptions {
    fn default() -> Self {
        CsvOptions { delimiter: ',', trim: true }
    }
}
