"""A folder of image files as a dataset (data/image_folder.py, data/folder_cache.py): real JPEG,
PNG and GIF files of mixed sizes and modes, written here and read through the real code."""

import os
import pickle

import numpy as np
import pytest
from PIL import Image

from dino_jax.data import folder_cache, image_files, image_folder, pipeline
from tests.config_helpers import reference_crops

SIZE = 16
CROPS = reference_crops(global_size=16, local_size=8, num_local_crops=2)


def _pixels(seed, height, width, channels=3):
    shape = (height, width, channels) if channels > 1 else (height, width)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _smooth(height, width):
    """A photo-like image (smooth colour ramps), whose reduced-scale JPEG decode is meaningful."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // width, y * 255 // height, (x + y) * 255 // (width + height)], -1).astype(
        np.uint8
    )


def _write(path, image: Image.Image, **save_args):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image.save(path, **save_args)
    return path


def _labelled_folder(root):
    """Two classes of real files, each a different size, mode or format."""
    files = {
        "cat/rgb_wide.jpg": Image.fromarray(_pixels(0, 30, 50)),
        "cat/grey_tall.png": Image.fromarray(_pixels(1, 40, 20, 1)),
        "cat/deeper/rgba.png": Image.fromarray(_pixels(2, 24, 24, 4)),
        "dog/palette.gif": Image.fromarray(_pixels(3, 12, 20)).convert("P"),
        "dog/grey16.png": Image.fromarray(_pixels(4, 18, 18, 1).astype(np.uint16) * 257),
        "dog/big_photo.jpg": Image.fromarray(_smooth(192, 256)),
        "dog/cmyk.jpg": Image.fromarray(_smooth(20, 26)).convert("CMYK"),
    }
    for relative, image in files.items():
        _write(os.path.join(root, *relative.split("/")), image)
    (root / "dog" / "notes.txt").write_text("not an image: ignored, as Tiny-ImageNet's boxes files are")
    return sorted(files)


def _open(directory, cache_root, log=lambda _: None, **kwargs):
    return folder_cache.open_folder(str(directory), image_size=SIZE, cache_root=str(cache_root), log=log, **kwargs)


def test_a_labelled_folder_of_mixed_files_is_decoded_into_centred_squares(tmp_path):
    files = _labelled_folder(tmp_path / "photos")
    logged = []
    source = _open(tmp_path / "photos", tmp_path / "cache", log=logged.append)

    assert source.class_names == ("cat", "dog") and source.num_classes == 2
    assert len(source) == len(files)
    order = [line.split("\t")[0] for line in open(os.path.join(source.cache_dir, "files.tsv"))]
    assert sorted(order) == files and [source[i]["label"] for i in range(len(source))] == [
        0,
        0,
        0,
        1,
        1,
        1,
        1,
    ]
    for i in range(len(source)):
        assert source[i]["image"].shape == (SIZE, SIZE, 3) and source[i]["image"].dtype == np.uint8

    def stored(relative):
        return source[order.index(relative)]["image"].astype(np.int64)

    def reference(relative, image=None):  # the policy, written with PIL: centre square, bicubic
        image = image or image_files._as_rgb(Image.open(tmp_path / "photos" / relative))
        side = min(image.size)
        left, top = (image.width - side) / 2, (image.height - side) / 2
        box = (left, top, left + side, top + side)
        return np.asarray(image.resize((SIZE, SIZE), Image.Resampling.BICUBIC, box=box), np.int64)

    for relative in (
        "cat/grey_tall.png",
        "cat/deeper/rgba.png",
        "dog/palette.gif",
        "cat/rgb_wide.jpg",
        "dog/cmyk.jpg",
    ):
        np.testing.assert_array_equal(stored(relative), reference(relative))
    # 16-bit grey (v * 257) is scaled to 8 bits (v), not clipped to white.
    grey8 = Image.fromarray(_pixels(4, 18, 18, 1)).convert("RGB")
    np.testing.assert_array_equal(stored("dog/grey16.png"), reference("dog/grey16.png", grey8))
    # A large JPEG is decoded at reduced scale (draft): close to the full decode, not equal.
    full = image_files._as_rgb(Image.open(tmp_path / "photos" / "dog" / "big_photo.jpg"))
    assert np.abs(stored("dog/big_photo.jpg") - reference("dog/big_photo.jpg", full)).mean() < 3
    assert any("decoding 7 images into 16x16 squares" in line for line in logged)


def test_a_flat_folder_is_unlabelled_and_layout_mistakes_are_named(tmp_path):
    flat = tmp_path / "flat"
    for i in range(3):
        _write(str(flat / f"{i}.png"), Image.fromarray(_pixels(i, 10 + i, 12)))
    source = _open(flat, tmp_path / "cache")
    assert (len(source), source.num_classes, source.class_names) == (3, 0, ())
    assert [source[i]["label"] for i in range(3)] == [image_folder.UNLABELLED] * 3
    assert image_folder.class_names(str(flat)) == ()

    _write(str(flat / "sub" / "x.png"), Image.fromarray(_pixels(9, 8, 8)))
    with pytest.raises(image_files.ImageFileError, match="top level and images in the subfolders"):
        _open(flat, tmp_path / "cache")
    (tmp_path / "classes" / "empty").mkdir(parents=True)
    _write(str(tmp_path / "classes" / "full" / "a.png"), Image.fromarray(_pixels(0, 8, 8)))
    with pytest.raises(image_files.ImageFileError, match="empty: a class folder with no image files"):
        _open(tmp_path / "classes", tmp_path / "cache")
    with pytest.raises(image_files.ImageFileError, match="no such folder"):
        _open(tmp_path / "missing", tmp_path / "cache")


def test_a_test_folder_takes_the_training_folders_class_numbers(tmp_path):
    _labelled_folder(tmp_path / "train")
    _write(str(tmp_path / "test" / "dog" / "d.png"), Image.fromarray(_pixels(7, 9, 9)))
    kwargs = dict(image_size=SIZE, cache_root=str(tmp_path / "cache"))
    test = folder_cache.open_split(
        "eval", train_dir=str(tmp_path / "train"), test_dir=str(tmp_path / "test"), **kwargs
    )
    assert (len(test), test[0]["label"], test.class_names) == (1, 1, ("cat", "dog"))  # dog is class 1
    _write(str(tmp_path / "test" / "bird" / "b.png"), Image.fromarray(_pixels(8, 9, 9)))
    with pytest.raises(image_files.ImageFileError, match="bird: a class folder whose name is not a class"):
        folder_cache.open_split(
            "eval", train_dir=str(tmp_path / "train"), test_dir=str(tmp_path / "test"), **kwargs
        )
    with pytest.raises(folder_cache.sources.DatasetUnavailableError, match="test_dir is empty"):
        folder_cache.open_split("eval", train_dir=str(tmp_path / "train"), test_dir="", **kwargs)


def test_every_broken_file_is_named_on_its_own_line_and_nothing_is_stored(tmp_path):
    _labelled_folder(tmp_path / "photos")
    jpeg = (tmp_path / "photos" / "cat" / "rgb_wide.jpg").read_bytes()
    (tmp_path / "photos" / "cat" / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (tmp_path / "photos" / "dog" / "text.png").write_text("this is not a PNG")
    with pytest.raises(image_files.ImageFileError) as error:
        _open(tmp_path / "photos", tmp_path / "cache")
    lines = str(error.value).splitlines()
    assert lines[0].startswith("2 of the 9 images in") and "nothing was stored" in lines[0]
    assert "truncated.jpg: the file is truncated or damaged" in lines[1]
    assert "text.png: not an image file that PIL can read" in lines[2]
    assert len(lines) == 3
    assert os.listdir(tmp_path / "cache") == []  # no copy, not even a half-built one


def test_the_copy_is_reused_until_a_file_or_the_size_changes(tmp_path, monkeypatch):
    photos = tmp_path / "photos"
    _labelled_folder(photos)
    first = _open(photos, tmp_path / "cache")
    images = np.stack([first[i]["image"] for i in range(len(first))])

    decoded = []
    real_load = image_files.load_square_image
    monkeypatch.setattr(image_files, "load_square_image", lambda *a: decoded.append(a) or real_load(*a))
    again = _open(photos, tmp_path / "cache")
    assert decoded == [] and again.cache_dir == first.cache_dir  # read, not decoded again
    np.testing.assert_array_equal(np.stack([again[i]["image"] for i in range(len(again))]), images)

    path = photos / "cat" / "grey_tall.png"
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))  # touched
    _open(photos, tmp_path / "cache")
    assert len(decoded) == 7
    _write(str(photos / "dog" / "new.png"), Image.fromarray(_pixels(11, 9, 9)))  # added
    assert len(_open(photos, tmp_path / "cache")) == 8 and len(decoded) == 15
    other_size = folder_cache.open_folder(
        str(photos), image_size=8, cache_root=str(tmp_path / "cache"), log=lambda _: None
    )
    assert other_size[0]["image"].shape == (8, 8, 3) and other_size.cache_dir != first.cache_dir
    assert sorted(os.listdir(tmp_path / "cache")) == sorted(
        os.path.basename(d) for d in (first.cache_dir, other_size.cache_dir)
    )  # the stale copy was replaced, not kept beside the new one


def test_training_batches_resume_the_same_from_a_reopened_copy(tmp_path):
    flat = tmp_path / "flat"
    for i in range(12):
        _write(str(flat / f"{i:02d}.jpg"), Image.fromarray(_pixels(i, 20 + i, 24)))
    source = _open(flat, tmp_path / "cache")
    assert pickle.loads(pickle.dumps(source))._images is None  # pickled as its path, for grain workers
    kwargs = dict(global_batch_size=4, seed=1, shard_index=0, shard_count=1)
    for augment_on in ("host", "device"):
        uninterrupted = iter(pipeline.train_dataset(source, CROPS, augment_on=augment_on, **kwargs))
        for _ in range(4):  # past an epoch of 3 batches
            next(uninterrupted)
        state = uninterrupted.get_state()
        expected = [next(uninterrupted) for _ in range(2)]
        reopened = _open(flat, tmp_path / "cache")  # a new process: the stored copy, mapped afresh
        resumed = iter(
            pipeline.train_dataset(
                pickle.loads(pickle.dumps(reopened)), CROPS, augment_on=augment_on, **kwargs
            )
        )
        resumed.set_state(state)
        for want in expected:
            got = next(resumed)
            assert set(got) == set(want)
            for key in want:
                np.testing.assert_array_equal(got[key], want[key])
        if augment_on == "device":
            assert expected[0]["image"].shape == (4, SIZE, SIZE, 3)
