#!/usr/bin/env bash
# make bench-instructions: ferrum-dp's instructions per request, counted by callgrind — the same
# for the same binary and load whatever else the machine does, so a change worth 2 % shows (wall
# clock on two shared cores drifts 10-25 % between runs). One worker, the make-bench backend and
# config; 2,000 requests to warm up, then N (default 10,000) counted, over h2c (h2load -m10) and
# HTTP/1.1 (h2load --h1). Prints the totals and the heaviest functions (inclusive), and leaves
# the profiles in $WORK for callgrind_annotate. The same HTTP/1.1 load is then counted through
# nginx (one worker, make bench's proxy config) and the floor (dataplane/examples/http_floor.rs,
# the least a relay on tokio does), so the three compare without the wall clock. DP=<binary> and
# FLOOR=<binary> count those instead of the release builds; WARMUP=<n> changes the warm-up (the
# tests run debug builds with N=100 WARMUP=100).
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
  cargo build --release -p ferrum-dp --example http_floor
  DP="$CARGO_TARGET_DIR/release/ferrum-dp"
  FLOOR="${FLOOR:-$CARGO_TARGET_DIR/release/examples/http_floor}"
fi

# The backend, ferrum-dp's and nginx's configs, exactly as make bench writes them; nginx with one
# worker and no master process, so that callgrind follows the process that serves.
python3 - "$WORK" <<'EOF'
import sys
from pathlib import Path
sys.path.insert(0, "bench")
import bench
bench.WORK = Path(sys.argv[1])
(bench.WORK / "tmp").mkdir(exist_ok=True)
bench.nginx_conf(bench.WORK / "backend.conf", bench.BACKEND, body=bench.BODY)
bench.dp_conf(bench.WORK / "dp.yaml", bench.PORTS["ferrum-dp"], bench.BACKEND)
proxy = bench.WORK / "proxy.conf"
bench.nginx_conf(proxy, bench.PORTS["nginx"], upstream=bench.BACKEND, workers=1)
proxy.write_text("master_process off;\n" + proxy.read_text())
EOF
nginx -c "$WORK/backend.conf" &
backend=$!
counted=
cleanup() {
  [ -n "$counted" ] && kill "$counted" 2>/dev/null || true
  kill "$backend" 2>/dev/null || true
}
trap cleanup EXIT

# count NAME PORT LOAD CMD...: runs CMD under callgrind, sends it h2load's LOAD (its arguments, as
# words) on PORT and prints NAME's instructions per request; the profile is $out.
count() {
  local name=$1 url="http://127.0.0.1:$2/" load=$3
  shift 3
  local file="$WORK/${name// /-}.out"
  RUST_LOG=warn valgrind --tool=callgrind --callgrind-out-file="$file" "$@" >"${file%.out}.log" 2>&1 &
  counted=$!
  for _ in $(seq 1 120); do curl -s -o /dev/null "$url" && break; sleep 0.5; done
  # shellcheck disable=SC2086
  h2load -n "$WARMUP" -c 10 $load "$url" >/dev/null
  callgrind_control -z "$counted" >/dev/null
  # shellcheck disable=SC2086
  h2load -n "$N" -c 10 $load "$url" | grep -q "$N succeeded" || { echo "$name: requests failed"; exit 1; }
  callgrind_control -d "$counted" >/dev/null
  kill "$counted"
  wait "$counted" 2>/dev/null || true
  counted=
  # Threaded programs dump to FILE.1 and on; nginx (one thread) to FILE itself.
  out=$(ls -t "$file".* 2>/dev/null | head -1 || true)
  out="${out:-$file}"
  local total
  total=$(callgrind_annotate --auto=no --threshold=100 "$out" | awk '/PROGRAM TOTALS/ { gsub(",", "", $1); print $1 }')
  echo "$name: $((total / N)) instructions per request"
}

# heaviest: the functions of ferrum-dp's request path in $out, by inclusive cost per request (whole
# functions only: their own lines end with the object file).
heaviest() {
  callgrind_annotate --auto=no --threshold=100 --inclusive=yes "$out" |
    grep -E '\[/' |
    grep -E 'ferrum_dp::proxy::(serve|Forward::upstream_head|downstream_response|check_head)::|ferrum_dp::proxy::(serve|Forward::upstream_head|downstream_response|check_head) |legacy::client::Client<C,B>::send_request::\{\{closure\}\} |H2Stream<F,B,Ex> as core::future::future::Future>::poll |h1::dispatch::Dispatcher<D,Bs,I,T>::poll_catch |__memcpy_avx_unaligned_erms |malloc.c:(malloc|free) ' |
    awk -v n="$N" '{ v = $1; gsub(",", "", v); fn = $0; sub(/^[^:]*:/, "", fn); sub(/ \[.*/, "", fn); printf "  %7d  %s\n", v / n, substr(fn, 1, 110) }'
}

dp=("$DP" --config "$WORK/dp.yaml" --admin-addr 127.0.0.1:18900 --workers 1)
count h2c 18081 "-m 10" "${dp[@]}"
heaviest
count http1 18081 "--h1 -m 1" "${dp[@]}"
heaviest
count "nginx http1" 18082 "--h1 -m 1" nginx -c "$WORK/proxy.conf"
if [ -n "${FLOOR:-}" ]; then
  count "floor http1" 18085 "--h1 -m 1" "$FLOOR" 127.0.0.1:18085 127.0.0.1:18080 1
fi
echo "profiles: $WORK/*.out* (callgrind_annotate --inclusive=yes FILE)"
