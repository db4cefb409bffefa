//! `switchyard validate` rejects each kind of broken pipeline with file:line:column.
//!
//! Data-driven: every `tests/broken-pipelines/*.yaml` states what it must produce in comment
//! lines: `# expect: <code> [<file>] <line>:<column> <text in the message, expected or hint>`
//! and optionally `# expect-count: <n>` for the exact number of problems.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("repo root").to_path_buf()
}

fn switchyard(args: &[&str], dir: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(args)
        .current_dir(dir)
        .env_remove("SWITCHYARD_TEST_NEVER_SET")
        .env("NO_COLOR", "1")
        .output()
        .expect("switchyard runs")
}

struct Expect {
    code: String,
    file: Option<String>,
    line: usize,
    column: usize,
    text: String,
}

fn expectations(text: &str) -> (Vec<Expect>, Option<usize>) {
    let mut out = Vec::new();
    let mut count = None;
    for l in text.lines() {
        if let Some(n) = l.strip_prefix("# expect-count:") {
            count = Some(n.trim().parse().expect("expect-count is a number"));
        }
        let Some(rest) = l.strip_prefix("# expect:") else { continue };
        let mut words = rest.split_whitespace();
        let code = words.next().expect("a code").to_string();
        let mut next = words.next().expect("a position");
        let mut file = None;
        if !next.contains(':') || next.ends_with(".json") || next.ends_with(".yaml") || next.ends_with(".rhai") {
            file = Some(next.to_string());
            next = words.next().expect("a position");
        }
        let (line, column) = next.split_once(':').expect("line:column");
        out.push(Expect {
            code,
            file,
            line: line.parse().unwrap(),
            column: column.parse().unwrap(),
            text: words.collect::<Vec<_>>().join(" "),
        });
    }
    (out, count)
}

#[test]
fn every_broken_pipeline_is_rejected_where_the_problem_is() {
    let dir = repo().join("tests/broken-pipelines");
    let mut fixtures: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml") && !p.to_string_lossy().ends_with(".fields.yaml"))
        .collect();
    fixtures.sort();
    assert!(fixtures.len() >= 12, "the fixtures are there");
    for f in fixtures {
        let name = f.file_name().unwrap().to_string_lossy().to_string();
        let (expects, count) = expectations(&std::fs::read_to_string(&f).unwrap());
        assert!(!expects.is_empty(), "{name} states what it expects");
        let out = switchyard(&["validate", &name, "--format", "json"], &dir);
        assert_eq!(out.status.code(), Some(1), "{name}: validate exits 1");
        let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{name}: JSON report: {e}"));
        assert_eq!(report["valid"], false);
        let problems = report["problems"].as_array().unwrap();
        for e in &expects {
            let file = e.file.clone().unwrap_or_else(|| name.clone());
            let hit = problems.iter().any(|p| {
                let words = format!("{} {} {} {}", p["message"], p["expected"], p["hint"], p["key_path"]);
                p["code"] == e.code.as_str()
                    && p["file"].as_str().is_some_and(|pf| pf.ends_with(&file))
                    && p["line"] == e.line
                    && p["column"] == e.column
                    && words.contains(&e.text)
            });
            assert!(
                hit,
                "{name}: expected {} at {file}:{}:{} mentioning {:?}; got {}",
                e.code,
                e.line,
                e.column,
                e.text,
                serde_json::to_string_pretty(problems).unwrap()
            );
        }
        if let Some(n) = count {
            assert_eq!(problems.len(), n, "{name}: exactly {n} problems, all reported at once");
        }
        // The human format shows each position and the offending line.
        let human = switchyard(&["validate", &name], &dir);
        let text = String::from_utf8_lossy(&human.stderr);
        for e in &expects {
            let file = e.file.clone().unwrap_or_else(|| name.clone());
            assert!(
                text.contains(&format!("{file}:{}:{}", e.line, e.column)),
                "{name}: the human report names {file}:{}:{}\n{text}",
                e.line,
                e.column
            );
        }
        assert!(text.contains('│'), "{name}: the human report shows the source line\n{text}");
    }
}

#[test]
fn the_reference_pipelines_are_valid() {
    let out = switchyard(&["validate", "pipelines", "--format", "json"], &repo());
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["problems"], serde_json::json!([]));
    assert_eq!(report["warnings"], serde_json::json!([]));
    assert_eq!(out.status.code(), Some(0));
    let names: Vec<&str> = report["pipelines"].as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["amazon-orders", "erp-sales-orders", "pos-store-sales", "shopify-orders"]);
}

#[test]
fn a_hint_for_a_reason_nothing_gives_is_a_warning_with_a_suggestion() {
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(repo().join("pipelines/erp-sales-orders.yaml"))
        .unwrap()
        .replace("../", &format!("{}/", repo().display()))
        .replace("    unknown_channel:", "    unknown_chanel:");
    std::fs::write(dir.path().join("p.yaml"), &text).unwrap();
    let out = switchyard(&["validate", "p.yaml", "--format", "json"], dir.path());
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(0), "a warning does not fail validation: {report}");
    assert_eq!(report["valid"], true);
    let w = &report["warnings"][0];
    let line = text.lines().position(|l| l.contains("unknown_chanel:")).unwrap() + 1;
    assert_eq!(
        (w["code"].as_str(), w["severity"].as_str(), w["line"].as_u64()),
        (Some("unknown_reason"), Some("warning"), Some(line as u64))
    );
    assert_eq!(w["hint"], "did you mean `unknown_channel`?");
    assert_eq!(report["warnings"].as_array().unwrap().len(), 1, "{report}");
    let human = switchyard(&["validate", "p.yaml"], dir.path());
    assert!(String::from_utf8_lossy(&human.stdout).contains("all valid, 1 warning(s)"));
}

#[test]
fn two_pipelines_with_one_name_conflict() {
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(repo().join("tests/broken-pipelines/missing-required.yaml"))
        .unwrap()
        .replace("    format: payload\n", "    path: out.ndjson\n")
        .replace("../../examples", &repo().join("examples").display().to_string());
    std::fs::write(dir.path().join("a.yaml"), &text).unwrap();
    std::fs::write(dir.path().join("b.yaml"), &text).unwrap();
    let out = switchyard(&["validate", ".", "--format", "json"], dir.path());
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(1), "{report}");
    assert_eq!(report["problems"][0]["code"], "conflict");
    assert!(report["problems"][0]["message"].as_str().unwrap().contains("already used"));
}

/// Every way of breaking a reference file by deleting one line or changing one indentation is
/// reported, never a crash: load each variant in process and require diagnostics or a pipeline.
#[test]
fn no_single_line_edit_of_a_reference_file_crashes_the_loader() {
    use switchyard::build::{BuildContext, Shared};
    use switchyard::config::{SourceFile, parse_node, yaml};
    use switchyard::map::fields::{FieldMap, FieldMapFile};
    use switchyard::pipeline::load::load_source;

    let shared = Shared::with_process_env();
    let variants = |text: &str| -> Vec<String> {
        let lines: Vec<&str> = text.lines().collect();
        let mut out = Vec::new();
        for i in 0..lines.len() {
            let mut v = lines.clone();
            v.remove(i);
            out.push(v.join("\n"));
            let mut v: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
            v[i] = format!("  {}", v[i]);
            out.push(v.join("\n"));
            // A misspelt key.
            if let Some((key, rest)) = lines[i].split_once(':') {
                let mut v: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
                v[i] = format!("{key}x:{rest}");
                out.push(v.join("\n"));
            }
        }
        out
    };
    let mut checked = 0;
    for name in ["shopify-orders", "amazon-orders", "pos-store-sales", "erp-sales-orders"] {
        let path = repo().join("pipelines").join(format!("{name}.yaml"));
        for text in variants(&std::fs::read_to_string(&path).unwrap()) {
            let file = SourceFile::new(path.clone(), text.clone());
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| load_source(file, &shared).map(|_| ())));
            match result {
                Ok(Ok(())) => {}
                Ok(Err(d)) => assert!(!d.is_empty(), "a failed load says why:\n{text}"),
                Err(_) => panic!("the loader crashed on this variant of {name}.yaml:\n{text}"),
            }
            checked += 1;
        }
    }
    let map_path = repo().join("mappings/shopify/order-to-canonical.yaml");
    for text in variants(&std::fs::read_to_string(&map_path).unwrap()) {
        let file = SourceFile::new(map_path.clone(), text.clone());
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let node = yaml::parse(&file, &yaml::ProcessEnv)?;
            let f: FieldMapFile = parse_node(&node, &file, &[])?;
            FieldMap::compile(&f.name, &f.version, &f.fields, "fields", &BuildContext::new(file.clone(), &shared)).map(|_| ())
        }));
        match result {
            Ok(Ok(())) => {}
            Ok(Err(d)) => assert!(!d.is_empty(), "a failed load says why:\n{text}"),
            Err(_) => panic!("the field map compiler crashed on:\n{text}"),
        }
        checked += 1;
    }
    assert!(checked > 500, "{checked} variants");
}

/// A value that comes from `${VAR}` may be a secret: problems name the variable, never the value.
#[test]
fn values_of_variables_never_appear_in_diagnostics() {
    let dir = tempfile::tempdir().unwrap();
    let text = "apiVersion: switchyard/v1\nkind: Pipeline\nname: ${PNAME}\nversion: \"1\"\ndescription: d\nowner: o\nsource:\n  type: ${SRC_TYPE}\n  path: /nowhere/${SECRET_DIR}\nsinks:\n  out:\n    type: file\n    path: x\n    format: ${OUT_FORMAT}\nroute:\n  default: ${SINK}\n";
    std::fs::write(dir.path().join("p.yaml"), text).unwrap();
    for src_type in ["s3cr3t-type", "file"] {
        for format in ["human", "json"] {
            let out = Command::new(env!("CARGO_BIN_EXE_switchyard"))
                .args(["validate", "p.yaml", "--format", format])
                .current_dir(dir.path())
                .env("PNAME", "S3cr3t Name")
                .env("SRC_TYPE", src_type)
                .env("SECRET_DIR", "s3cr3t-dir")
                .env("OUT_FORMAT", "s3cr3t-format")
                .env("SINK", "s3cr3t-sink")
                .output()
                .unwrap();
            let all = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
            assert_eq!(out.status.code(), Some(1), "{all}");
            assert!(!all.to_lowercase().contains("s3cr3t"), "a variable's value leaked:\n{all}");
            assert!(all.contains("${OUT_FORMAT}") || all.contains("${SRC_TYPE}"), "{all}");
        }
    }
}
