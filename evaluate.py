"""Win rate and length-controlled win rate of a model's outputs against reference outputs.

The numbers are AlpacaEval 2.0's, computed with a local judge (any oracle.py backend):

    python evaluate.py --outputs runs/iterate/iter1/heldout.jsonl --references runs/iterate/base_heldout.jsonl \\
        --oracle pairrm --out runs/iterate/iter1/report.json
    python evaluate.py --plot "runs/iterate/iter*/report.json" --plot_out runs/iterate/plot.png
    python evaluate.py --curves "runs/iterate/iter*/model/metrics.jsonl" --plot_out runs/iterate/training.png

Both files are responses files as generate.py writes them (docs/method.md §5); rows are matched by id and
the first response of each is compared. The report holds `win_rate_report(...)` (below), mean lengths, how
many outputs hit the token limit, and distinct-1/2 diversity. `--plot` draws win rate and LC win rate
per iteration from several reports; `--curves` draws sspo.py's training curves (metrics.jsonl).
"""
import glob
import math
import os
import re
import sys
import warnings

import numpy as np

from common import UserError, atomic_write_json, cli, field_error, read_json, read_jsonl, read_rows

C_GRID = np.logspace(-4, 4, 10)  # AlpacaEval's LogisticRegressionCV grid (sklearn's default Cs=10)
N_FOLDS = 5


# ------------------------------------------------------------------------------- the metrics

def win_rate_report(preference, output_len, reference_len, difficulty=None):
    """AlpacaEval 2.0's win rates of outputs against references, all rates in percent.

    preference: n values P(output beats reference) in [0, 1]; output_len, reference_len: n lengths
    (characters); difficulty: optional n per-prompt instruction difficulties.
    Returns {"win_rate", "standard_error", "discrete_win_rate", "lc_win_rate", "n"}:
    - win_rate = 100 mean(p); standard_error = 100 std(p, ddof=1) / sqrt(n) (None for n < 2);
    - discrete_win_rate: p > 1/2 counts 1, p = 1/2 counts 1/2, p < 1/2 counts 0;
    - lc_win_rate: the predicted win rate at equal length of AlpacaEval's length-controlled GLM,
      `length_controlled_minimal` (or `length_controlled_noreg` when difficulty is given); see
      `lc_win_rate`. None for n < 2.
    """
    p = _vector(preference, "preference")
    n = len(p)
    lengths = [_vector(x, name) for x, name in ((output_len, "output_len"), (reference_len, "reference_len"))]
    if difficulty is not None:
        difficulty = _vector(difficulty, "difficulty")
    for x, name in zip(lengths + [difficulty], ("output_len", "reference_len", "difficulty")):
        if x is not None and len(x) != n:
            raise UserError(f"win_rate_report: {name} has {len(x)} values, preference has {n}")
    if n == 0:
        raise UserError("win_rate_report: no preferences to rate")
    if ((p < 0) | (p > 1)).any():
        raise UserError("win_rate_report: preference must lie in [0, 1]")
    return {
        "win_rate": float(100 * p.mean()),
        "standard_error": float(100 * p.std(ddof=1) / math.sqrt(n)) if n > 1 else None,
        "discrete_win_rate": float(100 * np.where(p == 0.5, 0.5, p > 0.5).mean()),
        "lc_win_rate": float(lc_win_rate(p, lengths[1] - lengths[0], difficulty)) if n > 1 else None,
        "n": n,
    }


def lc_win_rate(p, delta_len, difficulty=None):
    """Length-controlled win rate (Dubois et al. 2024, arXiv 2404.04475), in percent: see length_controlled_glm."""
    return length_controlled_glm(p, delta_len, difficulty)["lc_win_rate"]


def length_controlled_glm(p, delta_len, difficulty=None):
    """AlpacaEval's length-controlled GLM: {"lc_win_rate", "C", "weights" [length, model(, difficulty)]}.

    A logistic GLM predicts p from tanh(d / sd(d)) (d = reference_len - output_len, not centred,
    sd with ddof=1), a constant 1 (the model term) and optionally the difficulty. Soft labels: each
    row enters twice, as label 1 weighted p and as label 0 weighted 1 - p. L1 penalty, no intercept;
    C from C_GRID by N_FOLDS-fold cross-validation on held-out log-likelihood (the smallest C wins
    ties), then a refit on all rows. The rate is 100 x the mean prediction at d = 0, which without
    difficulty is 100 sigmoid(weight of the model term).
    With few or noisy rows (tens of prompts) cross-validation often picks a C at which L1 zeroes every
    weight, and the rate is exactly 50: that is AlpacaEval's estimator saying it cannot tell.
    """
    from sklearn.model_selection import KFold

    p, delta_len = np.asarray(p, dtype=float), np.asarray(delta_len, dtype=float)
    sd = delta_len.std(ddof=1)
    # All differences equal (sd 0): length cannot be told apart from the model term, so it is left out.
    length = np.tanh(delta_len / sd) if sd > 0 else np.zeros_like(delta_len)
    X = np.column_stack([length, np.ones_like(p)] + ([difficulty] if difficulty is not None else []))
    # Shuffled folds with a fixed seed: input files are often sorted by id or topic.
    folds = list(KFold(min(N_FOLDS, len(p)), shuffle=True, random_state=0).split(X))
    scores = [np.mean([-_cross_entropy(p[test], _fit_glm(X[train], p[train], C).predict_proba(X[test])[:, 1])
                       for train, test in folds]) for C in C_GRID]
    # A strong penalty zeroes every weight and gives identical scores for several C: take the smallest.
    best = float(C_GRID[np.flatnonzero(np.array(scores) >= max(scores) - 1e-12)[0]])
    model = _fit_glm(X, p, best)
    X_equal_length = X.copy()
    X_equal_length[:, 0] = 0.0
    return {"lc_win_rate": float(100 * model.predict_proba(X_equal_length)[:, 1].mean()), "C": best,
            "weights": [float(w) for w in model.coef_[0]]}


def _fit_glm(X, p, C):
    """L1 logistic regression without intercept on soft labels p (each row twice, weights p and 1-p)."""
    from sklearn.linear_model import LogisticRegression

    from sklearn.exceptions import ConvergenceWarning

    model = LogisticRegression(C=C, l1_ratio=1.0, solver="liblinear", fit_intercept=False, random_state=123,
                               max_iter=1000)
    # liblinear drops rows of weight 0 and fails when a label is left with none (all p = 1, say): a
    # weight of 1e-12 keeps both labels and moves the fit by nothing measurable.
    weight = np.maximum(np.r_[p, 1 - p], 1e-12)
    with warnings.catch_warnings():
        # Unanimous p (all wins) puts the optimum at an infinite weight; the fit stops close enough.
        warnings.simplefilter("ignore", ConvergenceWarning)
        return model.fit(np.vstack([X, X]), np.r_[np.ones(len(p)), np.zeros(len(p))], sample_weight=weight)


def _cross_entropy(p, q):
    q = np.clip(q, 1e-15, 1 - 1e-15)
    return -np.mean(p * np.log(q) + (1 - p) * np.log(1 - q))


def _vector(values, name, where="win_rate_report"):
    try:
        x = np.asarray(values, dtype=float).reshape(-1)
    except (TypeError, ValueError):
        raise UserError(f"{where}: {name} must be a sequence of numbers") from None
    if not np.isfinite(x).all():
        raise UserError(f"{where}: {name} holds a NaN or an infinite value")
    return x


def distinct_n(texts, n):
    """Distinct-n (Li et al. 2016): unique word n-grams / all word n-grams over all texts (lowercased)."""
    grams = [tuple(words[i:i + n]) for words in (t.lower().split() for t in texts) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def bootstrap_interval(values, resamples=10000, seed=0, level=0.95):
    """(mean, [low, high]): the mean of `values` and its percentile bootstrap interval, resampling rows.

    Given per-prompt differences (outputs - references) it is the paired bootstrap: a prompt's two
    scores are resampled together, so what the prompts share cancels. Seeded: the same input gives
    the same interval. A constant vector gives that constant as both ends.
    """
    x = _vector(values, "values", "bootstrap_interval")
    if len(x) == 0:
        raise UserError("bootstrap_interval: no values")
    rng, means, block = np.random.default_rng(seed), [], max(1, 2 ** 22 // len(x))  # bounded memory for long files
    for start in range(0, resamples, block):
        means.append(x[rng.integers(0, len(x), size=(min(block, resamples - start), len(x)))].mean(1))
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(np.concatenate(means), [tail, 100 - tail])
    # a resampled mean of a constant can differ from it in the last bit: clip to the observed range
    return float(x.mean()), [float(max(low, x.min())), float(min(high, x.max()))]


def constraint_scores(rows):
    """Per-prompt constraint metrics over ALL of a row's responses (each a mean over the K responses).

    Returns {"score": [per prompt, binary credit: the fraction of constraints met, docs/rule_oracle.md],
    "graded": [the same with the rule oracle's graded credit], "all_met": [share of responses meeting
    every constraint], "by_type": {type: [per (prompt, constraint) share of responses meeting it]}}.
    """
    from oracle import constraint_score, meets  # by name: in this file `oracle` is the --oracle flag, the judge

    out = {"score": [], "graded": [], "all_met": [], "by_type": {}}
    for row in rows:
        ys, cs = row["responses"], row["constraints"]
        binary = [constraint_score(y, cs, "binary") for y in ys]
        out["score"].append(float(np.mean(binary)))
        out["graded"].append(float(np.mean([constraint_score(y, cs, "graded") for y in ys])))
        out["all_met"].append(float(np.mean([s == 1.0 for s in binary])))
        for c in cs:
            met = [bool(y.strip()) and meets(y, c) for y in ys]
            out["by_type"].setdefault(c["type"], []).append(float(np.mean(met)))
    return out


def constraint_report(out_rows, ref_rows, resamples=10000, seed=0):
    """The report's "constraints" section: outputs and references on the same prompts, and their difference."""
    outs, refs = constraint_scores(out_rows), constraint_scores(ref_rows)

    def interval(values):
        mean, ci = bootstrap_interval(values, resamples, seed)
        return {"mean": mean, "ci": ci}

    def side(scores, rows):
        return {"score": interval(scores["score"]), "all_met": interval(scores["all_met"]),
                "graded_score": float(np.mean(scores["graded"])),
                "responses_per_prompt": float(np.mean([len(r["responses"]) for r in rows])),
                "by_type": {t: {"met": float(np.mean(v)), "n": len(v)} for t, v in sorted(scores["by_type"].items())}}

    return {
        "n": len(out_rows),
        "how": "binary credit (docs/rule_oracle.md); a prompt's score is the mean over ALL its responses (the win rate "
               f"judges the first only); 95% percentile bootstrap over prompts ({resamples} resamples, seed {seed}), "
               "paired for the difference outputs - references",
        "outputs": side(outs, out_rows),
        "references": side(refs, ref_rows),
        "difference": {"score": interval(np.subtract(outs["score"], refs["score"])),
                       "all_met": interval(np.subtract(outs["all_met"], refs["all_met"]))},
    }


# ------------------------------------------------------------------------------------ the files

def _responses_by_id(path):
    """{id: (line, row)} of a responses file (common.read_rows), at least one row, one response a row."""
    rows = {row["id"]: (n, row) for n, row in read_rows(path, min_responses=1)}
    if not rows:
        raise UserError(f"{path}: no rows")
    return rows


def _first_response_stats(rows):
    """Mean characters, mean tokens and token-limit hits of the first responses (None where not recorded)."""
    firsts = [row["responses"][0] for row in rows]
    tokens = [_first(row, "num_tokens") for row in rows]
    finished = [_first(row, "finished") for row in rows]
    return {
        "mean_length_chars": float(np.mean([len(r) for r in firsts])),
        "mean_length_tokens": float(np.mean(tokens)) if None not in tokens else None,
        "hit_token_limit": sum(f is False for f in finished) if None not in finished else None,
        "distinct_1": distinct_n(firsts, 1),
        "distinct_2": distinct_n(firsts, 2),
    }


def _first(row, field):
    """The first response's value of a per-response field generate.py records, or None."""
    values = row.get(field)
    return values[0] if isinstance(values, list) and values else None


def _load_oracle(kind, oracle_model, batch_size):
    """An oracle.py backend: the same classes oracle.py scores training data with."""
    from oracle import load_backend

    backend_class, model = load_backend(kind, oracle_model, batch_size)
    return backend_class(model, batch_size=batch_size), model


def evaluate(outputs, references, oracle="pairrm", oracle_model=None, batch_size=32, difficulty_field=None,
             bootstrap=10000, seed=0):
    """The report dict of `outputs` judged against `references` (see main)."""
    from tqdm import tqdm

    out_rows, ref_rows = _responses_by_id(outputs), _responses_by_id(references)
    ids = list(out_rows)
    for i in ids:
        line, row = out_rows[i]
        if i not in ref_rows:
            raise field_error(outputs, line, "id", f"id {i!r} has no row in {references}")
        if ref_rows[i][1]["prompt"] != row["prompt"]:
            raise field_error(outputs, line, "prompt", f"differs from the prompt of id {i!r} in {references} "
                              f"(line {ref_rows[i][0]}): are these outputs for the same prompts?")
    if len(ref_rows) > len(ids):
        print(f"warning: {len(ref_rows) - len(ids)} references have no output; rating the {len(ids)} that do",
              file=sys.stderr)
    difficulty = None
    if difficulty_field:
        difficulty = []
        for i in ids:
            line, row = out_rows[i]
            if not isinstance(row.get(difficulty_field), (int, float)) or isinstance(row.get(difficulty_field), bool):
                raise field_error(outputs, line, difficulty_field, "must be a number (the instruction difficulty)")
            difficulty.append(row[difficulty_field])

    judge, judge_model = _load_oracle(oracle, oracle_model, batch_size)
    # The row keeps the prompt's other fields (e.g. "constraints" for the rule oracle).
    pairs = [{k: v for k, v in out_rows[i][1].items() if k not in ("responses", "generator")}
             | {"responses": [out_rows[i][1]["responses"][0], ref_rows[i][1]["responses"][0]]} for i in ids]
    preference = []
    with tqdm(total=len(pairs), unit="pair", desc="judging") as bar:
        for start in range(0, len(pairs), batch_size):
            batch = pairs[start:start + batch_size]
            preference += [float(P[0][1]) for P in judge.pref(batch)]  # P(output beats reference)
            bar.update(len(batch))
    outs, refs = [out_rows[i][1] for i in ids], [ref_rows[i][1] for i in ids]
    out_len, ref_len = (np.array([len(r["responses"][0]) for r in rows], dtype=float) for rows in (outs, refs))
    report = win_rate_report(preference, out_len, ref_len, difficulty)
    if report["n"] > 1:  # why the LC rate is what it is: the same deterministic fit win_rate_report made
        glm = length_controlled_glm(preference, ref_len - out_len, None if difficulty is None else np.array(difficulty))
        report["lc_glm"] = {"C": glm["C"], "weights": dict(zip(["length", "model", "difficulty"], glm["weights"]))}
    report.update({
        "outputs": {"path": outputs, "generator": outs[0].get("generator"), **_first_response_stats(outs)},
        "references": {"path": references, "generator": refs[0].get("generator"), **_first_response_stats(refs)},
        "oracle": {"kind": oracle, "model": judge_model, **({"credit": judge.credit} if oracle == "rule" else {})},
        "preference": dict(zip(ids, preference)),
    })
    constrained = [i for i in ids if "constraints" in out_rows[i][1]]
    if constrained:  # absolute quality: the prompts' verifiable constraints (oracle.py's rule checks)
        report["constraints"] = constraint_report(*_checked_constraints(outputs, out_rows, ref_rows, constrained),
                                                  resamples=bootstrap, seed=seed)
        if len(constrained) < len(ids):
            print(f"warning: {len(ids) - len(constrained)} of {len(ids)} outputs carry no 'constraints': "
                  "constraint scores are over the others", file=sys.stderr)
    return report


def _checked_constraints(path, out_rows, ref_rows, ids):
    """(output rows, reference rows) of `ids`, each output's "constraints" checked (the reference uses them too)."""
    from oracle import constraint_problem

    for i in ids:
        line, row = out_rows[i]
        problem = constraint_problem(row["constraints"])
        if problem:
            raise field_error(path, line, "constraints", problem)
    return ([out_rows[i][1] for i in ids],
            [{**ref_rows[i][1], "constraints": out_rows[i][1]["constraints"]} for i in ids])


# ---------------------------------------------------------------------------------------- plot

def report_paths(plot):
    """Paths from a list or a comma-separated string; globs expanded, iter2 before iter10."""
    items = plot if isinstance(plot, (list, tuple)) else str(plot).strip("[]").split(",")
    paths = []
    for item in (str(x).strip() for x in items if str(x).strip()):
        matches = glob.glob(item)
        if not matches and not os.path.exists(item):
            raise UserError(f"{item}: no such report or metrics file")
        paths += sorted(matches, key=lambda s: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]) or [item]
    return paths


def read_reports(paths):
    """The evaluate.py reports at `paths`, each checked for the win rates."""
    reports = []
    for path in paths:
        report = read_json(path)
        for key in ("win_rate", "lc_win_rate"):
            if key not in report:
                raise UserError(f"{path}: field '{key}': missing: is this an evaluate.py report?")
        reports.append(report)
    return reports


def _names(paths):
    """The folder of each report names its iteration in scripts/iterate.sh's layout (runs/demo/iter1/...)."""
    return [os.path.basename(os.path.dirname(os.path.abspath(p))) for p in paths]


def summary_table(paths, reports):
    """A markdown table: the references of the first report (e.g. the base model), then each report's outputs.

    Columns: mean constraint score [95% CI], its paired difference from the references [95% CI], share
    meeting all constraints, win rate against the references (± s.e.), prompts x responses per prompt.
    The constraint columns are "-" for reports without a constraints section.
    """
    def row(name, side, diff, win_rate, n):
        if side is None:
            return f"| {name} | - | - | - | {win_rate} | {n} |"
        score, k = side["score"], f"{side['responses_per_prompt']:g}"
        vs = "-" if diff is None else f"{diff['mean']:+.3f} [{diff['ci'][0]:+.3f}, {diff['ci'][1]:+.3f}]"
        return (f"| {name} | {score['mean']:.3f} [{score['ci'][0]:.3f}, {score['ci'][1]:.3f}] | {vs} | "
                f"{100 * side['all_met']['mean']:.1f}% | {win_rate} | {n} x {k} |")

    lines = ["| model | constraint score [95% CI] | vs base [paired 95% CI] | meets all | win rate vs base | prompts x K |",
             "|---|---|---|---|---|---|"]
    first = reports[0].get("constraints")
    if first:
        lines.append(row("base", first["references"], None, "-", first["n"]))
    for name, r in zip(_names(paths), reports):
        c, se = r.get("constraints"), r.get("standard_error")
        win_rate = f"{r['win_rate']:.1f}" + (f" ± {se:.1f}" if se is not None else "")
        lines.append(row(name, c and c["outputs"], c and c["difference"]["score"], win_rate, c["n"] if c else r.get("n", "-")))
    return "\n".join(lines)


def plot_reports(paths, png):
    """Draw, per report in the order given, win rate (± s.e.) and LC win rate, and beside it the mean
    constraint score with its 95% interval (the first report's references drawn as "base"), into `png`.
    Returns the reports."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    reports = read_reports(paths)
    x = np.arange(1, len(reports) + 1)
    se = [r.get("standard_error") or 0.0 for r in reports]
    constrained = all("constraints" in r for r in reports)
    fig, axes = plt.subplots(1, 2 if constrained else 1, figsize=(11 if constrained else 6, 4), squeeze=False)
    ax = axes[0, 0]
    ax.errorbar(x, [r["win_rate"] for r in reports], yerr=se, marker="o", capsize=3, label="win rate (± s.e.)")
    ax.plot(x, [r["lc_win_rate"] if r["lc_win_rate"] is not None else np.nan for r in reports], marker="s",
            label="LC win rate")
    ax.axhline(50, color="grey", lw=0.8, ls="--")
    ax.set_xticks(x, _names(paths))
    ax.set_xlabel("iteration")
    ax.set_ylabel("% against the reference")
    ax.set_ylim(0, 100)
    ax.legend()
    ax.set_title("win rate against the reference per iteration", fontsize=10)
    if constrained:
        ax = axes[0, 1]
        sides = [reports[0]["constraints"]["references"]] + [r["constraints"]["outputs"] for r in reports]
        xs = np.arange(len(sides))
        mean = np.array([s["score"]["mean"] for s in sides])
        ci = np.array([s["score"]["ci"] for s in sides])
        ax.errorbar(xs, mean, yerr=[mean - ci[:, 0], ci[:, 1] - mean], marker="o", capsize=3,
                    label="mean constraint score (95% CI)")
        ax.plot(xs, [s["all_met"]["mean"] for s in sides], marker="s", ls="--", label="share meeting all")
        ax.axhline(mean[0], color="grey", lw=0.8, ls=":")
        for x_i, r in zip(xs[1:], reports):  # the paired interval: overlapping bars can still differ
            d = r["constraints"]["difference"]["score"]
            ax.annotate(f"{d['mean']:+.3f}\n[{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}]", (x_i, min(0.95, ci[x_i, 1] + 0.03)),
                        ha="center", va="bottom", fontsize=7)
        ax.set_xticks(xs, ["base"] + _names(paths))
        ax.set_xlabel("iteration")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=8)
        ax.set_title("held-out constraints (binary credit, all responses; text: paired difference vs base)", fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(png)), exist_ok=True)
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return reports


CURVES = [  # (panel title, [(metrics.jsonl field, label, line style)], log scale)
    ("loss", [("loss", "loss", "-"), ("loss_pref", "preference", "--")], True),
    ("log-ratio log pi/pi_t vs its target", [("logratio_chosen", "chosen", "-"), ("target_chosen", "chosen target", "--"),
                                             ("logratio_rejected", "rejected", "-"), ("target_rejected", "rejected target", "--")], False),
    ("gradient norm (before clipping)", [("grad_norm", "grad norm", "-")], True),
    ("latent distance, semantic gate, repulsion", [("latent_dist", "latent distance", "-"), ("gate_mean", "gate", "--"),
                                                    ("loss_rep", "repulsion loss", ":")], False),
]


def plot_curves(paths, png):
    """Draw sspo.py's metrics.jsonl of one or more runs, one after another on a common step axis, into `png`.

    Returns what was drawn: {field: (x, y)} over all runs.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = []
    for path in paths:
        rows = []
        for n, row in read_jsonl(path):
            if not isinstance(row.get("step"), int):
                raise field_error(path, n, "step", "missing or not an integer: is this sspo.py's metrics.jsonl?")
            rows.append(row)
        if not rows:
            raise UserError(f"{path}: no steps logged yet")
        runs.append(rows)
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    offset, colours, drawn = 0, plt.rcParams["axes.prop_cycle"].by_key()["color"], {}
    for r, (path, rows) in enumerate(zip(paths, runs)):
        x = [offset + row["step"] for row in rows]
        for ax, (title, fields, log) in zip(axes.flat, CURVES):
            for c, (field, label, style) in enumerate(fields):
                y = [math.nan if row.get(field) is None else row[field] for row in rows]
                ax.plot(x, y, style, color=colours[c % len(colours)], label=label if r == 0 else None, lw=1.2)
                drawn.setdefault(field, ([], []))
                drawn[field][0].extend(x)
                drawn[field][1].extend(y)
            if log and all(v > 0 for row in rows for f, _, _ in fields if isinstance(v := row.get(f), (int, float))):
                ax.set_yscale("log")
            ax.set_title(title, fontsize=10)
            if r:
                ax.axvline(offset + 0.5, color="grey", lw=0.8, ls=":")
        offset = x[-1]
    for ax in axes.flat:
        ax.legend(fontsize=8)
    for ax in axes[1]:
        ax.set_xlabel("optimizer step" + (" (runs one after another)" if len(paths) > 1 else ""))
    dirs = [os.path.dirname(os.path.abspath(p)) for p in paths]
    names = [os.path.relpath(d, os.path.commonpath(dirs)) for d in dirs] if len(set(dirs)) > 1 else [os.path.basename(dirs[0])]
    fig.suptitle("  |  ".join(names), fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(png)), exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return drawn


# ----------------------------------------------------------------------------------------- CLI

def main(outputs=None, references=None, oracle="pairrm", oracle_model=None, out="report.json", batch_size=32,
         difficulty_field=None, bootstrap=10000, seed=0, plot=None, curves=None, plot_out="plot.png"):
    """Judge a model's outputs against reference outputs (AlpacaEval 2.0 win rates), or plot reports or training curves.

    Args:
        outputs: responses file of the model to rate (generate.py's format; first response per id)
        references: responses file of the reference model (e.g. the base model), matched by id
        oracle: the judge, an oracle.py backend: pairrm, reward, judge or rule (see oracle.ORACLES)
        oracle_model: hub id or folder of the judge; None: the backend's default (as in oracle.py)
        out: where the report JSON goes
        batch_size: texts or pairs per forward pass of the judge
        difficulty_field: name of a numeric per-prompt difficulty field to add to the GLM (length_controlled_noreg)
        bootstrap: resamples of the bootstrap intervals of the constraint scores (rows with "constraints")
        seed: seed of those resamples (the same files and seed give the same intervals)
        plot: reports to plot instead (comma-separated paths, each may be a quoted glob), in iteration order;
            also prints their table (constraint scores with intervals, win rates)
        curves: sspo.py metrics.jsonl files to plot instead (comma-separated, globs), drawn one after another
        plot_out: where the plot PNG goes
    """
    if curves is not None:
        paths = report_paths(curves)
        plot_curves(paths, plot_out)
        print(f"plotted the training curves of {len(paths)} run(s) to {plot_out}")
        return
    if plot is not None:
        paths = report_paths(plot)
        reports = plot_reports(paths, plot_out)
        print(summary_table(paths, reports))
        print(f"plotted {len(paths)} reports to {plot_out}")
        return
    if not outputs or not references:
        raise UserError("give --outputs and --references (or --plot REPORTS, or --curves METRICS)")
    if bootstrap < 1:
        raise UserError("--bootstrap must be at least 1")
    report = evaluate(outputs, references, oracle, oracle_model, batch_size, difficulty_field, bootstrap, seed)
    atomic_write_json(out, report)
    se = report["standard_error"]
    lc = report["lc_win_rate"]
    print(f"n={report['n']}  win rate {report['win_rate']:.1f}%"
          + (f" ± {se:.1f}" if se is not None else "")
          + (f"  LC win rate {lc:.1f}%" if lc is not None else "")
          + f"  discrete {report['discrete_win_rate']:.1f}%"
          + f"  mean length {report['outputs']['mean_length_chars']:.0f} vs "
          + f"{report['references']['mean_length_chars']:.0f} chars"
          + (_constraint_line(report["constraints"]) if "constraints" in report else "")
          + f"  -> {out}")


def _constraint_line(c):
    d = c["difference"]["score"]
    return (f"  constraint score {c['outputs']['score']['mean']:.3f} vs {c['references']['score']['mean']:.3f}"
            f" (difference {d['mean']:+.3f}, 95% CI [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}])")


if __name__ == "__main__":
    cli(main)
