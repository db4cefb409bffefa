//! Finding pipeline files and loading them, collecting every diagnostic of every file.

use super::{Pipeline, PipelineConfig};
use crate::build::{BuildContext, Shared};
use crate::config::{DiagCode, Diagnostic, SourceFile, Span, parse_node_lenient, yaml};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Pipeline test files sit beside their pipeline: `orders.yaml` and `orders.test.yaml`.
pub fn is_test_file(p: &Path) -> bool {
    let n = p.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    n.ends_with(".test.yaml") || n.ends_with(".test.yml")
}

fn is_yaml(p: &Path) -> bool {
    matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"))
}

/// Whether a YAML file found in a folder is a pipeline (other YAML, such as field maps, is skipped).
fn looks_like_pipeline(p: &Path) -> bool {
    let Ok(file) = SourceFile::read(p) else { return true };
    match yaml::parse_plain(&file) {
        Ok(node) => match node.get("kind").and_then(|k| k.as_str()) {
            Some(kind) => kind == "Pipeline",
            None => node.get("apiVersion").is_some() || node.get("source").is_some(),
        },
        Err(_) => true,
    }
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>, pick: &dyn Fn(&Path) -> bool) -> std::io::Result<()> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)?.flatten().map(|e| e.path()).collect();
    entries.sort();
    for p in entries {
        let hidden = p.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.') || n == "target");
        if hidden {
            continue;
        }
        if p.is_dir() {
            walk(&p, out, pick)?;
        } else if pick(&p) {
            out.push(p);
        }
    }
    Ok(())
}

/// The pipeline files named by `paths` (files, or folders searched recursively).
pub fn discover(paths: &[PathBuf]) -> Result<Vec<PathBuf>, String> {
    let mut out = Vec::new();
    for p in paths {
        if p.is_file() {
            out.push(p.clone());
        } else if p.is_dir() {
            walk(p, &mut out, &|f| is_yaml(f) && !is_test_file(f) && looks_like_pipeline(f))
                .map_err(|e| format!("cannot read {}: {e}", p.display()))?;
        } else {
            return Err(format!("{} does not exist", p.display()));
        }
    }
    Ok(out)
}

/// The test files named by `paths` (test files, pipelines with a test file beside them, folders).
pub fn discover_tests(paths: &[PathBuf]) -> Result<Vec<PathBuf>, String> {
    let mut out = Vec::new();
    for p in paths {
        if p.is_file() {
            if is_test_file(p) {
                out.push(p.clone());
            } else {
                let stem = p.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_default();
                let t = p.with_file_name(format!("{stem}.test.yaml"));
                if t.is_file() {
                    out.push(t);
                }
            }
        } else if p.is_dir() {
            walk(p, &mut out, &|f| is_test_file(f)).map_err(|e| format!("cannot read {}: {e}", p.display()))?;
        } else {
            return Err(format!("{} does not exist", p.display()));
        }
    }
    Ok(out)
}

/// Loads and builds one pipeline file.
pub fn load_file(path: &Path, shared: &Shared) -> Result<Pipeline, Vec<Diagnostic>> {
    let file = SourceFile::read(path).map_err(|e| {
        vec![Diagnostic::new(
            DiagCode::FileNotFound,
            &SourceFile::new(path, ""),
            Span::new(1, 1, 0, 0),
            "",
            format!("cannot read pipeline: {e}"),
        )]
    })?;
    load_source(file, shared)
}

/// Builds a pipeline from YAML text; `file.path` decides where relative paths start.
pub fn load_source(file: SourceFile, shared: &Shared) -> Result<Pipeline, Vec<Diagnostic>> {
    let node = yaml::parse(&file, &*shared.env)?;
    if let Some(d) = not_a_pipeline(&node, &file) {
        return Err(vec![d]);
    }
    // Structure problems do not stop the build: its checks still run on the parts that are fine,
    // so one `validate` reports everything.
    let (config, structure) = parse_node_lenient::<PipelineConfig>(&node, &file, &[]);
    let Some(config) = config else { return Err(structure) };
    let cx = BuildContext::new(file, shared);
    let file = cx.file.clone();
    let mut all = structure;
    match Pipeline::build(&config, &cx) {
        Ok(p) if all.is_empty() => return Ok(p),
        Ok(_) => {}
        Err(mut d) => all.append(&mut d),
    }
    if all.is_empty() {
        // Never fail without saying why.
        all.push(Diagnostic::new(DiagCode::InvalidFile, &file, Span::new(1, 1, 0, 0), "", "this pipeline could not be built"));
    }
    Err(all)
}

/// A clear word for a file that is something else: a field map, a test file, plain YAML.
fn not_a_pipeline(node: &yaml::Node, file: &SourceFile) -> Option<Diagnostic> {
    let at = |key: &str| node.key_node(key).map(|k| k.span).unwrap_or(Span::new(1, 1, 0, 0));
    match node.get("kind").and_then(|k| k.as_str()) {
        Some("Pipeline") => None,
        Some(kind) if kind.eq_ignore_ascii_case("pipeline") => None,
        Some(kind) => Some(
            Diagnostic::new(DiagCode::InvalidFile, file, at("kind"), "kind", format!("this file is a `{kind}`, not a pipeline"))
                .expected("`kind: Pipeline`")
                .hint(if kind == "FieldMap" {
                    "field maps are used by a pipeline's `fields` step: `file: <this file>`".to_string()
                } else {
                    "check a pipeline file, or a folder of them".to_string()
                }),
        ),
        None if node.get("tests").is_some() => Some(
            Diagnostic::new(DiagCode::InvalidFile, file, at("tests"), "", "this is a test file, not a pipeline")
                .hint(format!("run it with `switchyard test {}`", file.path.display())),
        ),
        None if node.entries().is_none() || (node.get("apiVersion").is_none() && node.get("source").is_none()) => Some(
            Diagnostic::new(DiagCode::InvalidFile, file, Span::new(1, 1, 0, 0), "", "this file is not a pipeline")
                .expected("a mapping with `apiVersion: switchyard/v1`, `kind: Pipeline`, `source:`, `sinks:` ..."),
        ),
        None => None,
    }
}

/// The result of loading several pipeline files.
#[derive(Default)]
pub struct Loaded {
    pub files: Vec<PathBuf>,
    pub pipelines: Vec<Pipeline>,
    pub diagnostics: Vec<Diagnostic>,
    /// Problems of pipelines that loaded all the same.
    pub warnings: Vec<Diagnostic>,
}

/// Loads every pipeline under `paths`; pipelines with problems are left out and their
/// diagnostics returned. Two pipelines with one name are an error.
pub fn load_all(paths: &[PathBuf], shared: &Shared) -> Result<Loaded, String> {
    let files = discover(paths)?;
    // One setting moves every `queue` source and sink onto RabbitMQ.
    let broker = shared.env.var(super::BROKER_SETTING).filter(|u| !u.trim().is_empty());
    if let Some(url) = &broker
        && (!(url.starts_with("amqp://") || url.starts_with("amqps://")) || url.parse::<lapin::uri::AMQPUri>().is_err())
    {
        return Err(format!(
            "{} is `{}`, which is not an AMQP URL (amqp://user:password@host:5672/vhost)",
            super::BROKER_SETTING,
            crate::amqp::redact(url)
        ));
    }
    let mut loaded = Loaded { files: files.clone(), ..Default::default() };
    let mut names: HashMap<String, PathBuf> = HashMap::new();
    for f in &files {
        match load_file(f, shared) {
            Ok(p) => {
                if let Some(first) = names.get(&p.name) {
                    let file = SourceFile::read(f).unwrap_or_else(|_| SourceFile::new(f, ""));
                    let span = yaml::parse_plain(&file).ok().and_then(|n| n.get("name").map(|v| v.span)).unwrap_or_default();
                    loaded.diagnostics.push(
                        Diagnostic::new(
                            DiagCode::Conflict,
                            &file,
                            span,
                            "name",
                            format!("pipeline name `{}` is already used by {}", p.name, first.display()),
                        )
                        .hint("pipeline names are unique: they name queues, exception records and metrics"),
                    );
                    continue;
                }
                names.insert(p.name.clone(), f.clone());
                loaded.warnings.extend(p.warnings.iter().cloned());
                loaded.pipelines.push(match &broker {
                    Some(url) => p.over_broker(url.trim()),
                    None => p,
                });
            }
            Err(d) => loaded.diagnostics.extend(d),
        }
    }
    Ok(loaded)
}
