"""sspo.py vs TRL's DPOTrainer(loss_type="sppo_hard") on the same work: speed, memory, first-step loss.

    pip install -r requirements-bench.txt                  # TRL, for this benchmark only
    python bench/vs_trl.py                                 # 3 alternating repeats each: ~10 min on 2 quiet cores
    python bench/vs_trl.py --repeats 1 --prompts 8 --out '' --markdown_file ''   # a look, no files (~1-2 min)

Everything is built offline in --work: a random-weight Llama-shape model (~19M parameters, vocab 16k,
save_pretrained), a BPE tokenizer trained on generated text with a ChatML chat template, and a scored
file (docs/method.md §5) of --prompts prompts x K=4 responses (prompts ~64 tokens, responses 96-160 tokens).
The pairs are picked once with sspo.load_pairs (raw win rates, as for sppo_hard), and both trainers get
exactly those pairs, in that order, with the same batch size, max length, beta, learning rate,
optimizer (RMSprop), schedule, 1 epoch, fp32, 2 threads, no logging integration, no eval, and only the
final model saved. TRL's tokenisation of the conversational pairs is checked, pair by pair, to give
the very token ids sspo.py trains on, so both train on the same real tokens.

Each run is a child process (python bench/vs_trl.py --child ...): it runs `sspo.py` through runpy as
`python sspo.py ...` would, or builds the DPOTrainer and calls train() and save_model(). The two
alternate (A B, B A, ...) so drift in the machine's load hits both alike. Measured per run:
- wall: whole process, from spawning to exit (imports, loading, data preparation, training, saving);
- train time: from the first forward pass of the Llama backbone to the end of the last optimizer
  step, measured by the same two hooks in both children (the backbone's forward, patched on the
  class, and torch's global optimizer step post-hook). It includes sspo.py's reference pass and its
  one-pair scorer check, and TRL's reference-model forwards; it excludes loading, tokenising, saving;
- real tokens/s: sum over pairs of len(prompt + chosen) + len(prompt + rejected), pad excluded,
  times epochs, divided by train time (the same count for both: the token ids are the same);
- peak RSS: ru_maxrss of the child (os.wait4), the whole process;
- share of the CPU: useful FLOPs / train time / the fp32 matmul rate measured here (torch.mm of
  2048 x 2048 on the same threads, best of 5, before and after the runs: the higher). Useful FLOPs =
  8 N per real token: 6 N for the policy's forward and backward plus 2 N for one reference forward,
  N = weights that enter matmuls (the blocks' linear layers and the LM head; embedding lookups and
  attention's T x T products not counted);
- system share of the child's CPU time (os.wait4's ru_stime / (ru_utime + ru_stime)): mostly the
  kernel handing out fresh memory (page faults; ru_minflt is kept in the JSON);
- first-step loss of both (for sppo_hard at step 0, a = 0, so it is eta^2/2 for any data), and the
  data-dependent check behind it: TRL's logged mean policy log-prob of its first batch (pi_theta =
  pi_t at step 0) against sspo.py's reference log-probs (ref_logps.pt) of the same pairs.
Results: bench/results/vs_trl.json and the "sspo.py vs TRL DPOTrainer" section of bench/RESULTS.md.
"""
import itertools
import json
import math
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "bench")]
import flops  # noqa: E402
from tests.tiny import SPECIAL, chat_tokenizer, make_llama  # noqa: E402  (the tests' tiny builders)

MD_BEGIN, MD_END = "<!-- vs_trl:begin -->", "<!-- vs_trl:end -->"


# ================================================================================ the work

def synthetic_words(rng, n):
    """n distinct pronounceable words of 1-4 syllables (a made-up language: no data files needed)."""
    onsets = ["", "b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "st", "kr", "pl", "sh", "th"]
    vowels = ["a", "e", "i", "o", "u", "ai", "ou", "ea"]
    codas = ["", "", "n", "s", "r", "l", "t", "m", "nd"]
    words = set()
    while len(words) < n:
        words.add("".join(rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas) for _ in range(rng.randint(1, 4))))
    return sorted(words)


def make_tokenizer(folder, vocab_size=16384, seed=0):
    """A BPE tokenizer trained on generated text, with ChatML special tokens and chat template; saved in folder.

    The whitespace pre-tokenizer makes a text's tokens independent of what precedes it, so a response
    tokenised alone (sspo.py) and inside the rendered conversation (TRL) give the same ids.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    rng = random.Random(seed)
    words = synthetic_words(rng, 14000)
    weights = [1.0 / (r + 1) for r in range(len(words))]  # Zipf
    corpus = [" ".join(rng.choices(words, weights, k=40)) + " ." for _ in range(12000)]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.BPEDecoder()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                                        show_progress=False))
    return chat_tokenizer(tok, folder), words, weights


CPU_SHAPE = dict(hidden=384, layers=8, heads=6, kv_heads=2, intermediate=1024)  # ~19M with the 16k vocabulary


def make_model(folder, tokenizer, seed=0, shape=None, device="cpu"):
    """A random-weight Llama of `shape` (default CPU_SHAPE: d 384, 8 layers, GQA 6/2 heads, MLP 1024, tied
    embeddings), built on `device` and saved in folder."""
    return make_llama(folder, vocab_size=len(tokenizer), max_positions=1024, seed=seed, device=device,
                      **(shape or CPU_SHAPE))


def make_scored(path, tokenizer, words, weights, prompts=64, k=4, prompt_tokens=64, response_tokens=128, spread=0.25,
                seed=0):
    """A scored JSONL file (docs/method.md §5): prompts of ~prompt_tokens, k responses of response_tokens +- spread.

    pref is Bradley-Terry from random rewards (P_ij + P_ji = 1, P_ii = 1/2), sim a random symmetric
    matrix with diagonal 1. Lengths are counted in this tokenizer's tokens (a whitespace pre-tokenizer:
    a text's tokens are its words' tokens).
    """
    rng = random.Random(seed + 1)
    cum = list(itertools.accumulate(weights))  # what rng.choices(words, weights) builds at every call: the same draws
    cost = dict(zip(words, (len(e.ids) for e in tokenizer.backend_tokenizer.encode_batch(words, add_special_tokens=False))))

    def text(n_tokens):
        out, n = [], 0
        while n < n_tokens:
            w = rng.choices(words, cum_weights=cum)[0]
            out.append(w)
            n += cost[w]
        return " ".join(out)

    lo, hi = round(response_tokens * (1 - spread)), round(response_tokens * (1 + spread))
    with open(path, "w", encoding="utf-8") as f:
        for i in range(prompts):
            rewards = [rng.gauss(0, 1) for _ in range(k)]
            pref = [[0.5 if a == b else 1 / (1 + math.exp(rewards[b] - rewards[a])) for b in range(k)] for a in range(k)]
            sim = [[1.0] * k for _ in range(k)]
            for a in range(k):
                for b in range(a + 1, k):
                    sim[a][b] = sim[b][a] = round(rng.uniform(0.2, 0.9), 4)
            f.write(json.dumps({"id": f"bench-{i}", "prompt": text(rng.randint(prompt_tokens - 8, prompt_tokens + 8)),
                                "responses": [text(rng.randint(lo, hi)) for _ in range(k)], "pref": pref, "sim": sim}) + "\n")


def build_work(work, prompts, max_length, seed=0, shape=None, device="cpu", prompt_tokens=64, response_tokens=128):
    """Model (make_model's shape and device), tokenizer, scored file and the picked pairs with their token ids,
    in `work`; returns a summary."""
    import sspo

    model_dir, scored = os.path.join(work, "model"), os.path.join(work, "scored.jsonl")
    if os.path.exists(work):
        shutil.rmtree(work)
    os.makedirs(model_dir)
    tokenizer, words, weights = make_tokenizer(model_dir, seed=seed)
    model = make_model(model_dir, tokenizer, seed=seed, shape=shape, device=device)
    make_scored(scored, tokenizer, words, weights, prompts=prompts, prompt_tokens=prompt_tokens,
                response_tokens=response_tokens, seed=seed)
    pairs, stats = sspo.load_pairs(scored, "sppo_hard", 0.55, 0.95)  # taus unused: sppo_hard takes raw win rates
    examples, truncated = sspo.tokenize_pairs(pairs, tokenizer, max_length)
    if truncated:
        raise SystemExit(f"{truncated} pairs exceed --max_length {max_length}: raise it, the comparison needs none cut")
    with open(os.path.join(work, "pairs.json"), "w") as f:
        json.dump([{k: e[k] for k in ("prompt", "chosen", "rejected", "prompt_ids", "chosen_ids", "rejected_ids")}
                   for e in examples], f)
    real = sum(2 * len(e["prompt_ids"]) + len(e["chosen_ids"]) + len(e["rejected_ids"]) for e in examples)
    once = real - sum(len(e["prompt_ids"]) for e in examples)  # what sspo.py computes with the prompt shared
    lengths = [len(e["prompt_ids"]) + max(len(e["chosen_ids"]), len(e["rejected_ids"])) for e in examples]
    return dict(model=model_dir, scored=scored, pairs=len(examples), rows=stats["rows"], real_tokens=real,
                prompt_once_tokens=once,
                params=sum(p.numel() for p in model.parameters()), matmul_params=flops.matmul_params(model),
                vocab=len(tokenizer), lengths=lengths,
                prompt_tokens_mean=statistics.mean(len(e["prompt_ids"]) for e in examples),
                response_tokens_mean=statistics.mean(len(e[s]) for e in examples for s in ("chosen_ids", "rejected_ids")))


def matmul_rate(threads, n=2048):
    """Best-of-rounds fp32 GFLOP/s of torch.mm(n x n, n x n) on `threads` threads."""
    import torch

    torch.set_num_threads(threads)
    return flops.matmul_rate(n=n) / 1e9


# ============================================================================ the children

def install_clock():
    """Record the first forward of the Llama backbone and the end of every optimizer step (same in both).

    Returns (clock, undo): clock is filled as the run goes; undo() removes both hooks.
    """
    import functools

    import torch
    from transformers.models.llama import modeling_llama

    clock = {"first_forward": None, "last_step": None, "steps": 0}
    forward = modeling_llama.LlamaModel.forward

    @functools.wraps(forward)
    def timed(self, *args, **kwargs):
        if clock["first_forward"] is None:
            clock["first_forward"] = time.time()
        return forward(self, *args, **kwargs)

    modeling_llama.LlamaModel.forward = timed

    def after_step(optimizer, args, kwargs):
        clock["last_step"] = time.time()
        clock["steps"] += 1

    from torch.optim.optimizer import register_optimizer_step_post_hook

    handle = register_optimizer_step_post_hook(after_step)

    def undo():  # for callers in a longer-lived process (the tests)
        modeling_llama.LlamaModel.forward = forward
        handle.remove()

    return clock, undo


def child_sspo(work, out, cfg, share_prompt=None):
    """`python sspo.py --loss sppo_hard ...` in this process (runpy), with the clock installed."""
    import runpy

    clock, _ = install_clock()  # a child process: the hooks die with it
    args = ["--data", cfg["scored"], "--model", cfg["model"], "--output_dir", out, "--loss", "sppo_hard",
            "--beta", cfg["beta"], "--lr", cfg["lr"], "--batch_size", cfg["batch_size"], "--epochs", cfg["epochs"],
            "--max_length", cfg["max_length"], "--seed", 0, "--save_every", 0, "--optimizer", "rmsprop",
            "--warmup_ratio", 0.1, "--lr_schedule", "linear", "--max_grad_norm", 1.0,
            "--mixed_precision", "bf16" if cfg.get("device") == "cuda" else "no"]
    if share_prompt is not None:
        args += ["--share_prompt", share_prompt]
    sys.argv = [os.path.join(ROOT, "sspo.py"), *map(str, args)]
    runpy.run_path(os.path.join(ROOT, "sspo.py"), run_name="__main__")
    with open(os.path.join(out, "metrics.jsonl")) as f:
        steps = [json.loads(line) for line in f]
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    first = steps[0]
    return dict(clock, first_step_loss=first["loss"], first_step=first, timing=summary.get("timing"),
                step_tokens_per_s=[round(s["tokens_per_s"]) for s in steps],  # where in the loop the time goes
                share_prompt_used=summary.get("share_prompt_used"), **cuda_memory())


def cuda_memory():
    """Peak GPU memory of this process, allocated and reserved (GiB), or {} on a CPU."""
    import torch

    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return {}
    return dict(cuda_peak_allocated_gib=torch.cuda.max_memory_allocated() / 2 ** 30,
                cuda_peak_reserved_gib=torch.cuda.max_memory_reserved() / 2 ** 30)


def datasets_hashing_off():
    """datasets fingerprints each transform by pickling it; on some Python / pyarrow pairs (3.12 with a GPU
    image's pyarrow) that pickling fails inside TRL's preprocessing. Caching off, and a hash that cannot be
    computed replaced by a random one (what datasets itself does for most such failures)."""
    import uuid

    import datasets
    from datasets import fingerprint

    datasets.disable_caching()
    update = fingerprint.Hasher.update

    def tolerant(self, value):
        try:
            update(self, value)
        except Exception:  # noqa: BLE001  (any pickling failure)
            update(self, uuid.uuid4().hex)
    fingerprint.Hasher.update = tolerant


def child_trl(work, out, cfg):
    """TRL's DPOTrainer(loss_type="sppo_hard") on the same pairs and settings; train() then save_model()."""
    clock, undo = install_clock()
    if cfg.get("device") == "cuda":
        datasets_hashing_off()
    try:
        return _trl_run(work, out, cfg, clock)
    finally:
        undo()


def _trl_run(work, out, cfg, clock):
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    with open(os.path.join(work, "pairs.json")) as f:
        pairs = json.load(f)
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": p["prompt"]}],
                               "chosen": [{"role": "assistant", "content": p["chosen"]}],
                               "rejected": [{"role": "assistant", "content": p["rejected"]}]} for p in pairs])
    tokenizer = AutoTokenizer.from_pretrained(cfg["model"])
    model = AutoModelForCausalLM.from_pretrained(cfg["model"], dtype=torch.float32)
    cuda = cfg.get("device") == "cuda"
    args = DPOConfig(output_dir=out, loss_type=["sppo_hard"], beta=cfg["beta"], learning_rate=cfg["lr"],
                     per_device_train_batch_size=cfg["batch_size"], gradient_accumulation_steps=1,
                     num_train_epochs=cfg["epochs"], max_length=cfg["max_length"], optim="rmsprop", weight_decay=0.0,
                     lr_scheduler_type="linear", warmup_steps=0.1, max_grad_norm=1.0, seed=0,
                     bf16=cuda, fp16=False, use_cpu=not cuda, gradient_checkpointing=False,
                     precompute_ref_log_probs=cfg["trl_precompute"], train_sampling_strategy=cfg["trl_sampling"],
                     report_to="none", logging_steps=1, save_strategy="no", eval_strategy="no",
                     dataloader_num_workers=0)
    kept = []

    class Keep(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            kept.append(dict(logs or {}, step=state.global_step))

    trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer, callbacks=[Keep()])
    # The same token ids as sspo.py, pair by pair, or the comparison is void.
    ds = trainer.train_dataset
    same = sum(ds[i]["prompt_ids"] == p["prompt_ids"] and ds[i]["chosen_ids"] == p["chosen_ids"]
               and ds[i]["rejected_ids"] == p["rejected_ids"] for i, p in enumerate(pairs))
    if same != len(pairs) or len(ds) != len(pairs):
        raise SystemExit(f"TRL tokenised {len(pairs) - same} of {len(pairs)} pairs differently from sspo.py")
    trainer.train()
    trainer.save_model(out)
    first = next(log for log in kept if "loss" in log)
    return dict(clock, first_step_loss=first["loss"], first_step=first, same_token_ids=same, **cuda_memory())


def run_child(which, work, out, cfg, threads):
    """Spawn one child; returns its record (wall, peak RSS from wait4, and what the child measured)."""
    result_path = out + ".result.json"
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", TQDM_DISABLE="1",
               HF_DATASETS_CACHE=os.path.join(work, "datasets-cache"), WANDB_DISABLED="true")
    with open(out + ".cfg.json", "w") as f:
        json.dump(cfg, f)
    if which == "trl_malloc":  # what tuning.reuse_freed_memory does to sspo.py's own process, through the environment
        import tuning

        env.update({name: str(value) for name, value in tuning.MALLOC_SETTINGS.items()})
    cmd = [sys.executable, os.path.abspath(__file__), "--child", which, "--work", work, "--child_out", out,
           "--child_cfg", out + ".cfg.json", "--threads", str(threads)]
    load_before = os.getloadavg()
    log = open(out + ".log", "w")
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(proc.pid, 0)
    t1 = time.time()
    proc.returncode = os.waitstatus_to_exitcode(status)
    log.close()
    if proc.returncode != 0 or not os.path.exists(result_path):
        with open(out + ".log") as f:
            tail = f.read()[-3000:]
        raise SystemExit(f"{which} child failed (exit {proc.returncode}); log {out}.log:\n{tail}")
    with open(result_path) as f:
        child = json.load(f)
    train = child["last_step"] - child["first_forward"]
    return dict(system=which, wall_s=t1 - t0, train_s=train, setup_s=child["first_forward"] - t0,
                after_train_s=t1 - child["last_step"], peak_rss_mib=usage.ru_maxrss / 1024,
                user_s=usage.ru_utime, system_s=usage.ru_stime, minor_faults=usage.ru_minflt,
                child_peak_rss_mib=child["maxrss_kib"] / 1024, optimizer_steps=child["steps"],
                first_step_loss=child["first_step_loss"], first_step=child["first_step"],
                load_before=load_before, load_after=os.getloadavg(), log=out + ".log",
                **{k: child[k] for k in ("timing", "share_prompt_used", "cuda_peak_allocated_gib", "cuda_peak_reserved_gib",
                                         "step_tokens_per_s") if k in child})


# =============================================================================== the report

def spread(values):
    return dict(median=statistics.median(values), min=min(values), max=max(values))


def first_batch_check(work, cfg, built, trl_first):
    """TRL's logged step-1 mean policy log-probs vs sspo.py's reference log-probs of the same pairs.

    At step 0 pi_theta = pi_t, so TRL's policy log-probs of its first batch must equal sspo.py's
    reference log-probs (ref_logps.pt, from the same weights) of those pairs. TRL's first batch is
    pairs 0..B-1 under train_sampling_strategy='sequential'; under 'random' this check is skipped.
    """
    import torch

    if cfg["trl_sampling"] != "sequential":
        return None
    ref = torch.load(os.path.join(work, "runs", "sspo-0", "ref_logps.pt"))
    b = cfg["batch_size"]
    return dict(trl_logps_chosen=trl_first.get("logps/chosen"), sspo_ref_logps_chosen=float(ref[:b, 0].mean()),
                trl_logps_rejected=trl_first.get("logps/rejected"), sspo_ref_logps_rejected=float(ref[:b, 1].mean()))


def markdown(report):
    s, c = report["summary"], report["config"]
    fmt = lambda d, f: f"{f.format(d['median'])} ({f.format(d['min'])}-{f.format(d['max'])})"  # noqa: E731
    lines = [
        "## sspo.py vs TRL DPOTrainer", "",
        f"`{report['command']}` ({report['when']}; {report['machine']['cpus']} CPUs, {c['threads']} threads; "
        f"torch {report['versions']['torch']}, transformers {report['versions']['transformers']}, "
        f"trl {report['versions']['trl']}; load average {report['load_average']['min']:.1f}-"
        f"{report['load_average']['max']:.1f} during the runs).", "",
        f"Work: {report['work']['pairs']} pairs (from {report['work']['rows']} prompts x K=4) on a random Llama of "
        f"{report['work']['params'] / 1e6:.1f}M parameters (vocab {report['work']['vocab']}), prompts "
        f"~{report['work']['prompt_tokens_mean']:.0f} tokens, responses ~{report['work']['response_tokens_mean']:.0f}; "
        f"{report['work']['real_tokens']} real tokens an epoch; batch {c['batch_size']} pairs, max_length "
        f"{c['max_length']}, beta {c['beta']}, lr {c['lr']}, RMSprop, fp32, {c['epochs']} epoch; TRL with "
        f"precompute_ref_log_probs={c['trl_precompute']}, sampling '{c['trl_sampling']}'. "
        f"{c['repeats']} alternating runs each; median (min-max).", "",
        *table(s, fmt),
        f"fp32 matmul rate measured: {report['matmul_gflops']:.0f} GFLOP/s (torch.mm 2048^2, {c['threads']} threads). "
        f"Useful FLOPs = 8 N per token computed (policy forward+backward 6 N, one reference forward 2 N), "
        f"N = {report['work']['matmul_params'] / 1e6:.1f}M weights in matmuls (LM head included, embeddings and "
        "attention scores not); tokens computed: the real tokens, less one prompt per pair for sspo.py with "
        f"the prompt shared ({report['work'].get('prompt_once_tokens', 0)} of {report['work']['real_tokens']}). "
        "Real tokens/s counts every pair's prompt twice in every column, as the work is the same. "
        "Train time runs from the first backbone forward to the end of the last "
        "optimizer step (sspo.py's reference pass included); wall is the whole process; RSS is ru_maxrss.",
    ]
    check = report.get("first_batch_check")
    if check:
        lines += ["", f"Same data at step 0: TRL's mean policy log-prob of its first batch, chosen "
                      f"{check['trl_logps_chosen']:.4f} / rejected {check['trl_logps_rejected']:.4f}; sspo.py's "
                      f"reference log-probs of those pairs {check['sspo_ref_logps_chosen']:.4f} / "
                      f"{check['sspo_ref_logps_rejected']:.4f}."]
    return "\n".join(lines) + "\n"


def table(s, fmt):
    """Markdown rows: sspo.py (prompt shared), TRL, the ratio, and sspo.py with the prompt apart when it ran."""
    apart = "sspo_apart" in s
    cols = [("sspo", "sspo.py"), ("trl", "TRL DPOTrainer"), ("ratio_sspo_over_trl", "sspo.py / TRL")]
    if apart:
        cols += [("sspo_apart", "sspo.py, prompt apart"), ("ratio_sspo_apart_over_trl", "apart / TRL"),
                 ("ratio_sspo_over_sspo_apart", "shared / apart")]
    if "trl_malloc" in s:
        cols += [("trl_malloc", "TRL, sspo.py's malloc settings"), ("ratio_sspo_over_trl_malloc", "sspo.py / that")]
    rows = [("real tokens/s (train time)", "tokens_per_s", "{:.0f}"), ("train time, s", "train_s", "{:.1f}"),
            ("whole-process wall, s", "wall_s", "{:.1f}"), ("peak RSS, MiB", "peak_rss_mib", "{:.0f}"),
            ("share of fp32 matmul rate", "matmul_share", "{:.0%}"), ("system share of CPU time", "system_cpu_share", "{:.0%}")]
    lines = ["| | " + " | ".join(name for _, name in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for label, key, f in rows:
        cells = [fmt(s[c][key], "{:.2f}" if c.startswith("ratio") else f) if key in s[c] else "" for c, _ in cols]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("| first-step loss | " + " | ".join(f"{s[c]['first_step_loss']:.6g}" if "first_step_loss" in s[c] else ""
                                                     for c, _ in cols) + " |")
    return lines + [""]


def write_markdown(path, block):
    text = open(path).read() if os.path.exists(path) else "# Benchmarks\n\n"
    section = f"{MD_BEGIN}\n{block}{MD_END}\n"
    if MD_BEGIN in text and MD_END in text:
        text = re.sub(re.escape(MD_BEGIN) + ".*?" + re.escape(MD_END) + "\n?", lambda _: section, text, flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    with open(path, "w") as f:
        f.write(text)


def main(repeats=3, prompts=64, batch_size=4, max_length=512, beta=1e-3, lr=5e-7, epochs=1, threads=2,
         trl_precompute=False, trl_sampling="sequential", ablation=True, trl_malloc=True, work="/tmp/sspo-bench-vs-trl",
         out="bench/results/vs_trl.json", markdown_file="bench/RESULTS.md",
         child=None, child_out=None, child_cfg=None):
    """Run sspo.py and TRL's DPOTrainer alternately on the same generated work; print and save the comparison.

    Args:
      repeats: runs of each trainer (alternating A B / B A)
      prompts: prompts in the scored file (K = 4 responses each; one pair per prompt)
      batch_size: pairs per optimizer step, both trainers
      max_length: most tokens of prompt + response, both (no pair of this work reaches 512)
      beta: 1/eta of the sppo_hard loss, both
      lr: peak learning rate (RMSprop, 10% linear warm-up, linear decay), both
      epochs: passes over the pairs
      threads: torch threads of every child and of the matmul measurement
      trl_precompute: TRL's precompute_ref_log_probs (False: its default, a second model in memory)
      trl_sampling: TRL's train_sampling_strategy: sequential (lets the step-0 data check run) | random | group_by_length
      ablation: also run sspo.py with --share_prompt False (chosen and rejected in rows of their own): the prompt-sharing lever, measured
      trl_malloc: also run TRL with the malloc settings sspo.py gives its own process on a CPU (tuning.reuse_freed_memory:
        MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647), so the allocator's share of the ratio is measured
      work: scratch folder (rebuilt)
      out: the JSON report ('' for none)
      markdown_file: the RESULTS.md whose 'sspo.py vs TRL DPOTrainer' section is replaced ('' for none)
      child, child_out, child_cfg: internal, for the child processes
    """
    if child:
        import resource

        import torch

        torch.set_num_threads(threads)
        with open(child_cfg) as f:
            cfg = json.load(f)
        if child in ("trl", "trl_malloc"):
            record = child_trl(work, child_out, cfg)
        else:  # sspo: its default layout; sspo_apart: --share_prompt False; sspo_shared: --share_prompt True
            record = child_sspo(work, child_out, cfg, share_prompt={"sspo_apart": False, "sspo_shared": True}.get(child))
        usage = resource.getrusage(resource.RUSAGE_SELF)
        record.update(maxrss_kib=usage.ru_maxrss, user_s=usage.ru_utime, system_s=usage.ru_stime,
                      minor_faults=usage.ru_minflt)
        with open(child_out + ".result.json", "w") as f:
            json.dump(record, f)
        return

    import torch
    import transformers

    try:
        import trl
    except ImportError:
        raise SystemExit("TRL is missing: pip install -r requirements-bench.txt") from None
    torch.set_num_threads(threads)
    command = "python bench/vs_trl.py" + "".join(f" --{k} {v}" for k, v in [("repeats", repeats), ("prompts", prompts)]
                                                 if v != {"repeats": 3, "prompts": 64}[k])
    print(f"building the work in {work} ...", flush=True)
    built = build_work(work, prompts, max_length)
    rate = matmul_rate(threads)
    print(f"{built['pairs']} pairs, {built['real_tokens']} real tokens an epoch; model {built['params'] / 1e6:.1f}M "
          f"params ({built['matmul_params'] / 1e6:.1f}M in matmuls); fp32 matmul {rate:.0f} GFLOP/s on {threads} threads",
          flush=True)
    cfg = dict(model=built["model"], scored=built["scored"], beta=beta, lr=lr, batch_size=batch_size, epochs=epochs,
               max_length=max_length, trl_precompute=trl_precompute, trl_sampling=trl_sampling)
    os.makedirs(os.path.join(work, "runs"), exist_ok=True)
    runs = []
    systems = ["sspo", "trl"] + (["sspo_apart"] if ablation else []) + (["trl_malloc"] if trl_malloc else [])
    for r in range(repeats):
        for which in systems[r % len(systems):] + systems[:r % len(systems)]:  # each goes first in turn
            run_out = os.path.join(work, "runs", f"{which}-{r}")
            rec = run_child(which, work, run_out, cfg, threads)
            rec["repeat"] = r
            rec["tokens_per_s"] = built["real_tokens"] * epochs / rec["train_s"]
            computed = built["prompt_once_tokens"] if which == "sspo" else built["real_tokens"]
            rec["matmul_share"] = 8 * built["matmul_params"] * computed * epochs / rec["train_s"] / (rate * 1e9)
            rec["system_cpu_share"] = rec["system_s"] / max(rec["user_s"] + rec["system_s"], 1e-9)
            runs.append(rec)
            print(f"[{r}] {which:10s}  wall {rec['wall_s']:6.1f} s  train {rec['train_s']:6.1f} s  "
                  f"{rec['tokens_per_s']:6.0f} real tok/s ({rec['matmul_share']:.0%} of matmul rate)  "
                  f"peak RSS {rec['peak_rss_mib']:5.0f} MiB  steps {rec['optimizer_steps']}  "
                  f"first-step loss {rec['first_step_loss']:.6g}  load {rec['load_before'][0]:.1f}", flush=True)
            if r > 0 or which != "sspo":  # keep sspo-0 for the step-0 check, drop the other models
                shutil.rmtree(run_out, ignore_errors=True)

    rate_after = matmul_rate(threads)
    print(f"fp32 matmul {rate_after:.0f} GFLOP/s after the runs (before: {rate:.0f}); the share uses the higher", flush=True)
    for rec in runs:
        rec["matmul_share"] *= rate / max(rate, rate_after)
    rate = max(rate, rate_after)
    keys = ["tokens_per_s", "train_s", "wall_s", "peak_rss_mib", "matmul_share", "system_cpu_share"]
    summary = {}
    for which in systems:
        mine = [x for x in runs if x["system"] == which]
        summary[which] = {k: spread([x[k] for x in mine]) for k in keys}
        summary[which]["first_step_loss"] = mine[0]["first_step_loss"]
    ratio = lambda a, b: {k: spread([x[k] / y[k] for x, y in zip([x for x in runs if x["system"] == a],  # noqa: E731
                                                                  [y for y in runs if y["system"] == b])]) for k in keys[:4]}
    summary["ratio_sspo_over_trl"] = ratio("sspo", "trl")
    if ablation:
        summary["ratio_sspo_apart_over_trl"] = ratio("sspo_apart", "trl")
        summary["ratio_sspo_over_sspo_apart"] = ratio("sspo", "sspo_apart")
    if trl_malloc:
        summary["ratio_sspo_over_trl_malloc"] = ratio("sspo", "trl_malloc")
    trl_first = next(x for x in runs if x["system"] == "trl")["first_step"]
    check = first_batch_check(work, cfg, built, trl_first)
    loads = [x["load_before"][0] for x in runs] + [x["load_after"][0] for x in runs]
    report = dict(command=command, when=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                  machine=dict(cpus=os.cpu_count()), config=dict(cfg, repeats=repeats, threads=threads),
                  versions=dict(torch=torch.__version__, transformers=transformers.__version__, trl=trl.__version__),
                  work={k: v for k, v in built.items() if k != "lengths"}, matmul_gflops=rate,
                  load_average=dict(min=min(loads), max=max(loads)), runs=runs, summary=summary,
                  first_batch_check=check)
    block = markdown(report)
    print("\n" + block)
    if out:
        import common

        common.atomic_write_json(os.path.join(ROOT, out) if not os.path.isabs(out) else out, report)
        print(f"wrote {out}")
    if markdown_file:
        write_markdown(os.path.join(ROOT, markdown_file) if not os.path.isabs(markdown_file) else markdown_file, block)
        print(f"updated the 'sspo.py vs TRL DPOTrainer' section of {markdown_file}")


if __name__ == "__main__":
    import fire

    fire.Fire(main)
