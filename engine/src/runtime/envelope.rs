//! What travels with a stored message besides its body: the envelope an upstream pipeline set
//! (correlation id, idempotency key, channel, first receipt time), how a source decoded it, and
//! transport headers. Stored as one JSON object per message.

use crate::doc::Doc;
use crate::message::{Metadata, RawMessage, rfc3339};
use crate::store::Leased;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StoredHeaders {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
    /// When the message first entered Switchyard (RFC 3339), kept along a chain of pipelines.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub received_at: Option<String>,
    /// The pipeline (and version) that wrote it, for messages one pipeline sends another.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pipeline: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pipeline_version: Option<String>,
    /// The record a source already parsed (a CSV row as JSON); the body stays the original bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parsed: Option<String>,
    /// A source could not decode the body: reason and message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decode_error: Option<(String, String)>,
    /// Set on messages sent again by `switchyard exceptions replay`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replay_of: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
}

impl StoredHeaders {
    /// The envelope of a message a source read.
    pub fn of_raw(raw: &RawMessage) -> StoredHeaders {
        StoredHeaders {
            correlation_id: raw.correlation_id.clone(),
            idempotency_key: raw.idempotency_key.clone(),
            channel: raw.channel.clone(),
            origin: raw.origin.clone(),
            received_at: raw.received_at.as_ref().map(rfc3339::format),
            parsed: raw.parsed.as_ref().map(|d| String::from_utf8_lossy(&d.to_json_bytes()).into_owned()),
            decode_error: raw.decode_error.clone(),
            headers: raw.headers.clone(),
            ..Default::default()
        }
    }

    /// The envelope of a pipeline's output, for the pipelines that read it next.
    pub fn of_output(meta: &Metadata) -> StoredHeaders {
        StoredHeaders {
            correlation_id: Some(meta.correlation_id.clone()),
            idempotency_key: meta.idempotency_key.clone(),
            channel: meta.channel.as_deref().map(str::to_string),
            origin: meta.origin.clone(),
            received_at: Some(rfc3339::format(&meta.received_at)),
            pipeline: Some(meta.pipeline.to_string()),
            pipeline_version: Some(meta.pipeline_version.to_string()),
            ..Default::default()
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("headers serialize")
    }

    /// Headers that cannot be read (written by a newer version?) count as none, so the message
    /// is still processed.
    pub fn parse(json: &str) -> StoredHeaders {
        serde_json::from_str(json).unwrap_or_default()
    }
}

/// The message a pipeline processes, from a leased stored message.
pub fn to_raw(leased: &Leased) -> RawMessage {
    let h = StoredHeaders::parse(&leased.headers);
    let received_at = h
        .received_at
        .as_deref()
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .map(|t| t.with_timezone(&chrono::Utc))
        .or_else(|| chrono::DateTime::from_timestamp_micros(leased.enqueued_at));
    let mut decode_error = h.decode_error;
    let parsed = match h.parsed.as_deref().map(|p| Doc::parse_bytes(p.as_bytes())) {
        None => None,
        Some(Ok(d)) => Some(d),
        Some(Err(e)) => {
            decode_error.get_or_insert_with(|| ("invalid_value".into(), format!("the stored record cannot be read: {e}")));
            None
        }
    };
    let mut headers = h.headers;
    if let Some(r) = &h.replay_of {
        headers.insert("replay_of".into(), r.clone());
    }
    if let Some(p) = &h.pipeline {
        headers.insert("from_pipeline".into(), p.clone());
    }
    RawMessage {
        body: leased.body.clone(),
        parsed,
        headers,
        origin: h.origin,
        received_at,
        message_id: Some(leased.message_id.clone()),
        correlation_id: h.correlation_id,
        idempotency_key: h.idempotency_key,
        channel: h.channel,
        attempt: leased.attempts.max(1),
        decode_error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_csv_row_keeps_its_bytes_and_its_parsed_record_through_the_store() {
        let mut raw = RawMessage::json(b"0012,400112, 1".to_vec());
        raw.parsed = Some(crate::doc!({"STORE": "0012", "SKU": "400112", "QTY": "1"}));
        raw.origin = Some("sales.csv:2".into());
        raw.headers.insert("file.line".into(), "2".into());
        let leased = Leased {
            id: 1,
            attempts: 2,
            message_id: "m".into(),
            headers: StoredHeaders::of_raw(&raw).to_json(),
            body: raw.body.clone(),
            enqueued_at: 1_700_000_000_000_000,
        };
        let back = to_raw(&leased);
        assert_eq!((back.body, back.parsed, back.origin, back.attempt), (raw.body, raw.parsed, raw.origin, 2));
        assert_eq!(back.headers["file.line"], "2");
        assert_eq!(back.message_id.as_deref(), Some("m"));
    }
}
