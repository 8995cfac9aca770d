#!/usr/bin/env bash
# Saves into .whl/ (ignored by git) the wheels bench/gpu_check.sh installs on a GPU machine that
# has no internet: the packages dino_jax imports on the synthetic-data training path that a CUDA
# image with jax, flax, optax, orbax, torch and torchvision usually lacks, at the pins of
# requirements-libs.txt. jax, flax, optax and orbax are not among them: the image's own CUDA-matched jax stays, and
# flax must be a release that matches it.
#   bash bench/gpu_wheels.sh              # for that machine's Python, 3.12 by default
#   GPU_PYTHON=3.11 bash bench/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python_version=${GPU_PYTHON:-3.12}
pin() {  # pin NAME -> NAME==VERSION from requirements-libs.txt
  grep -ih "^$1==" requirements-libs.txt || { echo "gpu_wheels: $1 is not pinned in requirements-libs.txt" >&2; exit 1; }
}
# grain's own needs that such images lack: portpicker (a version that installs on any Python 3).
wanted=("$(pin grain)" "$(pin array-record)" "$(pin ml-collections)" "$(pin dm-pix)" "portpicker==1.6.0")
rm -rf .whl && mkdir -p .whl
platforms=()
for n in 17 24 27 28; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
python -m pip download -q --no-deps --only-binary=:all: --python-version "$python_version" \
  --implementation cp "${platforms[@]}" --platform manylinux2014_x86_64 -d .whl "${wanted[@]}"
ls -1 .whl
du -sh .whl
