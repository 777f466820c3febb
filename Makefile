# nixspool — build, test, run, bench, lint.
#
#   make run    start agentd on a local file:// cache in ./var (prints nix.conf lines)
#   make test   install the test tools if missing, then run every test
#   make bench  print performance figures against same-run baselines
#               (BENCH_FLAGS="-only burst,fanout" to choose; go run ./bench -list)
#   make lint   gofmt, go vet, staticcheck
#   make robustness  the harness's long profile (ROBUSTNESS_TOTAL=30m)

SHELL        := /bin/bash
GO           ?= go
TOOLS        := $(CURDIR)/.tools/bin
# Built test servers are kept per version outside the clone, so that a fresh
# clone links them instead of building them again; missing ones are built.
TOOLS_CACHE  ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/nixspool/tools
# MinIO for the S3 tests, pinned (MinIO publishes pseudo-versions only).
MINIO_VERSION       := v0.0.0-20260212201848-7aac2a2c5b7c
# The Versity S3 Gateway, a second S3 implementation independent of MinIO's code.
VERSITYGW_VERSION   := v1.8.0
STATICCHECK_VERSION := v0.8.2
VERSION      ?= $(shell git describe --always --dirty 2>/dev/null || echo dev)
LDFLAGS      := -s -w -X github.com/nixspool/nixspool/internal/agent.Version=$(VERSION)
export PATH  := $(TOOLS):$(PATH)
NIX          := nix --extra-experimental-features nix-command

.PHONY: all build test test-race robustness run bench lint tools tool-nix tool-nginx tool-minio tool-versitygw tool-staticcheck clean

all: build

build:
	$(GO) build -trimpath -ldflags '$(LDFLAGS)' -o bin/ ./cmd/hook ./cmd/agentd ./cmd/agentctl

## tools: what the tests need, installed only when missing.
tools: tool-nix tool-nginx tool-minio tool-versitygw

tool-nix:
	@if ! command -v nix-build >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian's nix-bin"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nix-bin >/dev/null; \
	  else \
	    echo "nix-build is missing: install Nix (Debian: sudo apt-get install nix-bin) and run again" >&2; exit 1; \
	  fi; \
	fi
	@if ! command -v systemd-analyze >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  echo "installing systemd (for systemd-analyze verify of the unit files)"; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd >/dev/null || true; \
	fi

# nginx with its DAV module (Debian's nginx has it): the HTTP binary cache
# the http:// tests upload to. The tests start their own instance; the
# package's service is kept from starting (policy-rc.d) and not needed.
tool-nginx:
	@if ! command -v nginx >/dev/null && [ ! -x /usr/sbin/nginx ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian's nginx (service not started)"; \
	    prc=/usr/sbin/policy-rc.d; had=; [ -e $$prc ] && had=1 && mv $$prc $$prc.nixspool-saved; \
	    trap 'rm -f $$prc; [ -z "$$had" ] || mv $$prc.nixspool-saved $$prc' EXIT INT TERM; \
	    printf '#!/bin/sh\nexit 101\n' > $$prc && chmod 755 $$prc; \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx >/dev/null; }; rc=$$?; \
	    systemctl disable nginx >/dev/null 2>&1 || true; \
	    [ $$rc = 0 ] || exit $$rc; \
	  else \
	    echo "nginx is missing: install it (Debian: sudo apt-get install nginx) and run again" >&2; exit 1; \
	  fi; \
	fi

tool-minio:
	@$(call cached-tool,minio,github.com/minio/minio,$(MINIO_VERSION),a few minutes once)

tool-versitygw:
	@$(call cached-tool,versitygw,github.com/versity/versitygw/cmd/versitygw,$(VERSITYGW_VERSION),about two minutes once)

# cached-tool NAME,PACKAGE,VERSION,HOW-LONG: go install PACKAGE@VERSION into
# $(TOOLS_CACHE)/NAME-VERSION unless it is there, then link it into .tools/bin.
define cached-tool
dir=$(TOOLS_CACHE)/$(1)-$(3); \
if [ ! -x $$dir/$(1) ]; then \
  echo "building $(1) $(3) into $$dir ($(4))"; \
  mkdir -p $$dir && GOBIN=$$dir $(GO) install $(2)@$(3) || exit 1; \
fi; \
mkdir -p $(TOOLS) && ln -sfn $$dir/$(1) $(TOOLS)/$(1)
endef

tool-staticcheck:
	@[ -x $(TOOLS)/staticcheck ] || GOBIN=$(TOOLS) $(GO) install honnef.co/go/tools/cmd/staticcheck@$(STATICCHECK_VERSION)

## test: every test, with the real parts required (no skipping).
test: tools
	NIXSPOOL_REQUIRE_TOOLS=1 $(GO) test -count=1 -timeout 20m ./...

test-race: tools
	NIXSPOOL_REQUIRE_TOOLS=1 NIXSPOOL_RACE=1 $(GO) test -race -count=1 -timeout 30m ./...

## robustness: the long profile of the robustness harness: random schedules
## of faults against agents, a collector and an adversarial object store for
## ROBUSTNESS_TOTAL (the short profile runs inside make test). Replay a
## failing seed with the command it prints; the agents' log of a failing
## schedule is kept as robustness-SEED.log.
ROBUSTNESS_TOTAL ?= 30m
robustness:
	ROBUSTNESS_SUMMARY=$(CURDIR)/internal/robustness/last-long-run.txt ROBUSTNESS_KEEP_LOGS=$(CURDIR) \
	  $(GO) test -count=1 -timeout 0 -run TestRobustness ./internal/robustness -v -robustness.total=$(ROBUSTNESS_TOTAL) 2>&1 | tee robustness.log | grep -E '^(--- |ok|FAIL|\s+robustness_test.go.*(long profile|VIOLATION|violations:))' ; \
	  cat $(CURDIR)/internal/robustness/last-long-run.txt; ! grep -q -- '--- FAIL' robustness.log

## run: agentd on a local file:// cache in ./var, with a generated key.
run: tool-nix build
	@mkdir -p var
	@[ -f var/secret.key ] || { $(NIX) key generate-secret --key-name "$$(hostname)-nixspool-1" > var/secret.key && chmod 600 var/secret.key; }
	@$(NIX) key convert-secret-to-public < var/secret.key > var/public.key
	@roots=off; [ "$$(id -u)" = 0 ] && roots=/nix/var/nix/gcroots/nixspool; \
	echo "agentd: socket $(CURDIR)/var/agentd.sock, cache file://$(CURDIR)/var/cache"; \
	echo; echo "Add to nix.conf (or NIX_CONFIG) to queue every build:"; \
	echo "  post-build-hook = $(CURDIR)/bin/hook"; \
	echo "and run Nix with NIXSPOOL_SOCKET=$(CURDIR)/var/agentd.sock NIXSPOOL_STATE_DIR=$(CURDIR)/var/state"; \
	echo "To substitute from the cache:"; \
	echo "  extra-substituters = file://$(CURDIR)/var/cache"; \
	echo "  extra-trusted-public-keys = $$(cat var/public.key)"; \
	echo "Watch it with: bin/agentctl --socket $(CURDIR)/var/agentd.sock status"; echo; \
	exec bin/agentd --cache file://$(CURDIR)/var/cache --secret-key-file var/secret.key \
	  --socket $(CURDIR)/var/agentd.sock --state-dir $(CURDIR)/var/state --gc-roots $$roots

## bench: performance figures, each beside a baseline from the same run.
bench: tools build
	$(GO) run ./bench -bin $(CURDIR)/bin -out bench/results.json $(BENCH_FLAGS)

lint: tool-staticcheck
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...
	$(TOOLS)/staticcheck ./...

clean:
	rm -rf bin var
