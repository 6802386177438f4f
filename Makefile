# Two entry points for a newcomer: `make demo` and `make test`. Each creates .venv when missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test lint demo bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check lrpcli tests share

demo: $(STAMP)
	$(BIN)/lrpcli explain configs/demo.yaml share/demo/images -o demo.h5 --overwrite
	$(BIN)/lrpcli render demo.h5 -d demo_heatmaps --grid --cmap coldnhot --overlay 0.6 -q
	$(BIN)/lrpcli render demo.h5 -d demo_heatmaps --cmap coldnhot -q
	$(BIN)/python share/demo/report.py demo.h5
	@echo "heatmaps: demo_heatmaps/ (grid.png is the montage)"

bench: $(STAMP)
	$(BIN)/python share/bench/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) demo.h5 demo_heatmaps *.egg-info
