"""results.json, the table in RESULTS.md and plot.png of the near-duplicates experiment, from committed files alone.

    python experiments/near_duplicates/results.py          # run.sh calls it after each finished iteration

Reads, under --folder (this one by default), data/base_heldout.jsonl (the base model's held-out answers) and
for each condition, arm and iteration data/<condition>/<arm>/iter<t>/: heldout.jsonl (that model's held-out
answers), trained_pairs.jsonl (trained_pairs.py), metrics.jsonl and summary.json (sspo.py's, copied). What is
missing is left out, so partial results work. results.json is a list of records, the base model first
(arm "base", condition null, iteration 0), each holding:
- arm, condition, iteration, heldout (path relative to --folder), prompts, k (answers per prompt);
- constraint_score: mean over prompts of the mean binary credit of the prompt's K answers (docs/rule_oracle.md's
  definitions, evaluate.constraint_scores), constraint_ci its 95% bootstrap interval over prompts;
  vs_base, vs_base_ci: the paired difference from the base model (evaluate.constraint_report);
  meets_all: share of answers meeting every constraint;
- win_rate_vs_base, win_rate_se: evaluate.evaluate's win rate (%) against the base model's answers, judged
  by the rule oracle on each prompt's first answer, as scripts/iterate.sh's report.json;
- mean_tokens, hit_limit_share: over all answers (generate.py's num_tokens, finished);
- distinct_2 (evaluate.distinct_n over a prompt's K answers) and self_similarity (mean cosine of a prompt's
  K answers, oracle.py's embedder), each a mean over prompts: low distinct-2 / high self-similarity = collapse;
- from training (null for the base): pairs (trained), near_duplicate_pair_share (trained pairs whose chosen /
  rejected similarity >= near_duplicate_threshold), latent_distance (mean of sspo.py's latent_dist over steps),
  gate_mean (the same for the gate), corrupted_share (pairs of answers the rewrite changed / all pairs) and
  trained_pair_corrupted_share (trained pairs the rewrite changed).
contrasts.json: paired differences over the same held-out prompts, each a record {condition, arm, iteration,
minus_condition, minus_arm, constraint_difference, and the same for mean_tokens, self_similarity and distinct_2
(each X_difference the mean over prompts of the per-prompt difference, X_difference_ci its 95% paired bootstrap
interval over prompts)}: every arm minus sppo under the same
oracle and iteration (does the loss matter?), each ablation (sspo_gate, sspo_rep) minus sspo (what dropping one
half of S-SPPO changes), and every arm under each other oracle minus the same arm under the clean one (does the
oracle's noise matter?). RESULTS.md shows them as a second table.
Wall time: the sum of wall_time.jsonl's lines (run.sh writes one per iterate.sh call).
"""
import glob
import os
import re
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(os.path.dirname(HERE))]
import evaluate  # noqa: E402
import oracle  # noqa: E402
from common import PACKAGED_EMBEDDER, UserError, atomic_write_json, atomic_write_text, cli, read_jsonl  # noqa: E402
from overconfident import DEFAULT_THRESHOLD  # noqa: E402

CONDITIONS = ("clean", "overconfident", "random")  # drawn in this order; others after, by name
ARMS = ("sspo", "sppo", "dpo", "sspo_gate", "sspo_rep")
ABLATIONS = ("sspo_gate", "sspo_rep")  # S-SPPO without repulsion, without gating: also compared with sspo
BEGIN, END = "<!-- results:begin (written by results.py) -->", "<!-- results:end -->"
PAGE = f"""# Near-duplicate pairs: SPPO vs S-SPPO vs DPO, clean and overconfident oracle (issue 13)

Command: `make experiment` (= `bash experiments/near_duplicates/run.sh`; its header lists the settings).
Recompute everything below from the committed files: `python experiments/near_duplicates/results.py`.

{BEGIN}
{END}

## What the numbers say

(written once the numbers exist)
"""


def _order(name, known):
    return (known.index(name), "") if name in known else (len(known), name)


def runs(folder):
    """[(condition, arm, iteration, folder of its files)] with a heldout.jsonl, in drawing order."""
    found = []
    for path in glob.glob(os.path.join(folder, "data", "*", "*", "iter*", "heldout.jsonl")):
        d = os.path.dirname(path)
        condition, arm, it = os.path.relpath(d, os.path.join(folder, "data")).split(os.sep)
        if re.fullmatch(r"iter\d+", it):
            found.append((condition, arm, int(it[4:]), d))
    return sorted(found, key=lambda r: (_order(r[0], CONDITIONS), _order(r[1], ARMS), r[2]))


def per_prompt(rows, embedder):
    """Each prompt's mean answer length, distinct-2 and self-similarity (mean cosine of its K answers)."""
    sims = embedder.sim([row["responses"] for row in rows])
    return {"mean_tokens": [float(np.mean(row["num_tokens"])) if row.get("num_tokens") else None for row in rows],
            "distinct_2": [evaluate.distinct_n(row["responses"], 2) for row in rows],
            "self_similarity": [float(S[~np.eye(len(S), dtype=bool)].mean()) for S in sims]}


def answer_metrics(rows, embedder):
    """Length, token-limit hits and collapse of all K answers of each prompt."""
    tokens = [n for row in rows for n in row.get("num_tokens") or []]
    finished = [f for row in rows for f in row.get("finished") or []]
    each = per_prompt(rows, embedder)
    return {"mean_tokens": float(np.mean(tokens)) if tokens else None,
            "hit_limit_share": float(np.mean([not f for f in finished])) if finished else None,
            "distinct_2": float(np.mean(each["distinct_2"])), "self_similarity": float(np.mean(each["self_similarity"]))}


def training_metrics(d, threshold):
    """The training-side fields of one run from its committed extracts (null where a file is missing; all null for d None)."""
    out = dict.fromkeys(["pairs", "near_duplicate_pair_share", "near_duplicate_threshold", "latent_distance",
                         "gate_mean", "corrupted_share", "trained_pair_corrupted_share"])
    if d is None:
        return out
    path = os.path.join(d, "trained_pairs.jsonl")
    if os.path.exists(path):
        rows = [row for _, row in read_jsonl(path)]
        trained = [row for row in rows if row["chosen"] is not None]
        out.update(pairs=len(trained), near_duplicate_threshold=threshold,
                   near_duplicate_pair_share=float(np.mean([row["similarity"] >= threshold for row in trained])) if trained else None,
                   corrupted_share=sum(len(row["corrupted"]) for row in rows) / max(1, sum(row["pairs"] for row in rows)),
                   trained_pair_corrupted_share=float(np.mean([row["pair_corrupted"] for row in trained])) if trained else None)
    path = os.path.join(d, "metrics.jsonl")
    if os.path.exists(path):
        steps = [row for _, row in read_jsonl(path)]
        for field, name in (("latent_dist", "latent_distance"), ("gate_mean", "gate_mean")):
            values = [row[field] for row in steps if isinstance(row.get(field), (int, float))]
            out[name] = float(np.mean(values)) if values else None
    return out


def records(folder, embedder, threshold, bootstrap):
    base_path = os.path.join(folder, "data", "base_heldout.jsonl")
    if not os.path.exists(base_path):
        raise UserError(f"{base_path}: no such file: nothing to report yet (run.sh copies it after its first iteration)")
    base_rows = [row for _, row in read_jsonl(base_path)]
    side = evaluate.constraint_report(base_rows, base_rows, resamples=bootstrap)["outputs"]
    out = [{"arm": "base", "condition": None, "iteration": 0, "heldout": os.path.relpath(base_path, folder),
            "prompts": len(base_rows), "k": side["responses_per_prompt"],
            "constraint_score": side["score"]["mean"], "constraint_ci": side["score"]["ci"], "vs_base": None,
            "vs_base_ci": None, "meets_all": side["all_met"]["mean"], "win_rate_vs_base": None, "win_rate_se": None,
            **answer_metrics(base_rows, embedder), **training_metrics(None, threshold)}]
    for condition, arm, it, d in runs(folder):
        path = os.path.join(d, "heldout.jsonl")
        report = evaluate.evaluate(path, base_path, oracle="rule", bootstrap=bootstrap)
        c = report.get("constraints")
        if c is None or c["n"] != len(base_rows):
            raise UserError(f"{path}: needs the prompts' constraints and the base model's {len(base_rows)} prompts")
        out.append({"arm": arm, "condition": condition, "iteration": it, "heldout": os.path.relpath(path, folder),
                    "prompts": c["n"], "k": c["outputs"]["responses_per_prompt"],
                    "constraint_score": c["outputs"]["score"]["mean"], "constraint_ci": c["outputs"]["score"]["ci"],
                    "vs_base": c["difference"]["score"]["mean"], "vs_base_ci": c["difference"]["score"]["ci"],
                    "meets_all": c["outputs"]["all_met"]["mean"], "win_rate_vs_base": report["win_rate"],
                    "win_rate_se": report["standard_error"],
                    **answer_metrics([row for _, row in read_jsonl(path)], embedder), **training_metrics(d, threshold)})
    return out


def contrasts(folder, recs, embedder, bootstrap):
    """The paired differences of contrasts.json (see the module docstring), from the records' held-out files."""
    by_key = {(r["condition"], r["arm"], r["iteration"]): r for r in recs[1:]}
    rows = {}

    def heldout(key):  # a file's rows in the base file's prompt order, so the difference pairs prompts
        if key not in rows:
            rows[key] = {row["id"]: row for _, row in read_jsonl(os.path.join(folder, by_key[key]["heldout"]))}
        return rows[key]

    out = []
    for key, minus in [(k, (k[0], "sppo", k[2])) for k in by_key if k[1] != "sppo"] + \
                      [(k, (k[0], "sspo", k[2])) for k in by_key if k[1] in ABLATIONS] + \
                      [(k, ("clean", k[1], k[2])) for k in by_key if k[0] != "clean"]:
        if minus not in by_key:
            continue
        a, b = heldout(key), heldout(minus)
        if set(a) != set(b):
            raise UserError(f"{by_key[key]['heldout']} and {by_key[minus]['heldout']} answer different prompts")
        ids = list(a)  # the file's order (generate.py keeps the prompts')
        d = evaluate.constraint_report([a[i] for i in ids], [b[i] for i in ids], resamples=bootstrap)["difference"]["score"]
        record = {"condition": key[0], "arm": key[1], "iteration": key[2], "minus_condition": minus[0],
                  "minus_arm": minus[1], "constraint_difference": d["mean"], "constraint_difference_ci": d["ci"]}
        ea, eb = per_prompt([a[i] for i in ids], embedder), per_prompt([b[i] for i in ids], embedder)
        for m in ("mean_tokens", "self_similarity", "distinct_2"):
            pairs = [(x, y) for x, y in zip(ea[m], eb[m]) if x is not None and y is not None]
            mean, ci = evaluate.bootstrap_interval([x - y for x, y in pairs], bootstrap) if pairs else (None, None)
            record.update({f"{m}_difference": mean, f"{m}_difference_ci": ci})
        out.append(record)
    return out


def contrast_table(rows):
    def cell(r, m, fmt):
        if r[f"{m}_difference"] is None:
            return "-"
        lo, hi = r[f"{m}_difference_ci"]
        return f"{format(r[f'{m}_difference'], fmt)} [{format(lo, fmt)}, {format(hi, fmt)}]"

    lines = ["| condition | arm | iter | minus | constraint score | tokens | self-sim | distinct-2 |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        minus = r["minus_arm"] if r["minus_condition"] == r["condition"] else f"{r['arm']} under {r['minus_condition']}"
        lines.append(f"| {r['condition']} | {r['arm']} | {r['iteration']} | {minus} | {cell(r, 'constraint', '+.3f')} | "
                     f"{cell(r, 'mean_tokens', '+.1f')} | {cell(r, 'self_similarity', '+.3f')} | {cell(r, 'distinct_2', '+.3f')} |")
    return "\n".join(lines)


def _f(value, fmt):
    return "-" if value is None else format(value, fmt)


def table(recs):
    """The markdown table of all records."""
    lines = ["| condition | arm | iter | constraint score [95% CI] | vs base [paired 95% CI] | meets all | win rate vs base "
             "| tokens | hit limit | distinct-2 | self-sim | near-dup pairs | latent dist | corrupted |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in recs:
        ci = r["constraint_ci"]
        vs = "-" if r["vs_base"] is None else f"{r['vs_base']:+.3f} [{r['vs_base_ci'][0]:+.3f}, {r['vs_base_ci'][1]:+.3f}]"
        win = "-" if r["win_rate_vs_base"] is None else f"{r['win_rate_vs_base']:.1f}" + (
            f" ± {r['win_rate_se']:.1f}" if r["win_rate_se"] is not None else "")
        pct = lambda v: "-" if v is None else f"{100 * v:.1f}%"  # noqa: E731
        lines.append(f"| {r['condition'] or '-'} | {r['arm']} | {r['iteration']} | {r['constraint_score']:.3f} "
                     f"[{ci[0]:.3f}, {ci[1]:.3f}] | {vs} | {pct(r['meets_all'])} | {win} | {_f(r['mean_tokens'], '.1f')} | "
                     f"{pct(r['hit_limit_share'])} | {r['distinct_2']:.3f} | {r['self_similarity']:.3f} | "
                     f"{pct(r['near_duplicate_pair_share'])} | {_f(r['latent_distance'], '.3f')} | {pct(r['corrupted_share'])} |")
    return "\n".join(lines)


def plot(recs, png):
    """Constraint score per iteration with its 95% CI, one line per arm, one panel per condition; the base at 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = recs[0]
    conditions = list(dict.fromkeys(r["condition"] for r in recs[1:])) or ["(none yet)"]
    arms = list(dict.fromkeys(r["arm"] for r in recs[1:]))
    fig, axes = plt.subplots(1, len(conditions), figsize=(5 * len(conditions), 4), sharey=True, squeeze=False)
    for ax, condition in zip(axes[0], conditions):
        for a, arm in enumerate(arms):
            points = [base] + sorted((r for r in recs[1:] if (r["condition"], r["arm"]) == (condition, arm)),
                                     key=lambda r: r["iteration"])
            if len(points) == 1:
                continue
            x = np.array([r["iteration"] for r in points]) + 0.06 * (a - (len(arms) - 1) / 2)  # bars side by side
            y = np.array([r["constraint_score"] for r in points])
            ci = np.array([r["constraint_ci"] for r in points])
            ax.errorbar(x, y, yerr=[y - ci[:, 0], ci[:, 1] - y], marker="o", ms=4, capsize=3, color=f"C{a}", label=arm)
        ax.axhline(base["constraint_score"], color="grey", lw=0.8, ls=":")
    finish_panels(fig, axes, conditions, recs, png, "held-out constraint score (binary, 95% CI)", legend_size=8)


def finish_panels(fig, axes, conditions, recs, png, ylabel, legend_size):
    """Title, axes and legend of each condition's panel (iterations on x, the base model at 0); save to png."""
    import matplotlib.pyplot as plt

    for ax, condition in zip(axes[0], conditions):
        ax.set_title(f"oracle: {condition}", fontsize=10)
        ax.set_xlabel("iteration (0: base model)")
        ax.set_xticks(range(0, 1 + max([r["iteration"] for r in recs], default=0)))
        ax.legend(fontsize=legend_size)
    axes[0, 0].set_ylabel(ylabel)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def wall_time(folder):
    path = os.path.join(folder, "wall_time.jsonl")
    calls = [row for _, row in read_jsonl(path)] if os.path.exists(path) else []
    seconds = sum(row["seconds"] for row in calls)
    return f"{seconds // 3600:.0f} h {seconds % 3600 / 60:.0f} min over {len(calls)} iterate.sh calls (wall_time.jsonl)"


def write_page(path, block):
    """Put `block` between the markers of the page at `path` (made from PAGE if absent); the rest stays."""
    page = open(path, encoding="utf-8").read() if os.path.exists(path) else PAGE
    if BEGIN not in page or END not in page.split(BEGIN, 1)[1]:
        raise UserError(f"{path}: the markers {BEGIN!r} ... {END!r} are missing: put them back where the table goes")
    head, rest = page.split(BEGIN, 1)
    atomic_write_text(path, head + BEGIN + "\n" + block + "\n" + END + rest.split(END, 1)[1])


def main(folder=HERE, embedder=PACKAGED_EMBEDDER, threshold=DEFAULT_THRESHOLD, bootstrap=10000):
    """Recompute results.json, contrasts.json, the tables in RESULTS.md and plot.png from the committed files under --folder.

    Args:
        folder: the experiment's folder (holds data/, RESULTS.md; gets results.json, plot.png)
        embedder: sentence encoder of the self-similarity (oracle.py's; default the packaged all-MiniLM-L6-v2)
        threshold: similarity at and above which a trained pair counts as near-duplicate (overconfident.py's default)
        bootstrap: resamples of each bootstrap interval (seed 0, as evaluate.py)
    """
    embedder = oracle.Embedder(embedder)
    recs = records(folder, embedder, threshold, bootstrap)
    atomic_write_json(os.path.join(folder, "results.json"), recs)
    paired = contrasts(folder, recs, embedder, bootstrap)
    atomic_write_json(os.path.join(folder, "contrasts.json"), paired)
    plot(recs, os.path.join(folder, "plot.png"))
    block = (f"Held-out: {recs[0]['prompts']} prompts x {recs[0]['k']:g} answers, the same for every model. "
             f"Wall time so far: {wall_time(folder)}.\n\n![constraint score per iteration](plot.png)\n\n{table(recs)}\n\n"
             f"Paired differences over the same held-out prompts (contrasts.json): each arm minus SPPO under the same oracle, "
             f"each ablation minus S-SPPO, and each arm under the overconfident oracle minus itself under the clean one; "
             f"every cell a mean difference over prompts with its paired 95% bootstrap interval.\n\n{contrast_table(paired)}")
    write_page(os.path.join(folder, "RESULTS.md"), block)
    print(f"results: {len(recs)} records ({len(recs) - 1} trained models), {len(paired)} contrasts -> "
          f"{os.path.join(folder, 'results.json')}, contrasts.json, RESULTS.md, plot.png")


if __name__ == "__main__":
    cli(main)
