# syntax=docker/dockerfile:1
# One image with both binaries, /bin/proxy and /bin/agent (the Deployments in
# config/ pick one with `command:`):
#
#   docker build -t tower-rs:latest .
#   docker build --build-arg RUNTIME=slim -t tower-rs:slim .   # with a shell, for debugging
#
# RUNTIME=distroless (default): gcr.io/distroless/cc-debian12, no shell, no
# package manager; the binaries link glibc (ring's C parts), hence cc, not
# static. RUNTIME=slim: debian:bookworm-slim. Both run as 65532 (non-root).

# kube-rs 5 needs 1.89 (the workspace says 1.88 for the crates of its own).
ARG RUST_VERSION=1.89
ARG RUNTIME=distroless

FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
# The whole workspace: cargo needs every member's manifest (tests, bench), and
# russh comes from third_party/ (a [patch.crates-io] path).
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin proxy --bin agent \
    && mkdir -p /out \
    && cp target/release/proxy target/release/agent /out/

FROM gcr.io/distroless/cc-debian12:nonroot AS runtime-distroless

FROM debian:bookworm-slim AS runtime-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 65532 nonroot \
    && useradd --uid 65532 --gid 65532 --no-create-home --shell /usr/sbin/nologin nonroot

FROM runtime-${RUNTIME}
COPY --from=build /out/proxy /out/agent /bin/
USER 65532:65532
# 8080: agents (websocket), /healthz, /readyz, /metrics; 8443: other proxy
# replicas; the per-cluster ports come from --cluster-ports.
EXPOSE 8080 8443
ENTRYPOINT ["/bin/proxy"]
