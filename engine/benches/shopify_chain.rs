//! The Shopify reference chain (validate + map + route, bytes in, bytes out) against a
//! hand-written serde function doing the same transformation: the ceiling.
//!
//! Workload: ../shared/bench/WORKLOAD.md, the first 10,000 orders of `gen_orders.py` (seed
//! 20260827), copied here as `gen_orders.py`. Run: `cargo bench -p switchyard --bench shopify_chain`.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use std::path::Path;
use switchyard::build::Shared;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use switchyard::message::RawMessage;
use switchyard::pipeline::{Outcome, Pipeline, load};

const ORDERS: usize = 10_000;

fn workload() -> Vec<Vec<u8>> {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().join("orders.jsonl");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/gen_orders.py");
    let status = std::process::Command::new("python3")
        .arg(&script)
        .arg(ORDERS.to_string())
        .arg(&out)
        .arg("20260827")
        .stdout(std::process::Stdio::null())
        .status()
        .expect("python3 runs gen_orders.py");
    assert!(status.success(), "gen_orders.py failed");
    std::fs::read(&out).expect("workload").split(|b| *b == b'\n').filter(|l| !l.is_empty()).map(<[u8]>::to_vec).collect()
}

/// The reference pipeline, optionally without some of its map steps (by their `type:`).
fn pipeline(without: &[&str]) -> Pipeline {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("repo root").join("pipelines/shopify-orders.yaml");
    let mut text = std::fs::read_to_string(&path).expect("reference pipeline");
    // The workload routes US orders and the others apart (WORKLOAD.md); the reference pipeline
    // puts every order on one queue, so the route is added here.
    let one_queue = "sinks:\n  canonical:\n    type: queue\n    queue: orders.canonical\n";
    assert!(text.contains(one_queue), "the reference pipeline writes orders.canonical");
    text = text.replace(
        one_queue,
        "route:\n  rules:\n    - name: us-orders\n      when: \"$.shipping_address.country == 'US'\"\n      to: erp_us\n  default: erp_intl\n\
         sinks:\n  erp_us: {type: queue, queue: erp.us}\n  erp_intl: {type: queue, queue: erp.intl}\n",
    );
    for step in without {
        let block = match *step {
            "reconcile" => "  - type: reconcile\n".to_string(),
            "validate" => "  - type: validate\n    schema: ../schemas/canonical/order.schema.json\n".to_string(),
            "input_validation" => {
                "validate:\n  - type: json_schema\n    schema: ../schemas/channels/shopify/order.schema.json\n".to_string()
            }
            other => panic!("no variant without {other}"),
        };
        assert!(text.contains(&block), "the reference pipeline has a `{step}` map step");
        text = text.replace(&block, "");
    }
    load::load_source(switchyard::config::SourceFile::new(path, text), &Shared::with_process_env()).expect("the reference pipeline loads")
}

/// Declarative: parse, validate, map, reconcile, validate the canonical order, route, serialize.
fn declarative(p: &Pipeline, body: &[u8]) -> (usize, Vec<u8>) {
    match p.process(RawMessage::json(body.to_vec())) {
        Outcome::Routed { output, sinks } => (sinks[0], output.payload.to_json_bytes()),
        Outcome::Failed(e) => panic!("workload orders are valid: {:?}", e.errors),
    }
}

// ---- The hand-written ceiling: typed serde structs in, the same canonical Order out. ----

#[derive(Deserialize)]
struct ShopifyOrder<'a> {
    id: u64,
    name: &'a str,
    email: Option<&'a str>,
    created_at: &'a str,
    updated_at: Option<&'a str>,
    cancelled_at: Option<&'a str>,
    fulfillment_status: Option<&'a str>,
    currency: &'a str,
    financial_status: Option<&'a str>,
    gateway: Option<&'a str>,
    total_discounts: Option<&'a str>,
    total_tax: Option<&'a str>,
    total_price: &'a str,
    #[serde(default)]
    taxes_included: bool,
    tags: Option<&'a str>,
    note: Option<&'a str>,
    customer: Option<Customer<'a>>,
    shipping_address: Option<Address<'a>>,
    line_items: Vec<LineItem<'a>>,
}

#[derive(Deserialize)]
struct Customer<'a> {
    id: Option<u64>,
    email: Option<&'a str>,
    first_name: Option<&'a str>,
    last_name: Option<&'a str>,
}

#[derive(Deserialize)]
struct Address<'a> {
    first_name: Option<&'a str>,
    last_name: Option<&'a str>,
    address1: Option<&'a str>,
    city: Option<&'a str>,
    province_code: Option<&'a str>,
    country_code: Option<&'a str>,
    zip: Option<&'a str>,
    phone: Option<&'a str>,
}

#[derive(Deserialize)]
struct LineItem<'a> {
    id: u64,
    sku: Option<&'a str>,
    title: &'a str,
    quantity: i64,
    price: &'a str,
    requires_shipping: Option<bool>,
    #[serde(borrow)]
    tax_lines: Vec<TaxLine<'a>>,
}

#[derive(Deserialize)]
struct TaxLine<'a> {
    title: &'a str,
    price: &'a str,
    rate: f64,
}

#[derive(Serialize)]
struct Money<'a> {
    amount: String,
    currency: &'a str,
}

fn money<'a>(d: Decimal, currency: &'a str) -> Money<'a> {
    let mut d = d;
    if d.scale() < 2 {
        d.rescale(2);
    }
    Money { amount: d.to_string(), currency }
}

fn dec(s: &str) -> Decimal {
    s.parse().expect("decimal")
}

fn utc(s: &str) -> String {
    chrono::DateTime::parse_from_rfc3339(s).expect("date").with_timezone(&chrono::Utc).to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
}

#[derive(Serialize)]
struct CanonicalTax<'a> {
    name: &'a str,
    rate: String,
    amount: Money<'a>,
    collected_by: &'static str,
}

#[derive(Serialize)]
struct CanonicalLine<'a> {
    line_id: String,
    sku: &'a str,
    title: &'a str,
    quantity: i64,
    unit_price: Money<'a>,
    discount: Money<'a>,
    taxes: Vec<CanonicalTax<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    requires_shipping: Option<bool>,
    subtotal: Money<'a>,
    total: Money<'a>,
}

#[derive(Serialize)]
struct CanonicalCustomer<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    email: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    first_name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_name: Option<&'a str>,
}

#[derive(Serialize)]
struct CanonicalAddress<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    first_name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    line1: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    city: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    region: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    postal_code: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    country: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    phone: Option<&'a str>,
}

#[derive(Serialize)]
struct Totals<'a> {
    discount: Money<'a>,
    tax: Money<'a>,
    total: Money<'a>,
    subtotal: Money<'a>,
    shipping: Money<'a>,
}

#[derive(Serialize)]
struct Extensions<'a> {
    shopify: ShopifyExt<'a>,
}

#[derive(Serialize)]
struct ShopifyExt<'a> {
    name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    gateway: Option<&'a str>,
}

#[derive(Serialize)]
struct CanonicalOrder<'a> {
    order_id: String,
    channel: &'static str,
    channel_order_id: String,
    order_number: &'a str,
    status: &'static str,
    payment_status: &'a str,
    placed_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    updated_at: Option<String>,
    currency: &'a str,
    prices_include_tax: bool,
    customer: CanonicalCustomer<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    shipping_address: Option<CanonicalAddress<'a>>,
    lines: Vec<CanonicalLine<'a>>,
    totals: Totals<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tags: Option<Vec<&'a str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    notes: Option<&'a str>,
    extensions: Extensions<'a>,
}

/// The same transformation by hand: validate what the mapping relies on, map, reconcile to the
/// cent, route, serialize. Returns the route (0 = US, 1 = international) and the bytes.
fn hand_written(body: &[u8]) -> (usize, Vec<u8>) {
    let o: ShopifyOrder = serde_json::from_slice(body).expect("valid order");
    assert!(!o.line_items.is_empty() && o.currency.len() == 3);
    let cur = o.currency;
    let (mut subtotal, mut tax) = (Decimal::ZERO, Decimal::ZERO);
    let lines: Vec<CanonicalLine> = o
        .line_items
        .iter()
        .map(|li| {
            assert!(li.quantity >= 1);
            let unit = dec(li.price);
            let sub = unit * Decimal::from(li.quantity);
            subtotal += sub;
            let taxes = li
                .tax_lines
                .iter()
                .map(|t| {
                    let amount = dec(t.price);
                    tax += amount;
                    CanonicalTax {
                        name: t.title,
                        rate: Decimal::try_from(t.rate).expect("rate").normalize().to_string(),
                        amount: money(amount, cur),
                        collected_by: "seller",
                    }
                })
                .collect();
            CanonicalLine {
                line_id: li.id.to_string(),
                sku: li.sku.expect("sku"),
                title: li.title,
                quantity: li.quantity,
                unit_price: money(unit, cur),
                discount: money(Decimal::ZERO, cur),
                taxes,
                requires_shipping: li.requires_shipping,
                subtotal: money(sub, cur),
                total: money(sub, cur),
            }
        })
        .collect();
    let discount = o.total_discounts.map(dec).unwrap_or_default();
    let stated_total = dec(o.total_price);
    assert_eq!(stated_total, subtotal - discount + tax, "reconciles to the cent");
    let country = o.shipping_address.as_ref().and_then(|a| a.country_code).map(str::to_ascii_uppercase);
    let route = usize::from(country.as_deref() != Some("US"));
    let order = CanonicalOrder {
        order_id: format!("shopify:{}", o.id),
        channel: "shopify",
        channel_order_id: o.id.to_string(),
        order_number: o.name,
        status: if o.cancelled_at.is_some() {
            "cancelled"
        } else if o.fulfillment_status == Some("fulfilled") {
            "completed"
        } else {
            "open"
        },
        payment_status: o.financial_status.unwrap_or("unknown"),
        placed_at: utc(o.created_at),
        updated_at: o.updated_at.map(utc),
        currency: cur,
        prices_include_tax: o.taxes_included,
        customer: CanonicalCustomer {
            id: o.customer.as_ref().and_then(|c| c.id).map(|i| i.to_string()),
            email: o.email.or(o.customer.as_ref().and_then(|c| c.email)),
            first_name: o.customer.as_ref().and_then(|c| c.first_name),
            last_name: o.customer.as_ref().and_then(|c| c.last_name),
        },
        shipping_address: o.shipping_address.as_ref().map(|a| CanonicalAddress {
            first_name: a.first_name,
            last_name: a.last_name,
            line1: a.address1,
            city: a.city,
            region: a.province_code.filter(|r| !r.is_empty()),
            postal_code: a.zip,
            country,
            phone: a.phone.filter(|p| !p.is_empty()),
        }),
        lines,
        totals: Totals {
            discount: money(discount, cur),
            tax: money(o.total_tax.map(dec).unwrap_or(tax), cur),
            total: money(stated_total, cur),
            subtotal: money(subtotal, cur),
            shipping: money(Decimal::ZERO, cur),
        },
        tags: o.tags.map(|t| t.split(',').map(str::trim).filter(|s| !s.is_empty()).collect::<Vec<_>>()).filter(|t| !t.is_empty()),
        notes: o.note.filter(|n| !n.is_empty()),
        extensions: Extensions { shopify: ShopifyExt { name: o.name, gateway: o.gateway } },
    };
    (route, serde_json::to_vec(&order).expect("serializes"))
}

fn bench(c: &mut Criterion) {
    let orders = workload();
    let p = pipeline(&[]);
    let p_validate_map_route = pipeline(&["reconcile", "validate"]);
    let p_map_route = pipeline(&["reconcile", "validate", "input_validation"]);
    // Same transformation: the outputs must be equal JSON for every order, routes included.
    for body in &orders {
        let (r1, a) = declarative(&p, body);
        let (r2, b) = hand_written(body);
        let a: serde_json::Value = serde_json::from_slice(&a).unwrap();
        let b: serde_json::Value = serde_json::from_slice(&b).unwrap();
        assert_eq!((r1, &a), (r2, &b), "the hand-written function must produce what the pipeline produces");
    }
    let mut g = c.benchmark_group("shopify_chain");
    g.throughput(Throughput::Elements(orders.len() as u64));
    g.sample_size(10);
    // The reference pipeline as shipped: validate, map, reconcile, validate the canonical Order, route.
    g.bench_function("reference_pipeline", |b| b.iter(|| orders.iter().map(|o| declarative(&p, o).1.len()).sum::<usize>()));
    // The chain the issue names: validate + map + route (no reconciliation, no output check).
    g.bench_function("validate_map_route", |b| {
        b.iter(|| orders.iter().map(|o| declarative(&p_validate_map_route, o).1.len()).sum::<usize>())
    });
    // The mapping alone, as the peers in WORKLOAD.md run it (no schema checks).
    g.bench_function("map_route", |b| b.iter(|| orders.iter().map(|o| declarative(&p_map_route, o).1.len()).sum::<usize>()));
    g.bench_function("hand_written_serde", |b| b.iter(|| orders.iter().map(|o| hand_written(o).1.len()).sum::<usize>()));
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
