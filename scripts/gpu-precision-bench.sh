#!/usr/bin/env bash
# Training-step img/s of ResNet-18 (CIFAR stem, 32x32) at batch 256 in f32, mixed-bf16 and
# mixed-f16 on the first CUDA GPU, with a CUDA-enabled brisk (docs/gpu.md says how to
# build one). Usage:
#
#   scripts/gpu-precision-bench.sh [path/to/brisk]      # default: target/release/brisk
#
# Prints one line per precision and, at the end, the ratios to f32.
set -euo pipefail
BRISK=${1:-target/release/brisk}
if ! "$BRISK" bench step --help | grep -q -- "--device"; then
    echo "error: $BRISK has no --device flag; build it with --features cuda (docs/gpu.md)" >&2
    exit 1
fi
declare -A IMG
for p in f32 mixed-bf16 mixed-f16; do
    json=$("$BRISK" bench step --device cuda --batch 256 --steps 20 --warmup 5 --dtype "$p" --json)
    img=$(printf '%s' "$json" | python3 -c 'import json,sys; print(round(json.load(sys.stdin)["img_per_s"], 1))')
    IMG[$p]=$img
    echo "resnet18 cifar batch 256 $p: $img img/s"
done
python3 - "${IMG[f32]}" "${IMG[mixed-bf16]}" "${IMG[mixed-f16]}" <<'PY'
import sys
f32, bf16, f16 = map(float, sys.argv[1:])
print(f"mixed-bf16 / f32 = {bf16 / f32:.2f}, mixed-f16 / f32 = {f16 / f32:.2f}")
PY
