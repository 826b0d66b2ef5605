"""generate.py at its defaults vs plain HF `generate`, whole processes, side by side, alternating.

    python bench/generate_speed.py                      # 64 demo prompts x K=4, 96 new tokens, 3 rounds: ~15 min
    python bench/generate_speed.py --prompts 16 --rounds 3 --out '' --markdown_file ''   # the issue's setting, no files

Both sides sample the same model (the packaged SmolLM2-135M-Instruct by default), the same prompts
(the first --prompts of data/demo_train.jsonl) formatted by the same chat template (common.prompt_ids),
K answers each, up to --max_new_tokens, T = 0.7 / top_p = 0.9, stopping at the same end-of-turn token:
- ours: `python generate.py --model M --prompts P --out X --k K --max_new_tokens T` and nothing else,
  so every other setting is generate.py's default (its slots, batch size, sampler);
- plain: this file's `plain` command: HF `model.generate(do_sample=True, temperature, top_p)` in batches
  of --plain_batch sequences (whole prompts, K copies each), prompts sorted by length, left padding,
  torch.manual_seed(seed): what a user writes with transformers alone.
Each run is a whole process (imports, loading, sampling, writing), timed from spawn to exit; rounds
alternate (ours, plain, plain, ours, ...) so drift in the machine's load hits both alike. The figure is
new tokens (the end-of-turn token excluded, as generate.py counts them) / wall seconds, medians over
rounds, and the median of the per-round ratios. Both outputs are read back to compare what was sampled:
mean tokens per answer, share ended on end-of-turn, mean characters, distinct-2 over all answers.
Also printed: the share of the CPU's fp32 matmul rate (torch.mm 2048^2 on the same threads, best of 5)
that 2 N FLOPs per new token make (N: the weights in matmuls, LM head included), sampling time only
(generate.py's own "tok/s" line).
Results: bench/results/generate_speed.json and the "generation" section of bench/RESULTS.md.
"""
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "bench")]
import flops  # noqa: E402

MD_BEGIN, MD_END = "<!-- generate_speed:begin -->", "<!-- generate_speed:end -->"


def plain(model, prompts, out, k, max_new_tokens, temperature=0.7, top_p=0.9, seed=0, batch_size=32):
    """Plain HF sampling of the prompts file into `out` (generate.py's fields: responses, num_tokens, finished)."""
    import torch

    from common import end_of_turn_id, load_causal_lm, prompt_ids, read_jsonl

    lm, tokenizer = load_causal_lm(model)
    lm.eval()
    rows = [row for _, row in read_jsonl(prompts)]
    stop = sorted({end_of_turn_id(tokenizer)} | ({tokenizer.eos_token_id} - {None}))
    pad = tokenizer.pad_token_id
    encoded = [prompt_ids(tokenizer, r["prompt"]) for r in rows]
    order = sorted(range(len(rows)), key=lambda i: -len(encoded[i]))
    per_batch = max(1, batch_size // k)
    torch.manual_seed(seed)
    results = {}
    for start in range(0, len(order), per_batch):
        batch = order[start:start + per_batch]
        seqs = [encoded[i] for i in batch for _ in range(k)]
        width = max(map(len, seqs))
        ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs])
        mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
        with torch.no_grad():
            new = lm.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=temperature, top_p=top_p,
                              top_k=None, max_new_tokens=max_new_tokens, eos_token_id=stop, pad_token_id=pad)[:, width:]
        for b, i in enumerate(batch):
            texts, counts, finished = [], [], []
            for tokens in new[b * k:(b + 1) * k].tolist():
                end = next((t for t, tok in enumerate(tokens) if tok in stop), None)
                tokens = tokens if end is None else tokens[:end]
                texts.append(tokenizer.decode(tokens))
                counts.append(len(tokens))
                finished.append(end is not None)
            results[i] = {**rows[i], "responses": texts, "num_tokens": counts, "finished": finished}
    with open(out, "w") as f:
        for i in range(len(rows)):
            f.write(json.dumps(results[i]) + "\n")


def matmul_rate():
    """GFLOP/s of torch.mm 2048 x 2048 fp32 on this process's threads, best of 5 rounds."""
    return flops.matmul_rate() / 1e9


def matmul_weights(model):
    """N: weights in the matmuls of one token's forward (every linear layer, the LM head included)."""
    from common import load_causal_lm

    return flops.matmul_params(load_causal_lm(model)[0])


def read_outputs(path):
    rows = [json.loads(line) for line in open(path)]
    answers = [y for r in rows for y in r["responses"]]
    counts = [n for r in rows for n in r["num_tokens"]]
    bigrams = [tuple(pair) for y in answers for pair in zip(y.split(), y.split()[1:])]
    return {"answers": len(answers), "new_tokens": sum(counts), "mean_tokens": statistics.mean(counts),
            "ended_share": statistics.mean(f for r in rows for f in r["finished"]),
            "mean_chars": statistics.mean(map(len, answers)),
            "distinct_2": len(set(bigrams)) / max(1, len(bigrams))}


def run(cmd, out):
    if os.path.exists(out):
        os.remove(out)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    rate = re.search(r"\(([\d.]+) tok/s\)", proc.stdout)
    return {"wall_s": wall, "sampling_tok_s": float(rate.group(1)) if rate else None, **read_outputs(out)}


def main(model="packaged:SmolLM2-135M-Instruct", prompts=64, k=4, max_new_tokens=96, rounds=3, plain_batch=32,
         data="data/demo_train.jsonl", out="bench/results/generate_speed.json", markdown_file="bench/RESULTS.md"):
    """Time both sides `rounds` times each, alternating; print the table; write it to out / markdown_file.

    Args:
        model: what both sides sample from
        prompts: the first this many prompts of `data`
        k: answers per prompt
        max_new_tokens: longest answer
        rounds: whole-process runs of each side
        plain_batch: sequences per plain HF generate call
        data: prompts file
        out: JSON of every run ('' for none)
        markdown_file: the file whose generation section is replaced by the table ('' for none)
    """
    from common import resolve_model

    resolve_model(model)  # the packaged model is converted once, before any run is timed
    work = tempfile.mkdtemp(prefix="generate-speed-")
    prompts_file = os.path.join(work, "prompts.jsonl")
    with open(os.path.join(ROOT, data)) as f, open(prompts_file, "w") as g:
        g.writelines(f.readlines()[:prompts])
    py, o = sys.executable, os.path.join(work, "out.jsonl")
    common = ["--model", model, "--prompts", prompts_file, "--out", o, "--k", str(k), "--max_new_tokens", str(max_new_tokens)]
    sides = {"ours": [py, "generate.py", *common],
             "plain": [py, "bench/generate_speed.py", "plain", *common, "--batch_size", str(plain_batch)]}
    rate_before = matmul_rate()
    runs = {"ours": [], "plain": []}
    for r in range(rounds):
        for side in ("ours", "plain") if r % 2 == 0 else ("plain", "ours"):
            runs[side].append(run(sides[side], o))
            res = runs[side][-1]
            print(f"round {r + 1} {side}: {res['wall_s']:.1f} s, {res['new_tokens']} new tokens, "
                  f"{res['new_tokens'] / res['wall_s']:.1f} tok/s", flush=True)
    rate = max(rate_before, matmul_rate())
    weights = matmul_weights(model)
    tok_s = {s: [x["new_tokens"] / x["wall_s"] for x in runs[s]] for s in runs}
    ratios = [a / b for a, b in zip(tok_s["ours"], tok_s["plain"])]
    useful = statistics.median(x["sampling_tok_s"] for x in runs["ours"]) * 2 * weights / 1e9
    summary = {"model": model, "prompts": prompts, "k": k, "max_new_tokens": max_new_tokens, "rounds": rounds,
               "plain_batch": plain_batch, "load_average": os.getloadavg(), "matmul_gflops": rate,
               "matmul_weights": weights, "ratio_median": statistics.median(ratios), "ratios": ratios,
               "tok_s": tok_s, "useful_gflops_ours": useful, "runs": runs,
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    table = markdown(summary)
    print(table)
    if out:
        os.makedirs(os.path.dirname(os.path.join(ROOT, out)), exist_ok=True)
        with open(os.path.join(ROOT, out), "w") as f:
            json.dump(summary, f, indent=2)
    if markdown_file:
        path = os.path.join(ROOT, markdown_file)
        text = open(path).read() if os.path.exists(path) else ""
        block = f"{MD_BEGIN}\n{table}\n{MD_END}"
        text = re.sub(re.escape(MD_BEGIN) + ".*?" + re.escape(MD_END), lambda _: block, text, flags=re.S) \
            if MD_BEGIN in text else text.rstrip() + "\n\n" + block + "\n"
        with open(path, "w") as f:
            f.write(text)


def markdown(s):
    def med(side, key):
        return statistics.median(x[key] for x in s["runs"][side])

    def rng(values, fmt):
        return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"

    rows = [("new tokens/s, whole process", rng(s["tok_s"]["ours"], "{:.1f}"), rng(s["tok_s"]["plain"], "{:.1f}"),
             rng(s["ratios"], "{:.2f}")),
            ("wall, s", rng([x["wall_s"] for x in s["runs"]["ours"]], "{:.1f}"),
             rng([x["wall_s"] for x in s["runs"]["plain"]], "{:.1f}"), ""),
            ("new tokens", f"{med('ours', 'new_tokens'):.0f}", f"{med('plain', 'new_tokens'):.0f}", ""),
            ("mean tokens an answer", f"{med('ours', 'mean_tokens'):.1f}", f"{med('plain', 'mean_tokens'):.1f}", ""),
            ("ended on end-of-turn", f"{med('ours', 'ended_share'):.0%}", f"{med('plain', 'ended_share'):.0%}", ""),
            ("mean characters an answer", f"{med('ours', 'mean_chars'):.0f}", f"{med('plain', 'mean_chars'):.0f}", ""),
            ("distinct-2", f"{med('ours', 'distinct_2'):.3f}", f"{med('plain', 'distinct_2'):.3f}", "")]
    lines = [f"## generation: generate.py vs plain HF generate",
             "",
             f"`python bench/generate_speed.py --prompts {s['prompts']} --rounds {s['rounds']}` ({s['date']}; "
             f"load average at the end {s['load_average'][0]:.1f} / {s['load_average'][1]:.1f}).",
             "",
             f"Work: the first {s['prompts']} prompts of data/demo_train.jsonl x K={s['k']}, up to {s['max_new_tokens']} "
             f"new tokens, T=0.7 / top_p=0.9, {s['model']}, fp32, 2 threads. generate.py at its defaults against HF "
             f"`generate(do_sample=True)` in batches of {s['plain_batch']} sequences (prompts sorted by length, "
             f"left padding). Whole processes, alternating, {s['rounds']} each; median (min-max).",
             "",
             "| | generate.py | plain HF generate | generate.py / plain |",
             "|---|---|---|---|",
             *[f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows],
             "",
             f"Useful FLOPs while sampling (generate.py's own tok/s line, 2 N per new token, N = {s['matmul_weights'] / 1e6:.1f}M "
             f"weights in matmuls): {s['useful_gflops_ours']:.0f} GFLOP/s, {s['useful_gflops_ours'] / s['matmul_gflops']:.0%} "
             f"of the fp32 matmul rate measured here ({s['matmul_gflops']:.0f} GFLOP/s, torch.mm 2048^2)."]
    return "\n".join(lines)


if __name__ == "__main__":
    import fire

    fire.Fire({"main": main, "plain": plain} if len(sys.argv) > 1 and sys.argv[1] == "plain" else main)
