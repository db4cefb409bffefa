//! Rhai scripts for what a field map cannot say. Compiled once at load, run sandboxed: bounded
//! operations, time, call depth, expression depth and sizes; no `eval`, no modules, no file or
//! network access (Rhai has none unless registered). Helpers for decimal money and dates are
//! registered.
//!
//! A script sees `input` (the record so far) and `meta` (channel, pipeline, ids); its last
//! expression is the new record. `fail(reason, message)` or `fail(reason, pointer, message)`
//! sends the message to exceptions with that reason.

use super::lookup::LookupTable;
use crate::config::Spanned;
use crate::config::{DiagCode, Diagnostic, SourceFile};
use crate::convert::{self, DateOptions, Precision, Zone};
use crate::doc::{Doc, Object};
use crate::message::{Document, ErrorDetail, Failure, reason};
use rhai::{AST, Dynamic, Engine, EvalAltResult, ImmutableString, Position, Scope};
use rust_decimal::Decimal;
use std::cell::Cell;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Sandbox limits, per message.
#[derive(Debug, Clone, serde::Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Most operations one run may take (stops runaway loops). Default 1,000,000, at most
    /// 2,000,000.
    #[serde(default = "default_ops")]
    #[schemars(range(min = 1, max = 2_000_000))]
    pub max_operations: u64,
    /// Deepest function call nesting. Default 32, at most 256.
    #[serde(default = "default_calls")]
    #[schemars(range(min = 1, max = 256))]
    pub max_call_depth: usize,
    /// Longest string, in bytes. Default 1 MiB.
    #[serde(default = "default_string")]
    pub max_string_size: usize,
    /// Largest list or map. Default 100,000 items.
    #[serde(default = "default_items")]
    pub max_collection_size: usize,
    /// Longest one run may take, such as `250ms` or `2s`: stops work that operations do not
    /// count, such as copying lists nested ever deeper. Default 1s, at most 10s.
    #[serde(default)]
    pub max_duration: Option<Spanned<String>>,
}

fn default_ops() -> u64 {
    1_000_000
}
fn default_calls() -> usize {
    32
}
fn default_string() -> usize {
    1 << 20
}
fn default_items() -> usize {
    100_000
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_operations: default_ops(),
            max_call_depth: default_calls(),
            max_string_size: default_string(),
            max_collection_size: default_items(),
            max_duration: None,
        }
    }
}

/// `limits.max_duration` when the pipeline does not set it.
pub const DEFAULT_MAX_DURATION: Duration = Duration::from_secs(1);
/// The longest `limits.max_duration` may be.
pub const MOST_MAX_DURATION: Duration = Duration::from_secs(10);
/// The most `limits.max_operations` may allow. Rhai copies a closure in constant time, so a
/// script can nest closures one level per few operations; every level is a native frame when
/// the nest is dropped. In a debug build 4,000,000 operations of that fit the stack of the
/// threads that run pipelines (`runtime::PIPELINE_THREAD_STACK`) and 8,000,000 overflow it.
pub const MOST_OPERATIONS: u64 = 2_000_000;
/// The deepest `limits.max_call_depth` may allow: each call level is native frames too.
pub const MOST_CALL_DEPTH: usize = 256;

thread_local! {
    /// When the Rhai evaluation running on this thread must stop; none outside `within_time`.
    static DEADLINE: Cell<Option<Instant>> = const { Cell::new(None) };
    /// Rhai operations run on this thread, for `CLOCK_EVERY`.
    static TICKS: Cell<u32> = const { Cell::new(0) };
}

/// Operations between two looks at the clock: a look costs about as much as 50 operations.
const CLOCK_EVERY: u32 = 64;

/// `DEADLINE` for the duration of one evaluation; the one before is back however it ends.
struct DeadlineGuard {
    before: Option<Instant>,
}

impl DeadlineGuard {
    fn set(limit: Duration) -> DeadlineGuard {
        DeadlineGuard { before: DEADLINE.with(|d| d.replace(Some(Instant::now() + limit))) }
    }
}

impl Drop for DeadlineGuard {
    fn drop(&mut self) {
        DEADLINE.with(|d| d.set(self.before));
    }
}

/// Runs a Rhai evaluation of an engine from `sandboxed_engine` that stops once it has run for
/// `limit`.
fn within_time<T>(limit: Duration, eval: impl FnOnce() -> T) -> T {
    let _deadline = DeadlineGuard::set(limit);
    eval()
}

/// Evaluates a condition (a route's `when_script`, an `assert` rule) within the default time
/// limit; an error comes back in words.
pub fn eval_condition(engine: &Engine, scope: &mut Scope, ast: &AST) -> Result<Dynamic, String> {
    within_time(DEFAULT_MAX_DURATION, || engine.eval_ast_with_scope::<Dynamic>(scope, ast))
        .map_err(|e| error_text(&e, DEFAULT_MAX_DURATION))
}

/// A Rhai evaluation's error in words: a run stopped by its time limit says so.
fn error_text(e: &EvalAltResult, limit: Duration) -> String {
    match out_of_time(e) {
        Some(_) => format!("it ran longer than {}, its time limit", humantime::format_duration(limit)),
        None => e.to_string(),
    }
}

const FAIL_TAG: &str = "__switchyard_fail";

fn runtime_error(msg: impl Into<String>) -> Box<EvalAltResult> {
    EvalAltResult::ErrorRuntime(Dynamic::from(msg.into()), Position::NONE).into()
}

fn fail_value(reason: &str, pointer: &str, message: &str) -> Box<EvalAltResult> {
    let mut m = rhai::Map::new();
    m.insert(FAIL_TAG.into(), Dynamic::TRUE);
    m.insert("reason".into(), reason.into());
    m.insert("pointer".into(), pointer.into());
    m.insert("message".into(), message.into());
    EvalAltResult::ErrorRuntime(Dynamic::from_map(m), Position::NONE).into()
}

/// A document as a Rhai value: what `rhai::serde::to_dynamic` makes of it (integers beyond `i64`
/// as decimals), built directly, which takes half the instructions.
pub fn doc_to_dynamic(d: &Doc) -> Dynamic {
    match d {
        Doc::Null => Dynamic::UNIT,
        Doc::Bool(b) => Dynamic::from_bool(*b),
        Doc::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => Dynamic::from_int(i),
            (None, Some(u)) => Dynamic::from_decimal(Decimal::from(u)),
            _ => Dynamic::from_float(n.as_f64().unwrap_or_default()),
        },
        Doc::String(s) => Dynamic::from(ImmutableString::from(s.as_str())),
        Doc::Array(items) => Dynamic::from_array(items.iter().map(doc_to_dynamic).collect()),
        Doc::Object(o) => Dynamic::from_map(o.iter().map(|(k, v)| (k.into(), doc_to_dynamic(v))).collect()),
    }
}

/// A Rhai value as a document; decimals become decimal strings (money never turns into a float).
pub fn dynamic_to_doc(d: &Dynamic) -> Result<Doc, String> {
    dynamic_to_doc_within(d, 0)
}

/// `d` as a document, `depth` lists and maps deep in the value being converted. Reads each value
/// in place: a clone of a map would copy everything under it.
fn dynamic_to_doc_within(d: &Dynamic, depth: u32) -> Result<Doc, String> {
    let inside = || match depth < crate::doc::MAX_DEPTH {
        true => Ok(depth + 1),
        false => Err(format!("the value is nested more than {} lists and maps deep", crate::doc::MAX_DEPTH)),
    };
    if let Some(map) = d.read_lock::<rhai::Map>() {
        let depth = inside()?;
        let mut out = Object::with_capacity(map.len());
        for (k, v) in map.iter() {
            out.push_unique(k.as_str().into(), dynamic_to_doc_within(v, depth)?);
        }
        return Ok(Doc::Object(out));
    }
    if let Some(arr) = d.read_lock::<rhai::Array>() {
        let depth = inside()?;
        return arr.iter().map(|v| dynamic_to_doc_within(v, depth)).collect::<Result<Vec<_>, _>>().map(Doc::Array);
    }
    if let Ok(s) = d.as_immutable_string_ref() {
        return Ok(Doc::from(s.as_str()));
    }
    if d.is_unit() {
        return Ok(Doc::Null);
    }
    if let Ok(b) = d.as_bool() {
        return Ok(Doc::Bool(b));
    }
    if let Ok(i) = d.as_int() {
        return Ok(Doc::from(i));
    }
    if let Ok(dec) = d.as_decimal() {
        return Ok(Doc::String(convert::decimal_str(&dec)));
    }
    if let Ok(f) = d.as_float() {
        return serde_json::Number::from_f64(f).map(Doc::Number).ok_or_else(|| format!("{f} is not a finite number"));
    }
    if let Ok(c) = d.as_char() {
        return Ok(Doc::from(c.to_string()));
    }
    Err(format!("a script can output text, numbers, booleans, lists and maps, not a `{}`", d.type_name()))
}

fn json_arg(d: &Dynamic) -> Result<Doc, Box<EvalAltResult>> {
    dynamic_to_doc(d).map_err(runtime_error)
}

fn to_decimal(d: &Dynamic) -> Result<Decimal, Box<EvalAltResult>> {
    if let Ok(dec) = d.as_decimal() {
        return Ok(dec);
    }
    let v = json_arg(d)?;
    let amount = match &v {
        Doc::Object(o) => o.get("amount").or_else(|| o.get("Amount")).cloned().unwrap_or(Doc::Null),
        _ => v,
    };
    convert::decimal_from(&amount).map_err(runtime_error)
}

fn money(amount: &Dynamic, currency: &str, precision: Precision) -> Result<Dynamic, Box<EvalAltResult>> {
    let v = json_arg(amount)?;
    let m = convert::money_from(&v, Some(currency), false, precision).map_err(runtime_error)?;
    let mut out = rhai::Map::new();
    out.insert("amount".into(), m.amount.to_string().into());
    out.insert("currency".into(), m.currency.as_str().into());
    Ok(Dynamic::from_map(out))
}

fn to_utc(v: &Dynamic, opts: &DateOptions) -> Result<ImmutableString, Box<EvalAltResult>> {
    let t = convert::datetime_from(&json_arg(v)?, opts).map_err(runtime_error)?;
    Ok(convert::format_datetime(&t).into())
}

/// Tables a script may read with `lookup(name, key)` or `lookup(name, key, column)`.
pub type ScriptTables = HashMap<String, Arc<LookupTable>>;

/// A sandboxed engine with Switchyard's helpers registered.
pub fn sandboxed_engine(limits: &Limits, tables: Arc<ScriptTables>) -> Engine {
    let mut e = Engine::new();
    e.set_max_operations(limits.max_operations)
        .set_max_call_levels(limits.max_call_depth)
        .set_max_expr_depths(64, 32)
        .set_max_string_size(limits.max_string_size)
        .set_max_array_size(limits.max_collection_size)
        .set_max_map_size(limits.max_collection_size)
        .set_max_variables(1_000)
        .set_max_functions(200)
        .set_strict_variables(true);
    e.disable_symbol("eval");
    // Operations alone do not bound a run's time: Rhai counts one whether it copies a number or
    // a list nested 10,000 deep. They are counted here, not by Rhai's count, which starts from
    // zero again in each closure that `map` or `reduce` calls.
    e.on_progress(|_| {
        let tick = TICKS.with(|t| {
            let n = t.get().wrapping_add(1);
            t.set(n);
            n
        });
        if !tick.is_multiple_of(CLOCK_EVERY) {
            return None;
        }
        DEADLINE.with(Cell::get).is_some_and(|at| Instant::now() >= at).then_some(Dynamic::UNIT)
    });
    e.on_print(|s| tracing::info!(target: "switchyard::script", "{s}"));
    e.on_debug(|s, _, pos| tracing::debug!(target: "switchyard::script", line = pos.line(), "{s}"));

    // Decimal money.
    e.register_fn("dec", |v: Dynamic| to_decimal(&v));
    e.register_fn("money", |v: Dynamic, c: &str| money(&v, c, Precision::Currency));
    e.register_fn("money_exact", |v: Dynamic, c: &str| money(&v, c, Precision::Keep));
    e.register_fn("money_minor", |units: i64, c: &str| -> Result<Dynamic, Box<EvalAltResult>> {
        let m = convert::money_from(&Doc::from(units), Some(c), true, Precision::Currency).map_err(runtime_error)?;
        money(&Dynamic::from(m.amount), c, Precision::Currency)
    });
    e.register_fn("divide_exact", |a: Dynamic, b: Dynamic| -> Result<Dynamic, Box<EvalAltResult>> {
        Ok(divide_exact(to_decimal(&a)?, to_decimal(&b)?))
    });
    e.register_fn("round_money", |v: Dynamic, c: &str| -> Result<Dynamic, Box<EvalAltResult>> {
        let exp = convert::currency_exponent(&c.to_ascii_uppercase()).map_err(runtime_error)?;
        let d = to_decimal(&v)?.round_dp_with_strategy(exp, rust_decimal::RoundingStrategy::MidpointAwayFromZero);
        money(&Dynamic::from(d), c, Precision::Currency)
    });
    // Dates.
    e.register_fn("to_utc", |v: Dynamic| to_utc(&v, &DateOptions::default()));
    e.register_fn("to_utc", |v: Dynamic, format: &str| to_utc(&v, &DateOptions { format: Some(format.to_string()), ..Default::default() }));
    e.register_fn("to_utc", |v: Dynamic, format: &str, tz: &str| -> Result<ImmutableString, Box<EvalAltResult>> {
        let zone = Zone::parse(tz).map_err(runtime_error)?;
        let format = (!format.is_empty()).then(|| format.to_string());
        to_utc(&v, &DateOptions { format, timezone: Some(zone), ..Default::default() })
    });
    e.register_fn("to_date", |v: Dynamic| -> Result<ImmutableString, Box<EvalAltResult>> {
        convert::date_from(&json_arg(&v)?, &DateOptions::default()).map(Into::into).map_err(runtime_error)
    });
    // Values.
    e.register_fn("is_blank", |v: Dynamic| v.is_unit() || v.as_immutable_string_ref().is_ok_and(|s| s.trim().is_empty()));
    e.register_fn("fail", |reason: &str, message: &str| -> Result<Dynamic, Box<EvalAltResult>> { Err(fail_value(reason, "", message)) });
    e.register_fn("fail", |reason: &str, pointer: &str, message: &str| -> Result<Dynamic, Box<EvalAltResult>> {
        Err(fail_value(reason, pointer, message))
    });
    let t = tables.clone();
    e.register_fn("lookup", move |name: &str, key: &str| -> Result<Dynamic, Box<EvalAltResult>> {
        let table = t.get(name).ok_or_else(|| runtime_error(format!("no lookup table named `{name}` in this step's `tables:`")))?;
        Ok(table.get(key, 1).map_or(Dynamic::UNIT, |v| v.into()))
    });
    let t = tables;
    e.register_fn("lookup", move |name: &str, key: &str, column: &str| -> Result<Dynamic, Box<EvalAltResult>> {
        let table = t.get(name).ok_or_else(|| runtime_error(format!("no lookup table named `{name}` in this step's `tables:`")))?;
        let col = table.column_index(column).ok_or_else(|| runtime_error(format!("lookup table `{name}` has no column `{column}`")))?;
        Ok(table.get(key, col).map_or(Dynamic::UNIT, |v| v.into()))
    });
    e
}

/// The script's header: `// version: 1.0.0` (required) and optionally `// name: ...`.
fn header(text: &str, key: &str) -> Option<String> {
    text.lines()
        .take_while(|l| l.trim_start().starts_with("//") || l.trim().is_empty())
        .find_map(|l| {
            l.trim_start().trim_start_matches('/').trim().strip_prefix(key).and_then(|r| r.strip_prefix(':')).map(|v| v.trim().to_string())
        })
        .filter(|v| !v.is_empty())
}

/// The variables every script and condition may use, declared so that strict-variable mode can
/// reject a misspelt name at load time.
pub fn declared_scope() -> Scope<'static> {
    let mut scope = Scope::new();
    scope.push("input", Dynamic::UNIT);
    scope.push_constant("meta", Dynamic::from_map(rhai::Map::new()));
    scope
}

/// Every function and method call in the script, in statement or expression position.
fn each_call(ast: &AST, visit: &mut dyn FnMut(&rhai::FnCallExpr, Position)) {
    use rhai::{ASTNode, Expr, Stmt};
    ast.walk(&mut |path: &[ASTNode]| {
        match path.last() {
            Some(ASTNode::Expr(Expr::FnCall(call, pos) | Expr::MethodCall(call, pos))) => visit(call, *pos),
            Some(ASTNode::Stmt(Stmt::FnCall(call, pos))) => visit(call, *pos),
            _ => {}
        }
        true
    });
}

/// Names Rhai handles itself rather than as registered functions.
const RHAI_KEYWORDS: &[&str] =
    &["type_of", "print", "debug", "Fn", "call", "curry", "is_def_var", "is_def_fn", "is_shared", "eval", "this"];

/// Every call to a function that does not exist, as diagnostics: Rhai itself only notices when
/// the call runs, which for an analyst is too late.
pub fn unknown_functions(
    engine: &Engine,
    ast: &AST,
    file: &SourceFile,
    position_of: &dyn Fn(Position) -> crate::config::Span,
    key_path: &str,
) -> Vec<Diagnostic> {
    let mut known: std::collections::HashSet<String> =
        engine.collect_fn_metadata(None, |f| Some(f.metadata.name.to_string()), true).into_iter().collect();
    known.extend(ast.iter_functions().map(|f| f.name.to_string()));
    known.extend(RHAI_KEYWORDS.iter().map(|k| k.to_string()));
    let mut unknown: Vec<(String, Position)> = Vec::new();
    each_call(ast, &mut |call, pos| {
        let name = call.name.as_str();
        if call.op_token.is_none() && name.chars().next().is_some_and(|c| c.is_alphabetic() || c == '_') && !known.contains(name) {
            unknown.push((name.to_string(), pos));
        }
    });
    unknown
        .into_iter()
        .map(|(name, pos)| {
            Diagnostic::new(DiagCode::ScriptSyntax, file, position_of(pos), key_path, format!("unknown function `{name}`"))
                .hint_opt(crate::config::diag::suggestion(&name, known.iter().map(String::as_str)))
        })
        .collect()
}

/// The reasons of `fail("reason", ...)` calls, and whether any call computes its reason instead.
fn fail_reasons(ast: &AST) -> (Vec<String>, bool) {
    let (mut names, mut computed) = (Vec::new(), false);
    each_call(ast, &mut |call, _| {
        if call.name.as_str() == "fail" {
            match call.args.first() {
                Some(rhai::Expr::StringConstant(s, _)) => names.push(s.to_string()),
                _ => computed = true,
            }
        }
    });
    (names, computed)
}

/// A Rhai compile error as a diagnostic at the script's line and column.
pub fn parse_error_diag(file: &SourceFile, e: &rhai::ParseError) -> Diagnostic {
    let pos = e.position();
    let span = file.span_at(pos.line().unwrap_or(1), pos.position().unwrap_or(1), 1);
    Diagnostic::new(DiagCode::ScriptSyntax, file, span, "", format!("script does not compile: {}", e.err_type()))
}

/// The failure a script asked for with `fail(...)`, even from inside a function it called.
fn requested_failure(e: &EvalAltResult, document: Document) -> Option<Failure> {
    match e {
        EvalAltResult::ErrorRuntime(v, _) => {
            let m = v.read_lock::<rhai::Map>()?;
            if !m.contains_key(FAIL_TAG) {
                return None;
            }
            let get = |k: &str| m.get(k).and_then(|v| v.clone().into_string().ok()).unwrap_or_default();
            Some(Failure::one(get("reason"), ErrorDetail { pointer: get("pointer"), message: get("message"), document }))
        }
        EvalAltResult::ErrorInFunctionCall(_, _, inner, _) => requested_failure(inner, document),
        _ => None,
    }
}

/// Where the run was when it went past its deadline, maybe inside a function the script called.
fn out_of_time(e: &EvalAltResult) -> Option<Position> {
    match e {
        EvalAltResult::ErrorTerminated(_, pos) => Some(*pos),
        EvalAltResult::ErrorInFunctionCall(_, _, inner, _) => out_of_time(inner),
        _ => None,
    }
}

/// `a / b` when the quotient is exact (it terminates and multiplies back to `a`), else `()`.
fn divide_exact(a: Decimal, b: Decimal) -> Dynamic {
    match a.checked_div(b) {
        // rust_decimal keeps 28 digits: a repeating quotient fills them all.
        Some(q) if q * b == a && q.normalize().scale() < 20 => Dynamic::from(q.normalize()),
        _ => Dynamic::UNIT,
    }
}

/// A compiled script step.
pub struct Script {
    pub name: String,
    pub version: String,
    engine: Arc<Engine>,
    ast: AST,
    /// Reasons written as text in `fail("...", ...)` calls.
    fail_reasons: Vec<String>,
    /// Some `fail` call computes its reason.
    fail_reason_computed: bool,
    /// Longest one run may take.
    pub max_duration: Duration,
}

impl std::fmt::Debug for Script {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Script({}@{})", self.name, self.version)
    }
}

impl Script {
    pub fn compile(file: &SourceFile, engine: Arc<Engine>) -> Result<Script, Vec<Diagnostic>> {
        let Some(version) = header(&file.text, "version") else {
            return Err(vec![
                Diagnostic::new(
                    DiagCode::InvalidFile,
                    file,
                    file.span_at(1, 1, 1),
                    "",
                    "a script must declare its version in a first-line comment",
                )
                .expected("`// version: 1.0.0`")
                .hint("versions are stamped on every output, so a change to the script is traceable"),
            ]);
        };
        let name = header(&file.text, "name").unwrap_or_else(|| {
            file.path.file_stem().map(|s| s.to_string_lossy().trim_end_matches(".rhai").to_string()).unwrap_or_default()
        });
        let ast = engine.compile_with_scope(&declared_scope(), &*file.text).map_err(|e| vec![parse_error_diag(file, &e)])?;
        let at = |pos: Position| file.span_at(pos.line().unwrap_or(1), pos.position().unwrap_or(1), 1);
        let unknown = unknown_functions(&engine, &ast, file, &at, "");
        if !unknown.is_empty() {
            return Err(unknown);
        }
        let (fail_reasons, fail_reason_computed) = fail_reasons(&ast);
        Ok(Script { name, version, engine, ast, fail_reasons, fail_reason_computed, max_duration: DEFAULT_MAX_DURATION })
    }

    pub fn reasons(&self, out: &mut crate::map::Reasons) {
        out.names.extend(self.fail_reasons.iter().cloned());
        out.open |= self.fail_reason_computed;
    }

    /// Runs the script on `record`; `meta` is visible as `meta`.
    pub fn apply(&self, record: &Doc, meta: &rhai::Map, document: Document) -> Result<Doc, Failure> {
        let mut scope = Scope::new();
        scope.push("input", doc_to_dynamic(record));
        scope.push_constant("meta", Dynamic::from_map(meta.clone()));
        let out = within_time(self.max_duration, || self.engine.eval_ast_with_scope::<Dynamic>(&mut scope, &self.ast))
            .map_err(|e| self.failure(*e, document))?;
        if out.is_unit() {
            return Err(Failure::one(
                reason::SCRIPT_ERROR,
                ErrorDetail {
                    pointer: String::new(),
                    message: format!("script {} returned nothing: end it with the record to output", self.name),
                    document,
                },
            ));
        }
        dynamic_to_doc(&out).map_err(|m| {
            let message = format!("script {} output a record that cannot be written as JSON: {m}", self.name);
            Failure::one(reason::SCRIPT_ERROR, ErrorDetail { pointer: String::new(), message, document })
        })
    }

    fn failure(&self, e: EvalAltResult, document: Document) -> Failure {
        if let Some(f) = requested_failure(&e, document) {
            return f;
        }
        let stopped_at = out_of_time(&e);
        let pos = stopped_at.unwrap_or_else(|| e.position());
        let at = match (pos.line(), pos.position()) {
            (Some(l), Some(c)) => format!(" at line {l}, column {c}"),
            (Some(l), None) => format!(" at line {l}"),
            _ => String::new(),
        };
        let mut text = error_text(&e, self.max_duration);
        if let Some(i) = text.rfind(" (line ") {
            text.truncate(i);
        }
        if stopped_at.is_some() {
            text.push_str(" (raise `limits.max_duration` if the work is meant to take that long)");
        }
        Failure::one(
            reason::SCRIPT_ERROR,
            ErrorDetail { pointer: String::new(), message: format!("script {} failed{at}: {text}", self.name), document },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doc;

    fn script(text: &str) -> Result<Script, Vec<Diagnostic>> {
        let engine = Arc::new(sandboxed_engine(&Limits::default(), Arc::new(ScriptTables::new())));
        Script::compile(&SourceFile::new("t.rhai", text), engine)
    }

    fn run(text: &str, input: Doc) -> Result<Doc, Failure> {
        script(text).unwrap().apply(&input, &rhai::Map::new(), Document::Input)
    }

    #[test]
    fn computes_money_with_decimals_and_dates() {
        let out = run(
            "// version: 1.0.0\nlet line_total = dec(input.price);\nlet unit = line_total / input.qty;\n#{ unit: money_exact(unit, \"USD\"), total: money(line_total + dec(\"0.10\"), \"USD\"), at: to_utc(input.at) }",
            doc!({"price": "17.95", "qty": 2, "at": "2019-05-07T15:42:57.058Z"}),
        )
        .unwrap();
        assert_eq!(
            out,
            doc!({"at": "2019-05-07T15:42:57.058Z", "total": {"amount": "18.05", "currency": "USD"}, "unit": {"amount": "8.975", "currency": "USD"}})
        );
    }

    #[test]
    fn divide_exact_refuses_repeating_quotients() {
        let out = run("// version: 1\n#{ a: divide_exact(dec(\"10.00\"), 4), b: divide_exact(\"10.00\", 3) == () }", doc!({})).unwrap();
        assert_eq!(out, doc!({"a": "2.5", "b": true}));
    }

    #[test]
    fn fail_works_from_inside_functions() {
        let f =
            run("// version: 1\nfn check(x) { if x < 0 { fail(\"negative\", \"/x\", `x is ${x}`); } x }\ncheck(input.x)", doc!({"x": -2}))
                .unwrap_err();
        assert_eq!(f, Failure::one("negative", ErrorDetail { pointer: "/x".into(), message: "x is -2".into(), document: Document::Input }));
    }

    #[test]
    fn fail_sends_a_reason_and_pointer() {
        let f = run(
            "// version: 1\nif input.items.len() == 0 { fail(\"no_items\", \"/items\", \"order has no items\") }\ninput",
            doc!({"items": []}),
        )
        .unwrap_err();
        assert_eq!(
            f,
            Failure::one(
                "no_items",
                ErrorDetail { pointer: "/items".into(), message: "order has no items".into(), document: Document::Input }
            )
        );
    }

    #[test]
    fn runtime_errors_give_the_line_and_money_errors_are_caught() {
        let f = run("// version: 1\nlet x = 1;\nlet y = input.missing.deeper;\n", doc!({})).unwrap_err();
        assert_eq!(f.reason, "script_error");
        assert!(f.errors[0].message.contains("line 3"), "{:?}", f.errors);
        let f = run("// version: 1\nmoney(\"25.99\", \"JPY\")", doc!({})).unwrap_err();
        assert!(f.errors[0].message.contains("more decimal places than JPY allows"), "{:?}", f.errors);
    }

    #[test]
    fn sandbox_stops_runaway_scripts_and_eval() {
        let f = run("// version: 1\nloop { }", doc!({})).unwrap_err();
        assert!(f.errors[0].message.to_lowercase().contains("too many operations"), "{:?}", f.errors);
        let f = run("// version: 1\nfn r(n) { r(n + 1) }\nr(0)", doc!({})).unwrap_err();
        assert!(f.errors[0].message.to_lowercase().contains("stack overflow") || f.errors[0].message.contains("call"), "{:?}", f.errors);
        let errs = script("// version: 1\neval(\"1\")").unwrap_err();
        assert_eq!(errs[0].code, DiagCode::ScriptSyntax);
    }

    #[test]
    fn documents_become_the_values_rhai_serde_makes() {
        fn same(a: &Dynamic, b: &Dynamic) -> bool {
            if a.type_name() != b.type_name() {
                return false;
            }
            if let (Some(x), Some(y)) = (a.read_lock::<rhai::Map>(), b.read_lock::<rhai::Map>()) {
                return x.len() == y.len() && x.iter().zip(y.iter()).all(|((k, v), (l, w))| k == l && same(v, w));
            }
            if let (Some(x), Some(y)) = (a.read_lock::<rhai::Array>(), b.read_lock::<rhai::Array>()) {
                return x.len() == y.len() && x.iter().zip(y.iter()).all(|(v, w)| same(v, w));
            }
            a.to_string() == b.to_string()
        }
        let amazon = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/amazon/orders/sandbox-us-order.json")).unwrap();
        let docs = [
            doc!({"s": "text", "i": -5, "u": 18446744073709551615u64, "f": 2.5, "b": true, "n": null, "a": [1, {"x": []}], "o": {"k": "v", "e": {}}}),
            Doc::parse_bytes(&amazon).unwrap(),
        ];
        for d in &docs {
            let direct = doc_to_dynamic(d);
            assert!(same(&direct, &rhai::serde::to_dynamic(d).unwrap()), "{direct:?}");
        }
        // And back, unchanged: the script step of a script that returns `input` changes nothing.
        assert_eq!(dynamic_to_doc(&doc_to_dynamic(&docs[1])).unwrap(), docs[1]);
    }

    #[test]
    fn the_time_limit_stops_what_the_operation_limit_lets_run() {
        // A billion operations would take minutes: only the clock can stop this in time.
        let limits = Limits { max_operations: 1_000_000_000, ..Limits::default() };
        let engine = Arc::new(sandboxed_engine(&limits, Arc::new(ScriptTables::new())));
        let text = "// version: 1\nlet n = 0;\nloop { n += 1; }";
        let mut s = Script::compile(&SourceFile::new("spin.rhai", text), engine).unwrap();
        s.max_duration = Duration::from_millis(50);
        let f = s.apply(&doc!({}), &rhai::Map::new(), Document::Input).unwrap_err();
        assert_eq!(f.reason, "script_error");
        assert!(f.errors[0].message.starts_with("script spin failed at line 3"), "{:?}", f.errors);
        assert!(f.errors[0].message.contains("it ran longer than 50ms, its time limit"), "{:?}", f.errors);
        // The deadline ends with the run: nothing evaluated later on this thread inherits it.
        assert_eq!(DEADLINE.with(Cell::get), None);
        let outer = within_time(Duration::from_secs(5), || {
            let _ = s.apply(&doc!({}), &rhai::Map::new(), Document::Input);
            DEADLINE.with(Cell::get)
        });
        assert!(outer.is_some_and(|at| at > Instant::now() + Duration::from_secs(4)), "the outer deadline is back: {outer:?}");
    }

    #[test]
    fn output_nested_deeper_than_a_document_may_be_is_a_script_error() {
        let deep = |levels: usize| run(&format!("// version: 1\nlet a = 1;\nfor i in 0..{levels} {{ a = #{{x: a}}; }}\na"), doc!({}));
        let ok = deep(crate::doc::MAX_DEPTH as usize).unwrap();
        assert_eq!(crate::doc::Doc::parse_bytes(&ok.to_json_bytes()).unwrap(), ok);
        let f = deep(crate::doc::MAX_DEPTH as usize + 1).unwrap_err();
        assert_eq!(f.reason, "script_error");
        assert!(f.errors[0].message.contains("nested more than 128 lists and maps deep"), "{:?}", f.errors);
        let f = run("// version: 1\nlet a = [];\nfor i in 0..300 { a = [a]; }\ninput.x = dec(a);\ninput", doc!({})).unwrap_err();
        assert!(f.errors[0].message.contains("nested more than 128 lists and maps deep"), "{:?}", f.errors);
    }

    #[test]
    fn misspelt_functions_are_load_errors() {
        let errs = script("// version: 1\nfn mine(x) { x }\nlet a = mine(1);\nlet b = is_blnk(input.x);\nlet c = input.items.len();\nlet d = type_of(a);\nis_blank(d);\nprnt(d);\nb").unwrap_err();
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert_eq!(
            (errs[0].span.line, errs[0].message.as_str(), errs[0].hint.as_deref()),
            (4, "unknown function `is_blnk`", Some("did you mean `is_blank`?"))
        );
        // A call standing as a statement is a different node in Rhai's tree.
        assert_eq!((errs[1].span.line, errs[1].message.as_str()), (8, "unknown function `prnt`"));
    }

    #[test]
    fn fail_reasons_are_known_unless_computed() {
        let s = script("// version: 1\nfn check(x) { if x < 0 { fail(\"negative\", \"x\"); } x }\nif input.a == () { fail(\"no_a\", \"/a\", \"a\") }\ncheck(input.a)").unwrap();
        let mut r = crate::map::Reasons::default();
        s.reasons(&mut r);
        assert_eq!((r.names, r.open), (vec!["no_a".to_string(), "negative".to_string()], false));
        let s = script("// version: 1\nlet why = \"x\";\nfail(why, \"computed\")").unwrap();
        let mut r = crate::map::Reasons::default();
        s.reasons(&mut r);
        assert!(r.open);
    }

    #[test]
    fn compile_errors_point_at_the_script_line_and_a_version_is_required() {
        let errs = script("// version: 1\nlet a = 1;\nlet b = ;\n").unwrap_err();
        assert_eq!((errs[0].code, errs[0].span.line), (DiagCode::ScriptSyntax, 3));
        let errs = script("// version: 1\nlet a = inptu;\n").unwrap_err();
        assert!(errs[0].message.contains("inptu"), "{errs:?}");
        let errs = script("let a = 1; a").unwrap_err();
        assert!(errs[0].message.contains("version"));
    }
}
