#!/usr/bin/env bash
# What an adapter costs (issue #23), measured side by side in one run: 1 KB JSON POSTs in the
# legacy API (`{"input": ..., "max_length": 64}`), 50/50 split, through vastshift without an
# adapter and through vastshift whose route adapts the vastai half onto a vLLM-style
# `/v1/completions` (the request rewritten by a jq program, the JSON answer mapped back by
# another). Both backends are nginx `return 200` with a JSON body: legacy answers in the legacy
# API, vastai in vLLM's.
#
#   1. wrk, 50 connections: throughput, p50 and p99; rounds interleaved (plain, adapted), the
#      first discarded, the ratio taken within a round, medians reported.
#   2. Instructions per POST (callgrind) for each, as benches/run.sh counts GETs.
#
#   benches/adapter.sh                        # about 4 minutes; benches/run.sh runs it last
#   ROUNDS=3 DURATION=5 benches/adapter.sh    # a quicker look
#
# wrk on core LOAD_CPU, every server on SERVER_CPU, one worker each. Results go to stdout and
# benches/results/adapter.md. Only 127.0.0.1 is loaded; everything started is stopped.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-6}
DURATION=${DURATION:-8}
CONNS=${CONNS:-50}
LOAD_CPU=${LOAD_CPU:-0}
SERVER_CPU=${SERVER_CPU:-1}
CALLGRIND_SECS=${CALLGRIND_SECS:-8}

. benches/lib.sh

echo "building vastshift (release)..." >&2
cargo build --release --quiet --bin vastshift
BIN=$PWD/target/release/vastshift

wait_port() { for _ in $(seq 100); do curl -fs -o /dev/null "http://127.0.0.1:$1/" && return 0; sleep 0.1; done; echo "port $1 never answered" >&2; exit 1; }

B1=$(free_port); B2=$(free_port)
VS=$(free_port); VSA=$(free_port); AD=$(free_port); ADA=$(free_port)
CG=$(free_port); CGA=$(free_port); CGD=$(free_port); CGDA=$(free_port)

# ---- backends: legacy answers in the legacy API, vastai in vLLM's
mkdir -p "$work/backends"
{ nginx_preamble "$work/backends"; cat <<'EOF'
  default_type application/json;
EOF
cat <<EOF
  server { listen 127.0.0.1:$B1; location / { return 200 '{"output":"ok","tokens":3}'; } }
  server { listen 127.0.0.1:$B2; location / { return 200 '{"id":"cmpl-1","object":"text_completion","choices":[{"index":0,"text":"ok","finish_reason":"length"}],"usage":{"prompt_tokens":250,"completion_tokens":3,"total_tokens":253}}'; } }
}
EOF
} > "$work/backends/nginx.conf"
on_server nginx -c "$work/backends/nginx.conf" -p "$work/backends" & pids+=($!)

# ---- vastshift without and with the adapter
vs_config() { # listen admin adapter(true/false)
  cat <<EOF
[server]
listen = "127.0.0.1:$1"
admin_listen = "127.0.0.1:$2"
state_file = "$work/state-$1.json"
[legacy]
url = "http://127.0.0.1:$B1"
[vastai]
url = "http://127.0.0.1:$B2"
[split]
percent = 0.0
[guard]
enabled = true
[[route]]
name = "predict"
path_prefix = "/v1/predict"
percent = 50.0
EOF
  if [ "$3" = true ]; then
    cat <<'EOF'
adapter = "vllm"

[adapter.vllm]
path = "/v1/completions"
request = '{model: "meta-llama/Llama-3.1-8B-Instruct", prompt: .input, max_tokens: (.max_length // 256)}'
response = '{output: .choices[0].text, tokens: .usage.completion_tokens}'
EOF
  fi
}
vs_config "$VS" "$VSA" false > "$work/plain.toml"
vs_config "$AD" "$ADA" true > "$work/adapted.toml"
vs_config "$CG" "$CGA" false > "$work/cg-plain.toml"
vs_config "$CGD" "$CGDA" true > "$work/cg-adapted.toml"
export VASTSHIFT_ADMIN_TOKEN=bench-token RUST_LOG=warn
on_server "$BIN" serve --worker-threads 1 --config "$work/plain.toml" & pids+=($!)
on_server "$BIN" serve --worker-threads 1 --config "$work/adapted.toml" & pids+=($!)
for p in $B1 $B2 $VS $AD; do wait_port "$p"; done

python3 - > "$work/body.json" <<'PY'
import json
doc = {"input": "", "max_length": 64, "temperature": 0.2}
doc["input"] = "x" * (1024 - len(json.dumps(doc, separators=(",", ":"))))
print(json.dumps(doc, separators=(",", ":")), end="")
PY
BODY_LEN=$(wc -c < "$work/body.json")
cat > "$work/post.lua" <<EOF
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local f = io.open("$work/body.json")
wrk.body = f:read("*a")
f:close()
EOF
# Both answer the client in the legacy API; the adapted one only when the adapter works.
check=$(curl -s -H 'content-type: application/json' -H 'x-vastshift-backend: vastai' --data-binary @"$work/body.json" "http://127.0.0.1:$AD/v1/predict")
[ "$check" = '{"output":"ok","tokens":3}' ] || { echo "the adapted route answered $check" >&2; exit 1; }

parse_wrk() {
  python3 - "$1" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
def ms(v, unit):
    return float(v) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
lat = {m.group(1): ms(m.group(2), m.group(3)) for m in re.finditer(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s|m)\s*$", text, re.M)}
errors = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
print(f"{rps:.1f} {lat.get('50', 0):.3f} {lat.get('99', 0):.3f} {errors.group(1) if errors else 0}")
PY
}
run_wrk() { # port duration
  local out="$work/wrk-$RANDOM.txt"
  on_load wrk -t1 -c"$CONNS" -d"$2"s --latency -s "$work/post.lua" "http://127.0.0.1:$1/v1/predict" > "$out" 2>&1
  parse_wrk "$out"
}
names=(plain adapted)
ports=($VS $AD)
echo "warming up..." >&2
for p in "${ports[@]}"; do run_wrk "$p" 2 >/dev/null; done
post="$work/post.txt"
: > "$post"
for r in $(seq 1 "$ROUNDS"); do
  for j in 0 1; do
    i=$(( (j + r) % 2 ))
    line=$(run_wrk "${ports[$i]}" "$DURATION")
    echo "$r ${names[$i]} $line" >> "$post"
    echo "adapter POST round $r ${names[$i]}: $line" >&2
  done
done

# ---- instructions per POST (callgrind), collection zeroed after warm-up
callgrind_post() { # port admin-port config -> "instructions requests"
  local out="$work/callgrind-$1.out"
  on_server valgrind --tool=callgrind --callgrind-out-file="$out" "$BIN" serve --worker-threads 1 --config "$3" 2>"$work/callgrind-$1.log" & local pid=$!; pids+=($pid)
  for _ in $(seq 300); do curl -fs -o /dev/null "http://127.0.0.1:$1/" && break; sleep 0.2; done
  local total; total() { curl -s "http://127.0.0.1:$2/metrics" | awk '/^vastshift_requests_total/ {s+=$2} END {printf "%d", s}'; }
  on_load wrk -t1 -c10 -d3s -s "$work/post.lua" "http://127.0.0.1:$1/v1/predict" >/dev/null 2>&1
  callgrind_control -z "$pid" >/dev/null 2>&1
  local before; before=$(total)
  on_load wrk -t1 -c10 -d"$CALLGRIND_SECS"s -s "$work/post.lua" "http://127.0.0.1:$1/v1/predict" >/dev/null 2>&1
  local after; after=$(total)
  callgrind_control -d "$pid" >/dev/null 2>&1
  sleep 1
  # One file holds every thread (the jq runs happen on the run pool's threads); the dump after
  # the zeroing is the largest count.
  local ir; ir=$(cat "$out"* 2>/dev/null | awk '/^(summary|totals):/ {print $2}' | sort -n | tail -1)
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  if [ -n "$ir" ] && [ "$after" -gt "$before" ]; then echo "$(( ir / (after - before) )) $(( after - before ))"; else echo "n/a 0"; fi
}
read -r IPR_PLAIN N_PLAIN < <(callgrind_post "$CG" "$CGA" "$work/cg-plain.toml")
read -r IPR_ADAPTED N_ADAPTED < <(callgrind_post "$CGD" "$CGDA" "$work/cg-adapted.toml")

# ---- report
python3 - "$post" "$ROUNDS" "$IPR_PLAIN" "$N_PLAIN" "$IPR_ADAPTED" "$N_ADAPTED" "$CONNS" "$DURATION" "$BODY_LEN" > "$work/report.md" <<'PY'
import statistics, sys
post, rounds, ipr_p, n_p, ipr_a, n_a, conns, dur, body_len = sys.argv[1:10]
rounds = int(rounds)
med = statistics.median
d = {}
for r, name, rps, p50, p99, bad in (l.split() for l in open(post)):
    d.setdefault(name, {})[int(r)] = (float(rps), float(p50), float(p99), int(bad))
keep = [r for r in range(2, rounds + 1)] or [1]
out = [f"JSON POSTs of {body_len} bytes in the legacy API, 50/50 split on the route: {rounds} rounds x {dur} s, "
       f"{conns} connections, first round discarded, order alternated\n",
       "| vastshift | requests/s (median) | p50 ms | p99 ms | non-2xx | instructions per POST |", "|---|---|---|---|---|---|"]
for n, label, ipr, nreq in [("plain", "without an adapter", ipr_p, n_p), ("adapted", "vastai half adapted (request and answer)", ipr_a, n_a)]:
    out.append(f"| {label} | {med(d[n][r][0] for r in keep):,.0f} | {med(d[n][r][1] for r in keep):.2f} | "
               f"{med(d[n][r][2] for r in keep):.2f} | {sum(d[n][r][3] for r in keep)} | {ipr} ({nreq} requests) |")
ratio = med(d["adapted"][r][0] / d["plain"][r][0] for r in keep)
p99 = med(d["adapted"][r][2] / d["plain"][r][2] for r in keep)
out += ["", f"- adapted / plain throughput: **{ratio:.2f}x** (median of per-round ratios; the bound is 0.75x)",
        f"- adapted / plain p99: **{p99:.2f}x**"]
if ipr_p.isdigit() and ipr_a.isdigit():
    out.append(f"- instructions an adapted request adds, averaged over the split (half are adapted): "
               f"**{int(ipr_a) - int(ipr_p):,}** per POST, so about {2 * (int(ipr_a) - int(ipr_p)):,} per adapted one")
print("\n".join(out))
PY
mkdir -p benches/results
{
  echo "# vastshift adapter benchmark — $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo
  echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); load on core $LOAD_CPU, servers on core $SERVER_CPU"
  echo "versions: $("$BIN" --version), $(nginx -v 2>&1), $(wrk -v 2>&1 | head -1)"
  echo
  cat "$work/report.md"
} | tee benches/results/adapter.md
