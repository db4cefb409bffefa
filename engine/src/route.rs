//! The route stage: ordered rules, each a condition (a JSONPath filter expression or a Rhai
//! expression) naming one or more sinks. First match by default, every match on request. A
//! message no rule takes goes to the declared default, or to exceptions as `unrouted`.

use crate::build::{BuildContext, Diags};
use crate::config::{DiagCode, Diagnostic, Spanned};
use crate::doc::Doc;
use crate::jsonpath::Condition;
use crate::map::script::{Limits, ScriptTables, declared_scope, doc_to_dynamic, eval_condition, parse_error_diag, sandboxed_engine};
use crate::message::{ErrorDetail, Failure, reason};
use rhai::{AST, Dynamic, Engine};
use schemars::JsonSchema;
use serde::Deserialize;
use std::fmt;
use std::sync::Arc;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RouteMode {
    /// The first rule that matches decides (default).
    #[default]
    FirstMatch,
    /// Every rule that matches sends a copy.
    AllMatches,
}

/// One sink name, or a list of them.
#[derive(Debug, Clone)]
pub enum SinkRefs {
    One(String),
    Many(Vec<Spanned<String>>),
}

impl<'de> Deserialize<'de> for SinkRefs {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = SinkRefs;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a sink name or a list of sink names")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<SinkRefs, E> {
                Ok(SinkRefs::One(s.to_string()))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, seq: A) -> Result<SinkRefs, A::Error> {
                Vec::deserialize(serde::de::value::SeqAccessDeserializer::new(seq)).map(SinkRefs::Many)
            }
        }
        d.deserialize_any(V)
    }
}

impl JsonSchema for SinkRefs {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "SinkRefs".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "A sink name, or a list of sink names.",
            "anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 1}]
        })
    }
}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RouteRule {
    /// A name for logs and summaries.
    #[serde(default)]
    pub name: Option<String>,
    /// A JSONPath filter expression over the record, e.g. `$.shipping_address.country == 'US'`.
    #[serde(default)]
    pub when: Option<Spanned<String>>,
    /// Or a Rhai expression over `input`, e.g. `dec(input.totals.total.amount) > dec("1000")`.
    #[serde(default)]
    pub when_script: Option<Spanned<String>>,
    /// The sink or sinks that receive matching messages.
    pub to: Spanned<SinkRefs>,
}

#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    #[serde(default)]
    pub mode: RouteMode,
    #[serde(default)]
    pub rules: Vec<RouteRule>,
    /// The sink for messages no rule matches. Without it they go to exceptions as `unrouted`.
    #[serde(default)]
    pub default: Option<Spanned<SinkRefs>>,
}

enum Cond {
    Always,
    Path(Condition),
    Script(Arc<Engine>, Box<AST>),
}

struct Rule {
    name: String,
    cond: Cond,
    sinks: Vec<usize>,
}

/// Compiled routing.
pub struct Router {
    mode: RouteMode,
    rules: Vec<Rule>,
    default: Option<Vec<usize>>,
}

fn resolve_sinks(refs: &Spanned<SinkRefs>, sinks: &[String], cx: &BuildContext, key_path: &str, diags: &mut Diags) -> Vec<usize> {
    let names: Vec<Spanned<String>> = match &refs.value {
        SinkRefs::One(s) => vec![Spanned { span: refs.span, value: s.clone(), written: refs.written.clone() }],
        SinkRefs::Many(v) => v.clone(),
    };
    if names.is_empty() {
        diags.push(cx.diag(DiagCode::InvalidValue, refs.span, key_path, "no sink named").expected("at least one sink name"));
    }
    names
        .iter()
        .filter_map(|n| match sinks.iter().position(|s| *s == n.value) {
            Some(i) => Some(i),
            None => {
                let declared: Vec<&str> = sinks.iter().map(String::as_str).collect();
                diags.push(
                    cx.diag(
                        DiagCode::UndeclaredSink,
                        n.span,
                        key_path,
                        format!("route names sink `{}`, which is not declared under `sinks:`", n.shown()),
                    )
                    .expected(format!("a declared sink: {}", crate::config::diag::one_of(&declared)))
                    .hint_opt(crate::config::diag::suggestion(&n.value, declared.iter().copied())),
                );
                None
            }
        })
        .collect()
}

impl Router {
    pub fn build(config: &RouteConfig, sinks: &[String], cx: &BuildContext) -> Result<Router, Vec<Diagnostic>> {
        let mut diags = Diags::default();
        let mut engine: Option<Arc<Engine>> = None;
        let mut rules = Vec::new();
        for (i, r) in config.rules.iter().enumerate() {
            let kp = format!("route.rules[{i}]");
            let cond = match (&r.when, &r.when_script) {
                (Some(_), Some(s)) => {
                    diags.push(cx.diag(
                        DiagCode::Conflict,
                        s.span,
                        &format!("{kp}.when_script"),
                        "a rule has either `when` or `when_script`, not both",
                    ));
                    continue;
                }
                (Some(w), None) => match diags.take(cx.condition(w, &format!("{kp}.when"))) {
                    Some(c) => Cond::Path(c),
                    None => continue,
                },
                (None, Some(s)) => {
                    let e =
                        engine.get_or_insert_with(|| Arc::new(sandboxed_engine(&Limits::default(), Arc::new(ScriptTables::new())))).clone();
                    match e.compile_expression_with_scope(&declared_scope(), &s.value) {
                        Ok(ast) => {
                            let at = |pos: rhai::Position| cx.span_inside(s.span, pos.position().unwrap_or(1), 1);
                            let unknown = crate::map::script::unknown_functions(&e, &ast, &cx.file, &at, &format!("{kp}.when_script"));
                            if !unknown.is_empty() {
                                unknown.into_iter().for_each(|d| diags.push(d));
                                continue;
                            }
                            Cond::Script(e, Box::new(ast))
                        }
                        Err(err) => {
                            let d = parse_error_diag(&cx.file, &err);
                            let col = err.position().position().unwrap_or(1);
                            diags.push(Diagnostic { span: cx.span_inside(s.span, col, 1), key_path: format!("{kp}.when_script"), ..d });
                            continue;
                        }
                    }
                }
                (None, None) => Cond::Always,
            };
            let sinks = resolve_sinks(&r.to, sinks, cx, &format!("{kp}.to"), &mut diags);
            rules.push(Rule { name: r.name.clone().unwrap_or_else(|| format!("rules[{i}]")), cond, sinks });
        }
        let default = config.default.as_ref().map(|d| resolve_sinks(d, sinks, cx, "route.default", &mut diags));
        diags.finish(Router { mode: config.mode, rules, default })
    }

    /// The sinks (by index) a record goes to; `unrouted` when none.
    pub fn route(&self, record: &Doc, input: &crate::map::StepInput) -> Result<Vec<usize>, Failure> {
        let mut out: Vec<usize> = Vec::new();
        for rule in &self.rules {
            let hit = match &rule.cond {
                Cond::Always => true,
                Cond::Path(c) => c.matches(crate::jsonpath::Scope::root(record)),
                Cond::Script(engine, ast) => {
                    let mut scope = rhai::Scope::new();
                    scope.push("input", doc_to_dynamic(record));
                    scope.push_constant("meta", Dynamic::from_map(input.rhai_meta().clone()));
                    let v = eval_condition(engine, &mut scope, ast).map_err(|e| {
                        Failure::one(reason::SCRIPT_ERROR, ErrorDetail::record("", format!("route rule `{}`: {e}", rule.name)))
                    })?;
                    v.as_bool().map_err(|t| {
                        Failure::one(
                            reason::SCRIPT_ERROR,
                            ErrorDetail::record("", format!("route rule `{}` gave a {t}, not true or false", rule.name)),
                        )
                    })?
                }
            };
            if hit {
                for s in &rule.sinks {
                    if !out.contains(s) {
                        out.push(*s);
                    }
                }
                if self.mode == RouteMode::FirstMatch {
                    return Ok(out);
                }
            }
        }
        if out.is_empty() {
            if let Some(d) = &self.default {
                return Ok(d.clone());
            }
            return Err(Failure::one(
                reason::UNROUTED,
                ErrorDetail::record("", "no route rule matched and the pipeline declares no `route.default`"),
            ));
        }
        Ok(out)
    }
}
