# Two entry points (README.md): `make demo` runs the main job, `make test` runs the suite.
# Both create .venv and install everything on a fresh machine.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install --disable-pip-version-check -q -c constraints.txt

.PHONY: demo render test install install-dev system-deps bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) -e '.[dev]'
	touch $(VENV)/.installed $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

# The main job: the streaming server with the bundled portrait and the CPU animator;
# open the printed URL (browser demo) or drive it with examples/agent_loop.py.
demo: install
	@echo "avatar server: open http://127.0.0.1:8080/ in a browser (Ctrl-C stops it)"
	$(BIN)/avatar-server

# Offline: render the bundled portrait speaking the bundled speech, then measure its lip sync.
render: install
	$(BIN)/avatar-render --portrait assets/portrait.png --audio assets/speech.wav -o out/demo.mp4
	$(BIN)/avatar-eval out/demo.mp4 --audio assets/speech.wav --phones assets/speech.phone.json --plot out/demo-quality.png

# Debian packages the tests need: Chromium for the browser test, espeak-ng for `say`.
DEBIAN_PACKAGES := chromium espeak-ng
system-deps:
	@missing=$$(for p in $(DEBIAN_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages: $$missing"; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	fi

test: install-dev system-deps
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python bench/animator_fps.py
	$(BIN)/python bench/server_latency.py

clean:
	rm -rf $(VENV) out
