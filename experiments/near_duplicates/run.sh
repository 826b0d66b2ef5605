#!/usr/bin/env bash
# Issue 13: SPPO vs S-SPPO vs DPO (and S-SPPO's two halves alone) under a clean and an overconfident oracle,
# ITERS self-play iterations each, on the embedded default: the packaged SmolLM2-135M, the demo's constraint
# prompts and the rule oracle at make demo's settings. About 4 hours on a 2-core CPU (the plan is printed first).
#
#   make experiment                                   # = bash experiments/near_duplicates/run.sh
#   ITERS=1 bash experiments/near_duplicates/run.sh   # iteration 1 of every arm and condition only; run again to go on
#   CONTROL=1 bash experiments/near_duplicates/run.sh # also the control: the same noise on random pairs
#
# Arms (sspo.py flags on top of SSPO_ARGS): sspo (gating + repulsion); sppo (--loss sppo); dpo (--loss dpo);
# sspo_gate (--rep_weight 0: gating alone); sspo_rep (--tau_low 1 --tau_high 2: the gate is 0 for every
# similarity <= 1, so repulsion alone). Conditions: clean (the rule oracle as is); overconfident
# (overconfident.py between oracle.py and sspo.py: confident verdicts in a random direction on every pair of
# answers with similarity >= THRESHOLD); random (CONTROL=1: CONTROL_SHARE of all pairs, whatever their similarity);
# adversarial (adversarial.py: confident verdicts AGAINST graded rule credit on the same pairs; issue 23's
# experiments/adversarial/run.sh runs it, once per seed, through this script).
#
# Every arm and condition starts from the same files: the base model's held-out answers and iteration 1's
# samples and scores are made once (by the first run that needs them) and copied with `cp -a` (which keeps the stage markers'
# times) into the other runs, so iterate.sh skips those stages; the overconfident rewrite of iteration 1 is
# made once per condition the same way. From iteration 2 on each arm samples from its own model.
# The loop runs all iterations of one arm and condition before the next (ARMS x CONDITIONS, in the order
# given: SPPO under the overconfident then the clean oracle first, then S-SPPO the same, then the rest),
# each iteration a call `ITERS=t bash scripts/iterate.sh` on the same OUT, so a killed run continues where
# it stopped. The models live in RUNS, which a fresh checkout does not have: there a run whose ITERS
# iterations are all in DEST already is skipped, and an unfinished one starts again from its iteration 1.
#
# After each call the files to commit are copied into DEST (held-out answers, sspo.py's metrics.jsonl and
# summary.json, trained_pairs.py's extract, wall_time.jsonl); after each arm and condition results.py rebuilds results.json, RESULTS.md's table and plot.png from DEST alone. Nothing is committed.
#
# Settings (environment variables): MODEL (default: the packaged SmolLM2), EMBEDDER (similarity encoder),
# TRAIN_PROMPTS (data/demo_train.jsonl) and TRAIN_N (its first N), HELDOUT (data/demo_heldout.jsonl), K,
# HELDOUT_K, MAX_NEW_TOKENS (TRAIN_N to MAX_NEW_TOKENS: make demo's, scripts/demo.env), ITERS (3), SEED (0),
# THRESHOLD (0.8), CONTROL (0), CONTROL_SHARE (0.25), ARMS and CONDITIONS (space-separated subsets), SSPO_ARGS (make demo's), GENERATE_ARGS,
# RUNS (runs/near_duplicates: models and stage files), DEST (experiments/near_duplicates), PYTHON, LAUNCH,
# RESULTS (the command run after each arm and condition; default: results.py --folder DEST), DATA_ONLY (1: only
# iteration 1's samples, scores and rewrites of each condition, no training: to inspect them first).
# A finished stage is not redone when a setting changes (iterate.sh sees files, not flags): after changing
# one, remove what it touches first (e.g. rm -rf runs/near_duplicates/overconfident for a new THRESHOLD).
set -euo pipefail

cd "$(dirname "$0")/../.."
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi
TRAIN_PROMPTS="${TRAIN_PROMPTS:-data/demo_train.jsonl}"
source scripts/demo.env  # make demo's settings: the defaults below
TRAIN_N="${TRAIN_N:-$DEMO_TRAIN_N}"
HELDOUT="${HELDOUT:-data/demo_heldout.jsonl}"
K="${K:-$DEMO_K}"
HELDOUT_K="${HELDOUT_K:-$DEMO_HELDOUT_K}"
MAX_NEW_TOKENS="${MAX_NEW_TOKENS:-$DEMO_MAX_NEW_TOKENS}"
ITERS="${ITERS:-3}"
SEED="${SEED:-0}"
THRESHOLD="${THRESHOLD:-0.8}"
CONTROL_SHARE="${CONTROL_SHARE:-0.25}"
# the same for every arm, only --loss and the ablation flags differ
SSPO_ARGS="${SSPO_ARGS:-$DEMO_SSPO_ARGS}"
GENERATE_ARGS="${GENERATE_ARGS:-}"  # generate.py's own defaults, as make demo
RUNS="${RUNS:-runs/near_duplicates}"
DEST="${DEST:-experiments/near_duplicates}"
read -r -a arms <<< "${ARMS:-sppo sspo dpo sspo_gate sspo_rep}"
default_conditions="overconfident clean"
if [[ "${CONTROL:-0}" == 1 ]]; then default_conditions+=" random"; fi
read -r -a conditions <<< "${CONDITIONS:-$default_conditions}"
here=experiments/near_duplicates

arm_flags() {  # the sspo.py flags of an arm, one a line
  case "$1" in
    sspo) printf '%s\n' --loss sspo ;;
    sppo) printf '%s\n' --loss sppo ;;
    dpo) printf '%s\n' --loss dpo ;;
    sspo_gate) printf '%s\n' --loss sspo --rep_weight 0 ;;
    sspo_rep) printf '%s\n' --loss sspo --tau_low 1 --tau_high 2 ;;
    *) echo "error: unknown arm '$1' (known: sspo sppo dpo sspo_gate sspo_rep)" >&2; return 2 ;;
  esac
}

rewrite_command() {  # iterate.sh's REWRITE of a condition (empty: none)
  case "$1" in
    clean) echo "" ;;
    overconfident) echo "$PYTHON $here/overconfident.py --threshold $THRESHOLD --seed $SEED" ;;
    random) echo "$PYTHON $here/overconfident.py --pairs random --share $CONTROL_SHARE --seed $SEED" ;;
    adversarial) echo "$PYTHON $here/adversarial.py --threshold $THRESHOLD" ;;
    *) echo "error: unknown condition '$1' (known: clean overconfident random adversarial)" >&2; return 2 ;;
  esac
}

for arm in "${arms[@]}"; do arm_flags "$arm" > /dev/null; done
for condition in "${conditions[@]}"; do rewrite_command "$condition" > /dev/null; done
if ! [[ "$ITERS" =~ ^[0-9]+$ && "$ITERS" -ge 1 ]]; then
  echo "error: ITERS must be a whole number >= 1, got '$ITERS'" >&2
  exit 2
fi

# share TO FILE[:CONDITION]...: copy stage outputs that another run of this experiment made (of CONDITION
# only, when given), with their markers, unless TO has them already.
share() {
  local to="$1" item file only from
  shift
  for item in "$@"; do
    file="${item%%:*}" only=""
    if [[ "$item" == *:* ]]; then only="${item#*:}"; fi
    for from in "$RUNS"/*/*; do
      if [[ -n "$only" && "$(basename "$(dirname "$from")")" != "$only" ]]; then continue; fi
      if [[ "$from" != "$to" && -e "$from/$file.done" && ! -e "$to/$file.done" ]]; then
        mkdir -p "$(dirname "$to/$file")"
        rm -rf "${to:?}/$file"
        cp -a "$from/$file" "$from/$file.done" "$(dirname "$to/$file")/"  # the file, then its marker
        break
      fi
    done
  done
}

# copy FROM TO: copy a file to commit when it is new or changed (so an unchanged run leaves git quiet).
changed=0  # 1 once something results.py reads was copied or made
copy() {
  mkdir -p "$(dirname "$2")"
  if ! cmp -s "$1" "$2"; then cp "$1" "$2"; changed=1; fi
}

# record_time STOPPED: the wall time of the iterate.sh call under way, one line of DEST/wall_time.jsonl.
call="" start=0
record_time() {
  if [[ -n "$call" ]]; then
    echo "$call, \"seconds\": $((SECONDS - start)), \"stopped\": $1}" >> "$DEST/wall_time.jsonl"
    call=""
  fi
}
trap 'record_time true; exit 143' TERM INT  # a call killed half way counts up to the kill

collect() {  # collect CONDITION ARM T: what results.py reads, into DEST
  local out="$RUNS/$1/$2" dst="$DEST/data/$1/$2/iter$3"
  copy "$out/base_heldout.jsonl" "$DEST/data/base_heldout.jsonl"
  copy "$out/iter$3/heldout.jsonl" "$dst/heldout.jsonl"
  copy "$out/iter$3/model/metrics.jsonl" "$dst/metrics.jsonl"
  copy "$out/iter$3/model/summary.json" "$dst/summary.json"
  if [[ ! -e "$dst/trained_pairs.jsonl" || "$out/iter$3/model/summary.json" -nt "$dst/trained_pairs.jsonl" ]]; then
    "$PYTHON" "$here/trained_pairs.py" --model_dir "$out/iter$3/model" --out "$dst/trained_pairs.jsonl"
    changed=1
  fi
}

results() {
  local embed=() command
  if [[ -n "${EMBEDDER:-}" ]]; then embed=(--embedder "$EMBEDDER"); fi
  if [[ -n "${RESULTS:-}" ]]; then
    read -r -a command <<< "$RESULTS"
    "${command[@]}" "${embed[@]}"
  else
    "$PYTHON" "$here/results.py" --folder "$DEST" --threshold "$THRESHOLD" "${embed[@]}"
  fi
}

# The plan, from the stage times of make demo's settings on a 2-core CPU (tenths of a minute): sampling
# 128 prompts x 4 25, training 40, held-out 13 per 60 x 4 answers, the oracle 5, evaluation 2, extract and
# results.py 3.
heldout=$((13 * $(grep -c . "$HELDOUT") * HELDOUT_K / 240))
calls=0 todo=0 tenths=0
if ! compgen -G "$RUNS/*/*/iter1/scored.jsonl.done" > /dev/null; then tenths=$((heldout + 25 + 5)); fi
for ((t = 1; t <= ITERS; t++)); do
  for condition in "${conditions[@]}"; do
    for arm in "${arms[@]}"; do
      calls=$((calls + 1))
      if [[ -e "$DEST/data/$condition/$arm/iter$ITERS/summary.json" ]]; then continue; fi  # skipped below
      if [[ ! -e "$RUNS/$condition/$arm/iter$t/report.json.done" ]]; then
        todo=$((todo + 1))
        tenths=$((tenths + 40 + heldout + 2 + 3 + (t > 1 ? 25 + 5 : 0)))
      fi
    done
  done
done
data_only="${DATA_ONLY:-0}"
if [[ "$data_only" == 1 ]]; then
  ITERS=1
  echo "== DATA_ONLY=1: iteration 1's samples, scores and rewrites of ${conditions[*]}, no training; runs in $RUNS"
else echo "== plan: ${#conditions[@]} conditions (${conditions[*]}) x ${#arms[@]} arms (${arms[*]}) x $ITERS iterations" \
  "= $calls iterate.sh calls, $todo still to run: about $((tenths / 600)) h $((tenths % 600 / 10)) min" \
  "at make demo's stage times (2-core CPU); runs in $RUNS, results in $DEST"
fi

mkdir -p "$RUNS" "$DEST"
prompts="$RUNS/train_prompts.jsonl"
head -n "$TRAIN_N" "$TRAIN_PROMPTS" > "$prompts.new"
if cmp -s "$prompts.new" "$prompts"; then rm "$prompts.new"; else mv "$prompts.new" "$prompts"; fi

for arm in "${arms[@]}"; do
  for condition in "${conditions[@]}"; do
    out="$RUNS/$condition/$arm"
    if [[ -e "$DEST/data/$condition/$arm/iter$ITERS/summary.json" && ! -e "$out/iter$ITERS/report.json.done" ]]; then
      echo "== $condition / $arm: all $ITERS iterations are in $DEST already (an earlier checkout): skipped"
      continue
    fi
    for ((t = 1; t <= ITERS; t++)); do
      if [[ "$t" == 1 ]]; then
        share "$out" base_heldout.jsonl iter1/responses.jsonl iter1/scored.jsonl
        share "$out" "iter1/rewritten.jsonl:$condition"
      fi
      mapfile -t flags < <(arm_flags "$arm")
      echo "== $condition / $arm: iteration $t of $ITERS"
      start="$SECONDS" call=""
      if [[ "$data_only" == 0 && ! -e "$out/iter$t/report.json.done" ]]; then  # a call that only skips is not timed
        call="{\"condition\": \"$condition\", \"arm\": \"$arm\", \"iteration\": $t"
      fi
      REWRITE="$(rewrite_command "$condition")" ITERS="$t" OUT="$out" PYTHON="$PYTHON" ORACLE=rule LOSS='' \
        K="$K" HELDOUT_K="$HELDOUT_K" MAX_NEW_TOKENS="$MAX_NEW_TOKENS" SEED="$SEED" PROMPTS="$prompts" \
        HELDOUT="$HELDOUT" SSPO_ARGS="$SSPO_ARGS" GENERATE_ARGS="$GENERATE_ARGS" DATA_ONLY="$data_only" \
        bash scripts/iterate.sh "${flags[@]}"
      record_time false
      if [[ "$data_only" == 1 ]]; then continue; fi
      collect "$condition" "$arm" "$t"
    done
    if [[ "$data_only" == 0 && ( "$changed" == 1 || ! -e "$DEST/results.json" ) ]]; then
      results  # after each arm and condition: partial results to commit
      changed=0
    fi
  done
done
if [[ "$data_only" == 1 ]]; then echo "== done: iteration 1's data in $RUNS"; exit 0; fi
echo "== done: $DEST/results.json, $DEST/RESULTS.md, $DEST/plot.png (commit $DEST; $RUNS stays out of git)"
