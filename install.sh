#!/usr/bin/env bash
# Installs dino_jax's pinned dependencies into the current Python environment, with the JAX build
# for the machine's accelerator.
#   bash install.sh              runtime (training, evaluation, dataset preparation)
#   bash install.sh dev          runtime + test extras (pytest, CPU torch for the parity tests)
#   bash install.sh [dev] cpu|cuda12|cuda13|tpu
#                                force a JAX build instead of the one detected
#   bash install.sh --dry-run .. print the pip commands instead of running them
# Without a forced build, dino_jax/accelerator.py picks CUDA 13 or 12 from the NVIDIA driver's CUDA
# version, TPU on a TPU VM, CPU otherwise; a runtime whose own JAX already runs on its GPU/TPU
# (Colab) keeps it. It prints what it found and chose.
# TensorFlow is installed only when the environment has none: Colab ships its own, and a second
# copy (tensorflow-cpu beside tensorflow) breaks both.
set -euo pipefail
cd "$(dirname "$0")"
dry_run=0
choice=()
for arg in "$@"; do
  if [ "$arg" = "--dry-run" ]; then dry_run=1; else choice+=("$arg"); fi
done
run() {
  if [ "$dry_run" = 1 ]; then echo "$*"; else "$@"; fi
}
# The pip arguments for the runtime set (and test extras), e.g. "-r requirements-cuda12.txt".
# ${choice[@]+...}: an empty array is an unbound variable to bash < 4.4 under `set -u`.
pip_args_line=$(python -m dino_jax.accelerator ${choice[@]+"${choice[@]}"})
read -r -a pip_args <<<"$pip_args_line"
run python -m pip install -q --upgrade pip
run python -m pip install -q "${pip_args[@]}"
if [ "$dry_run" = 1 ]; then
  echo "python -m pip install -q -r requirements-tf.txt  # only if \`import tensorflow\` fails"
elif python -c "import tensorflow" >/dev/null 2>&1; then
  echo "install.sh: using the TensorFlow already installed here"
else
  python -m pip install -q -r requirements-tf.txt
fi
