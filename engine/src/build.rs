//! What building a pipeline needs besides its own YAML: the file it came from (for diagnostics and
//! relative paths), and caches shared by every pipeline of one load (schemas, tables, scripts).

use crate::config::{DiagCode, Diagnostic, SourceFile, Span, Spanned, yaml::Env};
use crate::jsonpath::{CompiledPath, Condition, PathError};
use crate::map::lookup::LookupTable;
use crate::template::Template;
use crate::validate::{SchemaStore, schema_root};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Caches shared across the pipelines of one load: each file is read and compiled once.
pub struct Shared {
    pub env: Box<dyn Env + Send + Sync>,
    schema_stores: Mutex<HashMap<PathBuf, Arc<SchemaStore>>>,
    tables: Mutex<HashMap<PathBuf, Arc<LookupTable>>>,
}

impl Shared {
    pub fn new(env: Box<dyn Env + Send + Sync>) -> Self {
        Shared { env, schema_stores: Mutex::new(HashMap::new()), tables: Mutex::new(HashMap::new()) }
    }

    pub fn with_process_env() -> Self {
        Shared::new(Box::new(crate::config::yaml::ProcessEnv))
    }
}

/// The file being built and the shared caches.
pub struct BuildContext<'a> {
    pub file: SourceFile,
    pub dir: PathBuf,
    pub shared: &'a Shared,
    /// Problems that do not stop the pipeline (a secret taken from its default).
    warnings: Mutex<Vec<Diagnostic>>,
}

impl<'a> BuildContext<'a> {
    pub fn new(file: SourceFile, shared: &'a Shared) -> Self {
        let dir = file.path.parent().map(Path::to_path_buf).unwrap_or_default();
        BuildContext { file, dir, shared, warnings: Mutex::new(Vec::new()) }
    }

    /// The warnings found while building, taken out.
    pub fn take_warnings(&self) -> Vec<Diagnostic> {
        std::mem::take(&mut *self.warnings.lock().expect("warnings"))
    }

    /// A context for another file (a field map referenced by a pipeline).
    pub fn for_file(&self, file: SourceFile) -> BuildContext<'a> {
        BuildContext::new(file, self.shared)
    }

    /// Paths in a pipeline are relative to the pipeline file's folder.
    pub fn resolve(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() { p.to_path_buf() } else { normalize(&self.dir.join(p)) }
    }

    pub fn diag(&self, code: DiagCode, span: Span, key_path: &str, message: impl Into<String>) -> Diagnostic {
        Diagnostic::new(code, &self.file, span, key_path, message)
    }

    /// `key` holds the number `value`, outside `range`.
    pub fn out_of_range<T: std::fmt::Display>(
        &self,
        span: Span,
        key_path: &str,
        key: &str,
        value: T,
        range: std::ops::RangeInclusive<T>,
    ) -> Diagnostic {
        self.diag(DiagCode::InvalidValue, span, key_path, format!("`{key}` is {value}")).expected(format!(
            "a number from {} to {}",
            range.start(),
            range.end()
        ))
    }

    /// The span of character `column` (1-based) inside a scalar value, skipping an opening quote.
    pub fn span_inside(&self, value: Span, column: usize, len: usize) -> Span {
        let quoted = self.file.text.get(value.offset..).and_then(|t| t.chars().next()).is_some_and(|c| c == '"' || c == '\'');
        self.file.span_at(value.line, value.column + usize::from(quoted) + column.saturating_sub(1), len.max(1))
    }

    /// A secret (a key, a password, a token): read from the environment or a mounted file,
    /// never written out in a pipeline file, which lives in git.
    pub fn secret(&self, s: &Spanned<String>, key_path: &str) -> Result<String, Diagnostic> {
        if s.value.is_empty() {
            return Err(self.diag(DiagCode::InvalidValue, s.span, key_path, "the secret is empty").expected("e.g. `${env:ERP_TOKEN}`"));
        }
        if s.written.is_none() {
            return Err(self.diag(DiagCode::InvalidValue, s.span, key_path, "a secret is written in the pipeline file").hint(
                "pipeline files are versioned in git: read it from the environment or a mounted file, `${env:NAME}` or `${file:/run/secrets/NAME}`",
            ));
        }
        if let Some(name) = self.defaulted_reference(s.written.as_deref().unwrap_or_default()) {
            self.warnings.lock().expect("warnings").push(
                self.diag(DiagCode::InvalidValue, s.span, key_path, format!("the secret is the default written in the file: {name}"))
                    .hint("fine for a demo; anyone who reads the file knows it: set the real one wherever this runs for real")
                    .warning(),
            );
        }
        Ok(s.value.clone())
    }

    /// The first `${NAME:-default}` (or `${file:PATH:-default}`) of `written` whose default was
    /// used: its variable is unset or empty, or its file cannot be read.
    fn defaulted_reference(&self, written: &str) -> Option<String> {
        let mut rest = written;
        while let Some(start) = rest.find("${") {
            let inner = &rest[start + 2..];
            let end = inner.find('}')?;
            let reference = &inner[..end];
            if let Some((name, _)) = reference.split_once(":-") {
                let unset = match name.strip_prefix("file:") {
                    Some(path) => self.shared.env.file(path).is_err().then(|| format!("the file `{path}` cannot be read")),
                    None => {
                        let var = name.strip_prefix("env:").unwrap_or(name);
                        self.shared.env.var(var).is_none_or(|v| v.is_empty()).then(|| format!("`{var}` is not set"))
                    }
                };
                if unset.is_some() {
                    return unset;
                }
            }
            rest = &inner[end + 1..];
        }
        None
    }

    /// A referenced file that must exist.
    pub fn existing_file(&self, p: &Spanned<String>, key_path: &str, what: &str) -> Result<PathBuf, Diagnostic> {
        let path = self.resolve(&p.value);
        if path.is_file() {
            Ok(path)
        } else {
            // Where it looked reveals a `${VAR}`'s value: said only for paths written out.
            let looked = if p.written.is_some() { String::new() } else { format!(" (looked for {})", path.display()) };
            Err(self
                .diag(DiagCode::FileNotFound, p.span, key_path, format!("{what} `{}` does not exist", p.shown()))
                .hint(format!("paths are relative to the folder of {}{looked}", self.file.path.display())))
        }
    }

    fn path_error(&self, at: &Spanned<String>, key_path: &str, e: PathError) -> Diagnostic {
        self.diag(DiagCode::JsonPathSyntax, self.span_inside(at.span, e.column, 1), key_path, e.message)
            .hint("JSONPath (RFC 9535): `$.field`, `$.list[0]`, `$.list[*].sku`, `$.list[?@.qty > 1]`; `$root.x` reads the whole message inside `each`")
    }

    pub fn jsonpath(&self, at: &Spanned<String>, key_path: &str) -> Result<CompiledPath, Diagnostic> {
        CompiledPath::compile(&at.value).map_err(|e| self.path_error(at, key_path, e))
    }

    pub fn condition(&self, at: &Spanned<String>, key_path: &str) -> Result<Condition, Diagnostic> {
        Condition::compile(&at.value).map_err(|e| self.path_error(at, key_path, e))
    }

    /// A duration such as `30s` or `7d`, within `range`; `expected` says what is allowed.
    pub fn duration(
        &self,
        at: &Spanned<String>,
        key_path: &str,
        range: std::ops::RangeInclusive<std::time::Duration>,
        expected: &str,
    ) -> Result<std::time::Duration, Diagnostic> {
        match humantime::parse_duration(at.value.trim()) {
            Ok(d) if range.contains(&d) => Ok(d),
            _ => {
                Err(self.diag(DiagCode::InvalidValue, at.span, key_path, format!("`{}` is not a duration", at.shown())).expected(expected))
            }
        }
    }

    pub fn template(&self, at: &Spanned<String>, key_path: &str) -> Result<Template, Diagnostic> {
        Template::compile(&at.value).map_err(|e| self.path_error(at, key_path, e))
    }

    /// The schema store of the `schemas/` folder holding `schema_file`.
    pub fn schema_store(&self, schema_file: &Path) -> Arc<SchemaStore> {
        let root = schema_root(schema_file);
        let mut stores = self.shared.schema_stores.lock().expect("schema store cache");
        stores.entry(root.clone()).or_insert_with(|| Arc::new(SchemaStore::open(&root))).clone()
    }

    pub fn lookup_table(&self, p: &Spanned<String>, key_path: &str) -> Result<Arc<LookupTable>, Vec<Diagnostic>> {
        let path = self.existing_file(p, key_path, "lookup table").map_err(|d| vec![d])?;
        let key = std::path::absolute(&path).unwrap_or(path.clone());
        if let Some(t) = self.shared.tables.lock().expect("table cache").get(&key) {
            return Ok(t.clone());
        }
        let table = Arc::new(LookupTable::load(&path)?);
        self.shared.tables.lock().expect("table cache").insert(key, table.clone());
        Ok(table)
    }
}

/// `a/b/../c` -> `a/c`, without touching the file system (the path may not exist yet).
pub fn normalize(p: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir if matches!(out.components().next_back(), Some(Component::Normal(_))) => {
                out.pop();
            }
            other => out.push(other.as_os_str()),
        }
    }
    if out.as_os_str().is_empty() { PathBuf::from(".") } else { out }
}

/// Collects the results of many fallible builds, keeping every diagnostic. A diagnostic at line 0
/// is about a value that was already reported as malformed (it has no position), and is dropped.
#[derive(Default)]
pub struct Diags(pub Vec<Diagnostic>);

impl Diags {
    pub fn take<T>(&mut self, r: Result<T, Diagnostic>) -> Option<T> {
        r.map_err(|d| self.push(d)).ok()
    }

    pub fn take_all<T>(&mut self, r: Result<T, Vec<Diagnostic>>) -> Option<T> {
        r.map_err(|ds| ds.into_iter().for_each(|d| self.push(d))).ok()
    }

    pub fn push(&mut self, d: Diagnostic) {
        if d.span.line > 0 {
            self.0.push(d)
        }
    }

    /// Diagnostics found before the build (structure), kept as they are.
    pub fn extend(&mut self, ds: Vec<Diagnostic>) {
        self.0.extend(ds)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn finish<T>(self, v: T) -> Result<T, Vec<Diagnostic>> {
        if self.0.is_empty() { Ok(v) } else { Err(self.0) }
    }
}
