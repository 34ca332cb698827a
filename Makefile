# The two commands: `make serve` (fresh clone -> a real car classifier on 127.0.0.1:8080)
# and `make test` (the whole suite; what CI runs). Everything else is a step of those.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
MODEL := efficientnet_lite0_cars
EXPORT := models/$(MODEL)
ARCHIVE := model_store/$(MODEL)_v1.0.mar
# The archive packs the handler's modules of these two packages (serving/archive.py).
SERVING_SOURCES := $(wildcard carmodel/*.py handler/*.py)

.PHONY: help env serve-env train-env java system serve demo stop status test check lint format archive train evaluate export eda tune clean bench \
	gate register promote fetch release-archive kserve image

help:
	@echo "make serve   - create the environment if needed, build the archive, start TorchServe, wait until READY"
	@echo "make stop    - stop TorchServe"
	@echo "make demo    - a page in the browser on 127.0.0.1:8090: drop car photos, see the answers"
	@echo "make test    - lint + the test suite, about 10 minutes (CI runs it with PYTEST_ARGS=--slow: all of it)"
	@echo "make check   - lint + the tests that start no server, about 2 minutes: the everyday loop"
	@echo "make train   - train the default model on ../shared/stanford_cars (two stages: crops, then whole photos"
	@echo "               and the box head; then the car detector, the car check and the calibration), evaluate, export, int8 into $(EXPORT)"
	@echo "make gate | register | promote | release-archive | kserve | image - the release pipeline (README)"
	@echo "make eda | tune | archive | lint | format | clean"

# --- environment -------------------------------------------------------------------------
# Three installs into one venv, each on the one before: serving (torch, TorchServe, OpenVINO, the
# handler's few packages), training (+ Ray, MLflow, NNCF, the ImageNet weights) and the tests' tools
# (+ pytest, the protocols' clients, the peers of the benchmark, a venv for KServe's wrapper, Debian's
# Chromium and promtool). `make serve` needs only the first.
# torch/torchvision first, with --isolated: a pip configuration that offers a CPU-only "+cpu"
# torch wheel (find-links) would otherwise win, and PyPI's torchvision cannot load on it.
# Where torch/torchvision come from. Empty: PyPI (its CUDA build, ~4.5 GB, unused on a CPU). On a machine
# that reaches PyTorch's own index, `make serve TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu` installs
# the CPU build instead (the Docker image's choice, scripts/container.sh).
TORCH_INDEX_URL ?=
SERVE_STAMP := $(VENV)/.installed-serve
# The project itself: its packages and commands (serve, build-mar, ...). Again after each later step,
# because ray installs a `serve` command of its own (Ray Serve's CLI) over ours.
INSTALL_PROJECT := $(PIP) install --quiet --no-deps --force-reinstall -e .
TRAIN_STAMP := $(VENV)/.installed-train
STAMP := $(VENV)/.installed
$(SERVE_STAMP): requirements/torch.txt requirements/serve.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --isolated $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL)) -r requirements/torch.txt
	$(PIP) install --quiet -r requirements/serve.txt
	$(INSTALL_PROJECT)
	$(PY) -c "import torch, torchvision; torchvision.ops.nms" # fails fast on a mismatched pair
	touch $@

$(TRAIN_STAMP): $(SERVE_STAMP) requirements/train.txt
	$(PIP) install --quiet -r requirements/train.txt
	$(INSTALL_PROJECT)
	touch $@

$(STAMP): $(TRAIN_STAMP) requirements/dev.txt requirements/bench.txt
	$(PIP) install --quiet -r requirements/dev.txt
	$(INSTALL_PROJECT)
	touch $@

# TorchServe's KServe wrapper (tests/test_kserve.py runs it) needs kserve 0.13.0, whose pins clash with ours.
KSERVE_VENV := .venv-kserve
KSERVE_STAMP := $(KSERVE_VENV)/.installed
$(KSERVE_STAMP): requirements/kserve.txt
	test -x $(KSERVE_VENV)/bin/python || $(PYTHON) -m venv $(KSERVE_VENV)
	$(KSERVE_VENV)/bin/pip install --quiet -r requirements/kserve.txt
	touch $@

serve-env: $(SERVE_STAMP) java
train-env: $(TRAIN_STAMP)
env: $(STAMP) $(KSERVE_STAMP) java system

# Debian packages, installed when missing and we are root (apt); otherwise the exact command to run.
# Java 17 for TorchServe's front end; for the tests, promtool (Prometheus's check of the metrics
# endpoint; Debian's prometheus package) and Chromium (the demo page's browser test).
define apt_install
	if [ -n "$(1)" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(1); \
	  else \
	    echo "Needed: sudo apt-get install -y --no-install-recommends $(1)"; exit 1; \
	  fi; \
	fi
endef

java:
	@missing=""; \
	java -version 2>&1 | grep -qE 'version "(1[7-9]|[2-9][0-9])' || missing="openjdk-17-jre-headless"; \
	$(call apt_install,$$missing)

system:
	@missing=""; \
	command -v promtool >/dev/null || missing="$$missing prometheus"; \
	command -v chromium >/dev/null || command -v google-chrome >/dev/null || missing="$$missing chromium"; \
	$(call apt_install,$$missing)

# --- serving -----------------------------------------------------------------------------
$(ARCHIVE): $(EXPORT)/$(MODEL).pth $(EXPORT)/index_to_name.json $(EXPORT)/model.yaml $(wildcard $(EXPORT)/$(MODEL)_int8.*) $(SERVING_SOURCES) | $(SERVE_STAMP)
	$(VENV)/bin/build-mar --export $(EXPORT) --version 1.0 --force

archive: $(ARCHIVE)

serve: serve-env $(ARCHIVE)
	$(VENV)/bin/serve start

stop:
	$(VENV)/bin/serve stop

# The page for people (client/demo.py): http://127.0.0.1:8090, on the TorchServe of `make serve` (started
# here if it is not running). Ctrl-C stops the page; `make stop` stops TorchServe.
demo: serve
	$(VENV)/bin/demo

status:
	$(VENV)/bin/serve status

# --- quality -----------------------------------------------------------------------------
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# pytest's own flags: --slow adds the training stages, Ray and the soak-sized load (what CI runs).
PYTEST_ARGS ?=
test: env lint
	$(PY) -m pytest $(PYTEST_ARGS)

# The everyday loop: lint and the tests that start no TorchServe (docs/development.md).
check: lint
	$(PY) -m pytest -m "not server" $(PYTEST_ARGS)

# --- training (see README, docs/training.md) ------------------------------------------------
# Two teachers (EfficientNet-Lite0 and Lite2) learn the classes on the crops; stage 1 learns them from the
# labels and from the teachers' averaged answers (distillation); stage 2 starts from its weights and learns
# the whole photos (the box head, the cars cut from the photos); then, on the frozen trunk, the car detector
# and the car check (the car head that looks again at each car the detector finds, in the classifier's
# pass). Stage 2 runs twice: on train alone (HELDOUT), whose val answers fit the calibration and thresholds,
# and on train+val (FINAL, what ships), which takes that calibration over; test is only evaluated. Each
# step is a file: a rerun of `make train` skips the finished ones and continues an interrupted training at
# its last epoch (--resume auto); a changed config starts that stage over.
TEACHERS := runs/efficientnet_lite0_teacher runs/efficientnet_lite2_teacher
STAGE1 := runs/efficientnet_lite0
HELDOUT := runs/efficientnet_lite0_photos
FINAL := runs/efficientnet_lite0_final

train: $(EXPORT)/quantization.json

runs/%_teacher/train_summary.json: training/configs/%_teacher.yaml | $(TRAIN_STAMP)
	$(PY) -m training.train --config $< --resume auto

$(STAGE1)/train_summary.json: training/configs/efficientnet_lite0.yaml $(TEACHERS:%=%/train_summary.json) | $(TRAIN_STAMP)
	$(PY) -m training.train --config $< --resume auto

$(HELDOUT)/train_summary.json: training/configs/efficientnet_lite0_photos.yaml $(STAGE1)/train_summary.json
	$(PY) -m training.train --config $< --resume auto --output_dir $(HELDOUT)

$(HELDOUT)/detector.json: $(HELDOUT)/train_summary.json
	$(PY) -m training.detector --run $(HELDOUT)

$(HELDOUT)/verifier.json: $(HELDOUT)/detector.json
	$(PY) -m training.verifier --run $(HELDOUT)

$(HELDOUT)/calibration.json: $(HELDOUT)/verifier.json
	$(PY) -m training.calibrate --run $(HELDOUT)

$(FINAL)/train_summary.json: training/configs/efficientnet_lite0_photos.yaml $(STAGE1)/train_summary.json
	$(PY) -m training.train --config $< --resume auto --output_dir $(FINAL) --fit_on train+val

$(FINAL)/detector.json: $(FINAL)/train_summary.json
	$(PY) -m training.detector --run $(FINAL)

$(FINAL)/verifier.json: $(FINAL)/detector.json
	$(PY) -m training.verifier --run $(FINAL)

$(FINAL)/calibration.json: $(FINAL)/verifier.json $(HELDOUT)/calibration.json
	$(PY) -m training.calibrate --run $(FINAL) --fitted_on $(HELDOUT)

$(FINAL)/eval_test.json: $(FINAL)/calibration.json
	$(PY) -m training.evaluate --run $(FINAL) --corruptions

$(EXPORT)/quantization.json: $(FINAL)/eval_test.json
	$(PY) -m training.export --run $(FINAL) --export_dir $(EXPORT)
	$(PY) -m training.quantize --export $(EXPORT)

eda: $(TRAIN_STAMP)
	$(PY) -m training.eda --data_root ../shared/stanford_cars --out_dir reports/eda

tune: $(TRAIN_STAMP)
	$(PY) -m training.tune --config training/configs/resnet50.yaml

# --- release pipeline (README "From training run to deployed image"; CI: .github/workflows) ---
# MLflow store: mlruns/ here, $$MLFLOW_TRACKING_URI (a team server) in CI.
GATE_FLAGS ?=
ALIAS ?= candidate
IMAGE ?= car-classifier
IMAGE_TAG ?= dev

gate: $(TRAIN_STAMP)
	$(PY) -m training.gate --metrics $(EXPORT)/metrics.json --baseline models:/$(MODEL)@production $(GATE_FLAGS)

register: $(TRAIN_STAMP)
	$(PY) -m training.register --export $(EXPORT) --alias $(ALIAS)

promote: $(TRAIN_STAMP)
	@test -n "$(VERSION)" || { echo "usage: make promote VERSION=<registry version>"; exit 2; }
	$(PY) -m training.register --name $(MODEL) --version $(VERSION) --alias production

# A registered version's export into $(EXPORT), where `make archive` and the Dockerfile take it from.
fetch: $(TRAIN_STAMP)
	$(PY) -m training.register --name $(MODEL) --alias $(ALIAS) --download $(EXPORT)

# The archive of a registered version (default: the candidate), versioned like the registry.
release-archive: $(TRAIN_STAMP)
	$(PY) -m training.register --name $(MODEL) --alias $(ALIAS) --download var/release/$(MODEL)
	$(VENV)/bin/build-mar --export var/release/$(MODEL) --force

kserve: $(ARCHIVE)
	$(PY) -m serving.kserve --archive $(ARCHIVE) --protocol v1
	$(PY) -m serving.kserve --archive $(ARCHIVE) --protocol v2

image:
	docker build -t $(IMAGE):$(IMAGE_TAG) .

clean:
	-$(VENV)/bin/serve stop
	rm -rf var model_store/*.mar .pytest_cache

# --- benchmark (see docs/benchmarks.md) ---------------------------------------------------------
# Stock TorchServe handler vs ours vs the in-process ceiling; run on an idle machine (~8 min).
bench: $(STAMP)
	$(PY) -m bench.run
