#!/usr/bin/env bash
# Installs the system packages and Python tools the tests need. Idempotent: it does
# nothing that is already done, so it is cheap on a machine that has run it before.
set -euo pipefail
cd "$(dirname "$0")/.."

# make: builds jemalloc, the relay server's allocator (tikv-jemalloc-sys).
# openssl, curl, xz-utils: ../shared/envtest/kube-up (certificates, readiness, binaries).
apt_packages=(postgresql shellcheck make openssl curl xz-utils)
missing=()
for p in "${apt_packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [ -f scripts/requirements.txt ]; then
  if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
  fi
  if ! cmp -s scripts/requirements.txt .venv/.requirements.installed; then
    .venv/bin/pip install -q --disable-pip-version-check -r scripts/requirements.txt
    cp scripts/requirements.txt .venv/.requirements.installed
  fi
fi
