//! The `stdin` source: reads standard input to its end, as JSON, NDJSON or CSV.

use super::file::split;
use super::{CsvOptions, Format, Incoming, NoAck, Source, SourceError};
use crate::message::RawMessage;
use async_trait::async_trait;
use schemars::JsonSchema;
use serde::Deserialize;
use std::collections::VecDeque;
use tokio::io::AsyncReadExt;

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StdinSourceConfig {
    /// Default `ndjson`.
    #[serde(default)]
    pub format: Option<Format>,
    #[serde(default)]
    pub csv: Option<CsvOptions>,
}

pub struct StdinSource {
    config: StdinSourceConfig,
    pending: Option<VecDeque<RawMessage>>,
}

impl StdinSource {
    pub fn new(config: &StdinSourceConfig) -> Self {
        StdinSource { config: config.clone(), pending: None }
    }
}

#[async_trait]
impl Source for StdinSource {
    async fn next(&mut self) -> Option<Result<Incoming, SourceError>> {
        if self.pending.is_none() {
            let mut buf = Vec::new();
            if let Err(source) = tokio::io::stdin().read_to_end(&mut buf).await {
                self.pending = Some(VecDeque::new());
                return Some(Err(SourceError::Read { path: "<stdin>".into(), source }));
            }
            let csv = self.config.csv.clone().unwrap_or_default();
            self.pending = Some(split(&buf, self.config.format.unwrap_or(Format::Ndjson), "<stdin>", &csv).into());
        }
        let raw = self.pending.as_mut()?.pop_front()?;
        Some(Ok(Incoming { raw, ack: Box::new(NoAck) }))
    }
}
