"""What the tests and the benchmarks build for themselves: tiny tokenizers, random models, scored files.

No network, no model hub. One builder per kind of thing; tests/conftest.py turns them into fixtures,
bench/ imports them as tests.tiny (the repository's root is on its sys.path, for the scripts).
"""
import json
import math
import os
import random
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIAL = ["<unk>", "<|im_start|>", "<|im_end|>", "<pad>"]  # ids 0..3 in every tokenizer built here
PUNCTUATION = list(".,!?0123456789:-\n")
WORDS = ("the a an of to and in is it you that he was for on are with as his they be at one have this from or "
         "had by word but what some we can out other were all there when up use your how said each she which do "
         "their time if will way about many then them write would like so these her long make thing see him two "
         "has look more day could go come did number sound no most people my over know water than call first who "
         "may down side been now find any new work part take get place made live where after back little only "
         "round man year came show every good me give our under name very through just form sentence great think "
         "say help low line differ turn cause much mean before move right boy old too same tell does set three want "
         "air well also play small end put home read hand port large spell add even land here must big high such "
         "user assistant system yes hello world answer question cat dog red blue green paris france capital city").split()


def chat_tokenizer(backend, path=None):
    """A transformers fast tokenizer around a `tokenizers.Tokenizer` whose vocabulary holds SPECIAL:
    ChatML markers (BOS <|im_start|>, EOS <|im_end|>, <pad>) and the ChatML chat template."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<|im_end|>",
                                        pad_token="<pad>", bos_token="<|im_start|>")
    tokenizer.chat_template = CHATML
    if path:
        tokenizer.save_pretrained(path)
    return tokenizer


def make_tokenizer(path=None, words=WORDS):
    """A word-level chat tokenizer: SPECIAL, then `words`, then PUNCTUATION (each its own token); decoding
    joins with spaces. len(tokenizer) = 4 + distinct words + 17."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(SPECIAL + sorted(set(words)) + PUNCTUATION)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.decoder = decoders.WordPiece(prefix="##")  # joins with spaces
    return chat_tokenizer(tok, path)


def pairrm_tokenizer(path):
    """A DeBERTa-style tokenizer: [CLS] text [SEP] per segment, PairRM's three markers as special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    special = ["[PAD]", "[CLS]", "[SEP]", "[UNK]", "<|source|>", "<|candidate1|>", "<|candidate2|>"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(special + sorted(set(WORDS)) + list(".,!?:-"))},
                                     unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.add_special_tokens(special)
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 1), ("[SEP]", 2)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                        sep_token="[SEP]")
    tokenizer.save_pretrained(path)
    return tokenizer


def make_llama(path=None, vocab_size=256, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=None,
               max_positions=512, tie=True, seed=0, device="cpu"):
    """A random LlamaForCausalLM with tied embeddings and the special ids of SPECIAL (built on `device`,
    saved in `path` if given). Defaults: small enough to train in milliseconds."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    bos, eos, pad = (SPECIAL.index(t) for t in ("<|im_start|>", "<|im_end|>", "<pad>"))
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate or 2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=max_positions, tie_word_embeddings=tie, bos_token_id=bos,
                         eos_token_id=eos, pad_token_id=pad)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = pad
    if path:
        model.save_pretrained(path)
    return model


def game(rewards, sims):
    """pref from rewards (Bradley-Terry), and a symmetric sim with diagonal 1 from a dict {(i, j): s}."""
    k = len(rewards)
    pref = [[1 / (1 + math.exp(rewards[j] - rewards[i])) for j in range(k)] for i in range(k)]
    sim = [[1.0 if i == j else sims.get((min(i, j), max(i, j)), 0.1) for j in range(k)] for i in range(k)]
    return pref, sim


def write_scored(path, n=16, k=4, seed=0):
    """n prompts of k random-word responses; the oracle prefers longer responses, sim is random."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            responses = [" ".join(rng.choices(WORDS, k=rng.randint(3, 14))) for _ in range(k)]
            pref, sim = game([len(r.split()) / 3 for r in responses],
                             {(a, b): round(rng.uniform(0, 0.8), 3) for a in range(k) for b in range(a + 1, k)})
            f.write(json.dumps({"id": f"p{i}", "prompt": " ".join(rng.choices(WORDS, k=6)), "responses": responses,
                                "pref": pref, "sim": sim}) + "\n")
    return path


def run_sspo(*args, env=None, launcher=(sys.executable,)):
    """sspo.py with `args` as its own process, one thread (as the tests' machines have)."""
    return subprocess.run([*launcher, os.path.join(ROOT, "sspo.py"), *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})), timeout=600)


def load_weights(path):
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "model.safetensors"))


def logratios(model_dir, base_dir, data, loss="sspo"):
    """Mean log-ratio of chosen and rejected, and mean latent distance, of a trained model vs its start:
    (a(y_w), a(y_l), distance before, distance after), over sspo.py's pairs of the scored file `data`."""
    import torch
    from transformers import AutoModelForCausalLM

    import common
    import sspo

    tokenizer = common.load_tokenizer(base_dir)
    pairs, _ = sspo.load_pairs(str(data), loss, 0.55, 0.95)
    batch = sspo.collate(sspo.tokenize_pairs(pairs, tokenizer, 512)[0], tokenizer.pad_token_id)
    out = {}
    for name, path in (("new", model_dir), ("old", base_dir)):
        with torch.no_grad():
            out[name] = sspo.SequenceScorer(AutoModelForCausalLM.from_pretrained(path))(**batch)
    b = len(pairs)
    a = out["new"][0] - out["old"][0]
    dist = lambda pooled: sspo.latent_distance(pooled[:b], pooled[b:]).mean()  # noqa: E731
    return float(a[:b].mean()), float(a[b:].mean()), float(dist(out["old"][1])), float(dist(out["new"][1]))
