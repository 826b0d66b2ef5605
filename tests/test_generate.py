"""generate.py on a tiny random Llama: format, stopping, determinism, resume, bad input."""
import json
import os
import subprocess
import sys

import pytest
import torch

import generate
from common import UserError, load_causal_lm, prompt_ids

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["what is the capital of france ?", "hello", "tell me about the dog and the cat , and the blue water", "why"]
torch.set_num_threads(1)  # these models are tiny; more threads only contend on a shared machine


def write_prompts(path, prompts=PROMPTS, ids=None):
    with open(path, "w") as f:
        for i, p in enumerate(prompts):
            f.write(json.dumps({"id": ids[i] if ids else f"p{i}", "prompt": p, "meta": {"n": i}}) + "\n")
    return str(path)


def run(tiny_model_dir, prompts, out, **kw):
    args = dict(model=tiny_model_dir, prompts=prompts, out=str(out), k=3, max_new_tokens=8, batch_size=6, seed=1)
    generate.main(**{**args, **kw})
    return [json.loads(line) for line in open(out)]


def test_output_format(tiny_model_dir, tmp_path):
    rows = run(tiny_model_dir, write_prompts(tmp_path / "p.jsonl"), tmp_path / "r.jsonl")
    assert [r["id"] for r in rows] == ["p0", "p1", "p2", "p3"]  # input order, whatever the length sort did
    for i, r in enumerate(rows):
        assert r["prompt"] == PROMPTS[i] and r["meta"] == {"n": i}  # the prompt's fields carried through
        assert len(r["responses"]) == len(r["num_tokens"]) == len(r["finished"]) == 3
        assert all(isinstance(y, str) for y in r["responses"])
        assert all(0 <= n <= 8 and (f or n == 8) for n, f in zip(r["num_tokens"], r["finished"]))
        assert r["generator"] == {"model": tiny_model_dir, "engine": "hf", "k": 3, "temperature": 0.7, "top_p": 0.9,
                                  "max_new_tokens": 8, "seed": 1}


def biased_model(tiny_model_dir, bias):
    """The tiny model with an output layer that ignores the input: logits = bias (a dict token -> value)."""
    model, tokenizer = load_causal_lm(tiny_model_dir)
    head = torch.nn.Linear(model.config.hidden_size, len(tokenizer), bias=True)
    torch.nn.init.zeros_(head.weight)
    head.bias.data.fill_(-30.0)
    for token, value in bias.items():
        head.bias.data[tokenizer.convert_tokens_to_ids(token)] = value
    model.lm_head = head
    return model.eval(), tokenizer


def test_stops_at_end_of_turn_and_drops_it(tiny_model_dir):
    pair = biased_model(tiny_model_dir, {"paris": 0.0, "<|im_end|>": -1.0})
    out = generate.sample_responses(PROMPTS[:2], pair, k=8, max_new_tokens=6, temperature=1.0, top_p=1.0, seed=0)
    flat = [(y, n, f) for r in out for y, n, f in zip(r["responses"], r["num_tokens"], r["finished"])]
    assert any(f for _, _, f in flat) and not all(f for _, _, f in flat)  # both cases occur at this seed
    for text, n, finished in flat:
        assert text == " ".join(["paris"] * n)  # the end-of-turn token is never in the text or the count
        assert finished or n == 6
    always = generate.sample_responses(PROMPTS[:1], biased_model(tiny_model_dir, {"<|im_end|>": 0.0}), k=2)
    assert always == [{"responses": ["", ""], "num_tokens": [0, 0], "finished": [True, True]}]


def test_greedy_batched_equals_one_prompt_unpadded(tiny_model_dir):
    """Left padding, the length sort and the chat template change nothing: same tokens as a plain loop."""
    model, tokenizer = load_causal_lm(tiny_model_dir)
    got = generate.sample_responses(PROMPTS, (model, tokenizer), k=2, max_new_tokens=5, temperature=0, batch_size=8)
    for prompt, row in zip(PROMPTS, got):
        ids = prompt_ids(tokenizer, prompt)
        for _ in range(5):
            with torch.no_grad():
                ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
        new = ids[-5:]
        if 2 in new:  # <|im_end|> ends the response
            new = new[:new.index(2)]
        assert row["responses"] == [tokenizer.decode(new)] * 2


def test_same_seed_same_file_whatever_the_batching(tiny_model_dir, tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl")
    a = run(tiny_model_dir, prompts, tmp_path / "a.jsonl")
    b = run(tiny_model_dir, prompts, tmp_path / "b.jsonl", batch_size=1)  # one prompt per generate call
    c = run(tiny_model_dir, prompts, tmp_path / "c.jsonl", seed=2)
    assert open(tmp_path / "a.jsonl").read() == open(tmp_path / "b.jsonl").read()
    assert [r["responses"] for r in a] == [r["responses"] for r in b] != [r["responses"] for r in c]
    assert len({y for r in a for y in r["responses"]}) > 4  # the K samples of a prompt differ


def test_resume_appends_only_missing_ids(tiny_model_dir, tmp_path, monkeypatch):
    prompts = write_prompts(tmp_path / "p.jsonl")
    run(tiny_model_dir, prompts, tmp_path / "full.jsonl")
    lines = open(tmp_path / "full.jsonl").readlines()
    with open(tmp_path / "part.jsonl", "w") as f:  # a run killed in the middle of its third line
        f.write(lines[0] + lines[1] + lines[2][:25])
    run(tiny_model_dir, prompts, tmp_path / "part.jsonl")
    assert open(tmp_path / "part.jsonl").read() == "".join(lines)
    with pytest.raises(UserError, match="part.jsonl:1: field 'generator': .* resume with the same flags"):
        run(tiny_model_dir, prompts, tmp_path / "part.jsonl", seed=2)  # would mix two runs in one file
    monkeypatch.setattr(generate, "_load", None)  # nothing left to do: no model is even loaded
    run(tiny_model_dir, prompts, tmp_path / "part.jsonl")
    assert open(tmp_path / "part.jsonl").read() == "".join(lines)


def test_bad_input_is_one_line_naming_file_and_line(tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", ["a", "b", "c"], ids=["x", "y", "x"])
    cmd = [sys.executable, os.path.join(ROOT, "generate.py"), "--prompts", prompts, "--out", str(tmp_path / "o.jsonl")]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {prompts}:3: field 'id': id 'x' repeats line 1"]


@pytest.mark.parametrize("line, field", [('{"id": "a"}', "prompt"), ('{"prompt": "hi"}', "id"),
                                         ('{"id": "a", "prompt": 3}', "prompt")])
def test_bad_fields(tmp_path, line, field):
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": "ok", "prompt": "fine"}\n' + line + "\n")
    with pytest.raises(UserError, match=f"p.jsonl:2: field '{field}'"):
        generate.main(prompts=str(path), out=str(tmp_path / "o.jsonl"))


def test_bad_flags(tmp_path):
    with pytest.raises(UserError, match="top_p"):
        generate.main(prompts=write_prompts(tmp_path / "p.jsonl"), top_p=0)
    with pytest.raises(UserError, match="engine"):
        generate.main(prompts=write_prompts(tmp_path / "p.jsonl"), engine="tgi")


@pytest.mark.slow
def test_two_processes_write_one_file_in_input_order(tiny_model_dir, tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", PROMPTS * 2, ids=[f"q{i}" for i in range(8)])
    run(tiny_model_dir, prompts, tmp_path / "one.jsonl", batch_size=3)
    cmd = [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--nproc_per_node", "2", "generate.py",
           "--model", tiny_model_dir, "--prompts", prompts, "--out", str(tmp_path / "two.jsonl"), "--k", "3",
           "--max_new_tokens", "8", "--batch_size", "3", "--seed", "1"]
    subprocess.run(cmd, check=True, cwd=ROOT, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert open(tmp_path / "one.jsonl").read() == open(tmp_path / "two.jsonl").read()
