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

# promtool, amtool and alertmanager (scripts/checks/test_alerting.py: the alert rules' unit
# tests and the Alertmanager example). Debian's prometheus and prometheus-alertmanager
# packages ship them, but installing those packages starts both servers as services; the
# packages are only unpacked (`dpkg -x`) into .venv/prometheus-tools instead (the binaries
# need libc alone). Redone when the lists below change.
prom_pkgs="prometheus prometheus-alertmanager"
prom_tools="promtool amtool prometheus-alertmanager"
prom_dir=.venv/prometheus-tools
prom_ok=1
[ "$(cat "$prom_dir/.installed" 2>/dev/null)" = "$prom_pkgs: $prom_tools" ] || prom_ok=0
for tool in $prom_tools; do
  [ -x "$prom_dir/bin/$tool" ] || prom_ok=0
done
if [ "$prom_ok" -eq 0 ]; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  rm -rf "$prom_dir"
  mkdir -p "$prom_dir/debs" "$prom_dir/root" "$prom_dir/bin"
  # shellcheck disable=SC2086 # the package list is split on purpose
  if ! (cd "$prom_dir/debs" && apt-get download -qq $prom_pkgs 2>/dev/null); then
    $SUDO apt-get update -qq
    # shellcheck disable=SC2086
    (cd "$prom_dir/debs" && apt-get download -qq $prom_pkgs)
  fi
  for deb in "$prom_dir"/debs/*.deb; do
    dpkg-deb -x "$deb" "$prom_dir/root"
  done
  # Only these are kept (the Prometheus server and the web assets are 50 MB more).
  for tool in $prom_tools; do
    cp "$prom_dir/root/usr/bin/$tool" "$prom_dir/bin/"
  done
  # Debian's Alertmanager reads its built-in notification templates from a fixed path.
  mkdir -p "$prom_dir/templates"
  cp "$prom_dir"/root/usr/share/prometheus/alertmanager/*.tmpl "$prom_dir/templates/"
  rm -rf "$prom_dir/debs" "$prom_dir/root"
  echo "$prom_pkgs: $prom_tools" > "$prom_dir/.installed"
fi
for tmpl in "$prom_dir"/templates/*.tmpl; do
  target="/usr/share/prometheus/alertmanager/$(basename "$tmpl")"
  if ! cmp -s "$tmpl" "$target"; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO install -D -m 0644 "$tmpl" "$target"
  fi
done
