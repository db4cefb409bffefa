//! The validate stage: JSON Schema, compiled once at load.
//!
//! Draft 2020-12 unless a schema's `$schema` names another draft. Every `$ref` resolves locally:
//! all schemas under the `schemas/` folder are indexed by their `$id`, and relative file
//! references are read from disk. Nothing is ever fetched over the network.

use crate::config::{DiagCode, Diagnostic, SourceFile, Span, yaml};
use crate::doc::{self, Doc};
use crate::message::{Document, ErrorDetail, Failure, reason};
use jsonschema::json::{Array, Json, Node, NodeIdentity, Object};
use jsonschema::{Draft, JsonType, Retrieve, Uri};
use serde_json::Value;
use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("cannot read schema {}: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("schema {} is not valid JSON: {message}", path.display())]
    Json { path: PathBuf, line: usize, column: usize, message: String },
    #[error("schema {} is not a valid JSON Schema at `{pointer}`: {message}", path.display())]
    Invalid { path: PathBuf, pointer: String, message: String },
    #[error("schema {} cannot be compiled: {message}", path.display())]
    Compile { path: PathBuf, message: String },
}

impl SchemaError {
    /// A diagnostic pointing into the schema file itself.
    pub fn to_diagnostic(&self) -> Diagnostic {
        let (path, code) = match self {
            SchemaError::Read { path, .. } => (path, DiagCode::FileNotFound),
            SchemaError::Json { path, .. } | SchemaError::Invalid { path, .. } | SchemaError::Compile { path, .. } => {
                (path, DiagCode::InvalidSchema)
            }
        };
        let file = SourceFile::read(path).unwrap_or_else(|_| SourceFile::new(path, ""));
        let span = match self {
            SchemaError::Json { line, column, .. } => file.span_at(*line, *column, 1),
            SchemaError::Invalid { pointer, .. } => span_of_pointer(&file, pointer),
            _ => Span::new(1, 1, 0, 0),
        };
        let message = match self {
            SchemaError::Read { source, .. } => format!("cannot read this schema: {source}"),
            SchemaError::Json { message, .. } => format!("not valid JSON: {message}"),
            SchemaError::Invalid { message, pointer, .. } => format!("not a valid JSON Schema at `{pointer}`: {message}"),
            SchemaError::Compile { message, .. } => format!("this schema cannot be compiled: {message}"),
        };
        Diagnostic::new(code, &file, span, "", message)
    }
}

/// The position of a JSON pointer in a JSON file (JSON is YAML, so the YAML reader finds it).
pub fn span_of_pointer(file: &SourceFile, pointer: &str) -> Span {
    yaml::parse_plain(file)
        .ok()
        .and_then(|root| {
            // Point at the key when the pointer ends in one: that is where the analyst looks.
            let (parent, last) = pointer.rsplit_once('/')?;
            let parent = root.at_pointer(parent)?;
            let last = last.replace("~1", "/").replace("~0", "~");
            parent.key_node(&last).or_else(|| parent.get(&last)).map(|n| n.span)
        })
        .unwrap_or(Span::new(1, 1, 0, 0))
}

/// Validators check [`Doc`]s directly: jsonschema is generic over the JSON representation.
pub type Validator = jsonschema::Validator<DocJson>;

/// The [`Doc`] representation for jsonschema.
pub struct DocJson;

impl Json for DocJson {
    type Node<'a> = &'a Doc;
    type PreparedKey = String;
    type StringBuffer = ();
    // Objects are small vectors scanned by `get`: one pass over the members beats repeated lookups.
    const KEYS_PER_LOOKUP: usize = 8;
    const ACYCLIC: bool = true;

    fn prepare_key(key: &str) -> String {
        key.to_owned()
    }

    fn with_string_node<T>((): &mut (), string: &str, f: impl FnOnce(&Doc) -> T) -> T {
        f(&Doc::from(string))
    }
}

impl<'a> Node<'a, DocJson> for &'a Doc {
    type Object = &'a doc::Object;
    type Array = &'a [Doc];
    type Number = &'a serde_json::Number;

    fn as_object(&self) -> Option<&'a doc::Object> {
        Doc::as_object(self)
    }
    fn as_array(&self) -> Option<&'a [Doc]> {
        Doc::as_array(self).map(Vec::as_slice)
    }
    fn as_string(&self) -> Option<Cow<'a, str>> {
        Doc::as_str(self).map(Cow::Borrowed)
    }
    fn as_number(&self) -> Option<&'a serde_json::Number> {
        Doc::as_number(self)
    }
    fn as_boolean(&self) -> Option<bool> {
        Doc::as_bool(self)
    }
    fn is_null(&self) -> bool {
        Doc::is_null(self)
    }
    fn json_type(&self) -> JsonType {
        match self {
            Doc::Null => JsonType::Null,
            Doc::Bool(_) => JsonType::Boolean,
            Doc::Number(_) => JsonType::Number,
            Doc::String(_) => JsonType::String,
            Doc::Array(_) => JsonType::Array,
            Doc::Object(_) => JsonType::Object,
        }
    }
    fn equals_value(&self, expected: &Value) -> bool {
        doc_equals_value(self, expected)
    }
    fn to_value(&self) -> Cow<'a, Value> {
        Cow::Owned(self.to_json())
    }
    fn identity(&self) -> Option<NodeIdentity> {
        Some(NodeIdentity::new(std::ptr::from_ref::<Doc>(self) as usize))
    }
}

/// `const`/`enum` comparison without converting the document (numbers compare by value).
fn doc_equals_value(d: &Doc, v: &Value) -> bool {
    match (d, v) {
        (Doc::Null, Value::Null) => true,
        (Doc::Bool(a), Value::Bool(b)) => a == b,
        (Doc::String(a), Value::String(b)) => a.as_str() == b,
        (Doc::Number(a), Value::Number(b)) => jsonschema::json::cmp::equal_numbers(a, b),
        (Doc::Array(a), Value::Array(b)) => a.len() == b.len() && a.iter().zip(b).all(|(x, y)| doc_equals_value(x, y)),
        (Doc::Object(a), Value::Object(b)) => a.len() == b.len() && a.iter().all(|(k, x)| b.get(k).is_some_and(|y| doc_equals_value(x, y))),
        _ => false,
    }
}

impl<'a> Object<'a, DocJson> for &'a doc::Object {
    type Node = &'a Doc;
    type MemberName = &'a str;
    type MembersIter = doc::Members<'a>;

    fn len(&self) -> usize {
        doc::Object::len(self)
    }
    fn get(&self, key: &String) -> Option<&'a Doc> {
        doc::Object::get(self, key)
    }
    fn members(&self) -> doc::Members<'a> {
        doc::Object::iter(self)
    }
}

impl<'a> Array<'a, DocJson> for &'a [Doc] {
    type Node = &'a Doc;
    type ElementsIter = std::slice::Iter<'a, Doc>;

    fn len(&self) -> usize {
        <[Doc]>::len(self)
    }
    fn elements(&self) -> std::slice::Iter<'a, Doc> {
        (*self).iter()
    }
}

/// Every schema under one `schemas/` folder, indexed by `$id`, with compiled validators cached.
pub struct SchemaStore {
    root: PathBuf,
    by_id: Arc<HashMap<String, Value>>,
    validators: Mutex<HashMap<PathBuf, Arc<Validator>>>,
}

/// The folder whose schemas a schema file may reference: the nearest ancestor named `schemas`,
/// else the file's own folder.
pub fn schema_root(file: &Path) -> PathBuf {
    let abs = std::path::absolute(file).unwrap_or_else(|_| file.to_path_buf());
    abs.ancestors()
        .skip(1)
        .find(|a| a.file_name().is_some_and(|n| n == "schemas"))
        .map(Path::to_path_buf)
        .unwrap_or_else(|| abs.parent().map(Path::to_path_buf).unwrap_or_default())
}

fn read_json(path: &Path) -> Result<Value, SchemaError> {
    crate::config::diag::note_read(path);
    let text = std::fs::read_to_string(path).map_err(|source| SchemaError::Read { path: path.to_path_buf(), source })?;
    serde_json::from_str(&text).map_err(|e| SchemaError::Json {
        path: path.to_path_buf(),
        line: e.line(),
        column: e.column(),
        message: e.to_string(),
    })
}

fn json_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    let mut entries: Vec<_> = entries.flatten().map(|e| e.path()).collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            json_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "json") {
            out.push(p);
        }
    }
}

fn file_uri(path: &Path) -> String {
    format!("file://{}", path.display())
}

/// Resolves `$ref`s from the index and from local files; refuses the network.
struct LocalRetriever {
    by_id: Arc<HashMap<String, Value>>,
}

impl Retrieve for LocalRetriever {
    fn retrieve(&self, uri: &Uri<String>) -> Result<Value, Box<dyn std::error::Error + Send + Sync>> {
        let s = uri.as_str();
        let s = s.split('#').next().unwrap_or(s);
        if let Some(v) = self.by_id.get(s) {
            return Ok(v.clone());
        }
        if let Some(path) = s.strip_prefix("file://") {
            return Ok(read_json(Path::new(path))?);
        }
        Err(format!("`{s}` is not the `$id` of any schema under schemas/ (Switchyard never fetches schemas over the network)").into())
    }
}

impl SchemaStore {
    /// Indexes every `*.json` under `root` by `$id`. Files that are not JSON are reported when used.
    pub fn open(root: &Path) -> Self {
        let mut files = Vec::new();
        json_files(root, &mut files);
        let mut by_id = HashMap::new();
        for f in files {
            if let Ok(v) = read_json(&f) {
                if let Some(id) = v.get("$id").and_then(Value::as_str) {
                    by_id.insert(id.trim_end_matches('#').to_string(), v.clone());
                }
                by_id.insert(file_uri(&f), v);
            }
        }
        SchemaStore { root: root.to_path_buf(), by_id: Arc::new(by_id), validators: Mutex::new(HashMap::new()) }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The compiled validator of a schema file; checks the schema against its meta-schema first.
    pub fn validator(&self, file: &Path) -> Result<Arc<Validator>, SchemaError> {
        let abs = std::path::absolute(file).unwrap_or_else(|_| file.to_path_buf());
        if let Some(v) = self.validators.lock().expect("validator cache").get(&abs) {
            return Ok(v.clone());
        }
        let schema = read_json(&abs)?;
        if let Err(e) = jsonschema::meta::validate(&schema) {
            return Err(SchemaError::Invalid { path: abs, pointer: e.instance_path().to_string(), message: e.to_string() });
        }
        let mut options = jsonschema::options_for::<DocJson>()
            .should_validate_formats(true)
            // The regex crate (linear time, no backtracking) rather than fancy-regex: schema
            // patterns are matched on every message.
            .with_pattern_options(jsonschema::PatternOptions::regex())
            .with_retriever(LocalRetriever { by_id: self.by_id.clone() });
        if schema.get("$schema").is_none() {
            options = options.with_draft(Draft::Draft202012);
        }
        if schema.get("$id").is_none() {
            options = options.with_base_uri(file_uri(&abs));
        }
        let validator = Arc::new(options.build(&schema).map_err(|e| SchemaError::Compile { path: abs.clone(), message: e.to_string() })?);
        self.validators.lock().expect("validator cache").insert(abs, validator.clone());
        Ok(validator)
    }
}

/// Longest message kept from the validator: its messages quote the offending value, which can be
/// a whole order.
const MAX_MESSAGE: usize = 300;

/// One compiled schema check.
#[derive(Clone)]
pub struct SchemaCheck {
    validator: Arc<Validator>,
    document: Document,
}

impl SchemaCheck {
    pub fn new(validator: Arc<Validator>, document: Document) -> Self {
        SchemaCheck { validator, document }
    }

    /// Ok, or a failure listing every violation with its pointer.
    pub fn check(&self, value: &Doc) -> Result<(), Failure> {
        if self.validator.is_valid(value) {
            return Ok(());
        }
        let errors = self
            .validator
            .iter_errors(value)
            .map(|e| {
                let mut message = e.to_string();
                if message.len() > MAX_MESSAGE {
                    let cut = (0..=MAX_MESSAGE).rev().find(|i| message.is_char_boundary(*i)).unwrap_or(0);
                    message.truncate(cut);
                    message.push('…');
                }
                ErrorDetail { pointer: e.instance_path().to_string(), message, document: self.document }
            })
            .collect();
        Err(Failure::new(reason::SCHEMA_VIOLATION, errors))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn write(dir: &Path, name: &str, v: &Value) -> PathBuf {
        let p = dir.join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, serde_json::to_string_pretty(v).unwrap()).unwrap();
        p
    }

    #[test]
    fn resolves_refs_across_files_by_id_and_reports_every_violation() {
        let dir = tempfile::tempdir().unwrap();
        let schemas = dir.path().join("schemas");
        write(
            &schemas,
            "common.schema.json",
            &json!({
                "$id": "https://schemas.example/x/common.schema.json",
                "$defs": {"Money": {"type": "object", "required": ["amount", "currency"], "properties": {"amount": {"type": "string", "pattern": "^[0-9]+\\.[0-9]{2}$"}}}}
            }),
        );
        let order = write(
            &schemas,
            "sub/order.schema.json",
            &json!({
                "$id": "https://schemas.example/x/order.schema.json",
                "type": "object",
                "required": ["id", "total"],
                "properties": {"total": {"$ref": "common.schema.json#/$defs/Money"}, "placed_at": {"type": "string", "format": "date-time"}}
            }),
        );
        let store = SchemaStore::open(&schema_root(&order));
        assert_eq!(store.root(), schemas.as_path());
        let check = SchemaCheck::new(store.validator(&order).unwrap(), Document::Input);
        assert!(check.check(&crate::doc!({"id": 1, "total": {"amount": "1.00", "currency": "USD"}})).is_ok());
        let f = check.check(&crate::doc!({"total": {"amount": "1.0"}, "placed_at": "yesterday"})).unwrap_err();
        assert_eq!(f.reason, "schema_violation");
        let pointers: Vec<&str> = f.errors.iter().map(|e| e.pointer.as_str()).collect();
        assert!(pointers.contains(&""), "{pointers:?}"); // missing id
        assert!(pointers.contains(&"/total"), "{pointers:?}"); // missing currency
        assert!(pointers.contains(&"/total/amount"), "{pointers:?}");
        assert!(pointers.contains(&"/placed_at"), "{pointers:?}"); // formats are asserted
        assert_eq!(f.errors.len(), 4);
    }

    #[test]
    fn refuses_network_refs_and_reports_invalid_schemas_where_they_are() {
        let dir = tempfile::tempdir().unwrap();
        let remote = write(dir.path(), "remote.json", &json!({"$ref": "https://example.com/other.json"}));
        let store = SchemaStore::open(dir.path());
        let e = store.validator(&remote).unwrap_err();
        assert!(e.to_string().contains("never fetches"), "{e}");
        let bad = dir.path().join("bad.json");
        std::fs::write(&bad, "{\n  \"type\": \"object\",\n  \"properties\": {\n    \"a\": {\"type\": \"strin\"}\n  }\n}\n").unwrap();
        let e = store.validator(&bad).unwrap_err();
        let d = e.to_diagnostic();
        assert_eq!(d.code, DiagCode::InvalidSchema);
        assert_eq!(d.span.line, 4, "{d}");
    }

    #[test]
    fn honours_other_drafts_named_by_schema() {
        let dir = tempfile::tempdir().unwrap();
        // In draft 4, exclusiveMaximum is a boolean modifier of maximum.
        let s = write(
            dir.path(),
            "d4.json",
            &json!({"$schema": "http://json-schema.org/draft-04/schema#", "maximum": 10, "exclusiveMaximum": true}),
        );
        let store = SchemaStore::open(dir.path());
        let check = SchemaCheck::new(store.validator(&s).unwrap(), Document::Input);
        assert!(check.check(&crate::doc!(9)).is_ok());
        assert!(check.check(&crate::doc!(10)).is_err());
    }
}
