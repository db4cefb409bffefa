//! Text templates such as `shopify:{$.id}` or `{channel}:{$.order_id}`: literal text with
//! placeholders holding a JSONPath or an envelope variable. `{{` and `}}` write braces.

use crate::doc::Doc;
use crate::jsonpath::{CompiledPath, PathError, Scope};

/// Envelope values a template may name without `$`.
pub const VARIABLES: &[&str] = &["channel", "pipeline", "pipeline_version", "message_id", "correlation_id"];

#[derive(Debug, Clone)]
enum Part {
    Text(String),
    Path(CompiledPath),
    Var(String),
}

/// Variables available while rendering.
pub trait Vars {
    fn var(&self, name: &str) -> Option<&str>;
}

impl Vars for () {
    fn var(&self, _: &str) -> Option<&str> {
        None
    }
}

#[derive(Debug, Clone)]
pub struct Template {
    parts: Vec<Part>,
}

impl Template {
    /// Compiles a template; errors carry the 1-based column in the template text.
    pub fn compile(text: &str) -> Result<Self, PathError> {
        // A bare JSONPath is a template of one placeholder: `$.order.id` means `{$.order.id}`.
        if text.trim_start().starts_with('$') && !text.contains('{') {
            return Ok(Template { parts: vec![Part::Path(CompiledPath::compile(text)?)] });
        }
        let mut parts = Vec::new();
        let mut lit = String::new();
        let mut chars = text.char_indices().peekable();
        while let Some((i, c)) = chars.next() {
            match c {
                '{' if chars.peek().map(|p| p.1) == Some('{') => {
                    chars.next();
                    lit.push('{');
                }
                '}' if chars.peek().map(|p| p.1) == Some('}') => {
                    chars.next();
                    lit.push('}');
                }
                '{' => {
                    let rest = &text[i + 1..];
                    let Some(close) = find_close(rest) else {
                        return Err(PathError {
                            message: "`{` is not closed by `}` (write `{{` for a literal brace)".into(),
                            column: text[..i].chars().count() + 1,
                        });
                    };
                    let inner = rest[..close].trim();
                    if !lit.is_empty() {
                        parts.push(Part::Text(std::mem::take(&mut lit)));
                    }
                    if inner.starts_with('$') {
                        let p = CompiledPath::compile(inner)
                            .map_err(|e| PathError { message: e.message, column: text[..i].chars().count() + 1 + e.column })?;
                        parts.push(Part::Path(p));
                    } else if VARIABLES.contains(&inner) || inner.strip_prefix("header.").is_some_and(|h| !h.is_empty()) {
                        parts.push(Part::Var(inner.to_string()));
                    } else {
                        return Err(PathError {
                            message: format!(
                                "`{{{inner}}}` is neither a JSONPath (starting with `$`), `header.NAME`, nor one of the variables {}",
                                crate::config::diag::one_of(VARIABLES)
                            ),
                            column: text[..i].chars().count() + 2,
                        });
                    }
                    for _ in 0..rest[..=close].chars().count() {
                        chars.next();
                    }
                }
                '}' => {
                    return Err(PathError {
                        message: "unmatched `}` (write `}}` for a literal brace)".into(),
                        column: text[..i].chars().count() + 1,
                    });
                }
                c => lit.push(c),
            }
        }
        if !lit.is_empty() {
            parts.push(Part::Text(lit));
        }
        Ok(Template { parts })
    }

    /// Renders the template; `None` when a placeholder has no value (so `required`/`default` apply).
    pub fn render(&self, scope: Scope<'_>, vars: &dyn Vars) -> Option<String> {
        self.render_with(scope, vars, |value, out| out.push_str(value))
    }

    /// Renders the template, each placeholder's value written by `put` (literal text as is): for
    /// values that need escaping where they land, such as a URL path.
    pub fn render_with(&self, scope: Scope<'_>, vars: &dyn Vars, mut put: impl FnMut(&str, &mut String)) -> Option<String> {
        // Ids and keys ("shopify:5000000000004") fit: no regrowth while they are written.
        let mut out = String::with_capacity(48);
        for p in &self.parts {
            match p {
                Part::Text(t) => out.push_str(t),
                Part::Path(path) => match path.first(scope)? {
                    Doc::String(s) => put(s, &mut out),
                    Doc::Number(n) => crate::convert::with_number_text(n, |text| put(text, &mut out)),
                    Doc::Bool(b) => put(if *b { "true" } else { "false" }, &mut out),
                    other => put(&other.to_string(), &mut out),
                },
                Part::Var(v) => put(vars.var(v)?, &mut out),
            }
        }
        Some(out)
    }

    /// The literal text before the first placeholder (all of it when there is none).
    pub fn literal_prefix(&self) -> &str {
        match self.parts.first() {
            Some(Part::Text(t)) => t,
            _ => "",
        }
    }

    /// Whether the template has placeholders (else it renders to the same text every time).
    pub fn has_placeholders(&self) -> bool {
        self.parts.iter().any(|p| !matches!(p, Part::Text(_)))
    }

    /// The first JSONPath in the template, for pointing at the input when a value is missing.
    pub fn first_path(&self) -> Option<&CompiledPath> {
        self.parts.iter().find_map(|p| match p {
            Part::Path(path) => Some(path),
            _ => None,
        })
    }
}

/// The matching `}` for a placeholder, skipping braces inside quoted JSONPath strings.
fn find_close(s: &str) -> Option<usize> {
    let mut quote = None;
    for (i, c) in s.char_indices() {
        match (quote, c) {
            (None, '\'' | '"') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (None, '}') => return Some(i),
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doc;

    struct V;
    impl Vars for V {
        fn var(&self, n: &str) -> Option<&str> {
            (n == "channel").then_some("shopify")
        }
    }

    #[test]
    fn renders_paths_variables_and_braces() {
        let d = doc!({"id": 820982911946154508u64, "name": "#1001", "x": {"k": "a}b"}});
        let t = Template::compile("{channel}:{$.id} {{{$.name}}} {$['x'].k}").unwrap();
        assert_eq!(t.render(Scope::root(&d), &V).unwrap(), "shopify:820982911946154508 {#1001} a}b");
        assert_eq!(Template::compile("{$.missing}-x").unwrap().render(Scope::root(&d), &V), None);
        assert_eq!(Template::compile("$.x.k").unwrap().render(Scope::root(&d), &V).unwrap(), "a}b");
        // Every kind of number is written as JSON writes it, and long texts still fit.
        let d = doc!({"max": u64::MAX, "neg": -42, "min": i64::MIN, "f": 12.5, "t": true, "long": "x".repeat(100)});
        let t = Template::compile("{$.max}/{$.neg}/{$.min}/{$.f}/{$.t}/{$.long}").unwrap();
        assert_eq!(
            t.render(Scope::root(&d), &V).unwrap(),
            format!("18446744073709551615/-42/-9223372036854775808/12.5/true/{}", "x".repeat(100))
        );
    }

    #[test]
    fn reports_bad_placeholders_with_columns() {
        let e = Template::compile("order-{id}").unwrap_err();
        assert_eq!(e.column, 8);
        assert!(e.message.contains("variables"));
        assert!(Template::compile("a{$.x").is_err());
        assert!(Template::compile("a}b").is_err());
        let e = Template::compile("x{$.a[}").unwrap_err();
        assert!(e.column > 3, "{e:?}");
    }
}
