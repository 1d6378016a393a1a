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

echo "==> cargo test (with throwaway PostgreSQL)"
scripts/with-postgres.sh cargo test --workspace --all-targets

if [ -x scripts/check-delivery.sh ]; then
  echo "==> charts, workflows, terraform, docs"
  scripts/check-delivery.sh
fi
echo "==> all tests passed"
