#!/usr/bin/env bash
# The backup benchmark of issue 20 (docs/performance.md, "Backup and restore: 1,000,000
# stored messages"): fills a release relay with stored messages, then backs it up with
# `dchat backup create` into moto (S3) and restores it with `dchat backup restore` into
# a new relay, measuring time and peak RSS of each side. Builds the release binaries
# first; needs scripts/ensure-deps.sh (moto in .venv).
#
# Usage: scripts/bench-backup.sh [dchat-loadgen backup flags...]
#   scripts/bench-backup.sh                                   # embedded store, 1,000,000 messages, 3 repetitions
#   scripts/with-postgres.sh scripts/bench-backup.sh --stores embedded,postgres
# With DB_HOST set (scripts/with-postgres.sh exports DB_*), that database is the
# `postgres` store's: its relay tables are dropped, and <DB_NAME>_restore is dropped and
# created. Relay data directories go under $CARGO_TARGET_DIR (a disk), removed afterwards.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$root/target}
cargo build --release -p dchat-relay -p dchat-bench

pg=()
if [ -n "${DB_HOST:-}" ]; then
  pg=(--pg-host "$DB_HOST" --pg-port "${DB_PORT:-5432}" --pg-db "${DB_NAME:-dchat}" --pg-user "${DB_USER:-dchat}")
  export PGPASSWORD="${DB_PASSWORD:-}"
fi
modified=""
git diff --quiet HEAD 2>/dev/null || modified=" (with uncommitted changes)"
echo "commit $(git rev-parse --short HEAD)$modified; $(date -u '+%Y-%m-%d %H:%M UTC'); $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')); load average $(cut -d' ' -f1-3 /proc/loadavg)"
exec "$CARGO_TARGET_DIR/release/dchat-loadgen" backup --data-root "$CARGO_TARGET_DIR" "${pg[@]}" "$@"
