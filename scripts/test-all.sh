#!/usr/bin/env bash
# Runs every test of the project on a fresh Debian 12 machine with a Rust toolchain:
# installs what the tests need (system packages, a Python virtualenv), starts the
# services they use (PostgreSQL, the AWS API emulator) and stops them afterwards.
#
# Usage: scripts/test-all.sh
set -euo pipefail
cd "$(dirname "$0")/.."

echo "==> installing test dependencies"
scripts/ensure-deps.sh

echo "==> cargo fmt --check"
cargo fmt --all -- --check

echo "==> cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings

# The operator's scenarios on a real control plane (kube-apiserver + controller-manager):
# ../shared/envtest beside the project root, or the folder DCHAT_ENVTEST names.
envtest_dir=""
if [ -n "${DCHAT_ENVTEST:-}" ] && [ "${DCHAT_ENVTEST}" != off ]; then
  if [ ! -x "$DCHAT_ENVTEST/kube-up" ]; then
    echo "test-all: DCHAT_ENVTEST=$DCHAT_ENVTEST has no executable kube-up" >&2
    exit 1
  fi
  envtest_dir=$(cd "$DCHAT_ENVTEST" && pwd)
elif [ -z "${DCHAT_ENVTEST:-}" ] && [ -x ../shared/envtest/kube-up ]; then
  envtest_dir=$(cd ../shared/envtest && pwd)
fi

echo "==> cargo test (with throwaway PostgreSQL and the moto AWS emulator)"
# The control-plane scenarios run on their own below, with more threads (they wait on
# the API server far more than they compute).
DCHAT_ENVTEST=off scripts/with-postgres.sh scripts/with-moto.sh cargo test --workspace --all-targets

if [ -n "$envtest_dir" ]; then
  echo "==> operator on a real control plane ($envtest_dir)"
  # --workspace: the same features as the run above, so nothing is rebuilt.
  DCHAT_ENVTEST="$envtest_dir" DCHAT_ENVTEST_REQUIRED=1 \
    cargo test --workspace --test envtest -- --test-threads=8
else
  echo "==> real control plane tests SKIPPED: no ../shared/envtest/kube-up and DCHAT_ENVTEST is unset (or off)"
fi

if [ -x scripts/check-delivery.sh ]; then
  echo "==> charts, workflows, terraform, alerts, docs"
  scripts/check-delivery.sh
fi
echo "==> all tests passed"
