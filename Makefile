# The two commands a newcomer needs: `make book` and `make test` (see README.md).
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed-stamp
JB      := $(VENV)/bin/jupyter-book
HTML    := _build/html/index.html
ZH_BUILD := $(PY) book/_ext/build_zh.py   # the Chinese edition, or the message templates (--builder gettext)
export PYTHONHASHSEED := 0

.NOTPARALLEL:   # strict-book empties _build, which translations and browser read: one target at a time
.PHONY: setup book book-fresh test unit notebooks portability strict-book translations catalogs browser bench lab \
        lint clean

# The commands that run the tests, and the profiles of the portability check (see `portability` below).
UNIT   := $(VENV)/bin/pytest -q -p no:cacheprovider tests --ignore=tests/browser
NB     ?= book
NBMAKE := $(VENV)/bin/pytest -q -p no:cacheprovider --nbmake --nbmake-timeout=300 --durations=0
env_native   :=
env_avx2     := ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2
env_noavx    := ATEN_CPU_CAPABILITY=default MKL_ENABLE_INSTRUCTIONS=SSE4_2 ONEDNN_MAX_CPU_ISA=SSE41
env_threads2 := GRADSTAB_THREADS=2 OMP_WAIT_POLICY=PASSIVE   # passive: idle threads sleep, never spin
env_heldout  := GRADSTAB_SEED=1000
jobs_threads2 :=                # 2 threads each: one notebook at a time, or the 2 cores are oversubscribed
jobs_default  := -n 2           # 1 thread each: two notebooks at a time

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(STAMP)

setup: $(STAMP)

## book: set up, execute the notebooks whose code changed since the last build (jupyter-cache; all of them
## the first time) and build the HTML book into _build/html, then its Chinese edition into _build/html/zh
## from the same executed notebooks
book: setup
	$(JB) build . --warningiserror --nitpick --keep-going
	$(ZH_BUILD) --strict
	@echo "The book is at file://$(CURDIR)/$(HTML) (中文版: file://$(CURDIR)/_build/html/zh/index.html)"

## book-fresh: the same from an empty _build: every notebook executed again (after a change inside gradstab)
book-fresh: clean book

## test: set up, then unit tests, every notebook under nbmake, the portability check, a strict build of both
## editions, the translation check and the browser test
test: setup lint unit notebooks portability strict-book translations browser

lint: setup
	$(VENV)/bin/ruff check src tests bench book/_ext

unit: setup
	$(UNIT)

notebooks: setup
	$(NBMAKE) $(jobs_default) book   # two notebooks at a time, one thread each

## portability: the unit tests and every notebook again under each other CPU profile, then the
## notebooks on held-out seeds. A claim that holds only on one CPU or for one seed fails here.
## One profile alone: `make profile-noavx` (NB=book/ch2_2_prevention.ipynb for one notebook).
portability: profile-avx2 profile-noavx profile-threads2 profile-heldout

profile-%: setup
	@echo "== profile $*: $(or $(env_$*),native kernels, 1 thread, seed 0)"
	$(if $(filter heldout,$*),,env $(env_$*) $(UNIT))
	env $(env_$*) $(NBMAKE) $(if $(filter threads2,$*),$(jobs_threads2),$(jobs_default)) $(NB)

strict-book: setup
	rm -rf _build
	$(JB) build . --warningiserror --nitpick --keep-going
	$(ZH_BUILD) --strict

## translations: every message of the English pages translated in locales/zh_CN, none fuzzy, markup kept
## (extracting the messages reads the executed notebooks: run it after `make book`)
translations: setup
	$(ZH_BUILD) --builder gettext
	$(PY) book/_ext/check_catalogs.py

## catalogs: after an English change, bring locales/zh_CN up to date (new entries empty, changed ones fuzzy);
## then translate them and run `make translations` (README.md, "Translating the book")
catalogs: setup
	$(ZH_BUILD) --builder gettext
	$(VENV)/bin/sphinx-intl update -p _build/gettext -l zh_CN -d locales --no-obsolete
	-$(PY) book/_ext/check_catalogs.py

browser: setup
	$(VENV)/bin/pytest -q tests/browser

## bench: run the benchmarks and write bench/RESULTS.md
bench: setup
	$(PY) bench/run_all.py

## lab: open the notebooks in JupyterLab with its MyST renderer, so {cite}, {ref}, exercises and admonitions
## render as in the web book (both installed into the venv on first use)
LAB := jupyterlab==4.5.11 jupyterlab-myst==2.7.0   # jupyterlab-myst 2.7 needs @jupyter/ydoc 3: JupyterLab 4.6 is too new
lab: setup
	$(PY) -m pip show --quiet jupyterlab-myst >/dev/null 2>&1 || $(PY) -m pip install --quiet $(LAB)
	$(VENV)/bin/jupyter-lab book/

clean:
	rm -rf _build .pytest_cache
