"""results.json, endpoints.json, the tables in RESULTS.md and plot.png of issue 23's experiment, from committed files.

    python experiments/adversarial/results.py                    # run.sh calls it after each arm and condition
    python experiments/adversarial/results.py --plan 0,1,2       # the plan of what is left, one line

Reads each seed's folder seed<s>/ (near_duplicates/run.sh's DEST: data/base_heldout.jsonl, data/<condition>/
<arm>/iter<t>/{heldout.jsonl, trained_pairs.jsonl, metrics.jsonl, summary.json}, wall_time.jsonl) with
near_duplicates/results.py's `records` (the same fields, its docstring lists them) and adds "seed". What is
missing is left out, so partial results work.

The two endpoints, fixed in RESULTS.md's "Pre-registered" section before the first adversarial model trained:
at iteration ITERATION, M = SPPO under adversarial minus SPPO under clean and P = S-SPPO minus SPPO, both under
adversarial. Each is the mean over seeds of the mean over the held-out prompts of the paired per-prompt
difference of the constraint score (binary credit, the mean over a prompt's answers), with a hierarchical
bootstrap (seeds resampled, then prompts within each drawn seed; BOOTSTRAP draws, seeded BOOTSTRAP_SEED), a
two-sided bootstrap p, Holm's correction over the two, and `decide`'s verdict. endpoints.json holds them, and
beside them EXPLORATORY's contrasts (not pre-registered, uncorrected intervals; no decision rests on them).
"""
import glob
import importlib.util
import os
import re
import statistics
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)
import evaluate  # noqa: E402
import oracle  # noqa: E402
from common import PACKAGED_EMBEDDER, UserError, atomic_write_json, cli, read_jsonl  # noqa: E402


def _near_duplicates(name):  # the first experiment's module, by path (both folders have a results.py)
    spec = importlib.util.spec_from_file_location(f"near_duplicates_{name}", os.path.join(ROOT, "experiments", "near_duplicates", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


nd = _near_duplicates("results")

# Fixed before the run (RESULTS.md, "Pre-registered"): change none of these after seeing a result.
ITERATION = 3
SEEDS = (0, 1, 2)  # the verdict waits for all three; before that only interim per-seed estimates are shown
EFFECT = 0.05  # the least |M| and P that count
ALPHA = 0.05  # family-wise, Holm over the two endpoints
BOOTSTRAP, BOOTSTRAP_SEED = 10000, 23
ENDPOINTS = {"M": (("adversarial", "sppo"), ("clean", "sppo")), "P": (("adversarial", "sspo"), ("adversarial", "sppo"))}
CONDITIONS, ARMS = ("clean", "adversarial"), ("sppo", "sspo", "sspo_gate")
# Not pre-registered: chosen after the endpoints were known, to read them (is S-SPPO's level under the clean oracle
# what P misses? does the adversarial oracle move S-SPPO at all? what does gating alone do?). The same bootstrap,
# uncorrected 95% intervals; no decision rests on them.
EXPLORATORY = {"S-SPPO - SPPO, clean": (("clean", "sspo"), ("clean", "sppo")),
               "S-SPPO adversarial - S-SPPO clean": (("adversarial", "sspo"), ("clean", "sspo")),
               "gating alone - SPPO, adversarial": (("adversarial", "sspo_gate"), ("adversarial", "sppo")),
               "gating alone - S-SPPO, adversarial": (("adversarial", "sspo_gate"), ("adversarial", "sspo"))}
TIMED_FROM = os.path.join(ROOT, "experiments", "near_duplicates", "wall_time.jsonl")  # before this experiment's own
HELDOUT_EXTRA_S = 144  # per call, over TIMED_FROM's: 112 more held-out prompts x 4 at its 1.3 min per 60 x 4


def seed_folders(folder):
    """{seed: its folder} of the seeds with results, in seed order."""
    found = {}
    for d in glob.glob(os.path.join(folder, "seed*")):
        m = re.fullmatch(r"seed(\d+)", os.path.basename(d))
        if m and os.path.exists(os.path.join(d, "data", "base_heldout.jsonl")):
            found[int(m.group(1))] = d
    return dict(sorted(found.items()))


def scores(folder, rec):
    """{prompt id: constraint score} of a record's held-out answers."""
    rows = [row for _, row in read_jsonl(os.path.join(folder, rec["heldout"]))]
    return dict(zip([row["id"] for row in rows], evaluate.constraint_scores(rows)["score"]))


def hierarchical_bootstrap(diffs, draws=BOOTSTRAP, seed=BOOTSTRAP_SEED):
    """Bootstrap means of a (seeds x prompts) array of paired differences: seeds drawn, then prompts in each."""
    rng = np.random.default_rng(seed)
    s, n = diffs.shape
    out = np.empty(draws)
    for start in range(0, draws, 1000):
        b = min(1000, draws - start)
        which = rng.integers(0, s, size=(b, s))
        prompts = rng.integers(0, n, size=(b, s, n))
        out[start:start + b] = diffs[which[..., None], prompts].mean(axis=(1, 2))
    return out


def endpoint(folder, seeds, recs, a, b):
    """One endpoint: per-seed estimates, the mean over seeds, its bootstrap draws and two-sided p (None if a seed lacks it)."""
    by = {(r["seed"], r["condition"], r["arm"], r["iteration"]): r for r in recs}
    rows = []
    for seed in seeds:
        ra, rb = by.get((seed, *a, ITERATION)), by.get((seed, *b, ITERATION))
        if ra is None or rb is None:
            return None
        sa, sb = scores(folder, ra), scores(folder, rb)
        if set(sa) != set(sb):
            raise UserError(f"seed {seed}: {ra['heldout']} and {rb['heldout']} answer different prompts")
        rows.append([sa[i] - sb[i] for i in sorted(sa)])
    diffs = np.array(rows)
    draws = hierarchical_bootstrap(diffs)
    p = min(1.0, 2 * min(float(np.mean(draws <= 0)), float(np.mean(draws >= 0))))
    return {"per_seed": dict(zip(seeds, map(float, diffs.mean(axis=1)))), "mean": float(diffs.mean()),
            "draws": draws, "p": p, "prompts": diffs.shape[1]}


def holm(found):
    """Holm's step-down over the endpoints: adjusted p and an interval at the level each step tests."""
    order = sorted(found, key=lambda k: found[k]["p"])
    adjusted = 0.0
    for step, name in enumerate(order):
        e, level = found[name], ALPHA / (len(order) - step)
        adjusted = max(adjusted, min(1.0, e["p"] * (len(order) - step)))
        e["p_holm"], e["level"] = adjusted, 1 - level
        e["ci"] = [float(v) for v in np.percentile(e["draws"], [100 * level / 2, 100 * (1 - level / 2)])]


def decide(M, P):
    """The verdict fixed in advance (RESULTS.md, "Pre-registered")."""
    m_holds = M["mean"] <= -EFFECT and M["ci"][1] < 0 and M["p_holm"] < ALPHA and all(v < 0 for v in M["per_seed"].values())
    if not m_holds:
        return "uninformative: M does not hold (the premise does not reproduce at this scale)"
    if P["mean"] >= EFFECT and P["ci"][0] > 0 and P["p_holm"] < ALPHA and all(v > 0 for v in P["per_seed"].values()):
        return "confirmed: the adversarial oracle hurts SPPO and S-SPPO's calibration protects against it"
    if P["ci"][1] < abs(M["mean"]) / 2:
        return "refuted: the adversarial oracle hurts SPPO and S-SPPO recovers less than half of it"
    return "undecided: M holds, P is neither confirmed nor refuted"


def endpoints(folder, seeds, recs):
    """The endpoints and the verdict once every pre-registered seed has them; before that, "complete" false and
    each endpoint's per-seed estimates so far ("interim"), with no interval, p or verdict."""
    found = {name: endpoint(folder, seeds, recs, a, b) for name, (a, b) in ENDPOINTS.items()}
    if any(e is None for e in found.values()):
        return {"complete": False, "seeds": seeds, "verdict": None}
    if tuple(seeds) != SEEDS:
        return {"complete": False, "seeds": seeds, "verdict": None,
                "interim": {name: e["per_seed"] for name, e in found.items()}}
    holm(found)
    for e in found.values():
        del e["draws"]
    return {"complete": True, "seeds": seeds, "iteration": ITERATION, **found, "verdict": decide(found["M"], found["P"]),
            "exploratory": exploratory(folder, seeds, recs)}


def exploratory(folder, seeds, recs):
    """EXPLORATORY's contrasts that every seed has, each with an uncorrected 95% percentile interval."""
    found = {}
    for name, (a, b) in EXPLORATORY.items():
        e = endpoint(folder, seeds, recs, a, b)
        if e is not None:
            e["ci95"] = [float(v) for v in np.percentile(e.pop("draws"), [2.5, 97.5])]
            found[name] = e
    return found


def endpoint_text(result):
    if not result["complete"]:
        interim = "".join(f"; {name} so far, per seed: " + ", ".join(f"{s}: {v:+.3f}" for s, v in per_seed.items())
                          for name, per_seed in result.get("interim", {}).items())
        return (f"Endpoints: not yet (the verdict needs SPPO and S-SPPO at iteration {ITERATION} under both oracles in "
                f"seeds {', '.join(map(str, SEEDS))}; seeds with results: {', '.join(map(str, result['seeds'])) or 'none'}"
                f"{interim}; interim numbers decide nothing).")
    lines = ["| endpoint | estimate | Holm interval | p (bootstrap) | p (Holm) | per seed |", "|---|---|---|---|---|---|"]
    for name, what in (("M", "SPPO adversarial - SPPO clean"), ("P", "S-SPPO - SPPO, adversarial")):
        e = result[name]
        seeds = ", ".join(f"{s}: {v:+.3f}" for s, v in e["per_seed"].items())
        lines.append(f"| {name} = {what} | {e['mean']:+.3f} | {100 * e['level']:.1f}% [{e['ci'][0]:+.3f}, {e['ci'][1]:+.3f}] | "
                     f"{e['p']:.4f} | {e['p_holm']:.4f} | {seeds} |")
    text = (f"Endpoints at iteration {ITERATION}, seeds {', '.join(map(str, result['seeds']))}, "
            f"{result['M']['prompts']} held-out prompts (endpoints.json):\n\n" + "\n".join(lines)
            + f"\n\n**Verdict (the rule fixed in advance): {result['verdict']}.**")
    if result.get("exploratory"):
        rows = ["| contrast | estimate | 95% interval (uncorrected) | p (bootstrap) | per seed |", "|---|---|---|---|---|"]
        for name, e in result["exploratory"].items():
            seeds = ", ".join(f"{s}: {v:+.3f}" for s, v in e["per_seed"].items())
            rows.append(f"| {name} | {e['mean']:+.3f} | [{e['ci95'][0]:+.3f}, {e['ci95'][1]:+.3f}] | {e['p']:.4f} | {seeds} |")
        text += ("\n\nExploratory contrasts at the same iteration, NOT pre-registered (chosen after the endpoints were "
                 "known, to read them; the same hierarchical bootstrap, no correction; no decision rests on them):\n\n"
                 + "\n".join(rows))
    return text


def table(recs):
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    lines = ["| seed | condition | arm | iter | constraint score [95% CI] | vs base [paired 95% CI] | tokens | hit limit | "
             "self-sim | trained pairs corrupted | pairs corrupted |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in recs:
        ci = r["constraint_ci"]
        vs = "-" if r["vs_base"] is None else f"{r['vs_base']:+.3f} [{r['vs_base_ci'][0]:+.3f}, {r['vs_base_ci'][1]:+.3f}]"
        lines.append(f"| {r['seed']} | {r['condition'] or '-'} | {r['arm']} | {r['iteration']} | {r['constraint_score']:.3f} "
                     f"[{ci[0]:.3f}, {ci[1]:.3f}] | {vs} | {nd._f(r['mean_tokens'], '.1f')} | {pct(r['hit_limit_share'])} | "
                     f"{r['self_similarity']:.3f} | {pct(r['trained_pair_corrupted_share'])} | {pct(r['corrupted_share'])} |")
    return "\n".join(lines)


def plot(recs, png):
    """Constraint score per iteration, one line per arm and seed, one panel per condition; each seed's base at 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conditions = [c for c in CONDITIONS if any(r["condition"] == c for r in recs)] or ["(none yet)"]
    seeds = sorted({r["seed"] for r in recs})
    fig, axes = plt.subplots(1, len(conditions), figsize=(5.5 * len(conditions), 4), sharey=True, squeeze=False)
    for ax, condition in zip(axes[0], conditions):
        for a, arm in enumerate(ARMS):
            for s, seed in enumerate(seeds):
                points = sorted((r for r in recs if r["seed"] == seed and (r["arm"] == "base" or
                                 (r["condition"], r["arm"]) == (condition, arm))), key=lambda r: r["iteration"])
                if len(points) > 1:
                    ax.plot([r["iteration"] for r in points], [r["constraint_score"] for r in points], marker="o", ms=3,
                            color=f"C{a}", ls=("-", "--", ":", "-.")[s % 4], label=f"{arm}, seed {seed}")
    nd.finish_panels(fig, axes, conditions, recs, png, "held-out constraint score (binary credit)", legend_size=7)


def wall_calls(folder_of):
    """The lines of every seed's wall_time.jsonl (one per iterate.sh call)."""
    calls = [row for d in folder_of.values() if os.path.exists(os.path.join(d, "wall_time.jsonl"))
             for _, row in read_jsonl(os.path.join(d, "wall_time.jsonl"))]
    return calls


def plan(folder, seeds, gate):
    """One line: the iterate.sh calls of the whole run, those left, and the time left at the median measured call."""
    seeds = [int(s) for s in (seeds if isinstance(seeds, (list, tuple)) else str(seeds).split(","))]
    cells = [(s, c, a) for s in seeds for a in ("sppo", "sspo") for c in ("adversarial", "clean")]
    cells += [(s, "adversarial", "sspo_gate") for s in seeds] if gate else []
    calls = [(s, c, a, t) for s, c, a in cells for t in range(1, ITERATION + 1)]
    left = [k for k in calls if not os.path.exists(os.path.join(folder, f"seed{k[0]}", "data", k[1], k[2], f"iter{k[3]}", "summary.json"))]
    own = [row["seconds"] for row in wall_calls({s: os.path.join(folder, f"seed{s}") for s in seeds}) if not row["stopped"]]
    if len(own) >= 3:
        median, source = statistics.median(own), f"the median of this run's {len(own)} calls"
    else:
        first = [row["seconds"] for _, row in read_jsonl(TIMED_FROM) if not row["stopped"]]
        median = statistics.median(first) + HELDOUT_EXTRA_S
        source = f"the median of {len(first)} calls of experiments/near_duplicates + {HELDOUT_EXTRA_S} s for 172 held-out prompts"
    total = median * len(left)
    print(f"== plan: {len(seeds)} seeds x {len(cells) // len(seeds)} arms and conditions x {ITERATION} iterations = "
          f"{len(calls)} iterate.sh calls, {len(left)} left: about {total // 3600:.0f} h {total % 3600 / 60:.0f} min "
          f"at {median / 60:.1f} min a call ({source}), in parts: each finished arm, condition and seed is committed")


def main(folder=HERE, embedder=PACKAGED_EMBEDDER, threshold=nd.DEFAULT_THRESHOLD, bootstrap=10000, plan_seeds=None, gate=0):
    """Recompute results.json, endpoints.json, RESULTS.md's results block and plot.png from the committed files.

    Args:
        folder: the experiment's folder (holds seed<s>/ and RESULTS.md)
        embedder: sentence encoder of the self-similarity (default the packaged all-MiniLM-L6-v2)
        threshold: similarity at and above which a trained pair counts as near-duplicate
        bootstrap: resamples of each per-record interval (seed 0, as evaluate.py)
        plan_seeds: print the plan for these seeds (comma-separated) and nothing else
        gate: with plan_seeds: 1 when gating alone (sspo_gate) is planned too
    """
    if plan_seeds is not None:
        return plan(folder, plan_seeds, gate)
    folder_of = seed_folders(folder)
    if not folder_of:
        raise UserError(f"{folder}: no seed<s>/data/base_heldout.jsonl yet: nothing to report")
    embedder = oracle.Embedder(embedder)
    recs = [{"seed": seed, **r} for seed, d in folder_of.items() for r in nd.records(d, embedder, threshold, bootstrap)]
    for r in recs:
        r["heldout"] = os.path.join(f"seed{r['seed']}", r["heldout"])
    atomic_write_json(os.path.join(folder, "results.json"), recs)
    result = endpoints(folder, list(folder_of), recs)
    atomic_write_json(os.path.join(folder, "endpoints.json"), result)
    plot(recs, os.path.join(folder, "plot.png"))
    calls = wall_calls(folder_of)
    seconds = sum(row["seconds"] for row in calls)
    block = (f"Held-out: {recs[0]['prompts']} prompts x {recs[0]['k']:g} answers, the same prompts for every model. "
             f"Wall time so far: {seconds // 3600:.0f} h {seconds % 3600 / 60:.0f} min over {len(calls)} iterate.sh calls "
             f"(seed*/wall_time.jsonl).\n\n{endpoint_text(result)}\n\n![constraint score per iteration](plot.png)\n\n"
             f"{table(recs)}")
    nd.write_page(os.path.join(folder, "RESULTS.md"), block)
    print(f"results: {len(recs)} records over seeds {', '.join(map(str, folder_of))}; endpoints "
          f"{'complete: ' + result['verdict'] if result['complete'] else 'not yet'} -> {folder}/results.json, endpoints.json, "
          "RESULTS.md, plot.png")


if __name__ == "__main__":
    cli(main)
