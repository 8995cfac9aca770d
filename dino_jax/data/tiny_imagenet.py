"""TFDS builder `tiny_imagenet`: Tiny-ImageNet-200, read straight from the official zip.

The zip (`tiny-imagenet-200.zip`, 248,100,043 bytes, md5 90528d7ca1a48142e341f4ef8d21d0de) holds
`tiny-imagenet-200/wnids.txt` (the 200 class ids), `words.txt` (names of every WordNet id),
`train/<wnid>/images/*.JPEG` (500 per class) and `val/images/*.JPEG` with
`val/val_annotations.txt` (file, wnid, box). The test images have no labels and are not built.

Where the zip comes from, in this order:
1. `<manual_dir>/tiny-imagenet-200.zip` (TFDS's manual dir, by default
   `<data_dir>/downloads/manual/`), for a machine without internet; used as it is (a re-zipped
   copy is fine), its layout checked;
2. a download from the official URL, whose size and md5 are then checked.
Members are read from the zip directly, never extracted. The folder that holds `wnids.txt` is the
root, wherever it is in the zip (a copy zipped from inside `tiny-imagenet-200/`, or from a folder
above it, as a GitHub download of a repository holding the files is); macOS's `__MACOSX/` and `._*`
entries and `.DS_Store` files are ignored. JPEG bytes are stored as they are (no
re-encoding); the few grayscale JPEGs in the zip are converted to RGB first.

Labels index the wnids in sorted order (as an ImageFolder would); the label names are the
words.txt names of those wnids.
"""

from __future__ import annotations

import hashlib
import io
import os
import zipfile

import numpy as np
import tensorflow_datasets as tfds

ZIP_NAME = "tiny-imagenet-200.zip"
URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
ZIP_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"
ZIP_BYTES = 248_100_043
IMAGE_SIZE = 64
NUM_CLASSES = 200
_ROOT = "tiny-imagenet-200/"


class ChecksumError(ValueError):
    """The zip is not the official Tiny-ImageNet-200 archive (wrong size or md5)."""


def verify_zip(path, expected_md5: str = ZIP_MD5, expected_bytes: int = ZIP_BYTES) -> None:
    """Raises ChecksumError unless the file at `path` has the expected size and md5."""
    size = os.path.getsize(path)
    if size != expected_bytes:
        raise ChecksumError(f"{path} has {size} bytes; the official {ZIP_NAME} has {expected_bytes}")
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    if digest.hexdigest() != expected_md5:
        raise ChecksumError(
            f"{path} has md5 {digest.hexdigest()}; the official {ZIP_NAME} has {expected_md5}"
        )


def _is_macos_extra(name: str) -> bool:
    return name.startswith("__MACOSX/") or os.path.basename(name).startswith("._")


def archive_root(archive: zipfile.ZipFile) -> str:
    """The folder of the zip that holds `wnids.txt` (the shallowest, if several), with a trailing
    slash: `tiny-imagenet-200/` in the official zip, `` in one zipped from inside that folder."""
    roots = [
        name[: -len("wnids.txt")]
        for name in archive.namelist()
        if (name == "wnids.txt" or name.endswith("/wnids.txt")) and not _is_macos_extra(name)
    ]
    if not roots:
        raise ValueError(
            f"{archive.filename}: no wnids.txt in the zip; expected the Tiny-ImageNet-200 layout "
            f"({_ROOT}wnids.txt, words.txt, train/<wnid>/images/*.JPEG, val/val_annotations.txt)"
        )
    return min(roots, key=lambda root: (root.count("/"), root))


def read_class_names(archive: zipfile.ZipFile) -> tuple[list[str], list[str]]:
    """(sorted wnids, their words.txt names)."""
    root = archive_root(archive)
    wnids = sorted(archive.read(root + "wnids.txt").decode().split())
    words = {}
    for line in archive.read(root + "words.txt").decode().splitlines():
        wnid, _, name = line.partition("\t")
        words[wnid.strip()] = name.strip()
    names = []
    for wnid in wnids:
        name = words.get(wnid, wnid)
        # ClassLabel names must be unique; keep the wnid where two classes share a name.
        names.append(name if name not in names else f"{name} ({wnid})")
    return wnids, names


def _rgb_jpeg(data: bytes):
    """JPEG bytes as they are when RGB; otherwise an RGB uint8 array (TFDS re-encodes it)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        if image.mode == "RGB" and image.format == "JPEG":
            return data
        return np.asarray(image.convert("RGB"))


class TinyImagenet(tfds.core.GeneratorBasedBuilder):
    """Tiny-ImageNet-200: 64x64 RGB, 200 classes, 100,000 train and 10,000 validation images."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Train and validation splits from the official zip."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        f"Place {ZIP_NAME} (from {URL}, {ZIP_BYTES} bytes, md5 {ZIP_MD5}) in the manual dir, "
        "by default <data_dir>/downloads/manual/."
    )
    # Class attributes so a test can point the download at a local server.
    url = URL
    zip_md5 = ZIP_MD5
    zip_bytes = ZIP_BYTES

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(
                        shape=(IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8, encoding_format="jpeg"
                    ),
                    "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
                    "wnid": tfds.features.Text(),
                    "file_name": tfds.features.Text(),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://www.kaggle.com/c/tiny-imagenet",
        )

    def _zip_path(self, dl_manager) -> str:
        # A zip the user placed is trusted as it is (it may be a re-zipped copy); its layout is
        # still checked. A downloaded one must be the official archive.
        try:
            manual_zip = dl_manager.manual_dir / ZIP_NAME
        except AssertionError:  # TFDS's way of saying the manual dir is missing or empty.
            manual_zip = None
        if manual_zip is not None and manual_zip.exists():
            return os.fspath(manual_zip)
        path = os.fspath(dl_manager.download(self.url))
        verify_zip(path, self.zip_md5, self.zip_bytes)
        return path

    def _split_generators(self, dl_manager):
        path = self._zip_path(dl_manager)
        with zipfile.ZipFile(path) as archive:
            wnids, names = read_class_names(archive)
        if len(wnids) != NUM_CLASSES:
            raise ValueError(
                f"{path}: wnids.txt lists {len(wnids)} classes; the official Tiny-ImageNet-200 has "
                f"{NUM_CLASSES} (remove the added classes' lines from wnids.txt, their train/<wnid> "
                "folders and their val_annotations.txt lines, then zip it again)"
            )
        self.info.features["label"].names = names
        return {
            "train": self._generate_examples(path, "train", wnids),
            "validation": self._generate_examples(path, "validation", wnids),
        }

    def _generate_examples(self, path, split, wnids):
        label_of = {wnid: index for index, wnid in enumerate(wnids)}
        with zipfile.ZipFile(path) as archive:
            root = archive_root(archive)
            if split == "train":
                labelled = []
                for name in archive.namelist():
                    parts = name[len(root) :].split("/") if name.startswith(root) else ()
                    # train/<wnid>/images/<file>.JPEG
                    if (
                        len(parts) == 4
                        and parts[0] == "train"
                        and parts[2] == "images"
                        and parts[3].endswith(".JPEG")
                        and not _is_macos_extra(name)
                    ):
                        labelled.append((name, parts[1]))
            else:
                annotations = archive.read(root + "val/val_annotations.txt").decode().splitlines()
                labelled = []
                for line in annotations:
                    if line.strip():
                        file_name, wnid = line.split("\t")[:2]
                        labelled.append((root + "val/images/" + file_name, wnid))
            for member, wnid in labelled:
                if wnid not in label_of:
                    raise ValueError(f"{path}: {member} belongs to {wnid}, which is not in wnids.txt")
                file_name = os.path.basename(member)
                yield (
                    file_name,
                    {
                        "image": _rgb_jpeg(archive.read(member)),
                        "label": label_of[wnid],
                        "wnid": wnid,
                        "file_name": file_name,
                    },
                )
