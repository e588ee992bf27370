# The two commands a newcomer needs: `make book` and `make test` (see README.md).
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed-stamp
JB      := $(VENV)/bin/jupyter-book
HTML    := _build/html/index.html
export PYTHONHASHSEED := 0

.PHONY: setup book test unit notebooks strict-book browser bench lab lint clean

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(STAMP)

setup: $(STAMP)

## book: set up, execute every notebook and build the HTML book into _build/html
book: setup
	$(JB) build . --warningiserror --nitpick --keep-going
	@echo "The book is at file://$(CURDIR)/$(HTML)"

## test: set up, then unit tests, every notebook under nbmake, a strict book build and the browser test
test: setup lint unit notebooks strict-book browser

lint: setup
	$(VENV)/bin/ruff check src tests bench

unit: setup
	$(VENV)/bin/pytest -q tests --ignore=tests/browser

notebooks: setup
	$(VENV)/bin/pytest -q -n 2 --nbmake --nbmake-timeout=300 book   # two notebooks at a time, one thread each

strict-book: setup
	rm -rf _build
	$(JB) build . --warningiserror --nitpick --keep-going

browser: setup
	$(VENV)/bin/pytest -q tests/browser

## bench: run the benchmarks and write bench/RESULTS.md
bench: setup
	$(PY) bench/run_all.py

## lab: open the notebooks in JupyterLab (installs it into the venv on first use)
lab: setup
	$(VENV)/bin/jupyter-lab --version >/dev/null 2>&1 || $(PY) -m pip install --quiet jupyterlab
	$(VENV)/bin/jupyter-lab book/

clean:
	rm -rf _build .pytest_cache
