#!/usr/bin/env bash
# Starts a throwaway PostgreSQL server (initdb + pg_ctl in a temp dir, free port),
# exports DCHAT_TEST_DATABASE_URL and the DB_* settings for it, runs the given command,
# and stops and removes the server afterwards, whatever the command's outcome.
#
# Usage: scripts/with-postgres.sh COMMAND [ARGS...]
set -euo pipefail

pg_bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1)
if [ -z "$pg_bin" ]; then
  echo "with-postgres: PostgreSQL binaries not found; run scripts/ensure-deps.sh" >&2
  exit 1
fi

dir=$(mktemp -d /tmp/dchat-pg.XXXXXX)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
as_pg=()
if [ "$(id -u)" -eq 0 ]; then
  # initdb refuses to run as root.
  chown postgres:postgres "$dir"
  as_pg=(runuser -u postgres --)
fi

cleanup() {
  "${as_pg[@]}" "$pg_bin/pg_ctl" -D "$dir/data" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$dir"
}
trap cleanup EXIT

"${as_pg[@]}" "$pg_bin/initdb" -D "$dir/data" -U dchat --auth=trust -E UTF8 >/dev/null
"${as_pg[@]}" "$pg_bin/pg_ctl" -D "$dir/data" -l "$dir/log" -w \
  -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200" start >/dev/null
"${as_pg[@]}" "$pg_bin/createdb" -h 127.0.0.1 -p "$port" -U dchat dchat

export DCHAT_TEST_DATABASE_URL="postgres://dchat@127.0.0.1:$port/dchat"
export DB_HOST=127.0.0.1 DB_PORT=$port DB_NAME=dchat DB_USER=dchat DB_PASSWORD=
echo "with-postgres: PostgreSQL on 127.0.0.1:$port" >&2
"$@"
