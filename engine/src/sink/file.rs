//! The `file` sink: one line per message (NDJSON), appended, under the data directory.

use super::{OutputFormat, Sink, SinkContext, SinkError};
use crate::config::Spanned;
use crate::message::Output;
use async_trait::async_trait;
use schemars::JsonSchema;
use serde::Deserialize;
use std::path::PathBuf;
use tokio::io::AsyncWriteExt;
use tokio::sync::Mutex;

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FileSinkConfig {
    /// The NDJSON file to append to; relative paths are under the data directory.
    pub path: Spanned<String>,
    #[serde(default)]
    pub format: OutputFormat,
}

pub struct FileSink {
    path: PathBuf,
    format: OutputFormat,
    file: Mutex<Option<tokio::io::BufWriter<tokio::fs::File>>>,
}

impl FileSink {
    pub fn new(config: &FileSinkConfig, cx: &SinkContext) -> Self {
        let p = PathBuf::from(&config.path.value);
        let path = if p.is_absolute() { p } else { cx.data_dir.join(p) };
        FileSink { path, format: config.format, file: Mutex::new(None) }
    }

    pub fn path(&self) -> &std::path::Path {
        &self.path
    }
}

/// Opens `path` for appending, creating its folder.
pub async fn open_append(path: &std::path::Path) -> std::io::Result<tokio::fs::File> {
    if let Some(dir) = path.parent() {
        tokio::fs::create_dir_all(dir).await?;
    }
    tokio::fs::OpenOptions::new().create(true).append(true).open(path).await
}

#[async_trait]
impl Sink for FileSink {
    async fn write(&self, output: &Output) -> Result<(), SinkError> {
        let io = |source| SinkError::Io { path: self.path.clone(), source };
        let mut guard = self.file.lock().await;
        if guard.is_none() {
            *guard = Some(tokio::io::BufWriter::new(open_append(&self.path).await.map_err(io)?));
        }
        let w = guard.as_mut().expect("opened above");
        let mut line = self.format.render(output);
        line.push(b'\n');
        w.write_all(&line).await.map_err(io)
    }

    async fn flush(&self) -> Result<(), SinkError> {
        let io = |source| SinkError::Io { path: self.path.clone(), source };
        if let Some(w) = self.file.lock().await.as_mut() {
            w.flush().await.map_err(io)?;
            w.get_ref().sync_data().await.map_err(io)?;
        }
        Ok(())
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }
}
