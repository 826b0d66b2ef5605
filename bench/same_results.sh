#!/usr/bin/env bash
# Does a change alter what sspo.py trains? Trains the same pairs with the same flags at revision BEFORE (a
# throw-away git worktree) and at this working tree (or at revision AFTER), then compares the saved weights byte for byte and
# metrics.jsonl + summary.json with their timing keys (*_per_s, *_s) left out. Exit 0: identical; 1: not.
#
#   make demo && BEFORE=HEAD~1 bash bench/same_results.sh        # make demo's pairs and flags, one process
#   BEFORE=HEAD~1 TINY=1 PROCS=2 bash bench/same_results.sh       # a tiny model (tests/tiny.py), 2 CPU processes
#   BEFORE=HEAD AFTER=HEAD TINY=1 bash bench/same_results.sh       # is training deterministic? (tests/test_bench.py)
#   BEFORE=v1 DATA=scored.jsonl MODEL=path/or/id ARGS="--loss sppo --lr 1e-6" bash bench/same_results.sh
set -euo pipefail
cd "$(dirname "$0")/.."
: "${BEFORE:?set BEFORE to the git revision to compare against, e.g. BEFORE=HEAD~1}"
PY="${PY:-$([[ -x .venv/bin/python ]] && echo "$PWD/.venv/bin/python" || command -v python3)}"
PROCS="${PROCS:-1}"
WORK="$(mktemp -d /tmp/same_results.XXXXXX)"
trap 'for t in before after; do git worktree remove --force "$WORK/tree-$t" 2>/dev/null || true; done; rm -rf "$WORK"' EXIT

if [[ "${TINY:-0}" == 1 ]]; then
  "$PY" -c "import sys; from tests import tiny; tiny.make_llama(sys.argv[1]); tiny.make_tokenizer(sys.argv[1]); tiny.write_scored(sys.argv[2], n=16)" \
    "$WORK/tiny" "$WORK/tiny.jsonl"
  DATA="${DATA:-$WORK/tiny.jsonl}" MODEL="${MODEL:-$WORK/tiny}"
  ARGS="${ARGS:---lr 1e-3 --beta 0.1 --epochs 2 --batch_size 2 --optimizer adamw --save_every 0}"
else
  DATA="${DATA:-runs/demo/iter1/scored.jsonl}" MODEL="${MODEL:-}"
  if [[ -z "${ARGS:-}" ]]; then . scripts/demo.env; ARGS="$DEMO_SSPO_ARGS"; fi
fi
[[ -f "$DATA" ]] || { echo "error: $DATA not found: run make demo first, or set DATA" >&2; exit 2; }
DATA="$(realpath "$DATA")"
if [[ -n "$MODEL" && -e "$MODEL" ]]; then MODEL="$(realpath "$MODEL")"; fi
git worktree add --detach --quiet "$WORK/tree-before" "$BEFORE"
if [[ -n "${AFTER:-}" ]]; then git worktree add --detach --quiet "$WORK/tree-after" "$AFTER"; fi

launch=("$PY")
if (( PROCS > 1 )); then launch=("$PY" -m torch.distributed.run --nproc_per_node "$PROCS" --master_port 29561); fi
read -r -a args <<< "$ARGS"
if [[ -n "$MODEL" ]]; then args+=(--model "$MODEL"); fi
for side in before after; do
  dir="$PWD" note=""
  if [[ -d "$WORK/tree-$side" ]]; then dir="$WORK/tree-$side"; elif ! git diff --quiet HEAD; then note=" + uncommitted changes"; fi
  echo "== $side ($(git -C "$dir" rev-parse --short HEAD)$note): training on $DATA" >&2
  (cd "$dir" && "${launch[@]}" sspo.py --data "$DATA" --output_dir "$WORK/$side" "${args[@]}" > "$WORK/$side.log" 2>&1) \
    || { echo "error: the $side run failed; its log:" >&2; grep -v "^ *\(time\|host\|rank\|exitcode\|error_file\|traceback\) *:" "$WORK/$side.log" | tail -30 >&2; exit 2; }
done

"$PY" - "$WORK/before" "$WORK/after" <<'PYEOF'
import hashlib, json, os, sys

def weights(d):
    files = sorted(f for f in os.listdir(d) if f.endswith((".safetensors", ".bin")))
    return {f: hashlib.sha256(open(os.path.join(d, f), "rb").read()).hexdigest() for f in files}

def untimed(x):
    if isinstance(x, dict):
        return {k: untimed(v) for k, v in x.items() if not (k.endswith("_per_s") or k.endswith("_s"))}
    return x

def records(d):
    rows = [json.loads(line) for line in open(os.path.join(d, "metrics.jsonl"))]
    return [untimed(r) for r in rows], untimed(json.load(open(os.path.join(d, "summary.json"))))

before, after = sys.argv[1:]
same = True
wb, wa = weights(before), weights(after)
for f in sorted(set(wb) | set(wa)):
    ok = wb.get(f) == wa.get(f)
    same &= ok
    print(f"weights {f}: {'identical' if ok else 'DIFFER'}  before {str(wb.get(f))[:12]}  after {str(wa.get(f))[:12]}")
(mb, sb), (ma, sa) = records(before), records(after)
ok = mb == ma
same &= ok
print(f"metrics.jsonl ({len(mb)} steps before, {len(ma)} after; timing keys left out): {'identical' if ok else 'DIFFER'}")
for i, (x, y) in enumerate(zip(mb, ma)):
    if x != y:
        print(f"  first difference at line {i + 1}: {sorted(k for k in x.keys() | y.keys() if x.get(k) != y.get(k))}")
        break
ok = sb == sa
same &= ok
print(f"summary.json (timing keys left out): {'identical' if ok else 'DIFFER: ' + str(sorted(k for k in sb.keys() | sa.keys() if sb.get(k) != sa.get(k)))}")
print("SAME RESULTS" if same else "RESULTS DIFFER")
sys.exit(0 if same else 1)
PYEOF
