#!/usr/bin/env bash
# Issue 15, the GPU half: one GPU x batch B against N GPUs x B/N under DDP, FSDP (full shard) and
# DeepSpeed ZeRO-2/3, with the shipped recipes/accelerate configs, for a precomputed reference, a
# frozen reference copy, LoRA, and LoRA with its adapters off as the reference. Prints, per engine,
# the largest per-step loss gap and final-weight gap to the one-GPU run (and any tensor a saved
# model lacks), and the wall time; then vLLM generation with tensor parallelism against one GPU
# (when vllm is installed).
# With one GPU (GPUS=1, what the `device` tool lends) every engine runs as one process: accelerate
# still wraps, gathers and consolidates through the engine (FSDP and DeepSpeed launch through
# torchrun even for one process), so each row must equal the plain run; that checks the engine
# paths, not the sharding arithmetic. A `cpu` row (the same run with no GPU) sits beside them.
# DeepSpeed rows are skipped unless `import deepspeed` works.
#   bash benchmarks/distributed_gpu.sh                 # all visible GPUs, smollm2-135m-instruct
#   GPUS=4 MODEL=tiny-random STEPS=8 bash benchmarks/distributed_gpu.sh
#   GPUS=1 MODEL=tiny-random ENGINES="fsdp deepspeed-zero3" bash benchmarks/distributed_gpu.sh   # one GPU
# Not yet run: no GPU machine was available when it was written (see README, "Running on many GPUs").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
GPUS=${GPUS:-$($PY -c "import torch; print(torch.cuda.device_count())")}
MODEL=${MODEL:-smollm2-135m-instruct}
STEPS=${STEPS:-16}
BATCH=${BATCH:-16}            # the global batch; each of the N GPUs gets BATCH / N
OUT=${OUT:-runs/distributed-gpu}
ENGINES=${ENGINES:-ddp fsdp deepspeed-zero2 deepspeed-zero3}
VARIANTS=${VARIANTS:-plain copy lora adapters}
[ "$GPUS" -ge 1 ] || { echo "needs a GPU (found none)"; exit 2; }
[ $((BATCH % GPUS)) -eq 0 ] || { echo "BATCH=$BATCH must be a multiple of GPUS=$GPUS"; exit 2; }
rm -rf "$OUT"; mkdir -p "$OUT"

$PY - "$OUT/pairs.jsonl" <<'PY'
import json, sys
rows = [{"id": f"p{i}", "prompt": f"Question {i}: what is {i} plus {i}?", "chosen": f"{i} plus {i} is {2 * i}.",
         "rejected": f"I think it is {2 * i + 1}, or maybe not."} for i in range(256)]
open(sys.argv[1], "w").write("".join(json.dumps(r) + "\n" for r in rows))
PY

# The model as a folder, so that each run can have a cache of its own: a run that found another
# run's reference log-probs in a shared cache would skip its engine's reference pass.
MODEL_DIR=$($PY -c "import sys; from prefalign.models.registry import resolve_model; print(resolve_model(sys.argv[1]))" "$MODEL")

train() {  # name, per-process batch size, extra train args (a quoted string), launcher args...
  local name=$1 batch=$2 extra=$3; shift 3
  local start=$SECONDS
  # shellcheck disable=SC2086  # $extra is a list of flags
  if PREFALIGN_CACHE="$OUT/$name.cache" "$@" train --model "$MODEL_DIR" --data "$OUT/pairs.jsonl" -o "$OUT/$name" --max-steps "$STEPS" --batch-size "$batch" \
      --lr 1e-5 --seed 0 --dtype float32 --save-every "$STEPS" --quiet $extra > "$OUT/$name.log" 2>&1; then
    echo "$name $((SECONDS - start))" >> "$OUT/times.txt"
  else
    echo "$name failed: see $OUT/$name.log" | tee -a "$OUT/skipped.txt"
  fi
}

# Each variant: one GPU with the global batch, then every engine with BATCH / GPUS per GPU.
#   plain: the precomputed reference; copy: a frozen reference copy (whole, on every GPU);
#   lora: LoRA adapters (saved as adapter/); adapters: LoRA with the policy's adapters switched off
#   as the reference (scored through the engine).
declare -A EXTRA=([plain]="" [copy]="--reference copy" [lora]="--lora" [adapters]="--lora --reference disable-adapters")
for variant in $VARIANTS; do
  CUDA_VISIBLE_DEVICES=0 train "one-gpu-$variant" "$BATCH" "${EXTRA[$variant]}" $PY -m prefalign.cli
  CUDA_VISIBLE_DEVICES="" train "cpu-$variant" "$BATCH" "${EXTRA[$variant]}" $PY -m prefalign.cli
  for engine in $ENGINES; do
    if [[ $engine == deepspeed* ]] && ! $PY -c "import deepspeed" 2>/dev/null; then
      echo "$engine-$variant skipped: deepspeed is not installed" >> "$OUT/skipped.txt"; continue
    fi
    train "$engine-$variant" $((BATCH / GPUS)) "${EXTRA[$variant]}" $PY -m accelerate.commands.launch \
      --config_file "recipes/accelerate/$engine.yaml" --num_processes "$GPUS" -m prefalign.cli
  done
done

# Generation with vLLM: one engine, its tensor parallelism over the GPUs (the largest size up to
# GPUS that divides the model's attention heads), against one GPU; the same prompts and seed.
if $PY -c "import vllm" 2>/dev/null; then
  TP=$($PY - "$MODEL" "$GPUS" <<'PY'
import sys
from transformers import AutoConfig
from prefalign.models.registry import resolve_model
config = AutoConfig.from_pretrained(resolve_model(sys.argv[1]))
heads, kv = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
print(max(t for t in range(1, int(sys.argv[2]) + 1) if heads % t == 0 and kv % t == 0))
PY
)
  for tp in $(printf '%s\n' 1 "$TP" | sort -un); do
    cat > "$OUT/vllm-tp$tp.yaml" <<YAML
strategy: prefix
prompts: {source: advbench, limit: 256}
models: ["$MODEL"]
backend: vllm
backend_options: {tensor_parallel_size: $tp}
max_new_tokens: 64
temperature: 0.7
seed: 0
output: $OUT/vllm-tp$tp.jsonl
YAML
    start=$SECONDS
    if $PY -m prefalign.cli generate --config "$OUT/vllm-tp$tp.yaml" -q > "$OUT/vllm-tp$tp.log" 2>&1; then
      echo "vllm-tp$tp $((SECONDS - start)) s, $(wc -l < "$OUT/vllm-tp$tp.jsonl") records" >> "$OUT/vllm.txt"
    else
      echo "vllm-tp$tp failed: see $OUT/vllm-tp$tp.log" | tee -a "$OUT/skipped.txt"
    fi
  done
else
  echo "vllm skipped: vllm is not installed" >> "$OUT/skipped.txt"
fi

$PY - "$OUT" "$GPUS" "$VARIANTS" "$ENGINES" <<'PY'
import json, sys
from pathlib import Path
from safetensors.torch import load_file
out, gpus, variants, engines = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3].split(), sys.argv[4].split()
times = dict(line.split() for line in (out / "times.txt").read_text().splitlines()) if (out / "times.txt").exists() else {}
def losses(run): return {r["step"]: r["loss"] for r in map(json.loads, (out / run / "train_log.jsonl").read_text().splitlines()) if "loss" in r}
def weights(run):  # the saved model, or with LoRA (no --merge) the adapter
    folder = out / run / "model"
    files = sorted((folder if folder.is_dir() else out / run / "adapter").glob("*.safetensors"))
    return {k: v for f in files for k, v in load_file(str(f)).items()}
print(f"{'run':22} {'GPUs':>4} {'max loss gap':>13} {'max weight gap':>15} {'wall s':>7}")
for variant in variants:
    base = f"one-gpu-{variant}"
    if base not in times:
        continue
    base_l, base_w = losses(base), weights(base)
    for engine in ("one-gpu", "cpu", *engines):
        run = f"{engine}-{variant}"
        if run not in times:
            continue
        l, w = losses(run), weights(run)
        # A saved model missing tensors (an empty ZeRO-3 save) is a failure, not a smaller comparison.
        missing, extra = sorted(base_w.keys() - w.keys()), sorted(w.keys() - base_w.keys())
        loss_gap = max(abs(base_l[s] - l[s]) for s in base_l) if l.keys() == base_l.keys() else float("nan")
        weight_gap = max((base_w[k].float() - w[k].float()).abs().max().item() for k in base_w if k in w)
        note = f"  MISSING {len(missing)} tensors, e.g. {missing[0]}" if missing else ""
        note += f"  EXTRA {len(extra)} tensors" if extra else ""
        note += "" if l.keys() == base_l.keys() else f"  logged steps differ ({len(l)} vs {len(base_l)})"
        print(f"{run:22} {gpus if engine not in ('one-gpu', 'cpu') else int(engine == 'one-gpu'):>4} {loss_gap:>13.2e} {weight_gap:>15.2e} {times[run]:>7}{note}")
for name in ("vllm.txt", "skipped.txt"):
    for line in (out / name).read_text().splitlines() if (out / name).exists() else []:
        print(line)
PY
