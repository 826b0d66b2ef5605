"""Estimated per-GPU memory of sspo.py under each strategy of configs/, and which ones fit.

    python bench/memory_plan.py --model llama-3-8b --gpus 8 --gpu_mem 80 --max_length 1024 --batch_size 2
    python bench/memory_plan.py --model llama-3-8b --gpus 1 --gpu_mem 24 --max_length 1024 --batch_size 1 --lora_r 16
    python bench/memory_plan.py --model path/to/model_or_config.json --gpus 4 --gpu_mem 40 --max_length 2048

--model takes a local config.json, a folder holding one, a built-in name (llama-3-8b, mistral-7b,
qwen2.5-7b: their published config numbers are written below, no hub needed) or a hub id (needs the hub).
All sizes are GiB (2^30 bytes); --gpu_mem too. A strategy "fits" when its estimate is at most 90% of
--gpu_mem: the rest is for the CUDA context (~0.5-1 GiB, not counted by torch) and allocator fragmentation.

The model, Psi parameters in a Llama-shape decoder (llama, mistral, qwen2: embeddings, L layers of
GQA attention + SwiGLU MLP + two RMSNorms, final norm, LM head unless tied). N GPUs, k optimizer
states per parameter (rmsprop: 1, adamw: 2), bf16 mixed precision throughout.

Weights, gradients, optimizer states per GPU (bytes; the ZeRO paper's accounting, Rajbhandari et al. 2020):
  single GPU / DDP   fp32 weights 4Psi, fp32 grads 4Psi, states 4k Psi. bf16 autocast keeps a bf16 copy
                     of every weight through forward and backward (+2Psi, "working"); DDP's all-reduce
                     buckets hold a second copy of the gradients (+4Psi, gradient_as_bucket_view off, accelerate's default).
                     ASSUMES sspo.py loads the model in fp32: transformers 5 loads a checkpoint in its own dtype
                     (bf16 for Llama-3), and then weights, grads and states are all bf16 (half of the above) but
                     RMSprop's updates at lr 5e-7 round away in bf16 weights.
  ZeRO-2             bf16 weights 2Psi; grads: the bf16 partition 2Psi/N plus its fp32 copy at the step 4Psi/N;
                     fp32 master weights 4Psi/N and states 4k Psi/N ("optimizer"). Working: DeepSpeed's
                     communication buffers with overlap_comm, 2 bytes x 4.5 x (reduce + all-gather bucket)
                     (DeepSpeed's documented rule) with configs/deepspeed/zero2.json's 5e7-element buckets.
  ZeRO-3             as ZeRO-2 but the bf16 weights are partitioned too: 2Psi/N. Working: the largest module
                     gathered in bf16 plus its full bf16 gradient before the reduce-scatter (2 x 2 bytes x
                     max(embedding, LM head, one decoder layer)), the prefetch bucket and 2 reduce buckets.
  ZeRO-3 + offload   GPU: bf16 weight partition 2Psi/N and bf16 grad partition 2Psi/N; the fp32 master
                     weights, fp32 grads and states, (8 + 4k) Psi per NODE, live in CPU RAM (printed below).
  FSDP2              fp32 sharded weights 4Psi/N (accelerate upcasts), fp32 sharded grads 4Psi/N, states
                     4k Psi/N. Working: sspo.py prepares its SequenceScorer wrapper, so embeddings, final
                     norm and LM head form the root FSDP unit, which stays gathered through forward and
                     backward: 2 bytes x (embedding + head) for weights and again for their grads; plus two
                     decoder layers gathered in bf16 (current + prefetched) and one layer's bf16 grads.
                     With --grad_accum > 1, sspo.py's accelerator.no_sync turns FSDP2's gradient sync off
                     for the first micro-steps, and FSDP2 then keeps the whole model's unsharded bf16
                     gradients until the last one: + 2Psi. (DDP accumulates in place; under ZeRO-2/3
                     no_sync does nothing.)
  LoRA, 1 GPU        frozen bf16 base 2Psi; adapters (rank r on q,k,v,o,gate,up,down of every layer, P_lora
                     = r (d_in + d_out) summed) in fp32 as peft keeps them: 4 P_lora weights, 4 P_lora grads,
                     4k P_lora states. With --lora_dropout > 0 peft feeds each adapter a dropped-out copy of
                     its linear's input: + 3 (6h + I) bytes per token and layer (bf16 copies + 1-byte masks).

Activations, per GPU, for one micro-batch of 2B sequences (B pairs: chosen + rejected) of length T
(--max_length; pairs padded to the longest, so the worst case is all T), t = 2BT tokens. Per token and
decoder layer (bf16 = 2 bytes; sdpa/flash attention, which keeps no T x T score matrix), what autograd
saves for the backward pass of a Llama-shape layer with hidden size h, intermediate size I and
kv = num_key_value_heads x head_dim:
  each RMSNorm:  fp32 copy of its input 4h + its bf16 output 2h (the weight multiply)     = 6h   (x2 norms)
  attention:     q/k/v input 2h, q 2h, k and v 2 x 2kv, attention output 2h (sdpa keeps it), o_proj input 2h = 8h + 4kv
  MLP:           gate/up input 2h, gate output, SiLU output, up output, product: 4 x 2I     = 2h + 8I
  total A_layer = 22h + 4kv + 8I bytes per token; all L layers: t x L x A_layer.
  With gradient checkpointing (per decoder layer, as --gradient_checkpointing): every layer keeps only
  its input (2h bytes, 4h where the residual stream is fp32: fp32 weights under autocast) and one layer's
  activations are rebuilt at a time: t x (L x 2h + A_layer). Both add t x 16h for the final norm, the last
  hidden state, the response rows copied out of it and the pooled-mask product.
The response-only LM head (sspo.py's SequenceScorer and TokenLogProbs): logits_chunk rows at a time,
recomputed in the backward pass when there are several. Peak, in the forward: the chunk's bf16 logits 2cV,
their fp32 copy 4cV and exp(logits - max) 4cV, which is kept and becomes the gradient in place (its bf16
copy, 2cV, comes after the other two are freed): 10 c V bytes, c = min(--logits_chunk, t), where the
default --logits_chunk is max(1024, 2^26 / V). Not counted: the one-off check_scorer at
start-up (full logits of one pair, 2T x V x 10 bytes, before any activation exists), the CUDA context,
fragmentation, NCCL's own buffers.
"""
import json
import os
import sys

GiB = 2 ** 30

# The published config.json numbers of three 7-8B instruct models (no hub access needed).
BUILTIN = {
    "llama-3-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       tie_word_embeddings=False, attention_bias=False, mlp_bias=False),
    "mistral-7b": dict(model_type="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       tie_word_embeddings=False),
    "qwen2.5-7b": dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                       num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                       tie_word_embeddings=False),
}
OPTIMIZER_STATES = {"rmsprop": 1, "adamw": 2}
ZERO2_BUCKET = 5e7  # configs/deepspeed/zero2.json: reduce_bucket_size = allgather_bucket_size
ZERO3_REDUCE_BUCKET, ZERO3_PREFETCH_BUCKET = 16777216, 15099494  # configs/deepspeed/zero3*.json
STRATEGIES = ("single GPU", "DDP", "ZeRO-2", "ZeRO-3", "ZeRO-3 + offload", "FSDP2", "LoRA, 1 GPU")
CONFIG_FILE = {"single GPU": "single_gpu.yaml", "DDP": "ddp_8gpu.yaml", "ZeRO-2": "deepspeed_zero2.yaml",
               "ZeRO-3": "deepspeed_zero3.yaml", "ZeRO-3 + offload": "deepspeed_zero3_offload.yaml",
               "FSDP2": "fsdp2.yaml", "LoRA, 1 GPU": "single_gpu.yaml + --lora_r"}


class PlanError(Exception):
    """A bad flag or model: one line on stderr, exit code 2."""


def load_config(model):
    """The model's config as a dict: a built-in name, a config.json, a folder holding one, or a hub id."""
    if model in BUILTIN:
        return dict(BUILTIN[model])
    path = os.path.join(model, "config.json") if os.path.isdir(model) else model
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    if path.endswith(".json") or os.path.isabs(model) or model.startswith("."):
        raise PlanError(f"--model {model!r}: no such file")
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(model).to_dict()
    except Exception as e:  # a hub id that cannot be fetched here
        raise PlanError(f"--model {model!r}: not a built-in name ({', '.join(BUILTIN)}), a config.json or a folder "
                        f"holding one, and not loadable as a hub id ({str(e).splitlines()[0]})") from None


class Shape:
    """The sizes of a Llama-shape decoder read from its config."""

    def __init__(self, config):
        try:
            self.vocab = config["vocab_size"]
            self.hidden = config["hidden_size"]
            self.intermediate = config["intermediate_size"]
            self.layers = config["num_hidden_layers"]
            self.heads = config["num_attention_heads"]
        except KeyError as e:
            raise PlanError(f"the model config lacks {e.args[0]!r}: memory_plan.py knows Llama-shape decoders only") from None
        self.kv_heads = config.get("num_key_value_heads") or self.heads
        self.head_dim = config.get("head_dim") or self.hidden // self.heads
        self.tied = bool(config.get("tie_word_embeddings", False))
        model_type = config.get("model_type", "llama")
        self.qkv_bias = model_type == "qwen2" or bool(config.get("attention_bias", False))
        self.o_bias = model_type != "qwen2" and bool(config.get("attention_bias", False))
        self.mlp_bias = bool(config.get("mlp_bias", False))

    def layer_params(self):
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        attention = h * q + 2 * h * kv + q * h + (q + 2 * kv if self.qkv_bias else 0) + (h if self.o_bias else 0)
        mlp = 3 * h * i + (2 * i + h if self.mlp_bias else 0)
        return attention + mlp + 2 * h  # + the two RMSNorm weights

    def embedding_params(self):
        return self.vocab * self.hidden

    def head_params(self):
        return 0 if self.tied else self.vocab * self.hidden

    def params(self):
        """Psi: every parameter, counted once (a tied head is the embedding)."""
        return self.embedding_params() + self.layers * self.layer_params() + self.hidden + self.head_params()

    def lora_params(self, r):
        """Rank-r adapters on q, k, v, o, gate, up, down of every layer: r (d_in + d_out) each."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return self.layers * r * ((h + q) + 2 * (h + kv) + (q + h) + 2 * (h + i) + (i + h))

    def activation_bytes_per_token_layer(self, lora_dropout=False):
        """A_layer = 22h + 4kv + 8I, + 3 (6h + I) for LoRA adapters behind dropout (see the module docstring)."""
        a = 22 * self.hidden + 4 * self.kv_heads * self.head_dim + 8 * self.intermediate
        return a + (3 * (6 * self.hidden + self.intermediate) if lora_dropout else 0)


def states_bytes(strategy, psi, n, k, lora=0):
    """(weights, gradients, optimizer states) in bytes per GPU, by the formulas of the module docstring."""
    if strategy in ("single GPU", "DDP"):
        return 4 * psi, 4 * psi, 4 * k * psi
    if strategy == "ZeRO-2":
        return 2 * psi, (2 + 4) * psi / n, (4 + 4 * k) * psi / n
    if strategy == "ZeRO-3":
        return 2 * psi / n, (2 + 4) * psi / n, (4 + 4 * k) * psi / n
    if strategy == "ZeRO-3 + offload":
        return 2 * psi / n, 2 * psi / n, 0
    if strategy == "FSDP2":
        return 4 * psi / n, 4 * psi / n, 4 * k * psi / n
    if strategy == "LoRA, 1 GPU":
        return 2 * psi + 4 * lora, 4 * lora, 4 * k * lora
    raise ValueError(strategy)


def working_bytes(strategy, shape, psi, grad_accum=1):
    """Transient buffers of each engine, bytes per GPU (module docstring)."""
    largest = max(shape.embedding_params(), shape.head_params(), shape.layer_params())
    if strategy == "single GPU":
        return 2 * psi  # autocast's bf16 weight copies
    if strategy == "DDP":
        return 2 * psi + 4 * psi  # + the gradient buckets
    if strategy == "ZeRO-2":
        return 2 * 4.5 * 2 * ZERO2_BUCKET
    if strategy in ("ZeRO-3", "ZeRO-3 + offload"):
        return 2 * 2 * largest + 2 * ZERO3_PREFETCH_BUCKET + 2 * 2 * ZERO3_REDUCE_BUCKET
    if strategy == "FSDP2":
        root = shape.embedding_params() + shape.head_params() + shape.hidden
        unsynced = 2 * psi if grad_accum > 1 else 0  # unsharded grads kept through no_sync micro-steps
        return 2 * root * 2 + 2 * shape.layer_params() * 2 + 2 * shape.layer_params() + unsynced
    if strategy == "LoRA, 1 GPU":
        return 0  # the base is already bf16: autocast makes no copies of it
    raise ValueError(strategy)


def activation_bytes(shape, tokens, checkpointing, residual_bytes=2, lora_dropout=False):
    per_layer = shape.activation_bytes_per_token_layer(lora_dropout)
    extra = 16 * shape.hidden  # final norm, last hidden state, response rows, pooled-mask product
    if checkpointing:
        return tokens * (shape.layers * residual_bytes * shape.hidden + per_layer + extra)
    return tokens * (shape.layers * per_layer + extra)


def logits_bytes(shape, tokens, logits_chunk=None):
    chunk = logits_chunk or max(1024, 2 ** 26 // shape.vocab)  # sspo.SequenceScorer's default
    return 10 * min(chunk, tokens) * shape.vocab


def plan(config, gpus, gpu_mem, max_length, batch_size=1, lora_r=16, optimizer="rmsprop", logits_chunk=None,
         lora_dropout=0.0, grad_accum=1):
    """One row (a dict, sizes in bytes) per strategy."""
    shape = Shape(config)
    psi, k = shape.params(), OPTIMIZER_STATES[optimizer]
    tokens = 2 * batch_size * max_length
    rows = []
    for strategy in STRATEGIES:
        n = 1 if strategy in ("single GPU", "LoRA, 1 GPU") else gpus
        if strategy == "DDP" and gpus == 1:
            continue  # that is the single-GPU row
        weights, grads, optim = states_bytes(strategy, psi, n, k, shape.lora_params(lora_r))
        residual = 4 if strategy in ("single GPU", "DDP") else 2  # fp32 weights under autocast: fp32 residual stream
        dropout = strategy == "LoRA, 1 GPU" and lora_dropout > 0
        act = {c: activation_bytes(shape, tokens, c, residual, dropout) for c in (False, True)}
        logits = logits_bytes(shape, tokens, logits_chunk)
        work = working_bytes(strategy, shape, psi, grad_accum)
        static = weights + grads + optim + work + logits
        row = dict(strategy=strategy, config=CONFIG_FILE[strategy], gpus=n, weights=weights, grads=grads,
                   optimizer=optim, working=work, logits=logits, act_full=act[False], act_ckpt=act[True],
                   total_full=static + act[False], total_ckpt=static + act[True])
        row["fits_full"] = row["total_full"] <= 0.9 * gpu_mem * GiB
        row["fits_ckpt"] = row["total_ckpt"] <= 0.9 * gpu_mem * GiB
        if strategy == "ZeRO-3 + offload":
            row["cpu_ram_per_node"] = (4 + 4 + 4 * k) * psi  # fp32 master + fp32 grads + states, all ranks of a node
        rows.append(row)
    return dict(params=psi, lora_params=shape.lora_params(lora_r), tokens=tokens, rows=rows)


def _g(x):
    return f"{x / GiB:.1f}"


def table(result, gpu_mem):
    lines = ["| strategy | config | GPUs | weights | grads | optimizer | working | logits | activations | "
             "activations (ckpt) | total | total (ckpt) | fits |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        fits = "yes" if r["fits_full"] else ("with --gradient_checkpointing" if r["fits_ckpt"] else "no")
        lines.append(f"| {r['strategy']} | {r['config']} | {r['gpus']} | {_g(r['weights'])} | {_g(r['grads'])} | "
                     f"{_g(r['optimizer'])} | {_g(r['working'])} | {_g(r['logits'])} | {_g(r['act_full'])} | "
                     f"{_g(r['act_ckpt'])} | {_g(r['total_full'])} | {_g(r['total_ckpt'])} | {fits} |")
    return "\n".join(lines)


def main(model="llama-3-8b", gpus=8, gpu_mem=80, max_length=1024, batch_size=1, grad_accum=1, lora_r=16,
         lora_dropout=0.0, optimizer="rmsprop", logits_chunk=None, format="table"):
    """Print the estimated per-GPU memory (GiB) of each strategy and whether it fits.

    Args:
      model: built-in name (llama-3-8b, mistral-7b, qwen2.5-7b), a config.json, a model folder, or a hub id
      gpus: GPUs the sharded / data-parallel strategies spread over (LoRA and single GPU use one)
      gpu_mem: memory of one GPU in GiB
      max_length: tokens per sequence (sspo.py's --max_length; the worst case pads every pair to it)
      batch_size: pairs per GPU per micro-step (sspo.py's --batch_size): 2 x batch_size sequences
      grad_accum: sspo.py's --grad_accum (above 1, FSDP2 keeps unsharded gradients between micro-steps)
      lora_r: LoRA rank for the LoRA row
      lora_dropout: LoRA dropout of the LoRA row (> 0 keeps a dropped-out copy of each adapted input)
      optimizer: rmsprop (1 state per parameter, as SPPO) | adamw (2)
      logits_chunk: sspo.py's --logits_chunk (left out: its default, max(1024, 2^26 / vocab))
      format: table (markdown) | json
    """
    checks = [(isinstance(gpus, int) and gpus >= 1, f"--gpus must be an integer >= 1, got {gpus!r}"),
              (isinstance(gpu_mem, (int, float)) and gpu_mem > 0, f"--gpu_mem must be > 0 (GiB), got {gpu_mem!r}"),
              (isinstance(max_length, int) and max_length >= 1, f"--max_length must be an integer >= 1, got {max_length!r}"),
              (isinstance(batch_size, int) and batch_size >= 1, f"--batch_size must be an integer >= 1, got {batch_size!r}"),
              (isinstance(grad_accum, int) and grad_accum >= 1, f"--grad_accum must be an integer >= 1, got {grad_accum!r}"),
              (isinstance(lora_r, int) and lora_r >= 1, f"--lora_r must be an integer >= 1, got {lora_r!r}"),
              (isinstance(lora_dropout, (int, float)) and 0 <= lora_dropout < 1, f"--lora_dropout must lie in [0, 1), got {lora_dropout!r}"),
              (optimizer in OPTIMIZER_STATES, f"--optimizer must be rmsprop or adamw, got {optimizer!r}"),
              (logits_chunk is None or isinstance(logits_chunk, int) and logits_chunk >= 1,
               f"--logits_chunk must be an integer >= 1 or left out (sspo.py's default), got {logits_chunk!r}"),
              (format in ("table", "json"), f"--format must be table or json, got {format!r}")]
    for ok, message in checks:
        if not ok:
            raise PlanError(message)
    result = plan(load_config(str(model)), gpus, gpu_mem, max_length, batch_size, lora_r, optimizer, logits_chunk,
                  lora_dropout, grad_accum)
    if format == "json":
        print(json.dumps(dict(result, model=str(model), gpus=gpus, gpu_mem=gpu_mem, max_length=max_length,
                              batch_size=batch_size, grad_accum=grad_accum, optimizer=optimizer, unit="bytes")))
        return
    print(f"{model}: {result['params'] / 1e9:.2f}B parameters; {optimizer}; micro-batch of {2 * batch_size} sequences "
          f"x {max_length} tokens per GPU, --grad_accum {grad_accum}; {gpus} x {gpu_mem} GiB; sizes in GiB per GPU\n")
    print(table(result, gpu_mem))
    offload = [r for r in result["rows"] if "cpu_ram_per_node" in r]
    if offload:
        print(f"\nZeRO-3 + offload also needs ~{_g(offload[0]['cpu_ram_per_node'])} GiB of CPU RAM in all, on the "
              f"nodes in proportion to their GPUs (one node holds all of it when it holds all GPUs). LoRA rank {lora_r}: "
              f"{result['lora_params'] / 1e6:.1f}M trainable parameters.")
    print("fits: estimate <= 90% of --gpu_mem. Formulas and assumptions: `python bench/memory_plan.py --help` "
          "and the docstring of bench/memory_plan.py.")


if __name__ == "__main__":
    import fire

    try:
        fire.Fire(main)
    except PlanError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
