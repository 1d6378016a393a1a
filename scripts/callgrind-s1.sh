#!/usr/bin/env bash
# Instructions per S1 message in the relay (docs/performance.md, "Instructions per
# message"): runs a release relay under callgrind twice, driven by `dchat-loadgen
# external` with the same clients and rate for a short and a long window, and divides
# the difference of the relay's instruction counts by the difference of the messages
# sent. Fixed costs (start, handshakes, drain, exit) cancel out; what is left is the
# user-space work per message: read `send`, route, write `deliver` and `sent`, read the
# quiet acks. Kernel work (system calls) is not counted.
#
# Usage: scripts/callgrind-s1.sh RELAY_BIN LOADGEN_BIN OUT_DIR
#   CLIENTS (50), RATE (300 msgs/s), SHORT (3 s) and LONG (13 s) windows, REPEAT (1).
# Prints one line per repetition; OUT_DIR keeps callgrind.long.N (callgrind_annotate it
# for the profile) and the loadgen reports.
set -euo pipefail

relay=${1:?relay binary}
loadgen=${2:?dchat-loadgen binary}
out=${3:?output directory}
clients=${CLIENTS:-50}
rate=${RATE:-300}
short=${SHORT:-3}
long=${LONG:-13}
repeat=${REPEAT:-1}
mkdir -p "$out"

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# run SECS TAG: prints "<relay instructions> <messages sent>".
run() {
  local secs=$1 tag=$2 port mport data pid
  port=$(free_port)
  mport=$(free_port)
  data=$(mktemp -d)
  DCHAT_LISTEN=127.0.0.1:$port DCHAT_METRICS_LISTEN=127.0.0.1:$mport DCHAT_DATA_DIR=$data/data \
    DCHAT_RATE_PER_SEC=1000000 DCHAT_RATE_BURST=1000000 RUST_LOG=warn DCHAT_PEERS='' DB_HOST='' \
    valgrind --tool=callgrind --callgrind-out-file="$out/callgrind.$tag" "$relay" \
    >"$out/relay.$tag.log" 2>"$out/valgrind.$tag.log" &
  pid=$!
  for _ in $(seq 600); do
    curl -fs "http://127.0.0.1:$mport/health" >/dev/null 2>&1 && break
    sleep 0.1
  done
  "$loadgen" external --url "ws://127.0.0.1:$port/v1/ws" --clients "$clients" --rate "$rate" \
    --warmup 1s --duration "${secs}s" --drain 5s --parallel 8 --max-p99-ms 100000 \
    --max-error-rate 1 --report "$out/report.$tag.json" >"$out/loadgen.$tag.txt"
  kill -TERM "$pid"
  wait "$pid" || true
  rm -rf "$data"
  local ir sent
  ir=$(grep -E '^(summary|totals):' "$out/callgrind.$tag" | tail -1 | awk '{print $2}')
  sent=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["sent_with_warmup"])' "$out/report.$tag.json")
  echo "$ir $sent"
}

for n in $(seq "$repeat"); do
  read -r ir_s sent_s < <(run "$short" "short.$n")
  read -r ir_l sent_l < <(run "$long" "long.$n")
  python3 - "$ir_s" "$sent_s" "$ir_l" "$sent_l" <<'EOF'
import sys
ir_s, sent_s, ir_l, sent_l = map(int, sys.argv[1:])
print(f"short {sent_s} msgs {ir_s/1e6:.1f}M Ir; long {sent_l} msgs {ir_l/1e6:.1f}M Ir; "
      f"per message {(ir_l-ir_s)/(sent_l-sent_s):,.0f} Ir")
EOF
done
