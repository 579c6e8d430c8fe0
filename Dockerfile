# syntax=docker/dockerfile:1
# One image with both binaries, /bin/proxy and /bin/agent (the Deployments in
# config/ pick one with `command:`):
#
#   docker build -t tower-rs:latest .
#   docker build --build-arg RUNTIME=slim -t tower-rs:slim .   # with a shell, for debugging
#   docker buildx build --platform linux/amd64,linux/arm64 -t REGISTRY/tower-rs:TAG --push .
#
# Multi-arch without emulation: the build stage runs on the build machine's
# own platform and cross-compiles for each target (hack/cross-build.sh, which
# `make cross` runs outside Docker); only the runtime stage is per platform.
#
# RUNTIME=distroless (default): gcr.io/distroless/cc-debian12, no shell, no
# package manager; the binaries link glibc (ring's C parts), hence cc, not
# static. RUNTIME=slim: debian:bookworm-slim. Both run as 65532 (non-root).

# kube-rs 5 needs 1.89 (the workspace says 1.88 for the crates of its own).
ARG RUST_VERSION=1.89
ARG RUNTIME=distroless

FROM --platform=$BUILDPLATFORM rust:${RUST_VERSION}-bookworm AS build
ARG TARGETARCH
# The C cross compiler for ring, when the target is not the build machine.
RUN if [ "$TARGETARCH" != "$(dpkg --print-architecture)" ]; then \
      case "$TARGETARCH" in \
        arm64) pkg=gcc-aarch64-linux-gnu ;; \
        amd64) pkg=gcc-x86-64-linux-gnu ;; \
        *) echo "no build for $TARGETARCH: use linux/amd64 or linux/arm64" >&2; exit 1 ;; \
      esac \
      && apt-get update && apt-get install -y --no-install-recommends "$pkg" \
      && rm -rf /var/lib/apt/lists/*; \
    fi
WORKDIR /src
# The whole workspace: cargo needs every member's manifest (tests, bench), and
# russh comes from third_party/ (a [patch.crates-io] path).
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/src/target,id=tower-target-${TARGETARCH} \
    ./hack/cross-build.sh "$TARGETARCH" /out

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
