#!/usr/bin/env bash
# Lints and tests the deployment files with the real tools (installed by .ci/install-tools.sh):
# hadolint for the Dockerfile, yamllint for every manifest, promtool for the scrape config and
# the alert rules (with their unit tests), and JSON syntax of the dashboard. The dashboard's and
# rules' metric names are checked against a live vastshift by `cargo test --test deploy`.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "-- hadolint Dockerfile"
hadolint Dockerfile
echo "ok"

echo "-- yamllint deploy/ .yamllint .hadolint.yaml"
yamllint --strict -c .yamllint deploy/ .yamllint .hadolint.yaml
echo "ok"

echo "-- promtool check config deploy/prometheus/prometheus.yml"
promtool check config deploy/prometheus/prometheus.yml
echo "-- promtool check rules deploy/prometheus/rules.yml"
promtool check rules deploy/prometheus/rules.yml
echo "-- promtool test rules deploy/prometheus/rules_test.yml"
promtool test rules deploy/prometheus/rules_test.yml

echo "-- dashboard JSON"
python3 -m json.tool deploy/grafana/vastshift-dashboard.json >/dev/null
echo "ok"

echo "-- kustomization lists only files that exist"
for f in $(sed -n 's/^  - //p' deploy/kubernetes/kustomization.yaml); do
  test -f "deploy/kubernetes/$f" || { echo "missing deploy/kubernetes/$f"; exit 1; }
done
echo "ok"
