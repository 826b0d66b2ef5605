"""scripts/iterate.sh on tiny random models: 2 iterations end to end, then a resume after a deleted output."""
import json
import os
import subprocess

import pytest


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write(path, prompts):
    with open(path, "w") as f:
        for i, prompt in enumerate(prompts):
            f.write(json.dumps({"id": f"p{i}", "prompt": prompt}) + "\n")
    return str(path)


@pytest.mark.slow
def test_two_iterations_then_resume_after_a_deleted_output(tiny_model_dir, models, tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, MODEL=tiny_model_dir, K="2", MAX_NEW_TOKENS="6", ITERS="2", ORACLE="reward",
               ORACLE_MODEL=models["reward"], EMBEDDER=models["embedder"], OUT=str(out),
               PROMPTS=_write(tmp_path / "train.jsonl", ["what is the capital of france ?", "name three colors",
                                                         "hello world"]),
               HELDOUT=_write(tmp_path / "heldout.jsonl", ["what is water ?", "say hello"]),
               SSPO_ARGS="--batch_size 2 --max_length 64", GENERATE_ARGS="--batch_size 8", HELDOUT_K="2")

    def iterate():
        result = subprocess.run(["bash", os.path.join(ROOT, "scripts", "iterate.sh"), "--lr", "1e-3"], env=env,
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        return [line for line in result.stdout.splitlines() if line.startswith("== ")]

    first = iterate()
    assert not any("skip" in line for line in first)
    for t in (1, 2):
        assert (out / f"iter{t}" / "model" / "summary.json").exists()
        report = json.loads((out / f"iter{t}" / "report.json").read_text())
        assert report["n"] == 2 and 0 <= report["win_rate"] <= 100
    assert "--model " + str(out / "iter1" / "model") in next(line for line in first if "sspo.py" in line and "iter2" in line)
    assert "--lr 1e-3" in next(line for line in first if "sspo.py" in line)  # extra arguments reach sspo.py
    assert (out / "plot.png").exists() and (out / "training.png").exists()
    held = [json.loads(line) for line in open(out / "iter2" / "heldout.jsonl")]
    assert [len(row["responses"]) for row in held] == [2, 2]  # HELDOUT_K reaches the held-out sampling
    table = (out / "summary.md").read_text().splitlines()  # no constraints here: win rates only
    assert table[0].startswith("| model |") and [line.split(" | ")[0] for line in table[2:4]] == ["| iter1", "| iter2"]

    trained = (out / "iter1" / "model" / "summary.json").stat().st_mtime_ns
    os.remove(out / "iter2" / "scored.jsonl")
    second = iterate()
    skipped = [line for line in second if "skip" in line]
    assert len(skipped) == 7  # base held-out, iteration 1's five stages, iteration 2's responses
    assert any("oracle.py" in line and "iter2" in line for line in second)
    assert any("sspo.py" in line and "iter2" in line for line in second)  # made from the new scores
    assert (out / "iter1" / "model" / "summary.json").stat().st_mtime_ns == trained
    assert (out / "iter2" / "report.json.done").exists()
