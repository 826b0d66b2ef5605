"""Where sspo.py's defaults of --tau_low, --tau_high and --rep_margin come from.

Samples K responses per prompt from the policy (default: the packaged SmolLM2, SPPO's sampling
settings), embeds them with the similarity embedder (default: the packaged MiniLM), and prints
percentiles of the cosine similarity of
  - different:  responses to DIFFERENT prompts (clearly different answers: the gate must leave them),
  - siblings:   the K samples of ONE prompt (what the gate acts on in training),
  - paraphrase: a sample against itself with 15% of its words dropped and two neighbours swapped
                (a near-paraphrase: the gate must close on it),
and of the policy's latent distance || h_i/|h_i| - h_j/|h_j| || between siblings (docs/method.md §3.2).

    python bench/similarity_stats.py --n_prompts 40 --k 4        # ~6 min on 2 CPU cores
"""
import json
import os
import random
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import generate  # noqa: E402
import oracle  # noqa: E402
import sspo  # noqa: E402

PCTS = (5, 10, 25, 50, 75, 90, 95)


def perturb(text, rng):
    words = text.split()
    kept = [w for w in words if rng.random() > 0.15] or words
    if len(kept) > 3:
        i = rng.randrange(len(kept) - 1)
        kept[i], kept[i + 1] = kept[i + 1], kept[i]
    return " ".join(kept)


def percentiles(values):
    return {f"p{p}": round(float(np.percentile(values, p)), 3) for p in PCTS}


def main(prompts="data/demo_train.jsonl", n_prompts=40, k=4, max_new_tokens=128, seed=0,
         model=common.PACKAGED_MODEL, embedder=common.PACKAGED_EMBEDDER, out="bench/results/similarity_stats.json"):
    rows = [row for _, row in common.read_jsonl(prompts)][:n_prompts]
    lm, tokenizer = common.load_causal_lm(model)
    samples = generate.sample_responses([r["prompt"] for r in rows], lm, tokenizer, k=k, max_new_tokens=max_new_tokens,
                                        temperature=0.7, top_p=0.9, seed=seed, batch_size=16)
    responses = [s["responses"] for s in samples]
    emb = oracle.Embedder(embedder)
    upper = np.triu_indices(k, 1)
    siblings = np.concatenate([m[upper] for m in emb.sim(responses)])
    firsts = [rs[0] for rs in responses]
    different = emb.sim([firsts])[0][np.triu_indices(len(firsts), 1)]
    rng = random.Random(seed)
    paraphrase = [emb.sim([[y, perturb(y, rng)]])[0][0, 1] for y in firsts]

    # the policy's own latent distance between siblings, as sspo.py's scorer pools it
    scorer = sspo.SequenceScorer(lm)
    distances = []
    for row, ys in zip(rows, responses):
        pairs = [dict(prompt=row["prompt"], chosen=ys[i], rejected=ys[j], chosen_winrate=1, rejected_winrate=0, gate=0)
                 for i, j in zip(*upper)]
        examples, _ = sspo.tokenize_pairs(pairs, tokenizer, 1024)
        with torch.no_grad():
            _, pooled = scorer(**sspo.collate(examples, tokenizer.pad_token_id))
        b = len(pairs)
        d = sspo.latent_distance(pooled[:b], pooled[b:])
        distances += d.tolist()

    report = {"settings": dict(prompts=prompts, n_prompts=len(rows), k=k, max_new_tokens=max_new_tokens, seed=seed,
                               model=model, embedder=embedder, temperature=0.7, top_p=0.9),
              "sim_different_prompts": percentiles(different), "sim_siblings": percentiles(siblings),
              "sim_paraphrase": percentiles(paraphrase), "latent_distance_siblings": percentiles(distances),
              "mean_tokens": float(np.mean([t for s in samples for t in s["num_tokens"]]))}
    common.atomic_write_json(out, report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    common.cli(main)
