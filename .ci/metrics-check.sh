#!/usr/bin/env bash
# Starts the real binary between two demo backends, sends traffic (including to a dead
# backend), scrapes /metrics and runs `promtool check metrics` on it. Also checks that every
# metric name the deployment files rely on (deploy/metric-names.txt) is exported.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --quiet
bin=target/debug/vastshift
dir=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$dir"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
lp=$(free_port); vp=$(free_port); pp=$(free_port); ap=$(free_port); dead=$(free_port)
"$bin" demo-backend --listen "127.0.0.1:$lp" --name legacy 2>/dev/null & pids+=($!)
"$bin" demo-backend --listen "127.0.0.1:$vp" --name vastai 2>/dev/null & pids+=($!)
cat > "$dir/vastshift.toml" <<TOML
[server]
listen = "127.0.0.1:$pp"
admin_listen = "127.0.0.1:$ap"
[legacy]
url = "http://127.0.0.1:$lp"
[vastai]
url = "http://127.0.0.1:$vp"
[split]
percent = 50
[[route]]
name = "users"
path_prefix = "/api/users"
percent = 100
[shadow]
enabled = true
TOML
VASTSHIFT_ADMIN_TOKEN=ci-token RUST_LOG=warn "$bin" serve --config "$dir/vastshift.toml" & pids+=($!)
for _ in $(seq 100); do curl -fs "http://127.0.0.1:$ap/ready" >/dev/null 2>&1 && break; sleep 0.1; done
for i in $(seq 50); do curl -s "http://127.0.0.1:$pp/item/$i" >/dev/null; curl -s "http://127.0.0.1:$pp/api/users/$i" >/dev/null; done
curl -s -X POST -d '{}' "http://127.0.0.1:$pp/write" >/dev/null
curl -s -H 'Authorization: Bearer ci-token' -X POST "http://127.0.0.1:$ap/admin/rollback" >/dev/null
sleep 1
curl -fs "http://127.0.0.1:$ap/metrics" > "$dir/metrics.txt"
promtool check metrics < "$dir/metrics.txt"
echo "promtool check metrics: no problems ($(grep -c '^vastshift_' "$dir/metrics.txt") samples)"
if [ -f deploy/metric-names.txt ]; then
  missing=0
  while read -r name; do
    [ -z "$name" ] && continue
    case "$name" in \#*) continue;; esac
    if ! grep -q "^$name[{ ]" "$dir/metrics.txt"; then echo "missing from /metrics: $name"; missing=1; fi
  done < deploy/metric-names.txt
  [ "$missing" = 0 ] && echo "every name in deploy/metric-names.txt is exported"
  exit "$missing"
fi
