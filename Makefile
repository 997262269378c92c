# vibed: `make run` starts the daemon with its embedded defaults; `make test` runs everything CI runs.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
PIP     = $(BIN)/pip
PORT   ?= tcp:3000

.PHONY: run test install lint typecheck pytest bench clean lock

# Stamp files make the install idempotent: re-run only when the inputs change.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade --quiet pip
	# compat mode puts the checkout on sys.path, so twistd's plugin scan finds twisted/plugins/.
	$(PIP) install --quiet -c constraints.txt --config-settings editable_mode=compat -e '.[test,bench]'
	touch $@

node_modules/.installed: package.json package-lock.json
	@command -v node >/dev/null || { echo "make: Node.js (>= 18) is needed for the embedded CouchDB-protocol server: apt-get install nodejs npm"; exit 1; }
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

install: $(VENV)/.installed node_modules/.installed

run: install
	$(BIN)/twistd -n vibed --port $(PORT)

lint: $(VENV)/.installed
	$(BIN)/ruff check vibed twisted tests bench
	$(BIN)/ruff format --check vibed twisted tests bench

typecheck: $(VENV)/.installed
	$(BIN)/mypy

pytest: install
	$(BIN)/pytest -q

test: lint typecheck pytest

bench: install
	$(BIN)/python bench/auth.py

lock:
	rm -rf /tmp/vibed-lock && $(PYTHON) -m venv /tmp/vibed-lock
	/tmp/vibed-lock/bin/pip install --quiet '.[test,bench]'
	{ echo "# Pinned versions for every Python package vibed and its tests install (pip -c)."; \
	  echo "# Regenerate: make lock (after changing pyproject.toml ranges)."; \
	  /tmp/vibed-lock/bin/pip freeze | grep -v -E '^(vibed|pip|setuptools)[= @]'; } > constraints.txt

clean:
	rm -rf $(VENV) node_modules build *.egg-info
