"""dino_jax/host_memory.py: when the malloc settings apply, and that they stop XLA:CPU's temporary
buffers from being faulted in afresh on every call."""

import json
import os
import platform
import subprocess
import sys

import pytest

from dino_jax import host_memory

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLIBC_LINUX = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


@pytest.mark.parametrize(
    "environ, plugins, system, libc, applies",
    [
        ({}, {}, "Linux", "glibc", True),
        ({"JAX_PLATFORMS": "cpu"}, {"cuda12": "0.10.2"}, "Linux", "glibc", True),
        ({"JAX_PLATFORMS": " cpu ,cuda"}, {}, "Linux", "glibc", True),
        ({}, {"cuda12": "0.10.2"}, "Linux", "glibc", False),  # JAX will pick the GPU
        ({}, {"tpu": "0.0.30"}, "Linux", "glibc", False),
        ({"JAX_PLATFORMS": "cuda,cpu"}, {}, "Linux", "glibc", False),
        ({"DINO_JAX_HOST_MALLOC": "default"}, {}, "Linux", "glibc", False),
        ({"DINO_JAX_HOST_MALLOC": "Off"}, {}, "Linux", "glibc", False),
        ({}, {}, "Darwin", "", False),
        ({}, {}, "Linux", "musl", False),
    ],
)
def test_the_settings_apply_only_to_a_cpu_run_under_glibc(environ, plugins, system, libc, applies):
    reason = host_memory.reason_not_to_keep(environ, plugins, system, libc)
    assert (reason is None) == applies, reason


# Calls a jitted function with large temporaries (three 36 MB products, Eigen's packing buffers)
# six times and prints the minor page faults of each call.
FAULTS_SCRIPT = """
import json, resource, sys
from dino_jax import host_memory
kept = host_memory.keep_freed_host_memory()
import jax, jax.numpy as jnp

@jax.jit
def f(x):
    a = jnp.sin(x) @ x                    # each product is a (3072, 3072) float32 temporary: 36 MB
    b = jnp.cos(a) @ x
    c = jnp.tanh(b) @ a
    return (a * b).sum() + (c * jnp.exp(-a * a)).sum()

x = jnp.ones((3072, 3072), jnp.float32) / 3072
faults = []
for _ in range(6):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    jax.block_until_ready(f(x))
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"kept": kept, "faults": faults, "line": host_memory.describe()}))
"""


def faults_per_call(script: str = FAULTS_SCRIPT, **env) -> dict:
    environ = {
        k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", host_memory.OPT_OUT_VARIABLE)
    }
    environ.update(env, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    done = subprocess.run(
        [sys.executable, "-c", script], env=environ, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC_LINUX, reason="the settings are glibc malloc's")
def test_kept_memory_is_not_faulted_in_again_on_the_next_call():
    default = faults_per_call(DINO_JAX_HOST_MALLOC="default")
    kept = faults_per_call()
    assert not default["kept"] and "DINO_JAX_HOST_MALLOC=default" in default["line"]
    assert kept["kept"] and "freed memory kept for reuse" in kept["line"]
    # With glibc's defaults the temporaries come from fresh mappings on every call: ~470,000 faults
    # (one per 4 KiB page touched) here. Kept, a call reuses the heap earlier calls freed; the heap
    # may still grow over the first calls while concurrent thunks settle their order (0 or ~28,000
    # faults per call after the second, on a 2-core machine).
    assert min(default["faults"]) > 2000, default
    assert sum(kept["faults"][2:]) < sum(default["faults"][2:]) / 10, (kept, default)


# Each setting on its own: a worker thread (as XLA's are) allocates a block larger than glibc's
# int-sized trim limit (2.5 GiB), writes its first 256 MiB and frees it, three times; the faults of
# the last round are printed. Without one arena the block is a thread arena's fresh mapping, without
# `M_MMAP_MAX` 0 a main-heap mapping, and with a trim threshold below the block's size its pages go
# back to the kernel: each way, every written page faults again (65,536 of them).
MALLOC_SCRIPT = """
import ctypes, json, resource, threading
from dino_jax import host_memory
kept = host_memory.keep_freed_host_memory()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
faults = []

def rounds():
    for _ in range(3):
        block = libc.malloc(5 << 29)
        assert block, "malloc of 2.5 GiB failed"
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        libc.memset(block, 1, 1 << 28)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        libc.free(block)

worker = threading.Thread(target=rounds)
worker.start()
worker.join()
print(json.dumps({"kept": kept, "faults": faults}))
"""


@pytest.mark.skipif(not GLIBC_LINUX, reason="the settings are glibc malloc's")
def test_a_worker_threads_multi_gigabyte_block_stays_in_the_process():
    default = faults_per_call(script=MALLOC_SCRIPT, DINO_JAX_HOST_MALLOC="default")
    kept = faults_per_call(script=MALLOC_SCRIPT)
    pages = (1 << 28) // 4096
    # Defaults: a fresh mapping each round (fewer faults only if the kernel backs it with huge pages).
    assert not default["kept"] and min(default["faults"]) > pages // 1000, default
    assert kept["kept"] and kept["faults"][-1] < pages // 100, kept
