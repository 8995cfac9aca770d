"""Frozen-backbone feature extraction: jitted, batched, sharded over the `data` mesh axis.

A feature function is `fn(params, images_uint8_BxHxWxC) -> features_BxF`; it normalises the pixels
and runs the backbone in one jitted call. Which parameters it gets (teacher, by default, or
student; restored or converted from PyTorch) is the caller's choice: nothing here knows the train
state.

Feature kinds, as the reference's evaluation scripts define them (docs/reference.md):
- `n_last_blocks=1, avgpool=False`: the final-norm CLS token (`eval_knn.py`), `F = D`.
- `n_last_blocks=n`: the CLS token of each of the last n blocks, each through the final norm,
  concatenated in block order (`eval_linear.py`), `F = n * D`.
- `avgpool=True` (only with `n_last_blocks=1`, as in the reference, whose reshape fails
  otherwise): CLS and the mean of the final-normed patch tokens, interleaved per channel
  `[cls_0, avg_0, cls_1, avg_1, ...]` as the reference's stack-and-reshape lays them out, so its
  linear classifiers apply unchanged. `F = 2 * D`.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from dino_jax import sharding
from dino_jax.data.normalize import IMAGENET_MEAN, IMAGENET_STD, normalize_images

FeatureFn = Callable[[Any, jax.Array], jax.Array]


def backbone_features(model, images_BxHxWxC, *, n_last_blocks: int = 1, avgpool: bool = False) -> jax.Array:
    """Features `(B, F)` of a `VisionTransformer` on normalised float images (see module doc)."""
    if n_last_blocks < 1:
        raise ValueError(f"n_last_blocks={n_last_blocks}; expected >= 1")
    if avgpool and n_last_blocks != 1:
        raise ValueError(
            f"avgpool=True with n_last_blocks={n_last_blocks}; the reference defines "
            "average-pooled patch tokens only with n_last_blocks=1"
        )
    if n_last_blocks == 1 and not avgpool:
        return model(images_BxHxWxC)
    blocks = model.intermediate_layers(images_BxHxWxC, n_last_blocks)
    cls_BxF = jnp.concatenate([tokens_BxTxD[:, 0] for tokens_BxTxD in blocks], axis=-1)
    if not avgpool:
        return cls_BxF
    patch_mean_BxD = jnp.mean(blocks[-1][:, 1:], axis=1)
    return jnp.stack([cls_BxF, patch_mean_BxD], axis=-1).reshape(cls_BxF.shape[0], -1)


@functools.partial(jax.jit, static_argnames=("graphdef", "mean", "std", "n_last_blocks", "avgpool"))
def _features(params, images_uint8_BxHxWxC, *, graphdef, mean, std, n_last_blocks, avgpool):
    model = nnx.merge(graphdef, params)
    images = normalize_images(images_uint8_BxHxWxC, mean, std)
    return backbone_features(model, images, n_last_blocks=n_last_blocks, avgpool=avgpool).astype(jnp.float32)


def make_feature_fn(
    graphdef,
    *,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    n_last_blocks: int = 1,
    avgpool: bool = False,
) -> FeatureFn:
    """Jitted `fn(params, images_uint8) -> float32 features (B, F)` for a ViT `graphdef`.

    `params` is the state from `nnx.split(model)` (or any pytree of the same structure, e.g. the
    teacher's). One compilation per input batch shape and feature kind: functions made again for
    an equal graphdef and settings (the next data set, the next evaluation) reuse it.
    """
    if avgpool and n_last_blocks != 1:
        raise ValueError(
            f"avgpool=True with n_last_blocks={n_last_blocks}; the reference defines "
            "average-pooled patch tokens only with n_last_blocks=1"
        )
    return functools.partial(
        _features,
        graphdef=graphdef,
        mean=tuple(float(m) for m in np.ravel(mean)),
        std=tuple(float(s) for s in np.ravel(std)),
        n_last_blocks=int(n_last_blocks),
        avgpool=bool(avgpool),
    )


def extract_features(
    feature_fn: FeatureFn,
    params,
    batches: Iterable[Mapping[str, Any]],
    *,
    mesh: jax.sharding.Mesh | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Runs `feature_fn` over `batches` and returns `(features (N, F) float32, labels (N,))`.

    Each batch is `{"image": uint8 (b, H, W, C), "label": (b,), "mask": (b,) bool}`, host-local;
    rows whose mask is false (the padding of a last, partial batch) are dropped, so keeping one
    batch shape costs no recompilation. With more than one device the batch is sharded over the
    mesh's `data` axis (the host-local batch size must then divide by the local device count) and
    the parameters are replicated. Without a mesh, one is built over all devices; a given mesh
    contributes its devices. On several
    hosts every host returns the rows of all hosts.
    """
    # Rebuilt with Auto axes whatever the caller's axis types (see `sharding.make_mesh`).
    mesh = sharding.make_mesh(None if mesh is None else list(mesh.devices.flat))
    batch_sharding = NamedSharding(mesh, P("data"))
    params = _replicated(params, NamedSharding(mesh, P()))
    local_devices = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
    feature_chunks, mask_chunks, label_chunks = [], [], []
    for batch in batches:
        images = np.asarray(batch["image"])
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(
                f"extract_features: batch images are {images.dtype} {images.shape}; "
                "expected uint8 (b, H, W, C)"
            )
        if images.shape[0] % local_devices:
            raise ValueError(
                f"extract_features: batch of {images.shape[0]} images does not split over "
                f"{local_devices} local devices; use a batch size divisible by it"
            )
        global_images = jax.make_array_from_process_local_data(batch_sharding, images)
        # Kept on device: the next batch is dispatched before this one is fetched.
        feature_chunks.append(feature_fn(params, global_images))
        mask_chunks.append(np.asarray(batch["mask"], bool))
        label_chunks.append(np.asarray(batch["label"]))
    if not feature_chunks:
        raise ValueError("extract_features: `batches` yielded no batch; expected at least one")
    if jax.process_count() > 1:
        # Every host gets every row (kNN and the probes need the whole split), in one gather at the
        # end rather than one per batch. The masks and labels are laid out on the mesh as the
        # features are, so their rows line up whatever the order of the mesh's devices.
        def as_global(chunks):
            return [jax.make_array_from_process_local_data(batch_sharding, chunk) for chunk in chunks]

        features, mask, labels = multihost_utils.process_allgather(
            _concatenate_rows(feature_chunks, as_global(mask_chunks), as_global(label_chunks)), tiled=True
        )
    else:
        features = np.concatenate([np.asarray(chunk) for chunk in feature_chunks])
        mask, labels = np.concatenate(mask_chunks), np.concatenate(label_chunks)
    mask = np.asarray(mask, bool)
    return np.asarray(features)[mask], np.asarray(labels)[mask]


def _replicated(params, sharding):
    """`params` replicated on every device of `sharding`'s mesh. On several processes, parameters
    held by this process alone (restored or converted, the same in every process) become global
    arrays from each process's copy: a device_put cannot move them to other hosts' devices."""
    if jax.process_count() == 1:
        return jax.device_put(params, sharding)

    def replicate(leaf):
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            return jax.device_put(leaf, sharding)  # already global (a train state's)
        return jax.make_array_from_process_local_data(sharding, np.asarray(leaf))

    return jax.tree.map(replicate, params)


@jax.jit
def _concatenate_rows(*lists_of_chunks):
    """Each list of global arrays concatenated along rows, in one compiled call."""
    return tuple(jnp.concatenate(chunks) for chunks in lists_of_chunks)
