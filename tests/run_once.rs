//! `switchyard run --once` over the reference pipelines and their example payloads: counts add up,
//! every input ends in a sink or in the exception store, exception records keep the original bytes
//! and point into the input, a second run reads nothing twice, and every canonical Order produced
//! is valid and reconciles to the cent when checked independently of the engine's own reconcile.

use rust_decimal::Decimal;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use switchyard::source::{Format, file::split};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("repo root").to_path_buf()
}

fn ndjson(path: &Path) -> Vec<Value> {
    match std::fs::read_to_string(path) {
        Ok(t) => t.lines().map(|l| serde_json::from_str(l).expect("NDJSON line")).collect(),
        Err(_) => Vec::new(),
    }
}

fn dec(v: &Value) -> Decimal {
    v["amount"].as_str().expect("money amount").parse().expect("decimal")
}

/// The canonical Order arithmetic, written again here as an oracle.
fn reconciles(o: &Value) -> bool {
    let cur = o["currency"].as_str().unwrap();
    let money = |v: &Value| {
        assert_eq!(v["currency"], cur, "every amount is in the order currency");
        dec(v)
    };
    let mut subtotal = Decimal::ZERO;
    let mut tax = Decimal::ZERO;
    let mut allocated = Decimal::ZERO;
    for l in o["lines"].as_array().unwrap() {
        let q: Decimal = l["quantity"].to_string().parse().unwrap();
        let line = q * money(&l["unit_price"]);
        assert_eq!(line, money(&l["subtotal"]), "line subtotal = quantity x unit price");
        subtotal += line;
        if l.get("discount").is_some() {
            allocated += money(&l["discount"]);
        }
        for t in l["taxes"].as_array().into_iter().flatten() {
            tax += money(&t["amount"]);
        }
    }
    let mut shipping = Decimal::ZERO;
    for s in o["shipping"].as_array().into_iter().flatten() {
        shipping += money(&s["amount"]);
        if s.get("discount").is_some() {
            allocated += money(&s["discount"]);
        }
        for t in s["taxes"].as_array().into_iter().flatten() {
            tax += money(&t["amount"]);
        }
    }
    // `discounts[]` lists the discounts; line and shipping `discount`s allocate them.
    let discount = match o["discounts"].as_array() {
        Some(d) => d.iter().map(|d| money(&d["amount"])).sum(),
        None => allocated,
    };
    let included = o["prices_include_tax"].as_bool().unwrap_or(false);
    let total = subtotal - discount + shipping + if included { Decimal::ZERO } else { tax };
    total == money(&o["totals"]["total"]) && tax == money(&o["totals"]["tax"]) && subtotal == money(&o["totals"]["subtotal"])
}

fn switchyard(args: &[&str], data: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(args)
        .arg("--data-dir")
        .arg(data)
        .current_dir(repo())
        .output()
        .expect("switchyard runs")
}

/// `run PIPELINES --once`, which must succeed: its summary.
fn run_once(pipelines: &str, data: &Path) -> String {
    let out = switchyard(&["run", pipelines, "--once"], data);
    let summary = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{summary}");
    summary
}

/// Every exception record in the store, through the command operators use.
fn exported(data: &Path) -> Vec<Value> {
    let out = switchyard(&["exceptions", "export"], data);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// The numbers of the `total:` line: in, routed, exceptions.
fn totals(summary: &str) -> Vec<u64> {
    let total = summary.lines().find(|l| l.starts_with("total:")).expect("a total line");
    total.split(|c: char| !c.is_ascii_digit()).filter(|s| !s.is_empty()).map(|s| s.parse().unwrap()).collect()
}

#[test]
fn every_input_ends_in_a_sink_or_the_exception_store() {
    let data = tempfile::tempdir().unwrap();
    let summary = run_once("pipelines", data.path());
    let n = totals(&summary);
    assert_eq!(n[0], n[1] + n[2], "{summary}");
    // 9 Shopify files, 3 Amazon bundles and 20 POS rows; the 9 canonical Orders the first two
    // produce are received again by erp-sales-orders through the queue `orders.canonical`.
    assert_eq!(n[0], 9 + 3 + 20 + 9, "{summary}");

    let outputs: Vec<(&str, PathBuf)> = vec![
        ("erp-sales-orders", data.path().join("out/erp/bc-sales-orders-us.ndjson")),
        ("erp-sales-orders", data.path().join("out/erp/bc-sales-orders-intl.ndjson")),
        ("pos-store-sales", data.path().join("out/pos/inventory-events.ndjson")),
    ];
    let files: usize = outputs.iter().map(|(_, p)| ndjson(p).len()).sum();
    // Routed = the file outputs + the 9 canonical Orders routed onto the queue.
    assert_eq!(files as u64 + 9, n[1], "the sink files hold exactly the routed messages");

    let mut reasons: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let records = exported(data.path());
    for rec in &records {
        let pipeline = rec["pipeline"].as_str().unwrap();
        assert_eq!(rec["status"], "open");
        reasons.entry(pipeline.to_string()).or_default().push(rec["reason"].as_str().unwrap().to_string());
        assert!(rec["hint"].as_str().is_some_and(|h| !h.is_empty()), "every exception carries a hint: {rec}");
        assert!(!rec["errors"].as_array().unwrap().is_empty());
        // The original payload, byte for byte.
        let origin = rec["origin"].as_str().unwrap();
        let original = rec["original_payload"].as_str().unwrap().as_bytes().to_vec();
        let (file, line) = match origin.rsplit_once(':') {
            Some((f, l)) if l.chars().all(|c| c.is_ascii_digit()) => (f, Some(l.parse::<usize>().unwrap())),
            _ => (origin, None),
        };
        let bytes = std::fs::read(repo().join(file)).unwrap();
        let (expected_bytes, input): (Vec<u8>, Value) = match line {
            None => (bytes.clone(), serde_json::from_slice(&bytes).unwrap_or(Value::Null)),
            Some(l) => {
                let rows = split(&bytes, Format::Csv, file, &Default::default());
                let row = rows.into_iter().find(|m| m.headers.get("file.line") == Some(&l.to_string())).expect("the row");
                (row.body, row.parsed.unwrap().to_json())
            }
        };
        assert_eq!(original, expected_bytes, "{pipeline}: original payload of {origin} is byte for byte");
        // Pointers into the input resolve in it.
        for e in rec["errors"].as_array().unwrap() {
            if e["document"] == "input" {
                let p = e["pointer"].as_str().unwrap();
                assert!(input.pointer(p).is_some(), "{pipeline}: pointer {p} resolves in {origin}");
            }
        }
    }
    assert_eq!(records.len() as u64, n[2], "the store holds exactly the exceptions");
    let mut expected: BTreeMap<String, Vec<String>> = [
        ("amazon-orders", vec!["order_pending"]),
        ("pos-store-sales", vec!["schema_violation", "unknown_sku"]),
        ("shopify-orders", vec!["totals_mismatch", "totals_mismatch"]),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.into_iter().map(String::from).collect()))
    .collect();
    for v in reasons.values_mut() {
        v.sort();
    }
    for v in expected.values_mut() {
        v.sort();
    }
    assert_eq!(reasons, expected, "the examples designed to fail, and only those, are exceptions");

    // The chain keeps each order's envelope: the channel's correlation id and channel arrive at
    // the ERP side, with the ERP pipeline's own idempotency key and mapping versions.
    let mut keys = std::collections::HashSet::new();
    for (pipeline, path) in &outputs {
        for out in ndjson(path) {
            let m = &out["metadata"];
            assert_eq!(m["pipeline"], *pipeline);
            assert!(keys.insert(m["idempotency_key"].as_str().unwrap().to_string()), "idempotency keys are unique");
            assert!(m["mapping_versions"].as_object().is_some_and(|m| !m.is_empty()));
            if *pipeline == "erp-sales-orders" {
                let channel = m["channel"].as_str().unwrap();
                assert!(["shopify", "amazon"].contains(&channel), "{m}");
                let order = out["payload"]["externalDocumentNumber"].as_str().unwrap();
                assert_eq!(m["idempotency_key"], format!("erp:{order}"));
                assert!(m["correlation_id"].as_str().unwrap().contains(order.split(':').nth(1).unwrap()), "{m}");
            }
        }
    }

    // A second run finds every file already read: nothing is processed twice.
    let summary = run_once("pipelines", data.path());
    assert_eq!(totals(&summary), [0, 0, 0], "{summary}");
    assert_eq!(outputs.iter().map(|(_, p)| ndjson(p).len()).sum::<usize>(), files);
}

#[test]
fn every_canonical_order_on_the_queue_is_valid_and_adds_up() {
    let data = tempfile::tempdir().unwrap();
    // Without erp-sales-orders, the canonical Orders wait in their queue for a first reader.
    let out = switchyard(&["run", "pipelines/shopify-orders.yaml", "pipelines/amazon-orders.yaml", "--once"], data.path());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let queues = switchyard(&["queues", "--format", "json"], data.path());
    let queues: Value = serde_json::from_slice(&queues.stdout).unwrap();
    let waiting = queues.as_array().unwrap().iter().find(|q| q["queue"] == "orders.canonical").expect("the queue is listed");
    assert_eq!((waiting["consumer"].as_str(), waiting["ready"].as_i64()), (Some(""), Some(9)));

    let db = rusqlite::Connection::open(data.path().join("switchyard.db")).unwrap();
    let rows: Vec<(Vec<u8>, String)> = db
        .prepare(
            "SELECT b.body, b.headers FROM messages m JOIN bodies b ON b.id = m.id JOIN streams s ON s.id = m.stream
             WHERE s.queue = 'orders.canonical'",
        )
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let shared = switchyard::build::Shared::with_process_env();
    let cx = switchyard::build::BuildContext::new(switchyard::config::SourceFile::new(repo().join("x.yaml"), ""), &shared);
    let schema = repo().join("schemas/canonical/order.schema.json");
    let check =
        switchyard::validate::SchemaCheck::new(cx.schema_store(&schema).validator(&schema).unwrap(), switchyard::message::Document::Record);
    assert_eq!(rows.len(), 9);
    for (body, headers) in rows {
        let order: Value = serde_json::from_slice(&body).unwrap();
        let headers: Value = serde_json::from_str(&headers).unwrap();
        assert!(["shopify-orders", "amazon-orders"].contains(&headers["pipeline"].as_str().unwrap()));
        assert_eq!(headers["channel"], order["channel"], "the envelope travels in the headers");
        check.check(&switchyard::doc::Doc::from(&order)).unwrap_or_else(|f| panic!("canonical order invalid: {:?}", f.errors));
        assert!(reconciles(&order), "{} reconciles", order["order_id"]);
    }
}

#[test]
fn stdin_to_stdout_keeps_data_and_summary_apart() {
    use std::io::Write;
    let data = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["run", "examples/pipelines/stdin-to-stdout.yaml", "--once", "--data-dir"])
        .arg(data.path())
        .current_dir(repo())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"{\"sku\":\"a-1\",\"qty\":\"2\",\"price\":\"9.5\"}\n{\"qty\":1}\nnot json\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8(out.stdout).unwrap();
    // Keys come out in the order the field map writes them.
    assert_eq!(stdout, "{\"sku\":\"A-1\",\"quantity\":2,\"unit_price\":{\"amount\":\"9.50\",\"currency\":\"USD\"}}\n");
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains("total: 3 in = 1 routed + 2 exceptions"), "{stderr}");
    let records = exported(data.path());
    let reasons: Vec<&str> = records.iter().map(|r| r["reason"].as_str().unwrap()).collect();
    assert_eq!(reasons, ["missing_required_field", "invalid_json"]);
    assert_eq!(records[1]["original_payload"], "not json");
    assert_eq!(records[1]["origin"], "<stdin>:3");
}

#[test]
fn all_matches_sends_a_copy_to_every_matching_sink() {
    let data = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["run", "examples/pipelines/route-and-assert.yaml", "--once", "--data-dir"])
        .arg(data.path())
        .current_dir(repo())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let review = ndjson(&data.path().join("out/examples/large-orders.ndjson"));
    let archive = ndjson(&data.path().join("out/examples/all-orders.ndjson"));
    assert_eq!(archive.len(), 3, "every order is archived (payload only)");
    assert!(archive.iter().all(|o| o.get("metadata").is_none() && o["erp_customer"] == "WEB-SHOPIFY"));
    assert_eq!(review.len(), 1, "one order is 1000.00 or more");
    assert_eq!(review[0]["payload"]["order_id"], "shopify:5000000001002");
}

#[test]
fn a_runaway_script_is_an_exception_and_the_engine_goes_on() {
    let data = tempfile::tempdir().unwrap();
    let summary = run_once("tests/runtime/deep-script/rt-deep-script.yaml", data.path());
    assert_eq!(totals(&summary), [7, 3, 4], "{summary}");
    // o-7 nests closures deeper than a default thread stack can drop: it goes through.
    let passed: Vec<Value> = ndjson(&data.path().join("out/deep/orders.ndjson"));
    assert_eq!(passed.iter().map(|o| o["id"].as_str().unwrap()).collect::<Vec<_>>(), ["o-1", "o-4", "o-7"]);
    let why: BTreeMap<String, String> = exported(data.path())
        .iter()
        .map(|r| {
            assert_eq!(r["reason"], "script_error", "{r}");
            let order: Value = serde_json::from_str(r["original_payload"].as_str().unwrap()).unwrap();
            (order["trouble"].as_str().unwrap().to_string(), r["errors"][0]["message"].as_str().unwrap().to_string())
        })
        .collect();
    let expected = [
        ("deep", "script nest output a record that cannot be written as JSON: the value is nested more than 128 lists and maps deep"),
        ("runaway", "it ran longer than 2s, its time limit (raise `limits.max_duration`"),
        ("slow_assert", "failed: it ran longer than 1s, its time limit"),
        ("slow_route", "route rule `slow`: it ran longer than 1s, its time limit"),
    ];
    assert_eq!(why.len(), expected.len(), "{why:?}");
    for (trouble, message) in expected {
        assert!(why.get(trouble).is_some_and(|m| m.contains(message)), "{trouble}: {why:?}");
    }
}
