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

/// Opens `path` for appending, creating its folder. A last line without its newline was torn by
/// a crash: its message was not settled and will be delivered again, so the fragment is cut off.
pub async fn open_append(path: &std::path::Path) -> std::io::Result<tokio::fs::File> {
    if let Some(dir) = path.parent() {
        tokio::fs::create_dir_all(dir).await?;
    }
    let file = tokio::fs::OpenOptions::new().create(true).append(true).read(true).open(path).await?;
    let std_file = file.into_std().await;
    let std_file = tokio::task::spawn_blocking(move || cut_torn_line(std_file)).await.map_err(std::io::Error::other)??;
    Ok(tokio::fs::File::from_std(std_file))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_torn_last_line_is_cut_off_and_whole_lines_stay() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("out.ndjson");
        std::fs::write(&p, "{\"a\":1}\n{\"a\":2}\n{\"a\"").unwrap();
        drop(open_append(&p).await.unwrap());
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "{\"a\":1}\n{\"a\":2}\n");
        drop(open_append(&p).await.unwrap());
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "{\"a\":1}\n{\"a\":2}\n", "whole files are left alone");
        std::fs::write(&p, "no newline at all").unwrap();
        drop(open_append(&p).await.unwrap());
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "");
    }
}
