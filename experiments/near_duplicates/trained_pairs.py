"""Which pair sspo.py trained on for each prompt, how similar its two answers were, and what the rewrite changed.

    python experiments/near_duplicates/trained_pairs.py --model_dir runs/near_duplicates/clean/sspo/iter1/model \\
        --out experiments/near_duplicates/data/clean/sspo/iter1/trained_pairs.jsonl

Reads the run's run_config.json (the scored file it trained on, --loss, --tau_low, --tau_high), takes the pairs
with sspo.py's own `load_pairs` and writes one small line per scored row: {"id", "chosen", "rejected" (answer
indices; null where all win rates tie and sspo.py skipped the prompt), "similarity" (sim of the pair), "pairs"
(unordered pairs of the row), "corrupted" (the rewrite's list, [] without one), "pair_corrupted"}. results.py
reads these instead of the scored files, which are too big to commit.

The indices come from the same win rates load_pairs takes its argmax / argmin of (sspo.calibrate for sspo,
the raw ones otherwise, docs/method.md §4); every pair is checked against load_pairs' own texts, so the two
cannot drift apart unnoticed.
"""
import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
import sspo  # noqa: E402  (like bench/: an experiment may read the trainer's selection)
from common import UserError, atomic_write_text, cli, read_json, read_jsonl  # noqa: E402


def pick(row, loss, tau_low, tau_high):
    """(chosen index, rejected index) or None on a tie: the argmax / argmin of sspo.py's win rates."""
    pref, sim = (torch.tensor(row[name], dtype=torch.float64) for name in ("pref", "sim"))
    rates = sspo.win_rates(sspo.calibrate(pref, sim, tau_low, tau_high) if loss == "sspo" else pref)
    w, l = int(rates.argmax()), int(rates.argmin())
    return None if rates[w] - rates[l] < 1e-9 else (w, l)


def main(model_dir, out):
    """Write the trained pair of each prompt of a finished sspo.py run (see the module docstring).

    Args:
        model_dir: sspo.py's --output_dir (holds run_config.json; the scored file it names must still exist)
        out: the JSONL to write
    """
    config = read_json(os.path.join(model_dir, "run_config.json"))
    data, loss, tau_low, tau_high = (config[k] for k in ("data", "loss", "tau_low", "tau_high"))
    data = data if os.path.isabs(data) or os.path.exists(data) else os.path.join(ROOT, data)  # iterate.sh's paths are the repo's
    if "responses" not in next(read_jsonl(data))[1]:
        raise UserError(f"{data}: a pairs file; trained_pairs.py needs a scored file (responses, pref, sim)")
    pairs, _ = sspo.load_pairs(data, loss, tau_low, tau_high)
    lines, at = [], 0
    for n, row in read_jsonl(data):
        picked = pick(row, loss, tau_low, tau_high)
        record = {"id": row["id"], "chosen": None, "rejected": None, "similarity": None,
                  "pairs": len(row["responses"]) * (len(row["responses"]) - 1) // 2, "corrupted": row.get("corrupted", []),
                  "pair_corrupted": None}
        if picked:
            w, l = picked
            if (pairs[at]["chosen"], pairs[at]["rejected"]) != (row["responses"][w], row["responses"][l]):
                raise UserError(f"{data}:{n}: sspo.load_pairs picked another pair than trained_pairs.pick: update pick")
            at += 1
            record.update(chosen=w, rejected=l, similarity=row["sim"][w][l],
                          pair_corrupted=sorted([w, l]) in record["corrupted"])
        lines.append(json.dumps(record))
    if at != len(pairs):
        raise UserError(f"{data}: load_pairs gave {len(pairs)} pairs, trained_pairs.pick {at}: update pick")
    atomic_write_text(out, "".join(line + "\n" for line in lines))
    print(f"trained_pairs: {at} pairs of {len(lines)} prompts ({loss}) -> {out}")


if __name__ == "__main__":
    cli(main)
