//! Reading analyst-authored YAML: positions, `${VAR}` substitution, typed configs, diagnostics.

pub mod de;
pub mod diag;
pub mod yaml;

pub use de::{PathPart, RawNode, Spanned, parse_node, parse_node_lenient};
pub use diag::{DiagCode, Diagnostic, SourceFile, Span};
