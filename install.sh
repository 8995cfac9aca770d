#!/usr/bin/env bash
# Installs dino_jax's pinned dependencies into the current Python environment, with the JAX build
# for the machine's accelerator.
#   bash install.sh              runtime (training, evaluation, dataset preparation)
#   bash install.sh dev          runtime + test extras (pytest, CPU torch for the parity tests),
#                                libtpu in a private folder for the TPU compile test and, where
#                                apt-get may run (root or password-less sudo), Debian's chromium for
#                                the report's browser test
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
dev=0
choice=()
for arg in "$@"; do
  if [ "$arg" = "--dry-run" ]; then dry_run=1; else choice+=("$arg"); fi
  if [ "$arg" = "dev" ]; then dev=1; fi
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
# The TPU compile test (tests/test_aot_tpu.py) compiles the train step for TPUs that are not here,
# which needs libtpu. Outside a TPU VM it goes into a private folder (dino_jax/aot.py's
# LIBTPU_CACHE_DIR, which finds it there), not into this environment: installed here, every JAX start
# would try the TPU plugin and print its errors, and dino_jax/host_memory.py would see an accelerator
# plugin. The version is requirements-tpu.txt's (tests/test_package.py checks aot.py agrees).
if [ "$dev" = 1 ]; then
  libtpu_version=$(sed -n 's/^libtpu==\([^ #]*\).*/\1/p' requirements-tpu.txt)
  if [ -z "$libtpu_version" ]; then
    echo "install.sh: error: no 'libtpu==<version>' line in requirements-tpu.txt" >&2
    exit 1
  fi
  libtpu_dir="$HOME/.cache/dino_jax/libtpu-$libtpu_version"
  # --upgrade: a folder left half-filled by an interrupted install is replaced, not kept.
  libtpu_install=(python -m pip install -q --no-deps --upgrade --target "$libtpu_dir" "libtpu==$libtpu_version")
  if [ "$dry_run" = 1 ]; then
    echo "${libtpu_install[*]}  # only if \`import libtpu\` fails and $libtpu_dir has no libtpu.so"
  elif python -c "import libtpu" >/dev/null 2>&1; then
    echo "install.sh: using the libtpu already installed here" >&2
  elif [ -f "$libtpu_dir/libtpu/libtpu.so" ]; then
    echo "install.sh: using libtpu $libtpu_version in $libtpu_dir" >&2
  else
    echo "install.sh: installing libtpu $libtpu_version into $libtpu_dir (the TPU compile test's; not importable here)" >&2
    "${libtpu_install[@]}"
  fi
fi
# The test of the run report opens report.html in a real headless browser (tests/test_launch.py);
# it is skipped where no Chromium is found, and fails under CI=true, so CI gets it here.
if [ "$dev" = 1 ]; then
  if command -v chromium >/dev/null || command -v chromium-browser >/dev/null || command -v google-chrome >/dev/null; then
    echo "install.sh: using the Chromium already installed here" >&2
  elif ! command -v apt-get >/dev/null; then
    echo "install.sh: no Chromium and no apt-get: the report's browser test will be skipped" >&2
  else
    sudo=()
    if [ "$(id -u)" != 0 ]; then sudo=(sudo -n); fi
    if [ "$dry_run" = 1 ] || [ "$(id -u)" = 0 ] || sudo -n true 2>/dev/null; then
      apt_install=(env DEBIAN_FRONTEND=noninteractive ${sudo[@]+"${sudo[@]}"} apt-get install -y -q --no-install-recommends chromium)
      if ! run "${apt_install[@]}"; then
        run ${sudo[@]+"${sudo[@]}"} apt-get update -q && run "${apt_install[@]}" ||
          echo "install.sh: could not install chromium: the report's browser test will be skipped" >&2
      fi
    else
      echo "install.sh: no Chromium, and apt-get needs root: the report's browser test will be skipped" \
        "(sudo apt-get install chromium runs it)" >&2
    fi
  fi
fi
