# Ferrum Mesh entry points.
export CARGO_TARGET_DIR ?= $(CURDIR)/target
BIN := $(CARGO_TARGET_DIR)/debug

.PHONY: build run test lint fmt bench clean

build:
	cargo build --workspace --bins --examples

## Start ferrum-dp on examples/gateway.yaml with two demo backends (Ctrl-C stops all).
run: build
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

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

## Everything CI runs: format, lint, unit + integration tests, and the example config check.
test: lint
	cargo test --workspace
	cargo run -q -p ferrum-dp -- --config examples/gateway.yaml --check

fmt:
	cargo fmt --all

## Benchmarks against a direct connection, nginx and Envoy (installs them; see bench/README.md).
bench:
	bash bench/run.sh

clean:
	cargo clean
