"""Datasets and pipelines, read through the real code from real array_record TFDS datasets."""

import time

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from dino_jax.data import digits, normalize, pipeline, sources
from dino_jax.data.multicrop import spec
from tests.config_helpers import reference_crops

CROPS = reference_crops(global_size=32, local_size=16, num_local_crops=4)


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    """digits prepared once by the real builder (array_record) in a temporary data dir."""
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    sources.load_source("digits", "train", data_dir)
    return data_dir


def _indexed_source(count, size=8):
    """Images whose pixel (0, 0, 0) and label both hold the example's index (mod 256)."""
    examples = []
    for index in range(count):
        image = np.zeros((size, size, 3), np.uint8)
        image[0, 0, 0] = index % 256
        examples.append({"image": image, "label": index})
    return examples


# ----------------------------------------------------------------------------- normalize


def test_normalize_numpy_and_jax_agree_with_the_formula():
    images = np.random.RandomState(0).randint(0, 256, (2, 4, 4, 3)).astype(np.uint8)
    expected = (images / 255.0 - np.array(normalize.IMAGENET_MEAN)) / np.array(normalize.IMAGENET_STD)
    on_host = normalize.normalize_images(images, normalize.IMAGENET_MEAN, normalize.IMAGENET_STD)
    on_device = normalize.normalize_images(jnp.asarray(images))
    assert isinstance(on_host, np.ndarray) and on_host.dtype == np.float32
    assert on_device.dtype == jnp.float32
    np.testing.assert_allclose(on_host, expected, atol=1e-5)
    np.testing.assert_allclose(np.asarray(on_device), expected, atol=1e-5)
    # Zero-background scaling (configs/digits.py): mean 0, std 1 leaves x / 255.
    np.testing.assert_allclose(normalize.normalize_images(images, (0.0,), (1.0,)), images / 255.0, atol=1e-6)
    with pytest.raises(ValueError, match="std"):
        normalize.normalize_images(images, (0.5, 0.5, 0.5), (0.2, 0.0, 0.2))
    with pytest.raises(ValueError, match="mean has 2 entries"):
        normalize.normalize_images(images, (0.5, 0.5), (0.2,))


# ----------------------------------------------------------------------------- digits


def test_digits_builder_sizes_dtypes_and_split(digits_dir):
    train = sources.load_source("digits", "train", digits_dir)
    test = sources.load_source("digits", "test", digits_dir)
    assert (len(train), len(test)) == (1437, 360)
    example = train[0]
    assert example["image"].dtype == np.uint8 and example["image"].shape == (32, 32, 3)
    test_labels = np.array([test[i]["label"] for i in range(len(test))])
    assert test_labels.min() == 0 and test_labels.max() == 9
    # Stratified: every class holds 36 +- 1 of the 360 test images.
    assert np.abs(np.bincount(test_labels, minlength=10) - 36).max() <= 1
    # The stored images are exactly the upsampled scikit-learn images of the fixed split.
    from sklearn.datasets import load_digits

    raw = load_digits()
    split = digits.split_indices()
    expected = {
        (bytes(digits.upsample_digits(raw.images[[i]])[0].data), int(raw.target[i])) for i in split["test"]
    }
    stored = {(bytes(test[i]["image"].data), int(test[i]["label"])) for i in range(len(test))}
    assert stored == expected


def test_digits_split_and_pixels_are_fixed():
    first, second = digits.split_indices(), digits.split_indices()
    np.testing.assert_array_equal(first["test"], second["test"])
    assert len(np.intersect1d(first["train"], first["test"])) == 0
    assert len(first["train"]) + len(first["test"]) == 1797
    ink = np.zeros((1, 8, 8))
    ink[0, 3:5, 3:5] = 16  # Full ink: 255 inside the block, bilinear ramps around it.
    up = digits.upsample_digits(ink)
    assert up.shape == (1, 32, 32, 3) and up.dtype == np.uint8
    assert up[0, 14:18, 14:18].min() == 255 and 0 < up[0, 12, 15, 0] < 255
    assert (up[..., 0] == up[..., 2]).all()
    np.testing.assert_array_equal(digits.upsample_digits(np.zeros((1, 8, 8))), 0)


# ----------------------------------------------------------------------------- catalog datasets


def test_missing_catalog_dataset_offline_fails_fast_with_instructions(tmp_path, monkeypatch):
    # Force "offline" even on a machine with internet, so the test never downloads.
    monkeypatch.setattr(sources, "has_internet", lambda url, timeout_s=2.0: False)
    start = time.monotonic()
    with pytest.raises(sources.DatasetUnavailableError) as error:
        sources.load_source("cifar100", "train", str(tmp_path))
    assert time.monotonic() - start < 5
    message = str(error.value)
    for needle in (
        "cifar100",
        str(tmp_path),
        "tfds build cifar100",
        "array_record",
        "data_dir",
        "cifar-100-binary.tar.gz",
    ):
        assert needle in message


def test_internet_check_gives_up_within_its_timeout():
    start = time.monotonic()
    # 192.0.2.1 (TEST-NET-1) is never routed: the connection can only time out or be refused.
    assert not sources.has_internet("http://192.0.2.1:81/x", timeout_s=0.5)
    assert time.monotonic() - start < 2.0


def test_unknown_and_unsupported_datasets(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'imagenet2012'"):
        sources.load_source("imagenet2012", "train", str(tmp_path))
    assert sources.DATASETS["cifar100"].num_classes == 100
    assert sources.DATASETS["tiny_imagenet"].image_size == 64


def test_unknown_split(digits_dir):
    with pytest.raises(ValueError, match="no split 'validation'"):
        sources.load_source("digits", "validation", digits_dir)


# ----------------------------------------------------------------------------- training pipeline


def test_host_pipeline_batches_from_the_real_digits_source(digits_dir):
    source = sources.load_source("digits", "train", digits_dir)
    batches = iter(
        pipeline.train_dataset(source, CROPS, global_batch_size=8, seed=0, shard_index=0, shard_count=1)
    )
    batch = next(batches)
    assert set(batch) == {"global_crops", "local_crops"}
    assert batch["global_crops"].shape == (8, 2, 32, 32, 3)
    assert batch["local_crops"].shape == (8, 4, 16, 16, 3)
    assert batch["global_crops"].dtype == np.uint8 and batch["local_crops"].dtype == np.uint8


def test_device_pipeline_shards_are_disjoint_and_epochs_reshuffle():
    source = _indexed_source(24)

    def positions(shard_index, shard_count, batches):
        stream = iter(
            pipeline.train_dataset(
                source,
                CROPS,
                global_batch_size=4,
                seed=1,
                augment_on="device",
                shard_index=shard_index,
                shard_count=shard_count,
            )
        )
        return [next(stream)["image"][:, 0, 0, 0].tolist() for _ in range(batches)]

    whole = sum(positions(0, 1, 12), [])  # Two epochs of 24.
    assert sorted(whole[:24]) == list(range(24)) and sorted(whole[24:]) == list(range(24))
    assert whole[:24] != whole[24:] and whole[:24] != list(range(24))
    host0 = sum(positions(0, 2, 6), [])
    host1 = sum(positions(1, 2, 6), [])
    assert len(host0) == 12 and not set(host0) & set(host1)
    assert sorted(host0 + host1) == list(range(24))
    # Each host holds a contiguous half of every global batch: host 0 its first rows, host 1 the
    # rest, so the global array (hosts' rows in host order) is the one-host batch, row for row.
    assert host0 == [p for t in range(6) for p in whole[4 * t : 4 * t + 2]]
    assert host1 == [p for t in range(6) for p in whole[4 * t + 2 : 4 * t + 4]]


def test_crops_depend_on_the_example_not_on_batching_or_hosts():
    source = [
        {"image": np.random.RandomState(i).randint(0, 256, (24, 24, 3)).astype(np.uint8), "label": i}
        for i in range(16)
    ]
    config = reference_crops(16, 8, 2)

    def first_examples(global_batch, shard_count):
        per_host = [
            next(
                iter(
                    pipeline.train_dataset(
                        source,
                        config,
                        global_batch_size=global_batch,
                        seed=5,
                        shard_index=h,
                        shard_count=shard_count,
                    )
                )
            )["global_crops"]
            for h in range(shard_count)
        ]
        # The global batch: the hosts' rows in host order (sharding.to_global_batch).
        return np.concatenate(per_host)

    one_host = first_examples(8, 1)
    np.testing.assert_array_equal(first_examples(4, 1), one_host[:4])
    np.testing.assert_array_equal(first_examples(8, 2), one_host)


def test_iterator_state_restores_the_same_next_batches():
    source = _indexed_source(40, size=12)
    dataset = pipeline.train_dataset(source, CROPS, global_batch_size=8, seed=2, shard_index=0, shard_count=1)
    uninterrupted = iter(dataset)
    for _ in range(7):  # Past one epoch (5 batches), so the epoch reshuffle is in the state.
        next(uninterrupted)
    state = uninterrupted.get_state()
    expected = [next(uninterrupted) for _ in range(3)]
    resumed = iter(dataset)
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])


def test_worker_processes_yield_the_same_batches():
    source = _indexed_source(32, size=12)
    kwargs = dict(global_batch_size=4, seed=3, shard_index=0, shard_count=1)
    in_process = iter(pipeline.train_dataset(source, CROPS, **kwargs))
    with_workers = iter(pipeline.train_dataset(source, CROPS, num_workers=1, **kwargs))
    try:
        for _ in range(3):
            want, got = next(in_process), next(with_workers)
            np.testing.assert_array_equal(got["local_crops"], want["local_crops"])
    finally:
        with_workers.close()


def test_bad_pipeline_arguments():
    source = _indexed_source(8)
    with pytest.raises(ValueError, match="augment_on='gpu'"):
        pipeline.train_dataset(
            source, CROPS, global_batch_size=4, seed=0, augment_on="gpu", shard_index=0, shard_count=1
        )
    with pytest.raises(ValueError, match="not divisible by the 3 hosts"):
        pipeline.train_dataset(source, CROPS, global_batch_size=4, seed=0, shard_index=0, shard_count=3)


# ----------------------------------------------------------------------------- evaluation


def test_eval_batches_pad_the_last_batch_and_mask_it(digits_dir):
    source = sources.load_source("digits", "test", digits_dir)
    batches = list(pipeline.eval_batches(source, batch_size=64, image_size=32))
    assert len(batches) == 6  # 360 = 5 * 64 + 40
    for batch in batches:
        assert batch["image"].shape == (64, 32, 32, 3) and batch["image"].dtype == np.uint8
        assert batch["label"].dtype == np.int32 and batch["mask"].dtype == np.bool_
    last = batches[-1]
    assert last["mask"].sum() == 40 and last["mask"][:40].all()
    assert (last["label"][40:] == -1).all() and (last["image"][40:] == 0).all()
    labels = np.concatenate([b["label"][b["mask"]] for b in batches])
    np.testing.assert_array_equal(labels, [source[i]["label"] for i in range(360)])


def test_eval_resize_matches_pil_bicubic():
    image = np.random.RandomState(0).randint(0, 256, (96, 96, 3)).astype(np.uint8)
    batch = next(pipeline.eval_batches([{"image": image, "label": 3}], batch_size=2, image_size=32))
    ref = np.asarray(Image.fromarray(image).resize((32, 32), Image.BICUBIC), np.int64)
    diff = np.abs(batch["image"][0].astype(np.int64) - ref)
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01
    assert batch["mask"].tolist() == [True, False]


def test_eval_batches_split_a_dataset_between_hosts_without_overlap():
    source = [{"image": np.full((4, 4, 3), i, np.uint8), "label": i} for i in range(11)]
    per_host = [
        list(pipeline.eval_batches(source, batch_size=6, image_size=4, shard_index=host, shard_count=3))
        for host in range(3)
    ]
    assert len({len(batches) for batches in per_host}) == 1  # every host takes part in every global batch
    # Global batch t, the hosts' blocks in host order: rows 6t..6t+5, each once, in order.
    seen = [
        int(label)
        for global_batch in zip(*per_host)
        for batch in global_batch
        for label, keep in zip(batch["label"], batch["mask"])
        if keep
    ]
    assert seen == list(range(11))
    with pytest.raises(ValueError, match="batch size 4 is not divisible by the 3 hosts"):
        next(pipeline.eval_batches(source, batch_size=4, image_size=4, shard_index=0, shard_count=3))


# ----------------------------------------------------------------------------- linear-probe views


def _gradient_source(count, height=20, width=30):
    """Non-square images that differ per example and per position (H and W cannot be confused)."""
    rng = np.random.default_rng(0)
    return [
        {"image": rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "label": index % 3}
        for index in range(count)
    ]


def _probe_views(source, *, seed, epoch, batch_size=4, **shards):
    batches = pipeline.linear_probe_batches(
        source, batch_size=batch_size, image_size=16, seed=seed, epoch=epoch, **shards
    )
    return np.concatenate([batch["image"][batch["mask"]] for batch in batches])


def test_linear_probe_views_are_random_resized_crops_and_flips_as_pil_makes_them():
    source = _gradient_source(6)
    views = _probe_views(source, seed=3, epoch=2)
    flips = []
    for index, example in enumerate(source):
        # The same draws as `linear_probe_views`: the crop_boxes row, then the flip.
        uniforms = pipeline.linear_probe_rng(3, 2, index).random(spec.NUM_UNIFORMS + 1)
        ((top, left, height, width),) = spec.crop_boxes(
            uniforms[None, : spec.NUM_UNIFORMS], 20, 30, (0.08, 1.0), (3 / 4, 4 / 3)
        )
        crop = Image.fromarray(example["image"]).crop((left, top, left + width, top + height))
        ref = crop.resize((16, 16), Image.BICUBIC)
        if uniforms[-1] < 0.5:
            ref = ref.transpose(Image.FLIP_LEFT_RIGHT)
        flips.append(uniforms[-1] < 0.5)
        diff = np.abs(views[index].astype(np.int64) - np.asarray(ref, np.int64))
        assert diff.max() <= 1 and (diff > 0).mean() < 0.02
    assert 0 < sum(flips) < len(flips)  # both cases were checked


def test_linear_probe_views_depend_on_seed_epoch_and_index_only():
    source = _gradient_source(10)
    first = _probe_views(source, seed=1, epoch=0, batch_size=4)
    # Batching and sharding do not change a row's view.
    np.testing.assert_array_equal(first, _probe_views(source, seed=1, epoch=0, batch_size=7))
    host_views = [_probe_views(source, seed=1, epoch=0, shard_index=h, shard_count=2) for h in range(2)]
    # Global batches of 4, two rows from each host: host 0 has rows 0, 1, 4, 5, 8, 9; host 1 the rest.
    np.testing.assert_array_equal(first[[0, 1, 4, 5, 8, 9]], host_views[0])
    np.testing.assert_array_equal(first[[2, 3, 6, 7]], host_views[1])
    # Another epoch or seed: other views of every image.
    for other in (_probe_views(source, seed=1, epoch=1), _probe_views(source, seed=2, epoch=0)):
        assert all((a != b).any() for a, b in zip(first, other))
    # The training stream's generator of the same (seed, position) draws other numbers.
    assert pipeline.linear_probe_rng(1, 0, 5).random() != pipeline.example_rng(1, 5).random()


def test_linear_probe_views_of_a_flat_image_are_flat():
    source = [{"image": np.full((12, 9, 3), (10, 200, 77), np.uint8), "label": 0}]
    views = _probe_views(source, seed=0, epoch=0)
    assert views.shape == (1, 16, 16, 3)
    assert (views == np.array([10, 200, 77], np.uint8)).all()
