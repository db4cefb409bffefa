//! `switchyard test`: the reference pipelines' own tests pass; a wrong expectation and an unknown
//! assertion keyword fail, with a readable reason.

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("repo root").to_path_buf()
}

fn switchyard(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(args)
        .current_dir(repo())
        .env("NO_COLOR", "1")
        .output()
        .expect("switchyard runs");
    (out.status.code().unwrap_or(-1), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn the_reference_pipeline_tests_pass_and_write_junit() {
    let dir = tempfile::tempdir().unwrap();
    let junit = dir.path().join("junit.xml");
    let (code, out) = switchyard(&["test", "pipelines", "--junit", junit.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(" 0 failed, 0 could not run; 0 test file(s) could not be loaded"), "{out}");
    let passed: usize = out.lines().last().unwrap().split_whitespace().next().unwrap().parse().unwrap();
    assert!(passed >= 25, "{out}");
    let xml = std::fs::read_to_string(junit).unwrap();
    assert!(xml.contains(&format!("tests=\"{passed}\"")) && xml.contains("failures=\"0\""), "{xml}");
}

#[test]
fn a_wrong_expected_value_fails_with_a_diff() {
    let (code, out) = switchyard(&["test", "tests/test-runner/wrong-value.test.yaml"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("FAIL  a wrong unit price"), "{out}");
    assert!(out.contains("payload /salesOrderLines/0/unitPrice: expected 650, got 649"), "{out}");
    assert!(out.contains("FAIL  the order is expected in the wrong sink"), "{out}");
    assert!(out.contains("sink `bc_intl`: expected 1 message(s), got 0"), "{out}");
    assert!(out.contains("FAIL  an exception that does not happen"), "{out}");
    assert!(out.contains("expected exception `unknown_sku`, but the message was routed to bc_us"), "{out}");
    assert!(out.contains("ok    a right expectation still passes"), "{out}");
    assert!(out.contains("1 passed, 3 failed"), "{out}");
}

#[test]
fn an_unknown_assertion_keyword_is_an_error_not_a_pass() {
    let (code, out) = switchyard(&["test", "tests/test-runner/unknown-assertion.test.yaml"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("BROKEN"), "{out}");
    assert!(out.contains("unknown key `payload_equals`"), "{out}");
    assert!(out.contains("did you mean `payload`?") || out.contains("did you mean `payload_file`?"), "{out}");
    assert!(out.contains("unknown-assertion.test.yaml:9:13"), "{out}");
    assert!(!out.contains("ok "), "nothing passes: {out}");
}

#[test]
fn a_sink_the_pipeline_does_not_declare_is_an_error() {
    let (code, out) = switchyard(&["test", "tests/test-runner/undeclared-sink.test.yaml"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("names sink `canonicl`, which pipeline shopify-orders does not declare"), "{out}");
    assert!(out.contains("undeclared-sink.test.yaml:7:9"), "the problem points at the sink's key: {out}");
    assert!(out.contains("BROKEN  a sink name with a typo"), "{out}");
}

#[test]
fn mappings_and_routes_read_transport_headers() {
    // tests/headers: a field map reads `{header.NAME}` and a route rule `meta.headers[...]`, as
    // an `amqp` source fills them from the delivery's properties and headers.
    let (code, out) = switchyard(&["test", "tests/headers"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("2 passed, 0 failed"), "{out}");
}
