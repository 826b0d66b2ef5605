#!/usr/bin/env bash
# How `make demo`'s settings were chosen: one iteration of S-SPPO on the embedded default with the
# training settings given, scored on the held-out prompts against the base model. The base model's
# samples (training prompts, K=4, seed 1 as iterate.sh's iteration 1; held-out, K=4, seed 0) are made
# once and shared by every trial, so trials differ only in what is trained; a trial's first N prompts
# are exactly what `make demo` samples for N training prompts.
#
#   bash bench/demo_tuning.sh NAME N_PROMPTS CREDIT [sspo.py flags]
#   bash bench/demo_tuning.sh lr1e-5 96 graded --beta 0.02 --lr 1e-5 --batch_size 4 --epochs 2
#   SEED=2 bash bench/demo_tuning.sh demo-seed2 128 graded --beta 0.02 --lr 1e-5 --batch_size 4 --epochs 1
#
# Writes runs/tuning/NAME/{scored.jsonl, model/, heldout.jsonl, report.json} and prints the report's
# line and the time of each stage. Results of the trials run so far: bench/RESULTS.md, "make demo".
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
SEED="${SEED:-1}"  # sspo.py's seed (the order of the pairs): iterate.sh's iteration 1 uses 1
POOL=runs/tuning/pool
name="$1" n="$2" credit="$3"
shift 3
mkdir -p "$POOL" "runs/tuning/$name"
head -n 128 data/demo_train.jsonl > "$POOL/train_prompts.jsonl"  # trials use at most the first 128
[[ -e "$POOL/train.jsonl.done" ]] || { "$PY" generate.py --prompts "$POOL/train_prompts.jsonl" --out "$POOL/train.jsonl" \
  --k 4 --max_new_tokens 96 --seed 1 && touch "$POOL/train.jsonl.done"; }
[[ -e "$POOL/heldout.jsonl.done" ]] || { "$PY" generate.py --prompts data/demo_heldout.jsonl --out "$POOL/heldout.jsonl" \
  --k 4 --max_new_tokens 96 --seed 0 && touch "$POOL/heldout.jsonl.done"; }
d="runs/tuning/$name"
t0=$(date +%s)
head -n "$n" "$POOL/train.jsonl" > "$d/responses.jsonl"
[[ -e "$d/scored.jsonl.done" ]] || { "$PY" oracle.py --data "$d/responses.jsonl" --out "$d/scored.jsonl" --oracle rule \
  --rule_credit "$credit" && touch "$d/scored.jsonl.done"; }
t1=$(date +%s)
[[ -e "$d/model/summary.json" ]] || "$PY" sspo.py --data "$d/scored.jsonl" --output_dir "$d/model" --resume --seed "$SEED" \
  --save_every 0 --max_length 512 "$@"
t2=$(date +%s)
[[ -e "$d/heldout.jsonl.done" ]] || { "$PY" generate.py --model "$d/model" --prompts data/demo_heldout.jsonl \
  --out "$d/heldout.jsonl" --k 4 --max_new_tokens 96 --seed 0 && touch "$d/heldout.jsonl.done"; }
t3=$(date +%s)
"$PY" evaluate.py --outputs "$d/heldout.jsonl" --references "$POOL/heldout.jsonl" --oracle rule --out "$d/report.json"
echo "$name: oracle $((t1 - t0)) s, training $((t2 - t1)) s, held-out sampling $((t3 - t2)) s"
