"""bench/memory_plan.py: its parameter count is the real one, its byte formulas are the documented ones."""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import memory_plan as mp  # noqa: E402

GiB = 2 ** 30
TINY = dict(vocab_size=300, hidden_size=64, intermediate_size=176, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2)


def real_count(model):
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("extra", [{}, {"attention_bias": True, "mlp_bias": True}, {"head_dim": 32}])
def test_llama_parameter_count_equals_a_real_model(tied, extra, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**TINY, tie_word_embeddings=tied, **extra)
    config.save_pretrained(tmp_path)  # read back the way the CLI reads it: config.json in a folder
    plan_config = mp.load_config(str(tmp_path))
    assert mp.Shape(plan_config).params() == real_count(LlamaForCausalLM(config))


@pytest.mark.parametrize("kind", ["qwen2", "mistral"])
def test_qwen2_and_mistral_parameter_counts_equal_real_models(kind):
    import transformers

    cls = {"qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
           "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM)}[kind]
    config = cls[0](**TINY, tie_word_embeddings=False)
    assert mp.Shape(config.to_dict()).params() == real_count(cls[1](config))


def test_builtin_models_have_their_published_sizes():
    # the parameter counts the model cards / safetensors indexes give
    assert mp.Shape(mp.load_config("llama-3-8b")).params() == 8_030_261_248
    assert mp.Shape(mp.load_config("mistral-7b")).params() == 7_241_732_096
    assert mp.Shape(mp.load_config("qwen2.5-7b")).params() == 7_615_616_512


def test_lora_count_equals_rank_times_in_plus_out_of_every_target():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(**TINY))
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    r = 8
    expected = sum(r * (m.in_features + m.out_features) for name, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and name.split(".")[-1] in targets)
    assert mp.Shape(TINY).lora_params(r) == expected


@pytest.mark.parametrize("optimizer,k", [("rmsprop", 1), ("adamw", 2)])
def test_weight_grad_optimizer_bytes_follow_the_documented_formulas(optimizer, k):
    psi, n = mp.Shape(mp.load_config("llama-3-8b")).params(), 8
    lora = mp.Shape(mp.load_config("llama-3-8b")).lora_params(16)
    expected = {
        "single GPU": (4 * psi, 4 * psi, 4 * k * psi),
        "DDP": (4 * psi, 4 * psi, 4 * k * psi),
        "ZeRO-2": (2 * psi, 6 * psi / n, (4 + 4 * k) * psi / n),
        "ZeRO-3": (2 * psi / n, 6 * psi / n, (4 + 4 * k) * psi / n),
        "ZeRO-3 + offload": (2 * psi / n, 2 * psi / n, 0),
        "FSDP2": (4 * psi / n, 4 * psi / n, 4 * k * psi / n),
        "LoRA, 1 GPU": (2 * psi + 4 * lora, 4 * lora, 4 * k * lora),
    }
    result = mp.plan(mp.load_config("llama-3-8b"), gpus=n, gpu_mem=80, max_length=512, optimizer=optimizer)
    assert [r["strategy"] for r in result["rows"]] == list(mp.STRATEGIES)
    for row in result["rows"]:
        assert (row["weights"], row["grads"], row["optimizer"]) == pytest.approx(expected[row["strategy"]]), row["strategy"]
        assert row["total_full"] == pytest.approx(row["weights"] + row["grads"] + row["optimizer"] + row["working"]
                                                  + row["logits"] + row["act_full"])
    offload = next(r for r in result["rows"] if r["strategy"] == "ZeRO-3 + offload")
    assert offload["cpu_ram_per_node"] == (8 + 4 * k) * psi


def test_activation_and_logits_formulas():
    shape = mp.Shape(mp.load_config("llama-3-8b"))
    h, i, kv, layers, v = 4096, 14336, 8 * 128, 32, 128256
    per_layer = 22 * h + 4 * kv + 8 * i
    tokens = 2 * 2 * 1024
    assert mp.activation_bytes(shape, tokens, False) == tokens * (layers * per_layer + 16 * h)
    assert mp.activation_bytes(shape, tokens, True) == tokens * (layers * 2 * h + per_layer + 16 * h)
    assert mp.logits_bytes(shape, tokens, 1024) == 10 * 1024 * v
    assert mp.logits_bytes(shape, 100, 1024) == 10 * 100 * v  # a chunk is never longer than the tokens
    assert mp.logits_bytes(shape, tokens) == 10 * min(max(1024, 2 ** 26 // v), tokens) * v  # sspo.py's default chunk


def test_activation_formula_matches_what_autograd_saves_in_a_real_decoder_layer():
    """Sum the saved-for-backward tensors of one bf16 LlamaDecoderLayer (sdpa): the formula is within 15%."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = dict(TINY, hidden_size=128, intermediate_size=352, num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**config, attn_implementation="sdpa")).to(torch.bfloat16)
    b, t = 2, 64
    x = torch.randn(b, t, 128, dtype=torch.bfloat16, requires_grad=True)
    positions = torch.arange(t)[None].expand(b, t)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(tensor):
        ptr = tensor.untyped_storage().data_ptr()
        if ptr not in params:  # weights are kept anyway; count activations only
            saved[ptr] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model.model.layers[0](x, attention_mask=None, position_ids=positions,
                              position_embeddings=model.model.rotary_emb(x, positions))
    measured = sum(saved.values()) / (b * t)
    assert measured == pytest.approx(mp.Shape(config).activation_bytes_per_token_layer(), rel=0.15)


def test_fsdp2_grad_accum_keeps_unsharded_gradients():
    config = mp.load_config("llama-3-8b")
    psi = mp.Shape(config).params()
    fsdp = [next(r for r in mp.plan(config, gpus=8, gpu_mem=80, max_length=512, grad_accum=g)["rows"]
                 if r["strategy"] == "FSDP2")["working"] for g in (1, 4)]
    assert fsdp[1] - fsdp[0] == 2 * psi


def test_zero3_and_fsdp2_memory_fall_with_more_gpus():
    config = mp.load_config("llama-3-8b")
    for strategy in ("ZeRO-3", "FSDP2", "ZeRO-3 + offload", "ZeRO-2"):
        totals = [next(r for r in mp.plan(config, gpus=n, gpu_mem=80, max_length=1024)["rows"]
                       if r["strategy"] == strategy)["total_ckpt"] for n in (1, 2, 4, 8, 16)]
        assert all(a > b for a, b in zip(totals, totals[1:])), (strategy, totals)


def test_llama3_8b_on_8x80_needs_sharding_and_lora_fits_24gb_with_checkpointing():
    config = mp.load_config("llama-3-8b")
    rows = {r["strategy"]: r for r in mp.plan(config, gpus=8, gpu_mem=80, max_length=1024, batch_size=2)["rows"]}
    assert not rows["DDP"]["fits_ckpt"] and rows["ZeRO-3"]["fits_ckpt"] and rows["FSDP2"]["fits_ckpt"]
    lora = {r["strategy"]: r for r in mp.plan(config, gpus=1, gpu_mem=24, max_length=1024)["rows"]}["LoRA, 1 GPU"]
    assert lora["fits_ckpt"] and lora["total_ckpt"] < lora["total_full"]


def test_cli_prints_a_table_and_json_and_rejects_bad_flags(tmp_path):
    script = os.path.join(ROOT, "bench", "memory_plan.py")
    out = subprocess.run([sys.executable, script, "--model", "qwen2.5-7b", "--gpus", "4", "--gpu_mem", "40",
                          "--max_length", "512"], capture_output=True, text=True, check=True).stdout
    assert "| ZeRO-3 | deepspeed_zero3.yaml | 4 |" in out and "7.62B parameters" in out
    out = subprocess.run([sys.executable, script, "--model", "mistral-7b", "--format", "json"],
                         capture_output=True, text=True, check=True).stdout
    assert json.loads(out)["params"] == 7_241_732_096
    bad = subprocess.run([sys.executable, script, "--model", str(tmp_path / "missing.json")], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: --model") and "Traceback" not in bad.stderr
    bad = subprocess.run([sys.executable, script, "--gpus", "0"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--gpus" in bad.stderr
