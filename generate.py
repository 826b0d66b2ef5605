"""Sample K responses per prompt from a chat model: the first stage of an SPPO / S-SPPO iteration.

The manual is `main`'s docstring (`python generate.py --help`). How it works, and why:
- Prompts are formatted by common.prompt_ids, the same function sspo.py scores with, and sampling stops
  at the chat template's end-of-turn token (or EOS): the tokens trained on are the tokens sampled.
- SlotPool decodes --batch_size sequences at once, each in a row ("slot") of preallocated key/value
  buffers. A slot whose answer ends takes the next prompt's answer at once (a prompt is prefilled
  once for its K slots), so no slot idles until the longest answer of its batch ends, and no step
  copies the cache (HF's DynamicCache concatenates it at every step). Prompts go in longest first.
  It needs attention that takes a 4-D mask as given (sdpa, eager); `slots_work` checks the model's
  own forward at start, and otherwise HF generate samples batches of whole prompts (same results).
- Every response has its own random stream seeded from (--seed, id, sample index), drawn by `draw`,
  so the output does not depend on batching, slots, the number of processes or resuming (up to float
  rounding of batched matmuls), and the same settings give the same file.
- Under torchrun / `accelerate launch` the processes share each chunk of prompts; the main process
  gathers the results and writes them in input order, one flushed line per prompt (JsonlAppender).
"""
import functools
import hashlib
import inspect
import itertools
import time
import weakref

import torch

from transformers import AttentionInterface
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from common import (PACKAGED_MODEL, JsonlAppender, UserError, check_same_run, cli, cpu_processes, end_of_turn_id,
                    end_process_group, field_error, first_line, load_causal_lm, model_context, pad_rows, prompt_ids,
                    read_rows, resolve_model, takes_4d_mask)

CHUNK_PROMPTS = 64  # prompts a process samples per written chunk: a kill loses about one chunk a process


def cache_argument(lm):
    """The name under which the model's forward takes a cache: `cache` from transformers 5.2x on, before that
    `past_key_values` (which newer releases still take, with a warning, until they drop it)."""
    return "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"


def response_seed(seed, prompt_id, j):
    """A 63-bit seed for sample j of a prompt, stable across runs, machines and Python versions."""
    digest = hashlib.sha256(f"{seed}\x00{prompt_id}\x00{j}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def draw(scores, generators, temperature, top_p):
    """One token a row of `scores` (rows, vocab), each drawn from its row's own torch.Generator: temperature,
    then nucleus sampling (the smallest prefix of the sorted probabilities whose mass reaches top_p; the top
    token always stays), by an inverse-CDF draw of one uniform from the row's stream. temperature 0: greedy."""
    scores = scores.float()
    if temperature <= 0:
        return scores.argmax(-1)
    probs, order = torch.softmax(scores / temperature, -1), None
    if top_p < 1:
        # the nucleus nearly always lies in the top 256, far cheaper to sort than a vocabulary
        top, order = probs.topk(min(256, probs.shape[-1]), -1)
        if (top.sum(-1) < top_p).any():  # a flat distribution: sort it all
            top, order = probs.sort(-1, descending=True)
        probs = top.masked_fill(top.cumsum(-1) - top >= top_p, 0.0)
    cdf = probs.cumsum(-1)
    u = torch.stack([torch.rand((), generator=g) for g in generators]).to(scores.device)
    pick = torch.searchsorted(cdf, u[:, None] * cdf[:, -1:]).clamp(max=cdf.shape[-1] - 1)
    return pick.squeeze(-1) if order is None else order.gather(-1, pick).squeeze(-1)


def draw_on_device(scores, u, temperature, top_p):
    """`draw` with the rows' uniforms given as a tensor u (rows,) and no data-dependent branch, so a captured
    decode step can run it: the nucleus is always cut from the whole sorted vocabulary (draw sorts only the
    top 256 where they hold it, which picks the same token: the sorted top 256 are the sorted vocabulary's
    first 256). The same uniform gives the same token as draw's (tests/test_generate.py)."""
    scores = scores.float()
    if temperature <= 0:
        return scores.argmax(-1)
    probs, order = torch.softmax(scores / temperature, -1), None
    if top_p < 1:
        probs, order = probs.sort(-1, descending=True)
        probs = probs.masked_fill(probs.cumsum(-1) - probs >= top_p, 0.0)
    cdf = probs.cumsum(-1)
    pick = torch.searchsorted(cdf, u[:, None] * cdf[:, -1:]).clamp(max=cdf.shape[-1] - 1)
    return pick.squeeze(-1) if order is None else order.gather(-1, pick).squeeze(-1)


class PerRowSampler:
    """A logits processor for HF generate that picks each row's token with `draw` (the row's own stream) and
    leaves it the only finite score, so HF's greedy step (or any warper the model's generation config
    adds) can only take that token. HF's sampler draws a whole batch from one global stream, so a
    response would depend on its batch-mates."""

    def __init__(self, seeds, temperature, top_p):
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]
        self.temperature, self.top_p = temperature, top_p

    def __call__(self, input_ids, scores):
        choice = draw(scores, self.generators, self.temperature, self.top_p)
        return torch.full_like(scores, float("-inf")).scatter_(-1, choice[:, None].to(scores.device), 0.0)


def grouped_decode_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' sdpa attention for SlotPool.static_step: one query a row and a 4-D mask. With grouped-query
    attention the query heads that share a key/value head become that head's rows of queries, so sdpa reads
    each key and value once; transformers copies them per query head first when a mask is given (repeat_kv:
    for Llama-3's 32/8 heads, four times the cache's bytes written and read at every layer of every step).
    The same numbers up to float rounding; anything else goes to transformers' own sdpa."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    b, heads, q, d = query.shape
    kv = key.shape[1]
    if q != 1 or heads == kv or attention_mask is None or attention_mask.shape[1] != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    out = torch.nn.functional.scaled_dot_product_attention(query.view(b, kv, heads // kv, d), key, value,
                                                           attn_mask=attention_mask, scale=scaling)
    return out.reshape(b, heads, 1, d).transpose(1, 2).contiguous(), None


GROUPED_DECODE = "sspo_grouped_decode"  # its name among transformers' attention functions
AttentionInterface.register(GROUPED_DECODE, grouped_decode_attention)


class SlotLayer(DynamicLayer):
    """One layer's keys and values, read from and written to its pool's buffers in place: a decode step
    writes the pool's column `col` and attends to the columns before it. DynamicCache instead copies
    the whole cache into a new tensor at every step, the largest cost of a big batch on a CPU."""

    def __init__(self, pool, index):
        super().__init__()
        self.pool_ref, self.index, self.is_initialized = weakref.ref(pool), index, True  # no cycle: the pool's
        # buffers go when its sampler lets go of it, not at the next garbage collection

    def update(self, key_states, value_states, *args, **kwargs):
        pool = self.pool_ref()
        keys, values = pool.keys[self.index], pool.values[self.index]
        if pool.bound:  # a static step (StepGraphs): the column is a device tensor, the span a fixed bound
            keys.index_copy_(2, pool.col_t, key_states)
            values.index_copy_(2, pool.col_t, value_states)
            return keys[:, :, :pool.bound], values[:, :, :pool.bound]
        col = pool.col
        keys[:, :, col:col + 1] = key_states
        values[:, :, col:col + 1] = value_states
        return keys[:, :, :col + 1], values[:, :, :col + 1]

    def get_seq_length(self):
        return self.pool_ref().col


def move_columns(buffer, src, dst, n):
    """buffer[:, :, dst:dst + n] = buffer[:, :, src:src + n] in place, the ranges may overlap: blocks no
    longer than the shift, in the order that never overwrites a column still to be read."""
    shift = src - dst
    if not shift or n <= 0:
        return
    starts = range(0, n, abs(shift))
    for a in starts if shift > 0 else reversed(starts):
        m = min(abs(shift), n - a)
        buffer[:, :, dst + a:dst + a + m] = buffer[:, :, src + a:src + a + m]


class SlotPool:
    """The sequences being sampled, one a row ("slot") of preallocated key/value buffers, so a slot whose
    sequence ends takes a new one at once instead of idling until the longest of its batch ends.

    Every slot writes the same column at a decode step; a slot's own tokens are the columns from where
    its prompt was put in up to `col`, and `seen` masks out all the others (a 4-D mask, taken as given
    by sdpa and eager attention). Positions are counted per slot. A prompt is prefilled once, however
    many slots sample it. The buffers are `longest + 2 * max_new_tokens` columns wide, allocated once:
    when a new prompt does not fit before `col`, or a new sequence could run past the end, the live
    columns move to the left end (`_make_room`), the same shift for every slot.
    """

    SHRINK_AT = 8  # see shrink

    def __init__(self, lm, slots, max_new_tokens, pad_id, longest):
        self.lm, self.slots, self.room, self.pad_id = lm, slots, max_new_tokens, pad_id
        self.device = next(lm.parameters()).device
        self.cache_argument = cache_argument(lm)
        self.width = longest + 2 * max_new_tokens
        self.keys = self.values = None  # per layer: (slots, kv heads, width, head dim), made at the first admit
        self.col = 0  # the column the next decode step writes
        self.bound = None  # static_step's: the columns every attention reads (None: up to col)
        self.col_t = torch.zeros(1, dtype=torch.long, device=self.device)  # col on the device, for static_step
        self.seen = torch.zeros(slots, self.width, dtype=torch.bool, device=self.device)
        self.owner = [None] * slots  # what each slot samples (the caller's key); None: free
        self.start = [0] * slots  # the column of each slot's first prompt token
        self.pos = torch.zeros(slots, dtype=torch.long, device=self.device)
        self.next = torch.full((slots,), pad_id, dtype=torch.long, device=self.device)  # each slot's next input token

    def free(self):
        return [s for s, o in enumerate(self.owner) if o is None]

    def busy(self):
        return [s for s, o in enumerate(self.owner) if o is not None]

    @torch.no_grad()
    def admit(self, prompts, owners):
        """Prefill `prompts` (token lists) and put copy j of prompt i in a free slot owned by owners[i][j].
        Returns (slots, the next-token logits of each) in the order of the flattened owners."""
        ids, mask = pad_rows(prompts, self.pad_id, self.device, left=True)
        width = ids.shape[1]
        cache = DynamicCache(config=self.lm.config)
        logits = self.lm(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                         use_cache=True, logits_to_keep=1, **{self.cache_argument: cache}).logits[:, -1]
        if self.keys is None:  # zeros: a masked column must still hold finite numbers (0 * NaN is NaN)
            self.keys = [layer.keys.new_zeros((self.slots, *layer.keys.shape[1:2], self.width, layer.keys.shape[3]))
                         for layer in cache.layers]
            self.values = [layer.values.new_zeros((self.slots, *layer.values.shape[1:2], self.width, layer.values.shape[3]))
                           for layer in cache.layers]
            self.cache = Cache(layers=[SlotLayer(self, i) for i in range(len(self.keys))])
        self._make_room(width)
        copies = torch.tensor([len(o) for o in owners], device=self.device)
        slots = self.free()[:int(copies.sum())]
        rows, col = torch.tensor(slots, device=self.device), self.col
        for layer, keys, values in zip(cache.layers, self.keys, self.values):
            keys[rows, :, col - width:col] = layer.keys.repeat_interleave(copies, 0)
            values[rows, :, col - width:col] = layer.values.repeat_interleave(copies, 0)
        self.seen[rows] = False
        self.seen[rows, col - width:col] = mask.bool().repeat_interleave(copies, 0)
        self.pos[rows] = mask.sum(-1).repeat_interleave(copies, 0)
        flat = [(o, col - len(p)) for p, os in zip(prompts, owners) for o in os]
        for s, (o, start) in zip(slots, flat):
            self.owner[s], self.start[s] = o, start
        return slots, logits.repeat_interleave(copies, 0)

    def _make_room(self, width):
        """Move the live columns so they end at max(their span, `width`) when a prompt of `width` columns
        does not fit before `col` or a new sequence could run past the end."""
        if width <= self.col and self.col + self.room <= self.width:
            return
        live = [self.start[s] for s in self.busy()]
        keep = self.col - min(live) if live else 0
        col = max(keep, width)
        for buffer in [*self.keys, *self.values, self.seen[:, None, :, None]]:
            move_columns(buffer, self.col - keep, col - keep, keep)
        self.seen[:, :col - keep] = False  # what the live slots saw there has moved,
        self.seen[:, col:] = False  # and what lies past col is old (static_step reads columns past col)
        self.start = [s + col - self.col for s in self.start]
        self.col = col

    @torch.no_grad()
    def step(self):
        """One decode step of every slot (a free one runs on a pad token and is ignored): its logits."""
        self.seen[:, self.col] = True  # a free slot sees its own column, so nothing it computes is NaN
        logits = self.lm(input_ids=self.next[:, None], attention_mask=self.seen[:, None, None, :self.col + 1],
                         position_ids=self.pos[:, None], use_cache=True, **{self.cache_argument: self.cache}).logits[:, -1]
        self.col += 1
        self.pos += 1
        return logits

    def static_step(self, bound):
        """step() with every shape fixed by (slots, bound) and no host work, so CUDA can capture it once and
        replay it (StepGraphs): the column comes from col_t, attention reads columns [0, bound) (those not
        seen are masked). Advances col_t and pos on the device; the caller advances col."""
        config, attention = self.lm.config, self.lm.config._attn_implementation
        self.bound = bound
        if attention == "sdpa":
            config._attn_implementation = GROUPED_DECODE
        try:
            self.seen.index_fill_(1, self.col_t, True)
            logits = self.lm(input_ids=self.next[:, None], attention_mask=self.seen[:, None, None, :bound],
                             position_ids=self.pos[:, None], use_cache=True, **{self.cache_argument: self.cache}).logits[:, -1]
        finally:
            self.bound = None
            config._attn_implementation = attention
        self.col_t += 1
        self.pos += 1
        return logits

    def release(self, slots):
        for s in slots:
            self.owner[s] = None
        if slots:
            self.pos[slots] = 0  # a free slot's position stays small (learned position tables end somewhere)
            self.next[slots] = self.pad_id

    def shrink(self):
        """Once nothing is left to admit and an eighth of the slots or more are free: keep only the busy ones
        (a step's cost grows with its rows; at half, 16 prompts sampled 7% slower: bench/RESULTS.md)."""
        busy = self.busy()
        if not busy or self.slots - len(busy) < max(1, self.slots // self.SHRINK_AT):
            return
        rows = torch.tensor(busy, device=self.device)
        self.keys = [k.index_select(0, rows) for k in self.keys]
        self.values = [v.index_select(0, rows) for v in self.values]
        self.seen, self.pos, self.next = self.seen[rows], self.pos[rows], self.next[rows]
        self.owner, self.start = [self.owner[s] for s in busy], [self.start[s] for s in busy]
        self.slots = len(busy)


def load_model(model, dtype="auto"):
    """(the model in eval mode, its tokenizer) from a hub id, a local folder or the packaged default
    (common.load_causal_lm). dtype 'auto': bfloat16 on a GPU, float32 on a CPU."""
    if dtype == "auto":
        dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    elif dtype in ("float32", "bfloat16", "float16"):
        dtype = getattr(torch, dtype)
    elif not isinstance(dtype, torch.dtype):
        raise UserError(f"--dtype must be auto, float32, bfloat16 or float16, not {dtype!r}")
    lm, tokenizer = load_causal_lm(model, dtype=dtype)
    return lm.eval(), tokenizer


TESTED_TRANSFORMERS = ((5, 17), (5, 24))  # the oldest and newest release generate.py's slots are tested on


def transformers_tested():
    """None when the installed transformers lies in TESTED_TRANSFORMERS' range, else a line saying it does not."""
    import transformers

    version = tuple(int(p) for p in transformers.__version__.split(".")[:2] if p.isdigit())
    low, high = TESTED_TRANSFORMERS
    if low <= version <= high:
        return None
    return (f"generate: transformers {transformers.__version__} is outside the range generate.py's slots are tested on "
            f"({'.'.join(map(str, low))} to {'.'.join(map(str, high))}); they are checked against the model's own forward "
            "before sampling and replaced by HF generate if they disagree")


def slots_work(lm, tokenizer, length):
    """Whether SlotPool reproduces the model's own forward: its attention takes a 4-D mask as given
    (common.takes_4d_mask), and on two prompts of different lengths, three greedy steps give the logits
    of the model run on the whole sequences. Otherwise sampling falls back to HF generate, with a line."""
    outside = transformers_tested()
    if outside:
        print(outside)
    if not takes_4d_mask(lm.config, length):
        why = f"its attention ({getattr(lm.config, '_attn_implementation', None)}, layer types) does not take a 4-D mask as given"
    else:
        prompts = [prompt_ids(tokenizer, "hi"), prompt_ids(tokenizer, "say something longer than that, please")]
        device = next(lm.parameters()).device
        try:
            pool = SlotPool(lm, 2, 3, tokenizer.pad_token_id or 0, max(map(len, prompts)))
            slots, first = pool.admit(prompts, [[0], [1]])
            logits = first.new_empty(2, first.shape[-1])
            logits[slots] = first  # by slot, as pool.step returns them
            seqs, got = [list(p) for p in prompts], []
            for _ in range(3):
                got.append(logits[slots].float())
                for s, seq in zip(slots, seqs):
                    seq.append(int(logits[s].argmax()))
                pool.next[slots] = torch.tensor([seq[-1] for seq in seqs], device=device)
                logits = pool.step()
            with torch.no_grad():
                full = [lm(input_ids=torch.tensor([seq], device=device)).logits[0] for seq in seqs]  # one forward each
                want = [torch.stack([f[len(p) - 1 + t] for f, p in zip(full, prompts)]).float() for t in range(3)]
            tol = 1e-3 if next(lm.parameters()).dtype == torch.float32 else 5e-2
            if all(torch.allclose(g.log_softmax(-1), w.log_softmax(-1), atol=tol * 10, rtol=tol) for g, w in zip(got, want)):
                return True
            why = "its logits differ from the model's own forward on whole sequences"
        except Exception as e:  # noqa: BLE001  (whatever the model raises, the answer is: HF generate)
            why = f"its forward fails ({type(e).__name__}: {first_line(e)})"
    print(f"generate: model type {lm.config.model_type!r}: slots not used ({why}); sampling with HF generate")
    return False


def stream_responses(lm, tokenizer, encoded, seeds, k, max_new_tokens, temperature, top_p, batch_size, slots=None,
                     graphs=None):
    """Yield (i, result) for each prompt as its k responses finish: encoded[i] its token ids, seeds[i] the
    seeds of its k random streams. Prompts are admitted in the order given. slots: sample with SlotPool
    (None: where slots_work says so), else with HF generate in batches of batch_size sequences.
    graphs: with slots, decode in blocks with the step captured as a CUDA graph (_slot_stream); None: on a
    CUDA device. On a CPU, True runs the same block path with eager steps (what the tests check)."""
    stop = sorted({end_of_turn_id(tokenizer)} | ({tokenizer.eos_token_id} - {None}))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]
    if slots is None:
        slots = bool(encoded) and slots_work(lm, tokenizer, max(map(len, encoded)) + max_new_tokens)
    if graphs is None:
        graphs = next(lm.parameters()).device.type == "cuda"
    sample = functools.partial(_slot_stream, blocks=graphs) if slots else _generate_stream
    for i, token_lists in sample(lm, encoded, seeds, k, max_new_tokens, temperature, top_p, batch_size, stop, pad_id):
        texts, counts, finished = [], [], []
        for tokens in token_lists:
            end = next((t for t, tok in enumerate(tokens) if tok in stop), None)
            tokens = tokens if end is None else tokens[:end]
            texts.append(tokenizer.decode(tokens, skip_special_tokens=False))
            counts.append(len(tokens))
            finished.append(end is not None)
        yield i, {"responses": texts, "num_tokens": counts, "finished": finished}


BLOCK = 16  # decode steps between two looks at the sampled tokens on the block path (end of turn, admissions)


class StepGraphs:
    """The block path's decode step: SlotPool.static_step, then draw_on_device with each slot's uniform for
    that step; the token becomes the slot's next input and is kept in `tokens` (slots, block). On a CUDA
    device the step of each shape (slots, bound) is captured once as a CUDA graph and replayed, one launch a
    step and no host work between; the host reads the tokens once a block. Elsewhere (and if a capture fails,
    with a line) the same step runs eagerly."""

    def __init__(self, pool, block, temperature, top_p, capture):
        self.pool, self.block, self.temperature, self.top_p = pool, block, temperature, top_p
        self.capture, self.mempool = capture, None
        self.resize()

    def resize(self):
        """New buffers for the pool's number of slots (after SlotPool.shrink); graphs of other shapes go."""
        device, slots = self.pool.device, self.pool.slots
        self.uniforms = torch.zeros(slots, self.block, device=device)
        self.tokens = torch.zeros(slots, self.block, dtype=torch.long, device=device)
        self.t = torch.zeros(1, dtype=torch.long, device=device)  # the step within the block
        self.graphs = {}

    def step(self, bound):
        picked = draw_on_device(self.pool.static_step(bound), self.uniforms.index_select(1, self.t).squeeze(1),
                                self.temperature, self.top_p)
        self.pool.next.copy_(picked)
        self.tokens.index_copy_(1, self.t, picked[:, None])
        self.t += 1

    def run_block(self, uniforms):
        """`block` decode steps of every slot, uniforms (slots, block) on the host; returns the tokens sampled
        as lists (the one sync of the block). Attention reads the columns up to a multiple of 64 past the last
        one written, so a block's shape, and its graph, is one of a few."""
        pool = self.pool
        bound = min(pool.width, -(-(pool.col + self.block) // 64) * 64)
        self.uniforms.copy_(uniforms)
        self.t.zero_()
        pool.col_t.fill_(pool.col)
        graph = self.graph(bound) if self.capture else None
        for _ in range(self.block):
            graph.replay() if graph is not None else self.step(bound)
        pool.col += self.block
        return self.tokens.tolist()

    def graph(self, bound):
        key = (self.pool.slots, bound)
        if key not in self.graphs:
            self.graphs[key] = self._capture(bound)
        return self.graphs[key]

    def _capture(self, bound):
        """A CUDA graph of step(bound), or None (and eager steps from then on) if the model's forward cannot
        be captured. Two warm-up steps run first (lazy initialisations must not happen inside the capture);
        what they change is put back, and the columns they wrote are written again by the first replay."""
        state = [self.pool.next, self.pool.pos, self.pool.col_t, self.t]
        saved = [x.clone() for x in state]
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    self.step(bound)
                    for x, y in zip(state, saved):
                        x.copy_(y)
            torch.cuda.current_stream().wait_stream(side)
            self.mempool = self.mempool or torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.mempool):
                self.step(bound)
            return graph
        except Exception as e:  # noqa: BLE001  (whatever the capture raises, the answer is: eager steps)
            torch.cuda.synchronize()
            for x, y in zip(state, saved):
                x.copy_(y)
            self.capture = False
            print(f"generate: the decode step cannot be captured as a CUDA graph ({type(e).__name__}: "
                  f"{first_line(e)}); it runs eagerly")
            return None


def _slot_stream(lm, encoded, seeds, k, max_new_tokens, temperature, top_p, batch_size, stop, pad_id, blocks=False):
    """(i, k token lists, each ending on its stop token if it has one) a prompt, from a SlotPool of
    batch_size slots. New prompts are admitted once a quarter of the slots are free.

    blocks False: one decode step at a time, each token drawn on the host (draw). blocks True: decode in
    blocks of BLOCK steps with StepGraphs (sampling on the device; on a CUDA device each step captured once
    as a CUDA graph). Each slot's BLOCK uniforms come from its own stream at the block's start (torch.rand(n)
    draws what n single draws would), so the answers are the same. A sequence that ends inside a block runs
    on to the block's end (those tokens are dropped), so a slot needs BLOCK - 1 more columns; admissions
    and shrinking happen between blocks, and the pool shrinks by halves (few shapes, so few captures)."""
    block = BLOCK if blocks else 1
    slots = min(max(batch_size, k), k * len(encoded))  # no buffers for slots that would never be used
    pool = SlotPool(lm, slots, max_new_tokens + block - 1, pad_id, max(map(len, encoded), default=1))
    steps = StepGraphs(pool, block, temperature, top_p, pool.device.type == "cuda") if blocks else None
    queue, stops = list(range(len(encoded)))[::-1], set(stop)
    tokens = [[[] for _ in range(k)] for _ in encoded]
    left = [k] * len(encoded)  # responses of each prompt still being sampled
    streams = {}
    while queue or pool.busy():
        free = len(pool.free())
        if queue and (free >= max(k, pool.slots // 4) or not pool.busy()):  # admissions in bulk: prefill is cheaper by the batch
            take = [queue.pop() for _ in range(min(len(queue), free // k))]
            owners = [[(i, j) for j in range(k)] for i in take]
            streams.update({(i, j): torch.Generator().manual_seed(seeds[i][j]) for i in take for j in range(k)})
            slots, logits = pool.admit([encoded[i] for i in take], owners)
        elif steps is None:
            slots = pool.busy()
            logits = pool.step()[slots]
        else:
            slots, logits = pool.busy(), None
            uniforms = torch.zeros(pool.slots, block)
            for s in slots:
                uniforms[s] = torch.rand(block, generator=streams[pool.owner[s]])
            sampled = steps.run_block(uniforms)
            new = [sampled[s] for s in slots]
        if logits is not None:
            picked = draw(logits, [streams[pool.owner[s]] for s in slots], temperature, top_p)
            pool.next[slots] = picked.to(pool.next.device)
            new = [[t] for t in picked.tolist()]
        ended, complete = [], []
        for s, sampled_s in zip(slots, new):
            i, j = pool.owner[s]
            seq = tokens[i][j]
            for t in sampled_s:
                seq.append(t)
                if t in stops or len(seq) == max_new_tokens:
                    ended.append(s)
                    del streams[(i, j)]
                    left[i] -= 1
                    if not left[i]:
                        complete.append(i)
                    break
        pool.release(ended)
        if not queue and (steps is None or len(pool.busy()) <= pool.slots // 2):
            before = pool.slots
            pool.shrink()
            if steps is not None and pool.slots != before:
                steps.resize()
        for i in complete:
            yield i, tokens[i]
            tokens[i] = None


def _generate_stream(lm, encoded, seeds, k, max_new_tokens, temperature, top_p, batch_size, stop, pad_id):
    """The same as _slot_stream with HF generate: batches of whole prompts (batch_size // k, at least
    one), left padding, PerRowSampler; a batch runs until its longest sequence ends."""
    device = next(lm.parameters()).device
    per_batch = max(1, batch_size // k)
    for start in range(0, len(encoded), per_batch):
        batch = range(start, min(start + per_batch, len(encoded)))
        rows = [encoded[i] for i in batch for _ in range(k)]
        input_ids, mask = pad_rows(rows, pad_id, device, left=True)
        sampler = PerRowSampler([s for i in batch for s in seeds[i]], temperature, top_p)
        with torch.no_grad():
            out = lm.generate(input_ids=input_ids, attention_mask=mask, do_sample=False, logits_processor=[sampler],
                              max_new_tokens=max_new_tokens, eos_token_id=stop, pad_token_id=pad_id)
        new = out[:, input_ids.shape[1]:].tolist()
        for b, i in enumerate(batch):
            yield i, new[b * k:(b + 1) * k]


def sample_responses(prompts, lm, tokenizer, *, k, max_new_tokens, temperature, top_p, seed, batch_size, ids=None,
                     progress=None, slots=None, graphs=None):
    """Sample k responses for each prompt with a loaded model (load_model): the CLI's own path
    (sample_chunks), for scripts. The settings mean what main's flags of the same names mean.

    prompts: list of str. ids: one per prompt, seeds its samples (default: the prompt's index as a string).
    progress: a tqdm bar to advance by one per prompt, or None. slots, graphs: as in stream_responses.
    Returns, in input order, one {"responses", "num_tokens", "finished"} dict (k items each) a prompt.
    """
    ids = [str(i) for i in range(len(prompts))] if ids is None else ids
    rows = [{"id": i, "prompt": p} for i, p in zip(ids, prompts, strict=True)]
    chunks = sample_chunks(rows, lm, tokenizer, k=k, max_new_tokens=max_new_tokens, temperature=temperature,
                           top_p=top_p, seed=seed, batch_size=batch_size, chunk=max(1, len(rows)), progress=progress,
                           slots=slots, graphs=graphs)
    return [result for _, results in chunks for result in results]


def sample_chunks(rows, lm, tokenizer, *, k, max_new_tokens, temperature, top_p, seed, batch_size, chunk, state=None,
                  progress=None, slots=None, graphs=None):
    """Yield (rows, results) for each `chunk` rows ({"id", "prompt"} dicts) in input order: the one path
    that samples, behind main and sample_responses.

    state: accelerate's PartialState under several processes (None: one process). Within a chunk the
    prompts are sorted by length (longest first) and dealt out to the processes in turn, so every
    process gets a similar load. One stream runs through all of a process's chunks, so the slots never
    wait for a chunk's last sequence; a chunk is yielded (gathered onto every process, in input order)
    once all its prompts are done, so main writes it before the next one. progress: a tqdm bar (or None)
    the main process advances by one per prompt.
    """
    if not rows:
        return
    rank, processes = (state.process_index, state.num_processes) if state else (0, 1)
    mine = []  # (chunk, row) in the order this process admits them
    for c, start in enumerate(range(0, len(rows), chunk)):
        by_length = sorted(range(start, min(start + chunk, len(rows))), key=lambda i: -len(rows[i]["prompt"]))
        mine += [(c, i) for i in by_length[rank::processes]]
    left = [0] * -(-len(rows) // chunk)  # prompts of each chunk this process has still to sample
    for c, _ in mine:
        left[c] += 1
    sampled_here = list(left)
    stream = stream_responses(lm, tokenizer, [prompt_ids(tokenizer, rows[i]["prompt"]) for _, i in mine],
                              [[response_seed(seed, rows[i]["id"], j) for j in range(k)] for _, i in mine], k,
                              max_new_tokens, temperature, top_p, batch_size, slots, graphs)
    progress = progress if rank == 0 else None
    results, ready = {}, 0
    for n, result in itertools.chain(stream, [(None, None)]):
        if n is not None:
            c, i = mine[n]
            results[i] = result
            left[c] -= 1
            if progress is not None:
                progress.update(1)
        while ready < len(left) and not left[ready]:  # the chunks done, in order (a process may have none of one)
            span = range(ready * chunk, min((ready + 1) * chunk, len(rows)))
            pairs = [(i, results.pop(i)) for i in span if i in results]
            if processes > 1:
                from accelerate.utils import gather_object

                pairs = gather_object(pairs)
                if progress is not None:
                    progress.update(len(span) - sampled_here[ready])
            by_index = dict(pairs)
            yield [rows[i] for i in span], [by_index[i] for i in span]
            ready += 1


def _sample_vllm(path, rows, model, k, max_new_tokens, temperature, top_p, seed):
    """The HF path's contract with vllm, for [(line, row)] of the prompts file: each response is a request of
    its own, seeded with response_seed as the HF path seeds each response's generator; a prompt that does
    not fit the engine's context with room for --max_new_tokens is refused as check_prompt_lengths does.
    Tested with a stand-in engine (tests/test_generate.py), not with vllm itself (not installed here)."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=resolve_model(model), seed=seed)
    tokenizer = llm.get_tokenizer()
    stop = [end_of_turn_id(tokenizer)]
    context = llm.llm_engine.model_config.max_model_len
    requests, params = [], []
    for n, row in rows:
        ids = prompt_ids(tokenizer, row["prompt"])
        _check_fits(path, n, len(ids), max_new_tokens, context)
        for j in range(k):
            requests.append({"prompt_token_ids": ids})
            params.append(SamplingParams(n=1, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens,
                                         stop_token_ids=stop, seed=response_seed(seed, row["id"], j)))
    outs = [request.outputs[0] for request in llm.generate(requests, params)]
    return [{"responses": [o.text for o in outs[i:i + k]],
             "num_tokens": [len([t for t in o.token_ids if t not in stop]) for o in outs[i:i + k]],
             "finished": [o.finish_reason == "stop" for o in outs[i:i + k]]} for i in range(0, len(outs), k)]


def read_prompts(path):
    """[(line, row)] of a prompts file (common.read_rows), every prompt a non-empty string."""
    rows = read_rows(path)
    for n, row in rows:
        if not row["prompt"].strip():
            raise field_error(path, n, "prompt", "empty: nothing to answer")
    return rows


def check_prompt_lengths(path, rows, lm, tokenizer, max_new_tokens):
    """A prompt the model cannot read whole, with room for --max_new_tokens, is an error naming its line:
    past its context a model samples garbage (or fails deep inside) rather than refusing."""
    context = model_context(lm.config)
    for n, row in rows if context else ():
        _check_fits(path, n, len(prompt_ids(tokenizer, row["prompt"])), max_new_tokens, context)


def _check_fits(path, n, length, max_new_tokens, context):
    if length + max_new_tokens > context:
        raise field_error(path, n, "prompt", f"{length} tokens, + --max_new_tokens {max_new_tokens}, exceed the "
                          f"model's context of {context} tokens: shorten the prompt or lower --max_new_tokens")


def main(model=PACKAGED_MODEL, prompts="data/demo_train.jsonl", out="responses.jsonl", k=4, max_new_tokens=512,
         temperature=0.7, top_p=0.9, seed=0, batch_size=128, engine="hf", dtype="auto"):
    """Sample K responses per prompt and append them to a JSONL file, in input order.

    python generate.py --model PATH_OR_ID --prompts prompts.jsonl --out responses.jsonl --k 4
    torchrun --nproc_per_node 8 generate.py ...   # or `accelerate launch`: each process takes a share
    python generate.py --engine vllm ...          # where vllm is installed (tested here with a stand-in engine)

    Input: one {"id", "prompt", ...} object a line, ids unique. Output (docs/method.md §5): the input's
    fields + "responses" [K str], "num_tokens" [K int] (the end-of-turn token excluded), "finished"
    [K bool] (false: cut at --max_new_tokens), "generator" {model, engine, k, sampling settings, seed}.
    A re-run appends only the ids missing from --out, so a killed run resumes where it stopped.

    Args:
        model: hub id, local folder (a LoRA adapter folder is merged into its base), or the packaged SmolLM2-135M-Instruct (needs no hub)
        prompts: JSONL with "id" and "prompt" per line; other fields are copied to the output
        out: output JSONL; existing ids are kept and skipped, so a re-run resumes
        k: responses per prompt (K)
        max_new_tokens: longest response in tokens; a response cut here has "finished": false
        temperature: sampling temperature (0: greedy); 0.7 as SPPO samples its real models
        top_p: nucleus sampling mass; 0.9 as SPPO
        seed: base seed; each response's stream is seeded from (seed, id, sample index), so the file does not depend on batching, processes or resumes
        batch_size: sequences sampled at once (slots); memory ~ batch_size x (longest prompt + 2 x max_new_tokens) x the KV bytes of a token
        engine: "hf" (transformers generate) or "vllm" (if installed; seeded per response like hf)
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
    state = PartialState(cpu=cpu_processes())
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
        results = _sample_vllm(prompts, [(n, row) for n, row in rows if row["id"] not in done], model, k,
                               max_new_tokens, temperature, top_p, seed)
        chunks = [(todo, results)]
        bar.update(len(todo))
    else:
        lm, tokenizer = load_model(model, dtype) if todo else (None, None)  # a finished stage re-runs in a second
        if lm is not None:
            check_prompt_lengths(prompts, [(n, row) for n, row in rows if row["id"] not in done], lm, tokenizer,
                                 max_new_tokens)
            lm.to(state.device)
        bar, t0 = tqdm(total=len(todo), unit="prompt", disable=not state.is_main_process), time.time()
        chunks = sample_chunks(todo, lm, tokenizer, k=k, max_new_tokens=max_new_tokens, temperature=temperature,
                               top_p=top_p, seed=seed, batch_size=batch_size, chunk=CHUNK_PROMPTS * state.num_processes,
                               state=state, progress=bar)
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
    end_process_group()


if __name__ == "__main__":
    cli(main)
