"""sspo.py's training step and generate.py's sampling on one GPU: tokens/s, MFU, peak memory.

One prepared script for a single short GPU lease; it needs nothing but torch, transformers and accelerate, and
makes everything itself (a random-weight Llama-3.2-1B-shape model, synthetic token ids, a word-level
tokenizer with a ChatML template; tests/tiny.py's builders), so nothing is downloaded and nothing big travels.

    python bench/gpu.py                 # GPU: ~1.2B Llama (16 layers, d 2048, vocab 128256), seq 1024, bf16; ~2 min
    python bench/gpu.py --tiny          # CPU or GPU: a tiny shape that runs in seconds (tests/test_bench.py)

What it runs, with sspo.py's own functions (sspo.SequenceScorer; sspo.optimizer_step: its micro-steps, loss,
gradient clipping and RMSprop step on fp32 weights under accelerate's bf16 autocast, as `--mixed_precision bf16`;
the tiny CPU shape runs in fp32):
1. the bf16 matmul rate of the device: torch.mm of two n x n bf16 matrices, best of 5 rounds;
2. the reference pass (no grad) and training steps (loss sspo) on --batch_size pairs of --seq_len
   tokens (prompt --prompt_len, responses fill the rest; no padding), without and with gradient
   checkpointing, and with the prompt shared by chosen and rejected (sspo.py's default where the
   attention takes its 4-D mask): tokens/s of the pairs (the prompt counted twice, as apart), MFU
   on the tokens the layout computes, and peak memory of each;
3. generation: generate.sample_responses of --gen_prompts prompts x K=4, --gen_new_tokens new tokens
   each (a random model seldom ends a turn), bf16 weights, all sequences at once: new tokens/s with
   generate.py's slots (its default) and with HF generate (slots=False), side by side.

MFU counts useful FLOPs only (recomputation under gradient checkpointing is not useful):
  training step: 6 N_body T + 6 N_head R + 12 L d T S_eff,   reference pass: a third of that,
with N_body the weights in the blocks' matmuls, N_head the LM head's (vocab x d), T all tokens, R the
response tokens whose log-probs the loss needs (sspo.py runs the LM head on those alone), L layers,
d width, and S_eff = S/2 the average causal attention span of a sequence of S tokens.
Results: printed, and written as JSON to --out (default $OUT/gpu.json when $OUT is set, else
bench/results/gpu.json).
"""
import json
import os
import resource
import sys
import time
import warnings

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests"), os.path.join(ROOT, "bench")]
import sspo  # noqa: E402
import tiny  # noqa: E402  (tests/tiny.py: the tiny builders)
from flops import matmul_params, matmul_rate, sync  # noqa: E402

FULL = dict(layers=16, hidden=2048, heads=32, kv_heads=8, intermediate=8192, vocab=128256, seq_len=1024, prompt_len=256,
            batch_size=4, steps=8, warmup=2, matmul_n=8192, gen_prompts=16, gen_new_tokens=256)
TINY = dict(layers=2, hidden=64, heads=4, kv_heads=2, intermediate=128, vocab=512, seq_len=64, prompt_len=16,
            batch_size=2, steps=2, warmup=1, matmul_n=256, gen_prompts=2, gen_new_tokens=8)


def make_tokenizer(vocab):
    """tests/tiny.py's word-level ChatML tokenizer with `vocab` tokens (words w0, w1, ...): any sampled id decodes."""
    fixed = len(tiny.SPECIAL) + len(tiny.PUNCTUATION) + 2
    return tiny.make_tokenizer(words=["user", "assistant"] + [f"w{i}" for i in range(vocab - fixed)])


def make_model(shape, tokenizer, device):
    """tests/tiny.py's random-weight Llama of `shape` (fp32 weights, as sspo.py trains them), built on `device`."""
    assert len(tokenizer) == shape["vocab"]
    return tiny.make_llama(vocab_size=shape["vocab"], hidden=shape["hidden"], layers=shape["layers"], heads=shape["heads"],
                           kv_heads=shape["kv_heads"], intermediate=shape["intermediate"],
                           max_positions=max(2048, shape["seq_len"] * 2), device=device)


def useful_flops(model, tokens, response_tokens, seq_len):
    """FLOPs of one training step's useful work (see the module docstring): (step, reference pass)."""
    cfg = model.config
    head = model.get_output_embeddings()
    body = matmul_params(model) - head.weight.numel()
    forward = 2 * body * tokens + 2 * head.weight.numel() * response_tokens + \
        4 * cfg.num_hidden_layers * cfg.hidden_size * tokens * (seq_len / 2)
    return 3 * forward, forward


def peak_memory(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # CPU: the process's peak RSS


def reset_memory(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def examples_for(shape, seed=0):
    """batch_size pairs of random token ids: a shared prompt and two responses filling seq_len, no padding."""
    g = torch.Generator().manual_seed(seed)
    vocab, p, r = shape["vocab"], shape["prompt_len"], shape["seq_len"] - shape["prompt_len"]
    ids = lambda n: torch.randint(4, vocab - 2, (n,), generator=g).tolist()  # noqa: E731  (no special tokens)
    return [dict(prompt_ids=ids(p), chosen_ids=ids(r), rejected_ids=ids(r), chosen_winrate=0.75, rejected_winrate=0.3, gate=0.0)
            for _ in range(shape["batch_size"])]


def train(accelerator, model, examples, pad_id, shape, device, gradient_checkpointing, share_prompt=False, beta=1e-3,
          logits_chunk=None):
    """The reference pass and `steps` of sspo.py's optimizer steps (sspo.optimizer_step); returns timings, memory, loss."""
    model.config.use_cache = False
    sspo.disable_dropout(model)
    with warnings.catch_warnings():  # sspo.py's call; transformers 5 calls the name deprecated (FutureWarning)
        warnings.simplefilter("ignore", FutureWarning)
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_disable()
    model.train()
    scorer = sspo.SequenceScorer(model, chunk=logits_chunk)
    scorer, opt = accelerator.prepare(scorer, sspo.make_optimizer(scorer, "rmsprop", 5e-7, 0.0))
    batch = {k: v.to(device) for k, v in sspo.collate(examples, pad_id, share_prompt).items()}
    reset_memory(device)

    with torch.no_grad(), accelerator.autocast():  # pi_t, once, as sspo.py does before its first update
        scorer(**batch)
        sync(device)
        t = time.perf_counter()
        ref, _ = scorer(**batch)
        sync(device)
        ref_s = time.perf_counter() - t
    ref = ref.view(2, -1).T  # (pairs, 2), as sspo.reference_logps returns it

    times, losses = [], []
    for step in range(shape["warmup"] + shape["steps"]):
        sync(device)
        t = time.perf_counter()
        metrics, _, _ = sspo.optimizer_step(accelerator, scorer, opt, examples, ref, list(range(len(examples))), pad_id,
                                            share_prompt, 1.0, loss="sspo", beta=beta, rep_weight=1.0, rep_margin=0.1)
        losses.append(metrics["loss"])  # its metrics are a host sync, as in sspo.py
        sync(device)
        if step >= shape["warmup"]:
            times.append(time.perf_counter() - t)
    # tokens: of the pairs (prompt counted for chosen and rejected); fed: those the layout computes
    tokens = sum(sspo.pair_tokens(e) for e in examples)
    fed = tokens - (sum(len(e["prompt_ids"]) for e in examples) if share_prompt else 0)
    step_flops, ref_flops = useful_flops(model, fed, len(batch["resp_pos"]), shape["seq_len"])
    step_s = sorted(times)[len(times) // 2]
    out = dict(gradient_checkpointing=gradient_checkpointing, share_prompt=share_prompt, tokens_per_step=tokens,
               fed_tokens_per_step=fed, step_s=step_s,
               tokens_per_s=tokens / step_s, step_tflops=step_flops / step_s / 1e12, ref_s=ref_s,
               ref_tokens_per_s=tokens / ref_s, ref_tflops=ref_flops / ref_s / 1e12, peak_memory_gib=peak_memory(device),
               first_loss=losses[0], last_loss=losses[-1])
    del opt, scorer
    accelerator.free_memory()  # drop the accelerator's references to this run's optimizer state
    model.zero_grad(set_to_none=True)
    return out


def generation(model, tokenizer, shape, device, k=4):
    """New tokens/s of generate.sample_responses on bf16 (GPU) weights; the random model seldom stops early."""
    import generate

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model.gradient_checkpointing_disable()  # train() may have left it on
    lm = model.to(torch.bfloat16 if device.type == "cuda" else torch.float32).eval()
    lm.config.use_cache = True
    prompts = [" ".join(f"w{(7 * i + j) % 500}" for j in range(32)) for i in range(shape["gen_prompts"])]
    out = {}
    for name, slots in (("slots", True), ("hf_generate", False)):
        reset_memory(device)
        generate.sample_responses(prompts[:1], model=(lm, tokenizer), k=k, max_new_tokens=2, batch_size=k, slots=slots)  # warm-up
        sync(device)
        t = time.perf_counter()
        results = generate.sample_responses(prompts, model=(lm, tokenizer), k=k, max_new_tokens=shape["gen_new_tokens"],
                                            batch_size=len(prompts) * k, slots=slots)
        sync(device)
        dt = time.perf_counter() - t
        new = sum(n for r in results for n in r["num_tokens"])
        out[name] = dict(new_tokens=new, seconds=dt, new_tokens_per_s=new / dt, peak_memory_gib=peak_memory(device))
    return dict(prompts=len(prompts), k=k, batch=len(prompts) * k, max_new_tokens=shape["gen_new_tokens"], **out,
                slots_over_hf_generate=out["slots"]["new_tokens_per_s"] / out["hf_generate"]["new_tokens_per_s"])


def main(tiny=False, out=None, batch_size=None, seq_len=None, steps=None):
    run(tiny, out, batch_size, seq_len, steps)  # Fire would print a returned report


def run(tiny=False, out=None, batch_size=None, seq_len=None, steps=None):
    """Run the GPU measurements (or the tiny CPU shape) and write them as JSON.

    Args:
      tiny: a tiny shape that runs on CPU in seconds (the test of this script)
      out: JSON path; default $OUT/gpu.json when $OUT is set, else bench/results/gpu.json (tiny: none)
      batch_size: pairs per step (default 4; tiny 2)
      seq_len: tokens per sequence (default 1024; tiny 64)
      steps: timed training steps per configuration (default 8; tiny 2)
    """
    shape = dict(TINY if tiny else FULL)
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len), ("steps", steps)):
        if value is not None:
            shape[name] = int(value)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not tiny:
        raise SystemExit("no GPU here: run with --tiny (a CPU smoke test), or on a GPU machine")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 master-weight ops outside autocast (optimizer, norms)
    t0 = time.time()
    report = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                  torch=torch.__version__, shape=shape)
    import transformers

    report["transformers"] = transformers.__version__
    report["bf16_matmul_tflops"] = matmul_rate(device, shape["matmul_n"], torch.bfloat16, reps=10) / 1e12
    print(f"{report['device']}: bf16 matmul {report['bf16_matmul_tflops']:.1f} TFLOP/s (n={shape['matmul_n']})", flush=True)

    from accelerate import Accelerator

    # as `sspo.py --mixed_precision bf16` on the GPU; the tiny CPU shape in fp32 (one accelerate state per
    # process, and the tests' in-process sspo.py runs are fp32)
    accelerator = Accelerator(mixed_precision="bf16" if device.type == "cuda" else "no")
    tokenizer = make_tokenizer(shape["vocab"])
    model = make_model(shape, tokenizer, device)
    report["params"] = sum(p.numel() for p in model.parameters())
    examples = examples_for(shape)
    report["train"] = []
    for gc, share in ((False, False), (True, False), (False, True)):
        r = train(accelerator, model, examples, tokenizer.pad_token_id, shape, device, gradient_checkpointing=gc,
                  share_prompt=share)
        r["mfu"] = r["step_tflops"] / report["bf16_matmul_tflops"]
        r["ref_mfu"] = r["ref_tflops"] / report["bf16_matmul_tflops"]
        report["train"].append(r)
        print(f"train  gradient_checkpointing={gc!s:5} share_prompt={share!s:5}  {r['tokens_per_s']:9.0f} tok/s  MFU {r['mfu']:.1%}  "
              f"peak {r['peak_memory_gib']:.2f} GiB  step {r['step_s'] * 1e3:.0f} ms  | reference pass "
              f"{r['ref_tokens_per_s']:9.0f} tok/s, MFU {r['ref_mfu']:.1%}  | loss {r['first_loss']:.4g} -> {r['last_loss']:.4g}",
              flush=True)
    g = report["generation"] = generation(model, tokenizer, shape, device)
    for name in ("slots", "hf_generate"):
        r = g[name]
        print(f"generate ({name:11}) {g['prompts']} prompts x K={g['k']} (batch {g['batch']}), {r['new_tokens']} new tokens in "
              f"{r['seconds']:.1f} s: {r['new_tokens_per_s']:.0f} new tok/s, peak {r['peak_memory_gib']:.2f} GiB", flush=True)
    report["seconds"] = time.time() - t0
    if out is None and not tiny:
        out = os.path.join(os.environ["OUT"], "gpu.json") if os.environ.get("OUT") else os.path.join(ROOT, "bench/results/gpu.json")
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {out}")
    return report


if __name__ == "__main__":
    import fire

    fire.Fire(main)
