#!/usr/bin/env python3
"""Rewrite the benchmark block of sku-items.csv: SKU-00001..SKU-10000 -> ITM-00001..ITM-10000.

The benchmark workload (shared/bench/gen_orders.py) draws its SKUs from that range. Hand-curated rows
(every row whose key is not SKU-nnnnn) and the version comment are kept as they are, so the script can
be rerun at any time. Usage: python3 gen_benchmark_skus.py [PATH=sku-items.csv next to this script]
"""
import os
import re
import sys

path = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(os.path.abspath(__file__)), "sku-items.csv")
with open(path, encoding="utf-8", newline="") as f:
    kept = [line for line in f.read().splitlines() if not re.match(r"SKU-[0-9]{5},", line)]
rows = [f"SKU-{n:05d},ITM-{n:05d},Benchmark item {n:05d}" for n in range(1, 10001)]
with open(path, "w", encoding="utf-8", newline="") as f:
    f.write("\n".join(kept + rows) + "\n")
print(f"{path}: {len(kept) - 2} curated rows + {len(rows)} benchmark rows")
