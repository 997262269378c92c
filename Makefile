# vibed: `make run` starts the daemon with its embedded defaults; `make test` runs everything CI runs.
# The venv's interpreter: the system's CPython 3.11 where it has one with venv (Debian 12's,
# built with PGO and LTO, which the image runs too: the daemon uses 9-15 % less CPU per
# request on it than on a CPython built without them, such as pyenv's default), else python3.
ifndef PYTHON
PYTHON := $(or $(shell for p in /usr/bin/python3.11 python3; do $$p -c 'import ensurepip' 2>/dev/null && { echo $$p; break; }; done),python3)
endif
VENV   ?= .venv
BIN     = $(VENV)/bin
PIP     = $(BIN)/pip
PORT   ?= tcp:3000

.PHONY: run test install install-run lint typecheck pytest bench bench-tools clean lock browser agent
.PHONY: image test-infra infra-tools lock-infra

# The browser tests drive Debian's chromium through Playwright's executable_path (Playwright
# never downloads a browser here). Installed when missing and we are root; elsewhere the
# browser tests skip, saying why, except in CI, where a missing browser fails the run.
CHROMIUM ?= /usr/bin/chromium

# Stamp files make the install idempotent: re-run only when the inputs change.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv --clear $(VENV)
	$(PIP) install --upgrade --quiet pip
	# compat mode puts the checkout on sys.path, so twistd's plugin scan finds twisted/plugins/.
	$(PIP) install --quiet -c constraints.txt --config-settings editable_mode=compat -e '.[test,bench]'
	touch $@

# --ignore-scripts: nothing vibed uses needs an install script (leveldown ships prebuilt
# binaries; esbuild's binary comes in its platform package), and pouchdb-server's optional
# sqlite3 would otherwise be compiled from source for minutes.
NPM_CI = npm ci --no-audit --no-fund --loglevel=error --ignore-scripts
NODE_CHECK = @command -v node >/dev/null || { echo "make: Node.js (>= 18) is needed for the embedded CouchDB-protocol server: apt-get install nodejs npm"; exit 1; }

node_modules/.installed: package.json package-lock.json
	$(NODE_CHECK)
	$(NPM_CI)
	touch $@

install: $(VENV)/.installed node_modules/.installed

# What `make run` needs, and no more (no test tools, no browser): a fresh machine serves in
# about two minutes. A full `make install` already satisfies it.
$(VENV)/.runtime: pyproject.toml constraints.txt
	@if [ $(VENV)/.installed -nt pyproject.toml ] && [ $(VENV)/.installed -nt constraints.txt ]; then :; else \
	  $(PYTHON) -m venv --clear $(VENV) && \
	  $(PIP) install --quiet -c constraints.txt --config-settings editable_mode=compat -e . ; fi
	touch $@

node_modules/.runtime: package.json package-lock.json
	$(NODE_CHECK)
	@if [ node_modules/.installed -nt package-lock.json ] && [ node_modules/.installed -nt package.json ]; then :; else \
	  $(NPM_CI) --omit=dev; fi
	touch $@

install-run: $(VENV)/.runtime node_modules/.runtime

browser:
	@test -x $(CHROMIUM) || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "make: installing Debian's chromium for the browser tests"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else \
	    echo "make: $(CHROMIUM) is missing (apt-get install chromium): browser tests will skip"; \
	    test -z "$$CI"; \
	  fi; }

# The vibe agent (agent_bridge/extension): build/agent/vibe-agent/ to load unpacked, and
# build/agent/vibe-agent-<version>.zip (docs/agent.md). Needs only the pinned npm packages.
agent: node_modules/.installed
	$(PYTHON) -m agent_bridge.build --out build/agent

run: install-run
	$(BIN)/twistd -n vibed --port $(PORT)

lint: $(VENV)/.installed
	$(BIN)/ruff check vibed agent_bridge twisted tests bench tests_infra infra
	$(BIN)/ruff format --check vibed agent_bridge twisted tests bench tests_infra infra

typecheck: $(VENV)/.installed
	$(BIN)/mypy

# Two processes (pytest-xdist), a whole test file at a time: module-scoped servers and browsers
# stay in one process, and each process still runs the browser files after its Twisted ones.
# The suite mostly waits (servers, sockets, browsers), so two processes help even on 2 cores.
# PYTEST_WORKERS=0 runs everything in this one process.
PYTEST_WORKERS ?= 2
pytest: install browser
	$(BIN)/pytest -q -n $(PYTEST_WORKERS) --dist loadfile --durations=15

test: lint typecheck pytest

bench: install bench-tools
	$(BIN)/python bench/auth.py

# What the benchmarks drive and count with (Debian packages): wrk (bench/data.py and the
# others), valgrind (bench/cost.py's instruction counts).
bench-tools:
	@command -v wrk >/dev/null && command -v valgrind >/dev/null || \
	  { apt-get update -qq && apt-get install -y -qq wrk valgrind; }

lock:
	rm -rf /tmp/vibed-lock && $(PYTHON) -m venv /tmp/vibed-lock
	/tmp/vibed-lock/bin/pip install --quiet '.[test,bench]'
	{ echo "# Pinned versions for every Python package vibed and its tests install (pip -c)."; \
	  echo "# Regenerate: make lock (after changing pyproject.toml ranges)."; \
	  /tmp/vibed-lock/bin/pip freeze | grep -v -E '^(vibed|pip|setuptools)[= @]'; } > constraints.txt

clean:
	rm -rf $(VENV) $(INFRA_VENV) node_modules build *.egg-info

# --- Image and infrastructure (docs/selfhost.md) ------------------------------------------
# `make image` builds the Dockerfile with podman. What only this kind of machine needs (no
# registry, so the base image is debootstrapped and imported; registries whose certificates
# only the host's CA bundle trusts; no cgroups or user namespaces of its own) stays here and
# in infra/podman/, never in the Dockerfile that users build.
IMAGE        ?= localhost/vibed:dev
INFRA_VENV   ?= .venv-infra
CA_BUNDLE    ?= /etc/ssl/certs/ca-certificates.crt
PODMAN_ENV    = CONTAINERS_CONF=$(CURDIR)/infra/podman/containers.conf
comma        := ,
VERSION      := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)

image:
	@tests_infra/host-tools.sh
	$(PODMAN_ENV) infra/podman/base-image.sh
	@# The labels are passed as --label too: buildah 1.28 keys its layer cache on the LABEL
	@# line as written, not on the build-args in it, so a rebuild with every layer cached
	@# would keep the previous build's revision and date.
	revision=$$(git rev-parse HEAD 2>/dev/null || echo unknown); \
	created=$$(date -u +%Y-%m-%dT%H:%M:%SZ); \
	$(PODMAN_ENV) podman build --isolation chroot --network host --format docker --pull=never \
	    $(if $(wildcard $(CA_BUNDLE)),--secret id=ca-bundle$(comma)src=$(CA_BUNDLE)) \
	    --build-arg VERSION=$(VERSION) --build-arg REVISION=$$revision --build-arg CREATED=$$created \
	    --label org.opencontainers.image.version=$(VERSION) \
	    --label org.opencontainers.image.revision=$$revision \
	    --label org.opencontainers.image.created=$$created \
	    -t $(IMAGE) .
	@$(PODMAN_ENV) podman image inspect $(IMAGE) --format 'make image: $(IMAGE) {{.Size}} bytes'
	@# Each rebuild leaves the previous layers behind: drop those unused for three days.
	@$(PODMAN_ENV) podman image prune -f --filter until=72h >/dev/null

$(INFRA_VENV)/.installed: tests_infra/requirements.txt tests_infra/constraints.txt
	$(PYTHON) -m venv --clear $(INFRA_VENV)
	$(INFRA_VENV)/bin/pip install --upgrade --quiet pip
	$(INFRA_VENV)/bin/pip install --quiet -c tests_infra/constraints.txt -r tests_infra/requirements.txt
	touch $@

infra-tools: $(INFRA_VENV)/.installed
	@tests_infra/host-tools.sh

# Builds the image, then runs it, the self-host stack, and checks the chart, the Terraform,
# the systemd unit and the CI workflow with real tools (tests_infra/README.md).
test-infra: infra-tools $(VENV)/.installed image
	IMAGE=$(IMAGE) $(PODMAN_ENV) $(INFRA_VENV)/bin/pytest -q -p no:cacheprovider --durations=8 tests_infra

lock-infra:
	rm -rf /tmp/vibed-lock-infra && $(PYTHON) -m venv /tmp/vibed-lock-infra
	/tmp/vibed-lock-infra/bin/pip install --quiet -r tests_infra/requirements.txt
	{ echo "# Every package of .venv-infra, pinned (pip -c). Regenerate: make lock-infra."; \
	  /tmp/vibed-lock-infra/bin/pip freeze | grep -v -E '^(pip|setuptools)=='; } > tests_infra/constraints.txt

