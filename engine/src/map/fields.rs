//! Declarative field maps: each target field takes its value from a JSONPath, a constant, a
//! template or a concatenation, with per-field options (required, default, conversions, value
//! translation, lookups) and `each:` to build lists element by element, nested to any depth.

use super::lookup::LookupTable;
use crate::build::{BuildContext, Diags};
use crate::config::{DiagCode, Diagnostic, Spanned};
use crate::convert::{self, DateOptions, Epoch, Money, Precision, Zone};
use crate::doc::{Doc, Object, Str};
use crate::jsonpath::{CompiledPath, Condition, Scope};
use crate::message::{Document, ErrorDetail, Failure, reason};
use crate::template::{Template, Vars};
use indexmap::IndexMap;
use rust_decimal::Decimal;
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::Value;
use std::fmt;
use std::sync::Arc;

/// The pipeline format's version marker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
pub enum ApiVersion {
    #[serde(rename = "switchyard/v1")]
    V1,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
pub enum FieldMapKind {
    FieldMap,
}

/// A field map file under mappings/: a named, versioned list of target fields.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FieldMapFile {
    #[serde(rename = "apiVersion")]
    pub api_version: ApiVersion,
    pub kind: FieldMapKind,
    /// Name of the mapping, stamped with its version on every output message.
    pub name: String,
    /// Version of the mapping (change it with every change of the mapping).
    pub version: String,
    #[serde(default)]
    pub description: Option<String>,
    /// Target field name -> where its value comes from.
    pub fields: IndexMap<String, Spanned<FieldSpec>>,
}

/// A target field: a JSONPath string (shorthand for `{path: ...}`) or a rule with options.
#[derive(Debug, Clone)]
pub enum FieldSpec {
    Path(String),
    Rule(Box<FieldRule>),
}

impl<'de> Deserialize<'de> for FieldSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = FieldSpec;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSONPath such as `$.id`, or a mapping with `path:`, `const:`, `template:`, `each:` ...")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<FieldSpec, E> {
                Ok(FieldSpec::Path(s.to_string()))
            }
            // An empty value: reported at build time as a field without a source.
            fn visit_unit<E: serde::de::Error>(self) -> Result<FieldSpec, E> {
                Ok(FieldSpec::Rule(Box::default()))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<FieldSpec, A::Error> {
                FieldRule::deserialize(serde::de::value::MapAccessDeserializer::new(map)).map(|r| FieldSpec::Rule(Box::new(r)))
            }
        }
        d.deserialize_any(V)
    }
}

impl JsonSchema for FieldSpec {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "FieldSpec".into()
    }
    fn json_schema(g: &mut schemars::SchemaGenerator) -> schemars::Schema {
        let rule = g.subschema_for::<FieldRule>();
        schemars::json_schema!({
            "description": "Where a target field's value comes from: a JSONPath (shorthand), or a rule with options.",
            "anyOf": [
                {"type": "string", "description": "JSONPath of the value, e.g. `$.customer.email`"},
                rule
            ]
        })
    }
}

/// What a value is converted to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Convert {
    /// Text; numbers keep every digit (ids).
    String,
    /// A whole number, also from text ("2").
    Integer,
    /// A JSON number from text or a number, refused if it would be rounded.
    Number,
    /// A decimal string, exact.
    Decimal,
    /// `true`/`false` from booleans, "true"/"false", "yes"/"no", "1"/"0".
    Boolean,
    /// `{amount: "12.34", currency: "USD"}` from decimal text, numbers, minor units or money objects.
    Money,
    /// RFC 3339 UTC (`2024-01-31T17:00:00Z`) from the date-time formats channels send.
    Datetime,
    /// A calendar date `YYYY-MM-DD`.
    Date,
}

/// How the values of a path that selects several are combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Aggregate {
    First,
    Last,
    /// All values as a list.
    List,
    /// The sum (with `as: money` or `as: decimal`); 0 when nothing is selected.
    Sum,
    /// How many values were selected.
    Count,
    /// The values as text joined with `separator` (default ", ").
    Join,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Case {
    Upper,
    Lower,
}

/// Translates a value through a lookup table; a miss fails the message with `on_miss`.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FieldLookup {
    /// The table file (CSV or YAML), relative to this file.
    pub table: Spanned<String>,
    /// Column holding the value (default: the second column).
    #[serde(default)]
    pub column: Option<Spanned<String>>,
    /// Exception reason when the key is not in the table (default `lookup_miss`), e.g. `unknown_sku`.
    #[serde(default)]
    pub on_miss: Option<String>,
}

/// A target field with options.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FieldRule {
    /// JSONPath of the value. Inside `each`, `$` is the current element and `$root` the message.
    #[serde(default)]
    pub path: Option<Spanned<String>>,
    /// A fixed value.
    #[serde(rename = "const", default)]
    pub constant: Option<Value>,
    /// Text with placeholders: `shopify:{$.id}`, `{channel}:{$.order_number}`.
    #[serde(default)]
    pub template: Option<Spanned<String>>,
    /// JSONPaths (and literal text) joined by `separator`; missing or empty parts are skipped.
    #[serde(default)]
    pub concat: Option<Vec<Spanned<String>>>,
    /// Separator for `concat` (default " ") and `aggregate: join` (default ", ").
    #[serde(default)]
    pub separator: Option<String>,
    /// Alternatives tried in order; the first that yields a value wins (like SQL's CASE/COALESCE).
    #[serde(default)]
    pub first_of: Option<Vec<Spanned<FieldSpec>>>,
    /// Only map this field when the condition holds, e.g. `$.cancelled_at` or `$.qty > 0`.
    #[serde(default)]
    pub when: Option<Spanned<String>>,
    /// Builds one list from several specs, in order: each `each:` adds its elements, any other
    /// spec adds its value (e.g. order lines followed by shipping charges).
    #[serde(default)]
    pub append: Option<Vec<Spanned<FieldSpec>>>,
    /// Builds a list: one element per value this JSONPath selects (e.g. `$.line_items[*]`).
    #[serde(default)]
    pub each: Option<Spanned<String>>,
    /// Builds an object from these fields (per element with `each`, inside the value at `path`).
    #[serde(default)]
    pub fields: Option<IndexMap<String, Spanned<FieldSpec>>>,
    /// Conversion of the value.
    #[serde(rename = "as", default)]
    pub convert: Option<Convert>,
    /// A missing value (absent, null, or empty text) fails the message (`missing_required_field`)
    /// instead of omitting the field.
    #[serde(default)]
    pub required: bool,
    /// Value used when the input has none.
    #[serde(default)]
    pub default: Option<Value>,
    /// Currency for `as: money`: a code (`USD`) or a JSONPath (`$root.currency`). A money object's
    /// own currency wins.
    #[serde(default)]
    pub currency: Option<Spanned<String>>,
    /// With `as: money`: integers are minor units (Square's 1599 = 15.99 USD).
    #[serde(default)]
    pub minor_units: bool,
    /// With `as: money`: `currency` (default) refuses more decimals than the currency has; `keep`.
    #[serde(default)]
    pub precision: Option<Precision>,
    /// With `as: datetime`/`date`: a chrono format such as `%m/%d/%Y %H:%M:%S`.
    #[serde(default)]
    pub format: Option<String>,
    /// With `as: datetime`/`date`: timezone of times without an offset: an IANA name, an offset
    /// like `+02:00`, or a JSONPath to one (e.g. a store's zone set by a lookup step).
    #[serde(default)]
    pub timezone: Option<Spanned<String>>,
    /// With `as: datetime`: unit of numeric timestamps (default: guessed from magnitude).
    #[serde(default)]
    pub epoch: Option<Epoch>,
    /// Required when `path` can select several values.
    #[serde(default)]
    pub aggregate: Option<Aggregate>,
    /// Values that mean "no value" (e.g. "", "0001-01-01").
    #[serde(default)]
    pub null_if: Vec<Value>,
    /// Trim surrounding spaces from text.
    #[serde(default)]
    pub trim: bool,
    /// Splits text into a list of trimmed, non-empty parts, e.g. `split: ","` for `"vip, gift"`.
    #[serde(default)]
    pub split: Option<String>,
    /// With a numeric or money conversion: drop the sign (returns sent as negative quantities).
    #[serde(default)]
    pub absolute: bool,
    #[serde(default)]
    pub case: Option<Case>,
    /// Translates values: `{paid: paid, partially_paid: partially_paid, voided: voided}`.
    #[serde(default)]
    pub values: Option<IndexMap<String, Value>>,
    /// With `values`: the result for values not listed (otherwise they fail as `unmapped_value`).
    #[serde(default)]
    pub otherwise: Option<Value>,
    #[serde(default)]
    pub lookup: Option<FieldLookup>,
}

/// A compiled field map.
#[derive(Debug)]
pub struct FieldMap {
    pub name: String,
    pub version: String,
    fields: Vec<Field>,
}

#[derive(Debug)]
enum Source {
    Path(CompiledPath),
    Const(Doc),
    Template(Template),
    Concat(Vec<ConcatPart>, String),
    FirstOf(Vec<Field>),
    Append(Vec<Field>),
    /// Only `fields`: an object built from the current scope.
    Here,
}

#[derive(Debug)]
enum ConcatPart {
    Path(CompiledPath),
    Text(String),
}

#[derive(Debug)]
enum Shape {
    Scalar,
    Object(Vec<Field>),
    Each(CompiledPath, Option<Vec<Field>>),
}

#[derive(Debug)]
enum Currency {
    Code(String),
    Path(CompiledPath),
}

#[derive(Debug)]
enum TimezoneFrom {
    Fixed,
    Path(CompiledPath),
}

#[derive(Debug)]
struct Lookup {
    table: Arc<LookupTable>,
    column: usize,
    on_miss: String,
}

#[derive(Debug)]
struct Field {
    name: String,
    /// `name` as an output key: cloning it copies nothing.
    key: Str,
    when: Option<Condition>,
    source: Source,
    shape: Shape,
    required: bool,
    default: Option<Doc>,
    null_if: Vec<String>,
    trim: bool,
    split: Option<String>,
    absolute: bool,
    case: Option<Case>,
    values: Option<IndexMap<String, Doc>>,
    otherwise: Option<Doc>,
    lookup: Option<Lookup>,
    convert: Option<Convert>,
    currency: Option<Currency>,
    minor_units: bool,
    precision: Precision,
    dates: DateOptions,
    timezone_from: TimezoneFrom,
    aggregate: Option<Aggregate>,
    separator: Option<String>,
}

fn text_of(v: &Doc) -> Option<std::borrow::Cow<'_, str>> {
    match v {
        Doc::String(s) => Some(s.as_str().into()),
        Doc::Number(n) => Some(n.to_string().into()),
        Doc::Bool(b) => Some(if *b { "true" } else { "false" }.into()),
        _ => None,
    }
}

impl FieldMap {
    /// Compiles fields declared in `cx.file` at `key_path` (e.g. `fields` or `map[0].fields`).
    pub fn compile(
        name: &str,
        version: &str,
        specs: &IndexMap<String, Spanned<FieldSpec>>,
        key_path: &str,
        cx: &BuildContext,
    ) -> Result<FieldMap, Vec<Diagnostic>> {
        let mut diags = Diags::default();
        let fields = compile_fields(specs, key_path, cx, &mut diags);
        diags.finish(FieldMap { name: name.to_string(), version: version.to_string(), fields })
    }

    /// Every field lookup, nested ones included.
    fn lookups(&self) -> Vec<&Lookup> {
        fn walk<'a>(fields: &'a [Field], out: &mut Vec<&'a Lookup>) {
            for f in fields {
                out.extend(&f.lookup);
                match (&f.shape, &f.source) {
                    (Shape::Object(inner) | Shape::Each(_, Some(inner)), _) => walk(inner, out),
                    (_, Source::FirstOf(inner) | Source::Append(inner)) => walk(inner, out),
                    _ => {}
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.fields, &mut out);
        out
    }

    /// The lookup tables the fields use: (name, version).
    pub fn tables(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for l in self.lookups() {
            let entry = (l.table.name.clone(), l.table.version.clone());
            if !out.contains(&entry) {
                out.push(entry);
            }
        }
        out
    }

    /// The `on_miss` reasons of the field lookups.
    pub fn miss_reasons(&self) -> Vec<String> {
        self.lookups().into_iter().map(|l| l.on_miss.clone()).collect()
    }

    /// Builds the output record from `input`. Every failing field is reported, not only the first.
    pub fn apply(&self, input: &Doc, vars: &dyn Vars, document: Document) -> Result<Doc, Failure> {
        let mut errors = Vec::new();
        let mut out = Object::with_capacity(self.fields.len());
        let cx = Eval { vars, document, reason: None };
        let mut cx = cx;
        eval_fields(&self.fields, Scope::root(input), &Ptr::Root, &Target::Root, &mut cx, &mut out, &mut errors);
        if errors.is_empty() {
            Ok(Doc::Object(out))
        } else {
            Err(Failure::new(cx.reason.unwrap_or_else(|| reason::INVALID_VALUE.to_string()), errors))
        }
    }
}

fn compile_fields(specs: &IndexMap<String, Spanned<FieldSpec>>, key_path: &str, cx: &BuildContext, diags: &mut Diags) -> Vec<Field> {
    specs
        .iter()
        .filter_map(|(name, spec)| {
            let kp = format!("{key_path}.{name}");
            match &spec.value {
                FieldSpec::Path(p) => {
                    let at = Spanned { span: spec.span, value: p.clone(), written: spec.written.clone() };
                    let path = diags.take(cx.jsonpath(&at, &kp))?;
                    if !path.is_singular() {
                        diags.push(multi_value_diag(cx, spec.span, &kp));
                        return None;
                    }
                    Some(Field::simple(name.clone(), Source::Path(path)))
                }
                FieldSpec::Rule(rule) => compile_rule(name, rule, spec.span, &kp, cx, diags),
            }
        })
        .collect()
}

fn multi_value_diag(cx: &BuildContext, span: crate::config::Span, kp: &str) -> Diagnostic {
    cx.diag(DiagCode::InvalidValue, span, kp, "this JSONPath can select several values")
        .hint("add `aggregate: first | last | list | sum | count | join`, or use `each:` to build a list")
}

impl Field {
    fn simple(name: String, source: Source) -> Field {
        Field {
            key: Str::from(name.as_str()),
            name,
            when: None,
            source,
            shape: Shape::Scalar,
            required: false,
            default: None,
            null_if: Vec::new(),
            trim: false,
            split: None,
            absolute: false,
            case: None,
            values: None,
            otherwise: None,
            lookup: None,
            convert: None,
            currency: None,
            minor_units: false,
            precision: Precision::Currency,
            dates: DateOptions::default(),
            timezone_from: TimezoneFrom::Fixed,
            aggregate: None,
            separator: None,
        }
    }
}

fn compile_rule(name: &str, r: &FieldRule, span: crate::config::Span, kp: &str, cx: &BuildContext, diags: &mut Diags) -> Option<Field> {
    let before = diags.0.len();
    let sources = [
        r.path.is_some(),
        r.constant.is_some(),
        r.template.is_some(),
        r.concat.is_some(),
        r.each.is_some(),
        r.first_of.is_some(),
        r.append.is_some(),
    ];
    let n_sources = sources.iter().filter(|s| **s).count();
    let is_path_with_fields = r.path.is_some() && r.fields.is_some();
    if n_sources == 0 && r.fields.is_none() {
        diags.push(
            cx.diag(DiagCode::MissingKey, span, kp, format!("field `{name}` has no source"))
                .expected("one of `path`, `const`, `template`, `concat`, `first_of`, `each` or `fields`"),
        );
        return None;
    }
    if n_sources > 1 {
        diags.push(
            cx.diag(DiagCode::Conflict, span, kp, format!("field `{name}` has more than one source"))
                .hint("use exactly one of `path`, `const`, `template`, `concat`, `first_of` or `each`"),
        );
        return None;
    }
    let mut invalid = |cond: bool, key: &str, msg: &str| {
        if cond {
            diags.push(cx.diag(DiagCode::Conflict, span, &format!("{kp}.{key}"), msg.to_string()));
        }
    };
    let conv = r.convert;
    invalid(r.fields.is_some() && conv.is_some(), "as", "`as:` converts a value; a field with `fields:` builds an object");
    invalid(r.currency.is_some() && conv != Some(Convert::Money), "currency", "`currency:` only applies with `as: money`");
    invalid(r.minor_units && conv != Some(Convert::Money), "minor_units", "`minor_units:` only applies with `as: money`");
    invalid(r.precision.is_some() && conv != Some(Convert::Money), "precision", "`precision:` only applies with `as: money`");
    let dates = matches!(conv, Some(Convert::Datetime | Convert::Date));
    invalid(r.format.is_some() && !dates, "format", "`format:` only applies with `as: datetime` or `as: date`");
    invalid(r.timezone.is_some() && !dates, "timezone", "`timezone:` only applies with `as: datetime` or `as: date`");
    invalid(r.epoch.is_some() && !dates, "epoch", "`epoch:` only applies with `as: datetime` or `as: date`");
    invalid(r.otherwise.is_some() && r.values.is_none(), "otherwise", "`otherwise:` only applies with `values:`");
    invalid(
        r.required && r.default.is_some(),
        "default",
        "a field with a `default` is never missing, so `required` has no effect; keep one",
    );
    invalid(
        r.separator.is_some() && r.concat.is_none() && r.aggregate != Some(Aggregate::Join),
        "separator",
        "`separator:` only applies with `concat:` or `aggregate: join`",
    );
    invalid(
        r.aggregate == Some(Aggregate::Sum)
            && !matches!(conv, Some(Convert::Money | Convert::Decimal | Convert::Integer | Convert::Number)),
        "aggregate",
        "`aggregate: sum` needs `as: money`, `decimal`, `integer` or `number`",
    );
    invalid(r.aggregate.is_some() && r.each.is_some(), "aggregate", "`aggregate:` combines the values of `path`; `each:` builds a list");
    invalid(
        r.absolute && !matches!(conv, Some(Convert::Integer | Convert::Number | Convert::Decimal | Convert::Money)),
        "absolute",
        "`absolute:` applies with `as: integer`, `number`, `decimal` or `money`",
    );
    invalid(
        r.split.is_some() && (conv.is_some() || r.values.is_some() || r.lookup.is_some()),
        "split",
        "`split:` makes a list of text parts; it cannot be combined with `as`, `values` or `lookup`",
    );
    invalid(r.append.is_some() && r.fields.is_some(), "fields", "`append:` builds a list from its own specs; put `fields:` inside them");

    let source = if let Some(p) = &r.path {
        let path = diags.take(cx.jsonpath(p, &format!("{kp}.path")))?;
        if !path.is_singular() && r.aggregate.is_none() && !is_path_with_fields {
            diags.push(multi_value_diag(cx, p.span, &format!("{kp}.path")));
        }
        Source::Path(path)
    } else if let Some(c) = &r.constant {
        Source::Const(Doc::from(c))
    } else if let Some(t) = &r.template {
        Source::Template(diags.take(cx.template(t, &format!("{kp}.template")))?)
    } else if let Some(parts) = &r.concat {
        let parts = parts
            .iter()
            .enumerate()
            .filter_map(|(i, p)| {
                if p.value.trim_start().starts_with('$') {
                    diags.take(cx.jsonpath(p, &format!("{kp}.concat[{i}]"))).map(ConcatPart::Path)
                } else {
                    Some(ConcatPart::Text(p.value.clone()))
                }
            })
            .collect();
        Source::Concat(parts, r.separator.clone().unwrap_or_else(|| " ".to_string()))
    } else if let Some(alts) = &r.first_of {
        let mut specs = IndexMap::new();
        for (i, a) in alts.iter().enumerate() {
            specs.insert(format!("{name}[{i}]"), a.clone());
        }
        let compiled = compile_fields(&specs, &format!("{kp}.first_of"), cx, diags);
        if compiled.iter().any(|f| !matches!(f.shape, Shape::Scalar)) {
            diags.push(cx.diag(
                DiagCode::Conflict,
                span,
                &format!("{kp}.first_of"),
                "`first_of` alternatives are single values, not `each` or `fields`",
            ));
        }
        Source::FirstOf(compiled)
    } else if let Some(parts) = &r.append {
        let mut specs = IndexMap::new();
        for (i, a) in parts.iter().enumerate() {
            specs.insert(format!("{name}[{i}]"), a.clone());
        }
        Source::Append(compile_fields(&specs, &format!("{kp}.append"), cx, diags))
    } else {
        Source::Here
    };
    let shape = match (&r.each, &r.fields) {
        (Some(each), fields) => {
            let path = diags.take(cx.jsonpath(each, &format!("{kp}.each")))?;
            let fields = fields.as_ref().map(|f| compile_fields(f, &format!("{kp}.fields"), cx, diags));
            Shape::Each(path, fields)
        }
        (None, Some(fields)) => Shape::Object(compile_fields(fields, &format!("{kp}.fields"), cx, diags)),
        (None, None) => Shape::Scalar,
    };
    let currency = r.currency.as_ref().and_then(|c| {
        if c.value.trim_start().starts_with('$') {
            diags.take(cx.jsonpath(c, &format!("{kp}.currency"))).map(Currency::Path)
        } else {
            match convert::currency_exponent(&c.value.to_ascii_uppercase()) {
                Ok(_) => Some(Currency::Code(c.value.to_ascii_uppercase())),
                Err(e) => {
                    diags.push(
                        cx.diag(DiagCode::InvalidValue, c.span, &format!("{kp}.currency"), e)
                            .hint("give an ISO 4217 code such as USD, or a JSONPath such as `$root.currency`"),
                    );
                    None
                }
            }
        }
    });
    let mut timezone_from = TimezoneFrom::Fixed;
    let timezone = r.timezone.as_ref().and_then(|t| {
        if t.value.trim_start().starts_with('$') {
            timezone_from = TimezoneFrom::Path(diags.take(cx.jsonpath(t, &format!("{kp}.timezone")))?);
            return None;
        }
        match Zone::parse(&t.value) {
            Ok(z) => Some(z),
            Err(e) => {
                diags.push(cx.diag(DiagCode::InvalidValue, t.span, &format!("{kp}.timezone"), e));
                None
            }
        }
    });
    let lookup = r.lookup.as_ref().and_then(|l| {
        let table = diags.take_all(cx.lookup_table(&l.table, &format!("{kp}.lookup.table")))?;
        let column = match &l.column {
            None => 1,
            Some(c) => match table.column_index(&c.value) {
                Some(i) => i,
                None => {
                    let names: Vec<&str> = table.columns.iter().map(String::as_str).collect();
                    diags.push(
                        cx.diag(
                            DiagCode::InvalidValue,
                            c.span,
                            &format!("{kp}.lookup.column"),
                            format!("the table has no column `{}`", c.value),
                        )
                        .expected(crate::config::diag::one_of(&names))
                        .hint_opt(crate::config::diag::suggestion(&c.value, names.iter().copied())),
                    );
                    return None;
                }
            },
        };
        Some(Lookup { table, column, on_miss: l.on_miss.clone().unwrap_or_else(|| reason::LOOKUP_MISS.to_string()) })
    });
    let when = r.when.as_ref().and_then(|w| diags.take(cx.condition(w, &format!("{kp}.when"))));
    if diags.0.len() > before {
        return None;
    }
    Some(Field {
        name: name.to_string(),
        key: Str::new(name),
        when,
        source,
        shape,
        required: r.required,
        default: r.default.as_ref().map(Doc::from),
        null_if: r.null_if.iter().filter_map(|v| text_of(&Doc::from(v)).map(|t| t.into_owned())).collect(),
        trim: r.trim,
        split: r.split.clone(),
        absolute: r.absolute,
        case: r.case,
        values: r.values.as_ref().map(|m| m.iter().map(|(k, v)| (k.clone(), Doc::from(v))).collect()),
        otherwise: r.otherwise.as_ref().map(Doc::from),
        lookup,
        convert: r.convert,
        currency,
        minor_units: r.minor_units,
        precision: r.precision.unwrap_or_default(),
        dates: DateOptions { format: r.format.clone(), timezone, epoch: r.epoch },
        timezone_from,
        aggregate: r.aggregate,
        separator: r.separator.clone(),
    })
}

struct Eval<'a> {
    vars: &'a dyn Vars,
    document: Document,
    /// The reason of the first error: the message's exception reason.
    reason: Option<String>,
}

/// Where the current scope sits in the input, computed only when an error needs a pointer.
enum Ptr<'a> {
    Root,
    Nested { parent: &'a Ptr<'a>, path: &'a CompiledPath, scope: Scope<'a>, index: usize },
}

impl Ptr<'_> {
    fn render(&self) -> String {
        match self {
            Ptr::Root => String::new(),
            Ptr::Nested { parent, path, scope, index } => {
                let base = if path.is_from_root() { String::new() } else { parent.render() };
                let found = path.all_with_pointers(*scope);
                format!("{base}{}", found.get(*index).map(|f| f.1.as_str()).unwrap_or(""))
            }
        }
    }

    /// The pointer of `path` evaluated in this scope (its first match, or where it would be).
    fn of(&self, path: &CompiledPath, scope: Scope<'_>, index: usize) -> String {
        let base = if path.is_from_root() { String::new() } else { self.render() };
        let found = path.all_with_pointers(scope);
        match found.get(index) {
            Some((_, p)) => format!("{base}{p}"),
            None => format!("{base}{}", path.nominal_pointer()),
        }
    }
}

/// The target field being built, for messages: `lines[2].unit_price`.
enum Target<'a> {
    Root,
    Field(&'a Target<'a>, &'a str),
    Index(&'a Target<'a>, usize),
}

impl fmt::Display for Target<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Root => Ok(()),
            Target::Field(Target::Root, n) => write!(f, "{n}"),
            Target::Field(p, n) => write!(f, "{p}.{n}"),
            Target::Index(p, i) => write!(f, "{p}[{i}]"),
        }
    }
}

impl Eval<'_> {
    fn fail(&mut self, errors: &mut Vec<ErrorDetail>, reason: &str, pointer: String, message: String) {
        if self.reason.is_none() {
            self.reason = Some(reason.to_string());
        }
        errors.push(ErrorDetail { pointer, message, document: self.document });
    }
}

fn eval_fields(
    fields: &[Field],
    scope: Scope<'_>,
    ptr: &Ptr<'_>,
    target: &Target<'_>,
    cx: &mut Eval<'_>,
    out: &mut Object,
    errors: &mut Vec<ErrorDetail>,
) {
    for f in fields {
        let t = Target::Field(target, &f.name);
        if let Some(v) = eval_field(f, scope, ptr, &t, cx, errors) {
            out.push_unique(f.key.clone(), v);
        }
    }
}

fn eval_field(
    f: &Field,
    scope: Scope<'_>,
    ptr: &Ptr<'_>,
    target: &Target<'_>,
    cx: &mut Eval<'_>,
    errors: &mut Vec<ErrorDetail>,
) -> Option<Doc> {
    if let Some(w) = &f.when
        && !w.matches(scope)
    {
        return None;
    }
    match &f.shape {
        Shape::Object(fields) => {
            let (inner, inner_ptr) = match &f.source {
                Source::Path(p) => match p.first(scope) {
                    Some(v) => (Scope { current: v, root: scope.root }, Ptr::Nested { parent: ptr, path: p, scope, index: 0 }),
                    None => return missing(f, scope, ptr, target, cx, errors),
                },
                _ => (scope, Ptr::Root),
            };
            let inner_ptr_ref = if matches!(f.source, Source::Path(_)) { &inner_ptr } else { ptr };
            let mut obj = Object::with_capacity(fields.len());
            eval_fields(fields, inner, inner_ptr_ref, target, cx, &mut obj, errors);
            if obj.is_empty() { missing(f, scope, ptr, target, cx, errors) } else { Some(Doc::Object(obj)) }
        }
        Shape::Each(path, fields) => {
            let mut items = Vec::new();
            path.all(scope, &mut items);
            let mut list = Vec::with_capacity(items.len());
            for (i, item) in items.into_iter().enumerate() {
                let item_scope = Scope { current: item, root: scope.root };
                let item_ptr = Ptr::Nested { parent: ptr, path, scope, index: i };
                let t = Target::Index(target, i);
                match fields {
                    Some(fields) => {
                        let mut obj = Object::with_capacity(fields.len());
                        eval_fields(fields, item_scope, &item_ptr, &t, cx, &mut obj, errors);
                        list.push(Doc::Object(obj));
                    }
                    None => {
                        if let Some(v) = finish(f, Some(item), scope, || item_ptr.render(), &t, cx, errors) {
                            list.push(v);
                        }
                    }
                }
            }
            if list.is_empty() { missing(f, scope, ptr, target, cx, errors) } else { Some(Doc::Array(list)) }
        }
        Shape::Scalar => match &f.source {
            Source::Path(p) if !p.is_singular() || f.aggregate.is_some() => aggregate(f, p, scope, ptr, target, cx, errors),
            Source::Path(p) => {
                let v = p.first(scope);
                finish(f, v, scope, || ptr.of(p, scope, 0), target, cx, errors)
            }
            Source::Const(c) => finish(f, Some(c), scope, || ptr.render(), target, cx, errors),
            Source::Template(t) => {
                let s = t.render(scope, cx.vars).map(Doc::from);
                let pointer = || t.first_path().map(|p| ptr.of(p, scope, 0)).unwrap_or_default();
                finish(f, s.as_ref(), scope, pointer, target, cx, errors)
            }
            Source::Concat(parts, sep) => {
                let mut pieces: Vec<std::borrow::Cow<str>> = Vec::with_capacity(parts.len());
                for part in parts {
                    match part {
                        ConcatPart::Text(t) => pieces.push(t.as_str().into()),
                        ConcatPart::Path(p) => {
                            if let Some(t) = p.first(scope).and_then(text_of)
                                && !t.trim().is_empty()
                            {
                                pieces.push(t);
                            }
                        }
                    }
                }
                let has_value = parts.iter().any(|p| matches!(p, ConcatPart::Path(_)))
                    && pieces.len() > parts.iter().filter(|p| matches!(p, ConcatPart::Text(_))).count();
                let v = has_value.then(|| Doc::from(pieces.join(sep)));
                finish(f, v.as_ref(), scope, || ptr.render(), target, cx, errors)
            }
            Source::Append(parts) => {
                let mut list = Vec::new();
                for part in parts {
                    match eval_field(part, scope, ptr, target, cx, errors) {
                        Some(Doc::Array(items)) if matches!(part.shape, Shape::Each(..)) => list.extend(items),
                        Some(v) => list.push(v),
                        None => {}
                    }
                }
                if list.is_empty() { missing(f, scope, ptr, target, cx, errors) } else { Some(Doc::Array(list)) }
            }
            Source::FirstOf(alts) => {
                let chosen = alts.iter().find_map(|a| eval_field(a, scope, ptr, target, cx, errors));
                finish(f, chosen.as_ref(), scope, || ptr.render(), target, cx, errors)
            }
            Source::Here => None,
        },
    }
}

/// A value that is absent: the default, a `missing_required_field` failure, or nothing.
fn missing(
    f: &Field,
    scope: Scope<'_>,
    ptr: &Ptr<'_>,
    target: &Target<'_>,
    cx: &mut Eval<'_>,
    errors: &mut Vec<ErrorDetail>,
) -> Option<Doc> {
    if f.default.is_some() {
        return finish(f, None, scope, || ptr.render(), target, cx, errors);
    }
    if f.required {
        let pointer = match &f.source {
            Source::Path(p) => ptr.of(p, scope, 0),
            _ => ptr.render(),
        };
        cx.fail(errors, reason::MISSING_REQUIRED_FIELD, pointer, format!("required field `{target}` has no value in the input"));
    }
    None
}

/// Applies null_if, default/required, trim, case, values, lookup and the conversion to one value.
fn finish(
    f: &Field,
    raw: Option<&Doc>,
    scope: Scope<'_>,
    pointer: impl Fn() -> String,
    target: &Target<'_>,
    cx: &mut Eval<'_>,
    errors: &mut Vec<ErrorDetail>,
) -> Option<Doc> {
    // Null is no value; for a required field, neither is empty text (channels send `""`).
    let mut raw = raw.filter(|v| !(v.is_null() || f.required && v.as_str().is_some_and(|s| s.trim().is_empty())));
    if let Some(v) = raw
        && !f.null_if.is_empty()
        && text_of(v).is_some_and(|t| f.null_if.iter().any(|n| *n == *t))
    {
        raw = None;
    }
    let raw = match (raw, &f.default) {
        (Some(v), _) => v,
        (None, Some(d)) => d,
        (None, None) => {
            if f.required {
                cx.fail(errors, reason::MISSING_REQUIRED_FIELD, pointer(), format!("required field `{target}` has no value in the input"));
            }
            return None;
        }
    };
    let mut owned: Option<Doc> = None;
    if (f.trim || f.case.is_some())
        && let Doc::String(s) = raw
    {
        let mut s = if f.trim { s.trim().to_string() } else { s.to_string() };
        match f.case {
            Some(Case::Upper) => s = s.to_uppercase(),
            Some(Case::Lower) => s = s.to_lowercase(),
            None => {}
        }
        owned = Some(Doc::from(s));
    }
    if let Some(sep) = &f.split
        && let Doc::String(s) = owned.as_ref().unwrap_or(raw)
    {
        let parts: Vec<Doc> = s.split(sep.as_str()).map(str::trim).filter(|p| !p.is_empty()).map(Doc::from).collect();
        return (!parts.is_empty()).then_some(Doc::Array(parts));
    }
    if let Some(values) = &f.values {
        let key = text_of(owned.as_ref().unwrap_or(raw)).map(|t| t.into_owned()).unwrap_or_default();
        match values.get(&key).or(f.otherwise.as_ref()) {
            Some(mapped) => owned = Some(mapped.clone()),
            None => {
                let known: Vec<&str> = values.keys().map(String::as_str).collect();
                cx.fail(
                    errors,
                    reason::UNMAPPED_VALUE,
                    pointer(),
                    format!("`{target}`: value \"{key}\" is not one of the values the mapping translates ({})", known.join(", ")),
                );
                return None;
            }
        }
    }
    if let Some(l) = &f.lookup {
        let key = text_of(owned.as_ref().unwrap_or(raw)).map(|t| t.into_owned()).unwrap_or_default();
        match l.table.get(&key, l.column) {
            Some(v) => owned = Some(Doc::from(v)),
            None => {
                cx.fail(
                    errors,
                    &l.on_miss,
                    pointer(),
                    format!("`{target}`: \"{key}\" is not in lookup table {} (version {})", l.table.name, l.table.version),
                );
                return None;
            }
        }
    }
    let value = owned.as_ref().unwrap_or(raw);
    let Some(conv) = f.convert else {
        return Some(owned.unwrap_or_else(|| raw.clone()));
    };
    match convert_value(f, conv, value, scope).map(|v| if f.absolute { absolute(v) } else { v }) {
        Ok(v) => Some(v),
        Err(e) => {
            cx.fail(errors, reason::INVALID_VALUE, pointer(), format!("`{target}`: {e}"));
            None
        }
    }
}

/// The value without its sign: numbers, decimal strings and money amounts.
fn absolute(v: Doc) -> Doc {
    match v {
        Doc::Number(n) if n.as_i64().is_some_and(|i| i < 0) => Doc::from(n.as_i64().unwrap_or_default().unsigned_abs()),
        Doc::Number(n) if n.as_f64().is_some_and(|f| f < 0.0) => {
            serde_json::Number::from_f64(-n.as_f64().unwrap_or_default()).map_or(Doc::Number(n), Doc::Number)
        }
        Doc::String(s) => match s.strip_prefix('-') {
            Some(rest) => Doc::from(rest),
            None => Doc::String(s),
        },
        Doc::Object(mut o) => {
            if let Some(Doc::String(a)) = o.get_mut("amount")
                && let Some(rest) = a.strip_prefix('-')
            {
                *a = Str::new(rest);
            }
            Doc::Object(o)
        }
        other => other,
    }
}

fn currency_of<'a>(f: &'a Field, scope: Scope<'a>) -> Option<&'a str> {
    match &f.currency {
        None => None,
        Some(Currency::Code(c)) => Some(c),
        Some(Currency::Path(p)) => p.first(scope).and_then(Doc::as_str),
    }
}

fn convert_value(f: &Field, conv: Convert, v: &Doc, scope: Scope<'_>) -> Result<Doc, String> {
    match conv {
        Convert::String => convert::string_from(v),
        Convert::Integer => convert::integer_from(v),
        Convert::Number => convert::number_from(v),
        Convert::Decimal => convert::decimal_doc(v),
        Convert::Boolean => convert::boolean_from(v),
        Convert::Money => convert::money_doc(v, currency_of(f, scope), f.minor_units, f.precision),
        Convert::Datetime | Convert::Date => {
            let per_message;
            let dates = match &f.timezone_from {
                TimezoneFrom::Fixed => &f.dates,
                TimezoneFrom::Path(p) => {
                    let name = p.first(scope).and_then(Doc::as_str).ok_or_else(|| format!("no timezone at `{}`", p.text()))?;
                    per_message = DateOptions { timezone: Some(Zone::parse(name)?), ..f.dates.clone() };
                    &per_message
                }
            };
            if conv == Convert::Datetime {
                convert::datetime_from(v, dates).map(|t| Doc::from(convert::format_datetime(&t)))
            } else {
                convert::date_from(v, dates).map(Doc::from)
            }
        }
    }
}

fn aggregate(
    f: &Field,
    p: &CompiledPath,
    scope: Scope<'_>,
    ptr: &Ptr<'_>,
    target: &Target<'_>,
    cx: &mut Eval<'_>,
    errors: &mut Vec<ErrorDetail>,
) -> Option<Doc> {
    let mut all = Vec::new();
    p.all(scope, &mut all);
    // Nulls count as absent; each value keeps its index among all selected, for its pointer.
    let found: Vec<(usize, &Doc)> = all.into_iter().enumerate().filter(|(_, v)| !v.is_null()).collect();
    let agg = f.aggregate.unwrap_or(Aggregate::List);
    match agg {
        Aggregate::Count => return Some(Doc::from(found.len())),
        Aggregate::First => {
            let (at, v) = found.first().map(|(i, v)| (*i, Some(*v))).unwrap_or((0, None));
            return finish(f, v, scope, || ptr.of(p, scope, at), target, cx, errors);
        }
        Aggregate::Last => {
            let (at, v) = found.last().map(|(i, v)| (*i, Some(*v))).unwrap_or((0, None));
            return finish(f, v, scope, || ptr.of(p, scope, at), target, cx, errors);
        }
        _ => {}
    }
    let before = errors.len();
    let converted: Vec<Doc> = found
        .iter()
        .enumerate()
        .filter_map(|(n, (at, v))| finish(f, Some(v), scope, || ptr.of(p, scope, *at), &Target::Index(target, n), cx, errors))
        .collect();
    if errors.len() > before {
        return None;
    }
    match agg {
        Aggregate::List => Some(Doc::Array(converted)),
        Aggregate::Join => {
            let sep = f.separator.as_deref().unwrap_or(", ");
            let parts: Vec<String> = converted.iter().filter_map(|v| text_of(v).map(|t| t.into_owned())).collect();
            if parts.is_empty() { missing(f, scope, ptr, target, cx, errors) } else { Some(Doc::from(parts.join(sep))) }
        }
        Aggregate::Sum => sum(f, &converted, scope)
            .map_err(|e| cx.fail(errors, reason::INVALID_VALUE, ptr.of(p, scope, 0), format!("`{target}`: {e}")))
            .ok(),
        Aggregate::Count | Aggregate::First | Aggregate::Last => unreachable!("handled above"),
    }
}

fn sum(f: &Field, values: &[Doc], scope: Scope<'_>) -> Result<Doc, String> {
    match f.convert {
        Some(Convert::Money) => {
            let mut total: Option<Money> = None;
            for v in values {
                let m = Money::from_canonical(v).ok_or("not money")?;
                match &mut total {
                    None => total = Some(m),
                    Some(t) if t.currency == m.currency => {
                        t.amount = t
                            .amount
                            .checked_add(m.amount)
                            .filter(|a| a.abs() <= convert::MAX_AMOUNT)
                            .ok_or("the sum is too large for an amount")?
                    }
                    Some(t) => {
                        return Err(format!(
                            "cannot add {} {} to {} {}: the currencies differ",
                            m.amount, m.currency, t.amount, t.currency
                        ));
                    }
                }
            }
            match total {
                Some(t) => Ok(t.to_doc()),
                None => convert::money_from(&Doc::from(0i64), currency_of(f, scope), false, f.precision).map(|m| m.to_doc()),
            }
        }
        Some(Convert::Decimal) => {
            let mut total = Decimal::ZERO;
            for v in values {
                total = total.checked_add(convert::decimal_from(v)?).ok_or("the sum is too large")?;
            }
            Ok(Doc::String(convert::decimal_str(&total)))
        }
        _ => {
            let mut total = Decimal::ZERO;
            for v in values {
                total = total.checked_add(convert::decimal_from(v)?).ok_or("the sum is too large")?;
            }
            convert::decimal_to_number(total)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::Shared;
    use crate::config::{SourceFile, parse_node, yaml};
    use crate::doc;

    struct V;
    impl Vars for V {
        fn var(&self, n: &str) -> Option<&str> {
            (n == "channel").then_some("shopify")
        }
    }

    fn compile_in(dir: &std::path::Path, yaml_text: &str) -> Result<FieldMap, Vec<Diagnostic>> {
        let shared = Shared::new(Box::new(std::collections::HashMap::<String, String>::new()));
        let file = SourceFile::new(dir.join("m.yaml"), yaml_text);
        let node = yaml::parse(&file, &std::collections::HashMap::<String, String>::new())?;
        let f: FieldMapFile = parse_node(&node, &file, &[])?;
        let cx = BuildContext::new(file, &shared);
        FieldMap::compile(&f.name, &f.version, &f.fields, "fields", &cx)
    }

    fn compile(yaml_text: &str) -> Result<FieldMap, Vec<Diagnostic>> {
        compile_in(std::path::Path::new("."), yaml_text)
    }

    const HEAD: &str = "apiVersion: switchyard/v1\nkind: FieldMap\nname: t\nversion: '1'\nfields:\n";

    #[test]
    fn maps_nested_lists_money_dates_and_templates() {
        let m = compile(&format!(
            "{HEAD}  order_id: {{template: 'shopify:{{$.id}}'}}\n  channel: {{template: '{{channel}}'}}\n  channel_order_id: {{path: $.id, as: string, required: true}}\n  placed_at: {{path: $.created_at, as: datetime}}\n  name:\n    concat: [$.customer.first_name, $.customer.last_name]\n  missing: $.nope\n  status: {{path: $.financial_status, values: {{paid: paid}}, otherwise: unknown}}\n  lines:\n    each: $.line_items[*]\n    fields:\n      sku: $.sku\n      quantity: {{path: $.quantity, as: integer}}\n      unit_price: {{path: $.price, as: money, currency: $root.currency}}\n      tax: {{path: '$.tax_lines[*].price', aggregate: sum, as: money, currency: $root.currency}}\n  tags: {{path: $.tags, null_if: ['']}}\n  total: {{path: $.total_price, as: money, currency: $root.currency}}\n"
        ))
        .unwrap();
        let input = doc!({"id": 820982911946154508u64, "created_at": "2021-12-31T19:00:00-05:00", "currency": "USD", "financial_status": "voided",
            "customer": {"first_name": "Ada", "last_name": null}, "tags": "",
            "line_items": [{"sku": "A", "quantity": "2", "price": "9.5", "tax_lines": [{"price": "0.57"}, {"price": "0.10"}]}, {"sku": "B", "quantity": 1, "price": "1.00", "tax_lines": []}],
            "total_price": "21.67"});
        let out = m.apply(&input, &V, Document::Input).unwrap();
        assert_eq!(
            out,
            doc!({"order_id": "shopify:820982911946154508", "channel": "shopify", "channel_order_id": "820982911946154508", "placed_at": "2022-01-01T00:00:00Z",
                "name": "Ada", "status": "unknown",
                "lines": [{"sku": "A", "quantity": 2, "unit_price": {"amount": "9.50", "currency": "USD"}, "tax": {"amount": "0.67", "currency": "USD"}},
                          {"sku": "B", "quantity": 1, "unit_price": {"amount": "1.00", "currency": "USD"}, "tax": {"amount": "0.00", "currency": "USD"}}],
                "total": {"amount": "21.67", "currency": "USD"}})
        );
    }

    #[test]
    fn first_of_and_when_choose_between_alternatives() {
        let m = compile(&format!(
            "{HEAD}  status:\n    first_of:\n      - {{when: $.cancelled_at, const: cancelled}}\n      - {{when: \"$.fulfillment_status == 'fulfilled'\", const: completed}}\n      - {{const: open}}\n  gift: {{when: '$.gift == true', const: true}}\n"
        ))
        .unwrap();
        let run = |v: Doc| m.apply(&v, &(), Document::Input).unwrap();
        assert_eq!(run(doc!({"cancelled_at": "2021-01-01", "fulfillment_status": "fulfilled"})), doc!({"status": "cancelled"}));
        assert_eq!(
            run(doc!({"cancelled_at": null, "fulfillment_status": "fulfilled", "gift": true})),
            doc!({"status": "completed", "gift": true})
        );
        assert_eq!(run(doc!({})), doc!({"status": "open"}));
    }

    #[test]
    fn append_split_absolute_and_empty_lists() {
        let m = compile(&format!(
            "{HEAD}  lines:\n    append:\n      - each: $.items[*]\n        fields: {{sku: $.sku}}\n      - each: $.ship[*]\n        fields: {{sku: {{const: FREIGHT}}}}\n  tags: {{path: $.tags, split: ','}}\n  qty: {{path: $.qty, as: integer, absolute: true}}\n  refund: {{path: $.refund, as: money, currency: USD, absolute: true}}\n  none: {{each: '$.nothing[*]', fields: {{a: $.a}}}}\n  needed: {{each: '$.nothing[*]', required: true}}\n"
        ))
        .unwrap();
        let f = m
            .apply(
                &doc!({"items": [{"sku": "A"}], "ship": [{}], "tags": " vip, ,gift ", "qty": "-2", "refund": "-1.5"}),
                &(),
                Document::Input,
            )
            .unwrap_err();
        assert_eq!(f.errors.len(), 1);
        assert_eq!(f.errors[0].message, "required field `needed` has no value in the input");
        let m = compile(&format!(
            "{HEAD}  lines:\n    append:\n      - each: $.items[*]\n        fields: {{sku: $.sku}}\n      - each: $.ship[*]\n        fields: {{sku: {{const: FREIGHT}}}}\n  tags: {{path: $.tags, split: ','}}\n  qty: {{path: $.qty, as: integer, absolute: true}}\n  refund: {{path: $.refund, as: money, currency: USD, absolute: true}}\n  none: {{each: '$.nothing[*]', fields: {{a: $.a}}}}\n"
        ))
        .unwrap();
        let out = m
            .apply(
                &doc!({"items": [{"sku": "A"}], "ship": [{}], "tags": " vip, ,gift ", "qty": "-2", "refund": "-1.5"}),
                &(),
                Document::Input,
            )
            .unwrap();
        assert_eq!(
            out,
            doc!({"lines": [{"sku": "A"}, {"sku": "FREIGHT"}], "tags": ["vip", "gift"], "qty": 2, "refund": {"amount": "1.50", "currency": "USD"}})
        );
    }

    #[test]
    fn every_bad_field_is_reported_with_its_input_pointer() {
        let m = compile(&format!("{HEAD}  id: {{path: $.id, required: true}}\n  lines:\n    each: $.items[*]\n    fields:\n      qty: {{path: $.qty, as: integer}}\n      price: {{path: $.price, as: money, currency: USD}}\n")).unwrap();
        let f =
            m.apply(&doc!({"items": [{"qty": 1, "price": "1.00"}, {"qty": "2.5x", "price": "abc"}]}), &(), Document::Input).unwrap_err();
        assert_eq!(f.reason, "missing_required_field");
        let got: Vec<(&str, &str)> = f.errors.iter().map(|e| (e.pointer.as_str(), e.message.as_str())).collect();
        assert_eq!(got[0], ("/id", "required field `id` has no value in the input"));
        assert_eq!(got[1].0, "/items/1/qty");
        assert!(got[1].1.starts_with("`lines[1].qty`: expected a whole number"), "{got:?}");
        assert_eq!(got[2].0, "/items/1/price");
        assert_eq!(f.errors.len(), 3);
    }

    #[test]
    fn empty_text_is_no_value_for_a_required_field() {
        let m = compile(&format!("{HEAD}  sku: {{path: $.sku, required: true}}\n  note: $.note\n")).unwrap();
        let f = m.apply(&doc!({"sku": "  ", "note": ""}), &(), Document::Input).unwrap_err();
        assert_eq!((f.reason.as_str(), f.errors[0].pointer.as_str()), ("missing_required_field", "/sku"));
        assert_eq!(m.apply(&doc!({"sku": "A", "note": ""}), &(), Document::Input).unwrap(), doc!({"sku": "A", "note": ""}));
    }

    #[test]
    fn aggregated_errors_point_at_the_value_after_skipped_nulls() {
        let m = compile(&format!("{HEAD}  total: {{path: '$.items[*].price', aggregate: sum, as: money, currency: USD}}\n")).unwrap();
        let f = m.apply(&doc!({"items": [{"price": null}, {"price": "1.001"}]}), &(), Document::Input).unwrap_err();
        assert_eq!(f.errors[0].pointer, "/items/1/price");
    }

    #[test]
    fn lookups_translate_and_misses_carry_the_configured_reason() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("skus.csv"), "# version: 7\nsku,item\nA,ITM-A\n").unwrap();
        let m = compile_in(dir.path(), &format!("{HEAD}  lines:\n    each: $.l[*]\n    fields:\n      item: {{path: $.sku, lookup: {{table: skus.csv, column: item, on_miss: unknown_sku}}}}\n")).unwrap();
        assert_eq!(m.apply(&doc!({"l": [{"sku": "A"}]}), &(), Document::Input).unwrap(), doc!({"lines": [{"item": "ITM-A"}]}));
        let f = m.apply(&doc!({"l": [{"sku": "A"}, {"sku": "Z"}]}), &(), Document::Input).unwrap_err();
        assert_eq!(f.reason, "unknown_sku");
        assert_eq!(f.errors[0].pointer, "/l/1/sku");
        assert!(f.errors[0].message.contains("\"Z\" is not in lookup table skus (version 7)"));
    }

    #[test]
    fn load_errors_point_into_the_mapping_file() {
        let errs = compile(&format!(
            "{HEAD}  a: $.x[\n  b: {{path: '$.l[*].p'}}\n  c: {{const: 1, path: $.x}}\n  e: {{path: $.x, currency: USD}}\n  f: {{}}\n"
        ))
        .unwrap_err();
        let got: Vec<(DiagCode, usize, &str)> = errs.iter().map(|d| (d.code, d.span.line, d.key_path.as_str())).collect();
        assert!(got.contains(&(DiagCode::JsonPathSyntax, 6, "fields.a")), "{got:?}");
        assert!(got.contains(&(DiagCode::InvalidValue, 7, "fields.b.path")), "{got:?}");
        assert!(got.contains(&(DiagCode::Conflict, 8, "fields.c")), "{got:?}");
        assert!(got.contains(&(DiagCode::Conflict, 9, "fields.e.currency")), "{got:?}");
        assert!(got.contains(&(DiagCode::MissingKey, 10, "fields.f")), "{got:?}");
        assert_eq!(errs.len(), 5, "{got:?}");
        // Structure is checked first, all of it at once.
        let errs = compile(&format!("{HEAD}  d: {{path: $.x, curency: USD}}\n  g: {{path: $.x, as: monye}}\n")).unwrap_err();
        assert_eq!(errs.len(), 2);
        assert_eq!(
            (errs[0].code, errs[0].key_path.as_str(), errs[0].hint.as_deref()),
            (DiagCode::UnknownKey, "fields.d.curency", Some("did you mean `currency`?"))
        );
        assert_eq!(
            (errs[1].code, errs[1].key_path.as_str(), errs[1].hint.as_deref()),
            (DiagCode::InvalidValue, "fields.g.as", Some("did you mean `money`?"))
        );
    }
}
