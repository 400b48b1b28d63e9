#!/usr/bin/env bash
# Issue 15, the GPU half: one GPU x batch B against N GPUs x B/N under DDP, FSDP (full shard) and
# DeepSpeed ZeRO-2/3, with the shipped recipes/accelerate configs. Prints, per engine, the largest
# per-step loss gap and final-weight gap to the one-GPU run, and the wall time.
# Needs >= 2 GPUs; DeepSpeed rows are skipped unless `import deepspeed` works.
#   bash benchmarks/distributed_gpu.sh                 # all visible GPUs, smollm2-135m-instruct
#   GPUS=4 MODEL=tiny-random STEPS=8 bash benchmarks/distributed_gpu.sh
# Not yet run: no multi-GPU machine was available when it was written (see README, "Running on many GPUs").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
GPUS=${GPUS:-$($PY -c "import torch; print(torch.cuda.device_count())")}
MODEL=${MODEL:-smollm2-135m-instruct}
STEPS=${STEPS:-16}
BATCH=${BATCH:-16}            # the global batch; each of the N GPUs gets BATCH / N
OUT=${OUT:-runs/distributed-gpu}
[ "$GPUS" -ge 2 ] || { echo "needs at least 2 GPUs (found $GPUS)"; exit 2; }
[ $((BATCH % GPUS)) -eq 0 ] || { echo "BATCH=$BATCH must be a multiple of GPUS=$GPUS"; exit 2; }
rm -rf "$OUT"; mkdir -p "$OUT"

$PY - "$OUT/pairs.jsonl" <<'PY'
import json, sys
rows = [{"id": f"p{i}", "prompt": f"Question {i}: what is {i} plus {i}?", "chosen": f"{i} plus {i} is {2 * i}.",
         "rejected": f"I think it is {2 * i + 1}, or maybe not."} for i in range(256)]
open(sys.argv[1], "w").write("".join(json.dumps(r) + "\n" for r in rows))
PY

train() {  # name, per-process batch size, launcher args...
  local name=$1 batch=$2; shift 2
  local start=$SECONDS
  if "$@" train --model "$MODEL" --data "$OUT/pairs.jsonl" -o "$OUT/$name" --max-steps "$STEPS" --batch-size "$batch" \
      --lr 1e-5 --seed 0 --dtype float32 --save-every "$STEPS" --quiet > "$OUT/$name.log" 2>&1; then
    echo "$name $((SECONDS - start))" >> "$OUT/times.txt"
  else
    echo "$name failed: see $OUT/$name.log" | tee -a "$OUT/skipped.txt"
  fi
}

CUDA_VISIBLE_DEVICES=0 train one-gpu "$BATCH" $PY -m prefalign.cli
for engine in ddp fsdp deepspeed-zero2 deepspeed-zero3; do
  if [[ $engine == deepspeed* ]] && ! $PY -c "import deepspeed" 2>/dev/null; then
    echo "$engine skipped: deepspeed is not installed" >> "$OUT/skipped.txt"; continue
  fi
  train "$engine" $((BATCH / GPUS)) $PY -m accelerate.commands.launch --config_file "recipes/accelerate/$engine.yaml" \
    --num_processes "$GPUS" -m prefalign.cli
done

$PY - "$OUT" "$GPUS" <<'PY'
import json, sys
from pathlib import Path
from safetensors.torch import load_file
out, gpus = Path(sys.argv[1]), int(sys.argv[2])
times = dict(line.split() for line in (out / "times.txt").read_text().splitlines())
def losses(run): return {r["step"]: r["loss"] for r in map(json.loads, (out / run / "train_log.jsonl").read_text().splitlines()) if "loss" in r}
def weights(run):
    files = sorted((out / run / "model").glob("*.safetensors"))
    return {k: v for f in files for k, v in load_file(str(f)).items()}
base_l, base_w = losses("one-gpu"), weights("one-gpu")
print(f"{'run':16} {'GPUs':>4} {'max loss gap':>13} {'max weight gap':>15} {'wall s':>7}")
for run in ["one-gpu", "ddp", "fsdp", "deepspeed-zero2", "deepspeed-zero3"]:
    if run not in times:
        continue
    l, w = losses(run), weights(run)
    loss_gap = max(abs(base_l[s] - l[s]) for s in base_l)
    weight_gap = max((base_w[k].float() - w[k].float()).abs().max().item() for k in base_w if k in w)
    print(f"{run:16} {1 if run == 'one-gpu' else gpus:>4} {loss_gap:>13.2e} {weight_gap:>15.2e} {times[run]:>7}")
for line in (out / "skipped.txt").read_text().splitlines() if (out / "skipped.txt").exists() else []:
    print(line)
PY
