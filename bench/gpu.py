"""sspo.py's training step and generate.py's sampling on one GPU: tokens/s, MFU, peak memory.

One prepared script for a single short GPU lease; it needs nothing but torch and transformers and
makes everything itself (a random-weight Llama-3.2-1B-shape model, synthetic token ids, a word-level
tokenizer with a ChatML template), so nothing is downloaded and nothing big travels.

    python bench/gpu.py                 # GPU: ~1.2B Llama (16 layers, d 2048, vocab 128256), seq 1024, bf16; ~2 min
    python bench/gpu.py --tiny          # CPU or GPU: a tiny shape that runs in seconds (tests/test_bench.py)

What it runs, as sspo.py's main() does it (sspo.SequenceScorer, sspo.preference_loss, sspo.repulsion_loss,
RMSprop on fp32 weights, bf16 autocast as `--mixed_precision bf16`, gradient clipping):
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
sys.path.insert(0, ROOT)
import sspo  # noqa: E402

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
FULL = dict(layers=16, hidden=2048, heads=32, kv_heads=8, intermediate=8192, vocab=128256, seq_len=1024, prompt_len=256,
            batch_size=4, steps=8, warmup=2, matmul_n=8192, gen_prompts=16, gen_new_tokens=256)
TINY = dict(layers=2, hidden=64, heads=4, kv_heads=2, intermediate=128, vocab=512, seq_len=64, prompt_len=16,
            batch_size=2, steps=2, warmup=1, matmul_n=256, gen_prompts=2, gen_new_tokens=8)


def make_tokenizer(vocab):
    """A word-level fast tokenizer covering every id of the model (so any sampled id decodes), ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = ["<unk>", "<pad>", "<|im_start|>", "<|im_end|>"]
    words = special + ["user", "assistant"] + [f"w{i}" for i in range(vocab - len(special) - 2)]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                        bos_token="<|im_start|>", eos_token="<|im_end|>")
    tokenizer.chat_template = CHATML
    return tokenizer


def make_model(shape, tokenizer, device):
    """A random-weight LlamaForCausalLM of `shape` (fp32 weights, as sspo.py trains them), built on `device`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
                         num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                         num_key_value_heads=shape["kv_heads"], max_position_embeddings=max(2048, shape["seq_len"] * 2),
                         tie_word_embeddings=True,
                         bos_token_id=tokenizer.convert_tokens_to_ids("<|im_start|>"),
                         eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"), pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_rate(device, n, dtype=torch.bfloat16, reps=10, rounds=5):
    """Best-of-rounds TFLOP/s of torch.mm(n x n, n x n) in `dtype` on `device`."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    torch.mm(a, b)
    sync(device)
    best = 0.0
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b)
        sync(device)
        best = max(best, 2 * n ** 3 * reps / (time.perf_counter() - t) / 1e12)
    return best


def useful_flops(model, tokens, response_tokens, seq_len):
    """FLOPs of one training step's useful work (see the module docstring): (step, reference pass)."""
    cfg = model.config
    head = model.get_output_embeddings()
    body = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head)
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
    return [dict(prompt_ids=ids(p), chosen_ids=ids(r), rejected_ids=ids(r), chosen_winrate=0.75, rejected_winrate=0.3)
            for _ in range(shape["batch_size"])]


def train(model, examples, pad_id, shape, device, gradient_checkpointing, share_prompt=False, beta=1e-3, logits_chunk=1024):
    """The reference pass and `steps` training steps of sspo.py's loop; returns timings, memory and the loss."""
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
    opt = torch.optim.RMSprop([p for p in scorer.parameters() if p.requires_grad], lr=5e-7)
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16)  # noqa: E731  (= --mixed_precision bf16)
    batch = {k: v.to(device) for k, v in sspo.collate(examples, pad_id, share_prompt).items()}
    b = len(examples)
    win_w = torch.tensor([e["chosen_winrate"] for e in examples], device=device)
    win_l = torch.tensor([e["rejected_winrate"] for e in examples], device=device)
    reset_memory(device)

    with torch.no_grad(), autocast():  # pi_t, once, as sspo.py does before its first update
        scorer(**batch)
        sync(device)
        t = time.perf_counter()
        ref, _ = scorer(**batch)
        sync(device)
        ref_s = time.perf_counter() - t

    times, losses = [], []
    for step in range(shape["warmup"] + shape["steps"]):
        sync(device)
        t = time.perf_counter()
        with autocast():
            logps, pooled = scorer(**batch)
        pref = sspo.preference_loss(logps[:b], logps[b:], ref[:b], ref[b:], loss_type="sspo", beta=beta,
                                    chosen_winrate=win_w, rejected_winrate=win_l)
        loss = (pref + sspo.repulsion_loss(pooled[:b], pooled[b:], 0.1)).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(scorer.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))  # a host sync, as sspo.py's logging has
        sync(device)
        if step >= shape["warmup"]:
            times.append(time.perf_counter() - t)
    # tokens: of the pairs (prompt counted for chosen and rejected); fed: those the layout computes
    tokens = sum(2 * len(e["prompt_ids"]) + len(e["chosen_ids"]) + len(e["rejected_ids"]) for e in examples)
    fed = tokens - (sum(len(e["prompt_ids"]) for e in examples) if share_prompt else 0)
    step_flops, ref_flops = useful_flops(model, fed, len(batch["resp_pos"]), shape["seq_len"])
    step_s = sorted(times)[len(times) // 2]
    out = dict(gradient_checkpointing=gradient_checkpointing, share_prompt=share_prompt, tokens_per_step=tokens,
               fed_tokens_per_step=fed, step_s=step_s,
               tokens_per_s=tokens / step_s, step_tflops=step_flops / step_s / 1e12, ref_s=ref_s,
               ref_tokens_per_s=tokens / ref_s, ref_tflops=ref_flops / ref_s / 1e12, peak_memory_gib=peak_memory(device),
               first_loss=losses[0], last_loss=losses[-1])
    del opt, scorer
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
    report["bf16_matmul_tflops"] = matmul_rate(device, shape["matmul_n"])
    print(f"{report['device']}: bf16 matmul {report['bf16_matmul_tflops']:.1f} TFLOP/s (n={shape['matmul_n']})", flush=True)

    tokenizer = make_tokenizer(shape["vocab"])
    model = make_model(shape, tokenizer, device)
    report["params"] = sum(p.numel() for p in model.parameters())
    examples = examples_for(shape)
    report["train"] = []
    for gc, share in ((False, False), (True, False), (False, True)):
        r = train(model, examples, tokenizer.pad_token_id, shape, device, gradient_checkpointing=gc, share_prompt=share)
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
