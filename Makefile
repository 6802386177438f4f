# Two entry points for a newcomer: `make demo` and `make test`. Each creates .venv when missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# everything the demo and the README's render examples write; `make clean` removes it, .gitignore ignores it
DEMO_OUT := demo.h5 demo.h5.partial demo_analysis.h5 demo_vit.h5 demo_vit.h5.partial
DEMO_MAPS := demo_heatmaps
DEMO_VIRELAY := demo_virelay

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
	rm -rf $(DEMO_MAPS)
	$(BIN)/lrpcli render demo.h5 -d $(DEMO_MAPS)/plain --cmap coldnhot -q
	$(BIN)/lrpcli render demo.h5 -d $(DEMO_MAPS)/overlay --cmap coldnhot --overlay 0.6 -q
	$(BIN)/lrpcli render demo.h5 -d $(DEMO_MAPS) --grid --cmap coldnhot --overlay 0.6 -q
	$(BIN)/python share/demo/report.py demo.h5
	$(BIN)/lrpcli evaluate demo.h5 --masks share/demo/masks --patch-size 16 --metrics region_perturbation,relevance_mass_accuracy,relevance_rank_accuracy,pointing_game -q
	$(BIN)/lrpcli analyze demo.h5 -o demo_analysis.h5 --overwrite -q
	$(BIN)/lrpcli virelay demo.h5 --analysis demo_analysis.h5 -d $(DEMO_VIRELAY) --overwrite -q
	$(BIN)/lrpcli explain configs/demo_vit.yaml share/demo/images -o demo_vit.h5 --overwrite
	$(BIN)/python share/demo/report.py demo_vit.h5
	@echo "heatmaps in $(DEMO_MAPS)/: plain/, overlay/ (over the input images), grid.png (montage of the overlays)"
	@echo "SpRAy clusters in ViRelAy: $(BIN)/python -m virelay $(DEMO_VIRELAY)/demo.yaml  (then open http://localhost:8000)"

bench: $(STAMP)
	$(BIN)/python share/bench/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(DEMO_OUT) $(DEMO_MAPS) $(DEMO_VIRELAY) *.egg-info
