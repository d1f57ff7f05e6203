# One command sets up and runs the main job (`make`), one sets up and runs the tests (`make test`).
PYTHON ?= python3
VENV   ?= .venv
# CPU build of torch on a CPU machine; on a GPU machine: make TORCH="torch==2.13.0 --index-url <your CUDA index>"
TORCH  ?= torch==2.13.0
BIN     = $(VENV)/bin

.PHONY: all setup reproduce regress capacity mqar lm bench zoo test test-slow clean

all: reproduce

$(BIN)/ttr: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[test,hf]'
	touch $@

setup: $(BIN)/ttr

reproduce: setup
	$(BIN)/ttr reproduce

regress: setup
	$(BIN)/ttr regress

capacity: setup
	$(BIN)/ttr capacity

mqar: setup
	$(BIN)/ttr mqar

lm: setup
	$(BIN)/ttr lm

zoo: setup
	$(BIN)/ttr zoo

bench: setup
	$(BIN)/ttr bench

test: setup
	$(BIN)/python -m pytest

test-slow: setup
	HYPOTHESIS_PROFILE=thorough $(BIN)/python -m pytest -m "slow or property"

clean:
	rm -rf $(VENV) runs
