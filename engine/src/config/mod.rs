//! Reading analyst-authored YAML: positions, `${VAR}` substitution, typed configs, diagnostics.

pub mod de;
pub mod diag;
pub mod yaml;

pub use de::{parse_node, parse_node_lenient, PathPart, RawNode, Spanned};
pub use diag::{DiagCode, Diagnostic, SourceFile, Span};
