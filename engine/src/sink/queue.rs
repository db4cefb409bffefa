//! The `queue` sink: writes to a queue of the embedded store, in the same transaction that
//! settles the input message, so an output is stored exactly when its input leaves its queue.

use super::OutputFormat;
use crate::config::Spanned;
use schemars::JsonSchema;
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct QueueSinkConfig {
    /// The queue to write, e.g. `orders.canonical`; every pipeline whose source is that queue gets
    /// each message.
    pub queue: Spanned<String>,
    /// `payload` (default): the record alone, with ids and versions travelling as headers;
    /// `envelope`: metadata and payload together in the body.
    #[serde(default)]
    pub format: Option<OutputFormat>,
    /// Back pressure: while the queue holds this many messages or more, this pipeline takes no
    /// new work (default 100000).
    #[serde(default)]
    pub max_depth: Option<u64>,
}

pub const DEFAULT_MAX_DEPTH: u64 = 100_000;
