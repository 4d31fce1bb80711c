# syntax=docker/dockerfile:1
# Ferrum Mesh images, one target each (make images):
#   ferrum-operator, ferrum-injector — distroless (glibc, no shell), non-root
#   ferrum-dp — Debian slim with iptables and iproute2 (the same image runs the capture init
#   container and the sidecar, as UID 1337; gateways too)
#   ferrum-node-agent — Debian slim, root (a privileged DaemonSet: it loads eBPF programs)
# The binaries are built once, release, locked, with the flags CI builds them with (make
# images-check). No musl target is installed here, so the images carry glibc.

ARG RUST_VERSION=1.95.0

FROM rust:${RUST_VERSION}-slim-bookworm AS build
# The node agent's eBPF programs are C, compiled by its build script; ferrum-dp's allocator
# (jemalloc) is C too, built with make.
RUN apt-get update \
 && apt-get install -y --no-install-recommends clang=1:14.* libbpf-dev=1:1.1.* make=4.3-* \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# Protos compile in Rust (protox): no protoc.
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p ferrum-operator -p ferrum-injector -p ferrum-dp -p ferrum-node-agent --bins \
 && mkdir -p /out \
 && cp target/release/ferrum-operator target/release/ferrum-injector target/release/ferrum-dp \
       target/release/ferrum-node-agent /out/

FROM gcr.io/distroless/cc-debian12:nonroot AS ferrum-operator
COPY --from=build /out/ferrum-operator /usr/local/bin/ferrum-operator
USER 65532:65532
EXPOSE 15010 15012 15014
ENTRYPOINT ["/usr/local/bin/ferrum-operator"]

FROM gcr.io/distroless/cc-debian12:nonroot AS ferrum-injector
COPY --from=build /out/ferrum-injector /usr/local/bin/ferrum-injector
USER 65532:65532
EXPOSE 9443
ENTRYPOINT ["/usr/local/bin/ferrum-injector"]

FROM debian:bookworm-slim AS ferrum-dp
RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables=1.8.* iproute2=6.1.* ca-certificates=20230311* \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 1337 ferrum-proxy \
 && useradd --uid 1337 --gid 1337 --no-create-home --shell /usr/sbin/nologin ferrum-proxy \
 && mkdir -p /var/lib/ferrum-dp && chown 1337:1337 /var/lib/ferrum-dp
COPY --from=build /out/ferrum-dp /usr/local/bin/ferrum-dp
USER 1337:1337
EXPOSE 15001 15006 15008 15020 15021
ENTRYPOINT ["/usr/local/bin/ferrum-dp"]

FROM debian:bookworm-slim AS ferrum-node-agent
COPY --from=build /out/ferrum-node-agent /usr/local/bin/ferrum-node-agent
ENTRYPOINT ["/usr/local/bin/ferrum-node-agent"]
