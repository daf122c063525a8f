PYTHON ?= python3
TORCH_CPU ?= torch==2.13.0

.PHONY: install test bench lint

# Installs torch (the CPU build, only when no torch is present), the dev requirements and switchkd.
install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install "$(TORCH_CPU)"
	$(PYTHON) -m pip install -q -r requirements-dev.txt
	$(PYTHON) -m pip install -q --no-deps -e .

test: install
	$(PYTHON) -m pytest -q tests

bench: install
	$(PYTHON) benchmarks/throughput.py

lint: install
	$(PYTHON) -m ruff check switchkd kernels benchmarks tests setup.py

# On one CUDA GPU without internet (wheels/ may hold Liger-Kernel etc.): install, GPU tests, the kernel sections
# (switch_step, kd_loss, linear_kd), each stage under its own time limit (about 5 minutes); bench-gpu-all adds
# decode and train (about 9 minutes). Options as variables, e.g. `make bench-gpu SECTIONS="decode train"
# TESTS=none OUT=/tmp/out`; `DRY_RUN=1` lists the stages (gpu_check.sh).
.PHONY: bench-gpu bench-gpu-all
bench-gpu:
	PYTHON=$(PYTHON) bash benchmarks/gpu_check.sh

bench-gpu-all:
	PYTHON=$(PYTHON) SECTIONS=all bash benchmarks/gpu_check.sh
