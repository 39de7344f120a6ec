#!/usr/bin/env bash
# Inference traffic through vastshift, nginx and HAProxy, side by side in one run (issue #22):
#
#   1. 1 KB JSON POSTs, 50/50 split, wrk with 50 connections: throughput and latency, rounds
#      interleaved (direct, vastshift, nginx, HAProxy), first round discarded, ratios within a
#      round, medians reported; and instructions per POST (callgrind, as benches/run.sh counts
#      GETs).
#   2. Server-Sent Events: STREAMS concurrent streams of 50 events 20 ms apart (examples/
#      sse_load.rs) through each proxy — nginx with `proxy_buffering off` — and directly: the
#      delay of each event from the moment the backend wrote it to the moment the client read
#      it, p50 and p99, minus direct's in the same round; and each proxy's resident memory per
#      open stream (RSS with every stream under way, less RSS before).
#
#   benches/inference.sh                        # about 6 minutes
#   ROUNDS=3 DURATION=5 benches/inference.sh    # a quicker look
#
# wrk, the SSE client and the SSE backend run on core LOAD_CPU, every proxy on SERVER_CPU, one
# worker each. Results go to stdout and benches/results/inference.md. Only 127.0.0.1 is loaded;
# everything started is stopped.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-8}
CONNS=${CONNS:-50}
STREAMS=${STREAMS:-1000}
SSE_ROUNDS=${SSE_ROUNDS:-4}
LOAD_CPU=${LOAD_CPU:-0}
SERVER_CPU=${SERVER_CPU:-1}
CALLGRIND_SECS=${CALLGRIND_SECS:-8}

. benches/lib.sh

echo "building vastshift and the SSE load (release)..." >&2
cargo build --release --quiet --bin vastshift --example sse_load
BIN=$PWD/target/release/vastshift
SSE=$PWD/target/release/examples/sse_load

rss_kib() { awk '$1=="VmRSS:" {print $2}' "/proc/$1/status"; }
wait_port() { for _ in $(seq 100); do curl -fs -o /dev/null "http://127.0.0.1:$1/" && return 0; sleep 0.1; done; echo "port $1 never answered" >&2; exit 1; }

B1=$(free_port); B2=$(free_port); S1=$(free_port); S2=$(free_port)
NG=$(free_port); NGS=$(free_port); HA=$(free_port); HAS=$(free_port)
VS=$(free_port); VSA=$(free_port); VSS=$(free_port); VSSA=$(free_port); CG=$(free_port); CGA=$(free_port)

# ---- backends: nginx answering 200 "ok" to anything on two ports (it reads and drops a POST's
# body); the SSE backend on two ports, on the load core so the proxy's core is the proxy's.
mkdir -p "$work/backends" "$work/ngproxy"
{ nginx_preamble "$work/backends"; cat <<EOF
  server { listen 127.0.0.1:$B1; location / { return 200 "ok"; } }
  server { listen 127.0.0.1:$B2; location / { return 200 "ok"; } }
}
EOF
} > "$work/backends/nginx.conf"
on_server nginx -c "$work/backends/nginx.conf" -p "$work/backends" & pids+=($!)
(exec taskset -c "$LOAD_CPU" "$SSE" backend "$S1" "$S2") & pids+=($!)

# ---- nginx as the proxy: the POST split, and the SSE split with proxy_buffering off
{ nginx_preamble "$work/ngproxy"; cat <<EOF
  upstream split { server 127.0.0.1:$B1; server 127.0.0.1:$B2; keepalive 64; }
  upstream sse { server 127.0.0.1:$S1; server 127.0.0.1:$S2; keepalive 64; }
  server {
    listen 127.0.0.1:$NG;
    location / { proxy_pass http://split; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
  server {
    listen 127.0.0.1:$NGS;
    location / {
      proxy_pass http://sse;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
    }
  }
}
EOF
} > "$work/ngproxy/nginx.conf"
on_server nginx -c "$work/ngproxy/nginx.conf" -p "$work/ngproxy" & NG_MASTER=$!; pids+=($NG_MASTER)

# ---- HAProxy: the same two splits
cat > "$work/haproxy.cfg" <<EOF
global
  nbthread 1
  maxconn 9000
defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  option http-keep-alive
frontend fe
  bind 127.0.0.1:$HA
  default_backend split
frontend fe_sse
  bind 127.0.0.1:$HAS
  # What HAProxy's manual prescribes for interactive streams: without it, HAProxy holds small
  # chunks back (MSG_MORE) and events arrive 100-200 ms late.
  option http-no-delay
  default_backend sse
backend split
  balance roundrobin
  http-reuse always
  server b1 127.0.0.1:$B1
  server b2 127.0.0.1:$B2
backend sse
  option http-no-delay
  balance roundrobin
  http-reuse always
  server s1 127.0.0.1:$S1
  server s2 127.0.0.1:$S2
EOF
on_server haproxy -f "$work/haproxy.cfg" -db & HA_PID=$!; pids+=($HA_PID)

# ---- vastshift: the POST split, the SSE split, and one for callgrind
vs_config() { # listen admin legacy-port vastai-port
  cat <<EOF
[server]
listen = "127.0.0.1:$1"
admin_listen = "127.0.0.1:$2"
state_file = "$work/state-$1.json"
[legacy]
url = "http://127.0.0.1:$3"
[vastai]
url = "http://127.0.0.1:$4"
[split]
percent = 50.0
[guard]
enabled = true
EOF
}
vs_config "$VS" "$VSA" "$B1" "$B2" > "$work/vs.toml"
vs_config "$VSS" "$VSSA" "$S1" "$S2" > "$work/vs-sse.toml"
vs_config "$CG" "$CGA" "$B1" "$B2" > "$work/cg.toml"
export VASTSHIFT_ADMIN_TOKEN=bench-token RUST_LOG=warn
on_server "$BIN" serve --worker-threads 1 --config "$work/vs.toml" & pids+=($!)
on_server "$BIN" serve --worker-threads 1 --config "$work/vs-sse.toml" & VSS_PID=$!; pids+=($VSS_PID)
for p in $B1 $B2 $S1 $S2 $NG $NGS $HA $HAS $VS $VSS; do wait_port "$p"; done
NG_WORKER=$(pgrep -P "$NG_MASTER" | head -1)

# ---- 1. JSON POSTs
python3 - > "$work/body.json" <<'PY'
import json
doc = {"model": "llama-3-8b", "max_tokens": 64, "temperature": 0.2, "prompt": ""}
doc["prompt"] = "x" * (1024 - len(json.dumps(doc, separators=(",", ":"))))
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
  on_load wrk -t1 -c"$CONNS" -d"$2"s --latency -s "$work/post.lua" "http://127.0.0.1:$1/v1/completions" > "$out" 2>&1
  parse_wrk "$out"
}
names=(direct vastshift nginx haproxy)
ports=($B1 $VS $NG $HA)
echo "warming up..." >&2
for p in "${ports[@]}"; do run_wrk "$p" 2 >/dev/null; done
post="$work/post.txt"
: > "$post"
for r in $(seq 1 "$ROUNDS"); do
  for i in "${!names[@]}"; do
    line=$(run_wrk "${ports[$i]}" "$DURATION")
    echo "$r ${names[$i]} $line" >> "$post"
    echo "POST round $r ${names[$i]}: $line" >&2
  done
done

# ---- instructions per POST (callgrind), collection zeroed after warm-up
requests_total() { curl -s "http://127.0.0.1:$CGA/metrics" | awk '/^vastshift_requests_total/ {s+=$2} END {printf "%d", s}'; }
IPR="n/a"; NREQ=0
on_server valgrind --tool=callgrind --callgrind-out-file="$work/callgrind.out" "$BIN" serve --worker-threads 1 --config "$work/cg.toml" 2>"$work/callgrind.log" & CG_PID=$!; pids+=($CG_PID)
for _ in $(seq 300); do curl -fs -o /dev/null "http://127.0.0.1:$CG/" && break; sleep 0.2; done
on_load wrk -t1 -c10 -d3s -s "$work/post.lua" "http://127.0.0.1:$CG/v1/completions" >/dev/null 2>&1
callgrind_control -z "$CG_PID" >/dev/null 2>&1
before=$(requests_total)
on_load wrk -t1 -c10 -d"$CALLGRIND_SECS"s -s "$work/post.lua" "http://127.0.0.1:$CG/v1/completions" >/dev/null 2>&1
after=$(requests_total)
callgrind_control -d "$CG_PID" >/dev/null 2>&1
sleep 1
total_ir=$(cat "$work"/callgrind.out* 2>/dev/null | awk '/^(summary|totals):/ {print $2}' | sort -n | tail -1)
if [ -n "$total_ir" ] && [ "$after" -gt "$before" ]; then
  IPR=$(( total_ir / (after - before) )); NREQ=$(( after - before ))
fi
kill "$CG_PID" 2>/dev/null || true

# ---- 2. SSE streams
sse_names=(direct vastshift nginx haproxy)
sse_ports=($S1 $VSS $NGS $HAS)
sse_pids=("" "$VSS_PID" "$NG_WORKER" "$HA_PID")
sse="$work/sse.txt"
: > "$sse"
echo "SSE warm-up..." >&2
for p in "${sse_ports[@]}"; do on_load "$SSE" client "http://127.0.0.1:$p/events?n=5&gap_ms=20" 200 >/dev/null; done
for r in $(seq 1 "$SSE_ROUNDS"); do
  for j in 0 1 2 3; do
    i=$(( (j + r) % 4 ))
    line=$(on_load "$SSE" client "http://127.0.0.1:${sse_ports[$i]}/events?n=50&gap_ms=20" "$STREAMS" ${sse_pids[$i]})
    echo "$r ${sse_names[$i]} $line" >> "$sse"
    echo "SSE round $r ${sse_names[$i]}: p50 p99 us, events, failed, RSS before/open KiB: $line" >&2
    sleep 1
  done
done

# ---- report
python3 - "$post" "$ROUNDS" "$sse" "$SSE_ROUNDS" "$IPR" "$NREQ" "$CONNS" "$DURATION" "$STREAMS" "$BODY_LEN" > "$work/report.md" <<'PY'
import statistics, sys
post, rounds, sse, sse_rounds, ipr, nreq, conns, dur, streams, body_len = sys.argv[1:11]
rounds, sse_rounds, streams = int(rounds), int(sse_rounds), int(streams)
med = statistics.median
d = {}
for r, name, rps, p50, p99, bad in (l.split() for l in open(post)):
    d.setdefault(name, {})[int(r)] = (float(rps), float(p50), float(p99), int(bad))
keep = [r for r in range(2, rounds + 1)] or [1]
out = [f"JSON POSTs of {body_len} bytes, 50/50 split: {rounds} rounds x {dur} s, {conns} connections, first round discarded\n",
       "| target | requests/s (median) | p50 ms | p99 ms | non-2xx |", "|---|---|---|---|---|"]
for n in ["direct", "vastshift", "nginx", "haproxy"]:
    out.append(f"| {n} | {med(d[n][r][0] for r in keep):,.0f} | {med(d[n][r][1] for r in keep):.2f} | "
               f"{med(d[n][r][2] for r in keep):.2f} | {sum(d[n][r][3] for r in keep)} |")
ratio = lambda a, b: med(d[a][r][0] / d[b][r][0] for r in keep)
out += ["", f"- vastshift / nginx POST throughput: **{ratio('vastshift', 'nginx'):.2f}x** (median of per-round ratios)",
        f"- vastshift / HAProxy POST throughput: **{ratio('vastshift', 'haproxy'):.2f}x**",
        f"- instructions per proxied POST (callgrind, {nreq} requests after warm-up): **{ipr}**", ""]
s = {}
for r, name, p50, p99, events, failed, before, open_ in (l.split() for l in open(sse)):
    s.setdefault(name, {})[int(r)] = (int(p50), int(p99), int(events), int(failed), int(before), int(open_))
skeep = [r for r in range(2, sse_rounds + 1)] or [1]
out += [f"SSE: {streams} concurrent streams of 50 events 20 ms apart; {len(skeep)} rounds kept (first discarded, order rotated); "
        "delay = from the backend's write to the client's read, added = minus direct's in the same round\n",
        "| target | p50 us | p99 us | added p50 us | added p99 us | events read | streams failed | RSS per open stream |",
        "|---|---|---|---|---|---|---|---|"]
for n in ["direct", "vastshift", "nginx", "haproxy"]:
    x, base = s[n], s["direct"]
    add50 = med(x[r][0] - base[r][0] for r in skeep)
    add99 = med(x[r][1] - base[r][1] for r in skeep)
    per = "" if n == "direct" else f"{med((x[r][5] - x[r][4]) / streams for r in skeep):.1f} KiB"
    out.append(f"| {n} | {med(x[r][0] for r in skeep):,.0f} | {med(x[r][1] for r in skeep):,.0f} | "
               f"{'' if n == 'direct' else f'{add50:,.0f}'} | {'' if n == 'direct' else f'{add99:,.0f}'} | "
               f"{sum(x[r][2] for r in skeep):,} | {sum(x[r][3] for r in skeep)} | {per} |")
print("\n".join(out))
PY
mkdir -p benches/results
{
  echo "# vastshift inference benchmark — $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo
  echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); load on core $LOAD_CPU, proxies on core $SERVER_CPU"
  echo "versions: $("$BIN" --version), $(nginx -v 2>&1), $(haproxy -v | head -1), $(wrk -v 2>&1 | head -1)"
  echo
  cat "$work/report.md"
} | tee benches/results/inference.md
