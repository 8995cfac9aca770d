"""Compiling the real train step for a GPU or TPU that is not here ("deviceless" compilation).

XLA compiles for a device it is only told about: an NVIDIA GPU from a target description (the
`target_config` text of `jax._src.lib.xla_client.get_topology_for_devices(...)` read off a real
GPU; the CUDA plugin must be installed, no GPU needed) or a TPU slice from its topology name (libtpu
must be loadable, no TPU needed). The state and the batch are shapes only, carrying their shardings
over the described devices, so the step's kernels, memory and fit can be read on a CPU machine: an
out-of-memory on the chip shows up here with the chip's own message (RESOURCE_EXHAUSTED). The idea
is MaxText's `train_compile.py`.

Traps, measured with jax 0.10.2:
- only inputs sharded over the described devices give an executable for them; lowering with
  `lowering_platforms=("cuda",)` alone compiles for the CPU without a word;
- the GPU description needs `target_config`; without it the CUDA plugin looks for a GPU and fails;
- TPU topology names are `<generation>:<chips>` (`v5e:1x1`, `v2:2x2x1`); an empty name silently
  describes 8 TPU v2 cores, and `v5litepod-1` is refused;
- no autotuning happens without the GPU, so matrix kernels get default tilings: kernel counts,
  fusion decisions and memory are the real ones, timings are not.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

TARGETS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "aot_targets")

# libtpu of requirements-tpu.txt; `tpu_library_path` finds it installed or in this private folder,
# where `bash install.sh dev` puts it (`pip install --target`), so that installing it does not
# turn this environment's JAX towards a TPU it does not have.
LIBTPU_VERSION = "0.0.42.1"
LIBTPU_CACHE_DIR = os.path.join("~", ".cache", "dino_jax", f"libtpu-{LIBTPU_VERSION}")


@dataclasses.dataclass(frozen=True)
class Target:
    """A device to compile for, and the datasheet figures its roofline uses."""

    name: str
    platform: str  # cuda | tpu
    description: str
    hbm_bytes: int  # per device
    memory_bandwidth: float  # bytes/s per device
    peak_bf16_flops: float  # dense matrix FLOP/s per device
    peak_fp32_flops: float  # float32 matrix FLOP/s (TF32 tensor cores on the GPU, as XLA uses them)
    topology_name: str = ""  # TPU: `<generation>:<chips>`
    chips_per_host_bounds: tuple[int, int, int] | None = None
    target_config_file: str = ""  # GPU: the description read off a real one, in TARGETS_DIR


GIB = 2**30
TARGETS: dict[str, Target] = {
    # H100 SXM: 3.35 TB/s HBM3, 989 TFLOP/s dense bf16, 494.7 TF32 (NVIDIA's datasheet).
    "h100": Target(
        "h100",
        "cuda",
        "NVIDIA H100 80GB HBM3 (SXM)",
        hbm_bytes=80 * GIB,
        memory_bandwidth=3.35e12,
        peak_bf16_flops=989e12,
        peak_fp32_flops=494.7e12,
        target_config_file="h100_sxm.txtpb",
    ),
    # A100 SXM 80 GB: 2.04 TB/s HBM2e, 312 TFLOP/s dense bf16, 156 TF32 (NVIDIA's datasheet).
    "a100": Target(
        "a100",
        "cuda",
        "NVIDIA A100-SXM4-80GB",
        hbm_bytes=80 * GIB,
        memory_bandwidth=2.039e12,
        peak_bf16_flops=312e12,
        peak_fp32_flops=156e12,
        target_config_file="a100_sxm.txtpb",
    ),
    # L4 (Colab's mid GPU): 300 GB/s GDDR6, 121 TFLOP/s dense bf16, 60 TF32 (NVIDIA's datasheet).
    "l4": Target(
        "l4",
        "cuda",
        "NVIDIA L4",
        hbm_bytes=24 * GIB,
        memory_bandwidth=300e9,
        peak_bf16_flops=121e12,
        peak_fp32_flops=60e12,
        target_config_file="l4.txtpb",
    ),
    # Colab's TPU kinds. Per chip (v2: per core, each a JAX device): HBM, bandwidth and bf16 peak
    # from Google's Cloud TPU system-architecture pages.
    "v5e-1": Target(
        "v5e-1",
        "tpu",
        "TPU v5e, 1 chip",
        hbm_bytes=16 * GIB,
        memory_bandwidth=819e9,
        peak_bf16_flops=197e12,
        peak_fp32_flops=197e12 / 4,
        topology_name="v5e:1x1",
        chips_per_host_bounds=(1, 1, 1),
    ),
    "v6e-1": Target(
        "v6e-1",
        "tpu",
        "TPU v6e (Trillium), 1 chip",
        hbm_bytes=32 * GIB,
        memory_bandwidth=1640e9,
        peak_bf16_flops=918e12,
        peak_fp32_flops=918e12 / 4,
        topology_name="v6e:1x1",
        chips_per_host_bounds=(1, 1, 1),
    ),
    "v2-8": Target(
        "v2-8",
        "tpu",
        "TPU v2-8, 4 chips = 8 cores",
        hbm_bytes=8 * GIB,
        memory_bandwidth=350e9,
        peak_bf16_flops=22.5e12,
        peak_fp32_flops=22.5e12 / 4,
        topology_name="v2:2x2x1",
    ),
}


def target(name: str) -> Target:
    if name not in TARGETS:
        raise ValueError(f"unknown compile target {name!r}; expected one of {sorted(TARGETS)}")
    return TARGETS[name]


def tpu_library_path() -> str | None:
    """libtpu.so: the `libtpu` package if installed, else the private copy in LIBTPU_CACHE_DIR."""
    try:
        import libtpu

        return libtpu.get_library_path()
    except ImportError:
        path = os.path.join(os.path.expanduser(LIBTPU_CACHE_DIR), "libtpu", "libtpu.so")
        return path if os.path.exists(path) else None


def devices(spec: Target) -> list:
    """The described devices: compile-only `jax.Device`s of `spec`'s platform."""
    from jax.experimental import topologies

    if spec.platform == "cuda":
        with open(os.path.join(TARGETS_DIR, spec.target_config_file)) as f:
            description = f.read()
        # Both keywords are required: without target_config the plugin looks for a local GPU.
        return list(
            topologies.get_topology_desc(platform="cuda", topology="1x1x1", target_config=description).devices
        )
    if spec.platform == "tpu":
        if os.environ.get("TPU_LIBRARY_PATH") is None:
            path = tpu_library_path()
            if path is None:
                raise RuntimeError(
                    f"compiling for {spec.name} needs libtpu {LIBTPU_VERSION}, found neither installed "
                    f"nor in {LIBTPU_CACHE_DIR}: `python -m pip install --no-deps --target "
                    f"{LIBTPU_CACHE_DIR} libtpu=={LIBTPU_VERSION}` (what `bash install.sh dev` runs)"
                )
            os.environ["TPU_LIBRARY_PATH"] = path
        # libtpu takes a lock file so that one process owns a TPU; compiling for a described one
        # owns nothing, and a second compiling process (a bench beside the tests) must not fail.
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        # libtpu reads these only to describe the machine it runs on; set, it stops warning.
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-1")
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
        kwargs = {}
        if spec.chips_per_host_bounds is not None:
            kwargs["chips_per_host_bounds"] = spec.chips_per_host_bounds
        return list(
            topologies.get_topology_desc(platform="tpu", topology_name=spec.topology_name, **kwargs).devices
        )
    raise ValueError(f"target {spec.name}: platform {spec.platform!r} is not cuda or tpu")


def abstract_batch(config: ml_collections.ConfigDict, mesh) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch the step takes, as shapes with the batch sharding (nothing is read)."""
    from dino_jax import config as config_lib, sharding

    a, b = config.augment, config.train.batch_size
    if a.on == "device":
        size = config_lib.stored_image_size(config)
        shapes = {"image": (b, size, size, 3)}
    else:
        shapes = {
            "global_crops": (b, 2, a.global_crop_size, a.global_crop_size, 3),
            "local_crops": (b, a.num_local_crops, a.local_crop_size, a.local_crop_size, 3),
        }
    batch_sharding = sharding.batch_sharding(mesh)
    return {k: jax.ShapeDtypeStruct(s, jnp.uint8, sharding=batch_sharding) for k, s in shapes.items()}


@dataclasses.dataclass
class CompiledStep:
    target: Target
    compiled: Any  # jax.stages.Compiled
    lower_s: float
    compile_s: float
    num_devices: int

    @property
    def memory(self):
        return self.compiled.memory_analysis()

    def device_bytes(self) -> int:
        """Bytes one device holds while the step runs: arguments, outputs not aliased to them,
        temporaries and generated code."""
        m = self.memory
        return (
            m.argument_size_in_bytes
            + m.output_size_in_bytes
            - m.alias_size_in_bytes
            + m.temp_size_in_bytes
            + m.generated_code_size_in_bytes
        )

    def fits(self) -> bool:
        return self.device_bytes() <= self.target.hbm_bytes


def compile_train_step(config: ml_collections.ConfigDict, spec: Target, num_train_examples: int):
    """The step `training_parts.build_training` makes for `config`, compiled for `spec`'s devices
    (all of them in the `data` mesh): a `CompiledStep`. Raises what XLA raises, e.g.
    RESOURCE_EXHAUSTED when it does not fit in the chip's memory."""
    from dino_jax import config as config_lib, config_validation, sharding, training_parts

    config_validation.validate(config)
    described = devices(spec)
    config_lib.check_divisible(config.train.batch_size, len(described))
    mesh = sharding.make_mesh(described)
    parts = training_parts.build_training(config, num_train_examples, mesh, abstract_state=True)
    started = time.perf_counter()
    lowered = parts.step_fn.trace(parts.state, abstract_batch(config, mesh)).lower()
    lower_s = time.perf_counter() - started
    started = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - started
    return CompiledStep(spec, compiled, lower_s, compile_s, len(described))
