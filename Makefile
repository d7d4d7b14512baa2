# icam-med: the two commands are `make demo` and `make test`.
# Each creates .venv on first use and installs what it needs.

PYTHON ?= python3
VENV ?= .venv
# The PyTorch build to install before the project (e.g. a CUDA build:
#   make test TORCH_SPEC="torch==2.13.0" PIP_TORCH_ARGS="--index-url <your CUDA wheel index>")
TORCH_SPEC ?= torch==2.13.0
PIP_TORCH_ARGS ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.icam-med-installed


.PHONY: venv system-deps demo test lint bench napari evaluate evaluate2d clean sample-data demo2d-model

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(PIP_TORCH_ARGS) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[all,test]"
	@touch $(STAMP)

# Debian packages the tests need (Xvfb + xcb for napari/Qt, dciodvfy, chromium, pdftoppm).
system-deps: $(STAMP)
	@bash scripts/install_system_deps.sh

# The main job: audit the sample scans with the demo model into runs/demo/ (maps, records,
# ledger, summary.csv, report.html). Re-running resumes: finished scans are skipped.
DEMO_OUT ?= runs/demo
demo: venv
	$(BIN)/python scripts/make_sample_data.py
	$(BIN)/icam-med audit sample_data/demo_cohort.csv --config configs/demo.yaml --out $(DEMO_OUT) --pdf
	$(BIN)/icam-med audit sample_data/scans/synthetic_radiographs --config configs/demo2d.yaml --out $(DEMO_OUT)-2d
	@echo
	@echo "Outputs:  $(DEMO_OUT)/  (scans/<id>/cam.nii.gz, cam.icam.json, ledger.jsonl, summary.csv)"
	@echo "Report:   $(DEMO_OUT)/report.html  (and report.pdf)"
	@echo "2-D:      $(DEMO_OUT)-2d/  (synthetic radiographs: cam.nii.gz, cam_overlay.png, cam_gsps.dcm, report.html)"
	@echo "Verify:   $(BIN)/icam-med verify $(DEMO_OUT)"
	@echo "napari:   make napari, then File > Open Sample > icam-med, or"
	@echo "          $(BIN)/napari --plugin icam-med sample_data/scans/mni152_t1_2mm_lesion.nii.gz $(DEMO_OUT)/scans/mni152-lesion-nifti/cam.nii.gz"

# lint-imports: the import contracts of pyproject.toml ([tool.importlinter], the boundaries
# of docs/architecture.md), checked before the tests.
test: venv system-deps
	$(BIN)/ruff check .
	$(BIN)/lint-imports --no-cache
	$(BIN)/python -m pytest

lint: venv
	$(BIN)/ruff check .
	$(BIN)/lint-imports --no-cache

bench: venv
	$(BIN)/icam-med bench --size 64 --repeats 3 --json runs/bench.json

evaluate: venv
	$(BIN)/icam-med evaluate --split test --n-volumes 20 --n-randomisation 5 --methods default,baselines,single-layer,controls,toolbox --out runs/evaluation

# The 2-D table of docs/evaluation.md: held-out synthetic radiographs and the 2-D demo model
# (about 30 min on the 2-core CI VM under load).
evaluate2d: venv
	$(BIN)/icam-med evaluate --suite radiographs --split test --n-volumes 40 --n-negatives 40 --n-randomisation 10 --methods default,baselines,single-layer,controls,toolbox --out runs/evaluation2d

# The plugin's sample scans: the checkout's sample_data/scans (as make demo), not the user cache.
napari: venv
	ICAM_MED_SAMPLE_DIR=$(CURDIR)/sample_data/scans $(BIN)/napari

demo2d-model: venv
	$(BIN)/python scripts/train_demo2d_model.py

sample-data: venv
	$(BIN)/python scripts/make_sample_data.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
