"""The compute dtype of a run: `model.dtype="auto"` (the default) resolved once, at the start, to
the fastest safe dtype of the devices the run finds, the way the reference's users had PyTorch's
AMP on by default.

| device | auto |
|---|---|
| TPU | bfloat16 |
| NVIDIA GPU of compute capability 8.0 and up (A100, L4, H100, H200) | bfloat16 |
| NVIDIA GPU of compute capability 7.x (V100, T4: no bfloat16) | float16, loss scaling (`loss_scale.py`) |
| CPU, older or unknown GPUs, anything else | float32 |

A resumed run keeps the dtype its workdir's `config.json` records: the train state's structure
depends on it (float16's carries a loss scale), so a run started on a T4 and resumed on an A100
restores its checkpoint instead of failing. The resolved dtype is what `config.json` records, so
evaluation, report and resume of a workdir read a concrete dtype; a model is never built for "auto"
(`config.vit_config` refuses it).

A module of its own rather than part of `accelerator.py`: that one decides which JAX build to
install and must import nothing but the standard library (`install.sh` runs it before JAX is
there); this one is a decision about a config, made with JAX's own device objects. The decision
(`resolve`) is a pure function of the device list, so tests fake devices.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import ml_collections

from dino_jax import config as config_lib

# The best dtype of a device, from the safest to the fastest: devices of several kinds in one run
# get the safest of their choices (a float32-only device rules out the others).
SAFEST_FIRST = ("float32", "float16", "bfloat16")
BFLOAT16_MIN_COMPUTE_CAPABILITY = (8, 0)  # Ampere: bfloat16 tensor cores
FLOAT16_MIN_COMPUTE_CAPABILITY = (7, 0)  # Volta: float16 tensor cores


@dataclasses.dataclass(frozen=True)
class Resolution:
    dtype: str  # float32 | bfloat16 | float16: what the run computes in
    requested: str  # config.model.dtype as given: "auto" or one of the above
    recorded: str | None  # the dtype the workdir's config.json records, None without one
    reason: str  # why, for the log line

    @property
    def line(self) -> str:
        """`compute dtype: bfloat16 (model.dtype=auto on NVIDIA H100 80GB HBM3, compute capability 9.0)`"""
        scaling = " with dynamic loss scaling" if self.dtype == "float16" else ""
        return f"compute dtype: {self.dtype}{scaling} ({self.reason})"


def _compute_capability(device) -> tuple[int, int] | None:
    """(major, minor) of a CUDA device's `compute_capability` ("9.0"); None where it has none."""
    match = re.fullmatch(r"\s*(\d+)\.(\d+)\s*", str(getattr(device, "compute_capability", "") or ""))
    return (int(match[1]), int(match[2])) if match else None


def device_dtype(device) -> str:
    """The fastest safe compute dtype of one device (a `jax.Device`, or anything with its
    `platform` and, on CUDA, `compute_capability`)."""
    platform = str(getattr(device, "platform", "")).lower()
    if platform == "tpu":
        return "bfloat16"
    if platform in ("gpu", "cuda"):
        capability = _compute_capability(device)  # a ROCm device has none: float32, as unknown
        if capability is not None and capability >= BFLOAT16_MIN_COMPUTE_CAPABILITY:
            return "bfloat16"
        if capability is not None and capability >= FLOAT16_MIN_COMPUTE_CAPABILITY:
            return "float16"
    return "float32"


def auto_dtype(devices: Sequence) -> str:
    """The dtype "auto" gives on `devices`: the safest of their own choices; float32 for none."""
    chosen = {device_dtype(device) for device in devices}
    return next((dtype for dtype in SAFEST_FIRST if dtype in chosen), "float32")


def describe_devices(devices: Sequence) -> str:
    """`NVIDIA H100 80GB HBM3, compute capability 9.0`, `TPU v5 lite`, `the CPU`: each kind of
    device once, in the order found."""
    kinds: list[str] = []
    for device in devices:
        if str(getattr(device, "platform", "")).lower() == "cpu":
            kind = "the CPU"
        else:
            kind = str(getattr(device, "device_kind", "")) or str(getattr(device, "platform", "a device"))
            capability = getattr(device, "compute_capability", None)
            if capability:
                kind += f", compute capability {capability}"
        if kind not in kinds:
            kinds.append(kind)
    return "; ".join(kinds) or "no devices"


def resolve(requested: str, devices: Sequence, recorded: str | None = None) -> Resolution:
    """The compute dtype for `config.model.dtype = requested` on `devices`, where the workdir's
    config.json records `recorded` (None: no config.json, a new run). An explicit dtype is used as
    given; "auto" is `recorded` where there is one, else `auto_dtype(devices)`."""
    if recorded == config_lib.AUTO_DTYPE:  # not written by a run (runs record the resolved dtype): no record
        recorded = None
    if requested != config_lib.AUTO_DTYPE:
        reason = f"model.dtype={requested}"
        if recorded is not None and recorded != requested:
            reason += f"; this workdir's run started in {recorded}"
        return Resolution(requested, requested, recorded, reason)
    by_device = auto_dtype(devices)
    if recorded is None:
        return Resolution(by_device, requested, None, f"model.dtype=auto on {describe_devices(devices)}")
    reason = "model.dtype=auto: kept as this workdir's run started (its config.json)"
    if by_device != recorded:
        reason += f"; a new run on {describe_devices(devices)} would get {by_device}"
    return Resolution(recorded, requested, recorded, reason)


def recorded_dtype(workdir: str) -> str | None:
    """The compute dtype `<workdir>/config.json` records; None where there is no config.json."""
    if not config_lib.has_run_config(workdir):
        return None
    return config_lib.load_run_config(workdir).model.dtype


def with_dtype(config: ml_collections.ConfigDict, dtype: str) -> ml_collections.ConfigDict:
    """A copy of `config` with `model.dtype = dtype` (the caller's config is left as it was)."""
    copy = config.copy_and_resolve_references()
    copy.model.dtype = dtype
    return copy


def resolved_config(
    config: ml_collections.ConfigDict, workdir: str | None = None, devices: Sequence | None = None
) -> tuple[ml_collections.ConfigDict, Resolution]:
    """A copy of `config` with a concrete `model.dtype` for `devices` (default `jax.devices()`) and
    the run in `workdir` (None: no workdir to keep the dtype of), and how it was chosen."""
    if devices is None:
        import jax

        devices = jax.devices()
    recorded = recorded_dtype(workdir) if workdir else None
    resolution = resolve(config.model.dtype, devices, recorded)
    return with_dtype(config, resolution.dtype), resolution


def pallas_kernels_for(
    config: ml_collections.ConfigDict, devices: Sequence | None = None
) -> tuple[ml_collections.ConfigDict, str | None]:
    """`model.pallas_kernels` for `devices` (default `jax.devices()`): the config, turned off (a
    copy) where a GPU is older than Ampere, and the line the run prints; None when it is off."""
    if not config.model.get("pallas_kernels", False):
        return config, None
    if devices is None:
        import jax

        devices = jax.devices()
    from dino_jax.models import triton_tiles  # XLA's Triton floor lives with the kernels

    gpus = [device for device in devices if device.platform in ("gpu", "cuda")]
    old = triton_tiles.gpus_too_old(devices)
    if old:
        copy = config.copy_and_resolve_references()
        copy.model.pallas_kernels = False
        return copy, (
            f"pallas kernels: off ({describe_devices(old)}: XLA compiles Pallas' Triton kernels for "
            f"compute capability 8.0 and up; the run takes XLA's kernels)"
        )
    if not gpus or config.model.dtype == "float32" or len(devices) > 1:
        return config, (
            "pallas kernels: requested, used only on one GPU in bfloat16/float16 "
            f"(this run: {describe_devices(devices)}, {config.model.dtype}); XLA's kernels here"
        )
    return config, f"pallas kernels: on ({describe_devices(gpus)})"


def check_resumable(resolution: Resolution, checkpoints: str) -> None:
    """Raises ConfigError when the checkpoints in `checkpoints`, written by a run in
    `resolution.recorded`, cannot be restored into a train state for `resolution.dtype`: float16's
    state carries a loss scale the others' lack. float32 <-> bfloat16 is allowed (the same state;
    only the compute changes)."""
    recorded, dtype = resolution.recorded, resolution.dtype
    if recorded is None or (recorded == "float16") == (dtype == "float16"):
        return
    raise config_lib.ConfigError(
        f"config.model.dtype = {resolution.requested!r}: the checkpoints in {checkpoints} were written "
        f"by a {recorded} run (its config.json), and a {dtype} train state cannot restore them "
        f"(float16's carries a loss scale, the other dtypes' do not). Continue it with "
        f"model.dtype=auto or {recorded}, or start a new --workdir"
    )
