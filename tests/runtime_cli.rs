//! Black-box tests of the runtime commands: run, send, queues, exceptions.
//!
//! Each test runs the real `switchyard` binary from the repository root with its own data
//! directory (`SWITCHYARD_DATA_DIR`), over the fixture pipelines in `tests/runtime/`. A test that
//! waits for a continuous engine polls with a deadline; it never sleeps to assert on timing.
#![cfg(unix)]

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Longest wait for a running engine to do something.
const DEADLINE: Duration = Duration::from_secs(20);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("repo root").to_path_buf()
}

/// `switchyard` run from the repository root on the data directory `data`.
fn sy(data: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_switchyard"));
    c.current_dir(repo()).env("SWITCHYARD_DATA_DIR", data).env_remove("RUST_LOG").env_remove("SWITCHYARD_DURABILITY");
    c
}

/// What a finished command said.
struct Out {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Out {
    fn of(o: std::process::Output) -> Out {
        Out { code: o.status.code(), stdout: String::from_utf8_lossy(&o.stdout).into(), stderr: String::from_utf8_lossy(&o.stderr).into() }
    }
    fn ok(self, what: &str) -> Out {
        assert_eq!(self.code, Some(0), "{what} succeeds\nstdout: {}\nstderr: {}", self.stdout, self.stderr);
        self
    }
}

fn run(data: &Path, args: &[&str]) -> Out {
    Out::of(sy(data).args(args).output().expect("switchyard runs"))
}

/// `switchyard send [ARGS] -- QUEUE` with `input` on standard input.
fn send_stdin(data: &Path, queue: &str, args: &[&str], input: &str) -> Out {
    use std::io::Write;
    let mut child = sy(data)
        .arg("send")
        .args(args)
        .args(["--", queue])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("switchyard runs");
    // A command that refuses its arguments exits without reading its input.
    if let Err(e) = child.stdin.take().unwrap().write_all(input.as_bytes()) {
        assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe, "writing to `send`: {e}");
    }
    Out::of(child.wait_with_output().unwrap())
}

/// `run PATHS --once`, which must succeed; returns its summary (stderr).
fn run_once(data: &Path, paths: &[&str]) -> String {
    let mut args = vec!["run"];
    args.extend_from_slice(paths);
    args.push("--once");
    run(data, &args).ok("run --once").stderr
}

/// The numbers of the summary's `total:` line: in, routed, exceptions.
fn totals(summary: &str) -> [u64; 3] {
    let total = summary.lines().find(|l| l.starts_with("total:")).unwrap_or_else(|| panic!("a total line in:\n{summary}"));
    let n: Vec<u64> = total.split(|c: char| !c.is_ascii_digit()).filter(|s| !s.is_empty()).map(|s| s.parse().unwrap()).collect();
    [n[0], n[1], n[2]]
}

/// The per-pipeline `in`, `routed` and `exceptions` lines of a summary, added up.
fn pipeline_sums(summary: &str) -> [u64; 3] {
    let mut sums = [0; 3];
    for line in summary.lines() {
        let Some(rest) = line.strip_prefix("  ") else { continue };
        let mut words = rest.split_whitespace();
        let slot = match words.next() {
            Some("in") => 0,
            Some("routed") => 1,
            Some("exceptions") => 2,
            _ => continue,
        };
        sums[slot] += words.next().and_then(|n| n.parse::<u64>().ok()).unwrap_or_else(|| panic!("a count on `{line}`"));
    }
    sums
}

fn ndjson(path: &Path) -> Vec<Value> {
    match std::fs::read_to_string(path) {
        Ok(t) => t
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("an NDJSON line of {}: {e}: {l}", path.display())))
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// The `id`s of the records of an NDJSON output (payloads, or envelopes around them), in order.
fn ids(path: &Path) -> Vec<String> {
    ndjson(path)
        .iter()
        .map(|v| v["id"].as_str().or(v["payload"]["id"].as_str()).unwrap_or_else(|| panic!("an id in {v}")).to_string())
        .collect()
}

fn count(ids: &[String], id: &str) -> usize {
    ids.iter().filter(|i| *i == id).count()
}

fn queues(data: &Path) -> Vec<Value> {
    let out = run(data, &["queues", "--format", "json"]).ok("queues --format json");
    serde_json::from_str::<Value>(&out.stdout).expect("queues JSON").as_array().expect("an array").clone()
}

/// Messages still stored in any queue (ready, in flight or delayed).
fn left_in_queues(data: &Path) -> i64 {
    queues(data).iter().map(|q| q["ready"].as_i64().unwrap() + q["in_flight"].as_i64().unwrap() + q["delayed"].as_i64().unwrap()).sum()
}

/// `exceptions list --format json` with more arguments (the default status is `open`).
fn listed(data: &Path, args: &[&str]) -> Vec<Value> {
    let mut a = vec!["exceptions", "list", "--format", "json"];
    a.extend_from_slice(args);
    let out = run(data, &a).ok("exceptions list");
    serde_json::from_str::<Value>(&out.stdout).expect("list JSON").as_array().expect("an array").clone()
}

fn ids_of(records: &[Value]) -> Vec<String> {
    records.iter().map(|r| r["exception_id"].as_str().unwrap().to_string()).collect()
}

/// The one record of a list with this reason.
fn with_reason<'a>(records: &'a [Value], reason: &str) -> &'a Value {
    let found: Vec<&Value> = records.iter().filter(|r| r["reason"] == reason).collect();
    assert_eq!(found.len(), 1, "one `{reason}` record in {records:#?}");
    found[0]
}

/// A copy of `tests/runtime/<fixture>` in `dir`, so a test can edit it.
fn copy_fixture(fixture: &str, dir: &Path) -> PathBuf {
    let to = dir.join(fixture);
    std::fs::create_dir_all(&to).unwrap();
    for entry in std::fs::read_dir(repo().join("tests/runtime").join(fixture)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
    to
}

/// Adds SKUs to the copied table, with a new table version as an analyst would.
fn add_skus(pipeline_dir: &Path, rows: &[(&str, &str)]) {
    let mut table = String::from("# version: 2\nsku,item_code\nSKU-1,ITM-001\nSKU-2,ITM-002\n");
    for (sku, item) in rows {
        table.push_str(&format!("{sku},{item}\n"));
    }
    std::fs::write(pipeline_dir.join("skus.csv"), table).unwrap();
}

/// Polls `done` until it holds, for at most `DEADLINE`.
fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < DEADLINE, "timed out after {DEADLINE:?} waiting for: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A continuous `switchyard run`; killed if the test ends without stopping it.
struct Engine {
    child: Child,
    stderr: PathBuf,
}

impl Engine {
    fn start(data: &Path, paths: &[&str], envs: &[(&str, &Path)]) -> Engine {
        let stderr = data.with_extension("engine-stderr.txt");
        let mut cmd = sy(data);
        cmd.arg("run").args(paths).stdout(Stdio::null()).stderr(std::fs::File::create(&stderr).unwrap());
        for (k, v) in envs {
            cmd.env(k, v);
        }
        Engine { child: cmd.spawn().expect("switchyard runs"), stderr }
    }

    fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!("the engine stopped by itself ({status}):\n{}", std::fs::read_to_string(&self.stderr).unwrap_or_default());
        }
    }

    /// Sends `signal` (e.g. `-TERM`) with kill(1) and waits for the exit: (exit code, stderr).
    fn stop(mut self, signal: &str) -> (Option<i32>, String) {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill").args([signal, &pid]).status().expect("kill runs");
        assert!(sent.success(), "kill {signal} {pid}");
        let start = Instant::now();
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            assert!(start.elapsed() < DEADLINE, "the engine did not stop within {DEADLINE:?} after {signal}");
            std::thread::sleep(Duration::from_millis(20));
        };
        (status.code(), std::fs::read_to_string(&self.stderr).unwrap_or_default())
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

// ------------------------------------------------------------------ replay

#[test]
fn replay_after_fixing_the_table_delivers_once_and_a_second_replay_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let p = copy_fixture("sku", tmp.path());
    let pipeline = p.to_str().unwrap();
    let output = data.join("out/sku/lines.ndjson");

    send_stdin(&data, "rt.sku.in", &[], "{\"id\":\"1\",\"sku\":\"SKU-1\"}\n{\"id\":\"2\",\"sku\":\"SKU-9\"}\n").ok("send");
    let summary = run_once(&data, &[pipeline]);
    assert_eq!(totals(&summary), [2, 1, 1], "{summary}");
    assert_eq!(ids(&output), ["1"]);

    let open = listed(&data, &[]);
    let record = with_reason(&open, "unknown_sku");
    assert_eq!(record["pipeline"], "rt-sku-orders");
    assert_eq!(record["status"], "open");
    assert_eq!(record["original_payload"], "{\"id\":\"2\",\"sku\":\"SKU-9\"}");
    assert_eq!(record["errors"][0]["pointer"], "/sku");
    let id = record["exception_id"].as_str().unwrap().to_string();

    // The analyst adds the SKU, then replays the record.
    add_skus(&p, &[("SKU-9", "ITM-009")]);
    let replay = run(&data, &["exceptions", "replay", &id]).ok("replay");
    assert!(replay.stdout.contains(&id) && replay.stdout.contains("replayed"), "{}", replay.stdout);
    let waiting = queues(&data);
    let replay_queue = waiting.iter().find(|q| q["queue"] == "_replay" && q["consumer"] == "rt-sku-orders");
    assert_eq!(replay_queue.map(|q| q["ready"].as_i64()), Some(Some(1)), "the replay waits for the pipeline: {waiting:#?}");

    let summary = run_once(&data, &[pipeline]);
    assert_eq!(totals(&summary), [1, 1, 0], "the replayed message goes through the fixed table: {summary}");
    let out = ndjson(&output);
    assert_eq!(ids(&output), ["1", "2"], "the replayed message is delivered once");
    assert_eq!(out[1]["item_code"], "ITM-009");

    // Replaying the same record again is refused and sends nothing.
    let again = run(&data, &["exceptions", "replay", &id]);
    assert_ne!(again.code, Some(0), "a second replay of {id} fails\n{}{}", again.stdout, again.stderr);
    assert!(format!("{}{}", again.stdout, again.stderr).contains("already replayed"), "{}{}", again.stdout, again.stderr);
    let summary = run_once(&data, &[pipeline]);
    assert_eq!(totals(&summary), [0, 0, 0], "{summary}");
    assert_eq!(ids(&output), ["1", "2"], "no second output");
    assert_eq!(left_in_queues(&data), 0);

    // The record stays, with its new status.
    assert!(listed(&data, &[]).is_empty(), "nothing is open any more");
    let all = listed(&data, &["--status", "all"]);
    assert_eq!(ids_of(&all), std::slice::from_ref(&id));
    assert_eq!(all[0]["status"], "replayed");
    assert!(all[0]["status_at"].as_i64().is_some(), "the time of the replay is kept: {}", all[0]);
    assert_eq!(ids_of(&listed(&data, &["--status", "replayed"])), std::slice::from_ref(&id));
    assert!(listed(&data, &["--status", "discarded"]).is_empty());
    let human = run(&data, &["exceptions", "list", "--status", "replayed"]).ok("list");
    assert!(human.stdout.lines().any(|l| l.starts_with(&id) && l.contains("replayed") && l.contains("unknown_sku")), "{}", human.stdout);
}

#[test]
fn replay_by_reason_selects_every_open_record_with_that_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let p = copy_fixture("sku", tmp.path());
    let pipeline = p.to_str().unwrap();
    let output = data.join("out/sku/lines.ndjson");

    let input = [
        "{\"id\":\"a\",\"sku\":\"SKU-7\"}",
        "{\"id\":\"b\",\"sku\":\"SKU-8\"}",
        "{\"id\":\"c\",\"sku\":\"SKU-7\"}",
        "{\"id\":\"d\",\"sku\":\"SKU-6\"}",
        "{\"sku\":\"SKU-1\"}",
    ];
    send_stdin(&data, "rt.sku.in", &[], &(input.join("\n") + "\n")).ok("send");
    let summary = run_once(&data, &[pipeline]);
    assert_eq!(totals(&summary), [5, 0, 5], "{summary}");
    let open = listed(&data, &[]);
    let unknown: Vec<&Value> = open.iter().filter(|r| r["reason"] == "unknown_sku").collect();
    assert_eq!(unknown.len(), 4);
    let missing = with_reason(&open, "missing_required_field")["exception_id"].as_str().unwrap().to_string();

    // SKU-7 and SKU-8 are added; SKU-6 is still unknown.
    add_skus(&p, &[("SKU-7", "ITM-007"), ("SKU-8", "ITM-008")]);
    let replay = run(&data, &["exceptions", "replay", "--reason", "unknown_sku", "--pipeline", "rt-sku-orders"]).ok("replay --reason");
    assert_eq!(replay.stdout.lines().filter(|l| l.ends_with("replayed")).count(), 4, "{}", replay.stdout);
    assert!(!replay.stdout.contains(&missing), "a record with another reason is not selected");

    let summary = run_once(&data, &[pipeline]);
    assert_eq!(totals(&summary), [4, 3, 1], "{summary}");
    let mut delivered = ids(&output);
    delivered.sort();
    assert_eq!(delivered, ["a", "b", "c"]);

    // The message that failed again is a new open record: same message, same bytes, new id.
    let open = listed(&data, &[]);
    assert_eq!(open.len(), 2, "{open:#?}");
    assert!(ids_of(&open).contains(&missing));
    let again = with_reason(&open, "unknown_sku");
    let before = unknown.iter().find(|r| r["message_id"] == again["message_id"]).expect("the same message id as before");
    assert_ne!(again["exception_id"], before["exception_id"]);
    assert_eq!(again["original_payload"], "{\"id\":\"d\",\"sku\":\"SKU-6\"}");
    assert_eq!(listed(&data, &["--status", "replayed"]).len(), 4);

    // A selection that finds no open record does nothing, and says so.
    add_skus(&p, &[("SKU-7", "ITM-007"), ("SKU-8", "ITM-008"), ("SKU-6", "ITM-006")]);
    let none = run(&data, &["exceptions", "replay", "--reason", "unknown_sku", "--pipeline", "rt-fan-a"]);
    assert_ne!(none.code, Some(0));
    assert!(none.stderr.contains("no open exception records match"), "{}", none.stderr);
    run(&data, &["exceptions", "replay", "--reason", "unknown_sku"]).ok("replay the last one");
    let summary = run_once(&data, &[pipeline]);
    assert_eq!(totals(&summary), [1, 1, 0], "{summary}");
    assert_eq!(count(&ids(&output), "d"), 1);
}

#[test]
fn replay_while_running_uses_the_fixed_table() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let p = copy_fixture("sku", tmp.path());
    let output = data.join("out/sku/lines.ndjson");

    let mut engine = Engine::start(&data, &[p.to_str().unwrap()], &[]);
    send_stdin(&data, "rt.sku.in", &[], "{\"id\":\"9\",\"sku\":\"SKU-9\"}\n").ok("send");
    wait_for("the unknown SKU to become an exception", || data.join("switchyard.db").exists() && listed(&data, &[]).len() == 1);
    let record = listed(&data, &[])[0].clone();
    let message_id = record["message_id"].as_str().unwrap().to_string();
    assert_eq!(record["reason"], "unknown_sku");

    // Fixed while the engine runs; `replay` says the running engine processes the message.
    add_skus(&p, &[("SKU-9", "ITM-009")]);
    let replay = run(&data, &["exceptions", "replay", record["exception_id"].as_str().unwrap()]).ok("replay");
    assert!(replay.stderr.contains("running engine"), "{}", replay.stderr);
    wait_for("the running engine to process the replay", || {
        engine.assert_running();
        !ids(&output).is_empty() || listed(&data, &[]).iter().any(|r| r["message_id"] == message_id.as_str())
    });
    let failed_again: Vec<Value> = listed(&data, &[]).into_iter().filter(|r| r["message_id"] == message_id.as_str()).collect();
    let (code, stderr) = engine.stop("-TERM");
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        failed_again.is_empty(),
        "the replay went through the table the engine loaded at start, not the fixed one: {:#?}",
        failed_again.iter().map(|r| (&r["reason"], &r["mapping_versions"])).collect::<Vec<_>>()
    );
    assert_eq!(ids(&output), ["9"]);
}

// ------------------------------------------------------------------ show, discard, list, export

#[test]
fn show_discard_list_filters_and_export() {
    use base64::Engine as _;
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let p = copy_fixture("sku", tmp.path());
    // Bytes as a channel may send them: spaces, a tab, a non-ASCII SKU, trailing blank lines;
    // and a Latin-1 file that is not UTF-8 at all.
    let text = tmp.path().join("odd.json");
    let text_bytes = "{ \"id\" : \"t\",\t\"sku\": \"SKU-é\" }\r\n\n".as_bytes().to_vec();
    std::fs::write(&text, &text_bytes).unwrap();
    let latin1 = tmp.path().join("latin1.json");
    let latin1_bytes = b"{\"id\":\"l\",\"sku\":\"SKU-\xe9\"}".to_vec();
    std::fs::write(&latin1, &latin1_bytes).unwrap();
    run(&data, &["send", "rt.sku.in", text.to_str().unwrap(), latin1.to_str().unwrap()]).ok("send two files");
    send_stdin(&data, "rt.fan", &[], "{\"id\":\"f1\"}\n{\"no_id\":true}\n").ok("send");
    let summary = run_once(&data, &[p.to_str().unwrap(), "tests/runtime/fanout"]);
    // rt.fan: 2 messages, read by rt-fan-a and rt-fan-b.
    assert_eq!(totals(&summary), [2 + 4, 2, 2 + 2], "{summary}");

    let all = listed(&data, &["--status", "all"]);
    assert_eq!(all.len(), 4, "{all:#?}");
    let sku = listed(&data, &["--pipeline", "rt-sku-orders"]);
    let unknown = with_reason(&sku, "unknown_sku");
    let invalid = with_reason(&sku, "invalid_json");
    let unknown_id = unknown["exception_id"].as_str().unwrap().to_string();
    let invalid_id = invalid["exception_id"].as_str().unwrap().to_string();

    // `show`: the full record, the original bytes exactly.
    let shown = run(&data, &["exceptions", "show", &unknown_id]).ok("show");
    let shown: Value = serde_json::from_str(&shown.stdout).expect("show prints one JSON record");
    assert_eq!(shown["exception_id"], unknown_id.as_str());
    assert_eq!(shown["status"], "open");
    for key in ["pipeline", "pipeline_version", "stage", "reason", "errors", "hint", "message_id", "correlation_id", "failed_at", "origin"]
    {
        assert!(shown.get(key).is_some_and(|v| !v.is_null()), "`{key}` in {shown:#}");
    }
    assert_eq!(shown["hint"], "Add the SKU to skus.csv, then replay.");
    assert_eq!(shown["original_payload"].as_str().unwrap().as_bytes(), &text_bytes[..], "byte for byte");
    assert_eq!(shown, *unknown, "show and list give the same record");
    let shown = run(&data, &["exceptions", "show", &invalid_id]).ok("show");
    let shown: Value = serde_json::from_str(&shown.stdout).unwrap();
    assert!(shown.get("original_payload").is_none(), "bytes that are not UTF-8 are not given as text: {shown:#}");
    let decoded = base64::engine::general_purpose::STANDARD.decode(shown["original_payload_base64"].as_str().unwrap()).unwrap();
    assert_eq!(decoded, latin1_bytes, "byte for byte");

    // Filters.
    let by_all = listed(&data, &["--pipeline", "rt-sku-orders", "--reason", "unknown_sku", "--since", "1h"]);
    assert_eq!(ids_of(&by_all), std::slice::from_ref(&unknown_id));
    assert_eq!(listed(&data, &["--reason", "missing_required_field"]).len(), 2, "one per fan-out reader");
    let fan_a = listed(&data, &["--pipeline", "rt-fan-a"]);
    assert_eq!(fan_a.len(), 1);
    assert_eq!(fan_a[0]["original_payload"], "{\"no_id\":true}");
    assert_eq!(listed(&data, &["--since", "2000-01-01"]).len(), 4);
    assert!(listed(&data, &["--since", "2999-01-01T00:00:00Z"]).is_empty(), "nothing failed in the future");
    assert!(listed(&data, &["--pipeline", "no-such-pipeline"]).is_empty());
    assert_eq!(listed(&data, &["--limit", "1"]).len(), 1);
    let bad = run(&data, &["exceptions", "list", "--since", "last tuesday"]);
    assert_eq!(bad.code, Some(2), "{}", bad.stderr);
    assert!(bad.stderr.contains("--since"), "{}", bad.stderr);
    let bad = run(&data, &["exceptions", "list", "--status", "closed"]);
    assert_eq!(bad.code, Some(2), "{}", bad.stderr);

    // Discard closes a record; it cannot be replayed or discarded again.
    let discard = run(&data, &["exceptions", "discard", &invalid_id]).ok("discard");
    assert!(discard.stdout.contains("discarded"), "{}", discard.stdout);
    assert!(!ids_of(&listed(&data, &[])).contains(&invalid_id), "a discarded record is not open");
    assert_eq!(ids_of(&listed(&data, &["--status", "discarded"])), std::slice::from_ref(&invalid_id));
    let shown: Value = serde_json::from_str(&run(&data, &["exceptions", "show", &invalid_id]).ok("show").stdout).unwrap();
    assert_eq!(shown["status"], "discarded");
    let replay = run(&data, &["exceptions", "replay", &invalid_id]);
    assert_ne!(replay.code, Some(0));
    assert!(format!("{}{}", replay.stdout, replay.stderr).contains("already discarded"), "{}{}", replay.stdout, replay.stderr);
    let again = run(&data, &["exceptions", "discard", &invalid_id]);
    assert_ne!(again.code, Some(0));
    assert!(!queues(&data).iter().any(|q| q["queue"] == "_replay"), "nothing was queued for replay");

    // Unknown ids and missing selectors are refused, and change nothing.
    for cmd in ["show", "replay", "discard"] {
        let out = run(&data, &["exceptions", cmd, "01234567-no-such-record"]);
        assert_ne!(out.code, Some(0), "{cmd} of an unknown id fails");
        assert!(out.stderr.contains("no exception record `01234567-no-such-record`"), "{cmd}: {}", out.stderr);
    }
    for cmd in ["replay", "discard"] {
        let out = run(&data, &["exceptions", cmd]);
        assert_eq!(out.code, Some(2), "{cmd} without a selector is refused: {}", out.stderr);
        assert!(out.stderr.contains("say which records"), "{}", out.stderr);
    }
    assert_eq!(listed(&data, &[]).len(), 3, "still open: the unknown SKU and the two missing ids");

    // Export: one JSON record per line on stdout, every status unless asked.
    let export = run(&data, &["exceptions", "export"]).ok("export");
    let lines: Vec<Value> = export.stdout.lines().map(|l| serde_json::from_str(l).expect("one JSON record per line")).collect();
    assert_eq!(lines.len(), 4);
    assert_eq!(ids_of(&lines), ids_of(&listed(&data, &["--status", "all"])));
    assert!(lines.iter().any(|r| r["status"] == "discarded") && lines.iter().any(|r| r["status"] == "open"));
    let export = run(&data, &["exceptions", "export", "--status", "open", "--pipeline", "rt-sku-orders"]).ok("export");
    let lines: Vec<Value> = export.stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(ids_of(&lines), [unknown_id]);
    assert_eq!(lines[0]["original_payload"].as_str().unwrap().as_bytes(), &text_bytes[..]);
}

// ------------------------------------------------------------------ send, queues, fan-out

#[test]
fn send_fans_out_to_every_reader_and_waiting_messages_go_to_the_first_readers() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let (a, b) = (data.join("out/fan/a.ndjson"), data.join("out/fan/b.ndjson"));

    // Before any pipeline ran: NDJSON on stdin (blank lines skipped), a CSV file (one per row),
    // and a message for the relay, whose queue sink writes rt.fan.
    let sent = send_stdin(&data, "rt.fan", &[], "{\"id\":\"s1\"}\n\n{\"id\":\"s2\"}\r\n").ok("send stdin");
    assert!(sent.stderr.contains("sent 2 message(s)") && sent.stderr.contains("wait for the first"), "{}", sent.stderr);
    let csv = tmp.path().join("rows.csv");
    std::fs::write(&csv, "id,name\nc1,plain\nc2,\"with, comma\"\nc3,\"two\nlines\"\n").unwrap();
    let sent = run(&data, &["send", "rt.fan", csv.to_str().unwrap()]).ok("send CSV");
    assert!(sent.stderr.contains("sent 3 message(s)"), "{}", sent.stderr);
    let sent = send_stdin(&data, "rt.fan", &["--format", "csv"], "id\nc4\n").ok("send CSV on stdin");
    assert!(sent.stderr.contains("sent 1 message(s)"), "{}", sent.stderr);
    send_stdin(&data, "rt.relay", &[], "{\"id\":\"r1\"}\n").ok("send to the relay");

    let waiting = queues(&data);
    let fan: Vec<&Value> = waiting.iter().filter(|q| q["queue"] == "rt.fan").collect();
    assert_eq!(fan.len(), 1, "{waiting:#?}");
    assert_eq!((fan[0]["consumer"].as_str(), fan[0]["ready"].as_i64()), (Some(""), Some(6)), "they wait for a first reader");
    let human = run(&data, &["queues"]).ok("queues");
    assert!(human.stdout.lines().any(|l| l.starts_with("rt.fan ") && l.contains("(none yet)") && l.contains(" 6 ")), "{}", human.stdout);

    let summary = run_once(&data, &["tests/runtime/fanout"]);
    let [i, r, e] = totals(&summary);
    assert_eq!((i, r, e), (1 + 7 + 7, 15, 0), "{summary}");
    assert_eq!(pipeline_sums(&summary), [i, r, e], "the per-pipeline counts add up to the total: {summary}");
    let expected = ["c1", "c2", "c3", "c4", "relayed-r1", "s1", "s2"];
    for out in [&a, &b] {
        let mut got = ids(out);
        got.sort();
        assert_eq!(got, expected, "{} gets every message once", out.display());
    }
    assert_eq!(left_in_queues(&data), 0);

    // Now that both read rt.fan, `send` says who reads it, and each gets the new message.
    let sent = send_stdin(&data, "rt.fan", &[], "{\"id\":\"later\"}\n").ok("send");
    assert!(sent.stderr.contains("read by: rt-fan-a, rt-fan-b"), "{}", sent.stderr);
    let ready: Vec<(String, i64)> = queues(&data)
        .iter()
        .filter(|q| q["queue"] == "rt.fan" && q["ready"].as_i64() != Some(0))
        .map(|q| (q["consumer"].as_str().unwrap().to_string(), q["ready"].as_i64().unwrap()))
        .collect();
    assert_eq!(ready, [("rt-fan-a".to_string(), 1), ("rt-fan-b".to_string(), 1)]);
    let summary = run_once(&data, &["tests/runtime/fanout"]);
    assert_eq!(totals(&summary), [2, 2, 0], "{summary}");
    assert_eq!((count(&ids(&a), "later"), count(&ids(&b), "later")), (1, 1));
}

#[test]
fn a_reader_that_joins_later_gets_only_what_is_sent_after_it_joined() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    send_stdin(&data, "rt.fan", &[], "{\"id\":\"early\"}\n").ok("send");
    let summary = run_once(&data, &["tests/runtime/fanout/rt-fan-a.yaml"]);
    assert_eq!(totals(&summary), [1, 1, 0], "the first reader takes the waiting message: {summary}");
    send_stdin(&data, "rt.fan", &[], "{\"id\":\"between\"}\n").ok("send");
    run_once(&data, &["tests/runtime/fanout/rt-fan-b.yaml"]);
    send_stdin(&data, "rt.fan", &[], "{\"id\":\"last\"}\n").ok("send");
    run_once(&data, &["tests/runtime/fanout"]);
    assert_eq!(ids(&data.join("out/fan/a.ndjson")), ["early", "between", "last"]);
    assert_eq!(ids(&data.join("out/fan/b.ndjson")), ["last"]);
}

#[test]
fn queues_shows_no_waiting_stream_once_a_queue_has_readers() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    send_stdin(&data, "rt.fan", &[], "{\"id\":\"x\"}\n").ok("send");
    run_once(&data, &["tests/runtime/fanout"]);
    let listed = queues(&data);
    let fan: Vec<&str> = listed.iter().filter(|q| q["queue"] == "rt.fan").map(|q| q["consumer"].as_str().unwrap()).collect();
    assert_eq!(fan, ["rt-fan-a", "rt-fan-b"], "rt.fan is read by two pipelines; no `(none yet)` stream is left: {listed:#?}");
    let human = run(&data, &["queues"]).ok("queues");
    assert!(!human.stdout.contains("(none yet)"), "{}", human.stdout);
}

#[test]
fn invalid_queue_names_are_refused_and_create_no_store() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    for name in ["Orders", "_replay", "_inbox.rt-fan-a", "", ".orders", "-orders", "orders canonical", "orders/eu", "commandes-é"] {
        let out = send_stdin(&data, name, &[], "{\"id\":\"1\"}\n");
        assert_eq!(out.code, Some(2), "`{name}` is refused: {}", out.stderr);
        assert!(out.stderr.contains("not a valid queue name"), "{}", out.stderr);
    }
    assert!(!data.join("switchyard.db").exists(), "a refused send creates no store");
    let ok = send_stdin(&data, "orders.canonical_v2-eu", &[], "{\"id\":\"1\"}\n").ok("a valid name");
    assert!(ok.stderr.contains("sent 1 message(s) to `orders.canonical_v2-eu`"), "{}", ok.stderr);
}

#[test]
fn commands_that_only_look_need_an_existing_store() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("nothing-here");
    let looks: [&[&str]; 5] =
        [&["queues"], &["queues", "--format", "json"], &["exceptions", "list"], &["exceptions", "export"], &["exceptions", "show", "x"]];
    for args in looks {
        let out = run(&data, args);
        assert_eq!(out.code, Some(2), "{args:?} on a data directory without a store: {}", out.stderr);
        assert!(out.stderr.contains("no store") && out.stderr.contains(data.to_str().unwrap()), "{args:?}: {}", out.stderr);
        assert!(out.stdout.is_empty(), "{args:?} prints nothing on stdout: {}", out.stdout);
    }
    assert!(!data.exists(), "looking creates nothing");
}

#[test]
fn a_send_that_fails_on_a_file_does_not_send_the_others_silently() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let good = tmp.path().join("good.ndjson");
    std::fs::write(&good, "{\"id\":\"g1\"}\n{\"id\":\"g2\"}\n").unwrap();
    let missing = tmp.path().join("missing.ndjson");
    let out = run(&data, &["send", "rt.fan", good.to_str().unwrap(), missing.to_str().unwrap()]);
    assert_ne!(out.code, Some(0), "a file that cannot be read fails the send");
    assert!(out.stderr.contains("missing.ndjson"), "{}", out.stderr);
    // Sending again after fixing the command must not duplicate: either nothing was sent, or
    // the command says what it already sent.
    let stored: i64 = if data.join("switchyard.db").exists() { left_in_queues(&data) } else { 0 };
    assert!(
        stored == 0 || out.stderr.contains(&format!("sent {stored} message(s)")),
        "{stored} message(s) of good.ndjson were sent, and the error does not say so: {}",
        out.stderr
    );
}

// ------------------------------------------------------------------ continuous run

#[test]
fn a_continuous_run_processes_sends_and_new_files_until_sigterm() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let inbox = tmp.path().join("inbox");
    std::fs::create_dir_all(&inbox).unwrap();
    std::fs::write(inbox.join("a.ndjson"), "{\"id\":\"f1\"}\n{\"id\":\"f2\"}\n").unwrap();
    let (files, live) = (data.join("out/watch/files.ndjson"), data.join("out/watch/live.ndjson"));

    let mut engine = Engine::start(&data, &["tests/runtime/watch"], &[("RT_WATCH_DIR", &inbox)]);
    wait_for("the files already there", || {
        engine.assert_running();
        ids(&files).len() == 2
    });

    // Messages sent while it runs.
    let sent = send_stdin(&data, "rt.live", &[], "{\"id\":\"l1\"}\n{\"id\":\"l2\"}\n{\"no_id\":1}\n").ok("send");
    assert!(sent.stderr.contains("read by: rt-watch-queue"), "{}", sent.stderr);
    wait_for("the sent messages", || {
        engine.assert_running();
        ids(&live).len() == 2 && listed(&data, &[]).len() == 1
    });
    assert_eq!(listed(&data, &[])[0]["reason"], "missing_required_field");

    // A file dropped into the folder (written under a hidden name, then renamed).
    std::fs::write(inbox.join(".b.ndjson.part"), "{\"id\":\"f3\"}\n").unwrap();
    std::fs::rename(inbox.join(".b.ndjson.part"), inbox.join("b.ndjson")).unwrap();
    wait_for("the new file", || {
        engine.assert_running();
        ids(&files).len() == 3
    });
    wait_for("empty queues", || left_in_queues(&data) == 0);

    let (code, stderr) = engine.stop("-TERM");
    assert_eq!(code, Some(0), "SIGTERM stops cleanly: {stderr}");
    assert!(stderr.contains("stopping"), "{stderr}");
    let [i, r, e] = totals(&stderr);
    assert_eq!((i, r, e), (6, 5, 1), "{stderr}");
    assert_eq!(pipeline_sums(&stderr), [i, r, e], "the per-pipeline counts add up to the total: {stderr}");
    assert!(stderr.contains("ingested         3"), "three lines read from two files: {stderr}");
    assert_eq!(ids(&files), ["f1", "f2", "f3"], "each file line once");
    assert_eq!(ids(&live), ["l1", "l2"]);
    assert_eq!(left_in_queues(&data), 0, "nothing left in the queues");

    // Started again, it finds nothing new; SIGINT stops it as cleanly.
    let mut engine = Engine::start(&data, &["tests/runtime/watch"], &[("RT_WATCH_DIR", &inbox)]);
    send_stdin(&data, "rt.live", &[], "{\"id\":\"l3\"}\n").ok("send");
    wait_for("the message sent to the second engine", || {
        engine.assert_running();
        ids(&live).len() == 3
    });
    let (code, stderr) = engine.stop("-INT");
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(totals(&stderr), [1, 1, 0], "the files are not read again: {stderr}");
    assert_eq!(ids(&files), ["f1", "f2", "f3"]);
}

#[test]
fn a_file_copied_slowly_into_a_watched_folder_is_read_once_whole() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let inbox = tmp.path().join("inbox");
    std::fs::create_dir_all(&inbox).unwrap();
    let files = data.join("out/watch/files.ndjson");
    let mut engine = Engine::start(&data, &["tests/runtime/watch/rt-watch-files.yaml"], &[("RT_WATCH_DIR", &inbox)]);
    wait_for("the engine to open its store", || {
        engine.assert_running();
        data.join("switchyard.db").exists()
    });

    // A copy that takes a moment (as `cp` of a large export does): half a line, then the rest.
    // The pause only makes the copy slow; nothing is asserted on its length.
    use std::io::Write;
    let path = inbox.join("export.ndjson");
    let mut f = std::fs::File::create(&path).unwrap();
    f.write_all(b"{\"id\":\"p1\"}\n{\"id\":\"p").unwrap();
    f.flush().unwrap();
    std::thread::sleep(Duration::from_millis(1000));
    f.write_all(b"2\"}\n").unwrap();
    drop(f);
    wait_for("the whole file", || {
        engine.assert_running();
        ids(&files).contains(&"p2".to_string())
    });
    wait_for("empty queues", || left_in_queues(&data) == 0);
    let (code, stderr) = engine.stop("-TERM");
    assert_eq!(code, Some(0), "{stderr}");
    let exceptions = listed(&data, &["--status", "all"]);
    assert!(
        exceptions.is_empty(),
        "a file still being written was read half: {:?}",
        exceptions.iter().map(|r| (&r["reason"], &r["original_payload"])).collect::<Vec<_>>()
    );
    assert_eq!(ids(&files), ["p1", "p2"], "each line of the file once");
}

// ------------------------------------------------------------------ file checkpoints

#[test]
fn a_second_run_skips_read_files_reads_appended_lines_on_and_reads_a_rewritten_file_again() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let inbox = tmp.path().join("inbox");
    std::fs::create_dir_all(&inbox).unwrap();
    std::fs::write(inbox.join("a.ndjson"), "{\"id\":\"a1\"}\n{\"id\":\"a2\"}\n").unwrap();
    std::fs::write(inbox.join("b.ndjson"), "{\"id\":\"b1\"}\n").unwrap();
    std::fs::write(inbox.join("notes.txt"), "not matched by the pattern\n").unwrap();
    let output = data.join("out/watch/files.ndjson");
    let once = || -> String {
        let out =
            sy(&data).args(["run", "tests/runtime/watch/rt-watch-files.yaml", "--once"]).env("RT_WATCH_DIR", &inbox).output().unwrap();
        Out::of(out).ok("run --once").stderr
    };

    let first = once();
    assert_eq!(totals(&first), [3, 3, 0], "{first}");
    let second = once();
    assert_eq!(totals(&second), [0, 0, 0], "nothing is read twice: {second}");
    assert!(!second.contains("ingested"), "{second}");
    assert_eq!(ids(&output), ["a1", "a2", "b1"]);

    // Touched, same content: nothing new to read.
    let a = std::fs::File::options().write(true).open(inbox.join("a.ndjson")).unwrap();
    let modified = a.metadata().unwrap().modified().unwrap();
    a.set_modified(modified + Duration::from_secs(5)).unwrap();
    drop(a);
    let touched = once();
    assert_eq!(totals(&touched), [0, 0, 0], "{touched}");
    // A line appended: read on from where it was.
    std::fs::write(inbox.join("b.ndjson"), "{\"id\":\"b1\"}\n{\"id\":\"b2\"}\n").unwrap();
    let appended = once();
    assert_eq!(totals(&appended), [1, 1, 0], "{appended}");
    // Rewritten: a new version, read whole.
    std::fs::write(inbox.join("a.ndjson"), "{\"id\":\"a9\"}\n{\"id\":\"a2\"}\n").unwrap();
    let rewritten = once();
    assert_eq!(totals(&rewritten), [2, 2, 0], "{rewritten}");
    assert_eq!(totals(&once()), [0, 0, 0]);
    assert_eq!(ids(&output), ["a1", "a2", "b1", "b2", "a9", "a2"]);
}

#[test]
fn checkpoints_do_not_depend_on_how_the_pipeline_is_named_or_the_working_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let relative = "tests/runtime/files/rt-relative-files.yaml";
    let absolute = repo().join(relative);
    let first = run_once(&data, &[relative]);
    assert_eq!(totals(&first), [2, 2, 0], "{first}");

    // The same pipeline and the same files, named by an absolute path.
    let again = run_once(&data, &[absolute.to_str().unwrap()]);
    // Started from the pipeline's own folder.
    let from_folder = Out::of(
        sy(&data).current_dir(repo().join("tests/runtime/files")).args(["run", "rt-relative-files.yaml", "--once"]).output().unwrap(),
    )
    .ok("run --once from the pipeline's folder")
    .stderr;
    assert_eq!((totals(&again), totals(&from_folder)), ([0, 0, 0], [0, 0, 0]), "the files were already read:\n{again}\n{from_folder}");
    assert_eq!(ids(&data.join("out/relative/files.ndjson")), ["r1", "r2"], "each line delivered once");
}

/// The count on a pipeline's `word` line of a run summary (0 when the line is not there).
fn summary_count(summary: &str, pipeline: &str, word: &str) -> u64 {
    let mut inside = false;
    for line in summary.lines() {
        if !line.starts_with(' ') {
            inside = line.starts_with(&format!("{pipeline} "));
            continue;
        }
        if let Some(rest) = line.trim_start().strip_prefix(word).filter(|r| inside && r.starts_with(' ')) {
            return rest.split_whitespace().next().and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("a count on `{line}`"));
        }
    }
    0
}

const IDEM: &str = "tests/runtime/idempotency";

#[test]
fn duplicates_are_dropped_and_counted_and_only_delivered_keys_are_remembered() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let orders = data.join("out/idem/orders.ndjson");
    let pipeline = &format!("{IDEM}/idem-orders.yaml");
    // a1 twice in one batch, a2 twice, a3 without a total (its mapping fails).
    let sent = "{\"id\":\"a1\",\"total\":\"10.00\"}\n{\"id\":\"a2\",\"total\":\"5\"}\n{\"id\":\"a1\",\"total\":\"10.00\",\"note\":\"resent\"}\n\
                {\"id\":\"a3\"}\n{\"id\":\"a2\",\"total\":\"5\"}\n";
    send_stdin(&data, "idem.in", &[], sent).ok("send");
    let summary = run_once(&data, &[pipeline]);
    assert_eq!(totals(&summary), [5, 2, 1], "{summary}");
    assert_eq!(summary_count(&summary, "idem-orders", "duplicates"), 2, "{summary}");
    assert!(summary.contains("total: 5 in = 2 routed + 1 exceptions + 2 duplicates"), "the counts add up: {summary}");
    assert_eq!(ids(&orders), ["a1", "a2"]);
    let first = &ndjson(&orders)[0];
    assert_eq!(first["metadata"]["idempotency_key"], "shop:a1", "the key travels with the output: {first}");
    assert!(first["payload"]["note"].is_null(), "the first delivery wins, not the resent one: {first}");
    let canonical: i64 = queues(&data).iter().filter(|q| q["queue"] == "idem.canonical").map(|q| q["ready"].as_i64().unwrap()).sum();
    assert_eq!(canonical, 2, "the queue sink got each order once");

    // A later run: a1 was delivered (still a duplicate); a3 failed before, so its key was never
    // recorded and the corrected order goes through.
    send_stdin(&data, "idem.in", &[], "{\"id\":\"a1\",\"total\":\"10.00\"}\n{\"id\":\"a3\",\"total\":\"7.50\"}\n").ok("send again");
    let summary = run_once(&data, &[pipeline]);
    assert_eq!(totals(&summary), [2, 1, 0], "{summary}");
    assert_eq!(summary_count(&summary, "idem-orders", "duplicates"), 1, "{summary}");
    assert_eq!(ids(&orders), ["a1", "a2", "a3"]);

    // An operator re-posts a1 on purpose: look it up, forget it, send it again.
    assert_eq!(run(&data, &["keys", "show", "idem-orders", "shop:a1"]).code, Some(0));
    assert_eq!(run(&data, &["keys", "show", "idem-orders", "shop:zz"]).code, Some(1));
    let forgot = run(&data, &["keys", "forget", "idem-orders", "shop:a1"]).ok("keys forget");
    assert!(forgot.stdout.contains("the next copy of its message is delivered"), "{}", forgot.stdout);
    assert_eq!(run(&data, &["keys", "show", "idem-orders", "shop:a1"]).code, Some(1));
    send_stdin(&data, "idem.in", &[], "{\"id\":\"a1\",\"total\":\"10.00\"}\n").ok("send a1 again");
    assert_eq!(totals(&run_once(&data, &[pipeline])), [1, 1, 0]);
    assert_eq!(ids(&orders), ["a1", "a2", "a3", "a1"]);
}

#[test]
fn a_key_is_forgotten_after_its_retention() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let pipeline = &format!("{IDEM}/idem-orders.yaml");
    let once = || Out::of(sy(&data).env("IDEM_RETENTION", "1s").args(["run", pipeline, "--once"]).output().unwrap()).ok("run").stderr;
    send_stdin(&data, "idem.in", &[], "{\"id\":\"b1\",\"total\":\"1\"}\n").ok("send");
    assert_eq!(totals(&once()), [1, 1, 0]);
    std::thread::sleep(Duration::from_millis(1200));
    send_stdin(&data, "idem.in", &[], "{\"id\":\"b1\",\"total\":\"1\"}\n").ok("send again");
    let summary = once();
    assert_eq!((totals(&summary), summary_count(&summary, "idem-orders", "duplicates")), ([1, 1, 0], 0), "{summary}");
    assert_eq!(ids(&data.join("out/idem/orders.ndjson")), ["b1", "b1"]);
}

#[test]
fn duplicates_can_go_to_an_audit_sink_instead_of_being_dropped() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    send_stdin(&data, "idem.audit.in", &[], "{\"id\":\"p1\"}\n{\"id\":\"p1\",\"again\":true}\n{\"id\":\"p2\"}\n").ok("send");
    let summary = run_once(&data, &[&format!("{IDEM}/idem-audit.yaml")]);
    assert_eq!(totals(&summary), [3, 2, 0], "{summary}");
    assert_eq!(summary_count(&summary, "idem-audit", "duplicates"), 1, "{summary}");
    assert_eq!(ids(&data.join("out/idem/audit-orders.ndjson")), ["p1", "p2"]);
    let audit = ndjson(&data.join("out/idem/audit-duplicates.ndjson"));
    assert_eq!(audit.len(), 1, "{audit:?}");
    assert_eq!((&audit[0]["payload"]["again"], &audit[0]["metadata"]["idempotency_key"]), (&Value::Bool(true), &Value::from("po:p1")));
}

#[test]
fn a_downstream_pipeline_stops_duplicates_by_the_key_its_upstream_gave() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let paths = [format!("{IDEM}/idem-relay.yaml"), format!("{IDEM}/idem-downstream.yaml")];
    let paths: Vec<&str> = paths.iter().map(String::as_str).collect();
    // The relay does not stop duplicates: both x1 reach the downstream pipeline, keyed `erp:x1`.
    send_stdin(&data, "idem.relay.in", &[], "{\"id\":\"x1\"}\n{\"id\":\"x1\"}\n{\"id\":\"x2\"}\n").ok("send");
    let summary = run_once(&data, &paths);
    assert_eq!(summary_count(&summary, "idem-relay", "routed"), 3, "{summary}");
    assert_eq!(summary_count(&summary, "idem-downstream", "duplicates"), 1, "{summary}");
    assert_eq!(ids(&data.join("out/idem/posted.ndjson")), ["x1", "x2"]);

    // A message sent straight to its queue has no key: it cannot be checked, so it is an
    // exception, not a silent delivery.
    send_stdin(&data, "idem.keyed", &[], "{\"id\":\"x3\"}\n").ok("send without a key");
    let summary = run_once(&data, &paths);
    assert_eq!(totals(&summary), [1, 0, 1], "{summary}");
    let record = with_reason(&listed(&data, &["--pipeline", "idem-downstream"]), "missing_idempotency_key").clone();
    assert!(record["errors"][0]["message"].as_str().unwrap().contains("envelope.idempotency_key"), "{record}");
}

/// A PostgreSQL schema of a test's own, as a `--store` URL; `None` (with a `skipped:` line)
/// without PostgreSQL.
struct SharedStore {
    url: String,
}

impl SharedStore {
    fn new(tag: &str) -> Option<SharedStore> {
        let url = switchyard::store::test_postgres_url()?;
        let unique = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() % 1_000_000;
        Some(SharedStore { url: format!("{url}?schema=sy_{tag}_{}_{unique}", std::process::id()) })
    }

    fn drop_schema(&self) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async { switchyard::store::PostgresStore::connect(&self.url).await.unwrap().drop_schema().await.unwrap() });
    }
}

#[test]
fn engines_with_their_own_data_directories_share_keys_through_postgresql() {
    let Some(store) = SharedStore::new("cli") else { return };
    let shared = store.url.clone();
    let tmp = tempfile::tempdir().unwrap();
    let (a, b, alone) = (tmp.path().join("a"), tmp.path().join("b"), tmp.path().join("alone"));
    let pipeline = &format!("{IDEM}/idem-orders.yaml");
    let once = |data: &Path, store: Option<&str>| {
        let mut c = sy(data);
        c.args(["run", pipeline, "--once"]);
        if let Some(s) = store {
            c.env("SWITCHYARD_STORE", s);
        }
        Out::of(c.output().unwrap()).ok("run --once").stderr
    };
    // The same order reached two machines (a webhook retried onto another node).
    send_stdin(&a, "idem.in", &[], "{\"id\":\"c1\",\"total\":\"1\"}\n{\"id\":\"c2\",\"total\":\"2\"}\n").ok("send to a");
    send_stdin(&b, "idem.in", &[], "{\"id\":\"c2\",\"total\":\"2\"}\n{\"id\":\"c3\",\"total\":\"3\"}\n").ok("send to b");
    send_stdin(&alone, "idem.in", &[], "{\"id\":\"c2\",\"total\":\"2\"}\n").ok("send to alone");
    assert_eq!(totals(&once(&a, Some(&shared))), [2, 2, 0]);
    let on_b = once(&b, Some(&shared));
    assert_eq!((totals(&on_b), summary_count(&on_b, "idem-orders", "duplicates")), ([2, 1, 0], 1), "{on_b}");
    assert_eq!(ids(&a.join("out/idem/orders.ndjson")), ["c1", "c2"]);
    assert_eq!(ids(&b.join("out/idem/orders.ndjson")), ["c3"], "c2 was delivered by the other engine");
    // An engine on its own store does not know what the others delivered.
    assert_eq!(totals(&once(&alone, None)), [1, 1, 0]);

    // A wrong password or host is said at start, without the password.
    let refused =
        Out::of(sy(&a).env("SWITCHYARD_STORE", "postgres://app:s3cret@127.0.0.1:1/db").args(["run", pipeline, "--once"]).output().unwrap());
    assert_eq!(refused.code, Some(1), "{}", refused.stderr);
    assert!(refused.stderr.contains("app:***@127.0.0.1:1") && !refused.stderr.contains("s3cret"), "{}", refused.stderr);

    store.drop_schema();
}

#[test]
fn exception_records_of_several_engines_are_kept_listed_and_replayed_through_postgresql() {
    let Some(store) = SharedStore::new("exc") else { return };
    let shared = store.url.clone();
    let tmp = tempfile::tempdir().unwrap();
    let (a, b, desk) = (tmp.path().join("a"), tmp.path().join("b"), tmp.path().join("analyst"));
    let p = copy_fixture("sku", tmp.path());
    let pipeline = p.to_str().unwrap();
    let with_store = |data: &Path, args: &[&str]| Out::of(sy(data).env("SWITCHYARD_STORE", &shared).args(args).output().unwrap());
    let once = |data: &Path| with_store(data, &["run", pipeline, "--once"]).ok("run --once").stderr;

    // Two machines, each with its own data directory, each gets an order line with an unknown SKU.
    send_stdin(&a, "rt.sku.in", &[], "{\"id\":\"1\",\"sku\":\"SKU-1\"}\n{\"id\":\"2\",\"sku\":\"SKU-9\"}\n").ok("send to a");
    send_stdin(&b, "rt.sku.in", &[], "{\"id\":\"3\",\"sku\":\"SKU-8\"}\n").ok("send to b");
    let on_a = once(&a);
    assert_eq!(totals(&on_a), [2, 1, 1], "{on_a}");
    assert!(on_a.contains("the shared store"), "the summary says where the records went: {on_a}");
    assert_eq!(totals(&once(&b)), [1, 0, 1]);
    assert!(listed(&a, &[]).is_empty() && listed(&b, &[]).is_empty(), "the records are not in the data directories");

    // An analyst on a third machine, with no data directory, sees both and replays them after
    // adding the SKUs.
    let list = with_store(&desk, &["exceptions", "list", "--format", "json"]).ok("exceptions list");
    let open: Vec<Value> = serde_json::from_str::<Value>(&list.stdout).unwrap().as_array().unwrap().clone();
    let mut payloads: Vec<&str> = open.iter().map(|r| r["original_payload"].as_str().unwrap()).collect();
    payloads.sort();
    assert_eq!(payloads, ["{\"id\":\"2\",\"sku\":\"SKU-9\"}", "{\"id\":\"3\",\"sku\":\"SKU-8\"}"]);
    assert!(open.iter().all(|r| r["reason"] == "unknown_sku" && r["status"] == "open" && r["hint"].as_str().is_some()), "{open:#?}");
    let id = open[0]["exception_id"].as_str().unwrap();
    let shown = with_store(&desk, &["exceptions", "show", id]).ok("exceptions show");
    assert!(shown.stdout.contains(id) && shown.stdout.contains("unknown_sku"), "{}", shown.stdout);
    add_skus(&p, &[("SKU-8", "ITM-008"), ("SKU-9", "ITM-009")]);
    let replay = with_store(&desk, &["exceptions", "replay", "--reason", "unknown_sku"]).ok("replay");
    assert_eq!(replay.stdout.lines().filter(|l| l.ends_with("replayed")).count(), 2, "{}", replay.stdout);
    assert!(!desk.join("switchyard.db").exists(), "replaying from a shared store needs no data directory");

    // Whichever engine runs the pipeline next takes the replays, once.
    let on_b = once(&b);
    assert_eq!(totals(&on_b), [2, 2, 0], "the replays go through the fixed table on b: {on_b}");
    let mut out = ids(&b.join("out/sku/lines.ndjson"));
    out.sort();
    assert_eq!(out, ["2", "3"]);
    assert_eq!(totals(&once(&a)), [0, 0, 0], "a replay is taken by one engine only");
    let again = with_store(&desk, &["exceptions", "replay", id]);
    assert!(again.code != Some(0) && again.stdout.contains("already replayed"), "{}{}", again.stdout, again.stderr);
    let replayed = with_store(&desk, &["exceptions", "export", "--status", "replayed"]).ok("export");
    assert_eq!(replayed.stdout.lines().count(), 2, "{}", replayed.stdout);

    store.drop_schema();
}

const ORD: &str = "tests/runtime/ordering/ord-orders.yaml";

#[test]
fn stale_events_are_dropped_and_an_event_without_its_predecessor_waits_then_fails() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let events = data.join("out/ord/events.ndjson");
    let seqs =
        || ndjson(&events).iter().map(|e| (e["order_id"].as_str().unwrap().to_string(), e["seq"].as_i64().unwrap())).collect::<Vec<_>>();
    let once = || Out::of(sy(&data).env("ORD_WAIT", "2s").args(["run", ORD, "--once"]).output().unwrap()).ok("run").stderr;
    // o1: 1, 3, then 2 (older than 3: stale); o2: a cancellation whose order never comes.
    let sent = "{\"order_id\":\"o1\",\"seq\":1,\"kind\":\"created\"}\n{\"order_id\":\"o1\",\"seq\":3,\"kind\":\"updated\"}\n\
                {\"order_id\":\"o1\",\"seq\":2,\"kind\":\"updated\"}\n{\"order_id\":\"o2\",\"seq\":2,\"kind\":\"cancellation\"}\n";
    send_stdin(&data, "ord.in", &[], sent).ok("send");
    let summary = once();
    assert_eq!(totals(&summary), [4, 2, 1], "{summary}");
    assert_eq!(summary_count(&summary, "ord-orders", "stale"), 1, "{summary}");
    assert!(summary_count(&summary, "ord-orders", "waited") >= 1, "the cancellation waited for its order: {summary}");
    assert_eq!(seqs(), [("o1".to_string(), 1), ("o1".to_string(), 3)]);
    let record = with_reason(&listed(&data, &["--pipeline", "ord-orders"]), "missing_predecessor").clone();
    assert!(record["errors"][0]["message"].as_str().unwrap().contains("`o2`"), "{record}");

    // The last applied version is remembered across runs: o1 seq 2 is still stale, seq 4 is not.
    send_stdin(&data, "ord.in", &[], "{\"order_id\":\"o1\",\"seq\":2}\n{\"order_id\":\"o1\",\"seq\":4}\n").ok("send again");
    let summary = once();
    assert_eq!((totals(&summary), summary_count(&summary, "ord-orders", "stale")), ([2, 1, 0], 1), "{summary}");
    assert_eq!(seqs().last(), Some(&("o1".to_string(), 4)));
}

#[test]
fn a_cancellation_that_arrives_before_its_order_is_delivered_after_it() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let events = data.join("out/ord/events.ndjson");
    let mut engine = Engine::start(&data, &[ORD], &[("ORD_WAIT", Path::new("30s"))]);
    send_stdin(&data, "ord.in", &[], "{\"order_id\":\"o3\",\"seq\":2,\"kind\":\"cancellation\"}\n").ok("send the cancellation");
    std::thread::sleep(Duration::from_millis(1500));
    engine.assert_running();
    assert!(ndjson(&events).is_empty(), "the cancellation waits for its order");
    send_stdin(&data, "ord.in", &[], "{\"order_id\":\"o3\",\"seq\":1,\"kind\":\"created\"}\n").ok("send the order");
    wait_for("both events delivered", || ndjson(&events).len() == 2);
    let kinds: Vec<String> = ndjson(&events).iter().map(|e| e["kind"].as_str().unwrap().to_string()).collect();
    assert_eq!(kinds, ["created", "cancellation"], "the order first, then its cancellation");
    let (code, summary) = engine.stop("-TERM");
    assert_eq!(code, Some(0), "{summary}");
}

#[test]
fn a_throttled_source_is_taken_no_faster_than_its_rate_and_nothing_is_dropped() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let input: String = (0..30).map(|i| format!("{{\"id\":\"t{i}\"}}\n")).collect();
    send_stdin(&data, "rt.throttle", &[], &input).ok("send");
    let started = Instant::now();
    let summary = run_once(&data, &["tests/runtime/throttle/rt-throttle.yaml"]);
    // 30 at 20 a second, one at a time: at least 29 intervals of 50 ms.
    assert!(started.elapsed() >= Duration::from_millis(1400), "throttled: {:?}", started.elapsed());
    assert_eq!(totals(&summary), [30, 30, 0], "{summary}");
    assert_eq!(ids(&data.join("out/throttle/out.ndjson")).len(), 30);
}

#[test]
fn a_slow_rate_never_outlasts_a_lease_what_it_holds_back_waits_in_the_queue() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let p = copy_fixture("throttle", tmp.path());
    let yaml = std::fs::read_to_string(p.join("rt-throttle.yaml")).unwrap();
    // 20 messages at 4 a second take 5 s: longer than the 3 s lease of the batch that holds them.
    let yaml = yaml.replace("rate_limit: {rate: 20/s, burst: 1}", "rate_limit: {rate: 4/s, burst: 1}\n  visibility_timeout: 3s");
    std::fs::write(p.join("rt-throttle.yaml"), yaml).unwrap();
    let input: String = (0..20).map(|i| format!("{{\"id\":\"t{i}\"}}\n")).collect();
    send_stdin(&data, "rt.throttle", &[], &input).ok("send");
    let summary = run_once(&data, &[p.to_str().unwrap()]);
    assert_eq!(totals(&summary), [20, 20, 0], "{summary}");
    assert!(summary_count(&summary, "rt-throttle", "held back") > 0, "the rest of a batch waited in the queue: {summary}");
    assert!(!summary.contains("visibility timeout"), "no lease ran out: {summary}");
    let mut out = ids(&data.join("out/throttle/out.ndjson"));
    out.sort();
    out.dedup();
    assert_eq!(out.len(), 20);
    assert_eq!(ids(&data.join("out/throttle/out.ndjson")).len(), 20, "each once");
}
