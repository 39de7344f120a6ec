#!/usr/bin/env bash
# Installs etcd (Debian `etcd-server`) for the integration tests' real-etcd kit, only when `etcd`
# is missing. Safe to run again and concurrently (test processes may all call it at once): the
# install runs under a lock in /tmp. Prints the etcd version.
#
# The package's service is kept from starting (a temporary policy-rc.d) so no etcd of its own
# listens on 2379; the kit never uses that port anyway, it starts etcd on free ports.
set -euo pipefail

if ! command -v etcd >/dev/null 2>&1; then
  sudo=()
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || { echo "install-etcd: not root and no sudo" >&2; exit 1; }
    sudo=(sudo -n)
  fi
  exec 9>>/tmp/vastshift-install-etcd.lock
  flock -w 900 9 || { echo "install-etcd: timed out waiting for the install lock" >&2; exit 1; }
  # Another process may have installed it while this one waited for the lock.
  if ! command -v etcd >/dev/null 2>&1; then
    policy=/usr/sbin/policy-rc.d
    if [ ! -e "$policy" ]; then
      printf '#!/bin/sh\nexit 101\n' | "${sudo[@]}" tee "$policy" >/dev/null
      "${sudo[@]}" chmod 755 "$policy"
      trap '"${sudo[@]}" rm -f "$policy"' EXIT
    fi
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
      apt-get install -y -qq --no-install-recommends etcd-server >/dev/null
  fi
  flock -u 9
fi

command -v etcd >/dev/null 2>&1 || { echo "install-etcd: etcd still not on PATH" >&2; exit 1; }
etcd --version | head -1
