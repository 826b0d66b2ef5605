"""evaluate.py: AlpacaEval 2.0 win rates on hand-worked cases, the report from the CLI, plots, input errors."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from scipy.optimize import minimize

import evaluate
from common import UserError
import oracle
from oracle import DEFAULT_TEMPERATURE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_all_wins_is_100():
    r = evaluate.win_rate_report([1.0] * 8, [10, 20, 30, 40, 50, 60, 70, 80], [45] * 8)
    assert r["win_rate"] == 100 and r["discrete_win_rate"] == 100 and r["standard_error"] == 0 and r["n"] == 8
    assert r["lc_win_rate"] == pytest.approx(100, abs=0.01)  # L1 keeps the weight finite: just under 100


def test_all_ties_is_50():
    r = evaluate.win_rate_report([0.5] * 8, [10, 20, 30, 40, 50, 60, 70, 80], [45] * 8)
    assert r == {"win_rate": 50, "standard_error": 0, "discrete_win_rate": 50, "lc_win_rate": 50, "n": 8}


def test_hand_checked_standard_error_and_discrete_rate():
    # p = 1, 0, 1, 1/2: mean 0.625; squared deviations 0.140625 + 0.390625 + 0.140625 + 0.015625 = 0.6875;
    # sd = sqrt(0.6875 / 3) = 0.478714; se = sd / sqrt(4) = 0.239357. Discrete: (1 + 0 + 1 + 1/2) / 4.
    r = evaluate.win_rate_report([1, 0, 1, 0.5], [5, 6, 7, 8], [6, 6, 6, 6])
    assert r["win_rate"] == 62.5
    assert r["standard_error"] == pytest.approx(23.9357, abs=1e-4)
    assert r["discrete_win_rate"] == 62.5
    r = evaluate.win_rate_report([0.51, 0.49, 0.5], [1, 2, 3], [2, 2, 2])
    assert r["discrete_win_rate"] == 50 and r["win_rate"] == pytest.approx(50)


def test_length_bias_is_removed():
    # The judge only likes length: at equal length it has no preference, and the outputs are longer.
    rng = np.random.default_rng(0)
    reference_len = np.full(200, 1000)
    output_len = reference_len + rng.integers(-600, 1400, 200)
    p = 1 / (1 + np.exp(-(output_len - reference_len) / 300))
    r = evaluate.win_rate_report(p, output_len, reference_len)
    assert r["win_rate"] > 70
    assert r["lc_win_rate"] < r["win_rate"] and abs(r["lc_win_rate"] - 50) < 5


def _length_judged(n=60, seed=1):
    """Preferences that favour longer outputs (negative d), plus a small edge of the model, plus noise."""
    rng = np.random.default_rng(seed)
    d = rng.normal(0, 300, n)
    return np.clip(1 / (1 + np.exp(-(0.4 - d / 300))) + rng.normal(0, 0.1, n), 0, 1), d


def _uniform(n=12, seed=2):
    """Noisy preferences a few rows long: cross-validation picks a C where L1 zeroes the length weight."""
    rng = np.random.default_rng(seed)
    d = rng.normal(0, 300, n)
    return rng.uniform(0.2, 0.9, n), d


@pytest.mark.parametrize("data, C", [(_length_judged, 1e4), (_uniform, 2.7826)])
def test_glm_matches_an_independent_fit(data, C):
    """At the C it picks, the GLM's weights minimise liblinear's L1 objective, written out by hand."""
    p, d = data()
    glm = evaluate.length_controlled_glm(p, d)
    assert glm["C"] == pytest.approx(C, rel=1e-4)
    x = np.column_stack([np.tanh(d / d.std(ddof=1)), np.ones(len(p))])

    def objective(w):  # |w|_1 + C sum_i [p_i log(1 + e^{-x_i w}) + (1 - p_i) log(1 + e^{x_i w})]
        z = x @ w
        return np.abs(w).sum() + glm["C"] * np.sum(p * np.logaddexp(0, -z) + (1 - p) * np.logaddexp(0, z))

    best = minimize(objective, np.full(2, 0.1), method="Nelder-Mead", options={"xatol": 1e-8, "fatol": 1e-10}).x
    assert glm["weights"] == pytest.approx(best, abs=2e-3)
    assert glm["lc_win_rate"] == pytest.approx(100 / (1 + math.exp(-glm["weights"][1])))


def test_smallest_c_wins_ties_and_difficulty_feature():
    # p = 1/2 everywhere: every C fits all-zero weights, the same held-out score: the smallest C is kept.
    assert evaluate.length_controlled_glm(np.full(10, 0.5), np.arange(10.0))["C"] == 1e-4
    rng = np.random.default_rng(2)
    p, out_len, ref_len = rng.uniform(0, 1, 30), rng.integers(50, 500, 30), rng.integers(50, 500, 30)
    plain = evaluate.win_rate_report(p, out_len, ref_len)
    assert evaluate.win_rate_report(p, out_len, ref_len, difficulty=np.zeros(30)) == pytest.approx(plain)
    hard = evaluate.win_rate_report(p, out_len, ref_len, difficulty=rng.normal(0, 1, 30))
    assert 0 <= hard["lc_win_rate"] <= 100


@pytest.mark.parametrize("args, message", [
    (([0.5, 2.0], [1, 2], [1, 2]), r"\[0, 1\]"),
    (([0.5, 0.5], [1, 2, 3], [1, 2]), "output_len has 3 values"),
    (([], [], []), "no preferences"),
    (([0.5, float("nan")], [1, 2], [1, 2]), "NaN"),
])
def test_win_rates_rejects_bad_input(args, message):
    with pytest.raises(UserError, match=message):
        evaluate.win_rate_report(*args)


def test_distinct_n():
    # words: a b a b c -> 3 distinct of 5; bigrams ab ba ab bc -> 3 of 4; plus "A b" adds a, b and ab again
    assert evaluate.distinct_n(["a b a b c", "A b"], 1) == 3 / 7
    assert evaluate.distinct_n(["a b a b c", "A b"], 2) == 3 / 5
    assert evaluate.distinct_n([""], 2) == 0.0


# ------------------------------------------------------------------------------------ the CLI

CONSTRAINTS = [{"type": "lowercase"}, {"type": "max_words", "n": 4}]


def _responses(path, first, finished=None, prompts=None):
    """A responses file as generate.py writes it, one row per first response (plus a second one)."""
    with open(path, "w", encoding="utf-8") as f:
        for i, text in enumerate(first):
            row = {"id": f"q{i}", "prompt": (prompts or {}).get(i, f"question {i}"), "constraints": CONSTRAINTS,
                   "responses": [text, "unused second sample"], "num_tokens": [len(text.split()), 3],
                   "finished": [True if finished is None else finished[i], True],
                   "generator": {"model": os.path.basename(path), "k": 2}}
            f.write(json.dumps(row) + "\n")
    return str(path)


def test_report_from_the_cli(tmp_path, capsys):
    outputs = _responses(tmp_path / "model.jsonl", ["a short answer", "tiny tiny one", "Too Long For The Limit here", "ok"],
                         finished=[True, True, False, True])
    references = _responses(tmp_path / "base.jsonl", ["A Short Answer", "tiny one", "too long for the limit here", "OK"])
    out = tmp_path / "report.json"
    evaluate.main(outputs=outputs, references=references, oracle="rule", out=str(out))
    report = json.loads(out.read_text())
    # The judge is the rule oracle at its default, graded credit (lowercase: share of letters in lower case;
    # at most 4 words: 4 / words). Score differences output - reference of the first responses:
    # q0 1 - (3/4 + 1)/2 = 1/8;  q1 0;  q2 (17/22 + 4/6)/2 - (1 + 4/6)/2 = -5/44;  q3 1 - (0 + 1)/2 = 1/2.
    p = [1 / (1 + math.exp(-d / DEFAULT_TEMPERATURE)) for d in (1 / 8, 0, -5 / 44, 1 / 2)]
    assert report["preference"] == pytest.approx(dict(zip(["q0", "q1", "q2", "q3"], p)))
    assert report["n"] == 4
    assert report["win_rate"] == pytest.approx(100 * np.mean(p))
    assert report["discrete_win_rate"] == 62.5
    assert report["standard_error"] == pytest.approx(100 * np.std(p, ddof=1) / 2)
    assert 0 <= report["lc_win_rate"] <= 100 and set(report["lc_glm"]["weights"]) == {"length", "model"}
    assert report["oracle"] == {"kind": "rule", "model": None, "credit": "graded"}
    # Constraint scores, binary credit, over BOTH responses of a row (the second, "unused second sample",
    # meets both): outputs 1, 1, 1/2, 1; references 3/4, 1, 3/4, 3/4 (each first response meets one of two).
    c = report["constraints"]
    assert c["n"] == 4 and c["outputs"]["responses_per_prompt"] == 2
    assert c["outputs"]["score"]["mean"] == pytest.approx(0.875)
    assert c["references"]["score"]["mean"] == pytest.approx(0.8125)
    assert c["difference"]["score"]["mean"] == pytest.approx(0.0625)
    lo, hi = c["difference"]["score"]["ci"]
    assert -0.125 <= lo < 0.0625 < hi <= 0.25  # resampled means of (1/4, 0, -1/4, 1/4) stay in their range
    assert c["outputs"]["all_met"]["mean"] == pytest.approx(0.875)  # 7 of 8 responses meet both
    assert c["references"]["all_met"]["mean"] == pytest.approx(5 / 8)  # q1's two and the 4 second ones, of 8
    assert c["outputs"]["by_type"]["lowercase"] == {"met": 0.875, "n": 4}
    assert c["references"]["by_type"]["lowercase"] == {"met": 0.75, "n": 4}  # "A Short Answer" and "OK" fail
    model = report["outputs"]
    assert model["path"] == outputs and model["generator"]["model"] == "model.jsonl"
    assert model["mean_length_chars"] == pytest.approx(np.mean([14, 13, 27, 2]))
    assert model["mean_length_tokens"] == pytest.approx(np.mean([3, 3, 6, 1]))
    assert model["hit_token_limit"] == 1 and report["references"]["hit_token_limit"] == 0
    assert model["distinct_1"] == pytest.approx(12 / 13)  # "tiny" twice among 13 words
    assert model["distinct_2"] == 1.0  # 9 bigrams, none repeated
    assert "win rate" in capsys.readouterr().out


def test_difficulty_field(tmp_path):
    outputs = _responses(tmp_path / "model.jsonl", ["a b", "c", "d e f", "g", "h i"])
    references = _responses(tmp_path / "base.jsonl", ["A b", "C", "d e f", "G", "h i"])
    rows = [json.loads(line) for line in open(outputs)]
    with open(outputs, "w") as f:
        for i, row in enumerate(rows):
            f.write(json.dumps(dict(row, difficulty=[0.3, -1.0, 0.2, 1.5, "hard"][i])) + "\n")
    with pytest.raises(UserError, match=r"model.jsonl:5: field 'difficulty': must be a number"):
        evaluate.evaluate(outputs, references, oracle="rule", difficulty_field="difficulty")
    with open(outputs, "w") as f:
        for i, row in enumerate(rows):
            f.write(json.dumps(dict(row, difficulty=[0.3, -1.0, 0.2, 1.5, 0.0][i])) + "\n")
    report = evaluate.evaluate(outputs, references, oracle="rule", difficulty_field="difficulty")
    assert set(report["lc_glm"]["weights"]) == {"length", "model", "difficulty"}


class FakeJudge(oracle.Oracle):
    """Prefers the response with more "!" and records the rows it was given."""
    needs_model = False
    seen = []

    def pref(self, rows):
        FakeJudge.seen += rows
        return [oracle.pref_matrix(2, lambda i, j: 0.9 if r["responses"][i].count("!") > r["responses"][j].count("!")
                                   else 0.1) for r in rows]


def test_backend_from_oracle_registry_sees_output_first(tmp_path, monkeypatch):
    monkeypatch.setitem(oracle.ORACLES, "fake", FakeJudge)
    outputs = _responses(tmp_path / "model.jsonl", ["yes!", "no", "maybe!!"])
    references = _responses(tmp_path / "base.jsonl", ["yes", "no!", "maybe!"])
    report = evaluate.evaluate(outputs, references, oracle="fake", batch_size=2)
    assert report["preference"] == {"q0": 0.9, "q1": 0.1, "q2": 0.9}
    assert [r["responses"] for r in FakeJudge.seen] == [["yes!", "yes"], ["no", "no!"], ["maybe!!", "maybe!"]]
    assert FakeJudge.seen[0]["constraints"] == CONSTRAINTS and "generator" not in FakeJudge.seen[0]
    with pytest.raises(UserError, match="--oracle must be one of"):
        evaluate.evaluate(outputs, references, oracle="nope")


def test_plot_of_several_reports(tmp_path):
    paths = []
    for t, (wr, lc) in enumerate([(50, 50), (58, 54), (66, 57)], 1):
        os.makedirs(tmp_path / f"iter{t}")
        path = tmp_path / f"iter{t}" / "report.json"
        path.write_text(json.dumps({"win_rate": wr, "lc_win_rate": lc, "standard_error": 3.0}))
        paths.append(str(path))
    png = tmp_path / "plot.png"
    evaluate.main(plot=str(tmp_path / "iter*" / "report.json"), plot_out=str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert evaluate.report_paths(",".join(reversed(paths))) == paths[::-1]  # given order kept


def test_training_curves_of_two_runs_on_one_step_axis(tmp_path):
    paths = []
    for t in (1, 2):
        os.makedirs(tmp_path / f"iter{t}" / "model")
        path = tmp_path / f"iter{t}" / "model" / "metrics.jsonl"
        rows = [dict(step=s, loss=1000.0 / (s + t), loss_pref=900.0 / (s + t), loss_rep=0.1, logratio_chosen=0.1 * s,
                     logratio_rejected=-0.2 * s, target_chosen=5.0, target_rejected=-5.0, grad_norm=None if s == 2 else 3.0,
                     gate_mean=0.2, latent_dist=0.3 + 0.01 * s) for s in (1, 2, 3)]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths.append(str(path))
    png = tmp_path / "training.png"
    drawn = evaluate.plot_curves(evaluate.report_paths(str(tmp_path / "iter*" / "model" / "metrics.jsonl")), str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    x, y = drawn["loss"]
    assert x == [1, 2, 3, 4, 5, 6]  # the second run continues the step axis
    assert y == pytest.approx([500, 1000 / 3, 250, 1000 / 3, 250, 200])
    assert math.isnan(drawn["grad_norm"][1][1]) and drawn["target_rejected"][1] == [-5.0] * 6
    result = _cli("--curves", paths[0], "--plot_out", str(tmp_path / "one.png"))
    assert result.returncode == 0 and (tmp_path / "one.png").exists(), result.stderr
    (tmp_path / "bad.jsonl").write_text('{"win_rate": 50}\n')
    result = _cli("--curves", str(tmp_path / "bad.jsonl"))
    assert result.returncode == 2 and "bad.jsonl:1: field 'step'" in result.stderr


def _cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), *args], capture_output=True, text=True,
                          cwd=ROOT)


@pytest.mark.parametrize("breakage, message", [
    (lambda rows: rows[:1] + ["{not json"] + rows[2:], "model.jsonl:2: not valid JSON"),
    (lambda rows: [rows[0].replace('"responses"', '"answers"')] + rows[1:], "model.jsonl:1: field 'responses'"),
    (lambda rows: rows + [rows[0]], "model.jsonl:4: field 'id': id 'q0' repeats line 1"),
    (lambda rows: rows + [rows[0].replace('"q0"', '"q9"')], "model.jsonl:4: field 'id': id 'q9' has no row in"),
    (lambda rows: [rows[0].replace("question 0", "another question")] + rows[1:], "model.jsonl:1: field 'prompt'"),
])
def test_bad_input_is_one_line_naming_file_and_line(tmp_path, breakage, message):
    good = _responses(tmp_path / "model.jsonl", ["a", "b", "c"])
    references = _responses(tmp_path / "base.jsonl", ["a", "b", "c"])
    rows = open(good).read().splitlines()
    with open(good, "w") as f:
        f.write("\n".join(breakage(rows)) + "\n")
    result = _cli("--outputs", good, "--references", references, "--out", str(tmp_path / "r.json"))
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_missing_flags_and_reports(tmp_path):
    result = _cli("--outputs", "x.jsonl")
    assert result.returncode == 2 and "--references" in result.stderr
    result = _cli("--plot", str(tmp_path / "none.json"))
    assert result.returncode == 2 and "no such report" in result.stderr


# ------------------------------------------------------------------------ constraint scores, bootstrap

def test_bootstrap_of_a_constant_difference_is_that_value():
    mean, (low, high) = evaluate.bootstrap_interval([0.25] * 30, resamples=500, seed=3)
    assert mean == low == high == 0.25


def test_bootstrap_of_a_symmetric_difference_covers_zero_and_is_seeded():
    diff = [0.5, -0.5] * 20 + [0.25, -0.25] * 10
    mean, (low, high) = evaluate.bootstrap_interval(diff)
    assert mean == 0 and low < 0 < high
    # the interval of a mean of 60 values with sd ~0.43: about +-1.96 * 0.43 / sqrt(60) = +-0.11
    assert high - low == pytest.approx(2 * 1.96 * np.std(diff) / math.sqrt(len(diff)), rel=0.15)
    assert evaluate.bootstrap_interval(diff) == (mean, [low, high])  # same seed, same interval
    assert evaluate.bootstrap_interval(diff, seed=1)[1] != [low, high]
    shifted = evaluate.bootstrap_interval(np.add(diff, 0.3))[1]
    assert shifted[0] > 0  # a real shift excludes 0
    with pytest.raises(UserError, match="no values"):
        evaluate.bootstrap_interval([])


def test_table_and_plot_of_reports_with_constraints(tmp_path, capsys):
    references = _responses(tmp_path / "base_heldout.jsonl", ["A B", "C", "D E F G H I", "j"])
    for t, texts in enumerate([["a b", "C", "D E F G H I", "j"], ["a b", "c", "d e", "j"]], 1):
        os.makedirs(tmp_path / f"iter{t}")
        outputs = _responses(tmp_path / f"iter{t}" / "heldout.jsonl", texts)
        evaluate.main(outputs=outputs, references=references, oracle="rule", out=str(tmp_path / f"iter{t}" / "report.json"))
    capsys.readouterr()
    png = tmp_path / "plot.png"
    evaluate.main(plot=str(tmp_path / "iter*" / "report.json"), plot_out=str(png))
    table = capsys.readouterr().out.splitlines()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Binary scores over both responses of a row (the second always meets both), per prompt:
    # base firsts: "A B" 1/2, "C" 1/2, "D E F G H I" 0, "j" 1 -> per prompt (with the second, 1): 3/4, 3/4, 1/2, 1
    # iter1 firsts: 1, 1/2, 0, 1 -> 1, 3/4, 1/2, 1;  iter2 firsts: 1, 1, 1, 1 -> 1, 1, 1, 1
    assert table[2].startswith("| base | 0.750 [") and table[2].endswith("| - | 4 x 2 |")
    assert table[3].startswith("| iter1 | 0.812 [") and "| +0.062 [+0.000, +0.188] |" in table[3]
    assert table[4].startswith("| iter2 | 1.000 [1.000, 1.000] | +0.250 [") and "| 100.0% |" in table[4]
