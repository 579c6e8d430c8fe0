# Tower in Rust. `make` builds bin/proxy and bin/agent; `make test` runs every test;
# `make demo` runs the seed flow on two local clusters.
SHELL := bash
CARGO ?= cargo
GO ?= go
BIN := bin
TARGET_DIR ?= $(or $(CARGO_TARGET_DIR),target)

.PHONY: all build harness go-peers promtool helm toxiproxy test faults outages fuzz adversarial churn lint demo demo-down certs bench bench-peers cross clean

all: build

build:
	$(CARGO) build --release --bin proxy --bin agent
	@mkdir -p $(BIN)
	@# copy, then rename: running binaries (tests, the demo) are replaced, not overwritten
	for b in proxy agent; do cp $(TARGET_DIR)/release/$$b $(BIN)/.$$b.new && mv -f $(BIN)/.$$b.new $(BIN)/$$b; done

harness: $(BIN)/kube-harness
$(BIN)/kube-harness: $(shell find tests/kube-harness -name '*.go' -o -name go.mod -o -name go.sum 2>/dev/null)
	@mkdir -p $(BIN)
	@echo ">> building the kube-apiserver harness (the first build compiles Kubernetes: several minutes)"
	cd tests/kube-harness && $(GO) build -trimpath -ldflags='-s -w' -o ../../$(BIN)/kube-harness .
	@# excalibur's case 2 as a client-go program (tests/connect.rs)
	cd tests/kube-harness && $(GO) build -trimpath -ldflags='-s -w' -o ../../$(BIN)/connect-client ./cmd/connect-client

go-peers: $(BIN)/go-agent $(BIN)/go-proxy
$(BIN)/go-agent $(BIN)/go-proxy: $(shell find tests/go-peers -name '*.go' -o -name go.mod -o -name go.sum 2>/dev/null)
	@mkdir -p $(BIN)
	cd tests/go-peers && $(GO) build -trimpath -o ../../$(BIN)/go-agent ./cmd/go-agent && $(GO) build -trimpath -o ../../$(BIN)/go-proxy ./cmd/go-proxy

# promtool checks config/monitoring (tests/monitoring.rs). Built from the
# Prometheus Go module without its service-discovery plugins (not needed to
# check rules), which keeps the build to a minute or two.
PROMTOOL_VERSION := v0.316.0
promtool: $(BIN)/promtool
$(BIN)/promtool: Makefile
	@mkdir -p $(BIN)
	GOBIN=$(CURDIR)/$(BIN) $(GO) install -trimpath -ldflags='-s -w' -tags remove_all_sd \
	  github.com/prometheus/prometheus/cmd/promtool@$(PROMTOOL_VERSION)

# helm checks charts/tower (tests/helm.rs): built from the Helm Go module
# pinned in tests/helm-tool/go.mod (the version and go.sum are there).
HELM_VERSION = $(shell awk '$$1 == "require" && $$2 == "helm.sh/helm/v4" { print $$3 }' tests/helm-tool/go.mod 2>/dev/null)
helm: $(BIN)/helm
$(BIN)/helm: tests/helm-tool/go.mod tests/helm-tool/go.sum
	@mkdir -p $(BIN)
	cd tests/helm-tool && $(GO) build -trimpath \
	  -ldflags='-s -w -X helm.sh/helm/v4/internal/version.version=$(HELM_VERSION)' \
	  -o ../../$(BIN)/helm helm.sh/helm/v4/cmd/helm

# Toxiproxy (Shopify's fault proxy) for tests/faults.rs: built from the Go
# module pinned in tests/toxiproxy-tool/go.mod (the version and go.sum are there).
TOXIPROXY_VERSION = $(shell awk '$$1 == "require" && $$2 == "github.com/Shopify/toxiproxy/v2" { print $$3 }' tests/toxiproxy-tool/go.mod 2>/dev/null)
toxiproxy: $(BIN)/toxiproxy-server
$(BIN)/toxiproxy-server: tests/toxiproxy-tool/go.mod tests/toxiproxy-tool/go.sum
	@mkdir -p $(BIN)
	cd tests/toxiproxy-tool && $(GO) build -trimpath \
	  -ldflags='-s -w -X github.com/Shopify/toxiproxy/v2.Version=$(TOXIPROXY_VERSION)' \
	  -o ../../$(BIN)/toxiproxy-server github.com/Shopify/toxiproxy/v2/cmd/server

# `make faults`: tests/faults.rs with the issue's durations (each fault held
# 30 s, a 2-minute black hole, the default --keepalive 30s); prints a
# `FAULTS |` line per fault (docs/reliability.md, README "Reliability").
faults: build harness toxiproxy
	set -o pipefail; FAULTS_FULL=1 $(CARGO) test --release -p e2e --test faults -- --test-threads=2 --nocapture \
	  2>&1 | tee $(TARGET_DIR)/faults.log | grep --line-buffered -E '^(FAULTS|faults:|test result)'

# `make adversarial`: tests/adversarial.rs with the issue's counts (5,000
# slowloris connections, 100,000 channel opens, 2,000 idle TLS connections,
# ...); fails when a p99 of legitimate requests under attack exceeds 2x the
# quiet one on both sides of it (medians over blocks of GETs). Prints an `ADVERSARIAL |` line per attack (docs/reliability.md).
adversarial: build harness
	set -o pipefail; ADVERSARIAL_FULL=1 $(CARGO) test --release -p e2e --test adversarial -- --test-threads=1 --nocapture \
	  2>&1 | tee $(TARGET_DIR)/adversarial.log | grep --line-buffered -E '^(ADVERSARIAL|test result|test .* FAILED|Error)'

# `make churn`: tests/churn.rs with the issue's figures (CHURN_FULL=1): 10,000
# agent cycles across 100 clusters while 100,000 requests and 1,000 kubectl
# exec/port-forward sessions run; prints the `CHURN |` line
# (docs/reliability.md, README "Reliability"), the whole log in
# $(CARGO_TARGET_DIR)/churn.log.
churn: build harness
	set -o pipefail; CHURN_FULL=1 $(CARGO) test --release -p e2e --test churn -- --nocapture \
	  2>&1 | tee $(TARGET_DIR)/churn.log | grep --line-buffered -E '^(CHURN|churn:|test result)'

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# `make test`: every test, two at a time; the two mostly idle soaks run
# beside the suites rather than each in turn (hack/test.sh).
test: build harness go-peers promtool helm toxiproxy lint
	CARGO=$(CARGO) ./hack/test.sh

# `make outages`: tests/outages.rs with the issue's durations: the host's
# kube-apiserver down for OUTAGE_SECS (2 minutes; `make test` runs 25 s), the
# member's kube-apiserver down, the host etcd slow to write for SLOW_SECS
# (the same). What a user sees: docs/outages.md.
OUTAGE_SECS ?= 120
outages: build harness
	OUTAGE_SECS=$(OUTAGE_SECS) SLOW_SECS=$(OUTAGE_SECS) $(CARGO) test --release -p e2e --test outages -- --test-threads=1 --nocapture

# `make fuzz`: libFuzzer on the stable toolchain (hack/fuzz.sh) for each
# target in fuzz/fuzz_targets, FUZZ_SECS seconds each; a failing input fails
# it and is kept in target/fuzz/artifacts/. Not in `make test` (a second,
# instrumented build of the tunnel crate); the property tests are.
FUZZ_SECS ?= 60
fuzz:
	FUZZ_SECS=$(FUZZ_SECS) ./hack/fuzz.sh

demo: build harness
	./hack/demo.sh

demo-down:
	./hack/demo-down.sh

# `make bench`: the benchmark suite (bench/), in release, against the same
# binaries as the tests plus Chisel, built from bench/chisel/go.mod into a
# bench-local GOBIN. BENCH_QUICK=1 for a fast pass; BENCH_ONLY=bulk,small,...
# to pick scenarios. Results: target/bench/results.md and results.json.
BENCH_GOBIN := $(CURDIR)/target/bench/gobin
CHISEL_VERSION = $(shell awk '$$1 == "require" && $$2 == "github.com/jpillora/chisel" { print $$3 }' bench/chisel/go.mod 2>/dev/null)

bench: build harness go-peers $(BENCH_GOBIN)/chisel bench-peers
	$(CARGO) build --release -p bench
	$(TARGET_DIR)/release/bench

# konnectivity, frp (Go modules) and rathole (crates.io); one that fails to
# build is reported as skipped by the bench, never fails it.
bench-peers:
	GO=$(GO) CARGO=$(CARGO) ./hack/bench-peers.sh $(BENCH_GOBIN) $(CURDIR)/target/bench/cargo

$(BENCH_GOBIN)/chisel: bench/chisel/go.mod bench/chisel/go.sum
	@mkdir -p $(BENCH_GOBIN)
	cd bench/chisel && GOBIN=$(BENCH_GOBIN) $(GO) install -trimpath \
	  -ldflags '-X github.com/jpillora/chisel/share.BuildVersion=$(CHISEL_VERSION)' github.com/jpillora/chisel

# `make cross`: bin/proxy and bin/agent for linux/arm64 (CROSS_ARCH=amd64 on
# an arm64 machine) without emulation, the way the Dockerfile builds each
# platform of a multi-arch image; then check the ELF machine and, with
# qemu-user installed, run them. Needs gcc-aarch64-linux-gnu.
CROSS_ARCH ?= arm64
cross:
	./hack/cross-build.sh $(CROSS_ARCH) $(TARGET_DIR)/cross/$(CROSS_ARCH)
	./hack/cross-check.sh $(CROSS_ARCH) $(TARGET_DIR)/cross/$(CROSS_ARCH)

certs: certs/ca.crt
certs/ca.crt:
	./certs/gen-ca.sh certs

clean:
	$(CARGO) clean
	rm -rf $(BIN)
