"""Score K responses per prompt: pairwise win probabilities P (K x K) and semantic similarity S (K x K).

The manual is `main`'s docstring (`python oracle.py --help`). The backends, behind one interface
(`Oracle.pref(rows)` -> one P per row; `PairwiseOracle` implements it for backends that read two
responses at once; ORACLES maps --oracle to a class, so a new backend is one line there):
- reward: P_ij = sigmoid(r_i - r_j), r from an AutoModelForSequenceClassification on the chat-formatted
  prompt + response (the tokenizer's chat template; a (prompt, response) text pair where it has none).
- pairrm: PairRM run natively in transformers (`PairRMModel`, the layout of llm-blender/PairRM-hf;
  llm-blender itself breaks on transformers 5). L_ij is its logit for
  `<|source|>x<|candidate1|>y_i<|candidate2|>y_j` (> 0: y_i wins). It is not antisymmetric, so both
  orders are scored and P_ij = sigmoid((L_ij - L_ji) / 2): a direct pairwise probability.
- judge: a causal LM reads both responses and answers "1" or "2"; q = p("1") / (p("1") + p("2")) from
  its next-token distribution, and P_ij = (q(y_i first) + 1 - q(y_j first)) / 2 cancels position bias.
Every P is built by `pref_matrix` from P_ij for i < j alone, so P_ij + P_ji = 1 and P_ii = 1/2 hold
exactly (the constant-sum game of docs/method.md §3). S_ij is the cosine of L2-normalised, mean-pooled
sentence embeddings (`Embedder`, `sim_matrices`): S = S^T, S_ii = 1.
Speed: the texts or ordered pairs of many prompts share batches, sorted by length; SPPO's reference
scores one pair at a time (bench/bench_oracle_generate.py measures the difference).
"""
import functools
import json
import math
import re
import time

import numpy as np
import torch

from common import (PACKAGED_EMBEDDER, PACKAGED_MODEL, JsonlAppender, UserError, check_same_run, cli, load_causal_lm,
                    load_tokenizer, loading, model_context, pad_rows, prompt_ids, read_rows, resolve_model)

CHUNK_BATCHES = 8  # rows are scored and written in chunks of about this many full batches


# ------------------------------------------------------------------------------------- helpers

def pref_matrix(k, upper):
    """The K x K matrix with P_ij = upper(i, j) for i < j, P_ji = 1 - P_ij and P_ii = 1/2 (float64)."""
    P = np.full((k, k), 0.5)
    for i in range(k):
        for j in range(i + 1, k):
            P[i, j] = min(1.0, max(0.0, float(upper(i, j))))
            P[j, i] = 1.0 - P[i, j]
    return P


def sigmoid(x):
    """1 / (1 + e^-x) without overflow for any float x."""
    return 0.5 * (1.0 + math.tanh(x / 2))


def in_batches(items, batch_size, run):
    """run(batch of token-id lists) -> one value each, over batches sorted longest first; input order back.

    Sorting by length keeps padding small, and all prompts' items share the batches.
    """
    order = sorted(range(len(items)), key=lambda i: -len(items[i]))
    out = [None] * len(items)
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        for i, value in zip(batch, run([items[i] for i in batch])):
            out[i] = value
    return out


def _device(device):
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _pairs(k):
    return [(i, j) for i in range(k) for j in range(k) if i != j]


# ------------------------------------------------------------------------------------ backends

class Oracle:
    """The interface: `pref(rows)` -> one K x K numpy array P per row, P_ij = P(y_i beats y_j | x).

    A row is a dict with at least "prompt" and "responses"; every other input field is there too, so
    a backend may read its own (the `rule` backend reads a prompt's constraints).
    """
    default_model = None  # used when --oracle_model is not given; None: the flag is required
    needs_model = True

    def __init__(self, model, batch_size=32, device=None):
        self.model_name, self.batch_size, self.device = model, batch_size, _device(device)

    def pref(self, rows):
        raise NotImplementedError


class PairwiseOracle(Oracle):
    """A backend that reads two responses at once and scores every ordered pair (i, j), i != j.

    Subclasses give `encode_pairs(row)` (token ids per pair, in `_pairs(K)` order), `score(batch)` (one
    float per pair) and `combine(s_ij, s_ji)` -> P_ij; the pairs of all rows share the batches.
    """

    def pref(self, rows):
        items = [ids for row in rows for ids in self.encode_pairs(row)]
        scores, out, at = in_batches(items, self.batch_size, self.score), [], 0
        for row in rows:
            k = len(row["responses"])
            s = dict(zip(_pairs(k), scores[at:at + k * (k - 1)]))
            at += k * (k - 1)
            out.append(pref_matrix(k, lambda i, j: self.combine(s[i, j], s[j, i])))
        return out


class RewardOracle(Oracle):
    """P_ij = sigmoid(r_i - r_j) with r from a sequence-classification reward model (its logit 0)."""

    def __init__(self, model, batch_size=32, device=None):
        from transformers import AutoModelForSequenceClassification

        super().__init__(model, batch_size, device)
        self.tokenizer = load_tokenizer(model)
        with loading("reward model", model):
            self.model = AutoModelForSequenceClassification.from_pretrained(resolve_model(model)).to(self.device).eval()
        if self.model.config.pad_token_id is None:  # needed to find each row's last token in a padded batch
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.max_len = min(self.tokenizer.model_max_length, 8192)

    def token_ids(self, prompt, response):
        """The ids the reward model scores: the conversation prompt + response (its end kept when too long)."""
        if self.tokenizer.chat_template:
            turns = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
            text = self.tokenizer.apply_chat_template(turns, tokenize=False)
            return self.tokenizer(text, add_special_tokens=False)["input_ids"][-self.max_len:]  # the end is scored
        return self.tokenizer(prompt, response, truncation=True, max_length=self.max_len)["input_ids"]

    @torch.no_grad()
    def rewards(self, batch):
        """The scalar reward of each id list in `batch`."""
        ids, mask = pad_rows(batch, self.model.config.pad_token_id, self.device)
        return self.model(input_ids=ids, attention_mask=mask).logits[:, 0].float().tolist()

    def pref(self, rows):
        items = [self.token_ids(row["prompt"], y) for row in rows for y in row["responses"]]
        rewards, out, at = in_batches(items, self.batch_size, self.rewards), [], 0
        for row in rows:
            r = rewards[at:at + len(row["responses"])]
            at += len(r)
            out.append(pref_matrix(len(r), lambda i, j: sigmoid(r[i] - r[j])))
        return out


@functools.cache
def _pairrm_class():
    """PairRMModel, defined on first use: importing DeBERTa costs seconds that --help should not pay."""
    from torch import nn
    from transformers.models.deberta_v2.modeling_deberta_v2 import DebertaV2Model, DebertaV2PreTrainedModel

    class PairRMModel(DebertaV2PreTrainedModel):
        """PairRM: a DeBERTa-v2 encoder and a head scoring (source, candidate) marker-state pairs.

        Submodule names follow the llm-blender/PairRM-hf checkpoint (`pretrained_model`, `head_layer`)
        so its weights load unchanged. Config extras: n_tasks, drop_out, source_prefix_id,
        cand1_prefix_id, cand2_prefix_id (ids of <|source|>, <|candidate1|>, <|candidate2|>).
        """

        def __init__(self, config):
            super().__init__(config)
            h = config.hidden_size
            self.pretrained_model = DebertaV2Model(config)
            self.head_layer = nn.Sequential(nn.Dropout(config.drop_out), nn.Linear(2 * h, h), nn.Tanh(),
                                            nn.Dropout(config.drop_out), nn.Linear(h, config.n_tasks))
            self.post_init()

        def forward(self, input_ids, attention_mask):
            """Logit L (batch,): > 0 when candidate 1 beats candidate 2, mean over the head's tasks."""
            hidden = self.pretrained_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            rows = torch.arange(len(input_ids), device=input_ids.device)

            def at(token_id):  # each row's encoder state at its (first) marker token
                return hidden[rows, (input_ids == token_id).int().argmax(-1)]

            source = at(self.config.source_prefix_id)
            first = self.head_layer(torch.cat([source, at(self.config.cand1_prefix_id)], -1))
            second = self.head_layer(torch.cat([source, at(self.config.cand2_prefix_id)], -1))
            return (first - second).mean(-1)

    return PairRMModel


def __getattr__(name):  # `oracle.PairRMModel` builds the class on first access
    if name == "PairRMModel":
        return _pairrm_class()
    raise AttributeError(f"module 'oracle' has no attribute {name!r}")


class PairRMOracle(PairwiseOracle):
    """PairRM (Jiang et al. 2023), SPPO's oracle: P_ij = sigmoid((L_ij - L_ji) / 2) over both orders."""
    default_model = "llm-blender/PairRM-hf"
    SOURCE_MAX, CANDIDATE_MAX = 1224, 412  # token budgets PairRM was trained with (2048 in all)

    def __init__(self, model, batch_size=32, device=None):
        super().__init__(model, batch_size, device)
        self.tokenizer = load_tokenizer(model)
        with loading("PairRM model", model, also=(AttributeError,)):
            self.model = _pairrm_class().from_pretrained(resolve_model(model)).to(self.device).eval()

    def _encode(self, text, max_length):  # each segment is [CLS] marker text [SEP], cut on the right
        return self.tokenizer(text, max_length=max_length, truncation=True)["input_ids"]

    def encode_pairs(self, row):
        """`<|source|>x<|candidate1|>y_i<|candidate2|>y_j` per pair; each response is tokenised twice, not 2(K-1) times."""
        source = self._encode("<|source|>" + row["prompt"], self.SOURCE_MAX)
        budget = (self.SOURCE_MAX + 2 * self.CANDIDATE_MAX - len(source)) // 2  # a short source leaves more room
        first = [self._encode("<|candidate1|>" + y, budget) for y in row["responses"]]
        second = [self._encode("<|candidate2|>" + y, budget) for y in row["responses"]]
        return [source + first[i] + second[j] for i, j in _pairs(len(first))]

    @torch.no_grad()
    def score(self, batch):
        ids, mask = pad_rows(batch, self.tokenizer.pad_token_id, self.device)
        return self.model(ids, mask).float().tolist()

    @staticmethod
    def combine(l_ij, l_ji):
        return sigmoid((l_ij - l_ji) / 2)


class JudgeOracle(PairwiseOracle):
    """A causal LM as pairwise judge, both presentation orders: P_ij = (q_ij + 1 - q_ji) / 2."""
    default_model = PACKAGED_MODEL
    LABELS = ("1", "2")
    TEMPLATE = ("Which response answers the request better? Reply with 1 or 2 only.\n\n"
                "Request:\n{prompt}\n\nResponse 1:\n{first}\n\nResponse 2:\n{second}")

    def __init__(self, model, batch_size=32, device=None):
        super().__init__(model, batch_size, device)
        self.model, self.tokenizer = load_causal_lm(model)
        self.model.to(self.device).eval()
        labels = [self.tokenizer(label, add_special_tokens=False)["input_ids"] for label in self.LABELS]
        if any(len(ids) != 1 for ids in labels) or labels[0] == labels[1]:
            raise UserError(f"judge '{model}': the answer labels {self.LABELS} must be two distinct single tokens")
        self.label_ids = [ids[0] for ids in labels]
        self.context, self.cut = model_context(self.model.config), 0

    def encode_pairs(self, row):
        """The judge question, y_i shown first, as a user turn of the judge's own chat template; cut to the
        judge's context where it does not fit (`fit`)."""
        ys = row["responses"]
        return [self.fit(row["prompt"], ys[i], ys[j]) for i, j in _pairs(len(ys))]

    def fit(self, prompt, first, second):
        """The question's ids; over the judge's context, the request and the two responses are cut to fair
        shares of the room left (a part shorter than its share gives the rest to the others): the request
        keeps its end (where the question usually is), each response its beginning, and a cut is marked "...".
        Counted in self.cut; main() prints how many questions were cut."""
        ids = prompt_ids(self.tokenizer, self.TEMPLATE.format(prompt=prompt, first=first, second=second))
        if self.context is None or len(ids) <= self.context:
            return ids
        self.cut += 1
        parts = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in (prompt, first, second)]
        room = self.context - (len(ids) - sum(map(len, parts))) - 12  # the template's own tokens, the marks, re-tokenizing
        while True:
            keep, left, todo = {}, room, sorted(range(3), key=lambda p: len(parts[p]))
            for n, p in enumerate(todo):  # shortest first: each takes at most an equal share of what is left
                keep[p] = min(len(parts[p]), max(left, 0) // (3 - n))
                left -= keep[p]
            text = [self.tokenizer.decode(parts[0][len(parts[0]) - keep[0]:]) if keep[0] else ""]
            text += [self.tokenizer.decode(parts[p][:keep[p]]) for p in (1, 2)]
            text = ["..." + text[0] if keep[0] < len(parts[0]) else text[0]] + \
                   [t + "..." if keep[p] < len(parts[p]) else t for p, t in ((1, text[1]), (2, text[2]))]
            ids = prompt_ids(self.tokenizer, self.TEMPLATE.format(prompt=text[0], first=text[1], second=text[2]))
            if len(ids) <= self.context or room <= 0:
                return ids[-self.context:]
            room -= len(ids) - self.context

    @torch.no_grad()
    def score(self, batch):
        """q = p("1") / (p("1") + p("2")) for the judge's first answer token."""
        ids, mask = pad_rows(batch, self.tokenizer.pad_token_id, self.device, left=True)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding must not shift positions (docs/offline.md)
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=1).logits
        return torch.softmax(logits[:, -1, self.label_ids].float(), -1)[:, 0].tolist()

    @staticmethod
    def combine(q_ij, q_ji):
        return (q_ij + 1 - q_ji) / 2


# ------------------------------------------------------------------------------- rule oracle
# The `rule` oracle: prefers the response that meets more of its prompt's verifiable constraints.
#
# Needs no model, so the whole S-SPPO loop runs offline (`make demo`). A prompt row carries
# "constraints": a list of objects, each with a "type" and that type's parameters (docs/rule_oracle.md
# defines each one; CHECKS below is the code):
#
#     {"id": "t0001", "prompt": "...", "constraints": [{"type": "max_words", "n": 50},
#                                                      {"type": "include_words", "words": ["river"]}]}
#
# Each constraint earns a credit in [0, 1] and score(response) = the mean credit over the row's
# constraints (every constraint weighs the same; an empty response scores 0, so saying nothing never
# satisfies "at most 50 words"). Two credits (docs/rule_oracle.md defines both):
# - binary: 1 when the constraint is met, else 0 (`meets`): what evaluation reports, always;
# - graded (the default for training): 1 exactly when met, else a partial credit that falls with the
#   distance from meeting it (`PARTIAL`, through `credit`), so answers that all miss a constraint still
#   differ and fewer prompts give no pair (measured on the demo prompts: docs/rule_oracle.md).
#
#     P_ij = sigmoid( (score_i - score_j) / temperature ),   P_ii = 1/2,   P_ji = 1 - P_ij.
#
# With the default temperature 0.2, meeting one more of three constraints gives P = 0.84, one more of
# two 0.92, all versus none 0.993: a clear, not certain, preference. Equal scores give exactly 1/2.

DEFAULT_TEMPERATURE = 0.2
CREDITS = ("graded", "binary")  # the first is the default
BULLET = re.compile(r"^\s*[-*\u2022]\s+\S")  # a markdown bullet line: "- x", "* x" or "• x"
FENCE = re.compile(r"^```[a-zA-Z]*\s*\n(.*)\n```$", re.S)


def words(text):
    """Words as a reader counts them: whitespace-separated pieces holding a letter or a digit."""
    return [w for w in text.split() if any(c.isalnum() for c in w)]


def _has_word(text, word):
    """Whether `word` (or phrase) occurs in `text` as whole words, ignoring case."""
    return re.search(r"(?<!\w)" + re.escape(word.lower()) + r"(?!\w)", text.lower()) is not None


def _bullets(text):
    """The number of markdown bullet lines."""
    return sum(bool(BULLET.match(line)) for line in text.splitlines())


def _paragraphs(text):
    """The number of non-empty blocks separated by blank lines."""
    return len([p for p in re.split(r"\n\s*\n", text) if p.strip()])


def _is_json(text):
    text = text.strip()
    fenced = FENCE.match(text)  # small models often wrap JSON in a ```json fence: accepted
    try:
        json.loads(fenced.group(1) if fenced else text)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser takes, no JSON to us either
        return False
    return True


# type -> (parameters it needs, the check). Each check takes the stripped response and the constraint.
CHECKS = {
    "max_words": ({"n": int}, lambda r, c: len(words(r)) <= c["n"]),
    "min_words": ({"n": int}, lambda r, c: len(words(r)) >= c["n"]),
    "include_words": ({"words": list}, lambda r, c: all(_has_word(r, w) for w in c["words"])),
    "exclude_words": ({"words": list}, lambda r, c: not any(_has_word(r, w) for w in c["words"])),
    "lowercase": ({}, lambda r, c: any(ch.isalpha() for ch in r) and r == r.lower()),
    "uppercase": ({}, lambda r, c: any(ch.isalpha() for ch in r) and r == r.upper()),
    "bullets": ({"n": int}, lambda r, c: _bullets(r) == c["n"]),
    "paragraphs": ({"n": int}, lambda r, c: _paragraphs(r) == c["n"]),
    "start_with": ({"phrase": str}, lambda r, c: r.lower().startswith(c["phrase"].strip().lower())),
    "end_with": ({"phrase": str}, lambda r, c: r.lower().endswith(c["phrase"].strip().lower())),
    "json": ({}, lambda r, c: _is_json(r)),
    "no_commas": ({}, lambda r, c: "," not in r),
}


KIND_NAMES = {int: "an integer", list: "a list", str: "a string"}


def constraint_problem(constraints):
    """What is wrong with a row's "constraints" value, as one phrase, or None when it is valid."""
    if not isinstance(constraints, list) or not constraints:
        return "must be a non-empty list of constraint objects"
    for i, c in enumerate(constraints):
        if not isinstance(c, dict) or c.get("type") not in CHECKS:
            kind = c.get("type") if isinstance(c, dict) else c
            return f"constraint {i}: unknown type {kind!r} (known: {', '.join(CHECKS)})"
        for name, kind in CHECKS[c["type"]][0].items():
            value = c.get(name)
            if not isinstance(value, kind) or isinstance(value, bool):
                return f"constraint {i} ({c['type']}): '{name}' must be {KIND_NAMES[kind]}"
            if kind is list and (not value or not all(isinstance(w, str) and w.strip() for w in value)):
                return f"constraint {i} ({c['type']}): '{name}' must be a non-empty list of non-empty strings"
            if kind is int and value < 0:
                return f"constraint {i} ({c['type']}): '{name}' must be >= 0"
    return None


def meets(response, constraint):
    """Whether `response` meets one (valid) constraint."""
    return bool(CHECKS[constraint["type"]][1](response.strip(), constraint))


def _closeness(count, n):
    """min/max of two counts: 1 when equal, falling to 0 as they part (0 when one of them is 0)."""
    return 1.0 if count == n else min(count, n) / max(count, n)


def _shared_share(a, b, from_end=False):
    """The share of `b`'s characters that `a` shares with it at its start (or end), ignoring case."""
    a, b = a.lower(), b.lower()
    if from_end:
        a, b = a[::-1], b[::-1]
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n / len(b)


def _phrase_credit(r, c, from_end):
    """Half credit for a phrase that occurs out of place; else the share of it already in place."""
    phrase = c["phrase"].strip()
    return max(0.5 if phrase.lower() in r.lower() else 0.0, _shared_share(r, phrase, from_end))


def _case_share(r, upper):
    """The share of letters already in the wanted case (0 without a letter)."""
    letters = [ch for ch in r if ch.isalpha()]
    wrong = sum(ch != (ch.upper() if upper else ch.lower()) for ch in letters)
    return 1 - wrong / len(letters) if letters else 0.0


def _has_json_inside(r):
    start = min((i for i in (r.find("{"), r.find("[")) if i >= 0), default=-1)
    end = max(r.rfind("}"), r.rfind("]"))
    return 0 <= start < end and _is_json(r[start:end + 1])


# type -> the credit of a response that does NOT meet it (always < 1), from the stripped response.
PARTIAL = {
    "max_words": lambda r, c: c["n"] / len(words(r)),  # over the limit: limit / words
    "min_words": lambda r, c: len(words(r)) / c["n"],  # under: words / minimum
    "include_words": lambda r, c: sum(_has_word(r, w) for w in c["words"]) / len(c["words"]),
    "exclude_words": lambda r, c: sum(not _has_word(r, w) for w in c["words"]) / len(c["words"]),
    "lowercase": lambda r, c: _case_share(r, upper=False),
    "uppercase": lambda r, c: _case_share(r, upper=True),
    "bullets": lambda r, c: _closeness(_bullets(r), c["n"]),
    "paragraphs": lambda r, c: _closeness(_paragraphs(r), c["n"]),
    "start_with": lambda r, c: _phrase_credit(r, c, from_end=False),
    "end_with": lambda r, c: _phrase_credit(r, c, from_end=True),
    "json": lambda r, c: 0.5 if _has_json_inside(r) else 0.0,  # JSON with text around it
    "no_commas": lambda r, c: 1 / (1 + r.count(",")),
}


def credit(response, constraint, kind="graded"):
    """One constraint's credit in [0, 1]: 1 exactly when met; else 0 (binary) or `PARTIAL` (graded)."""
    if meets(response, constraint):
        return 1.0
    return float(PARTIAL[constraint["type"]](response.strip(), constraint)) if kind == "graded" else 0.0


def constraint_score(response, constraints, kind="binary"):
    """The mean credit over `constraints` (binary: the fraction met); 0 for an empty response."""
    if not response.strip():
        return 0.0
    return sum(credit(response, c, kind) for c in constraints) / len(constraints)


class RuleOracle(Oracle):
    """P_ij = sigmoid((score_i - score_j) / temperature) from constraint scores; needs no model.

    Each row needs "responses" (K strings) and "constraints" (see the top of this file). `credit`:
    "graded" (partial credit for near misses) or "binary" (the fraction of constraints met).
    """
    needs_model = False

    def __init__(self, model=None, batch_size=32, device=None, temperature=DEFAULT_TEMPERATURE, credit=CREDITS[0]):
        super().__init__(model, batch_size, device)
        if not temperature > 0:
            raise UserError(f"the rule oracle's temperature must be > 0, got {temperature!r}")
        if credit not in CREDITS:
            raise UserError(f"--rule_credit must be one of {', '.join(CREDITS)}, not {credit!r}")
        self.temperature, self.credit = temperature, credit

    def pref(self, rows):
        out = []
        for row in rows:
            problem = constraint_problem(row.get("constraints"))
            if problem:
                raise UserError(f"row id {row.get('id')!r}: field 'constraints': {problem}")
            s = [constraint_score(y, row["constraints"], self.credit) for y in row["responses"]]
            out.append(pref_matrix(len(s), lambda i, j: 1 / (1 + math.exp((s[j] - s[i]) / self.temperature))))
        return out


ORACLES = {"reward": RewardOracle, "pairrm": PairRMOracle, "judge": JudgeOracle, "rule": RuleOracle}


def load_backend(kind, oracle_model=None, batch_size=32):
    """(backend, model name) for --oracle KIND: the one place that turns flags into a judge."""
    if kind not in ORACLES:
        raise UserError(f"--oracle must be one of {', '.join(ORACLES)}, not {kind!r}")
    if batch_size < 1:
        raise UserError("--batch_size must be at least 1")
    backend_class = ORACLES[kind]
    model = oracle_model or backend_class.default_model
    if model is None and backend_class.needs_model:
        raise UserError(f"--oracle {kind} needs --oracle_model (a hub id or a local folder)")
    return backend_class, model


# ---------------------------------------------------------------------------------- similarity

class Embedder:
    """Sentence embeddings: mean of the encoder's last states over real tokens, L2-normalised."""
    MAX_TOKENS = 256  # sentence-transformers' limit for all-MiniLM-L6-v2; longer texts are cut

    def __init__(self, name=PACKAGED_EMBEDDER, batch_size=64, device=None):
        from transformers import AutoModel

        self.name, self.batch_size, self.device = name, batch_size, _device(device)
        self.tokenizer = load_tokenizer(name)
        with loading("embedder", name):
            self.model = AutoModel.from_pretrained(resolve_model(name)).to(self.device).eval()

    @torch.no_grad()
    def _embed(self, batch):
        ids, mask = pad_rows(batch, self.tokenizer.pad_token_id, self.device)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        mean = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        return list(torch.nn.functional.normalize(mean, dim=-1).cpu().numpy().astype(np.float64))

    def embed(self, texts):
        """(n, d) float64 array of unit vectors."""
        items = [self.tokenizer(t, truncation=True, max_length=self.MAX_TOKENS)["input_ids"] for t in texts]
        return np.stack(in_batches(items, self.batch_size, self._embed))

    def sim(self, response_lists):
        """One K x K cosine matrix per list, all texts embedded in shared batches."""
        vectors = self.embed([y for ys in response_lists for y in ys])
        out, at = [], 0
        for ys in response_lists:
            E = vectors[at:at + len(ys)]
            at += len(ys)
            S = np.clip(E @ E.T, -1.0, 1.0)
            S = (S + S.T) / 2  # exactly symmetric, and exactly 1 on the diagonal, whatever the rounding
            np.fill_diagonal(S, 1.0)
            out.append(S)
        return out


def sim_matrices(response_lists, embedder=PACKAGED_EMBEDDER, batch_size=64):
    """K x K similarity matrices (numpy float64), one per list of responses; embedder a name or an Embedder."""
    if not isinstance(embedder, Embedder):
        embedder = Embedder(embedder, batch_size)
    return embedder.sim(response_lists)


# ------------------------------------------------------------------------------------------ CLI

def main(data="responses.jsonl", out="scored.jsonl", oracle="pairrm", oracle_model=None, embedder=PACKAGED_EMBEDDER,
         batch_size=32, rule_credit=None):
    """Add pairwise win probabilities "pref" and similarities "sim" (K x K each) to each line.

    python oracle.py --data responses.jsonl --out scored.jsonl                    # PairRM (llm-blender/PairRM-hf)
    python oracle.py --data responses.jsonl --out scored.jsonl --oracle reward --oracle_model RM_PATH_OR_ID
    python oracle.py --data responses.jsonl --out scored.jsonl --oracle judge     # a chat LM as judge; offline

    Input: generate.py's output, or any JSONL with "id", "prompt" and "responses" (K >= 2 strings,
    K may vary by line). Output (docs/method.md §5): the input's fields + "pref" P (P_ij = P(y_i beats y_j),
    P_ij + P_ji = 1, P_ii = 1/2), "sim" S (cosine, S_ii = 1), "oracle" {kind, model, embedder}.
    A re-run appends only the ids missing from --out, so a killed run resumes where it stopped.

    Args:
        data: JSONL with "id", "prompt", "responses" (K >= 2) per line, e.g. generate.py's output
        out: output JSONL; existing ids are kept and skipped, so a re-run resumes
        oracle: backend: "pairrm", "reward", "judge" or "rule" (see ORACLES)
        oracle_model: hub id or folder; None: pairrm llm-blender/PairRM-hf, judge the packaged SmolLM2, reward: required
        embedder: sentence encoder for "sim"; default the packaged all-MiniLM-L6-v2 (needs no hub)
        batch_size: texts (reward, embedder) or ordered pairs (pairrm, judge) per forward pass (on a CPU 8 did best: bench/RESULTS.md)
        rule_credit: the rule backend's credit per constraint, "graded" or "binary"; None: graded
    """
    from tqdm import tqdm

    backend_class, model = load_backend(oracle, oracle_model, batch_size)
    options = {}
    if rule_credit is not None:
        if oracle != "rule":
            raise UserError(f"--rule_credit is an option of --oracle rule, not of --oracle {oracle}")
        if rule_credit not in CREDITS:
            raise UserError(f"--rule_credit must be one of {', '.join(CREDITS)}, not {rule_credit!r}")
        options["credit"] = rule_credit
    rows = [row for _, row in read_rows(data, min_responses=2)]  # K >= 2: a pair to compare
    stamp = {"kind": oracle, "model": model, "embedder": embedder}
    if oracle == "rule":
        stamp["credit"] = options.get("credit", CREDITS[0])
    with JsonlAppender(out) as writer:
        check_same_run(out, "oracle", stamp)
        todo = [row for row in rows if row["id"] not in writer.done]
        if todo:  # a finished stage re-runs in a second: no model to load
            backend = backend_class(model, batch_size=batch_size, **options)
            sims = Embedder(embedder, batch_size=batch_size)
        bar, t0, n_pairs = tqdm(total=len(todo), unit="prompt"), time.time(), 0
        for chunk in _chunks(todo, CHUNK_BATCHES * batch_size):
            for row, P, S in zip(chunk, backend.pref(chunk), sims.sim([row["responses"] for row in chunk])):
                writer.write({**row, "pref": P.tolist(), "sim": S.tolist(), "oracle": stamp})
                n_pairs += len(P) * (len(P) - 1)
            bar.update(len(chunk))
        bar.close()
    dt = time.time() - t0
    if getattr(backend if todo else None, "cut", 0):
        print(f"oracle: {backend.cut} judge questions were longer than the judge's context of {backend.context} "
              "tokens and were cut (the request's beginning, the responses' ends; marked '...')")
    print(f"oracle: {len(todo)} prompts scored ({len(rows) - len(todo)} already in {out}), {n_pairs} ordered pairs "
          f"in {dt:.1f}s ({n_pairs / max(dt, 1e-9):.1f} pairs/s) by {oracle} '{model}' -> {out}")


def _chunks(rows, pairs_per_chunk):
    """Consecutive runs of rows holding about `pairs_per_chunk` ordered pairs: written as each is done."""
    chunk, pairs = [], 0
    for row in rows:
        chunk.append(row)
        pairs += len(row["responses"]) * (len(row["responses"]) - 1)
        if pairs >= pairs_per_chunk:
            yield chunk
            chunk, pairs = [], 0
    if chunk:
        yield chunk


if __name__ == "__main__":
    cli(main)
