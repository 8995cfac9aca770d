"""A folder dataset decoded once into a stored copy, and that copy read at random access.

`open_folder(DIR, image_size=S, cache_root=...)` lists the folder (`image_folder.py`), and
unless a copy of exactly those files at that size is already stored, decodes every image once
(`image_files.load_square_image`: the largest centred square, resized to S x S, bicubic and
antialiased) into `<cache_root>/<folder name>-<hash of its path>-<S>px/`:

  images.npy     uint8 (N, S, S, 3), the images in the listing's order (by class, then by path)
  labels.npy     int32 (N,), -1 throughout for an unlabelled folder
  files.tsv      one line per image: path relative to the folder, label, bytes, mtime in ns
  manifest.json  the folder, S, the resize policy, the class names, and the key of all of it

The key (`FolderListing.key`) covers every file's path, label, size and modification time, the
class names, S and the resize policy: a change to any of them rebuilds the copy on the next run.
The images are stored in a fixed order, so example i is the same image in every run, and a
resumed run (whose checkpoint holds only a position in the stream) sees the same batches.

Why a .npy file: `np.load(mmap_mode="r")` gives random access without decoding or deserialising
anything (example i is S*S*3 bytes at a known offset, read from the page cache), from any process
(a `FolderSource` pickles as its path, for grain's workers); the decoding threads write their rows
straight into the memory-mapped file, so a 100,000-image folder is never held in memory; and
numpy alone writes it. array_record, which the TFDS datasets use, would need TensorFlow to build
and a record parse per read, and a JPEG stored in it would be decoded again every epoch.

Decoding runs in threads: PIL releases the GIL while it decodes and resizes, and threads share the
memory-mapped output (processes forked after JAX has started may deadlock). A progress line is
printed every few seconds. Every file that cannot be read is named, one per line, and nothing is
stored until all of them are fixed or removed: no image is silently left out.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Any, Callable

import numpy as np

from dino_jax.data import image_files, image_folder, sources

CACHE_FOLDER = "image_folders"  # under the data dir: where decoded folders are stored
# Part of the key: a change to how images are made square or resized must rebuild every copy.
RESIZE_POLICY = "centre square, bicubic antialiased (PIL), JPEG draft scale >= size"
_FORMAT = 1  # of the stored files; part of the manifest
_CHUNK = 64  # images per decoding task: enough work per task to hide the pool's overhead
PROGRESS_EVERY_S = 10.0


def _print(*args):
    print(*args, file=sys.stderr, flush=True)


class FolderSource:
    """A decoded folder: `len()` and `[i]` -> `{"image": uint8 (S, S, 3), "label": int}` (-1 when
    unlabelled), read from the memory-mapped copy. Picklable: it pickles as its path, and each
    process maps the file itself. `num_classes` is 0 for an unlabelled folder."""

    def __init__(self, cache_dir: str, split: str):
        with open(os.path.join(cache_dir, "manifest.json")) as f:
            manifest = json.load(f)
        self.cache_dir = cache_dir
        self.name = image_folder.FOLDER
        self.split = split
        self.root = manifest["root"]
        self.image_size = manifest["image_size"]
        self.class_names = tuple(manifest["classes"])
        self.num_classes = len(self.class_names)
        self.labels = np.load(os.path.join(cache_dir, "labels.npy"))
        self._images = None

    @property
    def images(self) -> np.ndarray:
        if self._images is None:
            self._images = np.load(os.path.join(self.cache_dir, "images.npy"), mmap_mode="r")
        return self._images

    def __getstate__(self):
        return {**self.__dict__, "_images": None}

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {self!r}")
        return {"image": np.array(self.images[index]), "label": int(self.labels[index])}

    def __getitems__(self, indices):
        rows = np.asarray(indices, np.int64)
        images = self.images[rows]  # one copy out of the mapping for the whole batch
        return [{"image": image, "label": int(self.labels[i])} for image, i in zip(images, rows)]

    def __repr__(self) -> str:
        return f"FolderSource({self.root!r}, split={self.split!r}, size={len(self)})"


def cache_dir_for(cache_root: str, root: str, image_size: int) -> str:
    """Where the copy of folder `root` at `image_size` px is stored: its name says which folder it
    is, the hash of its full path keeps two folders of the same name apart."""
    digest = hashlib.sha256(root.encode()).hexdigest()[:10]
    name = os.path.basename(root.rstrip(os.sep)) or "root"
    return os.path.join(cache_root, f"{name}-{digest}-{image_size}px")


def _stored_key(cache_dir: str) -> str | None:
    try:
        with open(os.path.join(cache_dir, "manifest.json")) as f:
            return json.load(f).get("key")
    except (OSError, ValueError):
        return None


def open_folder(
    directory: str,
    *,
    image_size: int,
    cache_root: str,
    split: str = "train",
    classes: tuple[str, ...] | None = None,
    log: Callable[[str], None] = _print,
    workers: int | None = None,
) -> FolderSource:
    """The folder `directory` as a `FolderSource` of `image_size` px squares, decoded now unless a
    current copy is stored under `cache_root`. `classes`: see `image_folder.list_folder`.
    Raises ImageFileError naming every file or folder that cannot be used."""
    if image_size <= 0:
        raise ValueError(f"open_folder: image_size {image_size}; expected a positive number of pixels")
    listing = image_folder.list_folder(directory, classes)
    key = listing.key(image_size, RESIZE_POLICY)
    cache_dir = cache_dir_for(os.path.abspath(os.path.expanduser(cache_root)), listing.root, image_size)
    if _stored_key(cache_dir) != key:
        _build(listing, image_size, key, cache_dir, log, workers)
    return FolderSource(cache_dir, split)


def open_split(
    which: str, *, train_dir: str, test_dir: str, image_size: int, cache_root: str
) -> FolderSource:
    """Split `which` of a folder dataset: "pretrain" and "train" are `train_dir`, "eval" is
    `test_dir`, numbered with `train_dir`'s classes. DatasetUnavailableError for "eval" without a
    `test_dir`."""
    if which in ("pretrain", "train"):
        return open_folder(train_dir, image_size=image_size, cache_root=cache_root, split="train")
    if which != "eval":
        raise ValueError(f"open_split: which={which!r}; expected 'pretrain', 'train' or 'eval'")
    if not test_dir:
        raise sources.DatasetUnavailableError(
            f"the folder dataset {train_dir} has no test split: config.dataset.test_dir is empty; "
            "expected a folder of test images in class subfolders named as in dataset.train_dir"
        )
    classes = image_folder.class_names(train_dir) or None
    return open_folder(test_dir, image_size=image_size, cache_root=cache_root, split="test", classes=classes)


def _build(listing, image_size, key, cache_dir, log, workers) -> None:
    """Decodes every image of `listing` into a new copy, which replaces `cache_dir` only once it
    is complete: a run stopped while building leaves the previous copy (or none), never half a one."""
    count = len(listing.files)
    parent = os.path.dirname(cache_dir)
    os.makedirs(parent, exist_ok=True)
    building = tempfile.mkdtemp(prefix=os.path.basename(cache_dir) + ".building-", dir=parent)
    try:
        images = np.lib.format.open_memmap(
            os.path.join(building, "images.npy"),
            mode="w+",
            dtype=np.uint8,
            shape=(count, image_size, image_size, 3),
        )
        threads = workers or os.cpu_count() or 1
        log(
            f"preparing the folder {listing.root}: decoding {count:,} images into {image_size}x"
            f"{image_size} squares in {cache_dir} ({threads} threads); later runs read this copy"
        )
        problems = _decode_all(listing, images, image_size, threads, log)
        if problems:
            raise image_files.ImageFileError(
                f"{len(problems)} of the {count:,} images in {listing.root} cannot be used; remove or "
                "replace them and run again (nothing was stored):\n  " + "\n  ".join(problems)
            )
        images.flush()
        del images
        np.save(os.path.join(building, "labels.npy"), np.asarray(listing.labels, np.int32))
        with open(os.path.join(building, "files.tsv"), "w") as f:
            for row in zip(listing.files, listing.labels, listing.sizes, listing.mtimes_ns):
                f.write("\t".join(str(value) for value in row) + "\n")
        manifest = {
            "format": _FORMAT,
            "root": listing.root,
            "image_size": image_size,
            "resize": RESIZE_POLICY,
            "classes": list(listing.class_names),
            "count": count,
            "key": key,
        }
        # Written last: a manifest with the key marks a complete copy.
        with open(os.path.join(building, "manifest.json"), "w") as f:
            json.dump(manifest, f, indent=1)
        os.chmod(building, 0o755)  # mkdtemp's 0o700 would hide the copy from other users of the data dir
        _install(building, cache_dir, key)
    finally:
        shutil.rmtree(building, ignore_errors=True)


def _install(building: str, cache_dir: str, key: str) -> None:
    """Moves the finished copy into place. Where another process (a host of the same run sharing
    the data dir) has just installed the same key, its copy is kept and ours dropped."""
    if os.path.isdir(cache_dir):
        if _stored_key(cache_dir) == key:
            return
        stale = tempfile.mkdtemp(
            prefix=os.path.basename(cache_dir) + ".stale-", dir=os.path.dirname(cache_dir)
        )
        os.replace(cache_dir, os.path.join(stale, "copy"))  # a reader's open memory map stays valid
        shutil.rmtree(stale, ignore_errors=True)
    try:
        os.rename(building, cache_dir)
    except OSError:
        if _stored_key(cache_dir) != key:
            raise


def _decode_all(listing, images, image_size, threads, log) -> list[str]:
    """Decodes every image of `listing` into `images` (rows in listing order) on `threads`
    threads, printing progress; returns one line per file that could not be used, in order."""

    def decode(start: int) -> list[tuple[int, str]]:
        failed = []
        for index in range(start, min(start + _CHUNK, len(listing.files))):
            try:
                images[index] = image_files.load_square_image(listing.path(index), image_size)
            except image_files.ImageFileError as error:
                failed.append((index, str(error)))
        return failed

    started = last_report = time.perf_counter()
    done, failed = 0, []
    pool = concurrent.futures.ThreadPoolExecutor(threads)
    try:
        futures = {pool.submit(decode, start): start for start in range(0, len(listing.files), _CHUNK)}
        for future in concurrent.futures.as_completed(futures):
            failed += future.result()
            done += min(_CHUNK, len(listing.files) - futures[future])
            now = time.perf_counter()
            if now - last_report >= PROGRESS_EVERY_S and done < len(listing.files):
                rate = done / (now - started)
                log(
                    f"  {done:,}/{len(listing.files):,} images decoded ({rate:,.0f}/s, about "
                    f"{(len(listing.files) - done) / rate:,.0f} s left)"
                )
                last_report = now
    finally:
        # On Ctrl-C or an error, the tasks not yet started are dropped instead of run to the end.
        pool.shutdown(wait=True, cancel_futures=True)
    elapsed = time.perf_counter() - started
    if not failed:
        log(
            f"  {len(listing.files):,} images decoded in {elapsed:,.1f} s ({len(listing.files) / elapsed:,.0f}/s)"
        )
    return [message for _, message in sorted(failed)]
