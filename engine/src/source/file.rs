//! The `file` source: one file, or every matching file of a folder (sorted by name), read as
//! JSON (one message per file), NDJSON (one per line) or CSV (one per row).

use super::{CsvOptions, Format, Incoming, NoAck, Source, SourceError};
use crate::config::Spanned;
use crate::doc::{Doc, Object};
use crate::message::{RawMessage, reason};
use async_trait::async_trait;
use schemars::JsonSchema;
use serde::Deserialize;
use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FileSourceConfig {
    /// A file or a folder, relative to the pipeline file.
    pub path: Spanned<String>,
    /// How to split the content into messages; default from the file extension
    /// (`.json`, `.ndjson`/`.jsonl`, `.csv`).
    #[serde(default)]
    pub format: Option<Format>,
    /// For folders: which files to read, e.g. `*.json` (default: by format, else every file).
    #[serde(default)]
    pub pattern: Option<String>,
    #[serde(default)]
    pub csv: Option<CsvOptions>,
}

/// `*` matches any run of characters, `?` one character.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    fn go(p: &[char], n: &[char]) -> bool {
        match (p.first(), n.first()) {
            (None, None) => true,
            (Some('*'), _) => go(&p[1..], n) || (!n.is_empty() && go(p, &n[1..])),
            (Some('?'), Some(_)) => go(&p[1..], &n[1..]),
            (Some(a), Some(b)) if a == b => go(&p[1..], &n[1..]),
            _ => false,
        }
    }
    go(&pattern.chars().collect::<Vec<_>>(), &name.chars().collect::<Vec<_>>())
}

pub fn format_of(path: &Path) -> Option<Format> {
    match path.extension()?.to_str()? {
        "json" => Some(Format::Json),
        "ndjson" | "jsonl" => Some(Format::Ndjson),
        "csv" => Some(Format::Csv),
        _ => None,
    }
}

/// Splits file content into messages.
pub fn split(content: &[u8], format: Format, origin: &str, csv_opts: &CsvOptions) -> Vec<RawMessage> {
    match format {
        Format::Json => vec![message(content.to_vec(), None, origin.to_string(), None)],
        Format::Ndjson => content.split(|b| *b == b'\n').enumerate().filter_map(|(i, line)| ndjson_line(line, i + 1, origin)).collect(),
        Format::Csv => split_csv(content, origin, csv_opts),
    }
}

/// The message of one NDJSON line (1-based `line_no`); blank lines are none.
pub fn ndjson_line(line: &[u8], line_no: usize, origin: &str) -> Option<RawMessage> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.iter().all(u8::is_ascii_whitespace) {
        return None;
    }
    Some(message(line.to_vec(), None, format!("{origin}:{line_no}"), Some(line_no)))
}

/// NDJSON messages read from a stream a line at a time: a file of any size is never held whole.
/// It counts and hashes the bytes of the lines it has given out, so a reader can note exactly
/// how far it got.
pub struct NdjsonLines<R> {
    reader: R,
    origin: String,
    line_no: usize,
    buf: Vec<u8>,
    consumed: u64,
    hasher: xxhash_rust::xxh3::Xxh3,
    /// A last line without its newline is held back (a file still being written).
    whole_lines_only: bool,
    /// Whether such a line was held back.
    pub held_back: bool,
}

impl<R: std::io::BufRead> NdjsonLines<R> {
    pub fn new(reader: R, origin: impl Into<String>) -> Self {
        NdjsonLines {
            reader,
            origin: origin.into(),
            line_no: 0,
            buf: Vec::new(),
            consumed: 0,
            hasher: Default::default(),
            whole_lines_only: false,
            held_back: false,
        }
    }

    pub fn whole_lines_only(mut self, yes: bool) -> Self {
        self.whole_lines_only = yes;
        self
    }

    /// Bytes of the lines given out (blank lines included).
    pub fn consumed(&self) -> u64 {
        self.consumed
    }

    /// The hash of those bytes.
    pub fn hash(&self) -> i64 {
        self.hasher.digest() as i64
    }
}

impl<R: std::io::BufRead> Iterator for NdjsonLines<R> {
    type Item = std::io::Result<RawMessage>;
    fn next(&mut self) -> Option<Self::Item> {
        loop {
            self.buf.clear();
            match self.reader.read_until(b'\n', &mut self.buf) {
                Ok(0) => return None,
                Ok(_) => {
                    let terminated = self.buf.last() == Some(&b'\n');
                    if !terminated && self.whole_lines_only {
                        self.held_back = true;
                        return None;
                    }
                    self.line_no += 1;
                    self.consumed += self.buf.len() as u64;
                    self.hasher.update(&self.buf);
                    let line = self.buf.strip_suffix(b"\n").unwrap_or(&self.buf);
                    if let Some(m) = ndjson_line(line, self.line_no, &self.origin) {
                        return Some(Ok(m));
                    }
                }
                Err(e) => return Some(Err(e)),
            }
        }
    }
}

fn message(body: Vec<u8>, parsed: Option<Doc>, origin: String, line: Option<usize>) -> RawMessage {
    let mut headers = BTreeMap::new();
    if let Some(l) = line {
        headers.insert("file.line".to_string(), l.to_string());
    }
    RawMessage { body, parsed, headers, origin: Some(origin), attempt: 1, ..Default::default() }
}

/// The 1-based line of a byte offset.
fn line_number(content: &[u8], offset: usize) -> usize {
    content[..offset.min(content.len())].iter().filter(|b| **b == b'\n').count() + 1
}

/// The bytes of the line starting at `start`, without its line terminator.
fn line_at(content: &[u8], start: usize) -> &[u8] {
    let mut rest = &content[start.min(content.len())..];
    while let Some(r) = rest.strip_prefix(b"\n").or_else(|| rest.strip_prefix(b"\r")) {
        rest = r;
    }
    let end = rest.iter().position(|b| *b == b'\n').unwrap_or(rest.len());
    let line = &rest[..end];
    line.strip_suffix(b"\r").unwrap_or(line)
}

fn split_csv(content: &[u8], origin: &str, opts: &CsvOptions) -> Vec<RawMessage> {
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(u8::try_from(opts.delimiter).unwrap_or(b','))
        .trim(if opts.trim { csv::Trim::All } else { csv::Trim::None })
        .flexible(false)
        .from_reader(content);
    let headers: Vec<String> = match reader.headers() {
        Ok(h) => h.iter().map(str::to_string).collect(),
        Err(e) => {
            let mut m = message(content.to_vec(), None, origin.to_string(), Some(1));
            m.decode_error = Some((reason::INVALID_CSV.into(), format!("the header row cannot be read: {e}")));
            return vec![m];
        }
    };
    let mut out = Vec::new();
    let mut record = csv::StringRecord::new();
    loop {
        let start = reader.position().byte() as usize;
        match reader.read_record(&mut record) {
            Ok(false) => break,
            Ok(true) => {
                // Row start as recorded by the reader (skips blank lines before it).
                let row_start = record.position().map_or(start, |p| p.byte() as usize);
                let end = reader.position().byte() as usize;
                let mut body = &content[row_start..end.min(content.len())];
                // CRLF files: the reader's row start can sit on the `\n` of the previous row.
                while let Some(b) = body.strip_prefix(b"\n").or_else(|| body.strip_prefix(b"\r")) {
                    body = b;
                }
                while let Some(b) = body.strip_suffix(b"\n").or_else(|| body.strip_suffix(b"\r")) {
                    body = b;
                }
                let row_line = line_number(content, body.as_ptr() as usize - content.as_ptr() as usize);
                let mut obj = Object::with_capacity(headers.len());
                for (h, v) in headers.iter().zip(record.iter()) {
                    obj.insert(h.as_str(), Doc::from(v));
                }
                out.push(message(body.to_vec(), Some(Doc::Object(obj)), format!("{origin}:{row_line}"), Some(row_line)));
            }
            Err(e) => {
                let at = e.position().map_or(start, |p| p.byte() as usize);
                let body = line_at(content, at);
                let row_line = line_number(content, body.as_ptr() as usize - content.as_ptr() as usize);
                let mut m = message(body.to_vec(), None, format!("{origin}:{row_line}"), Some(row_line));
                m.decode_error = Some((reason::INVALID_CSV.into(), format!("row {row_line} cannot be read: {e}")));
                out.push(m);
                if matches!(e.kind(), csv::ErrorKind::Io(_)) {
                    break;
                }
            }
        }
    }
    out
}

/// The files a `file` source reads, in order.
pub fn list_files(path: &Path, pattern: Option<&str>, format: Option<Format>) -> std::io::Result<Vec<PathBuf>> {
    if path.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .filter(|p| {
            let name = p.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
            if name.starts_with('.') {
                return false;
            }
            match (pattern, format) {
                (Some(pat), _) => glob_match(pat, &name),
                (None, Some(f)) => format_of(p) == Some(f) || (f == Format::Ndjson && format_of(p).is_none()),
                (None, None) => format_of(p).is_some(),
            }
        })
        .collect();
    files.sort();
    Ok(files)
}

/// The running source: files are read one at a time, as messages are asked for.
pub struct FileSource {
    files: VecDeque<PathBuf>,
    format: Option<Format>,
    csv: CsvOptions,
    pending: VecDeque<RawMessage>,
    display_base: PathBuf,
}

impl FileSource {
    pub fn new(config: &FileSourceConfig, path: PathBuf) -> Result<Self, SourceError> {
        let files = list_files(&path, config.pattern.as_deref(), config.format)
            .map_err(|source| SourceError::Read { path: path.clone(), source })?;
        Ok(FileSource {
            files: files.into(),
            format: config.format,
            csv: config.csv.clone().unwrap_or_default(),
            pending: VecDeque::new(),
            display_base: std::env::current_dir().unwrap_or_default(),
        })
    }
}

#[async_trait]
impl Source for FileSource {
    async fn next(&mut self) -> Option<Result<Incoming, SourceError>> {
        loop {
            if let Some(raw) = self.pending.pop_front() {
                return Some(Ok(Incoming { raw, ack: Box::new(NoAck) }));
            }
            let path = self.files.pop_front()?;
            let content = match tokio::fs::read(&path).await {
                Ok(c) => c,
                Err(source) => return Some(Err(SourceError::Read { path, source })),
            };
            let shown = path.strip_prefix(&self.display_base).unwrap_or(&path).display().to_string();
            let format = self.format.or_else(|| format_of(&path)).unwrap_or(Format::Json);
            let mut messages = split(&content, format, &shown, &self.csv);
            for m in &mut messages {
                m.headers.insert("file.path".into(), shown.clone());
                if let Some(n) = path.file_name() {
                    m.headers.insert("file.name".into(), n.to_string_lossy().to_string());
                }
            }
            self.pending.extend(messages);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ndjson_lines_keep_their_bytes_and_line_numbers() {
        let m = split(b"{\"a\":1}\r\n\n  \n{\"a\": 2 }\n", Format::Ndjson, "x.ndjson", &CsvOptions::default());
        assert_eq!(m.len(), 2);
        assert_eq!(m[1].body, b"{\"a\": 2 }");
        assert_eq!(m[1].origin.as_deref(), Some("x.ndjson:4"));
    }

    #[test]
    fn csv_rows_become_objects_with_their_original_bytes() {
        let content = b"STORE,SKU,QTY\r\n0012,400112, 1\r\n0034,400150,2.5x\r\n0034,1\r\n0101,\"A,B\",3\r\n";
        let m = split(content, Format::Csv, "s.csv", &CsvOptions::default());
        assert_eq!(m.len(), 4);
        assert_eq!(m[0].parsed, Some(crate::doc!({"STORE": "0012", "SKU": "400112", "QTY": "1"})));
        assert_eq!(m[0].body, b"0012,400112, 1");
        assert_eq!(m[1].body, b"0034,400150,2.5x");
        assert!(m[2].decode_error.as_ref().unwrap().1.contains("row 4"), "{:?}", m[2].decode_error);
        assert_eq!(m[2].body, b"0034,1");
        assert_eq!(m[3].parsed.as_ref().unwrap()["SKU"], "A,B");
        assert_eq!(m[3].origin.as_deref(), Some("s.csv:5"));
    }

    #[test]
    fn streamed_ndjson_gives_the_same_messages_as_split() {
        let content = b"{\"a\":1}\r\n\n  \n{\"a\": 2 }\n{\"a\":3}";
        let whole = split(content, Format::Ndjson, "x.ndjson", &CsvOptions::default());
        let streamed: Vec<RawMessage> = NdjsonLines::new(&content[..], "x.ndjson").map(Result::unwrap).collect();
        assert_eq!(streamed.len(), 3);
        for (a, b) in whole.iter().zip(&streamed) {
            assert_eq!((&a.body, &a.origin, &a.headers), (&b.body, &b.origin, &b.headers));
        }
        // Holding back an unfinished last line: what was given out is counted and hashed exactly.
        let mut lines = NdjsonLines::new(&content[..], "x.ndjson").whole_lines_only(true);
        assert_eq!(lines.by_ref().count(), 2);
        assert!(lines.held_back);
        let done = content.len() - "{\"a\":3}".len();
        assert_eq!(lines.consumed(), done as u64);
        assert_eq!(lines.hash(), xxhash_rust::xxh3::xxh3_64(&content[..done]) as i64);
    }

    #[test]
    fn globs() {
        assert!(glob_match("*.json", "a.json"));
        assert!(!glob_match("*.json", "a.json.bak"));
        assert!(glob_match("sales-????.csv", "sales-2026.csv"));
    }
}
