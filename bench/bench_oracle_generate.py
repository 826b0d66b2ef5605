"""Batched vs one-at-a-time throughput of oracle.py (PairRM) and generate.py, on small random models.

    .venv/bin/python bench/bench_oracle_generate.py              # ~3 min on 2 busy CPU cores
    .venv/bin/python bench/bench_oracle_generate.py --repeats 5 --threads 8

Both sides of each ratio run the same model and the same code in the same process; only the batch
size differs. Oracle: the PairRM backend over all K(K-1) ordered pairs of every prompt, batched across
prompts (--batch_size pairs a forward) vs one pair a forward, as SPPO's reference scores them.
Generation: all prompts' K samples batched (--batch_size sequences a call) vs one prompt (its K
samples) a call. Prints medians over --repeats runs; targets: >= 10x (oracle) and >= 3x (generation).
Runs on the GPU where there is one (fp32); --hidden 1024 --layers 24 is PairRM's own size.
"""
import os
import random
import statistics
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import generate  # noqa: E402
import oracle  # noqa: E402
from common import cli  # noqa: E402
from tests.tiny import WORDS, make_tokenizer, pairrm_tokenizer  # noqa: E402  (the tests' tiny builders)


def text(rng, lo, hi):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def timed(fn, repeats):
    """Median seconds of `repeats` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def pairrm_folder(path, hidden, layers):
    """A random PairRM-shaped model (DeBERTa-v3 attention, PairRM head) saved with its tokenizer."""
    from transformers import DebertaV2Config

    tok = pairrm_tokenizer(path)
    ids = tok.convert_tokens_to_ids
    oracle.PairRMModel(DebertaV2Config(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64), max_position_embeddings=512, relative_attention=True,
        pos_att_type=["p2c", "c2p"], position_buckets=256, position_biased_input=False, norm_rel_ebd="layer_norm",
        share_att_key=True, type_vocab_size=0, pad_token_id=0, n_tasks=1, drop_out=0.05,
        source_prefix_id=ids("<|source|>"), cand1_prefix_id=ids("<|candidate1|>"), cand2_prefix_id=ids("<|candidate2|>"),
    )).save_pretrained(path)


def llama_folder(path, hidden, layers):
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tokenizer(path)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=4 * hidden,
                                 num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                                 num_key_value_heads=max(1, hidden // 128), tie_word_embeddings=True, eos_token_id=2,
                                 pad_token_id=3)).save_pretrained(path)


def main(prompts=8, k=4, repeats=3, threads=1, batch_size=32, hidden=256, layers=4, max_new_tokens=32, seed=0):
    """Print pairs/s and tokens/s, batched and one at a time, and their ratios.

    Args:
        prompts: prompts per run
        k: responses per prompt (K): K(K-1) ordered pairs per prompt for the oracle
        repeats: timed runs per measurement (after a warm-up); the median is reported
        threads: torch CPU threads (1: timings that other processes on a shared machine disturb least)
        batch_size: pairs (oracle) or sequences (generation) per forward in the batched runs
        hidden: hidden size of both random models
        layers: layers of both random models
        max_new_tokens: tokens generated per response
        seed: seed of the random texts and of sampling
    """
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    rows = [{"id": str(i), "prompt": text(rng, 8, 30), "responses": [text(rng, 10, 60) for _ in range(k)]}
            for i in range(prompts)]
    pairs = prompts * k * (k - 1)
    with tempfile.TemporaryDirectory() as tmp:
        pairrm_folder(os.path.join(tmp, "pairrm"), hidden, layers)
        llama_folder(os.path.join(tmp, "llama"), hidden, layers)
        batched = oracle.PairRMOracle(os.path.join(tmp, "pairrm"), batch_size=batch_size)
        single = oracle.PairRMOracle(os.path.join(tmp, "pairrm"), batch_size=1)
        t_batched, t_single = timed(lambda: batched.pref(rows), repeats), timed(lambda: single.pref(rows), repeats)
        print(f"oracle (PairRM-shaped, hidden {hidden}, {layers} layers), {prompts} prompts x {k} "
              f"responses = {pairs} ordered pairs")
        print(f"  batched ({batch_size} pairs/forward): {pairs / t_batched:8.1f} pairs/s")
        print(f"  one pair at a time:            {pairs / t_single:8.1f} pairs/s")
        print(f"  ratio {t_single / t_batched:.1f}x (target >= 10x)")

        lm, tokenizer = generate.load_model(os.path.join(tmp, "llama"), "float32")
        lm.to("cuda" if torch.cuda.is_available() else "cpu")  # where the oracle runs too
        texts = [r["prompt"] for r in rows]
        settings = dict(k=k, max_new_tokens=max_new_tokens, temperature=0.7, top_p=0.9, seed=seed)
        counted = generate.sample_responses(texts, lm, tokenizer, batch_size=batch_size, **settings)
        tokens = sum(n for r in counted for n in r["num_tokens"])
        t_batched = timed(lambda: generate.sample_responses(texts, lm, tokenizer, batch_size=batch_size, **settings), repeats)
        t_single = timed(lambda: generate.sample_responses(texts, lm, tokenizer, batch_size=k, **settings), repeats)
        print(f"generation (Llama, hidden {hidden}, {layers} layers, vocab {len(tokenizer)}), {prompts} prompts x {k} "
              f"samples x {max_new_tokens} new tokens = {tokens} tokens")
        print(f"  batched ({batch_size} sequences/call): {tokens / t_batched:8.1f} tokens/s")
        print(f"  one prompt ({k} sequences) a call: {tokens / t_single:8.1f} tokens/s")
        print(f"  ratio {t_single / t_batched:.1f}x (target >= 3x)")


if __name__ == "__main__":
    cli(main)
