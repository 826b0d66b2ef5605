"""One writer per output (issue 25): sspo.py's --output_dir, generate.py's and oracle.py's --out and iterate.sh's
OUT each take an OS lock; a second writer stops at once with one line naming the holder's pid, exit 2, and
changes nothing; a holder killed with -9 frees it; readers are not blocked.

A real first writer is frozen (SIGSTOP) once it has written, so the second always meets it mid-run, however
fast the machine; it keeps its lock while frozen, and a SIGKILL then ends it as a crash would."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

import common
from tiny import write_scored

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, **kw):
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, cwd=ROOT, **kw)


def _snapshot(path):
    """Every file under `path` (or the file itself) with its bytes and time: what 'changes nothing' compares."""
    if os.path.isfile(path):
        return {path: (open(path, "rb").read(), os.stat(path).st_mtime_ns)}
    return {os.path.join(d, f): (open(os.path.join(d, f), "rb").read(), os.stat(os.path.join(d, f)).st_mtime_ns)
            for d, _, files in os.walk(path) for f in files}


def _wait_for(predicate, what, timeout=120):
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _holder(path, folder=False):
    """A process that holds the writer lock of `path` the way the scripts take it, until killed."""
    code = (f"import common, sys, time; common.lock_output({str(path)!r}, folder={folder}); print('held', flush=True); "
            "time.sleep(600)")
    p = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def _refused(result, path, pid):
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {path}: another process (pid {pid}) is writing it")


def test_lock_output_names_the_holder_and_is_freed_by_kill_9(tmp_path):
    out = tmp_path / "out.jsonl"
    holder = _holder(out)
    with pytest.raises(common.UserError, match=f"pid {holder.pid}"):
        common.lock_output(str(out))
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    again = _run("-c", f"import common; common.lock_output({str(out)!r}); print(open({str(out) + '.lock'!r}).read())")
    assert again.returncode == 0 and again.stdout.strip().isdigit()
    assert not out.exists()  # the lock is beside the output; the output itself is the writer's to make


def test_generate_second_writer_stops_and_a_killed_first_resumes(tiny_model_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"tell me about {i} things"}) + "\n" for i in range(60)))
    out = tmp_path / "responses.jsonl"
    flags = ["generate.py", "--model", tiny_model_dir, "--prompts", prompts, "--out", out, "--k", "2",
             "--max_new_tokens", "48", "--batch_size", "2"]
    first = subprocess.Popen([sys.executable, *map(str, flags)], cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env=dict(os.environ, OMP_NUM_THREADS="1"))
    _wait_for(lambda: (out.exists() and out.stat().st_size > 0) or first.poll() is not None, "the first generate.py to write")
    first.send_signal(signal.SIGSTOP)
    assert first.poll() is None, "the first generate.py ended before it could be frozen"
    before = _snapshot(out)
    _refused(_run(*flags), out, first.pid)
    assert _snapshot(out) == before  # the second changed nothing
    first.send_signal(signal.SIGKILL)
    first.wait()
    resumed = _run(*flags)
    assert resumed.returncode == 0, resumed.stderr
    assert sorted(json.loads(line)["id"] for line in open(out)) == sorted(f"p{i}" for i in range(60))


def test_oracle_second_writer_stops_and_changes_nothing(models, tmp_path):
    rows = [{"id": f"p{i}", "prompt": "say hi", "responses": ["hi", "hello there"], "constraints": [{"type": "no_commas"}]}
            for i in range(3)]
    data = tmp_path / "responses.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "scored.jsonl"
    flags = ["oracle.py", "--data", data, "--out", out, "--oracle", "rule", "--embedder", models["embedder"]]
    holder = _holder(out)
    _refused(_run(*flags), out, holder.pid)
    assert not out.exists()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert _run(*flags).returncode == 0 and len(open(out).readlines()) == 3


def test_sspo_second_run_on_one_folder_stops_and_a_killed_first_resumes(tiny_model_dir, tmp_path):
    data = write_scored(tmp_path / "scored.jsonl", n=12)
    out = tmp_path / "run"
    flags = ["sspo.py", "--data", data, "--model", tiny_model_dir, "--output_dir", out, "--lr", "1e-3", "--beta", "0.1",
             "--batch_size", "2", "--epochs", "40", "--save_every", "20", "--resume"]
    first = subprocess.Popen([sys.executable, *map(str, flags)], cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env=dict(os.environ, OMP_NUM_THREADS="1"))
    _wait_for(lambda: (out / "checkpoint" / "step.json").exists() or first.poll() is not None, "the first's checkpoint")
    first.send_signal(signal.SIGSTOP)
    assert first.poll() is None, "the first run ended before it could be frozen"
    before = _snapshot(out)
    _refused(_run(*flags), out, first.pid)
    assert _snapshot(out) == before
    first.send_signal(signal.SIGKILL)
    first.wait()
    resumed = _run(*flags)
    assert resumed.returncode == 0, resumed.stderr
    assert (out / "summary.json").exists()
    holder = _holder(out, folder=True)  # --resume of a finished run only reads: it takes no lock
    reader = _run(*flags)
    holder.kill()
    assert reader.returncode == 0 and "already complete" in reader.stdout


def test_iterate_second_run_on_one_out_stops(tiny_model_dir, models, tmp_path):
    prompts = tmp_path / "train.jsonl"
    constraints = [{"type": "min_words", "n": 20}, {"type": "no_commas"}]  # graded credit that tells answers apart
    prompts.write_text("".join(json.dumps({"id": f"t{i}", "prompt": f"write {i} words", "constraints": constraints})
                               + "\n" for i in range(6)))
    out = tmp_path / "run"
    env = dict(os.environ, MODEL=tiny_model_dir, K="3", MAX_NEW_TOKENS="12", ITERS="1", ORACLE="rule",
               EMBEDDER=models["embedder"], OUT=str(out), PROMPTS=str(prompts), HELDOUT="none", PYTHON=sys.executable,
               SSPO_ARGS="--batch_size 2 --max_length 64", OMP_NUM_THREADS="1")
    command = ["bash", os.path.join(ROOT, "scripts", "iterate.sh")]
    first = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    _wait_for(lambda: ((out / ".lock").exists() and (out / ".lock").read_text().strip() == str(first.pid))
              or first.poll() is not None, "iterate.sh's lock")
    os.killpg(first.pid, signal.SIGSTOP)  # the script and its stage
    assert first.poll() is None, "the first iterate.sh ended before it could be frozen"
    before = _snapshot(out)
    _refused(subprocess.run(command, env=env, capture_output=True, text=True), out, first.pid)
    assert _snapshot(out) == before
    os.killpg(first.pid, signal.SIGKILL)  # the script and its stage: both locks go with them
    first.wait()
    third = subprocess.run(command, env=env, capture_output=True, text=True)
    assert third.returncode == 0, third.stdout[-2000:] + third.stderr[-2000:]
    assert (out / "iter1" / "model" / "summary.json").exists()
