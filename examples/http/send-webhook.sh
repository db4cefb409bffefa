#!/bin/sh
# Sends Shopify order webhooks to the engine as Shopify does: the body signed with HMAC-SHA256
# (base64) in X-Shopify-Hmac-Sha256. Usage: examples/http/send-webhook.sh FILE...
# SHOPIFY_WEBHOOK_SECRET (default: the demo's) and SWITCHYARD_URL (default http://127.0.0.1:8080).
set -eu
secret="${SHOPIFY_WEBHOOK_SECRET:-demo-webhook-secret}"
url="${SWITCHYARD_URL:-http://127.0.0.1:8080}/ingest/shopify/orders"
for file in "$@"; do
  sig=$(openssl dgst -sha256 -hmac "$secret" -binary < "$file" | base64)
  printf '%s: ' "$file"
  curl -sS -X POST "$url" -H "Content-Type: application/json" -H "X-Shopify-Topic: orders/create" \
    -H "X-Shopify-Shop-Domain: demo.myshopify.com" -H "X-Shopify-Hmac-Sha256: $sig" --data-binary "@$file"
  echo
done
