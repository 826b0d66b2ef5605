"""Where the time goes in one sspo.py run and one TRL DPOTrainer run of bench/vs_trl.py's work.

    pip install -r requirements-bench.txt        # py-spy, TRL
    python bench/profile_trainers.py             # builds the work if --work lacks it; ~10 min on 2 loaded cores

Each trainer runs as the benchmark's own child process (bench/vs_trl.py --child ...: the same code,
the same settings) under `py-spy record` (Python stacks sampled --rate times a second). Every sample
is put in one phase by the frames on its stack, checked in this order:
  optimizer (torch/optim), grad clip, backward (the autograd engine; 'LM head' when a Python LM-head
  frame is under it: sspo.py's checkpointed recompute, TRL's chunked kernel's backward), reference
  forward (sspo.py's reference pass; TRL's ref-model forward), training forward (LM head / backbone /
  the rest), data (collate), save, scorer check, setup (imports, loading, tokenising), other.
The child's own rusage (user / system CPU seconds, minor page faults, peak RSS; getrusage at its end):
system time and page faults are the kernel handing out memory, which no Python profile shows.
Output: a table per trainer, and bench/results/profile.json.
"""
import collections
import json
import os
import re
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
sys.path.insert(0, ROOT)
import vs_trl  # noqa: E402

PHASES = ["optimizer", "grad clip", "backward: LM head", "backward: backbone + rest", "reference forward",
          "forward: LM head", "forward: backbone", "forward: rest (loss, pooling)", "data (collate)", "save",
          "scorer check", "setup (imports, load, tokenise)", "other"]


def line_of(path, needle):
    """1-based line number of the first line of `path` containing `needle` (None if absent)."""
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if needle in line:
                return n
    return None


def classify(frames, ref_lines):
    """The phase of one sample; frames are 'function (file:line)' strings, outermost first. sspo.py's
    reference pass is the function sspo.reference_logps; TRL's is found by its source lines (ref_lines)."""
    text = ";".join(frames)
    has = lambda *parts: any(p in text for p in parts)  # noqa: E731
    lm_head = has("_chunk_logps", "chunked_logprob.py")
    if has("torch/optim/"):
        return "optimizer"
    if has("clip_grad_norm_"):
        return "grad clip"
    if has("torch/autograd/__init__.py", "_engine_run_backward", "backward (accelerate"):  # not Function.apply: a forward
        return "backward: LM head" if lm_head else "backward: backbone + rest"
    if has("reference_logps (sspo.py") or any(f"({path}:{line})" in text for path, line in ref_lines):
        return "reference forward"
    if has("check_scorer"):
        return "scorer check"
    if has("save_pretrained", "save_model", "safetensors", "save_state"):
        return "save"
    if has("forward (", "_fused_forward", "_compute_loss"):
        if lm_head:
            return "forward: LM head"
        if has("modeling_llama.py"):
            return "forward: backbone"
        return "forward: rest (loss, pooling)"
    if has("collate", "torch_call", "dataloader"):
        return "data (collate)"
    if has("_find_and_load", "from_pretrained", "tokenize_pairs", "load_pairs", "_prepare_dataset", "Dataset.",
           "DPOTrainer.__init__", "__init__ (trl", "build_work", "load_causal_lm", "Accelerator"):
        return "setup (imports, load, tokenise)"
    return "other"


def parse_raw(path, ref_lines):
    """py-spy's raw (collapsed) output -> Counter of phase -> samples."""
    counts = collections.Counter()
    with open(path) as f:
        for line in f:
            stack, _, n = line.rstrip("\n").rpartition(" ")
            if not stack:
                continue
            frames = [re.sub(r"^.*?/site-packages/", "", fr) for fr in stack.split(";")]
            frames = [fr.replace(ROOT + "/", "") for fr in frames]
            counts[classify(frames, ref_lines)] += int(n)
    return counts


def main(work="/tmp/sspo-bench-profile", prompts=64, rate=50, threads=2, out="bench/results/profile.json",
         batch_size=4, max_length=512, beta=1e-3, lr=5e-7, nonblocking=True, trainers="sspo,trl"):
    """Profile one run of each trainer on the vs_trl work with py-spy; print and save the phase shares.

    Args:
      work: scratch folder (rebuilt)
      prompts: prompts of the work (64 as the benchmark)
      rate: py-spy samples per second
      threads: torch threads of each child
      out: the JSON report ('' for none)
      batch_size, max_length, beta, lr: as bench/vs_trl.py
      nonblocking: sample without pausing the process (py-spy's default pauses it at each sample, which
        slowed sspo.py's run ~6x here and skews the shares toward its many small operations)
      trainers: which to profile, comma-separated: sspo, trl
    """
    spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    if not os.path.exists(spy):
        raise SystemExit("py-spy is missing: pip install -r requirements-bench.txt")
    built = vs_trl.build_work(work, prompts, max_length)
    cfg = dict(model=built["model"], scored=built["scored"], beta=beta, lr=lr, batch_size=batch_size, epochs=1,
               max_length=max_length, trl_precompute=False, trl_sampling="sequential")
    import trl

    trl_file = os.path.join(os.path.dirname(trl.__file__), "trainer", "dpo_trainer.py")
    ref_lines = [("trl/trainer/dpo_trainer.py", line_of(trl_file, "ref_outputs = self.ref_model(")),
                 ("trl/trainer/dpo_trainer.py", line_of(trl_file, "ref_per_token_logps = model(**model_kwargs"))]
    os.makedirs(os.path.join(work, "runs"), exist_ok=True)
    report = dict(work={k: v for k, v in built.items() if k != "lengths"}, rate=rate, trainers={}, ref_lines=ref_lines,
                  padding=padding(built["lengths"], built, batch_size))
    for which in [t.strip() for t in str(trainers).split(",") if t.strip()]:
        run_out = os.path.join(work, "runs", which)
        raw = run_out + ".pyspy.txt"
        with open(run_out + ".cfg.json", "w") as f:
            json.dump(cfg, f)
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
                   HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", TQDM_DISABLE="1")
        cmd = [spy, "record", "-r", str(rate), "-f", "raw", "-o", raw, *(["--nonblocking"] if nonblocking else []),
               "--", sys.executable,
               os.path.join(ROOT, "bench", "vs_trl.py"), "--child", which, "--work", work, "--child_out", run_out,
               "--child_cfg", run_out + ".cfg.json", "--threads", str(threads)]
        load = os.getloadavg()
        t0 = time.time()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        proc.wait()
        wall = time.time() - t0
        with open(run_out + ".result.json") as f:
            child = json.load(f)
        counts = parse_raw(raw, ref_lines)
        total = sum(counts.values())
        report["trainers"][which] = dict(
            wall_s=wall, train_s=child["last_step"] - child["first_forward"], samples=total, load_before=load,
            user_s=child["user_s"], system_s=child["system_s"], minor_faults=child["minor_faults"],
            child_peak_rss_mib=child["maxrss_kib"] / 1024,
            phases={p: counts.get(p, 0) / max(total, 1) for p in PHASES})
        r = report["trainers"][which]
        print(f"\n{which}: wall {wall:.0f} s (train {r['train_s']:.0f} s), CPU user {r['user_s']:.0f} s + system "
              f"{r['system_s']:.0f} s ({r['system_s'] / max(r['user_s'] + r['system_s'], 1e-9):.0%} system), "
              f"{r['minor_faults'] / 1e6:.2f}M minor page faults, peak RSS {r['child_peak_rss_mib']:.0f} MiB, "
              f"{total} samples (load {load[0]:.1f})")
        for p in PHASES:
            if counts.get(p):
                print(f"  {p:32s} {counts[p] / total:6.1%}")
    print("\npadding (tokens in the batches / real tokens):", json.dumps(report["padding"]))
    if out:
        import common

        common.atomic_write_json(os.path.join(ROOT, out), report)
        print(f"wrote {out}")


def padding(lengths, built, batch_size):
    """Padded / real tokens of sspo.py's length-grouped steps and of TRL's sequential batches of the same pairs."""
    import json as _json

    import sspo

    with open(os.path.join(os.path.dirname(built["scored"]), "pairs.json")) as f:
        pairs = _json.load(f)
    real = [(len(p["prompt_ids"]) + len(p["chosen_ids"]), len(p["prompt_ids"]) + len(p["rejected_ids"])) for p in pairs]

    def cost(batches):
        return sum(2 * len(b) * max(max(real[i]) for i in b) for b in batches)

    total = sum(a + b for a, b in real)
    ours = sspo.step_batches(lengths, batch_size, 0, 1, True)
    trl_batches = [list(range(i, min(i + batch_size, len(pairs)))) for i in range(0, len(pairs), batch_size)]
    prompt = sum(2 * len(p["prompt_ids"]) for p in pairs)
    return dict(real_tokens=total, prompt_share=prompt / total, sspo_padded_over_real=cost(ours) / total,
                trl_padded_over_real=cost(trl_batches) / total)


if __name__ == "__main__":
    import fire

    fire.Fire(main)
