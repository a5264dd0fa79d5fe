# kvd build, test and tooling. `make help` lists the targets.
SHELL := /bin/bash
GO    ?= go
BIN   := $(CURDIR)/bin
export PATH := $(BIN):$(PATH)

# Pinned code generators: `make proto` must regenerate the committed .pb.go
# files byte-identically. protoc comes from Debian bookworm's
# protobuf-compiler (libprotoc 3.21.12).
PROTOC_VERSION         := 3.21.12
PROTOC_GEN_GO_VERSION  := v1.36.12
PROTOC_GEN_GRPC_VERSION := v1.6.2

PROTO_FILES := proto/kvpb/kv.proto proto/peerpb/peer.proto

# The release kvd --version and kvctl version report (internal/version);
# the commit and its time come from Go's own build info.
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo devel)
LDFLAGS := -X github.com/kvd/kvd/internal/version.Version=$(VERSION)

# In-process packages run under the race detector; the process tests under
# test/ drive separately built binaries, so -race would only slow them, and
# they run one package at a time (-p 1) so that two sets of kvd clusters do
# not compete for the two cores and the failover timings stay meaningful.
# The in-process tests build without cmd/kvd/default.pgo (-pgo=off): with
# it, cmd/kvd's test binary needs every package it imports compiled a
# second time, with the profile and the race detector (b79592a). The
# process tests run the kvd that users get, built with the profile.
RACE_PKGS = $$($(GO) list ./... | grep -v '/test/')
PROC_PKGS = $$($(GO) list ./test/...)
TEST_TIMEOUT ?= 15m

# Fuzz targets: package:name. `make test` runs each for FUZZ_SHORT, `make
# fuzz` for FUZZTIME. An input that fails is written to the package's
# testdata/fuzz, where plain `go test` replays it from then on.
FUZZ_TARGETS := ./fsm:FuzzApplySequences ./fsm:FuzzApply ./fsm:FuzzStoredDecoders ./fsm:FuzzLeaseCommands \
                ./server:FuzzCheckTxn ./hashring:FuzzShard ./client:FuzzDecodeToken ./client:FuzzDecodeWatchToken
FUZZ_SHORT   ?= 10s
FUZZTIME     ?= 2m

.PHONY: help build test test-unit lint proto tools clean fuzz

help: ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

build: ## build kvd and kvctl into ./bin
	@mkdir -p $(BIN)
	@for c in kvd kvctl; do \
	  [ -d cmd/$$c ] || continue; \
	  echo "building $(BIN)/$$c ($(VERSION))"; \
	  CGO_ENABLED=0 $(GO) build -ldflags '$(LDFLAGS)' -o $(BIN)/$$c ./cmd/$$c || exit 1; \
	done

test: lint ## everything CI runs: lint, unit, race, cluster tests, compose test (when Docker answers)
	$(GO) test -count=1 -timeout $(TEST_TIMEOUT) -race -pgo=off $(RACE_PKGS)
	$(MAKE) --no-print-directory fuzz FUZZTIME=$(FUZZ_SHORT)
	$(GO) test -count=1 -p 1 -timeout $(TEST_TIMEOUT) $(PROC_PKGS)
	./scripts/compose-test.sh

fuzz: ## run every fuzz target for FUZZTIME (default 2m) each
	@set -e; for t in $(FUZZ_TARGETS); do \
	  echo "fuzz $${t#*:} ($${t%%:*}) for $(FUZZTIME)"; \
	  GO=$(GO) ./scripts/fuzz.sh "$${t%%:*}" "$${t#*:}" $(FUZZTIME); \
	done

lint: ## gofmt, go build (vet alone compiles a package with its tests) and go vet
	@out=$$(gofmt -l $$(git ls-files '*.go' | grep -v '\.pb\.go$$')); \
	  if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) build ./...
	$(GO) vet ./...

tools: ## install protoc and the pinned protoc plugins (into ./bin)
	@if ! protoc --version 2>/dev/null | grep -q "$(PROTOC_VERSION)"; then \
	  echo "installing protobuf-compiler $(PROTOC_VERSION) from Debian"; \
	  apt-get update -qq && apt-get install -y -qq protobuf-compiler; fi
	@protoc --version | grep -q "$(PROTOC_VERSION)" || { echo "need protoc $(PROTOC_VERSION), have $$(protoc --version)"; exit 1; }
	GOBIN=$(BIN) $(GO) install google.golang.org/protobuf/cmd/protoc-gen-go@$(PROTOC_GEN_GO_VERSION)
	GOBIN=$(BIN) $(GO) install google.golang.org/grpc/cmd/protoc-gen-go-grpc@$(PROTOC_GEN_GRPC_VERSION)

proto: tools ## regenerate the committed .pb.go files
	cd proto && protoc -I . \
	  --go_out=. --go_opt=paths=source_relative \
	  --go-grpc_out=. --go-grpc_opt=paths=source_relative \
	  $(patsubst proto/%,%,$(PROTO_FILES))

clean: ## remove build output
	rm -rf $(BIN)

.PHONY: cluster
cluster: build ## run a 3-node cluster as local processes (Ctrl-C stops the three kvd it started)
	./scripts/cluster.sh

# --- docker compose deployment (deploy/) ---------------------------------
# The image is FROM scratch with the static binaries copied in: building it
# pulls nothing and needs no network. `docker compose` (v2 plugin) is used
# when present, else the v1 `docker-compose` binary.
IMAGE        ?= kvd:dev
DEPLOY_BUILD := deploy/.build
COMPOSE_FILE_KVD := deploy/docker-compose.yml
COMPOSE_PROJECT  ?= kvd
COMPOSE_CMD = $$(if docker compose version >/dev/null 2>&1; then echo "docker compose"; \
	elif command -v docker-compose >/dev/null 2>&1; then echo docker-compose; \
	else echo "echo no docker compose (v2 plugin) or docker-compose (v1) found; exit 1;" >&2; echo false; fi)

.PHONY: image compose-up compose-down compose-logs compose-test

image: ## build static kvd and kvctl and the image kvd:dev (FROM scratch, no network)
	@mkdir -p $(DEPLOY_BUILD)/data
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o $(DEPLOY_BUILD)/kvd ./cmd/kvd
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o $(DEPLOY_BUILD)/kvctl ./cmd/kvctl
	docker build --network=none -t $(IMAGE) -f deploy/Dockerfile deploy

compose-up: image ## start the 3-node cluster in containers (client ports 2379, 22379, 32379 on 127.0.0.1)
	$(COMPOSE_CMD) -p $(COMPOSE_PROJECT) -f $(COMPOSE_FILE_KVD) up -d
	@echo "kvd: cluster starting with mutual TLS; certificates: docker cp $(COMPOSE_PROJECT)-kvd1-1:/certs ./kvd-certs (v1: $(COMPOSE_PROJECT)_kvd1_1), then:"
	@echo "  ./bin/kvctl --endpoints https://127.0.0.1:2379 --cacert kvd-certs/ca.crt --cert kvd-certs/client-root.crt --key kvd-certs/client-root.key cluster status"

compose-down: ## stop and remove the containers (keeps the data volumes)
	$(COMPOSE_CMD) -p $(COMPOSE_PROJECT) -f $(COMPOSE_FILE_KVD) down

compose-logs: ## follow the logs of the compose cluster
	$(COMPOSE_CMD) -p $(COMPOSE_PROJECT) -f $(COMPOSE_FILE_KVD) logs -f --tail=100

compose-test: ## end-to-end test of the compose deployment (needs a Docker engine; cleans up after itself)
	./scripts/compose-test.sh

# --- jepsen-lite (test/jepsen-lite/README.md) ------------------------------
# `make test` already runs the short run (TestJepsenShort, about a minute,
# with mutual TLS) with the other process tests. `make jepsen` runs the long one:
# JEPSEN_DURATION of workload split across JEPSEN_SEEDS seeds; replay one
# with JEPSEN_SEED=N. Histories go to JEPSEN_OUT. The last line printed is
# the summary: jepsen-lite: histories=H ops=N faults=F indeterminate=I anomalies=A lost=L watch-events=E locks=K fenced-writes=W takeover-max=T
JEPSEN_DURATION ?= 10m
JEPSEN_SEEDS    ?= 3
JEPSEN_SEED     ?= 0
JEPSEN_FAULTS   ?= kill,kill-leader,kill-all,pause,partition-leader,split,bridge,slow
JEPSEN_OUT      ?= $(or $(TMPDIR),/tmp)/kvd-jepsen
# TLS=1 (or 0) runs the cluster with (without) mutual TLS, certificates
# from `kvd cert cluster`; unset, the short run has TLS and the long not.
JEPSEN_TLS      ?= $(TLS)

.PHONY: jepsen jepsen-short

jepsen: ## long jepsen-lite run: faults, linearizability, durability, exactly-once, watches
	@mkdir -p $(JEPSEN_OUT)
	@set -o pipefail; $(GO) test -count=1 -v -timeout 90m -run 'TestJepsen$$' ./test/jepsen-lite \
	  -jepsen.duration=$(JEPSEN_DURATION) -jepsen.seeds=$(JEPSEN_SEEDS) -jepsen.seed=$(JEPSEN_SEED) \
	  -jepsen.faults=$(JEPSEN_FAULTS) -jepsen.out=$(JEPSEN_OUT) -jepsen.tls=$(JEPSEN_TLS) 2>&1 | tee $(JEPSEN_OUT)/jepsen.log; \
	  rc=$$?; grep '^jepsen-lite: histories=' $(JEPSEN_OUT)/jepsen.log | tail -n1; exit $$rc

jepsen-short: ## the short jepsen-lite run of `make test` alone, verbose (about a minute)
	@mkdir -p $(JEPSEN_OUT)
	@set -o pipefail; $(GO) test -count=1 -v -timeout 10m -run 'TestCheckerDetectsStaleReads|TestJepsenShort' ./test/jepsen-lite \
	  -jepsen.seed=$(JEPSEN_SEED) -jepsen.faults=$(JEPSEN_FAULTS) -jepsen.tls=$(JEPSEN_TLS) 2>&1 | tee $(JEPSEN_OUT)/jepsen-short.log; \
	  rc=$$?; grep '^jepsen-lite: histories=' $(JEPSEN_OUT)/jepsen-short.log | tail -n1; exit $$rc

# --- floods (test/flood) -------------------------------------------------
# Hostile clients against a 3-node cluster at its defaults while a victim
# client does linearizable gets; asserts the budget of docs/memory.md
# (every node's RssAnon below 512 MiB, victim success >= 99%, every node
# alive) and prints a table of the figures.
FLOOD_DURATION ?= 30s

.PHONY: flood flood-short apply-lag

flood: ## flood a local 3-node cluster with hostile clients; checks memory and a victim's reads (about 3 minutes)
	$(GO) test -count=1 -v -tags flood -timeout 30m -run 'TestFlood$$' ./test/flood -flood.duration=$(FLOOD_DURATION)

flood-short: ## make flood with 5 s floods (about 2 minutes)
	$(GO) test -count=1 -v -tags flood -timeout 15m -run 'TestFloodShort$$' ./test/flood

apply-lag: ## latency of small puts alone and beside 1 MiB transactions on another shard (about a minute); LAG_KVD_ARGS='--storage-partitions 4' for more files
	$(GO) test -count=1 -v -tags flood -timeout 10m -run 'TestLargeTxnLag$$' ./test/flood -lag.kvd-args="$(LAG_KVD_ARGS)"

.PHONY: bench
bench: build ## benchmark a local 3-node cluster with kvctl bench, and etcd in the same run; writes docs/benchmarks.md
	@./scripts/build-etcd.sh || echo "bench: could not build etcd; the table will have kvd alone" >&2
	./scripts/bench.sh

.PHONY: pgo
pgo: ## profile a local 3-node cluster under make bench's workloads and write cmd/kvd/default.pgo, which go build uses to optimize kvd (about 2 minutes)
	./scripts/pgo.sh

.PHONY: etcd
etcd: ## build etcd v3.6.14 and its benchmark tool into bin/etcd-v3.6.14 (Go module proxy), for make bench
	GO=$(GO) ./scripts/build-etcd.sh

.PHONY: ab
ab: build ## compare two kvd builds side by side: make ab A=DIR B=DIR (each holding a kvd), ARGS='kvctl bench args'; MODE=interleaved: one cluster at a time
	./scripts/ab.sh "$(A)" "$(B)" $(ARGS)

.PHONY: bench-memory
bench-memory: build ## 1,000,000 puts with each node capped at 150 MiB, page cache included (needs root); writes docs/memory.md
	./scripts/bench-memory.sh
