# The two set-up commands of the README:
#   make demo   install quantlab (+ the demo extra) into .venv and run the demo experiment
#   make test   install quantlab (+ dev, demo, tensorrt-rtx extras, chromium) into .venv and run every test
# .ci/run calls `make test`.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip --disable-pip-version-check -q

.PHONY: demo test venv install-demo install-test chromium

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

venv: $(BIN)/python

install-demo: venv
	$(PIP) install -e '.[demo]'
	# foolbox ships 20 labelled ImageNet photos; only its data files are read (no import), so no deps.
	$(PIP) install --no-deps foolbox==3.3.4

install-test: install-demo
	$(PIP) install -e '.[dev,demo,tensorrt-rtx]'

chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	      || echo "make: could not install chromium; the browser test will skip"; \
	  else echo "make: chromium missing and not root; the browser test will skip"; fi; }

demo: install-demo
	$(BIN)/quantlab demo

test: install-test chromium
	@$(BIN)/python -m pytest; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make: pytest collected no tests"; exit 1; fi; exit $$rc
