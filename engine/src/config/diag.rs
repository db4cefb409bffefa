//! Diagnostics for analyst-authored files: every problem names the file, line, column and key path,
//! says what was expected, and offers a hint ("did you mean `sinks`?").

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A position range in a source file. Lines and columns are 1-based; `offset` and `len` are bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Span {
    pub line: usize,
    pub column: usize,
    pub offset: usize,
    pub len: usize,
}

impl Span {
    pub fn new(line: usize, column: usize, offset: usize, len: usize) -> Self {
        Span { line, column, offset, len }
    }
}

/// Every project file read while building pipelines: a running engine watches them and loads
/// its pipelines again when one changes.
static FILES_READ: std::sync::Mutex<std::collections::BTreeSet<PathBuf>> = std::sync::Mutex::new(std::collections::BTreeSet::new());

pub fn note_read(path: &Path) {
    let p = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    FILES_READ.lock().expect("files read").insert(p);
}

/// The files noted by [`note_read`] so far.
pub fn files_read() -> Vec<PathBuf> {
    FILES_READ.lock().expect("files read").iter().cloned().collect()
}

/// A file's text, shared so that diagnostics can show the offending line.
#[derive(Debug, Clone)]
pub struct SourceFile {
    pub path: PathBuf,
    pub text: Arc<str>,
}

impl SourceFile {
    pub fn new(path: impl Into<PathBuf>, text: impl Into<Arc<str>>) -> Self {
        SourceFile { path: path.into(), text: text.into() }
    }

    pub fn read(path: &Path) -> std::io::Result<Self> {
        note_read(path);
        Ok(SourceFile::new(path, std::fs::read_to_string(path)?))
    }

    /// Span of a 1-based line and column (column counted in characters), `len` characters long.
    pub fn span_at(&self, line: usize, column: usize, len_chars: usize) -> Span {
        let mut offset = 0;
        for (i, l) in self.text.split_inclusive('\n').enumerate() {
            if i + 1 == line {
                let start = l.char_indices().nth(column.saturating_sub(1)).map_or(l.len(), |(b, _)| b);
                let rest = &l[start..];
                let len = rest.char_indices().nth(len_chars).map_or(rest.trim_end_matches(['\n', '\r']).len(), |(b, _)| b);
                return Span::new(line, column, offset + start, len);
            }
            offset += l.len();
        }
        Span::new(line, column, self.text.len(), 0)
    }

    /// Span of a byte offset.
    pub fn span_of_offset(&self, offset: usize, len: usize) -> Span {
        let offset = offset.min(self.text.len());
        let before = &self.text[..offset];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let column = before[line_start..].chars().count() + 1;
        Span::new(line, column, offset, len.min(self.text.len() - offset))
    }
}

/// What kind of problem a diagnostic reports; a stable code for `--format json` and for tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiagCode {
    YamlSyntax,
    UnknownKey,
    DuplicateKey,
    WrongType,
    InvalidValue,
    MissingKey,
    UnknownType,
    UnsetVariable,
    FileNotFound,
    JsonPathSyntax,
    ScriptSyntax,
    UndeclaredSink,
    InvalidSchema,
    InvalidFile,
    Conflict,
    /// A binding names an exchange the topology does not declare.
    UndeclaredExchange,
    /// A hint for an exception reason nothing in the pipeline produces (a warning).
    UnknownReason,
}

impl DiagCode {
    pub fn as_str(self) -> &'static str {
        match self {
            DiagCode::YamlSyntax => "yaml_syntax",
            DiagCode::UnknownKey => "unknown_key",
            DiagCode::DuplicateKey => "duplicate_key",
            DiagCode::WrongType => "wrong_type",
            DiagCode::InvalidValue => "invalid_value",
            DiagCode::MissingKey => "missing_key",
            DiagCode::UnknownType => "unknown_type",
            DiagCode::UnsetVariable => "unset_variable",
            DiagCode::FileNotFound => "file_not_found",
            DiagCode::JsonPathSyntax => "jsonpath_syntax",
            DiagCode::ScriptSyntax => "script_syntax",
            DiagCode::UndeclaredSink => "undeclared_sink",
            DiagCode::InvalidSchema => "invalid_schema",
            DiagCode::InvalidFile => "invalid_file",
            DiagCode::Conflict => "conflict",
            DiagCode::UndeclaredExchange => "undeclared_exchange",
            DiagCode::UnknownReason => "unknown_reason",
        }
    }
}

/// One problem in one file.
#[derive(Debug, Clone)]
pub struct Diagnostic {
    pub code: DiagCode,
    pub source: SourceFile,
    pub span: Span,
    /// Dotted key path inside the file, e.g. `sinks.erp_us.path` or `map[2].file`.
    pub key_path: String,
    pub message: String,
    pub expected: Option<String>,
    pub hint: Option<String>,
    /// Another place that matters, e.g. the first occurrence of a duplicate key.
    pub related: Option<(Span, String)>,
    /// A warning does not stop the pipeline from loading.
    pub warning: bool,
}

impl Diagnostic {
    pub fn new(code: DiagCode, source: &SourceFile, span: Span, key_path: impl Into<String>, message: impl Into<String>) -> Self {
        Diagnostic {
            code,
            source: source.clone(),
            span,
            key_path: key_path.into(),
            message: message.into(),
            expected: None,
            hint: None,
            related: None,
            warning: false,
        }
    }

    pub fn warning(mut self) -> Self {
        self.warning = true;
        self
    }

    pub fn expected(mut self, expected: impl Into<String>) -> Self {
        self.expected = Some(expected.into());
        self
    }

    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    pub fn hint_opt(mut self, hint: Option<String>) -> Self {
        self.hint = hint;
        self
    }

    pub fn related(mut self, span: Span, label: impl Into<String>) -> Self {
        self.related = Some((span, label.into()));
        self
    }

    /// `file:line:column`, the prefix editors and CI logs understand.
    pub fn location(&self) -> String {
        format!("{}:{}:{}", self.source.path.display(), self.span.line, self.span.column)
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "code": self.code.as_str(),
            "severity": if self.warning { "warning" } else { "error" },
            "file": self.source.path.display().to_string(),
            "line": self.span.line,
            "column": self.span.column,
            "key_path": self.key_path,
            "message": self.message,
            "expected": self.expected,
            "hint": self.hint,
        })
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.location(), self.message)?;
        if !self.key_path.is_empty() {
            write!(f, " (at `{}`)", self.key_path)?;
        }
        if let Some(e) = &self.expected {
            write!(f, "; expected {e}")?;
        }
        if let Some(h) = &self.hint {
            write!(f, "; {h}")?;
        }
        Ok(())
    }
}

/// The closest candidate to a misspelt name, if it is close enough to be a plausible typo.
pub fn did_you_mean<'a>(given: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let given_l = given.to_ascii_lowercase();
    candidates
        .into_iter()
        .map(|c| (c, strsim::jaro_winkler(&given_l, &c.to_ascii_lowercase())))
        .filter(|(c, score)| *score >= 0.8 || strsim::levenshtein(&given_l, &c.to_ascii_lowercase()) <= 2)
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(c, _)| c)
}

/// `did you mean `x`?` when a near miss exists.
pub fn suggestion<'a>(given: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<String> {
    did_you_mean(given, candidates).map(|c| format!("did you mean `{c}`?"))
}

/// A list of names as the analyst reads them: `a`, `b` or `c`.
pub fn one_of(names: &[&str]) -> String {
    let quoted: Vec<String> = names.iter().map(|n| format!("`{n}`")).collect();
    match quoted.len() {
        0 => "nothing".to_string(),
        1 => quoted[0].clone(),
        n => format!("one of {} or {}", quoted[..n - 1].join(", "), quoted[n - 1]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggests_near_misses_only() {
        assert_eq!(did_you_mean("sinkz", ["source", "sinks", "route"]), Some("sinks"));
        assert_eq!(did_you_mean("Validate", ["validate", "map"]), Some("validate"));
        assert_eq!(did_you_mean("zzz", ["source", "sinks"]), None);
    }

    #[test]
    fn spans_count_characters_and_bytes() {
        let f = SourceFile::new("x.yaml", "a: 1\nnamé: é2\n");
        let s = f.span_at(2, 7, 2);
        assert_eq!((s.line, s.column), (2, 7));
        assert_eq!(&f.text[s.offset..s.offset + s.len], "é2");
        let back = f.span_of_offset(s.offset, s.len);
        assert_eq!((back.line, back.column), (2, 7));
    }
}
