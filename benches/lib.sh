# Shared by benches/run.sh and benches/inference.sh (sourced after LOAD_CPU and SERVER_CPU are
# set): installs what the runs need from Debian, raises the file limit, and gives the work
# folder, the cleanup of everything started ($pids) and the pinning helpers.

need=()
command -v nginx >/dev/null || need+=(nginx-light)
command -v haproxy >/dev/null || need+=(haproxy)
command -v wrk >/dev/null || need+=(wrk)
command -v valgrind >/dev/null || need+=(valgrind)
command -v taskset >/dev/null || need+=(util-linux)
if [ ${#need[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq "${need[@]}" >/dev/null
fi
ulimit -n "$(ulimit -Hn)"

work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  sleep 0.3
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT INT TERM

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
on_server() { exec taskset -c "$SERVER_CPU" "$@"; }  # always backgrounded: $! is the server
on_load() { taskset -c "$LOAD_CPU" "$@"; }
# The start of an nginx config for one worker in the foreground with its files in DIR, up to
# and inside `http {` (the caller adds its servers and the closing brace).
nginx_preamble() {
  cat <<NGINX
worker_processes 1;
daemon off;
pid $1/nginx.pid;
error_log $1/error.log warn;
events { worker_connections 20000; }
worker_rlimit_nofile 20000;
http {
  access_log off;
  keepalive_requests 1000000;
NGINX
}
