//! YAML to a tree that remembers where every key and value came from.
//!
//! serde_yaml cannot report more than one error, loses positions inside tagged enums and has no
//! event API, so analyst-authored files are read with `saphyr-parser` (the maintained successor
//! of yaml-rust) into [`Node`]s; [`super::de`] then deserializes typed configs from that tree.
//! `${VAR}` and `${VAR:-default}` are substituted here, with their own positions for errors.

use super::diag::{DiagCode, Diagnostic, SourceFile, Span};
use saphyr_parser::{Event, Parser, ScalarStyle};
use std::collections::HashMap;

/// A YAML value with its position.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub span: Span,
    pub value: NodeValue,
}

#[derive(Debug, Clone, PartialEq)]
pub enum NodeValue {
    Scalar(Scalar),
    Seq(Vec<Node>),
    /// Entries in file order; keys are unique (duplicates are reported and dropped).
    Map(Vec<(Node, Node)>),
    /// Stands in for a value that already produced an error, so that the rest of the file can
    /// still be checked; it deserializes as an empty value of any type.
    Poison,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Scalar {
    /// The text after `${VAR}` substitution.
    pub text: String,
    /// Plain (unquoted) scalars resolve to null, booleans and numbers; quoted ones are strings.
    pub plain: bool,
    /// The text as written, when it contained a `${...}` reference: shown in errors instead of the
    /// substituted value, which may be a secret.
    pub written: Option<String>,
}

impl Node {
    pub fn poison(span: Span) -> Node {
        Node { span, value: NodeValue::Poison }
    }

    pub fn as_str(&self) -> Option<&str> {
        match &self.value {
            NodeValue::Scalar(s) => Some(&s.text),
            _ => None,
        }
    }

    /// The scalar as written (`${VAR}` unexpanded), for messages.
    pub fn shown(&self) -> Option<&str> {
        match &self.value {
            NodeValue::Scalar(s) => Some(s.written.as_deref().unwrap_or(&s.text)),
            _ => None,
        }
    }

    pub fn is_null(&self) -> bool {
        matches!(&self.value, NodeValue::Scalar(s) if s.plain && is_null_text(&s.text))
    }

    pub fn entries(&self) -> Option<&[(Node, Node)]> {
        match &self.value {
            NodeValue::Map(m) => Some(m),
            _ => None,
        }
    }

    /// The node at a JSON pointer (`/properties/id/type`), if the tree has it.
    pub fn at_pointer(&self, pointer: &str) -> Option<&Node> {
        if pointer.is_empty() {
            return Some(self);
        }
        let mut cur = self;
        for token in pointer.strip_prefix('/')?.split('/') {
            let token = token.replace("~1", "/").replace("~0", "~");
            cur = match &cur.value {
                NodeValue::Map(_) => cur.get(&token)?,
                NodeValue::Seq(items) => items.get(token.parse::<usize>().ok()?)?,
                _ => return None,
            };
        }
        Some(cur)
    }

    /// Where a dotted key path such as `tests[2].expect.sinks.erp_us` is written: the key's own
    /// position for a mapping entry. `None` when the tree has no such path.
    pub fn span_of_path(&self, key_path: &str) -> Option<Span> {
        let mut cur = self;
        let mut span = self.span;
        for part in key_path.split('.').filter(|p| !p.is_empty()) {
            let (name, indexes) = match part.find('[') {
                Some(i) => (&part[..i], &part[i..]),
                None => (part, ""),
            };
            if !name.is_empty() {
                span = cur.key_node(name)?.span;
                cur = cur.get(name)?;
            }
            for idx in indexes.split('[').filter(|s| !s.is_empty()) {
                let i: usize = idx.trim_end_matches(']').parse().ok()?;
                match &cur.value {
                    NodeValue::Seq(items) => {
                        cur = items.get(i)?;
                        span = cur.span;
                    }
                    _ => return None,
                }
            }
        }
        Some(span)
    }

    /// The value stored under `key` in a mapping.
    pub fn get(&self, key: &str) -> Option<&Node> {
        self.entries()?.iter().find(|(k, _)| k.as_str() == Some(key)).map(|(_, v)| v)
    }

    /// The key node of `key` in a mapping (to point at the key rather than the value).
    pub fn key_node(&self, key: &str) -> Option<&Node> {
        self.entries()?.iter().find(|(k, _)| k.as_str() == Some(key)).map(|(k, _)| k)
    }

    /// The value as JSON, resolving plain scalars by the YAML 1.2 core schema (for checking a file
    /// against a JSON Schema, as editors do).
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::Value;
        match &self.value {
            NodeValue::Scalar(s) if !s.plain => Value::String(s.text.clone()),
            NodeValue::Scalar(s) => {
                if is_null_text(&s.text) {
                    Value::Null
                } else if let Some(b) = parse_bool(&s.text) {
                    Value::Bool(b)
                } else if let Some(i) = parse_int(&s.text).and_then(|i| i64::try_from(i).ok()) {
                    Value::from(i)
                } else if let Some(f) = parse_float(&s.text).and_then(serde_json::Number::from_f64) {
                    Value::Number(f)
                } else {
                    Value::String(s.text.clone())
                }
            }
            NodeValue::Seq(items) => Value::Array(items.iter().map(Node::to_json).collect()),
            NodeValue::Map(entries) => {
                Value::Object(entries.iter().map(|(k, v)| (k.as_str().unwrap_or_default().to_string(), v.to_json())).collect())
            }
            NodeValue::Poison => Value::Null,
        }
    }

    /// What kind of YAML value this is, in words, for "expected ..., found ..." messages.
    pub fn describe(&self) -> String {
        match &self.value {
            NodeValue::Scalar(s) => {
                let shown = s.written.as_deref().unwrap_or(&s.text);
                if !s.plain {
                    format!("string \"{shown}\"")
                } else if is_null_text(&s.text) {
                    "null".to_string()
                } else if parse_bool(&s.text).is_some() {
                    format!("boolean `{shown}`")
                } else if parse_int(&s.text).is_some() {
                    format!("integer `{shown}`")
                } else if parse_float(&s.text).is_some() {
                    format!("number `{shown}`")
                } else {
                    format!("string \"{shown}\"")
                }
            }
            NodeValue::Seq(_) => "a list".to_string(),
            NodeValue::Map(_) => "a mapping".to_string(),
            NodeValue::Poison => "an invalid value".to_string(),
        }
    }
}

pub fn is_null_text(t: &str) -> bool {
    matches!(t, "" | "~" | "null" | "Null" | "NULL")
}

pub fn parse_bool(t: &str) -> Option<bool> {
    match t {
        "true" | "True" | "TRUE" => Some(true),
        "false" | "False" | "FALSE" => Some(false),
        _ => None,
    }
}

pub fn parse_int(t: &str) -> Option<i128> {
    let t = t.strip_prefix('+').unwrap_or(t);
    if let Some(h) = t.strip_prefix("0x") {
        return i128::from_str_radix(h, 16).ok();
    }
    if let Some(o) = t.strip_prefix("0o") {
        return i128::from_str_radix(o, 8).ok();
    }
    if t.is_empty() || !t.trim_start_matches('-').chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    t.parse().ok()
}

pub fn parse_float(t: &str) -> Option<f64> {
    match t {
        ".inf" | ".Inf" | ".INF" | "+.inf" => return Some(f64::INFINITY),
        "-.inf" | "-.Inf" | "-.INF" => return Some(f64::NEG_INFINITY),
        ".nan" | ".NaN" | ".NAN" => return Some(f64::NAN),
        _ => {}
    }
    let looks_numeric =
        t.chars().any(|c| c.is_ascii_digit()) && t.chars().all(|c| c.is_ascii_digit() || matches!(c, '.' | '-' | '+' | 'e' | 'E'));
    if looks_numeric { t.parse().ok() } else { None }
}

/// Where `${VAR}` values come from: the process environment, or a map in tests.
pub trait Env {
    fn var(&self, name: &str) -> Option<String>;

    /// The text of the file named by `${file:PATH}` (a mounted secret), without its final line
    /// break; the error says why it cannot be read, never what it holds.
    fn file(&self, path: &str) -> Result<String, String> {
        match std::fs::read_to_string(path) {
            Ok(mut text) => {
                let kept = text.trim_end_matches(['\n', '\r']).len();
                text.truncate(kept);
                Ok(text)
            }
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => Err("it is not UTF-8 text".to_string()),
            Err(e) => Err(e.kind().to_string()),
        }
    }
}

pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

impl Env for HashMap<String, String> {
    fn var(&self, name: &str) -> Option<String> {
        self.get(name).cloned()
    }
}

/// A problem found while substituting variables in one scalar: byte offset in the scalar and message.
#[derive(Debug, PartialEq)]
pub struct EnvProblem {
    pub offset: usize,
    pub len: usize,
    pub message: String,
    pub hint: Option<String>,
}

/// Substitutes `${NAME}` and `${NAME:-default}`; `$${` writes a literal `${`.
/// Returns `Ok(None)` when the text has no reference, so the common case allocates nothing.
pub fn interpolate(text: &str, env: &dyn Env) -> Result<Option<String>, Vec<EnvProblem>> {
    if !text.contains("${") {
        return Ok(None);
    }
    let mut out = String::with_capacity(text.len());
    let mut problems = Vec::new();
    let mut rest = text;
    let mut consumed = 0;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i..];
        if let Some(r) = after.strip_prefix("$${") {
            out.push_str("${");
            rest = r;
            consumed += i + 3;
            continue;
        }
        if !after.starts_with("${") {
            out.push('$');
            rest = &after[1..];
            consumed += i + 1;
            continue;
        }
        let Some(close) = matching_brace(after) else {
            problems.push(EnvProblem {
                offset: consumed + i,
                len: after.len(),
                message: "`${` is not closed by `}`".to_string(),
                hint: Some("write `$${` for a literal `${`".to_string()),
            });
            out.push_str(after);
            break;
        };
        let inner = &after[2..close];
        let (name, default) = match inner.split_once(":-") {
            Some((n, d)) => (n, Some(d)),
            None => (inner, None),
        };
        // The value, or what to say when there is none (and no default).
        let found = if let Some(path) = name.strip_prefix("file:") {
            env.file(path).map_err(|why| {
                (
                    format!("the secret file `{path}` cannot be read: {why}"),
                    "give a path the engine can read (absolute, or relative to where it runs), or a default: `${file:PATH:-value}`"
                        .to_string(),
                )
            })
        } else {
            let name = name.strip_prefix("env:").unwrap_or(name);
            let valid = !name.is_empty()
                && name.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                problems.push(EnvProblem {
                    offset: consumed + i,
                    len: close + 1,
                    message: format!("`${{{inner}}}` is not a valid variable reference"),
                    hint: Some("names are letters, digits and `_`; write `${NAME}` or `${NAME:-default}`".to_string()),
                });
                rest = &after[close + 1..];
                consumed += i + close + 1;
                continue;
            }
            // As in the shell, `:-` applies when the variable is unset or empty.
            env.var(name).filter(|v| !v.is_empty() || default.is_none()).ok_or_else(|| {
                (format!("environment variable `{name}` is not set"), format!("set {name}, or give a default: `${{{name}:-value}}`"))
            })
        };
        match (found, default) {
            (Ok(v), _) => out.push_str(&v),
            (Err(_), Some(d)) => match interpolate(d, env) {
                Ok(sub) => out.push_str(sub.as_deref().unwrap_or(d)),
                Err(inner) => problems.extend(
                    inner.into_iter().map(|p| EnvProblem { offset: consumed + i + 2 + name_len(inner_text(after)) + 2 + p.offset, ..p }),
                ),
            },
            (Err((message, hint)), None) => problems.push(EnvProblem { offset: consumed + i, len: close + 1, message, hint: Some(hint) }),
        }
        rest = &after[close + 1..];
        consumed += i + close + 1;
    }
    out.push_str(rest);
    if problems.is_empty() { Ok(Some(out)) } else { Err(problems) }
}

/// The `}` closing the `${` at the start of `s`, skipping nested `${...}`.
fn matching_brace(s: &str) -> Option<usize> {
    let mut depth = 0;
    let bytes = s.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'$' && bytes.get(i + 1) == Some(&b'{') {
            depth += 1;
            i += 2;
            continue;
        }
        if bytes[i] == b'}' {
            depth -= 1;
            if depth == 0 {
                return Some(i);
            }
        }
        i += 1;
    }
    None
}

fn inner_text(after: &str) -> &str {
    &after[2..matching_brace(after).unwrap_or(after.len())]
}

/// Length of `NAME` (with an `env:` prefix) in `NAME:-default`.
fn name_len(inner: &str) -> usize {
    inner.split_once(":-").map_or(inner.len(), |(n, _)| n.len())
}

/// Byte offset of each line start, to turn the parser's (line, character column) into spans.
struct LineIndex<'a> {
    text: &'a str,
    starts: Vec<usize>,
}

impl<'a> LineIndex<'a> {
    fn new(text: &'a str) -> Self {
        let mut starts = vec![0];
        starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        LineIndex { text, starts }
    }

    /// `line` 1-based, `col` 0-based in characters.
    fn offset(&self, line: usize, col: usize) -> usize {
        let Some(&start) = self.starts.get(line.saturating_sub(1)) else {
            return self.text.len();
        };
        self.text[start..].char_indices().nth(col).map_or(self.text.len(), |(b, _)| start + b)
    }

    fn span(&self, s: &saphyr_parser::Span) -> Span {
        let start = self.offset(s.start.line(), s.start.col());
        let end = self.offset(s.end.line(), s.end.col()).max(start);
        Span::new(s.start.line(), s.start.col() + 1, start, end - start)
    }
}

enum Frame {
    Seq { span: Span, items: Vec<Node>, anchor: usize },
    Map { span: Span, entries: Vec<(Node, Node)>, pending_key: Option<Node>, anchor: usize },
}

/// Parses one YAML document into a [`Node`] tree. Every problem is returned, not only the first:
/// duplicate keys, unset variables, a second document. A syntax error stops the parse.
pub fn parse(file: &SourceFile, env: &dyn Env) -> Result<Node, Vec<Diagnostic>> {
    parse_with(file, Some(env))
}

/// Parses JSON or YAML without `${VAR}` substitution (JSON Schemas, test data): for positions only.
pub fn parse_plain(file: &SourceFile) -> Result<Node, Vec<Diagnostic>> {
    parse_with(file, None)
}

fn parse_with(file: &SourceFile, env: Option<&dyn Env>) -> Result<Node, Vec<Diagnostic>> {
    let lines = LineIndex::new(&file.text);
    let mut diags = Vec::new();
    let mut stack: Vec<Frame> = Vec::new();
    let mut anchors: HashMap<usize, Node> = HashMap::new();
    let mut root: Option<Node> = None;
    let mut documents = 0;
    let mut parser = Parser::new_from_str(&file.text);

    while let Some(event) = parser.next_event() {
        let (event, span) = match event {
            Ok(e) => e,
            Err(e) => {
                let m = e.marker();
                let span = file.span_at(m.line(), m.col() + 1, 1);
                diags.push(Diagnostic::new(DiagCode::YamlSyntax, file, span, path_of(&stack), format!("YAML syntax error: {}", e.info())));
                return Err(diags);
            }
        };
        let span = lines.span(&span);
        let node = match event {
            Event::DocumentStart(_) => {
                documents += 1;
                if documents > 1 {
                    diags.push(
                        Diagnostic::new(DiagCode::YamlSyntax, file, span, "", "this file holds more than one YAML document")
                            .hint("put one pipeline (or one mapping) per file"),
                    );
                    return Err(diags);
                }
                continue;
            }
            Event::SequenceStart(anchor, _) => {
                stack.push(Frame::Seq { span, items: Vec::new(), anchor });
                continue;
            }
            Event::MappingStart(anchor, _) => {
                stack.push(Frame::Map { span, entries: Vec::new(), pending_key: None, anchor });
                continue;
            }
            Event::SequenceEnd => match stack.pop() {
                Some(Frame::Seq { span, items, anchor }) => {
                    let n = Node { span, value: NodeValue::Seq(items) };
                    remember(&mut anchors, anchor, &n);
                    n
                }
                _ => unreachable!("parser emits balanced sequence events"),
            },
            Event::MappingEnd => match stack.pop() {
                Some(Frame::Map { span, entries, anchor, .. }) => {
                    let n = Node { span, value: NodeValue::Map(entries) };
                    remember(&mut anchors, anchor, &n);
                    n
                }
                _ => unreachable!("parser emits balanced mapping events"),
            },
            Event::Alias(id) => match anchors.get(&id) {
                Some(n) => n.clone(),
                None => {
                    diags.push(Diagnostic::new(DiagCode::YamlSyntax, file, span, path_of(&stack), "alias refers to an unknown anchor"));
                    Node::poison(span)
                }
            },
            Event::Scalar(text, style, anchor, tag) => {
                let is_key = matches!(stack.last(), Some(Frame::Map { pending_key: None, .. }));
                let plain = style == ScalarStyle::Plain && tag.as_ref().is_none_or(|t| t.suffix != "str");
                let n = if is_key {
                    Node { span, value: NodeValue::Scalar(Scalar { text: text.into_owned(), plain, written: None }) }
                } else {
                    scalar_node(file, span, &text, style, plain, env, &path_of(&stack), &mut diags)
                };
                remember(&mut anchors, anchor, &n);
                n
            }
            Event::StreamStart | Event::StreamEnd | Event::DocumentEnd | Event::Nothing => continue,
        };
        // Attach the finished node to its parent.
        let parent_path = path_of(&stack[..stack.len().saturating_sub(1)]);
        match stack.last_mut() {
            None => root = Some(node),
            Some(Frame::Seq { items, .. }) => items.push(node),
            Some(Frame::Map { entries, pending_key, .. }) => match pending_key.take() {
                None => {
                    if !matches!(&node.value, NodeValue::Scalar(_)) {
                        diags.push(Diagnostic::new(
                            DiagCode::WrongType,
                            file,
                            node.span,
                            parent_path.clone(),
                            "a key must be a plain name, not a list or mapping",
                        ));
                    }
                    let key_text = node.as_str().unwrap_or("?").to_string();
                    if let Some((first, _)) = entries.iter().find(|(k, _)| k.as_str() == Some(&key_text)) {
                        diags.push(
                            Diagnostic::new(
                                DiagCode::DuplicateKey,
                                file,
                                node.span,
                                join_key(&parent_path, &key_text),
                                format!("duplicate key `{key_text}`"),
                            )
                            .related(first.span, "first defined here")
                            .hint("each key may appear once; remove or rename one of them"),
                        );
                        // Mark so the value is parsed but dropped.
                        *pending_key = Some(Node { span: node.span, value: NodeValue::Poison });
                    } else {
                        *pending_key = Some(node);
                    }
                }
                Some(key) => {
                    if !matches!(key.value, NodeValue::Poison) {
                        entries.push((key, node));
                    }
                }
            },
        }
    }
    if diags.is_empty() {
        Ok(root.unwrap_or(Node {
            span: Span::new(1, 1, 0, 0),
            value: NodeValue::Scalar(Scalar { text: String::new(), plain: true, written: None }),
        }))
    } else {
        Err(diags)
    }
}

/// The dotted key path of the value being parsed, e.g. `map[2].fields.sku` (for messages only).
fn path_of(stack: &[Frame]) -> String {
    let mut out = String::new();
    for frame in stack {
        match frame {
            Frame::Seq { items, .. } => out.push_str(&format!("[{}]", items.len())),
            Frame::Map { pending_key: Some(k), .. } => {
                if let Some(name) = k.as_str() {
                    out = join_key(&out, name);
                }
            }
            Frame::Map { pending_key: None, .. } => {}
        }
    }
    out
}

pub fn join_key(parent: &str, key: &str) -> String {
    if parent.is_empty() { key.to_string() } else { format!("{parent}.{key}") }
}

fn remember(anchors: &mut HashMap<usize, Node>, anchor: usize, node: &Node) {
    if anchor != 0 {
        anchors.insert(anchor, node.clone());
    }
}

#[allow(clippy::too_many_arguments)]
fn scalar_node(
    file: &SourceFile,
    span: Span,
    text: &str,
    style: ScalarStyle,
    plain: bool,
    env: Option<&dyn Env>,
    path: &str,
    diags: &mut Vec<Diagnostic>,
) -> Node {
    let Some(env) = env else {
        return Node { span, value: NodeValue::Scalar(Scalar { text: text.to_string(), plain, written: None }) };
    };
    match interpolate(text, env) {
        Ok(None) => Node { span, value: NodeValue::Scalar(Scalar { text: text.to_string(), plain, written: None }) },
        Ok(Some(sub)) => Node { span, value: NodeValue::Scalar(Scalar { text: sub, plain, written: Some(text.to_string()) }) },
        Err(problems) => {
            // Point at the reference as written: find its text in the scalar's source (escapes in
            // quoted scalars shift offsets, so counting characters of the value would not do).
            let written = file.text.get(span.offset..span.offset + span.len).unwrap_or("");
            let _ = style;
            for p in problems {
                let reference = &text[p.offset..p.offset + p.len];
                let s = match written.find(reference) {
                    Some(at) => file.span_of_offset(span.offset + at, reference.len()),
                    None => span,
                };
                diags.push(Diagnostic::new(DiagCode::UnsetVariable, file, s, path, p.message).hint_opt(p.hint));
            }
            Node::poison(span)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn load(text: &str) -> Result<Node, Vec<Diagnostic>> {
        parse(&SourceFile::new("t.yaml", text), &env(&[("HOST", "db.local"), ("EMPTY", "")]))
    }

    #[test]
    fn keeps_positions_of_keys_and_values() {
        let n = load("name: shop\nsinks:\n  out:\n    type: file\n").unwrap();
        let sinks = n.get("sinks").unwrap();
        let t = sinks.get("out").unwrap().get("type").unwrap();
        assert_eq!(t.as_str(), Some("file"));
        assert_eq!((t.span.line, t.span.column), (4, 11));
        let k = n.key_node("sinks").unwrap();
        assert_eq!((k.span.line, k.span.column), (2, 1));
    }

    #[test]
    fn reports_every_duplicate_key_with_the_first_one() {
        let errs = load("a: 1\nb: 2\na: 3\nc:\n  x: 1\n  x: 2\n").unwrap_err();
        assert_eq!(errs.len(), 2);
        assert_eq!(errs[0].code, DiagCode::DuplicateKey);
        assert_eq!((errs[0].span.line, errs[0].span.column), (3, 1));
        assert_eq!(errs[0].related.as_ref().unwrap().0.line, 1);
        assert_eq!(errs[1].key_path, "c.x");
        assert_eq!(errs[1].span.line, 6);
    }

    #[test]
    fn substitutes_variables_with_defaults() {
        let n = load("url: \"amqp://${HOST}:${PORT:-5672}/\"\nlit: $${HOST}\nempty: x${EMPTY}y\n").unwrap();
        assert_eq!(n.get("url").unwrap().as_str(), Some("amqp://db.local:5672/"));
        assert_eq!(n.get("lit").unwrap().as_str(), Some("${HOST}"));
        assert_eq!(n.get("empty").unwrap().as_str(), Some("xy"));
    }

    #[test]
    fn defaults_apply_to_empty_variables_and_nest() {
        let n = load("a: ${EMPTY:-fallback}\nb: ${NOPE:-${HOST}}\nc: x${EMPTY}y\n").unwrap();
        assert_eq!(n.get("a").unwrap().as_str(), Some("fallback"));
        assert_eq!(n.get("b").unwrap().as_str(), Some("db.local"));
        assert_eq!(n.get("c").unwrap().as_str(), Some("xy"));
        let errs = load("a: \"\\u00e9\\t${NOPE1}\"\nb: 'it''s ${NOPE2}'\n").unwrap_err();
        assert_eq!((errs[0].span.line, errs[0].span.column), (1, 13));
        assert_eq!((errs[1].span.line, errs[1].span.column), (2, 11));
    }

    #[test]
    fn file_references_read_a_mounted_secret_and_never_show_it() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("token");
        std::fs::write(&secret, "s3cr3t-value\n").unwrap();
        let text = format!("auth: \"Bearer ${{file:{}}}\"\nother: ${{file:{}/none:-fallback}}\n", secret.display(), dir.path().display());
        let n = load(&text).unwrap();
        assert_eq!(n.get("auth").unwrap().as_str(), Some("Bearer s3cr3t-value"));
        assert_eq!(n.get("auth").unwrap().shown(), Some(format!("Bearer ${{file:{}}}", secret.display()).as_str()));
        assert_eq!(n.get("other").unwrap().as_str(), Some("fallback"));
        let errs = load(&format!("auth: ${{file:{}/missing}}\n", dir.path().display())).unwrap_err();
        assert_eq!(errs[0].code, DiagCode::UnsetVariable);
        assert!(errs[0].message.contains("cannot be read: entity not found"), "{}", errs[0].message);
        assert_eq!((errs[0].span.line, errs[0].span.column), (1, 7));
    }

    #[test]
    fn unset_variable_is_an_error_at_its_column() {
        let errs = load("name: x\npath: /data/${INBOX}/orders\n").unwrap_err();
        assert_eq!(errs.len(), 1);
        assert_eq!(errs[0].code, DiagCode::UnsetVariable);
        assert_eq!((errs[0].span.line, errs[0].span.column), (2, 13));
        assert!(errs[0].message.contains("INBOX"));
        assert_eq!(errs[0].key_path, "path");
    }

    #[test]
    fn syntax_errors_and_second_documents_are_reported() {
        let errs = load("a: [1, 2\nb: 3\n").unwrap_err();
        assert_eq!(errs[0].code, DiagCode::YamlSyntax);
        let errs = load("a: 1\n---\nb: 2\n").unwrap_err();
        assert!(errs[0].message.contains("more than one"));
    }

    #[test]
    fn aliases_copy_the_anchored_value() {
        let n = load("base: &b {x: 1}\ncopy: *b\n").unwrap();
        assert_eq!(n.get("copy").unwrap().get("x").unwrap().as_str(), Some("1"));
    }
}
