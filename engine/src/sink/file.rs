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
    /// The file's absolute path: its key for committed lengths.
    key: String,
    format: OutputFormat,
    file: Mutex<Option<tokio::io::BufWriter<tokio::fs::File>>>,
    committed: Option<u64>,
    flushed: std::sync::Mutex<Option<u64>>,
}

impl FileSink {
    pub fn new(config: &FileSinkConfig, cx: &SinkContext) -> Self {
        let p = PathBuf::from(&config.path.value);
        let path = if p.is_absolute() { p } else { cx.data_dir.join(p) };
        let key = crate::build::normalize(&std::path::absolute(&path).unwrap_or_else(|_| path.clone())).display().to_string();
        let committed = cx.committed.get(&key).copied();
        FileSink { path, key, format: config.format, file: Mutex::new(None), committed, flushed: std::sync::Mutex::new(None) }
    }

    pub fn path(&self) -> &std::path::Path {
        &self.path
    }
}

/// Opens `path` for appending, creating its folder. What lies beyond the `committed` length was
/// written for messages that were never settled (they are delivered again) and is cut off; with
/// no committed length known, a last line without its newline (torn by a crash) is.
pub async fn open_append(path: &std::path::Path, committed: Option<u64>) -> std::io::Result<tokio::fs::File> {
    if let Some(dir) = path.parent() {
        tokio::fs::create_dir_all(dir).await?;
    }
    let existed = tokio::fs::try_exists(path).await.unwrap_or(false);
    let file = tokio::fs::OpenOptions::new().create(true).append(true).read(true).open(path).await?;
    if !existed {
        // A new file is only durable once its folder's entry is: else a power cut could lose the
        // file after its messages were settled.
        if let Some(dir) = path.parent() {
            let dir = dir.to_path_buf();
            tokio::task::spawn_blocking(move || std::fs::File::open(&dir)?.sync_all()).await.map_err(std::io::Error::other)??;
        }
    }
    let std_file = file.into_std().await;
    let shown = path.display().to_string();
    let std_file = tokio::task::spawn_blocking(move || match committed {
        None => cut_torn_line(std_file),
        Some(c) => cut_to(std_file, c, &shown),
    })
    .await
    .map_err(std::io::Error::other)??;
    Ok(tokio::fs::File::from_std(std_file))
}

fn cut_to(f: std::fs::File, committed: u64, shown: &str) -> std::io::Result<std::fs::File> {
    let len = f.metadata()?.len();
    if len > committed {
        tracing::warn!(file = %shown, bytes = len - committed, "cut off output written for messages that were not settled before a stop; they are delivered again");
        f.set_len(committed)?;
    } else if len < committed {
        tracing::warn!(file = %shown, "the file is shorter than the output settled into it (rotated or edited?); appending");
    }
    Ok(f)
}

fn cut_torn_line(mut f: std::fs::File) -> std::io::Result<std::fs::File> {
    use std::io::{Read, Seek, SeekFrom};
    let len = f.metadata()?.len();
    if len == 0 {
        return Ok(f);
    }
    // Look back for the last newline, a block at a time.
    let mut end = len;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let start = end.saturating_sub(buf.len() as u64);
        let chunk = &mut buf[..(end - start) as usize];
        f.seek(SeekFrom::Start(start))?;
        f.read_exact(chunk)?;
        if end == len && chunk.last() == Some(&b'\n') {
            return Ok(f);
        }
        if let Some(i) = chunk.iter().rposition(|b| *b == b'\n') {
            let keep = start + i as u64 + 1;
            tracing::warn!(cut = len - keep, "a line torn by a crash was cut off; its message is delivered again");
            f.set_len(keep)?;
            return Ok(f);
        }
        if start == 0 {
            tracing::warn!(cut = len, "a line torn by a crash was cut off; its message is delivered again");
            f.set_len(0)?;
            return Ok(f);
        }
        end = start;
    }
}

#[async_trait]
impl Sink for FileSink {
    async fn write(&self, output: &Output) -> Result<(), SinkError> {
        let io = |source| SinkError::Io { path: self.path.clone(), source };
        let mut guard = self.file.lock().await;
        if guard.is_none() {
            // Cut back to the last length known good: the one committed before this process, or,
            // when a failed write is why the file is opened again, the last flush.
            let committed = self.flushed.lock().expect("flushed lock").or(self.committed);
            *guard = Some(tokio::io::BufWriter::new(open_append(&self.path, committed).await.map_err(io)?));
        }
        let w = guard.as_mut().expect("opened above");
        let mut line = self.format.render(output);
        line.push(b'\n');
        let written = w.write_all(&line).await;
        if written.is_err() {
            // Reopened on the next write, which cuts off what this one left half-written.
            *guard = None;
        }
        written.map_err(io)
    }

    async fn flush(&self) -> Result<(), SinkError> {
        let io = |source| SinkError::Io { path: self.path.clone(), source };
        let mut guard = self.file.lock().await;
        if let Some(w) = guard.as_mut() {
            let flushed = match w.flush().await {
                Ok(()) => w.get_ref().sync_data().await,
                Err(e) => Err(e),
            };
            let len = match flushed {
                Ok(()) => w.get_ref().metadata().await.map(|m| m.len()),
                Err(e) => Err(e),
            };
            match len {
                Ok(len) => *self.flushed.lock().expect("flushed lock") = Some(len),
                Err(e) => {
                    *guard = None;
                    return Err(io(e));
                }
            }
        }
        Ok(())
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }

    fn mark(&self) -> Option<(String, u64)> {
        self.flushed.lock().expect("flushed lock").map(|len| (self.key.clone(), len))
    }

    fn baseline(&self) -> Option<std::io::Result<(String, u64)>> {
        if self.committed.is_some() {
            return None;
        }
        let len = match std::fs::OpenOptions::new().read(true).write(true).open(&self.path) {
            Ok(f) => cut_torn_line(f).and_then(|f| f.metadata()).map(|m| m.len()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(e),
        };
        Some(len.map(|len| {
            // The first open cuts back to it.
            *self.flushed.lock().expect("flushed lock") = Some(len);
            (self.key.clone(), len)
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_torn_last_line_is_cut_off_and_whole_lines_stay() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("out.ndjson");
        std::fs::write(&p, "{\"a\":1}\n{\"a\":2}\n{\"a\"").unwrap();
        drop(open_append(&p, None).await.unwrap());
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "{\"a\":1}\n{\"a\":2}\n");
        drop(open_append(&p, None).await.unwrap());
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "{\"a\":1}\n{\"a\":2}\n", "whole files are left alone");
        std::fs::write(&p, "no newline at all").unwrap();
        drop(open_append(&p, None).await.unwrap());
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "");
        // With a committed length, everything after it goes, whole lines included.
        std::fs::write(&p, "{\"a\":1}\n{\"a\":2}\n").unwrap();
        drop(open_append(&p, Some(8)).await.unwrap());
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "{\"a\":1}\n");
    }

    #[tokio::test]
    async fn with_no_committed_length_the_first_open_cuts_back_to_the_baseline() {
        let dir = tempfile::tempdir().unwrap();
        let config = FileSinkConfig { path: Spanned::new("out.ndjson".to_string()), format: OutputFormat::default() };
        let cx = SinkContext { data_dir: dir.path().to_path_buf(), committed: Default::default() };
        let sink = FileSink::new(&config, &cx);
        let (_, len) = sink.baseline().expect("no length on record").unwrap();
        assert_eq!(len, 0, "no file yet");
        // Lines written after the baseline by an engine that died before settling them.
        std::fs::write(sink.path(), "{\"unsettled\":1}\n").unwrap();
        let output: Output = serde_json::from_value(serde_json::json!({
            "payload": {"a": 1},
            "metadata": {"message_id": "m1", "correlation_id": "c1", "received_at": "2026-11-27T00:00:00Z",
                         "pipeline": "p", "pipeline_version": "1", "mapping_versions": {}, "attempt": 1}
        }))
        .unwrap();
        sink.write(&output).await.unwrap();
        sink.flush().await.unwrap();
        let text = std::fs::read_to_string(sink.path()).unwrap();
        assert!(!text.contains("unsettled"), "cut back to the baseline before writing: {text}");
        assert_eq!(text.lines().count(), 1);
    }
}
