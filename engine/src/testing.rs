//! Pipeline tests: YAML files beside each pipeline (`orders.yaml` + `orders.test.yaml`) holding
//! inputs and what each sink must receive, or which exception must be raised. Unknown keywords
//! are load errors, never passes; dynamic fields can be masked.

use crate::build::Shared;
use crate::config::{DiagCode, Diagnostic, SourceFile, Spanned, parse_node, yaml};
use crate::message::{RawMessage, Stage, escape_pointer_token};
use crate::pipeline::{Outcome, Pipeline, load};
use indexmap::IndexMap;
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A test file.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(title = "Switchyard pipeline tests")]
pub struct TestFile {
    /// The pipeline file under test, relative to this file (default: `<name>.yaml` beside it).
    #[serde(default)]
    pub pipeline: Option<Spanned<String>>,
    /// JSON pointers ignored in every compared payload, e.g. `/received_at`.
    #[serde(default)]
    pub mask: Vec<String>,
    pub tests: Vec<TestCase>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TestCase {
    pub name: String,
    pub input: TestInput,
    pub expect: Expect,
}

/// One input message: a file, inline JSON, or raw text (to test malformed input).
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TestInput {
    /// A file relative to the test file. JSON files are one message; `.csv` takes `row`.
    #[serde(default)]
    pub file: Option<Spanned<String>>,
    /// For CSV files: which data row (1 = the first row after the header).
    #[serde(default)]
    pub row: Option<usize>,
    #[serde(default)]
    pub json: Option<Value>,
    #[serde(default)]
    pub text: Option<String>,
    /// Transport headers, e.g. `x-correlation-id`.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Expect {
    /// What each sink receives. A sink not listed must receive nothing; `[]` says so explicitly.
    #[serde(default)]
    pub sinks: Option<IndexMap<String, Vec<ExpectOutput>>>,
    /// The exception the message must raise (then no sink receives anything).
    #[serde(default)]
    pub exception: Option<ExpectException>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExpectOutput {
    /// The exact payload (after masking).
    #[serde(default)]
    pub payload: Option<Value>,
    /// The exact payload, from a JSON file relative to the test file.
    #[serde(default)]
    pub payload_file: Option<Spanned<String>>,
    /// Only these keys and values must be present in the payload (nested objects likewise).
    #[serde(default)]
    pub payload_contains: Option<Value>,
    /// Only these keys and values must be present in the envelope metadata.
    #[serde(default)]
    pub metadata_contains: Option<Value>,
    /// More JSON pointers to ignore in this payload.
    #[serde(default)]
    pub mask: Vec<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExpectException {
    pub reason: String,
    #[serde(default)]
    pub stage: Option<Stage>,
    /// Errors that must be among the exception's errors.
    #[serde(default)]
    pub errors: Vec<ExpectError>,
    /// The exact number of errors.
    #[serde(default)]
    pub error_count: Option<usize>,
    #[serde(default)]
    pub hint_contains: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExpectError {
    pub pointer: String,
    #[serde(default)]
    pub message_contains: Option<String>,
}

/// The result of one test case.
#[derive(Debug)]
pub struct CaseResult {
    pub name: String,
    /// Empty when the case passed.
    pub failures: Vec<String>,
    /// Problems of the case itself (a sink the pipeline does not have, an unreadable input):
    /// the case could not run.
    pub problems: Vec<Diagnostic>,
}

impl CaseResult {
    pub fn passed(&self) -> bool {
        self.failures.is_empty() && self.problems.is_empty()
    }
}

/// The results of one test file, or why it could not run.
#[derive(Debug)]
pub struct FileResult {
    pub file: PathBuf,
    pub pipeline: Option<String>,
    pub cases: Vec<CaseResult>,
    pub load_errors: Vec<Diagnostic>,
}

impl FileResult {
    pub fn passed(&self) -> bool {
        self.load_errors.is_empty() && self.cases.iter().all(CaseResult::passed)
    }
}

fn remove_pointer(v: &mut Value, pointer: &str) {
    let Some((parent, last)) = pointer.rsplit_once('/') else { return };
    let last = last.replace("~1", "/").replace("~0", "~");
    match v.pointer_mut(parent) {
        Some(Value::Object(o)) => {
            o.remove(&last);
        }
        Some(Value::Array(a)) => {
            if let Ok(i) = last.parse::<usize>()
                && i < a.len()
            {
                a[i] = Value::String("<masked>".into());
            }
        }
        _ => {}
    }
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 120 { format!("{}…", s.chars().take(120).collect::<String>()) } else { s }
}

/// Differences between `expected` and `actual` as "pointer: expected X, got Y" lines.
pub fn diff(expected: &Value, actual: &Value, subset: bool) -> Vec<String> {
    let mut out = Vec::new();
    diff_at("", expected, actual, subset, &mut out);
    out
}

fn diff_at(ptr: &str, e: &Value, a: &Value, subset: bool, out: &mut Vec<String>) {
    match (e, a) {
        (Value::Object(eo), Value::Object(ao)) => {
            for (k, ev) in eo {
                let p = format!("{ptr}/{}", escape_pointer_token(k));
                match ao.get(k) {
                    Some(av) => diff_at(&p, ev, av, subset, out),
                    None => out.push(format!("{p}: expected {}, but it is missing", short(ev))),
                }
            }
            if !subset {
                for (k, av) in ao {
                    if !eo.contains_key(k) {
                        out.push(format!("{ptr}/{}: not expected, got {}", escape_pointer_token(k), short(av)));
                    }
                }
            }
        }
        (Value::Array(ea), Value::Array(aa)) if subset || ea.len() == aa.len() => {
            if ea.len() > aa.len() {
                out.push(format!("{ptr}: expected at least {} items, got {}", ea.len(), aa.len()));
            }
            for (i, (ev, av)) in ea.iter().zip(aa).enumerate() {
                diff_at(&format!("{ptr}/{i}"), ev, av, subset, out);
            }
        }
        (Value::Array(ea), Value::Array(aa)) => {
            out.push(format!("{ptr}: expected {} items, got {}", ea.len(), aa.len()));
            for (i, (ev, av)) in ea.iter().zip(aa).enumerate() {
                diff_at(&format!("{ptr}/{i}"), ev, av, subset, out);
            }
        }
        _ if e == a => {}
        _ => out.push(format!("{}: expected {}, got {}", if ptr.is_empty() { "/" } else { ptr }, short(e), short(a))),
    }
}

fn read_json(base: &Path, p: &Spanned<String>, file: &SourceFile, key: &str) -> Result<Value, Diagnostic> {
    let path = base.join(&p.value);
    let text = std::fs::read_to_string(&path)
        .map_err(|e| Diagnostic::new(DiagCode::FileNotFound, file, p.span, key, format!("cannot read `{}`: {e}", p.value)))?;
    serde_json::from_str(&text)
        .map_err(|e| Diagnostic::new(DiagCode::InvalidFile, file, p.span, key, format!("`{}` is not valid JSON: {e}", p.value)))
}

fn input_message(base: &Path, input: &TestInput, file: &SourceFile, key: &str) -> Result<RawMessage, Diagnostic> {
    let mut raw = match (&input.file, &input.json, &input.text) {
        (Some(f), None, None) => {
            let path = crate::build::normalize(&base.join(&f.value));
            let bytes = std::fs::read(&path).map_err(|e| {
                Diagnostic::new(DiagCode::FileNotFound, file, f.span, format!("{key}.file"), format!("cannot read `{}`: {e}", f.value))
            })?;
            let format = crate::source::file::format_of(&path).unwrap_or(crate::source::Format::Json);
            let shown = path.display().to_string();
            let mut messages = crate::source::file::split(&bytes, format, &shown, &Default::default());
            let index = match (format, input.row) {
                (crate::source::Format::Json, None) => 0,
                (_, Some(r)) if r >= 1 => r - 1,
                _ => {
                    return Err(Diagnostic::new(
                        DiagCode::MissingKey,
                        file,
                        f.span,
                        format!("{key}.row"),
                        "this file holds several messages: say which with `row:` (1 = the first)",
                    ));
                }
            };
            if index >= messages.len() {
                return Err(Diagnostic::new(
                    DiagCode::InvalidValue,
                    file,
                    f.span,
                    format!("{key}.row"),
                    format!("the file has {} messages", messages.len()),
                ));
            }
            messages.swap_remove(index)
        }
        (None, Some(v), None) => RawMessage::json(serde_json::to_vec(v).expect("JSON serializes")),
        (None, None, Some(t)) => RawMessage::json(t.as_bytes().to_vec()),
        _ => {
            return Err(Diagnostic::new(
                DiagCode::Conflict,
                file,
                Default::default(),
                key,
                "an input has exactly one of `file`, `json` or `text`",
            ));
        }
    };
    raw.headers.extend(input.headers.iter().map(|(k, v)| (k.to_ascii_lowercase(), v.clone())));
    Ok(raw)
}

/// Runs one test file.
pub fn run_file(path: &Path, shared: &Shared) -> FileResult {
    let mut result = FileResult { file: path.to_path_buf(), pipeline: None, cases: Vec::new(), load_errors: Vec::new() };
    let file = match SourceFile::read(path) {
        Ok(f) => f,
        Err(e) => {
            result.load_errors.push(Diagnostic::new(
                DiagCode::FileNotFound,
                &SourceFile::new(path, ""),
                Default::default(),
                "",
                format!("cannot read test file: {e}"),
            ));
            return result;
        }
    };
    let node = match yaml::parse(&file, &*shared.env) {
        Ok(n) => n,
        Err(d) => {
            result.load_errors = d;
            return result;
        }
    };
    let tf = match parse_node::<TestFile>(&node, &file, &[]) {
        Ok(t) => t,
        Err(d) => {
            result.load_errors = d;
            return result;
        }
    };
    // Problems found while running point at the key they are about.
    let place = |mut d: Diagnostic| {
        if d.span.line == 0 {
            d.span = node.span_of_path(&d.key_path).unwrap_or(crate::config::Span::new(1, 1, 0, 0));
        }
        d
    };
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let pipeline_path = match &tf.pipeline {
        Some(p) => base.join(&p.value),
        None => {
            let name = path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
            base.join(name.replace(".test.yaml", ".yaml").replace(".test.yml", ".yml"))
        }
    };
    if !pipeline_path.is_file() {
        result.load_errors.push(place(
            Diagnostic::new(
                DiagCode::FileNotFound,
                &file,
                Default::default(),
                "pipeline",
                format!("the pipeline under test, {}, does not exist", pipeline_path.display()),
            )
            .hint("say which pipeline with `pipeline:`, relative to this file"),
        ));
        return result;
    }
    let pipeline = match load::load_file(&pipeline_path, shared) {
        Ok(p) => p,
        Err(d) => {
            result.load_errors = d;
            return result;
        }
    };
    result.pipeline = Some(pipeline.name.clone());
    for (i, case) in tf.tests.iter().enumerate() {
        let key = format!("tests[{i}]");
        let (failures, problems) = match run_case(&pipeline, case, &tf, &base, &file, &key) {
            Ok(f) => (f, Vec::new()),
            Err(d) => (Vec::new(), vec![place(d)]),
        };
        result.cases.push(CaseResult { name: case.name.clone(), failures, problems });
    }
    result
}

fn run_case(p: &Pipeline, case: &TestCase, tf: &TestFile, base: &Path, file: &SourceFile, key: &str) -> Result<Vec<String>, Diagnostic> {
    if case.expect.sinks.is_some() == case.expect.exception.is_some() {
        return Err(Diagnostic::new(
            DiagCode::Conflict,
            file,
            Default::default(),
            format!("{key}.expect"),
            format!("test `{}`: expect either `sinks` or `exception`", case.name),
        ));
    }
    if let Some(sinks) = &case.expect.sinks {
        for name in sinks.keys() {
            if !p.sinks.iter().any(|(s, _)| s == name) {
                let names: Vec<&str> = p.sinks.iter().map(|(s, _)| s.as_str()).collect();
                return Err(Diagnostic::new(
                    DiagCode::UndeclaredSink,
                    file,
                    Default::default(),
                    format!("{key}.expect.sinks.{name}"),
                    format!("test `{}` names sink `{name}`, which pipeline {} does not declare", case.name, p.name),
                )
                .expected(crate::config::diag::one_of(&names)));
            }
        }
    }
    let raw = input_message(base, &case.input, file, &format!("{key}.input"))?;
    let mut failures = Vec::new();
    match (p.process(raw), &case.expect) {
        (Outcome::Routed { output, sinks }, Expect { sinks: Some(expected), .. }) => {
            for (i, (name, _)) in p.sinks.iter().enumerate() {
                let got = usize::from(sinks.contains(&i));
                let want = expected.get(name).map(Vec::as_slice).unwrap_or(&[]);
                if want.len() != got {
                    failures.push(format!("sink `{name}`: expected {} message(s), got {got}", want.len()));
                    continue;
                }
                for w in want {
                    failures
                        .extend(check_output(w, &output, &tf.mask, base, file, key)?.into_iter().map(|f| format!("sink `{name}`: {f}")));
                }
            }
        }
        (Outcome::Routed { sinks, .. }, Expect { exception: Some(e), .. }) => {
            let names: Vec<&str> = sinks.iter().map(|i| p.sink_name(*i)).collect();
            failures.push(format!("expected exception `{}`, but the message was routed to {}", e.reason, names.join(", ")));
        }
        (Outcome::Failed(rec), Expect { exception: Some(e), .. }) => {
            if rec.reason != e.reason {
                failures.push(format!("exception reason: expected `{}`, got `{}`", e.reason, rec.reason));
            }
            if let Some(s) = e.stage
                && rec.stage != s
            {
                failures.push(format!("exception stage: expected `{}`, got `{}`", s.as_str(), rec.stage.as_str()));
            }
            for want in &e.errors {
                let hit = rec
                    .errors
                    .iter()
                    .any(|g| g.pointer == want.pointer && want.message_contains.as_ref().is_none_or(|m| g.message.contains(m.as_str())));
                if !hit {
                    let got: Vec<String> = rec
                        .errors
                        .iter()
                        .map(|g| format!("{} ({})", if g.pointer.is_empty() { "/" } else { &g.pointer }, g.message))
                        .collect();
                    failures.push(format!(
                        "expected an error at `{}`{}; the errors were: {}",
                        want.pointer,
                        want.message_contains.as_ref().map(|m| format!(" containing \"{m}\"")).unwrap_or_default(),
                        got.join("; ")
                    ));
                }
            }
            if let Some(n) = e.error_count
                && rec.errors.len() != n
            {
                failures.push(format!("expected {n} error(s), got {}", rec.errors.len()));
            }
            if let Some(h) = &e.hint_contains
                && !rec.hint.as_deref().is_some_and(|x| x.contains(h.as_str()))
            {
                failures.push(format!("expected a hint containing \"{h}\", got {:?}", rec.hint));
            }
        }
        (Outcome::Failed(rec), Expect { sinks: Some(_), .. }) => {
            let errs: Vec<String> = rec
                .errors
                .iter()
                .take(5)
                .map(|e| format!("{} {}", if e.pointer.is_empty() { "/" } else { &e.pointer }, e.message))
                .collect();
            failures.push(format!(
                "expected outputs, but the message went to exceptions as `{}` at stage {}: {}",
                rec.reason,
                rec.stage.as_str(),
                errs.join("; ")
            ));
        }
        _ => unreachable!("checked above: exactly one of sinks/exception"),
    }
    Ok(failures)
}

fn check_output(
    w: &ExpectOutput,
    output: &crate::message::Output,
    file_mask: &[String],
    base: &Path,
    file: &SourceFile,
    key: &str,
) -> Result<Vec<String>, Diagnostic> {
    let mut failures = Vec::new();
    let mut actual = output.payload.to_json();
    for m in file_mask.iter().chain(&w.mask) {
        remove_pointer(&mut actual, m);
    }
    let exact = match (&w.payload, &w.payload_file) {
        (Some(v), None) => Some(v.clone()),
        (None, Some(f)) => Some(read_json(base, f, file, &format!("{key}.expect.payload_file"))?),
        (None, None) => None,
        _ => return Err(Diagnostic::new(DiagCode::Conflict, file, Default::default(), key, "give `payload` or `payload_file`, not both")),
    };
    if let Some(mut e) = exact {
        for m in file_mask.iter().chain(&w.mask) {
            remove_pointer(&mut e, m);
        }
        failures.extend(diff(&e, &actual, false).into_iter().take(20).map(|d| format!("payload {d}")));
    }
    if let Some(c) = &w.payload_contains {
        failures.extend(diff(c, &actual, true).into_iter().take(20).map(|d| format!("payload {d}")));
    }
    if let Some(c) = &w.metadata_contains {
        let meta = serde_json::to_value(&output.metadata).expect("metadata serializes");
        failures.extend(diff(c, &meta, true).into_iter().take(20).map(|d| format!("metadata {d}")));
    }
    if w.payload.is_none() && w.payload_file.is_none() && w.payload_contains.is_none() && w.metadata_contains.is_none() {
        return Err(Diagnostic::new(
            DiagCode::MissingKey,
            file,
            Default::default(),
            key,
            "an expected output needs `payload`, `payload_file`, `payload_contains` or `metadata_contains`",
        )
        .hint("to expect a message without checking it, use `metadata_contains: {}`"));
    }
    Ok(failures)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn diff_names_each_difference_by_pointer() {
        let e = json!({"a": 1, "b": {"c": "x", "d": [1, 2]}, "gone": true});
        let a = json!({"a": 2, "b": {"c": "x", "d": [1, 3]}, "extra": null});
        assert_eq!(
            diff(&e, &a, false),
            vec![
                "/a: expected 1, got 2",
                "/b/d/1: expected 2, got 3",
                "/gone: expected true, but it is missing",
                "/extra: not expected, got null"
            ]
        );
        assert_eq!(diff(&json!({"b": {"c": "x"}}), &a, true), Vec::<String>::new());
        let mut v = json!({"x": {"id": 1, "t": 2}});
        remove_pointer(&mut v, "/x/t");
        assert_eq!(v, json!({"x": {"id": 1}}));
    }
}
