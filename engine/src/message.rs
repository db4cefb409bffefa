//! What flows through a pipeline: the raw input, the envelope metadata, outputs and exception records.

use crate::doc::Doc;
use chrono::{DateTime, SecondsFormat, Utc};
use indexmap::IndexMap;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;

/// A message as a source hands it over: the bytes exactly as received, plus transport facts.
#[derive(Debug, Clone, Default)]
pub struct RawMessage {
    /// The original payload, byte for byte (a JSON document, an NDJSON line, a CSV row).
    pub body: Vec<u8>,
    /// The payload already parsed, when the transport parses (CSV rows); otherwise `body` is JSON.
    pub parsed: Option<Doc>,
    /// Transport headers and properties (`file.path`, AMQP headers, HTTP headers), names lowercase.
    pub headers: BTreeMap<String, String>,
    /// Where it came from, for people: `examples/shopify/orders/x.json`, `sales.csv:12`.
    pub origin: Option<String>,
    pub received_at: Option<DateTime<Utc>>,
    /// Set when the transport already assigned an id (replays, redeliveries).
    pub message_id: Option<String>,
    /// Envelope values an upstream pipeline set; kept unless this pipeline sets its own.
    pub correlation_id: Option<String>,
    pub idempotency_key: Option<String>,
    pub channel: Option<String>,
    pub attempt: u32,
    /// Set when the transport could not decode the bytes (a malformed CSV row): reason and message.
    pub decode_error: Option<(String, String)>,
}

impl RawMessage {
    pub fn json(body: impl Into<Vec<u8>>) -> Self {
        RawMessage { body: body.into(), attempt: 1, ..Default::default() }
    }
}

/// Envelope metadata: carried with the payload onto every output, exception and log line.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Metadata {
    pub message_id: String,
    pub correlation_id: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub idempotency_key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub channel: Option<Arc<str>>,
    #[serde(with = "rfc3339")]
    pub received_at: DateTime<Utc>,
    /// Pipeline name and version: shared by every message of the pipeline.
    pub pipeline: Arc<str>,
    pub pipeline_version: Arc<str>,
    /// Name and version of every mapping file (field map, script, lookup table) the pipeline used.
    pub mapping_versions: Arc<IndexMap<String, String>>,
    pub attempt: u32,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub origin: Option<String>,
    /// Transport headers and properties as received (`amqp.routing_key`, AMQP headers,
    /// `file.path`): read by mappings (`{header.NAME}`, `meta.headers` in scripts) and routes,
    /// not written to outputs.
    #[serde(skip)]
    pub headers: Arc<std::collections::BTreeMap<String, String>>,
    /// The entity this event is about and its version, when the pipeline orders events.
    #[serde(skip)]
    pub entity: Option<Arc<Entity>>,
}

/// What ordering knows of an event: its entity, its version, whether it needs an earlier event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entity {
    pub key: String,
    pub version: String,
    /// An event that needs an earlier one of its entity (a cancellation needs its order).
    pub needs_previous: bool,
}

/// One message leaving through one sink.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Output {
    pub metadata: Metadata,
    pub payload: Doc,
}

/// Which stage a failure happened in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    Source,
    Validate,
    Map,
    Route,
    Sink,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Source => "source",
            Stage::Validate => "validate",
            Stage::Map => "map",
            Stage::Route => "route",
            Stage::Sink => "sink",
        }
    }
}

/// Which document a JSON pointer refers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Document {
    /// The message as received.
    Input,
    /// The record as built by the map steps so far.
    Record,
}

/// One reason a message failed, pointing at the value concerned.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// JSON pointer (RFC 6901) into `document`; empty for the whole document.
    pub pointer: String,
    pub message: String,
    pub document: Document,
}

impl ErrorDetail {
    pub fn input(pointer: impl Into<String>, message: impl Into<String>) -> Self {
        ErrorDetail { pointer: pointer.into(), message: message.into(), document: Document::Input }
    }
    pub fn record(pointer: impl Into<String>, message: impl Into<String>) -> Self {
        ErrorDetail { pointer: pointer.into(), message: message.into(), document: Document::Record }
    }
}

/// Bad data is an outcome, not an `Err`: a stage returns this and the message goes to exceptions.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    pub reason: String,
    pub errors: Vec<ErrorDetail>,
}

impl Failure {
    pub fn new(reason: impl Into<String>, errors: Vec<ErrorDetail>) -> Self {
        Failure { reason: reason.into(), errors }
    }
    pub fn one(reason: impl Into<String>, error: ErrorDetail) -> Self {
        Failure { reason: reason.into(), errors: vec![error] }
    }
}

/// Reason codes the engine itself assigns. Pipelines add their own (e.g. `unknown_sku`).
pub mod reason {
    pub const INVALID_JSON: &str = "invalid_json";
    pub const INVALID_CSV: &str = "invalid_csv";
    pub const SCHEMA_VIOLATION: &str = "schema_violation";
    pub const MISSING_REQUIRED_FIELD: &str = "missing_required_field";
    /// The pipeline stops duplicates but the message has no idempotency key.
    pub const MISSING_IDEMPOTENCY_KEY: &str = "missing_idempotency_key";
    pub const INVALID_VALUE: &str = "invalid_value";
    pub const UNMAPPED_VALUE: &str = "unmapped_value";
    pub const LOOKUP_MISS: &str = "lookup_miss";
    pub const SCRIPT_ERROR: &str = "script_error";
    pub const TOTALS_MISMATCH: &str = "totals_mismatch";
    pub const CURRENCY_MISMATCH: &str = "currency_mismatch";
    pub const UNROUTED: &str = "unrouted";
    pub const SINK_FAILED: &str = "sink_failed";
    /// A sink refused the message for good (an HTTP 4xx other than 408 and 429).
    pub const SINK_REJECTED: &str = "sink_rejected";
    /// An event older than the last one applied for its entity (`ordering.stale: exception`).
    pub const STALE_EVENT: &str = "stale_event";
    /// An event that needs an earlier one of its entity waited for it in vain.
    pub const MISSING_PREDECESSOR: &str = "missing_predecessor";
    pub const UNREADABLE_INPUT: &str = "unreadable_input";
    pub const INTERNAL_ERROR: &str = "internal_error";
    /// Delivered `runtime.max_attempts` times without being settled.
    pub const TOO_MANY_ATTEMPTS: &str = "too_many_attempts";

    /// Every reason the engine itself gives; steps add the ones their configuration names.
    pub const ENGINE: &[&str] = &[
        INVALID_JSON,
        INVALID_CSV,
        SCHEMA_VIOLATION,
        MISSING_REQUIRED_FIELD,
        MISSING_IDEMPOTENCY_KEY,
        INVALID_VALUE,
        UNMAPPED_VALUE,
        LOOKUP_MISS,
        SCRIPT_ERROR,
        TOTALS_MISMATCH,
        CURRENCY_MISMATCH,
        UNROUTED,
        SINK_FAILED,
        SINK_REJECTED,
        STALE_EVENT,
        MISSING_PREDECESSOR,
        UNREADABLE_INPUT,
        INTERNAL_ERROR,
        TOO_MANY_ATTEMPTS,
    ];
}

/// A message that failed a stage, with everything needed to understand and replay it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExceptionRecord {
    pub exception_id: String,
    pub pipeline: String,
    pub pipeline_version: String,
    pub stage: Stage,
    /// The step within the stage, e.g. `map[1] lookup sku-items`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub step: Option<String>,
    pub reason: String,
    pub errors: Vec<ErrorDetail>,
    /// The remediation hint the pipeline configures for this reason.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub hint: Option<String>,
    pub message_id: String,
    pub correlation_id: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub idempotency_key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub channel: Option<String>,
    #[serde(with = "rfc3339")]
    pub received_at: DateTime<Utc>,
    #[serde(with = "rfc3339")]
    pub failed_at: DateTime<Utc>,
    pub attempt: u32,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub origin: Option<String>,
    pub mapping_versions: Arc<IndexMap<String, String>>,
    /// The original payload byte for byte.
    #[serde(flatten)]
    pub original: OriginalPayload,
}

/// The original bytes: as a JSON string when they are UTF-8 (readable, and exact once decoded),
/// as base64 otherwise.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum OriginalPayload {
    Text { original_payload: String },
    Binary { original_payload_base64: String },
}

impl OriginalPayload {
    pub fn from_bytes(bytes: &[u8]) -> Self {
        match std::str::from_utf8(bytes) {
            Ok(s) => OriginalPayload::Text { original_payload: s.to_string() },
            Err(_) => {
                use base64::Engine;
                OriginalPayload::Binary { original_payload_base64: base64::engine::general_purpose::STANDARD.encode(bytes) }
            }
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        match self {
            OriginalPayload::Text { original_payload } => original_payload.as_bytes().to_vec(),
            OriginalPayload::Binary { original_payload_base64 } => {
                use base64::Engine;
                base64::engine::general_purpose::STANDARD.decode(original_payload_base64).unwrap_or_default()
            }
        }
    }
}

/// Timestamps as RFC 3339 UTC with `Z`, the one format every record uses.
pub mod rfc3339 {
    use super::*;
    use serde::{Deserializer, Serializer};

    pub fn format(t: &DateTime<Utc>) -> String {
        t.to_rfc3339_opts(SecondsFormat::Millis, true)
    }

    pub fn serialize<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format(t))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        let s = String::deserialize(d)?;
        DateTime::parse_from_rfc3339(&s).map(|t| t.with_timezone(&Utc)).map_err(serde::de::Error::custom)
    }
}

/// RFC 6901 escaping of one pointer token.
pub fn escape_pointer_token(token: &str) -> std::borrow::Cow<'_, str> {
    if token.contains(['~', '/']) { token.replace('~', "~0").replace('/', "~1").into() } else { token.into() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn original_payload_round_trips_byte_for_byte() {
        for bytes in [&b"{\"a\": 1,\r\n \"b\":\"\\u00e9\"}  "[..], &[0xff, 0x00, b'{'][..]] {
            let p = OriginalPayload::from_bytes(bytes);
            let json = serde_json::to_string(&p).unwrap();
            let back: OriginalPayload = serde_json::from_str(&json).unwrap();
            assert_eq!(back.to_bytes(), bytes);
        }
    }
}
