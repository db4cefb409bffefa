//! The README's "order flow over HTTP", as a new user runs it: `switchyard simulate` (an ERP and a
//! marketplace that fail every fourth POST and limit the rate; failures at random would make
//! the test's outcome a matter of luck), `switchyard run examples/http`,
//! signed Shopify webhooks posted to it, and the status API following each order to its
//! acknowledgement. Every order is posted to the ERP once and acknowledged once, whatever the
//! injected failures; a webhook sent twice is posted once; one that does not add up is a
//! `failed` order with its reason; no secret is written anywhere.

use base64::Engine as _;
use hmac::{KeyInit, Mac};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const WEBHOOK_SECRET: &str = "qs-webhook-secret-81d0";
const CLIENT_SECRET: &str = "qs-client-secret-4a77";
const MARKET_TOKEN: &str = "qs-market-token-c3e9";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("repo root").to_path_buf()
}

/// Two free ports, different (both held while the second is picked).
fn two_free_ports() -> (u16, u16) {
    let a = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let b = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    (a.local_addr().unwrap().port(), b.local_addr().unwrap().port())
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(args: &[&str], envs: &[(&str, String)], log: &Path) -> Killed {
    let out = std::fs::File::create(log).unwrap();
    let mut c = Command::new(env!("CARGO_BIN_EXE_switchyard"));
    c.args(args).current_dir(repo()).env_remove("RUST_LOG").env("NO_COLOR", "1").stdin(Stdio::null());
    for (k, v) in envs {
        c.env(k, v);
    }
    Killed(c.stdout(out.try_clone().unwrap()).stderr(out).spawn().unwrap())
}

fn wait_listening(port: u16, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {port}: {}", std::fs::read_to_string(log).unwrap_or_default());
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn http(method: &str, url: &str, headers: &[(&str, String)], body: Vec<u8>) -> (u16, Value) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut r = reqwest::Client::new().request(method.parse().unwrap(), url).body(body);
        for (k, v) in headers {
            r = r.header(*k, v);
        }
        let resp = r.send().await.unwrap();
        let status = resp.status().as_u16();
        (status, serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap_or(Value::Null))
    })
}

fn webhook(base: &str, file: &str) -> (u16, Value) {
    let body = std::fs::read(repo().join(file)).unwrap();
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(WEBHOOK_SECRET.as_bytes()).unwrap();
    mac.update(&body);
    let sig = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    let headers = [("X-Shopify-Hmac-Sha256", sig), ("X-Shopify-Shop-Domain", "demo.myshopify.com".into())];
    http("POST", &format!("{base}/ingest/shopify/orders"), &headers, body)
}

#[test]
fn a_signed_webhook_goes_to_the_erp_and_is_acknowledged_and_the_status_api_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let (sim_port, port) = two_free_ports();
    let sim_log = dir.path().join("simulate.log");
    let _sim = start(
        &["simulate", "--listen", &format!("127.0.0.1:{sim_port}"), "--latency", "5ms", "--fail-every", "4", "--rate-limit", "40"],
        &[("SIM_CLIENT_SECRET", CLIENT_SECRET.into()), ("SIM_MARKETPLACE_TOKEN", MARKET_TOKEN.into())],
        &sim_log,
    );
    wait_listening(sim_port, &sim_log);
    let sim = format!("http://127.0.0.1:{sim_port}");
    let data = dir.path().join("data");
    let run_log = dir.path().join("run.log");
    let mut engine = start(
        &["run", "examples/http", "--data-dir", data.to_str().unwrap(), "--listen", &format!("127.0.0.1:{port}")],
        &[
            ("ERP_URL", format!("{sim}/erp")),
            ("MARKETPLACE_URL", format!("{sim}/marketplace")),
            ("SHOPIFY_WEBHOOK_SECRET", WEBHOOK_SECRET.into()),
            ("ERP_CLIENT_SECRET", CLIENT_SECRET.into()),
            ("MARKETPLACE_TOKEN", MARKET_TOKEN.into()),
        ],
        &run_log,
    );
    wait_listening(port, &run_log);
    let base = format!("http://127.0.0.1:{port}");

    let orders = ["0001", "0002", "0003", "0004", "0005"].map(|n| format!("examples/shopify/orders/generated-{n}.json"));
    let mut ids = Vec::new();
    for file in &orders {
        let (status, answer) = webhook(&base, file);
        assert_eq!(status, 202, "{file}: {answer}");
        ids.push(answer["correlation_id"].as_str().unwrap().to_string());
    }
    // Shopify sends a webhook again when it missed the answer: posted once all the same.
    assert_eq!(webhook(&base, &orders[0]).0, 202);
    // A test webhook whose discount is not itemised: a `failed` order, with the reason.
    let (_, bad) = webhook(&base, "examples/shopify/orders/webhook-orders-create-test.json");
    let bad_id = bad["correlation_id"].as_str().unwrap().to_string();

    let deadline = Instant::now() + Duration::from_secs(90);
    let stats = loop {
        let (_, s) = http("GET", &format!("{sim}/stats"), &[], vec![]);
        if s["acknowledgements"] == 5 {
            break s;
        }
        assert!(Instant::now() < deadline, "not every order acknowledged in 90 s: {s}\n{}", std::fs::read_to_string(&run_log).unwrap());
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(stats["sales_orders"], 5, "each order posted to the ERP once: {stats}");
    let (_, erp_us) = http("GET", &format!("{sim}/erp/companies/us/salesOrders"), &[], vec![]);
    let (_, erp_intl) = http("GET", &format!("{sim}/erp/companies/intl/salesOrders"), &[], vec![]);
    let posted: Vec<Value> = erp_us["value"].as_array().unwrap().iter().chain(erp_intl["value"].as_array().unwrap()).cloned().collect();
    let (_, acks) = http("GET", &format!("{sim}/marketplace/acknowledgements"), &[], vec![]);

    for id in &ids {
        let (status, s) = http("GET", &format!("{base}/status/{id}"), &[], vec![]);
        assert_eq!(status, 200, "{s}");
        assert_eq!(s["state"], "acknowledged_to_channel", "{s}");
        let events: Vec<&str> = s["events"].as_array().unwrap().iter().map(|e| e["event"].as_str().unwrap()).collect();
        assert_eq!(events.first(), Some(&"received"), "{s}");
        assert!(events.contains(&"posted_to_erp"), "{s}");
        let posted_event = s["events"].as_array().unwrap().iter().find(|e| e["event"] == "posted_to_erp").unwrap();
        let number = posted_event["erp_document_number"].as_str().unwrap();
        let doc = posted.iter().find(|d| d["externalDocumentNumber"] == id.as_str()).expect("the ERP has the order");
        assert_eq!(doc["number"], number, "the status names the ERP's document: {s}");
        let ack = acks["value"].as_array().unwrap().iter().find(|a| a["order_id"] == id.as_str()).expect("acknowledged");
        assert_eq!(ack["acknowledgement"]["erp_document_number"], number, "the channel got the ERP's number");
    }
    let (_, failed) = http("GET", &format!("{base}/status/{bad_id}"), &[], vec![]);
    assert_eq!((failed["state"].as_str(), failed["events"][1]["reason"].as_str()), (Some("failed"), Some("totals_mismatch")), "{failed}");

    Command::new("kill").args(["-TERM", &engine.0.id().to_string()]).status().unwrap();
    let status = engine.0.wait().unwrap();
    let said = std::fs::read_to_string(&run_log).unwrap();
    assert!(status.success(), "{said}");
    assert!(said.contains("duplicates       1"), "the copy is dropped as a duplicate: {said}");
    let sim_said = std::fs::read_to_string(&sim_log).unwrap();
    assert!(sim_said.contains("-> 503 (injected)"), "the simulator did fail some requests: {sim_said}");
    // No secret in the engine's output, its store or its outputs.
    for secret in [WEBHOOK_SECRET, CLIENT_SECRET, MARKET_TOKEN] {
        assert!(!said.contains(secret), "`{secret}` in the log");
        for entry in walk(&data) {
            let bytes = std::fs::read(&entry).unwrap();
            assert!(!bytes.windows(secret.len()).any(|w| w == secret.as_bytes()), "`{secret}` in {}", entry.display());
        }
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() { out.extend(walk(&p)) } else { out.push(p) }
    }
    out
}
