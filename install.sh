#!/usr/bin/env bash
# Installs dino_jax's pinned dependencies into the current Python environment.
#   bash install.sh        runtime (training, evaluation, dataset preparation)
#   bash install.sh dev    runtime + test extras (pytest, CPU torch for the parity tests)
# TensorFlow is installed only when the environment has none: Colab ships its own, and a second
# copy (tensorflow-cpu beside tensorflow) breaks both.
set -euo pipefail
cd "$(dirname "$0")"
python -m pip install -q --upgrade pip
if [ "${1:-}" = "dev" ]; then
  python -m pip install -q -r requirements-dev.txt
else
  python -m pip install -q -r requirements.txt
fi
if python -c "import tensorflow" >/dev/null 2>&1; then
  echo "install.sh: using the TensorFlow already installed here"
else
  python -m pip install -q -r requirements-tf.txt
fi
