#!/usr/bin/env bash
# Training speed on this machine's accelerator, ours against the PyTorch reference, in one command:
#   bash bench/gpu_check.sh OUT_DIR [--cpu] [--only=cifar100,...] [other bench/gpu_check.py flags]
# Writes OUT_DIR/gpu_check.json and OUT_DIR/gpu_check.md; prints the table, then one JSON line.
#
# It runs with the Python environment it finds (a GPU image's own jax with CUDA, flax, optax,
# orbax, torch, torchvision). Packages that image lacks (grain, ml_collections, dm-pix, ...) are
# installed from the wheels that bench/gpu_wheels.sh saved in .whl/ on a machine with internet,
# into a private folder: nothing of the environment is replaced.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bash bench/gpu_check.sh OUT_DIR [--cpu] [more bench/gpu_check.py flags]}
shift
python=${PYTHON:-python3}
if ! "$python" -c "import grain, ml_collections, dm_pix" >/dev/null 2>&1; then
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "gpu_check: grain / ml_collections / dm_pix are not installed and .whl/ holds no wheels;" \
      "run 'bash bench/gpu_wheels.sh' on a machine with internet first, then bring .whl/ along" >&2
    exit 2
  fi
  site=$(mktemp -d /tmp/dino_jax_site.XXXX)
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
exec "$python" bench/gpu_check.py --out "$out" "$@"
