//! What the end-to-end benches share: the repository, the release binary they drive, and the
//! workload of ../shared/bench/WORKLOAD.md (generated once per size under target/).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("repo root").to_path_buf()
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_switchyard")
}

/// `n` orders from gen_orders.py, one per line.
pub fn workload(n: usize) -> PathBuf {
    let out = repo().join(format!("target/bench-orders-{n}.jsonl"));
    if !out.exists() {
        let status = Command::new("python3")
            .arg(repo().join("engine/benches/gen_orders.py"))
            .arg(n.to_string())
            .arg(&out)
            .stdout(Stdio::null())
            .status()
            .expect("python3 runs gen_orders.py");
        assert!(status.success(), "gen_orders.py failed");
    }
    out
}
