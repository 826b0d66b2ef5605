"""experiments/adversarial (issue 23): the adversarial rewrite, the pre-check and the pre-registered endpoints."""
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from common import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(folder, name):
    path = os.path.join(ROOT, "experiments", folder, f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"{folder}_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


adversarial = _load("near_duplicates", "adversarial")
precheck = _load("adversarial", "precheck")
results = _load("adversarial", "results")

# graded credit under "at most 3 words": 1.0, 0.5, 0.3, 1.0 (a tie with the first, and longer)
ANSWERS = ["a b c", "a b c d e f", "a b c d e f g h i j", "x y z"]
TOKENS = [3, 6, 10, 5]


def _row(i, sim, answers=ANSWERS, tokens=TOKENS):
    k = len(answers)
    credit = [adversarial.constraint_score(y, [{"type": "max_words", "n": 3}], "graded") for y in answers]
    P = np.array([[1 / (1 + np.exp((credit[b] - credit[a]) / 0.1)) for b in range(k)] for a in range(k)])  # the rule oracle's shape
    return {"id": f"p{i}", "prompt": f"prompt {i}", "responses": answers, "num_tokens": tokens, "finished": [True] * k,
            "constraints": [{"type": "max_words", "n": 3}], "pref": P.tolist(), "sim": sim.tolist(), "oracle": {"kind": "rule"}}


def _sim(high_pairs, k=4):
    S = np.full((k, k), 0.3)
    np.fill_diagonal(S, 1.0)
    for i, j in high_pairs:
        S[i, j] = S[j, i] = 0.85
    return S


def _write(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def _read(path):
    return [json.loads(line) for line in open(path)]


def test_adversarial_points_near_duplicates_against_credit(tmp_path):
    rows = [_row(0, _sim([(0, 1), (1, 2), (0, 3), (2, 3)])), _row(1, _sim([]))]
    data = _write(tmp_path / "scored.jsonl", rows)
    adversarial.main(data, str(tmp_path / "a.jsonl"), threshold=0.8)
    out = _read(tmp_path / "a.jsonl")
    P, P0 = np.array(out[0]["pref"]), np.array(rows[0]["pref"])
    assert out[0]["corrupted"] == [[0, 1], [0, 3], [1, 2], [2, 3]] and out[1]["corrupted"] == []
    assert P[1, 0] == pytest.approx(0.95) and P[0, 1] == pytest.approx(0.05)  # 0.5 credit beats 1.0
    assert P[2, 1] == pytest.approx(0.95)  # 0.3 beats 0.5
    assert P[2, 3] == pytest.approx(0.95)  # 0.3 beats 1.0
    assert P[3, 0] == pytest.approx(0.95)  # equal credit: the longer answer (5 tokens against 3) wins
    assert out[0]["reversed"] == [[0, 1], [1, 2], [2, 3]]  # (0, 3) was a tie: broken, not reversed
    assert np.allclose(P + P.T, 1) and np.allclose(np.diag(P), 0.5)
    for i, j in [(0, 2), (1, 3)]:  # not near-duplicates: untouched
        assert P[i, j] == P0[i, j]
    assert np.array_equal(np.array(out[1]["pref"]), np.array(rows[1]["pref"]))
    assert {k: v for k, v in out[0].items() if k not in ("pref", "corrupted", "reversed", "rewrite")} == \
        {k: v for k, v in rows[0].items() if k != "pref"}
    assert out[0]["rewrite"] == {"kind": "adversarial", "pairs": "similar", "threshold": 0.8, "verdict": 0.95}
    adversarial.main(data, str(tmp_path / "b.jsonl"), threshold=0.8)
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()


def test_adversarial_leaves_exact_ties_alone(tmp_path):
    row = _row(0, _sim([(0, 1)], k=2), answers=["a b c", "x y z"], tokens=[3, 3])
    adversarial.main(_write(tmp_path / "s.jsonl", [row]), str(tmp_path / "o.jsonl"))
    assert _read(tmp_path / "o.jsonl")[0]["corrupted"] == [] and _read(tmp_path / "o.jsonl")[0]["pref"] == row["pref"]


def test_adversarial_bad_input_is_one_line(tmp_path):
    bad = _row(1, _sim([(0, 1)]))
    del bad["num_tokens"]
    data = _write(tmp_path / "scored.jsonl", [_row(0, _sim([])), bad])
    result = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "near_duplicates", "adversarial.py"),
                             "--data", data, "--out", str(tmp_path / "out.jsonl")], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {data}:2: field 'num_tokens': must be 4 whole numbers (generate.py writes them)"]
    assert not (tmp_path / "out.jsonl").exists()


def test_precheck_counts_and_gates(tmp_path):
    where = tmp_path / "runs" / "seed0" / "adversarial" / "sppo" / "iter1"
    where.mkdir(parents=True)
    # prompt 0: every pair near-duplicate, so SPPO's pair turns over (chosen 2 at 0.3, rejected 0 or 3 at 1.0)
    rows = [_row(0, _sim([(a, b) for a in range(4) for b in range(a + 1, 4)])), _row(1, _sim([]))]
    scored = _write(where / "scored.jsonl", rows)
    adversarial.main(scored, str(where / "rewritten.jsonl"))
    for f in ("scored.jsonl", "rewritten.jsonl"):
        (where / f"{f}.done").touch()
    stats = precheck.seed_stats(scored, str(where / "rewritten.jsonl"))
    assert (stats["pairs"], stats["corrupted"], stats["reversed"], stats["tie_broken"]) == (12, 6, 5, 1)
    assert stats["sppo_anti_quality_clean"] == 0 and stats["sppo_anti_quality"] == 0.5  # 1 of 2 trained pairs
    gaps = [6 - 3, 10 - 3, 5 - 3, 10 - 6, 6 - 5, 10 - 5]  # the favoured (lower credit, or longer) minus the other
    assert stats["mean_token_gap"] == pytest.approx(np.mean(gaps))
    precheck.main(runs=str(tmp_path / "runs"), seeds=(0,), needed=0.5, out=str(tmp_path))
    assert json.loads((tmp_path / "precheck.json").read_text())["passed"] is True
    assert "**passed**" in (tmp_path / "precheck.md").read_text()
    with pytest.raises(UserError, match="pre-check not passed"):
        precheck.main(runs=str(tmp_path / "runs"), seeds="0", needed=0.6, out=str(tmp_path))


def test_hierarchical_bootstrap_resamples_seeds_then_prompts():
    same = results.hierarchical_bootstrap(np.full((3, 50), 0.2), draws=200)
    assert np.allclose(same, 0.2)
    seeds_apart = np.array([[0.0] * 50, [0.3] * 50, [0.6] * 50])  # no spread within a seed: all of it between seeds
    draws = results.hierarchical_bootstrap(seeds_apart, draws=4000)
    assert draws.min() == pytest.approx(0.0) and draws.max() == pytest.approx(0.6) and np.mean(draws) == pytest.approx(0.3, abs=0.02)


def _endpoint(mean, lo, hi, p, per_seed):
    return {"mean": mean, "ci": [lo, hi], "p": p, "p_holm": p, "per_seed": dict(enumerate(per_seed))}


def test_decision_rule_as_preregistered():
    M = _endpoint(-0.10, -0.15, -0.05, 0.001, [-0.1, -0.08, -0.12])
    assert results.decide(M, _endpoint(0.08, 0.02, 0.14, 0.01, [0.05, 0.1, 0.09])).startswith("confirmed")
    assert results.decide(M, _endpoint(0.08, 0.02, 0.14, 0.01, [0.05, -0.01, 0.2])).startswith("undecided")  # a seed disagrees
    assert results.decide(M, _endpoint(0.0, -0.04, 0.04, 0.9, [0, 0, 0])).startswith("refuted")  # 0.04 < 0.10 / 2
    assert results.decide(M, _endpoint(0.03, -0.02, 0.08, 0.3, [0, 0, 0])).startswith("undecided")
    weak = _endpoint(-0.04, -0.08, -0.01, 0.01, [-0.04, -0.04, -0.04])  # interval below 0, but |M| < 0.05
    assert results.decide(weak, _endpoint(0.08, 0.02, 0.14, 0.01, [0.1] * 3)).startswith("uninformative")


def test_holm_tests_the_smaller_p_at_half_alpha():
    rng = np.random.default_rng(0)
    found = {"M": {"draws": rng.normal(-0.1, 0.03, 10000)}, "P": {"draws": rng.normal(0.04, 0.03, 10000)}}
    for e in found.values():
        e["p"] = min(1.0, 2 * min(np.mean(e["draws"] <= 0), np.mean(e["draws"] >= 0)))
    results.holm(found)
    assert found["M"]["level"] == pytest.approx(0.975) and found["P"]["level"] == pytest.approx(0.95)
    assert found["M"]["p_holm"] == pytest.approx(2 * found["M"]["p"])
    assert found["P"]["p_holm"] == pytest.approx(max(found["P"]["p"], found["M"]["p_holm"]))
    assert found["M"]["ci"][0] < np.percentile(found["M"]["draws"], 2.5)  # wider than the 95% interval


def _heldout(path, answers):
    """A held-out file: each prompt asks for lowercase; `answers` are its K answers."""
    rows = [{"id": f"h{i}", "prompt": f"q{i}", "constraints": [{"type": "lowercase"}], "responses": ys,
             "num_tokens": [len(y.split()) for y in ys], "finished": [True] * len(ys)} for i, ys in enumerate(answers)]
    path.parent.mkdir(parents=True, exist_ok=True)
    _write(path, rows)


def test_results_report_the_endpoints_once_every_seed_has_them(models, tmp_path):
    good, bad = ["all lower", "also lower"], ["Upper", "Upper too"]
    page = tmp_path / "RESULTS.md"
    page.write_text(f"# t\n\n{results.nd.BEGIN}\n{results.nd.END}\n\n## after\n")
    for seed in (0, 1, 2):
        data = tmp_path / f"seed{seed}" / "data"
        _heldout(data / "base_heldout.jsonl", [bad] * 6)
        _heldout(data / "clean" / "sppo" / "iter3" / "heldout.jsonl", [good] * 6)        # 1.0
        _heldout(data / "adversarial" / "sppo" / "iter3" / "heldout.jsonl", [bad] * 6)   # 0.0: M = -1
    results.main(folder=str(tmp_path), embedder=models["embedder"], bootstrap=200)
    assert json.loads((tmp_path / "endpoints.json").read_text())["complete"] is False  # S-SPPO's runs are missing
    assert "Endpoints: not yet" in page.read_text() and page.read_text().endswith("## after\n")
    for seed in (0, 1):
        _heldout(tmp_path / f"seed{seed}" / "data" / "adversarial" / "sspo" / "iter3" / "heldout.jsonl", [good] * 6)  # P = +1
    results.main(folder=str(tmp_path), embedder=models["embedder"], bootstrap=200)
    interim = json.loads((tmp_path / "endpoints.json").read_text())  # seed 2 lacks S-SPPO: seeds 0 and 1 are interim
    assert interim["complete"] is False and interim["verdict"] is None
    assert "decide nothing" in page.read_text() and "Verdict" not in page.read_text()
    _heldout(tmp_path / "seed2" / "data" / "adversarial" / "sspo" / "iter3" / "heldout.jsonl", [good] * 6)
    for seed in (0, 1, 2):  # S-SPPO under the clean oracle: an exploratory contrast, in no endpoint
        _heldout(tmp_path / f"seed{seed}" / "data" / "clean" / "sspo" / "iter3" / "heldout.jsonl", [bad] * 3 + [good] * 3)
    results.main(folder=str(tmp_path), embedder=models["embedder"], bootstrap=200)
    found = json.loads((tmp_path / "endpoints.json").read_text())
    assert found["M"]["mean"] == -1.0 and found["P"]["mean"] == 1.0
    assert found["M"]["per_seed"] == {"0": -1.0, "1": -1.0, "2": -1.0}
    assert found["verdict"].startswith("confirmed")
    extra = found["exploratory"]  # only the contrasts every seed has: no gating-alone runs here
    assert set(extra) == {"S-SPPO - SPPO, clean", "S-SPPO adversarial - S-SPPO clean"}
    assert extra["S-SPPO - SPPO, clean"]["mean"] == -0.5 and extra["S-SPPO adversarial - S-SPPO clean"]["mean"] == 0.5
    lo, hi = extra["S-SPPO - SPPO, clean"]["ci95"]
    assert -1.0 <= lo < -0.5 < hi <= 0.0  # prompts differ (half score -1, half 0), so the interval has width
    recs = json.loads((tmp_path / "results.json").read_text())
    assert {(r["seed"], r["condition"], r["arm"]) for r in recs} == {(s, c, a) for s in (0, 1, 2) for c, a in (
        (None, "base"), ("clean", "sppo"), ("adversarial", "sppo"), ("adversarial", "sspo"), ("clean", "sspo"))}
    text = page.read_text()
    assert "**Verdict (the rule fixed in advance): confirmed" in text and (tmp_path / "plot.png").exists()
    assert "NOT pre-registered" in text and "| S-SPPO - SPPO, clean | -0.500 |" in text
