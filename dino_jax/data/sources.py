"""Datasets by name, as random-access TFDS data sources (array_record) of images and labels.

`load_source("cifar100", "train")` returns something grain's `MapDataset.source` takes: `len()`
and `[index]` -> `{"image": uint8 (H, W, 3), "label": int}`. Datasets are prepared on first use
where that is possible (digits ships with scikit-learn; catalog datasets need the internet); where
it is not, `DatasetUnavailableError` says at once which file to fetch and where it goes. Nothing
here probes cloud storage, and the internet check gives up after a couple of seconds.

`SyntheticSource` stands in for any of these datasets without reading a file: random images with
the dataset's size, split lengths and class count, to measure throughput or try a recipe on a
machine that has no copy of the data.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import threading
import urllib.parse
from typing import Any

import numpy as np


class DatasetUnavailableError(RuntimeError):
    """A dataset is not in the data dir and cannot be prepared here (e.g. no internet)."""


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """What the rest of the project needs to know about one dataset."""

    tfds_name: str
    train_split: str
    eval_split: str
    num_classes: int
    image_size: int  # Side of the stored square images, in pixels.
    download_url: str | None  # The archive the builder fetches; None when nothing is fetched.
    # Sizes of the splits we use, as the finished dataset has them (tests build smaller ones, so
    # code must read sizes from len(source); these are for messages and docs).
    num_train: int
    num_eval: int
    # The split DINO trains on where it is not `train_split` (STL-10's 100,000 unlabelled images,
    # whose labels are all -1), and its size; the evaluation's classifiers still fit `train_split`.
    pretrain_split: str = ""
    num_pretrain: int = 0

    def split(self, which: str) -> str:
        """The split read for `which`: "pretrain" (what training reads), "train" or "eval" (what
        kNN, the linear probe and few-shot fit and are tested on)."""
        splits = {"pretrain": self.pretrain_split or self.train_split, "train": self.train_split}
        return {**splits, "eval": self.eval_split}[which]


_STL10 = DatasetSpec(
    "stl10", "train", "test", 10, 96, "http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz", 5000, 8000
)

DATASETS: dict[str, DatasetSpec] = {
    "digits": DatasetSpec("digits", "train", "test", 10, 32, None, 1437, 360),
    "cifar10": DatasetSpec(
        "cifar10",
        "train",
        "test",
        10,
        32,
        "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
        50000,
        10000,
    ),
    "cifar100": DatasetSpec(
        "cifar100",
        "train",
        "test",
        100,
        32,
        "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz",
        50000,
        10000,
    ),
    "stl10": _STL10,
    # The same TFDS dataset as "stl10", trained on the split STL-10 was made for: pretraining on
    # its 100,000 unlabelled images, then kNN / linear / few-shot on its labelled train and test.
    "stl10_unlabelled": dataclasses.replace(_STL10, pretrain_split="unlabelled", num_pretrain=100000),
    "tiny_imagenet": DatasetSpec(
        "tiny_imagenet",
        "train",
        "validation",
        200,
        64,
        "http://cs231n.stanford.edu/tiny-imagenet-200.zip",
        100000,
        10000,
    ),
}

# How long the internet check may take before we call the machine offline.
CONNECT_TIMEOUT_S = 2.0


def default_data_dir() -> str:
    """`$TFDS_DATA_DIR` if set, else `~/tensorflow_datasets` (TFDS's own default)."""
    return os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")


def has_internet(url: str, timeout_s: float = CONNECT_TIMEOUT_S) -> bool:
    """Whether a TCP connection to `url`'s host opens within `timeout_s` seconds.

    The connection runs in a daemon thread because a socket timeout does not bound the DNS
    look-up, which can stall far longer on a machine with a broken resolver.
    """
    parsed = urllib.parse.urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    result = []

    def connect():
        try:
            with socket.create_connection((parsed.hostname, port), timeout=timeout_s):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout_s)
    return bool(result and result[0])


class ImageLabelSource:
    """A TFDS data source narrowed to `{"image", "label"}`, the contract the pipelines rely on.

    Other features (CIFAR-100's `coarse_label` and `id`, say) are dropped so batches have one
    structure whichever dataset they come from. Picklable, so grain worker processes can hold it.
    """

    def __init__(self, source, name: str, split: str):
        self._source = source
        self.name = name
        self.split = split

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self._narrow(self._source[index])

    def __getitems__(self, indices):
        return [self._narrow(record) for record in self._source.__getitems__(indices)]

    @staticmethod
    def _narrow(record) -> dict[str, Any]:
        return {"image": np.asarray(record["image"], np.uint8), "label": int(record["label"])}

    def __repr__(self) -> str:
        return f"ImageLabelSource({self.name!r}, split={self.split!r}, size={len(self)})"


class SyntheticSource:
    """Random uint8 images and labels with the shape, split size and class count of a dataset.

    Example `i` is a pure function of (split, i): a Philox generator keyed by them draws the
    label, then the pixels (uniform noise). Nothing is stored, so Tiny-ImageNet's 1.2 GB of pixels
    cost no memory, and a resumed run or another process sees the same images. Picklable, so
    grain worker processes can hold it.
    """

    def __init__(self, name: str, split: str, *, num_examples: int, image_size: int, num_classes: int):
        if num_examples <= 0 or image_size <= 0 or num_classes <= 0:
            raise ValueError(
                f"SyntheticSource({name!r}, {split!r}): num_examples {num_examples}, image_size "
                f"{image_size} and num_classes {num_classes} must all be positive"
            )
        self.name = name
        self.split = split
        self.num_examples = num_examples
        self.image_size = image_size
        self.num_classes = num_classes
        # A stable per-split number (not hash(), which Python salts per process).
        self._split_key = int.from_bytes(split.encode()[:8].ljust(8, b"\0"), "little")

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if not 0 <= index < self.num_examples:
            raise IndexError(f"index {index} out of range for {self!r}")
        rng = self._rng(index)
        label = int(rng.integers(self.num_classes))
        image = rng.integers(0, 256, (self.image_size, self.image_size, 3), dtype=np.uint8)
        return {"image": image, "label": label}

    def _rng(self, index: int) -> np.random.Generator:
        key = np.array([index, self._split_key], np.uint64)
        return np.random.Generator(np.random.Philox(key=key))

    def labels(self) -> np.ndarray:
        """Every example's label, in index order (the first draw of each example, no pixels)."""
        return np.array([self._rng(i).integers(self.num_classes) for i in range(self.num_examples)], np.int64)

    def __getitems__(self, indices):
        return [self[i] for i in indices]

    def __repr__(self) -> str:
        return f"SyntheticSource({self.name!r}, split={self.split!r}, size={len(self)})"


def synthetic_source(name: str, split: str) -> SyntheticSource:
    """A `SyntheticSource` shaped like split `split` of dataset `name` (sizes from `DATASETS`)."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(DATASETS)}")
    spec = DATASETS[name]
    sizes = {spec.train_split: spec.num_train, spec.eval_split: spec.num_eval}
    if spec.pretrain_split:
        sizes[spec.pretrain_split] = spec.num_pretrain
    if split not in sizes:
        raise ValueError(f"dataset {name!r} has no split {split!r}; expected one of {sorted(sizes)}")
    return SyntheticSource(
        name, split, num_examples=sizes[split], image_size=spec.image_size, num_classes=spec.num_classes
    )


class ClassSubset:
    """The examples of `source` whose label is one of `classes`, in the source's order, each
    relabelled to its class's position in `classes` (`classes=(7, 3)`: label 7 -> 0, 3 -> 1), so
    the labels of the subset are `0 .. len(classes) - 1`. `labels`: the source's labels in index
    order (`split_labels`). Picklable, so grain worker processes can hold it.
    """

    def __init__(self, source, classes, labels):
        labels = np.asarray(labels, np.int64)
        self.classes = tuple(int(c) for c in classes)
        if not self.classes or len(set(self.classes)) != len(self.classes) or min(self.classes) < 0:
            raise ValueError(
                f"ClassSubset: classes {self.classes} must be distinct labels >= 0, at least one"
            )
        if labels.shape != (len(source),):
            raise ValueError(f"ClassSubset: {labels.shape[0]} labels for a source of {len(source)} examples")
        new_label = np.full(max(max(self.classes), int(labels.max(initial=0))) + 1, -1, np.int64)
        new_label[list(self.classes)] = np.arange(len(self.classes))
        self._source = source
        self._new_label = new_label
        self._indices = np.flatnonzero(new_label[labels] >= 0)
        self.name = getattr(source, "name", None)
        self.split = getattr(source, "split", None)

    def __len__(self) -> int:
        return len(self._indices)

    def _relabel(self, record) -> dict[str, Any]:
        return {**record, "label": int(self._new_label[record["label"]])}

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {self!r}")
        return self._relabel(self._source[int(self._indices[index])])

    def __getitems__(self, indices):
        positions = [int(self._indices[int(i)]) for i in indices]
        if hasattr(self._source, "__getitems__"):
            return [self._relabel(record) for record in self._source.__getitems__(positions)]
        return [self._relabel(self._source[i]) for i in positions]

    def __repr__(self) -> str:
        return f"ClassSubset({self._source!r}, classes={self.classes}, size={len(self)})"


_LABELS_CACHE: dict[tuple, np.ndarray] = {}


def split_labels(
    name: str, split: str, *, data_dir: str | None = None, synthetic: bool = False
) -> np.ndarray:
    """Every label of split `split` of `name`, in index order, read without decoding an image (the
    JPEG bytes are skipped: Tiny-ImageNet's 100,000 train labels take seconds, not a decode of
    every image). Read once per process."""
    key = (name, split, os.path.expanduser(data_dir or default_data_dir()), synthetic)
    if key not in _LABELS_CACHE:
        if synthetic:
            labels = synthetic_source(name, split).labels()
        else:
            import tensorflow_datasets as tfds

            raw = prepare(name, data_dir).as_data_source(
                split=split, decoders={"image": tfds.decode.SkipDecoding()}
            )
            labels = np.empty(len(raw), np.int64)
            chunk = 4096
            for start in range(0, len(raw), chunk):
                records = raw.__getitems__(list(range(start, min(start + chunk, len(raw)))))
                labels[start : start + len(records)] = [int(record["label"]) for record in records]
        _LABELS_CACHE[key] = labels
    return _LABELS_CACHE[key]


def open_split(
    name: str,
    split: str,
    *,
    data_dir: str | None = None,
    synthetic: bool = False,
    classes: tuple[int, ...] = (),
):
    """Split `split` of dataset `name`: the prepared TFDS data (`load_source`), or with
    `synthetic` a `SyntheticSource` of the same shape that reads no file; with `classes` (labels
    of `name`), only their images, relabelled `0 .. len(classes) - 1` (`ClassSubset`)."""
    source = synthetic_source(name, split) if synthetic else load_source(name, split, data_dir)
    if not classes:
        return source
    return ClassSubset(source, classes, split_labels(name, split, data_dir=data_dir, synthetic=synthetic))


def _builder(name: str, data_dir: str):
    """The TFDS builder of `name`, our own class for our datasets, the catalog's otherwise."""
    import tensorflow_datasets as tfds

    if name == "digits":
        from dino_jax.data import digits

        return digits.Digits(data_dir=data_dir)
    if name == "tiny_imagenet":
        from dino_jax.data import tiny_imagenet

        return tiny_imagenet.TinyImagenet(data_dir=data_dir)
    return tfds.builder(DATASETS[name].tfds_name, data_dir=data_dir, try_gcs=False)


def _manual_dir(data_dir: str, manual_dir: str | None) -> str:
    """TFDS's manual dir: where a user puts archives that cannot be downloaded here."""
    return os.path.expanduser(manual_dir) if manual_dir else os.path.join(data_dir, "downloads", "manual")


def _unavailable_message(name: str, data_dir: str, reason: str, manual_dir: str | None = None) -> str:
    spec = DATASETS[name]
    if name == "tiny_imagenet":
        from dino_jax.data import tiny_imagenet

        return (
            f"dataset 'tiny_imagenet' is not prepared in data dir {data_dir} and cannot be prepared "
            f"here: {reason}. To provide it: download {spec.download_url} "
            f"({tiny_imagenet.ZIP_BYTES} bytes, md5 {tiny_imagenet.ZIP_MD5}) on any machine and put "
            f"it at {os.path.join(_manual_dir(data_dir, manual_dir), tiny_imagenet.ZIP_NAME)}; the "
            f"next run builds the dataset from it, offline."
        )
    return (
        f"dataset '{name}' is not prepared in data dir {data_dir} and cannot be prepared here: "
        f"{reason}. To provide it: on a machine with internet run\n"
        f"  pip install tensorflow-datasets tensorflow-cpu array-record\n"
        f"  tfds build {spec.tfds_name} --data_dir=<dir> --file_format=array_record\n"
        f"(it downloads {spec.download_url}), then copy <dir>/{spec.tfds_name} into {data_dir}; or "
        f"point --config.dataset.data_dir (or $TFDS_DATA_DIR) at a directory that already holds "
        f"'{spec.tfds_name}' in array_record format."
    )


def prepare(name: str, data_dir: str | None = None, manual_dir: str | None = None):
    """Makes sure `name` is prepared (array_record) in `data_dir`; returns its TFDS builder.

    `manual_dir` holds archives placed by hand (default `<data_dir>/downloads/manual`); a
    Tiny-ImageNet zip found there is built without the internet.
    """
    import tensorflow_datasets as tfds

    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(DATASETS)}")
    data_dir = os.path.expanduser(data_dir or default_data_dir())
    builder = _builder(name, data_dir)
    if not builder.is_prepared():
        url = DATASETS[name].download_url
        manual = _manual_dir(data_dir, manual_dir)
        has_manual_archive = name == "tiny_imagenet" and os.path.exists(
            os.path.join(manual, os.path.basename(url))
        )
        if url is not None and not has_manual_archive and not has_internet(url):
            raise DatasetUnavailableError(
                _unavailable_message(
                    name,
                    data_dir,
                    "no internet connection (could not reach "
                    f"{urllib.parse.urlparse(url).hostname} within {CONNECT_TIMEOUT_S:.0f} s)",
                    manual_dir,
                )
            )
        try:
            builder.download_and_prepare(
                file_format="array_record",
                download_config=tfds.download.DownloadConfig(try_download_gcs=False, manual_dir=manual),
            )
        except Exception as error:  # Any failure to fetch or build means the same to the user.
            raise DatasetUnavailableError(
                _unavailable_message(
                    name, data_dir, f"preparing it failed with {type(error).__name__}: {error}", manual_dir
                )
            ) from error
    file_format = str(getattr(builder.info.file_format, "value", builder.info.file_format))
    if file_format != "array_record":
        raise DatasetUnavailableError(
            f"dataset '{name}' in {data_dir} is stored as {file_format}; random access needs "
            f"array_record. Rebuild it with: tfds build {DATASETS[name].tfds_name} "
            f"--data_dir={data_dir} --file_format=array_record"
        )
    return builder


def load_source(
    name: str, split: str, data_dir: str | None = None, manual_dir: str | None = None
) -> ImageLabelSource:
    """Random-access source of `{"image": uint8 (S, S, 3), "label": int}` for a split of `name`.

    Prepares the dataset on first use where possible; raises `DatasetUnavailableError` (at once,
    never after a network hang) where it is not. `manual_dir`: see `prepare`.
    """
    builder = prepare(name, data_dir, manual_dir)
    available = sorted(builder.info.splits.keys())
    if split not in builder.info.splits:
        raise ValueError(f"dataset {name!r} has no split {split!r}; expected one of {available}")
    return ImageLabelSource(builder.as_data_source(split=split), name, split)
