"""sspo.py beyond the loss: data, tokenisation, the scorer, real training runs, DDP, resume, bad input."""
import contextlib
import json
import math
import os
import platform
import random
import subprocess
import sys

import pytest
import torch

import common
import sspo
import tuning
from tiny import WORDS, game, load_weights, logratios, make_tokenizer, run_sspo, write_scored

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------- pair picking

def test_calibration_changes_the_pair_only_for_sspo(tmp_path):
    # Response 0 beats 1 by a hair in raw win rate, but 0 is a near-paraphrase of 2 and 3 (sim 0.99),
    # so calibration pulls 0's wins over them to 1/2; the calibrated winner is 1.
    pref = [[0.5, 0.45, 1.0, 1.0], [0.55, 0.5, 0.8, 0.8], [0.0, 0.2, 0.5, 0.5], [0.0, 0.2, 0.5, 0.5]]
    sim = [[1, 0.1, 0.99, 0.99], [0.1, 1, 0.1, 0.1], [0.99, 0.1, 1, 0.1], [0.99, 0.1, 0.1, 1]]
    path = tmp_path / "s.jsonl"
    path.write_text(json.dumps({"id": "a", "prompt": "q", "responses": ["r0", "r1", "r2", "r3"], "pref": pref, "sim": sim}) + "\n")
    raw, _ = sspo.load_pairs(str(path), "sppo", 0.5, 0.9)
    cal, _ = sspo.load_pairs(str(path), "sspo", 0.5, 0.9)
    assert (raw[0]["chosen"], raw[0]["rejected"]) == ("r0", "r2")
    assert (cal[0]["chosen"], cal[0]["rejected"]) == ("r1", "r2")
    expected = sspo.win_rates(sspo.calibrate(torch.tensor(pref, dtype=torch.float64), torch.tensor(sim, dtype=torch.float64), 0.5, 0.9))
    assert cal[0]["chosen_winrate"] == pytest.approx(float(expected[1]))
    assert raw[0]["chosen_winrate"] == pytest.approx(2.95 / 4)


def test_ties_are_skipped_and_counted(tmp_path):
    tie = [[0.5] * 3 for _ in range(3)]
    pref, sim = game([2, 1, 0], {})
    path = tmp_path / "s.jsonl"
    rows = [{"prompt": "a", "responses": ["x", "y", "z"], "pref": tie, "sim": sim},
            {"prompt": "b", "responses": ["x", "y", "z"], "pref": pref, "sim": sim}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs, stats = sspo.load_pairs(str(path), "sspo", 0.5, 0.9)
    assert stats == {"rows": 2, "pairs": 1, "skipped_ties": 1}
    assert (pairs[0]["chosen"], pairs[0]["rejected"]) == ("x", "z")


def test_pairs_format_and_its_similarity_gate(tmp_path):
    path = tmp_path / "p.jsonl"
    rows = [{"prompt": "a", "chosen": "x", "rejected": "y", "chosen_winrate": 0.9, "rejected_winrate": 0.2, "similarity": 0.7},
            {"prompt": "b", "chosen": "x", "rejected": "y", "chosen_winrate": 0.9, "rejected_winrate": 0.2}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    sppo_pairs, _ = sspo.load_pairs(str(path), "sppo", 0.5, 0.9)
    sspo_pairs, _ = sspo.load_pairs(str(path), "sspo", 0.5, 0.9)
    assert [p["chosen_winrate"] for p in sppo_pairs] == [0.9, 0.9]
    assert sspo_pairs[0]["chosen_winrate"] == pytest.approx(0.5 + 0.5 * 0.4)  # gate 0.5
    assert sspo_pairs[0]["rejected_winrate"] == pytest.approx(0.5 - 0.5 * 0.3)
    assert sspo_pairs[1]["chosen_winrate"] == 0.9


def test_step_batches_cover_each_pair_once_per_epoch_and_group_by_length():
    rng = random.Random(3)
    lengths = [rng.randint(10, 500) for _ in range(1000)]
    for group in (False, True):
        steps = sspo.step_batches(lengths, 16, seed=5, epochs=2, group_by_length=group)
        assert steps == sspo.step_batches(lengths, 16, seed=5, epochs=2, group_by_length=group)  # seeded
        assert steps != sspo.step_batches(lengths, 16, seed=6, epochs=2, group_by_length=group)
        half = len(steps) // 2
        for epoch in (steps[:half], steps[half:]):
            assert sorted(i for s in epoch for i in s) == list(range(1000))
        assert steps[:half] != steps[half:]  # a fresh order each epoch
        # padding: what a step wastes padding each micro-batch of 4 to its longest
        waste = sum(max(lengths[i] for i in m) * len(m) - sum(lengths[i] for i in m)
                    for s in steps for m in sspo.micro_batches(s, 4) if m)
        if group:
            assert waste < 0.2 * ungrouped_waste
        ungrouped_waste = waste


def test_micro_batches_split_evenly():
    assert sspo.micro_batches(list(range(7)), 3) == [[0, 1, 2], [3, 4], [5, 6]]
    assert sspo.micro_batches([1, 2], 4) == [[1], [2], [], []]


# ------------------------------------------------------------------------------- tokenisation

def test_scored_tokens_are_exactly_the_responses_tokens(tiny_model_dir):
    tokenizer = common.load_tokenizer(tiny_model_dir)
    pairs = [dict(prompt="what is the capital of france ?", chosen="paris is the capital .", rejected="a dog",
                  chosen_winrate=0.8, rejected_winrate=0.2, gate=0.0)]
    examples, truncated = sspo.tokenize_pairs(pairs, tokenizer, 256)
    eot = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for share in (False, True):
        batch = sspo.collate(examples, tokenizer.pad_token_id, share_prompt=share)
        for seq, text in ((0, "paris is the capital ."), (1, "a dog")):
            mine = batch["resp_seq"] == seq
            scored = batch["input_ids"][batch["resp_row"][mine], batch["resp_pos"][mine]].tolist()
            assert scored == tokenizer(text, add_special_tokens=False)["input_ids"] + [eot]
            row = int(batch["resp_row"][mine][0])
            prompt = batch["input_ids"][row][:len(examples[0]["prompt_ids"])].tolist()
            assert prompt == common.prompt_ids(tokenizer, pairs[0]["prompt"])
            assert tokenizer.decode(prompt).endswith("<|im_start|> assistant")
    assert truncated == 0


def test_no_double_bos(tmp_path):
    """A Llama-style tokenizer adds BOS itself and its template writes one too: exactly one must remain."""
    from tokenizers import processors

    tokenizer = make_tokenizer()
    tokenizer.add_special_tokens({"bos_token": "<s>"})
    bos = tokenizer.bos_token_id
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", bos)])
    tokenizer.chat_template = "{{ bos_token }}" + tokenizer.chat_template
    assert tokenizer("hello")["input_ids"][0] == bos  # the trap is armed
    ids = common.prompt_ids(tokenizer, "hello")
    assert ids[0] == bos and ids.count(bos) == 1


def test_truncation_keeps_the_prompt_end_and_cuts_responses(tiny_model_dir):
    tokenizer = common.load_tokenizer(tiny_model_dir)
    long_prompt, long_answer = " ".join(["the cat"] * 40), " ".join(["a dog"] * 40)
    pairs = [dict(prompt="hello", chosen=long_answer, rejected="yes", chosen_winrate=1, rejected_winrate=0, gate=0),
             dict(prompt=long_prompt, chosen="yes", rejected="no", chosen_winrate=1, rejected_winrate=0, gate=0),
             dict(prompt="hello", chosen="yes", rejected="no", chosen_winrate=1, rejected_winrate=0, gate=0)]
    examples, truncated = sspo.tokenize_pairs(pairs, tokenizer, 32)
    assert truncated == 2
    full = common.prompt_ids(tokenizer, "hello")
    assert examples[0]["prompt_ids"] == full  # a short prompt stays whole
    assert len(full) + len(examples[0]["chosen_ids"]) == 32
    assert examples[0]["chosen_ids"] == tokenizer(long_answer, add_special_tokens=False)["input_ids"][:32 - len(full)]
    long_ids = common.prompt_ids(tokenizer, long_prompt)
    assert examples[1]["prompt_ids"] == long_ids[-len(examples[1]["prompt_ids"]):]  # the prompt keeps its end
    assert len(examples[1]["prompt_ids"]) + len(examples[1]["chosen_ids"]) <= 32
    assert examples[1]["chosen_ids"][-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert examples[2]["prompt_ids"] == full


# ------------------------------------------------------------------------------------ scorer

@pytest.mark.parametrize("chunk", [7, 4096])  # chunks smaller than one response (recomputed); one chunk (kept)
def test_fast_logps_equal_the_naive_full_logits(tiny_model_dir, chunk):
    from transformers import AutoModelForCausalLM

    tokenizer = common.load_tokenizer(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    rng = random.Random(1)
    pairs = [dict(prompt=" ".join(rng.choices(WORDS, k=rng.randint(2, 12))), chosen=" ".join(rng.choices(WORDS, k=rng.randint(1, 20))),
                  rejected=" ".join(rng.choices(WORDS, k=rng.randint(1, 20))), chosen_winrate=1, rejected_winrate=0, gate=0)
             for _ in range(5)]
    examples, _ = sspo.tokenize_pairs(pairs, tokenizer, 512)
    batch = sspo.collate(examples, tokenizer.pad_token_id)
    scorer = sspo.SequenceScorer(model, logits_chunk=chunk)
    fast, pooled = scorer(**batch)
    fast.sum().backward()
    grads_fast = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    naive, _ = scorer(**batch, naive=True)
    naive.sum().backward()
    assert torch.allclose(fast, naive, atol=1e-4, rtol=1e-5)
    for gf, p in zip(grads_fast, model.parameters()):
        assert torch.allclose(gf, p.grad, atol=1e-5, rtol=1e-4)
    # each sequence alone gives what it gives in the padded batch (right padding: no position shift)
    alone, pooled_alone = scorer(**sspo.collate(examples[2:3], tokenizer.pad_token_id))
    assert torch.allclose(alone, torch.stack([fast[2], fast[7]]).detach(), atol=1e-4)
    assert torch.allclose(pooled_alone, torch.stack([pooled[2], pooled[7]]).detach(), atol=1e-5)
    # pooled = mean of the final (normed) hidden states over the response tokens
    hidden = model.model(input_ids=batch["input_ids"][:1], attention_mask=batch["attention_mask"][:1]).last_hidden_state[0]
    p, c = len(examples[0]["prompt_ids"]), len(examples[0]["chosen_ids"])
    assert torch.equal(batch["input_ids"][0, p:p + c], torch.tensor(examples[0]["chosen_ids"]))
    assert torch.allclose(pooled[0], hidden[p:p + c].mean(0), atol=1e-5)


@pytest.mark.parametrize("dtype,softcap", [(torch.float32, None), (torch.float32, 3.0), (torch.bfloat16, None)])
def test_token_logprobs_equal_autograd_log_softmax(dtype, softcap):
    """TokenLogProbs' values and its in-place backward against log_softmax + gather through autograd."""
    torch.manual_seed(0)
    base = (4 * torch.randn(9, 50)).to(dtype)
    base[0, 3] = -float("inf")  # a masked vocabulary entry
    targets = torch.randint(0, 50, (9,))
    grad = torch.randn(9)
    out = {}
    for name in ("fused", "autograd"):
        logits = base.clone().requires_grad_()
        if name == "fused":
            logps = sspo.TokenLogProbs.apply(logits, targets, softcap)
        else:
            z = logits.float() if softcap is None else softcap * torch.tanh(logits.float() / softcap)
            logps = z.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
        logps.backward(grad)
        out[name] = logps.detach(), logits.grad
    assert out["fused"][0].dtype == torch.float32
    assert torch.allclose(out["fused"][0], out["autograd"][0], atol=1e-5, rtol=1e-5)
    assert out["fused"][1].dtype == dtype
    assert torch.allclose(out["fused"][1].float(), out["autograd"][1].float(), atol=1e-5 if dtype == torch.float32 else 1e-2)
    logits = base.float().requires_grad_()  # its backward consumes its buffer: a second one is an error, not garbage
    logps = sspo.TokenLogProbs.apply(logits, targets, None).sum()
    logps.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="cannot run twice"):
        logps.backward()


def test_logits_chunk_by_vocabulary(tiny_model_dir):
    """The default chunk holds 2^26 logits, and never fewer than 1024 rows."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert sspo.SequenceScorer(model).logits_chunk == 2 ** 26 // model.config.vocab_size
    assert sspo.SequenceScorer(model, logits_chunk=7).logits_chunk == 7
    model.config.vocab_size = 128256  # a Llama-3 vocabulary: 1024 rows (523 would fill 2^26)
    assert sspo.SequenceScorer(model).logits_chunk == 1024


def _random_examples(tokenizer, n, seed):
    rng = random.Random(seed)
    pairs = [dict(prompt=" ".join(rng.choices(WORDS, k=rng.randint(2, 12))), chosen=" ".join(rng.choices(WORDS, k=rng.randint(1, 20))),
                  rejected=" ".join(rng.choices(WORDS, k=rng.randint(1, 20))), chosen_winrate=1, rejected_winrate=0, gate=0)
             for _ in range(n)]
    return sspo.tokenize_pairs(pairs, tokenizer, 512)[0]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_shared_prompt_rows_score_like_separate_rows(tiny_model_dir, attn):
    """prompt+chosen+rejected in one row (4-D mask, restarted positions) == prompt+chosen and prompt+rejected apart."""
    from transformers import AutoModelForCausalLM

    tokenizer = common.load_tokenizer(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attn)
    examples = _random_examples(tokenizer, 5, seed=2)
    scorer = sspo.SequenceScorer(model, logits_chunk=7)
    out = {}
    for share in (False, True):
        batch = sspo.collate(examples, tokenizer.pad_token_id, share_prompt=share)
        model.zero_grad()
        logps, pooled = scorer(**batch)
        (logps.sum() + pooled.square().sum()).backward()
        out[share] = logps.detach(), pooled.detach(), [p.grad.clone() for p in model.parameters()], batch
    assert out[True][3]["input_ids"].shape[0] == 5 and out[False][3]["input_ids"].shape[0] == 10
    # fewer tokens fed: the prompt once per pair
    assert out[True][3]["input_ids"].numel() < out[False][3]["input_ids"].numel()
    assert torch.allclose(out[True][0], out[False][0], atol=1e-4, rtol=1e-5)
    assert torch.allclose(out[True][1], out[False][1], atol=1e-5)
    for g_shared, g_apart in zip(out[True][2], out[False][2]):
        assert torch.allclose(g_shared, g_apart, atol=1e-4, rtol=1e-3)
    # the model's own logits on the shared rows agree too (the layout, not just our head)
    with torch.no_grad():
        naive, _ = scorer(**out[True][3], naive=True)
    assert torch.allclose(naive, out[False][0], atol=1e-4, rtol=1e-5)


def test_shared_prompt_mask_hides_chosen_from_rejected():
    examples = [dict(prompt_ids=[5, 6], chosen_ids=[7, 8, 9], rejected_ids=[10])]
    batch = sspo.collate(examples + [dict(prompt_ids=[5], chosen_ids=[7], rejected_ids=[8])], 0, share_prompt=True)
    assert "attention_mask" not in batch  # built on the device by the scorer
    mask = sspo.tree_mask(batch["branch"])
    m = mask[0, 0].int()
    # rows: queries p p c c c r ; rejected (last) sees the prompt and itself, not the chosen tokens
    assert m.tolist() == [[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0],
                          [1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0], [1, 1, 0, 0, 0, 1]]
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 2]
    assert mask[1, 0].diagonal().all() and mask[1, 0, 3:, :3].sum() == 0  # padding queries see only themselves
    assert batch["resp_pred"].tolist()[:4] == [1, 2, 3, 1]  # the rejected token is predicted from the prompt's end
    assert batch["resp_seq"].tolist() == [0, 0, 0, 2, 1, 3] and batch["resp_len"].tolist() == [3, 1, 1, 1]


def test_check_scorer_falls_back_when_the_model_ignores_the_layout(tiny_model_dir):
    """A model that drops position ids (ALiBi-style) cannot share the prompt: auto falls back, asked-for fails."""
    from transformers import AutoModelForCausalLM

    tokenizer = common.load_tokenizer(tiny_model_dir)
    scorer = sspo.SequenceScorer(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    examples = _random_examples(tokenizer, 2, seed=3)
    args = (examples, tokenizer.pad_token_id, "cpu", "llama")
    assert sspo.check_scorer(scorer, *args, share_prompt=True) is True
    assert sspo.check_scorer(scorer, *args, share_prompt=False) is False
    no_positions = lambda **kw: scorer(**{k: v for k, v in kw.items() if k != "position_ids"})
    assert sspo.check_scorer(no_positions, *args, share_prompt=True) is False
    with pytest.raises(common.UserError, match="--share_prompt False"):
        sspo.check_scorer(no_positions, *args, share_prompt=True, strict=True)


def test_layout_check_runs_on_cut_pairs_and_still_catches_a_wrong_layout(tiny_model_dir):
    """choose_prompt_layout checks the two shortest pairs cut to CHECK_TOKENS a part: the rows it runs are that short,
    and a model that ignores the positions is still caught (auto: rows apart; asked for: a clear error)."""
    import types
    from transformers import AutoModelForCausalLM

    tokenizer = common.load_tokenizer(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    scorer = sspo.SequenceScorer(model)
    rng = random.Random(5)
    long = lambda k: " ".join(rng.choices(WORDS, k=k))  # noqa: E731
    pairs = [dict(prompt=long(60), chosen=long(80), rejected=long(90), chosen_winrate=1, rejected_winrate=0, gate=0)
             for _ in range(3)]
    examples = sspo.tokenize_pairs(pairs, tokenizer, 1024)[0]
    assert min(len(e[k]) for e in examples for k in ("prompt_ids", "chosen_ids", "rejected_ids")) > sspo.CHECK_TOKENS
    accelerator = types.SimpleNamespace(autocast=contextlib.nullcontext, device="cpu", mixed_precision="no")
    widths = []

    def seen(**kw):
        widths.append(kw["input_ids"].shape[1])
        return scorer(**kw)

    args = (model.config, examples, tokenizer.pad_token_id)
    assert sspo.choose_prompt_layout(accelerator, seen, *args, None, 1024, {}) is True
    assert max(widths) == 3 * sspo.CHECK_TOKENS  # the shared row: prompt, chosen and rejected, each cut
    no_positions = lambda **kw: scorer(**{k: v for k, v in kw.items() if k != "position_ids"})  # noqa: E731
    assert sspo.choose_prompt_layout(accelerator, no_positions, *args, None, 1024, {}) is False
    with pytest.raises(common.UserError, match="--share_prompt False"):
        sspo.choose_prompt_layout(accelerator, no_positions, *args, True, 1024, {})


def test_attn_implementation_reaches_the_model_and_a_wrong_one_is_one_line(tiny_model_dir, tmp_path):
    model, _ = common.load_causal_lm(tiny_model_dir, attn_implementation="eager")
    assert model.config._attn_implementation == "eager"
    data = write_scored(tmp_path / "scored.jsonl", n=2)
    out = run_sspo("--data", data, "--model", tiny_model_dir, "--output_dir", tmp_path / "run", "--attn_implementation", "nonsense")
    assert out.returncode == 2 and "cannot load model" in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr


ARCHITECTURES = {  # tiny random models of the families users train: (config class, its arguments, prompt shared?)
    "llama": ("LlamaConfig", {}, True), "qwen2": ("Qwen2Config", {}, True), "qwen3": ("Qwen3Config", {"head_dim": 16}, True),
    "mistral": ("MistralConfig", {"sliding_window": 4096}, True), "phi3": ("Phi3Config", {"eos_token_id": 2}, True),
    "gemma2": ("Gemma2Config", {"head_dim": 16}, True),  # eager attention, soft-capped logits, sliding + full layers
    "gpt2": ("GPT2Config", {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 512, "bos_token_id": 1, "eos_token_id": 2}, True),
    "bloom": ("BloomConfig", {"hidden_size": 64, "n_layer": 2, "n_head": 4}, False),  # ALiBi from a 2-D mask: rows apart
}


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_shared_prompt_across_architectures(arch):
    """The start-up check takes the shared layout where it reproduces separate rows, and falls back where not."""
    import transformers

    cls, kwargs, shared = ARCHITECTURES[arch]
    tokenizer = make_tokenizer()
    if arch in ("gpt2", "bloom"):
        config = getattr(transformers, cls)(vocab_size=len(tokenizer), **kwargs)
    else:
        config = getattr(transformers, cls)(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                            pad_token_id=3, **kwargs)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    sspo.disable_dropout(model)
    scorer, examples = sspo.SequenceScorer(model), _random_examples(tokenizer, 3, seed=4)
    assert sspo.check_scorer(scorer, examples, tokenizer.pad_token_id, "cpu", arch, share_prompt=common.takes_4d_mask(config, 512)) is shared
    if shared:  # and trains the same: gradients of shared rows == rows apart
        grads = []
        for share in (False, True):
            model.zero_grad()
            logps, pooled = scorer(**sspo.collate(examples, tokenizer.pad_token_id, share))
            (logps.sum() + pooled.sum()).backward()
            grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
        assert torch.allclose(grads[0], grads[1], atol=1e-4, rtol=1e-3)


def test_can_share_prompt_only_where_the_mask_is_taken_as_given():
    from transformers import LlamaConfig, MistralConfig

    llama = LlamaConfig()
    for impl, ok in (("sdpa", True), ("eager", True), ("flash_attention_2", False), ("flex_attention", False)):
        llama._attn_implementation = impl
        assert common.takes_4d_mask(llama, 1024) is ok, impl
    mistral = MistralConfig(sliding_window=512)
    mistral._attn_implementation = "sdpa"
    assert common.takes_4d_mask(mistral, 512) and not common.takes_4d_mask(mistral, 513)
    hybrid = LlamaConfig()
    hybrid._attn_implementation = "sdpa"
    hybrid.layer_types = ["full_attention", "linear_attention"]
    assert not common.takes_4d_mask(hybrid, 128)


# ------------------------------------------------------------------------------ real training

def test_training_moves_chosen_above_rejected_and_repulsion_pushes_apart(tiny_model_dir, tmp_path):
    data = write_scored(tmp_path / "scored.jsonl")
    common_flags = ["--data", data, "--model", tiny_model_dir, "--lr", "3e-3", "--beta", "0.1", "--batch_size", "4",
                    "--epochs", "3", "--warmup_ratio", "0", "--optimizer", "adamw", "--save_every", "0"]
    r = run_sspo(*common_flags, "--output_dir", tmp_path / "plain", "--rep_weight", "0")
    assert r.returncode == 0, r.stderr
    aw, al, d0, d_plain = logratios(tmp_path / "plain", tiny_model_dir, data)
    assert aw > 1.0 and al < -1.0, (aw, al)
    r = run_sspo(*common_flags, "--output_dir", tmp_path / "rep", "--rep_weight", "50", "--rep_margin", "2")
    assert r.returncode == 0, r.stderr
    _, _, _, d_rep = logratios(tmp_path / "rep", tiny_model_dir, data)
    assert d_rep > d0 + 0.05 and d_rep > d_plain + 0.05, (d0, d_plain, d_rep)
    steps = [json.loads(line) for line in open(tmp_path / "rep" / "metrics.jsonl")]
    assert [s["step"] for s in steps] == list(range(1, 13))
    assert steps[0]["logratio_chosen"] == pytest.approx(0, abs=1e-4)  # pi_theta = pi_t before the first update
    assert steps[-1]["latent_dist"] > steps[0]["latent_dist"]
    for key in ("loss", "loss_pref", "loss_rep", "logratio_rejected", "target_chosen", "target_rejected", "gate_mean",
                "grad_norm", "lr", "tokens_per_s"):
        assert math.isfinite(steps[-1][key])
    # the output is a plain transformers model folder whose weights are the trained ones
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "rep")
    assert not torch.equal(reloaded.lm_head.weight, AutoModelForCausalLM.from_pretrained(tiny_model_dir).lm_head.weight)
    config = json.load(open(tmp_path / "rep" / "run_config.json"))
    assert config["rep_weight"] == 50 and config["pairs"] == 16
    assert os.path.exists(tmp_path / "rep" / "summary.json")


def test_two_processes_and_grad_accum_give_the_weights_of_one_with_double_batch(tiny_model_dir, tmp_path):
    data = write_scored(tmp_path / "scored.jsonl", n=9)  # 9: a last step of 1 pair leaves one process empty
    flags = ["--data", data, "--model", tiny_model_dir, "--lr", "1e-3", "--beta", "0.1", "--epochs", "2",
             "--optimizer", "adamw", "--save_every", "0"]
    one = run_sspo(*flags, "--batch_size", "4", "--output_dir", tmp_path / "one")
    assert one.returncode == 0, one.stderr
    two = run_sspo(*flags, "--batch_size", "2", "--output_dir", tmp_path / "two",
                  launcher=(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533"))
    assert two.returncode == 0, two.stderr
    accum = run_sspo(*flags, "--batch_size", "2", "--grad_accum", "2", "--output_dir", tmp_path / "accum")
    assert accum.returncode == 0, accum.stderr
    w1, w2 = load_weights(tmp_path / "one"), load_weights(tmp_path / "two")
    for k, v in load_weights(tmp_path / "accum").items():
        assert torch.allclose(w1[k], v, atol=1e-5), k  # 2 micro-steps of 2 = one step of 4
    base = load_weights(tiny_model_dir)
    assert w1.keys() == w2.keys()
    moved = max(float((w1[k] - base[k]).abs().max()) for k in w1)
    assert moved > 1e-3
    for k in w1:
        assert torch.allclose(w1[k], w2[k], atol=1e-5), k
    assert json.load(open(tmp_path / "one" / "run_config.json"))["rep_weight_used"] == pytest.approx(50)  # 5 / beta
    m1 = [json.loads(x) for x in open(tmp_path / "one" / "metrics.jsonl")]
    m2 = [json.loads(x) for x in open(tmp_path / "two" / "metrics.jsonl")]
    assert [m["pairs"] for m in m1] == [m["pairs"] for m in m2]
    assert sorted(m["pairs"] for m in m1) == [1, 1, 4, 4, 4, 4]
    assert [m["loss"] for m in m1] == pytest.approx([m["loss"] for m in m2], rel=1e-4)


def test_training_with_the_prompt_shared_equals_training_with_rows_apart(tiny_model_dir, tmp_path):
    data = write_scored(tmp_path / "scored.jsonl", n=6)
    flags = ["--data", data, "--model", tiny_model_dir, "--lr", "1e-3", "--beta", "0.1", "--optimizer", "adamw",
             "--save_every", "0", "--batch_size", "3", "--nogroup_by_length"]  # the same steps in both layouts
    for name, extra in (("shared", []), ("apart", ["--share_prompt", "False"])):
        out = run_sspo(*flags, *extra, "--output_dir", tmp_path / name)
        assert out.returncode == 0, out.stderr
        assert f"prompt shared by chosen and rejected: {'yes' if name == 'shared' else 'no'}" in out.stdout
    shared, apart, base = load_weights(tmp_path / "shared"), load_weights(tmp_path / "apart"), load_weights(tiny_model_dir)
    assert max(float((shared[k] - base[k]).abs().max()) for k in shared) > 1e-3
    for k in shared:
        assert torch.allclose(shared[k], apart[k], atol=1e-5), k
    assert json.load(open(tmp_path / "shared" / "summary.json"))["share_prompt_used"] is True


KILL_AFTER_CHECKPOINT = """
import os, sys, sspo, common
save = sspo.save_checkpoint
def save_then_die(accelerator, output_dir, step):
    save(accelerator, output_dir, step)
    if step == {step}:
        os.kill(os.getpid(), 9)
sspo.save_checkpoint = save_then_die
sys.argv = ["sspo.py"] + sys.argv[1:]
common.cli(sspo.main)
"""


def test_resume_after_a_kill_equals_an_uninterrupted_run(tiny_model_dir, tmp_path):
    data = write_scored(tmp_path / "scored.jsonl", n=12)
    flags = ["--data", data, "--model", tiny_model_dir, "--lr", "1e-3", "--beta", "0.1", "--batch_size", "2",
             "--epochs", "2", "--save_every", "4"]  # rmsprop (the default): its state must come back too
    full = run_sspo(*flags, "--output_dir", tmp_path / "full")
    assert full.returncode == 0, full.stderr
    killer = tmp_path / "killer.py"
    killer.write_text(KILL_AFTER_CHECKPOINT.format(step=8))
    killed = subprocess.run([sys.executable, str(killer), *map(str, flags), "--output_dir", str(tmp_path / "res")],
                            capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))
    assert killed.returncode == -9, killed.stderr
    assert not os.path.exists(tmp_path / "res" / "model.safetensors")
    again = run_sspo(*flags, "--output_dir", tmp_path / "res")
    assert again.returncode == 2 and "--resume" in again.stderr  # never silently starts over
    resumed = run_sspo(*flags, "--output_dir", tmp_path / "res", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "starting at step 8" in resumed.stdout
    w_full, w_res = load_weights(tmp_path / "full"), load_weights(tmp_path / "res")
    for k in w_full:
        assert torch.allclose(w_full[k], w_res[k], atol=1e-6, rtol=0), k
    steps = [json.loads(x)["step"] for x in open(tmp_path / "res" / "metrics.jsonl")]
    assert steps == list(range(1, 13))
    assert not os.path.exists(tmp_path / "res" / "checkpoint")  # removed once the model is saved
    done = run_sspo(*flags, "--output_dir", tmp_path / "res", "--resume")
    assert done.returncode == 0 and "already complete" in done.stdout
    changed = run_sspo(*flags[:-1], "5", "--output_dir", tmp_path / "res2", "--resume")
    assert changed.returncode == 0, changed.stderr  # no run there yet: --resume starts one


# --------------------------------------------------------------------------------- bad input

def _bad(tmp_path, text, *flags):
    path = tmp_path / "bad.jsonl"
    path.write_text(text)
    out = tmp_path / "out"
    with pytest.raises(common.UserError) as e:
        sspo.main(data=str(path), model="unused", output_dir=str(out), **dict(flags))
    assert not out.exists()  # nothing written before the data is known to be good
    return str(e.value)


def test_bad_input_names_file_line_and_field(tmp_path):
    pref, sim = game([1, 0], {})
    good = json.dumps({"prompt": "q", "responses": ["a", "b"], "pref": pref, "sim": sim}) + "\n"
    assert _bad(tmp_path, good + "{oops\n").startswith(f"{tmp_path}/bad.jsonl:2: not valid JSON")
    assert _bad(tmp_path, good + json.dumps({"prompt": "q", "responses": ["a", "b"], "pref": [[0.5, 1]], "sim": sim}) + "\n") \
        == f"{tmp_path}/bad.jsonl:2: field 'pref': must be a 2 x 2 list of numbers (K = number of responses)"
    assert "field 'pref': must be constant-sum" in _bad(tmp_path, json.dumps({"prompt": "q", "responses": ["a", "b"], "pref": [[0.5, 0.9], [0.9, 0.5]], "sim": sim}))
    assert "field 'pref': diagonal must be 1/2" in _bad(tmp_path, json.dumps({"prompt": "q", "responses": ["a", "b"], "pref": [[0, 1], [0, 0]], "sim": sim}))
    assert "bad.jsonl:1: field 'sim'" in _bad(tmp_path, json.dumps({"prompt": "q", "responses": ["a", "b"], "pref": pref}))
    assert "bad.jsonl:1: field 'responses'" in _bad(tmp_path, json.dumps({"prompt": "q", "responses": ["a"], "pref": pref, "sim": sim}))
    assert "bad.jsonl:1: field 'prompt'" in _bad(tmp_path, json.dumps({"responses": ["a", "b"], "pref": pref, "sim": sim}))
    assert "bad.jsonl:1: field 'chosen_winrate'" in _bad(tmp_path, json.dumps({"prompt": "q", "chosen": "a", "rejected": "b", "chosen_winrate": 2, "rejected_winrate": 0}))
    assert "bad.jsonl:1: neither a scored row" in _bad(tmp_path, json.dumps({"prompt": "q"}))
    assert "no usable pair" in _bad(tmp_path, json.dumps({"prompt": "q", "responses": ["a", "b"], "pref": [[0.5, 0.5], [0.5, 0.5]], "sim": sim}))
    assert "--tau_low must be below --tau_high" in _bad(tmp_path, good, ("tau_low", 0.9), ("tau_high", 0.5))
    assert "--loss must be one of" in _bad(tmp_path, good, ("loss", "kto"))
    assert "--beta must be > 0" in _bad(tmp_path, good, ("beta", 0))


def test_cli_user_error_is_one_line_and_exit_2(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "q", "chosen": "a"}\n')
    r = run_sspo("--data", path, "--output_dir", tmp_path / "out")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"error: {path}:1: field 'rejected': must be a string, got NoneType"]
    r = run_sspo("--data", tmp_path / "missing.jsonl")
    assert r.returncode == 2 and r.stderr.strip() == f"error: {tmp_path}/missing.jsonl: no such file"
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_packaged_smollm2_trains_and_its_output_loads(tmp_path):
    """The default model end to end: `make demo`'s command on the built-in pairs (about 2 min on 2 cores)."""
    r = run_sspo("--data", os.path.join(ROOT, "data", "demo_pairs.jsonl"), "--output_dir", tmp_path / "demo",
                "--batch_size", "2", "--max_length", "256", "--lr", "1e-6", "--beta", "0.01")
    assert r.returncode == 0, r.stderr
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "demo")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "demo")
    assert model.config.model_type == "llama" and tokenizer.chat_template
    steps = [json.loads(x) for x in open(tmp_path / "demo" / "metrics.jsonl")]
    assert len(steps) == 4 and all(math.isfinite(s["loss"]) for s in steps)


_FAULTS = """
import resource, sys, torch
sys.path.insert(0, {root!r})
import sspo, tuning  # as in sspo.py's own process: the heap as its imports leave it
applied = tuning.reuse_freed_memory() if {apply} else None
for _ in range(2):  # 256 MiB, written and freed (twice: the heap's free space must grow past one tensor)
    torch.ones(2 ** 26).sum()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
torch.ones(2 ** 26).sum()  # the same size again: fresh pages, or the freed ones
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="a glibc malloc setting")
def test_reuse_freed_memory_stops_page_faults_of_repeated_large_tensors():
    """A third 256 MiB tensor after two are freed: ~65k page faults (fresh mmap) by default, ~none
    once tuning.reuse_freed_memory() ran; a user's own MALLOC_* setting turns it off."""
    env = {k: v for k, v in os.environ.items() if k not in tuning.MALLOC_ENV}
    run = lambda apply, extra={}: subprocess.run([sys.executable, "-c", _FAULTS.format(root=ROOT, apply=apply)],  # noqa: E731
                                                 env={**env, **extra}, capture_output=True, text=True, check=True).stdout.split()
    assert run(False)[1] and int(run(False)[1]) > 30000
    applied, faults = run(True)
    assert applied == "True" and int(faults) < 3000
    assert run(True, {"MALLOC_MMAP_MAX_": "65536"})[0] == "False"
