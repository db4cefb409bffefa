//! Lookup tables (CSV or YAML under mappings/): channel SKU -> item code, store -> fulfilment node.
//! A table carries a version, stamped on every output like any mapping file. Loaded once.

use crate::config::de::parse_node;
use crate::config::{DiagCode, Diagnostic, SourceFile, Span, yaml};
use indexmap::IndexMap;
use serde::Deserialize;
use std::collections::HashMap;
use std::path::Path;

/// A loaded table: rows keyed by the key column.
#[derive(Debug)]
pub struct LookupTable {
    pub name: String,
    pub version: String,
    pub columns: Vec<String>,
    rows: HashMap<String, Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct YamlTable {
    version: String,
    #[serde(default)]
    description: Option<String>,
    /// `key: value`, or `key: {column: value, ...}`.
    entries: IndexMap<String, YamlEntry>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum YamlEntry {
    Value(String),
    Row(IndexMap<String, String>),
}

impl LookupTable {
    /// Loads a `.csv` (first line `# version: X`, then a header row) or `.yaml` table.
    pub fn load(path: &Path) -> Result<LookupTable, Vec<Diagnostic>> {
        let file = SourceFile::read(path).map_err(|e| {
            vec![Diagnostic::new(
                DiagCode::FileNotFound,
                &SourceFile::new(path, ""),
                Span::new(1, 1, 0, 0),
                "",
                format!("cannot read lookup table: {e}"),
            )]
        })?;
        let name = path.file_stem().map(|s| s.to_string_lossy().trim_end_matches(".lookup").to_string()).unwrap_or_default();
        match path.extension().and_then(|e| e.to_str()) {
            Some("csv") => Self::from_csv(&file, name),
            Some("yaml" | "yml") => Self::from_yaml(&file, name),
            _ => Err(vec![Diagnostic::new(
                DiagCode::InvalidFile,
                &file,
                Span::new(1, 1, 0, 0),
                "",
                "a lookup table is a .csv or .yaml file",
            )]),
        }
    }

    fn from_csv(file: &SourceFile, name: String) -> Result<LookupTable, Vec<Diagnostic>> {
        let first = file.text.lines().next().unwrap_or("");
        let version = first
            .strip_prefix('#')
            .and_then(|c| c.trim().strip_prefix("version:"))
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
            .ok_or_else(|| {
                vec![
                    Diagnostic::new(
                        DiagCode::InvalidFile,
                        file,
                        file.span_at(1, 1, first.chars().count().max(1)),
                        "",
                        "the first line of a lookup table must give its version",
                    )
                    .expected("`# version: 2026.11.0`")
                    .hint("versions are stamped on every output, so a change to the table is traceable"),
                ]
            })?;
        let mut reader = csv::ReaderBuilder::new().comment(Some(b'#')).flexible(false).from_reader(file.text.as_bytes());
        let columns: Vec<String> = reader.headers().map_err(|e| vec![csv_diag(file, &e)])?.iter().map(|h| h.trim().to_string()).collect();
        if columns.len() < 2 {
            return Err(vec![Diagnostic::new(
                DiagCode::InvalidFile,
                file,
                file.span_at(2, 1, 1),
                "",
                "a lookup table needs a header row with at least two columns",
            )]);
        }
        let mut rows = HashMap::new();
        let mut diags = Vec::new();
        for rec in reader.records() {
            match rec {
                Ok(r) => {
                    let row: Vec<String> = r.iter().map(|c| c.trim().to_string()).collect();
                    let key = row[0].clone();
                    if rows.insert(key.clone(), row).is_some() {
                        let line = r.position().map_or(1, |p| p.line() as usize);
                        diags.push(Diagnostic::new(
                            DiagCode::DuplicateKey,
                            file,
                            file.span_at(line, 1, key.chars().count().max(1)),
                            "",
                            format!("duplicate key `{key}` in the lookup table"),
                        ));
                    }
                }
                Err(e) => diags.push(csv_diag(file, &e)),
            }
        }
        if !diags.is_empty() {
            return Err(diags);
        }
        Ok(LookupTable { name, version, columns, rows })
    }

    fn from_yaml(file: &SourceFile, name: String) -> Result<LookupTable, Vec<Diagnostic>> {
        let node = yaml::parse(file, &yaml::ProcessEnv)?;
        let t: YamlTable = parse_node(&node, file, &[])?;
        let _ = t.description;
        let mut columns = vec!["key".to_string(), "value".to_string()];
        let mut rows = HashMap::new();
        for (k, entry) in t.entries {
            let row = match entry {
                YamlEntry::Value(v) => vec![k.clone(), v],
                YamlEntry::Row(cols) => {
                    if columns.len() == 2 && columns[1] == "value" {
                        columns = std::iter::once("key".to_string()).chain(cols.keys().cloned()).collect();
                    }
                    std::iter::once(k.clone()).chain(columns[1..].iter().map(|c| cols.get(c).cloned().unwrap_or_default())).collect()
                }
            };
            rows.insert(k, row);
        }
        Ok(LookupTable { name, version: t.version, columns, rows })
    }

    pub fn column_index(&self, column: &str) -> Option<usize> {
        self.columns.iter().position(|c| c == column)
    }

    /// The value in `column` of the row whose key is `key`.
    pub fn get(&self, key: &str, column: usize) -> Option<&str> {
        self.rows.get(key).and_then(|r| r.get(column)).map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
}

fn csv_diag(file: &SourceFile, e: &csv::Error) -> Diagnostic {
    let line = e.position().map_or(1, |p| p.line() as usize);
    Diagnostic::new(DiagCode::InvalidFile, file, file.span_at(line, 1, 1), "", format!("not a valid CSV lookup table: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_tables_need_a_version_and_unique_keys() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("skus.csv");
        std::fs::write(&p, "# version: 2026.11.0\nchannel_sku,item_code\nA-1, ITM-1\nB-2,ITM-2\n").unwrap();
        let t = LookupTable::load(&p).unwrap();
        assert_eq!((t.name.as_str(), t.version.as_str(), t.len()), ("skus", "2026.11.0", 2));
        assert_eq!(t.get("A-1", t.column_index("item_code").unwrap()), Some("ITM-1"));
        assert_eq!(t.get("C-3", 1), None);
        std::fs::write(&p, "channel_sku,item_code\nA,1\n").unwrap();
        assert!(LookupTable::load(&p).unwrap_err()[0].message.contains("version"));
        std::fs::write(&p, "# version: 1\nk,v\nA,1\nA,2\n").unwrap();
        let e = LookupTable::load(&p).unwrap_err();
        assert_eq!((e[0].code, e[0].span.line), (DiagCode::DuplicateKey, 4));
    }

    #[test]
    fn yaml_tables_hold_values_or_rows() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("stores.yaml");
        std::fs::write(&p, "version: '3'\nentries:\n  '0012': STORE-012\n  '0101': DC-101\n").unwrap();
        let t = LookupTable::load(&p).unwrap();
        assert_eq!(t.get("0012", 1), Some("STORE-012"));
        std::fs::write(&p, "version: '3'\nentries:\n  '0012': {node: STORE-012, name: Main St}\n").unwrap();
        let t = LookupTable::load(&p).unwrap();
        assert_eq!(t.get("0012", t.column_index("name").unwrap()), Some("Main St"));
    }
}
