# Set-up and everyday commands. `make test` and `make demo` work on a machine with only Python installed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test demo benchmark report benchmark-train benchmark-onnx inplace-abn clean

# Create the virtual environment and install everything the tests need (once; again when requirements change).
$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -r requirements-dev.txt
	$(MAKE) inplace-abn || echo "WARNING: the optional inplace-abn extra did not build; BatchNorm2d + activation is used instead."
	touch $(STAMP)

# Optional extra: in-place activated BatchNorm (the original's normalization; saves activation memory).
# With a CUDA build of torch on a machine without a visible GPU it needs CUDA_HOME and an explicit arch list.
inplace-abn:
	@test -x $(PY) || { echo "run 'make test' first: $(PY) is missing"; exit 1; }
	$(PY) -c "import inplace_abn" 2>/dev/null || env $$($(PY) -c "import torch, os; \
	print('CUDA_HOME=' + os.environ.get('CUDA_HOME', '/usr/local/cuda'), \
	'TORCH_CUDA_ARCH_LIST=' + os.environ.get('TORCH_CUDA_ARCH_LIST', '9.0') \
	if torch.version.cuda and not torch.cuda.is_available() else '')") \
	$(PY) -m pip install --no-build-isolation inplace-abn==1.1.0

# Passive OpenMP waiting: busy-waiting threads slow a 2-core machine many times over when processes share it
# (the torchrun tests run two processes at once).
test: $(STAMP)
	OMP_WAIT_POLICY=$${OMP_WAIT_POLICY:-PASSIVE} $(PY) -m pytest

# The CPU demo: generated dataset, tiny CCNet trained for a few minutes, evaluation (see run_local.sh).
demo: $(STAMP)
	PYTHON=$(PY) ./run_local.sh

# The criss-cross attention op against the reference and a non-local block.
benchmark: $(STAMP)
	$(PY) -m benchmarks.cc_attention_op

# Parameters, GFLOPs and training-step memory of CCNet vs a non-local head and no attention.
report: $(STAMP)
	$(PY) -m benchmarks.model_report

# One training step of CCNet-R101 at 769x769, batch 2 and 8: fp32 vs bf16, NCHW vs channels_last.
benchmark-train: $(STAMP)
	$(PY) -m benchmarks.train_step

# CPU latency of CCNet-R101 at 769x769 exported to ONNX: onnxruntime against PyTorch.
benchmark-onnx: $(STAMP)
	$(PY) -m benchmarks.onnx_latency

clean:
	rm -rf build .pytest_cache
