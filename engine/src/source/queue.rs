//! The `queue` source: a queue of the embedded store (or, later, of RabbitMQ). Every pipeline
//! whose source is queue `X` receives every message sent to `X`: a sink of one pipeline that
//! writes `X` feeds them all.

use crate::config::Spanned;
use schemars::JsonSchema;
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct QueueSourceConfig {
    /// The queue to consume, e.g. `orders.canonical`: lowercase letters, digits, `.`, `-`, `_`.
    pub queue: Spanned<String>,
}

/// Whether `name` can name a queue. Names starting with `_` belong to the engine.
pub fn valid_queue_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 200
        && !name.starts_with(['_', '.', '-'])
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_'))
}
