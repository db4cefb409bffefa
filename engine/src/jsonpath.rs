//! JSONPath (RFC 9535), compiled once at load.
//!
//! Paths are parsed by `jsonpath-rust`; queries made only of names, indexes and wildcards (nearly
//! every mapping) then run on a small evaluator of our own that neither re-parses nor builds result
//! path strings. Anything else (filters, slices, descendants) runs on `jsonpath-rust`'s compiled
//! query. Inside `each:` blocks `$` is the current element; `$root` reaches the whole message.

use crate::message::escape_pointer_token;
use jsonpath_rust::parser::model::{JpQuery, Segment, Selector};
use jsonpath_rust::parser::parse_json_path;
use jsonpath_rust::query::js_path_process;
use serde_json::Value;
use std::fmt;

/// A JSONPath that failed to compile, with the 1-based column of the problem in the path text.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct PathError {
    pub message: String,
    pub column: usize,
}

#[derive(Debug, Clone)]
enum Step {
    Name(String),
    Index(i64),
    Wildcard,
}

#[derive(Debug, Clone)]
enum Plan {
    Simple(Vec<Step>),
    General(JpQuery),
}

/// A compiled JSONPath.
#[derive(Clone)]
pub struct CompiledPath {
    text: String,
    plan: Plan,
    from_root: bool,
}

impl fmt::Debug for CompiledPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CompiledPath({})", self.text)
    }
}

/// Where a path is evaluated: the current value (an `each:` element, or the message) and the root.
#[derive(Clone, Copy)]
pub struct Scope<'a> {
    pub current: &'a Value,
    pub root: &'a Value,
}

impl<'a> Scope<'a> {
    pub fn root(v: &'a Value) -> Self {
        Scope { current: v, root: v }
    }
}

/// `shift` maps a column in the parsed text back to the text the analyst wrote.
fn pest_error(e: jsonpath_rust::parser::errors::JsonPathError, shift: i64) -> PathError {
    use jsonpath_rust::parser::errors::JsonPathError as E;
    match e {
        E::PestError(p) => {
            let column = match p.line_col {
                pest::error::LineColLocation::Pos((_, c)) | pest::error::LineColLocation::Span((_, c), _) => c,
            };
            let expected = match &p.variant {
                pest::error::ErrorVariant::ParsingError { positives, .. } if !positives.is_empty() => {
                    let names: Vec<String> = positives.iter().take(4).map(|r| format!("{r:?}")).collect();
                    format!(" (expected {})", names.join(", "))
                }
                _ => String::new(),
            };
            let column = (column as i64 + shift).max(1) as usize;
            PathError { message: format!("invalid JSONPath at column {column}{expected}"), column }
        }
        other => PathError { message: format!("invalid JSONPath: {other}"), column: 1 },
    }
}

impl CompiledPath {
    /// Compiles `text`; `$root...` is evaluated against the whole message.
    pub fn compile(text: &str) -> Result<Self, PathError> {
        let trimmed = text.trim();
        let (from_root, query_text) = match trimmed.strip_prefix("$root") {
            Some(rest) if rest.is_empty() || rest.starts_with(['.', '[']) => (true, format!("${rest}")),
            _ => (false, trimmed.to_string()),
        };
        if !query_text.starts_with('$') {
            return Err(PathError { message: "a JSONPath starts with `$` (for example `$.order.id`)".into(), column: 1 });
        }
        let shift = if from_root { 4 } else { 0 };
        let q = parse_json_path(&query_text).map_err(|e| pest_error(e, shift))?;
        let simple: Option<Vec<Step>> = q
            .segments
            .iter()
            .map(|s| match s {
                Segment::Selector(Selector::Name(n)) => Some(Step::Name(unquote(n))),
                Segment::Selector(Selector::Index(i)) => Some(Step::Index(*i)),
                Segment::Selector(Selector::Wildcard) => Some(Step::Wildcard),
                _ => None,
            })
            .collect();
        let plan = match simple {
            Some(steps) => Plan::Simple(steps),
            None => Plan::General(q),
        };
        Ok(CompiledPath { text: text.to_string(), plan, from_root })
    }

    pub fn text(&self) -> &str {
        &self.text
    }

    /// True when the path selects at most one value (no wildcard, filter, slice or descendant).
    pub fn is_singular(&self) -> bool {
        matches!(&self.plan, Plan::Simple(steps) if !steps.iter().any(|s| matches!(s, Step::Wildcard)))
    }

    fn start<'a>(&self, scope: Scope<'a>) -> &'a Value {
        if self.from_root { scope.root } else { scope.current }
    }

    /// The first value selected, if any. JSON `null` counts as absent.
    pub fn first<'a>(&self, scope: Scope<'a>) -> Option<&'a Value> {
        let start = self.start(scope);
        match &self.plan {
            Plan::Simple(steps) if self.is_singular() => {
                let mut cur = start;
                for s in steps {
                    cur = match s {
                        Step::Name(n) => cur.as_object()?.get(n)?,
                        Step::Index(i) => index(cur.as_array()?, *i)?,
                        Step::Wildcard => unreachable!("singular"),
                    };
                }
                (!cur.is_null()).then_some(cur)
            }
            _ => {
                let mut out = Vec::new();
                self.collect(start, &mut out);
                out.into_iter().find(|v| !v.is_null())
            }
        }
    }

    /// Every value selected, in document order (nulls included: the caller decides).
    pub fn all<'a>(&self, scope: Scope<'a>, out: &mut Vec<&'a Value>) {
        self.collect(self.start(scope), out)
    }

    fn collect<'a>(&self, start: &'a Value, out: &mut Vec<&'a Value>) {
        match &self.plan {
            Plan::Simple(steps) => walk(start, steps, out),
            Plan::General(q) => {
                if let Ok(found) = js_path_process(q, start) {
                    out.extend(found.into_iter().map(|r| r.val));
                }
            }
        }
    }

    /// Every value selected with its JSON pointer, relative to the scope's start value.
    /// Slower than [`Self::all`]; used for error reports and for steps that modify in place.
    pub fn all_with_pointers<'a>(&self, scope: Scope<'a>) -> Vec<(&'a Value, String)> {
        let start = self.start(scope);
        match &self.plan {
            Plan::Simple(steps) => {
                let mut out = Vec::new();
                walk_with_pointer(start, steps, String::new(), &mut out);
                out
            }
            Plan::General(q) => js_path_process(q, start)
                .map(|found| found.into_iter().map(|r| (r.val, normalized_to_pointer(&r.path))).collect())
                .unwrap_or_default(),
        }
    }

    /// The pointer the path would have if it selected one value: for messages about absent values.
    pub fn nominal_pointer(&self) -> String {
        match &self.plan {
            Plan::Simple(steps) => {
                let mut p = String::new();
                for s in steps {
                    match s {
                        Step::Name(n) => {
                            p.push('/');
                            p.push_str(&escape_pointer_token(n));
                        }
                        Step::Index(i) => p.push_str(&format!("/{i}")),
                        Step::Wildcard => p.push_str("/*"),
                    }
                }
                p
            }
            Plan::General(_) => String::new(),
        }
    }

    /// Whether the path reads from the whole message rather than the current element.
    pub fn is_from_root(&self) -> bool {
        self.from_root
    }
}

/// Names from `['a b']` selectors arrive without quotes from the parser, but be safe.
fn unquote(n: &str) -> String {
    let t = n.trim();
    if t.len() >= 2 && ((t.starts_with('\'') && t.ends_with('\'')) || (t.starts_with('"') && t.ends_with('"'))) {
        t[1..t.len() - 1].to_string()
    } else {
        n.to_string()
    }
}

fn index(arr: &[Value], i: i64) -> Option<&Value> {
    let idx = if i < 0 { arr.len().checked_sub(i.unsigned_abs() as usize)? } else { i as usize };
    arr.get(idx)
}

fn walk<'a>(cur: &'a Value, steps: &[Step], out: &mut Vec<&'a Value>) {
    let Some((step, rest)) = steps.split_first() else {
        out.push(cur);
        return;
    };
    match step {
        Step::Name(n) => {
            if let Some(v) = cur.as_object().and_then(|o| o.get(n)) {
                walk(v, rest, out)
            }
        }
        Step::Index(i) => {
            if let Some(v) = cur.as_array().and_then(|a| index(a, *i)) {
                walk(v, rest, out)
            }
        }
        Step::Wildcard => match cur {
            Value::Array(a) => a.iter().for_each(|v| walk(v, rest, out)),
            Value::Object(o) => o.values().for_each(|v| walk(v, rest, out)),
            _ => {}
        },
    }
}

fn walk_with_pointer<'a>(cur: &'a Value, steps: &[Step], ptr: String, out: &mut Vec<(&'a Value, String)>) {
    let Some((step, rest)) = steps.split_first() else {
        out.push((cur, ptr));
        return;
    };
    match step {
        Step::Name(n) => {
            if let Some(v) = cur.as_object().and_then(|o| o.get(n)) {
                walk_with_pointer(v, rest, format!("{ptr}/{}", escape_pointer_token(n)), out)
            }
        }
        Step::Index(i) => {
            if let Some(a) = cur.as_array() {
                let idx = if *i < 0 { a.len().checked_sub(i.unsigned_abs() as usize) } else { Some(*i as usize) };
                if let Some((idx, v)) = idx.and_then(|idx| a.get(idx).map(|v| (idx, v))) {
                    walk_with_pointer(v, rest, format!("{ptr}/{idx}"), out)
                }
            }
        }
        Step::Wildcard => match cur {
            Value::Array(a) => a.iter().enumerate().for_each(|(i, v)| walk_with_pointer(v, rest, format!("{ptr}/{i}"), out)),
            Value::Object(o) => o.iter().for_each(|(k, v)| walk_with_pointer(v, rest, format!("{ptr}/{}", escape_pointer_token(k)), out)),
            _ => {}
        },
    }
}

/// `$['a'][0]['b c']` to `/a/0/b c`.
pub fn normalized_to_pointer(path: &str) -> String {
    let mut out = String::new();
    let mut rest = path.strip_prefix('$').unwrap_or(path);
    while let Some(open) = rest.find('[') {
        let after = &rest[open + 1..];
        if let Some(q) = after.strip_prefix('\'') {
            // Quoted name: find the closing quote that is not escaped.
            let mut end = 0;
            let bytes = q.as_bytes();
            while end < bytes.len() && !(bytes[end] == b'\'' && (end == 0 || bytes[end - 1] != b'\\')) {
                end += 1;
            }
            out.push('/');
            out.push_str(&escape_pointer_token(&q[..end].replace("\\'", "'")));
            rest = q.get(end + 2..).unwrap_or("");
        } else if let Some(close) = after.find(']') {
            out.push('/');
            out.push_str(&after[..close]);
            rest = &after[close + 1..];
        } else {
            break;
        }
    }
    out
}

/// A condition written as an RFC 9535 filter expression, e.g. `$.ship_to.country == 'US'` or
/// `@.total > 100 && match(@.channel, 'amazon.*')`. Both `$` and `@` are the message.
#[derive(Clone)]
pub struct Condition {
    text: String,
    /// `$[?expr]` with every `$` of the expression turned into `@`, run on `[message]`.
    query: JpQuery,
}

impl fmt::Debug for Condition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Condition({})", self.text)
    }
}

/// Replaces the root identifier `$` by `@` outside string literals.
fn relative_to_current(expr: &str) -> String {
    let mut out = String::with_capacity(expr.len());
    let mut quote: Option<char> = None;
    let mut escaped = false;
    for c in expr.chars() {
        match quote {
            Some(q) => {
                if escaped {
                    escaped = false;
                } else if c == '\\' {
                    escaped = true;
                } else if c == q {
                    quote = None;
                }
                out.push(c);
            }
            None => {
                if c == '\'' || c == '"' {
                    quote = Some(c);
                }
                out.push(if c == '$' { '@' } else { c });
            }
        }
    }
    out
}

impl Condition {
    pub fn compile(text: &str) -> Result<Self, PathError> {
        let wrapped = format!("$[?{}]", relative_to_current(text));
        let query = parse_json_path(&wrapped).map_err(|e| pest_error(e, -3))?;
        match query.segments.as_slice() {
            [Segment::Selector(Selector::Filter(_))] => Ok(Condition { text: text.to_string(), query }),
            _ => Err(PathError { message: "expected a filter expression such as `$.country == 'US'`".into(), column: 1 }),
        }
    }

    pub fn text(&self) -> &str {
        &self.text
    }

    /// Evaluates the condition. The message is borrowed mutably only to wrap it in a one-element
    /// list without copying (a filter selects among a list's elements); it is left unchanged.
    pub fn matches(&self, message: &mut Value) -> bool {
        let wrapper = Value::Array(vec![std::mem::take(message)]);
        let matched = js_path_process(&self.query, &wrapper).is_ok_and(|found| !found.is_empty());
        if let Value::Array(mut items) = wrapper {
            *message = items.pop().expect("one element");
        }
        matched
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn doc() -> Value {
        json!({"id": 7, "currency": "USD", "lines": [{"sku": "A", "qty": 1, "tax": [{"p": "1.00"}, {"p": "2.00"}]}, {"sku": "B", "qty": 2, "tax": []}], "ship": {"country": "US"}, "n": null, "a/b": 1})
    }

    #[test]
    fn singular_paths_use_the_fast_plan() {
        let d = doc();
        let p = CompiledPath::compile("$.lines[1].sku").unwrap();
        assert!(p.is_singular());
        assert_eq!(p.first(Scope::root(&d)), Some(&json!("B")));
        assert_eq!(CompiledPath::compile("$.lines[-1].qty").unwrap().first(Scope::root(&d)), Some(&json!(2)));
        assert_eq!(CompiledPath::compile("$.n").unwrap().first(Scope::root(&d)), None);
        assert_eq!(CompiledPath::compile("$.missing.x").unwrap().first(Scope::root(&d)), None);
        assert_eq!(CompiledPath::compile("$['a/b']").unwrap().first(Scope::root(&d)), Some(&json!(1)));
    }

    #[test]
    fn wildcards_and_filters_select_many() {
        let d = doc();
        let mut out = Vec::new();
        CompiledPath::compile("$.lines[*].tax[*].p").unwrap().all(Scope::root(&d), &mut out);
        assert_eq!(out, vec![&json!("1.00"), &json!("2.00")]);
        let p = CompiledPath::compile("$.lines[?@.qty > 1].sku").unwrap();
        assert!(!p.is_singular());
        assert_eq!(p.first(Scope::root(&d)), Some(&json!("B")));
        let ptrs = p.all_with_pointers(Scope::root(&d));
        assert_eq!(ptrs[0].1, "/lines/1/sku");
        let ptrs = CompiledPath::compile("$.lines[*].sku").unwrap().all_with_pointers(Scope::root(&d));
        assert_eq!(ptrs.iter().map(|p| p.1.as_str()).collect::<Vec<_>>(), ["/lines/0/sku", "/lines/1/sku"]);
    }

    #[test]
    fn root_prefix_reads_the_message_from_inside_each() {
        let d = doc();
        let line = &d["lines"][0];
        let scope = Scope { current: line, root: &d };
        assert_eq!(CompiledPath::compile("$.sku").unwrap().first(scope), Some(&json!("A")));
        assert_eq!(CompiledPath::compile("$root.currency").unwrap().first(scope), Some(&json!("USD")));
    }

    #[test]
    fn syntax_errors_carry_a_column() {
        let e = CompiledPath::compile("$.lines[?@.qty >]").unwrap_err();
        assert!(e.column > 1, "{e:?}");
        assert!(CompiledPath::compile("lines.sku").is_err());
        let e = CompiledPath::compile("$root.a[").unwrap_err();
        assert!(e.column >= 5, "{e:?}");
    }

    #[test]
    fn conditions_are_filter_expressions_over_the_message() {
        let mut d = doc();
        let before = d.clone();
        assert!(Condition::compile("$.ship.country == 'US'").unwrap().matches(&mut d));
        assert!(Condition::compile("@.ship.country == 'US' && @.id > 5").unwrap().matches(&mut d));
        assert!(!Condition::compile("$.ship.country != 'US'").unwrap().matches(&mut d));
        assert!(Condition::compile("$.missing").is_ok());
        assert!(!Condition::compile("$.missing").unwrap().matches(&mut d));
        assert!(Condition::compile("$.ship").unwrap().matches(&mut d));
        assert!(Condition::compile("$.lines[?@.sku == 'B']").unwrap().matches(&mut d));
        assert!(!Condition::compile("$.lines[?@.sku == 'Z']").unwrap().matches(&mut d));
        assert_eq!(d, before);
        let e = Condition::compile("$.a ==").unwrap_err();
        assert!(e.column >= 1);
    }

    #[test]
    fn normalized_paths_become_pointers() {
        assert_eq!(normalized_to_pointer("$['a'][0]['b/c']"), "/a/0/b~1c");
        assert_eq!(normalized_to_pointer("$"), "");
        assert_eq!(relative_to_current("$.a == '$x' && $.b == \"\\\"$\""), "@.a == '$x' && @.b == \"\\\"$\"");
    }
}
