# Two commands: `make demo` and `make test`. Both create .venv and install on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

DEMO_ROOT ?= demo_data
DEMO_OUT  ?= outputs/demo
DEMO_N    ?= 500
DEMO_SIZE ?= 256

.PHONY: install demo test lint bench clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

DEMO_CODE := $(wildcard ssl_ptx/data/demo.py ssl_ptx/data/_demo*.py ssl_ptx/data/_phantom.py)

$(DEMO_ROOT)/.complete: $(STAMP) $(DEMO_CODE)
	$(BIN)/python -m ssl_ptx.data.demo --root $(DEMO_ROOT) --n-siim $(DEMO_N) --size $(DEMO_SIZE) --seed 0
	$(BIN)/python -m external_data --chexpert-dir $(DEMO_ROOT)/chexpert --nih-dir $(DEMO_ROOT)/nih \
		--montgomery-dir $(DEMO_ROOT)/montgomery --no-progress
	touch $@

# each recipe's run is redone only when the demo root (or the run's stamp) is newer
outputs/demo_supervised/.complete: $(DEMO_ROOT)/.complete
	$(BIN)/python recipes/train_supervised.py --demo-dir $(DEMO_ROOT) --out outputs/demo_supervised
	touch $@

# Mean Teacher: 25 % of the SIIM masks + the rest of SIIM and NIH unlabelled (the demo preset)
outputs/demo_mean_teacher/.complete: $(DEMO_ROOT)/.complete
	$(BIN)/python recipes/mean_teacher_nih.py --demo-dir $(DEMO_ROOT) --out outputs/demo_mean_teacher \
		--no-progress
	touch $@

# pseudo labels: the supervised demo model is the teacher; CheXpert filtered; student at ratio 0.5
# (24 epochs: in 16, as many as its teacher had, the student did not find the lesions in time)
outputs/demo_pseudo_chexpert/.complete: outputs/demo_supervised/.complete
	$(BIN)/python recipes/pseudo_chexpert.py --demo-dir $(DEMO_ROOT) --out outputs/demo_pseudo_chexpert \
		--teacher outputs/demo_supervised/last.pt --ratio 0.5 --epochs 24 --no-progress
	touch $@

DEMO_RUNS := outputs/demo_supervised/.complete outputs/demo_mean_teacher/.complete \
	outputs/demo_pseudo_chexpert/.complete

demo: $(DEMO_ROOT)/.complete $(DEMO_RUNS)
	$(BIN)/python recipes/prepare_data.py --siim-dir $(DEMO_ROOT)/siim --out $(DEMO_OUT) --size $(DEMO_SIZE)
	$(BIN)/python recipes/predict.py outputs/demo_supervised/checkpoints --weights 0.5 0.3 0.2 \
		--tune-on-val --out outputs/demo_predict --no-progress
	@echo "supervised demo model: outputs/demo_supervised (metrics.csv, curves.png, checkpoints/)"
	@echo "Mean Teacher (25 % labels): outputs/demo_mean_teacher (metrics.csv, curves.png, model.pt)"
	@echo "pseudo labels: outputs/demo_pseudo_chexpert (pseudo/gallery.png, summary.json, model.pt)"
	@echo "predictions: outputs/demo_predict (submission.csv, probabilities.h5, rule.json, overlays/)"

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check ssl_ptx external_data recipes tests benchmarks
	$(BIN)/ruff format --check ssl_ptx external_data recipes tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_rle.py --json outputs/bench_rle.json
	$(BIN)/python benchmarks/bench_data.py --json outputs/bench_data.json
	$(BIN)/python benchmarks/bench_lovasz.py --json outputs/bench_lovasz.json
	$(BIN)/python benchmarks/bench_inference.py \
		--checkpoint $(lastword $(sort $(wildcard outputs/demo_supervised/checkpoints/best-*.pt))) \
		--json outputs/bench_inference.json

clean:
	rm -rf $(DEMO_ROOT) outputs .pytest_cache
