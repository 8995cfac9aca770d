"""grain input pipelines: multi-crop training batches and padded evaluation batches.

Training stream, per host:

  source -> shuffle(seed) (a new permutation each epoch) -> repeat forever -> blocks of
  global_batch_size / shard_count -> every shard_count-th block from shard_index -> multi-crop
  (host) -> prefetch

Host h of n contributes rows [h*b, (h+1)*b) of every global batch (b = global_batch_size / n), and
builds the global array from them in that order (sharding.to_global_batch), so row r of step t is
always example t*global_batch_size + r of the stream: the batches, their row order and every
random draw keyed by a row are the same for any number of hosts, and a checkpoint's iterator
position (batches taken, the same on every host) resumes on another number of hosts.

The stream is a pure function of (seed, position), so grain's iterator state (a position) is
all a checkpoint needs to resume exactly. Host multi-crop runs after batching, on the whole host
batch at once (numpy is far faster on a batch than image by image), yet each example's crops
still come only from its own generator, keyed by (seed, position of the example in the global
stream): they do not depend on the batch size, the number of hosts or the number of workers.

Epochs are not cut at their boundaries: the stream is the concatenation of the epochs'
permutations, cut into batches, so every image appears once per `len(source)` examples and the
`num_examples % global_batch_size` images that torch's `drop_last` would skip are used in the
next batch instead.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import grain
import numpy as np

from dino_jax.data.multicrop import host, resize, spec

AUGMENT_PLACES = ("host", "device")


def example_rng(seed: int, position: int) -> np.random.Generator:
    """The generator of the example at `position` in the global training stream.

    Philox is counter-based: keys (position, seed) give independent streams, and building one
    costs microseconds, where hashing a SeedSequence per example would cost more than the crops.
    """
    return np.random.Generator(np.random.Philox(key=np.array([position, seed], np.uint64)))


def _with_position(position: int, example: dict[str, Any]):
    """Pairs an element of the global stream with its position in it."""
    return position, example["image"]


class _HostMultiCrop:
    """Batch of (positions, images) -> {"global_crops", "local_crops"}, uint8."""

    def __init__(self, config: spec.MultiCropConfig, seed: int):
        self.config = config
        self.seed = seed

    def __call__(self, batch):
        positions, images = batch
        rngs = [example_rng(self.seed, int(position)) for position in positions]
        global_crops, local_crops = host.multicrop_batch(images, rngs, self.config)
        return {"global_crops": global_crops, "local_crops": local_crops}


def _image_only(example: dict[str, Any]) -> np.ndarray:
    return example["image"]


def _as_image_batch(images: np.ndarray) -> dict[str, np.ndarray]:
    return {"image": images}


def _resolve_shard(shard_index: int | None, shard_count: int | None) -> tuple[int, int]:
    if shard_index is None or shard_count is None:
        import jax  # Only for the defaults: the pipeline itself runs without JAX.

        shard_index = jax.process_index() if shard_index is None else shard_index
        shard_count = jax.process_count() if shard_count is None else shard_count
    if not 0 <= shard_index < shard_count:
        raise ValueError(
            f"shard_index={shard_index} with shard_count={shard_count}: expected "
            "0 <= shard_index < shard_count"
        )
    return shard_index, shard_count


def train_dataset(
    source: Sequence[dict[str, Any]],
    crop_config: spec.MultiCropConfig,
    *,
    global_batch_size: int,
    seed: int,
    augment_on: str = "host",
    shard_index: int | None = None,
    shard_count: int | None = None,
    num_workers: int = 0,
    prefetch_batches: int = 2,
) -> grain.IterDataset:
    """The infinite, resumable training stream of this host's batches.

    Args:
      source: random access `{"image": uint8 (H, W, 3), "label": int}` (see sources.load_source).
      crop_config: the multi-crop recipe (used when augment_on="host").
      global_batch_size: images per step over all hosts; each host yields
        global_batch_size // shard_count of them.
      seed: shuffling and augmentation seed, in [0, 2**32).
      augment_on: "host" yields {"global_crops": uint8 (b, 2, G, G, 3), "local_crops": uint8
        (b, L, l, l, 3)}; "device" yields {"image": uint8 (b, H, W, 3)} for multicrop/device.py.
      shard_index, shard_count: this host's shard; default jax.process_index() / process_count().
      num_workers: worker processes for augmentation (0: in this process, in a thread).
      prefetch_batches: batches prepared ahead of the consumer.
    Returns:
      A grain IterDataset; `iter()` of it gives an iterator with get_state() / set_state().
    """
    if augment_on not in AUGMENT_PLACES:
        raise ValueError(f"augment_on={augment_on!r}: expected one of {AUGMENT_PLACES}")
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed={seed}: expected an integer in [0, 2**32)")
    if len(source) == 0:
        raise ValueError("the training source is empty")
    shard_index, shard_count = _resolve_shard(shard_index, shard_count)
    if global_batch_size % shard_count:
        raise ValueError(
            f"global batch size {global_batch_size} is not divisible by the "
            f"{shard_count} hosts reading the data"
        )
    host_batch_size = global_batch_size // shard_count

    stream = grain.MapDataset.source(source).shuffle(seed=seed).repeat()
    # Lazy: a host reads only the examples of its own blocks.
    if augment_on == "host":
        stream = stream.map_with_index(_with_position)
    else:
        stream = stream.map(_image_only)
    stream = stream.batch(host_batch_size, drop_remainder=True)[shard_index::shard_count]
    if augment_on == "host":
        stream = stream.map(_HostMultiCrop(crop_config, seed))
    else:
        stream = stream.map(_as_image_batch)
    # Each element is a whole batch: a few threads and a short buffer are enough to stay ahead.
    batches = stream.to_iter_dataset(
        grain.ReadOptions(num_threads=max(1, min(prefetch_batches, 4)), prefetch_buffer_size=prefetch_batches)
    )
    if num_workers > 0:
        # grain's workers read absl flags; outside an absl app (tests, notebooks) nothing parsed
        # them, and grain would fail on its first read. Their defaults are what we want.
        from absl import flags

        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        batches = batches.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=prefetch_batches)
        )
    return batches


def resize_images(images_NxHxWx3: np.ndarray, size: int) -> np.ndarray:
    """Bicubic, antialiased resize to (size, size), as PIL's `Image.resize(BICUBIC)` does it."""
    images = np.asarray(images_NxHxWx3)
    _, height, width, _ = images.shape
    if (height, width) == (size, size):
        return images
    planar = images.transpose(0, 3, 1, 2).astype(np.float32)
    rows = np.matmul(planar, resize.resize_matrix(width, size).T)
    rows = np.clip(np.floor(rows + 0.5), 0, 255)
    out = np.matmul(resize.resize_matrix(height, size), rows)
    out = np.clip(np.floor(out + 0.5), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(out.transpose(0, 2, 3, 1))


def eval_batches(
    source: Sequence[dict[str, Any]],
    *,
    batch_size: int,
    image_size: int,
    shard_index: int | None = None,
    shard_count: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """One ordered pass over `source` in global batches of `batch_size` rows, of which this host
    yields its block of `batch_size / shard_count` (b below).

    Yields {"image": uint8 (b, S, S, 3), "label": int32 (b,), "mask": bool (b,)}. The last batch
    is padded with zero images (mask False, label -1), so a jitted evaluator compiles once. Images
    of another size than `image_size` are resized (bicubic, antialiased). Host `shard_index` of
    `shard_count` (default: this process of all) reads rows [t*batch_size + shard_index*b, ... + b)
    of global batch t, and every host yields the same number of batches: the hosts' blocks in host
    order are the one-host batch, so the global arrays, the rows each device gets and the gathered
    order are the same for any number of hosts.
    """
    return _padded_batches(
        source,
        lambda images, rows: resize_images(images, image_size),
        batch_size=batch_size,
        image_size=image_size,
        shard_index=shard_index,
        shard_count=shard_count,
    )


# torchvision's RandomResizedCrop defaults, which the reference's linear probe trains with.
LINEAR_PROBE_CROP_SCALE = (0.08, 1.0)
LINEAR_PROBE_CROP_RATIO = (3 / 4, 4 / 3)
# A Philox counter word that keeps these draws apart from the training stream's (`example_rng`).
_LINEAR_PROBE_STREAM = 1


def linear_probe_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of the linear-probe view of image `index` (its row in the split) at `epoch`.

    Keyed like `example_rng`; the epoch and a stream tag sit in high counter words, which the
    few draws of one view never carry into, so every (seed, epoch, index) has its own numbers.
    """
    counter = np.array([0, 0, epoch, _LINEAR_PROBE_STREAM], np.uint64)
    return np.random.Generator(np.random.Philox(counter=counter, key=np.array([index, seed], np.uint64)))


def linear_probe_views(
    images_BxHxWx3: np.ndarray, rngs: Sequence[np.random.Generator], size: int
) -> np.ndarray:
    """The reference's linear-probe train transform: `RandomResizedCrop(size)` (torchvision's
    sampler, scale (0.08, 1), ratio (3/4, 4/3), PIL bicubic) then `RandomHorizontalFlip()`, image
    b drawn from `rngs[b]` alone. Returns uint8 (B, size, size, 3)."""
    images = np.asarray(images_BxHxWx3)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(
            f"linear_probe_views: expected uint8 images of shape (B, H, W, 3), got {images.dtype} {images.shape}"
        )
    if len(rngs) != len(images):
        raise ValueError(
            f"linear_probe_views: {len(rngs)} generators for {len(images)} images; expected one each"
        )
    _, height, width, _ = images.shape
    # One row of crop_boxes' uniforms per view, then one more uniform for the flip.
    uniforms = np.stack([rng.random(spec.NUM_UNIFORMS + 1) for rng in rngs])
    boxes = spec.crop_boxes(
        uniforms[:, : spec.NUM_UNIFORMS], height, width, LINEAR_PROBE_CROP_SCALE, LINEAR_PROBE_CROP_RATIO
    )
    flips = uniforms[:, -1] < 0.5
    planar = images.transpose(0, 3, 1, 2).astype(np.float32)
    crops = resize.resized_crops(planar, np.arange(len(images)), boxes, flips, size)
    return np.ascontiguousarray(crops.transpose(0, 2, 3, 1)).astype(np.uint8)


def linear_probe_batches(
    source: Sequence[dict[str, Any]],
    *,
    batch_size: int,
    image_size: int,
    seed: int,
    epoch: int,
    shard_index: int | None = None,
    shard_count: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """`eval_batches` with each image replaced by its `linear_probe_views` view for `epoch`: the
    rows, padding and sharding are the same, and the view of row i depends only on (seed, epoch, i)."""
    if not 0 <= seed < 2**64 or epoch < 0:
        raise ValueError(f"linear_probe_batches: seed={seed}, epoch={epoch}; expected both >= 0")

    def views(images, rows):
        return linear_probe_views(images, [linear_probe_rng(seed, epoch, row) for row in rows], image_size)

    return _padded_batches(
        source,
        views,
        batch_size=batch_size,
        image_size=image_size,
        shard_index=shard_index,
        shard_count=shard_count,
    )


def _padded_batches(
    source: Sequence[dict[str, Any]],
    prepare: Callable[[np.ndarray, list[int]], np.ndarray],
    *,
    batch_size: int,
    image_size: int,
    shard_index: int | None,
    shard_count: int | None,
) -> Iterator[dict[str, np.ndarray]]:
    """The batching of `eval_batches`; `prepare(images, rows)` makes the (b, S, S, 3) images of
    the source rows `rows`."""
    if batch_size <= 0:
        raise ValueError(f"batch_size={batch_size}: expected > 0")
    shard_index, shard_count = _resolve_shard(shard_index, shard_count)
    if batch_size % shard_count:
        raise ValueError(
            f"evaluation batch size {batch_size} is not divisible by the {shard_count} hosts reading the data"
        )
    host_batch_size = batch_size // shard_count
    num_examples = len(source)
    for start in range(0, max(num_examples, 1), batch_size):
        first = start + shard_index * host_batch_size
        indices = list(range(first, min(first + host_batch_size, num_examples)))
        image_batch = np.zeros((host_batch_size, image_size, image_size, 3), np.uint8)
        labels = np.full(host_batch_size, -1, np.int32)
        if indices:
            if hasattr(source, "__getitems__"):
                examples = source.__getitems__(indices)
            else:
                examples = [source[i] for i in indices]
            image_batch[: len(examples)] = prepare(
                np.stack([np.asarray(ex["image"], np.uint8) for ex in examples]), indices
            )
            labels[: len(examples)] = [int(ex["label"]) for ex in examples]
        mask = np.arange(host_batch_size) < len(indices)
        yield {"image": image_batch, "label": labels, "mask": mask}
