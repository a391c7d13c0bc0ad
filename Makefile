# The two commands of the README:
#   make run    serve the example functions on 127.0.0.1:8080
#   make test   lint and run the whole test suite
# Both install what they need on a fresh machine (wasm targets, ...).
# Benchmarks (not part of the tests): make bench

CARGO ?= cargo
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
FUNCTIONS_TARGET := functions/target/wasm32-wasip2/release

.PHONY: run test setup test-deps functions lint unit-and-integration bench

setup:
	rustup target add wasm32-wasip2 wasm32-wasip1
	rustup component add rustfmt clippy

# The Redis backend's tests run a real redis-server (Debian package).
test-deps:
	command -v redis-server >/dev/null || { $(SUDO) apt-get update && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y redis-server; }

functions: setup
	cd functions && $(CARGO) build --release --target wasm32-wasip2

run: functions
	$(CARGO) run --release --bin shoal -- serve functions/shoal.toml

lint: setup
	$(CARGO) fmt --all -- --check
	cd functions && $(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings
	cd functions && $(CARGO) clippy --release --target wasm32-wasip2 -- -D warnings
	cd abi/sdk && $(CARGO) fmt -- --check && $(CARGO) clippy --target wasm32-wasip2 -- -D warnings
	cd benches && $(CARGO) fmt --all -- --check && $(CARGO) clippy --all-targets -- -D warnings

unit-and-integration: functions test-deps
	$(CARGO) test --workspace
	cd abi/sdk && $(CARGO) test --doc
	cd benches && $(CARGO) test

test: lint unit-and-integration

# Benchmarks against native hyper and `wasmtime serve`; writes
# bench-results/latest.{md,json}. BENCH_ARGS passes options (see --help).
bench: functions
	cd benches && $(CARGO) run --release -p shoal-bench -- $(BENCH_ARGS)
