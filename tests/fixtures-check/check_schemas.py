#!/usr/bin/env python3
"""Check the JSON Schemas, the example payloads and the lookup tables against each other.

Usage: python3 tests/fixtures-check/check_schemas.py [--bench-orders N]

Stdlib + jsonschema (4.18 or later, for `referencing`) only. What it checks:
  * every schemas/**/*.json (except the schemas `switchyard schema` generates) is a valid draft 2020-12 schema,
    has a $id matching its place, a title and a description on the root, on every $defs entry and on every
    property, and every $ref resolves from schemas/ alone (the registry never fetches anything);
  * every example validates against its schema, except the ones designed to fail a schema check;
  * small negative cases prove the schemas are strict where the mappings rely on them;
  * money reconciles to the cent (decimal, never float) where the example is meant to reconcile, and does
    not where it is an exception demo;
  * every SKU and store in the examples is in the lookup tables, except the deliberately unknown ones;
  * orders from the benchmark generator (shared/bench/gen_orders.py, when shared/ is beside the repo) validate.
Exit status 0 only when every check gives the expected result. The last line is "N passed, N failed".
"""
import copy
import csv
import glob
import json
import os
import re
import subprocess
import sys
import tempfile
from decimal import Decimal, ROUND_HALF_UP

from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.exceptions import NoSuchResource
from referencing.jsonschema import DRAFT202012

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
SCHEMAS = os.path.join(ROOT, "schemas")
EXAMPLES = os.path.join(ROOT, "examples")
LOOKUPS = os.path.join(ROOT, "mappings", "lookups")
BASE = "https://schemas.switchyard.dev/"

CANON = BASE + "canonical/1.0.0/"
SHOPIFY = BASE + "channels/shopify/order.schema.json"
AMAZON = BASE + "channels/amazon/order-bundle.schema.json"
POS = BASE + "channels/pos/store-sales-row.schema.json"
BC = BASE + "erp/business-central/sales-order.schema.json"

# Examples designed to fail: the POS row with QTY "2.5x" is the only schema failure.
EXPECTED_SCHEMA_FAILURES = {("pos/store-sales-20261126.csv", "0034/5503/1")}
# SKUs deliberately missing from mappings/lookups/sku-items.csv (exception demo unknown_sku).
EXPECTED_UNKNOWN_SKUS = {"400199", "DESK-MAT-XL"}
# Shopify examples that do not reconcile (exception demos); every other Shopify example must.
SHOPIFY_NOT_RECONCILING = {"webhook-orders-create-test.json", "rest-order-fixture.json"}

results = {"passed": 0, "failed": 0}


def report(ok, what, detail="", show=False):
    """Count and print one check; the detail is printed on failure, or always with show=True."""
    results["passed" if ok else "failed"] += 1
    print(f"{'PASS' if ok else 'FAIL'}  {what}{'  -- ' + detail if detail and (show or not ok) else ''}")


def rel(path):
    return os.path.relpath(path, EXAMPLES)


def load_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def no_network(uri):
    raise NoSuchResource(ref=uri)


# ---------------------------------------------------------------- schemas

def walk(node, pointer=""):
    """Yield (pointer, subschema) for every schema object in a schema document."""
    if not isinstance(node, dict):
        return
    yield pointer, node
    for key in ("properties", "$defs", "patternProperties"):
        for name, sub in node.get(key, {}).items():
            yield from walk(sub, f"{pointer}/{key}/{name}")
    for key in ("items", "additionalProperties", "not", "if", "then", "else"):
        if isinstance(node.get(key), dict):
            yield from walk(node[key], f"{pointer}/{key}")
    for key in ("allOf", "anyOf", "oneOf"):
        for i, sub in enumerate(node.get(key, [])):
            yield from walk(sub, f"{pointer}/{key}/{i}")


def load_schemas():
    schemas = {}
    for path in sorted(glob.glob(os.path.join(SCHEMAS, "**", "*.json"), recursive=True)):
        if os.path.basename(path) in GENERATED:
            continue
        name = os.path.relpath(path, SCHEMAS)
        schema = load_json(path)
        try:
            Draft202012Validator.check_schema(schema)
            report(True, f"schema {name}: valid draft 2020-12")
        except Exception as e:  # SchemaError
            report(False, f"schema {name}: valid draft 2020-12", str(e).splitlines()[0])
        sid = schema.get("$id", "")
        want = {"canonical": CANON + os.path.basename(name)}.get(name.split(os.sep)[0], BASE + name.replace(os.sep, "/"))
        report(sid == want and schema.get("$schema") == "https://json-schema.org/draft/2020-12/schema",
               f"schema {name}: $id and $schema", f"$id {sid!r}, expected {want!r}")
        missing = []
        for ptr, sub in walk(schema):
            # conditions (if/then/else/not) only restate properties; they need no titles
            in_props = (re.search(r"/(properties|\$defs)/[^/]+$", ptr) or ptr == "") and \
                not re.search(r"/(if|then|else|not)(/|$)", ptr)
            if in_props and not ("title" in sub and "description" in sub):
                missing.append(ptr or "/")
        report(not missing, f"schema {name}: title and description on root, $defs and properties",
               ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else ""))
        schemas[sid] = schema
    return schemas


def build_registry(schemas):
    resources = [(sid, Resource.from_contents(s, default_specification=DRAFT202012)) for sid, s in schemas.items()]
    return Registry(retrieve=no_network).with_resources(resources).crawl()


def check_refs(schemas, registry):
    for sid, schema in schemas.items():
        resolver = registry.resolver(base_uri=sid)
        bad = []
        for ptr, sub in walk(schema):
            ref = sub.get("$ref")
            if ref is None:
                continue
            try:
                resolver.lookup(ref)
            except Exception as e:
                bad.append(f"{ptr}: {ref} ({type(e).__name__})")
        report(not bad, f"schema {sid.replace(BASE, '')}: every $ref resolves locally", "; ".join(bad))


def validator(registry, sid):
    return Draft202012Validator({"$ref": sid}, registry=registry, format_checker=Draft202012Validator.FORMAT_CHECKER)


def errors_of(v, instance):
    return ["/" + "/".join(map(str, e.absolute_path)) + ": " + e.message[:120]
            for e in sorted(v.iter_errors(instance), key=lambda e: list(map(str, e.absolute_path)))]


def expect_valid(v, instance, what, expect_ok=True):
    errs = errors_of(v, instance)
    if expect_ok:
        report(not errs, what, "; ".join(errs[:3]))
    else:
        report(bool(errs), what + " (designed to fail)", "; ".join(errs[:2]) if errs else "unexpectedly valid", show=True)
    return errs


# ---------------------------------------------------------------- money helpers

D = Decimal
CENT = D("0.01")


def cents(x):
    return D(x).quantize(CENT, ROUND_HALF_UP)


def shopify_reconciles(o):
    """Shopify's rules: line items price x qty, subtotal after discounts, tax = line + shipping tax lines."""
    tlp = sum(D(li["price"]) * li["quantity"] for li in o["line_items"])
    ship = sum(D(s["price"]) for s in o.get("shipping_lines", []))
    tax = sum(D(t["price"]) for li in o["line_items"] for t in li.get("tax_lines", []))
    tax += sum(D(t["price"]) for s in o.get("shipping_lines", []) for t in s.get("tax_lines", []))
    disc = D(o.get("total_discounts", "0"))
    alloc = sum(D(a["amount"]) for li in o["line_items"] for a in li.get("discount_allocations", []))
    alloc += sum(D(a["amount"]) for s in o.get("shipping_lines", []) for a in s.get("discount_allocations", []))
    codes = sum(D(c["amount"]) for c in o.get("discount_codes", []))
    problems = []
    if "total_line_items_price" in o and D(o["total_line_items_price"]) != tlp:
        problems.append(f"total_line_items_price {o['total_line_items_price']} != sum(price x qty) {tlp}")
    if D(o["subtotal_price"]) != tlp - disc:
        problems.append(f"subtotal_price {o['subtotal_price']} != {tlp} - total_discounts {disc}")
    if disc and o.get("discount_applications") is not None and alloc != disc:
        problems.append(f"discount_allocations sum {alloc} != total_discounts {disc}")
    if codes > disc:  # automatic discounts have no code, so codes may sum to less, never to more
        problems.append(f"discount_codes sum {codes} > total_discounts {disc}")
    if D(o["total_tax"]) != tax:
        problems.append(f"total_tax {o['total_tax']} != sum of line and shipping tax lines {tax}")
    expected_total = D(o["subtotal_price"]) + ship + (D("0") if o.get("taxes_included") else D(o["total_tax"]))
    if D(o["total_price"]) != expected_total:
        problems.append(f"total_price {o['total_price']} != subtotal + shipping + tax {expected_total}")
    return problems


# Written by `switchyard schema` from the Rust config types; tested by the engine's own tests.
GENERATED = {"pipeline.schema.json", "fieldmap.schema.json", "pipeline-test.schema.json"}

# Marketplaces whose item prices include VAT (ItemTax is then the tax contained in the price).
TAX_INCLUSIVE_MARKETPLACES = {"A1PA6795UKMFR9", "A1F83G8C2ARO7P", "A13V1IB3VIYZZH", "APJ6JRA9NG5V4", "A1RKKUPIHCS9HS",
                              "A1805IZSGTT6HS", "A2NODRKZP88ZB9", "A1VC38T7YXB528", "A39IBJ37TRP1C6", "A1AM78C64UM0Y8"}


def amazon_reconciles(bundle):
    order, items = bundle["order"], bundle["items"]
    if "OrderTotal" not in order:
        return ["no OrderTotal (Pending order)"]
    cur = order["OrderTotal"]["CurrencyCode"]
    problems, total = [], D("0")
    sign = {"ItemPrice": 1, "ShippingPrice": 1, "ItemTax": 1, "ShippingTax": 1, "PromotionDiscount": -1, "ShippingDiscount": -1}
    if order.get("MarketplaceId") in TAX_INCLUSIVE_MARKETPLACES:
        sign.update(ItemTax=0, ShippingTax=0)
    for it in items:
        for key, s in sign.items():
            if key in it:
                if it[key]["CurrencyCode"] != cur:
                    problems.append(f"{it['OrderItemId']}.{key} in {it[key]['CurrencyCode']}, order in {cur}")
                total += s * D(it[key]["Amount"])
    if total != D(order["OrderTotal"]["Amount"]):
        problems.append(f"items sum to {total}, OrderTotal {order['OrderTotal']['Amount']}")
    return problems


def money_sum(items, currency, what, problems):
    total = D("0")
    for m in items:
        if m["currency"] != currency:
            problems.append(f"{what} in {m['currency']}, order in {currency}")
        total += D(m["amount"])
    return total


def canonical_reconciles(o):
    cur, p = o["currency"], []
    zero = {"amount": "0", "currency": cur}
    for i, line in enumerate(o["lines"]):
        sub = cents(D(str(line["quantity"])) * D(line["unit_price"]["amount"]))
        if "subtotal" in line and D(line["subtotal"]["amount"]) != sub:
            p.append(f"lines/{i}: subtotal {line['subtotal']['amount']} != quantity x unit_price {sub}")
        if "total" in line:
            want = D(line.get("subtotal", {"amount": sub})["amount"]) - D(line.get("discount", zero)["amount"])
            if D(line["total"]["amount"]) != want:
                p.append(f"lines/{i}: total {line['total']['amount']} != subtotal - discount {want}")
    t = o["totals"]
    sub = money_sum([l["subtotal"] for l in o["lines"]], cur, "line subtotal", p)
    line_disc = money_sum([l["discount"] for l in o["lines"] if "discount" in l], cur, "line discount", p)
    ship = money_sum([s["amount"] for s in o.get("shipping", [])], cur, "shipping", p)
    ship_disc = money_sum([s["discount"] for s in o.get("shipping", []) if "discount" in s], cur, "shipping discount", p)
    disc = money_sum([d["amount"] for d in o.get("discounts", [])], cur, "discount", p)
    tax = money_sum([x["amount"] for l in o["lines"] for x in l.get("taxes", [])]
                    + [x["amount"] for s in o.get("shipping", []) for x in s.get("taxes", [])], cur, "tax", p)
    summary_tax = money_sum([x["amount"] for x in o.get("taxes", [])], cur, "order tax", p)
    checks = [("subtotal", sub), ("discount", disc), ("shipping", ship), ("tax", tax)]
    for key, want in checks:
        if key in t:
            money_sum([t[key]], cur, f"totals.{key}", p)
            if D(t[key]["amount"]) != want:
                p.append(f"totals.{key} {t[key]['amount']} != {want}")
    if line_disc + ship_disc != disc:
        p.append(f"line + shipping discounts {line_disc + ship_disc} != discounts {disc}")
    if "taxes" in o and summary_tax != tax:
        p.append(f"taxes[] sum {summary_tax} != line and shipping taxes {tax}")
    total = sub - disc + ship + (D("0") if o.get("prices_include_tax") else tax)
    money_sum([t["total"]], cur, "totals.total", p)
    if D(t["total"]["amount"]) != total:
        p.append(f"totals.total {t['total']['amount']} != subtotal - discount + shipping + tax {total}")
    tenders = [x["amount"] for x in o.get("tenders", []) if "amount" in x]
    if tenders and money_sum(tenders, cur, "tender", p) != D(t["total"]["amount"]):
        p.append("tenders do not sum to totals.total")
    return p


# ---------------------------------------------------------------- lookups

def read_lookup(name):
    path = os.path.join(LOOKUPS, name)
    with open(path, encoding="utf-8", newline="") as f:
        first = f.readline()
        rows = list(csv.DictReader(f))
    return first, rows


def check_lookups():
    tables = {"sku-items.csv": ("channel_sku", ["channel_sku", "item_code", "description"]),
              "pos-stores.csv": ("store_no", ["store_no", "node", "name", "timezone"]),
              "channel-customers.csv": ("channel", ["channel", "customer_number", "name"])}
    keys = {}
    for name, (key, header) in tables.items():
        first, rows = read_lookup(name)
        ok_version = re.fullmatch(r"# version: [0-9]{4}\.[0-9]{1,2}\.[0-9]+\r?\n", first) is not None
        ok_header = rows and list(rows[0].keys()) == header
        values = [r[key] for r in rows]
        dupes = sorted({v for v in values if values.count(v) > 1}) if len(values) < 1000 else \
            sorted(k for k, n in __import__("collections").Counter(values).items() if n > 1)
        empty = [r for r in rows if any(not (r[c] or "").strip() for c in header)]
        report(ok_version and ok_header and not dupes and not empty,
               f"lookup {name}: version line, header {','.join(header)}, unique non-empty key {key}",
               f"version ok={ok_version} header ok={bool(ok_header)} dupes={dupes[:3]} empty rows={len(empty)}")
        keys[name] = {r[key]: r for r in rows}
    bench = keys["sku-items.csv"]
    ok = all(bench.get(f"SKU-{n:05d}", {}).get("item_code") == f"ITM-{n:05d}" for n in range(1, 10001))
    report(ok, "lookup sku-items.csv: SKU-00001..SKU-10000 -> ITM-00001..ITM-10000")
    return keys


# ---------------------------------------------------------------- main

def main():
    bench_n = 1000
    if "--bench-orders" in sys.argv:
        bench_n = int(sys.argv[sys.argv.index("--bench-orders") + 1])

    schemas = load_schemas()
    registry = build_registry(schemas)
    check_refs(schemas, registry)
    v_shop, v_amz, v_pos, v_bc = (validator(registry, s) for s in (SHOPIFY, AMAZON, POS, BC))
    v_order = validator(registry, CANON + "order.schema.json")
    lookups = check_lookups()
    sku_table, stores = lookups["sku-items.csv"], lookups["pos-stores.csv"]
    used_skus = set()

    # Shopify orders
    for path in sorted(glob.glob(os.path.join(EXAMPLES, "shopify", "orders", "*.json"))):
        o = load_json(path)
        name = os.path.basename(path)
        expect_valid(v_shop, o, f"example {rel(path)} vs shopify/order")
        problems = shopify_reconciles(o)
        if name in SHOPIFY_NOT_RECONCILING:
            report(bool(problems), f"example {rel(path)}: does NOT reconcile (exception demo)", "; ".join(problems[:3]), show=True)
        else:
            report(not problems, f"example {rel(path)}: reconciles to the cent", "; ".join(problems))
        used_skus |= {li["sku"] for li in o["line_items"] if li.get("sku")}

    # Amazon bundles
    for path in sorted(glob.glob(os.path.join(EXAMPLES, "amazon", "orders", "*.json"))):
        b = load_json(path)
        expect_valid(v_amz, b, f"example {rel(path)} vs amazon/order-bundle")
        problems = amazon_reconciles(b)
        if os.path.basename(path) == "doc-example-order.json":
            mixed = {m["CurrencyCode"] for it in b["items"] for m in
                     [it.get(k) for k in ("ItemPrice", "ShippingPrice")] + [it.get("BuyerInfo", {}).get("GiftWrapPrice")] if m}
            report(bool(problems) and len(mixed) > 1, f"example {rel(path)}: must be flagged (no total, mixed currencies {sorted(mixed)})",
                   "; ".join(problems[:2]), show=True)
        else:
            report(not problems, f"example {rel(path)}: items reconcile with OrderTotal", "; ".join(problems))
        used_skus |= {it["SellerSKU"] for it in b["items"]}

    # POS flat file
    for path in sorted(glob.glob(os.path.join(EXAMPLES, "pos", "*.csv"))):
        with open(path, "rb") as f:
            raw = f.read()
        report(raw.count(b"\r\n") == raw.count(b"\n") and raw.endswith(b"\r\n"), f"example {rel(path)}: CRLF line endings")
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
        bad_math = []
        for n, row in enumerate(rows, 2):
            key = f"{row['STORE_NO']}/{row['TXN_NO']}/{row['LINE_NO']}"
            designed = (rel(path), key) in EXPECTED_SCHEMA_FAILURES
            errs = expect_valid(v_pos, row, f"example {rel(path)} line {n} ({key}) vs pos/store-sales-row", not designed)
            if not errs:
                if D(row["QTY"]) * D(row["UNIT_PRICE"]) != D(row["EXT_PRICE"]):
                    bad_math.append(key)
                used_skus.add(row["SKU"])
                if row["STORE_NO"] not in stores:
                    bad_math.append(f"{key}: store {row['STORE_NO']} not in pos-stores.csv")
        report(not bad_math, f"example {rel(path)}: EXT_PRICE = QTY x UNIT_PRICE, stores known", ", ".join(bad_math))
        returns = [r for r in rows if r["QTY"].startswith("-")]
        report(len(returns) == 2 and {r["STORE_NO"] for r in rows} == {"0012", "0034", "0101"},
               f"example {rel(path)}: 3 stores, 2 return lines")

    # Canonical orders
    for path in sorted(glob.glob(os.path.join(EXAMPLES, "canonical", "orders", "*.json"))):
        o = load_json(path)
        expect_valid(v_order, o, f"example {rel(path)} vs canonical/order")
        problems = canonical_reconciles(o)
        report(not problems, f"example {rel(path)}: reconciles to the cent", "; ".join(problems))
        used_skus |= {line["sku"] for line in o["lines"]}

    # SKU coverage
    missing = sorted(s for s in used_skus - EXPECTED_UNKNOWN_SKUS if s not in sku_table)
    report(not missing, "lookup sku-items.csv covers every example SKU", ", ".join(missing))
    present = sorted(s for s in EXPECTED_UNKNOWN_SKUS if s in sku_table or s not in used_skus)
    report(not present, f"deliberately unknown SKUs {sorted(EXPECTED_UNKNOWN_SKUS)} are used and not in the table", ", ".join(present))

    negative_cases(registry, v_shop, v_amz, v_pos, v_bc, v_order)
    bench_orders(v_shop, bench_n)

    print(f"{results['passed']} passed, {results['failed']} failed")
    return 1 if results["failed"] else 0


def negative_cases(registry, v_shop, v_amz, v_pos, v_bc, v_order):
    """Mutations that must be rejected (and a few edge cases that must be accepted)."""
    def must(ok_expected, v, inst, what):
        errs = errors_of(v, inst)
        report(bool(errs) != ok_expected, f"case: {what} -> {'valid' if ok_expected else 'rejected'}",
               "" if bool(errs) != ok_expected else ("; ".join(errs[:2]) or "unexpectedly valid"))

    shop = load_json(os.path.join(EXAMPLES, "shopify", "orders", "reconciled-with-shipping-and-discount.json"))
    for key in ("id", "created_at", "currency", "line_items", "total_price"):
        o = copy.deepcopy(shop); del o[key]
        must(False, v_shop, o, f"shopify order without {key}")
    for key in ("quantity", "price", "title"):
        o = copy.deepcopy(shop); del o["line_items"][0][key]
        must(False, v_shop, o, f"shopify line item without {key}")
    for mutate, what in [
        (lambda o: o.update(total_price=316.38), "shopify total_price as a JSON number"),
        (lambda o: o.update(subtotal_price="289,97"), "shopify subtotal_price with a decimal comma"),
        (lambda o: o["line_items"][0].update(price="$89.99"), "shopify line price with a currency sign"),
        (lambda o: o["line_items"][0].update(quantity=0), "shopify line quantity 0"),
        (lambda o: o["line_items"][0].update(quantity=1.5), "shopify line quantity 1.5"),
        (lambda o: o["line_items"][0]["tax_lines"][0].update(price=10.44), "shopify tax line price as a number"),
        (lambda o: o["shipping_lines"][0].update(price="8.5.0"), "shopify shipping price malformed"),
        (lambda o: o["total_price_set"]["shop_money"].update(amount=316.38), "shopify money bag amount as a number"),
        (lambda o: o.update(id="5123456789012345678"), "shopify id as a string"),
        (lambda o: o.update(line_items=[]), "shopify with no line items"),
        (lambda o: o.update(created_at="20/11/2026 10:15"), "shopify created_at not ISO 8601"),
    ]:
        o = copy.deepcopy(shop); mutate(o)
        must(False, v_shop, o, what)
    o = copy.deepcopy(shop); o["line_items"][0]["sku"] = None; o["brand_new_field"] = {"x": 1}
    must(True, v_shop, o, "shopify null sku and an unknown new field")

    amz = load_json(os.path.join(EXAMPLES, "amazon", "orders", "sandbox-iba-order.json"))
    for mutate, what in [
        (lambda b: b["order"].pop("AmazonOrderId"), "amazon order without AmazonOrderId"),
        (lambda b: b["order"].update(AmazonOrderId="921-3175655-045264"), "amazon order id not 3-7-7"),
        (lambda b: b["order"].update(OrderStatus="Cancelled"), "amazon OrderStatus outside the v0 enum"),
        (lambda b: b["order"]["OrderTotal"].update(Amount=100.0), "amazon OrderTotal.Amount as a number"),
        (lambda b: b["items"][0]["ItemPrice"].pop("CurrencyCode"), "amazon ItemPrice without CurrencyCode"),
        (lambda b: b["items"][0].update(OrderItemId=4916370235178), "amazon OrderItemId as an integer"),
        (lambda b: b["items"][0].update(QuantityOrdered="1"), "amazon QuantityOrdered as a string"),
        (lambda b: b.update(items=[]), "amazon bundle with no items"),
    ]:
        b = copy.deepcopy(amz); mutate(b)
        must(False, v_amz, b, what)

    row = {"STORE_NO": "0012", "REGISTER": "01", "TXN_NO": "10231", "TXN_DATE": "11/26/2026", "TXN_TIME": "09:14:07",
           "LINE_NO": "1", "SKU": "400112", "DESCRIPTION": "", "QTY": "1", "UNIT_PRICE": "24.99", "EXT_PRICE": "24.99",
           "DISC_AMT": "0.00", "TAX_AMT": "1.50", "TENDER": ""}
    must(True, v_pos, row, "pos row with empty DESCRIPTION and TENDER")
    for key, value in [("TXN_DATE", "2026-11-26"), ("TXN_DATE", "13/26/2026"), ("TXN_TIME", "9:14"), ("QTY", "0"),
                       ("STORE_NO", "12"), ("UNIT_PRICE", "-24.99"), ("TAX_AMT", "1,50"), ("TENDER", "CHEQUE")]:
        r = dict(row); r[key] = value
        must(False, v_pos, r, f"pos row {key}={value!r}")
    r = dict(row); del r["SKU"]
    must(False, v_pos, r, "pos row without SKU")

    order = load_json(os.path.join(EXAMPLES, "canonical", "orders", "web-1002.json"))
    for mutate, what in [
        (lambda o: o.update(notes=None), "canonical order with a null"),
        (lambda o: o.update(placed_at="2026-11-25T04:47:30-05:00"), "canonical placed_at with an offset"),
        (lambda o: o["totals"]["total"].update(amount=1662.72), "canonical amount as a number"),
        (lambda o: o["lines"][0]["unit_price"].update(currency="usd"), "canonical currency lower case"),
        (lambda o: o["lines"][0].update(colour="red"), "canonical line with an unknown property"),
        (lambda o: o["lines"][0]["discount"].update(amount="-44.73"), "canonical negative discount"),
        (lambda o: o["lines"][0].update(quantity=0), "canonical line quantity 0"),
        (lambda o: o.update(status="shipped"), "canonical status outside the enum"),
        (lambda o: o.update(channel_order_id=5000000001002), "canonical channel_order_id as an integer"),
        (lambda o: o.update(lines=[]), "canonical order with no lines"),
        (lambda o: o["totals"].pop("total"), "canonical totals without total"),
    ]:
        o = copy.deepcopy(order); mutate(o)
        must(False, v_order, o, what)
    o = copy.deepcopy(order); o["extensions"] = {"anything": {"goes": [1, None]}}
    must(True, v_order, o, "canonical free-form extensions")

    v_ev = validator(registry, CANON + "inventory-event.schema.json")
    ev = {"event_id": "e1", "event_type": "transfer", "occurred_at": "2026-11-26T10:00:00Z", "sku": "400112",
          "location": "DC-101", "to_location": "STORE-012", "quantity": 5}
    must(True, v_ev, ev, "inventory transfer with to_location")
    e = dict(ev); del e["to_location"]
    must(False, v_ev, e, "inventory transfer without to_location")
    must(False, v_ev, dict(ev, event_type="sale", quantity=-1), "inventory sale with negative quantity")
    must(True, v_ev, dict(ev, event_type="adjustment", quantity=-2), "inventory adjustment with negative quantity")
    must(False, v_ev, dict(ev, event_type="adjustment", quantity=0), "inventory adjustment of 0")

    v_can = validator(registry, CANON + "cancellation.schema.json")
    c = {"cancellation_id": "c1", "order_id": "shopify:1", "cancelled_at": "2026-11-26T10:00:00Z", "scope": "partial"}
    must(False, v_can, c, "partial cancellation without lines")
    must(True, v_can, dict(c, lines=[{"line_id": "1", "quantity": 1}]), "partial cancellation with lines")
    must(True, v_can, dict(c, scope="full"), "full cancellation without lines")

    others = {
        "inventory-level": {"sku": "400112", "location": "STORE-012", "available": 3, "as_of": "2026-11-26T10:00:00Z"},
        "shipment": {"shipment_id": "s1", "order_id": "shopify:1", "shipped_at": "2026-11-26T10:00:00Z",
                     "tracking_url": "https://example.com/t/1Z2345", "lines": [{"sku": "400112", "quantity": 1}]},
        "return": {"return_id": "r1", "order_id": "shopify:1", "lines": [{"line_id": "1", "quantity": 1, "condition": "opened",
                   "refund": {"amount": "24.99", "currency": "USD"}, "restock": True}]},
        "product": {"sku": "DESK-ATHENS", "title": "ATHENS Desk", "price": {"amount": "649.00", "currency": "USD"},
                    "weight": {"value": 38.5, "unit": "kg"}, "attributes": {"colour": "oak"}, "channel_ids": {"shopify": "39072856"}},
    }
    for name, inst in others.items():
        v = validator(registry, CANON + f"{name}.schema.json")
        must(True, v, inst, f"minimal canonical {name}")
        must(False, v, dict(inst, unexpected="x"), f"canonical {name} with an unknown property")

    bc = {"externalDocumentNumber": "shopify:5000000001002", "orderDate": "2026-11-25", "customerNumber": "WEB-SHOPIFY",
          "currencyCode": "USD", "shipToName": "Maria Lopez", "shipToAddressLine1": "1800 Congress Ave", "shipToCity": "Austin",
          "shipToState": "TX", "shipToCountry": "US", "shipToPostCode": "78701", "email": "maria@lopezdental.example",
          "salesOrderLines": [{"sequence": 10000, "lineType": "Item", "lineObjectNumber": "1996-S", "description": "ATLANTA Whiteboard, base",
                               "quantity": 1, "unitPrice": 1397.3, "discountAmount": 44.73, "taxCode": "TAXABLE"}]}
    must(True, v_bc, bc, "business central sales order built from web-1002")
    must(False, v_bc, dict(bc, switchyardOrderId="shopify:5000000001002"), "business central with switchyardOrderId")
    b = copy.deepcopy(bc); b["salesOrderLines"][0]["sku"] = "WB-ATLANTA-BASE"
    must(False, v_bc, b, "business central line with an unknown property")
    b = copy.deepcopy(bc); b["salesOrderLines"][0]["lineType"] = "Shipping"
    must(False, v_bc, b, "business central lineType outside the documented values")
    must(False, v_bc, dict(bc, orderDate="2026-11-25T09:47:30Z"), "business central orderDate with a time")
    must(False, v_bc, dict(bc, externalDocumentNumber="x" * 36), "business central externalDocumentNumber over 35")


def bench_orders(v_shop, n):
    gen = os.path.join(ROOT, "..", "shared", "bench", "gen_orders.py")
    if not os.path.exists(gen):
        print(f"SKIP  benchmark orders: {os.path.normpath(gen)} not found (shared/ is not beside the repo)")
        return
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "orders.jsonl")
        subprocess.run([sys.executable, gen, str(n), out, "20260827"], check=True, capture_output=True)
        bad = []
        with open(out, encoding="utf-8") as f:
            for i, line in enumerate(f):
                o = json.loads(line)
                errs = errors_of(v_shop, o)
                problems = shopify_reconciles(o)
                if errs or problems:
                    bad.append(f"#{i}: {(errs + problems)[0]}")
    report(not bad, f"benchmark: {n} orders from gen_orders.py (seed 20260827) validate and reconcile", "; ".join(bad[:3]))


if __name__ == "__main__":
    sys.exit(main())
