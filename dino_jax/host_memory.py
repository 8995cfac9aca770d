"""Keeps freed host memory in the process for reuse, for runs on XLA:CPU (Linux, glibc).

Why: each execution of a jitted function on XLA:CPU allocates its temporary buffers as one block
(4.9 GB for the CIFAR step at batch 64) from an XLA worker thread and frees it at the end. glibc's
malloc serves a block that large with a fresh `mmap` (a worker thread's arena cannot hold it, and
blocks over 32 MB bypass the heap anyway) and returns it to the kernel on `free`, so every step
faults in and zeroes 4.9 GB of pages again: 1.24 million page faults and 2.2-2.5 s of kernel time
per step on a 2-core CPU, 6.5 s -> 5.6 s per step once the memory is kept (docs/benchmarks.md).
PyTorch's CPU step allocates in blocks small enough for the heap and does not pay this.

`keep_freed_host_memory` sets three `mallopt` parameters, the documented runtime form of the
`GLIBC_TUNABLES` `glibc.malloc.*` settings:
- `M_ARENA_MAX` 1: every thread allocates from the main heap (a thread's own arena is a 64 MB
  mapping, too small for the block, so it would `mmap` it anyway);
- `M_MMAP_MAX` 0: no allocation bypasses the heap;
- `M_TRIM_THRESHOLD` -1: free memory at the top of the heap is never given back to the kernel.
The process's resident memory then stays at its peak: the right trade for a CPU training run,
which needs that peak every step. Accelerator runs keep glibc's defaults (their large buffers
live on the device). A thread picks its arena at its first allocation, so this must run before
JAX starts its CPU client, i.e. before the first JAX computation or `jax.devices()`.
`DINO_JAX_HOST_MALLOC=default` leaves malloc alone.
"""

from __future__ import annotations

import ctypes
import os
import platform
from collections.abc import Mapping

from dino_jax import accelerator

OPT_OUT_VARIABLE = "DINO_JAX_HOST_MALLOC"
# <malloc.h>'s parameter numbers, and the values set.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
SETTINGS = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1))

# Set by the first `keep_freed_host_memory` call: None when the settings are in force, else why not.
_not_kept_because: str | None = None
_called = False


def runs_on_cpu(environ: Mapping[str, str], plugins: Mapping[str, str]) -> bool:
    """Whether JAX will run on the CPU, decided without starting JAX: JAX_PLATFORMS names the CPU
    first, or (unset) no GPU or TPU plugin package is installed."""
    asked = [name.strip() for name in environ.get("JAX_PLATFORMS", "").split(",") if name.strip()]
    if asked:
        return asked[0] == "cpu"
    return not plugins


def reason_not_to_keep(
    environ: Mapping[str, str], plugins: Mapping[str, str], system: str, libc: str
) -> str | None:
    """Why the malloc settings are *not* to be applied, or None when they are."""
    if environ.get(OPT_OUT_VARIABLE, "").lower() in ("default", "off", "0", "false"):
        return f"{OPT_OUT_VARIABLE}={environ[OPT_OUT_VARIABLE]}"
    if system != "Linux" or libc != "glibc":
        return f"not Linux with glibc ({system}, {libc or 'unknown libc'})"
    if not runs_on_cpu(environ, plugins):
        return "JAX runs on an accelerator"
    return None


def reason_not_to_keep_here() -> str | None:
    """`reason_not_to_keep` for this process: its environment, plugins, system and C library."""
    return reason_not_to_keep(
        os.environ, accelerator.installed_plugins(), platform.system(), platform.libc_ver()[0]
    )


def keep_freed_host_memory() -> bool:
    """Applies the settings when this process will run JAX on the CPU under glibc; True when they
    are in force. Call it before the first JAX computation; later calls change nothing."""
    global _called, _not_kept_because
    if not _called:
        _called = True
        _not_kept_because = reason_not_to_keep_here()
        if _not_kept_because is None:
            libc = ctypes.CDLL(None)  # the process's own symbols: glibc's mallopt
            # mallopt returns 1 on success; each setting is independent, so all are tried.
            refused = [param for param, value in SETTINGS if libc.mallopt(param, value) != 1]
            if refused:
                _not_kept_because = f"mallopt refused parameter(s) {refused}"
    return _not_kept_because is None


def describe() -> str:
    """One line for the trainer's log."""
    if not _called:
        return "host memory: glibc malloc defaults (keep_freed_host_memory was not called)"
    if _not_kept_because is None:
        return "host memory: freed memory kept for reuse (glibc malloc: one arena, no mmap, no trim)"
    return f"host memory: glibc malloc defaults ({_not_kept_because})"
