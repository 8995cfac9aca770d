"""CIFAR-10, CIFAR-100, STL-10 and Tiny-ImageNet in their real on-disk formats, read by the real code.

Each dataset starts as a small archive in its official layout, written here. CIFAR-10, CIFAR-100
and STL-10 go through the TFDS catalog's own builders with only the network fetch replaced (TFDS
still extracts the archive, parses the binary files and writes array_record); Tiny-ImageNet goes
through our builder from a zip of real JPEGs, placed by hand or served over local HTTP.
"""

import functools
import hashlib
import http.server
import io
import os
import tarfile
import threading
import zipfile

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from dino_jax.data import pipeline, sources, tiny_imagenet
from tests.config_helpers import reference_crops

CROPS = reference_crops(global_size=16, local_size=8, num_local_crops=2)


def _image(seed, size):
    return np.random.RandomState(seed).randint(0, 256, (size, size, 3)).astype(np.uint8)


def _add_bytes(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _cifar100_archive(path, num_train, num_test):
    """cifar-100-binary.tar.gz: records of (coarse label, fine label, 3072 bytes R, G, B planes)."""
    images, labels = {}, {}
    with tarfile.open(path, "w:gz") as tar:
        for split, count, offset in (("train", num_train, 0), ("test", num_test, 1000)):
            records = []
            for i in range(count):
                image = _image(offset + i, 32)
                fine, coarse = (offset + i) % 100, (offset + i) % 20
                images[split, i], labels[split, i] = image, fine
                records.append(bytes([coarse, fine]) + image.transpose(2, 0, 1).tobytes())
            _add_bytes(tar, f"cifar-100-binary/{split}.bin", b"".join(records))
        _add_bytes(
            tar,
            "cifar-100-binary/fine_label_names.txt",
            "\n".join(f"fine_{i:02d}" for i in range(100)).encode() + b"\n",
        )
        _add_bytes(
            tar,
            "cifar-100-binary/coarse_label_names.txt",
            "\n".join(f"coarse_{i:02d}" for i in range(20)).encode() + b"\n",
        )
    return images, labels


def _cifar10_archive(path, num_train, num_test):
    """cifar-10-binary.tar.gz: five train batches and a test batch of records (label, 3072 bytes
    R, G, B planes), and batches.meta.txt with the 10 class names."""
    images, labels = {}, {}
    with tarfile.open(path, "w:gz") as tar:
        batches = [(f"data_batch_{b}.bin", "train", range(b - 1, num_train, 5)) for b in range(1, 6)]
        for file_name, split, indices in batches + [("test_batch.bin", "test", range(num_test))]:
            records = []
            for i in indices:
                seed = i + (2000 if split == "test" else 3000)
                image, label = _image(seed, 32), seed % 10
                images[split, i], labels[split, i] = image, label
                records.append(bytes([label]) + image.transpose(2, 0, 1).tobytes())
            _add_bytes(tar, f"cifar-10-batches-bin/{file_name}", b"".join(records))
        names = "\n".join(f"class_{i}" for i in range(10)).encode() + b"\n"
        _add_bytes(tar, "cifar-10-batches-bin/batches.meta.txt", names)
    return images, labels


def _stl10_archive(path, num_train, num_test, num_unlabeled):
    """stl10_binary.tar.gz: uint8 images stored column-major (N, 3, 96, 96), labels 1..10."""
    images, labels = {}, {}
    with tarfile.open(path, "w:gz") as tar:
        for split, count, offset in (
            ("train", num_train, 0),
            ("test", num_test, 500),
            ("unlabeled", num_unlabeled, 900),
        ):
            pixels, ys = [], []
            for i in range(count):
                image = _image(offset + i, 96)
                images[split, i], labels[split, i] = image, (offset + i) % 10
                pixels.append(image.transpose(2, 1, 0).tobytes())
                ys.append((offset + i) % 10 + 1)
            _add_bytes(tar, f"stl10_binary/{split}_X.bin", b"".join(pixels))
            if split != "unlabeled":
                _add_bytes(tar, f"stl10_binary/{split}_y.bin", bytes(ys))
        _add_bytes(
            tar, "stl10_binary/class_names.txt", "\n".join(f"class_{i}" for i in range(10)).encode() + b"\n"
        )
    return images, labels


def _build_catalog(name, data_dir, archive, monkeypatch):
    """Runs the catalog builder; only `download_and_extract` is swapped for our local archive."""

    def local_archive(dl_manager, url):
        assert url == sources.DATASETS[name].download_url, url
        return dl_manager.extract(archive)  # TFDS's own extraction of the official layout.

    monkeypatch.setattr(tfds.download.DownloadManager, "download_and_extract", local_archive)
    builder = tfds.builder(name, data_dir=data_dir, try_gcs=False)
    builder.download_and_prepare(
        file_format="array_record", download_config=tfds.download.DownloadConfig(try_download_gcs=False)
    )
    monkeypatch.undo()


def _as_set(source):
    return {(bytes(source[i]["image"].data), int(source[i]["label"])) for i in range(len(source))}


@pytest.mark.parametrize(
    "name,write_archive",
    [("cifar100", _cifar100_archive), ("cifar10", _cifar10_archive)],
)
def test_cifar_real_format_through_sources_and_pipelines(tmp_path, monkeypatch, name, write_archive):
    archive = tmp_path / os.path.basename(sources.DATASETS[name].download_url)
    images, labels = write_archive(archive, num_train=24, num_test=10)
    data_dir = str(tmp_path / "tfds")
    _build_catalog(name, data_dir, str(archive), monkeypatch)

    # Prepared: no internet needed, and the check must not even be asked.
    monkeypatch.setattr(sources, "has_internet", lambda *a, **k: pytest.fail("network probed"))
    train = sources.load_source(name, "train", data_dir)
    test = sources.load_source(name, "test", data_dir)
    assert (len(train), len(test)) == (24, 10)
    assert set(train[0]) == {"image", "label"}  # coarse_label (CIFAR-100) and id are dropped.
    assert _as_set(train) == {(bytes(images["train", i].data), labels["train", i]) for i in range(24)}
    assert _as_set(test) == {(bytes(images["test", i].data), labels["test", i]) for i in range(10)}

    for augment_on in ("host", "device"):
        batch = next(
            iter(
                pipeline.train_dataset(
                    train,
                    CROPS,
                    global_batch_size=8,
                    seed=0,
                    augment_on=augment_on,
                    shard_index=0,
                    shard_count=1,
                )
            )
        )
        if augment_on == "host":
            assert batch["global_crops"].shape == (8, 2, 16, 16, 3)
        else:
            assert batch["image"].shape == (8, 32, 32, 3)
    batches = list(pipeline.eval_batches(test, batch_size=4, image_size=32))
    assert [b["mask"].sum() for b in batches] == [4, 4, 2]


def test_stl10_unlabelled_pretrains_on_the_unlabelled_split_and_evaluates_on_train_and_test(
    tmp_path, monkeypatch
):
    from configs import tiny_imagenet as recipe
    from dino_jax import config as config_lib, config_validation, evaluation

    archive = tmp_path / "stl10_binary.tar.gz"
    images, _ = _stl10_archive(archive, num_train=6, num_test=5, num_unlabeled=7)
    data_dir = str(tmp_path / "tfds")
    _build_catalog("stl10", data_dir, str(archive), monkeypatch)  # one build serves both names
    config = recipe.get_config()
    config.dataset.name, config.dataset.data_dir = "stl10_unlabelled", data_dir
    config_validation.validate(config)
    pretrain = config_lib.open_split(config, "pretrain")
    assert {bytes(pretrain[i]["image"].data) for i in range(len(pretrain))} == {
        bytes(images["unlabeled", i].data) for i in range(7)
    }
    assert {pretrain[i]["label"] for i in range(7)} == {-1}  # TFDS's label for the unlabelled split
    train, test = config_lib.open_split(config, "train"), config_lib.open_split(config, "eval")
    assert (len(train), len(test)) == (6, 5) and {train[i]["label"] for i in range(6)} <= set(range(10))
    # The stl10 transfer evaluation would repeat the main one (the same splits): it is left out.
    assert evaluation.transfer_data(config, image_size=64) == []
    config.dataset.synthetic = True
    assert len(config_lib.open_split(config, "pretrain")) == 100_000


def test_stl10_real_format_resized_for_evaluation(tmp_path, monkeypatch):
    archive = tmp_path / "stl10_binary.tar.gz"
    images, labels = _stl10_archive(archive, num_train=6, num_test=5, num_unlabeled=2)
    data_dir = str(tmp_path / "tfds")
    _build_catalog("stl10", data_dir, str(archive), monkeypatch)

    train = sources.load_source("stl10", "train", data_dir)
    test = sources.load_source("stl10", "test", data_dir)
    assert (len(train), len(test)) == (6, 5)
    assert train[0]["image"].shape == (96, 96, 3)
    assert _as_set(test) == {(bytes(images["test", i].data), labels["test", i]) for i in range(5)}
    batch = next(pipeline.eval_batches(test, batch_size=8, image_size=32))
    assert batch["image"].shape == (8, 32, 32, 3) and batch["mask"].sum() == 5
    first = test[0]
    ref = np.asarray(Image.fromarray(first["image"]).resize((32, 32), Image.BICUBIC), np.int64)
    assert np.abs(batch["image"][0].astype(np.int64) - ref).max() <= 1


# ----------------------------------------------------------------------------- Tiny-ImageNet

TRAIN_CLASSES = 3
TRAIN_PER_CLASS = 4
NUM_VAL = 5


def _jpeg(image, mode="RGB"):
    buffer = io.BytesIO()
    Image.fromarray(image).convert(mode).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _tiny_imagenet_zip(path, root="tiny-imagenet-200/", macos_extras=False, extra_wnids=0):
    """A zip in the official layout: 200 wnids, JPEGs for 3 classes, one of them grayscale. `root`:
    the folder that holds it; `macos_extras`: with the `.DS_Store` files and `__MACOSX/._*` twins a
    Mac's zip has; `extra_wnids`: that many classes more in wnids.txt."""
    wnids = [f"n{index:08d}" for index in range(200 + extra_wnids)]
    expected = {"train": {}, "validation": {}}
    with zipfile.ZipFile(path, "w") as archive:
        if macos_extras:
            archive.writestr(root + ".DS_Store", b"\0\0\0\1Bud1")
            archive.writestr(root + "train/.DS_Store", b"\0\0\0\1Bud1")
            archive.writestr(f"__MACOSX/{root}._wnids.txt", b"\0\5\26\7")
            archive.writestr(f"__MACOSX/{root}train/{wnids[0]}/images/._{wnids[0]}_0.JPEG", b"\0\5\26\7")
            archive.writestr(f"{root}train/{wnids[0]}/images/._{wnids[0]}_0.JPEG", b"\0\5\26\7")
        archive.writestr(root + "wnids.txt", "\n".join(reversed(wnids)) + "\n")  # Not sorted.
        archive.writestr(
            root + "words.txt",
            "".join(f"{wnid}\tthing number {index}, a test class\n" for index, wnid in enumerate(wnids))
            + "n99999999\tunused entry\n",
        )
        for label in range(TRAIN_CLASSES):
            wnid = wnids[label]
            archive.writestr(f"{root}train/{wnid}/{wnid}_boxes.txt", "")
            for i in range(TRAIN_PER_CLASS):
                mode = "L" if (label, i) == (1, 2) else "RGB"
                data = _jpeg(_image(label * 10 + i, 64), mode)
                archive.writestr(f"{root}train/{wnid}/images/{wnid}_{i}.JPEG", data)
                expected["train"][f"{wnid}_{i}.JPEG"] = (data, label, mode)
        lines = []
        for i in range(NUM_VAL):
            data = _jpeg(_image(100 + i, 64))
            archive.writestr(f"{root}val/images/val_{i}.JPEG", data)
            lines.append(f"val_{i}.JPEG\t{wnids[i % TRAIN_CLASSES]}\t0\t0\t63\t63")
            expected["validation"][f"val_{i}.JPEG"] = (data, i % TRAIN_CLASSES, "RGB")
        archive.writestr(root + "val/val_annotations.txt", "\n".join(lines) + "\n")
        archive.writestr(root + "test/images/test_0.JPEG", _jpeg(_image(999, 64)))
    return expected


def _check_tiny_imagenet(data_dir, expected):
    train = sources.load_source("tiny_imagenet", "train", data_dir)
    val = sources.load_source("tiny_imagenet", "validation", data_dir)
    assert (len(train), len(val)) == (TRAIN_CLASSES * TRAIN_PER_CLASS, NUM_VAL)
    builder = tiny_imagenet.TinyImagenet(data_dir=data_dir)
    names = builder.info.features["label"].names
    assert len(names) == 200 and names[0] == "thing number 0, a test class"
    raw = builder.as_data_source(split="train")
    for i in range(len(raw)):
        record = raw[i]
        file_name = record["file_name"]
        file_name = file_name.decode() if isinstance(file_name, bytes) else file_name
        data, label, mode = expected["train"][file_name]
        assert record["image"].shape == (64, 64, 3) and record["label"] == label
        decoded = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), np.int64)
        if mode == "RGB":  # Stored as the same JPEG bytes: decodes to the same pixels.
            np.testing.assert_array_equal(record["image"], decoded)
        else:  # Grayscale, converted to RGB and re-encoded: three equal channels, close pixels.
            assert (record["image"][..., 0] == record["image"][..., 2]).all()
            assert np.abs(record["image"].astype(np.int64) - decoded).mean() < 3
    val_labels = sorted(int(val[i]["label"]) for i in range(len(val)))
    assert val_labels == sorted(label for _, label, _ in expected["validation"].values())
    batch = next(
        iter(pipeline.train_dataset(train, CROPS, global_batch_size=4, seed=0, shard_index=0, shard_count=1))
    )
    assert batch["local_crops"].shape == (4, 2, 8, 8, 3)


def test_tiny_imagenet_from_a_manual_zip_offline(tmp_path, monkeypatch):
    data_dir = str(tmp_path / "tfds")
    manual = tmp_path / "tfds" / "downloads" / "manual"
    manual.mkdir(parents=True)
    expected = _tiny_imagenet_zip(manual / tiny_imagenet.ZIP_NAME)
    monkeypatch.setattr(sources, "has_internet", lambda *a, **k: pytest.fail("network probed"))
    _check_tiny_imagenet(data_dir, expected)
    # dataset.classes on the built files: labels read without decoding, images relabelled by position.
    train = sources.open_split("tiny_imagenet", "train", data_dir=data_dir, classes=(2, 0))
    val = sources.open_split("tiny_imagenet", "validation", data_dir=data_dir, classes=(2, 0))
    assert (len(train), len(val)) == (2 * TRAIN_PER_CLASS, 3)  # val_i has class i % 3
    assert sorted(train[i]["label"] for i in range(len(train))) == [0] * 4 + [1] * 4
    assert sorted(val[i]["label"] for i in range(len(val))) == [0, 1, 1]
    assert train[0]["image"].shape == (64, 64, 3)


def test_tiny_imagenet_from_a_zip_of_a_folder_above_it_with_macos_extras(tmp_path, monkeypatch):
    # As a GitHub download of a repository holding the files is zipped (the repository's folder
    # above tiny-imagenet-200/), made on a Mac (.DS_Store files, __MACOSX/._* twins).
    data_dir = str(tmp_path / "tfds")
    manual = tmp_path / "tfds" / "downloads" / "manual"
    manual.mkdir(parents=True)
    expected = _tiny_imagenet_zip(
        manual / tiny_imagenet.ZIP_NAME, root="IMagenet-master/tiny-imagenet-200/", macos_extras=True
    )
    monkeypatch.setattr(sources, "has_internet", lambda *a, **k: pytest.fail("network probed"))
    _check_tiny_imagenet(data_dir, expected)


def test_tiny_imagenet_with_added_classes_says_what_to_remove(tmp_path, monkeypatch):
    manual = tmp_path / "manual"
    manual.mkdir()
    _tiny_imagenet_zip(manual / tiny_imagenet.ZIP_NAME, root="", extra_wnids=2)
    monkeypatch.setattr(sources, "has_internet", lambda *a, **k: pytest.fail("network probed"))
    with pytest.raises(sources.DatasetUnavailableError, match="lists 202 classes.*has 200 .*remove"):
        sources.prepare("tiny_imagenet", str(tmp_path / "tfds"), manual_dir=str(manual))


def test_tiny_imagenet_missing_offline_says_where_the_zip_goes(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "has_internet", lambda *a, **k: False)
    with pytest.raises(sources.DatasetUnavailableError) as error:
        sources.load_source("tiny_imagenet", "train", str(tmp_path))
    message = str(error.value)
    assert os.path.join(str(tmp_path), "downloads", "manual", "tiny-imagenet-200.zip") in message
    assert tiny_imagenet.ZIP_MD5 in message and tiny_imagenet.URL in message


@pytest.fixture
def local_http(tmp_path):
    """Serves tmp_path/www over HTTP on localhost."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_tiny_imagenet_download_is_checksummed(tmp_path, monkeypatch, local_http):
    root, base_url = local_http
    expected = _tiny_imagenet_zip(root / tiny_imagenet.ZIP_NAME)
    data = (root / tiny_imagenet.ZIP_NAME).read_bytes()
    url = f"{base_url}/{tiny_imagenet.ZIP_NAME}"
    monkeypatch.setitem(
        sources.DATASETS,
        "tiny_imagenet",
        sources.DATASETS["tiny_imagenet"].__class__(
            **{**sources.DATASETS["tiny_imagenet"].__dict__, "download_url": url}
        ),
    )
    monkeypatch.setattr(tiny_imagenet.TinyImagenet, "url", url)
    monkeypatch.setattr(tiny_imagenet.TinyImagenet, "zip_bytes", len(data))

    # A wrong md5 (the zip is not the one expected) stops the build with a clear error.
    monkeypatch.setattr(tiny_imagenet.TinyImagenet, "zip_md5", "0" * 32)
    with pytest.raises(sources.DatasetUnavailableError, match="md5"):
        sources.load_source("tiny_imagenet", "train", str(tmp_path / "bad"))

    monkeypatch.setattr(tiny_imagenet.TinyImagenet, "zip_md5", hashlib.md5(data).hexdigest())
    _check_tiny_imagenet(str(tmp_path / "good"), expected)


def test_verify_zip_checks_size_and_md5(tmp_path):
    path = tmp_path / "x.zip"
    path.write_bytes(b"abc")
    tiny_imagenet.verify_zip(path, hashlib.md5(b"abc").hexdigest(), 3)
    with pytest.raises(tiny_imagenet.ChecksumError, match="has 3 bytes"):
        tiny_imagenet.verify_zip(path)
    with pytest.raises(tiny_imagenet.ChecksumError, match="md5"):
        tiny_imagenet.verify_zip(path, "0" * 32, 3)
