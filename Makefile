# Tower in Rust. `make` builds bin/proxy and bin/agent; `make test` runs every test;
# `make demo` runs the seed flow on two local clusters.
SHELL := bash
CARGO ?= cargo
GO ?= go
BIN := bin

.PHONY: all build harness go-peers test lint demo demo-down certs bench clean

all: build

build:
	$(CARGO) build --release --bin proxy --bin agent
	@mkdir -p $(BIN)
	cp target/release/proxy target/release/agent $(BIN)/

harness: $(BIN)/kube-harness
$(BIN)/kube-harness: $(shell find tests/kube-harness -name '*.go' -o -name go.mod -o -name go.sum 2>/dev/null)
	@mkdir -p $(BIN)
	@echo ">> building the kube-apiserver harness (the first build compiles Kubernetes: several minutes)"
	cd tests/kube-harness && $(GO) build -trimpath -ldflags='-s -w' -o ../../$(BIN)/kube-harness .

go-peers: $(BIN)/go-agent $(BIN)/go-proxy
$(BIN)/go-agent $(BIN)/go-proxy: $(shell find tests/go-peers -name '*.go' -o -name go.mod -o -name go.sum 2>/dev/null)
	@mkdir -p $(BIN)
	cd tests/go-peers && $(GO) build -trimpath -o ../../$(BIN)/go-agent ./cmd/go-agent && $(GO) build -trimpath -o ../../$(BIN)/go-proxy ./cmd/go-proxy

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

test: build harness go-peers lint
	$(CARGO) test --workspace --release -- --test-threads=2

demo: build harness
	./hack/demo.sh

demo-down:
	./hack/demo-down.sh

certs: certs/ca.crt
certs/ca.crt:
	./certs/gen-ca.sh certs

clean:
	$(CARGO) clean
	rm -rf $(BIN)
