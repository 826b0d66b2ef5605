"""S-SPPO: semantic-calibrated self-play preference optimisation, one iteration of training.

Reads a scored JSONL file (oracle.py's output: K responses per prompt, the K x K win-probability
matrix `pref` and similarity matrix `sim`) or a pairs file, picks one chosen / rejected pair per
prompt by (calibrated) win rate, and trains the policy so that its log-ratio against the model it
started from regresses onto eta * (win rate - 1/2) (docs/method.md §1, §3, §4).

    python sspo.py --data scored.jsonl                          # 1 CPU or 1 GPU, packaged SmolLM2
    python sspo.py --data scored.jsonl --model meta-llama/Meta-Llama-3-8B-Instruct --output_dir runs/it1
    accelerate launch sspo.py --data scored.jsonl ...          # N GPUs: whatever `accelerate config` says
    accelerate launch --config_file configs/X.yaml sspo.py ... # DeepSpeed / FSDP configs
    torchrun --nproc_per_node 2 sspo.py --data scored.jsonl ...# 2 CPU processes (gloo)
    python sspo.py ... --resume                                  # continue a killed run in --output_dir

The global batch is batch_size x grad_accum x processes pairs; the SPPO paper used 64. The defaults are
SPPO's published settings for 7-8B models (RMSprop, lr 5e-7, eta = 1/beta = 1000, 10% warm-up, 1 epoch).
`python sspo.py --help` lists every flag with its default.
"""
import torch
import torch.nn.functional as F


# ============================================================================ the loss block
# Pure functions of tensors: paste them next to `import torch` / `import torch.nn.functional as F`.

def semantic_gate(sim, tau_low, tau_high):
    """g_ij = clamp((S_ij - tau_low) / (tau_high - tau_low), 0, 1)   (docs/method.md §3.1).

    sim: (..., K, K) cosine similarities -> (..., K, K) gate in [0, 1]; 0 keeps the oracle, 1 gives 1/2.
    """
    return ((sim - tau_low) / (tau_high - tau_low)).clamp(0.0, 1.0)


def calibrate(pref, sim, tau_low, tau_high):
    """Supervision calibration: Pc_ij = (1 - g_ij) * P_ij + g_ij * 1/2   (docs/method.md §3.1).

    pref: (..., K, K) P(y_i > y_j) with P_ij + P_ji = 1, P_ii = 1/2; sim: (..., K, K) symmetric, S_ii = 1.
    Returns (..., K, K). g is symmetric, so Pc_ij + Pc_ji = 1 still holds (the game stays constant-sum).
    """
    g = semantic_gate(sim, tau_low, tau_high)
    return (1.0 - g) * pref + g * 0.5


def win_rates(pref):
    """P_hat_i = (1/K) sum_j P_ij, the diagonal 1/2 included   (docs/method.md §1).  (..., K, K) -> (..., K)."""
    return pref.mean(dim=-1)


TIE = 1e-9  # win rates closer than this are equal: a prompt whose answers all tie has no pair to learn from


def choose_pair(pref, sim, *, loss_type, tau_low, tau_high):
    """One prompt's training pair (docs/method.md §1, §3.1, §4): (chosen index, rejected index, chosen win
    rate, rejected win rate, mean off-diagonal gate), the argmax / argmin of the win rates calibrated by
    `sim` for 'sspo' and raw for every other loss (whose gate is 0); None when all win rates tie.

    pref, sim: (K, K) float tensors (sim is not read unless loss_type is 'sspo').
    """
    k = pref.shape[-1]
    if loss_type == "sspo":
        gate = semantic_gate(sim, tau_low, tau_high)
        rates = win_rates(calibrate(pref, sim, tau_low, tau_high))
        gate_mean = float((gate.sum() - gate.diagonal().sum()) / (k * (k - 1)))
    else:
        rates, gate_mean = win_rates(pref), 0.0
    w, l = int(rates.argmax()), int(rates.argmin())
    if rates[w] - rates[l] < TIE:
        return None
    return w, l, float(rates[w]), float(rates[l]), gate_mean


def calibrate_pair(chosen_winrate, rejected_winrate, similarity, tau_low, tau_high):
    """§3.1 for a pair given by its two win rates (a pairs file has no K x K matrices): both shrink toward
    1/2 by the gate g of the pair's similarity. Floats in, (chosen win rate, rejected win rate, g) out."""
    g = float(semantic_gate(torch.tensor(float(similarity)), tau_low, tau_high))
    return 0.5 + (1 - g) * (chosen_winrate - 0.5), 0.5 + (1 - g) * (rejected_winrate - 0.5), g


def latent_distance(h_chosen, h_rejected):
    """|| h_w/|h_w| - h_l/|h_l| ||_2, the distance repulsion acts on   (docs/method.md §3.2).

    h_chosen, h_rejected: (B, D) mean-pooled last hidden states of the responses -> (B,), in [0, 2].
    """
    return (F.normalize(h_chosen, dim=-1) - F.normalize(h_rejected, dim=-1)).norm(dim=-1)


def repulsion_loss(h_chosen, h_rejected, margin):
    """Representation calibration: L_rep = relu(margin - latent_distance(h_w, h_l))   (docs/method.md §3.2).

    h_chosen, h_rejected: (B, D) mean-pooled last hidden states of the responses -> (B,).
    """
    return F.relu(margin - latent_distance(h_chosen, h_rejected))


def preference_terms(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *,
                     loss_type, beta, chosen_winrate=None, rejected_winrate=None):
    """Per-pair loss of every loss type of docs/method.md §4, with what it is made of, by name. All (B,).

    *_logps are log-probs of the response tokens SUMMED over the response; ref = pi_t, the model the
    iteration started from. eta = 1/beta. chosen_winrate / rejected_winrate (B,) are P_hat of chosen and
    rejected: calibrated ones for 'sspo', raw ones for 'sppo'; the other losses do not use them.
    Returns {"loss", "logratio_chosen": a(y_w), "logratio_rejected": a(y_l), "target_chosen",
    "target_rejected"}: the targets are eta (P_hat - 1/2), what the SPPO losses regress a(y) onto
    (sppo_hard: +-eta/2); dpo and ipo do not use them (given win rates, they are what SPPO would aim
    at, else None). The repulsion term of 'sspo' is objective()'s to add.
    """
    a_w = policy_chosen_logps - ref_chosen_logps  # a(y) = log pi_theta(y|x) - log pi_t(y|x)   (§1)
    a_l = policy_rejected_logps - ref_rejected_logps
    eta = 1.0 / beta
    given = chosen_winrate is not None and rejected_winrate is not None
    t_w, t_l = (eta * (chosen_winrate - 0.5), eta * (rejected_winrate - 0.5)) if given else (None, None)
    if loss_type in ("sspo", "sppo"):  # (a_w - eta(P_hat_w - 1/2))^2 + (a_l - eta(P_hat_l - 1/2))^2
        if not given:
            raise ValueError(f"loss_type={loss_type!r} needs chosen_winrate and rejected_winrate")
        loss = (a_w - t_w) ** 2 + (a_l - t_l) ** 2
    elif loss_type == "sppo_hard":  # the same with P_hat_w = 1, P_hat_l = 0
        loss = (a_w - eta / 2) ** 2 + (a_l + eta / 2) ** 2
        t_w, t_l = torch.full_like(a_w, eta / 2), torch.full_like(a_l, -eta / 2)
    elif loss_type == "dpo":  # -log sigmoid(beta (a_w - a_l))
        loss = -F.logsigmoid(beta * (a_w - a_l))
    elif loss_type == "ipo":  # (a_w - a_l - 1/(2 beta))^2
        loss = (a_w - a_l - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}: use one of sspo, sppo, sppo_hard, dpo, ipo")
    return dict(loss=loss, logratio_chosen=a_w, logratio_rejected=a_l, target_chosen=t_w, target_rejected=t_l)


def preference_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *,
                    loss_type, beta, chosen_winrate=None, rejected_winrate=None):
    """preference_terms(...)["loss"]: the per-pair loss (B,) alone."""
    return preference_terms(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                            loss_type=loss_type, beta=beta, chosen_winrate=chosen_winrate,
                            rejected_winrate=rejected_winrate)["loss"]


def rep_weight_used(loss_type, beta, rep_weight=None):
    """lambda as the objective uses it (docs/method.md §3.3): 0 for every loss but 'sspo'; for 'sspo' the
    given weight, or when None 5/beta, which makes repulsion's gradient about a tenth of the regression's
    at the first step (the regression's grows with eta = 1/beta, repulsion's does not: bench/rep_scale.py)."""
    if loss_type != "sspo":
        return 0.0
    return 5.0 / beta if rep_weight is None else rep_weight


def objective(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, h_chosen, h_rejected,
              *, loss_type, beta, chosen_winrate=None, rejected_winrate=None, rep_weight=None, rep_margin=0.3):
    """The whole per-pair objective (docs/method.md §3.3, §4), what the trainer minimises (its mean over pairs):
    preference_terms' loss + rep_weight_used(loss_type, beta, rep_weight) x repulsion_loss. All (B,).

    h_chosen, h_rejected: (B, D) mean-pooled last hidden states (latent_distance). Returns preference_terms'
    dict with "loss" the total, and "loss_pref", "loss_rep" (unweighted) and "latent_dist" beside it.
    """
    terms = preference_terms(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                             loss_type=loss_type, beta=beta, chosen_winrate=chosen_winrate,
                             rejected_winrate=rejected_winrate)
    rep = repulsion_loss(h_chosen, h_rejected, rep_margin)
    total = terms["loss"] + rep_weight_used(loss_type, beta, rep_weight) * rep
    return {**terms, "loss": total, "loss_pref": terms["loss"], "loss_rep": rep,
            "latent_dist": latent_distance(h_chosen, h_rejected)}

# ======================================================================= end of the loss block


import contextlib  # noqa: E402  (the loss block above stays torch-only, so it can be copied alone)
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402

import common  # noqa: E402
import tuning  # noqa: E402
from common import UserError, field_error  # noqa: E402

LOSS_TYPES = ("sspo", "sppo", "sppo_hard", "dpo", "ipo")
CHECKPOINT = "checkpoint"  # inside --output_dir; written atomically through CHECKPOINT + ".tmp"
DONE_FILE = "summary.json"  # written last: its presence means the model in --output_dir is complete
PAIRS_FILE = "pairs.jsonl"  # one line a pair trained on, in --data's order; a row whose answers all tie has none
PAIR_FIELDS = ("line", "id", "chosen_index", "rejected_index", "chosen_winrate", "rejected_winrate", "similarity", "gate")


# =================================== the data: a scored or pairs file -> pairs -> token ids -> padded batches

def _matrix(path, n, row, name, k):
    """row[name] as a float64 K x K tensor (common.matrix_field checks it)."""
    return torch.from_numpy(common.matrix_field(path, n, row, name, k))


def _check_pref(path, n, p):
    if (p < 0).any() or (p > 1).any():
        raise field_error(path, n, "pref", "probabilities must lie in [0, 1]")
    if ((p.diagonal() - 0.5).abs() > 1e-3).any():
        raise field_error(path, n, "pref", "diagonal must be 1/2 (a response ties with itself)")
    if ((p + p.T - 1).abs() > 1e-3).any():
        raise field_error(path, n, "pref", "must be constant-sum: pref[i][j] + pref[j][i] = 1")


def _check_sim(path, n, s):
    if (s.abs() > 1 + 1e-4).any() or ((s - s.T).abs() > 1e-4).any():
        raise field_error(path, n, "sim", "must be a symmetric matrix of cosine similarities in [-1, 1]")


def _text(path, n, row, name):
    value = row.get(name)
    if not isinstance(value, str):
        raise field_error(path, n, name, f"must be a string, got {type(value).__name__}")
    return value


def _winrate(path, n, row, name):
    value = row.get(name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise field_error(path, n, name, "must be a number in [0, 1]")
    return float(value)


def load_pairs(path, loss, tau_low, tau_high):
    """Read a scored or pairs JSONL file (docs/method.md §5) into one chosen / rejected pair per prompt.

    Scored rows: the loss block's choose_pair. Pairs rows: the given win rates, for 'sspo' shrunk by the
    row's optional `similarity` (calibrate_pair). Returns (pairs, stats): pairs are dicts with prompt,
    chosen, rejected, chosen_winrate, rejected_winrate, gate (the row's mean gate) and where the pair came
    from (PAIR_FIELDS: what pairs.jsonl records); stats counts rows, pairs and prompts skipped because all
    win rates tie.
    """
    pairs, skipped, rows = [], 0, 0
    for n, row in common.read_jsonl(path):
        rows += 1
        prompt = _text(path, n, row, "prompt")
        if "responses" in row:
            responses = row["responses"]
            if not (isinstance(responses, list) and len(responses) >= 2 and all(isinstance(r, str) for r in responses)):
                raise field_error(path, n, "responses", "must be a list of at least 2 strings")
            k = len(responses)
            pref = _matrix(path, n, row, "pref", k)
            _check_pref(path, n, pref)
            sim = _matrix(path, n, row, "sim", k) if loss == "sspo" or "sim" in row else None
            if sim is not None:
                _check_sim(path, n, sim)
            pair = choose_pair(pref, sim, loss_type=loss, tau_low=tau_low, tau_high=tau_high)
            if pair is None:  # every response ties: no direction to learn
                skipped += 1
                continue
            w, l, rate_w, rate_l, gate_mean = pair
            pairs.append(dict(prompt=prompt, chosen=responses[w], rejected=responses[l], chosen_winrate=rate_w,
                              rejected_winrate=rate_l, gate=gate_mean, line=n, id=row.get("id"), chosen_index=w,
                              rejected_index=l, similarity=None if sim is None else float(sim[w, l])))
        elif "chosen" in row:
            pair = dict(prompt=prompt, chosen=_text(path, n, row, "chosen"), rejected=_text(path, n, row, "rejected"),
                        chosen_winrate=_winrate(path, n, row, "chosen_winrate"),
                        rejected_winrate=_winrate(path, n, row, "rejected_winrate"), gate=0.0, line=n, id=row.get("id"),
                        chosen_index=None, rejected_index=None, similarity=row.get("similarity"))
            s = row.get("similarity")
            if s is not None and (isinstance(s, bool) or not isinstance(s, (int, float)) or not -1 <= s <= 1):
                raise field_error(path, n, "similarity", "must be a cosine similarity in [-1, 1]")
            if loss == "sspo" and s is not None:
                pair["chosen_winrate"], pair["rejected_winrate"], pair["gate"] = calibrate_pair(
                    pair["chosen_winrate"], pair["rejected_winrate"], s, tau_low, tau_high)
            pairs.append(pair)
        else:
            raise UserError(f"{path}:{n}: neither a scored row (fields 'responses', 'pref', 'sim') "
                            "nor a pairs row (fields 'chosen', 'rejected', 'chosen_winrate', 'rejected_winrate')")
    if not pairs:
        raise UserError(f"{path}: no usable pair ({rows} rows, {skipped} with all win rates equal)")
    return pairs, dict(rows=rows, pairs=len(pairs), skipped_ties=skipped)


def tokenize_pairs(pairs, tokenizer, max_length):
    """Token ids of each pair: the chat-formatted prompt, and each response followed by the end-of-turn token.

    Over max_length, the prompt keeps its last tokens (at most half of max_length when the longer
    response needs the room) and the responses lose their ends, as a reader of the text would cut.
    Returns (examples, number truncated). Prompt and responses are tokenised apart, exactly as
    generate.py samples the response after the prompt's ids.
    """
    eot = common.end_of_turn_id(tokenizer)
    examples, truncated = [], 0
    for p in pairs:
        prompt = common.prompt_ids(tokenizer, p["prompt"])
        chosen, rejected = ([*tokenizer(p[s], add_special_tokens=False)["input_ids"], eot] for s in ("chosen", "rejected"))
        longest = max(len(chosen), len(rejected))
        if len(prompt) + longest > max_length:
            truncated += 1
            keep = max(max_length - longest, max_length // 2)
            prompt = prompt[-keep:] if len(prompt) > keep else prompt
            chosen, rejected = chosen[:max_length - len(prompt)], rejected[:max_length - len(prompt)]
        examples.append(dict(p, prompt_ids=prompt, chosen_ids=chosen, rejected_ids=rejected))
    return examples, truncated


def collate(examples, pad_id, share_prompt=False):
    """A batch of B pairs as 2B scored sequences: the B chosen (0..B-1), then the B rejected (B..2B-1).

    Plain layout: 2B right-padded rows prompt+response and a 2-D attention mask.
    Shared-prompt layout (share_prompt): B rows prompt+chosen+rejected, so each prompt is computed
    once. `branch` marks each token (0 prompt, 1 chosen, 2 rejected, -1 padding); SequenceScorer
    turns it into a 4-D mask on the device (tree_mask), and position ids restart the rejected
    response right after the prompt: each response is scored as in a row of its own (tests check
    log-probs, pooled states and gradients).
    Besides input_ids, attention_mask or branch (and position_ids): for every response token its row
    (resp_row), its position (resp_pos), the position whose hidden state predicts it (resp_pred),
    its sequence (resp_seq); and each sequence's response length (resp_len).
    """
    b = len(examples)
    rows = ([e["prompt_ids"] + e["chosen_ids"] + e["rejected_ids"] for e in examples] if share_prompt else
            [e["prompt_ids"] + e[side] for side in ("chosen_ids", "rejected_ids") for e in examples])
    width = max(map(len, rows))
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, :len(r)] = torch.tensor(r)
    resp = {k: [] for k in ("resp_row", "resp_pos", "resp_pred", "resp_seq")}

    def add(row, start, pred_start, n, seq):  # response tokens at start..start+n-1 of `row`
        resp["resp_row"] += [row] * n
        resp["resp_pos"] += range(start, start + n)
        resp["resp_pred"] += [pred_start] + list(range(start, start + n - 1))
        resp["resp_seq"] += [seq] * n

    lengths = [len(e[side]) for side in ("chosen_ids", "rejected_ids") for e in examples]
    if not share_prompt:
        for i, e in enumerate(examples * 2):
            p = len(e["prompt_ids"])
            add(i, p, p - 1, lengths[i], i)
        attention_mask = (torch.arange(width)[None] < torch.tensor([len(r) for r in rows])[:, None]).long()
        batch = dict(input_ids=input_ids, attention_mask=attention_mask)
    else:
        branch = torch.full((b, width), -1, dtype=torch.long)  # 0 prompt, 1 chosen, 2 rejected, -1 padding
        position_ids = torch.zeros((b, width), dtype=torch.long)
        for i, e in enumerate(examples):
            p, c, r = len(e["prompt_ids"]), len(e["chosen_ids"]), len(e["rejected_ids"])
            branch[i, :p + c + r] = torch.tensor([0] * p + [1] * c + [2] * r)
            position_ids[i, :p + c + r] = torch.cat([torch.arange(p + c), torch.arange(p, p + r)])
            add(i, p, p - 1, c, i)
            add(i, p + c, p - 1, r, b + i)  # the rejected response is predicted from the prompt's end too
        batch = dict(input_ids=input_ids, branch=branch, position_ids=position_ids)
    batch.update({k: torch.tensor(v, dtype=torch.long) for k, v in resp.items()})
    batch["resp_len"] = torch.tensor(lengths, dtype=torch.long)
    return batch


def tree_mask(branch):
    """(R, 1, T, T) attention mask of shared-prompt rows, True where a query may see a key: causal, every
    token sees the prompt, a response sees only its own tokens, padding sees nothing but itself (no NaN)."""
    real = branch >= 0
    sees = (branch[:, None, :] == 0) | (branch[:, None, :] == branch[:, :, None])  # [row, query, key]
    causal = torch.ones(branch.shape[1], branch.shape[1], dtype=torch.bool, device=branch.device).tril()
    mask = sees & real[:, None, :] & real[:, :, None] & causal
    return (mask | (torch.eye(branch.shape[1], dtype=torch.bool, device=branch.device) & ~real[:, :, None]))[:, None]


# ===================================== the scorer: summed log-probs and pooled hidden states of the responses

class TokenLogProbs(torch.autograd.Function):
    """log_softmax(logits)[row, target] of each row, in fp32 (softcap: of softcap * tanh(logits / softcap), as
    Gemma-2's own forward caps its logits). The same numbers as logits.log_softmax(-1).gather(...) for a
    fraction of the memory traffic: one [rows x vocab] buffer, exp(logits - max), is made in the forward and
    kept, and the backward, g * (onehot(target) - softmax), is written into it in place (autograd would
    allocate several such tensors: a softmax, a scattered one-hot, their sum): faster and leaner steps
    (bench/RESULTS.md, "What each training lever gave"). The backward runs once (no retain_graph), which
    SequenceScorer never needs."""

    @staticmethod
    def forward(ctx, logits, targets, softcap):
        z, cap = logits.float(), None
        if softcap:
            t = torch.tanh(z / softcap)
            z, cap = softcap * t, t.mul_(t).neg_().add_(1)  # d(softcap * tanh(x / softcap)) / dx = 1 - tanh^2
        top = z.amax(-1, keepdim=True)
        picked = z.gather(-1, targets[:, None]) - top
        e = (z - top).exp_()
        total = e.sum(-1, keepdim=True)
        ctx.save_for_backward(e, total, targets, cap)
        ctx.dtype, ctx.used = logits.dtype, False
        return (picked - total.log()).squeeze(-1)  # z[target] - logsumexp(z)

    @staticmethod
    def backward(ctx, grad):
        if ctx.used:
            raise RuntimeError("TokenLogProbs' backward overwrites its saved buffer: it cannot run twice")
        ctx.used = True
        e, total, targets, cap = ctx.saved_tensors
        g = e.mul_(-grad[:, None] / total)  # -g * softmax, in place
        g.scatter_add_(-1, targets[:, None], grad[:, None])
        if cap is not None:
            g.mul_(cap)
        return g.to(ctx.dtype), None, None


def _chunk_logps(lm_head, hidden, targets, softcap):
    return TokenLogProbs.apply(lm_head(hidden), targets, softcap)


class SequenceScorer(torch.nn.Module):
    """One forward pass of a causal LM that returns, per sequence, what the loss needs.

    forward(**collate(...)) -> (logps (N,), pooled (N, D)) for the batch's N = 2B sequences:
    logps: log-probs of the response tokens summed over the response; pooled: the last hidden
    state (after the final norm) averaged over the response tokens (docs/method.md §3.2). The LM head
    runs on response positions only, `logits_chunk` rows at a time, so no full-vocabulary logits tensor for
    the batch ever exists: with several chunks each is recomputed in the backward pass; a batch that
    fits in one keeps its logits for the backward, which starts right after them (the same peak
    memory as recomputing, without the second projection). logits_chunk None: as many rows as make
    CHUNK_LOGITS logits, and at least 1024 (a small vocabulary gets longer chunks, so fewer batches
    recompute). Wrapping the model in this module lets accelerate (DDP, FSDP, DeepSpeed) see one forward.
    """
    CHUNK_LOGITS = 2 ** 26  # 256 MiB of fp32 logits: 1024 rows of a 64k vocabulary

    def __init__(self, model, logits_chunk=None):
        super().__init__()
        vocab = getattr(model.config.get_text_config(), "vocab_size", None) or 1
        self.model, self.logits_chunk = model, logits_chunk or max(1024, self.CHUNK_LOGITS // vocab)
        self.softcap = getattr(model.config, "final_logit_softcapping", None)

    # What engines look for on the module they wrap: FSDP re-ties embeddings after meta-device loading,
    # and auto-wrap policies find the embeddings and the head.
    def tie_weights(self):
        return self.model.tie_weights()

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def get_output_embeddings(self):
        return self.model.get_output_embeddings()

    def forward(self, input_ids, resp_row, resp_pos, resp_pred, resp_seq, resp_len,
                attention_mask=None, branch=None, position_ids=None, naive=False):
        if branch is not None:  # shared-prompt rows: the 4-D mask is built here, on the device
            attention_mask = tree_mask(branch)
            if self.model.config._attn_implementation == "eager":  # eager attention adds its mask to the scores
                attention_mask = torch.zeros(attention_mask.shape, device=branch.device).masked_fill(
                    ~attention_mask, torch.finfo(torch.float32).min)
        inputs = dict(input_ids=input_ids, attention_mask=attention_mask)
        if position_ids is not None:
            inputs["position_ids"] = position_ids
        targets = input_ids[resp_row, resp_pos]
        n = len(resp_len)
        if naive:  # the model's own full-vocabulary logits: the yardstick of the fast path (check_scorer, tests)
            logits = self.model(**inputs).logits.float()[resp_row, resp_pred]
            token_logps = logits.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
            return torch.zeros(n, device=logits.device).index_add(0, resp_seq, token_logps), None
        hidden = self.model.get_decoder()(**inputs).last_hidden_state
        h = hidden[resp_row, resp_pred]
        head = self.model.get_output_embeddings()
        parts = []
        for s in range(0, len(h), self.logits_chunk):
            args = (head, h[s:s + self.logits_chunk], targets[s:s + self.logits_chunk], self.softcap)
            if torch.is_grad_enabled() and len(h) > self.logits_chunk:  # one chunk: its logits are freed as early
                parts.append(torch.utils.checkpoint.checkpoint(_chunk_logps, *args, use_reentrant=False))
            else:
                parts.append(_chunk_logps(*args))
        token_logps = torch.cat(parts) if parts else h.new_zeros(0, dtype=torch.float32)
        logps = torch.zeros(n, dtype=torch.float32, device=h.device).index_add(0, resp_seq, token_logps)
        own = hidden[resp_row, resp_pos].float()  # pooled over the response's own tokens
        pooled = torch.zeros(n, own.shape[-1], device=h.device).index_add(0, resp_seq, own)
        return logps, pooled / resp_len.clamp(min=1)[:, None]


def check_scorer(scorer, examples, pad_id, device, model_type, share_prompt=False, strict=False, low_precision=False):
    """Fail loudly if the fast scorer disagrees with the model's own logits on separate rows (an exotic
    head); with share_prompt, try the shared-prompt layout against them too. Returns whether that
    layout may be used; when it disagrees: an error if strict (the user asked for it), else False.
    """
    def run(share_prompt, naive=False):
        return scorer(**{k: v.to(device) for k, v in collate(examples, pad_id, share_prompt).items()}, naive=naive)

    rtol, atol = (3e-2, 0.5) if low_precision else (1e-3, 1e-2)
    with torch.no_grad():
        full, _ = run(False, naive=True)
        fast, pooled = run(False)
        if not torch.allclose(fast, full, rtol=rtol, atol=atol):
            raise UserError(f"model type {model_type!r}: the response-only LM head gives {fast.tolist()} but the "
                            f"model's own forward gives {full.tolist()}; sspo.py does not reproduce how this "
                            "architecture transforms its logits")
        if not share_prompt:
            return False
        try:  # some models (ALiBi: Bloom, Falcon) build their own mask from a 2-D one and fail on ours
            shared, shared_pooled = run(True)
            if torch.allclose(shared, full, rtol=rtol, atol=atol) and torch.allclose(shared_pooled, pooled, rtol=rtol, atol=atol / 10):
                return True
            why = f"the log-probs are {shared.tolist()}, on separate rows {full.tolist()}"
        except Exception as e:  # noqa: BLE001  (whatever the model raises, the answer is: rows apart)
            why = f"the model's forward fails ({type(e).__name__}: {common.first_line(e)})"
    if strict:
        raise UserError(f"model type {model_type!r}: with the prompt shared by chosen and rejected (a 4-D attention "
                        f"mask) {why}; this model's attention does not take the mask as given: run with --share_prompt False")
    print(f"model type {model_type!r} does not reproduce separate rows with a shared prompt ({why}): chosen and rejected run apart")
    return False


def disable_dropout(model):
    """Dropout off (as TRL does for DPO): pi_theta and pi_t must be the same function at step 0."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "attention_dropout", None), float):
            m.attention_dropout = 0.0


def enable_checkpointing(model):
    """Recompute each decoder layer's activations in the backward pass (non-reentrant: works with LoRA)."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x renamed it
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


# ========================================== the step: one micro-batch's loss and gradient, one optimizer step

def pair_tokens(example):
    """Tokens of a pair as if chosen and rejected ran apart (the prompt counted twice): the unit of tokens/s."""
    return 2 * len(example["prompt_ids"]) + len(example["chosen_ids"]) + len(example["rejected_ids"])


def micro_step(accelerator, scorer, examples, idx, ref, pad_id, share_prompt, n_step, *, loss, beta, rep_weight,
               rep_margin, counted=1.0):
    """Forward and backward of the micro-batch examples[idx], whose gradient adds to the step's; returns its
    sums of the logged metrics, by name. n_step: the pairs of the whole optimizer step. counted = 0: a
    process with no pair left joins the backward with one pair that adds nothing."""
    device = accelerator.device
    batch = {k: v.to(device) for k, v in collate([examples[i] for i in idx], pad_id, share_prompt).items()}
    b = len(idx)
    with accelerator.accumulate(scorer):  # syncs gradients (DeepSpeed: steps) on the last micro-step only
        with accelerator.autocast():
            logps, pooled = scorer(**batch)
        terms = objective(logps[:b], logps[b:], ref[idx, 0].to(device), ref[idx, 1].to(device), pooled[:b], pooled[b:],
                          loss_type=loss, beta=beta, rep_weight=rep_weight, rep_margin=rep_margin,
                          chosen_winrate=torch.tensor([examples[i]["chosen_winrate"] for i in idx], device=device),
                          rejected_winrate=torch.tensor([examples[i]["rejected_winrate"] for i in idx], device=device))
        per_pair = terms["loss"]
        # sum / n_step, times the processes because DDP averages over them and times grad_accum because
        # accelerate divides by it: the step's loss is the exact mean over its pairs however they are
        # split across processes and micro-steps.
        accelerator.backward(per_pair.sum() * counted * accelerator.num_processes * accelerator.gradient_accumulation_steps / n_step)
    gate = torch.tensor([examples[i]["gate"] for i in idx], device=device)
    with torch.no_grad():
        return {name: counted * value.sum() for name, value in (
            ("loss", per_pair), ("loss_pref", terms["loss_pref"]), ("loss_rep", terms["loss_rep"]),
            ("logratio_chosen", terms["logratio_chosen"]), ("logratio_rejected", terms["logratio_rejected"]),
            ("target_chosen", terms["target_chosen"]), ("target_rejected", terms["target_rejected"]), ("gate_mean", gate),
            ("latent_dist", terms["latent_dist"]))}


def optimizer_step(accelerator, scorer, opt, examples, ref, indices, pad_id, share_prompt, max_grad_norm, **loss_args):
    """One optimizer step over the pairs `indices`, split across processes and micro-steps; returns
    (metrics: the means over its pairs by name, tokens of its pairs, gradient norm before clipping)."""
    world, accum = accelerator.num_processes, accelerator.gradient_accumulation_steps
    parts = micro_batches(indices, world * accum)
    sums, tokens = {}, 0.0
    for micro in range(accum):
        idx, counted = parts[micro * world + accelerator.process_index], 1.0
        if not idx:  # every process must join each backward; this one adds nothing
            idx, counted = indices[:1], 0.0
        for name, value in micro_step(accelerator, scorer, examples, idx, ref, pad_id, share_prompt, len(indices),
                                      counted=counted, **loss_args).items():
            sums[name] = sums.get(name, 0.0) + value
        tokens += sum(pair_tokens(examples[i]) for i in idx) * counted
    grad_norm = accelerator.clip_grad_norm_(scorer.parameters(), max_grad_norm if max_grad_norm > 0 else float("inf"))
    opt.step()
    opt.zero_grad(set_to_none=True)
    means = accelerator.reduce(torch.stack(list(sums.values())), reduction="sum") / len(indices)
    tokens = accelerator.reduce(torch.as_tensor(tokens, device=accelerator.device, dtype=torch.float32), reduction="sum")
    return dict(zip(sums, means.tolist())), float(tokens), grad_norm


# ======================================================= the loop: what main() sets up and runs, in its order
# Those that take the accelerator run on every process (they may wait_for_everyone or reduce); the rest do the
# main process's part alone where they say so.

def make_accelerator(mixed_precision, output_dir, grad_accum, report_to):
    from accelerate import Accelerator

    return Accelerator(mixed_precision=mixed_precision, cpu=common.cpu_processes(), project_dir=output_dir,
                       gradient_accumulation_steps=grad_accum, log_with=None if report_to == "none" else report_to)


def load_policy(model, accelerator, gradient_checkpointing, attn_implementation, lora):
    """pi_theta as loaded (it is also pi_t: the reference is its log-probs before the first update) and its tokenizer.

    lora: dict(r, alpha, dropout, target_modules); r = 0 trains every weight.
    """
    # Full fine-tuning keeps fp32 weights (bf16 weights would swallow lr-5e-7 updates; autocast gives the
    # bf16 speed); a frozen LoRA base may stay in the half precision it computes in.
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision)
    policy, tokenizer = common.load_causal_lm(model, dtype=half if lora["r"] and half else torch.float32,
                                              attn_implementation=attn_implementation)
    policy.config.use_cache = False
    disable_dropout(policy)
    if gradient_checkpointing:
        enable_checkpointing(policy)
    if lora["r"]:
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            raise UserError("--lora_r needs peft: pip install peft") from None
        targets = lora["target_modules"]
        if isinstance(targets, str) and targets != "all-linear":
            targets = [m.strip() for m in targets.split(",") if m.strip()]
        elif isinstance(targets, (list, tuple)):
            targets = [str(m) for m in targets]
        policy = get_peft_model(policy, LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                                                   target_modules=targets, task_type="CAUSAL_LM"))
    return policy, tokenizer


def make_optimizer(scorer, optimizer, lr, weight_decay):
    params = [p for p in scorer.parameters() if p.requires_grad]
    return (torch.optim.RMSprop if optimizer == "rmsprop" else torch.optim.AdamW)(params, lr=lr, weight_decay=weight_decay)


CHECK_TOKENS = 32  # tokens of each prompt and response that choose_prompt_layout's check runs on


def choose_prompt_layout(accelerator, scorer, config, examples, pad_id, share_prompt, max_length, before):
    """Whether each pair's prompt is computed once (one row prompt+chosen+rejected, a 4-D mask): asked for
    (--share_prompt True: must work), refused (False), kept from the run being resumed (its steps were cut
    by it), or by default wherever the attention takes the mask; confirmed on two short pairs against
    separate rows (check_scorer), which also checks the response-only LM head."""
    if share_prompt and not common.takes_4d_mask(config, max_length):
        raise UserError(f"--share_prompt True: this model's attention ({config._attn_implementation!r}, sliding window "
                        f"{getattr(config, 'sliding_window', None)}) cannot take sspo.py's 4-D mask at --max_length "
                        f"{max_length}; leave the flag out")
    if "share_prompt_used" in before:
        wanted, must = before["share_prompt_used"], True
    elif share_prompt is None:  # on a GPU rows apart are faster (bench/gpu.py: its 4-D mask costs sdpa's fast kernels)
        wanted, must = common.takes_4d_mask(config, max_length) and torch.device(accelerator.device).type != "cuda", False
    else:
        wanted, must = share_prompt, True
    shortest = sorted(examples, key=lambda e: len(e["prompt_ids"]) + len(e["chosen_ids"]) + len(e["rejected_ids"]))[:2]
    # their first CHECK_TOKENS of each part: the check's full-vocabulary logits stay small, and a wrong head, mask
    # or restart of positions already changes those tokens' log-probs
    cut = [{k: e[k][:CHECK_TOKENS] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for e in shortest]
    with accelerator.autocast():
        return check_scorer(scorer, cut, pad_id, accelerator.device, config.model_type, wanted, strict=must,
                            low_precision=accelerator.mixed_precision != "no")


def lr_at(step, total, warmup, peak, schedule):
    """Learning rate of optimizer step `step` (0-based): linear warm-up, then constant / linear / cosine."""
    if step < warmup:
        return peak * (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "constant":
        return peak
    if schedule == "linear":
        return peak * (1.0 - progress)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


def step_batches(lengths, global_batch, seed, epochs, group_by_length=True):
    """Pair indices of every optimizer step: a fresh permutation per epoch from (seed, epoch).

    group_by_length: within windows of 32 steps of the permutation, pairs are sorted by length before
    they are cut into steps, and the steps are shuffled again; each step is ordered longest first, so
    its micro-batches hold pairs of similar length and little padding. A pure function of its
    arguments: a resumed run, and every process, sees the same order. The last step of an epoch may
    be smaller than global_batch.
    """
    n, steps = len(lengths), []
    for epoch in range(epochs):
        g = torch.Generator().manual_seed(seed * 1000003 + epoch)
        order = torch.randperm(n, generator=g).tolist()
        if not group_by_length:
            steps += [order[i:i + global_batch] for i in range(0, n, global_batch)]
            continue
        window = 32 * global_batch
        epoch_steps = []
        for w in range(0, n, window):
            part = sorted(order[w:w + window], key=lambda i: -lengths[i])
            epoch_steps += [part[i:i + global_batch] for i in range(0, len(part), global_batch)]
        steps += [epoch_steps[i] for i in torch.randperm(len(epoch_steps), generator=g).tolist()]
    return steps


def micro_batches(indices, parts):
    """Split one step's indices into `parts` near-equal consecutive chunks (some empty when few)."""
    q, r = divmod(len(indices), parts)
    bounds = [0]
    for i in range(parts):
        bounds.append(bounds[-1] + q + (1 if i < r else 0))
    return [indices[bounds[i]:bounds[i + 1]] for i in range(parts)]


def plan_steps(examples, share_prompt, global_batch, seed, epochs, group_by_length):
    """(steps, lengths): the pair indices of every optimizer step, and each pair's row length in its layout."""
    lengths = [len(e["prompt_ids"]) + (len(e["chosen_ids"]) + len(e["rejected_ids"]) if share_prompt else
                                       max(len(e["chosen_ids"]), len(e["rejected_ids"]))) for e in examples]
    return step_batches(lengths, global_batch, seed, epochs, group_by_length), lengths


def reference_logps(accelerator, scorer, examples, lengths, pad_id, share_prompt, batch_size, ref_path, checkpoint, data,
                    base_only=contextlib.nullcontext):
    """(pairs, 2) log-probs of chosen and rejected under pi_t, the model before its first update: computed
    once and kept in ref_path, so a resumed run (whose weights have moved) reads them back. No second copy
    of the model is kept. base_only: a context that turns a LoRA adapter off."""
    from tqdm.auto import tqdm

    if checkpoint and os.path.exists(ref_path):
        try:
            ref = torch.load(ref_path)
        except Exception as e:  # noqa: BLE001  (torch raises many kinds for a damaged file)
            raise UserError(f"{ref_path}: cannot read ({common.first_line(e)}); "
                            "the reference of this run is lost, start a new run") from None
        if len(ref) != len(examples):
            raise UserError(f"{ref_path} holds {len(ref)} pairs but {data} now gives {len(examples)}: the data changed")
        return ref
    if checkpoint:
        raise UserError(f"{os.path.dirname(ref_path)}: a checkpoint but no ref_logps.pt; the reference of this run is lost, start a new run")
    world, device = accelerator.num_processes, accelerator.device
    ref = torch.zeros(len(examples), 2)
    # longest first, twice the training batch (no activations are kept): little padding, few calls;
    # the same number of rounds on every process, since engines may talk inside each forward
    mine = sorted(range(accelerator.process_index, len(examples), world), key=lambda i: -lengths[i])
    size = 2 * batch_size
    rounds = math.ceil(math.ceil(len(examples) / world) / size)
    with torch.no_grad(), accelerator.autocast(), base_only():
        for r in tqdm(range(rounds), desc="reference log-probs", disable=not accelerator.is_main_process):
            idx = mine[r * size:(r + 1) * size]
            logps, _ = scorer(**{k: v.to(device) for k, v in collate([examples[i] for i in idx or [0]], pad_id, share_prompt).items()})
            if idx:
                ref[idx] = logps.view(2, -1).T.cpu()
    ref = accelerator.reduce(ref.to(device), reduction="sum").cpu()  # each row was filled by one process
    if accelerator.is_main_process:
        with _saving(ref_path + ".tmp"):
            torch.save(ref, ref_path + ".tmp")
            common.fsync_tree(ref_path + ".tmp")
        os.replace(ref_path + ".tmp", ref_path)
        common.fsync_dir(os.path.dirname(os.path.abspath(ref_path)))
    return ref


# ================================== the run folder: who may write it, what is in it, how a killed run resumes

# A run folder's life, in order: the main process takes its writer lock (claim_run_dir), writes run_config.json
# and pairs.jsonl, ref_logps.pt once (the reference's log-probs), appends a line to metrics.jsonl a step, swaps in
# a checkpoint every --save_every steps (the rotation below), saves the final model, fsyncs it, and last writes
# summary.json, whose presence alone means finished (finished); then the checkpoints go, unless kept.
#
# Checkpoint rotation. `checkpoint` is the newest complete checkpoint; `checkpoint.old` the one before,
# trusted only while `checkpoint` is missing or incomplete; `checkpoint.tmp` is never trusted. A folder
# is complete when its step.json (written last) reads back. Every state a kill between two file
# operations can leave (tests/test_robustness.py builds each) resumes from the newest complete one:
#   .tmp alone, or nothing             -> no checkpoint: the run starts over
#   checkpoint (+ .tmp, + .old in any state) -> checkpoint
#   .old complete, no checkpoint (or one without step.json) (+ .tmp)  -> .old
# and the next save removes what is not trusted before it renames, so it never meets a folder in its way,
# and deletes a complete folder only while a newer complete one exists.


def finished(output_dir, resume, keep_checkpoint):
    """True when output_dir holds a finished model and --resume asks for nothing more (it only reads: no
    lock); an error when a finished model is in the way of a new run."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise UserError(f"{output_dir}: --output_dir is a file, not a folder")
    done = os.path.exists(os.path.join(output_dir, DONE_FILE))
    if done and resume:
        if not keep_checkpoint:  # what a kill right after summary.json left
            remove_checkpoints(output_dir)
        print(f"{output_dir}: already complete ({DONE_FILE} exists); nothing to do")
        return True
    if done:
        raise UserError(f"{output_dir} already holds a finished model: choose another --output_dir")
    return False


def claim_run_dir(output_dir, resume):
    """Before the first write: the main process takes the folder's writer lock (common.lock_output: a second
    run on it stops here, naming the first's pid); then an error when an unfinished run is in the way."""
    if int(os.environ.get("RANK", "0")) == 0:  # the main process (RANK: set by every launcher)
        common.lock_output(output_dir, folder=True, what="--output_dir")
    if not resume and (find_checkpoint(output_dir) or os.path.exists(os.path.join(output_dir, "metrics.jsonl"))):
        raise UserError(f"{output_dir} holds an unfinished run: add --resume to continue it, or choose another --output_dir")


def open_run_dir(output_dir, resume, run_config):
    """The run_config of the run being resumed ({} for a new run), once the command is checked to be the same."""
    saved = os.path.join(output_dir, "run_config.json")
    if not (resume and os.path.exists(saved)):
        return {}
    before = common.read_json(saved)
    changed = [k for k in run_config if k != "resume" and k in before and before[k] != run_config[k]]
    if changed:
        raise UserError(f"--resume needs the same command: {', '.join(f'--{k} was {before[k]!r}, now {run_config[k]!r}' for k in changed)}")
    return before


def write_pairs(output_dir, pairs):
    """output_dir/pairs.jsonl: where each pair trained on came from (PAIR_FIELDS of load_pairs' dicts)."""
    common.atomic_write_text(os.path.join(output_dir, PAIRS_FILE),
                             "".join(json.dumps({k: p[k] for k in PAIR_FIELDS}) + "\n" for p in pairs))


def checkpoint_step(path):
    """The step of a complete checkpoint folder, else None."""
    try:
        with open(os.path.join(path, "step.json")) as f:
            step = json.load(f)["step"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return step if isinstance(step, int) else None


def find_checkpoint(output_dir):
    """The newest complete checkpoint folder, or None (see the rotation above)."""
    for name in (CHECKPOINT, CHECKPOINT + ".old"):
        path = os.path.join(output_dir, name)
        if checkpoint_step(path) is not None:
            return path
    return None


@contextlib.contextmanager
def _saving(path, remove=False):
    """Turn a save that fails (a full disk: torch and safetensors raise their own errors) into one line,
    `remove` what it wrote (giving the disk back) first."""
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, RuntimeError, SafetensorError) as e:
        if remove:
            shutil.rmtree(path, ignore_errors=True)
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
        why = common.first_line(e)
        raise UserError(f"{path}: cannot write ({why}; {free / 2 ** 30:.1f} GiB free on its disk)") from None


def save_checkpoint(accelerator, output_dir, step):
    """accelerate's state (model, optimizer, RNGs) plus the step, swapped in by renames: never half written,
    and fsynced before its rename, so that a power loss, too, leaves the old checkpoint or the new one whole."""
    final, tmp, old = (os.path.join(output_dir, CHECKPOINT + s) for s in ("", ".tmp", ".old"))
    if accelerator.is_main_process and os.path.exists(tmp):
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    with _saving(tmp, remove=True):  # the last complete checkpoint stays
        accelerator.save_state(tmp)
        if accelerator.is_main_process:
            with open(os.path.join(tmp, "step.json"), "w") as f:
                json.dump({"step": step}, f)
    accelerator.wait_for_everyone()  # every process's part is written: now it can be made durable
    if accelerator.is_main_process:
        with _saving(tmp, remove=True):
            common.fsync_tree(tmp)
        if checkpoint_step(final) is not None:  # .old is redundant now: remove it, then keep final as .old
            if os.path.exists(old):
                shutil.rmtree(old)
            os.replace(final, old)
        elif os.path.exists(final):  # incomplete, never trusted (a complete .old, if any, stays until the swap)
            shutil.rmtree(final)
        os.replace(tmp, final)
        common.fsync_dir(output_dir)  # the rename itself
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def restore_checkpoint(accelerator, checkpoint, metrics_path):
    """The optimizer step to start at: the checkpoint's (model, optimizer and RNG states loaded, and
    metrics.jsonl cut back to its steps), or 0 with no old steps kept."""
    if not checkpoint:
        if accelerator.is_main_process and os.path.exists(metrics_path):
            os.remove(metrics_path)
        return 0
    accelerator.load_state(checkpoint)
    start = checkpoint_step(checkpoint)
    if accelerator.is_main_process and os.path.exists(metrics_path):  # drop a half-written line and the later steps
        common.cut_partial_line(metrics_path)
        kept = [row for _, row in common.read_jsonl(metrics_path) if row.get("step", 0) <= start]
        common.atomic_write_text(metrics_path, "".join(json.dumps(row) + "\n" for row in kept))
    return start


def remove_checkpoints(output_dir):
    """Remove every checkpoint folder; called once summary.json exists, so no order of removal can mislead a resume."""
    for name in (CHECKPOINT, CHECKPOINT + ".old", CHECKPOINT + ".tmp"):
        shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)


def save_final_model(accelerator, scorer, tokenizer, output_dir, model, lora_r, merge):
    """The trained model, gathered from every engine's shards and saved by the main process as safetensors
    (with LoRA: peft's adapter format, and with merge the merged model beside it)."""
    state = accelerator.get_state_dict(scorer)
    if not accelerator.is_main_process:
        return
    final = accelerator.unwrap_model(scorer).model
    final.config.use_cache = True
    state = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    with _saving(output_dir):  # no summary.json then: --resume redoes the steps since the last checkpoint
        if lora_r:  # peft's own format (adapter_config.json + adapter_model.safetensors), from the gathered state
            adapter_dir = os.path.join(output_dir, "adapter") if merge else output_dir
            final.save_pretrained(adapter_dir, state_dict=state)
            if merge:  # onto a fresh fp32 copy of the base: the trained one may be sharded or half precision
                from peft import PeftModel

                base, _ = common.load_causal_lm(model, dtype=torch.float32)
                PeftModel.from_pretrained(base, adapter_dir).merge_and_unload().save_pretrained(output_dir)
        else:
            final.save_pretrained(output_dir, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(output_dir)
        common.fsync_tree(output_dir)  # on the disk before summary.json says the run is finished


# ======================================================================================================= main

def check_flags(c):
    """Every flag a user can get wrong, checked before a file is read or a model loaded (c: main's arguments)."""
    number = lambda v: isinstance(v, (int, float))  # noqa: E731
    integer = lambda v, low: isinstance(v, int) and v >= low  # noqa: E731
    checks = [
        (c["loss"] in LOSS_TYPES, f"--loss must be one of {', '.join(LOSS_TYPES)}, got {c['loss']!r}"),
        (number(c["beta"]) and c["beta"] > 0, f"--beta must be > 0 (eta = 1/beta), got {c['beta']!r}"),
        (number(c["tau_low"]) and number(c["tau_high"]) and c["tau_low"] < c["tau_high"],
         f"--tau_low must be below --tau_high, got {c['tau_low']!r} >= {c['tau_high']!r}"),
        (c["rep_weight"] is None or number(c["rep_weight"]) and c["rep_weight"] >= 0,
         f"--rep_weight must be >= 0, got {c['rep_weight']!r}"),
        (number(c["rep_margin"]) and 0 <= c["rep_margin"] <= 2, f"--rep_margin must lie in [0, 2], got {c['rep_margin']!r}"),
        (number(c["lr"]) and c["lr"] > 0, f"--lr must be > 0, got {c['lr']!r}"),
        (integer(c["epochs"], 1), f"--epochs must be an integer >= 1, got {c['epochs']!r}"),
        (integer(c["batch_size"], 1), f"--batch_size must be an integer >= 1, got {c['batch_size']!r}"),
        (integer(c["grad_accum"], 1), f"--grad_accum must be an integer >= 1, got {c['grad_accum']!r}"),
        (integer(c["max_length"], 8), f"--max_length must be an integer >= 8, got {c['max_length']!r}"),
        (integer(c["save_every"], 0), f"--save_every must be an integer >= 0, got {c['save_every']!r}"),
        (number(c["warmup_ratio"]) and 0 <= c["warmup_ratio"] < 1, f"--warmup_ratio must lie in [0, 1), got {c['warmup_ratio']!r}"),
        (number(c["max_grad_norm"]) and c["max_grad_norm"] >= 0, f"--max_grad_norm must be >= 0, got {c['max_grad_norm']!r}"),
        (c["optimizer"] in ("rmsprop", "adamw"), f"--optimizer must be rmsprop or adamw, got {c['optimizer']!r}"),
        (c["lr_schedule"] in ("linear", "cosine", "constant"),
         f"--lr_schedule must be linear, cosine or constant, got {c['lr_schedule']!r}"),
        (c["mixed_precision"] in (None, "no", "bf16", "fp16"),
         f"--mixed_precision must be no, bf16 or fp16, got {c['mixed_precision']!r}"),
        (c["logits_chunk"] is None or integer(c["logits_chunk"], 1),
         f"--logits_chunk must be an integer >= 1 or left out (auto), got {c['logits_chunk']!r}"),
        (integer(c["lora_r"], 0), f"--lora_r must be an integer >= 0 (0: full fine-tuning), got {c['lora_r']!r}"),
        (c["share_prompt"] in (None, True, False),
         f"--share_prompt must be True, False or left out (auto), got {c['share_prompt']!r}"),
        (c["report_to"] in ("none", "tensorboard", "wandb"),
         f"--report_to must be none, tensorboard or wandb, got {c['report_to']!r}"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)


def main(data, model=common.PACKAGED_MODEL, output_dir="runs/sspo", loss="sspo", beta=1e-3,
         tau_low=0.6, tau_high=0.9, rep_weight=None, rep_margin=0.3, lr=5e-7, epochs=1, batch_size=8,
         grad_accum=1, max_length=1024, seed=0, resume=False, save_every=100, optimizer="rmsprop",
         warmup_ratio=0.1, lr_schedule="linear", max_grad_norm=1.0, weight_decay=0.0, mixed_precision=None,
         gradient_checkpointing=False, logits_chunk=None, group_by_length=True, keep_checkpoint=False,
         lora_r=0, lora_alpha=16, lora_dropout=0.0, lora_target_modules="all-linear", merge=False, report_to="none",
         share_prompt=None, attn_implementation=None):
    """Train one S-SPPO iteration: the policy starts as --model, which is also the reference pi_t.

    Args:
      data: scored JSONL (oracle.py: prompt, responses, pref, sim) or pairs JSONL (docs/method.md §5)
      model: hub id or local folder of any HF causal LM with a chat template; default the packaged SmolLM2
      output_dir: where the final model, metrics.jsonl, run_config.json, pairs.jsonl (the pairs trained on: line and id in --data, answer indices, win rates, similarity), ref_logps.pt, checkpoints and summary.json go
      loss: sspo | sppo | sppo_hard | dpo | ipo (docs/method.md §4); only sspo calibrates
      beta: 1/eta; eta scales the win-rate targets: a(y) -> eta (P_hat - 1/2)
      tau_low: similarity at and below which the oracle's preference is kept as is (§3.1; how chosen: README, "Choosing the flags")
      tau_high: similarity at and above which the preference becomes 1/2 (§3.1)
      rep_weight: lambda of the latent repulsion term (sspo only; 0 turns it off); None: 5 / beta, which makes its gradient ~1/10 of the regression's at step 0 (the value used: rep_weight_used in run_config.json)
      rep_margin: the latent distance below which chosen and rejected are pushed apart (in [0, 2])
      lr: peak learning rate
      epochs: passes over the pairs
      batch_size: pairs per process per micro-step (each pair is two sequences)
      grad_accum: micro-steps per optimizer step; the global batch is batch_size x grad_accum x processes pairs (SPPO: 64)
      max_length: most tokens of prompt + response; longer pairs are truncated and counted
      seed: seed of the data order and of everything random
      resume: continue the killed run found in output_dir (same command otherwise: a changed flag is refused)
      save_every: optimizer steps between checkpoints (0: none)
      optimizer: rmsprop (as SPPO) | adamw
      warmup_ratio: share of the optimizer steps with linearly rising learning rate
      lr_schedule: after warm-up: linear (to 0) | cosine (to 0) | constant
      max_grad_norm: clip the global gradient norm to this (0: no clipping; the norm is logged anyway); under DeepSpeed its config's gradient_clipping applies instead
      weight_decay: decoupled for adamw, L2 for rmsprop
      mixed_precision: no | bf16 | fp16; default: what `accelerate launch` / its config says (else fp32)
      gradient_checkpointing: recompute activations in the backward pass (less memory, ~30% slower)
      logits_chunk: response positions per chunk of the LM head (its memory: ~8-10 bytes x chunk x vocab); None: 2^26 / vocab, at least 1024 (the value used: logits_chunk_used in run_config.json)
      group_by_length: batch pairs of similar length together (less padding; the order stays seeded); --nogroup_by_length: off
      keep_checkpoint: keep the last checkpoint (model + optimizer) after the final model is saved
      lora_r: LoRA rank (peft); 0 trains every weight
      lora_alpha: LoRA scaling numerator (the update is scaled by lora_alpha / lora_r)
      lora_dropout: dropout on the LoRA path
      lora_target_modules: all-linear (every linear layer of attention and MLP) or a comma-separated list of module names
      merge: with LoRA, save the merged model in output_dir (and the adapter in output_dir/adapter); else the adapter alone (a folder --model and generate.py accept)
      report_to: none | tensorboard | wandb (through accelerate's trackers; install the one you pick); metrics.jsonl is always written
      attn_implementation: transformers' attention kernel: sdpa | eager | flash_attention_2 (needs flash-attn; chosen and rejected then run in rows apart) | ...; None: its default (sdpa)
      share_prompt: compute each pair's prompt once (one row prompt+chosen+rejected, a 4-D attention mask); None: on a CPU when the attention takes such a mask (sdpa or eager, no sliding window shorter than --max_length), confirmed at start against separate rows, else off with a line saying so; on a GPU rows apart (no faster there: bench/RESULTS.md); --noshare_prompt: rows apart
    """
    run_config = {k: v for k, v in locals().items()}
    check_flags(run_config)
    output_dir = str(output_dir)
    if finished(output_dir, resume, keep_checkpoint):
        return
    before = open_run_dir(output_dir, resume, run_config)
    # Everything a user can get wrong is checked before a model is loaded or a file written.
    pairs, stats = load_pairs(str(data), loss, tau_low, tau_high)
    claim_run_dir(output_dir, resume)

    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    stats["cuda_alloc_conf"] = tuning.grow_cuda_segments()
    accelerator = make_accelerator(mixed_precision, output_dir, grad_accum, report_to)
    if accelerator.device.type == "cpu":
        stats["reused_freed_memory"] = tuning.reuse_freed_memory()
    main_process, world = accelerator.is_main_process, accelerator.num_processes
    set_seed(seed)
    policy, tokenizer = load_policy(model, accelerator, gradient_checkpointing, attn_implementation,
                                    dict(r=lora_r, alpha=lora_alpha, dropout=lora_dropout, target_modules=lora_target_modules))
    examples, stats["truncated"] = tokenize_pairs(pairs, tokenizer, max_length)
    pad_id = tokenizer.pad_token_id
    scorer = SequenceScorer(policy, logits_chunk=logits_chunk)
    stats["logits_chunk_used"] = scorer.logits_chunk
    scorer, opt = accelerator.prepare(scorer, make_optimizer(scorer, optimizer, lr, weight_decay))
    share_prompt_used = stats["share_prompt_used"] = choose_prompt_layout(
        accelerator, scorer, policy.config, examples, pad_id, share_prompt, max_length, before)
    global_batch = batch_size * grad_accum * world
    steps, lengths = plan_steps(examples, share_prompt_used, global_batch, seed, epochs, group_by_length)
    total, warmup = len(steps), math.ceil(warmup_ratio * len(steps))

    if main_process:
        os.makedirs(output_dir, exist_ok=True)
    accelerator.wait_for_everyone()
    checkpoint = find_checkpoint(output_dir) if resume else None
    base_only = accelerator.unwrap_model(scorer).model.disable_adapter if lora_r else contextlib.nullcontext
    t_ref = time.time()
    ref = reference_logps(accelerator, scorer, examples, lengths, pad_id, share_prompt_used, batch_size,
                          os.path.join(output_dir, "ref_logps.pt"), checkpoint, data, base_only)
    timing = dict(reference_s=time.time() - t_ref)
    metrics_path = os.path.join(output_dir, "metrics.jsonl")
    start = restore_checkpoint(accelerator, checkpoint, metrics_path)
    if report_to != "none":
        accelerator.init_trackers("sspo", config={k: v for k, v in run_config.items() if isinstance(v, (int, float, str, bool))})
    if main_process:
        common.atomic_write_json(os.path.join(output_dir, "run_config.json"),
                                 dict(run_config, **stats, rep_weight_used=rep_weight_used(loss, beta, rep_weight)))
        write_pairs(output_dir, pairs)
        print(f"{stats['pairs']} pairs from {stats['rows']} rows ({stats['skipped_ties']} prompts skipped: all win rates "
              f"equal; {stats['truncated']} pairs truncated to {max_length} tokens; prompt shared by chosen and rejected: "
              f"{'yes' if share_prompt_used else 'no'}); {total} optimizer steps of "
              f"{global_batch} pairs on {world} process(es); starting at step {start}")

    log = common.JsonlAppender(metrics_path, id_field="step", lock=False) if main_process else None  # the folder is locked
    bar = tqdm(total=total, initial=start, desc=f"{loss} training", disable=not main_process)
    t_train, train_tokens = time.time(), 0.0
    for step in range(start, total):
        t0 = time.time()
        lr_now = lr_at(step, total, warmup, lr, lr_schedule)
        for group in opt.param_groups:
            group["lr"] = lr_now
        metrics, tokens, grad_norm = optimizer_step(accelerator, scorer, opt, examples, ref, steps[step], pad_id,
                                                    share_prompt_used, max_grad_norm, loss=loss, beta=beta, rep_weight=rep_weight,
                                                    rep_margin=rep_margin)
        train_tokens += tokens
        if main_process:
            record = {"step": step + 1, "epoch": round((step + 1) / (total / epochs), 4), **metrics,
                      "grad_norm": float("nan") if grad_norm is None else float(grad_norm), "lr": lr_now,
                      "pairs": len(steps[step]), "tokens_per_s": tokens / (time.time() - t0)}
            log.write(record)
            accelerator.log(record, step=step + 1)
            bar.set_postfix(loss=f"{record['loss']:.4g}", a_w=f"{record['logratio_chosen']:.3g}",
                            a_l=f"{record['logratio_rejected']:.3g}")
        bar.update(1)
        if save_every and (step + 1) % save_every == 0 and step + 1 < total:
            save_checkpoint(accelerator, output_dir, step + 1)
    bar.close()
    # the steps of this process (a resumed run: those since the checkpoint); each step's metrics were read
    # back, so the device has finished them
    timing.update(train_s=time.time() - t_train, train_steps=total - start, train_tokens=train_tokens)

    accelerator.wait_for_everyone()
    if main_process:
        log.close()
    save_final_model(accelerator, scorer, tokenizer, output_dir, model, lora_r, merge)
    if main_process:
        common.atomic_write_json(os.path.join(output_dir, DONE_FILE), dict(stats, steps=total, model=model, data=str(data),
                                                                           loss=loss, timing=timing))
        if not keep_checkpoint:  # only now: a kill before summary.json resumes from a checkpoint left whole
            remove_checkpoints(output_dir)
        print(f"saved {output_dir} ({total} steps; metrics in {metrics_path})")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    common.end_process_group()


if __name__ == "__main__":
    common.cli(main)
