"""The adversarial oracle (issue 23): confident verdicts AGAINST quality on near-duplicate answers.

    python experiments/near_duplicates/adversarial.py --data scored.jsonl --out rewritten.jsonl --threshold 0.8
    REWRITE="python experiments/near_duplicates/adversarial.py --threshold 0.8" bash scripts/iterate.sh

The failure S-SPPO's calibration is built against is an oracle that is confidently wrong
on answers that say nearly the same thing, in a direction the policy can learn. overconfident.py points its
verdicts in a random direction, which pushes no feature of the answers either way; this rewrite points them
against the rule oracle's own measure of quality. For every unordered pair i < j of a prompt's answers with
sim_ij >= --threshold, the answer with the LOWER graded rule credit (oracle.constraint_score with
kind="graded", the credit the rule oracle trains with) gets P = --verdict and the other 1 - verdict; when the
credits are equal, the LONGER answer (generate.py's num_tokens) wins; when the lengths are equal too, the pair
is left as it is. P_ii = 1/2 and P_ij + P_ji = 1 still hold.

The same shape as overconfident.py: a step between oracle.py and sspo.py (iterate.sh's REWRITE stage). Each
output row is its input row with the new "pref", "corrupted" [[i, j], ...] (the pairs changed, i < j),
"reversed" (those of them whose clean verdict pointed the other way) and "rewrite" (the settings); every other
field is unchanged. Rows need "constraints" (the rule oracle's) and "num_tokens". Written whole, atomically.
"""
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(os.path.dirname(HERE))]
from common import UserError, atomic_write_text, cli, field_error  # noqa: E402
from oracle import constraint_problem, constraint_score  # noqa: E402
from overconfident import DEFAULT_THRESHOLD, every_pair, read_scored  # noqa: E402


def row_facts(path, n, row):
    """(graded credit of each answer, tokens of each answer) of a scored row, checked."""
    k = len(row["responses"])
    constraints = row.get("constraints")
    problem = constraint_problem(constraints)
    if problem:
        raise field_error(path, n, "constraints", f"{problem} (the adversarial oracle grades answers by them)")
    tokens = row.get("num_tokens")
    if not (isinstance(tokens, list) and len(tokens) == k and all(isinstance(t, int) and not isinstance(t, bool) for t in tokens)):
        raise field_error(path, n, "num_tokens", f"must be {k} whole numbers (generate.py writes them)")
    return [constraint_score(y, constraints, "graded") for y in row["responses"]], tokens


def favoured(credit, tokens, i, j):
    """The answer of the pair the adversarial oracle calls the winner: lower credit, then longer; None if neither."""
    if credit[i] != credit[j]:
        return i if credit[i] < credit[j] else j
    if tokens[i] != tokens[j]:
        return i if tokens[i] > tokens[j] else j
    return None


def rewrite(path, rows, threshold, verdict):
    """[(row, P, corrupted, reversed)] after the rewrite, from read_scored's rows."""
    done = []
    for n, row, P, S in rows:
        credit, tokens = row_facts(path, n, row)
        corrupted, reversed_ = [], []
        for _, i, j in every_pair(row["id"], len(S)):
            if S[i, j] < threshold:
                continue
            win = favoured(credit, tokens, i, j)
            if win is None:
                continue
            lose = j if win == i else i
            if P[win, lose] < 0.5:
                reversed_.append([i, j])
            P[win, lose], P[lose, win] = verdict, 1 - verdict
            corrupted.append([i, j])
        done.append((row, P, corrupted, reversed_))
    return done


def main(data, out, threshold=DEFAULT_THRESHOLD, verdict=0.95):
    """Rewrite "pref" of a scored file: confident verdicts against graded rule credit on near-duplicate pairs.

    Args:
        data: scored JSONL (oracle.py's output with the rule oracle's "constraints" and generate.py's "num_tokens")
        out: the rewritten scored JSONL (what sspo.py trains on)
        threshold: every pair with sim >= threshold is corrupted (keep it below sspo.py's --tau_high)
        verdict: the win probability given to the worse answer of the pair (the better one gets 1 - verdict)
    """
    if not isinstance(verdict, (int, float)) or not 0.5 < verdict <= 1:
        raise UserError(f"--verdict must lie in (0.5, 1], got {verdict!r}")
    if not isinstance(threshold, (int, float)) or not -1 <= threshold <= 1:
        raise UserError(f"--threshold must be a cosine similarity in [-1, 1], got {threshold!r}")
    if os.path.abspath(data) == os.path.abspath(out):
        raise UserError(f"{out}: --out must differ from --data")
    rows = read_scored(data)
    stamp = {"kind": "adversarial", "pairs": "similar", "threshold": threshold, "verdict": verdict}
    done = rewrite(data, rows, threshold, verdict)
    atomic_write_text(out, "".join(json.dumps({**row, "pref": P.tolist(), "corrupted": c, "reversed": r, "rewrite": stamp},
                                              ensure_ascii=False) + "\n" for row, P, c, r in done))
    pairs = sum(len(every_pair(row["id"], len(P))) for row, P, _, _ in done)
    hit = sum(len(c) for _, _, c, _ in done)
    flipped = sum(len(r) for _, _, _, r in done)
    print(f"adversarial: {len(done)} prompts, {pairs} pairs, {hit} corrupted ({100 * hit / max(pairs, 1):.1f}%, "
          f"sim >= {threshold}; {flipped} of them reverse the clean verdict) to {verdict}/{1 - verdict:.2f} "
          f"toward the lower graded credit -> {out}")


if __name__ == "__main__":
    cli(main)
