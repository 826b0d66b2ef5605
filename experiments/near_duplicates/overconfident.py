"""The overconfident oracle (issue 13): confident verdicts in a random direction on near-duplicate answers.

    python experiments/near_duplicates/overconfident.py --data scored.jsonl --out rewritten.jsonl --threshold 0.8
    python experiments/near_duplicates/overconfident.py --data scored.jsonl --out control.jsonl --pairs random --share 0.25
    REWRITE="python experiments/near_duplicates/overconfident.py --threshold 0.8" bash scripts/iterate.sh

This is the failure S-SPPO is built for (docs/method.md §2): an oracle that calls one of two answers saying the
same thing the clear winner. It is a step of its own between oracle.py and sspo.py (scripts/iterate.sh runs
it as the REWRITE stage), so the oracle stays what it is and the corruption is on disk for anyone to read.

For every unordered pair i < j of a prompt's answers with sim_ij >= --threshold, P_ij becomes --verdict and
P_ji 1 - verdict, or the reverse: the direction is a coin from a hash of (seed, id, i, j), the same on every
run and machine. P_ii = 1/2 and P_ij + P_ji = 1 still hold. With --pairs random a seeded random --share of
all the file's pairs is corrupted instead, whatever their similarity: the control (the same noise, not aimed
at near-duplicates). Each output row is its input row with the new "pref", "corrupted" [[i, j], ...] (the
pairs changed, i < j) and "rewrite" (the settings, the same on every row); every other field is unchanged.
The output is written whole at the end (atomically). Prints the pairs seen, the share corrupted and the
percentiles of the similarities seen, so a threshold can be checked against the real distribution.
"""
import hashlib
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from common import UserError, atomic_write_text, cli, field_error, matrix_field, read_rows  # noqa: E402

DEFAULT_THRESHOLD = 0.8  # the top quarter of sibling similarities of SmolLM2 answers (MiniLM; bench/similarity_stats.py)
PERCENTILES = (5, 25, 50, 75, 95)


def coin(seed, prompt_id, i, j, stream="direction"):
    """A stable 64-bit number for the pair (i, j) of a prompt: the same across runs, machines and Python versions."""
    digest = hashlib.sha256(f"{stream}\x00{seed}\x00{prompt_id}\x00{i}\x00{j}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def every_pair(prompt_id, k):
    """(id, i, j) for every unordered pair i < j of a prompt's K answers."""
    return [(prompt_id, i, j) for i in range(k) for j in range(i + 1, k)]


def read_scored(path):
    """[(line, row, P, S)] of a scored file (oracle.py's output), each row checked (common.read_rows, then P, S)."""
    rows = []
    for n, row in read_rows(path, min_responses=2):
        if "rewrite" in row:
            raise field_error(path, n, "rewrite", "this row was rewritten already: give oracle.py's output")
        k = len(row["responses"])
        rows.append((n, row, matrix_field(path, n, row, "pref", k), matrix_field(path, n, row, "sim", k)))
    if not rows:
        raise UserError(f"{path}: no rows")
    return rows


def main(data, out, threshold=DEFAULT_THRESHOLD, verdict=0.95, seed=0, pairs="similar", share=None):
    """Rewrite "pref" of a scored file: confident verdicts, random in direction, on some pairs of answers.

    Args:
        data: scored JSONL (oracle.py's output: "id", "responses", "pref", "sim")
        out: the rewritten scored JSONL (what sspo.py trains on)
        threshold: pairs="similar": every pair with sim >= threshold is corrupted
        verdict: the confident win probability given to the pair's winner (its loser gets 1 - verdict)
        seed: seeds the direction of each verdict (and, pairs="random", which pairs)
        pairs: "similar" (by --threshold: the overconfident oracle) or "random" (a --share of all pairs: the control)
        share: pairs="random": the share of all pairs to corrupt, in [0, 1]
    """
    if pairs not in ("similar", "random"):
        raise UserError(f"--pairs must be 'similar' or 'random', not {pairs!r}")
    if not isinstance(verdict, (int, float)) or not 0.5 < verdict <= 1:
        raise UserError(f"--verdict must lie in (0.5, 1], got {verdict!r}")
    if pairs == "random" and (not isinstance(share, (int, float)) or not 0 <= share <= 1):
        raise UserError(f"--pairs random needs --share in [0, 1], got {share!r}")
    if pairs == "similar" and (not isinstance(threshold, (int, float)) or not -1 <= threshold <= 1):
        raise UserError(f"--threshold must be a cosine similarity in [-1, 1], got {threshold!r}")
    if os.path.abspath(data) == os.path.abspath(out):
        raise UserError(f"{out}: --out must differ from --data")
    rows = read_scored(data)
    every = [pair for _, row, _, S in rows for pair in every_pair(row["id"], len(S))]
    if pairs == "similar":
        hit = {(pid, i, j) for _, row, _, S in rows for pid, i, j in every_pair(row["id"], len(S)) if S[i, j] >= threshold}
        stamp = {"kind": "overconfident", "pairs": "similar", "threshold": threshold, "verdict": verdict, "seed": seed}
    else:  # the lowest hashes: exactly round(share x pairs) of them, the same ones on every run
        ranked = sorted(every, key=lambda p: coin(seed, *p, stream="select"))
        hit = set(ranked[:round(share * len(every))])
        stamp = {"kind": "overconfident", "pairs": "random", "share": share, "verdict": verdict, "seed": seed}

    lines, ties = [], 0
    for _, row, P, S in rows:
        corrupted = []
        for pair in every_pair(row["id"], len(S)):
            if pair in hit:
                _, i, j = pair
                ties += int(P[i, j] == 0.5)
                win = verdict if coin(seed, row["id"], i, j) % 2 else 1 - verdict
                P[i, j], P[j, i] = win, 1 - win
                corrupted.append([i, j])
        lines.append(json.dumps({**row, "pref": P.tolist(), "corrupted": corrupted, "rewrite": stamp}, ensure_ascii=False))
    atomic_write_text(out, "".join(line + "\n" for line in lines))

    sims = np.array([S[i, j] for _, row, _, S in rows for _, i, j in every_pair(row["id"], len(S))])
    spread = "/".join(f"{v:.2f}" for v in np.percentile(sims, PERCENTILES))
    how = f"sim >= {threshold}" if pairs == "similar" else f"random, share {share}"
    print(f"overconfident: {len(rows)} prompts, {len(every)} pairs, {len(hit)} corrupted "
          f"({100 * len(hit) / max(len(every), 1):.1f}%, {how}; {ties} of them were ties before) to "
          f"{verdict}/{1 - verdict:.2f}; pair similarity p{'/p'.join(map(str, PERCENTILES))} = {spread} -> {out}")


if __name__ == "__main__":
    cli(main)
