"""LoRA through peft, and gradient checkpointing: sspo.py's memory savers must not change the math."""

import pytest
import torch

import common
import sspo
from tiny import logratios, run_sspo, write_scored

peft = pytest.importorskip("peft")


def _batch(model_dir, data, share_prompt=False):
    tokenizer = common.load_tokenizer(model_dir)
    pairs, _ = sspo.load_pairs(str(data), "sspo", 0.55, 0.95)
    examples, _ = sspo.tokenize_pairs(pairs, tokenizer, 512)
    return sspo.collate(examples, tokenizer.pad_token_id, share_prompt), len(pairs)


def test_lora_training_references_and_saved_forms(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    data = write_scored(tmp_path / "scored.jsonl")
    flags = ["--data", data, "--model", tiny_model_dir, "--lr", "1e-2", "--beta", "0.1", "--batch_size", "4",
             "--epochs", "3", "--warmup_ratio", "0", "--optimizer", "adamw", "--save_every", "0", "--lora_r", "8"]
    r = run_sspo(*flags, "--output_dir", tmp_path / "adapter")
    assert r.returncode == 0, r.stderr
    r = run_sspo(*flags, "--output_dir", tmp_path / "merged", "--merge")
    assert r.returncode == 0, r.stderr

    # the reference log-probs are the base model's
    batch, b = _batch(tiny_model_dir, data)
    with torch.no_grad():
        base_logps, _ = sspo.SequenceScorer(AutoModelForCausalLM.from_pretrained(tiny_model_dir))(**batch)
    ref = torch.load(tmp_path / "adapter" / "ref_logps.pt")
    assert torch.allclose(ref[:, 0], base_logps[:b], atol=1e-4) and torch.allclose(ref[:, 1], base_logps[b:], atol=1e-4)

    # without --merge: the adapter alone, in peft's format, that peft reloads onto the base
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    assert not (tmp_path / "adapter" / "model.safetensors").exists()
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "adapter")
    ids = batch["input_ids"][:3]
    with torch.no_grad():
        adapted = with_adapter(input_ids=ids).logits
        assert not torch.allclose(adapted, AutoModelForCausalLM.from_pretrained(tiny_model_dir)(input_ids=ids).logits)
        # common.load_causal_lm (what generate.py and the next iteration use) merges it in
        merged_by_loader, _ = common.load_causal_lm(str(tmp_path / "adapter"))
        assert torch.allclose(merged_by_loader(input_ids=ids).logits, adapted, atol=1e-5)

    # with --merge: a plain model folder plus the adapter; same training, so the same function
    assert (tmp_path / "merged" / "adapter" / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    again = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "merged" / "adapter")
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, again(input_ids=ids).logits, atol=1e-5)
        assert torch.allclose(merged(input_ids=ids).logits, adapted, atol=1e-4)

    # and LoRA learns the preference as full training does
    aw, al, _, _ = logratios(tmp_path / "merged", tiny_model_dir, data)
    assert aw > 0.5 and al < -0.5, (aw, al)


@pytest.mark.parametrize("share_prompt", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(tiny_model_dir, tmp_path, share_prompt):
    from transformers import AutoModelForCausalLM

    batch, b = _batch(tiny_model_dir, write_scored(tmp_path / "scored.jsonl", n=4), share_prompt)
    grads = []
    for checkpointing in (False, True):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        model.train()
        sspo.disable_dropout(model)
        if checkpointing:
            sspo.enable_checkpointing(model)
            assert model.model.layers[0].gradient_checkpointing
        logps, pooled = sspo.SequenceScorer(model)(**batch)
        loss = sspo.preference_loss(logps[:b], logps[b:], logps[:b].detach() - 1, logps[b:].detach() + 1, loss_type="sppo",
                                    beta=0.1, chosen_winrate=torch.full((b,), 0.8), rejected_winrate=torch.full((b,), 0.2))
        (loss + sspo.repulsion_loss(pooled[:b], pooled[b:], 2.0)).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5), name
