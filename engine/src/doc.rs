//! The JSON document every stage works on.
//!
//! A generic tree (`serde_json::Value`) spent most of a message's time allocating: one allocation
//! per key and per string, then copying them again into the output. `Doc` keeps the bytes it was
//! parsed from and points into them: unescaped strings and keys are slices of the input, short new
//! strings are stored inline, and objects are small vectors in insertion order (so outputs keep the
//! order the mapping wrote). A parsed message costs one allocation per object and array.

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde::ser::{Serialize, SerializeMap, SerializeSeq, Serializer};
pub use serde_json::Number;
use std::fmt;
use std::sync::Arc;

/// The largest message parsed (string slices store 32-bit offsets).
pub const MAX_MESSAGE: usize = 512 << 20;

/// Strings up to this length are stored inline (compact_str): no allocation.
const INLINE: usize = 24;

/// An immutable string: a slice of a parsed message, a short inline string, or a shared one.
/// Cloning never copies a long text.
#[derive(Clone)]
pub struct Str(Repr);

/// `verbatim`: the text needs no escaping in JSON, so writing it is a copy.
#[derive(Clone)]
enum Repr {
    Inline { text: compact_str::CompactString, verbatim: bool },
    Slice { source: Arc<str>, start: u32, len: u32 },
    Shared { text: Arc<str>, verbatim: bool },
    Static { text: &'static str, verbatim: bool },
}

/// Whether a string can be written between quotes as it is (no `"`, `\` or control character).
const fn json_verbatim(s: &str) -> bool {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] < 0x20 || b[i] == b'"' || b[i] == b'\\' {
            return false;
        }
        i += 1;
    }
    true
}

impl Str {
    pub fn new(s: &str) -> Str {
        let verbatim = json_verbatim(s);
        if s.len() <= INLINE {
            Str(Repr::Inline { text: compact_str::CompactString::new(s), verbatim })
        } else {
            Str(Repr::Shared { text: Arc::from(s), verbatim })
        }
    }

    pub const fn from_static(s: &'static str) -> Str {
        Str(Repr::Static { text: s, verbatim: json_verbatim(s) })
    }

    /// Length in bytes, without building the `&str`.
    #[inline]
    pub fn len(&self) -> usize {
        match &self.0 {
            Repr::Inline { text, .. } => text.len(),
            Repr::Slice { len, .. } => *len as usize,
            Repr::Shared { text, .. } => text.len(),
            Repr::Static { text, .. } => text.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The text's bytes when they need no escaping in JSON, in one look at the representation.
    /// Slices of parsed JSON never need it: the parser hands over only strings written without
    /// escapes as slices.
    #[inline]
    fn verbatim_bytes(&self) -> Option<&[u8]> {
        match &self.0 {
            Repr::Inline { text, verbatim: true } => Some(text.as_bytes()),
            Repr::Slice { source, start, len } => Some(&source.as_bytes()[*start as usize..(*start + *len) as usize]),
            Repr::Shared { text, verbatim: true } => Some(text.as_bytes()),
            Repr::Static { text, verbatim: true } => Some(text.as_bytes()),
            _ => None,
        }
    }

    #[inline]
    pub fn as_str(&self) -> &str {
        match &self.0 {
            Repr::Inline { text, .. } => text,
            Repr::Slice { source, start, len } => &source[*start as usize..(*start + *len) as usize],
            Repr::Shared { text, .. } => text,
            Repr::Static { text, .. } => text,
        }
    }
}

impl std::ops::Deref for Str {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<str> for Str {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl PartialEq for Str {
    fn eq(&self, other: &Str) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for Str {}

impl PartialEq<str> for Str {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl fmt::Debug for Str {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for Str {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<&str> for Str {
    fn from(s: &str) -> Str {
        Str::new(s)
    }
}

impl From<String> for Str {
    fn from(s: String) -> Str {
        if s.len() <= INLINE {
            Str::new(&s)
        } else {
            let verbatim = json_verbatim(&s);
            Str(Repr::Shared { text: Arc::from(s), verbatim })
        }
    }
}

/// A JSON object: members in insertion order. Lookups scan, which beats hashing for the small
/// objects messages are made of. Equality ignores the order, as JSON's does.
#[derive(Clone, Default)]
pub struct Object(Vec<(Str, Doc)>);

impl PartialEq for Object {
    fn eq(&self, other: &Object) -> bool {
        self.len() == other.len() && self.iter().all(|(k, v)| other.get(k) == Some(v))
    }
}

impl Object {
    pub fn new() -> Object {
        Object(Vec::new())
    }

    pub fn with_capacity(n: usize) -> Object {
        Object(Vec::with_capacity(n))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    #[inline]
    pub fn get(&self, key: &str) -> Option<&Doc> {
        self.position(key).map(|i| &self.0[i].1)
    }

    /// Where `key` is. Lengths are compared first: cheaper than building both texts.
    #[inline]
    fn position(&self, key: &str) -> Option<usize> {
        self.0.iter().position(|(k, _)| k.len() == key.len() && k.as_str() == key)
    }

    /// [`Self::get`], trying first the position `hint` holds and remembering where the key was
    /// found: messages of one channel share their key order, so a compiled path usually finds its
    /// key at once (the inline cache of JavaScript engines) instead of scanning 50 members.
    #[inline]
    pub fn get_hinted(&self, key: &str, hint: &std::sync::atomic::AtomicU32) -> Option<&Doc> {
        use std::sync::atomic::Ordering::Relaxed;
        if let Some((k, v)) = self.0.get(hint.load(Relaxed) as usize)
            && k.as_str() == key
        {
            return Some(v);
        }
        let i = self.position(key)?;
        hint.store(i as u32, Relaxed);
        Some(&self.0[i].1)
    }

    pub fn get_mut(&mut self, key: &str) -> Option<&mut Doc> {
        self.position(key).map(|i| &mut self.0[i].1)
    }

    pub fn contains_key(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    /// Sets `key`, replacing an existing member in place.
    pub fn insert(&mut self, key: impl Into<Str>, value: Doc) {
        let key = key.into();
        match self.position(key.as_str()) {
            Some(i) => self.0[i].1 = value,
            None => self.0.push((key, value)),
        }
    }

    /// Appends a member whose key the caller knows is not present (compiled field maps).
    pub fn push_unique(&mut self, key: Str, value: Doc) {
        debug_assert!(!self.contains_key(&key), "duplicate key {key}");
        self.0.push((key, value));
    }

    pub fn remove(&mut self, key: &str) -> Option<Doc> {
        let i = self.position(key)?;
        Some(self.0.remove(i).1)
    }

    pub fn iter(&self) -> Members<'_> {
        Members(self.0.iter())
    }

    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(|(k, _)| k.as_str())
    }

    pub fn values(&self) -> impl Iterator<Item = &Doc> {
        self.0.iter().map(|(_, v)| v)
    }

    /// The value of `key`, or a new one made by `make`.
    pub fn entry_or_insert_with(&mut self, key: &str, make: impl FnOnce() -> Doc) -> &mut Doc {
        let i = match self.position(key) {
            Some(i) => i,
            None => {
                self.0.push((Str::new(key), make()));
                self.0.len() - 1
            }
        };
        &mut self.0[i].1
    }
}

/// The members of an object, in order.
pub struct Members<'a>(std::slice::Iter<'a, (Str, Doc)>);

impl<'a> Iterator for Members<'a> {
    type Item = (&'a str, &'a Doc);
    fn next(&mut self) -> Option<Self::Item> {
        self.0.next().map(|(k, v)| (k.as_str(), v))
    }
    fn size_hint(&self) -> (usize, Option<usize>) {
        self.0.size_hint()
    }
}

impl fmt::Debug for Object {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.0.iter().map(|(k, v)| (k.as_str(), v))).finish()
    }
}

impl FromIterator<(Str, Doc)> for Object {
    fn from_iter<I: IntoIterator<Item = (Str, Doc)>>(iter: I) -> Object {
        let mut o = Object::new();
        for (k, v) in iter {
            o.insert(k, v);
        }
        o
    }
}

/// A JSON value.
#[derive(Clone, Default, PartialEq)]
pub enum Doc {
    #[default]
    Null,
    Bool(bool),
    Number(Number),
    String(Str),
    Array(Vec<Doc>),
    Object(Object),
}

impl fmt::Debug for Doc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Doc::Null => f.write_str("null"),
            Doc::Bool(b) => write!(f, "{b}"),
            Doc::Number(n) => write!(f, "{n}"),
            Doc::String(s) => write!(f, "{s:?}"),
            Doc::Array(a) => f.debug_list().entries(a).finish(),
            Doc::Object(o) => fmt::Debug::fmt(o, f),
        }
    }
}

impl fmt::Display for Doc {
    /// Compact JSON.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&serde_json::to_string(self).map_err(|_| fmt::Error)?)
    }
}

impl Doc {
    pub fn is_null(&self) -> bool {
        matches!(self, Doc::Null)
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Doc::String(s) => Some(s.as_str()),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Doc::Bool(b) => Some(*b),
            _ => None,
        }
    }

    pub fn as_number(&self) -> Option<&Number> {
        match self {
            Doc::Number(n) => Some(n),
            _ => None,
        }
    }

    pub fn as_i64(&self) -> Option<i64> {
        self.as_number().and_then(Number::as_i64)
    }

    pub fn as_u64(&self) -> Option<u64> {
        self.as_number().and_then(Number::as_u64)
    }

    pub fn as_f64(&self) -> Option<f64> {
        self.as_number().and_then(Number::as_f64)
    }

    pub fn as_array(&self) -> Option<&Vec<Doc>> {
        match self {
            Doc::Array(a) => Some(a),
            _ => None,
        }
    }

    pub fn as_array_mut(&mut self) -> Option<&mut Vec<Doc>> {
        match self {
            Doc::Array(a) => Some(a),
            _ => None,
        }
    }

    pub fn as_object(&self) -> Option<&Object> {
        match self {
            Doc::Object(o) => Some(o),
            _ => None,
        }
    }

    pub fn as_object_mut(&mut self) -> Option<&mut Object> {
        match self {
            Doc::Object(o) => Some(o),
            _ => None,
        }
    }

    /// The member `key` of an object.
    pub fn get(&self, key: &str) -> Option<&Doc> {
        self.as_object()?.get(key)
    }

    /// The value at a JSON pointer (RFC 6901).
    pub fn pointer(&self, pointer: &str) -> Option<&Doc> {
        if pointer.is_empty() {
            return Some(self);
        }
        let mut cur = self;
        for token in pointer.strip_prefix('/')?.split('/') {
            let token = unescape_token(token);
            cur = match cur {
                Doc::Object(o) => o.get(&token)?,
                Doc::Array(a) => a.get(array_index(&token)?)?,
                _ => return None,
            };
        }
        Some(cur)
    }

    pub fn pointer_mut(&mut self, pointer: &str) -> Option<&mut Doc> {
        if pointer.is_empty() {
            return Some(self);
        }
        let mut cur = self;
        for token in pointer.strip_prefix('/')?.split('/') {
            let token = unescape_token(token);
            cur = match cur {
                Doc::Object(o) => o.get_mut(&token)?,
                Doc::Array(a) => a.get_mut(array_index(&token)?)?,
                _ => return None,
            };
        }
        Some(cur)
    }

    /// Parses JSON. Unescaped strings and keys stay slices of `text`; nothing is copied twice.
    /// The tokenizer is sonic-rs (SIMD); it was a third of the parse time with serde_json's.
    /// simd-json's tape was tried instead and was slower in release builds (BENCHMARKS.md).
    pub fn parse(text: Arc<str>) -> Result<Doc, ParseError> {
        if text.len() > MAX_MESSAGE {
            return Err(ParseError {
                message: format!("the message is {} bytes; the limit is {MAX_MESSAGE}", text.len()),
                line: 1,
                column: 1,
            });
        }
        let mut de = sonic_rs::Deserializer::from_str(&text);
        let doc = DocSeed { source: &text, depth: 0 }.deserialize(&mut de).map_err(ParseError::from)?;
        de.end().map_err(ParseError::from)?;
        Ok(doc)
    }

    /// Parses JSON bytes (which must be UTF-8, as JSON is).
    pub fn parse_bytes(bytes: &[u8]) -> Result<Doc, ParseError> {
        match std::str::from_utf8(bytes) {
            Ok(s) => Doc::parse(Arc::from(s)),
            Err(e) => {
                let at = e.valid_up_to();
                let line = bytes[..at].iter().filter(|b| **b == b'\n').count() + 1;
                let column = at - bytes[..at].iter().rposition(|b| *b == b'\n').map_or(0, |p| p + 1) + 1;
                Err(ParseError { message: "the input is not valid UTF-8".into(), line, column })
            }
        }
    }

    /// As a `serde_json::Value` (for tests, schemas in YAML and other edges).
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::Value;
        match self {
            Doc::Null => Value::Null,
            Doc::Bool(b) => Value::Bool(*b),
            Doc::Number(n) => Value::Number(n.clone()),
            Doc::String(s) => Value::String(s.to_string()),
            Doc::Array(a) => Value::Array(a.iter().map(Doc::to_json).collect()),
            Doc::Object(o) => Value::Object(o.iter().map(|(k, v)| (k.to_string(), v.to_json())).collect()),
        }
    }
}

static NULL: Doc = Doc::Null;

impl std::ops::Index<&str> for Doc {
    type Output = Doc;
    /// The member, or `null` (as `serde_json::Value` does).
    fn index(&self, key: &str) -> &Doc {
        self.get(key).unwrap_or(&NULL)
    }
}

impl std::ops::Index<usize> for Doc {
    type Output = Doc;
    fn index(&self, i: usize) -> &Doc {
        self.as_array().and_then(|a| a.get(i)).unwrap_or(&NULL)
    }
}

impl PartialEq<&str> for Doc {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == Some(*other)
    }
}

/// Why a text is not JSON, and where.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message} at line {line} column {column}")]
pub struct ParseError {
    pub message: String,
    pub line: usize,
    pub column: usize,
}

impl From<sonic_rs::Error> for ParseError {
    fn from(e: sonic_rs::Error) -> ParseError {
        // sonic-rs's Display adds a snippet of the input on further lines: keep the description.
        let text = e.to_string();
        let first = text.lines().next().unwrap_or("invalid JSON");
        let message = first.split(" at line ").next().unwrap_or(first).trim().to_string();
        ParseError { message, line: e.line(), column: e.column() }
    }
}

/// An RFC 6901 array index: digits, no sign, no leading zero.
fn array_index(token: &str) -> Option<usize> {
    let digits = !token.is_empty() && token.bytes().all(|b| b.is_ascii_digit());
    if !digits || (token.len() > 1 && token.starts_with('0')) { None } else { token.parse().ok() }
}

fn unescape_token(token: &str) -> std::borrow::Cow<'_, str> {
    if token.contains('~') { token.replace("~1", "/").replace("~0", "~").into() } else { token.into() }
}

impl From<&serde_json::Value> for Doc {
    fn from(v: &serde_json::Value) -> Doc {
        use serde_json::Value;
        match v {
            Value::Null => Doc::Null,
            Value::Bool(b) => Doc::Bool(*b),
            Value::Number(n) => Doc::Number(n.clone()),
            Value::String(s) => Doc::String(Str::new(s)),
            Value::Array(a) => Doc::Array(a.iter().map(Doc::from).collect()),
            Value::Object(o) => Doc::Object(Object(o.iter().map(|(k, v)| (Str::new(k), Doc::from(v))).collect())),
        }
    }
}

impl From<serde_json::Value> for Doc {
    fn from(v: serde_json::Value) -> Doc {
        Doc::from(&v)
    }
}

impl From<&str> for Doc {
    fn from(s: &str) -> Doc {
        Doc::String(Str::new(s))
    }
}

impl From<String> for Doc {
    fn from(s: String) -> Doc {
        Doc::String(Str::from(s))
    }
}

impl From<Str> for Doc {
    fn from(s: Str) -> Doc {
        Doc::String(s)
    }
}

impl From<bool> for Doc {
    fn from(b: bool) -> Doc {
        Doc::Bool(b)
    }
}

impl From<i64> for Doc {
    fn from(i: i64) -> Doc {
        Doc::Number(i.into())
    }
}

impl From<u64> for Doc {
    fn from(i: u64) -> Doc {
        Doc::Number(i.into())
    }
}

impl From<usize> for Doc {
    fn from(i: usize) -> Doc {
        Doc::Number((i as u64).into())
    }
}

impl From<Object> for Doc {
    fn from(o: Object) -> Doc {
        Doc::Object(o)
    }
}

impl From<Vec<Doc>> for Doc {
    fn from(a: Vec<Doc>) -> Doc {
        Doc::Array(a)
    }
}

impl Doc {
    /// Compact JSON, appended to `out`. Strings parsed without escapes are copied as they are;
    /// others go through serde_json's escaping.
    pub fn write_json(&self, out: &mut Vec<u8>) {
        match self {
            Doc::Null => out.extend_from_slice(b"null"),
            Doc::Bool(true) => out.extend_from_slice(b"true"),
            Doc::Bool(false) => out.extend_from_slice(b"false"),
            Doc::Number(n) => serde_json::to_writer(&mut *out, n).expect("numbers serialize"),
            Doc::String(s) => write_str(s, out),
            Doc::Array(a) => {
                out.push(b'[');
                for (i, v) in a.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    v.write_json(out);
                }
                out.push(b']');
            }
            Doc::Object(o) => {
                out.push(b'{');
                for (i, (k, v)) in o.0.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    write_str(k, out);
                    out.push(b':');
                    v.write_json(out);
                }
                out.push(b'}');
            }
        }
    }

    /// Compact JSON bytes.
    pub fn to_json_bytes(&self) -> Vec<u8> {
        // Messages are kilobytes: starting there saves growing through 256, 512, 1024...
        let mut out = Vec::with_capacity(4096);
        self.write_json(&mut out);
        out
    }
}

fn write_str(s: &Str, out: &mut Vec<u8>) {
    match s.verbatim_bytes() {
        Some(bytes) => {
            out.reserve(bytes.len() + 2);
            out.push(b'"');
            out.extend_from_slice(bytes);
            out.push(b'"');
        }
        None => serde_json::to_writer(&mut *out, s.as_str()).expect("strings serialize"),
    }
}

impl Serialize for Doc {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Doc::Null => s.serialize_unit(),
            Doc::Bool(b) => s.serialize_bool(*b),
            Doc::Number(n) => n.serialize(s),
            Doc::String(v) => s.serialize_str(v),
            Doc::Array(a) => {
                let mut seq = s.serialize_seq(Some(a.len()))?;
                for v in a {
                    seq.serialize_element(v)?;
                }
                seq.end()
            }
            Doc::Object(o) => {
                let mut map = s.serialize_map(Some(o.len()))?;
                for (k, v) in &o.0 {
                    map.serialize_entry(k.as_str(), v)?;
                }
                map.end()
            }
        }
    }
}

impl<'de> serde::Deserialize<'de> for Doc {
    /// From any format (records read back, YAML test data): strings are copied.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Doc, D::Error> {
        serde_json::Value::deserialize(d).map(|v| Doc::from(&v))
    }
}

/// Builds a [`Doc`] from the JSON tokenizer, turning borrowed strings into slices of `source`.
#[derive(Clone, Copy)]
struct DocSeed<'s> {
    source: &'s Arc<str>,
    /// Arrays and objects this value is inside of.
    depth: u32,
}

/// The deepest nesting of a document (serde_json stops one level sooner): building, writing and
/// dropping a document recurse once per level, and a value of thousands of levels (a message of
/// thousands of `[`, or a script's output) would otherwise overflow the stack and abort the
/// process.
pub const MAX_DEPTH: u32 = 128;

impl DocSeed<'_> {
    /// The seed for the members of an array or object.
    fn inside<E: de::Error>(self) -> Result<Self, E> {
        if self.depth >= MAX_DEPTH {
            return Err(E::custom(format_args!("the JSON is nested more than {MAX_DEPTH} levels deep")));
        }
        Ok(DocSeed { depth: self.depth + 1, ..self })
    }
}

/// A string the parser borrowed from `source`: written without escapes.
fn str_of(source: &Arc<str>, s: &str) -> Str {
    if s.len() <= INLINE {
        return Str(Repr::Inline { text: compact_str::CompactString::new(s), verbatim: true });
    }
    let base = source.as_ptr() as usize;
    let at = s.as_ptr() as usize;
    if at >= base && at + s.len() <= base + source.len() {
        Str(Repr::Slice { source: source.clone(), start: (at - base) as u32, len: s.len() as u32 })
    } else {
        Str::new(s)
    }
}

impl<'de> DeserializeSeed<'de> for DocSeed<'_> {
    type Value = Doc;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Doc, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for DocSeed<'_> {
    type Value = Doc;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_unit<E>(self) -> Result<Doc, E> {
        Ok(Doc::Null)
    }
    fn visit_none<E>(self) -> Result<Doc, E> {
        Ok(Doc::Null)
    }
    fn visit_bool<E>(self, b: bool) -> Result<Doc, E> {
        Ok(Doc::Bool(b))
    }
    fn visit_i64<E>(self, i: i64) -> Result<Doc, E> {
        Ok(Doc::Number(i.into()))
    }
    fn visit_u64<E>(self, i: u64) -> Result<Doc, E> {
        Ok(Doc::Number(i.into()))
    }
    fn visit_f64<E: de::Error>(self, f: f64) -> Result<Doc, E> {
        Number::from_f64(f).map(Doc::Number).ok_or_else(|| E::custom("a number that is not finite"))
    }
    fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Doc, E> {
        Ok(Doc::String(str_of(self.source, s)))
    }
    fn visit_str<E>(self, s: &str) -> Result<Doc, E> {
        Ok(Doc::String(Str::new(s)))
    }
    fn visit_string<E>(self, s: String) -> Result<Doc, E> {
        Ok(Doc::String(Str::from(s)))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Doc, A::Error> {
        let inner = self.inside()?;
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0));
        while let Some(v) = seq.next_element_seed(inner)? {
            items.push(v);
        }
        Ok(Doc::Array(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Doc, A::Error> {
        let inner = self.inside()?;
        let mut members: Vec<(Str, Doc)> = Vec::with_capacity(8);
        // One bit per (length, last byte) seen: a key whose bit is clear cannot be a repeat, so
        // the scan for repeats (quadratic in a 60-member order) runs only on a collision.
        let mut seen = 0u64;
        while let Some(key) = map.next_key_seed(KeySeed { source: self.source })? {
            let value = map.next_value_seed(inner)?;
            let text = key.as_str();
            let bit = 1u64 << ((text.len() ^ (text.as_bytes().last().map_or(0, |b| *b as usize) << 2)) & 63);
            // A repeated key keeps its last value, as serde_json does.
            let repeat = if seen & bit != 0 { members.iter_mut().find(|(k, _)| *k == key) } else { None };
            match repeat {
                Some((_, v)) => *v = value,
                None => members.push((key, value)),
            }
            seen |= bit;
        }
        Ok(Doc::Object(Object(members)))
    }
}

struct KeySeed<'s> {
    source: &'s Arc<str>,
}

impl<'de> DeserializeSeed<'de> for KeySeed<'_> {
    type Value = Str;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Str, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeySeed<'_> {
    type Value = Str;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object key")
    }
    fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Str, E> {
        Ok(str_of(self.source, s))
    }
    fn visit_str<E>(self, s: &str) -> Result<Str, E> {
        Ok(Str::new(s))
    }
}

/// Builds a `Doc` literal: `doc!({"a": 1, "b": [true, null]})`, through `serde_json::json!`.
#[macro_export]
macro_rules! doc {
    ($($json:tt)+) => {
        $crate::doc::Doc::from(&::serde_json::json!($($json)+))
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_keeps_order_and_serializes_back() {
        let text = r#"{"b": 1, "a": {"long key that is not inline": "a long value that is not inline either", "esc": "é\"x"}, "n": [1.5, -2, 18446744073709551615, null, true], "b": 2}"#;
        let d = Doc::parse(Arc::from(text)).unwrap();
        assert_eq!(d.get("b").unwrap().as_i64(), Some(2), "a repeated key keeps its last value");
        assert_eq!(d.as_object().unwrap().keys().collect::<Vec<_>>(), ["b", "a", "n"]);
        assert_eq!(d.pointer("/a/esc").unwrap().as_str(), Some("é\"x"));
        assert_eq!(d.pointer("/n/2").unwrap().as_u64(), Some(u64::MAX));
        let back: serde_json::Value = serde_json::from_str(&serde_json::to_string(&d).unwrap()).unwrap();
        assert_eq!(serde_json::from_slice::<serde_json::Value>(&d.to_json_bytes()).unwrap(), back, "the fast writer agrees with serde");
        assert_eq!(
            back,
            json!({"b": 2, "a": {"long key that is not inline": "a long value that is not inline either", "esc": "é\"x"}, "n": [1.5, -2, 18446744073709551615u64, null, true]})
        );
        assert_eq!(Doc::from(&back), d);
        let e = Doc::parse_bytes(b"{\"a\":\n \"\xff\"}").unwrap_err();
        assert_eq!((e.line, e.column, e.message.as_str()), (2, 3, "the input is not valid UTF-8"));
    }

    #[test]
    fn parses_what_serde_json_parses_to_the_same_values() {
        let cases = [
            r#"{"a": "x\u00e9\ud83d\ude00y", "b": "tab\tand \\ backslash", "c": "\\\\\\\\ends in backslashes\\\\", "d": "/\/"}"#,
            r#"[0.1, 0.2, 0.30000000000000004, 1397.3, 2.5e-7, 1.7976931348623157e308, 5e-324, -0.0, -0, 1E2, 123456789012345678901234567890]"#,
            r#"[9223372036854775807, -9223372036854775808, 18446744073709551615, 18446744073709551616, -9223372036854775809]"#,
            r#"{"nested": {"deeper": [[], {}, [{"k": null}], true, false]}, "empty": "", "long key without any escapes in it at all": 1}"#,
            r#"  "a top-level string that is long enough to be a slice"  "#,
            "42",
            "{\"multi\":\n  [1,\n   2]\n}\n",
        ];
        for text in cases {
            let ours = Doc::parse(Arc::from(text)).unwrap_or_else(|e| panic!("{text}: {e}"));
            let theirs: serde_json::Value = serde_json::from_str(text).unwrap();
            assert_eq!(ours.to_json(), theirs, "{text}");
            let written: serde_json::Value = serde_json::from_slice(&ours.to_json_bytes()).unwrap();
            assert_eq!(written, theirs, "written back: {text}");
        }
        let d = Doc::parse(Arc::from(r#"["ab\\\\ and a tail long enough to be no inline string", "\\\\"]"#)).unwrap();
        assert_eq!(d[0].as_str(), Some(r"ab\\ and a tail long enough to be no inline string"));
        assert_eq!(d[1].as_str(), Some(r"\\"));
        assert_eq!(String::from_utf8(d.to_json_bytes()).unwrap(), r#"["ab\\\\ and a tail long enough to be no inline string","\\\\"]"#);
    }

    #[test]
    fn parse_errors_name_what_and_where() {
        let cases: [(&str, (usize, usize), &str); 10] = [
            ("{\"a\": }", (1, 7), "Invalid JSON value"),
            ("{\"a\": 1,\n \"b\" 2}", (2, 6), "to be a ':'"),
            ("[1, 2", (1, 5), "EOF while parsing"),
            ("{} x", (1, 4), "trailing characters"),
            ("{\"a\": \"unterminated}", (1, 20), "EOF while parsing"),
            ("{\"a\": 1.}", (1, 8), "Invalid number"),
            ("{\"a\": \"bad \\x escape\"}", (1, 13), "Invalid escape"),
            ("[\"a\u{1}b\"]", (1, 3), "Control character"),
            ("{\"a\":1,}", (1, 8), "comma after the last value"),
            ("", (1, 1), "EOF while parsing"),
        ];
        for (text, at, says) in cases {
            let e = Doc::parse(Arc::from(text)).expect_err(text);
            assert!(e.message.contains(says), "{text:?}: {e}");
            assert_eq!((e.line, e.column), at, "{text:?}: {e}");
            assert!(!e.to_string().contains('\n'), "one line: {e}");
        }
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_stack_overflow() {
        let nested = |levels: usize| Arc::from(format!("{}{}", "[".repeat(levels), "]".repeat(levels)).as_str());
        assert!(Doc::parse(nested(MAX_DEPTH as usize)).is_ok());
        let e = Doc::parse(nested(MAX_DEPTH as usize + 1)).unwrap_err();
        assert_eq!((e.line, e.column, e.message.as_str()), (1, 130, "the JSON is nested more than 128 levels deep"));
        // Far deeper than a thread's stack would take: refused at the same level.
        let e = Doc::parse(nested(100_000)).unwrap_err();
        assert_eq!(e.column, 130, "{e}");
        let objects = format!("{}1{}", "{\"a\":".repeat(200), "}".repeat(200));
        assert!(Doc::parse(Arc::from(objects.as_str())).unwrap_err().message.contains("nested more than 128"));
    }

    #[test]
    fn long_unescaped_strings_are_slices_of_the_input() {
        let d =
            Doc::parse(Arc::from(r#"{"a": "a long value that is certainly not inline", "b": "a long value with an \"escape\" in it"}"#))
                .unwrap();
        assert!(matches!(d.get("a"), Some(Doc::String(Str(Repr::Slice { .. })))));
        assert!(matches!(d.get("b"), Some(Doc::String(Str(Repr::Shared { verbatim: false, .. })))));
        assert_eq!(
            String::from_utf8(d.to_json_bytes()).unwrap(),
            r#"{"a":"a long value that is certainly not inline","b":"a long value with an \"escape\" in it"}"#
        );
    }

    #[test]
    fn objects_insert_replace_and_remove() {
        let mut o = Object::new();
        o.insert("a", Doc::from(1i64));
        o.insert("b", Doc::from("x"));
        o.insert("a", Doc::from(2i64));
        assert_eq!(o.len(), 2);
        assert_eq!(o.get("a"), Some(&Doc::from(2i64)));
        assert_eq!(o.remove("a"), Some(Doc::from(2i64)));
        assert_eq!(o.keys().collect::<Vec<_>>(), ["b"]);
        let mut d = doc!({"x": {"y": [1, 2]}});
        *d.pointer_mut("/x/y/1").unwrap() = Doc::from("two");
        assert!(d.pointer("/x/y/01").is_none() && d.pointer("/x/y/+1").is_none());
        assert_eq!(d, doc!({"x": {"y": [1, "two"]}}));
    }
}
