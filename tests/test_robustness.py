"""What a kill at any moment, a damaged file or an outsized input leaves: one line, exit code 2, nothing lost.

- Checkpoint rotation: every state a kill between two of sspo.py's file operations can leave is built on
  disk; --resume must finish with the weights of the uninterrupted run, and saving must go on working.
- JSONL appends, ref_logps.pt, metrics.jsonl and iterate.sh's .done markers: the same audit.
- Every reader of a user's file: bytes that are not UTF-8 give `file:line: not valid UTF-8 (...)`.
- A damaged --model, a folder where a file goes and back, a full disk, K = 1000, a 100k-character prompt.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import common
import evaluate
import generate
import oracle
import sspo
import tuning
from tiny import load_weights, write_scored

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = dict(lr=1e-3, beta=0.1, batch_size=2, epochs=2, save_every=3)  # 12 steps; saves at steps 3, 6 and 9


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, tmp_path_factory):
    """A run that nothing stopped (root/full), and a copy of its checkpoint after each save (root/saved/<step>)."""
    root = tmp_path_factory.mktemp("rotation")
    write_scored(root / "scored.jsonl", n=12)
    (root / "model").symlink_to(tiny_model_dir)
    save = sspo.save_checkpoint

    def save_and_copy(accelerator, output_dir, step):
        save(accelerator, output_dir, step)
        shutil.copytree(os.path.join(output_dir, "checkpoint"), root / "saved" / str(step))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sspo, "save_checkpoint", save_and_copy)
        train(root, root / "full")
    return root


class one_thread:
    """One CPU thread, as the subprocesses run (OMP_NUM_THREADS=1): the same sums in the same order."""

    def __enter__(self):
        self.threads = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.threads)


def train(root, out, **flags):
    """sspo.py on root/scored.jsonl with FLAGS, in this process."""
    with one_thread():
        sspo.main(data=str(root / "scored.jsonl"), model=str(root / "model"), output_dir=str(out), **FLAGS, **flags)


def same_weights(a, b):
    wa, wb = load_weights(a), load_weights(b)
    return all(torch.allclose(wa[k], wb[k], atol=1e-6, rtol=0) for k in wa)


# ------------------------------------------------------------------------ checkpoint rotation

CHECKPOINT_FILES = {"model.safetensors", "optimizer.bin", "random_states_0.pkl", "step.json"}


def _folder(saved, dst, step, state):
    """A checkpoint folder of `step` as a kill in the middle of writing or removing it leaves it."""
    shutil.copytree(saved / str(step), dst)
    assert set(os.listdir(dst)) == CHECKPOINT_FILES  # what accelerate writes, if that ever changes
    if state == "writing":  # accelerate still writing: no step.json yet, a file missing
        os.remove(dst / "step.json")
        os.remove(dst / "optimizer.bin")
    elif state == "step.json cut":  # killed while writing step.json
        (dst / "step.json").write_text('{"st')
    elif state == "removing":  # rmtree half done: step.json may outlive the weights
        os.remove(dst / "model.safetensors")


# (what the kill interrupted, {folder: (step, state)}, the step --resume must start at). The save at
# step s: remove .tmp; accelerate writes .tmp; step.json; remove .old; checkpoint -> .old; .tmp -> checkpoint;
# remove .old. Each row is the folder as a kill between two of those operations (or inside one) leaves it.
STATES = [
    ("first save, writing .tmp", {".tmp": (3, "writing")}, 0),
    ("first save, writing step.json", {".tmp": (3, "step.json cut")}, 0),
    ("first save, before the rename", {".tmp": (3, "whole")}, 0),
    ("between two saves", {"": (3, "whole")}, 3),
    ("removing an old .tmp", {"": (3, "whole"), ".tmp": (6, "removing")}, 3),
    ("writing .tmp", {"": (3, "whole"), ".tmp": (6, "writing")}, 3),
    ("writing step.json", {"": (3, "whole"), ".tmp": (6, "step.json cut")}, 3),
    ("removing a leftover .old", {"": (6, "whole"), ".old": (3, "removing"), ".tmp": (9, "whole")}, 6),
    ("after checkpoint -> .old", {".old": (3, "whole"), ".tmp": (6, "whole")}, 3),
    ("after .tmp -> checkpoint (issue 10)", {"": (6, "whole"), ".old": (3, "whole")}, 6),
    ("removing .old, step.json still there", {"": (6, "whole"), ".old": (3, "removing")}, 6),
    ("removing .old, step.json gone", {"": (6, "whole"), ".old": (3, "writing")}, 6),
    ("removing a checkpoint without step.json", {"": (6, "writing"), ".old": (3, "whole")}, 3),
    ("writing the final model", {"": (9, "whole"), "model.safetensors": (None, "cut")}, 9),
]


def _build(root, out, layout, start):
    """The output folder of the uninterrupted run as the kill left it."""
    os.makedirs(out)
    config = common.read_json(root / "full" / "run_config.json")
    common.atomic_write_json(out / "run_config.json", dict(config, output_dir=str(out)))
    metrics = (root / "full" / "metrics.jsonl").read_text()
    (out / "metrics.jsonl").write_text(metrics + '{"step": 13, "lo')  # steps past the checkpoint, a half line
    if start:
        shutil.copy(root / "full" / "ref_logps.pt", out)
    else:  # no checkpoint to trust: pi_t's log-probs are computed again over a half-written .tmp
        (out / "ref_logps.pt.tmp").write_bytes(b"PK\x03\x04")
    for suffix, (step, state) in layout.items():
        if suffix == "model.safetensors":
            (out / suffix).write_bytes((root / "full" / suffix).read_bytes()[:100])
        else:
            _folder(root / "saved", out / ("checkpoint" + suffix), step, state)


@pytest.mark.parametrize("what, layout, start", STATES, ids=[s[0] for s in STATES])
def test_resume_from_every_state_a_kill_leaves(uninterrupted, tmp_path, capsys, what, layout, start):
    out = tmp_path / "run"
    _build(uninterrupted, out, layout, start)
    with pytest.raises(common.UserError, match="add --resume"):  # never silently starts over
        train(uninterrupted, out)
    saves, save = [], sspo.save_checkpoint

    def save_and_check(accelerator, output_dir, step):
        save(accelerator, output_dir, step)
        saves.append(step)
        assert sspo.checkpoint_step(os.path.join(output_dir, "checkpoint")) == step
        assert not any(os.path.exists(os.path.join(output_dir, "checkpoint" + s)) for s in (".old", ".tmp"))

    capsys.readouterr()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sspo, "save_checkpoint", save_and_check)
        train(uninterrupted, out, resume=True)
    assert f"starting at step {start}" in capsys.readouterr().out
    assert saves == [s for s in (3, 6, 9) if s > start]  # saving goes on working from every state
    assert same_weights(out, uninterrupted / "full")
    assert [row["step"] for _, row in common.read_jsonl(out / "metrics.jsonl")] == list(range(1, 13))
    assert not any(name.startswith("checkpoint") for name in os.listdir(out))
    assert not (out / "ref_logps.pt.tmp").exists() or start  # a fresh start writes ref_logps.pt over its .tmp


def test_a_kill_after_summary_json_leaves_a_finished_model(uninterrupted, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(uninterrupted / "full", out)
    common.atomic_write_json(out / "run_config.json", dict(common.read_json(out / "run_config.json"), output_dir=str(out)))
    _folder(uninterrupted / "saved", out / "checkpoint", 9, "removing")  # removed after summary.json, not before
    train(uninterrupted, out, resume=True)
    assert "already complete" in capsys.readouterr().out
    assert not (out / "checkpoint").exists()
    assert same_weights(out, uninterrupted / "full")


# A disk that fills: from the save at step STEP (before it, or after it with AFTER), the soft file-size limit
# makes every write past LIMIT bytes fail (EFBIG) as a full disk does (ENOSPC), in torch's and
# safetensors' own writers. 4 kB: the checkpoint at step 6 fails; 16 kB: the last steps' metrics fit,
# the final model does not.
FULL_DISK = """
import resource, signal, sys, sspo, common
STEP, AFTER, LIMIT = {step}, {after}, {limit}
save = sspo.save_checkpoint
def save_on_a_full_disk(accelerator, output_dir, step):
    if step == STEP and AFTER:
        save(accelerator, output_dir, step)
    if step == STEP:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    if step != STEP or not AFTER:
        save(accelerator, output_dir, step)
sspo.save_checkpoint = save_on_a_full_disk
sys.argv = ["sspo.py"] + sys.argv[1:]
common.cli(sspo.main)
"""


@pytest.mark.parametrize("step, after, limit, failed, resumed_from", [(6, False, 4096, "/checkpoint.tmp", 3),
                                                                      (9, True, 16384, "", 9)],
                         ids=["at a checkpoint", "at the final model"])
def test_a_full_disk_is_one_line_and_the_last_checkpoint_resumes(uninterrupted, tmp_path, capsys, step, after, limit,
                                                                failed, resumed_from):
    out, script = tmp_path / "run", tmp_path / "full_disk.py"
    script.write_text(FULL_DISK.format(step=step, after=after, limit=limit))
    flags = [f"--{k}={v}" for k, v in FLAGS.items()]
    r = subprocess.run([sys.executable, str(script), "--data", str(uninterrupted / "scored.jsonl"), "--model",
                        str(uninterrupted / "model"), "--output_dir", str(out), *flags], capture_output=True,
                       text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1"), timeout=600)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert errors == r.stderr.strip().splitlines()[-1:]  # one line, the last: the progress bars closed above it
    assert errors[0].startswith(f"error: {out}{failed}: cannot write ("), r.stderr
    assert sspo.checkpoint_step(out / "checkpoint") == resumed_from and not (out / "checkpoint.tmp").exists()
    assert not (out / "summary.json").exists()
    train(uninterrupted, out, resume=True)
    assert f"starting at step {resumed_from}" in capsys.readouterr().out
    assert same_weights(out, uninterrupted / "full")


# ---------------------------------------------------------- JSONL appends, metrics, small files

def test_appender_cuts_a_half_written_line_even_inside_a_character(tmp_path):
    path = tmp_path / "out.jsonl"
    whole = json.dumps({"id": 1, "text": "é"}, ensure_ascii=False) + "\n"
    path.write_bytes(whole.encode() + json.dumps({"id": 2, "text": "é"}, ensure_ascii=False).encode()[:-3])
    with common.JsonlAppender(str(path)) as w:
        assert w.done == {1}
        w.write({"id": 2, "text": "\ud800 a lone surrogate"})  # escaped, not a UnicodeEncodeError
    assert [row["id"] for _, row in common.read_jsonl(path)] == [1, 2]


FULL_DISK_WRITES = """
import resource, signal, sys, common
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (20000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
def main(out, report):
    if report:
        common.atomic_write_json(report, {"text": "x" * 30000})
    with common.JsonlAppender(out) as w:
        for i in range(100):
            w.write({"id": i, "text": "x" * 1000})
common.cli(main)
"""


def test_a_full_disk_while_appending_or_replacing_is_one_line_and_keeps_what_was_written(tmp_path):
    script, out, report = tmp_path / "writes.py", tmp_path / "out.jsonl", tmp_path / "report.json"
    script.write_text(FULL_DISK_WRITES)
    report.write_text('{"old": 1}\n')

    def run(*args):
        return subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, text=True,
                              env=dict(os.environ, PYTHONPATH=ROOT))

    r = run("--out", out, "--report", report)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [f"error: {report}: File too large"]
    assert common.read_json(report) == {"old": 1} and sorted(os.listdir(tmp_path)) == ["report.json", "writes.py"]
    r = run("--out", out, "--report", "")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"error: {out}: File too large; what is written so far is kept, re-run to go on"]
    kept = common.JsonlAppender(str(out)).done  # the half line is cut off, the rest is there
    assert kept == set(range(len(kept))) and 10 < len(kept) < 20 and out.read_bytes().endswith(b"\n")


def test_outputs_where_a_folder_or_a_file_is(uninterrupted, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(common.UserError) as e:
        train(uninterrupted, tmp_path / "file")
    assert str(e.value) == f"{tmp_path}/file: --output_dir is a file, not a folder"
    with pytest.raises(common.UserError) as e:
        common.JsonlAppender(str(tmp_path))
    assert str(e.value) == f"{tmp_path}: is a folder; the output must be a file"
    with pytest.raises(common.UserError) as e:
        common.JsonlAppender(str(tmp_path / "file" / "out.jsonl"))
    assert str(e.value).startswith(f"{tmp_path}/file: ")  # its folder would have to be a file
    with pytest.raises(common.UserError) as e:
        common.atomic_write_json(str(tmp_path), {})
    assert str(e.value) == f"{tmp_path}: Is a directory" and os.listdir(tmp_path) == ["file"]


# ------------------------------------------------------------------------ undecodable bytes

GOOD = ('{"id": "a", "step": 1, "prompt": "x", "responses": ["a", "b"], "pref": [[0.5, 1], [0, 0.5]], '
        '"sim": [[1, 0], [0, 1]]}\n')  # a line every reader takes


def _latin1(path):
    """GOOD, then a line with a Latin-1 byte (0xe9, 'é') at column 16."""
    path.write_bytes(GOOD.encode() + b'{"prompt": "caf\xe9"}\n')
    return path


def _every_reader(tiny_model_dir, tmp_path, bad):
    """{name: call} of every script's reader of a user's JSONL file, each reading `bad` and writing tmp_path/out."""
    (tmp_path / "good.jsonl").write_text(GOOD)
    good = str(tmp_path / "good.jsonl")
    out = tmp_path / "out"
    return {
        "sspo.py --data": lambda: sspo.main(data=str(bad), model="unused", output_dir=str(out)),
        "oracle.py --data": lambda: oracle.main(data=str(bad), out=str(out), oracle="rule"),
        "generate.py --prompts": lambda: generate.main(model=tiny_model_dir, prompts=str(bad), out=str(out)),
        "evaluate.py --outputs": lambda: evaluate.main(outputs=str(bad), references=good,
                                                       oracle="rule", out=str(out)),
        "evaluate.py --references": lambda: evaluate.main(outputs=good, references=str(bad),
                                                          oracle="rule", out=str(out)),
        "evaluate.py --curves": lambda: evaluate.main(curves=str(bad), plot_out=str(out)),
    }


def test_every_reader_names_the_file_and_line_of_bytes_that_are_not_utf8(tiny_model_dir, tmp_path):
    message = "{}:2: not valid UTF-8 (byte 0xe9 at column 16)"
    bad, out = _latin1(tmp_path / "bad.jsonl"), tmp_path / "out"
    for name, call in _every_reader(tiny_model_dir, tmp_path, bad).items():
        with pytest.raises(common.UserError) as e:
            call()
        assert str(e.value) == message.format(bad), name
        assert not out.exists(), name  # nothing written
    report = tmp_path / "report.json"
    report.write_bytes(b'{\n  "win_rate": 50,\n  "note": "\xff"\n}\n')
    with pytest.raises(common.UserError) as e:
        evaluate.main(plot=str(report), plot_out=str(out))
    assert str(e.value) == f"{report}:3: not valid UTF-8 (byte 0xff at column 12)" and not out.exists()


def test_every_reader_takes_json_the_parser_cannot_as_one_line(tiny_model_dir, tmp_path):
    """A prompt nested 200,000 deep (RecursionError inside json) and a 5,000-digit number (ValueError)."""
    deep, long = tmp_path / "deep.jsonl", tmp_path / "long.jsonl"
    deep.write_text(GOOD + '{"id": "b", "prompt": ' + "[" * 200_000 + "]" * 200_000 + "}\n")
    long.write_text(GOOD + '{"id": "b", "step": ' + "9" * 5000 + "}\n")
    out = tmp_path / "out"
    for bad, message in ((deep, f"{deep}:2: JSON nested too deeply for the parser (about {sys.getrecursionlimit()} "
                                "levels or more)"),
                         (long, f"{long}:2: JSON the parser cannot take (Exceeds the limit (4300 digits)")):
        for name, call in _every_reader(tiny_model_dir, tmp_path, bad).items():
            with pytest.raises(common.UserError) as e:
                call()
            assert str(e.value).startswith(message), (name, str(e.value)[:200])
            assert not out.exists(), name
    answer = "[" * 200_000 + "]" * 200_000  # an answer the rule oracle grades: valid JSON to a reader, not to the parser
    assert oracle.constraint_score(answer, [{"type": "json"}], "graded") == 0.0
    report = tmp_path / "report.json"
    report.write_text('{"a": ' + "[" * 200_000 + "]" * 200_000 + "}")
    with pytest.raises(common.UserError, match=f"^{report}:1: JSON nested too deeply"):
        evaluate.main(plot=str(report), plot_out=str(out))
    r = subprocess.run([sys.executable, os.path.join(ROOT, "sspo.py"), "--data", str(deep), "--output_dir", str(out)],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and r.stderr.splitlines() == [f"error: {deep}:2: JSON nested too deeply for the parser "
                                                           f"(about {sys.getrecursionlimit()} levels or more)"]


def test_run_config_json_with_bad_bytes_on_resume(uninterrupted, tmp_path):
    out = tmp_path / "run"
    _build(uninterrupted, out, {"": (3, "whole")}, 3)
    (out / "run_config.json").write_bytes(b'{"data": "\xc3("}\n')
    with pytest.raises(common.UserError) as e:
        train(uninterrupted, out, resume=True)
    assert str(e.value) == f"{out}/run_config.json:1: not valid UTF-8 (byte 0xc3 at column 11)"


def test_the_cli_prints_one_line_and_exits_2(tmp_path):
    bad = _latin1(tmp_path / "metrics.jsonl")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), "--curves", str(bad), "--plot_out",
                        str(tmp_path / "t.png")], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and r.stderr.splitlines() == [f"error: {bad}:2: not valid UTF-8 (byte 0xe9 at column 16)"]
    assert not (tmp_path / "t.png").exists()


def test_loading_pauses_the_collector_and_the_cli_freezes_it_before_exit(tiny_model_dir, tmp_path):
    """tuning.gc_paused: the collector off inside (nested too), back on after, even after an error, with what was
    built frozen; load_causal_lm runs in it; common.cli freezes what is left before exit, after success and error."""
    import gc

    assert gc.isenabled()
    with pytest.raises(RuntimeError):
        with tuning.gc_paused():
            assert not gc.isenabled()
            with tuning.gc_paused():
                assert not gc.isenabled()
            assert not gc.isenabled()  # the inner one leaves the outer's pause alone
            raise RuntimeError
    assert gc.isenabled()
    gc.unfreeze()
    model, _ = common.load_causal_lm(tiny_model_dir)
    assert gc.isenabled() and gc.get_freeze_count() > 0 and gc.is_tracked(model)
    gc.unfreeze()
    script = tmp_path / "job.py"
    script.write_text(f"""import atexit, gc, sys
sys.path.insert(0, {ROOT!r})
import common
atexit.register(lambda: print("frozen", gc.get_freeze_count() > 0, "enabled", gc.isenabled()))

def main(fail=False):
    if fail:
        raise common.UserError("bad flag")

common.cli(main)
""")
    for args, code in (([], 0), (["--fail"], 2)):
        r = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True)
        assert r.returncode == code and r.stdout.split() == ["frozen", "True", "enabled", "True"], (r.stdout, r.stderr)


# ---------------------------------------------------------------------- models and big inputs

def test_a_damaged_model_folder_is_one_line_and_writes_nothing(uninterrupted, tiny_model_dir, tmp_path):
    def broken(name, damage):
        path = tmp_path / name
        shutil.copytree(tiny_model_dir, path)
        damage(path)
        return path

    def cut_weights(path):
        weights = path / "model.safetensors"
        os.truncate(weights, weights.stat().st_size // 2)  # a copy that died half way

    def drop_tokenizer(path):
        for f in os.listdir(path):
            if f.startswith("tokenizer") or f.endswith(".jinja"):
                os.remove(path / f)

    def drop_chat_template(path):
        for f in os.listdir(path):
            if f.endswith(".jinja"):
                os.remove(path / f)
        config = json.loads((path / "tokenizer_config.json").read_text())
        config.pop("chat_template", None)
        (path / "tokenizer_config.json").write_text(json.dumps(config))

    out = tmp_path / "out"
    expected = {
        "cut": (cut_weights, "cannot load model '{}': Error while deserializing header: incomplete metadata, "
                             "file not fully covered"),
        "no_tokenizer": (drop_tokenizer, "{}: no tokenizer in this folder (none of tokenizer.json, "
                                         "tokenizer_config.json, tokenizer.model, vocab.json, vocab.txt): save the "
                                         "tokenizer next to the weights"),
        "no_template": (drop_chat_template, "tokenizer '{}' has no chat template: use an instruct/chat model or set "
                                            "tokenizer.chat_template in its tokenizer_config.json"),
    }
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"id": 1, "prompt": "hello"}\n')
    for name, (damage, message) in expected.items():
        model = broken(name, damage)
        for call in (lambda: sspo.main(data=str(uninterrupted / "scored.jsonl"), model=str(model), output_dir=str(out)),
                     lambda: generate.main(model=str(model), prompts=str(prompts), out=str(out / "r.jsonl"), max_new_tokens=4)):
            with pytest.raises(common.UserError) as e:
                call()
            assert str(e.value) == message.format(model)
            assert sorted(os.listdir(out)) in ([".lock"], [".lock", "r.jsonl.lock"])  # the writers' locks, nothing else
    for path, message in ((prompts, "a file, not a model folder"), (tmp_path / "missing", "no such model folder")):
        with pytest.raises(common.UserError) as e:
            common.load_causal_lm(str(path))
        assert str(e.value) == f"{path}: {message}"


def test_a_prompt_longer_than_the_model_reads_is_one_line(tiny_model_dir, tmp_path):
    prompts, out = tmp_path / "prompts.jsonl", tmp_path / "out.jsonl"
    prompts.write_text(json.dumps({"id": 1, "prompt": "hello"}) + "\n" + json.dumps({"id": 2, "prompt": "hello world " * 8500}) + "\n")
    with pytest.raises(common.UserError) as e:
        generate.main(model=tiny_model_dir, prompts=str(prompts), out=str(out), max_new_tokens=4)
    n = len(common.prompt_ids(common.load_tokenizer(tiny_model_dir), "hello world " * 8500))
    assert str(e.value) == (f"{prompts}:2: field 'prompt': {n} tokens, + --max_new_tokens 4, exceed the model's "
                            "context of 512 tokens: shorten the prompt or lower --max_new_tokens")
    assert not out.exists()


def test_a_scored_file_with_k_1000(tmp_path):
    k, path = 1000, tmp_path / "scored.jsonl"
    pref = [[0.5 if i == j else float(i > j) for j in range(k)] for i in range(k)]
    sim = [[1.0 if i == j else 0.1 for j in range(k)] for i in range(k)]
    path.write_text(json.dumps({"prompt": "q", "responses": [f"answer {i}" for i in range(k)], "pref": pref, "sim": sim}) + "\n")
    (pair,), stats = sspo.load_pairs(str(path), "sspo", 0.6, 0.9)
    assert (pair["chosen"], pair["rejected"]) == ("answer 999", "answer 0") and stats["pairs"] == 1


# ------------------------------------------------------------------------- iterate.sh markers

STAGE = """#!{python}
# Stands for every script iterate.sh runs: writes a token and the tokens of its inputs; appends if resumed.
import json, os, sys, uuid
args = sys.argv[1:]
def value(flag):
    return args[args.index(flag) + 1] if flag in args else None
def token(path):
    f = os.path.join(path, "made.txt") if os.path.isdir(path) else path
    return open(f).readline().strip() if os.path.isfile(f) else ""
if os.path.basename(args[0]) == "evaluate.py":
    sys.exit(0)
if args[0] == "-c":  # iterate.sh's own code (its OUT lock): the real interpreter runs it
    os.execv(sys.executable, [sys.executable] + args)
out = value("--out") or value("--output_dir")
target = os.path.join(out, "made.txt") if "--output_dir" in args else out
os.makedirs(os.path.dirname(target), exist_ok=True)
if os.path.exists(target):
    open(target, "a").write("resumed\\n")
else:
    inputs = {{f: token(value(f)) for f in ("--data", "--model") if value(f)}}
    open(target, "w").write(uuid.uuid4().hex + "\\n" + json.dumps(inputs) + "\\n")
"""


def _made(path):
    """(token, inputs' tokens, resumed) of a stage output written by STAGE."""
    f = path / "made.txt" if path.is_dir() else path
    lines = f.read_text().splitlines()
    return lines[0], json.loads(lines[1]), "resumed" in lines


def _stale(out):
    """The stages made from an input that has changed since."""
    stale = []
    for t in (1, 2):
        d = out / f"iter{t}"
        for stage, inputs in (("responses.jsonl", {"--model": out / "iter1" / "model" if t == 2 else None}),
                              ("scored.jsonl", {"--data": d / "responses.jsonl"}),
                              ("model", {"--data": d / "scored.jsonl"})):
            made_from = _made(d / stage)[1]
            stale += [f"iter{t}/{stage}" for flag, src in inputs.items() if src and made_from[flag] != _made(src)[0]]
    return stale


def test_iterate_redoes_what_a_kill_between_two_stages_left_stale(tmp_path):
    stage, out = tmp_path / "stage.py", tmp_path / "run"
    stage.write_text(STAGE.format(python=sys.executable))
    stage.chmod(0o755)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"id": 1, "prompt": "x"}\n')
    env = dict(os.environ, MODEL="base", PROMPTS=str(prompts), HELDOUT="none", ITERS="2", OUT=str(out), PYTHON=str(stage))

    def iterate():
        r = subprocess.run(["bash", os.path.join(ROOT, "scripts", "iterate.sh")], env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr

    iterate()
    assert _stale(out) == []

    def remade(path):  # what a run that remade `path`, then died before the next stage, leaves
        token, inputs, _ = _made(path)
        path.write_text("remade\n" + json.dumps(inputs) + "\n")
        (path.parent / (path.name + ".done")).touch()

    remade(out / "iter1" / "scored.jsonl")
    assert _stale(out) == ["iter1/model"]
    iterate()
    assert _stale(out) == []
    assert _made(out / "iter1" / "scored.jsonl")[0] == "remade"  # kept: it was done

    # iter2/scored.jsonl half made from responses that were remade since (no marker): redone, not resumed
    os.remove(out / "iter2" / "scored.jsonl.done")
    remade(out / "iter2" / "responses.jsonl")
    iterate()
    assert _stale(out) == [] and not _made(out / "iter2" / "scored.jsonl")[2]

    # iter2/model half made from the current scores: resumed
    os.remove(out / "iter2" / "model.done")
    iterate()
    assert _stale(out) == [] and _made(out / "iter2" / "model")[2]


# ------------------------------------------------------------------------ a power loss: fsync before every rename

def test_what_is_renamed_into_place_or_called_finished_was_fsynced_first(uninterrupted, tmp_path):
    """Every file of a checkpoint, ref_logps.pt and the final model reach the disk (fsync, and their folders)
    before the rename that puts them in place, or before summary.json says the run is finished."""
    events, fsync, replace = [], os.fsync, os.replace

    def record_fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def record_replace(a, b):
        events.append(("replace", os.path.abspath(a), os.path.abspath(b)))
        replace(a, b)

    out = tmp_path / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "fsync", record_fsync)
        mp.setattr(os, "replace", record_replace)
        train(uninterrupted, out)
    synced = lambda until: {e[1] for e in events[:until] if e[0] == "fsync"}  # noqa: E731
    renames = [(i, e[1], e[2]) for i, e in enumerate(events) if e[0] == "replace"]
    checkpoints = [(i, a) for i, a, b in renames if b == str(out / "checkpoint")]
    assert len(checkpoints) == 3  # steps 3, 6 and 9
    for i, _ in checkpoints:  # every file of the saved folder (by its name before the rename), and the folder
        tmp = str(out / "checkpoint.tmp")
        files = {os.path.join(tmp, f) for f in CHECKPOINT_FILES}
        assert files | {tmp} <= synced(i), files - synced(i)
        assert str(out) in {e[1] for e in events[i:i + 2] if e[0] == "fsync"}  # the rename itself, right after
    ref = [i for i, a, b in renames if b == str(out / "ref_logps.pt")]
    assert len(ref) == 1 and str(out / "ref_logps.pt.tmp") in synced(ref[0])
    done = [i for i, a, b in renames if b == str(out / "summary.json")]
    assert len(done) == 1 and {str(out / "model.safetensors"), str(out / "config.json"), str(out)} <= synced(done[0])
    assert same_weights(out, uninterrupted / "full")


# ------------------------------------------------------------------------ a failure on one of several processes

FAIL_ON_ONE_RANK = """
import os, sys
import common, sspo
rank, where = int(os.environ["RANK"]), os.environ["FAIL_WHERE"]
save, step = sspo.save_checkpoint, sspo.optimizer_step
def failing_save(accelerator, output_dir, at):
    if rank == 0:  # the main process finds its disk full; the other is already saving its part
        raise common.UserError(f"{output_dir}: cannot write (No space left on device)")
    save(accelerator, output_dir, at)
def failing_step(*args, **kw):
    if rank == 1 and failing_step.calls == 1:  # the second step of the other process meets a bad input
        raise common.UserError("data.jsonl:7: field 'prompt': found late")
    failing_step.calls += 1
    return step(*args, **kw)
failing_step.calls = 0
if where == "save":
    sspo.save_checkpoint = failing_save
else:
    sspo.optimizer_step = failing_step
sys.argv = ["sspo.py"] + sys.argv[1:]
common.cli(sspo.main)
"""


@pytest.mark.parametrize("where, line", [("save", "error: {out}: cannot write (No space left on device)"),
                                         ("step", "error: data.jsonl:7: field 'prompt': found late")])
def test_a_failure_on_one_process_ends_all_of_them_with_its_line(tiny_model_dir, tmp_path, where, line):
    """Two CPU processes under torchrun: the failing one prints its line and exits 2; the other, waiting in a
    collective, stops within seconds (not at the collective's 30-minute timeout) with one line of its own."""
    script = tmp_path / "fail.py"
    script.write_text(FAIL_ON_ONE_RANK)
    data, out = write_scored(tmp_path / "scored.jsonl", n=12), tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29571",
                        str(script), "--data", str(data), "--model", tiny_model_dir, "--output_dir", str(out),
                        "--batch_size", "2", "--save_every", "2"], capture_output=True, text=True, cwd=ROOT,
                       env=dict(os.environ, OMP_NUM_THREADS="1", FAIL_WHERE=where, PYTHONPATH=ROOT), timeout=180)
    assert r.returncode != 0
    lines = r.stderr.splitlines()
    assert line.format(out=out) in lines, r.stderr[-3000:]  # on a line of its own, not after a progress bar
    assert not any(l.startswith("Traceback") for l in lines[:lines.index(line.format(out=out)) + 1])
    assert not (out / "summary.json").exists()
