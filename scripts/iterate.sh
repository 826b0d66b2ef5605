#!/usr/bin/env bash
# S-SPPO self-play: ITERS iterations of  generate -> oracle -> sspo  (-> evaluate on held-out prompts
# against the base model). Iteration t's trained model is iteration t+1's policy and reference.
#
#   bash scripts/iterate.sh                                    # the scripts' own defaults, 3 iterations
#   ORACLE=rule ITERS=1 K=4 OUT=runs/demo bash scripts/iterate.sh --lr 1e-6 --beta 0.01
#   LAUNCH="accelerate launch --config_file configs/ds.yaml" MODEL=meta-llama/Meta-Llama-3-8B-Instruct \
#     ORACLE=pairrm bash scripts/iterate.sh
#
# Settings (environment variables; an unset one passes no flag, so the script's own default applies):
#   MODEL          base model: iteration 1's policy, and the reference of every evaluation
#   PROMPTS        training prompts; "{iter}" in it becomes the iteration number (SPPO's one split per iteration)
#   HELDOUT        held-out prompts for evaluation (default data/demo_heldout.jsonl; "none": no evaluation)
#   K              responses per prompt;  MAX_NEW_TOKENS  longest response (training and evaluation)
#   HELDOUT_K      responses per held-out prompt (default 1): constraint scores average them all, which
#                  cuts the variance of the comparison; the win rate judges the first
#   ITERS          iterations (default 3);  SEED  base seed (default 0; iteration t samples with SEED + t)
#   LOSS           sspo | sppo | sppo_hard | dpo | ipo
#   ORACLE, ORACLE_MODEL, EMBEDDER   the judge (training and evaluation) and the similarity encoder
#   REWRITE        a command run between oracle.py and sspo.py as `REWRITE --data scored --out rewritten`,
#                  e.g. "python experiments/near_duplicates/overconfident.py --threshold 0.8" (a corrupted
#                  oracle); sspo.py then trains on iter<t>/rewritten.jsonl. Unset: no such stage
#   OUT            output folder (default runs/iterate)
#   DATA_ONLY      1: iteration ITERS stops before training, after its samples, scores (and rewrite), so the
#                  training data can be inspected first; a later run without it goes on from there
#   PYTHON         interpreter (default .venv/bin/python where it exists, else python)
#   LAUNCH         prefix for generate.py and sspo.py on several devices, e.g. "accelerate launch ...";
#                  oracle.py and evaluate.py run as one process
#   GENERATE_ARGS, ORACLE_ARGS, SSPO_ARGS, EVAL_ARGS   extra flags per script (split on spaces);
#                  arguments after the script name go to sspo.py as well.
#
# Layout: OUT/base_heldout.jsonl, OUT/iter<t>/{responses.jsonl, scored.jsonl, (rewritten.jsonl,) model/,
# heldout.jsonl, report.json}, OUT/plot.png, OUT/summary.md (the base model and every iteration in one table).
# A stage writes <output>.done after it succeeds; a re-run skips every stage whose output and marker
# exist, and resumes the one that was killed (generate.py and oracle.py append what is missing, sspo.py
# --resume continues from its checkpoint). Once a stage has run, every stage made from its output is
# redone from scratch. Delete a stage's output to redo it and what follows.
# One run per OUT: a second iterate.sh on the same OUT stops at once (exit 2) with a line naming the first's
# pid (an OS lock on OUT/.lock, which the kernel frees when this script ends, a kill -9 included).
set -euo pipefail

cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi
MODEL="${MODEL:-}"
PROMPTS="${PROMPTS:-}"
HELDOUT="${HELDOUT:-data/demo_heldout.jsonl}"
K="${K:-}"
HELDOUT_K="${HELDOUT_K:-1}"
MAX_NEW_TOKENS="${MAX_NEW_TOKENS:-}"
ITERS="${ITERS:-3}"
SEED="${SEED:-0}"
LOSS="${LOSS:-}"
ORACLE="${ORACLE:-}"
ORACLE_MODEL="${ORACLE_MODEL:-}"
EMBEDDER="${EMBEDDER:-}"
OUT="${OUT:-runs/iterate}"
launch=("$PYTHON")
if [[ -n "${LAUNCH:-}" ]]; then read -r -a launch <<< "$LAUNCH"; fi
read -r -a generate_args <<< "${GENERATE_ARGS:-}"
read -r -a oracle_args <<< "${ORACLE_ARGS:-}"
read -r -a sspo_args <<< "${SSPO_ARGS:-}"
read -r -a eval_args <<< "${EVAL_ARGS:-}"
read -r -a rewrite <<< "${REWRITE:-}"

if ! [[ "$ITERS" =~ ^[0-9]+$ && "$ITERS" -ge 1 ]]; then
  echo "error: ITERS must be a whole number >= 1, got '$ITERS'" >&2
  exit 2
fi

# flag NAME VALUE: print "--NAME" and "VALUE" on two lines when VALUE is set (for mapfile).
flag() {
  if [[ -n "$2" ]]; then printf -- '--%s\n%s\n' "$1" "$2"; fi
}

# run_stage STALE OUTPUT COMMAND...: skip when OUTPUT and OUTPUT.done exist and STALE is 0; otherwise
# (STALE=1: its inputs were just remade, so OUTPUT is removed first) run COMMAND, then mark OUTPUT.done.
# STALE is also 1 when an input (another stage's output named in COMMAND) has a marker newer than
# OUTPUT.done, or than a half-made OUTPUT: a kill between two stages loses the STALE this run passed
# on, never the markers' times (so copy a run with `cp -a`, which keeps them).
# Sets RAN to 1 when the command ran, 0 when skipped.
run_stage() {
  local stale="$1" output="$2" arg made="$2.done"
  shift 2
  if [[ ! -e "$made" ]]; then made="$output"; fi
  for arg in "$@"; do
    if [[ "$arg" != "$output" && -e "$arg.done" && -e "$made" && "$arg.done" -nt "$made" ]]; then stale=1; fi
  done
  if [[ "$stale" == 0 && -e "$output" && -e "$output.done" ]]; then
    echo "== skip, already done: $output"
    RAN=0
    return 0
  fi
  if [[ "$stale" == 1 ]]; then
    rm -rf "$output"
  fi
  rm -f "$output.done"
  echo "== $*"
  "$@" 9>&-  # the stage does not inherit OUT's lock: a kill -9 of this script frees it at once
  touch "$output.done"
  RAN=1
}

mkdir -p "$OUT"
exec 9>> "$OUT/.lock"  # held, through this descriptor, until the script ends
"$PYTHON" -c 'import sys, common; sys.argv[1:] = ["--path", sys.argv[1], "--pid", sys.argv[2]]; common.cli(common.lock_fd)' \
  "$OUT" "$$"
mapfile -t judge < <(flag oracle "$ORACLE"; flag oracle_model "$ORACLE_MODEL")
mapfile -t sampling < <(flag max_new_tokens "$MAX_NEW_TOKENS")

evaluating=1
if [[ "$HELDOUT" == none ]]; then evaluating=0; fi
base_stale=0
if [[ "$evaluating" == 1 ]]; then
  mapfile -t base_model < <(flag model "$MODEL")
  run_stage 0 "$OUT/base_heldout.jsonl" "${launch[@]}" generate.py "${base_model[@]}" --prompts "$HELDOUT" \
    --out "$OUT/base_heldout.jsonl" --k "$HELDOUT_K" --seed "$SEED" "${sampling[@]}" "${generate_args[@]}"
  base_stale="$RAN"
fi

model="$MODEL"
stale=0  # 1 once a stage of the training chain has run: everything after it is remade
for ((t = 1; t <= ITERS; t++)); do
  dir="$OUT/iter$t"
  mkdir -p "$dir"
  prompts="${PROMPTS//'{iter}'/$t}"
  mapfile -t policy < <(flag model "$model")
  mapfile -t gen_opts < <(flag prompts "$prompts"; flag k "$K")
  mapfile -t train_opts < <(flag loss "$LOSS")
  mapfile -t embed_opts < <(flag embedder "$EMBEDDER")

  run_stage "$stale" "$dir/responses.jsonl" "${launch[@]}" generate.py "${policy[@]}" "${gen_opts[@]}" \
    --out "$dir/responses.jsonl" --seed "$((SEED + t))" "${sampling[@]}" "${generate_args[@]}"
  stale=$((stale | RAN))
  run_stage "$stale" "$dir/scored.jsonl" "$PYTHON" oracle.py --data "$dir/responses.jsonl" --out "$dir/scored.jsonl" \
    "${judge[@]}" "${embed_opts[@]}" "${oracle_args[@]}"
  stale=$((stale | RAN))
  train_data="$dir/scored.jsonl"
  if [[ ${#rewrite[@]} -gt 0 ]]; then  # its own stage and marker: resumed, skipped and made stale like the others
    run_stage "$stale" "$dir/rewritten.jsonl" "${rewrite[@]}" --data "$dir/scored.jsonl" --out "$dir/rewritten.jsonl"
    stale=$((stale | RAN))
    train_data="$dir/rewritten.jsonl"
  fi
  if [[ "${DATA_ONLY:-0}" == 1 && "$t" == "$ITERS" ]]; then
    echo "== DATA_ONLY=1: stopped before training iteration $t ($train_data)"
    exit 0
  fi
  run_stage "$stale" "$dir/model" "${launch[@]}" sspo.py --data "$train_data" "${policy[@]}" \
    --output_dir "$dir/model" --resume --seed "$((SEED + t))" "${train_opts[@]}" "${sspo_args[@]}" "$@"
  stale=$((stale | RAN))
  model="$dir/model"

  if [[ "$evaluating" == 1 ]]; then
    run_stage "$stale" "$dir/heldout.jsonl" "${launch[@]}" generate.py --model "$model" --prompts "$HELDOUT" \
      --out "$dir/heldout.jsonl" --k "$HELDOUT_K" --seed "$SEED" "${sampling[@]}" "${generate_args[@]}"
    run_stage "$((stale | RAN | base_stale))" "$dir/report.json" "$PYTHON" evaluate.py \
      --outputs "$dir/heldout.jsonl" --references "$OUT/base_heldout.jsonl" --out "$dir/report.json" \
      "${judge[@]}" "${eval_args[@]}"
  fi
done

metrics=()
for ((t = 1; t <= ITERS; t++)); do metrics+=("$OUT/iter$t/model/metrics.jsonl"); done
"$PYTHON" evaluate.py --curves "$(IFS=,; echo "${metrics[*]}")" --plot_out "$OUT/training.png"

if [[ "$evaluating" == 1 ]]; then
  reports=()
  for ((t = 1; t <= ITERS; t++)); do reports+=("$OUT/iter$t/report.json"); done
  echo "== the base model and each iteration on $HELDOUT (constraint scores: binary credit, 95% bootstrap intervals):"
  "$PYTHON" evaluate.py --plot "$(IFS=,; echo "${reports[*]}")" --plot_out "$OUT/plot.png" | tee "$OUT/summary.md"
  echo "== report: $OUT/iter$ITERS/report.json  plot: $OUT/plot.png  training curves: $OUT/training.png  model: $model"
else
  echo "== model: $model  training curves: $OUT/training.png"
fi
