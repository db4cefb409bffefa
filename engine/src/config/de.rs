//! serde deserialization from a [`Node`] tree, reporting every problem with its position.
//!
//! serde stops at the first error, but an analyst wants the whole list. So [`parse_node`] runs the
//! deserializer, records the error, repairs the tree (drops an unknown key, replaces a bad value
//! with [`NodeValue::Poison`], inserts a poison value for a missing key) and runs it again until it
//! succeeds. Errors caused only by an earlier repair are not reported twice.

use super::diag::{DiagCode, Diagnostic, SourceFile, Span, one_of, suggestion};
use super::yaml::{self, Node, NodeValue};
use serde::de::{self, DeserializeOwned, DeserializeSeed, IntoDeserializer, Visitor};
use std::cell::RefCell;
use std::fmt;

/// One step of a path into the tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathPart {
    Key(String),
    Index(usize),
}

/// Renders `sinks.erp_us.path`, `map[2].file`.
pub fn display_path(parts: &[PathPart]) -> String {
    let mut s = String::new();
    for p in parts {
        match p {
            PathPart::Key(k) => s = yaml::join_key(&s, k),
            PathPart::Index(i) => s.push_str(&format!("[{i}]")),
        }
    }
    s
}

#[derive(Debug, Clone, PartialEq)]
enum ErrorKind {
    Custom,
    UnknownField { field: String, expected: &'static [&'static str] },
    UnknownVariant { variant: String, expected: &'static [&'static str] },
    MissingField(&'static str),
    InvalidType { found: String, expected: String },
    InvalidValue,
}

/// A deserialization error, located once it passes through the node it concerns.
#[derive(Debug, Clone)]
pub struct Error {
    kind: ErrorKind,
    message: String,
    path: Option<Vec<PathPart>>,
    span: Option<Span>,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

impl de::Error for Error {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        Error { kind: ErrorKind::Custom, message: msg.to_string(), path: None, span: None }
    }

    fn invalid_type(unexp: de::Unexpected, exp: &dyn de::Expected) -> Self {
        Error {
            kind: ErrorKind::InvalidType { found: unexp.to_string(), expected: exp.to_string() },
            message: format!("wrong type: found {unexp}, expected {exp}"),
            path: None,
            span: None,
        }
    }

    fn invalid_value(unexp: de::Unexpected, exp: &dyn de::Expected) -> Self {
        Error { kind: ErrorKind::InvalidValue, message: format!("invalid value: {unexp}, expected {exp}"), path: None, span: None }
    }

    fn unknown_field(field: &str, expected: &'static [&'static str]) -> Self {
        Error {
            kind: ErrorKind::UnknownField { field: field.to_string(), expected },
            message: format!("unknown key `{field}`"),
            path: None,
            span: None,
        }
    }

    fn unknown_variant(variant: &str, expected: &'static [&'static str]) -> Self {
        Error {
            kind: ErrorKind::UnknownVariant { variant: variant.to_string(), expected },
            message: format!("unknown value `{variant}`"),
            path: None,
            span: None,
        }
    }

    fn missing_field(field: &'static str) -> Self {
        Error { kind: ErrorKind::MissingField(field), message: format!("missing required key `{field}`"), path: None, span: None }
    }
}

impl Error {
    /// Shows `${VAR}` as written instead of its value, which may be a secret.
    fn redact(mut self, node: &Node) -> Self {
        if let NodeValue::Scalar(yaml::Scalar { text, written: Some(written), .. }) = &node.value
            && !text.is_empty()
        {
            self.message = self.message.replace(text.as_str(), written);
            match &mut self.kind {
                ErrorKind::UnknownVariant { variant, .. } | ErrorKind::UnknownField { field: variant, .. } => {
                    *variant = variant.replace(text.as_str(), written)
                }
                ErrorKind::InvalidType { found, .. } => *found = found.replace(text.as_str(), written),
                _ => {}
            }
        }
        self
    }

    fn at(mut self, path: &Path<'_>, span: Span) -> Self {
        if self.path.is_none() {
            self.path = Some(path.to_vec());
            self.span = Some(span);
        }
        self
    }

    /// Turns the error into a diagnostic for `file`; `prefix` is where the parsed node sits.
    fn into_diagnostic(self, file: &SourceFile, prefix: &[PathPart]) -> Diagnostic {
        let mut full = prefix.to_vec();
        full.extend(self.path.clone().unwrap_or_default());
        let key_path = display_path(&full);
        let span = self.span.unwrap_or_default();
        match self.kind {
            ErrorKind::UnknownField { field, expected } => {
                let d = Diagnostic::new(DiagCode::UnknownKey, file, span, key_path, format!("unknown key `{field}`"));
                let d = if expected.is_empty() { d.expected("no keys here") } else { d.expected(one_of(expected)) };
                d.hint_opt(suggestion(&field, expected.iter().copied()))
            }
            ErrorKind::UnknownVariant { variant, expected } => {
                Diagnostic::new(DiagCode::InvalidValue, file, span, key_path, format!("unknown value `{variant}`"))
                    .expected(one_of(expected))
                    .hint_opt(suggestion(&variant, expected.iter().copied()))
            }
            ErrorKind::MissingField(f) => {
                let at = if full.is_empty() { "the file".to_string() } else { format!("`{}`", display_path(&full)) };
                let mut with_key = full.clone();
                with_key.push(PathPart::Key(f.to_string()));
                Diagnostic::new(DiagCode::MissingKey, file, span, display_path(&with_key), format!("missing required key `{f}` in {at}"))
                    .hint(format!("add `{f}:`"))
            }
            ErrorKind::InvalidType { found, expected } => {
                Diagnostic::new(DiagCode::WrongType, file, span, key_path, format!("wrong type: found {found}")).expected(expected)
            }
            ErrorKind::InvalidValue | ErrorKind::Custom => Diagnostic::new(DiagCode::InvalidValue, file, span, key_path, self.message),
        }
    }
}

/// A path from the root of the parsed node, as a linked list on the stack: free unless an error
/// needs it.
#[derive(Clone, Copy)]
enum Path<'a> {
    Root,
    Key(&'a Path<'a>, &'a str),
    Index(&'a Path<'a>, usize),
}

impl Path<'_> {
    fn to_vec(self) -> Vec<PathPart> {
        let mut out = Vec::new();
        let mut cur = self;
        loop {
            match cur {
                Path::Root => break,
                Path::Key(p, k) => {
                    out.push(PathPart::Key(k.to_string()));
                    cur = *p;
                }
                Path::Index(p, i) => {
                    out.push(PathPart::Index(i));
                    cur = *p;
                }
            }
        }
        out.reverse();
        out
    }
}

/// Marker struct name: [`Spanned`] asks the deserializer for the value's position.
const SPANNED: &str = "$__switchyard_spanned";
const SPANNED_FIELDS: &[&str] = &["$line", "$column", "$offset", "$len", "$written", "$value"];
/// Marker newtype name: [`RawNode`] captures the node itself for a second parse phase.
const RAW_NODE: &str = "$__switchyard_raw_node";

thread_local! {
    static CAPTURED: RefCell<Option<(Node, Vec<PathPart>)>> = const { RefCell::new(None) };
}

struct NodeDe<'a> {
    node: &'a Node,
    path: Path<'a>,
}

impl<'a> NodeDe<'a> {
    fn scalar(&self) -> Option<&'a yaml::Scalar> {
        match &self.node.value {
            NodeValue::Scalar(s) => Some(s),
            _ => None,
        }
    }

    fn shown(&self) -> String {
        self.node.describe()
    }

    fn wrong(&self, expected: &str) -> Error {
        Error {
            kind: ErrorKind::InvalidType { found: self.shown(), expected: expected.to_string() },
            message: format!("wrong type: found {}, expected {expected}", self.shown()),
            path: None,
            span: None,
        }
        .at(&self.path, self.node.span)
    }

    fn is_poison(&self) -> bool {
        matches!(self.node.value, NodeValue::Poison)
    }

    fn int(&self, expected: &str) -> Result<i128, Error> {
        match self.scalar() {
            Some(s) if s.plain => yaml::parse_int(&s.text).ok_or_else(|| self.wrong(expected)),
            _ if self.is_poison() => Ok(0),
            _ => Err(self.wrong(expected)),
        }
    }
}

macro_rules! int_method {
    ($method:ident, $visit:ident, $ty:ty, $name:expr) => {
        fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
            let v = self.int($name)?;
            let v = <$ty>::try_from(v)
                .map_err(|_| <Error as de::Error>::custom(format!("{} is out of range for {}", v, $name)).at(&self.path, self.node.span))?;
            visitor.$visit(v).map_err(|e: Error| e.at(&self.path, self.node.span))
        }
    };
}

impl<'de, 'a> de::Deserializer<'de> for NodeDe<'a> {
    type Error = Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        let (path, span) = (self.path, self.node.span);
        let r = match &self.node.value {
            NodeValue::Poison => visitor.visit_unit(),
            NodeValue::Seq(_) => return self.deserialize_seq(visitor),
            NodeValue::Map(_) => return self.deserialize_map(visitor),
            NodeValue::Scalar(s) if !s.plain => visitor.visit_str(&s.text),
            NodeValue::Scalar(s) => {
                if yaml::is_null_text(&s.text) {
                    visitor.visit_unit()
                } else if let Some(b) = yaml::parse_bool(&s.text) {
                    visitor.visit_bool(b)
                } else if let Some(i) = yaml::parse_int(&s.text) {
                    match i64::try_from(i) {
                        Ok(i) => visitor.visit_i64(i),
                        Err(_) => visitor.visit_str(&s.text),
                    }
                } else if let Some(f) = yaml::parse_float(&s.text) {
                    visitor.visit_f64(f)
                } else {
                    visitor.visit_str(&s.text)
                }
            }
        };
        r.map_err(|e: Error| e.redact(self.node).at(&path, span))
    }

    fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        let b = match self.scalar() {
            Some(s) if s.plain => yaml::parse_bool(&s.text).ok_or_else(|| self.wrong("`true` or `false`"))?,
            _ if self.is_poison() => false,
            _ => return Err(self.wrong("`true` or `false`")),
        };
        visitor.visit_bool(b).map_err(|e: Error| e.at(&self.path, self.node.span))
    }

    int_method!(deserialize_i8, visit_i8, i8, "an integer");
    int_method!(deserialize_i16, visit_i16, i16, "an integer");
    int_method!(deserialize_i32, visit_i32, i32, "an integer");
    int_method!(deserialize_i64, visit_i64, i64, "an integer");
    int_method!(deserialize_u8, visit_u8, u8, "a whole number from 0 to 255");
    int_method!(deserialize_u16, visit_u16, u16, "a whole number from 0 to 65535");
    int_method!(deserialize_u32, visit_u32, u32, "a whole number (0 or more)");
    int_method!(deserialize_u64, visit_u64, u64, "a whole number (0 or more)");

    fn deserialize_f32<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.deserialize_f64(visitor)
    }

    fn deserialize_f64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        let f = match self.scalar() {
            Some(s) if s.plain => yaml::parse_float(&s.text).ok_or_else(|| self.wrong("a number"))?,
            _ if self.is_poison() => 0.0,
            _ => return Err(self.wrong("a number")),
        };
        visitor.visit_f64(f).map_err(|e: Error| e.at(&self.path, self.node.span))
    }

    fn deserialize_char<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.deserialize_str(visitor)
    }

    /// Any scalar reads as its text, so `version: 1.2` is the string "1.2" as the analyst meant.
    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        let r = match &self.node.value {
            NodeValue::Scalar(s) if s.plain && yaml::is_null_text(&s.text) => return Err(self.wrong("a string")),
            NodeValue::Scalar(s) => visitor.visit_str(&s.text),
            NodeValue::Poison => visitor.visit_str(""),
            _ => return Err(self.wrong("a string")),
        };
        r.map_err(|e: Error| e.redact(self.node).at(&self.path, self.node.span))
    }

    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.deserialize_str(visitor)
    }

    fn deserialize_bytes<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.deserialize_str(visitor)
    }

    fn deserialize_byte_buf<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.deserialize_str(visitor)
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        if self.node.is_null() || self.is_poison() {
            visitor.visit_none().map_err(|e: Error| e.at(&self.path, self.node.span))
        } else {
            let (path, span) = (self.path, self.node.span);
            visitor.visit_some(self).map_err(|e: Error| e.at(&path, span))
        }
    }

    fn deserialize_unit<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        if self.node.is_null() || self.is_poison() {
            visitor.visit_unit().map_err(|e: Error| e.at(&self.path, self.node.span))
        } else {
            Err(self.wrong("nothing (null)"))
        }
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(self, _name: &'static str, visitor: V) -> Result<V::Value, Error> {
        self.deserialize_unit(visitor)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(self, name: &'static str, visitor: V) -> Result<V::Value, Error> {
        if name == RAW_NODE {
            CAPTURED.with(|c| *c.borrow_mut() = Some((self.node.clone(), self.path.to_vec())));
            return visitor.visit_unit();
        }
        let (path, span) = (self.path, self.node.span);
        visitor.visit_newtype_struct(self).map_err(|e: Error| e.at(&path, span))
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        let r = match &self.node.value {
            NodeValue::Seq(items) => visitor.visit_seq(SeqAccess { items, index: 0, path: &self.path }),
            NodeValue::Poison => visitor.visit_seq(SeqAccess { items: &[], index: 0, path: &self.path }),
            _ => return Err(self.wrong("a list")),
        };
        r.map_err(|e: Error| e.at(&self.path, self.node.span))
    }

    fn deserialize_tuple<V: Visitor<'de>>(self, _len: usize, visitor: V) -> Result<V::Value, Error> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(self, _name: &'static str, _len: usize, visitor: V) -> Result<V::Value, Error> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        let r = match &self.node.value {
            NodeValue::Map(entries) => visitor.visit_map(MapAccess { entries, index: 0, path: &self.path }),
            NodeValue::Poison => visitor.visit_map(MapAccess { entries: &[], index: 0, path: &self.path }),
            _ => return Err(self.wrong("a mapping of `key: value` lines")),
        };
        r.map_err(|e: Error| e.at(&self.path, self.node.span))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        if name == SPANNED {
            let (path, span) = (self.path, self.node.span);
            return visitor.visit_map(SpannedAccess { de: Some(self), field: 0 }).map_err(|e: Error| e.at(&path, span));
        }
        let _ = fields;
        self.deserialize_map(visitor)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        let (path, span) = (self.path, self.node.span);
        let r = match &self.node.value {
            NodeValue::Scalar(s) => visitor.visit_enum(s.text.as_str().into_deserializer()),
            // A poisoned value takes the first variant so that parsing can carry on.
            NodeValue::Poison => match variants.first() {
                Some(v) => visitor.visit_enum((*v).into_deserializer()),
                None => return Err(self.wrong("a value")),
            },
            _ => return Err(self.wrong(&format!("a name ({})", one_of(variants)))),
        };
        r.map_err(|e: Error| e.redact(self.node).at(&path, span))
    }

    fn deserialize_identifier<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.deserialize_str(visitor)
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_unit()
    }
}

struct SeqAccess<'a> {
    items: &'a [Node],
    index: usize,
    path: &'a Path<'a>,
}

impl<'de> de::SeqAccess<'de> for SeqAccess<'_> {
    type Error = Error;

    fn next_element_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<Option<T::Value>, Error> {
        let Some(node) = self.items.get(self.index) else {
            return Ok(None);
        };
        let path = Path::Index(self.path, self.index);
        self.index += 1;
        seed.deserialize(NodeDe { node, path }).map(Some).map_err(|e: Error| e.at(&path, node.span))
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.items.len() - self.index)
    }
}

struct MapAccess<'a> {
    entries: &'a [(Node, Node)],
    index: usize,
    path: &'a Path<'a>,
}

impl<'de> de::MapAccess<'de> for MapAccess<'_> {
    type Error = Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, Error> {
        let Some((key, _)) = self.entries.get(self.index) else {
            return Ok(None);
        };
        let name = key.as_str().unwrap_or("");
        let path = Path::Key(self.path, name);
        seed.deserialize(name.into_deserializer()).map(Some).map_err(|e: Error| e.at(&path, key.span))
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Error> {
        let (key, value) = &self.entries[self.index];
        self.index += 1;
        let path = Path::Key(self.path, key.as_str().unwrap_or(""));
        seed.deserialize(NodeDe { node: value, path }).map_err(|e: Error| e.at(&path, value.span))
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.entries.len() - self.index)
    }
}

struct SpannedAccess<'a> {
    de: Option<NodeDe<'a>>,
    field: usize,
}

impl<'de> de::MapAccess<'de> for SpannedAccess<'_> {
    type Error = Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, Error> {
        match SPANNED_FIELDS.get(self.field) {
            Some(f) => seed.deserialize((*f).into_deserializer()).map(Some),
            None => Ok(None),
        }
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Error> {
        let field = self.field;
        self.field += 1;
        // A poisoned value has no position: diagnostics about it were already given, and
        // `Diags` drops anything at line 0.
        let span = self.de.as_ref().filter(|d| !d.is_poison()).map(|d| d.node.span).unwrap_or_default();
        match field {
            0 => seed.deserialize(span.line.into_deserializer()),
            1 => seed.deserialize(span.column.into_deserializer()),
            2 => seed.deserialize(span.offset.into_deserializer()),
            3 => seed.deserialize(span.len.into_deserializer()),
            4 => {
                let written = match self.de.as_ref().map(|d| &d.node.value) {
                    Some(NodeValue::Scalar(yaml::Scalar { written: Some(w), .. })) => w.as_str(),
                    _ => "",
                };
                seed.deserialize(written.into_deserializer())
            }
            _ => seed.deserialize(self.de.take().expect("value field read once")),
        }
    }
}

/// A value together with where it was written, for errors found after parsing (a file that does
/// not exist, a JSONPath that does not compile).
#[derive(Debug, Clone)]
pub struct Spanned<T> {
    pub span: Span,
    pub value: T,
    /// The text as written when it held a `${VAR}` reference (its value may be a secret).
    pub written: Option<String>,
}

impl<T> Spanned<T> {
    pub fn new(value: T) -> Self {
        Spanned { span: Span::default(), value, written: None }
    }

    pub fn at(value: T, span: Span) -> Self {
        Spanned { span, value, written: None }
    }
}

impl Spanned<String> {
    /// What to show in a message: the text as written, so `${SECRET}` stays `${SECRET}`.
    pub fn shown(&self) -> &str {
        self.written.as_deref().unwrap_or(&self.value)
    }
}

impl<T> std::ops::Deref for Spanned<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.value
    }
}

impl<T: PartialEq> PartialEq for Spanned<T> {
    fn eq(&self, other: &Self) -> bool {
        self.value == other.value
    }
}

impl<'de, T: de::Deserialize<'de>> de::Deserialize<'de> for Spanned<T> {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(std::marker::PhantomData<T>);
        impl<'de, T: de::Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = Spanned<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a value")
            }
            fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<Spanned<T>, A::Error> {
                let mut n = [0usize; 4];
                for slot in &mut n {
                    map.next_key::<de::IgnoredAny>()?;
                    *slot = map.next_value()?;
                }
                map.next_key::<de::IgnoredAny>()?;
                let written: String = map.next_value()?;
                map.next_key::<de::IgnoredAny>()?;
                let value = map.next_value()?;
                Ok(Spanned { span: Span::new(n[0], n[1], n[2], n[3]), value, written: (!written.is_empty()).then_some(written) })
            }
        }
        d.deserialize_struct(SPANNED, SPANNED_FIELDS, V(std::marker::PhantomData))
    }
}

impl<T: schemars::JsonSchema> schemars::JsonSchema for Spanned<T> {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        T::schema_name()
    }
    fn schema_id() -> std::borrow::Cow<'static, str> {
        T::schema_id()
    }
    fn json_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        T::json_schema(generator)
    }
    fn inline_schema() -> bool {
        T::inline_schema()
    }
}

/// A node kept as is for a second parse phase: used for `type:`-tagged components, which serde's
/// internally tagged enums would parse without positions.
#[derive(Debug, Clone)]
pub struct RawNode {
    pub node: Node,
    /// Where the node sits in its file.
    pub path: Vec<PathPart>,
}

impl<'de> de::Deserialize<'de> for RawNode {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ();
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a mapping")
            }
            fn visit_unit<E: de::Error>(self) -> Result<(), E> {
                Ok(())
            }
        }
        d.deserialize_newtype_struct(RAW_NODE, V)?;
        CAPTURED
            .with(|c| c.borrow_mut().take())
            .map(|(node, path)| RawNode { node, path })
            .ok_or_else(|| de::Error::custom("this value can only be read from a YAML file"))
    }
}

fn locate<'n>(node: &'n mut Node, path: &[PathPart]) -> Option<&'n mut Node> {
    let mut cur = node;
    for p in path {
        cur = match (&mut cur.value, p) {
            (NodeValue::Map(entries), PathPart::Key(k)) => entries.iter_mut().find(|(key, _)| key.as_str() == Some(k)).map(|(_, v)| v)?,
            (NodeValue::Seq(items), PathPart::Index(i)) => items.get_mut(*i)?,
            _ => return None,
        };
    }
    Some(cur)
}

fn within(path: &[PathPart], region: &[PathPart]) -> bool {
    path.len() >= region.len() && path[..region.len()] == *region
}

/// Deserializes `T` from `node`, collecting every problem. `prefix` is the node's own path in its
/// file (for key paths in messages).
pub fn parse_node<T: DeserializeOwned>(node: &Node, file: &SourceFile, prefix: &[PathPart]) -> Result<T, Vec<Diagnostic>> {
    match parse_node_lenient(node, file, prefix) {
        (Some(v), diags) if diags.is_empty() => Ok(v),
        (_, diags) => Err(diags),
    }
}

/// Like [`parse_node`], but also returns the value built from the repaired tree, so that later
/// checks can still run on the parts that were fine. Repaired values carry no position.
pub fn parse_node_lenient<T: DeserializeOwned>(node: &Node, file: &SourceFile, prefix: &[PathPart]) -> (Option<T>, Vec<Diagnostic>) {
    match repair_loop(node, file, prefix) {
        Ok((v, d)) => (Some(v), d),
        Err(d) => (None, d),
    }
}

fn repair_loop<T: DeserializeOwned>(node: &Node, file: &SourceFile, prefix: &[PathPart]) -> Result<(T, Vec<Diagnostic>), Vec<Diagnostic>> {
    let mut tree = node.clone();
    let mut diags = Vec::new();
    let mut poisoned: Vec<Vec<PathPart>> = Vec::new();
    // (map, key) for misspelt keys: the "missing key" that follows is the same mistake.
    let mut misspelt: Vec<(Vec<PathPart>, &'static str)> = Vec::new();
    if matches!(node.value, NodeValue::Poison) {
        poisoned.push(Vec::new());
    }
    for _ in 0..256 {
        let err = match T::deserialize(NodeDe { node: &tree, path: Path::Root }) {
            Ok(v) => return Ok((v, diags)),
            Err(e) => e,
        };
        let Some(path) = err.path.clone() else {
            diags.push(err.into_diagnostic(file, prefix));
            return Err(diags);
        };
        let is_consequence = poisoned.iter().any(|p| within(&path, p))
            || matches!(&err.kind, ErrorKind::MissingField(f) if misspelt.iter().any(|(m, k)| *m == path && k == f));
        let repaired = match &err.kind {
            ErrorKind::UnknownField { field, expected } => {
                let (key, parent) = path.split_last().expect("unknown key has a path");
                if let Some(near) = super::diag::did_you_mean(field, expected.iter().copied()) {
                    misspelt.push((parent.to_vec(), near));
                }
                match (locate(&mut tree, parent), key) {
                    (Some(Node { value: NodeValue::Map(entries), .. }), PathPart::Key(k)) => {
                        entries.retain(|(key, _)| key.as_str() != Some(k));
                        true
                    }
                    _ => false,
                }
            }
            ErrorKind::MissingField(f) => match locate(&mut tree, &path) {
                Some(n) => {
                    let span = n.span;
                    let key = Node { span, value: NodeValue::Scalar(yaml::Scalar { text: f.to_string(), plain: true, written: None }) };
                    if let NodeValue::Poison = n.value {
                        n.value = NodeValue::Map(Vec::new());
                    }
                    match &mut n.value {
                        NodeValue::Map(entries) if !entries.iter().any(|(k, _)| k.as_str() == Some(f)) => {
                            entries.push((key, Node::poison(span)));
                            let mut p = path.clone();
                            p.push(PathPart::Key(f.to_string()));
                            poisoned.push(p);
                            true
                        }
                        _ => false,
                    }
                }
                None => false,
            },
            _ => match locate(&mut tree, &path) {
                Some(n) if !matches!(n.value, NodeValue::Poison) => {
                    n.value = NodeValue::Poison;
                    poisoned.push(path.clone());
                    true
                }
                _ => false,
            },
        };
        if !is_consequence {
            diags.push(err.into_diagnostic(file, prefix));
        }
        if !repaired {
            if diags.is_empty() {
                diags.push(Diagnostic::new(DiagCode::InvalidValue, file, node.span, display_path(prefix), "this value could not be read"));
            }
            return Err(diags);
        }
    }
    Err(diags)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use std::collections::HashMap;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Sink {
        path: String,
        #[serde(default)]
        batch: Option<u32>,
        format: Option<Format>,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(rename_all = "snake_case")]
    enum Format {
        Json,
        Ndjson,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Doc {
        name: String,
        version: String,
        sinks: indexmap::IndexMap<String, Sink>,
        source: RawNode,
        when: Option<Spanned<String>>,
    }

    fn parse(text: &str) -> Result<Doc, Vec<Diagnostic>> {
        let file = SourceFile::new("p.yaml", text);
        let node = yaml::parse(&file, &HashMap::new())?;
        parse_node(&node, &file, &[])
    }

    #[test]
    fn parses_a_valid_document() {
        let d = parse("name: x\nversion: 1.0\nsource: {type: file}\nsinks:\n  out: {path: a.ndjson, format: ndjson}\nwhen: $.a\n").unwrap();
        assert_eq!((d.name.as_str(), d.version.as_str()), ("x", "1.0"));
        assert_eq!(d.sinks["out"].format, Some(Format::Ndjson));
        assert_eq!(d.source.node.get("type").unwrap().as_str(), Some("file"));
        assert_eq!(d.source.path, vec![PathPart::Key("source".into())]);
        let w = d.when.unwrap();
        assert_eq!((w.span.line, w.span.column, w.value.as_str()), (6, 7, "$.a"));
    }

    #[test]
    fn reports_all_problems_at_once_with_positions() {
        let text =
            "name: x\nversoin: 1\nsource: {type: file}\nsinks:\n  out:\n    path: [1]\n    batch: many\n    format: jsn\n  err: {}\n";
        let errs = parse(text).unwrap_err();
        let summary: Vec<(DiagCode, String, usize)> = errs.iter().map(|d| (d.code, d.key_path.clone(), d.span.line)).collect();
        assert!(summary.contains(&(DiagCode::UnknownKey, "versoin".into(), 2)), "{summary:?}");
        assert!(summary.contains(&(DiagCode::WrongType, "sinks.out.path".into(), 6)), "{summary:?}");
        assert!(summary.contains(&(DiagCode::WrongType, "sinks.out.batch".into(), 7)), "{summary:?}");
        assert!(summary.contains(&(DiagCode::InvalidValue, "sinks.out.format".into(), 8)), "{summary:?}");
        assert!(summary.contains(&(DiagCode::MissingKey, "sinks.err.path".into(), 9)), "{summary:?}");
        // The missing `version` is the misspelt `versoin`: one mistake, reported once.
        assert!(!summary.iter().any(|(c, p, _)| *c == DiagCode::MissingKey && p == "version"), "{summary:?}");
        let unknown = errs.iter().find(|d| d.code == DiagCode::UnknownKey).unwrap();
        assert_eq!(unknown.hint.as_deref(), Some("did you mean `version`?"));
        let fmt = errs.iter().find(|d| d.key_path == "sinks.out.format").unwrap();
        assert_eq!(fmt.hint.as_deref(), Some("did you mean `json`?"));
        assert_eq!(errs.len(), 5, "{summary:?}");
    }

    #[test]
    fn wrong_type_names_what_was_found_and_expected() {
        let errs = parse("name: [a]\nversion: '1'\nsource: {}\nsinks: {}\n").unwrap_err();
        assert_eq!(errs.len(), 1);
        assert_eq!(errs[0].message, "wrong type: found a list");
        assert_eq!(errs[0].expected.as_deref(), Some("a string"));
        assert_eq!((errs[0].span.line, errs[0].span.column), (1, 7));
    }
}
