#!/usr/bin/env bash
# Starts moto (an AWS API emulator serving S3 and RDS) on a free localhost port, exports
# DCHAT_TEST_S3_ENDPOINT, AWS_ENDPOINT_URL and test credentials for it, runs the given
# command, and stops moto afterwards, whatever the command's outcome.
#
# moto comes from the project's virtualenv (.venv, scripts/requirements.txt), which
# scripts/ensure-deps.sh installs.
#
# Usage: scripts/with-moto.sh COMMAND [ARGS...]
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
moto="$root/.venv/bin/moto_server"
if [ ! -x "$moto" ]; then
  echo "with-moto: $moto not found; run scripts/ensure-deps.sh" >&2
  exit 1
fi

log=$(mktemp /tmp/dchat-moto.XXXXXX)
pid=""
cleanup() {
  if [ -n "$pid" ]; then
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  fi
  rm -f "$log"
}
trap cleanup EXIT

started=""
for _ in 1 2 3 4 5; do
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  "$moto" -H 127.0.0.1 -p "$port" >"$log" 2>&1 &
  pid=$!
  for _ in $(seq 1 150); do
    if ! kill -0 "$pid" 2>/dev/null; then
      break
    fi
    if curl -s -o /dev/null "http://127.0.0.1:$port/moto-api/"; then
      started=yes
      break
    fi
    sleep 0.2
  done
  [ -n "$started" ] && break
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  pid=""
done
if [ -z "$started" ]; then
  echo "with-moto: moto did not start:" >&2
  cat "$log" >&2
  exit 1
fi

export DCHAT_TEST_S3_ENDPOINT="http://127.0.0.1:$port"
export AWS_ENDPOINT_URL="$DCHAT_TEST_S3_ENDPOINT"
export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_REGION=us-east-1
# No instance metadata lookups on a machine that is not in AWS.
export AWS_EC2_METADATA_DISABLED=true
echo "with-moto: moto (S3, RDS) on 127.0.0.1:$port" >&2
# Not exec: the trap must stop moto after the command.
"$@"
