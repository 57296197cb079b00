# Two commands: `make demo` and `make test`. Each creates or refreshes .venv from a clean clone.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO_DIR ?= demo_out

.PHONY: install bytecode demo test clean

# Re-installs whenever pyproject.toml changes. torch goes first, by pip, so that it takes the pinned CPU/CUDA build
# the machine offers instead of resolving a plain `torch` to several GB of CUDA packages. The rest goes in by uv
# (pinned; it keeps the torch already there): the same 128 packages as pip resolves, in 12 s against pip's 53 s here.
# What is installed must be byte-compiled: this environment sets PYTHONDONTWRITEBYTECODE=1, so without .pyc files
# every process (each Ray worker) compiled torch and Ray from source at every import (tried on 2026-11-26: install
# 1.1 min faster, tests about 2x slower). pip compiles one file at a time; compileall on every core writes the same
# files in less time: install 166 s -> 129 s on 2 cores. Packages' own test folders (3,375 files) are never imported
# and are left out. compileall's result is ignored: it is false for files that only a newer Python parses (torch
# ships one for 3.12), which pip skips silently too; an exception still fails.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --no-compile torch==2.13.0 uv==0.13.9
	$(PY) -m uv pip install --quiet --python $(PY) -e '.[test]'
	$(PY) -c 'import compileall, re, sysconfig; compileall.compile_dir(sysconfig.get_paths()["purelib"], quiet=2, workers=0, rx=re.compile(r"/tests?/"))'
	$(PY) -m pip check
	touch $(STAMP)

install: $(STAMP)

# The project's own modules, for the same reason: every Ray worker that runs our code imports them, 0.2 s from
# source and 0.07-0.1 s from .pyc (131 worker processes in the local Ray of one `make test`). Quick, so done on every
# run; a module edited afterwards is compiled in memory again (Python checks each .pyc against its source).
bytecode: install
	$(PY) -m compileall -q -j 0 musiclm jobs tune >/dev/null

demo: bytecode
	$(PY) -m jobs.pipeline --workdir $(DEMO_DIR)

test: bytecode
	$(PY) -m pip check
	$(PY) -m pytest -q -ra --durations=15 tests

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache
	find musiclm jobs tune tests -name __pycache__ -type d -prune -exec rm -rf {} +
