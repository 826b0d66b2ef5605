"""Sample K responses per prompt from a chat model: the first stage of an SPPO / S-SPPO iteration.

The manual is `main`'s docstring (`python generate.py --help`). How it works, and why:
- Prompts are formatted by common.prompt_ids, the same function sspo.py scores with, and sampling stops
  at the chat template's end-of-turn token (or EOS): the tokens trained on are the tokens sampled.
- Prompts are sorted by length and batched with left padding, the K samples of a prompt together.
- Every response has its own random stream seeded from (--seed, id, sample index) and drawn by
  PerRowSampler, so the output does not depend on batching, on the number of processes or on
  resuming (up to float rounding of batched matmuls), and the same settings give the same file.
- Under torchrun / `accelerate launch` the processes share each chunk of prompts; the main process
  gathers the results and writes them in input order, one flushed line per prompt (JsonlAppender).
"""
import hashlib
import time

import torch

from common import (PACKAGED_MODEL, JsonlAppender, UserError, check_same_run, cli, end_of_turn_id, field_error,
                    load_causal_lm, prompt_ids, read_jsonl, resolve_model)

CHUNK_BATCHES = 16  # rows are written per chunk of this many batches: a kill loses at most one chunk


def response_seed(seed, prompt_id, j):
    """A 63-bit seed for sample j of a prompt, stable across runs, machines and Python versions."""
    digest = hashlib.sha256(f"{seed}\x00{prompt_id}\x00{j}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class PerRowSampler:
    """A logits processor that samples each row from its own torch.Generator (temperature, top-p).

    HF's sampler draws a whole batch from one global stream, so a response would depend on its
    batch-mates. This one picks the token itself and leaves it the only finite score, so HF's greedy
    step (or any warper the model's generation config adds) can only take that token.
    """

    def __init__(self, seeds, temperature, top_p):
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]
        self.temperature, self.top_p = temperature, top_p

    def __call__(self, input_ids, scores):
        scores = scores.float()
        if self.temperature <= 0:  # greedy
            choice = scores.argmax(-1)
        else:
            probs, order = torch.softmax(scores / self.temperature, -1), None
            if self.top_p < 1:
                # nucleus: the smallest prefix of the sorted probabilities whose mass reaches top_p (the top
                # token always stays). It nearly always lies in the top 256, far cheaper to sort than a vocab.
                top, order = probs.topk(min(256, probs.shape[-1]), -1)
                if (top.sum(-1) < self.top_p).any():  # a flat distribution: sort it all
                    top, order = probs.sort(-1, descending=True)
                probs = top.masked_fill(top.cumsum(-1) - top >= self.top_p, 0.0)
            cdf = probs.cumsum(-1)  # inverse-CDF draw, one uniform per row from the row's own stream
            u = torch.stack([torch.rand((), generator=g) for g in self.generators]).to(scores.device)
            pick = torch.searchsorted(cdf, u[:, None] * cdf[:, -1:]).clamp(max=cdf.shape[-1] - 1)
            choice = pick.squeeze(-1) if order is None else order.gather(-1, pick).squeeze(-1)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(-1, choice[:, None], 0.0)


def _load(model, dtype):
    """(model, tokenizer) from a name, or the pair as given. dtype 'auto': bf16 on GPU, fp32 on CPU."""
    if isinstance(model, tuple):
        return model
    if dtype == "auto":
        dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    elif dtype in ("float32", "bfloat16", "float16"):
        dtype = getattr(torch, dtype)
    elif not isinstance(dtype, torch.dtype):
        raise UserError(f"--dtype must be auto, float32, bfloat16 or float16, not {dtype!r}")
    lm, tokenizer = load_causal_lm(model, dtype=dtype)
    return lm.eval(), tokenizer


def sample_responses(prompts, model=PACKAGED_MODEL, k=4, max_new_tokens=512, temperature=0.7, top_p=0.9, seed=0,
                     batch_size=32, ids=None, dtype="auto", device=None, progress=None):
    """Sample k responses for each prompt with HF generate. The function behind the CLI, for scripts.

    prompts: list of str. model: a name for common.load_causal_lm or a (model, tokenizer) pair.
    ids: one per prompt, seeds the prompt's samples (default: the prompt's index as a string).
    batch_size: sequences per generate call; prompts are sorted by length and a batch holds whole
    prompts (all k samples of each). progress: a tqdm bar to advance by one per prompt, or None.
    Returns, in input order, one {"responses", "num_tokens", "finished"} dict (k items each) a prompt.
    """
    lm, tokenizer = _load(model, dtype)
    device = torch.device(device) if device else next(lm.parameters()).device
    lm.to(device)
    ids = [str(i) for i in range(len(prompts))] if ids is None else ids
    stop = sorted({end_of_turn_id(tokenizer)} | ({tokenizer.eos_token_id} - {None}))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]
    encoded = [prompt_ids(tokenizer, p) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))  # longest first: memory errors come early
    per_batch = max(1, batch_size // k)
    results = [None] * len(prompts)
    for start in range(0, len(order), per_batch):
        batch = order[start:start + per_batch]
        rows = [encoded[i] for i in batch for _ in range(k)]
        width = max(map(len, rows))
        input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)  # left padding
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
        sampler = PerRowSampler([response_seed(seed, ids[i], j) for i in batch for j in range(k)], temperature, top_p)
        with torch.no_grad():
            out = lm.generate(input_ids=input_ids, attention_mask=mask, do_sample=False, logits_processor=[sampler],
                              max_new_tokens=max_new_tokens, eos_token_id=stop, pad_token_id=pad)
        new = out[:, width:].tolist()
        for b, i in enumerate(batch):
            texts, counts, finished = [], [], []
            for tokens in new[b * k:(b + 1) * k]:
                end = next((t for t, tok in enumerate(tokens) if tok in stop), None)
                tokens = tokens if end is None else tokens[:end]
                texts.append(tokenizer.decode(tokens, skip_special_tokens=False))
                counts.append(len(tokens))
                finished.append(end is not None)
            results[i] = {"responses": texts, "num_tokens": counts, "finished": finished}
        if progress is not None:
            progress.update(len(batch))
    return results


def _sample_vllm(prompts, model, k, max_new_tokens, temperature, top_p, seed, ids):
    """The same contract as sample_responses, with vllm. Untested here (no vllm on these machines)."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=resolve_model(model), seed=seed)
    tokenizer = llm.get_tokenizer()
    stop = [end_of_turn_id(tokenizer)]
    requests = [{"prompt_token_ids": prompt_ids(tokenizer, p)} for p in prompts]
    params = [SamplingParams(n=k, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens,
                             stop_token_ids=stop, seed=response_seed(seed, i, 0)) for i in ids]
    results = []
    for request in llm.generate(requests, params):
        outs = request.outputs
        results.append({"responses": [o.text for o in outs],
                        "num_tokens": [len([t for t in o.token_ids if t not in stop]) for o in outs],
                        "finished": [o.finish_reason == "stop" for o in outs]})
    return results


def read_prompts(path):
    """[(line, row)] of a prompts file, checked: a string "prompt", an "id" that no earlier line used."""
    rows, seen = [], {}
    for n, row in read_jsonl(path):
        if not isinstance(row.get("id"), (str, int)) or isinstance(row.get("id"), bool):
            raise field_error(path, n, "id", "missing, or not a string or an integer")
        if not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise field_error(path, n, "prompt", "missing, empty or not a string")
        if row["id"] in seen:
            raise field_error(path, n, "id", f"id {row['id']!r} repeats line {seen[row['id']]}")
        seen[row["id"]] = n
        rows.append((n, row))
    return rows


def check_prompt_lengths(path, rows, lm, tokenizer, max_new_tokens):
    """A prompt the model cannot read whole, with room for --max_new_tokens, is an error naming its line:
    past its context a model samples garbage (or fails deep inside) rather than refusing."""
    config = lm.config
    context = next((v for v in (getattr(config, a, None) for a in ("max_position_embeddings", "n_positions"))
                    if isinstance(v, int)), None)
    for n, row in rows if context else ():
        length = len(prompt_ids(tokenizer, row["prompt"]))
        if length + max_new_tokens > context:
            raise field_error(path, n, "prompt", f"{length} tokens, + --max_new_tokens {max_new_tokens}, exceed the "
                              f"model's context of {context} tokens: shorten the prompt or lower --max_new_tokens")


def main(model=PACKAGED_MODEL, prompts="data/demo_train.jsonl", out="responses.jsonl", k=4, max_new_tokens=512,
         temperature=0.7, top_p=0.9, seed=0, batch_size=32, engine="hf", dtype="auto"):
    """Sample K responses per prompt and append them to a JSONL file, in input order.

    python generate.py --model PATH_OR_ID --prompts prompts.jsonl --out responses.jsonl --k 4
    torchrun --nproc_per_node 8 generate.py ...   # or `accelerate launch`: each process takes a share
    python generate.py --engine vllm ...          # where vllm is installed (untested here: no vllm)

    Input: one {"id", "prompt", ...} object a line, ids unique. Output (METHOD.md §5): the input's
    fields + "responses" [K str], "num_tokens" [K int] (the end-of-turn token excluded), "finished"
    [K bool] (false: cut at --max_new_tokens), "generator" {model, engine, k, sampling settings, seed}.
    A re-run appends only the ids missing from --out, so a killed run resumes where it stopped.

    Args:
        model: hub id, local folder, or the packaged SmolLM2-135M-Instruct (needs no hub)
        prompts: JSONL with "id" and "prompt" per line; other fields are copied to the output
        out: output JSONL; existing ids are kept and skipped, so a re-run resumes
        k: responses per prompt (K)
        max_new_tokens: longest response in tokens; a response cut here has "finished": false
        temperature: sampling temperature (0: greedy); 0.7 as SPPO samples its real models
        top_p: nucleus sampling mass; 0.9 as SPPO
        seed: base seed; each response's stream is seeded from (seed, id, sample index)
        batch_size: sequences per generate call (batch_size // k prompts, at least one)
        engine: "hf" (transformers generate) or "vllm" (if installed; untested here)
        dtype: model weights: "auto" (bfloat16 on GPU, float32 on CPU), "float32", "bfloat16", "float16"
    """
    from accelerate import PartialState
    from accelerate.utils import gather_object
    from tqdm import tqdm

    if k < 1 or max_new_tokens < 1 or batch_size < 1:
        raise UserError("--k, --max_new_tokens and --batch_size must be at least 1")
    if not 0 < top_p <= 1 or temperature < 0:
        raise UserError("--top_p must be in (0, 1] and --temperature >= 0")
    if engine not in ("hf", "vllm"):
        raise UserError(f"--engine must be 'hf' or 'vllm', not {engine!r}")
    state = PartialState(cpu=not torch.cuda.is_available())  # on CPU only cpu=True makes torchrun's processes a group
    rows = read_prompts(prompts)
    writer = JsonlAppender(out) if state.is_main_process else None
    generator = {"model": model, "engine": engine, "k": k, "temperature": temperature, "top_p": top_p,
                 "max_new_tokens": max_new_tokens, "seed": seed}
    if writer:
        check_same_run(out, "generator", generator)
    done = gather_object([writer.done if writer else set()])[0] if state.num_processes > 1 else writer.done
    todo = [row for _, row in rows if row["id"] not in done]
    n_tokens, n_finished = 0, 0
    if engine == "vllm":
        if state.num_processes > 1:
            raise UserError("--engine vllm runs as one process (vllm shards the model itself): use python, not a launcher")
        bar, t0 = tqdm(total=len(todo), unit="prompt"), time.time()
        results = _sample_vllm([r["prompt"] for r in todo], model, k, max_new_tokens, temperature, top_p, seed,
                               [r["id"] for r in todo])
        chunks = [(todo, results)]
        bar.update(len(todo))
    else:
        lm = _load(model, dtype) if todo else None  # a finished stage re-runs in a second: no model to load
        if lm:
            check_prompt_lengths(prompts, [(n, row) for n, row in rows if row["id"] not in done], *lm, max_new_tokens)
            lm[0].to(state.device)
        bar, t0 = tqdm(total=len(todo), unit="prompt", disable=not state.is_main_process), time.time()
        chunk = max(1, batch_size // k) * CHUNK_BATCHES * state.num_processes
        chunks = _hf_chunks(todo, chunk, lm, state, gather_object, bar,
                            dict(k=k, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                                 batch_size=batch_size))
    for rows_in, results in chunks:
        if writer:
            for row, res in zip(rows_in, results):
                writer.write({**row, **res, "generator": generator})
                n_tokens += sum(res["num_tokens"])
                n_finished += sum(res["finished"])
    bar.close()
    if writer:
        writer.close()
        dt = time.time() - t0
        print(f"generate: {len(todo)} prompts x {k} responses ({len(rows) - len(todo)} already in {out}), "
              f"{n_tokens} tokens in {dt:.1f}s ({n_tokens / max(dt, 1e-9):.1f} tok/s), "
              f"{n_finished}/{len(todo) * k} ended on end-of-turn -> {out}")
    if state.num_processes > 1:
        torch.distributed.destroy_process_group()  # gloo can abort at exit otherwise (OFFLINE.md)


def _hf_chunks(todo, chunk, lm, state, gather_object, bar, settings):
    """Yield (rows, results) per chunk of input order; each process samples a share of a chunk.

    Within a chunk the prompts are sorted by length and dealt out to the processes in whole batches,
    so every process gets a similar load; the main process gets all results back in input order.
    """
    per_batch = max(1, settings["batch_size"] // settings["k"])
    for start in range(0, len(todo), chunk):
        rows = todo[start:start + chunk]
        by_length = sorted(range(len(rows)), key=lambda i: -len(rows[i]["prompt"]))
        batches = [by_length[b:b + per_batch] for b in range(0, len(by_length), per_batch)]
        mine = [i for batch in batches[state.process_index::state.num_processes] for i in batch]
        results = sample_responses([rows[i]["prompt"] for i in mine], lm, ids=[rows[i]["id"] for i in mine],
                                   progress=bar if state.is_main_process else None, **settings)
        pairs = list(zip(mine, results))
        if state.num_processes > 1:
            pairs = gather_object(pairs)
            bar.update(len(rows) - len(mine))
        by_index = dict(pairs)
        yield rows, [by_index[i] for i in range(len(rows))]


if __name__ == "__main__":
    cli(main)
