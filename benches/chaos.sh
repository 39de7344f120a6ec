#!/usr/bin/env bash
# Chaos: vastai (an nginx) is SIGKILLed every 3 s and started again, under GET load (wrk -c20)
# at a 50/50 split. Prints the requests sent, the non-2xx answers and socket errors (target 0)
# and the fallbacks. Needs nginx and wrk (benches/run.sh installs them). Loopback only.
#   benches/chaos.sh [BIN] [SECONDS]      # default: target/release/vastshift, 60 s
set -u
cd "$(dirname "$0")/.."
BIN=${1:-$PWD/target/release/vastshift}; SECS=${2:-60}
[ -x "$BIN" ] || cargo build --release --quiet
d=$(mktemp -d)
fp() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
L=$(fp); V=$(fp); P=$(fp); A=$(fp)
mk() { cat > $d/$1.conf <<N
master_process off; worker_processes 1; daemon off; pid $d/$1.pid; error_log $d/$1.err;
events { worker_connections 4096; }
http { access_log off; server { listen 127.0.0.1:$2; location / { return 200 "$1"; } } }
N
}
mk legacy $L; mk vastai $V
nginx -c $d/legacy.conf & LP=$!
nginx -c $d/vastai.conf & VP=$!
cat > $d/vs.toml <<T
[server]
listen = "127.0.0.1:$P"
admin_listen = "127.0.0.1:$A"
state_file = "$d/state.json"
[legacy]
url = "http://127.0.0.1:$L"
[vastai]
url = "http://127.0.0.1:$V"
health_interval_ms = 500
[split]
percent = 50.0
[guard]
enabled = false
T
VASTSHIFT_ADMIN_TOKEN=t RUST_LOG=error $BIN serve --worker-threads 1 --config $d/vs.toml & SP=$!
for _ in $(seq 100); do curl -fs -o /dev/null http://127.0.0.1:$P/ && break; sleep 0.1; done
( end=$((SECONDS+SECS)); while [ $SECONDS -lt $end ]; do sleep 3; kill -9 $VP 2>/dev/null; wait $VP 2>/dev/null; nginx -c $d/vastai.conf 2>/dev/null & VP=$!; done; kill -9 $VP 2>/dev/null ) &
KP=$!
wrk -t1 -c20 -d${SECS}s http://127.0.0.1:$P/ > $d/wrk.txt 2>&1
wait $KP 2>/dev/null
req=$(awk '/requests in/ {print $1}' $d/wrk.txt)
non2xx=$(awk '/Non-2xx/ {print $NF}' $d/wrk.txt); non2xx=${non2xx:-0}
errs=$(grep -o "Socket errors.*" $d/wrk.txt || echo "Socket errors: none")
fb=$(curl -s http://127.0.0.1:$A/metrics | awk '/^vastshift_fallbacks_total/ {s+=$2} END {print s}')
echo "$BIN: $req requests in ${SECS}s, non-2xx $non2xx, $errs, fallbacks $fb"
kill $SP $LP 2>/dev/null; sleep 0.3; kill -9 $SP $LP 2>/dev/null; pkill -f "$d/vastai.conf" 2>/dev/null
rm -rf $d
