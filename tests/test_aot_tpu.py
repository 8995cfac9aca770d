"""The train step of both recipes, shrunk, compiled for Colab's TPU kinds (v5e-1, v6e-1 and v2-8,
whose 8 cores split the batch) on this machine without a TPU (dino_jax/aot.py), so that a change
that no longer compiles for a TPU, or loses its sharding or donation there, fails here.

One child process compiles all six: libtpu stays out of pytest's own process (its plugin, once
loaded, could change what the other tests see), and JAX and libtpu start once. libtpu is the copy
`bash install.sh dev` puts in a private folder (or a TPU VM's own): without it the tests are
skipped, and fail under CI=true, so a broken install cannot pass as green.

The variant is smaller than the recipes' `:smoke`: the TPU compiler's time grows with the images
per device and the crops (a `:smoke` step, batch 32 with 8 local crops, took ~100 s per target on
the loaded 2-core box, 8 images with 2 crops ~40 s, 2 images ~25 s), and what breaks a TPU
compilation does not depend on them. XLA's optimisations stay
on (no `jax_disable_most_optimizations`): the TPU passes are what is checked, and turning them off
saved nothing here (42 s against 44 s for two targets).
"""

import json
import os
import re
import subprocess
import sys

import pytest

from dino_jax import aot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGETS = ("v5e-1", "v6e-1", "v2-8")
RECIPES = ("cifar100", "tiny_imagenet")
# What each target's devices call themselves (jax.Device.device_kind).
DEVICE_KINDS = {"v5e-1": "TPU v5 lite", "v6e-1": "TPU v6 lite", "v2-8": "TPU v2"}
NUM_DEVICES = {"v5e-1": 1, "v6e-1": 1, "v2-8": 8}
COLLECTIVES = ("all-reduce", "reduce-scatter", "all-gather", "all-to-all")


def small_variant(recipe: str, num_devices: int):
    """The recipe (its crops, augmentation on the device, bf16) on a 1-block 32-d model, 2 images
    per device and 2 local crops."""
    from dino_jax.configs import cifar100, tiny_imagenet

    config = {"cifar100": cifar100, "tiny_imagenet": tiny_imagenet}[recipe].get_config("smoke")
    config.model.dtype = "bfloat16"  # what model.dtype=auto picks on a TPU
    config.augment.on = "device"
    config.model.embed_dim, config.model.depth, config.model.num_heads = 32, 1, 2
    config.head.out_dim, config.head.hidden_dim, config.head.bottleneck_dim = 256, 64, 32
    config.augment.num_local_crops = 2
    config.train.batch_size = 2 * num_devices
    return config


def compile_row(target_name: str, recipe: str) -> dict:
    """Child process: compiles one row and returns what the tests check (JSON-ready)."""
    import jax

    from dino_jax.data import sources

    spec = aot.target(target_name)
    step = aot.compile_train_step(
        small_variant(recipe, NUM_DEVICES[target_name]), spec, sources.DATASETS[recipe].num_train
    )
    compiled = step.compiled
    (state_in, batch_in), _ = compiled.input_shardings
    state_out, metrics_out = compiled.out_info
    devices = set().union(*(s.device_set for s in jax.tree.leaves((state_in, batch_in))))
    memory = step.memory

    def shapes(tree):
        return [f"{x.shape}{x.dtype}" for x in jax.tree.leaves(tree)]

    text = compiled.as_text()
    return {
        "platforms": sorted({d.platform for d in devices}),
        "device_kinds": sorted({d.device_kind for d in devices}),
        "num_devices": len(devices),
        "batch_specs": sorted({str(s.spec) for s in jax.tree.leaves(batch_in)}),
        # TPU layouts carry tiles (`T(8,128)`); a program compiled for the CPU has none.
        "tpu_tiled_layouts": text.count("T(8,128)"),
        "collectives": {op: len(re.findall(rf" {op}(-start)?\(", text)) for op in COLLECTIVES},
        "state_out_matches_in": shapes(state_out) == shapes(compiled.args_info[0][0]),
        "metrics": {k: f"{v.shape}{v.dtype}" for k, v in metrics_out.items()},
        "argument_bytes": memory.argument_size_in_bytes,
        "output_bytes": memory.output_size_in_bytes,
        "alias_bytes": memory.alias_size_in_bytes,
        "temp_bytes": memory.temp_size_in_bytes,
        "device_bytes": step.device_bytes(),
        "hbm_bytes": spec.hbm_bytes,
        "fits": step.fits(),
        "compile_s": round(step.compile_s, 1),
    }


def compile_all() -> dict:
    """Child process: every target x recipe; a row that fails keeps its error and the rest go on."""
    import jax

    jax.config.update("jax_platforms", "cpu")  # libtpu only describes the TPUs
    rows = {}
    for target_name in TARGETS:
        for recipe in RECIPES:
            try:
                rows[f"{target_name}/{recipe}"] = compile_row(target_name, recipe)
            except Exception as error:  # reported by the test of that row
                rows[f"{target_name}/{recipe}"] = {"error": f"{type(error).__name__}: {error}"[-3000:]}
    return rows


@pytest.fixture(scope="module")
def compiled_rows():
    if aot.tpu_library_path() is None:
        message = (
            f"needs libtpu {aot.LIBTPU_VERSION}, installed or in {aot.LIBTPU_CACHE_DIR} "
            "(`bash install.sh dev` puts it there)"
        )
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true: {message}")
        pytest.skip(message)
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        # libtpu refuses a second process on the machine (its lockfile) unless told to: a bench
        # compiling for a TPU beside the tests is no reason to fail them. No chip is opened here.
        "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
    }
    env.pop("JAX_DISABLE_MOST_OPTIMIZATIONS", None)
    done = subprocess.run(
        [sys.executable, "-m", "tests.test_aot_tpu"],
        check=False,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert done.returncode == 0 and lines, done.stderr[-4000:]
    return json.loads(lines[-1])


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("target_name", TARGETS)
def test_the_train_step_compiles_for_the_tpu_and_fits(compiled_rows, target_name, recipe):
    row = compiled_rows[f"{target_name}/{recipe}"]
    assert "error" not in row, row.get("error")
    # Compiled for the described TPU, all its devices, the batch split over them.
    assert row["platforms"] == ["tpu"]
    assert row["device_kinds"] == [DEVICE_KINDS[target_name]]
    assert row["num_devices"] == NUM_DEVICES[target_name]
    assert row["batch_specs"] == ["P('data',)"]
    assert row["tpu_tiled_layouts"] > 0
    # The train step: the state comes back as it went in, with the metrics the hooks read.
    assert row["state_out_matches_in"]
    for name in ("loss", "grad_norm", "lr", "teacher_entropy"):
        assert row["metrics"][name] == "()float32", (name, row["metrics"])
    # The state is donated: the new state is written over the old one, not beside it.
    assert row["alias_bytes"] >= 0.9 * row["output_bytes"] > 0, row
    assert row["fits"] and 0 < row["device_bytes"] <= row["hbm_bytes"], row


@pytest.mark.parametrize("recipe", RECIPES)
def test_the_step_is_data_parallel_over_the_v2_8_cores(compiled_rows, recipe):
    row = compiled_rows[f"v2-8/{recipe}"]
    assert "error" not in row, row.get("error")
    # Each core's gradients are of its own images: they must be summed over the cores.
    assert row["collectives"]["all-reduce"] + row["collectives"]["reduce-scatter"] > 0, row["collectives"]
    # ... and each core holds what its own images need: about a v5e chip's with the same images
    # per device, not the whole batch's (train_step.crop_major keeps each core's crops on it).
    single = compiled_rows[f"v5e-1/{recipe}"]
    assert row["device_bytes"] < 2 * single["device_bytes"], (row["device_bytes"], single["device_bytes"])


if __name__ == "__main__":
    print(json.dumps(compile_all()))
