//! Runs the Shopify reference pipeline over an NDJSON file in a loop, for profilers:
//! `cargo run --release -p switchyard --example profile_chain -- orders.jsonl [rounds]`
//! (`PIPELINE=pipelines/other.yaml` runs another pipeline).
use switchyard::build::Shared;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use switchyard::message::RawMessage;
use switchyard::pipeline::{Outcome, load};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let file = args.get(1).expect("usage: profile_chain ORDERS.jsonl [ROUNDS]");
    let rounds: usize = args.get(2).and_then(|r| r.parse().ok()).unwrap_or(5);
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("repo root");
    let p = load::load_file(
        &root.join(std::env::var("PIPELINE").unwrap_or_else(|_| "pipelines/shopify-orders.yaml".into())),
        &Shared::with_process_env(),
    )
    .expect("pipeline loads");
    let orders: Vec<Vec<u8>> =
        std::fs::read(file).expect("orders").split(|b| *b == b'\n').filter(|l| !l.is_empty()).map(<[u8]>::to_vec).collect();
    let start = std::time::Instant::now();
    let mut bytes = 0;
    for _ in 0..rounds {
        for o in &orders {
            if let Outcome::Routed { output, .. } = p.process(RawMessage::json(o.clone())) {
                bytes += output.payload.to_json_bytes().len();
            }
        }
    }
    let n = rounds * orders.len();
    eprintln!("{n} orders in {:?}: {:.0}/s ({bytes} bytes out)", start.elapsed(), n as f64 / start.elapsed().as_secs_f64());
}
