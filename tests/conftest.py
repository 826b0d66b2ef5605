"""Fixtures of tiny models the tests build themselves (tests/tiny.py): no network, no model hub."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from tiny import make_llama, make_tokenizer, pairrm_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A folder with a tiny random Llama and its chat tokenizer, loadable by from_pretrained."""
    path = str(tmp_path_factory.mktemp("tiny-llama"))
    tokenizer = make_tokenizer(path)
    make_llama(path, vocab_size=len(tokenizer))
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Folders of a reward model, a PairRM-shaped model, a judge LM and an embedder, all tiny and random."""
    import torch
    from transformers import (BertConfig, BertModel, DebertaV2Config, LlamaConfig, LlamaForCausalLM,
                              LlamaForSequenceClassification)

    import oracle

    root = tmp_path_factory.mktemp("oracles")
    paths = {name: str(root / name) for name in ("reward", "pairrm", "judge", "embedder")}
    tokenizer = make_tokenizer(paths["reward"])
    torch.manual_seed(0)
    LlamaForSequenceClassification(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, num_labels=1, pad_token_id=tokenizer.pad_token_id, initializer_range=0.2,
    )).save_pretrained(paths["reward"])
    pairrm_tok = pairrm_tokenizer(paths["pairrm"])
    marker = pairrm_tok.convert_tokens_to_ids
    oracle.PairRMModel(DebertaV2Config(  # PairRM's config, scaled down: DeBERTa-v3 relative attention + head extras
        vocab_size=len(pairrm_tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=512, relative_attention=True, pos_att_type=["p2c", "c2p"], position_buckets=64,
        position_biased_input=False, norm_rel_ebd="layer_norm", share_att_key=True, type_vocab_size=0, pad_token_id=0,
        initializer_range=0.2, n_tasks=1, drop_out=0.05, source_prefix_id=marker("<|source|>"),
        cand1_prefix_id=marker("<|candidate1|>"), cand2_prefix_id=marker("<|candidate2|>"),
    )).save_pretrained(paths["pairrm"])
    LlamaForCausalLM(LlamaConfig(  # larger weights than a fresh init: the judge's answer depends on the pair
        vocab_size=len(make_tokenizer(paths["judge"])), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, initializer_range=0.3, eos_token_id=2, pad_token_id=3,
    )).save_pretrained(paths["judge"])
    BertModel(BertConfig(vocab_size=len(make_tokenizer(paths["embedder"])), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2)).save_pretrained(paths["embedder"])
    return paths
