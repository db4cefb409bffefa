//! The `stdout` sink: one JSON document per line on standard output.

use super::{OutputFormat, Sink, SinkError};
use crate::message::Output;
use async_trait::async_trait;
use schemars::JsonSchema;
use serde::Deserialize;
use std::io::Write;

#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StdoutSinkConfig {
    #[serde(default)]
    pub format: OutputFormat,
}

pub struct StdoutSink {
    pub format: OutputFormat,
}

#[async_trait]
impl Sink for StdoutSink {
    async fn write(&self, output: &Output) -> Result<(), SinkError> {
        let mut line = self.format.render(output);
        line.push(b'\n');
        let mut out = std::io::stdout().lock();
        out.write_all(&line).map_err(|source| SinkError::Io { path: "<stdout>".into(), source })
    }

    async fn flush(&self) -> Result<(), SinkError> {
        std::io::stdout().flush().map_err(|source| SinkError::Io { path: "<stdout>".into(), source })
    }

    fn describe(&self) -> String {
        "standard output".into()
    }
}
