"""What the Pallas (Triton) kernels of `fused_mlp.py` and `fused_norm.py` share: row blocks, padded
widths, masks, and the check that Pallas' Triton lowering is here.

Each kernel's program takes `BLOCK_ROWS` token rows whole. Triton's tiles have power-of-two sides,
so a width such as D = 192 is read as 256 columns with the rest masked (loaded as zeros, never
stored), and rows past the end of the last block are masked the same way.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp

BLOCK_ROWS = 64  # token rows per program
# Columns of a weight multiplied at a time (the output columns of a product, or the hidden units of
# the MLP): a (256, 64) bfloat16 tile is 32 KiB, so both operands of a product fit the ~100 KiB of
# shared memory per block of the smaller Ampere and Ada GPUs (RTX 30xx/40xx, A10, L4), not only the
# A100's and H100's.
COLUMN_CHUNK = 64
# Untuned (no GPU has run these kernels): 8 warps spread each program's (64, 256) float32 tiles
# over 256 threads.
NUM_WARPS = 8


def pallas():
    """`(pl, plgpu)`: Pallas and its Triton module, imported when a kernel is built."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    return pl, plgpu


def padded(width: int) -> int:
    """The power-of-two tile side (at least 16, Triton's smallest product) that holds `width`."""
    return max(16, 1 << (width - 1).bit_length())


def row_mask(rows: int):
    """(BLOCK_ROWS, 1): which rows of this program's block exist."""
    pl, _ = pallas()
    first = pl.program_id(0) * BLOCK_ROWS
    return (first + jnp.arange(BLOCK_ROWS) < rows)[:, None]


def rounded(x, dtype):
    """`x` rounded to `dtype` and back to float32: where the XLA form stores a value."""
    return x.astype(dtype).astype(jnp.float32)


def row_factors(factor_ref, rows: int):
    """This program's rows' stochastic-depth factors, (BLOCK_ROWS, 1) float32; None for none."""
    if factor_ref is None:
        return None
    _, plgpu = pallas()
    return plgpu.load(factor_ref, mask=row_mask(rows)[:, 0], other=0.0)[:, None]


def without(kernel, absent: tuple[int, ...]):
    """`kernel` given None at the `absent` places of its refs (inputs, then outputs): the
    stochastic-depth factors and what only they need, when there is no stochastic depth."""
    if not absent:
        return kernel

    @functools.wraps(kernel)
    def wrapped(*refs, **params):
        refs = list(refs)
        for place in sorted(absent):
            refs.insert(place, None)
        return kernel(*refs, **params)

    return wrapped


def column_mask(tile: int, width: int):
    """(1, tile): which columns of a padded tile exist."""
    return (jnp.arange(tile) < width)[None, :]


def row_block(width: int):
    """BlockSpec of a (rows, width) array read BLOCK_ROWS rows at a time, padded columns."""
    pl, _ = pallas()
    return pl.BlockSpec((BLOCK_ROWS, padded(width)), lambda i: (i, 0))


def partial_sums(width: int):
    """BlockSpec of a (blocks, width) array of per-program partial column sums."""
    pl, _ = pallas()
    return pl.BlockSpec((None, padded(width)), lambda i: (i, 0))


def blocks(rows: int) -> int:
    return -(-rows // BLOCK_ROWS)


def group_blocks(group_rows) -> list[tuple[int, int]]:
    """(first block, blocks) of each crop group whose rows fill whole blocks (`groups_aligned`)."""
    out, first = [], 0
    for rows in group_rows:
        out.append((first, rows // BLOCK_ROWS))
        first += rows // BLOCK_ROWS
    return out


def groups_aligned(group_rows) -> bool:
    """Whether every group's rows start and end on a program's block, so a program holds one
    group's rows only (kernels that read or write each group's own buffers need it)."""
    return all(rows % BLOCK_ROWS == 0 for rows in group_rows)


def check_groups(rows: int, group_rows) -> None:
    """ValueError unless the groups fill whole blocks and add up to `rows`: a kernel given others
    would hand one program two groups' rows."""
    if not groups_aligned(group_rows) or sum(group_rows) != rows:
        raise ValueError(
            f"group rows {tuple(group_rows)} must fill whole blocks of {BLOCK_ROWS} rows and add up to "
            f"the {rows} rows given"
        )


def in_group(first: int, count: int):
    """Whether this program's rows are the group's whose blocks are `first .. first + count - 1`."""
    pl, _ = pallas()
    i = pl.program_id(0)
    return (i >= first) & (i < first + count)


def group_block(width: int, first: int, count: int):
    """BlockSpec of one group's (rows_g, width) buffer, addressed by the program's global block:
    clamped into the group, so programs of other groups point at some block of it and must leave
    it alone (their stores and loads are masked off)."""
    pl, _ = pallas()
    return pl.BlockSpec((BLOCK_ROWS, padded(width)), lambda i: (jnp.clip(i - first, 0, count - 1), 0))


def call(kernel, out_shape, in_specs, out_specs, rows: int, interpret: bool, **params):
    """`pallas_call` of `kernel` over the row blocks of `rows` rows, Triton's compiler settings."""
    pl, plgpu = pallas()
    return pl.pallas_call(
        functools.partial(kernel, rows=rows, **params),
        out_shape=out_shape,
        grid=(blocks(rows),),
        in_specs=in_specs,
        out_specs=out_specs,
        compiler_params=plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=2),
        interpret=interpret,
        name=kernel.__name__.strip("_"),
    )


# XLA compiles Triton kernels for Ampere and newer only ("Triton support is only enabled for Ampere
# GPUs"): compiled for a T4 description, every kernel here was refused.
MIN_COMPUTE_CAPABILITY = (8, 0)


def compute_capability(device) -> tuple[int, int] | None:
    """(major, minor) of a CUDA device's `compute_capability` ("8.6"); None where it has none."""
    parts = str(getattr(device, "compute_capability", "") or "").strip().split(".")
    return (int(parts[0]), int(parts[1])) if len(parts) == 2 and all(p.isdigit() for p in parts) else None


def gpus_too_old(devices) -> list:
    """The GPUs among `devices` that XLA will not compile Triton kernels for."""
    gpus = [device for device in devices if getattr(device, "platform", "") in ("gpu", "cuda")]
    return [device for device in gpus if (compute_capability(device) or (0, 0)) < MIN_COMPUTE_CAPABILITY]


@functools.cache
def triton_available() -> bool:
    """Whether Pallas' Triton lowering imports here (it ships with jaxlib; lowering needs no GPU)."""
    try:
        from jax._src.pallas.triton import pallas_call_registration  # noqa: F401
    except ImportError:
        return False
    return True
