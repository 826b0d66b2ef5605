#!/usr/bin/env bash
# sspo.py with the prompt shared by chosen and rejected vs rows apart, on a real model, side by side:
# median tokens/s of metrics.jsonl, wall time and peak RSS of each run, alternating, ROUNDS rounds.
#
#   make demo && bash bench/share_prompt.sh                       # the packaged SmolLM2 on the demo's pairs
#   DATA=scored.jsonl MODEL=path/or/id ROUNDS=3 bash bench/share_prompt.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${DATA:-runs/demo/iter1/scored.jsonl}"
MODEL="${MODEL:-packaged:SmolLM2-135M-Instruct}"
ROUNDS="${ROUNDS:-2}"
PY="${PY:-.venv/bin/python}"
WORK="$(mktemp -d /tmp/share_prompt.XXXXXX)"
[ -f "$DATA" ] || { echo "error: $DATA not found: run make demo first, or set DATA" >&2; exit 2; }
for ((r = 1; r <= ROUNDS; r++)); do
  for share in True False; do
    out="$WORK/$share-$r"
    /usr/bin/time -f "%e %M" -o "$out.time" "$PY" sspo.py --data "$DATA" --model "$MODEL" --output_dir "$out" \
      --share_prompt "$share" --beta 0.1 --lr 2e-6 --batch_size 4 --epochs 2 --max_length 512 --save_every 0 > "$out.log" 2>&1
    read -r wall kib < "$out.time"
    "$PY" - "$out/metrics.jsonl" "$r" "$share" "$wall" "$kib" <<'PYEOF'
import json, statistics, sys
path, r, share, wall, kib = sys.argv[1:]
m = [json.loads(x) for x in open(path)]
speed = statistics.median(x["tokens_per_s"] for x in m)
print(f"round {r}  share_prompt={share:5}  {speed:6.0f} tok/s (median of {len(m)} steps)  "
      f"wall {float(wall):6.1f} s  peak RSS {int(kib) / 1024:6.0f} MiB  last loss {m[-1]['loss']:.4g}")
PYEOF
    rm -rf "$out"
  done
done
rm -rf "$WORK"
