"""What making a checkpoint and the final model durable (common.fsync_tree before the rename) costs.

    python bench/fsync_cost.py          # the packaged SmolLM2-135M; ~1 min; bench/results/fsync_cost.json

Each round writes what sspo.py's save writes for the model, side by side in one run: a checkpoint-sized folder
(the fp32 weights as model.safetensors and an RMSprop state of the same size as optimizer.bin, through
safetensors and torch.save as accelerate does) and the final model folder (save_pretrained). It times the
write, then fsync_tree, each round on a fresh folder, and reports the medians and fsync's share of the save.
The fsync time depends on the disk (and on how much of the write the kernel has already flushed by itself):
measure it where you train.
"""
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402


def timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main(model=common.PACKAGED_MODEL, rounds=5, folder=None, out="bench/results/fsync_cost.json"):
    from safetensors.torch import save_file

    lm, tokenizer = common.load_causal_lm(model, dtype=torch.float32)
    state = {k: v.contiguous().clone() for k, v in lm.state_dict().items()}
    optimizer = {"state": {i: {"square_avg": torch.rand_like(v)} for i, v in enumerate(state.values())}}
    root = tempfile.mkdtemp(dir=folder or os.path.dirname(os.path.abspath(out)), prefix="fsync-")
    rows = {"checkpoint": [], "final": []}
    try:
        for r in range(rounds):
            for kind in rows:
                d = os.path.join(root, f"{kind}{r}")
                os.makedirs(d)
                if kind == "checkpoint":
                    write = timed(lambda: (save_file(state, os.path.join(d, "model.safetensors")),
                                           torch.save(optimizer, os.path.join(d, "optimizer.bin"))))
                else:
                    write = timed(lambda: (lm.save_pretrained(d, safe_serialization=True), tokenizer.save_pretrained(d)))
                size = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))
                rows[kind].append({"write_s": write, "fsync_s": timed(lambda: common.fsync_tree(d)), "bytes": size})
                shutil.rmtree(d)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    summary = {}
    for kind, runs in rows.items():
        write, sync = statistics.median(r["write_s"] for r in runs), statistics.median(r["fsync_s"] for r in runs)
        summary[kind] = {"mib": runs[0]["bytes"] / 2 ** 20, "write_s": write, "fsync_s": sync, "fsync_share": sync / (write + sync)}
        print(f"{kind}: {summary[kind]['mib']:.0f} MiB, write {write:.2f} s, fsync {sync:.2f} s "
              f"({100 * summary[kind]['fsync_share']:.0f}% of the save), medians of {rounds}")
    common.atomic_write_json(out, {"model": model, "rounds": rounds, "summary": summary, "runs": rows})


if __name__ == "__main__":
    common.cli(main)
