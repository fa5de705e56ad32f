# Two set-up commands (README): `make serve` and `make test`. Both build .venv on first use
# (so does `make lint`, which CI runs before `make test`).
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
RUNTIME_STAMP := $(VENV)/.runtime-installed
TORCH_VERSION ?= 2.13.0
MODEL  := service/models/flaircad-demo.onnx
# The demo's PyTorch checkpoint ships too, so the tests can re-verify ONNX against it.
CHECKPOINT := model_export/checkpoints/flaircad-demo.pt

.PHONY: venv serve test model bench load lint clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The exact torch pin resolves to the local CPU wheel here; the train extra then accepts it.
	$(PY) -m pip install --quiet "torch==$(TORCH_VERSION)"
	$(PY) -m pip install --quiet -e ".[train,dev]"
	touch $(STAMP) $(RUNTIME_STAMP)

# `make serve` needs the runtime only (no torch, onnx or test tools): a venv made by
# `make test` already has it.
$(RUNTIME_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $(RUNTIME_STAMP)

serve: $(RUNTIME_STAMP)
	FLAIRCAD_AUTH_DISABLED=true $(VENV)/bin/flaircad serve

test: $(STAMP)
	$(PY) -m pytest -q

# Style, layer contracts ([tool.importlinter]) and types ([tool.mypy]: strict for service.core
# and service.pipeline). bench/ holds scripts, not a package: ruff checks it, mypy does not.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports
	$(PY) -m mypy service model_export

# Deterministic on 2 CPU cores: pretrain the backbone on lesion sites, train, export (verified).
model: $(STAMP)
	$(PY) -m model_export.pretrain --phantoms 96 --epochs 5 --config demo --out runs/demo/backbone.pth
	$(PY) -m model_export.train --phantoms 480 --config demo --folds 1 \
		--pretrained runs/demo/backbone.pth --out runs/demo
	$(PY) -m model_export.export runs/demo/model.pt --out $(MODEL)
	cp runs/demo/model.pt $(CHECKPOINT)
	cp runs/demo/metrics.json docs/demo-model-metrics.json
	# Held-out and shifted phantoms + real series through the service's path; rewrites the
	# card's generated block from docs/evaluation/evaluation.json.
	$(PY) -m model_export.evaluate --model $(MODEL) --out docs/evaluation

bench: $(STAMP)
	$(PY) bench/model_speed.py
	$(PY) bench/volume_speed.py
	$(PY) bench/e2e.py

load: $(STAMP)
	$(PY) bench/load.py

clean:
	rm -rf $(VENV) runs .pytest_cache
