//! The map stage: an ordered list of steps that turn the input into the output record.
//! Kinds (see `registry.rs`): `fields` (declarative field map), `script` (Rhai), `lookup` (table),
//! `validate` (JSON Schema check of the record so far), `reconcile` (order totals to the cent).

pub mod fields;
pub mod lookup;
pub mod reconcile;
pub mod script;

use crate::build::{BuildContext, Diags};
use crate::config::{DiagCode, Diagnostic, SourceFile, Spanned, parse_node, yaml};
use crate::doc::Doc;
use crate::jsonpath::{CompiledPath, Scope};
use crate::message::{Document, ErrorDetail, Failure, Metadata, reason};
use crate::template::Vars;
use crate::validate::SchemaCheck;
use fields::{FieldMap, FieldMapFile, FieldSpec};
use indexmap::IndexMap;
use lookup::LookupTable;
use schemars::JsonSchema;
use serde::Deserialize;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// What a step sees besides the record: the envelope, and which document its pointers refer to.
pub struct StepInput<'a> {
    pub meta: &'a Metadata,
    pub document: Document,
    rhai_meta: OnceLock<rhai::Map>,
}

impl<'a> StepInput<'a> {
    pub fn new(meta: &'a Metadata, document: Document) -> Self {
        StepInput { meta, document, rhai_meta: OnceLock::new() }
    }

    pub fn rhai_meta(&self) -> &rhai::Map {
        self.rhai_meta.get_or_init(|| {
            let m = self.meta;
            let mut map = rhai::Map::new();
            for (k, v) in [
                ("message_id", Some(m.message_id.as_str())),
                ("correlation_id", Some(m.correlation_id.as_str())),
                ("channel", m.channel.as_deref()),
                ("idempotency_key", m.idempotency_key.as_deref()),
                ("pipeline", Some(&*m.pipeline)),
                ("pipeline_version", Some(&*m.pipeline_version)),
            ] {
                map.insert(k.into(), v.map_or(rhai::Dynamic::UNIT, |s| rhai::Dynamic::from(s.to_string())));
            }
            map.insert("attempt".into(), rhai::Dynamic::from(i64::from(m.attempt)));
            let headers: rhai::Map = m.headers.iter().map(|(k, v)| (k.as_str().into(), rhai::Dynamic::from(v.clone()))).collect();
            map.insert("headers".into(), rhai::Dynamic::from_map(headers));
            map
        })
    }
}

impl Vars for StepInput<'_> {
    fn var(&self, name: &str) -> Option<&str> {
        meta_var(self.meta, name)
    }
}

/// Envelope values by template variable name.
pub fn meta_var<'m>(m: &'m Metadata, name: &str) -> Option<&'m str> {
    match name {
        "channel" => m.channel.as_deref(),
        "pipeline" => Some(&m.pipeline),
        "pipeline_version" => Some(&m.pipeline_version),
        "message_id" => Some(&m.message_id),
        "correlation_id" => Some(&m.correlation_id),
        _ => name.strip_prefix("header.").and_then(|h| m.headers.get(h)).map(String::as_str),
    }
}

/// One map step. Contract: takes the record built so far and returns the next one, or a
/// [`Failure`] (bad data is an outcome, not an error); it never half-applies.
pub trait MapStep: Send + Sync {
    fn apply(&self, record: Doc, input: &StepInput) -> Result<Doc, Failure>;
    /// Short description for exception records and logs, e.g. `fields shopify-order`.
    fn label(&self) -> String;
    /// The versioned files this step uses: (name, version).
    fn versions(&self) -> Vec<(String, String)>;
    /// Whether the output is a new document (a field map, a script) rather than the input with
    /// fields added or checked; error pointers after it refer to the record, not the input.
    fn restructures(&self) -> bool {
        false
    }
    /// The exception reasons this step's configuration names (`on_miss:`, `reason:`, a script's
    /// `fail("...")`), so hints for reasons nothing gives can be flagged.
    fn reasons(&self, _out: &mut Reasons) {}
}

/// Exception reasons a pipeline can give.
#[derive(Debug, Default)]
pub struct Reasons {
    pub names: Vec<String>,
    /// A script computes a reason at run time, so the list is not complete.
    pub open: bool,
}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FieldsStepConfig {
    /// A field map file (`kind: FieldMap`), relative to the pipeline file.
    #[serde(default)]
    pub file: Option<Spanned<String>>,
    /// Or the fields inline (versioned with the pipeline).
    #[serde(default)]
    pub fields: Option<IndexMap<String, Spanned<FieldSpec>>>,
}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ScriptStepConfig {
    /// A Rhai script whose first line is `// version: X`.
    pub file: Spanned<String>,
    /// Lookup tables the script reads with `lookup(name, key)`: name -> table file.
    #[serde(default)]
    pub tables: IndexMap<String, Spanned<String>>,
    #[serde(default)]
    pub limits: Option<Spanned<script::Limits>>,
}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LookupStepConfig {
    /// The table file (CSV with a `# version:` first line, or YAML).
    pub table: Spanned<String>,
    /// The objects to enrich, e.g. `$.lines[*]` (default: the record itself).
    #[serde(default)]
    pub for_each: Option<Spanned<String>>,
    /// JSONPath of the key inside each object, e.g. `$.sku`.
    pub key: Spanned<String>,
    /// The field written into each object, e.g. `item_code`.
    pub set: String,
    /// The table column to write (default: the second column).
    #[serde(default)]
    pub column: Option<Spanned<String>>,
    /// Exception reason when a key is not in the table (default `lookup_miss`), e.g. `unknown_sku`.
    #[serde(default)]
    pub on_miss: Option<String>,
}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SchemaStepConfig {
    /// A JSON Schema file, e.g. `../schemas/canonical/order.schema.json`.
    pub schema: Spanned<String>,
}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReconcileStepConfig {
    /// What to reconcile; only `order` (canonical Order) for now.
    #[serde(default)]
    pub model: ReconcileModel,
    /// Largest difference accepted, as a decimal (default "0": exact to the cent).
    #[serde(default)]
    pub tolerance: Option<Spanned<String>>,
    /// Write derived amounts that are missing: line subtotal/total, order totals (default true).
    #[serde(default = "yes")]
    pub fill: bool,
    /// Exception reason when amounts do not add up (default `totals_mismatch`).
    #[serde(default)]
    pub reason: Option<String>,
}

fn yes() -> bool {
    true
}

/// One check of the `assert` step.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AssertRule {
    /// A Rhai expression over `input` that is true when the record is fine, e.g.
    /// `dec(input.EXT_PRICE) == dec(input.QTY) * dec(input.UNIT_PRICE)`.
    pub that: Spanned<String>,
    /// The exception reason when it is false, e.g. `totals_mismatch`.
    pub reason: String,
    /// JSON pointer of the value concerned, e.g. `/EXT_PRICE`.
    #[serde(default)]
    pub pointer: Option<String>,
    /// What is wrong, for the analyst.
    pub message: String,
}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AssertStepConfig {
    /// Every rule is checked; all that fail are reported.
    pub rules: Vec<AssertRule>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ReconcileModel {
    #[default]
    Order,
}

/// A map step, picked by `type:`.
#[derive(Debug, Clone, JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum MapStepConfig {
    /// Declarative field map.
    Fields(FieldsStepConfig),
    /// Rhai script.
    Script(ScriptStepConfig),
    /// Enrich objects from a lookup table.
    Lookup(LookupStepConfig),
    /// Check the record built so far against a JSON Schema.
    Validate(SchemaStepConfig),
    /// Check that a canonical Order's amounts add up.
    Reconcile(ReconcileStepConfig),
    /// Business rules as Rhai expressions that must hold (e.g. a POS line's extended price).
    Assert(AssertStepConfig),
}

impl MapStepConfig {
    pub fn build(&self, cx: &BuildContext, key_path: &str) -> Result<Box<dyn MapStep>, Vec<Diagnostic>> {
        match self {
            MapStepConfig::Fields(c) => build_fields(c, cx, key_path),
            MapStepConfig::Script(c) => build_script(c, cx, key_path),
            MapStepConfig::Lookup(c) => build_lookup(c, cx, key_path),
            MapStepConfig::Validate(c) => {
                let check = build_schema_check(&c.schema, cx, &format!("{key_path}.schema"), Document::Record).map_err(|d| vec![d])?;
                Ok(Box::new(SchemaStep { check, name: c.schema.value.clone() }))
            }
            MapStepConfig::Assert(c) => build_assert(c, cx, key_path),
            MapStepConfig::Reconcile(c) => {
                let tolerance = match &c.tolerance {
                    None => rust_decimal::Decimal::ZERO,
                    Some(t) => crate::convert::parse_decimal(&t.value)
                        .map_err(|e| vec![cx.diag(DiagCode::InvalidValue, t.span, &format!("{key_path}.tolerance"), e)])?,
                };
                let _ = c.model;
                Ok(Box::new(reconcile::Reconcile {
                    tolerance,
                    fill: c.fill,
                    reason: c.reason.clone().unwrap_or_else(|| reason::TOTALS_MISMATCH.into()),
                }))
            }
        }
    }
}

/// Compiles a JSON Schema reference from a pipeline.
pub fn build_schema_check(
    schema: &Spanned<String>,
    cx: &BuildContext,
    key_path: &str,
    document: Document,
) -> Result<SchemaCheck, Diagnostic> {
    let path = cx.existing_file(schema, key_path, "schema")?;
    let store = cx.schema_store(&path);
    let validator = store.validator(&path).map_err(|e| e.to_diagnostic())?;
    Ok(SchemaCheck::new(validator, document))
}

/// Reads and parses an analyst-authored YAML file referenced from `cx.file`.
pub fn read_yaml<T: serde::de::DeserializeOwned>(
    cx: &BuildContext,
    at: &Spanned<String>,
    key_path: &str,
    what: &str,
) -> Result<(T, SourceFile), Vec<Diagnostic>> {
    let path = cx.existing_file(at, key_path, what).map_err(|d| vec![d])?;
    let file = SourceFile::read(&path)
        .map_err(|e| vec![cx.diag(DiagCode::FileNotFound, at.span, key_path, format!("cannot read {what}: {e}"))])?;
    let node = yaml::parse(&file, &*cx.shared.env)?;
    let value = parse_node(&node, &file, &[])?;
    Ok((value, file))
}

struct FieldsStep {
    map: FieldMap,
    inline: bool,
}

impl MapStep for FieldsStep {
    fn apply(&self, record: Doc, input: &StepInput) -> Result<Doc, Failure> {
        self.map.apply(&record, input, input.document)
    }
    fn label(&self) -> String {
        format!("fields {}", self.map.name)
    }
    fn restructures(&self) -> bool {
        true
    }
    fn versions(&self) -> Vec<(String, String)> {
        let own = (!self.inline).then(|| (self.map.name.clone(), self.map.version.clone()));
        own.into_iter().chain(self.map.tables()).collect()
    }
    fn reasons(&self, out: &mut Reasons) {
        out.names.extend(self.map.miss_reasons());
    }
}

fn build_fields(c: &FieldsStepConfig, cx: &BuildContext, key_path: &str) -> Result<Box<dyn MapStep>, Vec<Diagnostic>> {
    match (&c.file, &c.fields) {
        (Some(file), None) => {
            let (f, source): (FieldMapFile, SourceFile) = read_yaml(cx, file, &format!("{key_path}.file"), "field map")?;
            let fcx = cx.for_file(source);
            let map = FieldMap::compile(&f.name, &f.version, &f.fields, "fields", &fcx)?;
            Ok(Box::new(FieldsStep { map, inline: false }))
        }
        (None, Some(fields)) => {
            let map = FieldMap::compile("inline", "", fields, &format!("{key_path}.fields"), cx)?;
            Ok(Box::new(FieldsStep { map, inline: true }))
        }
        (Some(file), Some(_)) => Err(vec![
            cx.diag(DiagCode::Conflict, file.span, key_path, "a `fields` step takes either `file:` or inline `fields:`, not both")
                .hint("use one of them"),
        ]),
        (None, None) => Err(vec![cx.diag(
            DiagCode::MissingKey,
            cx.file.span_at(1, 1, 1),
            key_path,
            "a `fields` step needs `file:` or inline `fields:`",
        )]),
    }
}

struct ScriptStep {
    script: script::Script,
    tables: Vec<(String, String)>,
}

impl MapStep for ScriptStep {
    fn apply(&self, record: Doc, input: &StepInput) -> Result<Doc, Failure> {
        self.script.apply(&record, input.rhai_meta(), input.document)
    }
    fn label(&self) -> String {
        format!("script {}", self.script.name)
    }
    fn restructures(&self) -> bool {
        true
    }
    fn versions(&self) -> Vec<(String, String)> {
        std::iter::once((self.script.name.clone(), self.script.version.clone())).chain(self.tables.iter().cloned()).collect()
    }
    fn reasons(&self, out: &mut Reasons) {
        self.script.reasons(out);
    }
}

fn build_script(c: &ScriptStepConfig, cx: &BuildContext, key_path: &str) -> Result<Box<dyn MapStep>, Vec<Diagnostic>> {
    let mut diags = Diags::default();
    let mut tables = script::ScriptTables::new();
    for (name, path) in &c.tables {
        if let Some(t) = diags.take_all(cx.lookup_table(path, &format!("{key_path}.tables.{name}"))) {
            tables.insert(name.clone(), t);
        }
    }
    let path = cx.existing_file(&c.file, &format!("{key_path}.file"), "script").map_err(|d| vec![d])?;
    let file = SourceFile::read(&path)
        .map_err(|e| vec![cx.diag(DiagCode::FileNotFound, c.file.span, key_path, format!("cannot read script: {e}"))])?;
    let versions = tables.values().map(|t| (t.name.clone(), t.version.clone())).collect();
    let max_duration = check_script_limits(c.limits.as_ref(), cx, key_path, &mut diags);
    let limits = c.limits.as_ref().map(|l| l.value.clone()).unwrap_or_default();
    let engine = Arc::new(script::sandboxed_engine(&limits, Arc::new(tables)));
    let compiled = diags.take_all(script::Script::compile(&file, engine));
    match compiled {
        Some(mut script) if diags.is_empty() => {
            script.max_duration = max_duration;
            Ok(Box::new(ScriptStep { script, tables: versions }))
        }
        _ => Err(diags.0),
    }
}

/// The step's `limits`, checked: each within what the sandbox allows. Returns the time limit.
fn check_script_limits(limits: Option<&Spanned<script::Limits>>, cx: &BuildContext, key_path: &str, diags: &mut Diags) -> Duration {
    let Some(l) = limits else { return script::DEFAULT_MAX_DURATION };
    let key = |k: &str| format!("{key_path}.limits.{k}");
    let mut at_most = |k: &str, value: u64, most: u64| {
        if !(1..=most).contains(&value) {
            diags.push(cx.out_of_range(l.span, &key(k), k, value, 1..=most));
        }
    };
    at_most("max_operations", l.max_operations, script::MOST_OPERATIONS);
    at_most("max_call_depth", l.max_call_depth as u64, script::MOST_CALL_DEPTH as u64);
    let Some(d) = &l.max_duration else { return script::DEFAULT_MAX_DURATION };
    let range = Duration::from_millis(1)..=script::MOST_MAX_DURATION;
    diags
        .take(cx.duration(d, &key("max_duration"), range, "a duration from `1ms` to `10s`, such as `250ms` or `2s`"))
        .unwrap_or(script::DEFAULT_MAX_DURATION)
}

struct LookupStep {
    table: Arc<LookupTable>,
    column: usize,
    for_each: Option<CompiledPath>,
    key: CompiledPath,
    set: String,
    on_miss: String,
}

impl MapStep for LookupStep {
    fn apply(&self, mut record: Doc, input: &StepInput) -> Result<Doc, Failure> {
        let targets: Vec<String> = match &self.for_each {
            Some(p) => p.all_with_pointers(Scope::root(&record)).into_iter().map(|(_, ptr)| ptr).collect(),
            None => vec![String::new()],
        };
        let mut sets = Vec::with_capacity(targets.len());
        let mut errors = Vec::new();
        for ptr in targets {
            let Some(obj) = record.pointer(&ptr) else { continue };
            let scope = Scope { current: obj, root: &record };
            let key_ptr = || {
                format!(
                    "{ptr}{}",
                    self.key.all_with_pointers(scope).first().map(|p| p.1.clone()).unwrap_or_else(|| self.key.nominal_pointer())
                )
            };
            let key = match self.key.first(scope) {
                Some(Doc::String(s)) => s.to_string(),
                Some(Doc::Number(n)) => n.to_string(),
                _ => {
                    errors.push(ErrorDetail {
                        pointer: key_ptr(),
                        message: format!("no `{}` to look up in {}", self.key.text(), self.table.name),
                        document: input.document,
                    });
                    continue;
                }
            };
            match self.table.get(&key, self.column) {
                Some(v) => sets.push((ptr, v.to_string())),
                None => errors.push(ErrorDetail {
                    pointer: key_ptr(),
                    message: format!("\"{key}\" is not in lookup table {} (version {})", self.table.name, self.table.version),
                    document: input.document,
                }),
            }
        }
        if !errors.is_empty() {
            return Err(Failure::new(self.on_miss.clone(), errors));
        }
        for (ptr, v) in sets {
            if let Some(Doc::Object(o)) = record.pointer_mut(&ptr) {
                o.insert(self.set.as_str(), Doc::from(v));
            }
        }
        Ok(record)
    }
    fn label(&self) -> String {
        format!("lookup {}", self.table.name)
    }
    fn versions(&self) -> Vec<(String, String)> {
        vec![(self.table.name.clone(), self.table.version.clone())]
    }
    fn reasons(&self, out: &mut Reasons) {
        out.names.push(self.on_miss.clone());
    }
}

fn build_lookup(c: &LookupStepConfig, cx: &BuildContext, key_path: &str) -> Result<Box<dyn MapStep>, Vec<Diagnostic>> {
    let mut diags = Diags::default();
    let table = diags.take_all(cx.lookup_table(&c.table, &format!("{key_path}.table")));
    let for_each = c.for_each.as_ref().and_then(|p| diags.take(cx.jsonpath(p, &format!("{key_path}.for_each"))));
    let key = diags.take(cx.jsonpath(&c.key, &format!("{key_path}.key")));
    let column = match (&table, &c.column) {
        (Some(t), Some(col)) => match t.column_index(&col.value) {
            Some(i) => Some(i),
            None => {
                let names: Vec<&str> = t.columns.iter().map(String::as_str).collect();
                diags.push(
                    cx.diag(
                        DiagCode::InvalidValue,
                        col.span,
                        &format!("{key_path}.column"),
                        format!("the table has no column `{}`", col.value),
                    )
                    .expected(crate::config::diag::one_of(&names))
                    .hint_opt(crate::config::diag::suggestion(&col.value, names.iter().copied())),
                );
                None
            }
        },
        _ => Some(1),
    };
    let (Some(table), Some(column), Some(key), true) = (table, column, key, diags.is_empty()) else {
        return Err(diags.0);
    };
    Ok(Box::new(LookupStep {
        table,
        column,
        for_each,
        key,
        set: c.set.clone(),
        on_miss: c.on_miss.clone().unwrap_or_else(|| reason::LOOKUP_MISS.into()),
    }))
}

struct SchemaStep {
    check: SchemaCheck,
    name: String,
}

impl MapStep for SchemaStep {
    fn apply(&self, record: Doc, _input: &StepInput) -> Result<Doc, Failure> {
        self.check.check(&record).map(|()| record)
    }
    fn label(&self) -> String {
        format!("validate {}", self.name)
    }
    fn versions(&self) -> Vec<(String, String)> {
        Vec::new()
    }
}

impl MapStep for reconcile::Reconcile {
    fn apply(&self, record: Doc, input: &StepInput) -> Result<Doc, Failure> {
        reconcile::Reconcile::apply(self, record, input.document)
    }
    fn label(&self) -> String {
        "reconcile order".into()
    }
    fn versions(&self) -> Vec<(String, String)> {
        Vec::new()
    }
    fn reasons(&self, out: &mut Reasons) {
        out.names.push(self.reason.clone());
    }
}

struct AssertStep {
    engine: Arc<rhai::Engine>,
    rules: Vec<(rhai::AST, AssertRule)>,
}

impl MapStep for AssertStep {
    fn apply(&self, record: Doc, input: &StepInput) -> Result<Doc, Failure> {
        let dynamic = script::doc_to_dynamic(&record);
        let mut failures: Vec<(String, ErrorDetail)> = Vec::new();
        for (ast, rule) in &self.rules {
            let mut scope = script::declared_scope();
            scope.set_value("input", dynamic.clone());
            let detail =
                |message: String| ErrorDetail { pointer: rule.pointer.clone().unwrap_or_default(), message, document: input.document };
            match script::eval_condition(&self.engine, &mut scope, ast).map(|v| v.as_bool()) {
                Ok(Ok(true)) => {}
                Ok(Ok(false)) => failures.push((rule.reason.clone(), detail(rule.message.clone()))),
                Ok(Err(t)) => {
                    failures.push((reason::SCRIPT_ERROR.into(), detail(format!("`{}` gave a {t}, not true or false", rule.that.value))))
                }
                Err(e) => failures.push((reason::SCRIPT_ERROR.into(), detail(format!("`{}` failed: {e}", rule.that.value)))),
            }
        }
        match failures.first() {
            None => Ok(record),
            Some((r, _)) => Err(Failure::new(r.clone(), failures.into_iter().map(|(_, d)| d).collect())),
        }
    }
    fn label(&self) -> String {
        "assert".into()
    }
    fn versions(&self) -> Vec<(String, String)> {
        Vec::new()
    }
    fn reasons(&self, out: &mut Reasons) {
        out.names.extend(self.rules.iter().map(|(_, r)| r.reason.clone()));
    }
}

fn build_assert(c: &AssertStepConfig, cx: &BuildContext, key_path: &str) -> Result<Box<dyn MapStep>, Vec<Diagnostic>> {
    let engine = Arc::new(script::sandboxed_engine(&script::Limits::default(), Arc::new(script::ScriptTables::new())));
    let mut diags = Diags::default();
    let mut rules = Vec::new();
    for (i, r) in c.rules.iter().enumerate() {
        match engine.compile_expression_with_scope(&script::declared_scope(), &r.that.value) {
            Ok(ast) => {
                let at = |pos: rhai::Position| cx.span_inside(r.that.span, pos.position().unwrap_or(1), 1);
                let unknown = script::unknown_functions(&engine, &ast, &cx.file, &at, &format!("{key_path}.rules[{i}].that"));
                if unknown.is_empty() {
                    rules.push((ast, r.clone()));
                }
                unknown.into_iter().for_each(|d| diags.push(d));
            }
            Err(e) => {
                let d = script::parse_error_diag(&cx.file, &e);
                let col = e.position().position().unwrap_or(1);
                diags.push(Diagnostic { span: cx.span_inside(r.that.span, col, 1), key_path: format!("{key_path}.rules[{i}].that"), ..d });
            }
        }
    }
    diags.finish(())?;
    Ok(Box::new(AssertStep { engine, rules }))
}
