//! JSONPath (RFC 9535), compiled once at load, evaluated on [`Doc`]s by our own evaluator.
//!
//! Paths are parsed by `jsonpath-rust` (errors carry a column). Paths made only of names, indexes
//! and wildcards (nearly every mapping) run on a fast plan that builds nothing; filters, slices and
//! descendants run on the general evaluator below, which also evaluates route and field conditions.
//! Inside `each:` blocks `$` is the current element; `$root` reaches the whole message.

use crate::doc::Doc;
use crate::message::escape_pointer_token;
use jsonpath_rust::parser::model::{
    Comparable, Comparison, Filter, FilterAtom, FnArg, Literal, Segment, Selector, SingularQuery, SingularQuerySegment, Test, TestFunction,
};
use jsonpath_rust::parser::parse_json_path;
use regex::Regex;
use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU32, Ordering};

/// A JSONPath that failed to compile, with the 1-based column of the problem in the path text.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct PathError {
    pub message: String,
    pub column: usize,
}

#[derive(Debug, Clone)]
enum Step {
    Name(Name),
    Index(i64),
    Wildcard,
}

/// A member name and the position it was last found at (see [`Object::get_hinted`]).
#[derive(Debug)]
struct Name {
    text: String,
    hint: AtomicU32,
}

impl Clone for Name {
    fn clone(&self) -> Name {
        Name { text: self.text.clone(), hint: AtomicU32::new(self.hint.load(Ordering::Relaxed)) }
    }
}

impl Name {
    fn in_object<'a>(&self, doc: &'a Doc) -> Option<&'a Doc> {
        doc.as_object()?.get_hinted(&self.text, &self.hint)
    }
}

#[derive(Debug, Clone)]
enum Plan {
    Simple(Vec<Step>),
    General(Vec<Segment>),
}

/// A compiled JSONPath.
#[derive(Clone)]
pub struct CompiledPath {
    text: String,
    plan: Plan,
    from_root: bool,
    eval: Evaluator,
}

impl fmt::Debug for CompiledPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CompiledPath({})", self.text)
    }
}

/// Where a path is evaluated: the current value (an `each:` element, or the message) and the root.
#[derive(Clone, Copy)]
pub struct Scope<'a> {
    pub current: &'a Doc,
    pub root: &'a Doc,
}

impl<'a> Scope<'a> {
    pub fn root(v: &'a Doc) -> Self {
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
                Segment::Selector(Selector::Name(n)) => Some(Step::Name(Name { text: n.clone(), hint: AtomicU32::new(0) })),
                Segment::Selector(Selector::Index(i)) => Some(Step::Index(*i)),
                Segment::Selector(Selector::Wildcard) => Some(Step::Wildcard),
                _ => None,
            })
            .collect();
        let mut patterns = Vec::new();
        q.segments.iter().for_each(|s| patterns_in_segment(s, &mut patterns));
        let eval = Evaluator::compile(patterns)?;
        let plan = match simple {
            Some(steps) => Plan::Simple(steps),
            None => Plan::General(q.segments),
        };
        Ok(CompiledPath { text: text.to_string(), plan, from_root, eval })
    }

    pub fn text(&self) -> &str {
        &self.text
    }

    /// True when the path selects at most one value (no wildcard, filter, slice or descendant).
    pub fn is_singular(&self) -> bool {
        matches!(&self.plan, Plan::Simple(steps) if !steps.iter().any(|s| matches!(s, Step::Wildcard)))
    }

    fn start<'a>(&self, scope: Scope<'a>) -> &'a Doc {
        if self.from_root { scope.root } else { scope.current }
    }

    /// The first value selected, if any. JSON `null` counts as absent.
    pub fn first<'a>(&self, scope: Scope<'a>) -> Option<&'a Doc> {
        let start = self.start(scope);
        match &self.plan {
            Plan::Simple(steps) if self.is_singular() => {
                let mut cur = start;
                for s in steps {
                    cur = match s {
                        Step::Name(n) => n.in_object(cur)?,
                        Step::Index(i) => index(cur.as_array()?, *i)?,
                        Step::Wildcard => unreachable!("singular"),
                    };
                }
                (!cur.is_null()).then_some(cur)
            }
            _ => {
                let mut out = Vec::new();
                self.collect(start, scope.root, &mut out);
                out.into_iter().find(|v| !v.is_null())
            }
        }
    }

    /// Every value selected, in document order (nulls included: the caller decides).
    pub fn all<'a>(&self, scope: Scope<'a>, out: &mut Vec<&'a Doc>) {
        self.collect(self.start(scope), scope.root, out)
    }

    fn collect<'a>(&self, start: &'a Doc, root: &'a Doc, out: &mut Vec<&'a Doc>) {
        match &self.plan {
            Plan::Simple(steps) => walk(start, steps, out),
            Plan::General(segs) => {
                let mut found = Vec::new();
                self.eval.segments(start, segs, root, String::new(), false, &mut found);
                out.extend(found.into_iter().map(|(v, _)| v));
            }
        }
    }

    /// Every value selected with its JSON pointer, relative to the scope's start value.
    /// Slower than [`Self::all`]; used for error reports and for steps that modify in place.
    pub fn all_with_pointers<'a>(&self, scope: Scope<'a>) -> Vec<(&'a Doc, String)> {
        let start = self.start(scope);
        let mut out = Vec::new();
        match &self.plan {
            Plan::Simple(steps) => walk_with_pointer(start, steps, String::new(), &mut out),
            Plan::General(segs) => self.eval.segments(start, segs, scope.root, String::new(), true, &mut out),
        }
        out
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
                            p.push_str(&escape_pointer_token(&n.text));
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

fn index(arr: &[Doc], i: i64) -> Option<&Doc> {
    let idx = if i < 0 { arr.len().checked_sub(i.unsigned_abs() as usize)? } else { i as usize };
    arr.get(idx)
}

fn walk<'a>(cur: &'a Doc, steps: &[Step], out: &mut Vec<&'a Doc>) {
    let Some((step, rest)) = steps.split_first() else {
        out.push(cur);
        return;
    };
    match step {
        Step::Name(n) => {
            if let Some(v) = n.in_object(cur) {
                walk(v, rest, out)
            }
        }
        Step::Index(i) => {
            if let Some(v) = cur.as_array().and_then(|a| index(a, *i)) {
                walk(v, rest, out)
            }
        }
        Step::Wildcard => match cur {
            Doc::Array(a) => a.iter().for_each(|v| walk(v, rest, out)),
            Doc::Object(o) => o.values().for_each(|v| walk(v, rest, out)),
            _ => {}
        },
    }
}

fn walk_with_pointer<'a>(cur: &'a Doc, steps: &[Step], ptr: String, out: &mut Vec<(&'a Doc, String)>) {
    let Some((step, rest)) = steps.split_first() else {
        out.push((cur, ptr));
        return;
    };
    match step {
        Step::Name(n) => {
            if let Some(v) = n.in_object(cur) {
                walk_with_pointer(v, rest, format!("{ptr}/{}", escape_pointer_token(&n.text)), out)
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
            Doc::Array(a) => a.iter().enumerate().for_each(|(i, v)| walk_with_pointer(v, rest, format!("{ptr}/{i}"), out)),
            Doc::Object(o) => o.iter().for_each(|(k, v)| walk_with_pointer(v, rest, format!("{ptr}/{}", escape_pointer_token(k)), out)),
            _ => {}
        },
    }
}

/// A condition written as an RFC 9535 filter expression, e.g. `$.ship_to.country == 'US'` or
/// `@.total > 100 && match(@.channel, 'amazon.*')`. As in field maps, `$` (like `@`) is the current
/// value (the message, or the element inside `each`) and `$root` is the whole message.
#[derive(Clone)]
pub struct Condition {
    text: String,
    filter: Filter,
    eval: Evaluator,
}

impl fmt::Debug for Condition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Condition({})", self.text)
    }
}

/// Rewrites our convention into RFC 9535 terms outside string literals: `$root` -> `$` (the
/// query root) and `$` -> `@` (the current value). Also returns the 1-based column in `expr` of
/// every character of the result (and one past the end), to report errors where they were written.
fn to_rfc_roots_mapped(expr: &str) -> (String, Vec<usize>) {
    let mut map = Vec::with_capacity(expr.len() + 1);
    let mut out = String::with_capacity(expr.len());
    let mut quote: Option<char> = None;
    let mut escaped = false;
    let chars: Vec<char> = expr.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        map.push(i + 1);
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
            None if c == '\'' || c == '"' => {
                quote = Some(c);
                out.push(c);
            }
            None if c == '$' => {
                let is_root = chars[i + 1..].starts_with(&['r', 'o', 'o', 't'])
                    && !chars.get(i + 5).is_some_and(|n| n.is_alphanumeric() || *n == '_');
                if is_root {
                    out.push('$');
                    i += 4;
                } else {
                    out.push('@');
                }
            }
            None => out.push(c),
        }
        i += 1;
    }
    map.push(chars.len() + 1);
    (out, map)
}

fn collect_patterns(f: &Filter, out: &mut Vec<String>) {
    match f {
        Filter::Or(v) | Filter::And(v) => v.iter().for_each(|x| collect_patterns(x, out)),
        Filter::Atom(FilterAtom::Filter { expr, .. }) => collect_patterns(expr, out),
        Filter::Atom(FilterAtom::Test { expr, .. }) => patterns_in_test(expr, out),
        Filter::Atom(FilterAtom::Comparison(c)) => {
            let (a, b) = c.vals();
            for x in [a, b] {
                if let Comparable::Function(func) = x {
                    patterns_in_fn(func, out);
                }
            }
        }
    }
}

fn patterns_in_test(t: &Test, out: &mut Vec<String>) {
    match t {
        Test::Function(f) => patterns_in_fn(f, out),
        Test::RelQuery(segs) => segs.iter().for_each(|s| patterns_in_segment(s, out)),
        Test::AbsQuery(q) => q.segments.iter().for_each(|s| patterns_in_segment(s, out)),
    }
}

fn patterns_in_segment(s: &Segment, out: &mut Vec<String>) {
    match s {
        Segment::Descendant(inner) => patterns_in_segment(inner, out),
        Segment::Selector(Selector::Filter(f)) => collect_patterns(f, out),
        Segment::Selectors(v) => v.iter().for_each(|sel| {
            if let Selector::Filter(f) = sel {
                collect_patterns(f, out)
            }
        }),
        Segment::Selector(_) => {}
    }
}

/// `match()` needs the whole string to match: its pattern is kept anchored, `^(?:p)$`.
fn patterns_in_fn(f: &TestFunction, out: &mut Vec<String>) {
    match f {
        TestFunction::Match(_, FnArg::Literal(Literal::String(p))) => out.push(anchored(p)),
        TestFunction::Search(_, FnArg::Literal(Literal::String(p))) => out.push(p.clone()),
        _ => {}
    }
}

fn anchored(p: &str) -> String {
    format!("^(?:{p})$")
}

/// A value in a filter: a node, a computed value, or nothing (absent).
#[derive(Debug, Clone, PartialEq)]
enum Val<'a> {
    Node(&'a Doc),
    Owned(Doc),
    Nothing,
}

impl Val<'_> {
    fn get(&self) -> Option<&Doc> {
        match self {
            Val::Node(v) => Some(v),
            Val::Owned(v) => Some(v),
            Val::Nothing => None,
        }
    }
}

fn slice_indexes(len: usize, start: Option<i64>, end: Option<i64>, step: Option<i64>) -> Vec<usize> {
    let len = len as i64;
    let step = step.unwrap_or(1);
    if step == 0 {
        return Vec::new();
    }
    let norm = |i: i64| if i >= 0 { i } else { len + i };
    let mut out = Vec::new();
    if step > 0 {
        let lo = norm(start.unwrap_or(0)).clamp(0, len);
        let hi = norm(end.unwrap_or(len)).clamp(0, len);
        let mut i = lo;
        while i < hi {
            out.push(i as usize);
            i += step;
        }
    } else {
        let hi = norm(start.unwrap_or(len - 1)).clamp(-1, len - 1);
        let lo = norm(end.unwrap_or(-len - 1)).clamp(-1, len - 1);
        let mut i = hi;
        while lo < i {
            out.push(i as usize);
            i += step;
        }
    }
    out
}

impl Condition {
    pub fn compile(text: &str) -> Result<Self, PathError> {
        let (rfc, columns) = to_rfc_roots_mapped(text);
        let wrapped = format!("$[?{rfc}]");
        let query = parse_json_path(&wrapped).map_err(|e| {
            // Back from the wrapped text (`$[?` prefix, `$root` written as `$`) to what was written.
            let mut e = pest_error(e, -3);
            let at = columns.get(e.column.saturating_sub(1)).copied().unwrap_or(e.column);
            e.message = e.message.replace(&format!("column {}", e.column), &format!("column {at}"));
            e.column = at;
            e
        })?;
        let filter = match query.segments.into_iter().next() {
            Some(Segment::Selector(Selector::Filter(f))) => f,
            _ => return Err(PathError { message: "expected a filter expression such as `$.country == 'US'`".into(), column: 1 }),
        };
        let mut patterns = Vec::new();
        collect_patterns(&filter, &mut patterns);
        Ok(Condition { text: text.to_string(), filter, eval: Evaluator::compile(patterns)? })
    }

    pub fn text(&self) -> &str {
        &self.text
    }

    /// Whether the condition holds for `scope.current` (`$root` is `scope.root`).
    pub fn matches(&self, scope: Scope<'_>) -> bool {
        self.eval.filter_holds(&self.filter, scope.current, scope.root)
    }
}

/// Evaluates RFC 9535 segments and filter expressions on documents. Holds the regular expressions
/// of `match()`/`search()`, compiled at load.
#[derive(Clone, Default)]
struct Evaluator {
    regexes: HashMap<String, Regex>,
}

impl Evaluator {
    fn compile(patterns: Vec<String>) -> Result<Evaluator, PathError> {
        let mut regexes = HashMap::new();
        for p in patterns {
            let re = Regex::new(&p).map_err(|e| PathError { message: format!("invalid regular expression `{p}`: {e}"), column: 1 })?;
            regexes.insert(p, re);
        }
        Ok(Evaluator { regexes })
    }

    fn filter_holds(&self, f: &Filter, cur: &Doc, root: &Doc) -> bool {
        match f {
            Filter::Or(v) => v.iter().any(|x| self.filter_holds(x, cur, root)),
            Filter::And(v) => v.iter().all(|x| self.filter_holds(x, cur, root)),
            Filter::Atom(FilterAtom::Filter { expr, not }) => self.filter_holds(expr, cur, root) != *not,
            Filter::Atom(FilterAtom::Test { expr, not }) => {
                let holds = match &**expr {
                    Test::Function(func) => self.function(func, cur, root).get().and_then(Doc::as_bool).unwrap_or(false),
                    // A null value counts as absent, as everywhere in Switchyard.
                    t => self.test_nodes(t, cur, root).iter().any(|v| !v.is_null()),
                };
                holds != *not
            }
            Filter::Atom(FilterAtom::Comparison(c)) => self.compare(c, cur, root),
        }
    }

    fn test_nodes<'a>(&self, t: &Test, cur: &'a Doc, root: &'a Doc) -> Vec<&'a Doc> {
        let mut out = Vec::new();
        match t {
            Test::RelQuery(segs) => self.segments(cur, segs, root, String::new(), false, &mut out),
            Test::AbsQuery(q) => self.segments(root, &q.segments, root, String::new(), false, &mut out),
            Test::Function(_) => {}
        }
        out.into_iter().map(|(v, _)| v).collect()
    }

    /// Selects along `segs`; pointers are built only when `track` is set.
    fn segments<'a>(&self, v: &'a Doc, segs: &[Segment], root: &'a Doc, ptr: String, track: bool, out: &mut Vec<(&'a Doc, String)>) {
        let Some((seg, rest)) = segs.split_first() else {
            out.push((v, ptr));
            return;
        };
        let mut here = Vec::new();
        self.segment(v, seg, root, &ptr, track, &mut here);
        for (n, p) in here {
            self.segments(n, rest, root, p, track, out);
        }
    }

    fn segment<'a>(&self, v: &'a Doc, seg: &Segment, root: &'a Doc, ptr: &str, track: bool, out: &mut Vec<(&'a Doc, String)>) {
        match seg {
            Segment::Selector(sel) => self.selector(v, sel, root, ptr, track, out),
            Segment::Selectors(sels) => sels.iter().for_each(|s| self.selector(v, s, root, ptr, track, out)),
            Segment::Descendant(inner) => {
                self.segment(v, inner, root, ptr, track, out);
                for (c, p) in children(v, ptr, track) {
                    self.segment(c, seg, root, &p, track, out);
                }
            }
        }
    }

    fn selector<'a>(&self, v: &'a Doc, sel: &Selector, root: &'a Doc, ptr: &str, track: bool, out: &mut Vec<(&'a Doc, String)>) {
        let key = |k: &str| if track { format!("{ptr}/{}", escape_pointer_token(k)) } else { String::new() };
        let idx = |i: usize| if track { format!("{ptr}/{i}") } else { String::new() };
        match sel {
            Selector::Name(n) => {
                if let Some(c) = v.as_object().and_then(|o| o.get(n)) {
                    out.push((c, key(n)));
                }
            }
            Selector::Index(i) => {
                if let Some(a) = v.as_array() {
                    let at = if *i < 0 { a.len().checked_sub(i.unsigned_abs() as usize) } else { Some(*i as usize) };
                    if let Some((at, c)) = at.and_then(|at| a.get(at).map(|c| (at, c))) {
                        out.push((c, idx(at)));
                    }
                }
            }
            Selector::Wildcard => out.extend(children(v, ptr, track)),
            Selector::Slice(s, e, st) => {
                if let Some(a) = v.as_array() {
                    out.extend(slice_indexes(a.len(), *s, *e, *st).into_iter().map(|i| (&a[i], idx(i))));
                }
            }
            Selector::Filter(f) => out.extend(children(v, ptr, track).into_iter().filter(|(c, _)| self.filter_holds(f, c, root))),
        }
    }

    fn comparable<'a>(&self, c: &'a Comparable, cur: &'a Doc, root: &'a Doc) -> Val<'a> {
        match c {
            Comparable::Literal(l) => Val::Owned(literal(l)),
            Comparable::Function(f) => self.function(f, cur, root),
            Comparable::SingularQuery(q) => {
                let (start, segs) = match q {
                    SingularQuery::Current(s) => (cur, s),
                    SingularQuery::Root(s) => (root, s),
                };
                let mut v = start;
                for s in segs {
                    let next = match s {
                        SingularQuerySegment::Name(n) => v.as_object().and_then(|o| o.get(n)),
                        SingularQuerySegment::Index(i) => v.as_array().and_then(|a| index(a, *i)),
                    };
                    match next {
                        Some(n) => v = n,
                        None => return Val::Nothing,
                    }
                }
                Val::Node(v)
            }
        }
    }

    fn arg<'a>(&self, a: &'a FnArg, cur: &'a Doc, root: &'a Doc) -> (Val<'a>, Vec<&'a Doc>) {
        match a {
            FnArg::Literal(l) => (Val::Owned(literal(l)), Vec::new()),
            FnArg::Filter(f) => (Val::Owned(Doc::Bool(self.filter_holds(f, cur, root))), Vec::new()),
            FnArg::Test(t) => match &**t {
                Test::Function(f) => (self.function(f, cur, root), Vec::new()),
                t => {
                    let nodes = self.test_nodes(t, cur, root);
                    let single = if nodes.len() == 1 { Val::Node(nodes[0]) } else { Val::Nothing };
                    (single, nodes)
                }
            },
        }
    }

    fn function<'a>(&self, f: &'a TestFunction, cur: &'a Doc, root: &'a Doc) -> Val<'a> {
        match f {
            TestFunction::Length(a) => match self.arg(a, cur, root).0.get() {
                Some(Doc::String(s)) => Val::Owned(Doc::from(s.chars().count())),
                Some(Doc::Array(a)) => Val::Owned(Doc::from(a.len())),
                Some(Doc::Object(o)) => Val::Owned(Doc::from(o.len())),
                _ => Val::Nothing,
            },
            TestFunction::Count(a) => Val::Owned(Doc::from(self.arg(a, cur, root).1.len())),
            TestFunction::Value(a) => self.arg(a, cur, root).0,
            TestFunction::Match(a, p) | TestFunction::Search(a, p) => {
                let full = matches!(f, TestFunction::Match(..));
                let text = self.arg(a, cur, root).0;
                let pattern = self.arg(p, cur, root).0;
                let (Some(Doc::String(t)), Some(Doc::String(p))) = (text.get(), pattern.get()) else {
                    return Val::Owned(Doc::Bool(false));
                };
                // Patterns written in the expression were compiled at load; one read from the
                // message is compiled here.
                let pattern = if full { anchored(p) } else { p.to_string() };
                let hit = match self.regexes.get(&pattern) {
                    Some(re) => re.is_match(t),
                    None => Regex::new(&pattern).is_ok_and(|re| re.is_match(t)),
                };
                Val::Owned(Doc::Bool(hit))
            }
            TestFunction::Custom(..) => Val::Nothing,
        }
    }

    fn compare(&self, c: &Comparison, cur: &Doc, root: &Doc) -> bool {
        let (a, b) = c.vals();
        // null and absent are the same thing: `$.x == null` holds for both.
        let (a, b) = (absent_if_null(self.comparable(a, cur, root)), absent_if_null(self.comparable(b, cur, root)));
        let eq = || match (a.get(), b.get()) {
            (None, None) => true,
            (Some(x), Some(y)) => json_eq(x, y),
            _ => false,
        };
        let lt = |x: Option<&Doc>, y: Option<&Doc>| match (x, y) {
            (Some(Doc::Number(x)), Some(Doc::Number(y))) => x.as_f64() < y.as_f64(),
            (Some(Doc::String(x)), Some(Doc::String(y))) => x.as_str() < y.as_str(),
            _ => false,
        };
        match c {
            Comparison::Eq(..) => eq(),
            Comparison::Ne(..) => !eq(),
            Comparison::Lt(..) => lt(a.get(), b.get()),
            Comparison::Gt(..) => lt(b.get(), a.get()),
            // RFC 9535: `a <= b` is `a < b || a == b` (so two absent values are `<=`).
            Comparison::Lte(..) => lt(a.get(), b.get()) || eq(),
            Comparison::Gte(..) => lt(b.get(), a.get()) || eq(),
        }
    }
}

/// The children of an array or object, with their pointers when tracked.
fn children<'a>(v: &'a Doc, ptr: &str, track: bool) -> Vec<(&'a Doc, String)> {
    match v {
        Doc::Array(a) => a.iter().enumerate().map(|(i, c)| (c, if track { format!("{ptr}/{i}") } else { String::new() })).collect(),
        Doc::Object(o) => {
            o.iter().map(|(k, c)| (c, if track { format!("{ptr}/{}", escape_pointer_token(k)) } else { String::new() })).collect()
        }
        _ => Vec::new(),
    }
}

fn absent_if_null(v: Val<'_>) -> Val<'_> {
    if v.get().is_some_and(Doc::is_null) { Val::Nothing } else { v }
}

/// Equality as RFC 9535 defines it: numbers by value (1 == 1.0), everything else structurally.
fn json_eq(a: &Doc, b: &Doc) -> bool {
    match (a, b) {
        (Doc::Number(x), Doc::Number(y)) => match (x.as_i64(), y.as_i64(), x.as_u64(), y.as_u64()) {
            (Some(a), Some(b), _, _) => a == b,
            (_, _, Some(a), Some(b)) => a == b,
            _ => x.as_f64() == y.as_f64(),
        },
        (Doc::Array(x), Doc::Array(y)) => x.len() == y.len() && x.iter().zip(y).all(|(p, q)| json_eq(p, q)),
        (Doc::Object(x), Doc::Object(y)) => x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| json_eq(v, w))),
        _ => a == b,
    }
}

fn literal(l: &Literal) -> Doc {
    match l {
        Literal::Int(i) => Doc::from(*i),
        Literal::Float(f) => serde_json::Number::from_f64(*f).map_or(Doc::Null, Doc::Number),
        Literal::String(s) => Doc::from(s.as_str()),
        Literal::Bool(b) => Doc::Bool(*b),
        Literal::Null => Doc::Null,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doc;

    fn doc() -> Doc {
        doc!({"id": 7, "currency": "USD", "lines": [{"sku": "A", "qty": 1, "tax": [{"p": "1.00"}, {"p": "2.00"}]}, {"sku": "B", "qty": 2, "tax": []}], "ship": {"country": "US"}, "n": null, "a/b": 1})
    }

    #[test]
    fn a_remembered_position_never_finds_the_wrong_member() {
        // The position cache is tried first: documents with other key orders, fewer keys, or
        // the key missing must still find exactly the right member.
        let p = CompiledPath::compile("$.b.c").unwrap();
        let docs = [
            (doc!({"a": 1, "b": {"c": 2}}), Some(2)),
            (doc!({"b": {"x": 0, "c": 3}, "a": 4}), Some(3)),
            (doc!({"a": 5}), None),
            (doc!({}), None),
            (doc!({"x": 0, "y": 0, "b": {"c": 6}}), Some(6)),
            (doc!({"x": 0, "y": 0, "bb": {"c": 7}}), None),
            (doc!([{"b": {"c": 8}}]), None),
            (doc!({"x": 0, "y": 0, "b": {"c": 9}}), Some(9)),
        ];
        for (d, want) in docs {
            let scope = Scope { current: &d, root: &d };
            assert_eq!(p.first(scope).and_then(Doc::as_i64), want, "{d}");
            let mut all = Vec::new();
            p.all(scope, &mut all);
            assert_eq!(all.first().and_then(|v| v.as_i64()), want, "{d}");
        }
    }

    #[test]
    fn singular_paths_use_the_fast_plan() {
        let d = doc();
        let p = CompiledPath::compile("$.lines[1].sku").unwrap();
        assert!(p.is_singular());
        assert_eq!(p.first(Scope::root(&d)), Some(&doc!("B")));
        assert_eq!(CompiledPath::compile("$.lines[-1].qty").unwrap().first(Scope::root(&d)), Some(&doc!(2)));
        assert_eq!(CompiledPath::compile("$.n").unwrap().first(Scope::root(&d)), None);
        assert_eq!(CompiledPath::compile("$.missing.x").unwrap().first(Scope::root(&d)), None);
        assert_eq!(CompiledPath::compile("$['a/b']").unwrap().first(Scope::root(&d)), Some(&doc!(1)));
        let q = doc!({"'q'": 4});
        assert_eq!(
            CompiledPath::compile("$[\"'q'\"]").unwrap().first(Scope::root(&q)),
            Some(&doc!(4)),
            "quotes inside a name are part of it"
        );
    }

    #[test]
    fn wildcards_and_filters_select_many() {
        let d = doc();
        let mut out = Vec::new();
        CompiledPath::compile("$.lines[*].tax[*].p").unwrap().all(Scope::root(&d), &mut out);
        assert_eq!(out, vec![&doc!("1.00"), &doc!("2.00")]);
        let p = CompiledPath::compile("$.lines[?@.qty > 1].sku").unwrap();
        assert!(!p.is_singular());
        assert_eq!(p.first(Scope::root(&d)), Some(&doc!("B")));
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
        assert_eq!(CompiledPath::compile("$.sku").unwrap().first(scope), Some(&doc!("A")));
        assert_eq!(CompiledPath::compile("$root.currency").unwrap().first(scope), Some(&doc!("USD")));
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
        let d = doc();
        let m = |c: &str| Condition::compile(c).unwrap().matches(Scope::root(&d));
        assert!(m("$.ship.country == 'US'"));
        assert!(m("@.ship.country == 'US' && @.id > 5"));
        assert!(!m("$.ship.country != 'US'"));
        assert!(!m("$.missing"));
        assert!(m("!$.missing"));
        assert!(m("$.missing == $.also_missing"));
        assert!(m("$.n == null && $.missing == null && !$.n && $.id != null"));
        assert!(m("$.ship"));
        assert!(m("$.lines[?@.sku == 'B']"));
        assert!(!m("$.lines[?@.sku == 'Z']"));
        assert!(m("length($.lines) == 2 && count($.lines[*].tax[*]) == 2"));
        assert!(m("match($.currency, 'US.')"));
        assert!(m("match($.currency, 'US|USD')"), "match() is a whole-string match of the pattern");
        assert!(m("$.missing <= $.also_missing"));
        assert!(m("$['a/b'] == 1"));
        assert!(!m("match($.currency, 'US')"));
        assert!(m("search($.currency, 'S')"));
        assert!(m("$.id >= 7 && $.id <= 7 && $.id == 7.0"));
        assert!(m("$..p"));
        assert!(m("$.lines[0:1]"));
        assert!(!m("$.lines[5:]"));
        assert!(m("$.lines[::-1].sku"));
        // Inside `each`, `$` is the element and `$root` the message.
        let line = &d["lines"][1];
        let scope = Scope { current: line, root: &d };
        assert!(Condition::compile("$.qty == 2 && $root.currency == 'USD'").unwrap().matches(scope));
        assert!(Condition::compile("match($.cur, '(').is_err() || true").is_err() || Condition::compile("match($.x, '(')").is_err());
        let e = Condition::compile("$.a ==").unwrap_err();
        assert!(e.column >= 1);
    }

    #[test]
    fn condition_errors_point_where_they_were_written() {
        let e = Condition::compile("$root.a == 1 && $root.b == ]").unwrap_err();
        assert_eq!(e.column, 28, "{e:?}");
        let e = Condition::compile("$.a == ]").unwrap_err();
        assert_eq!(e.column, 8, "{e:?}");
    }

    #[test]
    fn roots_are_rewritten_outside_strings() {
        assert_eq!(to_rfc_roots_mapped("$.a == '$x' && $root.b == \"\\\"$\" && $rooted").0, "@.a == '$x' && $.b == \"\\\"$\" && @rooted");
    }
}
