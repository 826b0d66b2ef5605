"""Tiny models and tokenizers the tests build themselves: no network, no model hub."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
WORDS = ("the a an of to and in is it you that he was for on are with as his they be at one have this from or "
         "had by word but what some we can out other were all there when up use your how said each she which do "
         "their time if will way about many then them write would like so these her long make thing see him two "
         "has look more day could go come did number sound no most people my over know water than call first who "
         "may down side been now find any new work part take get place made live where after back little only "
         "round man year came show every good me give our under name very through just form sentence great think "
         "say help low line differ turn cause much mean before move right boy old too same tell does set three want "
         "air well also play small end put home read hand port large spell add even land here must big high such "
         "user assistant system yes hello world answer question cat dog red blue green paris france capital city").split()


def make_tokenizer(path=None):
    """A word-level fast tokenizer with ChatML special tokens and chat template (BOS added by the template)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    special = ["<unk>", "<|im_start|>", "<|im_end|>", "<pad>"]
    vocab = {t: i for i, t in enumerate(special + sorted(set(WORDS)) + list(".,!?0123456789:-\n"))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.decoder = decoders.WordPiece(prefix="##")  # joins with spaces
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|im_end|>",
                                        pad_token="<pad>", bos_token="<|im_start|>")
    tokenizer.chat_template = CHATML
    if path:
        tokenizer.save_pretrained(path)
    return tokenizer


def make_llama(path=None, vocab_size=256, hidden=64, layers=2, seed=0):
    """A random LlamaForCausalLM small enough to train in milliseconds."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=True, eos_token_id=2, pad_token_id=3)
    model = LlamaForCausalLM(config)
    if path:
        model.save_pretrained(path)
    return model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A folder with a tiny random Llama and its chat tokenizer, loadable by from_pretrained."""
    path = str(tmp_path_factory.mktemp("tiny-llama"))
    tokenizer = make_tokenizer(path)
    make_llama(path, vocab_size=len(tokenizer))
    return path
