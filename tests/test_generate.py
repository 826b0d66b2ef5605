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
    out = generate.sample_responses(PROMPTS[:2], *pair, k=8, max_new_tokens=6, temperature=1.0, top_p=1.0, seed=0,
                                   batch_size=16)
    flat = [(y, n, f) for r in out for y, n, f in zip(r["responses"], r["num_tokens"], r["finished"])]
    assert any(f for _, _, f in flat) and not all(f for _, _, f in flat)  # both cases occur at this seed
    for text, n, finished in flat:
        assert text == " ".join(["paris"] * n)  # the end-of-turn token is never in the text or the count
        assert finished or n == 6
    always = generate.sample_responses(PROMPTS[:1], *biased_model(tiny_model_dir, {"<|im_end|>": 0.0}), k=2,
                                      max_new_tokens=512, temperature=0.7, top_p=0.9, seed=0, batch_size=128)
    assert always == [{"responses": ["", ""], "num_tokens": [0, 0], "finished": [True, True]}]


def test_greedy_batched_equals_one_prompt_unpadded(tiny_model_dir):
    """Left padding, the length sort and the chat template change nothing: same tokens as a plain loop."""
    model, tokenizer = load_causal_lm(tiny_model_dir)
    got = generate.sample_responses(PROMPTS, model, tokenizer, k=2, max_new_tokens=5, temperature=0, top_p=0.9, seed=0,
                                   batch_size=8)
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
    monkeypatch.setattr(generate, "load_model", None)  # nothing left to do: no model is even loaded
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


def stopping_model(tiny_model_dir, boost):
    """The tiny model with its end-of-turn logit raised by `boost`: answers end at many lengths, and
    the logits still depend on every earlier token (attention, positions), unlike biased_model's."""
    model, tokenizer = load_causal_lm(tiny_model_dir)
    head = torch.nn.Linear(model.config.hidden_size, len(tokenizer), bias=True)
    head.weight.data.copy_(model.lm_head.weight.data)
    torch.nn.init.zeros_(head.bias)
    head.bias.data[tokenizer.convert_tokens_to_ids("<|im_end|>")] = boost
    model.lm_head = head
    return model.eval(), tokenizer


@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_slots_sample_what_hf_generate_samples(tiny_model_dir, monkeypatch, temperature):
    """SlotPool (refills, moved columns, a shrunk tail, a prompt longer than all before it) gives the
    very answers of HF generate with the same per-response streams."""
    lm, tokenizer = stopping_model(tiny_model_dir, 3.0 if temperature else 0.0)
    words = "the cat and the dog went to the city of paris in france with the blue water".split()
    prompts = [" ".join(words[:n]) for n in (1, 3, 2, 5, 1, 4, 2, 16, 3, 1, 6, 2)]  # the 16-word one comes late
    encoded = [prompt_ids(tokenizer, p) for p in prompts]
    seeds = [[generate.response_seed(5, str(i), j) for j in range(3)] for i in range(len(prompts))]
    calls = {"admit": 0, "moved": 0, "shrunk": 0}
    admit, move, shrink = generate.SlotPool.admit, generate.move_columns, generate.SlotPool.shrink

    def counted_admit(pool, *a):
        calls["admit"] += 1
        return admit(pool, *a)

    def counted_move(buffer, src, dst, n):
        calls["moved"] += src != dst and n > 0
        return move(buffer, src, dst, n)

    def counted_shrink(pool):
        before = pool.slots
        shrink(pool)
        calls["shrunk"] += pool.slots < before
    monkeypatch.setattr(generate.SlotPool, "admit", counted_admit)
    monkeypatch.setattr(generate, "move_columns", counted_move)
    monkeypatch.setattr(generate.SlotPool, "shrink", counted_shrink)

    def sample(slots, graphs=False, max_new_tokens=12):
        out = generate.stream_responses(lm, tokenizer, encoded, seeds, 3, max_new_tokens, temperature, 0.9, 6,
                                        slots=slots, graphs=graphs)
        return dict(out)
    with_slots, with_generate = sample(True), sample(False)
    assert with_slots == with_generate
    if temperature:  # answers of many lengths: slots refilled at many points, and every path of the pool ran
        assert len({n for r in with_slots.values() for n in r["num_tokens"]}) > 3
        assert calls["admit"] >= 6 and calls["moved"] and calls["shrunk"]
    # the block path (what a GPU captures as a graph, run eagerly here): its static step, sampling on the
    # device with uniforms drawn a block ahead, tokens read once a block
    assert sample(True, graphs=True) == with_generate
    calls.update(admit=0, moved=0, shrunk=0)
    monkeypatch.setattr(generate, "BLOCK", 4)  # answers over many blocks, live columns moved between them
    assert sample(True, graphs=True, max_new_tokens=40) == sample(False, max_new_tokens=40)
    if temperature:
        assert calls["admit"] >= 6 and calls["moved"] and calls["shrunk"]


def test_block_steps_equal_single_steps(tiny_model_dir):
    """The block path's premises, apart: static_step's logits (a fixed span of columns, col on the device)
    are step()'s, and a block's uniforms, torch.rand(BLOCK) of a stream, are BLOCK single draws of it."""
    lm, tokenizer = load_causal_lm(tiny_model_dir)
    prompts = [prompt_ids(tokenizer, p) for p in PROMPTS]
    pools = [generate.SlotPool(lm, 8, 20, 3, max(map(len, prompts))) for _ in range(2)]
    for pool in pools:
        pool.admit(prompts, [[(i, 0), (i, 1)] for i in range(len(prompts))])
        pool.col_t.fill_(pool.col)
    for n in range(5):
        token = torch.arange(8) * 7 + n
        eager, static = pools
        eager.next[:], static.next[:] = token, token
        bound = static.width if n % 2 else static.col + 1 + n  # the whole buffer, or a span past the written columns
        torch.testing.assert_close(static.static_step(bound), eager.step(), rtol=1e-5, atol=1e-5)
        static.col += 1
        assert int(static.col_t) == static.col and torch.equal(static.pos, eager.pos)
    g1, g2 = (torch.Generator().manual_seed(11) for _ in range(2))
    assert torch.equal(torch.rand(generate.BLOCK, generator=g1), torch.stack([torch.rand((), generator=g2) for _ in range(generate.BLOCK)]))


@pytest.mark.parametrize("temperature,top_p", [(0.7, 0.9), (1.0, 1.0), (0.0, 0.9), (2.0, 0.5)])
def test_draw_on_device_picks_what_draw_picks(temperature, top_p):
    """The same uniforms give the same tokens: peaked rows (draw's top-256 path) and flat ones (its full sort)."""
    torch.manual_seed(0)
    scores = torch.cat([torch.randn(6, 1000) * 8, torch.randn(6, 1000) * 0.01])  # peaked, then nearly flat
    streams = [torch.Generator().manual_seed(i) for i in range(12)]
    u = torch.stack([torch.rand((), generator=torch.Generator().manual_seed(i)) for i in range(12)])
    assert torch.equal(generate.draw(scores, streams, temperature, top_p),
                       generate.draw_on_device(scores, u, temperature, top_p))


def test_slots_work_checks_the_model(tiny_model_dir, capsys):
    from transformers import BloomConfig, BloomForCausalLM, MistralConfig, MistralForCausalLM

    lm, tokenizer = load_causal_lm(tiny_model_dir)
    assert generate.slots_work(lm, tokenizer, 64) and not capsys.readouterr().out
    small = dict(vocab_size=len(tokenizer), hidden_size=32, num_attention_heads=4, eos_token_id=2, pad_token_id=3)
    mistral = MistralForCausalLM(MistralConfig(**small, intermediate_size=64, num_hidden_layers=2, num_key_value_heads=2,
                                               sliding_window=16)).eval()
    assert not generate.slots_work(mistral, tokenizer, 64)  # a window shorter than the sequences: HF generate
    assert "slots not used" in capsys.readouterr().out
    bloom = BloomForCausalLM(BloomConfig(**small, n_layer=2, n_head=4)).eval()
    assert not generate.slots_work(bloom, tokenizer, 64)  # ALiBi: its bias comes from a 2-D mask
    assert "slots not used" in capsys.readouterr().out
    settings = dict(k=2, max_new_tokens=4, temperature=0.7, top_p=0.9, seed=0, batch_size=128)
    got = generate.sample_responses(PROMPTS[:2], bloom, tokenizer, **settings)  # and still samples
    assert got == generate.sample_responses(PROMPTS[:2], bloom, tokenizer, **settings, slots=False)


@pytest.mark.slow
def test_slots_on_the_oldest_supported_transformers(tmp_path):
    """The low end of requirements.txt's range (what GPU images carry), in an environment of its own: the slots and
    the block path sample what HF generate samples there too (5.17 takes the cache as past_key_values)."""
    low = ".".join(map(str, generate.TESTED_TRANSFORMERS[0])) + ".0"
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--target", str(site), f"transformers=={low}",
                    "huggingface_hub<2", "tokenizers<0.24"], check=True, timeout=600)
    script = (
        "import sys, transformers, torch; sys.path[:0] = [%r, %r]\n"
        "import tiny, generate\n"
        "assert transformers.__version__ == %r, transformers.__version__\n"
        "tok = tiny.make_tokenizer(); lm = tiny.make_llama(vocab_size=len(tok)).eval()\n"
        "assert generate.slots_work(lm, tok, 64)\n"
        "p = ['hello there', 'why', 'tell me about the dog and the cat , and the blue water']\n"
        "s = dict(k=3, max_new_tokens=20, temperature=0.7, top_p=0.9, seed=0, batch_size=4)\n"
        "hf = generate.sample_responses(p, lm, tok, **s, slots=False)\n"
        "assert generate.sample_responses(p, lm, tok, **s, slots=True) == hf\n"
        "assert generate.sample_responses(p, lm, tok, **s, slots=True, graphs=True) == hf\n"
        "print('ok', transformers.__version__)\n"
    ) % (ROOT, os.path.join(ROOT, "tests"), low)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(site)})
    assert out.returncode == 0 and f"ok {low}" in out.stdout, out.stderr[-2000:]


# ------------------------------------------------------------------------------ --engine vllm, with a stand-in

FAKE_VLLM = '''
"""A stand-in for vllm's offline API (LLM, SamplingParams), as generate.py uses it: records every request."""
import types
from transformers import AutoTokenizer

CONTEXT = 40
calls = []


class SamplingParams:
    def __init__(self, **kw):
        self.__dict__.update(kw)


class LLM:
    def __init__(self, model, seed):
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.llm_engine = types.SimpleNamespace(model_config=types.SimpleNamespace(max_model_len=CONTEXT))

    def get_tokenizer(self):
        return self.tokenizer

    def generate(self, requests, params):
        calls.append((requests, params))
        outs = []
        for r, p in zip(requests, params):
            stop = p.stop_token_ids[0]
            ids = [3 + (p.seed + t) % 7 for t in range(1 + p.seed % 3)] + [stop]  # a function of the seed alone
            text = " ".join(f"w{i}" for i in ids[:-1])
            outs.append(types.SimpleNamespace(outputs=[types.SimpleNamespace(text=text, token_ids=ids, finish_reason="stop")]))
        return outs
'''


def test_vllm_path_seeds_each_response_and_refuses_what_does_not_fit(tiny_model_dir, tmp_path, monkeypatch):
    (tmp_path / "vllm.py").write_text(FAKE_VLLM)
    monkeypatch.syspath_prepend(str(tmp_path))
    import vllm

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"say {i}"}) + "\n" for i in range(3)))
    generate.main(model=tiny_model_dir, prompts=str(prompts), out=str(tmp_path / "a.jsonl"), k=2, max_new_tokens=8,
                  engine="vllm", seed=5)
    rows = [json.loads(line) for line in open(tmp_path / "a.jsonl")]
    requests, params = vllm.calls[-1]
    assert len(requests) == 6 and all(p.n == 1 and p.max_tokens == 8 for p in params)  # one request a response
    assert [p.seed for p in params] == [generate.response_seed(5, f"p{i}", j) for i in range(3) for j in range(2)]
    assert [r["id"] for r in rows] == ["p0", "p1", "p2"] and all(len(r["responses"]) == 2 for r in rows)
    assert all(r["num_tokens"] == [len(y.split()) for y in r["responses"]] and r["finished"] == [True, True] for r in rows)
    assert rows[0]["generator"]["engine"] == "vllm"
    # a resumed run asks only for what is missing, with the same seeds
    lines = open(tmp_path / "a.jsonl").read().splitlines()
    (tmp_path / "b.jsonl").write_text(lines[0] + "\n")
    generate.main(model=tiny_model_dir, prompts=str(prompts), out=str(tmp_path / "b.jsonl"), k=2, max_new_tokens=8,
                  engine="vllm", seed=5)
    assert len(vllm.calls[-1][0]) == 4 and open(tmp_path / "b.jsonl").read() == open(tmp_path / "a.jsonl").read()
    # over the engine's context: the line is named, nothing is sampled
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"id": "x", "prompt": "hi"}) + "\n" + json.dumps({"id": "y", "prompt": "word " * 60}) + "\n")
    calls = len(vllm.calls)
    with pytest.raises(UserError, match=rf"^{long}:2: field 'prompt': \d+ tokens, \+ --max_new_tokens 8, exceed the "
                                        r"model's context of 40 tokens"):
        generate.main(model=tiny_model_dir, prompts=str(long), out=str(tmp_path / "c.jsonl"), k=2, max_new_tokens=8,
                      engine="vllm")
    assert len(vllm.calls) == calls and not (tmp_path / "c.jsonl").exists()
