"""sspo.py and generate.py on one GPU, in one prepared script for a short lease: sampling, training, and
sspo.py against TRL as whole processes.

    python bench/gpu.py                 # GPU: all of it in ~6 min on an H200 (see the shapes below)
    python bench/gpu.py --tiny          # CPU or GPU: tiny shapes, every code path in seconds (tests/test_bench.py)

It makes everything itself (random-weight Llama shapes, synthetic token ids, tests/tiny.py's tokenizers,
bench/vs_trl.py's generated work), so nothing is downloaded and nothing big travels. On a GPU machine
without network, TRL comes as wheels (trl, datasets, dill, multiprocess, fsspec, pyarrow); without TRL the
comparison is skipped with a line.

What it measures, in order (each part's numbers are written to the JSON as soon as it ends):
1. the device: bf16 matmul rate (torch.mm of n x n, best of 5) and copy bandwidth (a 2 GiB device-to-device
   copy, bytes read + written); the transformers version, and whether generate.py's slots run on it
   (generate.slots_work on the generation model);
2. sampling, GEN shape (~1.2B Llama: 16 layers, d 2048, GQA 32/8, MLP 8192, vocab 128256; bf16 weights):
   generate.sample_responses of 64 prompts x K=4, 256 new tokens each (a random model seldom ends a turn),
   all sequences at once, three ways side by side: the block path with the decode step captured as a CUDA
   graph (generate.py's default on a GPU), the same slots stepped eagerly from the host, and HF generate.
   New tokens/s, and as a share of the memory-bandwidth limit: every decode step must read the weights
   that enter matmuls and each sequence's keys and values so far, at the measured copy bandwidth;
3. the training step, TRAIN shape (~1.0B Llama: as GEN with vocab 16384), the CLI's work: batch 8 pairs,
   prompt 128 + responses of 384 tokens, no padding, bf16 autocast on fp32 weights, RMSprop, with
   sspo.py's own functions (sspo.SequenceScorer, sspo.optimizer_step), rows apart and prompt shared:
   steady tokens/s of the pairs (the prompt counted twice), MFU of the useful FLOPs, peak memory;
4. whole processes on the TRAIN shape, bench/vs_trl.py's children: 512 pairs (prompts ~128 tokens,
   responses 384 +- 25%), batch 8, max_length 1024, sppo_hard, RMSprop, bf16, the final model saved:
   sspo.py (its GPU default layout), sspo.py with the prompt shared, and TRL's DPOTrainer(loss_type
   sppo_hard, bf16=True). Wall, train time (first backbone forward to last optimizer step, the same
   hooks in both), peak GPU memory allocated and reserved; for sspo.py also its own split (reference
   pass, training loop), whose tokens/s is set beside part 3's steady step.

5. (--parts profile, not in the default set) where sampling's time goes: torch.profiler over GEN-shape
   sampling of --profile_steps new tokens, the block path with graphs and the eagerly stepped slots, each after
   a warm-up of the same shapes; the top ops by device time (CPU time on a CPU) as a table, and the share of
   the profiled time in sort / top-p, attention, matmuls and everything else.

MFU counts useful FLOPs only (recomputation is not useful):
  training step: 6 N_body T + 6 N_head R + 12 L d T S_eff,   reference pass: a third of that,
with N_body the weights in the blocks' matmuls, N_head the LM head's (vocab x d), T all tokens, R the
response tokens whose log-probs the loss needs (sspo.py runs the LM head on those alone), L layers,
d width, and S_eff = S/2 the average causal attention span of a sequence of S tokens.
Results: printed, and JSON in --out (default $OUT/gpu.json when $OUT is set, else bench/results/gpu.json).
"""
import json
import os
import resource
import sys
import tempfile
import time
import traceback

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "bench")]
import sspo  # noqa: E402
import tuning  # noqa: E402
from flops import matmul_params, matmul_rate, sync  # noqa: E402
from tests.tiny import PUNCTUATION, SPECIAL, make_llama, make_tokenizer  # noqa: E402  (the tests' tiny builders)

BODY = dict(layers=16, hidden=2048, heads=32, kv_heads=8, intermediate=8192)
FULL = dict(gen=dict(BODY, vocab=128256), train=dict(BODY, vocab=16384), matmul_n=8192, copy_gib=2,
            seq_len=512, prompt_len=128, batch_size=8, steps=8, warmup=2,
            gen_prompts=64, gen_k=4, gen_new_tokens=256,
            cli_pairs=512, cli_prompt_tokens=128, cli_response_tokens=384, cli_max_length=1024)
SAMPLING = dict(temperature=0.7, top_p=0.9, seed=0)  # generate.py's defaults
TINY_BODY = dict(layers=2, hidden=64, heads=4, kv_heads=2, intermediate=128)
TINY = dict(gen=dict(TINY_BODY, vocab=512), train=dict(TINY_BODY, vocab=512), matmul_n=256, copy_gib=1 / 64,
            seq_len=48, prompt_len=16, batch_size=2, steps=2, warmup=1,
            gen_prompts=3, gen_k=2, gen_new_tokens=20,
            cli_pairs=4, cli_prompt_tokens=16, cli_response_tokens=24, cli_max_length=128)


def word_tokenizer(vocab):
    """tests/tiny.py's word-level ChatML tokenizer with `vocab` tokens (words w0, w1, ...): any sampled id decodes."""
    fixed = len(SPECIAL) + len(PUNCTUATION) + 2
    return make_tokenizer(words=["user", "assistant"] + [f"w{i}" for i in range(vocab - fixed)])


def make_model(shape, tokenizer, device, max_positions=2048):
    """tests/tiny.py's random-weight Llama of `shape` (fp32 weights, as sspo.py trains them), built on `device`."""
    assert len(tokenizer) == shape["vocab"]
    return make_llama(vocab_size=shape["vocab"], hidden=shape["hidden"], layers=shape["layers"], heads=shape["heads"],
                      kv_heads=shape["kv_heads"], intermediate=shape["intermediate"], max_positions=max_positions,
                      device=device)


def useful_flops(model, tokens, response_tokens, seq_len):
    """FLOPs of one training step's useful work (see the module docstring): (step, reference pass)."""
    cfg = model.config
    head = model.get_output_embeddings()
    body = matmul_params(model) - head.weight.numel()
    forward = 2 * body * tokens + 2 * head.weight.numel() * response_tokens + \
        4 * cfg.num_hidden_layers * cfg.hidden_size * tokens * (seq_len / 2)
    return 3 * forward, forward


def peak_memory(device):
    """(peak allocated, peak reserved) in GiB since the last reset; on a CPU the process's peak RSS twice."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30, torch.cuda.max_memory_reserved(device) / 2 ** 30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    return rss, rss


def reset_memory(device):
    import gc

    gc.collect()  # what an earlier part left in reference cycles goes before the peak is reset
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def copy_bandwidth(device, gib, rounds=5):
    """Best-of-rounds bytes/s of a device-to-device copy of `gib` GiB, counting bytes read and written."""
    n = int(gib * 2 ** 30) // 4
    a, b = torch.empty(n, device=device), torch.empty(n, device=device)
    b.copy_(a)
    sync(device)
    best = 0.0
    for _ in range(rounds):
        t = time.perf_counter()
        b.copy_(a)
        sync(device)
        best = max(best, 2 * 4 * n / (time.perf_counter() - t))
    return best


# ============================================================================== 2. sampling

def generation(model, tokenizer, shape, device, bandwidth, slots_eager=True):
    """New tokens/s of generate.sample_responses three ways, on bf16 (GPU) weights; see the module docstring."""
    import generate

    lm = model.to(torch.bfloat16 if device.type == "cuda" else torch.float32).eval()
    lm.config.use_cache = True
    k, n = shape["gen_k"], shape["gen_prompts"]
    prompts = [" ".join(f"w{(7 * i + j) % 500}" for j in range(32)) for i in range(n)]
    out = dict(slots_work=generate.slots_work(lm, tokenizer, 64 + shape["gen_new_tokens"]))
    ways = (("graphs", dict(slots=True, graphs=True)), ("slots_eager", dict(slots=True, graphs=False)),
            ("hf_generate", dict(slots=False)))
    ways = [w for w in ways if slots_eager or w[0] != "slots_eager"]
    if not out["slots_work"]:  # as generate.py does: a line (slots_work printed why), then HF generate alone
        print("generate: the slots do not reproduce this model's forward here: HF generate alone", flush=True)
        ways = [w for w in ways if w[0] == "hf_generate"]
    for name, how in ways:
        reset_memory(device)
        generate.sample_responses(prompts[:2], lm, tokenizer, **SAMPLING, k=k, max_new_tokens=2, batch_size=2 * k, **how)  # warm-up
        sync(device)
        t = time.perf_counter()
        results = generate.sample_responses(prompts, lm, tokenizer, **SAMPLING, k=k, max_new_tokens=shape["gen_new_tokens"],
                                            batch_size=n * k, **how)
        sync(device)
        dt = time.perf_counter() - t
        new = sum(c for r in results for c in r["num_tokens"])
        alloc, reserved = peak_memory(device)
        out[name] = dict(new_tokens=new, seconds=dt, new_tokens_per_s=new / dt, peak_allocated_gib=alloc,
                         peak_reserved_gib=reserved, answers=results)
        print(f"generate ({name:11}) {n} prompts x K={k}: {new} new tokens in {dt:.2f} s: {new / dt:9.0f} new tok/s, "
              f"peak {alloc:.2f} GiB", flush=True)
    if not out["slots_work"]:
        out["hf_generate"].pop("answers")
        return out
    same = out["graphs"]["answers"] == out["slots_eager"]["answers"] if slots_eager else None
    for name, _ in ways:
        out[name].pop("answers")
    # the memory-bandwidth limit: each step reads the matmul weights once and every sequence's keys and values
    cfg = lm.config
    prompt_len = sum(len(tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True))
                     for p in prompts) / n
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 2
    steps, rows = shape["gen_new_tokens"], n * k
    weight_bytes = matmul_params(lm) * lm.dtype.itemsize * steps
    kv_bytes = rows * kv_per_token * sum(prompt_len + s for s in range(steps))
    limit = rows * steps / ((weight_bytes + kv_bytes) / bandwidth)
    out.update(prompts=n, k=k, batch=rows, max_new_tokens=steps, graphs_answers_equal_eager_slots=same,
               bandwidth_limit_new_tokens_per_s=limit,
               graphs_share_of_bandwidth_limit=out["graphs"]["new_tokens_per_s"] / limit,
               graphs_over_hf_generate=out["graphs"]["new_tokens_per_s"] / out["hf_generate"]["new_tokens_per_s"])
    if slots_eager:
        out["slots_eager_over_hf_generate"] = out["slots_eager"]["new_tokens_per_s"] / out["hf_generate"]["new_tokens_per_s"]
    print(f"generate: graphs {out['graphs_over_hf_generate']:.1f}x HF generate, {out['graphs_share_of_bandwidth_limit']:.1%} "
          f"of the bandwidth limit ({limit:.0f} new tok/s); answers equal to the eager slots': {same}", flush=True)
    return out


OP_GROUPS = (("sort and top-p", ("sort", "cumsum", "topk", "multinomial", "softmax", "scatter", "gather")),
             ("attention", ("attention", "sdpa", "flash", "bmm", "baddbmm")),
             ("matmul", ("mm", "gemm", "linear", "addmm", "matmul")))


def op_group(name):
    """Which of OP_GROUPS an op or kernel name falls in (the first that matches), else "other"."""
    low = name.lower()
    return next((group for group, keys in OP_GROUPS if any(k in low for k in keys)), "other")


def profile_generation(model, tokenizer, shape, device, steps):
    """torch.profiler over sampling `steps` new tokens, the block path with graphs and the eager slots: the top
    ops and each group's share of the self time (module docstring, part 5)."""
    import generate
    from torch.profiler import ProfilerActivity, profile

    lm = model.to(torch.bfloat16 if device.type == "cuda" else torch.float32).eval()
    lm.config.use_cache = True
    k, n = shape["gen_k"], shape["gen_prompts"]
    prompts = [" ".join(f"w{(7 * i + j) % 500}" for j in range(32)) for i in range(n)]
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    out = {}
    for name, how in (("graphs", dict(slots=True, graphs=True)), ("slots_eager", dict(slots=True, graphs=False))):
        run = lambda: generate.sample_responses(prompts, lm, tokenizer, **SAMPLING, k=k, max_new_tokens=steps,  # noqa: E731
                                                batch_size=n * k, **how)
        run()  # warm-up: every shape of this run captured (graphs) or compiled once
        sync(device)
        with profile(activities=activities) as prof:
            run()
            sync(device)
        events = prof.key_averages()
        timed = lambda e: (e.self_device_time_total if cuda else e.self_cpu_time_total)  # noqa: E731
        total = sum(timed(e) for e in events) or 1.0
        groups = {}
        for e in events:
            groups[op_group(e.key)] = groups.get(op_group(e.key), 0.0) + timed(e) / total
        top = sorted(events, key=timed, reverse=True)[:25]
        out[name] = dict(steps=steps, total_ms=total / 1e3, group_shares=groups,
                         top=[dict(op=e.key, calls=e.count, self_ms=timed(e) / 1e3, share=timed(e) / total) for e in top])
        print(f"profile ({name}): {total / 1e3:.1f} ms of {'device' if cuda else 'CPU'} time over {steps} steps; "
              + ", ".join(f"{g} {v:.0%}" for g, v in sorted(groups.items(), key=lambda kv: -kv[1])), flush=True)
        for e in top[:12]:
            print(f"    {timed(e) / 1e3:9.2f} ms {e.count:7d} x  {e.key[:90]}", flush=True)
    return out


# ============================================================================== 3. training step

def examples_for(shape, vocab, seed=0):
    """batch_size pairs of random token ids: a prompt and two responses of seq_len - prompt_len, no padding."""
    g = torch.Generator().manual_seed(seed)
    p, r = shape["prompt_len"], shape["seq_len"] - shape["prompt_len"]
    ids = lambda n: torch.randint(4, vocab - 2, (n,), generator=g).tolist()  # noqa: E731  (no special tokens)
    return [dict(prompt_ids=ids(p), chosen_ids=ids(r), rejected_ids=ids(r), chosen_winrate=0.75, rejected_winrate=0.3, gate=0.0)
            for _ in range(shape["batch_size"])]


def train(accelerator, model, examples, pad_id, shape, device, share_prompt, beta=1e-3):
    """The reference pass and `steps` of sspo.py's optimizer steps (sspo.optimizer_step); returns timings, memory, loss."""
    model.config.use_cache = False
    sspo.disable_dropout(model)
    model.train()
    scorer = sspo.SequenceScorer(model)
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
    tokens = sum(sspo.pair_tokens(e) for e in examples)  # the prompt counted for chosen and rejected
    fed = tokens - (sum(len(e["prompt_ids"]) for e in examples) if share_prompt else 0)  # what the layout computes
    step_flops, ref_flops = useful_flops(model, fed, len(batch["resp_pos"]), shape["seq_len"])
    step_s = sorted(times)[len(times) // 2]
    alloc, reserved = peak_memory(device)
    out = dict(share_prompt=share_prompt, tokens_per_step=tokens, fed_tokens_per_step=fed, step_s=step_s,
               tokens_per_s=tokens / step_s, step_tflops=step_flops / step_s / 1e12, ref_s=ref_s,
               ref_tokens_per_s=tokens / ref_s, ref_tflops=ref_flops / ref_s / 1e12, peak_allocated_gib=alloc,
               peak_reserved_gib=reserved, first_loss=losses[0], last_loss=losses[-1])
    del opt, scorer
    accelerator.free_memory()  # drop the accelerator's references to this run's optimizer state
    model.zero_grad(set_to_none=True)
    return out


# ============================================================================== 4. whole processes

def whole_processes(shape, device, out, save, systems=("sspo", "trl", "sspo_shared")):
    """bench/vs_trl.py's children on the TRAIN shape: sspo.py (default layout), sspo.py prompt shared, TRL."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_vs_trl", os.path.join(ROOT, "bench", "vs_trl.py"))
    vs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(vs)
    work = tempfile.mkdtemp(prefix="sspo-gpu-")
    t = time.time()
    model_shape = {k: shape["train"][k] for k in ("hidden", "layers", "heads", "kv_heads", "intermediate")}
    built = vs.build_work(work, shape["cli_pairs"], shape["cli_max_length"], shape=model_shape, device=device.type,
                          prompt_tokens=shape["cli_prompt_tokens"], response_tokens=shape["cli_response_tokens"])
    if device.type == "cuda":
        torch.cuda.empty_cache()
    out.update(work={k: v for k, v in built.items() if k not in ("lengths", "model", "scored")}, build_s=time.time() - t)
    save()
    print(f"whole processes: {built['pairs']} pairs, {built['real_tokens']} real tokens, model {built['params'] / 1e6:.0f}M "
          f"(built in {out['build_s']:.0f} s)", flush=True)
    cfg = dict(model=built["model"], scored=built["scored"], beta=1e-3, lr=5e-7, batch_size=shape["batch_size"], epochs=1,
               max_length=shape["cli_max_length"], trl_precompute=False, trl_sampling="sequential", device=device.type)
    try:
        import trl  # noqa: F401
    except ImportError:
        print("whole processes: TRL is not installed here: sspo.py alone", flush=True)
        systems = [s for s in systems if s != "trl"]
    os.makedirs(os.path.join(work, "runs"), exist_ok=True)
    for which in systems:
        try:
            rec = vs.run_child(which, work, os.path.join(work, "runs", which), cfg, threads=os.cpu_count() if device.type == "cuda" else 1)
        except SystemExit as e:  # the child failed: its log's tail, and the other systems still run
            out[which] = dict(error=str(e)[-3000:])
            print(f"whole processes: {which} failed:\n{str(e)[-3000:]}", flush=True)
            continue
        rec["tokens_per_s"] = built["real_tokens"] / rec["train_s"]
        timing = rec.get("timing")
        if timing:
            rec["loop_tokens_per_s"] = timing["train_tokens"] / timing["train_s"]
        out[which] = {k: v for k, v in rec.items() if k not in ("first_step", "log", "load_before", "load_after")}
        print(f"whole processes: {which:11} wall {rec['wall_s']:6.1f} s  train {rec['train_s']:6.1f} s  "
              f"{rec['tokens_per_s']:7.0f} real tok/s  peak GPU {rec.get('cuda_peak_allocated_gib', 0):.1f} / "
              f"{rec.get('cuda_peak_reserved_gib', 0):.1f} GiB (allocated / reserved)"
              + (f"  | reference {timing['reference_s']:.1f} s, loop {timing['train_s']:.1f} s "
                 f"({rec['loop_tokens_per_s']:.0f} tok/s)" if timing else ""), flush=True)
        import shutil

        shutil.rmtree(os.path.join(work, "runs", which), ignore_errors=True)  # a 4 GB model each
        save()
    if "trl" in out and "wall_s" in out.get("trl", {}) and "wall_s" in out["sspo"]:
        s, t = out["sspo"], out["trl"]
        peak = lambda r: r.get("cuda_peak_reserved_gib") or r["peak_rss_mib"]  # noqa: E731
        out["sspo_over_trl"] = dict(speed=t["wall_s"] / s["wall_s"], train_speed=t["train_s"] / s["train_s"],
                                    peak_memory=peak(s) / peak(t))
        print(f"whole processes: sspo.py is {out['sspo_over_trl']['speed']:.2f}x TRL's speed (wall), "
              f"{out['sspo_over_trl']['train_speed']:.2f}x (train time), at {out['sspo_over_trl']['peak_memory']:.2f}x its "
              "peak memory", flush=True)
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    return out


# ================================================================================== the run

def main(tiny=False, out=None, parts="gen,train,cli", slots_eager=True, systems="sspo,trl,sspo_shared", profile_steps=32):
    run(tiny, out, parts, slots_eager, systems, profile_steps)  # Fire would print a returned report


def run(tiny=False, out=None, parts="gen,train,cli", slots_eager=True, systems="sspo,trl,sspo_shared", profile_steps=32):
    """Run the GPU measurements (or the tiny shapes on a CPU) and write them as JSON.

    Args:
      tiny: tiny shapes that run on a CPU in seconds (the test of this script)
      out: JSON path; default $OUT/gpu.json when $OUT is set, else bench/results/gpu.json (tiny: none)
      parts: which parts to run, comma-separated: gen (sampling), train (the step), cli (whole processes vs TRL),
        profile (where sampling's time goes; not in the default set)
      slots_eager: in gen, also the slots stepped eagerly from the host (beside graphs and HF generate)
      systems: in cli, which whole processes, comma-separated: sspo, trl, sspo_shared
      profile_steps: in profile, the new tokens each profiled sampling run makes
    """
    parts = set(parts.split(",") if isinstance(parts, str) else parts)
    systems = systems.split(",") if isinstance(systems, str) else list(systems)
    shape = dict(TINY if tiny else FULL)
    alloc_conf = tuning.grow_cuda_segments()  # as sspo.py sets it, before CUDA starts
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not tiny:
        raise SystemExit("no GPU here: run with --tiny (a CPU smoke test), or on a GPU machine")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 master-weight ops outside autocast (optimizer, norms)
    if out is None and not tiny:
        out = os.path.join(os.environ["OUT"], "gpu.json") if os.environ.get("OUT") else os.path.join(ROOT, "bench/results/gpu.json")
    t0 = time.time()
    import transformers

    report = dict(when=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                  device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                  torch=torch.__version__, transformers=transformers.__version__, cuda_alloc_conf=alloc_conf, shape=shape)
    report["bf16_matmul_tflops"] = matmul_rate(device, shape["matmul_n"], torch.bfloat16, reps=10) / 1e12
    report["copy_gb_per_s"] = copy_bandwidth(device, shape["copy_gib"]) / 1e9
    print(f"{report['device']}: bf16 matmul {report['bf16_matmul_tflops']:.1f} TFLOP/s, copy {report['copy_gb_per_s']:.0f} GB/s; "
          f"torch {torch.__version__}, transformers {transformers.__version__}", flush=True)

    def save():
        report["seconds"] = time.time() - t0
        if out:
            os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
            with open(out, "w") as f:
                json.dump(report, f, indent=2)

    def part(name, fn):
        t = time.time()
        try:
            report[name] = fn()
        except Exception as e:  # noqa: BLE001  (one part failing must not lose the others' numbers)
            traceback.print_exc()
            report[name] = dict(error=f"{type(e).__name__}: {e}")
        print(f"[{name}: {time.time() - t:.0f} s, {time.time() - t0:.0f} s in all]", flush=True)
        save()

    if "profile" in parts:
        def prof():
            tokenizer = word_tokenizer(shape["gen"]["vocab"])
            return profile_generation(make_model(shape["gen"], tokenizer, device), tokenizer, shape, device, profile_steps)
        part("profile", prof)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if "gen" in parts:
        def gen():
            tokenizer = word_tokenizer(shape["gen"]["vocab"])
            model = make_model(shape["gen"], tokenizer, device)
            result = generation(model, tokenizer, shape, device, report["copy_gb_per_s"] * 1e9, slots_eager)
            result["params"] = sum(p.numel() for p in model.parameters())
            return result
        part("generation", gen)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if "train" in parts:
        def steps():
            from accelerate import Accelerator

            # as `sspo.py --mixed_precision bf16` on the GPU; on a CPU fp32 (one accelerate state per process)
            accelerator = Accelerator(mixed_precision="bf16" if device.type == "cuda" else "no")
            tokenizer = word_tokenizer(shape["train"]["vocab"])
            model = make_model(shape["train"], tokenizer, device)
            examples = examples_for(shape, shape["train"]["vocab"])
            result = dict(params=sum(p.numel() for p in model.parameters()), configs=[])
            for share in (False, True):
                r = train(accelerator, model, examples, tokenizer.pad_token_id, shape, device, share_prompt=share)
                r["mfu"] = r["step_tflops"] / report["bf16_matmul_tflops"]
                r["ref_mfu"] = r["ref_tflops"] / report["bf16_matmul_tflops"]
                result["configs"].append(r)
                print(f"train  share_prompt={share!s:5}  {r['tokens_per_s']:9.0f} tok/s  MFU {r['mfu']:.1%}  peak "
                      f"{r['peak_allocated_gib']:.2f} / {r['peak_reserved_gib']:.2f} GiB  step {r['step_s'] * 1e3:.0f} ms  | "
                      f"reference pass {r['ref_tokens_per_s']:9.0f} tok/s, MFU {r['ref_mfu']:.1%}  | loss "
                      f"{r['first_loss']:.4g} -> {r['last_loss']:.4g}", flush=True)
            del model
            return result
        part("train", steps)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if "cli" in parts:
        report["whole_processes"] = {}
        part("whole_processes", lambda: whole_processes(shape, device, report["whole_processes"], save, systems))
        w, steady = report["whole_processes"], report.get("train", {}).get("configs")
        if steady and "loop_tokens_per_s" in w.get("sspo", {}):
            layout = w["sspo"].get("share_prompt_used", False)
            rate = next(c["tokens_per_s"] for c in steady if c["share_prompt"] == layout)
            w["cli_loop_over_steady_step"] = w["sspo"]["loop_tokens_per_s"] / rate
            print(f"the CLI's training loop runs at {w['cli_loop_over_steady_step']:.0%} of the steady step's tokens/s "
                  f"(same shape and layout)", flush=True)
            save()
    print(f"done in {time.time() - t0:.0f} s" + (f"; wrote {out}" if out else ""), flush=True)
    return report


if __name__ == "__main__":
    import fire

    fire.Fire(main)
