"""Which pair sspo.py trained on for each prompt, how similar its two answers were, and what the rewrite changed.

    python experiments/near_duplicates/trained_pairs.py --model_dir runs/near_duplicates/clean/sspo/iter1/model \\
        --out experiments/near_duplicates/data/clean/sspo/iter1/trained_pairs.jsonl

Reads the run's pairs.jsonl (sspo.py writes the pairs it trained on: the line of --data, the answer indices,
the similarity) and run_config.json (which scored file it trained on), and writes one small line per scored
row: {"id", "chosen", "rejected" (answer indices; null where all win rates tie and sspo.py skipped the prompt),
"similarity" (sim of the pair), "pairs" (unordered pairs of the row), "corrupted" (the rewrite's list, [] without
one), "pair_corrupted"}. results.py reads these instead of the scored files, which are too big to commit.
"""
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from common import UserError, atomic_write_text, cli, read_json, read_jsonl  # noqa: E402


def main(model_dir, out):
    """Write the trained pair of each prompt of a finished sspo.py run (see the module docstring).

    Args:
        model_dir: sspo.py's --output_dir (holds pairs.jsonl and run_config.json; the scored file it names must still exist)
        out: the JSONL to write
    """
    config = read_json(os.path.join(model_dir, "run_config.json"))
    data = config["data"]
    data = data if os.path.isabs(data) or os.path.exists(data) else os.path.join(ROOT, data)  # iterate.sh's paths are the repo's
    trained = {row["line"]: row for _, row in read_jsonl(os.path.join(model_dir, "pairs.jsonl"))}
    lines = []
    for n, row in read_jsonl(data):
        if "responses" not in row:
            raise UserError(f"{data}: a pairs file; trained_pairs.py needs a scored file (responses, pref, sim)")
        k = len(row["responses"])
        record = {"id": row["id"], "chosen": None, "rejected": None, "similarity": None, "pairs": k * (k - 1) // 2,
                  "corrupted": row.get("corrupted", []), "pair_corrupted": None}
        pair = trained.pop(n, None)
        if pair:
            if pair["id"] != row["id"]:
                raise UserError(f"{data}:{n}: id {row['id']!r}, but pairs.jsonl's line {n} has {pair['id']!r}: not this run's data")
            w, l = pair["chosen_index"], pair["rejected_index"]
            record.update(chosen=w, rejected=l, similarity=pair["similarity"], pair_corrupted=sorted([w, l]) in record["corrupted"])
        lines.append(json.dumps(record))
    if trained:
        raise UserError(f"{model_dir}/pairs.jsonl: lines {sorted(trained)[:5]} are not rows of {data}: not this run's data")
    atomic_write_text(out, "".join(line + "\n" for line in lines))
    print(f"trained_pairs: {sum(json.loads(x)['chosen'] is not None for x in lines)} pairs of {len(lines)} prompts "
          f"({config['loss']}) -> {out}")


if __name__ == "__main__":
    cli(main)
