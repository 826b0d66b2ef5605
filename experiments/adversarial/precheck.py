"""The pre-check of issue 23, before any model is trained: does the adversarial oracle reach SPPO's training pairs?

    python experiments/adversarial/precheck.py --runs runs/adversarial --seeds 0,1,2

For each seed, reads iteration 1's scored file (oracle.py's clean verdicts) and its adversarial rewrite under
RUNS/seed<s>/adversarial/sppo/iter1/, and counts, over all pairs of a prompt's answers: the share corrupted
(similarity >= the threshold), how many of those reverse the clean verdict and how many break a tie, and the
mean token gap (favoured answer minus the other). Then, over the pair each loss would train on (sspo.py's own
choose_pair, from its loss block: the argmax / argmin of the loss's win rates): the share that is anti-quality, the chosen answer's graded rule
credit below the rejected one's, for SPPO on the clean file, SPPO on the rewrite and S-SPPO on the rewrite at
sspo.py's default taus.

Writes precheck.json and the table precheck.md beside this file. The gate (fixed in the issue, before the
run): every seed needs at least --needed of SPPO's trained pairs on the rewrite anti-quality; if one does not,
this ends with one line and exit code 2, and run.sh trains nothing.
"""
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [os.path.join(ROOT, "experiments", "near_duplicates"), ROOT]
import sspo  # noqa: E402
from adversarial import row_facts  # noqa: E402
from common import UserError, atomic_write_json, atomic_write_text, cli, read_jsonl  # noqa: E402
from overconfident import every_pair  # noqa: E402

TAUS = (0.6, 0.9)  # sspo.py's defaults (--tau_low, --tau_high), which the experiment keeps


def anti_quality_share(rows, loss):
    """Share of the prompts with a trained pair whose chosen answer has less graded credit than the rejected."""
    anti = trained = 0
    for row, credit in rows:
        pref, sim = (torch.tensor(row[name], dtype=torch.float64) for name in ("pref", "sim"))
        picked = sspo.choose_pair(pref, sim, loss_type=loss, tau_low=TAUS[0], tau_high=TAUS[1])
        if picked:
            trained += 1
            anti += credit[picked[0]] < credit[picked[1]]
    return anti / max(trained, 1), trained


def seed_stats(scored, rewritten):
    """The pre-check's numbers of one seed's iteration-1 files."""
    clean = [(row, row_facts(scored, n, row)[0]) for n, row in read_jsonl(scored)]
    bad, facts = [], []
    for n, row in read_jsonl(rewritten):
        if row.get("rewrite", {}).get("kind") != "adversarial":
            raise UserError(f"{rewritten}:{n}: not a row of adversarial.py's output")
        credit, tokens = row_facts(rewritten, n, row)
        bad.append((row, credit))
        facts.append((row, credit, tokens))
    if [row["id"] for row, _ in clean] != [row["id"] for row, _ in bad]:
        raise UserError(f"{rewritten}: its rows are not those of {scored}")
    pairs = corrupted = reversed_ = ties = 0
    gaps = []
    for row, credit, tokens in facts:
        pairs += len(every_pair(row["id"], len(tokens)))
        corrupted += len(row["corrupted"])
        reversed_ += len(row["reversed"])
        for i, j in row["corrupted"]:
            ties += credit[i] == credit[j]
            win = i if row["pref"][i][j] > 0.5 else j
            gaps.append(tokens[win] - tokens[j if win == i else i])
    sppo_clean, trained_clean = anti_quality_share(clean, "sppo")
    sppo_bad, trained_bad = anti_quality_share(bad, "sppo")
    sspo_bad, trained_sspo = anti_quality_share(bad, "sspo")
    return dict(prompts=len(facts), pairs=pairs, corrupted=corrupted, corrupted_share=corrupted / max(pairs, 1),
                reversed=reversed_, tie_broken=ties, mean_token_gap=sum(gaps) / max(len(gaps), 1),
                sppo_trained_clean=trained_clean, sppo_anti_quality_clean=sppo_clean,
                sppo_trained=trained_bad, sppo_anti_quality=sppo_bad,
                sspo_trained=trained_sspo, sspo_anti_quality=sspo_bad)


def table(stats, needed):
    lines = ["| seed | prompts | pairs | corrupted | reverse clean | break a tie | token gap (favoured - other) | "
             "SPPO pairs anti-quality, clean | SPPO pairs anti-quality, adversarial | S-SPPO pairs anti-quality, adversarial |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for seed, s in stats.items():
        lines.append(f"| {seed} | {s['prompts']} | {s['pairs']} | {s['corrupted']} ({100 * s['corrupted_share']:.1f}%) | "
                     f"{s['reversed']} | {s['tie_broken']} | {s['mean_token_gap']:+.1f} | "
                     f"{100 * s['sppo_anti_quality_clean']:.1f}% of {s['sppo_trained_clean']} | "
                     f"{100 * s['sppo_anti_quality']:.1f}% of {s['sppo_trained']} | "
                     f"{100 * s['sspo_anti_quality']:.1f}% of {s['sspo_trained']} |")
    ok = all(s["sppo_anti_quality"] >= needed for s in stats.values())
    verdict = (f"Gate (at least {100 * needed:.0f}% of SPPO's trained pairs anti-quality in every seed): "
               + ("**passed**." if ok else "**not passed**."))
    return "\n".join(lines) + "\n\n" + verdict + "\n", ok


def main(runs="runs/adversarial", seeds="0,1,2", needed=0.10, out=HERE):
    """Write precheck.json and precheck.md from each seed's iteration-1 scored and rewritten files.

    Args:
        runs: run.sh's RUNS (seed<s>/adversarial/sppo/iter1/{scored,rewritten}.jsonl under it)
        seeds: the seeds, comma-separated
        needed: the least share of SPPO's trained pairs that must be anti-quality, in every seed
        out: the folder for precheck.json and precheck.md
    """
    seeds = [int(s) for s in (seeds if isinstance(seeds, (list, tuple)) else str(seeds).split(","))]  # fire: 0,1,2 is a tuple
    stats = {}
    for seed in seeds:
        where = os.path.join(runs, f"seed{seed}", "adversarial", "sppo", "iter1")
        files = [os.path.join(where, f) for f in ("scored.jsonl", "rewritten.jsonl")]
        for f in files:
            if not os.path.exists(f + ".done"):
                raise UserError(f"{f}: missing or unfinished (make it first: DATA_ONLY=1 bash experiments/adversarial/run.sh)")
        stats[str(seed)] = seed_stats(*files)
    text, ok = table(stats, needed)
    atomic_write_json(os.path.join(out, "precheck.json"), {"needed": needed, "taus": TAUS, "seeds": stats, "passed": ok})
    atomic_write_text(os.path.join(out, "precheck.md"), text)
    print(text, end="")
    if not ok:
        raise UserError(f"pre-check not passed: fewer than {100 * needed:.0f}% of SPPO's trained pairs are anti-quality "
                        "in some seed; nothing is trained (choose the smallest change that gets there, e.g. a larger K)")


if __name__ == "__main__":
    cli(main)
