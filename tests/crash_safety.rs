//! Crash safety: while 10,000 messages flow through a chain of three pipelines (tests/crash/),
//! the engine is killed with SIGKILL at random moments and restarted. Afterwards every message
//! is in the final file or in the exception store: none lost. None is there twice either: the
//! queues between pipelines settle in one transaction, and the file sink is cut back at start to
//! the length committed with the last settled messages.
#![cfg(unix)]

use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const MESSAGES: u64 = 10_000;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("repo root").to_path_buf()
}

fn switchyard(data: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_switchyard"));
    c.current_dir(repo()).env("SWITCHYARD_DATA_DIR", data).env("RUST_LOG", "error");
    c
}

/// Messages still in the chain's queues (ready, in flight or delayed).
fn left_in_queues(data: &Path) -> i64 {
    let out = switchyard(data).args(["queues", "--format", "json"]).output().unwrap();
    let queues: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Array(vec![]));
    queues
        .as_array()
        .unwrap()
        .iter()
        .filter(|q| q["queue"].as_str().is_some_and(|n| n.starts_with("crash.")))
        .map(|q| q["ready"].as_i64().unwrap() + q["in_flight"].as_i64().unwrap() + q["delayed"].as_i64().unwrap())
        .sum()
}

/// A small generator (xorshift) so a failing seed can be replayed: SWITCHYARD_CRASH_SEED.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn sigkill_at_random_moments_loses_no_message() {
    let data = tempfile::tempdir().unwrap();
    let input = data.path().join("input.ndjson");
    let lines: String = (0..MESSAGES).map(|i| format!("{{\"seq\": {i}, \"amount\": \"{}.{:02}\"}}\n", i, i % 100)).collect();
    std::fs::write(&input, lines).unwrap();
    let sent = switchyard(data.path()).args(["send", "crash.in"]).arg(&input).output().unwrap();
    assert!(sent.status.success(), "{}", String::from_utf8_lossy(&sent.stderr));

    let seed = std::env::var("SWITCHYARD_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1);
    println!("seed {seed} (SWITCHYARD_CRASH_SEED={seed} replays these kill times)");
    let mut rng = Rng(seed);
    let started = Instant::now();
    let mut kills_mid_flow = 0;
    for round in 0..8 {
        let before = left_in_queues(data.path());
        if before == 0 && round > 0 {
            break;
        }
        let mut child = switchyard(data.path()).args(["run", "tests/crash"]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        let wait = Duration::from_millis(60 + rng.next() % 200);
        std::thread::sleep(wait);
        assert!(child.try_wait().unwrap().is_none(), "the engine runs until stopped");
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let after = left_in_queues(data.path());
        println!("round {round}: killed after {wait:?} with {after} message(s) in the queues (was {before})");
        if after > 0 {
            kills_mid_flow += 1;
        }
    }
    assert!(kills_mid_flow >= 2, "the engine was killed while messages were flowing at least twice");

    // A last run finishes the work.
    let last = switchyard(data.path()).args(["run", "tests/crash", "--once"]).output().unwrap();
    assert!(last.status.success(), "{}", String::from_utf8_lossy(&last.stderr));
    assert_eq!(left_in_queues(data.path()), 0, "every queue is empty");
    println!("all rounds in {:?}", started.elapsed());

    // Where every message ended.
    let mut written: BTreeMap<u64, BTreeSet<String>> = BTreeMap::new();
    let mut lines = 0;
    let done = std::fs::read_to_string(data.path().join("out/crash/done.ndjson")).unwrap();
    for line in done.lines() {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("a whole JSON line: {e}: {line}"));
        lines += 1;
        let seq = v["payload"]["seq"].as_u64().unwrap();
        assert_eq!(v["payload"]["hops"], serde_json::json!(["a", "b"]), "it passed through both links");
        written.entry(seq).or_default().insert(v["metadata"]["message_id"].as_str().unwrap().to_string());
    }
    let export = switchyard(data.path()).args(["exceptions", "export"]).output().unwrap();
    let mut failed = BTreeSet::new();
    for line in String::from_utf8(export.stdout).unwrap().lines() {
        let r: Value = serde_json::from_str(line).unwrap();
        assert_eq!(r["reason"], "unlucky_number", "only the planned failures: {r}");
        let original: Value = serde_json::from_str(r["original_payload"].as_str().unwrap()).unwrap();
        assert!(failed.insert(original["seq"].as_u64().unwrap()), "one exception record per message");
    }
    let duplicates = lines - written.len();
    println!("{MESSAGES} sent: {} written once or more ({duplicates} duplicate line(s)), {} exceptions", written.len(), failed.len());
    for (seq, ids) in &written {
        assert_eq!(ids.len(), 1, "message {seq} written twice carries one message id: {ids:?}");
        assert!(!failed.contains(seq), "message {seq} is either written or an exception, not both");
    }
    assert_eq!(duplicates, 0, "one engine writing the file: no message is in it twice");
    let all: BTreeSet<u64> = written.keys().chain(failed.iter()).copied().collect();
    assert_eq!(all, (0..MESSAGES).collect::<BTreeSet<_>>(), "no message is lost");
    assert_eq!(failed, (0..MESSAGES).filter(|s| s % 97 == 0).collect::<BTreeSet<_>>());
}
