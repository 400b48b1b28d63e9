#!/usr/bin/env bash
# The checks that need a GPU, as one run that fits a short loan of a single-GPU machine with no
# network (about 7 minutes on an H100): prefalign's tests with CUDA visible, the distributed engines
# at one process against a plain GPU run and a CPU run (benchmarks/distributed_gpu.sh with GPUS=1),
# and the training benchmark against TRL's DPOTrainer on CUDA in bf16 (benchmarks/train_vs_trl.py)
# on a random model of SmolLM2-135M's shape. Each step has its own time limit, so one that hangs
# costs its limit and no more; every step's log and a summary land in $OUT (at most 6 files).
#
#   bash benchmarks/device_kit.sh          # here, once, with network: .whl/ and .device/ (~50 MB)
#   bash benchmarks/device_check.sh        # there, beside .whl/ and .device/; python3 with CUDA torch
#   PY=.venv/bin/python WHEELS=none GPUS=1 ENGINES=ddp TRL_ARGS="--steps 1 --batch-size 2 --pairs 4" \
#     bash benchmarks/device_check.sh      # a dry run on a CPU machine (TRL on its PYTHONPATH)
#
# vLLM is not part of it: its wheel (hundreds of MB, CUDA builds) does not travel with such a kit;
# where it is installed, benchmarks/distributed_gpu.sh also times vLLM generation.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-runs/device-check}
WORK=${WORK:-/tmp/prefalign-device-check}
ENGINES=${ENGINES:-fsdp deepspeed-zero3}
VARIANTS=${VARIANTS:-plain copy adapters}
WHEELS=${WHEELS:-.whl}  # none: use the packages $PY has
TRL_ARGS=${TRL_ARGS:---steps 8 --batch-size 8 --pairs 64}
mkdir -p "$OUT" && rm -rf "$WORK" && mkdir -p "$WORK"
SUMMARY=$OUT/summary.txt
: > "$SUMMARY"

if compgen -G "$WHEELS/*.whl" > /dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" "$WHEELS"/*.whl \
    > "$OUT/install.log" 2>&1 || { echo "installing $WHEELS/ failed: $OUT/install.log" | tee -a "$SUMMARY"; exit 2; }
  export PYTHONPATH=$WORK/site
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
# The kit's cache is copied: what the runs cache (reference log-probs, scores) stays out of the kit.
[ -d .device/cache ] && cp -r .device/cache "$WORK/cache" && export PREFALIGN_CACHE=$WORK/cache
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1

step() {  # name, seconds, command...: its output in $OUT/name.log, its exit status in the summary
  local name=$1 limit=$2 start=$SECONDS rc
  shift 2
  timeout --kill-after 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  echo "$name: exit $rc$([ $rc -eq 124 ] && echo " (stopped at its ${limit} s limit)") in $((SECONDS - start)) s" | tee -a "$SUMMARY"
}

step env 60 $PY - <<'PY'
import importlib, platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "none (CPU only)")
for name in ("transformers", "accelerate", "peft", "trl", "datasets", "pydantic", "deepspeed", "vllm"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as exc:  # noqa: BLE001 (what is missing is the finding)
        print(name, "not importable:", type(exc).__name__, str(exc).splitlines()[0][:120])
PY

# The quick test loop (the suite minus its slow, browser and server tests) with CUDA visible: the
# trainer, generation and evaluation pick the GPU where the tests do not pin a device.
step tests 240 $PY -m pytest -q -p no:cacheprovider -m "not slow and not browser and not server" -o addopts="-rfE" \
  --tb=short tests

# The engines at one process against a plain GPU run and a CPU run (losses and weights in fp32).
step engines 240 env GPUS="${GPUS:-1}" MODEL=tiny-random STEPS=4 BATCH=8 ENGINES="$ENGINES" VARIANTS="$VARIANTS" OUT="$WORK/engines" \
  PY="$PY" bash benchmarks/distributed_gpu.sh

# prefalign against TRL's DPOTrainer in bf16 on a random model of SmolLM2-135M's shape (the speed
# does not depend on the weights; the embedded model's weights do not travel with the kit).
if [ -d .device/smollm2-shape ]; then
  $PY - .device/smollm2-shape "$WORK/smollm2-shape-random" <<'PY' > "$WORK/random-model.log" 2>&1
import shutil, sys
from pathlib import Path
import torch
from transformers import AutoConfig, AutoModelForCausalLM
shape, target = Path(sys.argv[1]), Path(sys.argv[2])
torch.manual_seed(0)
AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(shape), dtype=torch.float32).save_pretrained(target)
for f in shape.iterdir():
    if f.name != "config.json":
        shutil.copy2(f, target / f.name)
PY
  # shellcheck disable=SC2086  # TRL_ARGS is a list of flags
  step train-vs-trl 150 $PY benchmarks/train_vs_trl.py --model "$WORK/smollm2-shape-random" --dtype bfloat16 $TRL_ARGS
else
  echo "train-vs-trl: skipped (no .device/smollm2-shape: run benchmarks/device_kit.sh first)" | tee -a "$SUMMARY"
fi
cat "$SUMMARY"
