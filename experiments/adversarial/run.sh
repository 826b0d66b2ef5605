#!/usr/bin/env bash
# Issue 23: SPPO vs S-SPPO under a clean oracle and an ADVERSARIAL one (confident verdicts against graded rule
# credit on near-duplicate answers, experiments/near_duplicates/adversarial.py), training seeds 0, 1 and 2,
# 3 iterations each, at make demo's settings, on 172 held-out prompts. Hours of a 2-core CPU, resumable.
#
#   bash experiments/adversarial/run.sh               # all of it: data, pre-check, then every seed's runs
#   DATA_ONLY=1 bash experiments/adversarial/run.sh   # iteration 1's samples, scores and rewrites + the pre-check
#   GATE=1 bash experiments/adversarial/run.sh        # afterwards: gating alone (--rep_weight 0) under adversarial
#
# In order:
# 1. The held-out prompts: data/demo_heldout.jsonl (60) and lines 129-240 of data/demo_train.jsonl (112; every
#    run trains on its first 128), into RUNS/heldout_prompts.jsonl.
# 2. Each seed's iteration-1 data, no training (experiments/near_duplicates/run.sh with DATA_ONLY=1).
# 3. precheck.py: the table precheck.md; it stops everything when the adversarial oracle reaches fewer than
#    10% of SPPO's training pairs in some seed.
# 4. The pre-registration: RESULTS.md must hold its "## Pre-registered" section, committed (git diff clean),
#    before the first model trains; without it this stops with one line.
# 5. Each seed in turn: experiments/near_duplicates/run.sh with ARMS="sppo sspo" CONDITIONS="adversarial clean"
#    (SPPO adversarial, SPPO clean, S-SPPO adversarial, S-SPPO clean, 3 iterations each), RUNS=RUNS/seed<s>,
#    DEST=experiments/adversarial/seed<s>; after each arm and condition results.py rebuilds results.json,
#    contrasts, RESULTS.md's table and plot.png from the committed files. With GATE=1, sspo_gate afterwards.
#
# Seeds: training seed s runs iterate.sh with SEED = 1000 s, so it samples iteration t with 1000 s + t, trains
# with the same, and samples the held-out answers with 1000 s: each seed its own answers, no stream shared
# between seeds. Seed 0 is make demo's seed.
# Settings: SEEDS ("0 1 2"), RUNS (runs/adversarial), DEST (experiments/adversarial: where each seed's files to
# commit and the results go; run from a frozen checkout, e.g. a git worktree, while you edit this one, and point
# DEST and RUNS here), PYTHON, GATE (0); the rest is near_duplicates/run.sh's,
# passed through (K, HELDOUT_K 4, MAX_NEW_TOKENS, ITERS 3, THRESHOLD 0.8, SSPO_ARGS, GENERATE_ARGS, ...).
set -euo pipefail

cd "$(dirname "$0")/../.."
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi
export PYTHON
here=experiments/adversarial
RUNS="${RUNS:-runs/adversarial}"
DEST="${DEST:-$here}"
read -r -a seeds <<< "${SEEDS:-0 1 2}"
for s in "${seeds[@]}"; do
  if ! [[ "$s" =~ ^[0-9]+$ ]]; then echo "error: SEEDS must be whole numbers, got '$s'" >&2; exit 2; fi
done

mkdir -p "$RUNS"
heldout="$RUNS/heldout_prompts.jsonl"
{ cat data/demo_heldout.jsonl; sed -n 129,240p data/demo_train.jsonl; } > "$heldout.new"
if cmp -s "$heldout.new" "$heldout"; then rm "$heldout.new"; else mv "$heldout.new" "$heldout"; fi

each_seed() {  # each_seed VAR=VALUE...: near_duplicates/run.sh once per seed, with these settings on top
  local s
  for s in "${seeds[@]}"; do
    echo "=== seed $s"
    env SEED=$((1000 * s)) RUNS="$RUNS/seed$s" DEST="$DEST/seed$s" HELDOUT="$heldout" HELDOUT_K="${HELDOUT_K:-4}" \
      RESULTS="$PYTHON $here/results.py --folder $DEST" "$@" bash experiments/near_duplicates/run.sh
  done
}

each_seed DATA_ONLY=1 ARMS=sppo CONDITIONS=adversarial
"$PYTHON" "$here/precheck.py" --runs "$RUNS" --seeds "$(IFS=,; echo "${seeds[*]}")" --out "$DEST"
if [[ "${DATA_ONLY:-0}" == 1 ]]; then exit 0; fi

if ! grep -q '^## Pre-registered' "$here/RESULTS.md" || ! git ls-files --error-unmatch "$here/RESULTS.md" &> /dev/null \
   || ! git diff --quiet HEAD -- "$here/RESULTS.md"; then
  echo "error: $here/RESULTS.md: commit its '## Pre-registered' section (endpoints and decision) before training" >&2
  exit 2
fi
"$PYTHON" "$here/results.py" --folder "$DEST" --plan_seeds "$(IFS=,; echo "${seeds[*]}")" --gate "${GATE:-0}"
each_seed ARMS="sppo sspo" CONDITIONS="adversarial clean"
if [[ "${GATE:-0}" == 1 ]]; then each_seed ARMS=sspo_gate CONDITIONS=adversarial; fi
echo "== done: $DEST/results.json, $DEST/RESULTS.md, $DEST/plot.png (commit them; $RUNS stays out of git)"
