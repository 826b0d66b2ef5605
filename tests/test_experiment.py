"""experiments/near_duplicates (issue 13): the overconfident rewrite, the trained-pair extract, results.py,
iterate.sh's REWRITE stage and run.sh end to end, killed and resumed, on tiny random models."""
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import sspo
from common import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.join(ROOT, "experiments", "near_duplicates")


def _load(name):
    spec = importlib.util.spec_from_file_location(f"near_duplicates_{name}", os.path.join(HERE, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


overconfident, trained_pairs, results = _load("overconfident"), _load("trained_pairs"), _load("results")


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def _read_jsonl(path):
    return [json.loads(line) for line in open(path)]


def _scored_row(i, P_upper, S_upper, k=3):
    """A scored row with P_ij / S_ij for i < j given in (0,1), (0,2), (1,2), ... order."""
    P, S = np.full((k, k), 0.5), np.eye(k)
    for (a, b), p, s in zip([(a, b) for a in range(k) for b in range(a + 1, k)], P_upper, S_upper):
        P[a, b], P[b, a], S[a, b], S[b, a] = p, 1 - p, s, s
    return {"id": f"p{i}", "prompt": f"prompt {i}", "responses": [f"answer {i} {j}" for j in range(k)],
            "constraints": [{"type": "no_commas"}], "pref": P.tolist(), "sim": S.tolist(), "oracle": {"kind": "rule"}}


# ------------------------------------------------------------------------------ overconfident.py

def test_overconfident_changes_exactly_the_similar_pairs_and_reruns_the_same(tmp_path):
    rows = [_scored_row(0, [0.7, 0.5, 0.2], [0.85, 0.3, 0.8]),  # (0,1) and (1,2) at or above 0.8
            _scored_row(1, [0.5, 0.6, 0.5], [0.1, 0.79, 0.2])]  # none
    data = _write_jsonl(tmp_path / "scored.jsonl", rows)
    overconfident.main(data, str(tmp_path / "a.jsonl"), threshold=0.8, seed=3)
    out = _read_jsonl(tmp_path / "a.jsonl")
    assert [row["corrupted"] for row in out] == [[[0, 1], [1, 2]], []]
    for before, after in zip(rows, out):
        P, P0 = np.array(after["pref"]), np.array(before["pref"])
        assert np.allclose(P + P.T, 1) and np.allclose(np.diag(P), 0.5)
        for i, j in after["corrupted"]:
            assert sorted([P[i, j], P[j, i]]) == pytest.approx([0.05, 0.95])
        untouched = np.ones_like(P, dtype=bool)
        for i, j in after["corrupted"]:
            untouched[i, j] = untouched[j, i] = False
        assert np.array_equal(P[untouched], P0[untouched])
        assert {k: v for k, v in after.items() if k not in ("pref", "corrupted", "rewrite")} == \
            {k: v for k, v in before.items() if k != "pref"}
        assert after["rewrite"] == {"kind": "overconfident", "pairs": "similar", "threshold": 0.8, "verdict": 0.95, "seed": 3}
    overconfident.main(data, str(tmp_path / "b.jsonl"), threshold=0.8, seed=3)
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()  # deterministic


def test_overconfident_directions_are_random_and_seeded(tmp_path):
    data = _write_jsonl(tmp_path / "scored.jsonl", [_scored_row(i, [0.5] * 3, [0.9] * 3) for i in range(40)])

    def winners(seed):
        overconfident.main(data, str(tmp_path / f"{seed}.jsonl"), seed=seed)
        return [P[i][j] > 0.5 for P in (row["pref"] for row in _read_jsonl(tmp_path / f"{seed}.jsonl"))
                for i, j in ((0, 1), (0, 2), (1, 2))]

    first = winners(0)
    assert 0.3 < np.mean(first) < 0.7  # 120 coins: either direction about half the time
    assert winners(1) != first


def test_overconfident_random_pairs_hit_the_share(tmp_path):
    data = _write_jsonl(tmp_path / "scored.jsonl", [_scored_row(i, [0.6] * 6, [0.1 * (i % 5)] * 6, k=4) for i in range(20)])
    overconfident.main(data, str(tmp_path / "out.jsonl"), pairs="random", share=0.25, seed=0)
    out = _read_jsonl(tmp_path / "out.jsonl")
    assert sum(len(row["corrupted"]) for row in out) == 30  # 25% of 20 x 6 pairs, whatever their similarity
    assert out[0]["rewrite"]["pairs"] == "random" and out[0]["rewrite"]["share"] == 0.25


def test_overconfident_bad_input_is_one_line(tmp_path):
    bad = _scored_row(0, [0.5] * 3, [0.9] * 3)
    del bad["sim"]
    data = _write_jsonl(tmp_path / "scored.jsonl", [_scored_row(1, [0.5] * 3, [0.9] * 3), bad])
    result = subprocess.run([sys.executable, os.path.join(HERE, "overconfident.py"), "--data", data, "--out",
                             str(tmp_path / "out.jsonl")], capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [f"error: {data}:2: field 'sim': must be "
                                                                            "a 3 x 3 list of numbers (K = number of responses)"]
    assert not (tmp_path / "out.jsonl").exists()
    with pytest.raises(UserError, match="--share"):
        overconfident.main(data, str(tmp_path / "out.jsonl"), pairs="random")
    once = _write_jsonl(tmp_path / "once.jsonl", [_scored_row(1, [0.5] * 3, [0.9] * 3)])
    overconfident.main(once, str(tmp_path / "twice.jsonl"))
    with pytest.raises(UserError, match="rewritten already"):
        overconfident.main(str(tmp_path / "twice.jsonl"), str(tmp_path / "thrice.jsonl"))


# ------------------------------------------------------------------------------ trained_pairs.py

def test_trained_pairs_follow_sspo_selection(tmp_path):
    # Row 0: answer 0 beats 1 only through a near-duplicate verdict (sim 0.95, gated for sspo) and loses to 2
    # by a little: sspo trains (2, 1) or so, sppo (0, 1). Row 1 ties everywhere: skipped.
    rows = [_scored_row(0, [0.95, 0.45, 0.4], [0.95, 0.2, 0.2]), _scored_row(1, [0.5] * 3, [0.1] * 3)]
    rows[0]["corrupted"] = [[0, 1]]
    data = _write_jsonl(tmp_path / "scored.jsonl", rows)
    for loss in ("sspo", "sppo"):
        model_dir = tmp_path / loss
        model_dir.mkdir()
        (model_dir / "run_config.json").write_text(json.dumps({"data": data, "loss": loss, "tau_low": 0.6, "tau_high": 0.9}))
        sspo.write_pairs(str(model_dir), sspo.load_pairs(data, loss, 0.6, 0.9)[0])  # as sspo.main writes them
        trained_pairs.main(str(model_dir), str(model_dir / "extract.jsonl"))
    sspo_rows, sppo_rows = _read_jsonl(tmp_path / "sspo" / "extract.jsonl"), _read_jsonl(tmp_path / "sppo" / "extract.jsonl")
    assert (sppo_rows[0]["chosen"], sppo_rows[0]["rejected"], sppo_rows[0]["pair_corrupted"]) == (0, 1, True)
    assert sppo_rows[0]["similarity"] == 0.95
    assert (sspo_rows[0]["chosen"], sspo_rows[0]["rejected"]) == (2, 1) and sspo_rows[0]["pair_corrupted"] is False
    assert sspo_rows[1]["chosen"] is None and sspo_rows[1]["pairs"] == 3


# ------------------------------------------------------------------------------------ results.py

def _heldout(path, answers, constraints):
    rows = [{"id": f"h{i}", "prompt": f"q{i}", "constraints": c, "responses": ys, "num_tokens": [len(y.split()) for y in ys],
             "finished": [len(y.split()) < 3 for y in ys]} for i, (ys, c) in enumerate(zip(answers, constraints))]
    path.parent.mkdir(parents=True, exist_ok=True)
    return _write_jsonl(path, rows)


def test_results_from_committed_files_partial(models, tmp_path):
    constraints = [[{"type": "lowercase"}], [{"type": "max_words", "n": 2}, {"type": "no_commas"}]]
    data = tmp_path / "data"
    # base: prompt 0 scores 1, 0 -> 0.5; prompt 1 "a b" 1, "a, b c" 0 -> 0.5: mean 0.5
    _heldout(data / "base_heldout.jsonl", [["hello world", "Hello"], ["a b", "a, b c"]], constraints)
    # clean/sspo/iter1: prompt 0 1, 1 -> 1; prompt 1 "a b" 1, "a b c" 1/2 -> 0.75: mean 0.875
    _heldout(data / "clean" / "sspo" / "iter1" / "heldout.jsonl", [["hello", "hello there"], ["a b", "a b c"]], constraints)
    run = data / "overconfident" / "sppo" / "iter1"
    _heldout(run / "heldout.jsonl", [["Hi there", "Hi there"], ["a, b c", "a, b c"]], constraints)  # 0
    _write_jsonl(run / "trained_pairs.jsonl", [
        {"id": "t0", "chosen": 0, "rejected": 1, "similarity": 0.9, "pairs": 6, "corrupted": [[0, 1], [2, 3]], "pair_corrupted": True},
        {"id": "t1", "chosen": 2, "rejected": 0, "similarity": 0.5, "pairs": 6, "corrupted": [], "pair_corrupted": False},
        {"id": "t2", "chosen": None, "rejected": None, "similarity": None, "pairs": 6, "corrupted": [], "pair_corrupted": None}])
    _write_jsonl(run / "metrics.jsonl", [{"step": 1, "latent_dist": 0.2, "gate_mean": 0.0},
                                          {"step": 2, "latent_dist": 0.4, "gate_mean": 0.0}])
    _write_jsonl(tmp_path / "wall_time.jsonl", [{"condition": "clean", "arm": "sspo", "iteration": 1, "seconds": 4000}])
    (tmp_path / "RESULTS.md").write_text(results.PAGE.replace("(written once the numbers exist)", "The lead's words."))

    results.main(folder=str(tmp_path), embedder=models["embedder"], bootstrap=200)
    recs = json.loads((tmp_path / "results.json").read_text())
    assert [(r["arm"], r["condition"], r["iteration"]) for r in recs] == [("base", None, 0), ("sspo", "clean", 1),
                                                                        ("sppo", "overconfident", 1)]
    base, sspo, sppo = recs
    assert base["constraint_score"] == pytest.approx(0.5) and base["heldout"] == "data/base_heldout.jsonl"
    assert sspo["constraint_score"] == pytest.approx(0.875) and sspo["vs_base"] == pytest.approx(0.375)
    assert sspo["heldout"] == "data/clean/sspo/iter1/heldout.jsonl" and sspo["prompts"] == 2 and sspo["k"] == 2
    assert sspo["meets_all"] == pytest.approx(0.75) and sspo["mean_tokens"] == pytest.approx(2.0)
    assert sspo["hit_limit_share"] == pytest.approx(0.25) and sspo["pairs"] is None  # no training files: null
    assert sppo["constraint_score"] == 0 and sppo["distinct_2"] == pytest.approx(0.5)
    assert sppo["self_similarity"] == pytest.approx(1.0)  # two identical answers per prompt
    assert sppo["pairs"] == 2 and sppo["near_duplicate_pair_share"] == 0.5 and sppo["latent_distance"] == pytest.approx(0.3)
    assert sppo["corrupted_share"] == pytest.approx(2 / 18) and sppo["trained_pair_corrupted_share"] == 0.5
    for field in ("constraint_ci", "vs_base_ci", "win_rate_vs_base", "self_similarity", "distinct_2"):
        assert field in sspo
    assert (tmp_path / "plot.png").stat().st_size > 0
    page = (tmp_path / "RESULTS.md").read_text()
    assert "The lead's words." in page and "| clean | sspo | 1 | 0.875" in page and "1 h 7 min over 1" in page
    results.main(folder=str(tmp_path), embedder=models["embedder"], bootstrap=200)  # the table is replaced, not added
    assert (tmp_path / "RESULTS.md").read_text() == page


def test_contrasts_pair_prompts_within_an_oracle_and_across_oracles(models, tmp_path):
    constraints = [[{"type": "lowercase"}], [{"type": "no_commas"}]]
    data = tmp_path / "data"
    _heldout(data / "base_heldout.jsonl", [["Hi", "Hi"], ["a, b", "a, b"]], constraints)  # 0
    _heldout(data / "clean" / "sppo" / "iter1" / "heldout.jsonl", [["hi", "Hi"], ["a, b", "a, b"]], constraints)  # 0.25
    _heldout(data / "clean" / "sspo" / "iter1" / "heldout.jsonl", [["hi", "hi"], ["a b", "a, b"]], constraints)  # 0.75
    _heldout(data / "overconfident" / "sppo" / "iter1" / "heldout.jsonl", [["Hi", "Hi"], ["a b", "a b"]], constraints)  # 0.5
    _heldout(data / "clean" / "sspo_gate" / "iter1" / "heldout.jsonl", [["Hi", "Hi"], ["a b", "a b"]], constraints)  # 0.5
    results.main(folder=str(tmp_path), embedder=models["embedder"], bootstrap=200)
    rows = json.loads((tmp_path / "contrasts.json").read_text())
    got = {(r["condition"], r["arm"], r["minus_condition"], r["minus_arm"]): r for r in rows}
    assert set(got) == {("clean", "sspo", "clean", "sppo"), ("overconfident", "sppo", "clean", "sppo"),
                        ("clean", "sspo_gate", "clean", "sppo"), ("clean", "sspo_gate", "clean", "sspo")}
    assert got["clean", "sspo_gate", "clean", "sspo"]["constraint_difference"] == pytest.approx(-0.25)
    within, across = got["clean", "sspo", "clean", "sppo"], got["overconfident", "sppo", "clean", "sppo"]
    assert within["constraint_difference"] == pytest.approx(0.5) and across["constraint_difference"] == pytest.approx(0.25)
    lo, hi = within["constraint_difference_ci"]  # per prompt: +0.5 and +0.5, so every resample gives +0.5
    assert lo == pytest.approx(0.5) and hi == pytest.approx(0.5) and within["mean_tokens_difference"] == pytest.approx(0.0)
    page = (tmp_path / "RESULTS.md").read_text()
    assert "| clean | sspo | 1 | sppo | +0.500 [+0.500, +0.500] |" in page
    assert "| clean | sspo_gate | 1 | sspo | -0.250" in page
    assert "| overconfident | sppo | 1 | sppo under clean | +0.250" in page


def test_demo_settings_live_in_one_file():
    """make demo and run.sh (its defaults) both read scripts/demo.env, and neither repeats a value of it."""
    env = subprocess.run(["bash", "-c", "source scripts/demo.env && echo $DEMO_K $DEMO_MAX_NEW_TOKENS $DEMO_SSPO_ARGS"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    assert env[:2] == ["4", "96"] and env[2:4] == ["--beta", "0.02"]
    makefile = open(os.path.join(ROOT, "Makefile")).read()
    demo = makefile[makefile.index("\ndemo:"):makefile.index("\nexperiment:")]
    run_sh = open(os.path.join(HERE, "run.sh")).read()
    for text in (demo, run_sh):
        assert "scripts/demo.env" in text and "--beta" not in text and "96" not in text
    assert 'SSPO_ARGS="${SSPO_ARGS:-$DEMO_SSPO_ARGS}"' in run_sh
    dry = subprocess.run(["make", "-n", "demo"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "$DEMO_SSPO_ARGS" in dry and "K=$DEMO_K" in dry and "MAX_NEW_TOKENS=$DEMO_MAX_NEW_TOKENS" in dry


# ------------------------------------------------------------------------ iterate.sh and run.sh

def _tiny_prompts(tmp_path):
    """Prompts whose graded credit separates a tiny random model's answers (word counts, commas)."""
    train = [{"id": f"t{i}", "prompt": p, "constraints": [{"type": "min_words", "n": 20}, {"type": "no_commas"}]}
             for i, p in enumerate(["what is the capital of france ?", "name three colors", "hello world",
                                    "write about water", "tell me about dogs", "say something"])]
    heldout = [{"id": f"h{i}", "prompt": p, "constraints": [{"type": "max_words", "n": 4}, {"type": "no_commas"}]}
               for i, p in enumerate(["what is water ?", "say hello", "name a city"])]
    return _write_jsonl(tmp_path / "train.jsonl", train), _write_jsonl(tmp_path / "heldout.jsonl", heldout)


@pytest.mark.slow
def test_iterate_runs_the_rewrite_stage(tiny_model_dir, models, tmp_path):
    train, _ = _tiny_prompts(tmp_path)
    out = tmp_path / "run"
    rewrite = f"{sys.executable} {os.path.join(HERE, 'overconfident.py')} --threshold -1"  # every pair
    env = dict(os.environ, MODEL=tiny_model_dir, K="3", MAX_NEW_TOKENS="8", ITERS="1", ORACLE="rule",
               EMBEDDER=models["embedder"], OUT=str(out), PROMPTS=train, HELDOUT="none", REWRITE=rewrite,
               SSPO_ARGS="--batch_size 2 --max_length 64 --loss sppo", GENERATE_ARGS="--batch_size 8", OMP_NUM_THREADS="1")

    def iterate(**more):
        result = subprocess.run(["bash", os.path.join(ROOT, "scripts", "iterate.sh")], env={**env, **more},
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        return [line for line in result.stdout.splitlines() if line.startswith("== ")]

    data_only = iterate(DATA_ONLY="1")  # the training data, to inspect before training
    assert data_only[-1] == f"== DATA_ONLY=1: stopped before training iteration 1 ({out}/iter1/rewritten.jsonl)"
    assert (out / "iter1" / "rewritten.jsonl.done").exists() and not (out / "iter1" / "model").exists()
    first = iterate()
    assert f"== skip, already done: {out}/iter1/rewritten.jsonl" in first
    rewritten = out / "iter1" / "rewritten.jsonl"
    assert any("overconfident.py" in line for line in data_only) and any("sspo.py" in line for line in first)
    assert all(len(row["corrupted"]) == 3 for row in _read_jsonl(rewritten))
    config = json.loads((out / "iter1" / "model" / "run_config.json").read_text())
    assert config["data"] == str(rewritten)  # sspo.py trained on the rewritten file
    second = iterate()
    assert f"== skip, already done: {rewritten}" in second
    os.remove(out / "iter1" / "scored.jsonl")  # the rewrite and the training are made again from new scores
    third = iterate()
    assert any("overconfident.py" in line for line in third) and any("sspo.py" in line for line in third)


@pytest.mark.slow
def test_run_sh_killed_and_resumed(tiny_model_dir, models, tmp_path):
    """The whole experiment on tiny models (2 arms x 2 conditions x 2 iterations), killed half way and resumed."""
    train, heldout = _tiny_prompts(tmp_path)
    runs, dest = tmp_path / "runs", tmp_path / "dest"
    env = dict(os.environ, MODEL=tiny_model_dir, EMBEDDER=models["embedder"], ARMS="sspo dpo", ITERS="2",
               TRAIN_PROMPTS=train, HELDOUT=heldout, K="3", HELDOUT_K="2", MAX_NEW_TOKENS="12", RUNS=str(runs),
               DEST=str(dest), GENERATE_ARGS="--batch_size 8", PYTHON=sys.executable, OMP_NUM_THREADS="1",
               # the tiny embedder finds most answers alike: gate only the closest, or sspo has no pair left
               SSPO_ARGS="--batch_size 2 --max_length 64 --lr 1e-3 --tau_low 0.99 --tau_high 0.999")
    command = ["bash", os.path.join(HERE, "run.sh")]
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    halfway = runs / "clean" / "sspo" / "iter1" / "report.json.done"  # the third call: an arm and condition at a time
    deadline = time.time() + 600
    while not halfway.exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    os.killpg(first.pid, signal.SIGTERM)  # the whole group: run.sh, iterate.sh and the stage running
    first.wait()
    log.close()
    assert halfway.exists(), (tmp_path / "first.log").read_text()[-3000:]
    assert not (runs / "overconfident" / "dpo" / "iter1" / "model" / "summary.json").exists()

    second = subprocess.run(command, env=env, capture_output=True, text=True)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    lines = second.stdout.splitlines()
    assert "8 iterate.sh calls, 5 still to run" in lines[0]  # the plan counts what is left
    for run in ("overconfident/sspo/iter1", "overconfident/sspo/iter2", "clean/sspo/iter1"):  # made before the kill:
        assert f"== skip, already done: {runs}/{run}/model" in lines  # kept, not trained again
        assert not any(f"--output_dir {runs}/{run}/model" in line for line in lines)

    for f in ("base_heldout.jsonl", "iter1/responses.jsonl", "iter1/scored.jsonl"):  # made once, shared by all
        made = {(runs / c / a / f).read_bytes() for c in ("clean", "overconfident") for a in ("sspo", "dpo")}
        assert len(made) == 1, f
    assert (runs / "overconfident" / "sspo" / "iter1" / "rewritten.jsonl").read_bytes() == \
        (runs / "overconfident" / "dpo" / "iter1" / "rewritten.jsonl").read_bytes()
    assert not (runs / "clean" / "sspo" / "iter1" / "rewritten.jsonl").exists()
    assert (runs / "overconfident" / "dpo" / "iter2" / "rewritten.jsonl.done").exists()

    recs = json.loads((dest / "results.json").read_text())
    assert len(recs) == 1 + 2 * 2 * 2
    assert {(r["condition"], r["arm"], r["iteration"]) for r in recs[1:]} == \
        {(c, a, t) for c in ("clean", "overconfident") for a in ("sspo", "dpo") for t in (1, 2)}
    for r in recs:
        assert (dest / r["heldout"]).exists()
    assert all(r["corrupted_share"] > 0 for r in recs if r["condition"] == "overconfident")
    assert (dest / "plot.png").exists() and "| overconfident | dpo | 2 |" in (dest / "RESULTS.md").read_text()
    assert len(_read_jsonl(dest / "wall_time.jsonl")) >= 8

    # a fresh checkout: the committed results but no models; finished arms are not run again
    os.rename(runs, tmp_path / "runs-gone")
    third = subprocess.run(command, env=env, capture_output=True, text=True)
    assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-3000:]
    for c in ("clean", "overconfident"):
        for a in ("sspo", "dpo"):
            assert f"== {c} / {a}: all 2 iterations are in {dest} already (an earlier checkout): skipped" in third.stdout
    assert json.loads((dest / "results.json").read_text()) == recs
