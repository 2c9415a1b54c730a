# Two commands on a fresh machine with Python 3.11:
#   make demo   set up .venv and run the main job (fedavg on three phantom hospitals)
#   make test   set up .venv and run the test suite
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test setup bench clean-venv

setup: $(STAMP)

# pip, not uv or poetry: pip takes torch from this machine's local wheel store instead of
# downloading a multi-GB CUDA build. constraints.txt pins what the tests were run with.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	@touch $(STAMP)

demo: $(STAMP)
	WANDB_MODE=$${WANDB_MODE:-offline} $(PY) launch/simulate.py --strategy fedavg

# Three pytest workers on 2 cores, a whole test file each (tests/conftest.py says which go
# first): the deployment tests (three files) mostly wait on Flower's poll intervals and
# heartbeat, so the other workers fill the cores meanwhile (measured: 18 min 20 s with 3, the
# same suite's files took 37 min with 2 before the deployment tests were split).
# TEST_WORKERS=0 runs everything in one process.
TEST_WORKERS ?= 3
test: $(STAMP)
	WANDB_MODE=offline $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=12 $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) bench/overhead.py

clean-venv:
	rm -rf $(VENV)
