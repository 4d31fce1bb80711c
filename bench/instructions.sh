#!/usr/bin/env bash
# make bench-instructions: ferrum-dp's instructions per request, counted by callgrind — the same
# for the same binary and load whatever else the machine does, so a change worth 2 % shows (wall
# clock on two shared cores drifts 10-25 % between runs). One worker, the make-bench backend and
# config; 2,000 requests to warm up, then N (default 10,000) counted, over h2c (h2load -m10) and
# HTTP/1.1 (h2load --h1). Prints the totals and the heaviest functions (inclusive), and leaves
# the profiles in $WORK for callgrind_annotate. DP=<binary> counts that binary instead of the
# release build; WARMUP=<n> changes the warm-up (the tests run DP=debug N=100 WARMUP=100).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
N="${N:-10000}"
WARMUP="${WARMUP:-2000}"
WORK="${WORK:-$(mktemp -d /tmp/ferrum-instructions.XXXXXX)}"

need=()
command -v valgrind >/dev/null || need+=(valgrind)
command -v h2load >/dev/null || need+=(nghttp2-client)
command -v nginx >/dev/null || need+=(nginx-light)
[ -e /usr/lib/nginx/modules/ngx_stream_module.so ] || need+=(libnginx-mod-stream)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
if [ -z "${DP:-}" ]; then
  cargo build --release -p ferrum-dp
  DP="$CARGO_TARGET_DIR/release/ferrum-dp"
fi

# The backend and ferrum-dp's config, exactly as make bench writes them.
python3 - "$WORK" <<'EOF'
import sys
from pathlib import Path
sys.path.insert(0, "bench")
import bench
bench.WORK = Path(sys.argv[1])
(bench.WORK / "tmp").mkdir(exist_ok=True)
bench.nginx_conf(bench.WORK / "backend.conf", bench.BACKEND, body=bench.BODY)
bench.dp_conf(bench.WORK / "dp.yaml", bench.PORTS["ferrum-dp"], bench.BACKEND)
EOF
URL="http://127.0.0.1:18081/"
nginx -c "$WORK/backend.conf" &
backend=$!
dp=
cleanup() {
  [ -n "$dp" ] && kill "$dp" 2>/dev/null || true
  kill "$backend" 2>/dev/null || true
}
trap cleanup EXIT

# count NAME H2LOAD_ARGS...: runs ferrum-dp under callgrind and prints instructions/request.
count() {
  local name=$1
  shift
  RUST_LOG=warn valgrind --tool=callgrind --callgrind-out-file="$WORK/$name.out" \
    "$DP" --config "$WORK/dp.yaml" --admin-addr 127.0.0.1:18900 --workers 1 >"$WORK/$name.log" 2>&1 &
  dp=$!
  for _ in $(seq 1 120); do curl -s -o /dev/null "$URL" && break; sleep 0.5; done
  h2load -n "$WARMUP" -c 10 "$@" "$URL" >/dev/null
  callgrind_control -z "$dp" >/dev/null
  h2load -n "$N" -c 10 "$@" "$URL" | grep -q "$N succeeded" || { echo "$name: requests failed"; exit 1; }
  callgrind_control -d "$dp" >/dev/null
  kill "$dp"
  wait "$dp" 2>/dev/null || true
  dp=
  local out
  out=$(ls -t "$WORK/$name.out".* | head -1)
  local total
  total=$(callgrind_annotate --auto=no --threshold=100 "$out" | awk '/PROGRAM TOTALS/ { gsub(",", "", $1); print $1 }')
  echo "$name: $((total / N)) instructions per request"
  # Whole functions only (their own lines end with the object file), by inclusive cost.
  callgrind_annotate --auto=no --threshold=100 --inclusive=yes "$out" |
    grep -E '\[/' |
    grep -E 'ferrum_dp::proxy::(serve|Forward::upstream_head|downstream_response|check_head)::|ferrum_dp::proxy::(serve|Forward::upstream_head|downstream_response|check_head) |legacy::client::Client<C,B>::send_request::\{\{closure\}\} |H2Stream<F,B,Ex> as core::future::future::Future>::poll |h1::dispatch::Dispatcher<D,Bs,I,T>::poll_catch |__memcpy_avx_unaligned_erms |malloc.c:(malloc|free) ' |
    awk -v n="$N" '{ v = $1; gsub(",", "", v); fn = $0; sub(/^[^:]*:/, "", fn); sub(/ \[.*/, "", fn); printf "  %7d  %s\n", v / n, substr(fn, 1, 110) }'
}

count h2c -m 10
count http1 --h1 -m 1
echo "profiles: $WORK/*.out.* (callgrind_annotate --inclusive=yes FILE)"
