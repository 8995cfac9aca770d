"""A folder of images as a dataset (`dataset.name="folder"`): which files it holds, their labels,
and the key that says whether a decoded copy of them (`folder_cache.py`) is still current.

Two layouts, told apart by where the images are:
- labelled: `DIR/<class>/.../<image>`. Every subfolder of DIR is a class; labels index the class
  names in sorted order (as torchvision's ImageFolder numbers them), and a class's images may lie
  at any depth below its folder (Tiny-ImageNet's `train/<wnid>/images/*.JPEG`). A test folder is
  numbered with its training folder's classes, so the same name has the same label in both.
- unlabelled: `DIR/<image>`, images directly in DIR; every label is -1. Training reads no label;
  kNN, linear probe and few-shot need a labelled folder.
A folder with images at its top level and in subfolders is refused: which of the two was meant
cannot be guessed. Names starting with "." (`.ipynb_checkpoints`, `.DS_Store`) are skipped, as are
files without an image suffix (`image_files.IMAGE_SUFFIXES`; Tiny-ImageNet's `*_boxes.txt`).
Symbolic links to class folders are followed; links inside a class folder are followed for files
only (`os.walk`'s default), so a link cycle cannot make the listing endless.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

from dino_jax.data.image_files import IMAGE_SUFFIXES, ImageFileError, images_below, is_image_name

FOLDER = "folder"  # the dataset name that selects a folder of images (config.dataset.name)
UNLABELLED = -1  # the label of every image of an unlabelled folder


def _visible_subfolders(root: str) -> list[str]:
    with os.scandir(root) as entries:
        return sorted(e.name for e in entries if not e.name.startswith(".") and e.is_dir())


def class_names(directory: str) -> tuple[str, ...]:
    """The class names of a folder dataset (its subfolders, sorted); () for an unlabelled one.
    Reads only the top level of the folder: no file is listed or opened."""
    root = os.path.abspath(os.path.expanduser(directory))
    with os.scandir(root) as entries:
        if any(is_image_name(e.name) and e.is_file() for e in entries):
            return ()
    return tuple(_visible_subfolders(root))


@dataclasses.dataclass(frozen=True)
class FolderListing:
    """The image files of a folder dataset, in their fixed order: by class, then by path."""

    root: str  # absolute path of the folder
    files: tuple[str, ...]  # paths relative to `root`, "/"-separated
    labels: tuple[int, ...]  # an index into `class_names` per file; UNLABELLED throughout if none
    class_names: tuple[str, ...]  # () for an unlabelled folder
    sizes: tuple[int, ...]  # bytes of each file
    mtimes_ns: tuple[int, ...]  # modification time of each file, in nanoseconds

    @property
    def labelled(self) -> bool:
        return bool(self.class_names)

    def path(self, index: int) -> str:
        return os.path.join(self.root, *self.files[index].split("/"))

    def key(self, image_size: int, resize_policy: str) -> str:
        """A digest of everything the decoded copy depends on: each file's path, label, size and
        modification time, the class names, the stored size and how images are resized. A file
        added, removed, renamed, moved to another class, rewritten or touched changes it."""
        content = {
            "root": self.root,
            "image_size": image_size,
            "resize": resize_policy,
            "classes": self.class_names,
            "files": list(zip(self.files, self.labels, self.sizes, self.mtimes_ns)),
        }
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def list_folder(directory: str, classes: tuple[str, ...] | None = None) -> FolderListing:
    """The listing of `directory` (module docstring: labelled or unlabelled). `classes`: the class
    names to number a labelled folder with (a test folder takes its training folder's); every
    subfolder must be one of them. Raises ImageFileError naming every problem, one per line."""
    root = os.path.abspath(os.path.expanduser(directory))
    if not os.path.isdir(root):
        what = "not a folder" if os.path.exists(root) else "no such folder"
        raise ImageFileError(f"{directory}: {what}; expected a folder of images or of class subfolders")
    try:
        with os.scandir(root) as entries:
            top_images = sorted(e.name for e in entries if is_image_name(e.name) and e.is_file())
        subfolders = _visible_subfolders(root)
    except OSError as error:
        raise ImageFileError(f"{directory}: cannot read this folder ({error.strerror or error})") from error

    problems: list[str] = []
    found: list[tuple[str, int]] = []  # (relative path, label)
    if top_images:
        found = [(name, UNLABELLED) for name in top_images]
        mixed = [name for name in subfolders if images_below(os.path.join(root, name), problems)]
        if mixed:
            problems.append(
                f"{directory}: holds {len(top_images)} images at its top level and images in the "
                f"subfolders {mixed[:5]}{' ...' if len(mixed) > 5 else ''}; expected images directly "
                "in the folder (unlabelled) or class subfolders only (labelled), not both"
            )
        names: tuple[str, ...] = ()
    else:
        names = tuple(subfolders) if classes is None else tuple(classes)
        label_of = {name: label for label, name in enumerate(names)}
        for name in subfolders:
            if name not in label_of:
                problems.append(
                    f"{os.path.join(directory, name)}: a class folder whose name is not a class of "
                    f"the training folder ({len(names)} classes: {list(names[:5])}{' ...' if len(names) > 5 else ''})"
                )
                continue
            images = images_below(os.path.join(root, name), problems)
            if not images:
                problems.append(f"{os.path.join(directory, name)}: a class folder with no image files")
            found += [(f"{name}/{relative}", label_of[name]) for relative in images]
        if not subfolders and not problems:
            problems.append(
                f"{directory}: no image files ({', '.join(IMAGE_SUFFIXES)}) and no class subfolders"
            )
    sizes, mtimes = [], []
    for relative, _ in found:
        try:
            stat = os.stat(os.path.join(root, *relative.split("/")))
        except OSError as error:
            problems.append(f"{os.path.join(root, relative)}: cannot be read ({error.strerror or error})")
            continue
        sizes.append(stat.st_size)
        mtimes.append(stat.st_mtime_ns)
    if problems:
        head = (
            "" if len(problems) == 1 else f"{len(problems)} problems with the folder dataset {directory}:\n  "
        )
        raise ImageFileError(head + "\n  ".join(problems))
    return FolderListing(
        root=root,
        files=tuple(relative for relative, _ in found),
        labels=tuple(label for _, label in found),
        class_names=names,
        sizes=tuple(sizes),
        mtimes_ns=tuple(mtimes),
    )
