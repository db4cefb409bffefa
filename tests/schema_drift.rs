//! The committed JSON Schemas of the YAML formats are exactly what `switchyard schema` generates,
//! and they accept every file of the project while rejecting unknown keys (for editors).

use std::path::{Path, PathBuf};
use switchyard::config::{SourceFile, yaml};
use switchyard::schema::{self, Kind};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("repo root").to_path_buf()
}

fn validator(kind: Kind) -> jsonschema::Validator {
    jsonschema::validator_for(&schema::generate(kind)).expect("the generated schema compiles")
}

/// Variables as set, and a stand-in for any that is not (secrets of test fixtures): the schema
/// checks the shape of a file, not the values it is run with.
struct AnyEnv;

impl yaml::Env for AnyEnv {
    fn var(&self, name: &str) -> Option<String> {
        Some(std::env::var(name).unwrap_or_else(|_| format!("stand-in-for-{name}")))
    }
}

fn yaml_as_json(path: &Path) -> serde_json::Value {
    let file = SourceFile::read(path).unwrap();
    yaml::parse(&file, &AnyEnv).unwrap_or_else(|e| panic!("{}: {e:?}", path.display())).to_json()
}

fn files(dir: &Path, pick: &dyn Fn(&str) -> bool) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files(&p, pick));
        } else if pick(&p.file_name().unwrap().to_string_lossy()) {
            out.push(p);
        }
    }
    out
}

#[test]
fn committed_schemas_match_the_rust_types() {
    for kind in Kind::ALL {
        let path = repo().join("schemas").join(kind.file_name());
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == schema::render(kind),
            "{} drifted from the Rust config types: run `switchyard schema --kind {} > schemas/{}`",
            path.display(),
            kind.name(),
            kind.file_name()
        );
    }
}

#[test]
fn the_schemas_accept_the_project_files_and_reject_typos() {
    let pipeline = validator(Kind::Pipeline);
    let mut pipelines = files(&repo().join("pipelines"), &|n| n.ends_with(".yaml") && !n.ends_with(".test.yaml"));
    assert!(pipelines.len() >= 4);
    // Sink kinds the reference pipelines do not use.
    pipelines.extend(files(&repo().join("tests/http"), &|n| n.ends_with(".yaml")));
    for p in &pipelines {
        let doc = yaml_as_json(p);
        let errors: Vec<String> = pipeline.iter_errors(&doc).map(|e| format!("{} {e}", e.instance_path())).collect();
        assert!(errors.is_empty(), "{}: {errors:?}", p.display());
    }
    let tests = validator(Kind::Test);
    for p in files(&repo().join("pipelines"), &|n| n.ends_with(".test.yaml")) {
        assert!(tests.is_valid(&yaml_as_json(&p)), "{}", p.display());
    }
    let fieldmap = validator(Kind::Fieldmap);
    let maps: Vec<PathBuf> =
        files(&repo().join("mappings"), &|n| n.ends_with(".yaml")).into_iter().filter(|p| yaml_as_json(p)["kind"] == "FieldMap").collect();
    assert!(maps.len() >= 3);
    for p in maps {
        let doc = yaml_as_json(&p);
        let errors: Vec<String> = fieldmap.iter_errors(&doc).map(|e| format!("{} {e}", e.instance_path())).collect();
        assert!(errors.is_empty(), "{}: {errors:?}", p.display());
    }
    // A misspelt key is caught by the schema as well, as an editor would show it.
    let typo = yaml_as_json(&repo().join("tests/broken-pipelines/unknown-key.yaml"));
    assert!(pipeline.iter_errors(&typo).any(|e| e.to_string().contains("sinkz")));
    let mut typo = yaml_as_json(&repo().join("pipelines/shopify-orders.yaml"));
    typo["sinks"]["erp_us"]["pth"] = serde_json::json!("x");
    assert!(!pipeline.is_valid(&typo), "unknown keys inside a sink are rejected");
}
