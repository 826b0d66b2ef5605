#!/usr/bin/env bash
# Train a few steps of a ~0.85B random-weight Llama with sspo.py under configs/single_gpu.yaml,
# configs/fsdp2.yaml and configs/deepspeed_zero3.yaml (one process each), check that each saved
# model reloads in plain transformers and that --resume continues a run, and record per-GPU memory
# and tokens/s beside bench/memory_plan.py's estimate in bench/results/gpu_configs.md (a page of its own:
# the script writes the whole file, so it never overwrites bench/RESULTS.md's other sections).
#
#   bash bench/gpu_configs.sh                      # on a GPU machine (a few minutes on one H100/H200)
#   bash bench/gpu_configs.sh --cpu-smoke          # the single-device path on CPU, tiny shapes (~1 min)
#   bash bench/gpu_configs.sh --results "$OUT/RESULTS.md" --work /tmp/gpu_configs
#
# On the lent GPU machine (no network): run without the project's CPU .venv, e.g.
#   PY=python3 bash bench/gpu_configs.sh --results "$OUT/RESULTS.md"
# It needs torch, transformers, accelerate, tokenizers, safetensors, tqdm and fire (sspo.py's CLI); it
# names any that is missing. Everything else is made here: the model (save_pretrained of a random
# LlamaForCausalLM, fp32 like a converted checkpoint), a word-level tokenizer with a ChatML template,
# and a scored JSONL of random responses with constant-sum preferences. Nothing is downloaded.
# DeepSpeed is used only if it imports; without it the ZeRO-3 row says "skipped".
#
# Resume check: the first run keeps its last checkpoint (--keep_checkpoint); the script then removes
# summary.json, which makes the run look killed after that checkpoint, and runs the same command with
# --resume. It must start at the checkpoint's step, end with every step logged once, and give the
# weights of the uninterrupted run (exactly on CPU; up to GPU nondeterminism on a GPU).
set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"  # the DeepSpeed configs name their JSON files relative to the repository root
PY="${PY:-$( [ -x "$ROOT/.venv/bin/python" ] && echo "$ROOT/.venv/bin/python" || echo python3 )}"
SMOKE=0
RESULTS=""
WORK=""
KEEP=0
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu-smoke) SMOKE=1 ;;
    --results) RESULTS="$2"; shift ;;
    --work) WORK="$2"; shift ;;
    --keep) KEEP=1 ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "error: unknown argument $1 (use --cpu-smoke, --results FILE, --work DIR, --keep)" >&2; exit 2 ;;
  esac
  shift
done

if [ "$SMOKE" = 1 ]; then
  # tiny shapes: the path is the GPU one, the numbers mean nothing
  HIDDEN=64; INTER=176; LAYERS=2; HEADS=4; KV=2; VOCAB=0; PAIRS=8; MAXLEN=64; BATCH=2; SAVE_EVERY=2
  CONFIGS="single_gpu"
  LAUNCH_EXTRA="--cpu"
  WORK="${WORK:-$(mktemp -d /tmp/gpu_configs_smoke.XXXXXX)}"
  RESULTS="${RESULTS:-$WORK/RESULTS.md}"
else
  # ~0.85B: TinyLlama-like widths, 16 layers, vocab 32000 (the LM head chunk is realistic)
  HIDDEN=2048; INTER=5632; LAYERS=16; HEADS=16; KV=4; VOCAB=32000; PAIRS=48; MAXLEN=512; BATCH=2; SAVE_EVERY=8
  CONFIGS="single_gpu fsdp2 deepspeed_zero3"
  LAUNCH_EXTRA=""
  WORK="${WORK:-$(mktemp -d /tmp/gpu_configs.XXXXXX)}"
  RESULTS="${RESULTS:-$ROOT/bench/results/gpu_configs.md}"
  if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "error: no CUDA device visible to $PY; on a CPU machine run: bash bench/gpu_configs.sh --cpu-smoke" >&2
    exit 2
  fi
fi
MISSING=$("$PY" -c "
import importlib.util
print(' '.join(m for m in ('torch', 'transformers', 'accelerate', 'tokenizers', 'safetensors', 'tqdm', 'fire')
               if importlib.util.find_spec(m) is None))")
if [ -n "$MISSING" ]; then
  echo "error: $PY lacks: $MISSING (pip install them, or put their folders on PYTHONPATH)" >&2
  exit 2
fi
mkdir -p "$WORK"
echo "work dir: $WORK; results: $RESULTS"

# ------------------------------------------------------------------ the model, tokenizer and data
"$PY" - "$WORK" "$HIDDEN" "$INTER" "$LAYERS" "$HEADS" "$KV" "$VOCAB" "$PAIRS" "$MAXLEN" <<'EOF' || { echo "error: could not build the model and data" >&2; exit 1; }
import json, os, random, sys, time
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

work, hidden, inter, layers, heads, kv, vocab, pairs, max_length = sys.argv[1], *map(int, sys.argv[2:])
model_dir = os.path.join(work, "model")
words = [f"w{i}" for i in range(400)]
special = ["<unk>", "<pad>", "<|im_start|>", "<|im_end|>"]
tok = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(special + ["user", "assistant"] + words)}, unk_token="<unk>"))
tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                    bos_token="<|im_start|>", eos_token="<|im_end|>")
tokenizer.chat_template = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
                           "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
tokenizer.save_pretrained(model_dir)
config = LlamaConfig(vocab_size=vocab or len(tokenizer), hidden_size=hidden, intermediate_size=inter,
                     num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                     max_position_embeddings=max(2048, 2 * max_length), tie_word_embeddings=False,
                     bos_token_id=2, eos_token_id=3, pad_token_id=1)
t0 = time.time()
torch.manual_seed(0)
model = LlamaForCausalLM(config)
model.save_pretrained(model_dir)  # fp32, as a converted checkpoint (bf16 hub checkpoints: see the report)
n = sum(p.numel() for p in model.parameters())
print(f"model: {n / 1e9:.3f}B parameters (h {hidden}, {layers} layers, vocab {config.vocab_size}) in {time.time() - t0:.0f} s")

rng = random.Random(0)
k = 4
with open(os.path.join(work, "scored.jsonl"), "w") as f:
    for i in range(pairs):
        prompt = " ".join(rng.choices(words, k=max_length // 8))
        responses = [" ".join(rng.choices(words, k=rng.randint(max_length // 2, max_length))) for _ in range(k)]
        reward = [rng.gauss(0, 1) for _ in range(k)]
        pref = [[0.5 if a == b else 1 / (1 + 2.718281828 ** (reward[b] - reward[a])) for b in range(k)] for a in range(k)]
        sim = [[1.0 if a == b else round(rng.uniform(0.2, 0.9), 3) for b in range(k)] for a in range(k)]
        for a in range(k):
            for b in range(a):
                sim[a][b] = sim[b][a]
        f.write(json.dumps({"id": str(i), "prompt": prompt, "responses": responses, "pref": pref, "sim": sim}) + "\n")
EOF

# sspo.py run through a wrapper that writes the peak CUDA memory of its process at exit
cat > "$WORK/sspo_peak.py" <<'EOF'
import atexit, json, os, runpy, sys
root = os.environ["SSPO_ROOT"]
sys.path.insert(0, root)


def _write_peak():
    import torch
    if torch.cuda.is_available():
        with open(os.environ["SSPO_PEAK"] + "." + os.environ.get("RANK", "0"), "w") as f:
            json.dump({"allocated": torch.cuda.max_memory_allocated(), "reserved": torch.cuda.max_memory_reserved()}, f)


atexit.register(_write_peak)
sys.argv = [os.path.join(root, "sspo.py")] + sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
EOF

VERSIONS=$("$PY" -c "
import torch, transformers, accelerate
try:
    import deepspeed; ds = deepspeed.__version__
except Exception:
    ds = 'not installed'
gpu = torch.cuda.get_device_name(0) + f' ({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB)' if torch.cuda.is_available() else 'CPU'
print(f'{gpu}; torch {torch.__version__}, transformers {transformers.__version__}, accelerate {accelerate.__version__}, deepspeed {ds}')")
GPU_MEM=$("$PY" -c "import torch; print(int(torch.cuda.get_device_properties(0).total_memory / 2**30) if torch.cuda.is_available() else 80)")
echo "$VERSIONS"

declare -A STRATEGY=([single_gpu]="single GPU" [fsdp2]="FSDP2" [deepspeed_zero3]="ZeRO-3")
FAILED=0
ROWS=""
NOTES=""

for CFG in $CONFIGS; do
  echo "=================== $CFG"
  if [[ "$CFG" == deepspeed* ]] && ! "$PY" -c "import deepspeed" 2>/dev/null; then
    echo "SKIPPED $CFG: DeepSpeed is not installed for $PY (pip install deepspeed; the lent GPU machine cannot download it)"
    ROWS+="| $CFG | 1 | skipped: DeepSpeed not installed | | | | | | | |"$'\n'
    continue
  fi
  OUTDIR="$WORK/run_$CFG"
  rm -rf "$OUTDIR"
  FLAGS=(--data "$WORK/scored.jsonl" --model "$WORK/model" --output_dir "$OUTDIR" --loss sspo --beta 0.01
         --lr 1e-4 --epochs 1 --batch_size "$BATCH" --grad_accum 1 --max_length "$MAXLEN" --seed 0
         --save_every "$SAVE_EVERY" --gradient_checkpointing True --keep_checkpoint True)
  launch() {  # $1: log file; the rest: extra sspo.py flags
    local log="$1"; shift
    SSPO_ROOT="$ROOT" SSPO_PEAK="$WORK/peak_$CFG" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
      "$PY" -m accelerate.commands.launch --config_file "$ROOT/configs/$CFG.yaml" --num_processes 1 $LAUNCH_EXTRA \
      "$WORK/sspo_peak.py" "${FLAGS[@]}" "$@" > "$log" 2>&1
  }
  rm -f "$WORK"/peak_"$CFG".*
  T0=$(date +%s)
  if ! launch "$WORK/$CFG.log"; then
    echo "FAILED $CFG: training; last lines of $WORK/$CFG.log:"; tail -25 "$WORK/$CFG.log"
    ROWS+="| $CFG | 1 | FAILED: training (see the notes) | | | | | | | |"$'\n'
    NOTES+=$'\n'"### $CFG failed"$'\n\n```\n'"$(tail -25 "$WORK/$CFG.log")"$'\n```\n'
    FAILED=1; continue
  fi
  WALL=$(( $(date +%s) - T0 ))
  rm -rf "$WORK/first_$CFG" && mkdir -p "$WORK/first_$CFG" && cp "$OUTDIR"/*.safetensors "$WORK/first_$CFG/"
  PEAK=$(cat "$WORK"/peak_"$CFG".0 2>/dev/null || echo '{}')

  # the resume check: the run looks killed after its last checkpoint; the same command with --resume
  cp "$OUTDIR/metrics.jsonl" "$WORK/first_metrics_$CFG.jsonl" 2>/dev/null || true
  rm -f "$OUTDIR/summary.json"
  launch "$WORK/${CFG}_resume.log" --resume True
  RESUME_RC=$?

  CHECK=$("$PY" - "$ROOT" "$OUTDIR" "$WORK" "$CFG" "$RESUME_RC" "$PEAK" "$GPU_MEM" "$MAXLEN" "$BATCH" "$WALL" <<'EOF'
import json, os, statistics, subprocess, sys
root, out, work, cfg, resume_rc, peak, gpu_mem, max_length, batch, wall = sys.argv[1:]
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM


def load_dir(folder):  # every *.safetensors file of a folder (save_pretrained may shard)
    tensors = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(folder, name)))
    return tensors


problems = []
steps = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
speeds = [s["tokens_per_s"] for s in steps[1:]] or [s["tokens_per_s"] for s in steps]
log = open(os.path.join(work, f"{cfg}_resume.log")).read()
checkpoint = os.path.join(out, "checkpoint", "step.json")
start = json.load(open(checkpoint))["step"] if os.path.exists(checkpoint) else None
first = [line for line in open(os.path.join(work, f"first_metrics_{cfg}.jsonl"))]
now = [line for line in open(os.path.join(out, "metrics.jsonl"))]
if resume_rc != "0":
    problems.append(f"--resume exited {resume_rc}: " + " | ".join(log.strip().splitlines()[-3:]))
elif not start:
    problems.append("no checkpoint to resume from (is --save_every below the number of steps?)")
elif now[:start] != first[:start] or now[start:] == first[start:]:
    # a resumed run keeps the lines up to its checkpoint as they were and logs the rest anew (timings differ)
    problems.append(f"--resume did not continue from step {start}: metrics.jsonl was rewritten")
if [s["step"] for s in steps] != list(range(1, len(steps) + 1)) or len(steps) != len(first) \
        or not os.path.exists(os.path.join(out, "summary.json")):
    problems.append(f"after --resume the steps logged are {[s['step'] for s in steps]}")
# the saved model loads in plain transformers and gives finite logits
model = AutoModelForCausalLM.from_pretrained(out)
with torch.no_grad():
    logits = model(torch.tensor([[2, 4, 5, 6, 7]])).logits
if not torch.isfinite(logits).all():
    problems.append("the reloaded model gives non-finite logits")
initial = load_dir(os.path.join(work, "model"))
final = {k: v.float() for k, v in model.state_dict().items()}
moved = max((final[k] - initial[k].float()).abs().max().item() for k in initial if k in final)
if moved == 0:
    problems.append("training did not change the weights")
first = os.path.join(work, f"first_{cfg}")
resume_diff = float("nan")
if os.path.isdir(first):
    a = load_dir(first)
    resume_diff = max((final[k] - a[k].float()).abs().max().item() for k in a if k in final)
    if resume_diff > 1e-3:
        problems.append(f"the resumed run's weights differ from the uninterrupted run's by {resume_diff:.2e}")
estimate = json.loads(subprocess.run(
    [sys.executable, os.path.join(root, "bench", "memory_plan.py"), "--model", os.path.join(work, "model"), "--gpus", "1",
     "--gpu_mem", gpu_mem, "--max_length", max_length, "--batch_size", batch, "--format", "json"],
    capture_output=True, text=True, check=True).stdout)
strategy = {"single_gpu": "single GPU", "fsdp2": "FSDP2", "deepspeed_zero3": "ZeRO-3"}[cfg]
est = next(r for r in estimate["rows"] if r["strategy"] == strategy)["total_ckpt"] / 2 ** 30
peak = json.loads(peak)
alloc = peak.get("allocated", 0) / 2 ** 30
ratio = f"{alloc / est:.2f}" if alloc else "n/a (CPU)"
mem = f"{alloc:.1f}" if alloc else "n/a"
res = f"{peak['reserved'] / 2 ** 30:.1f}" if peak else "n/a"
ok = "ok" if not problems else "FAILED"
print(f"| {cfg} | 1 | {ok} | {len(steps)} | {statistics.median(speeds):.0f} | {mem} | {res} | {est:.1f} | {ratio} | "
      f"reloads; resumed at step {start}, max weight diff vs uninterrupted {resume_diff:.1e} | {wall} s |")
for p in problems:
    print("PROBLEM: " + p)
EOF
  )
  CHECK_RC=$?
  echo "$CHECK"
  ROWS+="$(echo "$CHECK" | grep '^|')"$'\n'
  if [ $CHECK_RC -ne 0 ] || echo "$CHECK" | grep -q '^PROBLEM'; then
    FAILED=1
    NOTES+=$'\n'"### $CFG"$'\n\n'"$(echo "$CHECK" | grep -v '^|')"$'\n\n```\n'"$(tail -15 "$WORK/${CFG}_resume.log")"$'\n```\n'
  fi
  [ "$KEEP" = 1 ] || rm -rf "$OUTDIR" "$WORK/first_$CFG"  # a 0.85B run leaves ~15 GB
done

mkdir -p "$(dirname "$RESULTS")"
{
  echo "# sspo.py under configs/: measured on $(date -u +%Y-%m-%d)"
  echo
  echo "Written by \`bash bench/gpu_configs.sh$([ "$SMOKE" = 1 ] && echo ' --cpu-smoke')\`. $VERSIONS."
  echo "Model: random-weight Llama, hidden $HIDDEN, $LAYERS layers, intermediate $INTER, $HEADS heads / $KV kv heads,"
  echo "saved in fp32. $PAIRS pairs, --batch_size $BATCH (so $((2 * BATCH)) sequences) x --max_length $MAXLEN, one process,"
  echo "--gradient_checkpointing, RMSprop, bf16 from the config. Peak = torch.cuda.max_memory_allocated of the training"
  echo "process (the CUDA context is not in it); the estimate is bench/memory_plan.py's 'total (ckpt)' for the same shape"
  echo "on 1 GPU; tokens/s is the median over steps 2.. of metrics.jsonl (prompt + response tokens)."
  echo
  echo "| config | processes | status | steps | tokens/s | peak allocated GiB | peak reserved GiB | estimate GiB | measured / estimate | reload, resume | wall (first run) |"
  echo "|---|---|---|---|---|---|---|---|---|---|---|"
  printf "%s" "$ROWS"
  [ -n "$NOTES" ] && { echo; echo "## Problems"; printf "%s\n" "$NOTES"; }
} > "$RESULTS"
echo "=================== results in $RESULTS"
cat "$RESULTS"
exit $FAILED
