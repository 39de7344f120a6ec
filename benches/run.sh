#!/usr/bin/env bash
# vastshift side by side with nginx and HAProxy, on this machine, in one run.
#
#   benches/run.sh                       # about 25 minutes (the adapter's POST case last)
#   ROUNDS=2 DURATION=3 benches/run.sh   # a quick look
#
# Two nginx `return 200` backends; vastshift, nginx and HAProxy each split 50/50 between them.
# wrk is pinned to one core, every server to the other, one worker each. Rounds are interleaved
# (direct, vastshift, nginx, HAProxy), the first is discarded, ratios are taken within a round
# and the median is reported. Also: added latency at a fixed rate and on one connection, the
# parallel run's cost at saturation and its effect on primary latency at a fixed rate (many short
# rounds, rotated), instructions per proxied request (callgrind) and resident memory. Results go
# to stdout and benches/results/latest.md. Only 127.0.0.1 is ever loaded; everything started is
# stopped.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-10}
CONNS=${CONNS:-50}
LOAD_CPU=${LOAD_CPU:-0}
SERVER_CPU=${SERVER_CPU:-1}
RATE=${RATE:-5000}                 # the fixed moderate rate for added latency, requests/s
IDLE_CONNS=${IDLE_CONNS:-10000}
CALLGRIND_SECS=${CALLGRIND_SECS:-10}
# Latency rounds are short and many: on a shared machine a stall of the host lands in a few of
# them, and the median over rounds leaves those out instead of averaging them in.
LAT_DURATION=${LAT_DURATION:-3}             # s per latency run
RATE_ROUNDS=${RATE_ROUNDS:-$((ROUNDS * 4))} # added-latency rounds (first discarded)
ISO_ROUNDS=${ISO_ROUNDS:-$((ROUNDS * 4))}   # parallel-run isolation rounds (first discarded)
SHADOW_ROUNDS=${SHADOW_ROUNDS:-$((ROUNDS * 4))} # parallel-run cost rounds (first discarded)

. benches/lib.sh

echo "building vastshift (release)..." >&2
cargo build --release --quiet
BIN=$PWD/target/release/vastshift

B1=$(free_port); B2=$(free_port); NG=$(free_port); HA=$(free_port)
VS=$(free_port); VSA=$(free_port); SH=$(free_port); SHA=$(free_port); CG=$(free_port); CGA=$(free_port)
SHX=$(free_port); SHXA=$(free_port); NGM=$(free_port)

# ---- backends: one nginx, one worker, two ports answering 200 "ok"
ok_backends() { # dir port... -> an nginx config in dir answering 200 "ok" on each port
  mkdir -p "$1"
  {
    echo "worker_processes 1;"
    echo "daemon off;"
    echo "pid $1/nginx.pid;"
    echo "error_log $1/error.log warn;"
    echo "events { worker_connections 20000; }"
    echo "http {"
    echo "  access_log off;"
    echo "  keepalive_requests 1000000;"
    local port
    for port in "${@:2}"; do
      echo "  server { listen 127.0.0.1:$port; location / { return 200 \"ok\"; } }"
    done
    echo "}"
  } > "$1/nginx.conf"
}
mkdir -p "$work/ngproxy"
ok_backends "$work/backends" "$B1" "$B2"
on_server nginx -c "$work/backends/nginx.conf" -p "$work/backends" & pids+=($!)

# ---- nginx as the proxy
cat > "$work/ngproxy/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $work/ngproxy/nginx.pid;
error_log $work/ngproxy/error.log warn;
events { worker_connections 20000; }
http {
  access_log off;
  keepalive_requests 1000000;
  upstream split { server 127.0.0.1:$B1; server 127.0.0.1:$B2; keepalive 64; }
  server {
    listen 127.0.0.1:$NG;
    location / {
      proxy_pass http://split;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
  }
  # The same split with nginx's own request mirroring at 100 %: the reference for the parallel
  # run's cost (nginx sends each mirror and discards its answer; it compares nothing).
  server {
    listen 127.0.0.1:$NGM;
    location / {
      mirror /mirror;
      proxy_pass http://split;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
    location = /mirror {
      internal;
      proxy_pass http://split\$request_uri;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
  }
}
EOF
on_server nginx -c "$work/ngproxy/nginx.conf" -p "$work/ngproxy" & pids+=($!)

# ---- HAProxy
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
backend split
  balance roundrobin
  http-reuse always
  server b1 127.0.0.1:$B1
  server b2 127.0.0.1:$B2
EOF
on_server haproxy -f "$work/haproxy.cfg" -db & pids+=($!)

# ---- vastshift: plain, with shadow at 100 % (default bound, and every request mirrored), and
# one for callgrind
vs_config() { # listen admin shadow [more shadow settings]
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
percent = 50.0
[shadow]
enabled = $3
percent = 100.0
${4:-}
[guard]
enabled = true
EOF
}
vs_config "$VS" "$VSA" false > "$work/vs.toml"
vs_config "$SH" "$SHA" true > "$work/shadow.toml"
# A bound no load here reaches: what mirroring every request costs.
vs_config "$SHX" "$SHXA" true "max_in_flight = 1000000" > "$work/shadow-all.toml"
vs_config "$CG" "$CGA" false > "$work/cg.toml"
export VASTSHIFT_ADMIN_TOKEN=bench-token RUST_LOG=warn
on_server "$BIN" serve --worker-threads 1 --config "$work/vs.toml" & VS_PID=$!; pids+=($VS_PID)
on_server "$BIN" serve --worker-threads 1 --config "$work/shadow.toml" & SH_PID=$!; pids+=($SH_PID)
on_server "$BIN" serve --worker-threads 1 --config "$work/shadow-all.toml" & pids+=($!)

wait_port() { for _ in $(seq 100); do curl -fs -o /dev/null "http://127.0.0.1:$1/" && return 0; sleep 0.1; done; echo "port $1 never answered" >&2; exit 1; }
for p in $B1 $B2 $NG $NGM $HA $VS $SH $SHX; do wait_port "$p"; done
rss_kib() { awk -v k="$2" '$1==k":" {print $2}' "/proc/$1/status"; }
IDLE_RSS=$(rss_kib "$VS_PID" VmRSS)

# ---- helpers
# wrk output -> "rps p50_ms p99_ms"
parse_wrk() {
  python3 - "$1" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
def ms(v, unit):
    return float(v) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
lat = {m.group(1): ms(m.group(2), m.group(3)) for m in re.finditer(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s|m)\s*$", text, re.M)}
errors = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
sock = re.search(r"Socket errors: (.*)", text)
print(f"{rps:.1f} {lat.get('50', 0):.3f} {lat.get('99', 0):.3f} {errors.group(1) if errors else 0} {'sockerr' if sock else 'ok'}")
PY
}
run_wrk() { # name port duration [script] [connections]
  local out="$work/wrk-$1-$RANDOM.txt"
  if [ -n "${4:-}" ]; then
    on_load wrk -t1 -c"${5:-$CONNS}" -d"$3"s --latency -s "$4" "http://127.0.0.1:$2/" > "$out" 2>&1
  else
    on_load wrk -t1 -c"${5:-$CONNS}" -d"$3"s --latency "http://127.0.0.1:$2/" > "$out" 2>&1
  fi
  parse_wrk "$out"
}
# A fixed rate: each of CONNS connections waits between requests for a time drawn uniformly from
# 0 to 2*CONNS*1000/RATE ms (mean CONNS*1000/RATE). A constant wait keeps the connections that
# were answered together in step for good: they gather into a few large bursts, and what gets
# measured is how long a burst of up to CONNS requests takes to drain, at well below RATE.
cat > "$work/rate.lua" <<EOF
function delay() return math.random(0, $(( 2 * CONNS * 1000 / RATE ))) end
EOF
# One connection, no wait: the latency of a request with nothing queued before it.
cat > "$work/single.lua" <<EOF
function delay() return 0 end
EOF

names=(direct vastshift nginx haproxy)
ports=($B1 $VS $NG $HA)
echo "warming up..." >&2
for p in "${ports[@]}" $SH $SHX $NGM; do run_wrk warm "$p" 2 >/dev/null; done

results="$work/results.txt"
: > "$results"
for r in $(seq 1 "$ROUNDS"); do
  for i in "${!names[@]}"; do
    line=$(run_wrk "${names[$i]}" "${ports[$i]}" "$DURATION")
    echo "$r ${names[$i]} throughput $line" >> "$results"
    echo "round $r ${names[$i]}: $line" >&2
  done
done
LOAD_HWM=$(rss_kib "$VS_PID" VmHWM)

# ---- the parallel run's cost at saturation: shadow off, at 100 % with the default bound on
# mirrors in flight (beyond it they are dropped), and with every request mirrored. Short rounds,
# order rotated, ratios within a round; each shadow run also records how many of its requests
# were mirrored (requests counted minus mirrors dropped, from the proxy's own metrics).
shadow_results="$work/shadow.txt"
: > "$shadow_results"
# nginx without and with its `mirror` at 100 % run in the same rotation, as the reference.
sh_names=(shadow-off shadow shadow-all nginx nginx-mirror)
sh_ports=($VS $SH $SHX $NG $NGM)
sh_admin=($VSA $SHA $SHXA "" "")
counts() { # admin port -> "requests dropped" (nginx counts neither: "0 0")
  [ -n "$1" ] || { echo "0 0"; return; }
  curl -s "http://127.0.0.1:$1/metrics" | awk '/^vastshift_requests_total/ {r += $2}
    /^vastshift_shadow_requests_total\{result="dropped"\}/ {d = $2} END {printf "%d %d", r, d}'
}
for r in $(seq 1 "$SHADOW_ROUNDS"); do
  for j in 0 1 2 3 4; do
    i=$(( (j + r) % 5 ))
    read -r q0 d0 <<< "$(counts "${sh_admin[$i]}")"
    line=$(run_wrk "${sh_names[$i]}" "${sh_ports[$i]}" "$LAT_DURATION")
    read -r q1 d1 <<< "$(counts "${sh_admin[$i]}")"
    echo "$r ${sh_names[$i]} $line $((q1 - q0)) $((d1 - d0))" >> "$shadow_results"
    echo "round $r ${sh_names[$i]}: $line, $((q1 - q0)) requests, $((d1 - d0)) mirrors dropped" >&2
  done
done

# ---- added latency, at RATE and on one connection; the order rotates every round
for r in $(seq 1 "$RATE_ROUNDS"); do
  for j in 0 1 2 3; do
    i=$(( (j + r) % 4 ))
    line=$(run_wrk "${names[$i]}" "${ports[$i]}" "$LAT_DURATION" "$work/rate.lua")
    echo "$r ${names[$i]} rate $line" >> "$results"
    echo "round $r ${names[$i]} at ~$RATE/s: $line" >&2
    line=$(run_wrk "${names[$i]}" "${ports[$i]}" "$LAT_DURATION" "$work/single.lua" 1)
    echo "$r ${names[$i]} single $line" >> "$results"
    echo "round $r ${names[$i]} on one connection: $line" >&2
  done
done

# ---- the parallel run must not slow the client: primary latency with a healthy mirror target,
# one that takes 1.5 s and one that is down, against shadow off (all traffic to legacy, mirrors
# to vastai).
SLOW=$(free_port); DEAD=$(free_port); I1=$(free_port); I1A=$(free_port); I2=$(free_port); I2A=$(free_port); I3=$(free_port); I3A=$(free_port)
cat > "$work/slow.py" <<'PY'
import asyncio, sys
async def handle(reader, writer):
    try:
        while True:
            await reader.readuntil(b"\r\n\r\n")
            await asyncio.sleep(1.5)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
    except Exception:
        writer.close()
async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", int(sys.argv[1]), backlog=1024)
    async with server:
        await server.serve_forever()
asyncio.run(main())
PY
on_server python3 "$work/slow.py" "$SLOW" & pids+=($!)
iso_config() { # listen admin shadow-enabled vastai-port
  cat <<EOF
[server]
listen = "127.0.0.1:$1"
admin_listen = "127.0.0.1:$2"
state_file = "$work/state-$1.json"
[legacy]
url = "http://127.0.0.1:$B1"
[vastai]
url = "http://127.0.0.1:$4"
[split]
percent = 0.0
[shadow]
enabled = $3
percent = 100.0
EOF
}
# A healthy mirror target that does not share the proxy's core: an nginx on the load generator's
# core, which wrk at RATE leaves mostly idle. Where mirror targets really run (other machines),
# their work is not on the proxy's core; this case separates what mirroring costs the primary
# in the proxy from what the second backend's work costs everything on a shared core.
APART=$(free_port)
ok_backends "$work/apart" "$APART"
(exec taskset -c "$LOAD_CPU" nginx -c "$work/apart/nginx.conf" -p "$work/apart") & pids+=($!)
I4=$(free_port); I4A=$(free_port); I5=$(free_port); I5A=$(free_port)
iso_config "$I1" "$I1A" false "$SLOW" > "$work/iso-off.toml"
iso_config "$I4" "$I4A" true "$B2" > "$work/iso-on.toml"
iso_config "$I5" "$I5A" true "$APART" > "$work/iso-apart.toml"
iso_config "$I2" "$I2A" true "$SLOW" > "$work/iso-slow.toml"
iso_config "$I3" "$I3A" true "$DEAD" > "$work/iso-down.toml"
for n in off on apart slow down; do on_server "$BIN" serve --worker-threads 1 --config "$work/iso-$n.toml" & pids+=($!); done
for p in $APART $I1 $I4 $I5 $I2 $I3; do wait_port "$p"; done
iso_names=(shadow-off shadow-on shadow-apart shadow-slow shadow-down)
iso_ports=($I1 $I4 $I5 $I2 $I3)
for i in 0 1 2 3 4; do run_wrk warm "${iso_ports[$i]}" 2 "$work/rate.lua" >/dev/null; done
# The order rotates every round (off/on/apart/slow/down, on/apart/slow/down/off, ...) so that
# neither a position in the round nor a slow drift of the machine favours one case; ratios are
# taken within a round.
for r in $(seq 1 "$ISO_ROUNDS"); do
  for j in 0 1 2 3 4; do
    i=$(( (j + r) % 5 ))
    line=$(run_wrk "${iso_names[$i]}" "${iso_ports[$i]}" "$LAT_DURATION" "$work/rate.lua")
    echo "$r ${iso_names[$i]} isolation $line" >> "$results"
    echo "round $r ${iso_names[$i]} at ~$RATE/s: $line" >&2
  done
done
ISO_DROPPED=$(curl -s "http://127.0.0.1:$I2A/metrics" | awk '/^vastshift_shadow_requests_total\{result="dropped"\}/ {print $2}')
SHADOW_HWM=$(rss_kib "$SH_PID" VmHWM)

# ---- 10,000 idle keep-alive client connections
python3 - "$VS" "$IDLE_CONNS" "$VS_PID" > "$work/idle.txt" <<'PY'
import socket, sys, time
port, n, pid = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
# One request each, answered before the next connection opens (so the upstream pool stays
# small and what is measured is the cost of idle client connections), then all kept open.
socks = []
ok = 0
for i in range(n):
    s = socket.create_connection(("127.0.0.1", port))
    s.settimeout(10)
    s.sendall(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")
    if s.recv(4096).startswith(b"HTTP/1.1 200"):
        ok += 1
    socks.append(s)
time.sleep(1)
rss = [l.split()[1] for l in open(f"/proc/{pid}/status") if l.startswith("VmRSS:")][0]
print(ok, rss)
for s in socks:
    s.close()
PY
read -r IDLE_OK IDLE_CONN_RSS < "$work/idle.txt"

# ---- instructions per proxied request (callgrind), collection zeroed after warm-up
requests_total() { curl -s "http://127.0.0.1:$CGA/metrics" | awk '/^vastshift_requests_total/ {s+=$2} END {printf "%d", s}'; }
IPR="n/a"
if command -v valgrind >/dev/null; then
  on_server valgrind --tool=callgrind --callgrind-out-file="$work/callgrind.out" "$BIN" serve --worker-threads 1 --config "$work/cg.toml" 2>"$work/callgrind.log" & CG_PID=$!; pids+=($CG_PID)
  for _ in $(seq 300); do curl -fs -o /dev/null "http://127.0.0.1:$CG/" && break; sleep 0.2; done
  on_load wrk -t1 -c10 -d3s "http://127.0.0.1:$CG/" >/dev/null 2>&1
  callgrind_control -z "$CG_PID" >/dev/null 2>&1
  before=$(requests_total)
  on_load wrk -t1 -c10 -d"$CALLGRIND_SECS"s "http://127.0.0.1:$CG/" >/dev/null 2>&1
  after=$(requests_total)
  callgrind_control -d "$CG_PID" >/dev/null 2>&1
  sleep 1
  total_ir=$(cat "$work"/callgrind.out* 2>/dev/null | awk '/^(summary|totals):/ {print $2}' | sort -n | tail -1)
  if [ -n "$total_ir" ] && [ "$after" -gt "$before" ]; then
    IPR=$(( total_ir / (after - before) ))
    NREQ=$(( after - before ))
  fi
  kill "$CG_PID" 2>/dev/null || true
fi

# ---- report
python3 - "$results" "$ROUNDS" "$IDLE_RSS" "$LOAD_HWM" "$SHADOW_HWM" "$IDLE_OK" "$IDLE_CONN_RSS" "$IPR" "${NREQ:-0}" "$RATE" "$CONNS" "$DURATION" "${ISO_DROPPED:-0}" "$ISO_ROUNDS" "$RATE_ROUNDS" "$shadow_results" "$SHADOW_ROUNDS" "$LAT_DURATION" > "$work/report.md" <<'PY'
import statistics, sys
path, rounds = sys.argv[1], int(sys.argv[2])
idle, load, shadow_hwm, idle_ok, idle_rss, ipr, nreq, rate, conns, dur, iso_dropped, iso_rounds, rate_rounds = sys.argv[3:16]
shadow_path, shadow_rounds, lat_dur = sys.argv[16], int(sys.argv[17]), sys.argv[18]
rows = [l.split() for l in open(path)]
data = {}
for r, name, kind, rps, p50, p99, non2xx, sock in rows:
    data.setdefault((kind, name), {})[int(r)] = (float(rps), float(p50), float(p99), int(non2xx), sock)
keep = [r for r in range(1, rounds + 1) if r > 1] or [1]
def med(kind, name, i):
    return statistics.median(data[(kind, name)][r][i] for r in keep)
def ratio(a, b, kind="throughput", i=0):
    return statistics.median(data[(kind, a)][r][i] / data[(kind, b)][r][i] for r in keep)
out = []
out.append(f"rounds: {rounds} x {dur} s, {conns} connections, first round discarded ({len(keep)} kept)\n")
out.append("| target | requests/s (median) | p50 ms | p99 ms | non-2xx |")
out.append("|---|---|---|---|---|")
for n in ["direct", "vastshift", "nginx", "haproxy"]:
    bad = sum(data[("throughput", n)][r][3] for r in keep)
    out.append(f"| {n} | {med('throughput', n, 0):,.0f} | {med('throughput', n, 1):.2f} | {med('throughput', n, 2):.2f} | {bad} |")
out.append("")
out.append(f"- vastshift / nginx throughput: **{ratio('vastshift', 'nginx'):.2f}x** (median of per-round ratios)")
out.append(f"- vastshift / HAProxy throughput: **{ratio('vastshift', 'haproxy'):.2f}x**")
out.append("")
sh = {}
for r, name, rps, p50, p99, non2xx, sock, reqs, dropped in (l.split() for l in open(shadow_path)):
    sh.setdefault(name, {})[int(r)] = (float(rps), float(p50), float(p99), int(non2xx), int(reqs), int(dropped))
sh_keep = [r for r in range(2, shadow_rounds + 1)] or [1]
out.append(f"The parallel run's cost at saturation ({conns} connections; {len(sh_keep)} rounds of {lat_dur} s kept, "
           "order rotated, ratios within a round; mirrored = requests the proxy counted, less the mirrors it dropped):\n")
out.append("| case | requests/s | p99 ms | mirrored | throughput / shadow off | p99 / shadow off | non-2xx |")
out.append("|---|---|---|---|---|---|---|")
for n, label in [("shadow-off", "shadow off"), ("shadow", "shadow at 100 %, default max_in_flight (64)"),
                 ("shadow-all", "shadow at 100 %, every request mirrored")]:
    d, off = sh[n], sh["shadow-off"]
    mirrored = "" if n == "shadow-off" else f"{100 * (1 - sum(d[r][5] for r in sh_keep) / max(1, sum(d[r][4] for r in sh_keep))):.0f} %"
    out.append(f"| {label} | {statistics.median(d[r][0] for r in sh_keep):,.0f} | {statistics.median(d[r][2] for r in sh_keep):.2f} | {mirrored} | "
               f"**{statistics.median(d[r][0] / off[r][0] for r in sh_keep):.2f}x** | {statistics.median(d[r][2] / off[r][2] for r in sh_keep):.2f}x | "
               f"{sum(d[r][3] for r in sh_keep)} |")
ng, ngm = sh["nginx"], sh["nginx-mirror"]
out.append(f"| nginx, no mirror (reference) | {statistics.median(ng[r][0] for r in sh_keep):,.0f} | "
           f"{statistics.median(ng[r][2] for r in sh_keep):.2f} |  |  |  | {sum(ng[r][3] for r in sh_keep)} |")
out.append(f"| nginx with `mirror` at 100 % (answers not compared) | {statistics.median(ngm[r][0] for r in sh_keep):,.0f} | "
           f"{statistics.median(ngm[r][2] for r in sh_keep):.2f} | 100 % | **{statistics.median(ngm[r][0] / ng[r][0] for r in sh_keep):.2f}x** of nginx's | "
           f"{statistics.median(ngm[r][2] / ng[r][2] for r in sh_keep):.2f}x of nginx's | {sum(ngm[r][3] for r in sh_keep)} |")
out.append("")
out.append(f"- vastshift mirroring and comparing every request / nginx mirroring every request: "
           f"**{statistics.median(sh['shadow-all'][r][0] / ngm[r][0] for r in sh_keep):.2f}x** throughput (median of per-round ratios)")
out.append("")
rate_keep = [r for r in range(2, int(rate_rounds) + 1)] or [1]
for kind, title in [("rate", f"Added latency over direct at about {rate} requests/s ({conns} connections, random wait between requests)"),
                    ("single", "Added latency over direct on one connection with nothing queued (wrk -c1)")]:
    out.append(f"{title}; {len(rate_keep)} rounds kept, order rotated, differences taken within a round:\n")
    out.append("| target | achieved req/s | p50 ms | p99 ms | added p50 ms | added p99 ms | p99 below nginx's in |")
    out.append("|---|---|---|---|---|---|---|")
    for n in ["direct", "vastshift", "nginx", "haproxy"]:
        d, base, ng = data[(kind, n)], data[(kind, "direct")], data[(kind, "nginx")]
        add50 = statistics.median(d[r][1] - base[r][1] for r in rate_keep)
        add99 = statistics.median(d[r][2] - base[r][2] for r in rate_keep)
        below = "" if n in ("direct", "nginx") else f"{sum(d[r][2] < ng[r][2] for r in rate_keep)} of {len(rate_keep)} rounds"
        out.append(f"| {n} | {statistics.median(d[r][0] for r in rate_keep):,.0f} | {statistics.median(d[r][1] for r in rate_keep):.3f} | "
                   f"{statistics.median(d[r][2] for r in rate_keep):.3f} | {add50:.3f} | {add99:.3f} | {below} |")
    out.append("")
iso_keep = [r for r in range(2, int(iso_rounds) + 1)] or [1]
def iso_med(name, i):
    return statistics.median(data[("isolation", name)][r][i] for r in iso_keep)
def iso_ratio(name, i):
    return statistics.median(data[("isolation", name)][r][i] / data[("isolation", "shadow-off")][r][i] for r in iso_keep)
out.append(f"Parallel run isolation at about {rate} requests/s ({len(iso_keep)} rounds kept, order rotated, "
           "ratios within a round): primary latency with shadow at 100 % to a healthy mirror target (on the proxy's core, and on the other core), one that takes 1.5 s "
           "and one that is down, against shadow off\n")
out.append("| case | p50 ms | p99 ms | p50 / shadow off | p99 / shadow off |")
out.append("|---|---|---|---|---|")
for n, label in [("shadow-off", "shadow off"), ("shadow-on", "healthy mirror target"),
                 ("shadow-apart", "healthy mirror target, not on the proxy's core"),
                 ("shadow-slow", "mirror target takes 1.5 s"), ("shadow-down", "mirror target down")]:
    out.append(f"| {label} | {iso_med(n, 1):.3f} | {iso_med(n, 2):.3f} | {iso_ratio(n, 1):.2f}x | {iso_ratio(n, 2):.2f}x |")
out.append("")
out.append(f"mirrors dropped beyond max_in_flight with the slow target: {iso_dropped}")
out.append("")
out.append(f"- instructions per proxied request (callgrind, {nreq} requests after warm-up): **{ipr}**")
mib = lambda k: f"{int(k) / 1024:.1f} MiB" if k.isdigit() else k
out.append(f"- vastshift RSS idle: **{mib(idle)}**; peak under load: **{mib(load)}**; with shadow at 100 %: **{mib(shadow_hwm)}**")
out.append(f"- vastshift RSS with {idle_ok} idle keep-alive client connections: **{mib(idle_rss)}**")
print("\n".join(out))
PY
mkdir -p benches/results
{
  echo "# vastshift benchmark — $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo
  echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); load on core $LOAD_CPU, servers on core $SERVER_CPU"
  echo "versions: $("$BIN" --version), $(nginx -v 2>&1), $(haproxy -v | head -1), $(wrk -v 2>&1 | head -1), $(rustc --version)"
  echo
  cat "$work/report.md"
} | tee benches/results/latest.md

# ---- what an adapter costs on POSTs (issue #23): its own servers, after everything above
if [ "${ADAPTER:-1}" = 1 ]; then
  cleanup
  trap - EXIT INT TERM
  ROUNDS=$ROUNDS LOAD_CPU=$LOAD_CPU SERVER_CPU=$SERVER_CPU benches/adapter.sh
fi
